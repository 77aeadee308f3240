//! Winograd F(2, 3) and F(4, 3) along image rows: stride-1, padding-1 3×3 convolutions with
//! 1.5× (F(2, 3)) or 2× (F(4, 3)) fewer multiplications than the direct kernels (f32).
//! F(2, 3)'s transforms are here for AVX-512 and in `avx2.rs` for AVX2; F(4, 3)'s, 8-lane
//! AVX2 code, in `winograd/f4.rs`, with its matrices. [`Tiles::new`] takes F(4, 3) on AVX2
//! CPUs, and on AVX-512 ones for maps at least 28 wide ([`F4_MIN_W_AVX512`]). Everything below the
//! transforms (the GEMMs, the weight transform and the weight gradient) is the same code
//! for both, with `n + 2` transformed values per tile of `n` pixels. F(2, 3) first:
//!
//! Each output row is cut into pairs of pixels, `tw = ⌈W/2⌉` tiles per row. Tile `tx` of
//! padded row `r` reads the four padded columns `2tx … 2tx+3`, `d₀…d₃`, and with
//!
//! ```text
//! Bᵀ = ⎡1  0 −1  0⎤    G = ⎡ 1   0   0 ⎤    Aᵀ = ⎡1 1  1  0⎤
//!      ⎢0  1  1  0⎥        ⎢ ½   ½   ½ ⎥         ⎣0 1 −1 −1⎦
//!      ⎢0 −1  1  0⎥        ⎢ ½  −½   ½ ⎥
//!      ⎣0  1  0 −1⎦        ⎣ 0   0   1 ⎦
//! ```
//!
//! - input transform `V[ξ][c][r][tx] = (Bᵀ d)[ξ]` for ξ < 4, every channel and padded row,
//! - weight transform `U[ξ][o][c][i] = (G w[o][c][i][·])[ξ]` (each kernel row),
//! - for each ξ a GEMM over the taps `(c, i)`:
//!   `M[ξ][o][y][tx] = Σ_{c,i} U[ξ][o][c][i] · V[ξ][c][y + i][tx]` — the direct
//!   convolution's register-tiled kernel ([`direct::conv_rows`]) with the rows of `V[ξ]`
//!   as its planes (tap offsets `c·(H+2)·tw + i·tw`),
//! - output transform `y[o][y][2tx + j] = (Aᵀ M[·][o][y][tx])[j]` (+ bias).
//!
//! Per output pair, input channel and kernel row that is 4 multiplications instead of 6.
//! Unlike F(2×2, 3×3) (16 transformed values per 4 outputs) the transformed input is only
//! twice the input, which on this memory system decides it. A 2-D version of this module
//! (session 10) wrote its 4× larger `V` at the L2's bandwidth (46–75 µs per 28×28 image of
//! 64 channels, against 20 µs here) and its GEMMs had only `K = C`; it gained 5–9 % over the
//! direct kernels forward and lost on ∂W. This one, at 64 → 32 channels on 28×28 maps,
//! batch 64, two threads (`conv::timing::conv_op_timings`): forward 9.3 → 6.4 ms, ∂x
//! 8.8 → 6.7 ms, ∂W 9.2 → 7.5–8.1 ms. The transforms only add, subtract and halve: the
//! output equals the direct convolution up to float rounding.
//!
//! F(4, 3) takes 6 transformed values per 4 pixels (1.5 multiplications per pixel and kernel
//! row instead of 2, a `V` 1.5× the input instead of 2×), and its transforms cost no more
//! per pixel. On AVX2, 2 threads, batch 64 (`conv_op_timings`), F(2, 3) → F(4, 3): 32 → 32
//! with ConcatELU at 28×28 forward 10.8 → 10.2 ms, ∂x 10.9 → 10.0, ∂W 13.1 → 10.6; 16 → 16
//! at 28×28 4.2 → 3.3, 3.9 → 3.2, 4.6 → 4.0; 48 → 48 at 14×14 6.9 → 5.1, 5.7 → 5.2,
//! 6.8 → 6.4. Its transforms scale by up to 8 and the weights by 1/6 and 1/24; the tests
//! measured 1.4e-6 of the largest output as its worst error against an f64 reference.
//!
//! The input gradient is the same computation on the output gradient with the flipped,
//! transposed weights (a padding-1 3×3 convolution again). The weight gradient is
//! `∂U[ξ][o][(c, i)] = Σ_{y,tx} Ĝ[ξ][o][y][tx] · V[ξ][c][y + i][tx]` with `Ĝ = A·∂y` per
//! tile (`A = (Aᵀ)ᵀ`), run by the direct weight-gradient kernel over the rows of `V[ξ]`,
//! then `∂w[o][c][i][j] = Σ_ξ G[ξ][j]·∂U[ξ][o][(c, i)]`.
//!
//! Layout: `V` is `[n+2][C][(H+2)·tw + slack]` and `M` `[n+2][Co][ms]`, with position
//! `y·tw + tx`; the ξ blocks are padded so they do not fall 4 KiB apart. The input transform
//! applies the convolution's activation (identity, ReLU, ConcatELU) plane by plane and
//! transforms each row from there, 16 tiles per vector, splitting even and odd columns
//! with two-source permutes; no padded copy of the image is written.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::conv::{relu_row, Pre};
#[cfg(target_arch = "x86_64")]
use super::direct::tail_mask;
use super::direct::{self, Packed, Planes};
use super::elementwise::concat_elu_row;
use super::isa;

mod f4;

/// f32 lanes per vector.
const L: usize = 16;
/// Transformed positions per F(2, 3) tile.
const XI: usize = 4;

/// Room after each ξ block: at least the GEMM's last vector (16) and the plane slack
/// [`direct::weight_grad_t`] asserts (`kw + MAX_TILE + 16` = 145 for the 3×1 taps).
const V_SLACK: usize = 160;

/// `G`, the weight transform (rows: the 4 transformed positions; columns: the 3 taps).
const GM: [[f32; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

/// The narrowest map on which the AVX-512 kernel set takes F(4, 3) (8-lane transforms, 1.5
/// multiplications per output and kernel row) over F(2, 3) (16-lane transforms, 2). On Zen
/// 4 with `FLOWLAB_SIMD=avx512`, `conv_op_timings` (two threads, batch 64): F(4, 3) faster
/// at 28×28 (32 → 32 after ConcatELU: 315 against 266 GFLOP/s forward, 315 against 272
/// ∂x, 301 against 245 ∂W; 16 → 16: +9–14 %), level at 14×14 (48 → 48: 257 against 257
/// forward, 271 against 249 ∂x, 255 against 249 ∂W). Where 16-lane FMAs run twice as fast
/// as 8-lane ones (Intel's server cores) the 8-lane transforms weigh more, unmeasured: on
/// maps as narrow as 14 F(2, 3) stays.
pub(super) const F4_MIN_W_AVX512: usize = 28;

/// The row tiles of an `h × w` map: runs of `n` output pixels, F(n, 3) with `n + 2`
/// transformed values per tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tiles {
    pub(super) h: usize,
    pub(super) w: usize,
    /// Output pixels per tile: 2 or 4.
    pub(super) n: usize,
    pub(super) tw: usize,
}

impl Tiles {
    /// The tiles this CPU's transforms take: F(4, 3) on AVX2 (module `f4`); on AVX-512,
    /// F(4, 3) for maps at least [`F4_MIN_W_AVX512`] wide and F(2, 3), whose transforms
    /// exist in 16 lanes, below.
    pub fn new(h: usize, w: usize) -> Self {
        let n = match isa::isa() {
            Some(isa::Isa::Avx2) => f4::N,
            Some(isa::Isa::Avx512) if w >= F4_MIN_W_AVX512 => f4::N,
            _ => 2,
        };
        Self::with_n(h, w, n)
    }

    /// F(`n`, 3) tiles, `n` 2 or 4 (4 only on CPUs with AVX2 and FMA: the transforms rely
    /// on this check).
    pub fn with_n(h: usize, w: usize, n: usize) -> Self {
        assert!(n == 2 || n == f4::N, "F({n}, 3) tiles are not implemented");
        assert!(n != f4::N || f4_available(), "F(4, 3) needs AVX2 and FMA");
        Self {
            h,
            w,
            n,
            tw: w.div_ceil(n),
        }
    }

    /// Transformed values per tile, `n + 2`.
    pub fn xi(&self) -> usize {
        self.n + 2
    }

    /// `G`, the weight transform: a row per transformed value.
    fn g(&self) -> &'static [[f32; 3]] {
        if self.n == f4::N {
            &f4::GM
        } else {
            &GM
        }
    }

    /// GEMM positions per output channel: `H·tw`.
    fn q(&self) -> usize {
        self.h * self.tw
    }

    /// One channel's transformed rows, `(H+2)·tw`.
    pub(super) fn plane(&self) -> usize {
        (self.h + 2) * self.tw
    }

    /// Distance between consecutive ξ blocks of `len` values (`V`, `M`, `Ĝ`): `len` plus
    /// [`V_SLACK`], rounded up to 4 KiB plus one cache line, so the four or six streams the
    /// transforms read or write at once do not share L1 sets.
    pub(super) fn xi_stride(&self, len: usize) -> usize {
        (len + V_SLACK).next_multiple_of(1024) + L
    }

    /// Elements of `V` for `c` channels.
    pub fn v_len(&self, c: usize) -> usize {
        self.xi() * self.xi_stride(c * self.plane())
    }

    /// `V[ξ]` as planes for [`direct::weight_grad_t`]: `c` planes of `H+2` rows of `tw`
    /// tiles, read by the 3×1 taps `(c, i)`.
    fn v_planes(&self, c: usize) -> Planes {
        Planes {
            c,
            h: self.h + 2,
            w: self.tw,
            pad: 0,
            kh: 3,
            kw: 1,
        }
    }

    /// Elements of the weight gradient's `Ĝ` (`[n+2][H·tw][cs]`).
    pub fn gh_len(&self, cs: usize) -> usize {
        self.xi() * self.xi_stride(self.q() * cs)
    }

    /// Row stride of `M`: whole vectors of positions.
    pub(super) fn ms(&self) -> usize {
        self.q().next_multiple_of(L)
    }

    /// Elements of `M` for `co` output channels.
    pub fn m_len(&self, co: usize) -> usize {
        self.xi() * self.xi_stride(co * self.ms())
    }
}

/// Whether this CPU runs the kernels (AVX-512F, or AVX2 with FMA).
pub(super) fn available() -> bool {
    direct::available()
}

/// Whether it runs F(4, 3)'s transforms too (AVX2 and FMA, which AVX-512 CPUs have).
pub(super) fn f4_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        available()
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `V = Bᵀ d` for every channel, padded row and tile of `pre` of one image `xn`
/// (`[Cx][H][W]`, zero-padded by one pixel; `C = pre.channels(Cx)` channels) into
/// `v` ([`Tiles::v_len`] of C). Each channel plane is activated into a plane-sized buffer
/// (read in place for the identity) and its rows transformed from there with loads masked
/// to the row, so no padded copy of the image is written.
pub(super) fn input_transform(xn: &[f32], pre: Pre, tl: &Tiles, v: &mut [f32]) {
    let hw = tl.h * tl.w;
    assert!(available(), "winograd needs AVX-512F or AVX2");
    assert!(hw > 0 && xn.len().is_multiple_of(hw));
    let cx = xn.len() / hw;
    let c = pre.channels(cx);
    assert!(v.len() >= tl.v_len(c));
    #[cfg(target_arch = "x86_64")]
    {
        let (h, w, tw) = (tl.h, tl.w, tl.tw);
        let (vp, xs) = (tl.plane(), tl.xi_stride(c * tl.plane()));
        let v = v.as_mut_ptr();
        let avx2 = isa::isa() == Some(isa::Isa::Avx2);
        let nxi = tl.xi();
        // Plane `ch` of `V[ξ]`: padded rows 0 and H + 1 zero, row r image row r − 1 (row
        // H + 1 last: the F(4, 3) transform's whole-vector stores may spill into it).
        // SAFETY: the CPU has the ISA's features (AVX2 and FMA for F(4, 3), asserted by
        // `Tiles::with_n`); `plane` holds H·W values, and every store is to row (ξ, ch, r)
        // of `v`, inside `Tiles::v_len` (asserted above).
        let rows = |plane: &[f32], ch: usize| unsafe {
            let dst = v.add(ch * vp);
            if tl.n == f4::N || avx2 {
                super::avx2::zero_v_row(dst, tw, xs, nxi);
                if tl.n == f4::N {
                    f4::transform_rows(plane.as_ptr(), h, w, dst.add(tw), xs);
                } else {
                    super::avx2::transform_rows(plane.as_ptr(), h, w, dst.add(tw), xs);
                }
                super::avx2::zero_v_row(dst.add((h + 1) * tw), tw, xs, nxi);
            } else {
                plane_avx512(plane.as_ptr(), tl, dst, xs);
            }
        };
        for_each_activated_plane(xn, pre, hw, rows);
        // The GEMM's last vector reads up to 15 values past the last plane (into columns it
        // drops); zeros there rather than stale scratch. The weight gradient reads none.
        for xi in 0..nxi {
            // SAFETY: each ξ block has V_SLACK ≥ 16 values after its C planes.
            unsafe { std::ptr::write_bytes(v.add(xi * xs + c * vp), 0, L) };
        }
    }
}

/// Calls `rows(plane, ch)` for each channel plane of `pre(xn)` (`xn` `[Cx][hw]`; ConcatELU's
/// two halves are channels `ch` and `ch + Cx`). Each plane is activated into a plane-sized
/// buffer, whole, so the exponential runs in full vectors; the identity is read in place.
fn for_each_activated_plane(xn: &[f32], pre: Pre, hw: usize, rows: impl Fn(&[f32], usize)) {
    let cx = xn.len() / hw;
    let mut buf = vec![0.0f32; 2 * hw];
    let (a, b) = buf.split_at_mut(hw);
    for (ch, src) in xn.chunks_exact(hw).enumerate() {
        match pre {
            Pre::Identity => rows(src, ch),
            Pre::Relu => {
                super::wide(|| relu_row(src, a));
                rows(a, ch);
            }
            Pre::ConcatElu => {
                super::wide(|| concat_elu_row(src, a, b));
                rows(a, ch);
                rows(b, ch + cx);
            }
        }
    }
}

/// One channel's plane of `V[ξ]` at `dst` from its activated image plane `a`: the zero
/// padded rows 0 and H + 1, and [`transform_rows`] between them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn plane_avx512(a: *const f32, tl: &Tiles, dst: *mut f32, xs: usize) {
    let (h, w, tw) = (tl.h, tl.w, tl.tw);
    let zero_row = |dst: *mut f32| {
        for xi in 0..XI {
            for tx0 in (0..tw).step_by(L) {
                let mask = tail_mask((tw - tx0).min(L));
                _mm512_mask_storeu_ps(dst.add(xi * xs + tx0), mask, _mm512_setzero_ps());
            }
        }
    };
    zero_row(dst);
    zero_row(dst.add((h + 1) * tw));
    transform_rows(a, h, w, dst.add(tw), xs);
}

/// The `h` rows of `w` values of one plane `a` → their `tw` tiles' four transformed values,
/// row r stored at `dst + r·tw + ξ·xs`. Each row is read as if zero-padded by one on each
/// side: every vector is a load masked to the values inside the row (reading rows just
/// written by the activation through a bordered copy stalled on store forwarding: 3×
/// slower). The masks depend only on the column, so the row loop runs inside the loop
/// over vectors of tiles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn transform_rows(a: *const f32, h: usize, w: usize, dst: *mut f32, xs: usize) {
    let tw = w.div_ceil(2);
    let (ie, io) = (even_idx(0), even_idx(1));
    // The mask of padded columns s … s + 15, i.e. a[s − 1 …], inside 0 … w − 1.
    let inside = |s: usize| {
        let first = 1usize.saturating_sub(s) as u32;
        let end = (w + 1).saturating_sub(s).min(L) as u32;
        (((1u32 << end) - 1) & !((1u32 << first) - 1)) as __mmask16
    };
    for tx0 in (0..tw).step_by(L) {
        let mask = tail_mask((tw - tx0).min(L));
        let s = 2 * tx0;
        let m = [inside(s), inside(s + L), inside(s + 2), inside(s + L + 2)];
        let at = [s, s + L, s + 2, s + L + 2];
        for r in 0..h {
            let row = a.wrapping_add(r * w).wrapping_sub(1);
            let [lo, hi, lo2, hi2]: [__m512; 4] =
                std::array::from_fn(|k| _mm512_maskz_loadu_ps(m[k], row.wrapping_add(at[k])));
            // Columns 2tx, 2tx+1, 2tx+2, 2tx+3 for 16 tiles.
            let t = bt([
                _mm512_permutex2var_ps(lo, ie, hi),
                _mm512_permutex2var_ps(lo, io, hi),
                _mm512_permutex2var_ps(lo2, ie, hi2),
                _mm512_permutex2var_ps(lo2, io, hi2),
            ]);
            let d = dst.add(r * tw + tx0);
            for (xi, &val) in t.iter().enumerate() {
                _mm512_mask_storeu_ps(d.add(xi * xs), mask, val);
            }
        }
    }
}

/// `Bᵀ·[d0, d1, d2, d3]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn bt([d0, d1, d2, d3]: [__m512; 4]) -> [__m512; 4] {
    [
        _mm512_sub_ps(d0, d2),
        _mm512_add_ps(d1, d2),
        _mm512_sub_ps(d2, d1),
        _mm512_sub_ps(d1, d3),
    ]
}

/// Permute indices picking lanes `first, first + 2, …` of a 32-lane pair.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn even_idx(first: i32) -> __m512i {
    let f = first;
    _mm512_setr_epi32(
        f,
        f + 2,
        f + 4,
        f + 6,
        f + 8,
        f + 10,
        f + 12,
        f + 14,
        f + 16,
        f + 18,
        f + 20,
        f + 22,
        f + 24,
        f + 26,
        f + 28,
        f + 30,
    )
}

/// Permute indices interleaving lanes `8·half …` of two vectors: `a₀ b₀ a₁ b₁ …`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn interleave_idx(half: i32) -> __m512i {
    let h = 8 * half;
    _mm512_setr_epi32(
        h,
        h + 16,
        h + 1,
        h + 17,
        h + 2,
        h + 18,
        h + 3,
        h + 19,
        h + 4,
        h + 20,
        h + 5,
        h + 21,
        h + 6,
        h + 22,
        h + 7,
        h + 23,
    )
}

/// The `n + 2` transformed weights `U[ξ]` of `w` (`[Co][C][3][3]`), each `[Co][C·3]` (taps
/// `(c, i)`) packed for [`multiply`]'s GEMM, with the taps' offsets into `V[ξ]`.
pub(super) struct Weights {
    co: usize,
    c: usize,
    u: Vec<Packed>,
    offs: Vec<usize>,
}

impl Weights {
    pub fn new(w: &[f32], co: usize, c: usize, tl: &Tiles) -> Self {
        assert_eq!(
            w.len(),
            co * c * 9,
            "3×3 weights [{co}, {c}, 3, 3] expected"
        );
        let gm = tl.g();
        let mut u = vec![vec![0.0f32; co * c * 3]; tl.xi()];
        for (row, k) in w.chunks_exact(3).enumerate() {
            for (xi, ux) in u.iter_mut().enumerate() {
                ux[row] = (0..3).map(|j| gm[xi][j] * k[j]).sum();
            }
        }
        let u = u
            .iter()
            .map(|ux| Packed::for_positions(ux, co, c * 3, tl.q()))
            .collect();
        let offs = (0..c)
            .flat_map(|ch| (0..3).map(move |i| ch * tl.plane() + i * tl.tw))
            .collect();
        Self { co, c, u, offs }
    }
}

/// `M[ξ] = U[ξ] ⋆ V[ξ]` for each ξ.
pub(super) fn multiply(v: &[f32], w: &Weights, tl: &Tiles, m: &mut [f32]) {
    let (vs, ms) = (tl.xi_stride(w.c * tl.plane()), tl.xi_stride(w.co * tl.ms()));
    assert!(v.len() >= tl.v_len(w.c) && m.len() >= tl.m_len(w.co));
    for (xi, u) in w.u.iter().enumerate() {
        let vx = &v[xi * vs..(xi + 1) * vs];
        let mx = &mut m[xi * ms..(xi + 1) * ms];
        direct::conv_rows(vx, &w.offs, u, mx, tl.ms(), tl.q(), true);
    }
}

/// `y = Aᵀ M` per tile, plus `bias[o]` when given: `m` → `y` `[Co][H][W]`. Every element of
/// `y` is written (with f32 values only) and none is read, so `y` may start uninitialised.
pub(super) fn output_transform(
    m: &[f32],
    co: usize,
    tl: &Tiles,
    bias: Option<&[f32]>,
    y: &mut [std::mem::MaybeUninit<f32>],
) {
    assert!(available(), "winograd needs AVX-512F or AVX2");
    assert!(m.len() >= tl.m_len(co) && y.len() == co * tl.h * tl.w);
    assert!(bias.is_none_or(|b| b.len() == co));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has the ISA's features (`Tiles::with_n` asserts F(4, 3)'s); loads
    // are masked to the tiles of row (ξ, o, y) of `m` (F(4, 3)'s whole vectors end at most
    // 8 values past them, inside the ξ block's `V_SLACK`), and stores go to the W columns
    // of row (o, y) of `y` (or spill into later rows of `y`, which are written after them).
    unsafe {
        let strides = (tl.ms(), tl.xi_stride(co * tl.ms()));
        if tl.n == f4::N {
            let y = y.as_mut_ptr().cast::<f32>();
            f4::output_transform(m.as_ptr(), co, tl, strides, bias, y)
        } else if isa::isa() == Some(isa::Isa::Avx2) {
            let y = y.as_mut_ptr().cast::<f32>();
            super::avx2::output_transform(m.as_ptr(), co, tl, strides, bias, y)
        } else {
            output_avx512(m.as_ptr(), co, tl, bias, y.as_mut_ptr().cast())
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn output_avx512(m: *const f32, co: usize, tl: &Tiles, bias: Option<&[f32]>, y: *mut f32) {
    let (h, w, tw) = (tl.h, tl.w, tl.tw);
    let (ms, xs) = (tl.ms(), tl.xi_stride(co * tl.ms()));
    let (ilo, ihi) = (interleave_idx(0), interleave_idx(1));
    for o in 0..co {
        let bv = _mm512_set1_ps(bias.map_or(0.0, |b| b[o]));
        for r in 0..h {
            let src = m.add(o * ms + r * tw);
            let dst = y.add((o * h + r) * w);
            for tx0 in (0..tw).step_by(L) {
                let mask = tail_mask((tw - tx0).min(L));
                let t: [__m512; 4] =
                    std::array::from_fn(|xi| _mm512_maskz_loadu_ps(mask, src.add(xi * xs + tx0)));
                let even = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(t[0], t[1]), t[2]), bv);
                let odd = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(t[1], t[2]), t[3]), bv);
                let cols = (w - 2 * tx0).min(2 * L);
                let d = dst.add(2 * tx0);
                _mm512_mask_storeu_ps(d, tail_mask(cols), _mm512_permutex2var_ps(even, ilo, odd));
                if cols > L {
                    let hi = _mm512_permutex2var_ps(even, ihi, odd);
                    _mm512_mask_storeu_ps(d.add(L), tail_mask(cols - L), hi);
                }
            }
        }
    }
}

/// `Ĝ = A·∂y` per tile for the weight gradient (`A = (Aᵀ)ᵀ`): `t` is one image's output
/// gradient transposed, `[H·W][cs]` (channels past Co zero); `gh[ξ]` is `[H·tw][cs]`. For
/// F(2, 3) and the tile's pixels `g₀, g₁`: `Ĝ₀ = g₀, Ĝ₁ = g₀ + g₁, Ĝ₂ = g₀ − g₁, Ĝ₃ = −g₁`;
/// for F(4, 3) and `g₀ … g₃`: `Ĝ₀ = g₀`, `Ĝ₁,₂ = (g₀ + g₂) ± (g₁ + g₃)`,
/// `Ĝ₃,₄ = (g₀ + 4g₂) ± (2g₁ + 8g₃)`, `Ĝ₅ = g₃`. Pixels past the last column are 0.
pub(super) fn grad_transform(t: &[f32], cs: usize, tl: &Tiles, gh: &mut [f32]) {
    let (gs, w, n) = (tl.xi_stride(tl.q() * cs), tl.w, tl.n);
    assert!(t.len() == tl.h * w * cs && gh.len() >= tl.gh_len(cs));
    let zeros = vec![0.0f32; cs];
    let mut blocks: Vec<&mut [f32]> = gh.chunks_mut(gs).take(tl.xi()).collect();
    super::wide(|| {
        for y in 0..tl.h {
            for tx in 0..tl.tw {
                let p = (y * tl.tw + tx) * cs;
                let px = |j: usize| match n * tx + j {
                    col if col < w => &t[(y * w + col) * cs..][..cs],
                    _ => &zeros[..],
                };
                let mut d = blocks.iter_mut().map(|b| &mut b[p..p + cs]);
                if n == 2 {
                    let [d0, d1, d2, d3] = std::array::from_fn(|_| d.next().unwrap());
                    let (g0, g1) = (px(0), px(1));
                    for k in 0..cs {
                        let (a, b) = (g0[k], g1[k]);
                        (d0[k], d1[k], d2[k], d3[k]) = (a, a + b, a - b, -b);
                    }
                } else {
                    let [d0, d1, d2, d3, d4, d5] = std::array::from_fn(|_| d.next().unwrap());
                    let (g0, g1, g2, g3) = (px(0), px(1), px(2), px(3));
                    for k in 0..cs {
                        let (e, o) = (g0[k] + g2[k], g1[k] + g3[k]);
                        let (e4, o4) = (g0[k] + 4.0 * g2[k], 2.0 * g1[k] + 8.0 * g3[k]);
                        (d0[k], d1[k], d2[k]) = (g0[k], e + o, e - o);
                        (d3[k], d4[k], d5[k]) = (e4 + o4, e4 - o4, g3[k]);
                    }
                }
            }
        }
    });
}

/// `∂U[ξ] += Ĝ[ξ] ⋆ V[ξ]` for one image, by the direct weight-gradient kernel vectorised
/// over output channels: `du` is `[n+2][C·3][cs]` (taps `(c, i)`).
pub(super) fn weight_grad(v: &[f32], c: usize, gh: &[f32], cs: usize, tl: &Tiles, du: &mut [f32]) {
    let (vs, gs, k) = (
        tl.xi_stride(c * tl.plane()),
        tl.xi_stride(tl.q() * cs),
        3 * c,
    );
    assert!(v.len() >= tl.v_len(c) && gh.len() >= tl.gh_len(cs) && du.len() == tl.xi() * k * cs);
    let p = tl.v_planes(c);
    let offs = p.offsets();
    for xi in 0..tl.xi() {
        direct::weight_grad_t(
            &v[xi * vs..(xi + 1) * vs],
            &p,
            &offs,
            &gh[xi * gs..xi * gs + tl.q() * cs],
            &mut du[xi * k * cs..(xi + 1) * k * cs],
        );
    }
}

/// `∂w[o][c][i][j] = Σ_ξ G[ξ][j]·∂U[ξ][(c, i)][o]`: `du` (`[n+2][C·3][cs]`) →
/// `[Co][C][3][3]`.
pub(super) fn weights_grad(du: &[f32], co: usize, c: usize, cs: usize, tl: &Tiles) -> Vec<f32> {
    let (gm, nxi) = (tl.g(), tl.xi());
    assert_eq!(du.len(), nxi * 3 * c * cs);
    let mut dw = vec![0.0; co * c * 9];
    for (oc, k) in dw.chunks_exact_mut(9).enumerate() {
        let (o, ch) = (oc / c, oc % c);
        for i in 0..3 {
            for j in 0..3 {
                k[3 * i + j] = (0..nxi)
                    .map(|xi| gm[xi][j] * du[(xi * 3 * c + 3 * ch + i) * cs + o])
                    .sum();
            }
        }
    }
    dw
}

#[cfg(test)]
mod timing {
    use super::*;

    /// Per-phase time of one image on one core.
    /// `cargo test --release --lib winograd_phases -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn winograd_phases() {
        if !available() {
            return;
        }
        let shapes = [(64, 32, 28), (32, 64, 28), (96, 48, 14), (128, 64, 7)];
        for ((c, co, hw), n) in shapes.into_iter().flat_map(|s| [(s, 2), (s, f4::N)]) {
            let tl = Tiles::with_n(hw, hw, n);
            let x: Vec<f32> = (0..c / 2 * hw * hw)
                .map(|i| (i % 7) as f32 * 0.1 - 0.3)
                .collect();
            let w: Vec<f32> = (0..co * c * 9).map(|i| (i % 5) as f32 * 0.01).collect();
            let u = Weights::new(&w, co, c, &tl);
            let mut v = vec![0.0f32; tl.v_len(c)];
            let mut m = vec![0.0f32; tl.m_len(co)];
            let mut y = vec![std::mem::MaybeUninit::<f32>::uninit(); co * hw * hw];
            let reps = 100;
            let time = |f: &mut dyn FnMut()| {
                (0..9)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        for _ in 0..reps {
                            f();
                        }
                        t.elapsed().as_secs_f64() / reps as f64 * 1e6
                    })
                    .fold(f64::INFINITY, f64::min)
            };
            let ti = time(&mut || input_transform(&x, Pre::ConcatElu, &tl, &mut v));
            let tm = time(&mut || multiply(&v, &u, &tl, &mut m));
            let to = time(&mut || output_transform(&m, co, &tl, None, &mut y));
            let flop = 2.0 * (tl.xi() * co * c * 3 * tl.ms()) as f64;
            eprintln!(
                "F({n},3) {c}→{co} at {hw}: input {ti:.1} µs, gemm {tm:.1} µs ({:.1} GFLOP/s), output {to:.1} µs; direct-equivalent {:.1} GFLOP/s",
                flop / tm / 1e3,
                2.0 * (co * c * 9 * hw * hw) as f64 / (ti + tm + to) / 1e3
            );
        }
    }
}
