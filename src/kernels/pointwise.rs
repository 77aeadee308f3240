//! The GEMMs of 1×1 convolutions on AVX2 CPUs: `C = start + A·B` with `A` `[M, K]` and `B`
//! `[K, N]` row-major (any row strides), by one 6 × 16 register tile.
//!
//! Per 1×1 convolution and image (`P = H·W` positions), with `a` the `[Ci, P]` input:
//! - forward `y = W·a + b` (`M = Co`, `K = Ci`, `N = P`; Glow's hidden 1×1 layer, and
//!   `h = W·a` in the gated op of `gated.rs`);
//! - input gradient `∂a = Wᵀ·G` (`M = Ci`, `K = Co`, `N = P`, `Wᵀ` transposed once per op).
//!
//! The weight gradient `∂W = Σₙ Gₙ·aₙᵀ` stays with the `gemm` crate: done here with a
//! per-image transpose of `aₙ` it was no faster at 192 channels and 5–15 % slower at 64.
//!
//! `B` is copied, `KC` rows at a time, into aligned panels of 16 columns (8 for a last
//! remainder of at most 8), and each panel goes through every 6-row block of `A` before
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
//! its tile, panel or thread: `start`, then the products in increasing `k` (in blocks of
//! `KC`, each block's partial sum added to the running one).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::direct::{isa, Isa};

/// Rows of `A` per tile (broadcast).
const MR: usize = 6;
/// f32 lanes per vector.
const L: usize = 8;
/// Columns per full panel: two vectors.
const NR: usize = 2 * L;
/// Rows of `B` per panel.
const KC: usize = 256;

/// What the tile's accumulators start from.
#[derive(Debug, Clone, Copy)]
enum Start<'a> {
    /// Zero.
    Zero,
    /// `bias[i]` for row `i` (the forward pass).
    Bias(&'a [f32]),
    /// The output's current values (the weight gradient's running sum).
    Add,
}

/// Whether this CPU runs these kernels: the AVX2 kernel set is in use (on AVX-512 CPUs the
/// `gemm` crate's AVX-512 kernels serve 1×1 convolutions).
pub(super) fn available() -> bool {
    isa() == Some(Isa::Avx2)
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
        b,
        (m, n, k),
        out.as_mut_ptr().cast(),
        out.len(),
        ors,
        start,
    );
}

fn run(
    a: View,
    b: View,
    (m, n, k): (usize, usize, usize),
    out: *mut f32,
    out_len: usize,
    ors: usize,
    start: Start,
) {
    assert!(available(), "pointwise kernels need AVX2");
    assert!(
        a.holds(m, k) && b.holds(k, n),
        "operands smaller than {m}×{k}·{k}×{n}"
    );
    assert!(
        m == 0 || n == 0 || (n <= ors && (m - 1) * ors + n <= out_len),
        "output smaller than {m}×{n}"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: AVX2 and FMA are present; `A` is read below row m and column k, `B` below
    // row k and column n, `out` written (and, for `Add`, read) below row m and column n,
    // all inside their slices (asserted above).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        run_avx2(a, b, (m, n, k), out, ors, start)
    }
}

/// A panel of `B`: `KC` rows of 16 values, 32-byte aligned; [`pack`] writes what a tile
/// reads, so it is never zeroed (16 KB per call).
#[cfg(target_arch = "x86_64")]
#[repr(C, align(32))]
struct Panel(MaybeUninit<[f32; KC * NR]>);

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2(
    a: View,
    b: View,
    (m, n, k): (usize, usize, usize),
    out: *mut f32,
    ors: usize,
    start: Start,
) {
    let mut panel = Panel(MaybeUninit::uninit());
    let panel = panel.0.as_mut_ptr().cast::<f32>();
    let (ap, bp) = (a.data.as_ptr(), b.data.as_ptr());
    // A `k = 0` product still writes its start.
    let mut k0 = 0;
    loop {
        let kc = KC.min(k - k0);
        let start = if k0 == 0 { start } else { Start::Add };
        let mut j0 = 0;
        while j0 < n {
            let cols = (n - j0).min(NR);
            let wide = cols > L;
            pack(
                bp.add(k0 * b.rs + j0),
                b.rs,
                kc,
                cols,
                if wide { NR } else { L },
                panel,
            );
            for i0 in (0..m).step_by(MR) {
                let rows = MR.min(m - i0);
                let rp: [*const f32; MR] =
                    // (wrapping: with k = 0 they are never read and may point past `A`)
                    std::array::from_fn(|i| ap.wrapping_add((i0 + i.min(rows - 1)) * a.rs + k0));
                let c = out.add(i0 * ors + j0);
                let st = match start {
                    Start::Bias(bias) => Start::Bias(&bias[i0..]),
                    s => s,
                };
                let shape = (kc, rows, cols);
                if wide {
                    tile::<2>(&rp, panel, c, ors, shape, st);
                } else {
                    tile::<1>(&rp, panel, c, ors, shape, st);
                }
            }
            j0 += cols;
        }
        k0 += kc;
        if k0 >= k {
            break;
        }
    }
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
    c: *mut f32,
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
        Start::Add => {
            for i in 0..rows {
                let src = if whole {
                    c.add(i * rs)
                } else {
                    copy_short(buf[i].as_mut_ptr(), c.add(i * rs), cols);
                    buf[i].as_ptr()
                };
                for r in 0..R {
                    acc[i][r] = _mm256_loadu_ps(src.add(L * r));
                }
            }
        }
    }
    // The output lines are fetched while the tile computes (a fresh output's stores
    // otherwise wait on memory).
    for i in 0..rows {
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * rs).cast());
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * rs + w - 1).cast());
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
    for i in 0..rows {
        let dst = if whole {
            c.add(i * rs)
        } else {
            buf[i].as_mut_ptr()
        };
        for r in 0..R {
            _mm256_storeu_ps(dst.add(L * r), acc[i][r]);
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

    #[test]
    fn products_match_the_definition_for_every_edge() {
        if !available() {
            eprintln!("skipped: not the AVX2 kernel set");
            return;
        }
        // Rows 1–13 (partial 6-row blocks), columns around 8 and 16 (one-vector remainder
        // panels, partial panels), K across the 4-step unroll and the 256-row panel blocks.
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
            for i in 0..m {
                for j in 0..ors {
                    // SAFETY: the buffer was initialised with NaN.
                    let got = unsafe { out[i * ors + j].assume_init() };
                    if j >= n {
                        assert!(got.is_nan(), "({m},{n},{k}) wrote past row {i}'s end");
                        continue;
                    }
                    let w = want[i * n + j] + bias[i] as f64;
                    assert!(
                        (got as f64 - w).abs() <= tol,
                        "({m},{n},{k}) [{i},{j}]: {got} vs {w}"
                    );
                }
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

    /// One core, operands in cache: GFLOP/s of the best of 15 batches, counting real
    /// columns. `cargo test --release --lib pointwise_rate -- --ignored --nocapture`;
    /// with `PW_FRESH=1` each product writes a new part of a larger output, as a layer's
    /// images do (without the output prefetch in `tile` that ran at 54 instead of 85).
    #[test]
    #[ignore]
    fn pointwise_rate() {
        if !available() {
            eprintln!("skipped: not the AVX2 kernel set");
            return;
        }
        for (m, k, n) in [
            (192usize, 192usize, 196usize),
            (192, 192, 49),
            (64, 64, 784),
            (64, 64, 49),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
            let bias = vec![0.5; m];
            let reps = (2e8 / (2 * m * k * n) as f64) as usize + 1;
            let fresh = std::env::var("PW_FRESH").is_ok();
            let mut c = vec![MaybeUninit::new(0.0f32); m * n * if fresh { reps } else { 1 }];
            let best = (0..15)
                .map(|_| {
                    let t = std::time::Instant::now();
                    for rep in 0..reps {
                        let (av, bv) = (View { data: &a, rs: k }, View { data: &b, rs: n });
                        let o = if fresh { rep * m * n } else { 0 };
                        product(av, bv, (m, n, k), &mut c[o..], n, Some(&bias));
                    }
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            let rate = 2.0 * (m * k * n * reps) as f64 / best / 1e9;
            eprintln!("[{m}, {k}]·[{k}, {n}]: {rate:.1} GFLOP/s");
        }
    }
}
