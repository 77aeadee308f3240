//! Stride-1 zero-padded 2-D convolution with bias: im2col + GEMM forward, explicit
//! weight/bias/input gradients.
//!
//! Shapes: x `[B, Ci, H, W]`, w `[Co, Ci, kh, kw]`, b `[Co]`, y `[B, Co, H', W']` with
//! `H' = H + 2p − kh + 1`, `W' = W + 2p − kw + 1`. With `K = Ci·kh·kw` and `colsₙ` the
//! `[K, H'W']` patch matrix of image n:
//! - `yₙ = W·colsₙ + b` (W viewed as `[Co, K]`);
//! - `∂W = Σₙ Gₙ·colsₙᵀ`, `∂b = Σₙ,ₚ Gₙ[:, p]`;
//! - `∂xₙ = col2im(Wᵀ·Gₙ)`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::{per_image, slice, Real};
use crate::Result;

/// Convolution geometry, derived from the input and weight shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geom {
    b: usize,
    ci: usize,
    h: usize,
    w: usize,
    co: usize,
    kh: usize,
    kw: usize,
    pad: usize,
    oh: usize,
    ow: usize,
}

impl Geom {
    fn new(x: &[usize], w: &[usize], pad: usize) -> candle_core::Result<Self> {
        let bad = |m: String| Err(candle_core::Error::Msg(format!("conv2d kernel: {m}")));
        let (&[b, ci, h, ww], &[co, ci2, kh, kw]) = (x, w) else {
            return bad(format!(
                "expected 4-d input and weight, got {x:?} and {w:?}"
            ));
        };
        if ci != ci2 {
            return bad(format!("input has {ci} channels, weight expects {ci2}"));
        }
        if h + 2 * pad < kh || ww + 2 * pad < kw {
            return bad(format!(
                "kernel {kh}×{kw} larger than padded input {h}×{ww} (pad {pad})"
            ));
        }
        Ok(Self {
            b,
            ci,
            h,
            w: ww,
            co,
            kh,
            kw,
            pad,
            oh: h + 2 * pad - kh + 1,
            ow: ww + 2 * pad - kw + 1,
        })
    }

    /// Refuses an output gradient whose shape is not `[B, Co, H', W']` of this geometry.
    fn check_grad(&self, gd: &[usize], what: &str) -> candle_core::Result<()> {
        if gd != [self.b, self.co, self.oh, self.ow] {
            return Err(candle_core::Error::Msg(format!(
                "conv2d {what}: output gradient {gd:?} does not match geometry {self:?}"
            )));
        }
        Ok(())
    }

    /// Rows of the patch matrix.
    fn k(&self) -> usize {
        self.ci * self.kh * self.kw
    }

    fn in_len(&self) -> usize {
        self.ci * self.h * self.w
    }

    fn out_hw(&self) -> usize {
        self.oh * self.ow
    }

    /// A 1×1 kernel without padding needs no patch matrix: the image is one already.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.pad == 0
    }

    /// For kernel column j: the output columns `[lo, hi)` that read inside the image, and the
    /// offset `j − pad` from output to input column.
    fn col_range(&self, j: usize) -> (usize, usize, isize) {
        let off = j as isize - self.pad as isize;
        let lo = (-off).max(0) as usize;
        let hi = ((self.w as isize - off).max(0) as usize).min(self.ow);
        (lo.min(hi), hi, off)
    }
}

/// Fills `cols` (`[K, H'W']`) with the zero-padded patches of one image `x` (`[Ci, H, W]`).
fn im2col<T: Real>(x: &[T], cols: &mut [T], g: &Geom) {
    let ohw = g.out_hw();
    for c in 0..g.ci {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let row = (c * g.kh + i) * g.kw + j;
                let dst = &mut cols[row * ohw..(row + 1) * ohw];
                let (lo, hi, off) = g.col_range(j);
                for y in 0..g.oh {
                    let d = &mut dst[y * g.ow..(y + 1) * g.ow];
                    let sy = y as isize + i as isize - g.pad as isize;
                    if sy < 0 || sy >= g.h as isize || lo == hi {
                        d.fill(T::ZERO);
                        continue;
                    }
                    let src = &plane[sy as usize * g.w..(sy as usize + 1) * g.w];
                    d[..lo].fill(T::ZERO);
                    let s0 = (lo as isize + off) as usize;
                    d[lo..hi].copy_from_slice(&src[s0..s0 + (hi - lo)]);
                    d[hi..].fill(T::ZERO);
                }
            }
        }
    }
}

/// Adds the patch-matrix gradient `dcols` (`[K, H'W']`) back onto one image's gradient
/// `dx` (`[Ci, H, W]`): the adjoint of [`im2col`].
fn col2im<T: Real>(dcols: &[T], dx: &mut [T], g: &Geom) {
    let ohw = g.out_hw();
    for c in 0..g.ci {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let row = (c * g.kh + i) * g.kw + j;
                let src = &dcols[row * ohw..(row + 1) * ohw];
                let (lo, hi, off) = g.col_range(j);
                if lo == hi {
                    continue;
                }
                for y in 0..g.oh {
                    let sy = y as isize + i as isize - g.pad as isize;
                    if sy < 0 || sy >= g.h as isize {
                        continue;
                    }
                    let s0 = (lo as isize + off) as usize;
                    let d = &mut plane[sy as usize * g.w + s0..sy as usize * g.w + s0 + (hi - lo)];
                    for (a, &v) in d.iter_mut().zip(&src[y * g.ow + lo..y * g.ow + hi]) {
                        *a += v;
                    }
                }
            }
        }
    }
}

/// A row-major matrix view for [`matmul`]: element (r, c) at `ptr[r·rs + c·cs]`.
#[derive(Clone, Copy)]
struct Mat<T> {
    ptr: *const T,
    rs: isize,
    cs: isize,
}

impl<T> Mat<T> {
    /// Row-major `[rows, cols]` slice.
    fn rows(s: &[T], cols: usize) -> Self {
        Self {
            ptr: s.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose of a row-major `[rows, cols]` slice.
    fn transposed(s: &[T], cols: usize) -> Self {
        Self {
            ptr: s.as_ptr(),
            rs: 1,
            cs: cols as isize,
        }
    }
}

/// `dst (m×n, row-major) = [dst +] lhs (m×k) · rhs (k×n)`.
fn matmul<T: Real>(
    dst: &mut [T],
    (m, n, k): (usize, usize, usize),
    lhs: Mat<T>,
    rhs: Mat<T>,
    accumulate: bool,
    par: gemm::Parallelism,
) {
    assert!(dst.len() >= m * n);
    // SAFETY: `dst` holds m·n elements (checked above); `lhs` and `rhs` point into live
    // slices whose extents the callers size from the same geometry (m·k and k·n elements
    // reachable through the given strides).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        )
    }
}

fn conv_forward<T: Real>(x: &[T], w: &[T], b: &[T], g: &Geom) -> Vec<T> {
    let (k, ohw) = (g.k(), g.out_hw());
    let mut out = vec![T::ZERO; g.b * g.co * ohw];
    let scratch = if g.pointwise() { 0 } else { k * ohw };
    per_image(&mut out, g.co * ohw, scratch, |n, y, cols, par| {
        for (co, row) in y.chunks_mut(ohw).enumerate() {
            row.fill(b[co]);
        }
        let xn = &x[n * g.in_len()..(n + 1) * g.in_len()];
        let rhs = if g.pointwise() {
            xn
        } else {
            im2col(xn, cols, g);
            &*cols
        };
        matmul(
            y,
            (g.co, ohw, k),
            Mat::rows(w, k),
            Mat::rows(rhs, ohw),
            true,
            par,
        );
    });
    out
}

fn conv_input_grad<T: Real>(gy: &[T], w: &[T], g: &Geom) -> Vec<T> {
    let (k, ohw) = (g.k(), g.out_hw());
    let mut dx = vec![T::ZERO; g.b * g.in_len()];
    let scratch = if g.pointwise() { 0 } else { k * ohw };
    per_image(&mut dx, g.in_len(), scratch, |n, dxn, dcols, par| {
        let gn = Mat::rows(&gy[n * g.co * ohw..(n + 1) * g.co * ohw], ohw);
        if g.pointwise() {
            matmul(dxn, (k, ohw, g.co), Mat::transposed(w, k), gn, false, par);
        } else {
            matmul(dcols, (k, ohw, g.co), Mat::transposed(w, k), gn, false, par);
            col2im(dcols, dxn, g);
        }
    });
    dx
}

fn conv_weight_grad<T: Real>(x: &[T], gy: &[T], g: &Geom) -> Vec<T> {
    let (k, ohw) = (g.k(), g.out_hw());
    // Each task accumulates Σ Gₙ·colsₙᵀ over a fixed group of images into its own buffer;
    // the groups are added in order (deterministic rounding).
    let part = |range: std::ops::Range<usize>, par: gemm::Parallelism| {
        let mut dw = vec![T::ZERO; g.co * k];
        let scratch = if g.pointwise() { 0 } else { k * ohw };
        T::with_scratch(scratch, |cols| {
            for (i, n) in range.enumerate() {
                let xn = &x[n * g.in_len()..(n + 1) * g.in_len()];
                let rhs = if g.pointwise() {
                    xn
                } else {
                    im2col(xn, cols, g);
                    &*cols
                };
                matmul(
                    &mut dw,
                    (g.co, k, ohw),
                    Mat::rows(&gy[n * g.co * ohw..(n + 1) * g.co * ohw], ohw),
                    Mat::transposed(rhs, ohw),
                    i > 0,
                    par,
                );
            }
        });
        dw
    };
    // Groups run in parallel when there are enough images; otherwise the GEMM gets the
    // threads. Either way the same groups are summed in the same order.
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && g.b < threads {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    super::reduce_images(g.b, g.co * k, |r| part(r, par))
}

fn bias_grad<T: Real>(gy: &[T], g: &Geom) -> Vec<T> {
    let ohw = g.out_hw();
    let mut db = vec![T::ZERO; g.co];
    for n in 0..g.b {
        for (co, acc) in db.iter_mut().enumerate() {
            let row = &gy[(n * g.co + co) * ohw..(n * g.co + co + 1) * ohw];
            // Pairwise-ish: sum each row on its own, then add, to keep f32 error small.
            let mut s = T::ZERO;
            for &v in row {
                s += v;
            }
            *acc += s;
        }
    }
    db
}

/// Forward op: `(x, w, b) → y`.
struct Conv2dOp {
    pad: usize,
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "flowlab-conv2d"
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
        let g = Geom::new(l1.dims(), l2.dims(), self.pad)?;
        if l3.dims() != [g.co] {
            return Err(candle_core::Error::Msg(format!(
                "conv2d kernel: bias shape {:?}, expected [{}]",
                l3.dims(),
                g.co
            )));
        }
        let out = crate::kernels::dispatch!("conv2d", (s1, s2, s3), |x, w, b| conv_forward(
            slice(x, l1)?,
            slice(w, l2)?,
            slice(b, l3)?,
            &g
        ))?;
        Ok((out, Shape::from((g.b, g.co, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gy = gy.contiguous()?;
        let dx = gy.apply_op2_no_bwd(
            w,
            &InputGradOp {
                pad: self.pad,
                h: x.dim(2)?,
                w: x.dim(3)?,
            },
        )?;
        let param_grad = |with_bias: bool| {
            x.apply_op2_no_bwd(
                &gy,
                &WeightGradOp {
                    pad: self.pad,
                    kh: w.dim(2)?,
                    kw: w.dim(3)?,
                    with_bias,
                },
            )
        };
        let (dw, db) = (param_grad(false)?, param_grad(true)?);
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `(G, w) → ∂x`.
struct InputGradOp {
    pad: usize,
    h: usize,
    w: usize,
}

impl CustomOp2 for InputGradOp {
    fn name(&self) -> &'static str {
        "flowlab-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (gd, wd) = (l1.dims(), l2.dims());
        let x_dims = [gd[0], wd[1], self.h, self.w];
        let g = Geom::new(&x_dims, wd, self.pad)?;
        g.check_grad(gd, "input gradient")?;
        let out =
            crate::kernels::dispatch!("conv2d input grad", (s1, s2), |gy, w| conv_input_grad(
                slice(gy, l1)?,
                slice(w, l2)?,
                &g
            ))?;
        Ok((out, Shape::from(x_dims.to_vec())))
    }
}

/// `(x, G) → ∂w` (or `∂b` with `with_bias`).
struct WeightGradOp {
    pad: usize,
    kh: usize,
    kw: usize,
    with_bias: bool,
}

impl CustomOp2 for WeightGradOp {
    fn name(&self) -> &'static str {
        "flowlab-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (xd, gd) = (l1.dims(), l2.dims());
        let w_dims = [gd[1], xd[1], self.kh, self.kw];
        let g = Geom::new(xd, &w_dims, self.pad)?;
        g.check_grad(gd, "weight gradient")?;
        if self.with_bias {
            let out = crate::kernels::dispatch!("conv2d bias grad", (s1, s2), |_x, gy| bias_grad(
                slice(gy, l2)?,
                &g
            ))?;
            return Ok((out, Shape::from(g.co)));
        }
        let out =
            crate::kernels::dispatch!("conv2d weight grad", (s1, s2), |x, gy| conv_weight_grad(
                slice(x, l1)?,
                slice(gy, l2)?,
                &g
            ))?;
        Ok((out, Shape::from(w_dims.to_vec())))
    }
}

/// `[B, Ci, H, W] ⊛ [Co, Ci, kh, kw] + b[Co]`, stride 1, zero padding `pad` on every side.
pub fn conv2d(x: &Tensor, w: &Tensor, b: &Tensor, pad: usize) -> Result<Tensor> {
    if !super::use_fast(&[x, w, b]) {
        return super::reference::conv2d(x, w, b, pad);
    }
    Ok(x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Conv2dOp { pad })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::{DType, Device};

    fn randn(seed: u64, dims: &[usize], dtype: DType) -> Tensor {
        Rng::new(seed)
            .normal(dims, 1.0, dtype, &Device::Cpu)
            .unwrap()
    }

    fn check(x: &[usize], w: &[usize], pad: usize, dtype: DType, tol: f64) {
        let inputs = [
            randn(1, x, dtype),
            randn(2, w, dtype),
            randn(3, &[w[0]], dtype),
        ];
        super::super::check_against_reference(&inputs, |t| conv2d(&t[0], &t[1], &t[2], pad), tol);
    }

    #[test]
    fn matches_candle_values_and_gradients_f64() {
        // The layers' cases: 3×3 same padding, 1×1, and odd sizes, small and large batches
        // (both the per-image-parallel and the parallel-GEMM paths).
        check(&[2, 3, 5, 7], &[4, 3, 3, 3], 1, DType::F64, 1e-12);
        check(&[1, 2, 6, 6], &[5, 2, 1, 1], 0, DType::F64, 1e-12);
        check(&[5, 4, 7, 3], &[2, 4, 3, 3], 1, DType::F64, 1e-12);
        check(&[3, 1, 4, 4], &[2, 1, 3, 3], 1, DType::F64, 1e-12);
        check(&[2, 2, 5, 5], &[3, 2, 5, 5], 2, DType::F64, 1e-12);
        check(&[2, 2, 5, 6], &[3, 2, 3, 1], 0, DType::F64, 1e-12);
        check(&[4, 3, 6, 5], &[2, 3, 2, 2], 1, DType::F64, 1e-12);
        check(&[2, 2, 1, 1], &[3, 2, 3, 3], 1, DType::F64, 1e-12);
    }

    #[test]
    fn matches_candle_values_and_gradients_f32_at_tutorial_size() {
        check(&[8, 64, 14, 14], &[32, 64, 3, 3], 1, DType::F32, 1e-4);
        check(&[8, 64, 14, 14], &[64, 64, 1, 1], 0, DType::F32, 1e-4);
    }

    #[test]
    fn gradients_are_bit_identical_for_any_thread_count() {
        // Training must be reproducible and resumable exactly, so batch reductions may not
        // depend on rayon's scheduling.
        let x = randn(1, &[9, 4, 6, 5], DType::F32);
        let w = randn(2, &[3, 4, 3, 3], DType::F32);
        let b = randn(3, &[3], DType::F32);
        let grads = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                super::super::with_kernels(super::super::Kernels::Fast, || {
                    let (xv, wv) = (
                        candle_core::Var::from_tensor(&x).unwrap(),
                        candle_core::Var::from_tensor(&w).unwrap(),
                    );
                    let y = conv2d(xv.as_tensor(), wv.as_tensor(), &b, 1).unwrap();
                    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                    let v = |t: &Tensor| {
                        g.get(t)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap()
                    };
                    (v(xv.as_tensor()), v(wv.as_tensor()))
                })
            })
        };
        let one = grads(1);
        for t in [2, 3, 8] {
            assert_eq!(grads(t), one, "{t} threads");
        }
    }

    #[test]
    fn refuses_mismatched_shapes() {
        let x = randn(1, &[1, 3, 4, 4], DType::F32);
        let w = randn(2, &[2, 4, 3, 3], DType::F32);
        let b = randn(3, &[2], DType::F32);
        let err = super::super::with_kernels(super::super::Kernels::Fast, || {
            conv2d(&x, &w, &b, 1).unwrap_err().to_string()
        });
        assert!(err.contains("channels"), "{err}");
    }
}
