//! The direct and Winograd microkernels for CPUs with AVX2 and FMA but no AVX-512 (AMD Zen 1–3,
//! Intel client cores since Alder Lake): the same computations as the AVX-512 kernels in
//! `direct.rs` and `winograd.rs`, in 8-lane vectors and sized for 16 vector registers.
//!
//! The buffers keep the AVX-512 layout (rows and strides in whole 16-value vectors), which
//! are also whole 8-value vectors. Register tiles, with at most 16 registers live:
//! - forward ([`conv_rows`]): `M` output channels × `R` vectors of 8 positions with
//!   `M·R + min(M, R) + 1 ≤ 15` (6 × 2 for full blocks of [`BLOCK_CO`] channels; 4 × 2,
//!   3 × 3, 2 × 6 or 1 × 7 for the rest);
//! - weight gradient over positions ([`weight_grad`]): 4 output channels × 3 taps, 3 × 4, 2 × 6
//!   or 1 × 8, by the channel count;
//! - weight gradient over output channels ([`weight_grad_t`]): 6 taps × 16 channels.
//!
//! Results agree with the AVX-512 kernels to float rounding: the forward kernel and the
//! channel-vectorised weight gradient add the same terms in the same order, the
//! position-vectorised weight gradient reduces 8-lane partial sums that run across a
//! group's images instead of 16-lane ones per image, and
//! the Winograd transforms are the same arithmetic (the tests compare every kernel with
//! the im2col + GEMM path).
//!
//! Every function here is `unsafe`: the caller checks that the CPU has AVX2 and FMA
//! ([`super::isa::isa`]) and that every pointer reaches the elements it is documented
//! to read or write (the safe wrappers in `direct.rs` and `winograd.rs` assert that).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::direct::{Packed, Planes};
use super::winograd::Tiles;

/// f32 lanes per vector.
const L: usize = 8;
/// Output channels per full forward block.
pub(super) const BLOCK_CO: usize = 6;

/// The mask of lanes `first ≤ i < min(end, 8)` (all bits set in a selected lane).
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn lanes(first: usize, end: usize) -> __m256i {
    let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let lo = _mm256_set1_epi32(first.min(L) as i32 - 1);
    let hi = _mm256_set1_epi32(end.min(L) as i32);
    _mm256_and_si256(_mm256_cmpgt_epi32(idx, lo), _mm256_cmpgt_epi32(hi, idx))
}

/// `dst[..n] ← 0`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn zero_run(dst: *mut f32, n: usize) {
    let mut j = 0;
    while j + L <= n {
        _mm256_storeu_ps(dst.add(j), _mm256_setzero_ps());
        j += L;
    }
    if j < n {
        _mm256_maskstore_ps(dst.add(j), lanes(0, n - j), _mm256_setzero_ps());
    }
}

/// `dst[..n] ← f(src[..n])`: whole vectors, then one masked vector.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn map_row(dst: *mut f32, src: *const f32, n: usize, f: impl Fn(__m256) -> __m256) {
    let mut j = 0;
    while j + L <= n {
        _mm256_storeu_ps(dst.add(j), f(_mm256_loadu_ps(src.add(j))));
        j += L;
    }
    if j < n {
        let m = lanes(0, n - j);
        _mm256_maskstore_ps(dst.add(j), m, f(_mm256_maskload_ps(src.add(j), m)));
    }
}

/// [`Planes::fill`]: `k` planes at `dst` from `src` (`k·H·W` values), in one sequential
/// pass. The last vector of each run (a row's values, a border gap) is loaded and stored
/// whole, reading into the next row and writing up to 7 values into what the pass writes
/// next, rather than masked: masked loads and stores are slow on AMD Zen (see
/// [`output_transform`]), and on Glow's 14×14 and 7×7 maps, where every row ends in one,
/// this fill was 10.6 % of a training step's samples. Writes stay below `dst + reach` (the
/// caller zeroes anything there past the planes afterwards) and reads below the end of
/// `src`; a last vector that would cross either is masked.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn fill(
    p: &Planes,
    mut dst: *mut f32,
    reach: usize,
    mut src: *const f32,
    k: usize,
    relu: bool,
) {
    let end = dst.add(reach) as *const f32;
    let src_end = src.add(k * p.h * p.w);
    let (pad, wp, w, h) = (p.pad, p.wp(), p.w, p.h);
    let zero = _mm256_setzero_ps();
    let act = |v: __m256| if relu { _mm256_max_ps(v, zero) } else { v };
    for _ in 0..k {
        zero_run_spill(dst, pad * wp + pad, end);
        dst = dst.add(pad * wp + pad);
        for y in 0..h {
            map_row_spill(dst, (src, src_end), w, end, act);
            (dst, src) = (dst.add(w), src.add(w));
            let gap = p.gap(y + 1 == h);
            zero_run_spill(dst, gap, end);
            dst = dst.add(gap);
        }
    }
}

/// Whether a whole vector at `p` (`p ≤ end`) ends at or below `end`. Compared as addresses:
/// `p.add(L)` could point past the allocation, which `add` must not.
#[inline(always)]
fn vector_fits(p: *const f32, end: *const f32) -> bool {
    (end as usize).saturating_sub(p as usize) >= L * std::mem::size_of::<f32>()
}

/// [`zero_run`] with the last vector whole when it ends at or below `end`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn zero_run_spill(dst: *mut f32, n: usize, end: *const f32) {
    let mut j = 0;
    while j < n && vector_fits(dst.add(j), end) {
        _mm256_storeu_ps(dst.add(j), _mm256_setzero_ps());
        j += L;
    }
    if j < n {
        zero_run(dst.add(j), n - j);
    }
}

/// [`map_row`] with the last vector loaded whole when it ends at or below `src_end`, and
/// stored whole when it ends at or below `end`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn map_row_spill(
    dst: *mut f32,
    (src, src_end): (*const f32, *const f32),
    n: usize,
    end: *const f32,
    f: impl Fn(__m256) -> __m256,
) {
    let full = n / L * L;
    map_row(dst, src, full, &f);
    if full == n {
        return;
    }
    let (d, s) = (dst.add(full), src.add(full));
    let v = if vector_fits(s, src_end) {
        _mm256_loadu_ps(s)
    } else {
        _mm256_maskload_ps(s, lanes(0, n - full))
    };
    if vector_fits(d, end) {
        _mm256_storeu_ps(d, f(v));
    } else {
        _mm256_maskstore_ps(d, lanes(0, n - full), f(v));
    }
}

/// `dst[..n] ← 0`, for the planes' slack.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn zero(dst: *mut f32, n: usize) {
    zero_run(dst, n)
}

/// [`super::direct::copy_rows`]: row i of `w` values from `src + s` to `dst + d`, plus `a`
/// (then `max(·, 0)` when `relu`), `(d, s, a) = at(i)`; the row slices are bounds-checked.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn copy_rows(
    dst: &mut [f32],
    src: &[f32],
    rows: usize,
    w: usize,
    at: &impl Fn(usize) -> (usize, usize, f32),
    relu: bool,
) {
    let zero = _mm256_setzero_ps();
    for i in 0..rows {
        let (d, s, a) = at(i);
        let (dr, sr) = (dst[d..d + w].as_mut_ptr(), src[s..s + w].as_ptr());
        let av = _mm256_set1_ps(a);
        // max(v, 0) returns 0 for NaN, like the scalar `v > 0 ? v : 0` of the gemm path.
        map_row(dr, sr, w, |v| {
            let v = _mm256_add_ps(v, av);
            if relu {
                _mm256_max_ps(v, zero)
            } else {
                v
            }
        });
    }
}

/// [`super::direct::conv_rows`]: `out[co·rs + i] = Σₜ W[co][t] · x[offₜ + i]` for whole
/// vectors of `i` up to `q` rounded up to 8, `w` packed in blocks of [`BLOCK_CO`].
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn conv_rows(
    x: *const f32,
    offs: &[usize],
    w: &Packed,
    out: *mut f32,
    rs: usize,
    q: usize,
    tiles_outer: bool,
) {
    let full_blocks = match w.co / BLOCK_CO {
        n if tiles_outer && n > 1 => n,
        _ => 0,
    };
    if full_blocks > 0 {
        // Each 16-position tile through all full blocks before the next.
        for q0 in (0..q).step_by(2 * L) {
            let n = (q - q0).min(2 * L);
            for bl in 0..full_blocks {
                let wb = w.data.as_ptr().add(bl * BLOCK_CO * w.k);
                let o = out.add(bl * BLOCK_CO * rs + q0);
                conv_block::<BLOCK_CO, 2>(x.add(q0), offs, wb, o, rs, n);
            }
        }
    }
    for c0 in (full_blocks * BLOCK_CO..w.co).step_by(BLOCK_CO) {
        let m = BLOCK_CO.min(w.co - c0);
        let wb = w.data[c0 * w.k..(c0 + m) * w.k].as_ptr();
        let o = out.add(c0 * rs);
        // 16 live registers (4 × 3, 2 × 5) ran at half the rate of these tiles: 192 → 4 at
        // 14×14 went 36.9 → 61.3 GFLOP/s and 64 → 2 at 28×28 32.2 → 55.5
        // (`microkernel_rate`, one core).
        match m {
            6 => conv_block::<6, 2>(x, offs, wb, o, rs, q),
            5 => conv_block::<5, 2>(x, offs, wb, o, rs, q),
            4 => conv_block::<4, 2>(x, offs, wb, o, rs, q),
            3 => conv_block::<3, 3>(x, offs, wb, o, rs, q),
            2 => conv_block::<2, 6>(x, offs, wb, o, rs, q),
            _ => conv_block::<1, 7>(x, offs, wb, o, rs, q),
        }
    }
}

/// `M` output rows in tiles of `R` vectors while `q0 < q`, the last tile cut to the
/// vectors that reach `q`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn conv_block<const M: usize, const R: usize>(
    x: *const f32,
    offs: &[usize],
    w: *const f32,
    out: *mut f32,
    rs: usize,
    q: usize,
) {
    let full = q / (L * R);
    for i in 0..full {
        conv_tile::<M, R>(x, offs, w, out, rs, i * L * R);
    }
    let q0 = full * L * R;
    match (q - q0).div_ceil(L) {
        0 => {}
        1 => conv_tile::<M, 1>(x, offs, w, out, rs, q0),
        2 => conv_tile::<M, 2>(x, offs, w, out, rs, q0),
        3 => conv_tile::<M, 3>(x, offs, w, out, rs, q0),
        4 => conv_tile::<M, 4>(x, offs, w, out, rs, q0),
        5 => conv_tile::<M, 5>(x, offs, w, out, rs, q0),
        _ => conv_tile::<M, 6>(x, offs, w, out, rs, q0),
    }
}

/// One forward tile: `out[m·rs + q0 + i] = Σₜ w[t·M + m] · x[offₜ + q0 + i]`, `m < M`,
/// `i < 8R`, in `M·R` accumulators.
#[target_feature(enable = "avx2,fma")]
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
    let mut acc = [[_mm256_setzero_ps(); R]; M];
    let base = x.add(q0);
    let mut wt = w;
    for &off in offs {
        let src = base.add(off);
        // The shorter side's vectors stay in registers; the longer side's are loaded one at
        // a time (for 2 × 6: 12 accumulators + 2 weights + 1 input vector).
        if M < R {
            let mut b = [_mm256_setzero_ps(); M];
            for m in 0..M {
                b[m] = _mm256_broadcast_ss(&*wt.add(m));
            }
            for r in 0..R {
                let v = _mm256_loadu_ps(src.add(L * r));
                for m in 0..M {
                    acc[m][r] = _mm256_fmadd_ps(b[m], v, acc[m][r]);
                }
            }
        } else {
            let mut v = [_mm256_setzero_ps(); R];
            for r in 0..R {
                v[r] = _mm256_loadu_ps(src.add(L * r));
            }
            for m in 0..M {
                let b = _mm256_broadcast_ss(&*wt.add(m));
                for r in 0..R {
                    acc[m][r] = _mm256_fmadd_ps(b, v[r], acc[m][r]);
                }
            }
        }
        wt = wt.add(M);
    }
    for m in 0..M {
        for r in 0..R {
            _mm256_storeu_ps(out.add(m * rs + q0 + L * r), acc[m][r]);
        }
    }
}

/// [`super::direct::weight_grad`]: `dw[co][t] += Σₙ Σ_q gz[n][co][q] · planes[n][offₜ + q]`
/// over `imgs` images (`gs` positions per gradient row, `plen` per plane buffer), in tiles
/// of output channels × taps shaped to the channel count (see [`wg_rows`]).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn weight_grad(
    planes: &[f32],
    (plen, gs): (usize, usize),
    offs: &[usize],
    gz: &[f32],
    imgs: usize,
    dw: &mut [f32],
) {
    let co = dw.len() / offs.len();
    let block = wg_rows(co);
    for c0 in (0..co).step_by(block) {
        let tile = WgTile {
            planes,
            plen,
            gs,
            offs,
            gz,
            imgs,
            c0,
            rows: block.min(co - c0),
        };
        match tile.rows {
            4 => tile.run::<4, 3>(dw),
            3 => tile.run::<3, 4>(dw),
            2 => tile.run::<2, 6>(dw),
            _ => tile.run::<1, 8>(dw),
        }
    }
}

/// Output channels per tile of [`weight_grad`] for `co` channels: 4 (× 3 taps) or 3 (× 4
/// taps), whichever divides `co`, so that no tile computes rows it drops (Glow's 192 → 4
/// output convolution ran 3 + 1 rows, a third of its second tile's work wasted); a last
/// tile of 1 or 2 rows uses 1 × 8 or 2 × 6. Every tile keeps 12 (1 × 8: 8) accumulators and
/// the loads of its shorter side in registers, at most 16.
fn wg_rows(co: usize) -> usize {
    if !co.is_multiple_of(4) && co.is_multiple_of(3) {
        3
    } else {
        4
    }
}

/// One block of `rows` output channels from `c0` of [`weight_grad`].
struct WgTile<'a> {
    planes: &'a [f32],
    plen: usize,
    gs: usize,
    offs: &'a [usize],
    gz: &'a [f32],
    imgs: usize,
    c0: usize,
    rows: usize,
}

impl WgTile<'_> {
    /// The block in tiles of `RC` channels (≥ `rows`; the extra ones repeat the last row
    /// and are not stored) × `TP` taps (the last tile repeats its last tap likewise).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run<const RC: usize, const TP: usize>(&self, dw: &mut [f32]) {
        let (k, co, gs, rows) = (
            self.offs.len(),
            dw.len() / self.offs.len(),
            self.gs,
            self.rows,
        );
        let g: [*const f32; RC] =
            std::array::from_fn(|r| self.gz[(self.c0 + r.min(rows - 1)) * gs..].as_ptr());
        for t0 in (0..k).step_by(TP) {
            let taps = TP.min(k - t0);
            let x: [*const f32; TP] =
                std::array::from_fn(|j| self.planes[self.offs[t0 + j.min(taps - 1)]..].as_ptr());
            let total = weight_grad_tile::<RC, TP>(&g, &x, gs / L, self.imgs, (co * gs, self.plen));
            for (r, row) in total.iter().enumerate().take(rows) {
                for (j, &v) in row.iter().enumerate().take(taps) {
                    dw[(self.c0 + r) * k + t0 + j] += sum(v);
                }
            }
        }
    }
}

/// The eight lanes of `v` added up.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn sum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

/// One [`weight_grad`] tile over `imgs` images (`g` and `x` advance by `gstride` and
/// `xstride` per image), as vectors of 8 partial sums that run on across the images, in
/// image order. The shorter side's vectors (gradient rows or taps) are loaded once per
/// position vector and kept in registers; the longer side's are loaded one at a time.
/// (Returning one image's sums per call, to be added up by the caller, cost 40–50 cycles
/// per image and tile, against 48 for the loop itself on a 7×7 map: Glow's 192 → 8 ∂W at
/// 7×7 ran at 36 instead of 55 GFLOP/s, `conv_op_timings`.)
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
#[allow(clippy::needless_range_loop)]
unsafe fn weight_grad_tile<const RC: usize, const TP: usize>(
    g: &[*const f32; RC],
    x: &[*const f32; TP],
    nv: usize,
    imgs: usize,
    (gstride, xstride): (usize, usize),
) -> [[__m256; TP]; RC] {
    let mut acc = [[_mm256_setzero_ps(); TP]; RC];
    let (mut g, mut x) = (*g, *x);
    for _ in 0..imgs {
        for v in 0..nv {
            let o = L * v;
            if RC <= TP {
                let mut gv = [_mm256_setzero_ps(); RC];
                for r in 0..RC {
                    gv[r] = _mm256_loadu_ps(g[r].add(o));
                }
                for j in 0..TP {
                    let xv = _mm256_loadu_ps(x[j].add(o));
                    for r in 0..RC {
                        acc[r][j] = _mm256_fmadd_ps(gv[r], xv, acc[r][j]);
                    }
                }
            } else {
                let mut xv = [_mm256_setzero_ps(); TP];
                for j in 0..TP {
                    xv[j] = _mm256_loadu_ps(x[j].add(o));
                }
                for r in 0..RC {
                    let gv = _mm256_loadu_ps(g[r].add(o));
                    for j in 0..TP {
                        acc[r][j] = _mm256_fmadd_ps(gv, xv[j], acc[r][j]);
                    }
                }
            }
        }
        g = g.map(|p| p.add(gstride));
        x = x.map(|p| p.add(xstride));
    }
    acc
}

/// [`super::direct::weight_grad_t`]: `dwt[t][co] += Σ planes[offₜ + y·Wp + x] ·
/// gt[(y·W' + x)·cs + co]`, output rows in blocks of `rows`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn weight_grad_t(
    planes: &[f32],
    p: &Planes,
    offs: &[usize],
    gt: &[f32],
    dwt: &mut [f32],
    rows: usize,
) {
    let (k, oh, ow, wp) = (offs.len(), p.oh(), p.ow(), p.wp());
    let cs = dwt.len() / k;
    // 6 taps × 16 output channels per tile (`cs` is a multiple of 16); taps at the end
    // repeat the last one and the repeats are not stored. 3×3 kernels too: a tile of one
    // input channel's 9 taps × 8 channels (9 accumulators, a broadcast per FMA: 10 loads
    // per 9 FMAs, against 8 per 12 here) was 7–24 % slower in 19 of 20 comparisons (5
    // shapes from 7×7 to 28×28, 4 runs of one process alternating the two, best of 8 each;
    // e.g. 64 → 64 at 7×7 52.2 vs 61.8 GFLOP/s, 48 → 48 at 14×14 80.3 vs 96.9), with
    // bit-identical sums.
    const NT: usize = 6;
    for c0 in (0..cs).step_by(2 * L) {
        for y0 in (0..oh).step_by(rows) {
            let y1 = (y0 + rows).min(oh);
            let g = gt[y0 * ow * cs + c0..].as_ptr();
            for t0 in (0..k).step_by(NT) {
                let taps = NT.min(k - t0);
                let x: [*const f32; NT] = std::array::from_fn(|j| {
                    planes[offs[t0 + j.min(taps - 1)] + y0 * wp..].as_ptr()
                });
                let d = dwt[t0 * cs + c0..].as_mut_ptr();
                weight_grad_t_tile(&x, g, cs, d, taps, (y1 - y0, ow, wp));
            }
        }
    }
}

/// `NT` taps × 16 output channels of [`weight_grad_t`]; the first `taps` rows are added into
/// `d` (rows `cs` apart).
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::needless_range_loop)]
unsafe fn weight_grad_t_tile<const NT: usize>(
    x: &[*const f32; NT],
    g: *const f32,
    cs: usize,
    d: *mut f32,
    taps: usize,
    (oh, ow, wp): (usize, usize, usize),
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; NT];
    for y in 0..oh {
        for xx in 0..ow {
            let (q, gp) = (y * wp + xx, g.add((y * ow + xx) * cs));
            let gv = [_mm256_loadu_ps(gp), _mm256_loadu_ps(gp.add(L))];
            for t in 0..NT {
                let b = _mm256_broadcast_ss(&*x[t].add(q));
                for v in 0..2 {
                    acc[t][v] = _mm256_fmadd_ps(b, gv[v], acc[t][v]);
                }
            }
        }
    }
    for (t, row) in acc.iter().enumerate().take(taps) {
        for (v, &a) in row.iter().enumerate() {
            let dp = d.add(t * cs + L * v);
            _mm256_storeu_ps(dp, _mm256_add_ps(_mm256_loadu_ps(dp), a));
        }
    }
}

/// Zeroes the `tw` tiles of one padded row of `V` in each of the `nxi` ξ blocks (`xs` apart).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn zero_v_row(dst: *mut f32, tw: usize, xs: usize, nxi: usize) {
    for xi in 0..nxi {
        zero_run(dst.add(xi * xs), tw);
    }
}

/// The Winograd input transform of the `h` rows of `w` values of plane `a`, row r's tiles
/// stored at `dst + r·tw + ξ·xs`; each row is read as if zero-padded by one on each side,
/// 8 tiles per vector: a vector inside the row is loaded as it is, one that reaches past
/// the row but stays inside the plane is loaded whole and its outside columns zeroed, and
/// only one that would leave the plane (the first and last rows' ends) is a masked load.
/// (All loads masked, per image on one core, `winograd::timing::winograd_phases`: 96 → 48
/// at 14×14 took 50–60 µs, now 36–38; 128 → 64 at 7×7 33–35, now 26–27; 32 → 64 at 28×28
/// 24–26, now 21. The zeroed columns are +0.0 either way, so the values are the same.)
///
/// Stores are whole vectors (masked stores are slow on AMD cores: the input transform took
/// 110 instead of 40 µs per 28×28 image of 64 channels, `winograd::timing`) where rows
/// hold at least a vector: a row's last vector then spills up to 7 values past its `tw`
/// tiles into the next row, which is written after it (vectors go right to left, rows top
/// to bottom). The last row's stores, and all of them on narrower maps, are masked.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn transform_rows(a: *const f32, h: usize, w: usize, dst: *mut f32, xs: usize) {
    let tw = w.div_ceil(2);
    // Padded columns s … s + 7, i.e. a[s − 1 …], inside 0 … w − 1.
    let inside = |s: usize| lanes(1usize.saturating_sub(s), (w + 1).saturating_sub(s));
    let plane_end = a.wrapping_add(h * w);
    for tx0 in (0..tw).step_by(L).rev() {
        let mask = lanes(0, tw - tx0);
        let s = 2 * tx0;
        let at = [s, s + L, s + 2, s + L + 2];
        let m = at.map(inside);
        // Loads whose 8 columns all lie in the row need no mask.
        let in_row = at.map(|p| p >= 1 && p + L <= w + 1);
        for r in 0..h {
            let row = a.wrapping_add(r * w).wrapping_sub(1);
            let [lo, hi, lo2, hi2]: [__m256; 4] = std::array::from_fn(|k| {
                let p = row.wrapping_add(at[k]);
                if in_row[k] {
                    _mm256_loadu_ps(p)
                } else if p >= a && vector_fits(p, plane_end) {
                    // Whole inside the plane: a plain load, then the columns outside the
                    // row zeroed.
                    _mm256_and_ps(_mm256_loadu_ps(p), _mm256_castsi256_ps(m[k]))
                } else {
                    _mm256_maskload_ps(p, m[k])
                }
            });
            // Columns 2tx, 2tx+1, 2tx+2, 2tx+3 for 8 tiles.
            let [d0, d1] = deinterleave(lo, hi);
            let [d2, d3] = deinterleave(lo2, hi2);
            let t = [
                _mm256_sub_ps(d0, d2),
                _mm256_add_ps(d1, d2),
                _mm256_sub_ps(d2, d1),
                _mm256_sub_ps(d1, d3),
            ];
            let d = dst.add(r * tw + tx0);
            for (xi, &val) in t.iter().enumerate() {
                if r + 1 < h && tw >= L {
                    _mm256_storeu_ps(d.add(xi * xs), val);
                } else {
                    _mm256_maskstore_ps(d.add(xi * xs), mask, val);
                }
            }
        }
    }
}

/// The even and the odd lanes of the 16 values `a ‖ b`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn deinterleave(a: __m256, b: __m256) -> [__m256; 2] {
    // Within each 128-bit half: a0 a2 b0 b2 | a4 a6 b4 b6, then the 64-bit pairs reordered.
    let even = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
    let odd = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
    let fix =
        |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)));
    [fix(even), fix(odd)]
}

/// `e₀ o₀ e₁ o₁ …` as two vectors.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn interleave(e: __m256, o: __m256) -> [__m256; 2] {
    let (lo, hi) = (_mm256_unpacklo_ps(e, o), _mm256_unpackhi_ps(e, o));
    [
        _mm256_permute2f128_ps::<0x20>(lo, hi),
        _mm256_permute2f128_ps::<0x31>(lo, hi),
    ]
}

/// The Winograd output transform `y = Aᵀ M` (+ bias) of `co` channels: `m` as laid out by
/// [`Tiles`], `y` `[Co][H][W]`. Where rows hold at least a vector, each ends in a
/// whole-vector store spilling into the next row, which is written after it; the very last
/// row's stores, and all of them on narrower maps, are masked.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn output_transform(
    m: *const f32,
    co: usize,
    tl: &Tiles,
    (ms, xs): (usize, usize),
    bias: Option<&[f32]>,
    y: *mut f32,
) {
    let (h, w, tw) = (tl.h, tl.w, tl.tw);
    for o in 0..co {
        let bv = _mm256_set1_ps(bias.map_or(0.0, |b| b[o]));
        for r in 0..h {
            let src = m.add(o * ms + r * tw);
            let dst = y.add((o * h + r) * w);
            for tx0 in (0..tw).step_by(L) {
                let mask = lanes(0, tw - tx0);
                let t: [__m256; 4] =
                    std::array::from_fn(|xi| _mm256_maskload_ps(src.add(xi * xs + tx0), mask));
                let even = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(t[0], t[1]), t[2]), bv);
                let odd = _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(t[1], t[2]), t[3]), bv);
                let cols = w - 2 * tx0;
                let d = dst.add(2 * tx0);
                let [lo, hi] = interleave(even, odd);
                if (o + 1 < co || r + 1 < h) && w >= L {
                    _mm256_storeu_ps(d, lo);
                    if cols > L {
                        _mm256_storeu_ps(d.add(L), hi);
                    }
                } else {
                    _mm256_maskstore_ps(d, lanes(0, cols), lo);
                    if cols > L {
                        _mm256_maskstore_ps(d.add(L), lanes(0, cols - L), hi);
                    }
                }
            }
        }
    }
}
