//! 2×2 space-to-depth ("squeeze"), as in RealNVP/Glow.
//!
//! Shapes: `[B, C, H, W] → [B, 4C, H/2, W/2]`; H and W must be even.
//! Channel `c·4 + 2·i + j` of the output holds pixel `(2y + i, 2x + j)` of input channel `c`.
//! A permutation of coordinates, so log|det J| = 0.

use candle_core::Tensor;

use super::{expect_chw, Flow, FlowCtx};
use crate::{Error, Result};

/// The squeeze bijection (no parameters).
#[derive(Debug, Clone, Copy, Default)]
pub struct Squeeze;

impl Flow for Squeeze {
    fn kind(&self) -> &'static str {
        "squeeze"
    }

    fn out_shape(&self, in_shape: &[usize]) -> Result<Vec<usize>> {
        let (c, h, w) = expect_chw("squeeze", in_shape)?;
        if h % 2 != 0 || w % 2 != 0 || h == 0 || w == 0 {
            return Err(Error::shape(
                "squeeze",
                format!("needs even height and width, got {c}×{h}×{w}"),
            ));
        }
        Ok(vec![4 * c, h / 2, w / 2])
    }

    fn forward_ctx(&self, x: &Tensor, ldj: &Tensor, _: &mut FlowCtx) -> Result<(Tensor, Tensor)> {
        let (b, c, h, w) = x.dims4()?;
        self.out_shape(&[c, h, w])?;
        let z = x
            .reshape((b, c, h / 2, 2, w / 2, 2))?
            .permute((0, 1, 3, 5, 2, 4))?
            .reshape((b, 4 * c, h / 2, w / 2))?;
        Ok((z, ldj.clone()))
    }

    fn inverse_ctx(&self, z: &Tensor, ldj: &Tensor, _: &mut FlowCtx) -> Result<(Tensor, Tensor)> {
        let (b, c4, h2, w2) = z.dims4()?;
        if c4 % 4 != 0 {
            return Err(Error::shape(
                "squeeze",
                format!("inverse needs a channel count divisible by 4, got {c4}"),
            ));
        }
        let c = c4 / 4;
        let x = z
            .reshape((b, c, 2, 2, h2, w2))?
            .permute((0, 1, 4, 2, 5, 3))?
            .reshape((b, c, 2 * h2, 2 * w2))?;
        Ok((x, ldj.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_flow, FlowCheck};
    use candle_core::{DType, Device};

    #[test]
    fn layout_round_trip_and_jacobian() {
        let x = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 4, 4))
            .unwrap();
        let (z, _) = Squeeze
            .forward(&x, &Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(z.dims(), &[1, 4, 2, 2]);
        // Channel 0 holds the top-left pixel of each 2×2 block.
        assert_eq!(
            z.get(0)
                .unwrap()
                .get(0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![0., 2., 8., 10.]
        );
        assert_eq!(
            z.get(0)
                .unwrap()
                .get(3)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![5., 7., 13., 15.]
        );
        check_flow(&Squeeze, &FlowCheck::new(&[2, 4, 4]));
    }

    #[test]
    fn odd_sizes_are_refused() {
        let e = Squeeze.out_shape(&[1, 5, 4]).unwrap_err().to_string();
        assert!(e.contains("even height and width"), "{e}");
        let x = Tensor::zeros((1, 1, 3, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(Squeeze
            .forward(&x, &Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap())
            .is_err());
    }
}
