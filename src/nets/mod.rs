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

/// Conditioner architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NetArch {
    /// The UvA tutorial's GatedConvNet (PixelCNN++-style gated residual blocks).
    #[default]
    Gated,
    /// Glow's conditioner: conv3×3 → ReLU → conv1×1 → ReLU → zero-initialised conv3×3.
    Glow,
}

/// Which conditioner network a coupling uses (plain data, part of experiment specs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    #[serde(default)]
    pub arch: NetArch,
    /// Hidden channels.
    #[serde(default = "default_hidden")]
    pub hidden: usize,
    /// Gated residual blocks (GatedConvNet only).
    #[serde(default = "default_layers")]
    pub layers: usize,
}

fn default_hidden() -> usize {
    32
}
fn default_layers() -> usize {
    3
}

impl NetConfig {
    /// A GatedConvNet.
    pub fn gated(hidden: usize, layers: usize) -> Self {
        Self {
            arch: NetArch::Gated,
            hidden,
            layers,
        }
    }

    /// Glow's conv net.
    pub fn glow(hidden: usize) -> Self {
        Self {
            arch: NetArch::Glow,
            hidden,
            layers: 0,
        }
    }
}

impl Default for NetConfig {
    /// GatedConvNet with 32 hidden channels and 3 gated layers (UvA tutorial 11).
    fn default() -> Self {
        Self::gated(default_hidden(), default_layers())
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
        Ok(match cfg.arch {
            NetArch::Gated => {
                Net::Gated(GatedConvNet::new(p, c_in, cfg.hidden, c_out, cfg.layers)?)
            }
            NetArch::Glow => Net::Glow(GlowConvNet::new(p, c_in, cfg.hidden, c_out)?),
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
