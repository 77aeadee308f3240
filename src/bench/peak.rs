//! The cores' f32 peak, measured: independent fused multiply-adds on every thread of
//! rayon's pool, AVX-512 (24 accumulators) where the CPU has it, else AVX2 with FMA (12
//! accumulators, in 16 registers). `flowlab bench` measures it after each timed step, so a
//! step's GFLOP/s can be put against what the cores deliver meanwhile: on a shared VM that
//! drifts by 30–50 % within an hour (see results/README.md), and now and then one of two
//! vCPUs is away for a fraction of a second, while the nominal peak does not change.

/// The best of `reps` timings of every thread of the current rayon pool (the global one
/// unless called inside [`rayon::ThreadPool::install`]) running `gflop` GFLOPs each of the
/// FMA loop, in GFLOP/s (2 FLOPs per lane per FMA); `None` without AVX-512F or AVX2 + FMA
/// (or off x86-64), and for no work or repetitions. The pool's own threads run the loop
/// ([`rayon::broadcast`]), so the figure is for the threads that run the kernels.
pub fn fma_peak_gflops(gflop: f64, reps: usize) -> Option<f64> {
    let (flop_per_iter, run) = fma_loop()?;
    let iters = (gflop * 1e9 / flop_per_iter as f64) as usize;
    if iters == 0 || reps == 0 {
        return None;
    }
    let threads = rayon::current_num_threads();
    let best = (0..reps)
        .map(|_| {
            let t = std::time::Instant::now();
            let sums = rayon::broadcast(|_| run(iters));
            // The checksum keeps the loops from being optimised away.
            std::hint::black_box(sums);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    Some((threads * iters * flop_per_iter) as f64 / best / 1e9)
}

/// FLOPs per iteration and the loop, for the widest FMA this CPU has.
#[allow(clippy::type_complexity)]
fn fma_loop() -> Option<(usize, fn(usize) -> f32)> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present (checked here).
            return Some((24 * 16 * 2, |n| unsafe { x86::avx512(n) }));
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: AVX2 and FMA are present (checked here).
            return Some((12 * 8 * 2, |n| unsafe { x86::avx2(n) }));
        }
    }
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `n` rounds of 24 independent 16-lane FMAs; returns the sum of the lanes.
    #[target_feature(enable = "avx512f")]
    pub(super) fn avx512(n: usize) -> f32 {
        let mut acc = [_mm512_set1_ps(1.0); 24];
        let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        for _ in 0..n {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        let s = acc
            .iter()
            .fold(_mm512_setzero_ps(), |s, &v| _mm512_add_ps(s, v));
        _mm512_reduce_add_ps(s)
    }

    /// `n` rounds of 12 independent 8-lane FMAs; returns the sum of the lanes.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn avx2(n: usize) -> f32 {
        let mut acc = [_mm256_set1_ps(1.0); 12];
        let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        for _ in 0..n {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let s = acc
            .iter()
            .fold(_mm256_setzero_ps(), |s, &v| _mm256_add_ps(s, v));
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), s) };
        lanes.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_positive_finite_peak_where_fma_exists() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let p = pool.install(|| fma_peak_gflops(0.01, 2));
        assert_eq!(p.is_some(), fma_loop().is_some());
        if let Some(p) = p {
            assert!(p.is_finite() && p > 0.0, "{p}");
        }
        assert_eq!(fma_peak_gflops(0.0, 2), None);
        assert_eq!(fma_peak_gflops(0.01, 0), None);
    }

    #[test]
    fn the_loops_compute_what_they_are_timed_on() {
        // Each lane runs v ← 0.999999·v + 1e-7 from 1: after 3 rounds, summed over lanes.
        let Some((flop, run)) = fma_loop() else {
            return;
        };
        let lanes = flop / 2;
        let mut v = 1.0f32;
        for _ in 0..3 {
            v = v.mul_add(0.999_999, 1e-7);
        }
        let got = run(3);
        assert!((got - lanes as f32 * v).abs() < 1e-3, "{got}");
    }
}
