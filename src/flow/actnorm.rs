//! ActNorm (Glow): a per-channel affine map with data-dependent initialisation.
//!
//! z = (x + b) ⊙ exp(log s),  log|det J| = H·W·Σ_c log s_c.  Shapes preserved.
//!
//! On the first forward pass of an uninitialised layer, b and log s are set so that the
//! batch's output has zero mean and unit variance per channel; afterwards they are
//! ordinary parameters. The "initialised" flag is a buffer saved with the parameters,
//! so a reloaded model never re-initialises.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Tensor, Var};

use super::{expect_channels, Flow, FlowCtx};
use crate::params::{Init, Params};
use crate::Result;

/// Per-channel affine normalisation with data-dependent init.
#[derive(Debug)]
pub struct ActNorm {
    channels: usize,
    log_scale: Var,
    bias: Var,
    initialized: Var,
    /// Host cache of `initialized` once it is known to be set (avoids a device read per pass).
    known_initialized: AtomicBool,
}

impl ActNorm {
    pub fn new(p: &Params, channels: usize) -> Result<Self> {
        Ok(Self {
            channels,
            log_scale: p.var("log_scale", &[1, channels, 1, 1], Init::Zeros)?,
            bias: p.var("bias", &[1, channels, 1, 1], Init::Zeros)?,
            initialized: p.init_flag("initialized")?,
            known_initialized: AtomicBool::new(false),
        })
    }

    /// Whether the data-dependent initialisation has happened (here or in a loaded checkpoint).
    pub fn is_initialized(&self) -> Result<bool> {
        if self.known_initialized.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let flag = self
            .initialized
            .as_tensor()
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?[0]
            != 0.0;
        if flag {
            self.known_initialized.store(true, Ordering::Relaxed);
        }
        Ok(flag)
    }

    fn data_init(&self, x: &Tensor) -> Result<()> {
        let x = x.detach();
        let c = self.channels;
        let flat = x.transpose(0, 1)?.flatten_from(1)?; // [C, B·H·W]
        let mean = flat.mean_keepdim(1)?;
        let std = flat.broadcast_sub(&mean)?.sqr()?.mean_keepdim(1)?.sqrt()?;
        self.bias.set(&mean.neg()?.reshape((1, c, 1, 1))?)?;
        self.log_scale
            .set(&(std + 1e-6)?.log()?.neg()?.reshape((1, c, 1, 1))?)?;
        self.initialized
            .set(&self.initialized.as_tensor().ones_like()?)?;
        self.known_initialized.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn logdet(&self, h: usize, w: usize) -> Result<Tensor> {
        Ok((self.log_scale.as_tensor().sum_all()? * (h * w) as f64)?)
    }
}

impl Flow for ActNorm {
    fn kind(&self) -> &'static str {
        "actnorm"
    }

    fn out_shape(&self, in_shape: &[usize]) -> Result<Vec<usize>> {
        expect_channels("actnorm", in_shape, self.channels)?;
        Ok(in_shape.to_vec())
    }

    fn forward_ctx(&self, x: &Tensor, ldj: &Tensor, _: &mut FlowCtx) -> Result<(Tensor, Tensor)> {
        let (_, _, h, w) = x.dims4()?;
        if !self.is_initialized()? {
            self.data_init(x)?;
        }
        let z = crate::kernels::channel_affine(
            x,
            self.bias.as_tensor(),
            &self.log_scale.as_tensor().exp()?,
        )?;
        Ok((z, ldj.broadcast_add(&self.logdet(h, w)?)?))
    }

    fn inverse_ctx(&self, z: &Tensor, ldj: &Tensor, _: &mut FlowCtx) -> Result<(Tensor, Tensor)> {
        let (_, _, h, w) = z.dims4()?;
        let x = z
            .broadcast_mul(&self.log_scale.as_tensor().neg()?.exp()?)?
            .broadcast_sub(self.bias.as_tensor())?;
        Ok((x, ldj.broadcast_sub(&self.logdet(h, w)?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamStore;
    use crate::rng::Rng;
    use crate::testing::{check_built, FlowCheck};
    use candle_core::{DType, Device};

    #[test]
    fn round_trip_and_logdet() {
        check_built(&FlowCheck::new(&[3, 2, 3]), |p| {
            Ok(Box::new(ActNorm::new(p, 3)?))
        });
    }

    #[test]
    fn data_init_normalises_per_channel_and_survives_reload() {
        let dir = tempfile::tempdir().unwrap();
        let store = ParamStore::new(0, DType::F64, &Device::Cpu);
        let an = ActNorm::new(&store.root().pp("an"), 2).unwrap();
        let x = (Rng::new(4)
            .normal(&[8, 2, 5, 5], 3.0, DType::F64, &Device::Cpu)
            .unwrap()
            + 7.0)
            .unwrap();
        let zeros = Tensor::zeros(8, DType::F64, &Device::Cpu).unwrap();
        assert!(!an.is_initialized().unwrap());
        let (z, _) = an.forward(&x, &zeros).unwrap();
        assert!(an.is_initialized().unwrap());
        let flat = z.transpose(0, 1).unwrap().flatten_from(1).unwrap();
        let mean = flat.mean(1).unwrap().to_vec1::<f64>().unwrap();
        let var = flat
            .sqr()
            .unwrap()
            .mean(1)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for c in 0..2 {
            assert!(
                mean[c].abs() < 1e-9 && (var[c] - 1.0).abs() < 1e-5,
                "channel {c}: {mean:?} {var:?}"
            );
        }
        // A second batch does not re-initialise.
        let before = store.tensors()["an.bias"].to_vec3::<f64>().ok();
        an.forward(&(x.clone() * 5.0).unwrap(), &zeros).unwrap();
        assert_eq!(before, store.tensors()["an.bias"].to_vec3::<f64>().ok());

        let path = dir.path().join("an.safetensors");
        store.save(&path).unwrap();
        let store2 = ParamStore::new(9, DType::F64, &Device::Cpu);
        let an2 = ActNorm::new(&store2.root().pp("an"), 2).unwrap();
        store2.load(&path).unwrap();
        assert!(an2.is_initialized().unwrap());
        let (z2, _) = an2.forward(&x, &zeros).unwrap();
        let d = (z2 - z)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert_eq!(d, 0.0, "reloaded ActNorm re-initialised");
    }
}
