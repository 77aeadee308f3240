//! Dequantization: integer pixels → continuous values in logit space.
//!
//! **Uniform**: y = (x + u)/256 with u ~ U[0, 1)^D, then the [`Logit`] transform.
//!   ldj = −D·ln 256 + logit log-det.
//! **Variational** (Flow++): u = g(ε; x) with ε ~ U[0, 1)^D and g = sigmoid ∘ couplings ∘ logit,
//! the couplings conditioned on the image rescaled to [−1, 1]. Since log q(u|x) = −log|det ∂g/∂ε|,
//! adding log|det ∂g/∂ε| to ldj turns the objective into the variational bound
//!   log p(x) ≥ E_ε[ log p_model((x + u)/256) − D·ln 256 − log q(u|x) ].
//! Inverse (both): sigmoid, undo α, ×256 (ldj += D·ln 256), floor, clamp to [0, 255].
//! Shapes preserved; inputs are integer-valued float tensors `[B, C, H, W]` in 0..=255.

use candle_core::Tensor;

use super::logit::Logit;
use super::{Flow, FlowCtx, Sequential};
use crate::Result;

/// Number of quantisation levels of 8-bit images.
pub const QUANTS: f64 = 256.0;

/// Uniform or variational dequantization followed by the logit transform.
pub struct Dequantization {
    logit: Logit,
    /// The noise flow ε ↦ u of variational dequantization, conditioned on the image.
    variational: Option<Sequential>,
}

impl Dequantization {
    /// Uniform dequantization with logit boundary α.
    pub fn uniform(alpha: f64) -> Self {
        Self {
            logit: Logit { alpha },
            variational: None,
        }
    }

    /// Variational dequantization: `noise_flow` maps ε ∈ (0,1) to u ∈ (0,1) (build it with
    /// [`Dequantization::noise_flow`]); its couplings read the image as `cond`.
    pub fn variational(alpha: f64, noise_flow: Sequential) -> Self {
        Self {
            logit: Logit { alpha },
            variational: Some(noise_flow),
        }
    }

    /// Wraps couplings into the noise flow sigmoid ∘ couplings ∘ logit.
    pub fn noise_flow(alpha: f64, couplings: Sequential) -> Sequential {
        Sequential::new()
            .with("to_logit", Logit { alpha })
            .with("couplings", couplings)
            .with("to_unit", super::Inverted(Box::new(Logit { alpha })))
    }

    /// Whether the noise is learned.
    pub fn is_variational(&self) -> bool {
        self.variational.is_some()
    }
}

impl Flow for Dequantization {
    fn kind(&self) -> &'static str {
        "dequantization"
    }

    fn out_shape(&self, in_shape: &[usize]) -> Result<Vec<usize>> {
        Ok(in_shape.to_vec())
    }

    fn forward_ctx(&self, x: &Tensor, ldj: &Tensor, ctx: &mut FlowCtx) -> Result<(Tensor, Tensor)> {
        let d = x.elem_count() / x.dim(0)?;
        let eps = ctx.rng.uniform(x.dims(), 0.0, 1.0, x.dtype(), x.device())?;
        let (u, ldj) = match &self.variational {
            None => (eps, ldj.clone()),
            Some(flow) => {
                let img = (x / (QUANTS - 1.0))?.affine(2.0, -1.0)?;
                let saved = ctx.cond.replace(img);
                let out = flow.forward_ctx(&eps, ldj, ctx);
                ctx.cond = saved;
                out?
            }
        };
        let y = ((x + u)? / QUANTS)?;
        let ldj = (ldj - d as f64 * QUANTS.ln())?;
        self.logit.forward_ctx(&y, &ldj, ctx)
    }

    fn inverse_ctx(&self, z: &Tensor, ldj: &Tensor, ctx: &mut FlowCtx) -> Result<(Tensor, Tensor)> {
        let d = z.elem_count() / z.dim(0)?;
        let (y, ldj) = self.logit.inverse_ctx(z, ldj, ctx)?;
        let x = (y * QUANTS)?.floor()?.clamp(0.0, QUANTS - 1.0)?;
        Ok((x, (ldj + d as f64 * QUANTS.ln())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::coupling::{Coupling, CouplingConfig, Partition};
    use crate::nets::NetConfig;
    use crate::params::ParamStore;
    use crate::testing::{check_built, FlowCheck, InputKind};
    use candle_core::{DType, Device};

    fn pixels(seed: u64) -> Tensor {
        let v: Vec<f64> = crate::rng::Rng::new(seed)
            .uniform_vec(2 * 16, 0.0, 256.0)
            .iter()
            .map(|x| x.floor())
            .collect();
        Tensor::from_vec(v, (2, 1, 4, 4), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    fn couplings(p: &crate::params::Params, n: usize) -> Result<Sequential> {
        let mut s = Sequential::new();
        for i in 0..n {
            let mut cfg = CouplingConfig::new(Partition::Checkerboard, i % 2 == 1);
            cfg.net = NetConfig::gated(4, 1);
            cfg.cond_channels = 1;
            s.push(
                format!("c{i}"),
                Box::new(Coupling::new(&p.pp(format!("c{i}")), cfg, 1)?),
            );
        }
        Ok(s)
    }

    #[test]
    fn uniform_dequant_inverse_recovers_pixels_and_ldj_cancels() {
        let deq = Dequantization::uniform(1e-5);
        let x = pixels(1);
        let zeros = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let (z, ldj) = deq.forward(&x, &zeros).unwrap();
        let (xr, ldj_back) = deq.inverse(&z, &ldj).unwrap();
        assert_eq!(
            (xr - &x)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        // The logit and scaling terms cancel up to f32 rounding (the noise is not undone).
        assert!(
            ldj_back
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                < 1e-2
        );
    }

    #[test]
    fn variational_noise_flow_inverts_with_exact_logdet() {
        // ε ∈ (0,1) ↦ u ∈ (0,1) conditioned on the image; checked like every layer.
        check_built(
            &FlowCheck::new(&[1, 4, 4]).input(InputKind::Unit).cond(1),
            |p| Ok(Box::new(Dequantization::noise_flow(1e-5, couplings(p, 2)?))),
        );
    }

    #[test]
    fn variational_dequant_recovers_pixels() {
        // Moderately trained-looking noise flow. (A saturated one can emit u slightly ≥ 1,
        // since sigmoid → 1 maps to (1 − α/2)/(1 − α) > 1, exactly as in the UvA tutorial;
        // the pixel then decodes one level up. The density accounting stays exact.)
        let store = ParamStore::new(0, DType::F32, &Device::Cpu);
        let deq = Dequantization::variational(
            1e-5,
            Dequantization::noise_flow(1e-5, couplings(&store.root(), 2).unwrap()),
        );
        crate::testing::perturb_params(&store, 0.05, 1).unwrap();
        let x = pixels(2);
        let zeros = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let (z, ldj) = deq.forward(&x, &zeros).unwrap();
        assert!(ldj.to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()));
        let (xr, _) = deq.inverse(&z, &ldj).unwrap();
        assert_eq!(
            (xr - &x)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}
