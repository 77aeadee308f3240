//! Per-pixel normalisation over channels (the core of a channel LayerNorm), fused.
//!
//! For x `[B, C, …]` and each image n and position p: `μ = mean_c x`, `σ² = mean_c (x − μ)²`
//! (biased), `x̂ = (x − μ)·r` with `r = 1/√(σ² + ε)`. Backward:
//! `∂x = r·(G − mean_c G − x̂·mean_c(G·x̂))`.
//! The affine weight and bias of the LayerNorm stay ordinary candle ops.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::{per_image, per_image_out, slice, Real};
use crate::Result;

/// `[B, C, …]` → (B, C, positions per channel).
fn dims3(dims: &[usize]) -> candle_core::Result<(usize, usize, usize)> {
    match dims {
        [b, c, rest @ ..] if *c > 0 => Ok((*b, *c, rest.iter().product())),
        _ => Err(candle_core::Error::Msg(format!(
            "layer_norm_channels kernel: expected [B, C, …] with C > 0, got {dims:?}"
        ))),
    }
}

/// Fills `mean` and `rstd` (length p) from one image `x` (`[c, p]`).
fn stats<T: Real>(x: &[T], c: usize, p: usize, eps: T, mean: &mut [T], rstd: &mut [T]) {
    let inv_c = T::ONE / T::from_usize(c);
    mean.fill(T::ZERO);
    for row in x.chunks(p) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v;
        }
    }
    for m in mean.iter_mut() {
        *m = *m * inv_c;
    }
    rstd.fill(T::ZERO);
    for row in x.chunks(p) {
        for ((s, &v), &m) in rstd.iter_mut().zip(row).zip(mean.iter()) {
            let d = v - m;
            *s += d * d;
        }
    }
    for s in rstd.iter_mut() {
        *s = T::ONE / (*s * inv_c + eps).sqrt();
    }
}

fn norm_fwd<T: Real>(x: &[T], (b, c, p): (usize, usize, usize), eps: T) -> Vec<T> {
    let out = per_image_out(b * c * p, c * p, 2 * p, |n, y, s, _| {
        let xn = &x[n * c * p..(n + 1) * c * p];
        let (mean, rstd) = s.split_at_mut(p);
        stats(xn, c, p, eps, mean, rstd);
        for (yr, xr) in y.chunks_mut(p).zip(xn.chunks(p)) {
            for (((y, &v), &m), &r) in yr.iter_mut().zip(xr).zip(mean.iter()).zip(rstd.iter()) {
                *y = (v - m) * r;
            }
        }
    });
    out
}

/// `∂x` for `y = x̂·w + b`: the formula above with `G·w` for `G`.
fn norm_bwd<T: Real>(
    x: &[T],
    gy: &[T],
    w: &[T],
    (b, c, p): (usize, usize, usize),
    eps: T,
) -> Vec<T> {
    let inv_c = T::ONE / T::from_usize(c);
    let dx = per_image_out(b * c * p, c * p, 4 * p, |n, d, s, _| {
        let xn = &x[n * c * p..(n + 1) * c * p];
        let gn = &gy[n * c * p..(n + 1) * c * p];
        let (mean, rest) = s.split_at_mut(p);
        let (rstd, rest) = rest.split_at_mut(p);
        let (mg, mgx) = rest.split_at_mut(p);
        stats(xn, c, p, eps, mean, rstd);
        mg.fill(T::ZERO);
        mgx.fill(T::ZERO);
        for (ch, (xr, gr)) in xn.chunks(p).zip(gn.chunks(p)).enumerate() {
            let wc = w[ch];
            for i in 0..p {
                let xh = (xr[i] - mean[i]) * rstd[i];
                let g = gr[i] * wc;
                mg[i] += g;
                mgx[i] += g * xh;
            }
        }
        for (ch, ((dr, xr), gr)) in d
            .chunks_mut(p)
            .zip(xn.chunks(p))
            .zip(gn.chunks(p))
            .enumerate()
        {
            let wc = w[ch];
            for i in 0..p {
                let xh = (xr[i] - mean[i]) * rstd[i];
                dr[i] = rstd[i] * (gr[i] * wc - mg[i] * inv_c - xh * mgx[i] * inv_c);
            }
        }
    });
    dx
}

fn affine_fwd<T: Real>(
    x: &[T],
    w: &[T],
    bias: &[T],
    (b, c, p): (usize, usize, usize),
    eps: T,
) -> Vec<T> {
    let mut y = norm_fwd(x, (b, c, p), eps);
    per_image(&mut y, c * p, 0, |_, yn, _, _| {
        for (ch, row) in yn.chunks_mut(p).enumerate() {
            for v in row {
                *v = *v * w[ch] + bias[ch];
            }
        }
    });
    y
}

/// `[∂w; ∂b]` (`[2, C]`): `∂w_c = Σₙ,ₚ G·x̂`, `∂b_c = Σₙ,ₚ G`.
fn affine_param_grad<T: Real>(
    x: &[T],
    gy: &[T],
    (b, c, p): (usize, usize, usize),
    eps: T,
) -> Vec<T> {
    let group = |images: std::ops::Range<usize>| {
        let mut acc = vec![T::ZERO; 2 * c];
        T::with_scratch(2 * p, |s| {
            for n in images {
                let xn = &x[n * c * p..(n + 1) * c * p];
                let gn = &gy[n * c * p..(n + 1) * c * p];
                let (mean, rstd) = s.split_at_mut(p);
                stats(xn, c, p, eps, mean, rstd);
                for (ch, (xr, gr)) in xn.chunks(p).zip(gn.chunks(p)).enumerate() {
                    let (mut dw, mut db) = (T::ZERO, T::ZERO);
                    for i in 0..p {
                        dw += gr[i] * (xr[i] - mean[i]) * rstd[i];
                        db += gr[i];
                    }
                    acc[ch] += dw;
                    acc[c + ch] += db;
                }
            }
        });
        acc
    };
    super::reduce_images(b, 2 * c, group)
}

/// Channel LayerNorm with affine parameters: `(x, w, b) → x̂·w + b`, w and b `[1, C, 1, 1]`.
struct LayerNormChannelsOp {
    eps: f64,
}

impl CustomOp3 for LayerNormChannelsOp {
    fn name(&self) -> &'static str {
        "flowlab-layer-norm-channels"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = dims3(l1.dims())?;
        if l2.shape().elem_count() != d.1 || l3.shape().elem_count() != d.1 {
            return Err(candle_core::Error::Msg(format!(
                "layer_norm_channels kernel: weight {:?} / bias {:?} must have C = {} elements",
                l2.dims(),
                l3.dims(),
                d.1
            )));
        }
        let out = crate::kernels::dispatch!("layer_norm_channels", (s1, s2, s3), |x, w, b| {
            affine_fwd(
                slice(x, l1)?,
                slice(w, l2)?,
                slice(b, l3)?,
                d,
                Real::from_f64(self.eps),
            )
        })?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gy = gy.contiguous()?;
        let eps = self.eps;
        let dx = x.apply_op3_no_bwd(&gy, w, &AffineInputGrad { eps })?;
        let dp = x.apply_op2_no_bwd(&gy, &AffineParamGrad { eps })?;
        let c = w.elem_count();
        let dw = dp.narrow(0, 0, 1)?.reshape(w.shape())?;
        let db = dp.narrow(0, 1, 1)?.reshape(b.shape())?;
        debug_assert_eq!(dp.dims(), [2, c]);
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `(x, G, w) → ∂x` of the affine channel LayerNorm.
struct AffineInputGrad {
    eps: f64,
}

impl CustomOp3 for AffineInputGrad {
    fn name(&self) -> &'static str {
        "flowlab-layer-norm-channels-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = dims3(l1.dims())?;
        let out =
            crate::kernels::dispatch!("layer_norm_channels grad", (s1, s2, s3), |x, g, w| {
                norm_bwd(
                    slice(x, l1)?,
                    slice(g, l2)?,
                    slice(w, l3)?,
                    d,
                    Real::from_f64(self.eps),
                )
            })?;
        Ok((out, l1.shape().clone()))
    }
}

/// `(x, G) → [∂w; ∂b]` (`[2, C]`) of the affine channel LayerNorm.
struct AffineParamGrad {
    eps: f64,
}

impl CustomOp2 for AffineParamGrad {
    fn name(&self) -> &'static str {
        "flowlab-layer-norm-channels-param-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = dims3(l1.dims())?;
        let out = crate::kernels::dispatch!("layer_norm_channels param grad", (s1, s2), |x, g| {
            affine_param_grad(slice(x, l1)?, slice(g, l2)?, d, Real::from_f64(self.eps))
        })?;
        Ok((out, Shape::from((2, d.1))))
    }
}

/// Channel LayerNorm: `x̂·w + b` with x̂ normalised over the channel axis of `[B, C, H, W]`
/// per image and pixel; w and b hold C elements (shaped `[1, C, 1, 1]` to broadcast).
pub fn layer_norm_channels(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if !super::use_fast(&[x, w, b]) {
        let xn = super::reference::channel_norm(x, eps)?;
        return Ok(xn.broadcast_mul(w)?.broadcast_add(b)?);
    }
    Ok(x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LayerNormChannelsOp { eps },
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::{DType, Device};

    #[test]
    fn plain_normalisation_matches_candle() {
        // Unit weight and zero bias: the bare normalisation x̂ and its gradient.
        for (dims, dtype, tol) in [
            (vec![3, 5, 4, 3], DType::F64, 1e-10),
            (vec![2, 1, 3, 3], DType::F64, 1e-10),
            (vec![1, 7, 1, 1], DType::F64, 1e-10),
            (vec![16, 32, 14, 14], DType::F32, 1e-4),
        ] {
            let x = (Rng::new(7).normal(&dims, 3.0, dtype, &Device::Cpu).unwrap() + 2.0).unwrap();
            let c = dims[1];
            let w = Tensor::ones((1, c, 1, 1), dtype, &Device::Cpu).unwrap();
            let b = Tensor::zeros((1, c, 1, 1), dtype, &Device::Cpu).unwrap();
            super::super::check_against_reference(
                &[x, w, b],
                |t| layer_norm_channels(&t[0], &t[1], &t[2], 1e-5),
                tol,
            );
        }
    }

    #[test]
    fn parameter_gradients_are_bit_identical_for_any_thread_count() {
        let mut rng = Rng::new(9);
        let x = rng
            .normal(&[11, 6, 3, 4], 2.0, DType::F32, &Device::Cpu)
            .unwrap();
        let w = rng
            .normal(&[1, 6, 1, 1], 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        let b = rng
            .normal(&[1, 6, 1, 1], 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        super::super::assert_thread_count_invariant(|| {
            let wv = candle_core::Var::from_tensor(&w).unwrap();
            let y = layer_norm_channels(&x, wv.as_tensor(), &b, 1e-5).unwrap();
            let g = (y.sqr().unwrap() * &x)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            g.get(wv.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        });
    }

    #[test]
    fn affine_layer_norm_matches_candle() {
        for (b, c, h, w, dtype, tol) in [
            (3, 5, 4, 3, DType::F64, 1e-10),
            (1, 2, 1, 1, DType::F64, 1e-10),
            (16, 32, 14, 14, DType::F32, 1e-4),
        ] {
            let mut rng = Rng::new(8);
            let x = rng.normal(&[b, c, h, w], 3.0, dtype, &Device::Cpu).unwrap();
            let wt = rng.normal(&[1, c, 1, 1], 1.0, dtype, &Device::Cpu).unwrap();
            let bias = rng.normal(&[1, c, 1, 1], 1.0, dtype, &Device::Cpu).unwrap();
            super::super::check_against_reference(
                &[x, wt, bias],
                |t| layer_norm_channels(&t[0], &t[1], &t[2], 1e-5),
                tol,
            );
        }
    }
}
