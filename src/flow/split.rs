//! Multi-scale factor-out (RealNVP §3.6, Glow): half of the channels leave the flow.
//!
//! Forward: `x = [x_keep, x_out]` along channels (C even), returns `z = x_keep`
//! (`[B, C/2, H, W]`), pushes `x_out` to [`FlowCtx::factored`] and adds its log-density
//! under the split prior to `ldj` (and to [`FlowCtx::factored_logp`]):
//!   standard:  log N(x_out; 0, I)
//!   learned:   log N(x_out; μ, diag σ²), [μ, log σ] = Conv3×3(x_keep) (zero-initialised, Glow).
//! The map x ↦ (x_keep, x_out) itself has log|det J| = 0.
//!
//! Inverse: takes `x_out` from the context's given latents, or samples it as
//! μ + σ·T·ε at temperature T, concatenates, and subtracts the same log-density.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{
    expect_channels, expect_chw, std_normal_log_density, sum_per_sample, Flow, FlowCtx, Latents,
};
use crate::nets::Conv2d;
use crate::params::Params;
use crate::{Error, Result};

/// The prior of the factored-out channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SplitPrior {
    /// N(0, I) (RealNVP, UvA tutorial).
    #[default]
    Standard,
    /// N(μ(x_keep), σ(x_keep)²) from a zero-initialised 3×3 conv (Glow's learned prior).
    Learned,
}

/// Factor-out layer for inputs with `channels` channels.
#[derive(Debug, Clone)]
pub struct Split {
    channels: usize,
    prior: Option<Conv2d>,
    /// Classes whose one-hot planes join the learned prior's input (0: unconditional).
    classes: usize,
}

impl Split {
    pub fn new(p: &Params, channels: usize, prior: SplitPrior) -> Result<Self> {
        Self::conditional(p, channels, prior, 0)
    }

    /// A split whose learned prior also sees the class label (`classes` one-hot planes);
    /// `classes` is ignored by the standard prior.
    pub fn conditional(
        p: &Params,
        channels: usize,
        prior: SplitPrior,
        classes: usize,
    ) -> Result<Self> {
        Self::check(channels)?;
        let (prior, classes) = match prior {
            SplitPrior::Standard => (None, 0),
            SplitPrior::Learned => (
                Some(Conv2d::zeros(
                    &p.pp("prior"),
                    channels / 2 + classes,
                    channels,
                    3,
                )?),
                classes,
            ),
        };
        Ok(Self {
            channels,
            prior,
            classes,
        })
    }

    fn check(c: usize) -> Result<()> {
        if c < 2 || !c.is_multiple_of(2) {
            return Err(Error::shape(
                "split",
                format!("needs an even number of channels ≥ 2, got {c}"),
            ));
        }
        Ok(())
    }

    /// log-density per sample `[B]` of `out` given `keep`; and (μ, log σ) for sampling.
    fn prior_params(&self, keep: &Tensor, ctx: &FlowCtx) -> Result<Option<(Tensor, Tensor)>> {
        match &self.prior {
            None => Ok(None),
            Some(conv) => {
                let input = if self.classes > 0 {
                    let (_, _, h, w) = keep.dims4()?;
                    let planes = super::label_planes(ctx, self.classes, h, w, "split")?;
                    Tensor::cat(&[keep, &planes], 1)?
                } else {
                    keep.clone()
                };
                let h = conv.forward(&input)?;
                let c = self.channels / 2;
                Ok(Some((h.narrow(1, 0, c)?, h.narrow(1, c, c)?)))
            }
        }
    }

    fn log_density(out: &Tensor, params: &Option<(Tensor, Tensor)>) -> Result<Tensor> {
        match params {
            None => sum_per_sample(&std_normal_log_density(out)?),
            Some((mu, log_sigma)) => {
                let e = ((out - mu)? * log_sigma.neg()?.exp()?)?;
                sum_per_sample(&(std_normal_log_density(&e)? - log_sigma)?)
            }
        }
    }
}

fn add_logp(ctx: &mut FlowCtx, lp: &Tensor) -> Result<()> {
    ctx.factored_logp = Some(match ctx.factored_logp.take() {
        None => lp.clone(),
        Some(acc) => (acc + lp)?,
    });
    Ok(())
}

impl Flow for Split {
    fn kind(&self) -> &'static str {
        "split"
    }

    fn out_shape(&self, in_shape: &[usize]) -> Result<Vec<usize>> {
        let (c, h, w) = expect_chw("split", in_shape)?;
        Self::check(c)?;
        expect_channels("split", in_shape, self.channels)?;
        Ok(vec![c / 2, h, w])
    }

    fn forward_ctx(&self, x: &Tensor, ldj: &Tensor, ctx: &mut FlowCtx) -> Result<(Tensor, Tensor)> {
        let c = x.dim(1)?;
        Self::check(c)?;
        let keep = x.narrow(1, 0, c / 2)?;
        let out = x.narrow(1, c / 2, c / 2)?;
        let lp = Self::log_density(&out, &self.prior_params(&keep, ctx)?)?;
        add_logp(ctx, &lp)?;
        ctx.factored.push(out);
        Ok((keep, (ldj + lp)?))
    }

    fn inverse_ctx(&self, z: &Tensor, ldj: &Tensor, ctx: &mut FlowCtx) -> Result<(Tensor, Tensor)> {
        let params = self.prior_params(z, ctx)?;
        let out = match &mut ctx.latents {
            Latents::Given(v) => {
                let out = v.pop().ok_or_else(|| {
                    Error::Usage("inverse pass ran out of given latents at a split".into())
                })?;
                if out.dims() != z.dims() {
                    return Err(Error::shape(
                        "split",
                        format!(
                            "given latent has shape {:?}, expected {:?}",
                            out.dims(),
                            z.dims()
                        ),
                    ));
                }
                out
            }
            Latents::Sample { temperature } => {
                let t = *temperature;
                let eps = ctx.rng.normal(z.dims(), t, z.dtype(), z.device())?;
                match &params {
                    None => eps,
                    Some((mu, log_sigma)) => ((eps * log_sigma.exp()?)? + mu)?,
                }
            }
        };
        let lp = Self::log_density(&out, &params)?;
        Ok((Tensor::cat(&[z, &out], 1)?, (ldj - lp)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamStore;
    use crate::testing::{check_built, FlowCheck};
    use candle_core::{DType, Device};

    #[test]
    fn both_priors_round_trip_with_given_latents_and_zero_logdet() {
        for prior in [SplitPrior::Standard, SplitPrior::Learned] {
            check_built(&FlowCheck::new(&[4, 2, 3]).perturb(0.2), |p| {
                Ok(Box::new(Split::new(p, 4, prior)?))
            });
        }
    }

    #[test]
    fn class_conditional_learned_prior_round_trips() {
        check_built(&FlowCheck::new(&[4, 2, 3]).labels(2).perturb(0.2), |p| {
            Ok(Box::new(Split::conditional(p, 4, SplitPrior::Learned, 2)?))
        });
    }

    #[test]
    fn ldj_is_the_standard_normal_density_of_the_factored_half() {
        let store = ParamStore::new(0, DType::F64, &Device::Cpu);
        let s = Split::new(&store.root(), 2, SplitPrior::Standard).unwrap();
        let x = Tensor::new(&[[[[0.5f64]], [[2.0]]]], &Device::Cpu).unwrap();
        let (z, ldj) = s
            .forward(&x, &Tensor::zeros(1, DType::F64, &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(z.dims(), &[1, 1, 1, 1]);
        let expect = -0.5 * (2.0 * std::f64::consts::PI).ln() - 2.0;
        assert!((ldj.to_vec1::<f64>().unwrap()[0] - expect).abs() < 1e-12);
    }

    #[test]
    fn odd_or_single_channel_refused_and_temperature_zero_is_the_mean() {
        let store = ParamStore::new(0, DType::F32, &Device::Cpu);
        for c in [1, 3] {
            let e = Split::new(&store.root(), c, SplitPrior::Standard).unwrap_err();
            assert!(e.to_string().contains("even number of channels"), "{e}");
        }
        let s = Split::new(&store.root(), 4, SplitPrior::Standard).unwrap();
        let z = Tensor::ones((2, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let mut ctx = FlowCtx::new(0).with_latents(Latents::Sample { temperature: 0.0 });
        let (x, _) = s
            .inverse_ctx(
                &z,
                &Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
                &mut ctx,
            )
            .unwrap();
        assert_eq!(x.dims(), &[2, 4, 3, 3]);
        assert_eq!(
            x.narrow(1, 2, 2)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}
