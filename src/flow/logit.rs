//! The logit transform used after dequantization (RealNVP §4.1, UvA tutorial 11).
//!
//! Forward maps y ∈ [0, 1] to the real line:
//!   y' = α/2 + (1 − α)·y,   z = log y' − log(1 − y'),
//!   log|det J| = Σ [ log(1 − α) − log y' − log(1 − y') ].
//! Inverse: y' = σ(z), y = (y' − α/2)/(1 − α), with log|det| = Σ [ log σ(z) + log(1 − σ(z)) − log(1 − α) ].
//! Shapes are preserved.

use candle_core::Tensor;

use super::{sum_per_sample, Flow, FlowCtx};
use crate::Result;

/// Default α of the UvA tutorial and RealNVP's MNIST setting.
pub const DEFAULT_ALPHA: f64 = 1e-5;

/// y ∈ [0, 1] ↔ logit space, with boundary shrinkage α.
#[derive(Debug, Clone, Copy)]
pub struct Logit {
    pub alpha: f64,
}

impl Default for Logit {
    fn default() -> Self {
        Self {
            alpha: DEFAULT_ALPHA,
        }
    }
}

/// softplus(x) = log(1 + eˣ), computed stably as relu(x) + log(1 + e^{−|x|}).
pub(crate) fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// log σ(x) = −softplus(−x).
pub(crate) fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(softplus(&x.neg()?)?.neg()?)
}

impl Flow for Logit {
    fn kind(&self) -> &'static str {
        "logit"
    }

    fn out_shape(&self, in_shape: &[usize]) -> Result<Vec<usize>> {
        Ok(in_shape.to_vec())
    }

    fn forward_ctx(&self, y: &Tensor, ldj: &Tensor, _: &mut FlowCtx) -> Result<(Tensor, Tensor)> {
        let a = self.alpha;
        let d = y.elem_count() / y.dim(0)?;
        let yp = ((y * (1.0 - a))? + 0.5 * a)?;
        let log_y = yp.log()?;
        let log_1my = yp.neg()?.affine(1.0, 1.0)?.log()?;
        let z = (&log_y - &log_1my)?;
        let per = (sum_per_sample(&(log_y + log_1my)?)?.neg()? + d as f64 * (1.0 - a).ln())?;
        Ok((z, (ldj + per)?))
    }

    fn inverse_ctx(&self, z: &Tensor, ldj: &Tensor, _: &mut FlowCtx) -> Result<(Tensor, Tensor)> {
        let a = self.alpha;
        let d = z.elem_count() / z.dim(0)?;
        let per = (sum_per_sample(&(log_sigmoid(z)? + log_sigmoid(&z.neg()?)?)?)?
            - d as f64 * (1.0 - a).ln())?;
        let y = ((candle_nn::ops::sigmoid(z)? - 0.5 * a)? / (1.0 - a))?;
        Ok((y, (ldj + per)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_flow, FlowCheck, InputKind};

    #[test]
    fn logit_round_trip_and_jacobian() {
        check_flow(
            &Logit::default(),
            &FlowCheck::new(&[2, 4, 4]).input(InputKind::Unit),
        );
        check_flow(
            &Logit { alpha: 0.05 },
            &FlowCheck::new(&[1, 3, 5]).input(InputKind::Unit),
        );
    }
}
