//! Invertible 1×1 convolution (Glow §3.2), plain or LU-parameterised.
//!
//! z[:, :, y, x] = W · x[:, :, y, x] for every pixel; W is C×C.
//! **Plain**: W free (random orthogonal init), log|det J| = H·W·log|det W|.
//! **LU**: W = P·L·(U + diag(sign(s)·exp(log|s|))), P a fixed permutation, L unit lower
//! triangular, U strictly upper triangular (both learned), log|det J| = H·W·Σ log|s|.
//!
//! candle has no determinant or inverse, so log|det W| (plain) and W⁻¹ (both, for the
//! inverse pass) are computed on the host in f64. For the plain variant the gradient of
//! log|det W| is W⁻ᵀ, injected with a surrogate whose value is exactly the f64 result:
//!   ld(W) = ld_host + Σ(W ⊙ W⁻ᵀ) − Σ(stop_grad(W) ⊙ W⁻ᵀ).
//! Shapes preserved.

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{expect_channels, Flow, FlowCtx};
use crate::linalg::{self, Lu};
use crate::params::{Init, Params};
use crate::rng::host_tensor;
use crate::{Error, Result};

/// Parameterisation of the 1×1 convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InvConvKind {
    /// W learned directly.
    Plain,
    /// W = P·L·(U + diag(s)), cheaper log-det, Glow's default.
    #[default]
    Lu,
}

#[derive(Debug)]
enum Weights {
    Plain(Var),
    Lu {
        p: Tensor,
        lower: Var,
        upper: Var,
        log_s: Var,
        sign_s: Tensor,
        lower_mask: Tensor,
        upper_mask: Tensor,
    },
}

/// Invertible 1×1 convolution over `channels` channels.
#[derive(Debug)]
pub struct InvConv1x1 {
    channels: usize,
    weights: Weights,
}

fn to_host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

impl InvConv1x1 {
    pub fn new(p: &Params, channels: usize, kind: InvConvKind) -> Result<Self> {
        let c = channels;
        let w0 = p.store().with_rng(|rng| linalg::random_orthogonal(c, rng));
        let weights = match kind {
            InvConvKind::Plain => Weights::Plain(p.var("weight", &[c, c], Init::Values(w0))?),
            InvConvKind::Lu => {
                let (perm, l, u) = Lu::new(&w0, c)?.factors();
                let diag: Vec<f64> = (0..c).map(|i| u[i * c + i]).collect();
                let strict_u: Vec<f64> = (0..c * c)
                    .map(|k| if k % c > k / c { u[k] } else { 0.0 })
                    .collect();
                let strict_l: Vec<f64> = (0..c * c)
                    .map(|k| if k % c < k / c { l[k] } else { 0.0 })
                    .collect();
                let (dt, dev) = (p.dtype(), p.device());
                let tri = |lower: bool| -> Vec<f64> {
                    (0..c * c)
                        .map(|k| {
                            let (i, j) = (k / c, k % c);
                            ((lower && j < i) || (!lower && j > i)) as u8 as f64
                        })
                        .collect()
                };
                Weights::Lu {
                    p: p.buffer("perm", &[c, c], Init::Values(perm))?
                        .as_tensor()
                        .clone(),
                    lower: p.var("lower", &[c, c], Init::Values(strict_l))?,
                    upper: p.var("upper", &[c, c], Init::Values(strict_u))?,
                    log_s: p.var(
                        "log_s",
                        &[c],
                        Init::Values(diag.iter().map(|d| d.abs().ln()).collect()),
                    )?,
                    sign_s: p
                        .buffer(
                            "sign_s",
                            &[c],
                            Init::Values(diag.iter().map(|d| d.signum()).collect()),
                        )?
                        .as_tensor()
                        .clone(),
                    lower_mask: host_tensor(tri(true), &[c, c], dt, dev)?,
                    upper_mask: host_tensor(tri(false), &[c, c], dt, dev)?,
                }
            }
        };
        Ok(Self { channels, weights })
    }

    /// The current C×C weight matrix (differentiable).
    pub fn weight(&self) -> Result<Tensor> {
        match &self.weights {
            Weights::Plain(w) => Ok(w.as_tensor().clone()),
            Weights::Lu {
                p,
                lower,
                upper,
                log_s,
                sign_s,
                lower_mask,
                upper_mask,
            } => {
                let c = self.channels;
                let eye = Tensor::eye(c, lower.dtype(), lower.device())?;
                let l = ((lower.as_tensor() * lower_mask)? + &eye)?;
                let diag = (sign_s * log_s.as_tensor().exp()?)?;
                let u = ((upper.as_tensor() * upper_mask)?
                    + eye.broadcast_mul(&diag.unsqueeze(0)?)?)?;
                Ok(p.matmul(&l.matmul(&u)?)?)
            }
        }
    }

    /// log|det W| (differentiable), per pixel.
    fn log_abs_det(&self) -> Result<Tensor> {
        match &self.weights {
            Weights::Plain(w) => {
                let w = w.as_tensor();
                let c = self.channels;
                let lu = Lu::new(&to_host(w)?, c)?;
                let ld = lu.log_abs_det();
                if !ld.is_finite() {
                    return Err(Error::Linalg(
                        "1×1 convolution weight became singular".into(),
                    ));
                }
                let inv_t = linalg::transpose(&lu.inverse()?, c);
                let inv_t = host_tensor(inv_t, &[c, c], w.dtype(), w.device())?;
                let surrogate = ((w * &inv_t)?.sum_all()? - (w.detach() * &inv_t)?.sum_all()?)?;
                Ok((surrogate + ld)?)
            }
            Weights::Lu { log_s, .. } => Ok(log_s.as_tensor().sum_all()?),
        }
    }

    fn apply_matrix(x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (b, c, h, wd) = x.dims4()?;
        let y = w.broadcast_matmul(&x.reshape((b, c, h * wd))?)?;
        Ok(y.reshape((b, c, h, wd))?)
    }

    fn inverse_weight(&self, device: &Device, dtype: DType) -> Result<Tensor> {
        let c = self.channels;
        let w = to_host(&self.weight()?)?;
        let inv = Lu::new(&w, c)?.inverse()?;
        host_tensor(inv, &[c, c], dtype, device)
    }
}

impl Flow for InvConv1x1 {
    fn kind(&self) -> &'static str {
        "invconv"
    }

    fn out_shape(&self, in_shape: &[usize]) -> Result<Vec<usize>> {
        expect_channels("invconv", in_shape, self.channels)?;
        Ok(in_shape.to_vec())
    }

    fn forward_ctx(&self, x: &Tensor, ldj: &Tensor, _: &mut FlowCtx) -> Result<(Tensor, Tensor)> {
        let (_, _, h, w) = x.dims4()?;
        let z = Self::apply_matrix(x, &self.weight()?)?;
        let ld = (self.log_abs_det()? * (h * w) as f64)?;
        Ok((z, ldj.broadcast_add(&ld)?))
    }

    fn inverse_ctx(&self, z: &Tensor, ldj: &Tensor, _: &mut FlowCtx) -> Result<(Tensor, Tensor)> {
        let (_, _, h, w) = z.dims4()?;
        let winv = self.inverse_weight(z.device(), z.dtype())?;
        let x = Self::apply_matrix(z, &winv)?;
        let ld = (self.log_abs_det()?.detach() * (h * w) as f64)?;
        Ok((x, ldj.broadcast_sub(&ld)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamStore;
    use crate::testing::{check_built, FlowCheck};

    #[test]
    fn plain_and_lu_invert_with_exact_logdet() {
        for kind in [InvConvKind::Plain, InvConvKind::Lu] {
            for c in [2, 3, 4] {
                let r = check_built(&FlowCheck::new(&[c, 2, 2]).perturb(0.3), |p| {
                    Ok(Box::new(InvConv1x1::new(p, c, kind)?))
                });
                assert!(r.max_abs_logdet > 1e-3, "{kind:?} c={c}: {r:?}");
            }
        }
    }

    #[test]
    fn lu_init_reproduces_an_orthogonal_matrix() {
        let store = ParamStore::new(3, DType::F64, &Device::Cpu);
        let conv = InvConv1x1::new(&store.root(), 5, InvConvKind::Lu).unwrap();
        let w = to_host(&conv.weight().unwrap()).unwrap();
        let wtw = linalg::matmul(&linalg::transpose(&w, 5), &w, 5);
        for i in 0..5 {
            for j in 0..5 {
                assert!((wtw[i * 5 + j] - (i == j) as u8 as f64).abs() < 1e-10);
            }
        }
        // Trainable: lower, upper, log_s (P and sign are buffers).
        assert_eq!(store.num_params(), 5 * 5 * 2 + 5);
    }

    #[test]
    fn plain_logdet_gradient_is_inverse_transpose() {
        let store = ParamStore::new(1, DType::F64, &Device::Cpu);
        let conv = InvConv1x1::new(&store.root(), 3, InvConvKind::Plain).unwrap();
        crate::testing::perturb_params(&store, 0.3, 2).unwrap();
        let ld = conv.log_abs_det().unwrap();
        let w = conv.weight().unwrap();
        let grads = ld.backward().unwrap();
        let g = to_host(grads.get(&w).unwrap()).unwrap();
        let wh = to_host(&w).unwrap();
        let expect = linalg::transpose(&Lu::new(&wh, 3).unwrap().inverse().unwrap(), 3);
        for (a, b) in g.iter().zip(&expect) {
            assert!((a - b).abs() < 1e-10);
        }
        assert!(
            (ld.to_scalar::<f64>().unwrap() - Lu::new(&wh, 3).unwrap().log_abs_det()).abs() < 1e-12
        );
    }
}
