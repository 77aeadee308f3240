//! Fixed channel permutations (Glow §5.1's "reverse" and "shuffle" baselines to the 1×1 conv).
//!
//! z[:, c] = x[:, π(c)];  a permutation of coordinates, so log|det J| = 0. Shapes preserved.
//! The shuffle permutation is drawn at build time from the parameter store's seed and kept
//! as a buffer, so checkpoints restore it.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{expect_channels, Flow, FlowCtx};
use crate::params::{Init, Params};
use crate::Result;

/// Which permutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PermuteKind {
    /// c ↦ C − 1 − c (RealNVP's alternation in channel space).
    Reverse,
    /// A fixed random permutation.
    Shuffle,
}

/// A fixed permutation of `channels` channels.
#[derive(Debug)]
pub struct Permute {
    channels: usize,
    perm: Var,
}

impl Permute {
    pub fn new(p: &Params, channels: usize, kind: PermuteKind) -> Result<Self> {
        let order: Vec<usize> = match kind {
            PermuteKind::Reverse => (0..channels).rev().collect(),
            PermuteKind::Shuffle => p.store().with_rng(|r| r.permutation(channels)),
        };
        let perm = p.buffer(
            "perm",
            &[channels],
            Init::Values(order.iter().map(|&i| i as f64).collect()),
        )?;
        Ok(Self { channels, perm })
    }

    fn indices(&self, inverse: bool) -> Result<Tensor> {
        let p: Vec<u32> = self
            .perm
            .as_tensor()
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?
            .iter()
            .map(|&v| v as u32)
            .collect();
        let idx = if inverse {
            let mut inv = vec![0u32; p.len()];
            for (i, &pi) in p.iter().enumerate() {
                inv[pi as usize] = i as u32;
            }
            inv
        } else {
            p
        };
        Ok(Tensor::from_vec(idx, self.channels, self.perm.device())?)
    }
}

impl Flow for Permute {
    fn kind(&self) -> &'static str {
        "permute"
    }

    fn out_shape(&self, in_shape: &[usize]) -> Result<Vec<usize>> {
        expect_channels("permute", in_shape, self.channels)?;
        Ok(in_shape.to_vec())
    }

    fn forward_ctx(&self, x: &Tensor, ldj: &Tensor, _: &mut FlowCtx) -> Result<(Tensor, Tensor)> {
        Ok((x.index_select(&self.indices(false)?, 1)?, ldj.clone()))
    }

    fn inverse_ctx(&self, z: &Tensor, ldj: &Tensor, _: &mut FlowCtx) -> Result<(Tensor, Tensor)> {
        Ok((z.index_select(&self.indices(true)?, 1)?, ldj.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_built, FlowCheck};

    #[test]
    fn reverse_and_shuffle_invert_with_zero_logdet() {
        for kind in [PermuteKind::Reverse, PermuteKind::Shuffle] {
            let r = check_built(&FlowCheck::new(&[5, 2, 2]), |p| {
                Ok(Box::new(Permute::new(p, 5, kind)?))
            });
            assert!(r.max_abs_logdet < 1e-9);
        }
    }

    #[test]
    fn reverse_reverses() {
        let store =
            crate::params::ParamStore::new(0, candle_core::DType::F32, &candle_core::Device::Cpu);
        let p = Permute::new(&store.root(), 3, PermuteKind::Reverse).unwrap();
        let x = Tensor::new(&[[[[0f32]], [[1.]], [[2.]]]], &candle_core::Device::Cpu).unwrap();
        let (z, _) = p
            .forward(
                &x,
                &Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
            )
            .unwrap();
        assert_eq!(
            z.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![2., 1., 0.]
        );
    }
}
