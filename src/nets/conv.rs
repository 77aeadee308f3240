//! A 2-D convolution layer with "same" padding and stride 1 (all flowlab needs).

use candle_core::Tensor;

use crate::params::{Init, Params};
use crate::Result;

/// `[B, c_in, H, W] → [B, c_out, H, W]`, kernel k×k (k odd), padding k/2.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    padding: usize,
}

impl Conv2d {
    /// PyTorch-default initialisation: weight and bias ~ U(±1/√(c_in·k²)).
    pub fn new(p: &Params, c_in: usize, c_out: usize, k: usize) -> Result<Self> {
        let fan_in = c_in * k * k;
        let weight = p.var(
            "weight",
            &[c_out, c_in, k, k],
            Init::TorchDefault { fan_in },
        )?;
        let bias = p.var("bias", &[c_out], Init::TorchDefault { fan_in })?;
        Ok(Self::from_vars(weight.as_tensor(), bias.as_tensor(), k))
    }

    /// Zero-initialised weight and bias (the output layer of a coupling network, so a
    /// fresh coupling is the identity).
    pub fn zeros(p: &Params, c_in: usize, c_out: usize, k: usize) -> Result<Self> {
        let weight = p.var("weight", &[c_out, c_in, k, k], Init::Zeros)?;
        let bias = p.var("bias", &[c_out], Init::Zeros)?;
        Ok(Self::from_vars(weight.as_tensor(), bias.as_tensor(), k))
    }

    fn from_vars(weight: &Tensor, bias: &Tensor, k: usize) -> Self {
        Self {
            weight: weight.clone(),
            bias: bias.clone(),
            padding: k / 2,
        }
    }

    /// The weight `[c_out, c_in, k, k]` and bias `[c_out]`.
    pub fn params(&self) -> (&Tensor, &Tensor) {
        (&self.weight, &self.bias)
    }

    /// Applies the convolution.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::conv2d(x, &self.weight, &self.bias, self.padding)
    }

    /// Applies the convolution to ConcatELU of `x` (`[B, c_in/2, H, W]`), fused: the
    /// doubled activation is never stored.
    pub fn forward_concat_elu(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::conv2d_concat_elu(x, &self.weight, &self.bias, self.padding)
    }

    /// Applies the convolution to `relu(x)`, fused: the activation is never stored.
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::conv2d_relu(x, &self.weight, &self.bias, self.padding)
    }
}
