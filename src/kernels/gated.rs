//! The tail of the tutorial's gated residual block as one op, run image by image while the
//! image's activations sit in the L2 cache.
//!
//! With `u` the block's 3×3 convolution output and `x` the block input (both `[B, C, H, W]`,
//! `P = H·W` positions), `W` `[2C, 2C, 1, 1]`, `b` `[2C]`, LayerNorm weight and bias `[C]`:
//!
//! ```text
//! a = [elu(u), elu(−u)]            [2C, P] per image
//! h = W·a + b,  [h_v, h_g] = h     [2C, P]   (the 1×1 convolution)
//! y = x + h_v·σ(h_g)               [C, P]    (the gate and the residual)
//! z = LN_c(y)·w_ln + b_ln          [C, P]    (LayerNorm over channels, per pixel)
//! ```
//!
//! Composed of separate ops, each of these steps reads and writes whole-batch tensors in
//! main memory (`h` alone is 12.8 MB at batch 64, C = 32, 28×28), forward and backward. Here
//! the forward pass reads `u` and `x` and writes `z`; the backward pass reads `u`, `x` and
//! `∂z`, recomputes `a`, `h` and `y` per image (the 1×1 convolution again: one sixth of a
//! block's forward FLOPs, cheaper on this memory system than storing `h` and reading it
//! back), and writes `∂u` and `∂x`:
//!
//! ```text
//! ∂y = LN backward (see `norm.rs`)              ∂x = ∂y
//! ∂h_v = ∂y·σ(h_g),  ∂h_g = ∂y·h_v·σ(h_g)(1 − σ(h_g))
//! ∂W += ∂h·aᵀ,  ∂b += Σ_p ∂h,  ∂a = Wᵀ·∂h
//! ∂u = ∂a₁·elu′(u) − ∂a₂·elu′(−u)
//! ```
//!
//! No log-determinant: this is part of a coupling's conditioner network, not a flow layer.
//! The parameter gradients are summed over fixed groups of images in order, so they do not
//! depend on the thread count.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};

use super::conv::{add_bias_grad, flip_transpose_dims, matmul_bt, matmul_rows};
use super::elementwise::{
    concat_elu_grad_row, concat_elu_row, gate_grad_sigma_row, gate_row_keep_sigma,
};
use super::norm::{image_fwd, image_grads};
use super::{
    assume_init_mut, dims3, per_image_with_sums_write, per_image_write, slice, wide, Real,
};
use crate::Result;

/// `(B, C, P)`: images, channels, positions per channel.
type Dims = (usize, usize, usize);

/// Values in the flat parameter vector: `W` (`4C²`), `b` (`2C`), `w_ln` (`C`), `b_ln` (`C`).
fn param_len(c: usize) -> usize {
    4 * c * c + 4 * c
}

/// The flat parameter vector, split.
struct Params<'a, T> {
    w: &'a [T],
    b: &'a [T],
    ln_w: &'a [T],
    ln_b: &'a [T],
}

impl<'a, T> Params<'a, T> {
    fn new(p: &'a [T], c: usize) -> Self {
        let (w, rest) = p.split_at(4 * c * c);
        let (b, rest) = rest.split_at(2 * c);
        let (ln_w, ln_b) = rest.split_at(c);
        Self { w, b, ln_w, ln_b }
    }
}

/// One image's `a`, `h` and `y` (scratch `[2C·P]`, `[2C·P]`, `[C·P]`) from `u` and `x`;
/// `h_g` is left as `σ(h_g)`, what the backward pass needs of it.
#[allow(clippy::too_many_arguments)]
fn image_head<T: Real>(
    un: &[T],
    xn: &[T],
    pr: &Params<T>,
    (c, p): (usize, usize),
    a: &mut [T],
    h: &mut [T],
    y: &mut [T],
    par: gemm::Parallelism,
) {
    let img = c * p;
    let (pos, neg) = a.split_at_mut(img);
    wide(|| concat_elu_row(un, pos, neg));
    // W·a without the bias (the GEMM neither reads h nor needs it filled first), then the
    // bias added in the gate's pass: the same sums, rounded the same way, as filling h with
    // the bias and accumulating into it.
    matmul_rows(h, p, (2 * c, p, 2 * c), (pr.w, 2 * c), (a, p), par);
    let (hv, hg) = h.split_at_mut(img);
    let rows = hv.chunks_exact_mut(p).zip(hg.chunks_exact_mut(p));
    let rows = rows.zip(xn.chunks_exact(p).zip(y.chunks_exact_mut(p)));
    for (ch, ((v, g), (x, y))) in rows.enumerate() {
        let (bv, bg) = (pr.b[ch], pr.b[c + ch]);
        wide(|| gate_row_keep_sigma(x, (v, bv), (g, bg), y));
    }
}

/// `z` for the whole batch.
fn tail_fwd<T: Real>(u: &[T], x: &[T], params: &[T], (b, c, p): Dims, eps: T) -> Vec<T> {
    let (img, pr) = (c * p, Params::new(params, c));
    let image = |n: usize, zn: &mut [MaybeUninit<T>], s: &mut [T], par| {
        let (a, s) = s.split_at_mut(2 * img);
        let (h, s) = s.split_at_mut(2 * img);
        let (y, s) = s.split_at_mut(img);
        let (mean, rstd) = s.split_at_mut(p);
        let (un, xn) = (&u[n * img..(n + 1) * img], &x[n * img..(n + 1) * img]);
        image_head(un, xn, &pr, (c, p), a, h, y, par);
        image_fwd(y, pr.ln_w, pr.ln_b, c, p, eps, mean, rstd, zn);
    };
    // SAFETY: `image_fwd` writes every element of `zn`.
    unsafe { per_image_write(b * img, img, 5 * img + 2 * p, image) }
}

/// `[∂u; ∂x; ∂params]` (`2·B·C·P + 4C² + 4C` values) for the output gradient `gz`.
fn tail_grads<T: Real>(
    u: &[T],
    x: &[T],
    gz: &[T],
    params: &[T],
    (b, c, p): Dims,
    eps: T,
) -> Vec<T> {
    let (img, np, pr) = (c * p, param_len(c), Params::new(params, c));
    // Wᵀ, row-major, for ∂a = Wᵀ·∂h.
    let wt = flip_transpose_dims(pr.w, (2 * c, 2 * c), 1);
    let image =
        |n: usize, [dun, dxn]: [&mut [MaybeUninit<T>]; 2], s: &mut [T], sums: &mut [T], par| {
            let (dw, rest) = sums.split_at_mut(4 * c * c);
            let (db, rest) = rest.split_at_mut(2 * c);
            let (dln_w, dln_b) = rest.split_at_mut(c);
            let (a, s) = s.split_at_mut(2 * img);
            let (h, s) = s.split_at_mut(2 * img);
            let (dh, s) = s.split_at_mut(2 * img);
            let (y, ls) = s.split_at_mut(img);
            let (un, xn) = (&u[n * img..(n + 1) * img], &x[n * img..(n + 1) * img]);
            image_head(un, xn, &pr, (c, p), a, h, y, par);
            // ∂y (= ∂x) through the LayerNorm.
            let gzn = &gz[n * img..(n + 1) * img];
            image_grads(y, gzn, pr.ln_w, c, p, eps, ls, dxn, dln_w, dln_b);
            // SAFETY: `image_grads` initialised all of `dxn`.
            let dxn = unsafe { assume_init_mut(dxn) };
            let (hv, sg) = h.split_at(img);
            let (dhv, dhg) = dh.split_at_mut(img);
            wide(|| gate_grad_sigma_row(hv, sg, dxn, dhv, dhg));
            add_bias_grad(db, dh, p);
            matmul_bt(dw, 2 * c, (2 * c, 2 * c, p), (dh, p), (a, p), true, par);
            // ∂a = Wᵀ·∂h, into h (no longer needed).
            matmul_rows(h, p, (2 * c, p, 2 * c), (&wt, 2 * c), (dh, p), par);
            let (da1, da2) = h.split_at(img);
            wide(|| concat_elu_grad_row(un, da1, da2, dun));
        };
    // SAFETY: `image_grads` writes every element of `dxn` and `concat_elu_grad_row` every
    // element of `dun`.
    unsafe { per_image_with_sums_write(b, img, 7 * img + 4 * p, np, image) }
}

/// Refuses `u`, `x` and parameters that do not fit together; `(B, C, P)`.
fn check(lu: &Layout, lx: &Layout, params: usize) -> candle_core::Result<Dims> {
    let d = dims3("gated_tail", lu.dims())?;
    if lx.dims() != lu.dims() || params != param_len(d.1) {
        return Err(candle_core::Error::Msg(format!(
            "gated_tail kernel: u {:?}, x {:?} and {params} parameters do not fit",
            lu.dims(),
            lx.dims()
        )));
    }
    Ok(d)
}

/// `(u, x, params) → z`.
struct GatedTail {
    eps: f64,
}

impl CustomOp3 for GatedTail {
    fn name(&self) -> &'static str {
        "flowlab-gated-tail"
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
        let d = check(l1, l2, l3.shape().elem_count())?;
        let out = crate::kernels::dispatch!("gated_tail", (s1, s2, s3), |u, x, pr| tail_fwd(
            slice(u, l1)?,
            slice(x, l2)?,
            slice(pr, l3)?,
            d,
            Real::from_f64(self.eps)
        ))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        u: &Tensor,
        x: &Tensor,
        params: &Tensor,
        _z: &Tensor,
        gz: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gz = gz.contiguous()?;
        let grad = GatedTailGrad {
            eps: self.eps,
            params: params.clone(),
        };
        let all = u.apply_op3_no_bwd(x, &gz, &grad)?;
        let n = u.elem_count();
        // ∂u and ∂x are consumed within the backward pass; the parameter gradient, kept
        // until the optimizer step, gets storage of its own.
        let du = all.narrow(0, 0, n)?.reshape(u.shape())?;
        let dx = all.narrow(0, n, n)?.reshape(x.shape())?;
        let dp = all
            .narrow(0, 2 * n, params.elem_count())?
            .force_contiguous()?
            .reshape(params.shape())?;
        Ok((Some(du), Some(dx), Some(dp)))
    }
}

/// `(u, x, ∂z) → [∂u; ∂x; ∂params]`, the parameters held by the op.
struct GatedTailGrad {
    eps: f64,
    params: Tensor,
}

impl CustomOp3 for GatedTailGrad {
    fn name(&self) -> &'static str {
        "flowlab-gated-tail-grad"
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
        let (ps, lp) = self.params.storage_and_layout();
        let d = check(l1, l2, lp.shape().elem_count())?;
        if l3.dims() != l1.dims() {
            return Err(candle_core::Error::Msg(format!(
                "gated_tail grad: output gradient {:?}, expected {:?}",
                l3.dims(),
                l1.dims()
            )));
        }
        let Storage::Cpu(ps) = &*ps else {
            return Err(candle_core::Error::Msg(
                "gated_tail grad: parameters not on the CPU".into(),
            ));
        };
        let out = crate::kernels::dispatch!("gated_tail grad", (s1, s2, s3, ps), |u, x, g, pr| {
            tail_grads(
                slice(u, l1)?,
                slice(x, l2)?,
                slice(g, l3)?,
                slice(pr, lp)?,
                d,
                Real::from_f64(self.eps),
            )
        })?;
        let len = 2 * l1.shape().elem_count() + lp.shape().elem_count();
        Ok((out, Shape::from(len)))
    }
}

/// `LN_c(x + h_v·σ(h_g))·w_ln + b_ln` with `h = W ⋆ concat_elu(u) + b` (1×1): the tail of
/// the tutorial's gated block, `u`, `x` `[B, C, H, W]`, `w` `[2C, 2C, 1, 1]`, `b` `[2C]`,
/// `ln_w`, `ln_b` `C` values each (any shape). Equal to
/// `layer_norm_channels(gate(x, conv2d_concat_elu(u, w, b, 0)), ln_w, ln_b, eps)`, which it
/// falls back to where the fused kernel does not apply.
pub fn gated_tail(
    u: &Tensor,
    x: &Tensor,
    (w, b): (&Tensor, &Tensor),
    (ln_w, ln_b): (&Tensor, &Tensor),
    eps: f64,
) -> Result<Tensor> {
    let c = u.dims().get(1).copied().unwrap_or(0);
    let fits = u.rank() == 4
        && x.dims() == u.dims()
        && w.dims() == [2 * c, 2 * c, 1, 1]
        && b.dims() == [2 * c]
        && ln_w.elem_count() == c
        && ln_b.elem_count() == c;
    if !fits || !super::use_fast(&[u, x, w, b, ln_w, ln_b]) {
        let h = super::conv2d_concat_elu(u, w, b, 0)?;
        return super::layer_norm_channels(&super::gate(x, &h)?, ln_w, ln_b, eps);
    }
    let params = Tensor::cat(
        &[
            w.flatten_all()?,
            b.flatten_all()?,
            ln_w.flatten_all()?,
            ln_b.flatten_all()?,
        ],
        0,
    )?;
    Ok(u.contiguous()?
        .apply_op3(&x.contiguous()?, &params, GatedTail { eps })?)
}

#[cfg(test)]
mod tests {
    use super::super::randn;
    use super::*;
    use candle_core::DType;

    fn inputs(b: usize, c: usize, h: usize, w: usize, dtype: DType) -> Vec<Tensor> {
        vec![
            randn(1, &[b, c, h, w], 1.0, dtype),
            randn(2, &[b, c, h, w], 1.0, dtype),
            randn(3, &[2 * c, 2 * c, 1, 1], 0.5, dtype),
            randn(4, &[2 * c], 0.5, dtype),
            (randn(5, &[1, c, 1, 1], 0.3, dtype) + 1.0).unwrap(),
            randn(6, &[1, c, 1, 1], 0.3, dtype),
        ]
    }

    fn run(t: &[Tensor]) -> Result<Tensor> {
        gated_tail(&t[0], &t[1], (&t[2], &t[3]), (&t[4], &t[5]), 1e-5)
    }

    #[test]
    fn matches_the_composed_ops_values_and_gradients() {
        // Odd sizes (positions not a multiple of 16), one channel, a single pixel, batches
        // below, at and above one reduction group, the tutorial's width and small odd
        // shapes in f32.
        for (b, c, h, w, dtype, tol) in [
            (2, 3, 5, 7, DType::F64, 1e-10),
            (5, 4, 6, 6, DType::F64, 1e-10),
            (1, 1, 3, 3, DType::F64, 1e-10),
            (9, 2, 1, 1, DType::F64, 1e-10),
            (6, 32, 7, 9, DType::F32, 1e-4),
            // f32 1×1 products on the pointwise GEMM: 6 and 10 rows, 35 and 9 positions.
            (3, 3, 5, 7, DType::F32, 1e-4),
            (4, 5, 3, 3, DType::F32, 1e-4),
        ] {
            super::super::check_against_reference(&inputs(b, c, h, w, dtype), run, tol);
        }
    }

    #[test]
    fn gradients_do_not_depend_on_the_thread_count() {
        // 33 images: 9 groups of 4, at least one per thread on pools of 1 to 8 threads, so
        // every pool takes the same path (with a kernel set, the pointwise GEMM with images in
        // parallel; with fewer groups than threads the `gemm` crate gets the threads, and
        // its sums are not the pointwise kernel's bit for bit).
        let t = inputs(33, 8, 5, 6, DType::F32);
        super::super::assert_thread_count_invariant(|| {
            let vars: Vec<candle_core::Var> = t
                .iter()
                .map(|t| candle_core::Var::from_tensor(t).unwrap())
                .collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let z = run(&ts).unwrap();
            let g = (z.sqr().unwrap() * &ts[1])
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            ts.iter()
                .map(|t| super::super::grad_f32(&g, t))
                .collect::<Vec<_>>()
        });
    }

    #[test]
    fn empty_images_give_empty_outputs_and_zero_parameter_gradients() {
        // The fused kernel's own edge case: under the kernel lock, so that a test switching
        // to candle's ops at the same time cannot send this one down the composed path.
        super::super::with_kernels(super::super::Kernels::Fast, || {
            let t = inputs(2, 3, 0, 4, DType::F32);
            let vars: Vec<candle_core::Var> = t
                .iter()
                .map(|t| candle_core::Var::from_tensor(t).unwrap())
                .collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let z = run(&ts).unwrap();
            assert_eq!(z.dims(), &[2, 3, 0, 4]);
            let g = z.sum_all().unwrap().backward().unwrap();
            let dw = g.get(&ts[2]).expect("a weight gradient from the fused op");
            let total = dw.abs().unwrap().sum_all().unwrap();
            assert_eq!(total.to_scalar::<f32>().unwrap(), 0.0);
        });
    }

    #[test]
    fn refuses_mismatched_shapes_through_the_composed_ops() {
        let mut t = inputs(2, 3, 4, 4, DType::F32);
        t[1] = randn(7, &[2, 3, 4, 5], 1.0, DType::F32);
        assert!(run(&t).is_err());
    }
}
