//! A flow model: dequantization + ordered layers + standard normal prior.
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
use crate::params::ParamStore;
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
        })
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
        if x.rank() != 4 || x.dims()[1..] != self.data_shape[..] {
            return Err(Error::shape(
                "model",
                format!(
                    "expected images [B, {:?}], got {:?}",
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
        Ok((e.ldj + sum_per_sample(&std_normal_log_density(&e.z)?)?)?)
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
        let ldj = Tensor::zeros(z.dim(0)?, z.dtype(), z.device())?;
        let (y, ldj) = self.flows.inverse_ctx(z, &ldj, ctx)?;
        let (x, _) = self.dequant.inverse_ctx(&y, &ldj, ctx)?;
        Ok(x)
    }

    /// Draws `n` images at `temperature` (z ~ N(0, T²I), split latents too); values 0..=255.
    pub fn sample(&self, n: usize, temperature: f64, ctx: &mut FlowCtx) -> Result<Tensor> {
        let mut shape = vec![n];
        shape.extend(&self.latent_shape);
        let z = ctx
            .rng
            .normal(&shape, temperature, self.dtype(), self.device())?;
        ctx.latents = Latents::Sample { temperature };
        self.decode(&z, ctx)
    }

    /// Reconstructs images from an [`Encoded`] (exact up to dequantization, i.e. returns x).
    pub fn reconstruct(&self, e: &Encoded, ctx: &mut FlowCtx) -> Result<Tensor> {
        ctx.latents = Latents::Given(e.factored.clone());
        self.decode(&e.z, ctx)
    }
}
