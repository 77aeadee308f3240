//! The cores' peak f32 FLOP/s, for putting `flowlab bench`'s GFLOP/s in proportion:
//! independent AVX-512 FMAs (24 accumulators per thread), on 1 and on all threads.
//!
//!     cargo run --release --example fma_peak

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_loop(iters: usize) -> f32 {
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

fn main() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        let iters = 20_000_000;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        for threads in [1, cores] {
            let t = std::time::Instant::now();
            let handles: Vec<_> = (0..threads)
                // SAFETY: AVX-512F is present (checked above).
                .map(|_| std::thread::spawn(move || unsafe { fma_loop(iters) }))
                .collect();
            let sum: f32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
            let flops = (threads * iters * 24 * 16 * 2) as f64;
            println!(
                "{threads} thread(s): {:.1} GFLOP/s peak f32 (checksum {sum:.1})",
                flops / t.elapsed().as_secs_f64() / 1e9
            );
        }
        return;
    }
    println!("no AVX-512F on this CPU: this example measures AVX-512 FMA throughput only");
}
