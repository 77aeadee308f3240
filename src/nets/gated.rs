//! The GatedConvNet of the UvA deep-learning tutorial 11.
//!
//! ```text
//! Conv3×3(c_in→c_h)
//! → N × [ GatedConv(c_h) → LayerNormChannels(c_h) ]
//! → ConcatELU → Conv3×3(2c_h→c_out, zero-initialised)
//! GatedConv(x) = x + val·σ(gate),  [val, gate] = Conv1×1(2c_h→2c_h)(ConcatELU(Conv3×3(2c_h→c_h)(ConcatELU(x))))
//! ```
//! Parameters: (9c_in + 1)c_h + N·(18c_h² + c_h + 4c_h² + 2c_h + 2c_h) + (18c_h + 1)c_out;
//! 69,538 for c_in = 1, c_h = 32, N = 3, c_out = 2.

use candle_core::Tensor;

use super::Conv2d;
use crate::params::{Init, Params};
use crate::Result;

/// ConcatELU: `[B, C, H, W] → [B, 2C, H, W]`, `[elu(x), elu(−x)]`.
pub fn concat_elu(x: &Tensor) -> Result<Tensor> {
    crate::kernels::concat_elu(x)
}

/// LayerNorm over the channel axis of `[B, C, H, W]` (per pixel), with affine weight and bias.
///
/// The normalisation is flowlab's fused kernel (with its own backward) on CPU and composed
/// candle ops elsewhere; candle-nn's fused LayerNorm is avoided because it has no backward.
#[derive(Debug, Clone)]
pub struct LayerNormChannels {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNormChannels {
    pub fn new(p: &Params, c: usize) -> Result<Self> {
        Ok(Self {
            weight: p
                .var("weight", &[1, c, 1, 1], Init::Ones)?
                .as_tensor()
                .clone(),
            bias: p
                .var("bias", &[1, c, 1, 1], Init::Zeros)?
                .as_tensor()
                .clone(),
            eps: 1e-5,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::layer_norm_channels(x, &self.weight, &self.bias, self.eps)
    }
}

/// Gated residual block: `x + val·σ(gate)`.
#[derive(Debug, Clone)]
pub struct GatedConv {
    conv: Conv2d,
    gate: Conv2d,
}

impl GatedConv {
    pub fn new(p: &Params, c: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(&p.pp("conv"), 2 * c, c, 3)?,
            gate: Conv2d::new(&p.pp("gate"), 2 * c, 2 * c, 1)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv.forward_concat_elu(x)?;
        let out = self.gate.forward_concat_elu(&h)?;
        crate::kernels::gate(x, &out)
    }

    /// `norm(self.forward(x))`, with the 1×1 convolution, the gate and the LayerNorm run
    /// as one op per image on CPU ([`crate::kernels::gated_tail`]).
    pub fn forward_normed(&self, x: &Tensor, norm: &LayerNormChannels) -> Result<Tensor> {
        let h = self.conv.forward_concat_elu(x)?;
        let ln = (&norm.weight, &norm.bias);
        crate::kernels::gated_tail(&h, x, self.gate.params(), ln, norm.eps)
    }
}

/// The full network, `[B, c_in, H, W] → [B, c_out, H, W]`.
#[derive(Debug, Clone)]
pub struct GatedConvNet {
    input: Conv2d,
    blocks: Vec<(GatedConv, LayerNormChannels)>,
    output: Conv2d,
}

impl GatedConvNet {
    pub fn new(
        p: &Params,
        c_in: usize,
        c_hidden: usize,
        c_out: usize,
        layers: usize,
    ) -> Result<Self> {
        let input = Conv2d::new(&p.pp("input"), c_in, c_hidden, 3)?;
        let blocks = (0..layers)
            .map(|i| {
                Ok((
                    GatedConv::new(&p.pp(format!("block{i}")), c_hidden)?,
                    LayerNormChannels::new(&p.pp(format!("norm{i}")), c_hidden)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let output = Conv2d::zeros(&p.pp("output"), 2 * c_hidden, c_out, 3)?;
        Ok(Self {
            input,
            blocks,
            output,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.input.forward(x)?;
        for (block, norm) in &self.blocks {
            h = block.forward_normed(&h, norm)?;
        }
        self.output.forward_concat_elu(&h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamStore;
    use candle_core::{DType, Device};

    #[test]
    fn tutorial_parameter_count_and_zero_output_at_init() {
        let store = ParamStore::new(0, DType::F32, &Device::Cpu);
        let net = GatedConvNet::new(&store.root(), 1, 32, 2, 3).unwrap();
        assert_eq!(store.num_params(), 69_538);
        let x = Tensor::ones((2, 1, 6, 6), DType::F32, &Device::Cpu).unwrap();
        let y = net.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 2, 6, 6]);
        assert_eq!(
            y.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }

    #[test]
    fn layer_norm_channels_normalises_and_has_gradients() {
        let store = ParamStore::new(0, DType::F64, &Device::Cpu);
        let ln = LayerNormChannels::new(&store.root(), 5).unwrap();
        let x = crate::rng::Rng::new(1)
            .normal(&[3, 5, 4, 4], 2.0, DType::F64, &Device::Cpu)
            .unwrap();
        let x = (x + 3.0).unwrap();
        let y = ln.forward(&x).unwrap();
        let m = y
            .mean_keepdim(1)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let v = y.sqr().unwrap().mean_keepdim(1).unwrap();
        let v_err = (v - 1.0)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(m < 1e-10 && v_err < 1e-3, "mean {m}, var err {v_err}");
        // Gradients reach the affine parameters (candle-nn's fused LayerNorm would give none).
        let loss = (y.sqr().unwrap() * &x).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        for (name, v) in store.named_vars() {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no grad for {name}"));
            assert!(
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
                    > 0.0,
                "{name}"
            );
        }
    }

    #[test]
    fn gated_net_gradients_match_finite_differences() {
        // Backprop through ConcatELU, sigmoid gating and the channel LayerNorm, checked
        // against central differences on the input.
        let store = ParamStore::new(3, DType::F64, &Device::Cpu);
        let net = GatedConvNet::new(&store.root(), 1, 4, 2, 1).unwrap();
        crate::testing::perturb_params(&store, 0.3, 9).unwrap();
        let x0 = crate::rng::Rng::new(2)
            .normal(&[1, 1, 3, 3], 1.0, DType::F64, &Device::Cpu)
            .unwrap();
        let x = candle_core::Var::from_tensor(&x0).unwrap();
        let f = |t: &Tensor| net.forward(t).unwrap().sqr().unwrap().sum_all().unwrap();
        let grads = f(x.as_tensor()).backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = x0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for i in 0..base.len() {
            let eval = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                f(&Tensor::from_vec(v, (1, 1, 3, 3), &Device::Cpu).unwrap())
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (eval(1e-6) - eval(-1e-6)) / 2e-6;
            assert!(
                (fd - g[i]).abs() < 1e-5 * fd.abs().max(1.0),
                "dim {i}: fd {fd} vs autograd {}",
                g[i]
            );
        }
    }
}
