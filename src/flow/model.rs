//! A flow model: dequantization + ordered layers + a prior on the final latent: N(0, I),
//! or Glow's learned top prior N(μ, diag e^{2s}) with per-element tables μ, s (one pair per
//! class for class-conditional models, selected by the one-hot label: log p(x | y)).
//!
//! For integer images x `[B, C, H, W]` (values 0..=255 in a float tensor):
//!   log p(x) ≈ ldj(dequant + layers, incl. split densities) + log N(z; 0, I),
//!   bpd(x) = −log p(x) · log2(e) / D,  D = C·H·W of the data.
//! With uniform dequantization this is a single-sample estimate of a lower bound of the
//! discrete log-likelihood; [`FlowModel::bpd_importance`] tightens it with K dequantization
//! draws: log p(x) ≈ logsumexp_k log p_k(x) − log K.

use candle_core::{DType, Device, Tensor};

use super::dequant::Dequantization;
use super::{std_normal_log_density, sum_per_sample, Flow, FlowCtx, Latents, Sequential};
use crate::params::{Init, ParamStore};
use crate::{Error, Result};

/// log2(e): nats → bits.
pub const LOG2_E: f64 = std::f64::consts::LOG2_E;

/// The output of [`FlowModel::encode`].
#[derive(Debug)]
pub struct Encoded {
    /// Final latent `[B, C', H', W']`.
    pub z: Tensor,
    /// Accumulated log-determinants and split densities `[B]`.
    pub ldj: Tensor,
    /// Factored-out latents, outermost split first.
    pub factored: Vec<Tensor>,
}

/// Dequantization + layers + prior over data of shape `[C, H, W]`.
pub struct FlowModel {
    store: ParamStore,
    dequant: Dequantization,
    flows: Sequential,
    data_shape: Vec<usize>,
    latent_shape: Vec<usize>,
    /// Learned top prior: (mean, log-scale) tables `[T, D']` (T = classes, or 1).
    top: Option<(Tensor, Tensor)>,
    /// Classes of a class-conditional model (0: unconditional).
    classes: usize,
}

impl FlowModel {
    /// Assembles a model; the layer shapes are checked against `data_shape` here, before any data.
    pub fn new(
        store: ParamStore,
        dequant: Dequantization,
        flows: Sequential,
        data_shape: &[usize],
    ) -> Result<Self> {
        let latent_shape = flows.out_shape(data_shape)?;
        Ok(Self {
            store,
            dequant,
            flows,
            data_shape: data_shape.to_vec(),
            latent_shape,
            top: None,
            classes: 0,
        })
    }

    /// Makes the model class-conditional over `classes` classes (0: unconditional) and,
    /// with `learned`, gives it a learned top prior (zero-initialised, so N(0, I) at first;
    /// one table per class when conditional). The couplings and splits must have been built
    /// with the same classes.
    pub fn with_prior(mut self, learned: bool, classes: usize) -> Result<Self> {
        self.classes = classes;
        if learned {
            let d: usize = self.latent_shape.iter().product();
            let t = classes.max(1);
            let p = self.store.root().pp("prior");
            let mean = p.var("mean", &[t, d], Init::Zeros)?.as_tensor().clone();
            let log_scale = p
                .var("log_scale", &[t, d], Init::Zeros)?
                .as_tensor()
                .clone();
            self.top = Some((mean, log_scale));
        }
        Ok(self)
    }

    /// Classes of a class-conditional model (0: unconditional).
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Puts the one-hot labels of `labels` (`[B]` integers) into `ctx` for a conditional
    /// model; an unconditional model ignores them. A conditional model without labels is
    /// an error.
    pub fn set_labels(&self, ctx: &mut FlowCtx, labels: Option<&Tensor>) -> Result<()> {
        if self.classes == 0 {
            return Ok(());
        }
        let l = labels.ok_or_else(|| {
            Error::Usage(format!(
                "the model is class-conditional ({} classes) but the data has no labels",
                self.classes
            ))
        })?;
        ctx.labels = Some(super::one_hot(l, self.classes, self.dtype())?);
        Ok(())
    }

    /// Class labels `[n]` for `n` images of a class-conditional model: all `label`, or
    /// cycling through 0, 1, …, K−1 without one; `None` for an unconditional model. A
    /// label for an unconditional model, or one out of range, is an error.
    pub fn labels(&self, n: usize, label: Option<usize>) -> Result<Option<Tensor>> {
        match (self.classes, label) {
            (0, None) => Ok(None),
            (0, Some(_)) => Err(Error::Usage(
                "--label needs a class-conditional model (`classes:` in its spec)".into(),
            )),
            (k, Some(l)) if l >= k => Err(Error::Usage(format!(
                "label {l} out of range: the model has {k} classes (0..={})",
                k - 1
            ))),
            (k, label) => {
                let ls: Vec<u32> = (0..n).map(|i| label.unwrap_or(i % k) as u32).collect();
                Ok(Some(Tensor::from_vec(ls, n, self.device())?))
            }
        }
    }

    /// A context with randomness from `seed` for `n` images, with the [`FlowModel::labels`]
    /// of `label` set.
    pub fn sample_ctx(&self, seed: u64, n: usize, label: Option<usize>) -> Result<FlowCtx> {
        let mut ctx = FlowCtx::new(seed);
        self.set_labels(&mut ctx, self.labels(n, label)?.as_ref())?;
        Ok(ctx)
    }

    /// (mean, log-scale) of the top prior for a batch of `b`, shaped `[B, C', H', W']`.
    fn top_params(&self, b: usize, ctx: &FlowCtx) -> Result<Option<(Tensor, Tensor)>> {
        let Some((mean, log_scale)) = &self.top else {
            return Ok(None);
        };
        let mut shape = vec![b];
        shape.extend(&self.latent_shape);
        let pick = |t: &Tensor| -> Result<Tensor> {
            let rows = if self.classes > 0 {
                let l = ctx.labels.as_ref().ok_or_else(|| {
                    Error::Usage("the class-conditional prior needs labels in the pass".into())
                })?;
                l.matmul(t)?
            } else {
                t.broadcast_as((b, t.dim(1)?))?.contiguous()?
            };
            Ok(rows.reshape(shape.as_slice())?)
        };
        Ok(Some((pick(mean)?, pick(log_scale)?)))
    }

    /// Log-density `[B, …]` of the final latent under the prior, per element.
    fn prior_log_density(&self, z: &Tensor, ctx: &FlowCtx) -> Result<Tensor> {
        match self.top_params(z.dim(0)?, ctx)? {
            None => std_normal_log_density(z),
            Some((m, s)) => {
                let u = ((z - m)? * s.neg()?.exp()?)?;
                Ok((std_normal_log_density(&u)? - s)?)
            }
        }
    }

    /// The parameters (for the optimizer, checkpoints and counting).
    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    /// The layers after dequantization.
    pub fn flows(&self) -> &Sequential {
        &self.flows
    }

    /// The dequantization step.
    pub fn dequant(&self) -> &Dequantization {
        &self.dequant
    }

    /// `[C, H, W]` of the data.
    pub fn data_shape(&self) -> &[usize] {
        &self.data_shape
    }

    /// `[C', H', W']` of the final latent.
    pub fn latent_shape(&self) -> &[usize] {
        &self.latent_shape
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        self.store.num_params()
    }

    /// Dimensions D = C·H·W of one data point.
    pub fn dims(&self) -> usize {
        self.data_shape.iter().product()
    }

    pub fn dtype(&self) -> DType {
        self.store.dtype()
    }

    pub fn device(&self) -> &Device {
        self.store.device()
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        if x.rank() != 4 || x.dims()[1..] != self.data_shape[..] || x.dim(0)? == 0 {
            return Err(Error::shape(
                "model",
                format!(
                    "expected images [B ≥ 1, {:?}], got {:?}",
                    self.data_shape,
                    x.dims()
                ),
            ));
        }
        Ok(())
    }

    /// Maps integer images to latents (dequantization noise from `ctx.rng`).
    pub fn encode(&self, x: &Tensor, ctx: &mut FlowCtx) -> Result<Encoded> {
        self.check_input(x)?;
        let x = x.to_dtype(self.dtype())?;
        let ldj = Tensor::zeros(x.dim(0)?, self.dtype(), x.device())?;
        ctx.factored.clear();
        ctx.factored_logp = None;
        let (y, ldj) = self.dequant.forward_ctx(&x, &ldj, ctx)?;
        let (z, ldj) = self.flows.forward_ctx(&y, &ldj, ctx)?;
        Ok(Encoded {
            z,
            ldj,
            factored: std::mem::take(&mut ctx.factored),
        })
    }

    /// Single-draw log p(x) per sample `[B]` (nats), dequantization term included.
    pub fn log_prob(&self, x: &Tensor, ctx: &mut FlowCtx) -> Result<Tensor> {
        let e = self.encode(x, ctx)?;
        Ok((e.ldj + sum_per_sample(&self.prior_log_density(&e.z, ctx)?)?)?)
    }

    /// Single-draw bits per dimension `[B]`: −log p(x)·log2(e)/D.
    pub fn bpd(&self, x: &Tensor, ctx: &mut FlowCtx) -> Result<Tensor> {
        Ok((self.log_prob(x, ctx)? * (-LOG2_E / self.dims() as f64))?)
    }

    /// Importance-sampled bpd `[B]` over `k` dequantization draws:
    /// −(logsumexp_k log p_k(x) − log k)·log2(e)/D.
    pub fn bpd_importance(&self, x: &Tensor, k: usize, ctx: &mut FlowCtx) -> Result<Tensor> {
        if k == 0 {
            return Err(Error::Usage(
                "importance sampling needs at least one sample".into(),
            ));
        }
        let draws = (0..k)
            .map(|_| self.log_prob(x, ctx).map(|t| t.detach()))
            .collect::<Result<Vec<_>>>()?;
        let stacked = Tensor::stack(&draws, 1)?.to_dtype(DType::F64)?;
        let ll = (stacked.log_sum_exp(1)? - (k as f64).ln())?;
        Ok((ll * (-LOG2_E / self.dims() as f64))?)
    }

    /// Decodes latents back to integer images: `z` plus the factored latents (given), or
    /// sampled at `ctx.latents`' temperature.
    pub fn decode(&self, z: &Tensor, ctx: &mut FlowCtx) -> Result<Tensor> {
        if z.rank() == 0 || z.dim(0)? == 0 {
            return Err(Error::shape(
                "model",
                format!("expected latents [B ≥ 1, …], got {:?}", z.dims()),
            ));
        }
        let ldj = Tensor::zeros(z.dim(0)?, z.dtype(), z.device())?;
        let (y, ldj) = self.flows.inverse_ctx(z, &ldj, ctx)?;
        let (x, _) = self.dequant.inverse_ctx(&y, &ldj, ctx)?;
        Ok(x)
    }

    /// Draws `n` images at `temperature` (z ~ N(0, T²I), split latents too); values 0..=255.
    pub fn sample(&self, n: usize, temperature: f64, ctx: &mut FlowCtx) -> Result<Tensor> {
        if n == 0 {
            return Err(Error::Usage("sampling needs n ≥ 1 images".into()));
        }
        let mut shape = vec![n];
        shape.extend(&self.latent_shape);
        let eps = ctx
            .rng
            .normal(&shape, temperature, self.dtype(), self.device())?;
        let z = match self.top_params(n, ctx)? {
            None => eps,
            Some((m, s)) => ((eps * s.exp()?)? + m)?,
        };
        ctx.latents = Latents::Sample { temperature };
        self.decode(&z, ctx)
    }

    /// Reconstructs images from an [`Encoded`] (exact up to dequantization, i.e. returns x).
    pub fn reconstruct(&self, e: &Encoded, ctx: &mut FlowCtx) -> Result<Tensor> {
        ctx.latents = Latents::Given(e.factored.clone());
        self.decode(&e.z, ctx)
    }
}
