//! Fused elementwise kernels of the GatedConvNet: ConcatELU and the sigmoid gate, each one
//! pass forward and one pass backward, parallel over images.
//!
//! - ConcatELU: `[B, C, …] → [B, 2C, …]`, `y = [elu(x), elu(−x)]`,
//!   `∂x = G₁·elu′(x) − G₂·elu′(−x)` with `elu′(z) = 1 (z > 0), eᶻ (z ≤ 0)`; one
//!   exponential `e^(−|x|)` per element serves both halves.
//! - Gate: `y = x + v·σ(g)` with `[v, g] = h` split along channels (`h`: `[B, 2C, …]`);
//!   `∂x = G`, `∂v = G·σ(g)`, `∂g = G·v·σ(g)(1 − σ(g))`.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use super::{per_image_out, per_image_write, slice, wide, Real};
use crate::Result;

/// `e^(−|v|)`: the one exponential both halves of ConcatELU (and their derivatives) need.
#[inline(always)]
fn exp_neg_abs<T: Real>(v: T) -> T {
    let a = if v > T::ZERO { v } else { -v };
    (-a).fast_exp()
}

#[inline(always)]
fn sigmoid<T: Real>(z: T) -> T {
    T::ONE / (T::ONE + (-z).fast_exp())
}

/// `pos = elu(x)`, `neg = elu(−x)`.
#[inline(always)]
pub(super) fn concat_elu_row<T: Real>(x: &[T], pos: &mut [T], neg: &mut [T]) {
    for ((p, q), &v) in pos.iter_mut().zip(neg.iter_mut()).zip(x) {
        let e = exp_neg_abs(v) - T::ONE;
        let up = v > T::ZERO;
        *p = if up { v } else { e };
        *q = if up { e } else { -v };
    }
}

/// In place over whole buffers: `neg ← elu(−pos)`, then `pos ← elu(pos)`.
#[inline(always)]
pub(super) fn concat_elu_split<T: Real>(pos: &mut [T], neg: &mut [T]) {
    for (p, q) in pos.iter_mut().zip(neg.iter_mut()) {
        let v = *p;
        let e = exp_neg_abs(v) - T::ONE;
        let up = v > T::ZERO;
        *p = if up { v } else { e };
        *q = if up { e } else { -v };
    }
}

/// `d = g₁·elu′(x) − g₂·elu′(−x)`, written into every element of `d` (which may start
/// uninitialised; `d` as long as `x`).
#[inline(always)]
pub(super) fn concat_elu_grad_row<T: Real>(x: &[T], g1: &[T], g2: &[T], d: &mut [MaybeUninit<T>]) {
    // Every element of `d` is written (its callers rely on it).
    assert!(x.len() == d.len() && g1.len() >= d.len() && g2.len() >= d.len());
    for (((d, &v), &a), &c) in d.iter_mut().zip(x).zip(g1).zip(g2) {
        let e = exp_neg_abs(v);
        let up = v > T::ZERO;
        let dp = if up { T::ONE } else { e };
        let dn = if up { e } else { T::ONE };
        d.write(a * dp - c * dn);
    }
}

#[inline(always)]
fn gate_row<T: Real>(x: &[T], v: &[T], g: &[T], y: &mut [T]) {
    for (((y, &x), &v), &g) in y.iter_mut().zip(x).zip(v).zip(g) {
        *y = x + v * sigmoid(g);
    }
}

/// [`gate_row`] of one channel row whose `v` and `g` still lack their biases `bv` and `bg`:
/// adds them in place, turns `g` into `σ(g + bg)` (for [`gate_grad_sigma_row`]), and writes
/// `y = x + (v + bv)·σ(g + bg)`.
#[inline(always)]
pub(super) fn gate_row_keep_sigma<T: Real>(
    x: &[T],
    (v, bv): (&mut [T], T),
    (g, bg): (&mut [T], T),
    y: &mut [T],
) {
    for (((y, &x), v), g) in y.iter_mut().zip(x).zip(v).zip(g) {
        let s = sigmoid(*g + bg);
        *v += bv;
        *g = s;
        *y = x + *v * s;
    }
}

/// [`gate_grad_row`] from `s = σ(g)` (no exponential, no division).
#[inline(always)]
pub(super) fn gate_grad_sigma_row<T: Real>(v: &[T], s: &[T], gy: &[T], dv: &mut [T], dg: &mut [T]) {
    for ((((dv, dg), &v), &s), &gy) in dv.iter_mut().zip(dg).zip(v).zip(s).zip(gy) {
        *dv = gy * s;
        *dg = gy * v * s * (T::ONE - s);
    }
}

#[inline(always)]
fn gate_grad_row<T: Real>(v: &[T], g: &[T], gy: &[T], dv: &mut [T], dg: &mut [T]) {
    for ((((dv, dg), &v), &g), &gy) in dv.iter_mut().zip(dg).zip(v).zip(g).zip(gy) {
        let s = sigmoid(g);
        *dv = gy * s;
        *dg = gy * v * s * (T::ONE - s);
    }
}

/// `[B, C, …]` → (B, C·…): images and the length of one.
fn batch_split(dims: &[usize]) -> candle_core::Result<(usize, usize)> {
    match dims {
        [b, rest @ ..] if !rest.is_empty() => Ok((*b, rest.iter().product())),
        _ => Err(candle_core::Error::Msg(format!(
            "elementwise kernel: expected [B, C, …], got {dims:?}"
        ))),
    }
}

fn concat_elu_fwd<T: Real>(x: &[T], b: usize, len: usize) -> Vec<T> {
    let out = per_image_out(2 * b * len, 2 * len, 0, |n, y, _, _| {
        let xn = &x[n * len..(n + 1) * len];
        let (pos, neg) = y.split_at_mut(len);
        wide(|| concat_elu_row(xn, pos, neg));
    });
    out
}

fn concat_elu_bwd<T: Real>(x: &[T], gy: &[T], b: usize, len: usize) -> Vec<T> {
    let image = |n: usize, d: &mut [MaybeUninit<T>], _: &mut [T], _| {
        let xn = &x[n * len..(n + 1) * len];
        let (g1, g2) = gy[2 * n * len..2 * (n + 1) * len].split_at(len);
        wide(|| concat_elu_grad_row(xn, g1, g2, d));
    };
    // SAFETY: `concat_elu_grad_row` writes every element of `d`.
    unsafe { per_image_write(b * len, len, 0, image) }
}

struct ConcatElu;

impl CustomOp1 for ConcatElu {
    fn name(&self) -> &'static str {
        "flowlab-concat-elu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, len) = batch_split(l.dims())?;
        let out =
            crate::kernels::dispatch!("concat_elu", (s), |x| concat_elu_fwd(slice(x, l)?, b, len))?;
        let mut dims = l.dims().to_vec();
        dims[1] *= 2;
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, gy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&gy.contiguous()?, &ConcatEluGrad)?))
    }
}

/// `(x, G) → ∂x` of ConcatELU.
struct ConcatEluGrad;

impl CustomOp2 for ConcatEluGrad {
    fn name(&self) -> &'static str {
        "flowlab-concat-elu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, len) = batch_split(l1.dims())?;
        let out = crate::kernels::dispatch!("concat_elu grad", (s1, s2), |x, g| concat_elu_bwd(
            slice(x, l1)?,
            slice(g, l2)?,
            b,
            len
        ))?;
        Ok((out, l1.shape().clone()))
    }
}

/// ConcatELU: `[B, C, H, W] → [B, 2C, H, W]`, `[elu(x), elu(−x)]` along channels.
pub fn concat_elu(x: &Tensor) -> Result<Tensor> {
    if !super::use_fast(&[x]) {
        return super::reference::concat_elu(x);
    }
    Ok(x.contiguous()?.apply_op1(ConcatElu)?)
}

fn gate_fwd<T: Real>(x: &[T], h: &[T], b: usize, len: usize) -> Vec<T> {
    let out = per_image_out(b * len, len, 0, |n, y, _, _| {
        let xn = &x[n * len..(n + 1) * len];
        let (v, g) = h[2 * n * len..2 * (n + 1) * len].split_at(len);
        wide(|| gate_row(xn, v, g, y));
    });
    out
}

fn gate_bwd<T: Real>(h: &[T], gy: &[T], b: usize, len: usize) -> Vec<T> {
    let dh = per_image_out(2 * b * len, 2 * len, 0, |n, d, _, _| {
        let (v, g) = h[2 * n * len..2 * (n + 1) * len].split_at(len);
        let gn = &gy[n * len..(n + 1) * len];
        let (dv, dg) = d.split_at_mut(len);
        wide(|| gate_grad_row(v, g, gn, dv, dg));
    });
    dh
}

struct Gate;

impl CustomOp2 for Gate {
    fn name(&self) -> &'static str {
        "flowlab-gate"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, len) = batch_split(l1.dims())?;
        let mut want = l1.dims().to_vec();
        want[1] *= 2;
        if l2.dims() != want.as_slice() {
            return Err(candle_core::Error::Msg(format!(
                "gate kernel: h has shape {:?}, expected {want:?}",
                l2.dims()
            )));
        }
        let out = crate::kernels::dispatch!("gate", (s1, s2), |x, h| gate_fwd(
            slice(x, l1)?,
            slice(h, l2)?,
            b,
            len
        ))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        h: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let gy = gy.contiguous()?;
        let dh = h.apply_op2_no_bwd(&gy, &GateGrad)?;
        Ok((Some(gy), Some(dh)))
    }
}

/// `(h, G) → ∂h` of the gate.
struct GateGrad;

impl CustomOp2 for GateGrad {
    fn name(&self) -> &'static str {
        "flowlab-gate-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, len) = batch_split(l2.dims())?;
        let out = crate::kernels::dispatch!("gate grad", (s1, s2), |h, g| gate_bwd(
            slice(h, l1)?,
            slice(g, l2)?,
            b,
            len
        ))?;
        Ok((out, l1.shape().clone()))
    }
}

/// Gated residual: `x + v·σ(g)` with `[v, g] = h` split along channels.
/// Shapes: x `[B, C, H, W]`, h `[B, 2C, H, W]` → `[B, C, H, W]`.
pub fn gate(x: &Tensor, h: &Tensor) -> Result<Tensor> {
    if !super::use_fast(&[x, h]) {
        return super::reference::gate(x, h);
    }
    Ok(x.contiguous()?.apply_op2(&h.contiguous()?, Gate)?)
}

#[cfg(test)]
mod tests {
    use super::super::randn;
    use super::*;
    use candle_core::DType;

    #[test]
    fn concat_elu_matches_candle() {
        for (dims, dtype, tol) in [
            (vec![3, 2, 5, 7], DType::F64, 1e-12),
            (vec![1, 3, 1, 1], DType::F64, 1e-12),
            (vec![16, 32, 14, 14], DType::F32, 1e-5),
        ] {
            super::super::check_against_reference(
                &[randn(4, &dims, 2.0, dtype)],
                |t| concat_elu(&t[0]),
                tol,
            );
        }
    }

    #[test]
    fn gate_matches_candle() {
        for (b, c, h, w, dtype, tol) in [
            (3, 2, 5, 7, DType::F64, 1e-12),
            (1, 1, 1, 3, DType::F64, 1e-12),
            (16, 32, 14, 14, DType::F32, 1e-5),
        ] {
            super::super::check_against_reference(
                &[
                    randn(5, &[b, c, h, w], 2.0, dtype),
                    randn(6, &[b, 2 * c, h, w], 2.0, dtype),
                ],
                |t| gate(&t[0], &t[1]),
                tol,
            );
        }
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0.0f64;
        let mut v = -87.0f32;
        while v <= 88.0 {
            let rel = ((v.fast_exp() as f64) - (v as f64).exp()).abs() / (v as f64).exp();
            worst = worst.max(rel);
            v += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(0.0f32.fast_exp(), 1.0);
        assert!((-1000.0f32).fast_exp() < 1e-37 && (1000.0f32).fast_exp().is_finite());
    }

    #[test]
    fn gate_refuses_wrong_h() {
        let x = randn(1, &[2, 3, 4, 4], 2.0, DType::F32);
        let h = randn(2, &[2, 3, 4, 4], 2.0, DType::F32);
        let err = super::super::with_kernels(super::super::Kernels::Fast, || {
            gate(&x, &h).unwrap_err().to_string()
        });
        assert!(err.contains("expected [2, 6, 4, 4]"), "{err}");
    }
}
