//! Direct stride-1 convolution of zero-padded planes: f32 microkernels for AVX-512 CPUs (and,
//! through the same entry points, their AVX2 versions in `avx2.rs`; see [`isa`]).
//!
//! One image's convolution input `a` (`[C, H, W]`) is written into padded planes
//! `[C, Hp, Wp]` (`Hp = H + 2p`, zero border) followed by zeroed slack. Rows share their
//! padding: row `r` holds `p` zeros, then (for `p ≤ r < H + p`) the `W` values of input row
//! `r − p`, and the next row's `p` leading zeros are the right padding of this one, so
//! `Wp = W + p` ([`Planes::wp`]); a tap that reads past the right edge of a row reads the
//! next row's leading zeros. Output pixel (y, x) gets the *padded-width* index
//! `q = y·Wp + x`, and kernel tap `t = (c, i, j)` reads `planes[offₜ + q]` with
//! `offₜ = c·Hp·Wp + i·Wp + j`, so
//!
//! - forward: `out[co][q] = Σₜ W[co][t] · planes[offₜ + q]` — a GEMM whose right-hand side
//!   is the planes read at K shifted offsets, so neither a patch matrix (im2col) nor a
//!   packed copy of it is ever built. Columns `x ≥ W'` of each padded-width row (and the
//!   tail of the last tile) are computed and dropped by the caller.
//! - weight gradient: `∂W[co][t] = Σ_q Gz[co][q] · planes[offₜ + q]`, with `Gz` the output
//!   gradient in the same padded-width layout and zero in the dropped columns
//!   ([`weight_grad`], vectorised over q: a 4-channel × 4-tap register tile, horizontal
//!   sums once per tile and image group) or, for 16 and more output channels, the same sum
//!   vectorised over output channels against `Gₙᵀ` ([`weight_grad_t`], no horizontal sums).
//!
//! The input gradient is the forward kernel applied to the padded output gradient with the
//! flipped, transposed weights (see `conv.rs`). Forward register tile: `M` output channels
//! × `R` vectors of 16 positions (`M·R ≤ 24` accumulators, the weights broadcast from a
//! `[K][M]` packed block).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
use super::avx2;
use super::isa::{isa, Isa};

/// f32 lanes per vector.
const LANES: usize = 16;
/// The widest forward tile, in positions (`16·R` for the largest `R`).
const MAX_TILE: usize = 8 * LANES;
/// Output channels per forward block: 8 (tiles of 8 × 3 vectors) unless
/// [`Planes::block_co`] picks 6 (6 × 4).
const BLOCK_CO: usize = 8;
/// The weight-gradient tile: output channels × taps.
const WG_CO: usize = 4;
const WG_TAPS: usize = 4;

/// Output channels per forward block for `q` positions: `avx2::BLOCK_CO` for the AVX2
/// kernels, else [`block_co_avx512`].
pub(super) fn block_co_for(q: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if isa() == Some(Isa::Avx2) {
        return avx2::BLOCK_CO;
    }
    block_co_avx512(q)
}

/// The AVX-512 forward block for `q` positions: [`BLOCK_CO`], or 6 where the
/// 8 × 3 tiles would end in a tile of one vector and 6 × 4 tiles would not. A one-vector
/// tile has 8 accumulators and as many loads as FMAs; on a 7×7 map (63 positions, 4
/// vectors) one 6 × 4 tile replaces an 8 × 3 and an 8 × 1, and the forward kernel ran
/// 156 instead of 115 GFLOP/s on one core (128→48 channels, `timing::microkernel_rate`).
/// Tiles do not change any output's sum, so neither does this choice.
fn block_co_avx512(q: usize) -> usize {
    let v = q.div_ceil(LANES);
    if v % 3 == 1 && v % 4 != 1 {
        6
    } else {
        BLOCK_CO
    }
}

/// Whether this CPU runs the microkernels (AVX-512F, or AVX2 with FMA).
pub(super) fn available() -> bool {
    isa().is_some()
}

/// The padded-plane geometry of one image for a stride-1 `kh × kw` convolution with zero
/// padding `pad` on every side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Planes {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub pad: usize,
    pub kh: usize,
    pub kw: usize,
}

impl Planes {
    /// Padded width `Wp`: the row stride of planes and of padded-width outputs. A row is
    /// `pad` zeros, its `W` values and `Wp − W − pad` zeros, so the zeros that end one row
    /// and begin the next serve as the right padding of the one and the left padding of
    /// the other: `Wp = W + p` (not `W + 2p`), unless the output row `W'` is wider (a
    /// padding of `kw` or more).
    pub fn wp(&self) -> usize {
        (self.w + self.pad).max(self.ow())
    }

    fn hp(&self) -> usize {
        self.h + 2 * self.pad
    }

    /// The zeros written after a row's values: up to the next row's values, or after the
    /// last row (`last`) to the end of the plane.
    pub(super) fn gap(&self, last: bool) -> usize {
        let between = self.wp() - self.w;
        if last {
            between - self.pad + self.pad * self.wp()
        } else {
            between
        }
    }

    /// Elements of one plane, `Hp·Wp`.
    pub fn plane(&self) -> usize {
        self.hp() * self.wp()
    }

    /// Output rows `H' = Hp − kh + 1` (the caller checks `kh ≤ Hp`).
    pub fn oh(&self) -> usize {
        self.hp() + 1 - self.kh
    }

    /// Output columns `W' = W + 2p − kw + 1`.
    pub fn ow(&self) -> usize {
        self.w + 2 * self.pad + 1 - self.kw
    }

    /// Padded-width output positions `H'·Wp`.
    fn q(&self) -> usize {
        self.oh() * self.wp()
    }

    /// Output channels per forward block for this geometry ([`block_co_for`] its positions).
    pub fn block_co(&self) -> usize {
        block_co_for(self.q())
    }

    /// Row stride of a padded-width output buffer: room for the last, partly dropped tile.
    pub fn out_stride(&self) -> usize {
        self.q().next_multiple_of(LANES) + MAX_TILE
    }

    /// Row stride of a padded-width output gradient for [`weight_grad`]: whole vectors.
    pub fn grad_stride(&self) -> usize {
        self.q().next_multiple_of(LANES)
    }

    /// Elements of the plane buffer: the planes and the slack the last tiles read into.
    pub fn len(&self) -> usize {
        self.c * self.plane() + self.kw + MAX_TILE + LANES
    }

    /// `offₜ` for the taps `t = (c, i, j)` in the weight's row-major order.
    pub fn offsets(&self) -> Vec<usize> {
        let (plane, wp) = (self.plane(), self.wp());
        let mut offs = Vec::with_capacity(self.c * self.kh * self.kw);
        for c in 0..self.c {
            for i in 0..self.kh {
                for j in 0..self.kw {
                    offs.push(c * plane + i * wp + j);
                }
            }
        }
        offs
    }

    /// Writes one image `src` (`[k, H, W]`, `k ≤ C` channels; `max(·, 0)` of it when
    /// `relu`) into the first `k` padded planes of `buf` with their zero borders, and zeroes
    /// the slack after the last plane; planes `k..C` are left to the caller. One sequential
    /// pass instead of a `memcpy`/`memset` call per row.
    pub fn fill(&self, buf: &mut [f32], src: &[f32], relu: bool) {
        let (hw, plen) = (self.h * self.w, self.len());
        assert!(available(), "direct conv needs AVX-512F or AVX2");
        assert!(hw > 0 && src.len().is_multiple_of(hw) && src.len() / hw <= self.c);
        assert!(buf.len() >= plen);
        let k = src.len() / hw;
        #[cfg(target_arch = "x86_64")]
        if isa() == Some(Isa::Avx2) {
            let planes = self.c * self.plane();
            // What the AVX2 fill may spill into: its k planes, and the slack (zeroed next)
            // when those are all the planes.
            let reach = if k == self.c { plen } else { k * self.plane() };
            let dst = buf[..plen].as_mut_ptr();
            // SAFETY: AVX2 and FMA are present; the fill writes below dst + reach ≤ dst + plen
            // and reads k·H·W = src.len() elements; the slack is [planes, plen) of `buf`.
            unsafe {
                avx2::fill(self, dst, reach, src.as_ptr(), k, relu);
                avx2::zero(dst.add(planes), plen - planes);
            }
            return;
        }
        let (planes, slack) = buf[..plen].split_at_mut(self.c * self.plane());
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F; `fill_avx512` writes exactly the first k planes of
        // `planes` (k·Hp·Wp ≤ its length) and reads k·H·W = src.len() elements; the slack is
        // zeroed within its own slice.
        unsafe {
            fill_avx512(self, planes.as_mut_ptr(), src.as_ptr(), k, relu);
            zero_run(slack.as_mut_ptr(), slack.len());
        }
    }
}

/// [`Planes::fill`] in one sequential pass over `k` planes at `dst`: the top border and
/// first left pad, then per row its values and the gap to the next row's values (the
/// zeros between them; after the last row, the rest of the plane, [`Planes::gap`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fill_avx512(p: &Planes, mut dst: *mut f32, mut src: *const f32, k: usize, relu: bool) {
    let (pad, wp, w, h) = (p.pad, p.wp(), p.w, p.h);
    let zero = _mm512_setzero_ps();
    let act = |v: __m512| if relu { _mm512_max_ps(v, zero) } else { v };
    for _ in 0..k {
        zero_run(dst, pad * wp + pad);
        dst = dst.add(pad * wp + pad);
        for y in 0..h {
            map_row(dst, src, w, act);
            (dst, src) = (dst.add(w), src.add(w));
            let gap = p.gap(y + 1 == h);
            zero_run(dst, gap);
            dst = dst.add(gap);
        }
    }
}

/// `dst[..n] ← 0` by vector stores (no `memset` call for the short runs of a border).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn zero_run(dst: *mut f32, n: usize) {
    let mut j = 0;
    while j + LANES <= n {
        _mm512_storeu_ps(dst.add(j), _mm512_setzero_ps());
        j += LANES;
    }
    if j < n {
        _mm512_mask_storeu_ps(dst.add(j), tail_mask(n - j), _mm512_setzero_ps());
    }
}

/// `dst[..n] ← f(src[..n])`, 16 lanes at a time: whole vectors, then one masked vector.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn map_row(dst: *mut f32, src: *const f32, n: usize, f: impl Fn(__m512) -> __m512) {
    let mut j = 0;
    while j + LANES <= n {
        _mm512_storeu_ps(dst.add(j), f(_mm512_loadu_ps(src.add(j))));
        j += LANES;
    }
    if j < n {
        let m = tail_mask(n - j);
        _mm512_mask_storeu_ps(dst.add(j), m, f(_mm512_maskz_loadu_ps(m, src.add(j))));
    }
}

/// The mask of the first `min(n, 16)` lanes.
#[cfg(target_arch = "x86_64")]
pub(super) fn tail_mask(n: usize) -> __mmask16 {
    ((1u32 << n.min(LANES)) - 1) as __mmask16
}

/// Copies `rows` rows of `w` floats: row i goes from `src[s..s + w]` to `dst[d..d + w]`,
/// plus `a` (and through `max(·, 0)` when `relu`), with `(d, s, a) = at(i)`. One call per
/// image, where a `copy_from_slice` per row would call `memcpy` for every short row.
pub(super) fn copy_rows(
    dst: &mut [f32],
    src: &[f32],
    rows: usize,
    w: usize,
    at: impl Fn(usize) -> (usize, usize, f32),
    relu: bool,
) {
    assert!(available(), "direct conv needs AVX-512F or AVX2");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has the ISA's features; the row slices are bounds-checked inside.
    unsafe {
        if isa() == Some(Isa::Avx2) {
            avx2::copy_rows(dst, src, rows, w, &at, relu)
        } else {
            copy_rows_avx512(dst, src, rows, w, &at, relu)
        }
    };
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn copy_rows_avx512(
    dst: &mut [f32],
    src: &[f32],
    rows: usize,
    w: usize,
    at: &impl Fn(usize) -> (usize, usize, f32),
    relu: bool,
) {
    let zero = _mm512_setzero_ps();
    for i in 0..rows {
        let (d, s, a) = at(i);
        let (dr, sr) = (dst[d..d + w].as_mut_ptr(), src[s..s + w].as_ptr());
        let av = _mm512_set1_ps(a);
        // max(v, 0) returns 0 for NaN, like the scalar `v > 0 ? v : 0` of the gemm path.
        map_row(dr, sr, w, |v| {
            let v = _mm512_add_ps(v, av);
            if relu {
                _mm512_max_ps(v, zero)
            } else {
                v
            }
        });
    }
}

/// A `[Co, K]` weight matrix repacked as consecutive `[K][m]` blocks of up to `block`
/// output channels ([`Planes::block_co`] of the planes it will run on), so the forward tile
/// broadcasts its `m` weights of one tap from one cache line.
pub(super) struct Packed {
    pub(super) co: usize,
    pub(super) k: usize,
    block: usize,
    pub(super) data: Vec<f32>,
}

impl Packed {
    pub fn new(w: &[f32], co: usize, k: usize, p: &Planes) -> Self {
        Self::for_positions(w, co, k, p.q())
    }

    /// Packed for [`conv_rows`] over `q` positions.
    pub fn for_positions(w: &[f32], co: usize, k: usize, q: usize) -> Self {
        assert_eq!(w.len(), co * k, "packed weights: {co}×{k} expected");
        let block = block_co_for(q);
        let mut data = Vec::with_capacity(w.len());
        for c0 in (0..co).step_by(block) {
            let m = block.min(co - c0);
            for t in 0..k {
                data.extend((0..m).map(|r| w[(c0 + r) * k + t]));
            }
        }
        Self { co, k, block, data }
    }
}

/// `out[co][q] = Σₜ W[co][t] · planes[offₜ + q]` for every q of `p`'s padded-width output
/// (and up to the next whole vector, into the stride's room). `out` is
/// `[Co][p.out_stride()]`.
pub(super) fn conv(planes: &[f32], p: &Planes, offs: &[usize], w: &Packed, out: &mut [f32]) {
    assert!(planes.len() >= p.len());
    assert_eq!(w.block, p.block_co(), "weights packed for these planes");
    conv_rows(planes, offs, w, out, p.out_stride(), p.q(), false);
}

/// The GEMM under [`conv`]: `out[co·rs + i] = Σₜ W[co][t] · x[offₜ + i]` for `i < q`,
/// computing (and writing) whole vectors up to `q` rounded up to 16; `w` packed for `q`
/// positions ([`Packed::for_positions`]).
///
/// `tiles_outer` runs each tile of positions through all full blocks of output channels
/// before the next tile, so the tile's inputs (`K` × 16R values) are read from L2 once
/// rather than once per block; for the row-Winograd GEMMs at 28×28 that was 0–5 % faster
/// on one core (`winograd::timing::winograd_phases`). Either order computes every output
/// with the same sum.
pub(super) fn conv_rows(
    x: &[f32],
    offs: &[usize],
    w: &Packed,
    out: &mut [f32],
    rs: usize,
    q: usize,
    tiles_outer: bool,
) {
    let qv = q.next_multiple_of(LANES);
    assert!(available(), "direct conv needs AVX-512F or AVX2");
    assert_eq!(offs.len(), w.k, "one offset per tap");
    assert_eq!(w.block, block_co_for(q), "weights packed for {q} positions");
    assert!(rs >= qv && (w.co == 0 || out.len() >= (w.co - 1) * rs + qv));
    // Every read is below offs.max() + qv ≤ x.len(), every write below (co − 1)·rs + qv.
    assert!(offs.iter().all(|&o| o + qv <= x.len()));
    #[cfg(target_arch = "x86_64")]
    if isa() == Some(Isa::Avx2) {
        // SAFETY: AVX2 and FMA are present; reads and writes are bounded as asserted above.
        unsafe { avx2::conv_rows(x.as_ptr(), offs, w, out.as_mut_ptr(), rs, q, tiles_outer) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // Full blocks run tile by tile when asked (and there are several); the rest, and
    // everything otherwise, block by block below.
    let full_blocks = match w.co / w.block {
        n if tiles_outer && n > 1 => n,
        _ => 0,
    };
    #[cfg(target_arch = "x86_64")]
    if full_blocks > 0 {
        let xp = x.as_ptr();
        // SAFETY: AVX-512F is present (asserted); the blocks' weights are inside `w.data`
        // and their tiles end at or below qv (asserted above).
        unsafe {
            if w.block == 8 {
                blocks_per_tile::<8, 3>(xp, offs, w, out.as_mut_ptr(), rs, q, full_blocks);
            } else {
                blocks_per_tile::<6, 4>(xp, offs, w, out.as_mut_ptr(), rs, q, full_blocks);
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    for c0 in (full_blocks * w.block..w.co).step_by(w.block) {
        let m = w.block.min(w.co - c0);
        let wb = w.data[c0 * w.k..(c0 + m) * w.k].as_ptr();
        let o = out[c0 * rs..].as_mut_ptr();
        let x = x.as_ptr();
        // SAFETY: AVX-512F is present (asserted); tiles end at or below qv, so reads and
        // writes stay inside the slices (asserted above).
        unsafe {
            match m {
                8 => conv_block::<8, 3>(x, offs, wb, o, rs, q),
                7 => conv_block::<7, 3>(x, offs, wb, o, rs, q),
                6 => conv_block::<6, 4>(x, offs, wb, o, rs, q),
                5 => conv_block::<5, 4>(x, offs, wb, o, rs, q),
                4 => conv_block::<4, 6>(x, offs, wb, o, rs, q),
                3 => conv_block::<3, 7>(x, offs, wb, o, rs, q),
                2 => conv_block::<2, 8>(x, offs, wb, o, rs, q),
                _ => conv_block::<1, 8>(x, offs, wb, o, rs, q),
            }
        }
    }
}

/// [`conv_rows`]' tiles-outer order: the first `blocks` blocks of `M` output channels,
/// each 16R-position tile through all of them before the next ([`conv_block`] on one
/// tile's positions).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn blocks_per_tile<const M: usize, const R: usize>(
    x: *const f32,
    offs: &[usize],
    w: &Packed,
    out: *mut f32,
    rs: usize,
    q: usize,
    blocks: usize,
) {
    for q0 in (0..q).step_by(LANES * R) {
        let n = (q - q0).min(LANES * R);
        for bl in 0..blocks {
            let wb = w.data.as_ptr().add(bl * M * w.k);
            conv_block::<M, R>(x.add(q0), offs, wb, out.add(bl * M * rs + q0), rs, n);
        }
    }
}

/// `M` output rows × `R` vectors per tile, tiles `q0 = 0, 16R, …` while `q0 < q`; the last
/// tile is cut to the vectors that reach `q` (on a 7×7 map, q = 63: 64 positions instead of
/// 96). Every output is the same sum in the same order whatever its tile, so the cut
/// changes no bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn conv_block<const M: usize, const R: usize>(
    x: *const f32,
    offs: &[usize],
    w: *const f32,
    out: *mut f32,
    rs: usize,
    q: usize,
) {
    let full = q / (LANES * R);
    for i in 0..full {
        conv_tile::<M, R>(x, offs, w, out, rs, i * LANES * R);
    }
    let q0 = full * LANES * R;
    // The rest, `q − q0 < 16R` positions, in whole vectors: R' ≤ R of them.
    match (q - q0).div_ceil(LANES) {
        0 => {}
        1 => conv_tile::<M, 1>(x, offs, w, out, rs, q0),
        2 => conv_tile::<M, 2>(x, offs, w, out, rs, q0),
        3 => conv_tile::<M, 3>(x, offs, w, out, rs, q0),
        4 => conv_tile::<M, 4>(x, offs, w, out, rs, q0),
        5 => conv_tile::<M, 5>(x, offs, w, out, rs, q0),
        6 => conv_tile::<M, 6>(x, offs, w, out, rs, q0),
        _ => conv_tile::<M, 7>(x, offs, w, out, rs, q0),
    }
}

/// One forward tile: `out[m·rs + q0 + i] = Σₜ w[t·M + m] · x[offₜ + q0 + i]` for `m < M`,
/// `i < 16R`, in `M·R` register accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::needless_range_loop)]
unsafe fn conv_tile<const M: usize, const R: usize>(
    x: *const f32,
    offs: &[usize],
    w: *const f32,
    out: *mut f32,
    rs: usize,
    q0: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); R]; M];
    let base = x.add(q0);
    let mut wt = w;
    for &off in offs {
        let src = base.add(off);
        let mut v = [_mm512_setzero_ps(); R];
        for r in 0..R {
            v[r] = _mm512_loadu_ps(src.add(LANES * r));
        }
        for m in 0..M {
            let b = _mm512_set1_ps(*wt.add(m));
            for r in 0..R {
                acc[m][r] = _mm512_fmadd_ps(b, v[r], acc[m][r]);
            }
        }
        wt = wt.add(M);
    }
    for m in 0..M {
        for r in 0..R {
            _mm512_storeu_ps(out.add(m * rs + q0 + LANES * r), acc[m][r]);
        }
    }
}

/// `dw[co][t] += Σₙ Σ_q gz[n][co][q] · planes[n][offₜ + q]` over `imgs` images: `planes`
/// holds `imgs` plane buffers of `p.len()`, `gz` as many `[Co][p.grad_stride()]` gradients,
/// zero wherever they are not a real output pixel; `dw` is `[Co][K]`.
pub(super) fn weight_grad(
    planes: &[f32],
    p: &Planes,
    offs: &[usize],
    gz: &[f32],
    imgs: usize,
    dw: &mut [f32],
) {
    let (gs, k, plen) = (p.grad_stride(), offs.len(), p.len());
    assert!(available(), "direct conv needs AVX-512F or AVX2");
    assert!(imgs > 0 && planes.len() >= imgs * plen && k > 0);
    assert!(gz.len().is_multiple_of(imgs * gs));
    let co = gz.len() / (imgs * gs);
    assert_eq!(dw.len(), co * k);
    assert!(offs.iter().all(|&o| o + gs <= plen));
    let strides = (plen, co * gs);
    #[cfg(target_arch = "x86_64")]
    if isa() == Some(Isa::Avx2) {
        // SAFETY: AVX2 and FMA are present; reads are bounded as asserted above.
        unsafe { avx2::weight_grad(planes, (plen, gs), offs, gz, imgs, dw) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    for c0 in (0..co).step_by(WG_CO) {
        let rows = WG_CO.min(co - c0);
        // Tiles at an edge repeat their last row / tap and drop the repeats.
        let g: [*const f32; WG_CO] =
            std::array::from_fn(|r| gz[(c0 + r.min(rows - 1)) * gs..].as_ptr());
        for t0 in (0..k).step_by(WG_TAPS) {
            let taps = WG_TAPS.min(k - t0);
            let x: [*const f32; WG_TAPS] =
                std::array::from_fn(|j| planes[offs[t0 + j.min(taps - 1)]..].as_ptr());
            // SAFETY: AVX-512F is present; for each image n < imgs, each row of `g` + n·Co·gs
            // has gs readable elements and each tap offset + n·plen + gs ≤ planes.len()
            // (asserted above).
            let sums = unsafe { weight_grad_tile(&g, &x, gs / LANES, imgs, strides) };
            for (r, row) in sums.iter().enumerate().take(rows) {
                let d = &mut dw[(c0 + r) * k + t0..(c0 + r) * k + t0 + taps];
                for (d, &s) in d.iter_mut().zip(row) {
                    *d += s;
                }
            }
        }
    }
}

/// The slice of `Gₙᵀ` that [`weight_grad_t`] keeps in L1 while it visits every input
/// channel.
const G_BLOCK_BYTES: usize = 32 << 10;

/// Channels per vector of the channel-vectorised weight gradient ([`weight_grad_t`]).
pub(super) const CO_LANES: usize = LANES;

/// `dwt[t][co] += Σ_{y < H', x < W'} planes[offₜ + y·Wp + x] · gt[(y·W' + x)·cs + co]`:
/// the weight gradient, transposed, vectorised over output channels. `gt` is `Gₙᵀ`
/// (`[H'W'][cs]`, `cs` a multiple of 16 with zero columns past Co) and `dwt` is `[K][cs]`.
/// Each tap's scalar is broadcast against 16-channel rows of `Gₙᵀ`, so no horizontal sum
/// is needed and every vector load is aligned to a row.
pub(super) fn weight_grad_t(
    planes: &[f32],
    p: &Planes,
    offs: &[usize],
    gt: &[f32],
    dwt: &mut [f32],
) {
    let (k, ohw, cs) = (
        offs.len(),
        p.oh() * p.ow(),
        gt.len() / (p.oh() * p.ow()).max(1),
    );
    assert!(available(), "direct conv needs AVX-512F or AVX2");
    assert!(cs % CO_LANES == 0 && gt.len() == ohw * cs && dwt.len() == k * cs && k > 0);
    assert!(planes.len() >= p.len() && offs.iter().all(|&o| o + p.q() <= p.len()));
    // Output rows go in blocks whose slice of Gᵀ (≤ G_BLOCK_BYTES) stays in L1 across all
    // taps (input channels, for the 3×3 tile).
    let (oh, ow, wp) = (p.oh(), p.ow(), p.wp());
    let rows = (G_BLOCK_BYTES / (ow * cs * 4).max(1)).clamp(1, oh.max(1));
    #[cfg(target_arch = "x86_64")]
    if isa() == Some(Isa::Avx2) {
        // SAFETY: AVX2 and FMA are present; reads and writes are bounded as asserted above.
        unsafe { avx2::weight_grad_t(planes, p, offs, gt, dwt, rows) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if p.kh == 3 && p.kw == 3 {
        // One channel's 9 taps per tile, addressed from one base pointer (on 14×14 and 7×7
        // maps 3–8 % faster than the generic 12-tap tile below, measured interleaved).
        for c0 in (0..cs).step_by(2 * CO_LANES) {
            for y0 in (0..oh).step_by(rows) {
                let y1 = (y0 + rows).min(oh);
                let g = gt[y0 * ow * cs + c0..].as_ptr();
                for c in 0..p.c {
                    let (x, d) = (
                        planes[offs[9 * c] + y0 * wp..].as_ptr(),
                        dwt[9 * c * cs + c0..].as_mut_ptr(),
                    );
                    // SAFETY: as below; the 9 taps of channel c are offs[9c] + i·Wp + j, and
                    // rows y0..y1 of them end below offs[9c] + q.
                    unsafe {
                        if cs - c0 >= 2 * CO_LANES {
                            weight_grad_t_3x3::<2>(x, g, cs, d, (y1 - y0, ow, wp))
                        } else {
                            weight_grad_t_3x3::<1>(x, g, cs, d, (y1 - y0, ow, wp))
                        }
                    }
                }
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    for c0 in (0..cs).step_by(4 * CO_LANES) {
        let cv = (cs - c0).min(4 * CO_LANES) / CO_LANES;
        // Taps at the end repeat the last one; the repeats are not stored.
        macro_rules! run {
            ($cv:literal, $nt:literal) => {
                for y0 in (0..oh).step_by(rows) {
                    let y1 = (y0 + rows).min(oh);
                    let g = gt[y0 * ow * cs + c0..].as_ptr();
                    for t0 in (0..k).step_by($nt) {
                        let taps = ($nt).min(k - t0);
                        let x: [*const f32; $nt] = std::array::from_fn(|j| {
                            planes[offs[t0 + j.min(taps - 1)] + y0 * wp..].as_ptr()
                        });
                        let d = dwt[t0 * cs + c0..].as_mut_ptr();
                        // SAFETY: AVX-512F is present; tap reads end below offₜ + q ≤
                        // planes.len(), `gt` reads below ohw·cs, `dwt` writes below
                        // (t0 + taps)·cs (all asserted above).
                        unsafe {
                            weight_grad_t_tile::<$cv, $nt>(&x, g, cs, d, taps, (y1 - y0, ow, wp))
                        }
                    }
                }
            };
        }
        match cv {
            4 => run!(4, 6),
            3 => run!(3, 8),
            2 => run!(2, 12),
            _ => run!(1, 24),
        }
    }
}

/// [`weight_grad_t`] for the 9 taps of one input channel of a 3×3 kernel (`x` at tap
/// (0, 0)) × `CV` channel vectors; added into `d` (9 rows `cs` apart).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)]
unsafe fn weight_grad_t_3x3<const CV: usize>(
    x: *const f32,
    g: *const f32,
    cs: usize,
    d: *mut f32,
    (oh, ow, wp): (usize, usize, usize),
) {
    let mut acc = [[_mm512_setzero_ps(); CV]; 9];
    for y in 0..oh {
        let (xr, gr) = (x.add(y * wp), g.add(y * ow * cs));
        for xx in 0..ow {
            let (xp, gp) = (xr.add(xx), gr.add(xx * cs));
            let mut gv = [_mm512_setzero_ps(); CV];
            for v in 0..CV {
                gv[v] = _mm512_loadu_ps(gp.add(CO_LANES * v));
            }
            for i in 0..3 {
                for j in 0..3 {
                    let b = _mm512_set1_ps(*xp.add(i * wp + j));
                    for v in 0..CV {
                        acc[3 * i + j][v] = _mm512_fmadd_ps(b, gv[v], acc[3 * i + j][v]);
                    }
                }
            }
        }
    }
    add_rows(d, cs, &acc, 9);
}

/// `CV` channel vectors × `NT` taps of [`weight_grad_t`]; the first `taps` rows are added
/// into `d` (rows `cs` apart).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)]
unsafe fn weight_grad_t_tile<const CV: usize, const NT: usize>(
    x: &[*const f32; NT],
    g: *const f32,
    cs: usize,
    d: *mut f32,
    taps: usize,
    (oh, ow, wp): (usize, usize, usize),
) {
    let mut acc = [[_mm512_setzero_ps(); CV]; NT];
    for y in 0..oh {
        for xx in 0..ow {
            let (q, gp) = (y * wp + xx, g.add((y * ow + xx) * cs));
            let mut gv = [_mm512_setzero_ps(); CV];
            for v in 0..CV {
                gv[v] = _mm512_loadu_ps(gp.add(CO_LANES * v));
            }
            for t in 0..NT {
                let b = _mm512_set1_ps(*x[t].add(q));
                for v in 0..CV {
                    acc[t][v] = _mm512_fmadd_ps(b, gv[v], acc[t][v]);
                }
            }
        }
    }
    add_rows(d, cs, &acc, taps);
}

/// `d[t·cs + 16v ..][..16] += acc[t][v]` for the first `rows` rows of a tile's accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn add_rows<const CV: usize, const N: usize>(
    d: *mut f32,
    cs: usize,
    acc: &[[__m512; CV]; N],
    rows: usize,
) {
    for (t, row) in acc.iter().enumerate().take(rows) {
        for (v, &a) in row.iter().enumerate() {
            let dp = d.add(t * cs + CO_LANES * v);
            _mm512_storeu_ps(dp, _mm512_add_ps(_mm512_loadu_ps(dp), a));
        }
    }
}

/// `Σₙ Σ_{v < nv} g[r][n·gstride + 16v ..][..16] · x[j][n·xstride + 16v ..][..16]` over
/// `imgs` images, for 4 rows × 4 taps, reduced to scalars once at the end.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)]
unsafe fn weight_grad_tile(
    g: &[*const f32; WG_CO],
    x: &[*const f32; WG_TAPS],
    nv: usize,
    imgs: usize,
    (xstride, gstride): (usize, usize),
) -> [[f32; WG_TAPS]; WG_CO] {
    let mut total = [[_mm512_setzero_ps(); WG_TAPS]; WG_CO];
    for n in 0..imgs {
        // One image per call keeps the accumulators in registers (a loop over images
        // around the vector loop made LLVM keep one on the stack).
        let part = weight_grad_tile_image(
            &g.map(|p| p.add(n * gstride)),
            &x.map(|p| p.add(n * xstride)),
            nv,
        );
        for r in 0..WG_CO {
            for j in 0..WG_TAPS {
                total[r][j] = _mm512_add_ps(total[r][j], part[r][j]);
            }
        }
    }
    let mut out = [[0.0; WG_TAPS]; WG_CO];
    for r in 0..WG_CO {
        for j in 0..WG_TAPS {
            out[r][j] = _mm512_reduce_add_ps(total[r][j]);
        }
    }
    out
}

/// One image of [`weight_grad_tile`], as vectors of 16 partial sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline(never)]
#[allow(clippy::needless_range_loop)]
unsafe fn weight_grad_tile_image(
    g: &[*const f32; WG_CO],
    x: &[*const f32; WG_TAPS],
    nv: usize,
) -> [[__m512; WG_TAPS]; WG_CO] {
    let mut acc = [[_mm512_setzero_ps(); WG_TAPS]; WG_CO];
    for v in 0..nv {
        let o = LANES * v;
        let mut gv = [_mm512_setzero_ps(); WG_CO];
        for r in 0..WG_CO {
            gv[r] = _mm512_loadu_ps(g[r].add(o));
        }
        for j in 0..WG_TAPS {
            let xv = _mm512_loadu_ps(x[j].add(o));
            for r in 0..WG_CO {
                acc[r][j] = _mm512_fmadd_ps(gv[r], xv, acc[r][j]);
            }
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward stride-1 zero-padded convolution of one image, in f64.
    fn naive(a: &[f32], w: &[f32], p: &Planes, co: usize) -> Vec<f64> {
        let (oh, ow) = (p.oh(), p.ow());
        let mut y = vec![0.0; co * oh * ow];
        for o in 0..co {
            for yy in 0..oh {
                for xx in 0..ow {
                    let mut s = 0.0;
                    for c in 0..p.c {
                        for i in 0..p.kh {
                            for j in 0..p.kw {
                                let (sy, sx) = (yy + i, xx + j);
                                if sy < p.pad
                                    || sx < p.pad
                                    || sy >= p.pad + p.h
                                    || sx >= p.pad + p.w
                                {
                                    continue;
                                }
                                let av = a[(c * p.h + sy - p.pad) * p.w + sx - p.pad] as f64;
                                let wv = w[((o * p.c + c) * p.kh + i) * p.kw + j] as f64;
                                s += av * wv;
                            }
                        }
                    }
                    y[(o * oh + yy) * ow + xx] = s;
                }
            }
        }
        y
    }

    fn fill(p: &Planes, a: &[f32]) -> Vec<f32> {
        // Garbage everywhere first: `fill` must write all of the border and slack.
        let mut buf = vec![f32::NAN; p.len()];
        p.fill(&mut buf, a, false);
        buf
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn block_sizes_avoid_one_vector_tiles() {
        // Padded-width positions H·(W + 1) of 3×3 padding-1 maps. 28×28: 51 vectors (8 × 3
        // leaves none); 14×14: 14 (leaves 2); 7×7: 4 (8 × 3 would leave 1, 6 × 4 leaves
        // none); 2×2: 1 vector either way.
        for (hw, block) in [(28, 8), (14, 8), (7, 6), (2, 8)] {
            let p = Planes {
                c: 1,
                h: hw,
                w: hw,
                pad: 1,
                kh: 3,
                kw: 3,
            };
            assert_eq!(p.q(), hw * (hw + 1));
            assert_eq!(block_co_avx512(p.q()), block, "{hw}×{hw}");
        }
    }

    #[test]
    fn forward_and_weight_gradient_match_the_definition() {
        if !available() {
            eprintln!("skipped: neither AVX-512F nor AVX2");
            return;
        }
        // Every forward block size (1..8 and 8 + remainder), square and non-square kernels,
        // padding 0 / 1 / 2, images narrower than a vector and taller than a tile.
        for (c, h, w, pad, kh, kw, co) in [
            (3, 5, 7, 1, 3, 3, 13),
            (2, 6, 6, 0, 1, 1, 5),
            (4, 7, 3, 1, 3, 3, 2),
            (2, 5, 5, 2, 5, 5, 3),
            (2, 5, 6, 0, 3, 1, 7),
            (3, 6, 5, 1, 2, 2, 1),
            (64, 14, 14, 1, 3, 3, 32),
            (5, 1, 1, 1, 3, 3, 6),
            (2, 3, 40, 1, 3, 3, 4),
            (3, 4, 5, 1, 3, 3, 40),
            (2, 3, 3, 0, 1, 1, 70),
            // 7×7 maps: 6-channel blocks of 6 × 4 tiles (13 = 6 + 6 + 1, 32 = 5·6 + 2).
            (3, 7, 7, 1, 3, 3, 13),
            (4, 7, 7, 1, 3, 3, 32),
            // Padding of kw or more: output rows wider than W + p.
            (2, 4, 5, 2, 1, 1, 3),
            (2, 3, 4, 3, 3, 3, 5),
        ] {
            let p = Planes {
                c,
                h,
                w,
                pad,
                kh,
                kw,
            };
            let k = c * kh * kw;
            let a = values(c * h * w, 7);
            let wt = values(co * k, 11);
            let planes = fill(&p, &a);
            let offs = p.offsets();
            let mut out = vec![f32::NAN; co * p.out_stride()];
            conv(&planes, &p, &offs, &Packed::new(&wt, co, k, &p), &mut out);
            let want = naive(&a, &wt, &p, co);
            let (oh, ow) = (p.oh(), p.ow());
            for o in 0..co {
                for y in 0..oh {
                    for x in 0..ow {
                        let got = out[o * p.out_stride() + y * p.wp() + x] as f64;
                        let e = want[(o * oh + y) * ow + x];
                        assert!(
                            (got - e).abs() < 1e-4 * (1.0 + e.abs()),
                            "{p:?} {o},{y},{x}: {got} vs {e}"
                        );
                    }
                }
            }
            // ∂W against the definition: Σ over output pixels of g · a(shifted).
            let g = values(co * oh * ow, 13);
            let mut gz = vec![0.0; co * p.grad_stride()];
            for o in 0..co {
                for y in 0..oh {
                    for x in 0..ow {
                        gz[o * p.grad_stride() + y * p.wp() + x] = g[(o * oh + y) * ow + x];
                    }
                }
            }
            let mut dw = vec![0.0; co * k];
            weight_grad(&planes, &p, &offs, &gz, 1, &mut dw);
            // Two images at once accumulate the sum of their gradients.
            let (a2, g2) = (values(c * h * w, 17), values(co * p.grad_stride(), 19));
            let g2: Vec<f32> = g2
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let q = i % p.grad_stride();
                    if q < p.q() && q % p.wp() < ow {
                        v
                    } else {
                        0.0
                    }
                })
                .collect();
            let mut dw2 = vec![0.0; co * k];
            weight_grad(&fill(&p, &a2), &p, &offs, &g2, 1, &mut dw2);
            let mut pair = vec![0.0; co * k];
            let both_planes = [planes.clone(), fill(&p, &a2)].concat();
            weight_grad(
                &both_planes,
                &p,
                &offs,
                &[gz.clone(), g2].concat(),
                2,
                &mut pair,
            );
            for ((&s, &d1), &d2) in pair.iter().zip(&dw).zip(&dw2) {
                assert!(
                    (s - d1 - d2).abs() < 1e-4 * (1.0 + s.abs()),
                    "{p:?} pair: {s} vs {d1} + {d2}"
                );
            }
            // The channel-vectorised kernel wants Gᵀ with 16-aligned rows.
            let cs = co.next_multiple_of(CO_LANES);
            let mut gt = vec![0.0; oh * ow * cs];
            for o in 0..co {
                for i in 0..oh * ow {
                    gt[i * cs + o] = g[o * oh * ow + i];
                }
            }
            let mut dwt = vec![0.0; k * cs];
            weight_grad_t(&planes, &p, &offs, &gt, &mut dwt);
            for o in 0..co {
                for c in 0..p.c {
                    for (i, j) in (0..p.kh).flat_map(|i| (0..p.kw).map(move |j| (i, j))) {
                        // ∂W[o][c,i,j] = Σ_{y,x} g[o][y][x] · a(c, y + i − p, x + j − p).
                        let mut e = 0.0;
                        for y in 0..oh {
                            for x in 0..ow {
                                let (sy, sx) = (y + i, x + j);
                                if sy < pad || sx < pad || sy >= pad + h || sx >= pad + w {
                                    continue;
                                }
                                let av = a[(c * h + sy - pad) * w + sx - pad] as f64;
                                e += g[(o * oh + y) * ow + x] as f64 * av;
                            }
                        }
                        let t = (c * p.kh + i) * p.kw + j;
                        for (got, how) in [(dw[o * k + t], "tile"), (dwt[t * cs + o], "ᵀ")] {
                            let got = got as f64;
                            assert!(
                                (got - e).abs() < 1e-4 * (1.0 + e.abs()),
                                "{p:?} ∂W {how} {o},{t}: {got} vs {e}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn copy_rows_copies_every_length() {
        if !available() {
            eprintln!("skipped: neither AVX-512F nor AVX2");
            return;
        }
        for w in 1..50 {
            let src = values(3 * w, 3);
            // Rows reversed into a buffer with one guard element after each row, plus 1.5.
            let mut dst = vec![9.0; 3 * (w + 1)];
            copy_rows(
                &mut dst,
                &src,
                3,
                w,
                |i| ((2 - i) * (w + 1), i * w, 1.5),
                false,
            );
            for i in 0..3 {
                let d = &dst[(2 - i) * (w + 1)..(3 - i) * (w + 1)];
                for (a, b) in d[..w].iter().zip(&src[i * w..(i + 1) * w]) {
                    assert_eq!(*a, b + 1.5);
                }
                assert_eq!(d[w], 9.0, "wrote past row {i} at width {w}");
            }
        }
    }

    #[test]
    fn fill_writes_border_interior_and_slack() {
        if !available() {
            eprintln!("skipped: neither AVX-512F nor AVX2");
            return;
        }
        // (C, H, W, padding, planes filled from `src`): some planes left to the caller, or
        // all of them (then the last row's spill lands in the slack); rows narrower than a
        // vector, exactly one, and one and a bit. Kernels of 2p + 1 (rows W + p apart), and
        // 1×1 ones, whose wider output rows (W + 2p) set the row stride.
        for ((c, h, w, pad, k), kw) in [
            (3, 5, 4, 2, 2),
            (2, 3, 13, 1, 2),
            (2, 4, 8, 1, 1),
            (1, 2, 7, 1, 1),
            (2, 6, 17, 1, 2),
            (2, 3, 5, 0, 1),
            (2, 3, 5, 0, 2),
        ]
        .into_iter()
        .flat_map(|s| [(s, 2 * s.3 + 1), (s, 1)])
        {
            let p = Planes {
                c,
                h,
                w,
                pad,
                kh: kw,
                kw,
            };
            assert_eq!(p.wp(), w + pad.max(2 * pad + 1 - kw));
            let src: Vec<f32> = (0..k * h * w).map(|i| i as f32 - 20.0).collect();
            for relu in [false, true] {
                // Garbage everywhere, and past the buffer's end, which must stay untouched.
                let mut buf = vec![f32::NAN; p.len() + 32];
                p.fill(&mut buf, &src, relu);
                for ch in 0..c {
                    for y in 0..p.hp() {
                        for x in 0..p.wp() {
                            let v = buf[ch * p.plane() + y * p.wp() + x];
                            let inside = (pad..pad + h).contains(&y) && (pad..pad + w).contains(&x);
                            if ch >= k {
                                assert!(v.is_nan(), "plane {ch} is the caller's");
                            } else if inside {
                                let s = src[(ch * h + y - pad) * w + x - pad];
                                assert_eq!(v, if relu { s.max(0.0) } else { s });
                            } else {
                                assert_eq!(v, 0.0, "border ({ch}, {y}, {x}) of {c}×{h}×{w}");
                            }
                        }
                    }
                }
                let (slack, past) = buf[c * p.plane()..].split_at(p.len() - c * p.plane());
                assert!(slack.iter().all(|&v| v == 0.0), "slack");
                assert!(past.iter().all(|v| v.is_nan()), "written past the buffer");
            }
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// The forward microkernel alone, on one core, on planes already in cache: GFLOP/s of
    /// the best of 15 timed batches (the least disturbed by other tenants of the host),
    /// counting every computed position and only the real ones.
    /// `cargo test --release --lib microkernel_rate -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn microkernel_rate() {
        if !available() {
            eprintln!("skipped: neither AVX-512F nor AVX2");
            return;
        }
        for (c, hw, co, kk) in [
            (64, 28, 32, 3),
            (64, 14, 32, 3),
            (64, 7, 32, 3),
            (16, 28, 32, 3),
            (192, 14, 4, 3),
            (64, 28, 2, 3),
            (192, 14, 192, 1),
            (192, 7, 192, 1),
            (64, 28, 64, 1),
        ] {
            let p = Planes {
                c,
                h: hw,
                w: hw,
                pad: kk / 2,
                kh: kk,
                kw: kk,
            };
            let planes: Vec<f32> = (0..p.len()).map(|i| (i % 7) as f32 * 0.1).collect();
            let k = c * kk * kk;
            let w: Vec<f32> = (0..co * k).map(|i| (i % 5) as f32 * 0.01).collect();
            let (wk, offs) = (Packed::new(&w, co, k, &p), p.offsets());
            let mut out = vec![0.0f32; co * p.out_stride()];
            // ≈ 0.2 GFLOP per batch.
            let reps = (1e8 / (co * k * p.q()) as f64) as usize + 1;
            let best = (0..15)
                .map(|_| {
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        conv(&planes, &p, &offs, &wk, &mut out);
                    }
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            let rate = |positions: usize| 2.0 * (co * k * positions * reps) as f64 / best / 1e9;
            eprintln!(
                "{c}→{co} {kk}×{kk} at {hw}×{hw} (planes {} KB): {:.1} GFLOP/s computed, {:.1} real",
                p.len() * 4 / 1024,
                rate(p.q()),
                rate(hw * hw)
            );
        }
    }
}
