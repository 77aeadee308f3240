//! Conditioner networks: they compute a coupling's scale and shift from the
//! conditioning half of its input. They need not be invertible.

pub mod conv;
pub mod gated;
pub mod glow;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::params::Params;
use crate::Result;

pub use conv::Conv2d;
pub use gated::GatedConvNet;
pub use glow::GlowConvNet;

/// Which conditioner network a coupling uses (plain data, part of experiment specs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum NetConfig {
    /// The UvA tutorial's GatedConvNet (PixelCNN++-style gated residual blocks).
    Gated {
        #[serde(default = "default_hidden")]
        hidden: usize,
        #[serde(default = "default_layers")]
        layers: usize,
    },
    /// Glow's conditioner: conv3×3 → ReLU → conv1×1 → ReLU → zero-initialised conv3×3.
    Glow {
        #[serde(default = "default_glow_hidden")]
        hidden: usize,
    },
}

fn default_hidden() -> usize {
    32
}
fn default_layers() -> usize {
    3
}
fn default_glow_hidden() -> usize {
    64
}

impl Default for NetConfig {
    /// GatedConvNet with 32 hidden channels and 3 gated layers (UvA tutorial 11).
    fn default() -> Self {
        NetConfig::Gated {
            hidden: default_hidden(),
            layers: default_layers(),
        }
    }
}

/// A built conditioner network.
#[derive(Debug, Clone)]
pub enum Net {
    Gated(GatedConvNet),
    Glow(GlowConvNet),
}

impl Net {
    /// Builds the network mapping `[B, c_in, H, W] → [B, c_out, H, W]`; its last
    /// convolution is zero-initialised, so it outputs zeros at initialisation.
    pub fn new(p: &Params, cfg: &NetConfig, c_in: usize, c_out: usize) -> Result<Self> {
        Ok(match *cfg {
            NetConfig::Gated { hidden, layers } => {
                Net::Gated(GatedConvNet::new(p, c_in, hidden, c_out, layers)?)
            }
            NetConfig::Glow { hidden } => Net::Glow(GlowConvNet::new(p, c_in, hidden, c_out)?),
        })
    }

    /// Applies the network.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Net::Gated(n) => n.forward(x),
            Net::Glow(n) => n.forward(x),
        }
    }
}
