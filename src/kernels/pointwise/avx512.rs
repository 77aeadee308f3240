//! The pointwise GEMM's AVX-512 tile: the AVX2 path's algorithm (the parent module) on
//! 16-lane vectors.
//!
//! `B` goes into aligned panels of 32 columns (two `zmm` vectors; 16 for a last remainder
//! of at most 16) and [`KC`] = 192 rows (24 KB; the AVX2 panel is 16 KB). Each panel goes
//! through every 6-row block of `A` with the same tile shape as on AVX2: 6 × 2
//! accumulators, two panel vectors and a broadcast (15 of the 32 `zmm` registers), 8 loads
//! per 12 FMAs. Partial panel rows and partial tiles use masked loads and stores, which
//! AVX-512 CPUs run at full speed (masked loads also zero the lanes past a row's end, so
//! the panel copy fills its last columns with zeros in the same pass). 192 rows keep
//! Glow's 1×1 layer (`K = 192`) in one block: in `conv_op_timings` on Zen 4 its forward
//! pass ran at 155–170 GFLOP/s with 192-row and 256-row panels and 158 with 128-row ones,
//! its 7×7 ∂x at 116–119 with 256-row panels (32 KB, all of Zen 4's L1) and 134–139
//! with 192-row ones.
//!
//! Every output is the same sum in the same order whatever its tile, panel or thread: the
//! products in increasing `k`, in blocks of `KC`, the first block's from the bias (or
//! zero) and each later block's from zero and then added. The blocks are shorter than
//! AVX2's, so the two kernel sets round differently (each is deterministic).

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::super::direct::tail_mask;
use super::{pack_t, Layout, Start, View, MR, PREFETCH_OWN_K};

/// f32 lanes per vector.
const L: usize = 16;
/// Columns per full panel: two vectors.
const NR: usize = 2 * L;
/// Rows of `B` per panel.
const KC: usize = 192;
// `pack_t` reads missing columns from a zero row of the AVX2 panel's height.
const _: () = assert!(KC <= super::KC);

/// A panel of `B`: `KC` rows of 32 values, 64-byte aligned; [`pack`] writes what a tile
/// reads, so it is never zeroed.
#[repr(C, align(64))]
struct Panel(MaybeUninit<[f32; KC * NR]>);

/// The lanes of a vector that hold columns `j0..j0 + 16` of a row of `cols` columns.
#[inline]
fn lanes(cols: usize, j0: usize) -> __mmask16 {
    tail_mask(cols.saturating_sub(j0))
}

/// `C = start + A·B` for `i < m`, `j < n` (see the parent module's `run`, which checks the
/// operands' extents).
///
/// # Safety
/// AVX-512F, AVX2 and FMA are present; `A` holds `m × k` values at row stride `a.rs`, `B`
/// `k × n` (or `n × k` for [`Layout::Transposed`]) at `b.rs`, and `out` `m` rows of `n`
/// values at row stride `ors`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn run(
    a: View,
    (b, layout): (View, Layout),
    (m, n, k): (usize, usize, usize),
    out: *mut f32,
    ors: usize,
    start: Start,
) {
    panel_loops!(a, b, layout, (m, n, k), out, ors, start; Panel, KC, NR, L, pack, tile);
}

/// `panel[r·w + j] = src[r·rs + j]` for `r < rows`, `j < cols`, zero for `cols ≤ j < w`
/// (`w` 16 or 32).
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn pack(src: *const f32, rs: usize, rows: usize, cols: usize, w: usize, dst: *mut f32) {
    let (m0, m1) = (lanes(cols, 0), lanes(cols, L));
    for r in 0..rows {
        let (s, d) = (src.add(r * rs), dst.add(r * w));
        // This row's line two panels on (see the AVX2 `pack`).
        _mm_prefetch::<_MM_HINT_T0>(s.wrapping_add(2 * w).cast());
        _mm512_store_ps(d, _mm512_maskz_loadu_ps(m0, s));
        if w == NR {
            _mm512_store_ps(d.add(L), _mm512_maskz_loadu_ps(m1, s.add(L)));
        }
    }
}

/// `c[i·rs + j] = start + Σ_{kk < k} rp[i][kk]·panel[kk·16R + j]` for `i < rows`,
/// `j < cols` (`cols ≤ 16R`), in `6·R` accumulators.
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
#[allow(clippy::needless_range_loop)]
unsafe fn tile<const R: usize>(
    rp: &[*const f32; MR],
    panel: *const f32,
    (c, pf): (*mut f32, *mut f32),
    rs: usize,
    (k, rows, cols): (usize, usize, usize),
    start: Start,
) {
    let w = L * R;
    let mut acc = [[_mm512_setzero_ps(); R]; MR];
    if let Start::Bias(bias) = start {
        for i in 0..MR {
            acc[i] = [_mm512_set1_ps(bias[i.min(rows - 1)]); R];
        }
    }
    for i in 0..MR {
        _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(i * rs).cast());
        _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(i * rs + w - 1).cast());
    }
    let mut p = panel;
    let mut kk = 0;
    // Four steps per iteration: the row pointers advance once per four broadcasts.
    while kk + 4 <= k {
        for u in 0..4 {
            let v: [__m512; R] = std::array::from_fn(|r| _mm512_load_ps(p.add(u * w + L * r)));
            for i in 0..MR {
                let s = _mm512_set1_ps(*rp[i].add(kk + u));
                for r in 0..R {
                    acc[i][r] = _mm512_fmadd_ps(s, v[r], acc[i][r]);
                }
            }
        }
        p = p.add(4 * w);
        kk += 4;
    }
    while kk < k {
        let v: [__m512; R] = std::array::from_fn(|r| _mm512_load_ps(p.add(L * r)));
        for i in 0..MR {
            let s = _mm512_set1_ps(*rp[i].add(kk));
            for r in 0..R {
                acc[i][r] = _mm512_fmadd_ps(s, v[r], acc[i][r]);
            }
        }
        p = p.add(w);
        kk += 1;
    }
    let add = matches!(start, Start::Add);
    let masks: [__mmask16; R] = std::array::from_fn(|r| lanes(cols, L * r));
    for i in 0..rows {
        let dst = c.add(i * rs);
        for r in 0..R {
            let d = dst.add(L * r);
            if cols == w {
                let v = if add {
                    _mm512_add_ps(_mm512_loadu_ps(d), acc[i][r])
                } else {
                    acc[i][r]
                };
                _mm512_storeu_ps(d, v);
            } else {
                let v = if add {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(masks[r], d), acc[i][r])
                } else {
                    acc[i][r]
                };
                _mm512_mask_storeu_ps(d, masks[r], v);
            }
        }
    }
}
