//! Numerical checks shared by every layer's tests and by `flowlab check`.
//!
//! For a flow `f` and a random input batch:
//! 1. **round trip** (in f32): `max |x − f⁻¹(f(x))|` and `max |ldj_f + ldj_f⁻¹|`;
//! 2. **log-determinant** (in f64): the accumulated `ldj` against `log|det J|` of a
//!    central-difference Jacobian of `x ↦ (z, factored latents)`, per sample;
//! 3. **shapes**: the output shape equals `out_shape(input shape)`.
//!
//! Layers with parameters are built twice from the same seed (f32 and f64) and their
//! parameters perturbed identically first, so zero-initialised layers (identity at
//! init) are still tested away from the identity.

use candle_core::{DType, Device, Tensor};

use crate::flow::{Flow, FlowCtx, Latents};
use crate::linalg::Lu;
use crate::params::{ParamStore, Params};
use crate::rng::{host_tensor, Rng};
use crate::Result;

/// What input values a check feeds the flow.
#[derive(Debug, Clone, Copy)]
pub enum InputKind {
    /// N(0, 1) — for flows on the real line.
    Normal,
    /// U(0.05, 0.95) — for flows on the unit interval (the logit transform).
    Unit,
}

/// Settings of one numerical check.
#[derive(Debug, Clone)]
pub struct FlowCheck {
    /// Input shape `[C, H, W]`.
    pub shape: Vec<usize>,
    /// Batch size of the round-trip test (the Jacobian is checked per sample).
    pub batch: usize,
    pub input: InputKind,
    /// Channels of a random conditioning tensor passed in the context, if any.
    pub cond_channels: Option<usize>,
    /// Classes of one-hot labels passed in the context (sample b gets label b mod K), if any.
    pub label_classes: Option<usize>,
    /// Std of the Gaussian perturbation added to every parameter before checking.
    pub perturb: f64,
    pub seed: u64,
}

impl FlowCheck {
    /// Defaults: batch 2, N(0,1) input, no condition, perturbation 0.1, seed 0.
    pub fn new(shape: &[usize]) -> Self {
        Self {
            shape: shape.to_vec(),
            batch: 2,
            input: InputKind::Normal,
            cond_channels: None,
            label_classes: None,
            perturb: 0.1,
            seed: 0,
        }
    }

    pub fn input(mut self, kind: InputKind) -> Self {
        self.input = kind;
        self
    }

    pub fn cond(mut self, channels: usize) -> Self {
        self.cond_channels = Some(channels);
        self
    }

    /// Passes one-hot labels over `classes` classes in the context.
    pub fn labels(mut self, classes: usize) -> Self {
        self.label_classes = Some(classes);
        self
    }

    pub fn perturb(mut self, std: f64) -> Self {
        self.perturb = std;
        self
    }

    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

/// Measured errors of one check.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckReport {
    /// max |x − f⁻¹(f(x))| in f32.
    pub max_inverse_err: f64,
    /// max |ldj_f + ldj_f⁻¹| in f32.
    pub max_ldj_sum: f64,
    /// max |ldj − log|det J_bruteforce|| in f64.
    pub max_logdet_err: f64,
    /// The largest |log|det J|| seen (to judge the error against).
    pub max_abs_logdet: f64,
}

impl CheckReport {
    /// Tolerances of the test suite: round trip ≤ 1e-4, log-det error ≤ 1e-5·max(1, |log det|).
    pub fn passes(&self) -> bool {
        self.max_inverse_err <= 1e-4
            && self.max_ldj_sum <= 1e-4 * self.max_abs_logdet.max(1.0)
            && self.max_logdet_err <= 1e-5 * self.max_abs_logdet.max(1.0)
    }
}

/// The largest absolute value of `t` (any float dtype), as f64.
pub fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

fn make_input(check: &FlowCheck, batch: usize, rng: &mut Rng, dtype: DType) -> Result<Tensor> {
    let mut shape = vec![batch];
    shape.extend(&check.shape);
    match check.input {
        InputKind::Normal => rng.normal(&shape, 1.0, dtype, &Device::Cpu),
        InputKind::Unit => rng.uniform(&shape, 0.05, 0.95, dtype, &Device::Cpu),
    }
}

/// One-hot labels `[batch, K]` (sample b has label b mod K).
fn make_labels(check: &FlowCheck, batch: usize, dtype: DType) -> Result<Option<Tensor>> {
    check
        .label_classes
        .map(|k| {
            let l: Vec<u32> = (0..batch).map(|b| (b % k) as u32).collect();
            crate::flow::one_hot(&Tensor::from_vec(l, batch, &Device::Cpu)?, k, dtype)
        })
        .transpose()
}

fn make_cond(
    check: &FlowCheck,
    batch: usize,
    rng: &mut Rng,
    dtype: DType,
) -> Result<Option<Tensor>> {
    check
        .cond_channels
        .map(|c| {
            rng.normal(
                &[batch, c, check.shape[1], check.shape[2]],
                1.0,
                dtype,
                &Device::Cpu,
            )
        })
        .transpose()
}

/// Runs all checks on a parameter-free flow (the same object serves f32 and f64).
pub fn check_flow_report(flow: &dyn Flow, check: &FlowCheck) -> Result<CheckReport> {
    run_checks(flow, flow, check)
}

/// Builds the flow in f32 and f64 from the same seed, perturbs both identically, runs all checks.
pub fn check_built_report(
    check: &FlowCheck,
    build: impl Fn(&Params) -> Result<Box<dyn Flow>>,
) -> Result<CheckReport> {
    let s32 = ParamStore::new(check.seed, DType::F32, &Device::Cpu);
    let s64 = ParamStore::new(check.seed, DType::F64, &Device::Cpu);
    let f32_flow = build(&s32.root())?;
    let f64_flow = build(&s64.root())?;
    perturb_params(&s32, check.perturb, check.seed ^ 0x5eed)?;
    perturb_params(&s64, check.perturb, check.seed ^ 0x5eed)?;
    run_checks(f32_flow.as_ref(), f64_flow.as_ref(), check)
}

/// Adds N(0, std²) noise (drawn from `seed`, in variable order) to every trainable variable.
pub fn perturb_params(store: &ParamStore, std: f64, seed: u64) -> Result<()> {
    let mut rng = Rng::new(seed);
    for (_, v) in store.named_vars() {
        let noise = host_tensor(
            rng.normal_vec(v.elem_count(), std),
            v.dims(),
            v.dtype(),
            v.device(),
        )?;
        v.set(&(v.as_tensor() + noise)?)?;
    }
    Ok(())
}

/// Panicking wrapper for tests: [`check_flow_report`] must pass.
pub fn check_flow(flow: &dyn Flow, check: &FlowCheck) -> CheckReport {
    let r = check_flow_report(flow, check).expect("check ran");
    assert!(r.passes(), "{} failed numerical checks: {r:?}", flow.kind());
    r
}

/// Panicking wrapper for tests: [`check_built_report`] must pass.
pub fn check_built(
    check: &FlowCheck,
    build: impl Fn(&Params) -> Result<Box<dyn Flow>>,
) -> CheckReport {
    let r = check_built_report(check, build).expect("check ran");
    assert!(r.passes(), "failed numerical checks: {r:?}");
    r
}

/// Result of [`round_trip`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundTrip {
    /// max |x − f⁻¹(f(x))|.
    pub max_inverse_err: f64,
    /// max |ldj_f + ldj_f⁻¹|.
    pub max_ldj_sum: f64,
    /// max |ldj_f| (to judge the error against).
    pub max_abs_ldj: f64,
}

/// Runs x → f(x) → f⁻¹(f(x)) in f32 on a random batch (factored latents given back to
/// the inverse) and checks the output shape against `out_shape`.
pub fn round_trip(flow: &dyn Flow, check: &FlowCheck) -> Result<RoundTrip> {
    let out_shape = flow.out_shape(&check.shape)?;
    let mut rng = Rng::new(check.seed);
    let x = make_input(check, check.batch, &mut rng, DType::F32)?;
    let cond = make_cond(check, check.batch, &mut rng, DType::F32)?;
    let zeros = Tensor::zeros(check.batch, DType::F32, &Device::Cpu)?;
    let labels = make_labels(check, check.batch, DType::F32)?;
    let mut ctx = FlowCtx::new(check.seed).with_labels(labels.clone());
    ctx.cond = cond.clone();
    let (z, ldj_f) = flow.forward_ctx(&x, &zeros, &mut ctx)?;
    let mut expected = vec![check.batch];
    expected.extend(&out_shape);
    if z.dims() != expected.as_slice() || ldj_f.dims() != [check.batch] {
        return Err(crate::Error::shape(
            flow.kind(),
            format!(
                "out_shape says {expected:?} / ldj [{}], forward gave {:?} / {:?}",
                check.batch,
                z.dims(),
                ldj_f.dims()
            ),
        ));
    }
    let factored = std::mem::take(&mut ctx.factored);
    let mut ictx = FlowCtx::new(check.seed)
        .with_latents(Latents::Given(factored))
        .with_labels(labels);
    ictx.cond = cond;
    let (x_rec, ldj_i) = flow.inverse_ctx(&z, &zeros, &mut ictx)?;
    Ok(RoundTrip {
        max_inverse_err: max_abs(&(&x - &x_rec)?)?,
        max_ldj_sum: max_abs(&(&ldj_f + &ldj_i)?)?,
        max_abs_ldj: max_abs(&ldj_f)?,
    })
}

fn run_checks(f32_flow: &dyn Flow, f64_flow: &dyn Flow, check: &FlowCheck) -> Result<CheckReport> {
    // 1. Round trip in f32 (3. shapes checked inside).
    let rt = round_trip(f32_flow, check)?;
    let (max_inverse_err, max_ldj_sum) = (rt.max_inverse_err, rt.max_ldj_sum);

    // 2. Brute-force Jacobian in f64, one sample at a time, all 2·D perturbed copies in one batch.
    let mut rng = Rng::new(check.seed);
    let x = make_input(check, check.batch, &mut rng, DType::F64)?;
    let cond = make_cond(check, check.batch, &mut rng, DType::F64)?;
    let labels = make_labels(check, check.batch, DType::F64)?;
    let d: usize = check.shape.iter().product();
    let eps = 1e-5;
    let mut max_logdet_err: f64 = 0.0;
    let mut max_abs_logdet: f64 = 0.0;
    for b in 0..check.batch {
        let xb = x.get(b)?.flatten_all()?.to_vec1::<f64>()?;
        let mut rows = Vec::with_capacity(2 * d * d);
        for i in 0..d {
            for sign in [1.0, -1.0] {
                let mut v = xb.clone();
                v[i] += sign * eps;
                rows.extend(v);
            }
        }
        let mut shape = vec![2 * d];
        shape.extend(&check.shape);
        let xs = Tensor::from_vec(rows, shape, &Device::Cpu)?;
        let mut ctx = FlowCtx::new(check.seed);
        if let Some(c) = &cond {
            ctx.cond = Some(c.get(b)?.unsqueeze(0)?.repeat((2 * d, 1, 1, 1))?);
        }
        if let Some(l) = &labels {
            ctx.labels = Some(l.get(b)?.unsqueeze(0)?.repeat((2 * d, 1))?);
        }
        let (z, _) = f64_flow.forward_ctx(
            &xs,
            &Tensor::zeros(2 * d, DType::F64, &Device::Cpu)?,
            &mut ctx,
        )?;
        let mut parts = vec![z.flatten_from(1)?];
        parts.extend(
            ctx.factored
                .iter()
                .map(|t| t.flatten_from(1))
                .collect::<candle_core::Result<Vec<_>>>()?,
        );
        let out = Tensor::cat(&parts, 1)?.to_vec2::<f64>()?;
        if out[0].len() != d {
            return Err(crate::Error::shape(
                f64_flow.kind(),
                format!(
                    "maps {d} inputs to {} outputs: not a bijection",
                    out[0].len()
                ),
            ));
        }
        // J[r][i] = ∂out_r/∂x_i.
        let mut jac = vec![0.0; d * d];
        for i in 0..d {
            for r in 0..d {
                jac[r * d + i] = (out[2 * i][r] - out[2 * i + 1][r]) / (2.0 * eps);
            }
        }
        let brute = Lu::new(&jac, d)?.log_abs_det();

        // The flow's own log-det at the unperturbed sample, minus split densities.
        let mut ctx = FlowCtx::new(check.seed);
        if let Some(c) = &cond {
            ctx.cond = Some(c.get(b)?.unsqueeze(0)?);
        }
        if let Some(l) = &labels {
            ctx.labels = Some(l.get(b)?.unsqueeze(0)?);
        }
        let (_, ldj) = f64_flow.forward_ctx(
            &x.get(b)?.unsqueeze(0)?,
            &Tensor::zeros(1, DType::F64, &Device::Cpu)?,
            &mut ctx,
        )?;
        let mut ldj = ldj.to_vec1::<f64>()?[0];
        if let Some(lp) = &ctx.factored_logp {
            ldj -= lp.to_vec1::<f64>()?[0];
        }
        max_logdet_err = max_logdet_err.max((ldj - brute).abs());
        max_abs_logdet = max_abs_logdet.max(brute.abs());
    }
    Ok(CheckReport {
        max_inverse_err,
        max_ldj_sum,
        max_logdet_err,
        max_abs_logdet,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deliberately wrong flow: doubles x but reports log-det 0. The checker must catch it.
    struct WrongLogdet;
    impl Flow for WrongLogdet {
        fn kind(&self) -> &'static str {
            "wrong"
        }
        fn out_shape(&self, s: &[usize]) -> Result<Vec<usize>> {
            Ok(s.to_vec())
        }
        fn forward_ctx(
            &self,
            x: &Tensor,
            ldj: &Tensor,
            _: &mut FlowCtx,
        ) -> Result<(Tensor, Tensor)> {
            Ok(((x * 2.0)?, ldj.clone()))
        }
        fn inverse_ctx(
            &self,
            z: &Tensor,
            ldj: &Tensor,
            _: &mut FlowCtx,
        ) -> Result<(Tensor, Tensor)> {
            Ok(((z * 0.5)?, ldj.clone()))
        }
    }

    /// A deliberately non-inverting flow.
    struct WrongInverse;
    impl Flow for WrongInverse {
        fn kind(&self) -> &'static str {
            "wrong-inverse"
        }
        fn out_shape(&self, s: &[usize]) -> Result<Vec<usize>> {
            Ok(s.to_vec())
        }
        fn forward_ctx(
            &self,
            x: &Tensor,
            ldj: &Tensor,
            _: &mut FlowCtx,
        ) -> Result<(Tensor, Tensor)> {
            Ok(((x + 1.0)?, ldj.clone()))
        }
        fn inverse_ctx(
            &self,
            z: &Tensor,
            ldj: &Tensor,
            _: &mut FlowCtx,
        ) -> Result<(Tensor, Tensor)> {
            Ok(((z - 0.9)?, ldj.clone()))
        }
    }

    #[test]
    fn checker_catches_wrong_logdet_and_wrong_inverse() {
        let r = check_flow_report(&WrongLogdet, &FlowCheck::new(&[1, 2, 2])).unwrap();
        assert!((r.max_logdet_err - 4.0 * 2f64.ln()).abs() < 1e-6, "{r:?}");
        assert!(!r.passes());
        let r = check_flow_report(&WrongInverse, &FlowCheck::new(&[1, 2, 2])).unwrap();
        assert!((r.max_inverse_err - 0.1).abs() < 1e-5, "{r:?}");
        assert!(!r.passes());
    }
}
