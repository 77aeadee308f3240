//! Glow's coupling network: conv3×3(c_in→h) → ReLU → conv1×1(h→h) → ReLU → conv3×3(h→c_out),
//! the last convolution zero-initialised. (Glow also uses ActNorm inside; this version keeps biases.)

use candle_core::Tensor;

use super::Conv2d;
use crate::params::Params;
use crate::Result;

/// `[B, c_in, H, W] → [B, c_out, H, W]`; parameters 9·c_in·h + h + h² + h + 9·h·c_out + c_out.
#[derive(Debug, Clone)]
pub struct GlowConvNet {
    c1: Conv2d,
    c2: Conv2d,
    c3: Conv2d,
}

impl GlowConvNet {
    pub fn new(p: &Params, c_in: usize, hidden: usize, c_out: usize) -> Result<Self> {
        Ok(Self {
            c1: Conv2d::new(&p.pp("conv1"), c_in, hidden, 3)?,
            c2: Conv2d::new(&p.pp("conv2"), hidden, hidden, 1)?,
            c3: Conv2d::zeros(&p.pp("conv3"), hidden, c_out, 3)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // One op, image by image in cache, where it applies (`kernels::glow_net`).
        crate::kernels::glow_net(x, self.c1.params(), self.c2.params(), self.c3.params())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamStore;
    use candle_core::{DType, Device};

    #[test]
    fn parameter_count() {
        let store = ParamStore::new(0, DType::F32, &Device::Cpu);
        GlowConvNet::new(&store.root(), 2, 8, 4).unwrap();
        assert_eq!(store.num_params(), 9 * 2 * 8 + 8 + 64 + 8 + 9 * 8 * 4 + 4);
    }
}
