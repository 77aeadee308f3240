//! The input and output transforms of Winograd F(4, 3) along rows, in AVX2 + FMA (8-lane)
//! vectors. The GEMMs between them are the same as F(2, 3)'s (module `winograd`); only the
//! tiles differ: four output pixels per tile, `tw = ⌈W/4⌉` tiles per row, six transformed
//! values per tile (1.5 multiplications per output pixel and kernel row instead of 2), and a
//! transformed input 1.5× the size of the input instead of 2×. With the points 0, ±1, ±2, ∞:
//!
//! ```text
//! Bᵀ = ⎡4  0 −5  0  1  0⎤   G = ⎡ 1/4    0     0 ⎤   Aᵀ = ⎡1 1  1 1  1 0⎤
//!      ⎢0 −4 −4  1  1  0⎥       ⎢−1/6 −1/6  −1/6 ⎥        ⎢0 1 −1 2 −2 0⎥
//!      ⎢0  4 −4 −1  1  0⎥       ⎢−1/6  1/6  −1/6 ⎥        ⎢0 1  1 4  4 0⎥
//!      ⎢0 −2 −1  2  1  0⎥       ⎢1/24 1/12   1/6 ⎥        ⎣0 1 −1 8 −8 1⎦
//!      ⎢0  2 −1 −2  1  0⎥       ⎢1/24 −1/12  1/6 ⎥
//!      ⎣0  4  0 −5  0  1⎦       ⎣  0    0     1  ⎦
//! ```
//!
//! Unlike F(2, 3)'s transforms these multiply (by 2, 4, 5 and 8, and the weights by 1/6 and
//! 1/24), so the result differs from the direct convolution by a few more ulps.
//!
//! Eight tiles per vector, tiles `tx₀ … tx₀+7` in lane order. Tile `t` reads padded
//! columns `4t … 4t+5`. Each vector `x_k` is two 4-column halves, columns `s + 4k …` (tiles
//! `0…3`'s) and `s + 16 + 4k …` (tiles `4…7`'s), `s = 4tx₀`; an in-lane 4×4 transpose of
//! `x₀ … x₃` gives `d₀ … d₃` with the tiles in order, and of `x₁, x₂, x₃` and the halves at
//! `s + 16` and `s + 32` (the next tiles' first columns) `d₄, d₅`. The output transform
//! undoes the same transpose. No lane crosses a 128-bit half except in the four stores'
//! half swaps.
//!
//! Every function is `unsafe`: the caller checks that the CPU has AVX2 and FMA and that the
//! pointers reach what each function documents.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
use crate::kernels::avx2::lanes;

/// f32 lanes per vector.
const L: usize = 8;
/// Output pixels per tile.
pub(super) const N: usize = 4;
/// Transformed values per tile.
const XI: usize = N + 2;

/// `G`, the weight transform (rows: the six transformed positions; columns: the taps).
pub(super) const GM: [[f32; 3]; XI] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// In-lane transpose of four vectors: lane `4h + j` of output `i` is lane `4h + i` of
/// input `j` (the 4×4 blocks of each 128-bit half transposed).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn transpose4([x0, x1, x2, x3]: [__m256; 4]) -> [__m256; 4] {
    let (t0, t1) = (_mm256_unpacklo_ps(x0, x1), _mm256_unpackhi_ps(x0, x1));
    let (t2, t3) = (_mm256_unpacklo_ps(x2, x3), _mm256_unpackhi_ps(x2, x3));
    [
        _mm256_shuffle_ps::<0x44>(t0, t2),
        _mm256_shuffle_ps::<0xEE>(t0, t2),
        _mm256_shuffle_ps::<0x44>(t1, t3),
        _mm256_shuffle_ps::<0xEE>(t1, t3),
    ]
}

/// `Bᵀ·[d₀ … d₅]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn bt([d0, d1, d2, d3, d4, d5]: [__m256; 6]) -> [__m256; 6] {
    let (four, five, two) = (
        _mm256_set1_ps(4.0),
        _mm256_set1_ps(5.0),
        _mm256_set1_ps(2.0),
    );
    let (s12, s34) = (_mm256_add_ps(d1, d2), _mm256_add_ps(d3, d4));
    let (d12, d43) = (_mm256_sub_ps(d1, d2), _mm256_sub_ps(d4, d3));
    let (d31, d42) = (_mm256_sub_ps(d3, d1), _mm256_sub_ps(d4, d2));
    [
        _mm256_fmadd_ps(four, d0, _mm256_fnmadd_ps(five, d2, d4)),
        _mm256_fnmadd_ps(four, s12, s34),
        _mm256_fmadd_ps(four, d12, d43),
        _mm256_fmadd_ps(two, d31, d42),
        _mm256_fnmadd_ps(two, d31, d42),
        _mm256_fmadd_ps(four, d1, _mm256_fnmadd_ps(five, d3, d5)),
    ]
}

/// The F(4, 3) input transform of the `h` rows of `w` values of plane `a`: row r's tiles at
/// `dst + r·tw + ξ·xs`, each row read as if zero-padded by one column on each side (and by
/// up to 8 past its end, for the last tile's `d₄, d₅` and the tiles a vector has past
/// `tw`).
///
/// Loads: a half inside the row is loaded as it is; a vector that reaches outside the row
/// but not outside the plane is loaded whole and its outside columns zeroed; only one that
/// would leave the plane is a masked load. Stores are whole vectors wherever the vector
/// ends inside the plane's `h + 1` rows: the columns past `tw` fall on tiles of later rows,
/// which are written after it (vectors go right to left, rows top to bottom), or on padded
/// row `h + 1`, which the caller writes after this. The rest are masked.
///
/// Reads `a[..h·w]`; writes `dst[ξ·xs + (r·tw + tx)]` for `ξ < 6`, `r ≤ h`, `tx < tw` only.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn transform_rows(a: *const f32, h: usize, w: usize, dst: *mut f32, xs: usize) {
    let tw = w.div_ceil(N);
    let plane_end = a.wrapping_add(h * w);
    for tx0 in (0..tw).step_by(L).rev() {
        let s = N * tx0;
        // The two halves' first padded columns of x₀ … x₃ and of the d₄/d₅ vector.
        let at: [(usize, usize); 5] = std::array::from_fn(|k| (s + 4 * k, s + 16 + 4 * k));
        // The lanes of padded columns p … p + 3 (image columns p − 1 …) inside 0 … w − 1.
        let inside4 = |p: usize| {
            _mm256_castsi256_si128(lanes(1usize.saturating_sub(p), (w + 1).saturating_sub(p)))
        };
        let masks =
            at.map(|(lo, hi)| _mm256_castsi256_ps(_mm256_set_m128i(inside4(hi), inside4(lo))));
        let in_row = at.map(|(lo, hi)| lo >= 1 && hi + 4 <= w + 1);
        let mask = lanes(0, tw - tx0);
        for r in 0..h {
            let row = a.wrapping_add(r * w).wrapping_sub(1);
            let x: [__m256; 5] = std::array::from_fn(|k| {
                let (lo, hi) = (row.wrapping_add(at[k].0), row.wrapping_add(at[k].1));
                if in_row[k] {
                    _mm256_loadu2_m128(hi, lo)
                } else if lo >= a && hi.wrapping_add(4) <= plane_end {
                    _mm256_and_ps(_mm256_loadu2_m128(hi, lo), masks[k])
                } else {
                    let m = _mm256_castps_si256(masks[k]);
                    _mm256_set_m128(
                        _mm_maskload_ps(hi, _mm256_extracti128_si256::<1>(m)),
                        _mm_maskload_ps(lo, _mm256_castsi256_si128(m)),
                    )
                }
            });
            let [d0, d1, d2, d3] = transpose4([x[0], x[1], x[2], x[3]]);
            let [d4, d5, _, _] = transpose4([x[1], x[2], x[3], x[4]]);
            let t = bt([d0, d1, d2, d3, d4, d5]);
            let d = dst.add(r * tw + tx0);
            let whole = r * tw + tx0 + L <= (h + 1) * tw;
            for (xi, &val) in t.iter().enumerate() {
                if whole {
                    _mm256_storeu_ps(d.add(xi * xs), val);
                } else {
                    _mm256_maskstore_ps(d.add(xi * xs), mask, val);
                }
            }
        }
    }
}

/// The F(4, 3) output transform `y = Aᵀ M` (+ bias) of `co` channels: `m` laid out as
/// [`super::Tiles`] says for `N = 4` (row stride `ms`, ξ stride `xs`), `y` `[Co][H][W]`.
/// The six `M` vectors are loaded whole (the lanes past `tw` read the next row's tiles or
/// the ξ block's slack, and are dropped). Where rows hold at least a vector, each ends in a
/// whole-vector store spilling into the next row, which is written after it; the very last
/// row's stores, and all of them on narrower maps, are masked.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn output_transform(
    m: *const f32,
    co: usize,
    tl: &super::Tiles,
    (ms, xs): (usize, usize),
    bias: Option<&[f32]>,
    y: *mut f32,
) {
    let (h, w, tw) = (tl.h, tl.w, tl.tw);
    let (two, four, eight) = (
        _mm256_set1_ps(2.0),
        _mm256_set1_ps(4.0),
        _mm256_set1_ps(8.0),
    );
    for o in 0..co {
        let bv = _mm256_set1_ps(bias.map_or(0.0, |b| b[o]));
        for r in 0..h {
            let src = m.add(o * ms + r * tw);
            let dst = y.add((o * h + r) * w);
            let whole = (o + 1 < co || r + 1 < h) && w >= L;
            for tx0 in (0..tw).step_by(L) {
                let t: [__m256; XI] =
                    std::array::from_fn(|xi| _mm256_loadu_ps(src.add(xi * xs + tx0)));
                let (p, q) = (_mm256_add_ps(t[1], t[2]), _mm256_sub_ps(t[1], t[2]));
                let (u, v) = (_mm256_add_ps(t[3], t[4]), _mm256_sub_ps(t[3], t[4]));
                let pb = _mm256_add_ps(p, bv);
                let qb = _mm256_add_ps(q, bv);
                let ys = [
                    _mm256_add_ps(_mm256_add_ps(t[0], u), pb),
                    _mm256_fmadd_ps(two, v, qb),
                    _mm256_fmadd_ps(four, u, pb),
                    _mm256_fmadd_ps(eight, v, _mm256_add_ps(qb, t[5])),
                ];
                // z_k: tile k's four pixels | tile 4 + k's.
                let z = transpose4(ys);
                let out = [
                    _mm256_permute2f128_ps::<0x20>(z[0], z[1]),
                    _mm256_permute2f128_ps::<0x20>(z[2], z[3]),
                    _mm256_permute2f128_ps::<0x31>(z[0], z[1]),
                    _mm256_permute2f128_ps::<0x31>(z[2], z[3]),
                ];
                let cols = w - N * tx0;
                let d = dst.add(N * tx0);
                for (k, &val) in out.iter().enumerate() {
                    if k * L >= cols {
                        break;
                    }
                    if whole || (k + 1) * L <= cols {
                        _mm256_storeu_ps(d.add(k * L), val);
                    } else {
                        _mm256_maskstore_ps(d.add(k * L), lanes(0, cols - k * L), val);
                    }
                }
            }
        }
    }
}
