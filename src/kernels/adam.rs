//! Adam(W)'s update of one variable, fused into three in-place passes: the first moment,
//! the second moment, then the variable. candle's ops took ~12 passes per variable, each
//! allocating a tensor the variable's size.
//!
//! The arithmetic is candle's, operation by operation and in the same precision, so the
//! result is bit-identical to [`crate::train::optim::Adam`]'s op-by-op update:
//! `t · s` is `t·s + 0` with `s` rounded to the tensor's type (candle's `affine`),
//! `t / s` is `t·(1/s) + 0`, `t + s` is `t·1 + s`.
//!
//! With `ĝ = G·clip (+ λθ for Adam)`:
//! `m ← m·β₁ + ĝ·(1−β₁)`, `v ← v·β₂ + ĝ²·(1−β₂)`,
//! `θ ← θ − (m·(1/bc₁)) / (√(v·(1/bc₂)) + ε) · lr (− θ·(lr·λ) for AdamW)`.

use candle_core::{CpuStorage, InplaceOp3, Layout, Tensor};

use super::{slice, Real};
use crate::Result;

/// The scalars of one Adam(W) step (all as f64; each kernel rounds them as candle would).
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    /// Gradient scale from global-norm clipping; `None` when no clipping applies.
    pub clip: Option<f64>,
    /// Adam's L2 term λ (added to the gradient); `None` for none or for AdamW.
    pub l2: Option<f64>,
    /// AdamW's decoupled decay λ; `None` for none or for Adam.
    pub decoupled: Option<f64>,
    pub beta1: f64,
    pub beta2: f64,
    /// Bias corrections `1 − βᵗ`.
    pub bc1: f64,
    pub bc2: f64,
    pub eps: f64,
    pub lr: f64,
}

/// `t · s` as candle computes it for a scalar: `t·s + 0`.
#[inline(always)]
fn scale<T: Real>(t: T, s: T) -> T {
    t * s + T::ZERO
}

impl AdamStep {
    /// `ĝ` of one element.
    #[inline(always)]
    fn grad<T: Real>(&self, g: T, theta: T) -> T {
        let g = match self.clip {
            Some(c) => scale(g, T::from_f64(c)),
            None => g,
        };
        match self.l2 {
            Some(l) => g + scale(theta, T::from_f64(l)),
            None => g,
        }
    }
}

/// Elements per parallel piece; smaller variables run on one thread.
const PIECE: usize = 1 << 15;

/// `f(dst piece, offset)` over `dst` in parallel pieces of [`PIECE`].
fn pieces<T: Real>(dst: &mut [T], f: impl Fn(&mut [T], usize) + Send + Sync) {
    use rayon::prelude::*;
    if dst.len() <= PIECE {
        f(dst, 0);
    } else {
        dst.par_chunks_mut(PIECE)
            .enumerate()
            .for_each(|(i, d)| f(d, i * PIECE));
    }
}

/// `m ← m·β₁ + ĝ·(1−β₁)` (first) or `v ← v·β₂ + ĝ²·(1−β₂)` (second), in place; srcs
/// `[G, θ]`.
struct Moment {
    step: AdamStep,
    second: bool,
}

impl Pass for Moment {
    fn run<T: Real>(&self, dst: &mut [T], g: &[T], theta: &[T]) {
        let s = &self.step;
        let (beta, one_minus) = if self.second {
            (T::from_f64(s.beta2), T::from_f64(1.0 - s.beta2))
        } else {
            (T::from_f64(s.beta1), T::from_f64(1.0 - s.beta1))
        };
        let second = self.second;
        pieces(dst, |d, at| {
            let (g, th) = (&g[at..at + d.len()], &theta[at..at + d.len()]);
            for ((d, &g), &th) in d.iter_mut().zip(g).zip(th) {
                let g = s.grad(g, th);
                let g = if second { g * g } else { g };
                *d = scale(*d, beta) + scale(g, one_minus);
            }
        });
    }
}

impl InplaceOp3 for Moment {
    fn name(&self) -> &'static str {
        "flowlab-adam-moment"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
        th: &CpuStorage,
        tl: &Layout,
    ) -> candle_core::Result<()> {
        run_pass(self, dst, dst_l, (g, gl), (th, tl))
    }
}

/// `θ ← θ − (m·(1/bc₁)) / (√(v·(1/bc₂)) + ε) · lr (− θ·(lr·λ))`, in place; srcs `[m, v]`.
struct Update {
    step: AdamStep,
}

impl Pass for Update {
    fn run<T: Real>(&self, theta: &mut [T], m: &[T], v: &[T]) {
        let s = &self.step;
        let (ibc1, ibc2) = (T::from_f64(1.0 / s.bc1), T::from_f64(1.0 / s.bc2));
        let (eps, lr) = (T::from_f64(s.eps), T::from_f64(s.lr));
        let decay = s.decoupled.map(|l| T::from_f64(s.lr * l));
        pieces(theta, |th, at| {
            let (m, v) = (&m[at..at + th.len()], &v[at..at + th.len()]);
            for ((th, &m), &v) in th.iter_mut().zip(m).zip(v) {
                let den = scale(v, ibc2).sqrt() * T::ONE + eps;
                let update = scale(m, ibc1) / den;
                let new = *th - scale(update, lr);
                *th = match decay {
                    Some(d) => new - scale(*th, d),
                    None => new,
                };
            }
        });
    }
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "flowlab-adam-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        run_pass(self, dst, dst_l, (m, ml), (v, vl))
    }
}

/// One elementwise pass of the update over a variable's `dst` and two sources of its size.
trait Pass {
    fn run<T: Real>(&self, dst: &mut [T], a: &[T], b: &[T]);
}

/// [`Pass::run`] on candle's storages: the destination must be contiguous from its
/// storage's start, the sources of its size, all of one float type.
fn run_pass(
    p: &impl Pass,
    dst: &mut CpuStorage,
    dst_l: &Layout,
    (a, al): (&CpuStorage, &Layout),
    (b, bl): (&CpuStorage, &Layout),
) -> candle_core::Result<()> {
    let n = dst_l.shape().elem_count();
    if dst_l.contiguous_offsets() != Some((0, n))
        || [al, bl].iter().any(|l| l.shape().elem_count() != n)
    {
        return Err(candle_core::Error::Msg(
            "adam kernel: contiguous tensors of one size expected".into(),
        ));
    }
    match (dst, a, b) {
        (CpuStorage::F32(d), CpuStorage::F32(a), CpuStorage::F32(b)) => {
            p.run(&mut d[..n], slice(a, al)?, slice(b, bl)?)
        }
        (CpuStorage::F64(d), CpuStorage::F64(a), CpuStorage::F64(b)) => {
            p.run(&mut d[..n], slice(a, al)?, slice(b, bl)?)
        }
        _ => {
            return Err(candle_core::Error::Msg(
                "adam kernel: f32 or f64 tensors of one dtype expected".into(),
            ))
        }
    }
    Ok(())
}

/// One Adam(W) step of variable `theta` with gradient `g`, updating `theta`, `m` and `v` in
/// place. Returns `false`, changing nothing, where the fused kernels do not apply (not on
/// the CPU, another dtype, a layout not contiguous from its storage's start, or candle's
/// kernels chosen); the caller then runs candle's ops.
pub fn adam_step(theta: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, s: AdamStep) -> Result<bool> {
    if !applies(theta, m, v, g) {
        return Ok(false);
    }
    let g = g.contiguous()?;
    m.inplace_op3(
        &g,
        theta,
        &Moment {
            step: s,
            second: false,
        },
    )?;
    v.inplace_op3(
        &g,
        theta,
        &Moment {
            step: s,
            second: true,
        },
    )?;
    theta.inplace_op3(m, v, &Update { step: s })?;
    Ok(true)
}

/// Whether [`adam_step`] runs the fused kernels on these tensors: the fast kernels' CPU
/// dtypes, and θ, m and v contiguous from the start of their storage.
fn applies(theta: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor) -> bool {
    let from_start = |t: &Tensor| matches!(t.layout().contiguous_offsets(), Some((0, _)));
    super::use_fast(&[theta, m, v, g]) && [theta, m, v].into_iter().all(from_start)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use crate::rng::Rng;
    use crate::spec::OptimizerKind;
    use crate::train::optim::Adam;

    /// The fused update against candle's op-by-op one: the same bits for θ, m and v, for
    /// f32 and f64, Adam and AdamW with and without decay and clipping, on variables small
    /// and large enough to run in parallel pieces.
    #[test]
    fn fused_step_is_bit_identical_to_candle_ops() {
        let sizes: [&[usize]; 3] = [&[5], &[3, 7], &[2, super::PIECE + 1234]];
        for dtype in [DType::F32, DType::F64] {
            for (kind, decay, clip) in [
                (OptimizerKind::Adam, 0.0, 1.0),
                (OptimizerKind::Adam, 0.01, 0.3),
                (OptimizerKind::Adamw, 0.05, 1.0),
                (OptimizerKind::Adamw, 0.05, 0.5),
            ] {
                let mut rng = Rng::new(11);
                let init: Vec<_> = sizes
                    .iter()
                    .map(|s| rng.normal(s, 1.0, dtype, &Device::Cpu).unwrap())
                    .collect();
                let vars = |tag: &str| {
                    init.iter()
                        .enumerate()
                        .map(|(i, t)| {
                            (
                                format!("{tag}{i}"),
                                Var::from_tensor(&t.copy().unwrap()).unwrap(),
                            )
                        })
                        .collect::<Vec<_>>()
                };
                let (fast_vars, ref_vars) = (vars("f"), vars("r"));
                let mut fast = Adam::new(fast_vars.clone(), kind, decay).unwrap();
                let mut reference = Adam::new(ref_vars.clone(), kind, decay).unwrap();
                for step in 0..3 {
                    let probes: Vec<_> = sizes
                        .iter()
                        .map(|s| rng.normal(s, 2.0, dtype, &Device::Cpu).unwrap())
                        .collect();
                    let grads = |vars: &[(String, Var)]| {
                        let mut loss: Option<candle_core::Tensor> = None;
                        for ((_, v), p) in vars.iter().zip(&probes) {
                            let l = (v.as_tensor() * p).unwrap().sum_all().unwrap();
                            loss = Some(match loss {
                                None => l,
                                Some(a) => (a + l).unwrap(),
                            });
                        }
                        loss.unwrap().backward().unwrap()
                    };
                    let lr = 1e-2 / (step + 1) as f64;
                    // Under the kernel lock: a test switching to the candle kernels at the
                    // same time would otherwise turn the fused path off under this one.
                    super::super::with_kernels(super::super::Kernels::Fast, || {
                        let g = grads(&fast_vars);
                        for (i, (_, v)) in fast_vars.iter().enumerate() {
                            let t = v.as_tensor();
                            let gi = g.get(t).unwrap();
                            assert!(super::applies(t, &fast.m[i], &fast.v[i], gi), "var {i}");
                        }
                        fast.step(&g, lr, clip).unwrap();
                    });
                    super::super::with_kernels(super::super::Kernels::Candle, || {
                        reference.step(&grads(&ref_vars), lr, clip).unwrap()
                    });
                    let bits = |t: &candle_core::Tensor| {
                        t.flatten_all()
                            .unwrap()
                            .to_dtype(DType::F64)
                            .unwrap()
                            .to_vec1::<f64>()
                            .unwrap()
                            .into_iter()
                            .map(f64::to_bits)
                            .collect::<Vec<_>>()
                    };
                    let (fs, rs) = (fast.state().unwrap(), reference.state().unwrap());
                    for (i, ((_, fv), (_, rv))) in fast_vars.iter().zip(&ref_vars).enumerate() {
                        let what = format!(
                            "{dtype:?} {kind:?} decay {decay} clip {clip} step {step} var {i}"
                        );
                        assert_eq!(bits(fv.as_tensor()), bits(rv.as_tensor()), "θ, {what}");
                        for mv in ["m", "v"] {
                            assert_eq!(
                                bits(&fs[&format!("optim.{mv}.f{i}")]),
                                bits(&rs[&format!("optim.{mv}.r{i}")]),
                                "{mv}, {what}"
                            );
                        }
                    }
                }
            }
        }
    }
}
