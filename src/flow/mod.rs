//! The [`Flow`] trait and every invertible layer, one family per file.
//!
//! Conventions, shared by all layers:
//! - tensors are images `[B, C, H, W]`;
//! - `ldj` is a per-sample `[B]` tensor: `forward` returns `ldj + log|det ∂z/∂x|`,
//!   `inverse` returns `ldj − log|det ∂z/∂x|` evaluated at the reconstructed `x`;
//! - a multi-scale [`split::Split`] also adds the log-density of the channels it factors
//!   out (as in the UvA tutorial and Glow), so the model's log-likelihood is always
//!   `ldj + log N(z_final)`.

pub mod actnorm;
pub mod coupling;
pub mod dequant;
pub mod invconv;
pub mod logit;
pub mod model;
pub mod permute;
pub mod sequential;
pub mod spline;
pub mod split;
pub mod squeeze;

use candle_core::{DType, Tensor};

use crate::rng::Rng;
use crate::Result;

pub use model::FlowModel;
pub use sequential::Sequential;

/// Where an inverse pass takes factored-out latents from.
#[derive(Debug)]
pub enum Latents {
    /// Sample them from each split's prior at the given temperature.
    Sample { temperature: f64 },
    /// Use these, innermost split last (the order [`FlowCtx::factored`] collects them in).
    Given(Vec<Tensor>),
}

/// Side information threaded through a pass: randomness, conditioning, factored-out latents.
#[derive(Debug)]
pub struct FlowCtx {
    /// Random source for stochastic steps (dequantization noise, prior samples).
    pub rng: Rng,
    /// Conditioning tensor `[B, C_cond, H, W]` for conditional couplings (e.g. the image
    /// in variational dequantization).
    pub cond: Option<Tensor>,
    /// Forward passes push the latents each split factors out here, outermost first.
    pub factored: Vec<Tensor>,
    /// Sum `[B]` of the log-densities the splits added to `ldj` on forward passes
    /// (`ldj − factored_logp` is the pure log-determinant of `x ↦ (z, factored)`).
    pub factored_logp: Option<Tensor>,
    /// Inverse passes take factored-out latents from here.
    pub latents: Latents,
    /// One-hot class labels `[B, K]` for class-conditional layers and priors.
    pub labels: Option<Tensor>,
}

impl FlowCtx {
    /// A context drawing randomness from `seed` and sampling split latents at temperature 1.
    pub fn new(seed: u64) -> Self {
        Self::with_rng(Rng::new(seed))
    }

    /// A context around an existing random source.
    pub fn with_rng(rng: Rng) -> Self {
        Self {
            rng,
            cond: None,
            factored: Vec::new(),
            factored_logp: None,
            latents: Latents::Sample { temperature: 1.0 },
            labels: None,
        }
    }

    /// Sets the conditioning tensor.
    pub fn with_cond(mut self, cond: Tensor) -> Self {
        self.cond = Some(cond);
        self
    }

    /// Sets where inverse passes get factored-out latents.
    pub fn with_latents(mut self, latents: Latents) -> Self {
        self.latents = latents;
        self
    }

    /// Sets one-hot class labels `[B, K]` (see [`one_hot`]).
    pub fn with_labels(mut self, labels: Option<Tensor>) -> Self {
        self.labels = labels;
        self
    }
}

/// Integer class labels `[B]` → one-hot `[B, classes]` in `dtype`; labels ≥ `classes` are
/// refused.
pub fn one_hot(labels: &Tensor, classes: usize, dtype: DType) -> Result<Tensor> {
    let l = labels.to_dtype(DType::F64)?;
    let max = l.max_all()?.to_scalar::<f64>()?;
    if max >= classes as f64 {
        return Err(crate::Error::Usage(format!(
            "label {max} out of range for a model of {classes} classes"
        )));
    }
    let ar = Tensor::arange(0u32, classes as u32, labels.device())?.to_dtype(DType::F64)?;
    Ok(l.unsqueeze(1)?
        .broadcast_eq(&ar.unsqueeze(0)?)?
        .to_dtype(dtype)?)
}

/// The context's one-hot labels `[B, K]` as constant planes `[B, K, H, W]`, for layers
/// conditioned on the class (`layer` names the asker in the error when labels are missing).
pub(crate) fn label_planes(
    ctx: &FlowCtx,
    classes: usize,
    h: usize,
    w: usize,
    layer: &str,
) -> Result<Tensor> {
    let l = ctx.labels.as_ref().ok_or_else(|| {
        crate::Error::Usage(format!(
            "this {layer} is class-conditional but the pass carries no labels"
        ))
    })?;
    let (b, k) = l.dims2()?;
    if k != classes {
        return Err(crate::Error::shape(
            layer,
            format!("labels are one-hot over {k} classes, the layer was built for {classes}"),
        ));
    }
    Ok(l.reshape((b, k, 1, 1))?
        .broadcast_as((b, k, h, w))?
        .contiguous()?)
}

/// A bijection on image tensors `[B, C, H, W]` with a tractable log-determinant.
///
/// Implementors provide the context-aware passes; the plain [`Flow::forward`] /
/// [`Flow::inverse`] run them with a fresh, OS-seeded context.
pub trait Flow: Send + Sync {
    /// Short type name for tables and error messages (`"coupling"`, `"squeeze"`, …).
    fn kind(&self) -> &'static str;

    /// Output shape `[C, H, W]` for an input shape `[C, H, W]`; errors on shapes the
    /// layer cannot handle (checked before any data flows).
    fn out_shape(&self, in_shape: &[usize]) -> Result<Vec<usize>>;

    /// x → z; returns `(z, ldj + log|det ∂z/∂x|)`.
    fn forward_ctx(&self, x: &Tensor, ldj: &Tensor, ctx: &mut FlowCtx) -> Result<(Tensor, Tensor)>;

    /// z → x; returns `(x, ldj − log|det ∂z/∂x|)`.
    fn inverse_ctx(&self, z: &Tensor, ldj: &Tensor, ctx: &mut FlowCtx) -> Result<(Tensor, Tensor)>;

    /// [`Flow::forward_ctx`] with a fresh context.
    fn forward(&self, x: &Tensor, ldj: &Tensor) -> Result<(Tensor, Tensor)> {
        self.forward_ctx(x, ldj, &mut FlowCtx::with_rng(Rng::from_entropy()))
    }

    /// [`Flow::inverse_ctx`] with a fresh context (splits sample at temperature 1).
    fn inverse(&self, z: &Tensor, ldj: &Tensor) -> Result<(Tensor, Tensor)> {
        self.inverse_ctx(z, ldj, &mut FlowCtx::with_rng(Rng::from_entropy()))
    }
}

/// Sum over all but the batch dimension: `[B, …] → [B]`.
pub(crate) fn sum_per_sample(t: &Tensor) -> Result<Tensor> {
    Ok(t.flatten_from(1)?.sum(1)?)
}

/// Checks that a shape is `[C, H, W]`.
pub(crate) fn expect_chw(layer: &str, shape: &[usize]) -> Result<(usize, usize, usize)> {
    match shape {
        [c, h, w] => Ok((*c, *h, *w)),
        _ => Err(crate::Error::shape(
            layer,
            format!("expected a [C, H, W] shape, got {shape:?}"),
        )),
    }
}

/// Checks that a `[C, H, W]` shape has the `channels` a layer was built for.
pub(crate) fn expect_channels(
    layer: &str,
    shape: &[usize],
    channels: usize,
) -> Result<(usize, usize, usize)> {
    let (c, h, w) = expect_chw(layer, shape)?;
    if c != channels {
        return Err(crate::Error::shape(
            layer,
            format!("built for {channels} channels, got {c}"),
        ));
    }
    Ok((c, h, w))
}

/// log N(z; 0, 1) per element.
pub(crate) fn std_normal_log_density(z: &Tensor) -> Result<Tensor> {
    let half_log_2pi = 0.5 * (2.0 * std::f64::consts::PI).ln();
    Ok(((z.sqr()? * -0.5)? - half_log_2pi)?)
}

/// The inverse of a flow as a flow: `forward` runs the wrapped `inverse` and vice versa.
pub struct Inverted(pub Box<dyn Flow>);

impl Flow for Inverted {
    fn kind(&self) -> &'static str {
        "inverted"
    }

    fn out_shape(&self, in_shape: &[usize]) -> Result<Vec<usize>> {
        let out = self.0.out_shape(in_shape)?;
        if out != in_shape {
            return Err(crate::Error::shape(
                "inverted",
                format!(
                    "only shape-preserving flows can be inverted, {} maps {in_shape:?} to {out:?}",
                    self.0.kind()
                ),
            ));
        }
        Ok(out)
    }

    fn forward_ctx(&self, x: &Tensor, ldj: &Tensor, ctx: &mut FlowCtx) -> Result<(Tensor, Tensor)> {
        self.0.inverse_ctx(x, ldj, ctx)
    }

    fn inverse_ctx(&self, z: &Tensor, ldj: &Tensor, ctx: &mut FlowCtx) -> Result<(Tensor, Tensor)> {
        self.0.forward_ctx(z, ldj, ctx)
    }
}
