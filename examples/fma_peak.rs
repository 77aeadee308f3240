//! The cores' peak f32 FLOP/s, for putting `flowlab bench`'s GFLOP/s in proportion:
//! independent FMAs on 1 and on all threads — AVX-512 (24 accumulators per thread) where
//! the CPU has it, else AVX2 with FMA (12 accumulators: 16 registers).
//!
//!     cargo run --release --example fma_peak

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_loop_avx512(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(1.0); 24];
    let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    let s = acc
        .iter()
        .fold(_mm512_setzero_ps(), |s, &v| _mm512_add_ps(s, v));
    _mm512_reduce_add_ps(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_loop_avx2(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(1.0); 12];
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    for _ in 0..iters {
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

fn main() {
    #[cfg(target_arch = "x86_64")]
    {
        let (name, flop_per_iter, run): (_, usize, fn(usize) -> f32) =
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: AVX-512F is present (checked here).
                ("AVX-512", 24 * 16 * 2, |n| unsafe { fma_loop_avx512(n) })
            } else if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: AVX2 and FMA are present (checked here).
                ("AVX2", 12 * 8 * 2, |n| unsafe { fma_loop_avx2(n) })
            } else {
                println!("neither AVX-512F nor AVX2+FMA on this CPU: nothing to measure");
                return;
            };
        let iters = 20_000_000;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        for threads in [1, cores] {
            let t = std::time::Instant::now();
            let handles: Vec<_> = (0..threads)
                .map(|_| std::thread::spawn(move || run(iters)))
                .collect();
            let sum: f32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
            let flops = (threads * iters * flop_per_iter) as f64;
            println!(
                "{threads} thread(s): {:.1} GFLOP/s peak f32, {name} (checksum {sum:.1})",
                flops / t.elapsed().as_secs_f64() / 1e9
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("not an x86-64 CPU: this example measures AVX-512 or AVX2 FMA throughput only");
}
