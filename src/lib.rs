//! flowlab: normalizing flows for images on candle.
//!
//! The library is organised by job:
//! - [`flow`]: the [`flow::Flow`] trait, every invertible layer (one family per file) and
//!   the [`flow::FlowModel`] (dequantization + layers + prior) with `log_prob`, `bpd`
//!   and `sample`;
//! - [`nets`]: the conditioner networks used inside couplings (GatedConvNet, Glow's conv net);
//! - [`kernels`]: fast CPU kernels (im2col + GEMM convolution, fused ConcatELU, gate and
//!   channel LayerNorm) as candle custom ops with explicit backward passes;
//! - [`params`]: a seeded parameter store (trainable variables + non-trainable buffers)
//!   with readable names, saved and loaded as safetensors;
//! - [`linalg`]: small host-side f64 linear algebra (LU, determinant, inverse, QR) that
//!   candle lacks;
//! - [`rng`]: the seeded random source every stochastic op draws from;
//! - [`trained`]: a run loaded back from its results folder, for sampling and evaluations
//!   after training;
//! - [`testing`]: numerical checkers (round trip, brute-force Jacobian log-determinant)
//!   shared by the unit and integration tests.

pub mod bench;
pub mod build;
pub mod data;
pub mod error;
pub mod flow;
pub mod kernels;
pub mod linalg;
pub mod nets;
pub mod params;
pub mod results;
pub mod rng;
pub mod runner;
pub mod spec;
pub mod testing;
pub mod train;
pub mod trained;

pub use error::{Error, Result};
