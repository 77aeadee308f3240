//! The channel LayerNorm, fused: per-pixel normalisation over channels with an affine
//! weight and bias per channel.
//!
//! For x `[B, C, …]` and each image n and position p: `μ = mean_c x`, `σ² = mean_c (x − μ)²`
//! (biased), `x̂ = (x − μ)·r` with `r = 1/√(σ² + ε)`, and `y = x̂·w + b`. Backward, with
//! `g = G·w`: `∂x = r·(g − mean_c g − x̂·mean_c(g·x̂))`, `∂w_c = Σ G·x̂`, `∂b_c = Σ G`.
//! The forward pass is one kernel; the backward pass is one more, which computes the
//! statistics once per image and all three gradients from them.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::{
    dims3, per_image_with_sums_write, per_image_write, slice, split_grads, sum_lanes, wide_fn,
    Real, SUM_LANES,
};
use crate::Result;

/// Fills `mean` and `rstd` (length p) from one image `x` (`[c, p]`).
#[inline(always)]
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

/// `y = x̂·w + b` for `x` `[B, C, P]`, per image in one pass after its statistics.
fn norm_fwd<T: Real>(
    x: &[T],
    w: &[T],
    bias: &[T],
    (b, c, p): (usize, usize, usize),
    eps: T,
) -> Vec<T> {
    let image = |n: usize, y: &mut [MaybeUninit<T>], s: &mut [T], _| {
        let xn = &x[n * c * p..(n + 1) * c * p];
        let (mean, rstd) = s.split_at_mut(p);
        image_fwd(xn, w, bias, c, p, eps, mean, rstd, y);
    };
    // SAFETY: `image_fwd` writes every element of `y`.
    unsafe { per_image_write(b * c * p, c * p, 2 * p, image) }
}

wide_fn! {
    /// `y = x̂·w + b` for one image (`x`, `y` `[c, p]`), with `mean`, `rstd` (length p) as
    /// scratch. Writes every element of `y` and reads none.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn image_fwd<T: Real>(
        x: &[T],
        w: &[T],
        bias: &[T],
        c: usize,
        p: usize,
        eps: T,
        mean: &mut [T],
        rstd: &mut [T],
        y: &mut [MaybeUninit<T>],
    ) {
        // Every element of `y` is written (its callers rely on it).
        assert!(y.len() == c * p && x.len() == c * p && mean.len() >= p && rstd.len() >= p);
        stats(x, c, p, eps, mean, rstd);
        for (ch, (yr, xr)) in y.chunks_mut(p).zip(x.chunks(p)).enumerate() {
            let (wc, bc) = (w[ch], bias[ch]);
            for (((y, &v), &m), &r) in yr.iter_mut().zip(xr).zip(&*mean).zip(&*rstd) {
                y.write((v - m) * r * wc + bc);
            }
        }
    }
}

wide_fn! {
    /// `∂x`, `∂w` and `∂b` of `y = x̂·w + b` for one image (`x`, `gy`, `dx` `[c, p]`),
    /// adding `Σ G·x̂` and `Σ G` per channel to `dw` and `db`. `s` is scratch of `4p`. Writes
    /// every element of `dx` and reads none.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn image_grads<T: Real>(
        x: &[T],
        gy: &[T],
        w: &[T],
        c: usize,
        p: usize,
        eps: T,
        s: &mut [T],
        dx: &mut [MaybeUninit<T>],
        dw: &mut [T],
        db: &mut [T],
    ) {
        // Every element of `dx` is written (its callers rely on it).
        assert!(dx.len() == c * p && x.len() == c * p && gy.len() == c * p);
        let inv_c = T::ONE / T::from_usize(c);
        let (mean, rest) = s.split_at_mut(p);
        let (rstd, rest) = rest.split_at_mut(p);
        let (mg, mgx) = rest.split_at_mut(p);
        stats(x, c, p, eps, mean, rstd);
        mg.fill(T::ZERO);
        mgx.fill(T::ZERO);
        for (ch, (xr, gr)) in x.chunks(p).zip(gy.chunks(p)).enumerate() {
            let (sw, sb) = sums_row(xr, gr, mean, rstd, w[ch], mg, mgx);
            dw[ch] += sw;
            db[ch] += sb;
        }
        for (ch, ((dr, xr), gr)) in dx.chunks_mut(p).zip(x.chunks(p)).zip(gy.chunks(p)).enumerate()
        {
            let wc = w[ch];
            let (dr, xr, gr) = (&mut dr[..p], &xr[..p], &gr[..p]);
            let (mean, rstd, mg, mgx) = (&mean[..p], &rstd[..p], &mg[..p], &mgx[..p]);
            for i in 0..p {
                let xh = (xr[i] - mean[i]) * rstd[i];
                dr[i].write(rstd[i] * (gr[i] * wc - mg[i] * inv_c - xh * mgx[i] * inv_c));
            }
        }
    }
}

/// Along one channel row: `mg += G·w`, `mgx += G·w·x̂`, and returns `(Σ G·x̂, Σ G)`, summed in
/// [`SUM_LANES`] fixed lanes (element i in lane i mod 16).
///
/// Written over 16-element blocks (`chunks_exact`) rather than indices: with indices LLVM
/// could not prove them in bounds and ran this loop on scalars, ≈ 4× the forward pass.
#[inline(always)]
fn sums_row<T: Real>(
    x: &[T],
    g: &[T],
    mean: &[T],
    rstd: &[T],
    w: T,
    mg: &mut [T],
    mgx: &mut [T],
) -> (T, T) {
    let (mut sw, mut sb) = ([T::ZERO; SUM_LANES], [T::ZERO; SUM_LANES]);
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn lane<T: Real>(
        x: T,
        g: T,
        m: T,
        r: T,
        w: T,
        mg: &mut T,
        mgx: &mut T,
        sw: &mut T,
        sb: &mut T,
    ) {
        let xh = (x - m) * r;
        let gw = g * w;
        *mg += gw;
        *mgx += gw * xh;
        *sw += g * xh;
        *sb += g;
    }
    let n = x.len();
    let main = n - n % SUM_LANES;
    let blocks = x[..main]
        .chunks_exact(SUM_LANES)
        .zip(g[..main].chunks_exact(SUM_LANES))
        .zip(mean[..main].chunks_exact(SUM_LANES))
        .zip(rstd[..main].chunks_exact(SUM_LANES))
        .zip(mg[..main].chunks_exact_mut(SUM_LANES))
        .zip(mgx[..main].chunks_exact_mut(SUM_LANES));
    for (((((x, g), m), r), mg), mgx) in blocks {
        for l in 0..SUM_LANES {
            lane(
                x[l],
                g[l],
                m[l],
                r[l],
                w,
                &mut mg[l],
                &mut mgx[l],
                &mut sw[l],
                &mut sb[l],
            );
        }
    }
    for (l, i) in (main..n).enumerate() {
        lane(
            x[i],
            g[i],
            mean[i],
            rstd[i],
            w,
            &mut mg[i],
            &mut mgx[i],
            &mut sw[l],
            &mut sb[l],
        );
    }
    (sum_lanes(sw), sum_lanes(sb))
}

/// `[∂x; ∂w; ∂b]` (`B·C·P + 2C` values) of `y = x̂·w + b`, the parameter sums independent of
/// the thread count ([`per_image_with_sums`](super::per_image_with_sums)).
fn norm_grads<T: Real>(
    x: &[T],
    gy: &[T],
    w: &[T],
    (b, c, p): (usize, usize, usize),
    eps: T,
) -> Vec<T> {
    let img = c * p;
    let image = |n: usize, [dxn]: [&mut [MaybeUninit<T>]; 1], s: &mut [T], sums: &mut [T], _| {
        let (dw, db) = sums.split_at_mut(c);
        let (xn, gn) = (&x[n * img..(n + 1) * img], &gy[n * img..(n + 1) * img]);
        image_grads(xn, gn, w, c, p, eps, s, dxn, dw, db);
    };
    // SAFETY: `image_grads` writes every element of `dxn`.
    unsafe { per_image_with_sums_write(b, img, 4 * p, 2 * c, image) }
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
        let d = dims3("layer_norm_channels", l1.dims())?;
        if l2.shape().elem_count() != d.1 || l3.shape().elem_count() != d.1 {
            return Err(candle_core::Error::Msg(format!(
                "layer_norm_channels kernel: weight {:?} / bias {:?} must have C = {} elements",
                l2.dims(),
                l3.dims(),
                d.1
            )));
        }
        let out = crate::kernels::dispatch!("layer_norm_channels", (s1, s2, s3), |x, w, b| {
            norm_fwd(
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
        let all = x.apply_op3_no_bwd(&gy, w, &LayerNormChannelsGrad { eps: self.eps })?;
        let (dx, dw, db) = split_grads(&all, x, w, b)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `(x, G, w) → [∂x; ∂w; ∂b]`, flat, of the affine channel LayerNorm.
struct LayerNormChannelsGrad {
    eps: f64,
}

impl CustomOp3 for LayerNormChannelsGrad {
    fn name(&self) -> &'static str {
        "flowlab-layer-norm-channels-grad"
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
        let d = dims3("layer_norm_channels", l1.dims())?;
        let out =
            crate::kernels::dispatch!("layer_norm_channels grad", (s1, s2, s3), |x, g, w| {
                norm_grads(
                    slice(x, l1)?,
                    slice(g, l2)?,
                    slice(w, l3)?,
                    d,
                    Real::from_f64(self.eps),
                )
            })?;
        Ok((out, Shape::from(d.0 * d.1 * d.2 + 2 * d.1)))
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
            super::super::grad_f32(&g, wv.as_tensor())
        });
    }

    #[test]
    fn affine_layer_norm_matches_candle() {
        for (b, c, h, w, dtype, tol) in [
            (3, 5, 4, 3, DType::F64, 1e-10),
            (1, 2, 1, 1, DType::F64, 1e-10),
            // Whole 16-position blocks and a tail (35 positions), and whole blocks only (32).
            (2, 3, 5, 7, DType::F64, 1e-10),
            (2, 4, 4, 8, DType::F64, 1e-10),
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
