//! The GEMMs of 1×1 convolutions: `C = start + A·B` with `A` `[M, K]` and `B` `[K, N]`
//! row-major (any row strides), by one 6 × 16 register tile on AVX2 CPUs and a 6 × 32 one
//! (the same algorithm on 16-lane vectors, [`avx512`]) where the AVX-512 kernel set runs.
//!
//! Per 1×1 convolution and image (`P = H·W` positions), with `a` the `[Ci, P]` input:
//! - forward `y = W·a + b` (`M = Co`, `K = Ci`, `N = P`; Glow's hidden 1×1 layer, and
//!   `h = W·a` in the gated op of `gated.rs`);
//! - input gradient `∂a = Wᵀ·G` (`M = Ci`, `K = Co`, `N = P`, `Wᵀ` transposed once per op);
//! - weight gradient `∂W += Gₙ·aₙᵀ` (`M = Co`, `K = P`, `N = Ci`), image after image onto a
//!   running sum ([`product_bt`]: `B` is given as its transpose, `aₙ` itself), and the same
//!   for the patch matrices of spatial kernels on the im2col path.
//!
//! `B` is copied, `KC` rows at a time, into aligned panels of 16 columns (8 for a last
//! remainder of at most 8), transposing 8 × 8 blocks in registers when it is given as
//! `Bᵀ`, and each panel goes through every 6-row block of `A` before
//! the next, so the panel (`KC·16` values, 16 KB) stays in L1 while the rows of `A` stream
//! from L2. The tile holds 6 × 2 accumulators, two panel vectors and one broadcast: 15 of
//! the 16 `ymm` registers, 8 loads per 12 FMAs. `A` is read in place: its 6 rows are 6
//! sequential streams, one broadcast each per step. Rows past `M` repeat the last row and
//! columns past `N` are zero in the panel; neither is stored. Two software prefetches
//! keep memory latency off the tile: each tile fetches its output lines before its
//! k-loop (an image's output is new memory), and packing a panel fetches the rows' lines
//! two panels on (`B` may be a cold output gradient, with more rows than the hardware
//! prefetcher follows).
//!
//! Against the `gemm` crate (per image, one core each) this path packs no `A`, makes no
//! output pass (the tile starts from the bias) and needs no masked loads (the panel copy
//! zero-fills the last columns). Every output is the same sum in the same order whatever
//! its tile, panel or thread: the products in increasing `k`, in blocks of `KC`, the first
//! block's from the bias (or zero) and each later block's from zero and then added to the
//! running value; an accumulating [`product_bt`] adds its first block the same way (as
//! the `gemm` crate does).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::isa::{isa, Isa};

/// Rows of `A` per tile (broadcast).
const MR: usize = 6;
/// f32 lanes per vector.
const L: usize = 8;
/// Columns per full panel: two vectors.
const NR: usize = 2 * L;
/// Rows of `B` per panel.
const KC: usize = 256;
/// Products at least this long fetch their tile's own output lines ahead; shorter ones
/// fetch a later tile's.
const PREFETCH_OWN_K: usize = 64;

/// What the tile's accumulators start from.
#[derive(Debug, Clone, Copy)]
enum Start<'a> {
    /// Zero.
    Zero,
    /// `bias[i]` for row `i` (the forward pass).
    Bias(&'a [f32]),
    /// Zero, and the tile's sum is added to the output's current values at the store (a
    /// weight gradient's running sum, or the sum of earlier `KC` blocks; the `gemm`
    /// crate's order too).
    Add,
}

/// How `B`'s elements lie in its [`View`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `B[k, j]` at `data[k·rs + j]`.
    Rows,
    /// `B[k, j]` at `data[j·rs + k]` (the view holds `Bᵀ`, `[N, K]` row-major).
    Transposed,
}

/// Whether these kernels run: the AVX2 or the AVX-512 kernel set is in use (`isa.rs`).
pub(super) fn available() -> bool {
    isa().is_some()
}

/// A row-major matrix: element `(r, c)` at `data[r·rs + c]`.
#[derive(Debug, Clone, Copy)]
pub(super) struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
}

impl View<'_> {
    /// Whether `rows × cols` elements are inside `data`, rows not overlapping.
    fn holds(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (cols <= self.rs && (rows - 1) * self.rs + cols <= self.data.len())
    }
}

/// `out[i·ors + j] = bias[i] + Σₖ A[i, k]·B[k, j]` (`bias` zero when `None`) for `i < m`,
/// `j < n`, `k < K`: every element of those rows written, nothing else.
pub(super) fn product(
    a: View,
    b: View,
    (m, n, k): (usize, usize, usize),
    out: &mut [MaybeUninit<f32>],
    ors: usize,
    bias: Option<&[f32]>,
) {
    let start = match bias {
        Some(bias) => {
            assert!(bias.len() >= m, "{m} rows, {} biases", bias.len());
            Start::Bias(bias)
        }
        None => Start::Zero,
    };
    assert!(
        k > 0 || bias.is_some() || m == 0 || n == 0,
        "no terms and no bias"
    );
    run(
        a,
        (b, Layout::Rows),
        (m, n, k),
        out.as_mut_ptr().cast(),
        out.len(),
        ors,
        start,
    );
}

/// `out[i·ors + j] (+)= Σₖ A[i, k]·Bt[j, k]` for `i < m`, `j < n`, `k < K`: the product
/// with `B` given as its transpose `bt` (`[N, K]` row-major), added to `out`'s values when
/// `add` (the products summed in increasing `k`, per `KC` block, and that sum added to
/// the output) and written over them otherwise (zero when `k = 0`).
pub(super) fn product_bt(
    a: View,
    bt: View,
    (m, n, k): (usize, usize, usize),
    out: &mut [f32],
    ors: usize,
    add: bool,
) {
    let start = if add { Start::Add } else { Start::Zero };
    run(
        a,
        (bt, Layout::Transposed),
        (m, n, k),
        out.as_mut_ptr(),
        out.len(),
        ors,
        start,
    );
}

fn run(
    a: View,
    (b, layout): (View, Layout),
    (m, n, k): (usize, usize, usize),
    out: *mut f32,
    out_len: usize,
    ors: usize,
    start: Start,
) {
    let wide = match isa() {
        Some(Isa::Avx512) => true,
        Some(Isa::Avx2) => false,
        None => panic!("pointwise kernels need AVX2 or AVX-512"),
    };
    let b_holds = match layout {
        Layout::Rows => b.holds(k, n),
        Layout::Transposed => b.holds(n, k),
    };
    assert!(
        a.holds(m, k) && b_holds,
        "operands smaller than {m}×{k}·{k}×{n}"
    );
    assert!(
        m == 0 || n == 0 || (n <= ors && (m - 1) * ors + n <= out_len),
        "output smaller than {m}×{n}"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: AVX2 and FMA are present, and AVX-512F with the AVX-512 set; `A` is read
    // below row m and column k, `B` below row k and column n (in its layout), `out` written
    // (and, for `Add`, read) below row m and column n, all inside their slices (asserted
    // above).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        if wide {
            avx512::run(a, (b, layout), (m, n, k), out, ors, start)
        } else {
            run_avx2(a, (b, layout), (m, n, k), out, ors, start)
        }
    }
}

/// A panel of `B`: `KC` rows of 16 values, 32-byte aligned; [`pack`] writes what a tile
/// reads, so it is never zeroed (16 KB per call).
#[cfg(target_arch = "x86_64")]
#[repr(C, align(32))]
struct Panel(MaybeUninit<[f32; KC * NR]>);

/// The loops of both kernel sets' products (`run_avx2`, [`avx512::run`]), written once:
/// `B` in panels of up to `$kc` rows and `$nr` columns (`$nr / 2` for a last remainder of
/// at most that many), packed by `$pack` (`pack_t` for a transposed `B`) into a `$panel`,
/// each panel through every `MR`-row block of `A` by `$tile::<2>` (full-width panels) or
/// `$tile::<1>`. A macro, not a generic function over closures: that version made the
/// AVX2 products 10–25 % slower (`pointwise_rate`).
macro_rules! panel_loops {
    ($a:ident, $b:ident, $layout:ident, ($m:ident, $n:ident, $k:ident), $out:ident, $ors:ident,
     $start:ident; $panel:ident, $kc:ident, $nr:ident, $l:ident, $pack:ident, $tile:ident) => {
        let mut panel = $panel(MaybeUninit::uninit());
        let panel = panel.0.as_mut_ptr().cast::<f32>();
        let (ap, bp) = ($a.data.as_ptr(), $b.data.as_ptr());
        // A `k = 0` product still writes its start.
        let mut k0 = 0;
        loop {
            let kc = $kc.min($k - k0);
            let start = if k0 == 0 { $start } else { Start::Add };
            let mut j0 = 0;
            while j0 < $n {
                let cols = ($n - j0).min($nr);
                let wide = cols > $l;
                let w = if wide { $nr } else { $l };
                match $layout {
                    Layout::Rows => $pack(bp.add(k0 * $b.rs + j0), $b.rs, kc, cols, w, panel),
                    Layout::Transposed => {
                        pack_t::<$nr>(bp.add(j0 * $b.rs + k0), $b.rs, kc, cols, w, panel)
                    }
                }
                for i0 in (0..$m).step_by(MR) {
                    let rows = MR.min($m - i0);
                    let rp: [*const f32; MR] =
                        // (wrapping: with k = 0 they are never read and may point past `A`)
                        std::array::from_fn(|i| {
                            ap.wrapping_add((i0 + i.min(rows - 1)) * $a.rs + k0)
                        });
                    let c = $out.add(i0 * $ors + j0);
                    let st = match start {
                        Start::Bias(bias) => Start::Bias(&bias[i0..]),
                        s => s,
                    };
                    let shape = (kc, rows, cols);
                    // The output lines this tile fetches ahead: its own when its k-loop is
                    // long enough to hide a memory access, else those of the tile two row
                    // blocks on (at the top of the next panel past the last rows).
                    let pf = if kc >= PREFETCH_OWN_K {
                        c
                    } else {
                        let (mut ti, mut tj) = (i0 + 2 * MR, j0);
                        if ti >= $m {
                            (ti, tj) = (ti - $m.next_multiple_of(MR), j0 + cols);
                        }
                        $out.wrapping_add(ti * $ors + tj)
                    };
                    if wide {
                        $tile::<2>(&rp, panel, (c, pf), $ors, shape, st);
                    } else {
                        $tile::<1>(&rp, panel, (c, pf), $ors, shape, st);
                    }
                }
                j0 += cols;
            }
            k0 += kc;
            if k0 >= $k {
                break;
            }
        }
    };
}

// After the macro: the AVX-512 tile's loops are `panel_loops!` too.
#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2(
    a: View,
    (b, layout): (View, Layout),
    (m, n, k): (usize, usize, usize),
    out: *mut f32,
    ors: usize,
    start: Start,
) {
    panel_loops!(a, b, layout, (m, n, k), out, ors, start; Panel, KC, NR, L, pack, tile);
}

/// `panel[r·w + j] = src[r·rs + j]` for `r < rows`, `j < cols`, zero for `cols ≤ j < w`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn pack(src: *const f32, rs: usize, rows: usize, cols: usize, w: usize, dst: *mut f32) {
    if cols == w {
        for r in 0..rows {
            let (s, d) = (src.add(r * rs), dst.add(r * w));
            // This row's line two panels on, fetched while this panel is in use: `B` may be
            // cold (an output gradient), and its rows are too many streams for the
            // hardware prefetcher (∂x of 192 → 192 at 14×14 went 88–90 → 105–107 GFLOP/s).
            _mm_prefetch::<_MM_HINT_T0>(s.wrapping_add(2 * w).cast());
            // Spelled out: as a loop over the row's vectors LLVM made it a `memcpy` call (3 %
            // of a Glow step).
            _mm256_store_ps(d, _mm256_loadu_ps(s));
            if w == NR {
                _mm256_store_ps(d.add(L), _mm256_loadu_ps(s.add(L)));
            }
        }
    } else {
        for r in 0..rows {
            let d = dst.add(r * w);
            _mm256_store_ps(d, _mm256_setzero_ps());
            if w == NR {
                _mm256_store_ps(d.add(L), _mm256_setzero_ps());
            }
            copy_short(d, src.add(r * rs), cols);
        }
    }
}

/// `panel[r·w + j] = src[j·rs + r]` for `r < rows ≤ KC`, `j < cols`, zero for
/// `cols ≤ j < w ≤ N` (`w` a multiple of 8): [`pack`] for a `B` given as `Bᵀ`, for panels
/// of up to `N` columns (16 on AVX2, 32 on AVX-512). Full 8-row steps transpose 8 × 8
/// blocks in registers; missing columns read a zero row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn pack_t<const N: usize>(
    src: *const f32,
    rs: usize,
    rows: usize,
    cols: usize,
    w: usize,
    dst: *mut f32,
) {
    static ZERO: [f32; KC] = [0.0; KC];
    let rp: [*const f32; N] = std::array::from_fn(|j| {
        if j < cols {
            src.add(j * rs)
        } else {
            ZERO.as_ptr()
        }
    });
    let mut r = 0;
    while r + L <= rows {
        for h in 0..w / L {
            let v: [__m256; L] = std::array::from_fn(|j| _mm256_loadu_ps(rp[h * L + j].add(r)));
            let t = transpose8(v);
            for (kk, t) in t.into_iter().enumerate() {
                _mm256_store_ps(dst.add((r + kk) * w + h * L), t);
            }
        }
        r += L;
    }
    while r < rows {
        for (j, p) in rp[..w].iter().enumerate() {
            *dst.add(r * w + j) = *p.add(r);
        }
        r += 1;
    }
}

/// The 8 × 8 transpose: `out[i]` lane `j` = `v[j]` lane `i`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn transpose8(v: [__m256; L]) -> [__m256; L] {
    // Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves swapped.
    let t: [__m256; L] = std::array::from_fn(|i| {
        let (a, b) = (v[i / 2 * 2], v[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_ps(a, b)
        } else {
            _mm256_unpackhi_ps(a, b)
        }
    });
    // u[4q + s]: rows 4q..4q+4, lanes {s, s+4} of each half.
    let u: [__m256; L] = std::array::from_fn(|i| {
        let (q, s) = (i / 4, i % 4);
        let (a, b) = (t[4 * q + s / 2], t[4 * q + s / 2 + 2]);
        if s % 2 == 0 {
            _mm256_shuffle_ps::<0x44>(a, b)
        } else {
            _mm256_shuffle_ps::<0xEE>(a, b)
        }
    });
    std::array::from_fn(|i| {
        let (s, hi) = (i % 4, i >= 4);
        if hi {
            _mm256_permute2f128_ps::<0x31>(u[s], u[4 + s])
        } else {
            _mm256_permute2f128_ps::<0x20>(u[s], u[4 + s])
        }
    })
}

/// `dst[..n] = src[..n]` for the `n < 16` values of a partial tile or panel row, by
/// vector, half-vector and scalar moves rather than a `memcpy` call per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn copy_short(dst: *mut f32, src: *const f32, n: usize) {
    let mut j = 0;
    if n >= L {
        _mm256_storeu_ps(dst, _mm256_loadu_ps(src));
        j = L;
    }
    if n - j >= 4 {
        _mm_storeu_ps(dst.add(j), _mm_loadu_ps(src.add(j)));
        j += 4;
    }
    while j < n {
        _mm_store_ss(dst.add(j), _mm_load_ss(src.add(j)));
        j += 1;
    }
}

/// `c[i·rs + j] = start + Σ_{kk < k} rp[i][kk]·panel[kk·8R + j]` for `i < rows`, `j < cols`
/// (`cols ≤ 8R`), in `6·R` accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
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
    // Partial tiles go through a buffer: no masked loads or stores (slow on AMD Zen).
    let mut buf = [[0.0f32; NR]; MR];
    let whole = cols == w;
    let mut acc = [[_mm256_setzero_ps(); R]; MR];
    match start {
        Start::Zero => {}
        Start::Bias(bias) => {
            for i in 0..MR {
                acc[i] = [_mm256_set1_ps(bias[i.min(rows - 1)]); R];
            }
        }
        // Added at the store.
        Start::Add => {}
    }
    // Output lines are fetched while the tile computes (a fresh output's stores otherwise
    // wait on memory): `pf` may be another tile's, or past the output (prefetches do not
    // fault).
    for i in 0..MR {
        _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(i * rs).cast());
        _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(i * rs + w - 1).cast());
    }
    let mut p = panel;
    let mut kk = 0;
    // Four steps per iteration: the row pointers advance once per four broadcasts.
    while kk + 4 <= k {
        for u in 0..4 {
            let v: [__m256; R] = std::array::from_fn(|r| _mm256_load_ps(p.add(u * w + L * r)));
            for i in 0..MR {
                let s = _mm256_broadcast_ss(&*rp[i].add(kk + u));
                for r in 0..R {
                    acc[i][r] = _mm256_fmadd_ps(s, v[r], acc[i][r]);
                }
            }
        }
        p = p.add(4 * w);
        kk += 4;
    }
    while kk < k {
        let v: [__m256; R] = std::array::from_fn(|r| _mm256_load_ps(p.add(L * r)));
        for i in 0..MR {
            let s = _mm256_broadcast_ss(&*rp[i].add(kk));
            for r in 0..R {
                acc[i][r] = _mm256_fmadd_ps(s, v[r], acc[i][r]);
            }
        }
        p = p.add(w);
        kk += 1;
    }
    let add = matches!(start, Start::Add);
    for i in 0..rows {
        let dst = if whole {
            c.add(i * rs)
        } else {
            if add {
                copy_short(buf[i].as_mut_ptr(), c.add(i * rs), cols);
            }
            buf[i].as_mut_ptr()
        };
        for r in 0..R {
            let v = if add {
                _mm256_add_ps(_mm256_loadu_ps(dst.add(L * r)), acc[i][r])
            } else {
                acc[i][r]
            };
            _mm256_storeu_ps(dst.add(L * r), v);
        }
        if !whole {
            copy_short(c.add(i * rs), buf[i].as_ptr(), cols);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// `C` by the definition, in f64.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        a: &[f32],
        ars: usize,
        b: &[f32],
        brs: usize,
        m: usize,
        n: usize,
        k: usize,
    ) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|t| a[i * ars + t] as f64 * b[t * brs + j] as f64)
                    .sum();
            }
        }
        c
    }

    /// `got(i·ors + j)` equals `want(i, j)` to within `tol` for `i < m`, `j < n`, and is
    /// still NaN (not written) for `n ≤ j < ors`.
    fn assert_block(
        got: impl Fn(usize) -> f32,
        want: impl Fn(usize, usize) -> f64,
        (m, n, ors): (usize, usize, usize),
        tol: f64,
        what: &str,
    ) {
        for i in 0..m {
            for j in 0..ors {
                let g = got(i * ors + j);
                if j >= n {
                    assert!(g.is_nan(), "{what} wrote past row {i}'s end");
                    continue;
                }
                let w = want(i, j);
                assert!((g as f64 - w).abs() <= tol, "{what} [{i},{j}]: {g} vs {w}");
            }
        }
    }

    #[test]
    fn products_match_the_definition_for_every_edge() {
        if !available() {
            eprintln!("skipped: neither the AVX2 nor the AVX-512 kernel set");
            return;
        }
        // Rows 1–13 (partial 6-row blocks), columns around 8, 16 and 32 (one-vector
        // remainder panels, partial panels, of either kernel set), K across the 4-step unroll
        // and the 128- and 256-row panel blocks.
        for (m, n, k) in [
            (1, 1, 1),
            (6, 16, 4),
            (7, 17, 5),
            (13, 49, 3),
            (5, 8, 9),
            (12, 9, 300),
            (192, 196, 192),
            (64, 30, 513),
            (3, 24, 0),
            (6, 32, 128),
            (7, 33, 129),
            (11, 47, 131),
            (2, 31, 6),
        ] {
            // Row strides wider than the rows, so reads past a row's end would show.
            let (ars, brs, ors) = (k + 3, n + 5, n + 2);
            let a = vals(m * ars, 1);
            let b = vals(k.max(1) * brs, 2);
            let bias = vals(m, 3);
            let want = naive(&a, ars, &b, brs, m, n, k);
            let (av, bv) = (View { data: &a, rs: ars }, View { data: &b, rs: brs });
            let tol = 1e-5 * (k as f64).sqrt().max(1.0);
            // Written with a bias: every element of the m × n block, nothing past a row.
            let mut out = vec![MaybeUninit::new(f32::NAN); m * ors];
            product(av, bv, (m, n, k), &mut out, ors, Some(&bias));
            // SAFETY: the buffer was initialised with NaN.
            let got = |i: usize| unsafe { out[i].assume_init() };
            let want = |i: usize, j: usize| want[i * n + j] + bias[i] as f64;
            assert_block(got, want, (m, n, ors), tol, &format!("({m},{n},{k})"));
        }
    }

    #[test]
    fn transposed_products_match_the_definition_and_add_to_the_output() {
        if !available() {
            eprintln!("skipped: neither the AVX2 nor the AVX-512 kernel set");
            return;
        }
        // K across the 8-row transposes (remainders 1–7), the 4-step unroll and the
        // 128- and 256-row blocks; N around 8, 16 and 32 (zero rows for the missing
        // columns).
        for (m, n, k) in [
            (1, 1, 1),
            (6, 16, 8),
            (7, 17, 13),
            (13, 9, 49),
            (5, 8, 196),
            (12, 18, 300),
            (192, 40, 7),
            (4, 3, 0),
            (6, 32, 128),
            (7, 33, 135),
            (5, 63, 17),
        ] {
            // `Bᵀ` is `[n, k]` with rows wider than k, so reads past a row's end would show.
            let (ars, brs, ors) = (k + 3, k + 5, n + 2);
            let a = vals(m * ars, 4);
            let bt = vals(n * brs, 5);
            // B itself, `[k, n]`, for the definition.
            let b: Vec<f32> = (0..k * n).map(|i| bt[(i % n) * brs + i / n]).collect();
            let want = naive(&a, ars, &b, n, m, n, k);
            let before = vals(m * ors, 6);
            let (av, bv) = (View { data: &a, rs: ars }, View { data: &bt, rs: brs });
            let tol = 1e-5 * (k as f64).sqrt().max(1.0);
            for add in [false, true] {
                let mut out = before.clone();
                for i in 0..m {
                    out[i * ors + n..(i + 1) * ors].fill(f32::NAN);
                }
                product_bt(av, bv, (m, n, k), &mut out, ors, add);
                let old = |i: usize, j: usize| if add { before[i * ors + j] as f64 } else { 0.0 };
                let want = |i: usize, j: usize| want[i * n + j] + old(i, j);
                let what = format!("({m},{n},{k}) add {add}");
                assert_block(|i| out[i], want, (m, n, ors), tol, &what);
            }
        }
    }

    #[test]
    fn transposes_8_by_8() {
        if !available() {
            return;
        }
        let v: Vec<f32> = (0..64).map(|i| i as f32).collect();
        // SAFETY: AVX2 is present (checked); every load and store is inside `v` and `out`.
        let out = unsafe {
            let rows = std::array::from_fn(|j| _mm256_loadu_ps(v[8 * j..].as_ptr()));
            let t = transpose8(rows);
            let mut out = [0.0f32; 64];
            for (i, t) in t.into_iter().enumerate() {
                _mm256_storeu_ps(out[8 * i..].as_mut_ptr(), t);
            }
            out
        };
        for i in 0..8 {
            for j in 0..8 {
                assert_eq!(out[8 * i + j], v[8 * j + i], "[{i},{j}]");
            }
        }
    }

    #[test]
    fn refuses_operands_too_small() {
        if !available() {
            return;
        }
        let a = vec![0.0; 11];
        let b = vec![0.0; 12];
        let mut out = vec![MaybeUninit::new(0.0); 8];
        let r = std::panic::catch_unwind(move || {
            product(
                View { data: &a, rs: 4 },
                View { data: &b, rs: 4 },
                (3, 4, 3),
                &mut out,
                4,
                None,
            )
        });
        assert!(r.is_err(), "a 3×4 A needs 12 values");
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// GFLOP/s of the best of 15 batches of `reps` calls `f(rep)`, each `macs`
    /// multiply-adds.
    fn best_rate(macs: usize, reps: usize, mut f: impl FnMut(usize)) -> f64 {
        let best = (0..15)
            .map(|_| {
                let t = std::time::Instant::now();
                for rep in 0..reps {
                    f(rep);
                }
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        2.0 * (macs * reps) as f64 / best / 1e9
    }

    /// One core, operands in cache: GFLOP/s of the best of 15 batches, counting real
    /// columns. `cargo test --release --lib pointwise_rate -- --ignored --nocapture`;
    /// with `PW_FRESH=1` each product writes a new part of a larger output, as a layer's
    /// images do (without the output prefetch in `tile` that ran at 54 instead of 85).
    #[test]
    #[ignore]
    fn pointwise_rate() {
        if !available() {
            eprintln!("skipped: neither the AVX2 nor the AVX-512 kernel set");
            return;
        }
        for (m, k, n) in [
            (192usize, 192usize, 196usize),
            (192, 192, 49),
            (64, 64, 784),
            (64, 64, 49),
            // Glow's first conv on its patch matrix (K = 2·9), and its ∂cols.
            (192, 18, 196),
            (18, 192, 196),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
            let bias = vec![0.5; m];
            let reps = (2e8 / (2 * m * k * n) as f64) as usize + 1;
            let fresh = std::env::var("PW_FRESH").is_ok();
            let mut c = vec![MaybeUninit::new(0.0f32); m * n * if fresh { reps } else { 1 }];
            let (av, bv) = (View { data: &a, rs: k }, View { data: &b, rs: n });
            let rate = best_rate(m * k * n, reps, |rep| {
                let o = if fresh { rep * m * n } else { 0 };
                product(av, bv, (m, n, k), &mut c[o..], n, Some(&bias));
            });
            eprintln!("[{m}, {k}]·[{k}, {n}]: {rate:.1} GFLOP/s");
        }
        // Weight gradients `C += A·Btᵀ` (`[M, K]·[N, K]ᵀ`) against the `gemm` crate.
        use super::super::conv::{matmul_bt_gemm, Mat};
        for (m, n, k) in [
            (192usize, 192usize, 196usize),
            (192, 192, 49),
            (64, 64, 784),
            (96, 96, 196),
            (128, 128, 49),
            (192, 18, 196),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let bt: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
            let mut c = vec![0.0f32; m * n];
            let reps = (2e8 / (2 * m * k * n) as f64) as usize + 1;
            let (av, bv) = (View { data: &a, rs: k }, View { data: &bt, rs: k });
            let pw = best_rate(m * k * n, reps, |_| {
                product_bt(av, bv, (m, n, k), &mut c, n, true)
            });
            let gm = best_rate(m * k * n, reps, |_| {
                matmul_bt_gemm(
                    &mut c,
                    n,
                    (m, n, k),
                    Mat::rows(&a, k),
                    Mat::transposed(&bt, k),
                )
            });
            eprintln!("[{m}, {k}]·[{n}, {k}]ᵀ: {pw:.1} GFLOP/s (gemm {gm:.1})");
        }
    }
}
