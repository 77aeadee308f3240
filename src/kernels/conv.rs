//! Stride-1 zero-padded 2-D convolution with bias, optionally of ConcatELU or ReLU of its
//! input, with explicit weight/bias/input gradients: row Winograd (`winograd.rs`) for wide
//! padding-1 3×3 layers, the direct kernels of `direct.rs` where they measured faster
//! (f32, AVX-512 or AVX2, spatial kernels with enough taps), im2col + GEMM otherwise: on
//! AVX2 the pointwise GEMM of `pointwise.rs` (1×1 layers, few-tap layers on their patch
//! matrices, and the weight gradients of both; layers with few outputs as one GEMM row per
//! output channel and tap, `conv/taps.rs`), else the `gemm` crate.
//!
//! Shapes: x `[B, Cx, H, W]`, w `[Co, Ci, kh, kw]`, b `[Co]`, y `[B, Co, H', W']` with
//! `H' = H + 2p − kh + 1`, `W' = W + 2p − kw + 1`. The convolution's input is `a = x`
//! (`Ci = Cx`) or `a = [elu(x), elu(−x)]` (`Ci = 2Cx`, [`Pre::ConcatElu`]), computed per
//! image into scratch memory, so the doubled activation never becomes a tensor. With
//! `K = Ci·kh·kw` and `colsₙ` the `[K, H'W']` patch matrix of image n:
//! - `yₙ = W·colsₙ + b` (W viewed as `[Co, K]`);
//! - `∂W = Σₙ Gₙ·colsₙᵀ`, `∂b = Σₙ,ₚ Gₙ[:, p]`;
//! - `∂aₙ = Wᵀ ⋆ Gₙ`: the convolution of `Gₙ` with the spatially flipped, transposed
//!   kernel and padding `kh − 1 − p` (one im2col of `Gₙ` and a GEMM whose inner dimension
//!   is `Co·kh·kw`); kernels it does not fit (non-square, `p ≥ kh`) use `col2im(Wᵀ·Gₙ)`;
//! - `∂xₙ = ∂aₙ` or, through ConcatELU, `∂a₁·elu′(x) − ∂a₂·elu′(−x)`.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::direct::{self, Packed, Planes};
use super::elementwise::{concat_elu_grad_row, concat_elu_row, concat_elu_split};
use super::pointwise::{self, View};
use super::winograd::{self, Tiles};
use super::{
    as_uninit, assume_init_mut, init_zeroed, per_image_out, per_image_write, slice, wide, Real,
};
use crate::Result;

mod glow;
mod taps;

pub use glow::glow_net;

/// What the convolution applies to its input first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pre {
    /// `a = x`.
    Identity,
    /// `a = [elu(x), elu(−x)]` along channels.
    ConcatElu,
    /// `a = max(x, 0)`.
    Relu,
}

impl Pre {
    /// Channels of the convolution's input for `cx` input channels.
    pub(super) fn channels(self, cx: usize) -> usize {
        match self {
            Pre::Identity | Pre::Relu => cx,
            Pre::ConcatElu => 2 * cx,
        }
    }
}

/// Convolution geometry, derived from the input and weight shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geom {
    b: usize,
    /// Channels of the convolution's input `a` (after the [`Pre`] transform).
    ci: usize,
    h: usize,
    w: usize,
    co: usize,
    kh: usize,
    kw: usize,
    pad: usize,
    oh: usize,
    ow: usize,
    pre: Pre,
}

impl Geom {
    /// `x`: the op's input dims `[B, Cx, H, W]`; `w`: `[Co, Ci, kh, kw]`.
    fn new(x: &[usize], w: &[usize], pad: usize, pre: Pre) -> candle_core::Result<Self> {
        let bad = |m: String| Err(candle_core::Error::Msg(format!("conv2d kernel: {m}")));
        let (&[b, cx, h, ww], &[co, ci2, kh, kw]) = (x, w) else {
            return bad(format!(
                "expected 4-d input and weight, got {x:?} and {w:?}"
            ));
        };
        let ci = pre.channels(cx);
        if ci != ci2 {
            return bad(format!(
                "input has {cx} channels ({ci} after {pre:?}), weight expects {ci2}"
            ));
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
            pre,
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

    /// Elements of one image of the op's input `x`.
    fn in_len(&self) -> usize {
        self.act_len() / self.pre.channels(1)
    }

    /// Elements of one image of the convolution's input `a`.
    fn act_len(&self) -> usize {
        self.ci * self.h * self.w
    }

    /// Scratch for one image's `a` (none when `a = x`).
    fn act_scratch(&self) -> usize {
        match self.pre {
            Pre::Identity => 0,
            Pre::ConcatElu | Pre::Relu => self.act_len(),
        }
    }

    fn out_hw(&self) -> usize {
        self.oh * self.ow
    }

    /// A 1×1 kernel without padding needs no patch matrix: the image is one already.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.pad == 0
    }

    /// The geometry of `∂a = Wᵀ ⋆ G` as a forward convolution of G (input `[Co, H', W']`,
    /// kernel `[Ci, Co, kh, kw]` flipped, padding `kh − 1 − p`), where that gives back
    /// `H × W`: square kernels with `p < kh`.
    fn transposed(&self) -> Option<Geom> {
        if self.kh != self.kw || self.pad >= self.kh || self.pointwise() {
            return None;
        }
        let pad = self.kh - 1 - self.pad;
        let t = Geom::new(
            &[self.b, self.co, self.oh, self.ow],
            &[self.ci, self.co, self.kh, self.kw],
            pad,
            Pre::Identity,
        )
        .ok()?;
        (t.oh == self.h && t.ow == self.w).then_some(t)
    }

    /// One image's padded planes for the direct path.
    fn planes(&self) -> Planes {
        Planes {
            c: self.ci,
            h: self.h,
            w: self.w,
            pad: self.pad,
            kh: self.kh,
            kw: self.kw,
        }
    }

    /// The planes of `∂a = Wᵀ ⋆ G` on the direct path: `G` (`[Co, H', W']`) padded by
    /// `kh − 1 − p`, for square kernels with `p < kh` (1×1 included).
    fn transposed_planes(&self) -> Option<Planes> {
        (self.kh == self.kw && self.pad < self.kh).then(|| Planes {
            c: self.co,
            h: self.oh,
            w: self.ow,
            pad: self.kh - 1 - self.pad,
            kh: self.kh,
            kw: self.kw,
        })
    }

    /// Whether the direct kernels take this f32 gradient (or the forward pass, `None`):
    /// an AVX-512 or AVX2 CPU, at least one image per thread (they parallelise over images only),
    /// a spatial kernel and enough taps. 1×1 convolutions are plain GEMMs (see
    /// [`Geom::pointwise_gemm`]), and so are convolutions with few taps: forward and ∂W with
    /// `K = Ci·kh·kw <` [`DIRECT_MIN_K`] (a 1- to 7-channel input layer), ∂x with
    /// `Co·kh·kw < 128` (the transposed convolution of a few-channel output layer).
    /// Measured by `timing::conv_op_timings`.
    fn direct(&self, what: Option<Grad>) -> bool {
        let taps = match what {
            Some(Grad::Input) if self.transposed_planes().is_none() => return false,
            Some(Grad::Input) => self.co * self.kh * self.kw >= 128,
            _ => self.k() >= DIRECT_MIN_K,
        };
        taps && !self.pointwise() && direct::available() && self.b >= rayon::current_num_threads()
    }

    /// Whether the pointwise GEMM (module `pointwise`) takes the forward pass and ∂x of
    /// this f32 convolution: a 1×1 kernel or few taps (`K <` [`DIRECT_MIN_K`], on the patch
    /// matrix: `W·cols`, and `Wᵀ·G` then col2im), a kernel set (AVX2 or AVX-512) and at least one
    /// image per thread (it parallelises over images only). Their ∂W runs on it too, inside
    /// [`conv_weight_grad`] ([`matmul_bt`]). `timing::conv_op_timings`, two threads,
    /// batch 64: 192 → 192 1×1 at 14×14 forward 110–131 against `gemm`'s 96–108 GFLOP/s,
    /// ∂x 97–118 against 87–104, and faster at 7×7 and for 64 → 64 at 28×28 and 7×7;
    /// Glow's first layer, 2 → 192 3×3 at 14×14, forward 52–60 against `gemm`'s 39–51, ∂x
    /// 59–67 against the direct kernel's 36–41 (4 → 192 at 7×7: 72 against 56, 74
    /// against 47; the tutorial's 1 → 32 at 28×28: 31 against 25, 47 against 31).
    fn pointwise_gemm(&self) -> bool {
        (self.pointwise() || self.k() < DIRECT_MIN_K)
            && pointwise::available()
            && self.b >= rayon::current_num_threads()
    }

    /// Whether the few-output path (module `taps`) takes the forward pass (`None`) or ∂W of
    /// this f32 convolution: a square "same" kernel (so its transposed convolution exists)
    /// with at most [`TAPS_MAX_M`] output channels × taps, the pointwise GEMM, at least
    /// one image per thread, and enough input channels: 16 for ∂W; for the forward pass,
    /// whose GEMM has `K = Ci`, 32 and, past 36 rows, 128. `timing::conv_op_timings`, two
    /// threads, batch 64, against the direct kernels: forward 192 → 4 at 14×14 +12–22 %,
    /// 192 → 8 at 7×7 +3–10 %, 64 → 2 (`Ci` after ConcatELU) at 28×28 +37 %, but 16 → 2
    /// −17 % and 64 → 8 at 7×7 (72 rows) −16 %; ∂W +18–39 % on all of these and +21 % at
    /// `Ci = 16`.
    fn taps(&self, what: Option<Grad>) -> bool {
        let m = self.co * self.kh * self.kw;
        let enough = match what {
            None => self.ci >= 32 && (m <= 36 || self.ci >= 128),
            Some(_) => self.ci >= 16,
        };
        m <= TAPS_MAX_M
            && enough
            && self.transposed().is_some()
            && pointwise::available()
            && self.b >= rayon::current_num_threads()
    }

    /// Whether the row-Winograd kernels (module `winograd`) take this f32 op (the forward
    /// pass for `None`) of a 3×3 kernel with padding 1 on an AVX-512 or AVX2 CPU, at least
    /// one image per thread, enough channels on both sides of the transformed GEMM
    /// (`[Co, 3C]·[3C, H·tw]`; for ∂x the transposed convolution's `[C, 3Co]·…`) and
    /// enough positions (`H·⌈W/2⌉ ≥ 48`, three vectors of F(2, 3) tiles: on a 7×7 map the
    /// GEMM streams its weights per tile and loses; F(4, 3)'s ∂W there lost 2×). Measured by `timing::conv_op_timings`: 32→16 at 28×28 and
    /// wider win 5–25 % (∂W: 0–30 %), 64→2 loses 2×, 64→32 at 7×7 loses 20 % forward.
    fn winograd(&self, what: Option<Grad>) -> bool {
        let (m, k) = match what {
            Some(Grad::Input) => (self.ci, self.co),
            Some(Grad::Weight) | None => (self.co, self.ci),
        };
        super::kernels() == super::Kernels::Fast
            && (self.kh, self.kw, self.pad) == (3, 3, 1)
            && m >= WINOGRAD_MIN_M
            && k >= WINOGRAD_MIN_K
            && self.h * self.w.div_ceil(2) >= WINOGRAD_MIN_Q
            && winograd::available()
            && self.b >= rayon::current_num_threads()
    }

    /// Writes the convolution's input `a` of image `xn` into the padded planes `buf`.
    fn fill_planes(&self, p: &Planes, xn: &[f32], buf: &mut [f32]) {
        p.fill(buf, xn, self.pre == Pre::Relu);
        if self.pre == Pre::ConcatElu {
            // Plane c + Cx gets elu(−x_c), then plane c elu(x_c), in place over whole planes
            // so the loop runs in full vectors; the zero borders stay exactly zero
            // (elu(±0) = 0).
            let span = self.ci / 2 * p.plane();
            let (pos, neg) = buf.split_at_mut(span);
            wide(|| concat_elu_split(pos, &mut neg[..span]));
        }
    }

    /// `∂xₙ` from `∂aₙ` (in `act`) through the input transform's derivative at `xₙ`, into
    /// an output not yet written: every element of `dxn` is written unless the transform
    /// is the identity (then `∂aₙ` was written there).
    fn pre_grad_into<T: Real>(&self, xn: &[T], act: &[T], dxn: &mut [MaybeUninit<T>]) {
        match self.pre {
            Pre::Identity => {}
            Pre::ConcatElu => {
                let (g1, g2) = act.split_at(xn.len());
                wide(|| concat_elu_grad_row(xn, g1, g2, dxn));
            }
            Pre::Relu => wide(|| relu_grad_row(xn, &act[..xn.len()], dxn)),
        }
    }

    /// `∂x` image by image: `f(n, da, scratch, par)` writes all of `∂aₙ` into `da`, which is
    /// `∂xₙ` itself when `a = x` (zeroed first) and otherwise the activation scratch, from
    /// which [`Geom::pre_grad_into`] then writes `∂xₙ` without zeroing it first. (Zeroing
    /// outputs that are then written whole, here and in the gemm-path forward pass, was
    /// 3.4 % of a Glow step's `perf` samples.) `scratch` is `scratch_len` long.
    fn input_grad_images<T: Real>(
        &self,
        x: &[T],
        scratch_len: usize,
        f: impl Fn(usize, &mut [T], &mut [T], gemm::Parallelism) + Send + Sync,
    ) -> Vec<T> {
        let image = |n: usize, dxn: &mut [MaybeUninit<T>], scratch: &mut [T], par| {
            let (s, act) = scratch.split_at_mut(scratch_len);
            match self.pre {
                Pre::Identity => f(n, init_zeroed(dxn), s, par),
                Pre::ConcatElu | Pre::Relu => {
                    f(n, &mut act[..self.act_len()], s, par);
                    let xn = &x[n * self.in_len()..(n + 1) * self.in_len()];
                    self.pre_grad_into(xn, act, dxn);
                }
            }
        };
        let scratch = scratch_len + self.act_scratch();
        // SAFETY: `∂xₙ` is zeroed before `f` (the identity) or written whole by
        // `pre_grad_into`.
        unsafe { per_image_write(self.b * self.in_len(), self.in_len(), scratch, image) }
    }

    /// `∂aₙ = col2im(∂colsₙ)` inside an `f` of [`Geom::input_grad_images`]: `da` is zeroed
    /// first unless it is `∂xₙ` itself, which that helper has zeroed already.
    fn col2im_into<T: Real>(&self, dcols: &[T], da: &mut [T]) {
        if self.pre != Pre::Identity {
            da.fill(T::ZERO);
        }
        col2im(dcols, da, self);
    }

    /// For kernel column j: the output columns `[lo, hi)` that read inside the image, and the
    /// offset `j − pad` from output to input column.
    fn col_range(&self, j: usize) -> (usize, usize, isize) {
        let off = j as isize - self.pad as isize;
        let lo = (-off).max(0) as usize;
        let hi = ((self.w as isize - off).max(0) as usize).min(self.ow);
        (lo.min(hi), hi, off)
    }

    /// The convolution's input `a` of image `xn`: `xn` itself, or ConcatELU of it written
    /// into `buf` (`act_scratch()` long).
    fn activate<'a, T: Real>(&self, xn: &'a [T], buf: &'a mut [T]) -> &'a [T] {
        match self.pre {
            Pre::Identity => xn,
            Pre::ConcatElu => {
                let (pos, neg) = buf.split_at_mut(xn.len());
                wide(|| concat_elu_row(xn, pos, neg));
                buf
            }
            Pre::Relu => {
                let a = &mut buf[..xn.len()];
                wide(|| relu_row(xn, a));
                a
            }
        }
    }
}

/// `a = max(x, 0)` in one pass (a copy and then an in-place pass cost a `memcpy` of each
/// image: 3.5 % of a Glow step, `perf record`).
#[inline(always)]
pub(super) fn relu_row<T: Real>(x: &[T], a: &mut [T]) {
    for (a, &v) in a.iter_mut().zip(x) {
        *a = if v > T::ZERO { v } else { T::ZERO };
    }
}

/// `d = g·[x > 0]`.
#[inline(always)]
fn relu_grad_row<T: Real>(x: &[T], g: &[T], d: &mut [MaybeUninit<T>]) {
    for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
        d.write(if x > T::ZERO { g } else { T::ZERO });
    }
}

/// Patch matrices larger than this are built and multiplied in bands of output rows, so
/// each band stays in the L2 cache between im2col and the GEMM that packs it.
const BAND_BYTES: usize = 384 << 10;

/// Output-row bands `[y0, y1)` covering `0..oh`, each with at most [`BAND_BYTES`] of
/// patch matrix (`k` rows).
fn bands<T>(g: &Geom, k: usize) -> impl Iterator<Item = (usize, usize)> {
    let rows = (BAND_BYTES / (k * g.ow * std::mem::size_of::<T>()).max(1)).clamp(1, g.oh.max(1));
    let oh = g.oh;
    (0..oh)
        .step_by(rows)
        .map(move |y0| (y0, (y0 + rows).min(oh)))
}

/// Fills `cols` (`[K, (y1 − y0)·W']`) with the zero-padded patches of output rows
/// `[y0, y1)` of one image `x` (`[Ci, H, W]`).
fn im2col<T: Real>(x: &[T], cols: &mut [T], g: &Geom, (y0, y1): (usize, usize)) {
    im2col_rs(x, cols, (y1 - y0) * g.ow, g, (y0, y1));
}

/// [`im2col`] into rows `ohw` values apart (`ohw ≥ (y1 − y0)·W'`; several images' patch
/// matrices side by side).
fn im2col_rs<T: Real>(x: &[T], cols: &mut [T], ohw: usize, g: &Geom, (y0, y1): (usize, usize)) {
    let len = (y1 - y0) * g.ow;
    for c in 0..g.ci {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let row = (c * g.kh + i) * g.kw + j;
                let dst = &mut cols[row * ohw..][..len];
                let (lo, hi, off) = g.col_range(j);
                for y in y0..y1 {
                    let d = &mut dst[(y - y0) * g.ow..(y - y0 + 1) * g.ow];
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
    col2im_rs(dcols, g.out_hw(), dx, g);
}

/// [`col2im`] of a `dcols` whose rows are `ohw` values apart (`ohw ≥ H'W'`).
fn col2im_rs<T: Real>(dcols: &[T], ohw: usize, dx: &mut [T], g: &Geom) {
    for c in 0..g.ci {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let row = (c * g.kh + i) * g.kw + j;
                let src = &dcols[row * ohw..][..g.out_hw()];
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

/// `[Co, Ci, kh, kw]` → `[Ci, Co, kh, kw]` with both spatial axes reversed: the kernel of
/// the transposed convolution.
fn flip_transpose<T: Real>(w: &[T], g: &Geom) -> Vec<T> {
    flip_transpose_dims(w, (g.co, g.ci), g.kh * g.kw)
}

/// [`flip_transpose`] of a `[co, ci]` matrix of `khw`-tap kernels; for `khw = 1` the plain
/// transpose `Wᵀ` (`[ci, co]`, row-major).
pub(super) fn flip_transpose_dims<T: Real>(
    w: &[T],
    (co, ci): (usize, usize),
    khw: usize,
) -> Vec<T> {
    assert_eq!(w.len(), co * ci * khw, "a {co}×{ci}×{khw} kernel");
    let mut out = vec![T::ZERO; w.len()];
    for co_i in 0..co {
        for ci_i in 0..ci {
            let src = &w[(co_i * ci + ci_i) * khw..(co_i * ci + ci_i + 1) * khw];
            let dst = &mut out[(ci_i * co + co_i) * khw..(ci_i * co + co_i + 1) * khw];
            for (d, &s) in dst.iter_mut().zip(src.iter().rev()) {
                *d = s;
            }
        }
    }
    out
}

/// A row-major matrix view for [`matmul`]: element (r, c) at `ptr[r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub(super) struct Mat<T> {
    ptr: *const T,
    rs: isize,
    cs: isize,
}

impl<T> Mat<T> {
    /// Row-major `[rows, cols]` slice.
    pub(super) fn rows(s: &[T], cols: usize) -> Self {
        Self {
            ptr: s.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }

    /// This matrix transposed (the same elements, strides swapped).
    fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// The transpose of a row-major `[rows, cols]` slice.
    pub(super) fn transposed(s: &[T], cols: usize) -> Self {
        Self {
            ptr: s.as_ptr(),
            rs: 1,
            cs: cols as isize,
        }
    }
}

/// `dst (m×n, rows `dst_rs` apart) = [dst +] lhs (m×k) · rhs (k×n)`.
///
/// Where `n > m` (a convolution's output: few channels × many positions) the `gemm` crate
/// is asked for the transpose, `dstᵀ = rhsᵀ·lhsᵀ`: its register tiles then run along the
/// long side, and the operand it packs into panels is the small weight matrix rather than
/// the whole activation (or patch) matrix of each image. Interleaved A/B, batch 64,
/// 10 rounds each: Glow step 525.7 → 506.5 and 478.9 → 471.3 ms (median; faster in 7 and
/// 6 of the rounds), tutorial coupling 142.6 → 140.7 ms (6 of 10). Each orientation sums
/// every output in a fixed order, so results stay independent of the thread count.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul<T: Real>(
    dst: &mut [T],
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    lhs: Mat<T>,
    rhs: Mat<T>,
    accumulate: bool,
    par: gemm::Parallelism,
) {
    assert!(n <= dst_rs && (m == 0 || dst.len() >= (m - 1) * dst_rs + n));
    // (rows, cols, dst's column and row strides, left and right operands) of the product
    // handed to gemm: dst itself, or dstᵀ (n×m, element (j, i) at dst[i·dst_rs + j]).
    let (rows, cols, dst_cs, dst_rs, a, b) = if n > m {
        (n, m, dst_rs, 1, rhs.t(), lhs.t())
    } else {
        (m, n, 1, dst_rs, lhs, rhs)
    };
    // SAFETY: `dst` reaches every (row, col) < (m, n) (checked above), in either
    // orientation; `lhs` and `rhs` point into live slices whose extents the callers size
    // from the same geometry (m·k and k·n elements reachable through the given strides),
    // and their transposes read the same elements.
    unsafe {
        gemm::gemm(
            rows,
            cols,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        )
    }
}

/// [`matmul`] accumulating, single-threaded (timing harnesses).
#[cfg(test)]
pub(super) fn matmul_bt_gemm(
    dst: &mut [f32],
    dst_rs: usize,
    mnk: (usize, usize, usize),
    a: Mat<f32>,
    b: Mat<f32>,
) {
    matmul(dst, dst_rs, mnk, a, b, true, gemm::Parallelism::None);
}

/// Whether a product on `T` data goes to the pointwise GEMM: f32 data, run
/// single-threaded (`par` is `None`: the caller runs images in parallel), an AVX2 or
/// AVX-512 kernel set.
fn on_pointwise<T: Real>(par: gemm::Parallelism) -> bool {
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && matches!(par, gemm::Parallelism::None)
        && pointwise::available()
}

/// Two row-major operands (slice, row stride) as f32 views.
///
/// # Safety
/// `T` is f32.
unsafe fn f32_views<'a, T>(
    (a, ars): (&'a [T], usize),
    (b, brs): (&'a [T], usize),
) -> (View<'a>, View<'a>) {
    // SAFETY: T is f32 (the caller's promise): the same slice retyped.
    let f32s = |s: &'a [T]| unsafe { &*(s as *const [T] as *const [f32]) };
    (
        View {
            data: f32s(a),
            rs: ars,
        },
        View {
            data: f32s(b),
            rs: brs,
        },
    )
}

/// `dst[i·dst_rs + j] = Σₜ lhs[i·lhs_rs + t]·rhs[t·rhs_rs + j]` (`i < m`, `j < n`, `t < k`):
/// the pointwise GEMM where [`on_pointwise`], else [`matmul`]. For the 1×1
/// convolutions inside fused ops.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_rows<T: Real>(
    dst: &mut [T],
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    (lhs, lhs_rs): (&[T], usize),
    (rhs, rhs_rs): (&[T], usize),
    par: gemm::Parallelism,
) {
    if on_pointwise::<T>(par) {
        // SAFETY: T is f32 (`on_pointwise`), so these are the same slices retyped.
        let ((a, b), dst) = unsafe {
            let dst = &mut *(dst as *mut [T] as *mut [MaybeUninit<f32>]);
            (f32_views((lhs, lhs_rs), (rhs, rhs_rs)), dst)
        };
        return pointwise::product(a, b, (m, n, k), dst, dst_rs, None);
    }
    let (a, b) = (Mat::rows(lhs, lhs_rs), Mat::rows(rhs, rhs_rs));
    matmul(dst, dst_rs, (m, n, k), a, b, false, par);
}

/// `dst[i·dst_rs + j] (+)= Σₜ lhs[i·lhs_rs + t]·rhs[j·rhs_rs + t]` (`i < m`, `j < n`,
/// `t < k`; added to `dst` when `accumulate`): a weight gradient's `G·aᵀ`, with `a` (or
/// the patch matrix) read in its own row-major layout. The pointwise GEMM where
/// [`on_pointwise`], else [`matmul`].
///
/// `timing::conv_op_timings`, two threads, batch 64, against `gemm`: ∂W of 192 → 192 1×1
/// at 14×14 106–123 against 73–94 GFLOP/s, of 2 → 192 3×3 at 14×14 48 against 38–45; the
/// gated op's 64 → 64 at 28×28 73–83 against 76–80 (`pointwise_rate`, one core, in cache:
/// 79 against 58).
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_bt<T: Real>(
    dst: &mut [T],
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    (lhs, lhs_rs): (&[T], usize),
    (rhs, rhs_rs): (&[T], usize),
    accumulate: bool,
    par: gemm::Parallelism,
) {
    if on_pointwise::<T>(par) {
        // SAFETY: T is f32 (`on_pointwise`), so these are the same slices retyped.
        let ((a, bt), dst) = unsafe {
            let dst = &mut *(dst as *mut [T] as *mut [f32]);
            (f32_views((lhs, lhs_rs), (rhs, rhs_rs)), dst)
        };
        return pointwise::product_bt(a, bt, (m, n, k), dst, dst_rs, accumulate);
    }
    let (a, b) = (Mat::rows(lhs, lhs_rs), Mat::transposed(rhs, rhs_rs));
    matmul(dst, dst_rs, (m, n, k), a, b, accumulate, par);
}

fn conv_forward<T: Real>(x: &[T], w: &[T], b: &[T], g: &Geom) -> Vec<T> {
    let (k, ohw) = (g.k(), g.out_hw());
    let cols_len = if g.pointwise() { 0 } else { k * ohw };
    let image = |n: usize, y: &mut [MaybeUninit<T>], scratch: &mut [T], par| {
        // The bias, which the GEMMs then add to: each output written once before them
        // rather than zeroed and then filled.
        for (co, row) in y.chunks_mut(ohw).enumerate() {
            for v in row {
                v.write(b[co]);
            }
        }
        // SAFETY: every element was written just above.
        let y = unsafe { assume_init_mut(y) };
        let (act, cols) = scratch.split_at_mut(g.act_scratch());
        let a = g.activate(&x[n * g.in_len()..(n + 1) * g.in_len()], act);
        if g.pointwise() {
            let (lhs, rhs) = (Mat::rows(w, k), Mat::rows(a, ohw));
            return matmul(y, ohw, (g.co, ohw, k), lhs, rhs, true, par);
        }
        for (y0, y1) in bands::<T>(g, k) {
            let len = (y1 - y0) * g.ow;
            im2col(a, cols, g, (y0, y1));
            let (lhs, rhs) = (Mat::rows(w, k), Mat::rows(cols, len));
            matmul(
                &mut y[y0 * g.ow..],
                ohw,
                (g.co, len, k),
                lhs,
                rhs,
                true,
                par,
            );
        }
    };
    let (len, chunk) = (g.b * g.co * ohw, g.co * ohw);
    // SAFETY: `image` writes every element of its chunk (the bias) first.
    unsafe { per_image_write(len, chunk, g.act_scratch() + cols_len, image) }
}

/// [`conv_forward`] by the direct kernels: per image, padded planes of `a`, then
/// `W ⋆ planes` in padded-width layout, whose real columns get the bias.
fn forward_direct(x: &[f32], w: &[f32], b: &[f32], g: &Geom) -> Vec<f32> {
    let (p, ohw) = (g.planes(), g.out_hw());
    let (offs, wk) = (p.offsets(), Packed::new(w, g.co, g.k(), &p));
    let (plen, rs, wp) = (p.len(), p.out_stride(), p.wp());
    let out = per_image_out(
        g.b * g.co * ohw,
        g.co * ohw,
        plen + g.co * rs,
        |n, y, scratch, _| {
            let (planes, tmp) = scratch.split_at_mut(plen);
            g.fill_planes(&p, &x[n * g.in_len()..(n + 1) * g.in_len()], planes);
            direct::conv(planes, &p, &offs, &wk, tmp);
            // Output row i = (co, r) is padded-width row r of channel co, plus its bias.
            let at = |i: usize| (i * g.ow, (i / g.oh) * rs + (i % g.oh) * wp, b[i / g.oh]);
            direct::copy_rows(y, tmp, g.co * g.oh, g.ow, at, false);
        },
    );
    out
}

/// `gt[i·cs + c] = gn[c·ohw + i]`: one image's output gradient `[Co][ohw]` transposed
/// into rows of `cs` channels (columns past Co untouched). Channels go in blocks of 8: the
/// block's 8 planes are read as sequential streams and each row of `gt` gets 8 consecutive
/// values. (Runs of 16 positions of all Co planes at once — 32 read streams at Co = 32 —
/// defeated the AMD machine's prefetcher: 2.6 ns per element, 5 % of a tutorial coupling
/// step in `perf`.)
fn transpose_grad(gn: &[f32], ohw: usize, cs: usize, gt: &mut [f32]) {
    const BLOCK: usize = 8;
    for (b, planes) in gn.chunks(BLOCK * ohw).enumerate() {
        let c0 = b * BLOCK;
        if planes.len() == BLOCK * ohw {
            let p: [&[f32]; BLOCK] = std::array::from_fn(|k| &planes[k * ohw..(k + 1) * ohw]);
            for (i, row) in gt.chunks_exact_mut(cs).take(ohw).enumerate() {
                for (d, pk) in row[c0..c0 + BLOCK].iter_mut().zip(&p) {
                    *d = pk[i];
                }
            }
        } else {
            for (k, plane) in planes.chunks_exact(ohw).enumerate() {
                for (row, &v) in gt.chunks_exact_mut(cs).zip(plane) {
                    row[c0 + k] = v;
                }
            }
        }
    }
}

/// [`conv_input_grad`] by the direct kernels: `∂a` is the forward kernel run on the padded
/// planes of `Gₙ` (`t`, from [`Geom::transposed_planes`]) with the flipped, transposed
/// weights.
fn input_grad_direct(gy: &[f32], w: &[f32], x: &[f32], g: &Geom, t: Planes) -> Vec<f32> {
    let ohw = g.out_hw();
    let wt = Packed::new(&flip_transpose(w, g), g.ci, g.co * g.kh * g.kw, &t);
    let offs = t.offsets();
    let (plen, rs, wpt) = (t.len(), t.out_stride(), t.wp());
    debug_assert_eq!((t.oh(), t.ow()), (g.h, g.w));
    g.input_grad_images(x, plen + g.ci * rs, |n, da, scratch, _| {
        let (planes, tmp) = scratch.split_at_mut(plen);
        let gn = &gy[n * g.co * ohw..(n + 1) * g.co * ohw];
        t.fill(planes, gn, false);
        direct::conv(planes, &t, &offs, &wt, tmp);
        // ∂a of input pixel (c, y, x) is tmp[c·rs + y·Wpt + x], gathered into `da` (∂x itself
        // or, through ConcatELU, scratch, so elu′ runs over whole vectors).
        let at = |i: usize| (i * g.w, (i / g.h) * rs + (i % g.h) * wpt, 0.0);
        direct::copy_rows(da, tmp, g.ci * g.h, g.w, at, false);
    })
}

/// [`conv_weight_grad`] by the direct kernels: per image, the padded planes of `a` and
/// `Gₙ` in padded-width layout (zero in the dropped columns), summed over fixed groups;
/// `[∂W; ∂b]`.
fn weight_grad_direct(x: &[f32], gy: &[f32], g: &Geom) -> Vec<f32> {
    let (p, ohw, k) = (g.planes(), g.out_hw(), g.k());
    let offs = p.offsets();
    if g.co >= direct::CO_LANES {
        // Vectorised over output channels: ∂Wᵀ (`[K][cs]`) from Gₙᵀ (`[H'W'][cs]`).
        let cs = g.co.next_multiple_of(direct::CO_LANES);
        let plen = p.len();
        let sums = super::reduce_images(g.b, k * cs + g.co, |range| {
            let mut sums = vec![0.0; k * cs + g.co];
            let (dwt, db) = sums.split_at_mut(k * cs);
            f32::with_scratch(plen + ohw * cs, |scratch| {
                let (planes, gt) = scratch.split_at_mut(plen);
                // Channels past Co stay zero; the rest is rewritten per image.
                gt.fill(0.0);
                for n in range {
                    g.fill_planes(&p, &x[n * g.in_len()..(n + 1) * g.in_len()], planes);
                    let gn = &gy[n * g.co * ohw..(n + 1) * g.co * ohw];
                    transpose_grad(gn, ohw, cs, gt);
                    add_bias_grad(db, gn, ohw);
                    direct::weight_grad_t(planes, &p, &offs, gt, dwt);
                }
            });
            sums
        });
        let (dwt, db) = sums.split_at(k * cs);
        let mut out = vec![0.0; g.co * k + g.co];
        let (dw, out_db) = out.split_at_mut(g.co * k);
        for (c, row) in dw.chunks_exact_mut(k).enumerate() {
            for (t, d) in row.iter_mut().enumerate() {
                *d = dwt[t * cs + c];
            }
        }
        out_db.copy_from_slice(db);
        return out;
    }
    // Few output channels: vectorised over positions, the whole group of images at once
    // (one horizontal sum per tile and group).
    let (plen, gl, wp) = (p.len(), g.co * p.grad_stride(), p.wp());
    super::reduce_images(g.b, g.co * k + g.co, |range| {
        let mut out = vec![0.0; g.co * k + g.co];
        let (dw, db) = out.split_at_mut(g.co * k);
        let imgs = range.len();
        f32::with_scratch(imgs * (plen + gl), |scratch| {
            let (planes, gz) = scratch.split_at_mut(imgs * plen);
            // Only real output pixels are written below; the rest stays zero.
            gz.fill(0.0);
            for (i, n) in range.enumerate() {
                let xn = &x[n * g.in_len()..(n + 1) * g.in_len()];
                g.fill_planes(&p, xn, &mut planes[i * plen..(i + 1) * plen]);
                let gn = &gy[n * g.co * ohw..(n + 1) * g.co * ohw];
                let at = |r: usize| {
                    let d = i * gl + (r / g.oh) * p.grad_stride() + (r % g.oh) * wp;
                    (d, r * g.ow, 0.0)
                };
                direct::copy_rows(gz, gn, g.co * g.oh, g.ow, at, false);
                add_bias_grad(db, gn, ohw);
            }
            direct::weight_grad(planes, &p, &offs, gz, imgs, dw);
        });
        out
    })
}

/// [`forward_f32`] by the pointwise GEMM, written straight into the output from the
/// bias: per image `yₙ = W·aₙ + b` for a 1×1 kernel, else `W·colsₙ + b` band by band over
/// the patch matrix (module `pointwise`).
fn forward_pointwise(x: &[f32], w: &[f32], b: &[f32], g: &Geom) -> Vec<f32> {
    let (k, ohw) = (g.k(), g.out_hw());
    let cols_len = if g.pointwise() { 0 } else { k * ohw };
    let wv = View { data: w, rs: k };
    let image = |n: usize, y: &mut [MaybeUninit<f32>], scratch: &mut [f32], _| {
        let (act, cols) = scratch.split_at_mut(g.act_scratch());
        let a = g.activate(&x[n * g.in_len()..(n + 1) * g.in_len()], act);
        if g.pointwise() {
            let av = View { data: a, rs: ohw };
            return pointwise::product(wv, av, (g.co, ohw, k), y, ohw, Some(b));
        }
        for (y0, y1) in bands::<f32>(g, k) {
            let len = (y1 - y0) * g.ow;
            im2col(a, cols, g, (y0, y1));
            let cv = View {
                data: cols,
                rs: len,
            };
            let yb = &mut y[y0 * g.ow..];
            pointwise::product(wv, cv, (g.co, len, k), yb, ohw, Some(b));
        }
    };
    let (len, chunk) = (g.b * g.co * ohw, g.co * ohw);
    // SAFETY: the products write every element of `y` (Co rows of H'·W', band by band).
    unsafe { per_image_write(len, chunk, g.act_scratch() + cols_len, image) }
}

/// [`input_grad_f32`] by the pointwise GEMM: `∂aₙ = Wᵀ·Gₙ` for a 1×1 kernel, else
/// `∂colsₙ = Wᵀ·Gₙ` added back by [`col2im`]; then through the input transform's
/// derivative.
fn input_grad_pointwise(gy: &[f32], w: &[f32], x: &[f32], g: &Geom) -> Vec<f32> {
    let (k, ohw) = (g.k(), g.out_hw());
    // `Wᵀ` (`[K, Co]`; for a 1×1 kernel also the transposed convolution's kernel).
    let wt = flip_transpose_dims(w, (g.co, k), 1);
    let wv = View {
        data: &wt,
        rs: g.co,
    };
    let cols_len = if g.pointwise() { 0 } else { k * ohw };
    g.input_grad_images(x, cols_len, |n, da, cols, _| {
        let gv = View {
            data: &gy[n * g.co * ohw..(n + 1) * g.co * ohw],
            rs: ohw,
        };
        let dst = if g.pointwise() { &mut *da } else { &mut *cols };
        // SAFETY: `product` writes f32 values only.
        pointwise::product(wv, gv, (k, ohw, g.co), unsafe { as_uninit(dst) }, ohw, None);
        if !g.pointwise() {
            g.col2im_into(cols, da);
        }
    })
}

/// Taps (`K = Ci·kh·kw`) below which the direct kernels lose to a GEMM on the patch
/// matrix, forward and for ∂W.
const DIRECT_MIN_K: usize = 64;

/// Rows (`Co·kh·kw`) up to which the few-output path wins.
const TAPS_MAX_M: usize = 72;

/// Output channels (rows of the transformed GEMM) below which the Winograd path loses to
/// the direct kernels.
const WINOGRAD_MIN_M: usize = 16;
/// Input channels (the transformed GEMM's inner dimension is 3× this) below which it loses.
const WINOGRAD_MIN_K: usize = 16;
/// GEMM positions per channel below which it loses.
const WINOGRAD_MIN_Q: usize = 48;

/// [`forward_f32`] by row Winograd on the tiles `tl` (module `winograd`): per image, the
/// transform `V` of `a`, the `n + 2` GEMMs `M[ξ] = U[ξ] ⋆ V[ξ]` and the output transform
/// plus bias.
fn forward_winograd(x: &[f32], w: &[f32], b: &[f32], g: &Geom, tl: Tiles) -> Vec<f32> {
    let u = winograd::Weights::new(w, g.co, g.ci, &tl);
    let (vl, ml) = (tl.v_len(g.ci), tl.m_len(g.co));
    let image = |n: usize, y: &mut [MaybeUninit<f32>], scratch: &mut [f32], _| {
        let (v, m) = scratch.split_at_mut(vl);
        let xn = &x[n * g.in_len()..(n + 1) * g.in_len()];
        winograd::input_transform(xn, g.pre, &tl, v);
        winograd::multiply(v, &u, &tl, m);
        winograd::output_transform(m, g.co, &tl, Some(b), y);
    };
    let (len, chunk) = (g.b * g.co * g.out_hw(), g.co * g.out_hw());
    // SAFETY: `output_transform` writes every element of `y`.
    unsafe { per_image_write(len, chunk, vl + ml, image) }
}

/// [`input_grad_f32`] by Winograd: the forward computation on `Gₙ` with the flipped,
/// transposed weights (a padding-1 3×3 convolution again), then ∂x through the input
/// transform's derivative.
fn input_grad_winograd(gy: &[f32], w: &[f32], x: &[f32], g: &Geom, tl: Tiles) -> Vec<f32> {
    let ohw = g.out_hw();
    let u = winograd::Weights::new(&flip_transpose(w, g), g.ci, g.co, &tl);
    let (vl, ml) = (tl.v_len(g.co), tl.m_len(g.ci));
    g.input_grad_images(x, vl + ml, |n, da, scratch, _| {
        let (v, m) = scratch.split_at_mut(vl);
        let gn = &gy[n * g.co * ohw..(n + 1) * g.co * ohw];
        winograd::input_transform(gn, Pre::Identity, &tl, v);
        winograd::multiply(v, &u, &tl, m);
        // SAFETY: `output_transform` writes f32 values only.
        winograd::output_transform(m, g.ci, &tl, None, unsafe { as_uninit(da) });
    })
}

/// [`weight_grad_f32`] by Winograd: per image `V` (as in the forward pass) and `Ĝ = A·∂y`
/// from `Gₙᵀ`, `∂U[ξ] += Ĝ[ξ] ⋆ V[ξ]` over fixed image groups, then `∂w = Σ_ξ G[ξ]·∂U[ξ]`;
/// `[∂W; ∂b]`.
fn weight_grad_winograd(x: &[f32], gy: &[f32], g: &Geom, tl: Tiles) -> Vec<f32> {
    let ohw = g.out_hw();
    let cs = g.co.next_multiple_of(direct::CO_LANES);
    let (vl, gl) = (tl.v_len(g.ci), tl.gh_len(cs));
    let ul = tl.xi() * 3 * g.ci * cs;
    let sums = super::reduce_images(g.b, ul + g.co, |range| {
        let mut sums = vec![0.0; ul + g.co];
        let (du, db) = sums.split_at_mut(ul);
        f32::with_scratch(vl + ohw * cs + gl, |scratch| {
            let (v, rest) = scratch.split_at_mut(vl);
            let (gt, gh) = rest.split_at_mut(ohw * cs);
            // Channels past Co stay zero; the rest is rewritten per image.
            gt.fill(0.0);
            for n in range {
                let xn = &x[n * g.in_len()..(n + 1) * g.in_len()];
                winograd::input_transform(xn, g.pre, &tl, v);
                let gn = &gy[n * g.co * ohw..(n + 1) * g.co * ohw];
                transpose_grad(gn, ohw, cs, gt);
                add_bias_grad(db, gn, ohw);
                winograd::grad_transform(gt, cs, &tl, gh);
                winograd::weight_grad(v, g.ci, gh, cs, &tl, du);
            }
        });
        sums
    });
    let mut out = winograd::weights_grad(&sums[..ul], g.co, g.ci, cs, &tl);
    out.extend_from_slice(&sums[ul..]);
    out
}

/// `∂x`; `x` is read only through ConcatELU's derivative.
fn conv_input_grad<T: Real>(gy: &[T], w: &[T], x: &[T], g: &Geom) -> Vec<T> {
    let (k, ohw, hw) = (g.k(), g.out_hw(), g.h * g.w);
    // The transposed convolution's geometry and kernel, where it applies.
    let tw = g.transposed().map(|t| (t, flip_transpose(w, g)));
    // Per image: the patch matrix (of G for the transposed convolution, of ∂a for col2im),
    // then ∂a when it is not ∂x itself.
    let cols_len = match &tw {
        Some((t, _)) => t.k() * hw,
        None if g.pointwise() => 0,
        None => k * ohw,
    };
    g.input_grad_images(x, cols_len, |n, da, cols, par| {
        let gn = &gy[n * g.co * ohw..(n + 1) * g.co * ohw];
        // `dst = Wᵀ·Gₙ` (`[K, H'W']`): ∂a itself for 1×1, else its patch matrix.
        let wt_g = |dst: &mut [T]| {
            let (lhs, rhs) = (Mat::transposed(w, k), Mat::rows(gn, ohw));
            matmul(dst, ohw, (k, ohw, g.co), lhs, rhs, false, par);
        };
        match &tw {
            Some((t, wt)) => {
                for (y0, y1) in bands::<T>(t, t.k()) {
                    let len = (y1 - y0) * t.ow;
                    im2col(gn, cols, t, (y0, y1));
                    let (lhs, rhs) = (Mat::rows(wt, t.k()), Mat::rows(cols, len));
                    let dst = &mut da[y0 * t.ow..];
                    matmul(dst, hw, (g.ci, len, t.k()), lhs, rhs, false, par);
                }
            }
            None if g.pointwise() => wt_g(da),
            None => {
                wt_g(cols);
                g.col2im_into(cols, da);
            }
        }
    })
}

/// `[∂W; ∂b]` (`Co·K + Co` values) by im2col and GEMM, per fixed group of images.
fn conv_weight_grad<T: Real>(x: &[T], gy: &[T], g: &Geom) -> Vec<T> {
    let (k, ohw) = (g.k(), g.out_hw());
    // Each task accumulates Σ Gₙ·colsₙᵀ over a fixed group of images into its own buffer;
    // the groups are added in order (deterministic rounding).
    let part = |range: std::ops::Range<usize>, par: gemm::Parallelism| {
        let mut out = vec![T::ZERO; g.co * k + g.co];
        let (dw, db) = out.split_at_mut(g.co * k);
        let cols_len = if g.pointwise() { 0 } else { k * ohw };
        T::with_scratch(g.act_scratch() + cols_len, |scratch| {
            let (act, cols) = scratch.split_at_mut(g.act_scratch());
            for (i, n) in range.enumerate() {
                let a = g.activate(&x[n * g.in_len()..(n + 1) * g.in_len()], act);
                let gn = &gy[n * g.co * ohw..(n + 1) * g.co * ohw];
                add_bias_grad(db, gn, ohw);
                if g.pointwise() {
                    matmul_bt(dw, k, (g.co, k, ohw), (gn, ohw), (a, ohw), i > 0, par);
                    continue;
                }
                for (b, (y0, y1)) in bands::<T>(g, k).enumerate() {
                    let len = (y1 - y0) * g.ow;
                    im2col(a, cols, g, (y0, y1));
                    let (lhs, rhs) = ((&gn[y0 * g.ow..], ohw), (&cols[..], len));
                    matmul_bt(dw, k, (g.co, k, len), lhs, rhs, i > 0 || b > 0, par);
                }
            }
        });
        out
    };
    // Groups run in parallel when there are enough images; otherwise the GEMM gets the
    // threads. Either way the same groups are summed in the same order.
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && g.b < threads {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    super::reduce_images(g.b, g.co * k + g.co, |r| part(r, par))
}

/// `Σ v` over 8 interleaved partial sums (vectorisable; a fixed order, so deterministic).
fn lane_sum<T: Real>(v: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    let mut s = T::ZERO;
    for &x in chunks.remainder() {
        s += x;
    }
    acc.iter().fold(s, |t, &a| t + a)
}

/// `db[co] += Σₚ Gₙ[co, p]` for one image's output gradient `gn` (`[Co][ohw]`). The weight
/// gradients call it per image inside their fixed image groups, so `∂b` is summed in those
/// groups, in order, while `Gₙ` is in cache (deterministic for any thread count).
pub(super) fn add_bias_grad<T: Real>(db: &mut [T], gn: &[T], ohw: usize) {
    for (acc, row) in db.iter_mut().zip(gn.chunks_exact(ohw)) {
        *acc += wide(|| lane_sum(row));
    }
}

/// `y = W ⋆ pre(x) + b` on f32 data, by the faster path for this geometry.
fn forward_f32(x: &[f32], w: &[f32], b: &[f32], g: &Geom) -> Vec<f32> {
    if g.pointwise_gemm() {
        forward_pointwise(x, w, b, g)
    } else if g.taps(None) {
        taps::forward_taps(x, w, b, g)
    } else if g.winograd(None) {
        forward_winograd(x, w, b, g, Tiles::new(g.h, g.w))
    } else if g.direct(None) {
        forward_direct(x, w, b, g)
    } else {
        conv_forward(x, w, b, g)
    }
}

/// `∂x` on f32 data, by the faster path for this geometry.
fn input_grad_f32(gy: &[f32], w: &[f32], x: &[f32], g: &Geom) -> Vec<f32> {
    if g.pointwise_gemm() {
        return input_grad_pointwise(gy, w, x, g);
    }
    match g.transposed_planes() {
        Some(_) if g.winograd(Some(Grad::Input)) => {
            input_grad_winograd(gy, w, x, g, Tiles::new(g.h, g.w))
        }
        Some(t) if g.direct(Some(Grad::Input)) => input_grad_direct(gy, w, x, g, t),
        _ => conv_input_grad(gy, w, x, g),
    }
}

/// `[∂W; ∂b]` on f32 data, by the faster path for this geometry.
fn weight_grad_f32(x: &[f32], gy: &[f32], g: &Geom) -> Vec<f32> {
    if g.taps(Some(Grad::Weight)) {
        taps::weight_grad_taps(x, gy, g)
    } else if g.winograd(Some(Grad::Weight)) {
        weight_grad_winograd(x, gy, g, Tiles::new(g.h, g.w))
    } else if g.direct(Some(Grad::Weight)) {
        weight_grad_direct(x, gy, g)
    } else {
        conv_weight_grad(x, gy, g)
    }
}

/// Forward op: `(x, w, b) → y`.
struct Conv2dOp {
    pad: usize,
    pre: Pre,
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
        let g = Geom::new(l1.dims(), l2.dims(), self.pad, self.pre)?;
        if l3.dims() != [g.co] {
            return Err(candle_core::Error::Msg(format!(
                "conv2d kernel: bias shape {:?}, expected [{}]",
                l3.dims(),
                g.co
            )));
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                let (x, w, b) = (slice(x, l1)?, slice(w, l2)?, slice(b, l3)?);
                CpuStorage::F32(forward_f32(x, w, b, &g))
            }
            _ => crate::kernels::dispatch!("conv2d", (s1, s2, s3), |x, w, b| conv_forward(
                slice(x, l1)?,
                slice(w, l2)?,
                slice(b, l3)?,
                &g
            ))?,
        };
        Ok((out, Shape::from((g.b, g.co, g.oh, g.ow))))
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
        let grad = |what: Grad| {
            x.apply_op3_no_bwd(
                w,
                &gy,
                &GradOp {
                    pad: self.pad,
                    pre: self.pre,
                    what,
                },
            )
        };
        // ∂W and ∂b come from one pass (`[∂W; ∂b]`), each then with storage of its own.
        let wb = grad(Grad::Weight)?;
        let n = w.elem_count();
        let dw = wb.narrow(0, 0, n)?.force_contiguous()?.reshape(w.shape())?;
        let db = wb
            .narrow(0, n, wb.elem_count() - n)?
            .force_contiguous()?
            .reshape(b.shape())?;
        Ok((Some(grad(Grad::Input)?), Some(dw), Some(db)))
    }
}

/// Which gradient a [`GradOp`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grad {
    Input,
    /// `[∂W; ∂b]`, flat: the bias gradient is summed while each `Gₙ` is in cache for ∂W.
    Weight,
}

/// `(x, w, G) → ∂x | [∂w; ∂b]`.
struct GradOp {
    pad: usize,
    pre: Pre,
    what: Grad,
}

impl CustomOp3 for GradOp {
    fn name(&self) -> &'static str {
        "flowlab-conv2d-grad"
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
        let g = Geom::new(l1.dims(), l2.dims(), self.pad, self.pre)?;
        g.check_grad(l3.dims(), "gradient")?;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(gy)) => {
                let (x, w, gy) = (slice(x, l1)?, slice(w, l2)?, slice(gy, l3)?);
                CpuStorage::F32(match self.what {
                    Grad::Input => input_grad_f32(gy, w, x, &g),
                    Grad::Weight => weight_grad_f32(x, gy, &g),
                })
            }
            _ => crate::kernels::dispatch!("conv2d grad", (s1, s2, s3), |x, w, gy| {
                let (x, w, gy) = (slice(x, l1)?, slice(w, l2)?, slice(gy, l3)?);
                match self.what {
                    Grad::Input => conv_input_grad(gy, w, x, &g),
                    Grad::Weight => conv_weight_grad(x, gy, &g),
                }
            })?,
        };
        let shape = match self.what {
            Grad::Input => l1.shape().clone(),
            Grad::Weight => Shape::from(l2.shape().elem_count() + g.co),
        };
        Ok((out, shape))
    }
}

fn apply(x: &Tensor, w: &Tensor, b: &Tensor, pad: usize, pre: Pre) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Conv2dOp { pad, pre })?)
}

/// `[B, Ci, H, W] ⊛ [Co, Ci, kh, kw] + b[Co]`, stride 1, zero padding `pad` on every side.
pub fn conv2d(x: &Tensor, w: &Tensor, b: &Tensor, pad: usize) -> Result<Tensor> {
    if !super::use_fast(&[x, w, b]) {
        return super::reference::conv2d(x, w, b, pad);
    }
    apply(x, w, b, pad, Pre::Identity)
}

/// `concat_elu(x) ⊛ w + b`: x `[B, C, H, W]`, w `[Co, 2C, kh, kw]`, b `[Co]`, stride 1,
/// zero padding `pad`. Equal to `conv2d(concat_elu(x), w, b, pad)` without materialising
/// the `[B, 2C, H, W]` activation (nor its gradient).
pub fn conv2d_concat_elu(x: &Tensor, w: &Tensor, b: &Tensor, pad: usize) -> Result<Tensor> {
    if !super::use_fast(&[x, w, b]) {
        return super::reference::conv2d(&super::reference::concat_elu(x)?, w, b, pad);
    }
    apply(x, w, b, pad, Pre::ConcatElu)
}

/// `relu(x) ⊛ w + b`: x `[B, C, H, W]`, w `[Co, C, kh, kw]`, b `[Co]`, stride 1, zero
/// padding `pad`. Equal to `conv2d(relu(x), w, b, pad)` without storing `relu(x)` (nor its
/// gradient); the gradient passes where `x > 0`.
pub fn conv2d_relu(x: &Tensor, w: &Tensor, b: &Tensor, pad: usize) -> Result<Tensor> {
    if !super::use_fast(&[x, w, b]) {
        return super::reference::conv2d(&x.relu()?, w, b, pad);
    }
    apply(x, w, b, pad, Pre::Relu)
}

#[cfg(test)]
mod tests {
    use super::super::randn;
    use super::*;
    use candle_core::DType;

    fn check(x: &[usize], w: &[usize], pad: usize, dtype: DType, tol: f64) {
        let inputs = [
            randn(1, x, 1.0, dtype),
            randn(2, w, 1.0, dtype),
            randn(3, &[w[0]], 1.0, dtype),
        ];
        super::super::check_against_reference(&inputs, |t| conv2d(&t[0], &t[1], &t[2], pad), tol);
        // The same weights behind ReLU.
        super::super::check_against_reference(
            &inputs,
            |t| conv2d_relu(&t[0], &t[1], &t[2], pad),
            tol,
        );
        // The same weights behind ConcatELU of half the channels (odd channel counts keep
        // whole-plane ConcatELU halves honest).
        if w[1].is_multiple_of(2) {
            let xh = randn(4, &[x[0], x[1] / 2, x[2], x[3]], 1.0, dtype);
            let inputs = [xh, inputs[1].clone(), inputs[2].clone()];
            super::super::check_against_reference(
                &inputs,
                |t| conv2d_concat_elu(&t[0], &t[1], &t[2], pad),
                tol,
            );
        }
    }

    #[test]
    fn transpose_grad_moves_every_value_and_leaves_the_padding_columns() {
        // Full 8-channel blocks and a partial one; rows wider than the channels.
        for (co, ohw, cs) in [(8, 3, 16), (11, 5, 16), (19, 7, 32), (3, 1, 16)] {
            let gn: Vec<f32> = (0..co * ohw).map(|v| v as f32).collect();
            let mut gt = vec![-1.0; ohw * cs];
            transpose_grad(&gn, ohw, cs, &mut gt);
            for i in 0..ohw {
                for c in 0..cs {
                    let want = if c < co { gn[c * ohw + i] } else { -1.0 };
                    assert_eq!(gt[i * cs + c], want, "co {co}, ohw {ohw}: ({i}, {c})");
                }
            }
        }
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
        // ConcatELU of 3 channels into a 3×3 and a 1×1 conv; a padding the transposed
        // input gradient cannot use (p ≥ kh), through col2im.
        check(&[3, 6, 5, 4], &[2, 6, 3, 3], 1, DType::F64, 1e-12);
        check(&[3, 6, 5, 4], &[4, 6, 1, 1], 0, DType::F64, 1e-12);
        check(&[2, 2, 3, 3], &[2, 2, 1, 1], 1, DType::F64, 1e-12);
    }

    /// One path's forward pass, ∂x and `[∂W; ∂b]` against the im2col + GEMM path (in f64) on
    /// random f32 data of geometry `g`, each to within `tol` of its largest magnitude (or
    /// of 1).
    fn assert_matches_gemm_path(
        g: &Geom,
        tol: f32,
        fwd: impl Fn(&[f32], &[f32], &[f32], &Geom) -> Vec<f32>,
        dx: impl Fn(&[f32], &[f32], &[f32], &Geom) -> Vec<f32>,
        dw: impl Fn(&[f32], &[f32], &Geom) -> Vec<f32>,
    ) {
        let vals = |n: usize, seed: u64| randn(seed, &[n], 1.0, DType::F32).to_vec1().unwrap();
        let (x, w, b) = (
            vals(g.b * g.in_len(), 1),
            vals(g.co * g.k(), 2),
            vals(g.co, 3),
        );
        let gy = vals(g.b * g.co * g.out_hw(), 4);
        let close = |a: &[f32], e: &[f32], what: &str| {
            assert_eq!(a.len(), e.len());
            let scale = e.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let err = a
                .iter()
                .zip(e)
                .fold(0.0f32, |m, (a, e)| m.max((a - e).abs()));
            assert!(
                err <= tol * scale,
                "{what} {g:?}: error {err}, scale {scale}"
            );
        };
        // The reference in f64, so on the `gemm` crate whatever the f32 paths use.
        let f64s = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        let (x64, w64, b64, gy64) = (f64s(&x), f64s(&w), f64s(&b), f64s(&gy));
        let f32s = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
        let y = f32s(conv_forward(&x64, &w64, &b64, g));
        let dxr = f32s(conv_input_grad(&gy64, &w64, &x64, g));
        let dwr = f32s(conv_weight_grad(&x64, &gy64, g));
        close(&fwd(&x, &w, &b, g), &y, "y");
        close(&dx(&gy, &w, &x, g), &dxr, "∂x");
        close(&dw(&x, &gy, g), &dwr, "∂W");
    }

    #[test]
    fn direct_kernels_match_the_gemm_path() {
        if !direct::available() {
            eprintln!("skipped: neither AVX-512F nor AVX2");
            return;
        }
        // Odd sizes, every forward block size (Co 1..8 and 8 + remainder), every
        // few-channel weight-gradient tile (Co 1..10: blocks of 4, 3, 2, 1), Co below, at and
        // above 16 (both weight-gradient kernels), 3×3 and other kernels, paddings 0..2, all
        // three input activations.
        for (b, cx, h, w, co, k, pad, pre) in [
            (3, 3, 5, 7, 13, 3, 1, Pre::Identity),
            (2, 4, 7, 3, 2, 3, 1, Pre::ConcatElu),
            (2, 3, 6, 6, 17, 3, 1, Pre::ConcatElu),
            (3, 2, 5, 5, 3, 5, 2, Pre::Identity),
            (2, 5, 4, 9, 33, 3, 0, Pre::ConcatElu),
            (2, 3, 6, 5, 7, 2, 1, Pre::Identity),
            (2, 2, 1, 1, 20, 3, 1, Pre::ConcatElu),
            (2, 1, 9, 9, 32, 3, 1, Pre::Identity),
            (2, 8, 6, 5, 64, 3, 1, Pre::ConcatElu),
            (2, 3, 4, 4, 16, 5, 1, Pre::Identity),
            (3, 5, 7, 6, 19, 3, 1, Pre::Relu),
            (2, 4, 5, 5, 3, 3, 1, Pre::Relu),
            (3, 4, 6, 7, 4, 3, 1, Pre::Relu),
            (2, 3, 5, 6, 6, 3, 1, Pre::ConcatElu),
            (4, 2, 7, 7, 8, 3, 1, Pre::Relu),
            (2, 3, 5, 4, 10, 3, 1, Pre::Identity),
            (3, 2, 4, 6, 5, 3, 1, Pre::Identity),
            (2, 2, 3, 5, 1, 3, 1, Pre::ConcatElu),
        ] {
            let g = Geom::new(&[b, cx, h, w], &[co, pre.channels(cx), k, k], pad, pre).unwrap();
            let t = g.transposed_planes().unwrap();
            let dx = |gy: &[f32], w: &[f32], x: &[f32], g: &Geom| input_grad_direct(gy, w, x, g, t);
            assert_matches_gemm_path(&g, 1e-5, forward_direct, dx, weight_grad_direct);
        }
    }

    #[test]
    fn pointwise_kernels_match_the_gemm_path() {
        if !pointwise::available() {
            eprintln!("skipped: neither the AVX2 nor the AVX-512 kernel set");
            return;
        }
        // 1×1 maps and odd ones (last panels of 1, 4, 8 and 15 positions, whole panels only),
        // Co and Ci below, at and past the 6-row block, all three input activations; then
        // few-tap spatial kernels on their patch matrices (3×3 with 1–4 input channels,
        // other sizes and paddings, K from 2 to 63).
        for (b, cx, h, w, co, k, pad, pre) in [
            (2, 3, 1, 1, 5, 1, 0, Pre::Identity),
            (3, 7, 7, 7, 13, 1, 0, Pre::Relu),
            (2, 5, 3, 5, 6, 1, 0, Pre::ConcatElu),
            (2, 16, 14, 14, 7, 1, 0, Pre::ConcatElu),
            (2, 6, 4, 6, 1, 1, 0, Pre::Identity),
            (2, 20, 2, 8, 20, 1, 0, Pre::Relu),
            (2, 4, 5, 19, 12, 1, 0, Pre::Identity),
            (2, 2, 14, 14, 19, 3, 1, Pre::Identity),
            (3, 4, 7, 7, 25, 3, 1, Pre::Identity),
            (2, 1, 9, 11, 32, 3, 1, Pre::Identity),
            (2, 1, 5, 6, 7, 3, 1, Pre::ConcatElu),
            (2, 3, 6, 5, 8, 3, 1, Pre::Relu),
            (2, 2, 6, 7, 9, 5, 2, Pre::Identity),
            (2, 2, 5, 6, 3, 2, 0, Pre::Relu),
            (2, 7, 6, 6, 4, 3, 0, Pre::Identity),
        ] {
            let g = Geom::new(&[b, cx, h, w], &[co, pre.channels(cx), k, k], pad, pre).unwrap();
            assert!(g.pointwise() || g.k() < DIRECT_MIN_K);
            assert_matches_gemm_path(
                &g,
                1e-5,
                forward_pointwise,
                input_grad_pointwise,
                conv_weight_grad,
            );
        }
    }

    #[test]
    fn few_output_kernels_match_the_gemm_path() {
        if !pointwise::available() {
            eprintln!("skipped: neither the AVX2 nor the AVX-512 kernel set");
            return;
        }
        // Co from 1 to 8 behind 3×3 kernels (partial 6-row blocks of Co·9 rows), a 5×5 and a
        // 1×n map, odd sizes, all three input activations; a wide map whose transposed patch
        // matrix comes in several bands (∂W summed band by band).
        for (b, cx, h, w, co, k, pad, pre) in [
            (2, 16, 6, 6, 1, 3, 1, Pre::Identity),
            (3, 17, 5, 7, 4, 3, 1, Pre::Relu),
            (2, 9, 7, 4, 2, 3, 1, Pre::ConcatElu),
            (2, 24, 14, 14, 8, 3, 1, Pre::Relu),
            (2, 20, 1, 9, 3, 3, 1, Pre::Identity),
            (2, 18, 7, 6, 2, 5, 2, Pre::Identity),
            (2, 16, 9, 11, 5, 3, 1, Pre::ConcatElu),
            (1, 16, 40, 301, 8, 3, 1, Pre::Identity),
        ] {
            let g = Geom::new(&[b, cx, h, w], &[co, pre.channels(cx), k, k], pad, pre).unwrap();
            assert!(g.transposed().is_some() && g.co * k * k <= TAPS_MAX_M);
            assert_matches_gemm_path(
                &g,
                1e-5,
                taps::forward_taps,
                conv_input_grad,
                taps::weight_grad_taps,
            );
        }
    }

    #[test]
    fn winograd_kernels_match_the_gemm_path() {
        if !winograd::available() {
            eprintln!("skipped: neither AVX-512F nor AVX2");
            return;
        }
        // F(2, 3) and F(4, 3) tiles (the latter's transforms need AVX2 + FMA, which every
        // AVX-512 CPU has). Even and odd heights, widths of every remainder modulo 2 and 4
        // (a last tile partly outside), 1×1 and 1×n maps, fewer tiles per row than a
        // vector holds, and more than 16 (several vectors of them), every input activation,
        // output channel counts that leave partial GEMM blocks.
        let tiles = [2, 4]
            .into_iter()
            .filter(|&n| n == 2 || winograd::f4_available());
        for n in tiles {
            for (b, cx, h, w, co, pre) in [
                (2, 16, 6, 6, 8, Pre::Identity),
                (3, 17, 5, 7, 9, Pre::Identity),
                (2, 9, 7, 4, 13, Pre::ConcatElu),
                (2, 16, 1, 1, 8, Pre::Relu),
                (2, 16, 1, 5, 11, Pre::Identity),
                (2, 8, 9, 37, 16, Pre::ConcatElu),
                (2, 20, 34, 33, 10, Pre::Relu),
                (2, 32, 14, 14, 32, Pre::ConcatElu),
                (2, 16, 28, 28, 16, Pre::ConcatElu),
                (2, 16, 3, 10, 16, Pre::Identity),
                (2, 16, 4, 11, 16, Pre::Relu),
                // A wide map: 151 tiles per row, past the buffers' fixed slack.
                (1, 16, 2, 301, 16, Pre::Identity),
            ] {
                let g = Geom::new(&[b, cx, h, w], &[co, pre.channels(cx), 3, 3], 1, pre).unwrap();
                let tl = Tiles::with_n(h, w, n);
                // The transforms combine up to six values per term (F(4, 3)'s scaled by up
                // to 8, its weights by 1/6 and 1/24): a few ulps of the largest partial sums
                // more than a direct sum (F(4, 3) measured 1.4e-6 of the largest at worst).
                assert_matches_gemm_path(
                    &g,
                    2e-5,
                    |x, w, b, g| forward_winograd(x, w, b, g, tl),
                    |gy, w, x, g| input_grad_winograd(gy, w, x, g, tl),
                    |x, gy, g| weight_grad_winograd(x, gy, g, tl),
                );
            }
        }
    }

    #[test]
    fn transposed_input_gradient_geometry() {
        // 3×3 "same": the flipped kernel with padding 1; non-square and p ≥ kh fall back.
        let g = |w: [usize; 4], pad| Geom::new(&[2, 4, 6, 5], &w, pad, Pre::Identity).unwrap();
        let t = g([3, 4, 3, 3], 1).transposed().unwrap();
        assert_eq!((t.ci, t.co, t.pad, t.oh, t.ow), (3, 4, 1, 6, 5));
        assert_eq!(g([3, 4, 5, 5], 0).transposed().unwrap().pad, 4);
        assert!(g([3, 4, 3, 1], 0).transposed().is_none());
        assert!(g([3, 4, 1, 1], 1).transposed().is_none());
        assert!(
            g([3, 4, 1, 1], 0).transposed().is_none(),
            "1×1 needs no patches"
        );
    }

    #[test]
    fn matches_candle_values_and_gradients_f32_at_tutorial_size() {
        check(&[8, 64, 14, 14], &[32, 64, 3, 3], 1, DType::F32, 1e-4);
        check(&[8, 64, 14, 14], &[64, 64, 1, 1], 0, DType::F32, 1e-4);
        check(&[4, 64, 28, 28], &[2, 64, 3, 3], 1, DType::F32, 1e-4);
        // Glow's last layer (the few-output path where it runs).
        check(&[4, 192, 14, 14], &[4, 192, 3, 3], 1, DType::F32, 1e-4);
        // Glow's first layer (2 → 192 at 14×14, on the pointwise GEMM's patch-matrix path
        // where it runs) and a one-channel input layer.
        check(&[4, 2, 14, 14], &[192, 2, 3, 3], 1, DType::F32, 1e-4);
        check(&[3, 1, 9, 7], &[13, 1, 3, 3], 1, DType::F32, 1e-4);
    }

    #[test]
    fn gradients_are_bit_identical_for_any_thread_count() {
        // Training must be reproducible and resumable exactly, so batch reductions may not
        // depend on rayon's scheduling. With 9 images (≥ 8 threads) the path is the same for
        // every thread count: gemm for 4 input channels (36 taps); the direct kernels for 8
        // (72 taps), with both ∂W kernels (3, 4 and 16 output channels) and the direct ∂x
        // (16); Winograd for 16 → 16 channels on a 12×9 map; on AVX2 the few-output path
        // (forward and ∂W) for 32 → 4.
        for (ci, co, h, w) in [
            (32, 4, 6, 5),
            (4, 3, 6, 5),
            (8, 3, 6, 5),
            (8, 4, 6, 5),
            (8, 16, 6, 5),
            (16, 16, 12, 9),
        ] {
            thread_count_invariant(ci, co, h, w);
        }
    }

    fn thread_count_invariant(ci: usize, co: usize, h: usize, width: usize) {
        let x = randn(1, &[9, ci, h, width], 1.0, DType::F32);
        let w = randn(2, &[co, ci, 3, 3], 1.0, DType::F32);
        let b = randn(3, &[co], 1.0, DType::F32);
        super::super::assert_thread_count_invariant(|| {
            let (xv, wv, bv) = (
                candle_core::Var::from_tensor(&x).unwrap(),
                candle_core::Var::from_tensor(&w).unwrap(),
                candle_core::Var::from_tensor(&b).unwrap(),
            );
            let y = conv2d(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), 1).unwrap();
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let v = |t: &Tensor| super::super::grad_f32(&g, t);
            (v(xv.as_tensor()), v(wv.as_tensor()), v(bv.as_tensor()))
        });
    }

    #[test]
    fn refuses_mismatched_shapes() {
        let x = randn(1, &[1, 3, 4, 4], 1.0, DType::F32);
        let w = randn(2, &[2, 4, 3, 3], 1.0, DType::F32);
        let b = randn(3, &[2], 1.0, DType::F32);
        let err = super::super::with_kernels(super::super::Kernels::Fast, || {
            conv2d(&x, &w, &b, 1).unwrap_err().to_string()
        });
        assert!(err.contains("channels"), "{err}");
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    fn vals(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn time(what: &str, flop: f64, mut f: impl FnMut()) {
        f();
        let mut ts: Vec<f64> = (0..7)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect();
        ts.sort_by(f64::total_cmp);
        eprintln!(
            "{what:28} {:7.2} ms {:6.1} GFLOP/s",
            ts[3] * 1e3,
            flop / ts[3] / 1e9
        );
    }

    /// `cargo test --release --lib timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn conv_op_timings() {
        // The tutorial's gated block at 28×28, then Glow's net at 14×14 and 7×7.
        for (cx, co, k, pad, pre, hw) in [
            (1, 32, 3, 1, Pre::Identity, 28),
            (32, 32, 3, 1, Pre::ConcatElu, 28),
            (32, 64, 1, 0, Pre::ConcatElu, 28),
            (32, 2, 3, 1, Pre::ConcatElu, 28),
            (32, 32, 3, 1, Pre::ConcatElu, 14),
            (32, 32, 3, 1, Pre::ConcatElu, 7),
            (32, 64, 1, 0, Pre::ConcatElu, 7),
            (2, 192, 3, 1, Pre::Identity, 14),
            (4, 192, 3, 1, Pre::Identity, 7),
            (192, 192, 1, 0, Pre::Relu, 14),
            (192, 192, 1, 0, Pre::Relu, 7),
            (192, 4, 3, 1, Pre::Relu, 14),
            (192, 8, 3, 1, Pre::Relu, 7),
            (16, 16, 3, 1, Pre::ConcatElu, 28),
            (48, 48, 3, 1, Pre::ConcatElu, 14),
            (64, 64, 3, 1, Pre::ConcatElu, 7),
            (16, 2, 3, 1, Pre::ConcatElu, 28),
            (8, 2, 3, 1, Pre::ConcatElu, 28),
            (8, 4, 3, 1, Pre::Identity, 14),
            (32, 4, 3, 1, Pre::ConcatElu, 14),
            (32, 8, 3, 1, Pre::ConcatElu, 7),
            (48, 4, 3, 1, Pre::ConcatElu, 14),
            (64, 8, 3, 1, Pre::ConcatElu, 7),
        ] {
            // `CONV_TIMING=192→4` times only the shapes whose label contains that text.
            let label = format!("{cx}→{co} {k}×{k} {pre:?} at {hw}×{hw}");
            if !label.contains(&std::env::var("CONV_TIMING").unwrap_or_default()) {
                continue;
            }
            let ci = pre.channels(cx);
            let g = Geom::new(&[64, cx, hw, hw], &[co, ci, k, k], pad, pre).unwrap();
            let x = vals(g.b * g.in_len(), 1);
            let w = vals(co * g.k(), 2);
            let b = vals(co, 3);
            let gy = vals(g.b * co * g.out_hw(), 4);
            let flop = 2.0 * (g.b * co * g.k() * g.out_hw()) as f64;
            eprintln!("{label}");
            time("fwd gemm", flop, || drop(conv_forward(&x, &w, &b, &g)));
            time("fwd direct", flop, || drop(forward_direct(&x, &w, &b, &g)));
            time("dx gemm", flop, || drop(conv_input_grad(&gy, &w, &x, &g)));
            let t = g.transposed_planes().unwrap();
            time("dx direct", flop, || {
                drop(input_grad_direct(&gy, &w, &x, &g, t))
            });
            time("dw im2col", flop, || drop(conv_weight_grad(&x, &gy, &g)));
            time("dw direct", flop, || drop(weight_grad_direct(&x, &gy, &g)));
            if pointwise::available() {
                time("fwd pointwise", flop, || {
                    drop(forward_pointwise(&x, &w, &b, &g))
                });
                time("dx pointwise", flop, || {
                    drop(input_grad_pointwise(&gy, &w, &x, &g))
                });
                if g.transposed().is_some() {
                    time("fwd taps", flop, || {
                        drop(taps::forward_taps(&x, &w, &b, &g))
                    });
                    time("dw taps", flop, || {
                        drop(taps::weight_grad_taps(&x, &gy, &g))
                    });
                }
            }
            if (k, pad) == (3, 1) {
                for n in [2, 4] {
                    let tl = winograd::Tiles::with_n(g.h, g.w, n);
                    time(&format!("fwd winograd F({n},3)"), flop, || {
                        drop(forward_winograd(&x, &w, &b, &g, tl))
                    });
                    time(&format!("dx winograd F({n},3)"), flop, || {
                        drop(input_grad_winograd(&gy, &w, &x, &g, tl))
                    });
                    time(&format!("dw winograd F({n},3)"), flop, || {
                        drop(weight_grad_winograd(&x, &gy, &g, tl))
                    });
                }
            }
            if std::env::var("CONV_TIMING_DW_ONLY").is_ok() {
                for _ in 0..30 {
                    drop(weight_grad_direct(&x, &gy, &g));
                }
            }
        }
    }
}
