//! Monotonic rational-quadratic splines (Durkan et al. 2019, "Neural Spline Flows"), the
//! elementwise transform of `kind: spline` couplings.
//!
//! On `[−B, B]` the spline has K bins. From the unconstrained parameters (last axis,
//! `3K − 1` values: K widths, K heights, K − 1 interior derivatives):
//! - widths `w = m + (1 − mK)·softmax(u_w)` scaled to 2B, knots `x₀ = −B … x_K = B`
//!   (heights and `y` knots alike), minimum bin size `m = 10⁻³`;
//! - derivatives `d = m + softplus(u_d + c)` with `softplus(c) = 1 − m`, so zero parameters
//!   give `d = 1`: with uniform bins that is the identity (a zero-initialised coupling is
//!   the identity); the boundary derivatives are 1, matching the linear tails.
//!
//! In bin k, with `ξ = (x − x_k)/w_k`, `s = h_k/w_k`, `δ = d_k + d_{k+1} − 2s`:
//!   `y = y_k + h_k (s ξ² + d_k ξ(1−ξ)) / (s + δ ξ(1−ξ))`,
//!   `dy/dx = s² (d_{k+1} ξ² + 2s ξ(1−ξ) + d_k (1−ξ)²) / (s + δ ξ(1−ξ))²`.
//! Inverse: ξ is the root in [0, 1] of `a ξ² + b ξ + c = 0` with
//! `a = h_k (s − d_k) + (y − y_k) δ`, `b = h_k d_k − (y − y_k) δ`, `c = −s (y − y_k)`,
//! taken as `ξ = 2c / (−b − √(b² − 4ac))` (no cancellation).
//!
//! Outside `(−B, B)` the transform is the identity with log-det 0 (linear tails). Every
//! branch is computed on the input clamped into the domain and then selected, so inputs
//! far outside, at the knots or exactly at ±B never produce NaN or errors (the failure
//! reported against nflows).
//!
//! On the CPU the transform is one fused op with a hand-written backward pass
//! ([`crate::kernels::rq_spline`]). [`rq_spline_composed`] builds it from differentiable
//! candle ops instead, locating bins with one-hot masks over K: the kernel's reference in
//! tests, and the path on GPUs.

use candle_core::{DType, Tensor, D};

use super::logit::softplus;
use crate::Result;

/// Minimum bin width, bin height and derivative.
pub const MIN_BIN: f64 = 1e-3;

/// Unconstrained parameters per transformed element.
pub fn params_per_element(bins: usize) -> usize {
    3 * bins - 1
}

/// Knot positions `[…, K + 1]` on [−B, B] and bin sizes `[…, K]` from unconstrained sizes.
fn knots(u: &Tensor, bins: usize, bound: f64) -> Result<(Tensor, Tensor)> {
    let p = candle_nn::ops::softmax(u, D::Minus1)?;
    let p = ((p * (1.0 - MIN_BIN * bins as f64))? + MIN_BIN)?;
    let cum = p.cumsum(D::Minus1)?;
    let mut zero_shape = cum.dims().to_vec();
    *zero_shape.last_mut().expect("non-empty") = 1;
    let zeros = Tensor::zeros(zero_shape, cum.dtype(), cum.device())?;
    let inner = cum.narrow(D::Minus1, 0, bins - 1)?;
    let ends = (zeros.ones_like()? * bound)?;
    let k = Tensor::cat(
        &[
            (zeros.ones_like()? * -bound)?,
            ((inner * (2.0 * bound))? - bound)?,
            ends,
        ],
        D::Minus1,
    )?;
    let sizes = (k.narrow(D::Minus1, 1, bins)? - k.narrow(D::Minus1, 0, bins)?)?;
    Ok((k, sizes))
}

/// Picks, per element, the entry of `t` (`[…, K]`) at the one-hot bin `onehot`.
fn gather(t: &Tensor, onehot: &Tensor) -> Result<Tensor> {
    Ok((t * onehot)?.sum(D::Minus1)?)
}

/// Applies the spline elementwise. `x`: any shape S; `raw`: S + `[3K − 1]`.
/// Returns `(y, log|dy/dx|)`, both shaped S. With `inverse`, `x` is the spline's output
/// and the result is its input, with the forward log-derivative at that input (so the
/// caller subtracts it). On the CPU this is one fused op ([`crate::kernels::rq_spline`]);
/// elsewhere (and with `Kernels::Candle`) the candle ops of [`rq_spline_composed`].
pub fn rq_spline(
    x: &Tensor,
    raw: &Tensor,
    bins: usize,
    bound: f64,
    inverse: bool,
) -> Result<(Tensor, Tensor)> {
    match crate::kernels::rq_spline(x, raw, None, 1, spec(bins, bound, inverse))? {
        Some(r) => Ok(r),
        None => rq_spline_composed(x, raw, bins, bound, inverse),
    }
}

fn spec(bins: usize, bound: f64, inverse: bool) -> crate::kernels::RqSplineSpec {
    crate::kernels::RqSplineSpec {
        bins,
        bound,
        min_bin: MIN_BIN,
        inverse,
    }
}

/// [`rq_spline`] of `x` `[B, C, H, W]` with the parameters in a network's output layout,
/// `h` `[B, C·(3K − 1), H, W]` (channel c's parameters are channels `c·(3K−1)…`), applied
/// only where `active` (broadcastable to `[1, C, H, W]`, 1 or 0) is 1: elsewhere
/// `y = x` with log-derivative 0. The fused kernel reads `h` in place and skips the
/// inactive elements; the composed path permutes `h` and selects.
pub fn rq_spline_nchw(
    x: &Tensor,
    h: &Tensor,
    active: Option<&Tensor>,
    bins: usize,
    bound: f64,
    inverse: bool,
) -> Result<(Tensor, Tensor)> {
    let (b, c, hh, ww) = x.dims4()?;
    let per = params_per_element(bins);
    if h.dims4()? != (b, c * per, hh, ww) {
        return Err(crate::Error::shape(
            "spline",
            format!(
                "parameters {:?} do not fit {c} channels × {per} per element at {hh}×{ww}",
                h.dims()
            ),
        ));
    }
    let active = active.map(|a| a.broadcast_as((1, c, hh, ww))).transpose()?;
    let fast =
        crate::kernels::rq_spline(x, h, active.as_ref(), hh * ww, spec(bins, bound, inverse))?;
    if let Some(r) = fast {
        return Ok(r);
    }
    let raw = h
        .reshape((b, c, per, hh, ww))?
        .permute((0, 1, 3, 4, 2))?
        .contiguous()?;
    let (y, ld) = rq_spline_composed(x, &raw, bins, bound, inverse)?;
    match active {
        None => Ok((y, ld)),
        Some(a) => {
            let on = a.ne(0.0)?.broadcast_as(x.shape())?;
            Ok((
                on.where_cond(&y, x)?,
                on.where_cond(&ld, &ld.zeros_like()?)?,
            ))
        }
    }
}

/// [`rq_spline`] composed of differentiable candle ops: the reference of the fused kernel,
/// and the path on GPUs.
pub fn rq_spline_composed(
    x: &Tensor,
    raw: &Tensor,
    bins: usize,
    bound: f64,
    inverse: bool,
) -> Result<(Tensor, Tensor)> {
    let k = bins;
    let uw = raw.narrow(D::Minus1, 0, k)?;
    let uh = raw.narrow(D::Minus1, k, k)?;
    let ud = raw.narrow(D::Minus1, 2 * k, k - 1)?;
    let (kx, widths) = knots(&uw, k, bound)?;
    let (ky, heights) = knots(&uh, k, bound)?;
    let shift = (1.0 - MIN_BIN).exp_m1().ln();
    let d_inner = (softplus(&(ud + shift)?)? + MIN_BIN)?;
    let mut one_shape = d_inner.dims().to_vec();
    *one_shape.last_mut().expect("non-empty") = 1;
    let ones = Tensor::ones(one_shape, x.dtype(), x.device())?;
    let d = Tensor::cat(&[&ones, &d_inner, &ones], D::Minus1)?;

    let inside = x.gt(-bound)?.mul(&x.lt(bound)?)?;
    let xc = x.clamp(-bound, bound)?;
    // Bin index = number of interior knots ≤ x, as a one-hot over K.
    let search = if inverse { &ky } else { &kx };
    let interior = search.narrow(D::Minus1, 1, k - 1)?;
    let xe = xc.unsqueeze(D::Minus1)?;
    let idx = xe
        .broadcast_ge(&interior)?
        .to_dtype(x.dtype())?
        .sum_keepdim(D::Minus1)?;
    let ar = Tensor::arange(0u32, k as u32, x.device())?.to_dtype(x.dtype())?;
    let onehot = idx.broadcast_eq(&ar)?.to_dtype(x.dtype())?.detach();

    let x_k = gather(&kx.narrow(D::Minus1, 0, k)?, &onehot)?;
    let y_k = gather(&ky.narrow(D::Minus1, 0, k)?, &onehot)?;
    let w_k = gather(&widths, &onehot)?;
    let h_k = gather(&heights, &onehot)?;
    let d_k = gather(&d.narrow(D::Minus1, 0, k)?, &onehot)?;
    let d_k1 = gather(&d.narrow(D::Minus1, 1, k)?, &onehot)?;
    let s = (&h_k / &w_k)?;
    let delta = ((&d_k + &d_k1)? - (&s * 2.0)?)?;

    let (y, xi) = if inverse {
        let dy = (&xc - &y_k)?;
        let a = ((&h_k * (&s - &d_k)?)? + (&dy * &delta)?)?;
        let b = ((&h_k * &d_k)? - (&dy * &delta)?)?;
        let c = (s.neg()? * &dy)?;
        let disc = (b.sqr()? - ((&a * &c)? * 4.0)?)?.relu()?;
        let xi = ((c * 2.0)? / (b.neg()? - disc.sqrt()?)?)?;
        let xi = xi.clamp(0.0, 1.0)?;
        (((&xi * &w_k)? + &x_k)?, xi)
    } else {
        let xi = ((&xc - &x_k)? / &w_k)?.clamp(0.0, 1.0)?;
        let t = (&xi * xi.affine(-1.0, 1.0)?)?;
        let num = (&h_k * ((&s * xi.sqr()?)? + (&d_k * &t)?)?)?;
        let den = (&s + (&delta * &t)?)?;
        ((&y_k + (num / den)?)?, xi)
    };
    let one_minus = xi.affine(-1.0, 1.0)?;
    let t = (&xi * &one_minus)?;
    let den = (&s + (&delta * &t)?)?;
    let dnum = (s.sqr()?
        * (((&d_k1 * xi.sqr()?)? + ((&s * 2.0)? * &t)?)? + (&d_k * one_minus.sqr()?)?)?)?;
    let logd = (dnum.log()? - (den.log()? * 2.0)?)?;
    let out = inside.where_cond(&y, x)?;
    let logd = inside.where_cond(&logd, &logd.zeros_like()?)?;
    debug_assert!(matches!(
        out.dtype(),
        DType::F32 | DType::F64 | DType::BF16 | DType::F16
    ));
    Ok((out, logd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::Device;

    fn vals(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Inputs covering the interior, the knots' neighbourhood, ±B exactly and far outside.
    fn inputs(bound: f64) -> Vec<f64> {
        let mut v: Vec<f64> = (0..41)
            .map(|i| -bound + 2.0 * bound * i as f64 / 40.0)
            .collect();
        v.extend([
            -1e30,
            -bound - 1e-9,
            bound + 1e-9,
            1e30,
            0.0,
            1e-12,
            -7.5,
            7.5,
        ]);
        v
    }

    fn setup(n: usize, bins: usize, scale: f64, seed: u64) -> (Tensor, Tensor) {
        let x = Tensor::from_vec(inputs(3.0)[..n].to_vec(), n, &Device::Cpu).unwrap();
        let raw = Rng::new(seed)
            .normal(
                &[n, params_per_element(bins)],
                scale,
                DType::F64,
                &Device::Cpu,
            )
            .unwrap();
        (x, raw)
    }

    #[test]
    fn zero_parameters_give_the_identity() {
        let n = inputs(3.0).len();
        let (x, _) = setup(n, 8, 1.0, 0);
        let raw = Tensor::zeros((n, params_per_element(8)), DType::F64, &Device::Cpu).unwrap();
        let (y, ld) = rq_spline(&x, &raw, 8, 3.0, false).unwrap();
        for ((a, b), l) in vals(&x).iter().zip(vals(&y)).zip(vals(&ld)) {
            assert!((a - b).abs() <= 1e-12 * a.abs().max(1.0), "{a} → {b}");
            assert!(l.abs() < 1e-12, "log-det {l}");
        }
    }

    #[test]
    fn inverts_with_exact_derivative_everywhere_including_edges_and_tails() {
        for (bins, scale, seed) in [(8, 1.0, 1), (4, 3.0, 2), (2, 0.5, 3), (16, 2.0, 4)] {
            let n = inputs(3.0).len();
            let (x, raw) = setup(n, bins, scale, seed);
            let (y, ld) = rq_spline(&x, &raw, bins, 3.0, false).unwrap();
            let (x2, ld2) = rq_spline(&y, &raw, bins, 3.0, true).unwrap();
            let (xv, yv, x2v) = (vals(&x), vals(&y), vals(&x2));
            let (ldv, ld2v) = (vals(&ld), vals(&ld2));
            for i in 0..n {
                assert!(
                    yv[i].is_finite() && ldv[i].is_finite(),
                    "bins {bins}: x {}",
                    xv[i]
                );
                assert!(
                    (xv[i] - x2v[i]).abs() <= 1e-9 * xv[i].abs().max(1.0),
                    "bins {bins}: {} → {} → {}",
                    xv[i],
                    yv[i],
                    x2v[i]
                );
                assert!(
                    (ldv[i] - ld2v[i]).abs() < 1e-8,
                    "bins {bins}: log-dets differ"
                );
                if xv[i].abs() >= 3.0 {
                    assert_eq!(yv[i], xv[i], "tails are the identity");
                    assert_eq!(ldv[i], 0.0);
                }
            }
            // Derivative against central differences, away from the domain edges.
            let h = 1e-6;
            let xs: Vec<f64> = (1..40)
                .map(|i| -3.0 + 6.0 * i as f64 / 40.0 + 0.013)
                .collect();
            let m = xs.len();
            let raw_m = raw.narrow(0, 0, m).unwrap();
            let at = |d: f64| {
                let t = Tensor::from_vec(
                    xs.iter().map(|v| v + d).collect::<Vec<_>>(),
                    m,
                    &Device::Cpu,
                )
                .unwrap();
                rq_spline(&t, &raw_m, bins, 3.0, false).unwrap()
            };
            let (yp, _) = at(h);
            let (ym, _) = at(-h);
            let (_, l0) = at(0.0);
            for ((p, q), l) in vals(&yp).iter().zip(vals(&ym)).zip(vals(&l0)) {
                let (fd, d) = ((p - q) / (2.0 * h), l.exp());
                assert!(
                    (fd - d).abs() <= 1e-5 * d + 1e-9,
                    "bins {bins}: fd {fd} vs {d}"
                );
            }
            // Monotone increasing for one parameter set.
            let one = raw.narrow(0, 0, 1).unwrap().repeat((m, 1)).unwrap();
            let t = Tensor::from_vec(xs.clone(), m, &Device::Cpu).unwrap();
            let (y0, _) = rq_spline(&t, &one, bins, 3.0, false).unwrap();
            assert!(vals(&y0).windows(2).all(|w| w[1] > w[0]), "bins {bins}");
        }
    }

    #[test]
    fn extreme_parameters_stay_finite() {
        let n = inputs(3.0).len();
        let (x, raw) = setup(n, 8, 40.0, 5);
        for inverse in [false, true] {
            let (y, ld) = rq_spline(&x, &raw, 8, 3.0, inverse).unwrap();
            assert!(vals(&y).iter().chain(&vals(&ld)).all(|v| v.is_finite()));
        }
        let xf = x.to_dtype(DType::F32).unwrap();
        let rf = raw.to_dtype(DType::F32).unwrap();
        let (y, ld) = rq_spline(&xf, &rf, 8, 3.0, false).unwrap();
        assert!(vals(&y).iter().chain(&vals(&ld)).all(|v| v.is_finite()));
    }

    #[test]
    fn gradients_reach_the_parameters() {
        let (x, raw) = setup(20, 8, 1.0, 6);
        let v = candle_core::Var::from_tensor(&raw).unwrap();
        let (y, ld) = rq_spline(&x, v.as_tensor(), 8, 3.0, false).unwrap();
        let loss = (y.sqr().unwrap().sum_all().unwrap() + ld.sum_all().unwrap()).unwrap();
        let g = loss.backward().unwrap();
        let gv = vals(g.get(v.as_tensor()).unwrap());
        assert!(gv.iter().all(|v| v.is_finite()));
        assert!(gv.iter().any(|v| v.abs() > 1e-6));
    }
}
