//! The cores' f32 peak, measured: independent fused multiply-adds on every thread of
//! rayon's pool, AVX-512 (24 accumulators) where the CPU has it, else AVX2 with FMA (12
//! accumulators, in 16 registers). `flowlab bench` measures it after each timed step, so a
//! step's GFLOP/s can be put against what the cores deliver meanwhile: on a shared VM that
//! drifts by 30–50 % within an hour (see results/README.md), and now and then one of two
//! vCPUs is away for a fraction of a second, while the nominal peak does not change.

use crate::kernels::{fma_loop_256, fma_loop_512, FmaLoop};

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
fn fma_loop() -> Option<FmaLoop> {
    fma_loop_512().or_else(fma_loop_256)
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
}
