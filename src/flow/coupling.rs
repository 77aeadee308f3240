//! Coupling layers: affine (RealNVP/Glow), additive (NICE), with checkerboard or channel
//! masks (UvA tutorial style) or a Glow-style channel split.
//!
//! **Masked** (`checkerboard`, `channel`): with a binary mask m (1 = conditioning),
//! `[s, t] = NN(x ⊙ m [, cond])`, `s ← bound(s) ⊙ (1 − m)`, `t ← t ⊙ (1 − m)`,
//!   z = (x + t) ⊙ exp(s),   log|det J| = Σ s.
//! The network sees all C channels (masked) and outputs 2C (affine) or C (additive) channels.
//!
//! **Split** (Glow): `x = [x_a, x_b]` along channels (`invert` swaps the roles);
//! `[s, t] = NN(x_a [, cond])`, z_b = (x_b + t) ⊙ exp(bound(s)), z_a = x_a,
//!   log|det J| = Σ bound(s).
//!
//! **Additive**: s ≡ 0, log|det J| = 0.
//!
//! **Spline** (Neural Spline Flows): the network outputs `3K − 1` parameters per transformed
//! element and the element goes through a monotonic rational-quadratic spline on [−B, B]
//! with identity tails (see [`super::spline`]); log|det J| = Σ log dz/dx over the
//! transformed elements. Masked partitions blend `z = m ⊙ x + (1 − m) ⊙ spline(x)`.
//!
//! Scale bounds: `tanh`: s = tanh(s/e^f)·e^f with a learnable per-channel f (init 0);
//! `sigmoid`: s = log σ(s + 2) (Glow); `exp`: s unbounded.
//!
//! Shapes: `[B, C, H, W] → [B, C, H, W]`; `cond` (if configured) is `[B, C_cond, H, W]`
//! taken from the pass's [`FlowCtx`].

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::logit::log_sigmoid;
use super::{expect_channels, sum_per_sample, Flow, FlowCtx};
use crate::nets::{Net, NetConfig};
use crate::params::{Init, Params};
use crate::rng::host_tensor;
use crate::{Error, Result};

/// How the input is partitioned into conditioning and transformed parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Partition {
    /// Pixels with (row + col) odd condition the others (`invert` flips).
    Checkerboard,
    /// The first ⌊C/2⌋ channels condition the rest, network sees all channels masked.
    Channel,
    /// Glow: the first ⌊C/2⌋ channels alone are the network input; the rest are transformed.
    Split,
}

/// The elementwise transform of a coupling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CouplingKind {
    #[default]
    Affine,
    Additive,
    /// Rational-quadratic spline with `bins` bins on `[−bound, bound]`.
    Spline,
}

/// Default number of spline bins.
pub const DEFAULT_BINS: usize = 8;
/// Default spline half-width B.
pub const DEFAULT_BOUND: f64 = 3.0;

fn d_bins() -> usize {
    DEFAULT_BINS
}

fn d_bound() -> f64 {
    DEFAULT_BOUND
}

/// How raw network scales are bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScaleBound {
    /// s = tanh(s / e^f) · e^f, learnable per-channel f (UvA tutorial).
    #[default]
    Tanh,
    /// s = log σ(s + 2) (openai/glow).
    Sigmoid,
    /// s unbounded (RealNVP without bounding; can diverge).
    Exp,
}

/// Plain-data description of a coupling layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CouplingConfig {
    pub partition: Partition,
    /// Swap conditioning and transformed parts.
    #[serde(default)]
    pub invert: bool,
    #[serde(default)]
    pub kind: CouplingKind,
    #[serde(default)]
    pub scale: ScaleBound,
    #[serde(default)]
    pub net: NetConfig,
    /// Channels of the context's conditioning tensor appended to the network input.
    #[serde(default)]
    pub cond_channels: usize,
    /// Spline bins K (`kind: spline` only).
    #[serde(default = "d_bins")]
    pub bins: usize,
    /// Spline domain half-width B (`kind: spline` only).
    #[serde(default = "d_bound")]
    pub bound: f64,
    /// Classes of the one-hot label planes appended to the network input (0: none).
    #[serde(default)]
    pub label_classes: usize,
}

impl CouplingConfig {
    /// An affine, tanh-bounded coupling with the default GatedConvNet.
    pub fn new(partition: Partition, invert: bool) -> Self {
        Self {
            partition,
            invert,
            kind: CouplingKind::Affine,
            scale: ScaleBound::Tanh,
            net: NetConfig::default(),
            cond_channels: 0,
            bins: DEFAULT_BINS,
            bound: DEFAULT_BOUND,
            label_classes: 0,
        }
    }
}

/// A built coupling layer for inputs with `channels` channels.
#[derive(Debug, Clone)]
pub struct Coupling {
    cfg: CouplingConfig,
    channels: usize,
    net: Net,
    /// log e^f of the tanh bound, `[1, C_t, 1, 1]`.
    log_factor: Option<Tensor>,
}

impl Coupling {
    /// Builds a coupling for `channels` input channels.
    pub fn new(p: &Params, cfg: CouplingConfig, channels: usize) -> Result<Self> {
        Self::check_channels(&cfg, channels)?;
        let (net_in, c_t) = match cfg.partition {
            Partition::Checkerboard | Partition::Channel => (channels, channels),
            Partition::Split => {
                let (a, b) = split_sizes(channels, cfg.invert);
                (a, b)
            }
        };
        let net_out = match cfg.kind {
            CouplingKind::Affine => 2 * c_t,
            CouplingKind::Additive => c_t,
            CouplingKind::Spline => super::spline::params_per_element(cfg.bins) * c_t,
        };
        let net = Net::new(
            &p.pp("net"),
            &cfg.net,
            net_in + cfg.cond_channels + cfg.label_classes,
            net_out,
        )?;
        let log_factor = match (cfg.kind, cfg.scale) {
            (CouplingKind::Affine, ScaleBound::Tanh) => Some(
                p.var("scale_factor", &[1, c_t, 1, 1], Init::Zeros)?
                    .as_tensor()
                    .clone(),
            ),
            _ => None,
        };
        Ok(Self {
            cfg,
            channels,
            net,
            log_factor,
        })
    }

    fn check_channels(cfg: &CouplingConfig, c: usize) -> Result<()> {
        if cfg.kind == CouplingKind::Spline
            && (cfg.bins < 2 || !(cfg.bound.is_finite() && cfg.bound > 0.0))
        {
            return Err(Error::shape(
                "coupling",
                format!(
                    "a spline needs bins ≥ 2 and a positive bound, got bins {} and bound {}",
                    cfg.bins, cfg.bound
                ),
            ));
        }
        let need_two = matches!(cfg.partition, Partition::Channel | Partition::Split);
        if need_two && c < 2 {
            return Err(Error::shape(
                "coupling",
                format!(
                    "a {:?} partition needs at least 2 channels, got {c}",
                    cfg.partition
                ),
            ));
        }
        Ok(())
    }

    /// The configuration this layer was built from.
    pub fn config(&self) -> &CouplingConfig {
        &self.cfg
    }

    fn mask(&self, h: usize, w: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let inv = self.cfg.invert;
        match self.cfg.partition {
            Partition::Checkerboard => {
                let v = (0..h * w)
                    .map(|i| (((i / w + i % w) % 2 == 1) != inv) as u8 as f64)
                    .collect();
                host_tensor(v, &[1, 1, h, w], dtype, device)
            }
            Partition::Channel => {
                let c = self.channels;
                let v = (0..c).map(|i| ((i < c / 2) != inv) as u8 as f64).collect();
                host_tensor(v, &[1, c, 1, 1], dtype, device)
            }
            Partition::Split => unreachable!("split couplings use no mask"),
        }
    }

    fn net_input(&self, x_cond: &Tensor, ctx: &FlowCtx) -> Result<Tensor> {
        let x_cond = if self.cfg.label_classes > 0 {
            let (_, _, h, w) = x_cond.dims4()?;
            let planes = super::label_planes(ctx, self.cfg.label_classes, h, w, "coupling")?;
            Tensor::cat(&[x_cond, &planes], 1)?
        } else {
            x_cond.clone()
        };
        if self.cfg.cond_channels == 0 {
            return Ok(x_cond);
        }
        let cond = ctx.cond.as_ref().ok_or_else(|| {
            Error::Usage("this coupling is conditional but the pass carries no condition".into())
        })?;
        if cond.dim(1)? != self.cfg.cond_channels {
            return Err(Error::shape(
                "coupling",
                format!(
                    "condition has {} channels, the coupling was built for {}",
                    cond.dim(1)?,
                    self.cfg.cond_channels
                ),
            ));
        }
        Ok(Tensor::cat(&[&x_cond, cond], 1)?)
    }

    /// Spline coupling: (z, per-element forward log-derivative), transforming `x` where
    /// `active` is 1 (everywhere when `None`). The network's output `[B, (3K−1)·C_t, H, W]`
    /// holds each channel's parameters in consecutive channels.
    fn spline_apply(
        &self,
        x: &Tensor,
        x_cond: &Tensor,
        active: Option<&Tensor>,
        ctx: &FlowCtx,
        reverse: bool,
    ) -> Result<(Tensor, Tensor)> {
        let h = self.net.forward(&self.net_input(x_cond, ctx)?)?;
        super::spline::rq_spline_nchw(x, &h, active, self.cfg.bins, self.cfg.bound, reverse)
    }

    /// Network output → (log-scale s, shift t), both shaped like the transformed part.
    fn scale_shift(&self, h: &Tensor) -> Result<(Option<Tensor>, Tensor)> {
        match self.cfg.kind {
            CouplingKind::Spline => unreachable!("spline couplings take spline_apply"),
            CouplingKind::Additive => Ok((None, h.clone())),
            CouplingKind::Affine => {
                let c = h.dim(1)? / 2;
                let raw = h.narrow(1, 0, c)?;
                let t = h.narrow(1, c, c)?;
                let s = match self.cfg.scale {
                    ScaleBound::Tanh => {
                        let lf = self.log_factor.as_ref().expect("tanh bound has a factor");
                        let f = lf.exp()?;
                        raw.broadcast_div(&f)?.tanh()?.broadcast_mul(&f)?
                    }
                    ScaleBound::Sigmoid => log_sigmoid(&(raw + 2.0)?)?,
                    ScaleBound::Exp => raw,
                };
                Ok((Some(s), t))
            }
        }
    }

    fn apply(
        &self,
        x: &Tensor,
        ldj: &Tensor,
        ctx: &FlowCtx,
        reverse: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (_, c, h, w) = x.dims4()?;
        expect_channels("coupling", &[c, h, w], self.channels)?;
        let step =
            |xb: &Tensor, s: Option<Tensor>, t: Tensor| -> Result<(Tensor, Option<Tensor>)> {
                Ok(match (s, reverse) {
                    (Some(s), false) => (((xb + t)? * s.exp()?)?, Some(s)),
                    (Some(s), true) => (((xb * s.neg()?.exp()?)? - t)?, Some(s)),
                    (None, false) => ((xb + t)?, None),
                    (None, true) => ((xb - t)?, None),
                })
            };
        let (z, s) = match self.cfg.partition {
            Partition::Checkerboard | Partition::Channel
                if self.cfg.kind == CouplingKind::Spline =>
            {
                // The spline transforms only the unmasked elements (the others stay x with
                // log-derivative 0), so its output is z.
                let m = self.mask(h, w, x.dtype(), x.device())?;
                let inv_m = m.affine(-1.0, 1.0)?;
                let x_cond = x.broadcast_mul(&m)?;
                let (z, ld) = self.spline_apply(x, &x_cond, Some(&inv_m), ctx, reverse)?;
                (z, Some(ld))
            }
            Partition::Checkerboard | Partition::Channel => {
                let m = self.mask(h, w, x.dtype(), x.device())?;
                let inv_m = m.affine(-1.0, 1.0)?;
                let hnet = self
                    .net
                    .forward(&self.net_input(&x.broadcast_mul(&m)?, ctx)?)?;
                let (s, t) = self.scale_shift(&hnet)?;
                let s = s.map(|s| s.broadcast_mul(&inv_m)).transpose()?;
                step(x, s, t.broadcast_mul(&inv_m)?)?
            }
            Partition::Split => {
                let (ca, cb) = split_sizes(c, self.cfg.invert);
                // Conditioning part `a` and transformed part `b` in channel order.
                let (a, b) = if self.cfg.invert {
                    (x.narrow(1, cb, ca)?, x.narrow(1, 0, cb)?)
                } else {
                    (x.narrow(1, 0, ca)?, x.narrow(1, ca, cb)?)
                };
                let (zb, s) = if self.cfg.kind == CouplingKind::Spline {
                    let (zb, ld) = self.spline_apply(&b, &a, None, ctx, reverse)?;
                    (zb, Some(ld))
                } else {
                    let hnet = self.net.forward(&self.net_input(&a, ctx)?)?;
                    let (s, t) = self.scale_shift(&hnet)?;
                    step(&b, s, t)?
                };
                let z = if self.cfg.invert {
                    Tensor::cat(&[zb, a], 1)?
                } else {
                    Tensor::cat(&[a, zb], 1)?
                };
                (z, s)
            }
        };
        let ldj = match s {
            None => ldj.clone(),
            Some(s) if reverse => (ldj - sum_per_sample(&s)?)?,
            Some(s) => (ldj + sum_per_sample(&s)?)?,
        };
        Ok((z, ldj))
    }
}

/// (conditioning channels, transformed channels) of a split coupling.
fn split_sizes(c: usize, invert: bool) -> (usize, usize) {
    let first = c / 2;
    if invert {
        (c - first, first)
    } else {
        (first, c - first)
    }
}

impl Flow for Coupling {
    fn kind(&self) -> &'static str {
        "coupling"
    }

    fn out_shape(&self, in_shape: &[usize]) -> Result<Vec<usize>> {
        let (c, _, _) = expect_channels("coupling", in_shape, self.channels)?;
        Self::check_channels(&self.cfg, c)?;
        Ok(in_shape.to_vec())
    }

    fn forward_ctx(&self, x: &Tensor, ldj: &Tensor, ctx: &mut FlowCtx) -> Result<(Tensor, Tensor)> {
        self.apply(x, ldj, ctx, false)
    }

    fn inverse_ctx(&self, z: &Tensor, ldj: &Tensor, ctx: &mut FlowCtx) -> Result<(Tensor, Tensor)> {
        self.apply(z, ldj, ctx, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamStore;
    use crate::testing::{check_built, FlowCheck};

    fn small(
        partition: Partition,
        invert: bool,
        kind: CouplingKind,
        scale: ScaleBound,
    ) -> CouplingConfig {
        CouplingConfig {
            partition,
            invert,
            kind,
            scale,
            net: NetConfig::gated(4, 1),
            cond_channels: 0,
            bins: 4,
            bound: 2.0,
            label_classes: 0,
        }
    }

    #[test]
    fn every_partition_kind_and_bound_inverts_with_exact_logdet() {
        for partition in [
            Partition::Checkerboard,
            Partition::Channel,
            Partition::Split,
        ] {
            for invert in [false, true] {
                for (kind, scale) in [
                    (CouplingKind::Affine, ScaleBound::Tanh),
                    (CouplingKind::Affine, ScaleBound::Sigmoid),
                    (CouplingKind::Affine, ScaleBound::Exp),
                    (CouplingKind::Additive, ScaleBound::Tanh),
                    (CouplingKind::Spline, ScaleBound::Tanh),
                ] {
                    let cfg = small(partition, invert, kind, scale);
                    let r = check_built(&FlowCheck::new(&[3, 4, 4]), |p| {
                        Ok(Box::new(Coupling::new(p, cfg, 3)?))
                    });
                    if kind != CouplingKind::Additive {
                        assert!(
                            r.max_abs_logdet > 1e-3,
                            "{cfg:?} tested only near the identity: {r:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn glow_net_and_conditional_couplings() {
        let mut cfg = small(
            Partition::Split,
            false,
            CouplingKind::Affine,
            ScaleBound::Sigmoid,
        );
        cfg.net = NetConfig::glow(6);
        check_built(&FlowCheck::new(&[4, 2, 2]), |p| {
            Ok(Box::new(Coupling::new(p, cfg, 4)?))
        });
        let mut cfg = small(
            Partition::Checkerboard,
            true,
            CouplingKind::Affine,
            ScaleBound::Tanh,
        );
        cfg.cond_channels = 1;
        check_built(&FlowCheck::new(&[1, 4, 4]).cond(1), |p| {
            Ok(Box::new(Coupling::new(p, cfg, 1)?))
        });
    }

    #[test]
    fn class_conditional_couplings_invert_and_depend_on_the_label() {
        for (partition, kind) in [
            (Partition::Checkerboard, CouplingKind::Affine),
            (Partition::Split, CouplingKind::Spline),
        ] {
            let mut cfg = small(partition, false, kind, ScaleBound::Tanh);
            cfg.label_classes = 3;
            check_built(&FlowCheck::new(&[2, 3, 3]).labels(3), |p| {
                Ok(Box::new(Coupling::new(p, cfg, 2)?))
            });
        }
        // Same input, different labels → different outputs; no labels → a clear error.
        let store = ParamStore::new(0, DType::F64, &Device::Cpu);
        let mut cfg = small(
            Partition::Checkerboard,
            false,
            CouplingKind::Affine,
            ScaleBound::Tanh,
        );
        cfg.label_classes = 3;
        let layer = Coupling::new(&store.root(), cfg, 1).unwrap();
        crate::testing::perturb_params(&store, 0.5, 2).unwrap();
        let x = crate::rng::Rng::new(0)
            .normal(&[2, 1, 4, 4], 1.0, DType::F64, &Device::Cpu)
            .unwrap();
        let zeros = Tensor::zeros(2, DType::F64, &Device::Cpu).unwrap();
        let run = |labels: &[u32]| {
            let l = Tensor::new(labels, &Device::Cpu).unwrap();
            let mut ctx = FlowCtx::new(0)
                .with_labels(Some(super::super::one_hot(&l, 3, DType::F64).unwrap()));
            layer.forward_ctx(&x, &zeros, &mut ctx).unwrap().0
        };
        let d = (run(&[0, 0]) - run(&[2, 1]))
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d > 1e-6, "the label has no effect");
        let err = layer
            .forward_ctx(&x, &zeros, &mut FlowCtx::new(0))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("class-conditional") && err.contains("no labels"),
            "{err}"
        );
    }

    #[test]
    fn identity_at_init_and_masked_part_unchanged() {
        let store = ParamStore::new(0, DType::F32, &Device::Cpu);
        let cfg = CouplingConfig::new(Partition::Checkerboard, false);
        let layer = Coupling::new(&store.root(), cfg, 1).unwrap();
        let x = crate::rng::Rng::new(0)
            .normal(&[2, 1, 4, 4], 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        let zeros = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let (z, ldj) = layer.forward(&x, &zeros).unwrap();
        assert_eq!(
            (z - &x)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        assert_eq!(
            ldj.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );

        crate::testing::perturb_params(&store, 0.5, 1).unwrap();
        let (z, _) = layer.forward(&x, &zeros).unwrap();
        let m = layer.mask(4, 4, DType::F32, &Device::Cpu).unwrap();
        let diff = (z - &x).unwrap().abs().unwrap();
        let on_mask = diff
            .broadcast_mul(&m)
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let off_mask = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(on_mask, 0.0);
        assert!(off_mask > 1e-3);
        // Checkerboard: pixel (0,0) is transformed, (0,1) conditions.
        assert_eq!(
            m.flatten_all().unwrap().to_vec1::<f32>().unwrap()[..4],
            [0., 1., 0., 1.]
        );
    }

    #[test]
    fn channel_partitions_refuse_one_channel_and_conditional_needs_cond() {
        let store = ParamStore::new(0, DType::F32, &Device::Cpu);
        let e = Coupling::new(
            &store.root(),
            CouplingConfig::new(Partition::Channel, false),
            1,
        )
        .unwrap_err();
        assert!(e.to_string().contains("at least 2 channels"), "{e}");
        let mut cfg = CouplingConfig::new(Partition::Checkerboard, false);
        cfg.cond_channels = 1;
        let layer = Coupling::new(&store.root().pp("c"), cfg, 1).unwrap();
        let x = Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let e = layer
            .forward(&x, &Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("no condition"), "{e}");
    }

    #[test]
    fn tutorial_coupling_parameter_count() {
        let store = ParamStore::new(0, DType::F32, &Device::Cpu);
        Coupling::new(
            &store.root(),
            CouplingConfig::new(Partition::Checkerboard, false),
            1,
        )
        .unwrap();
        assert_eq!(store.num_params(), 69_539);
    }
}
