//! The machine's main-memory bandwidth, for putting the memory-bound kernels (the
//! elementwise passes, the LayerNorm, the gate) in proportion: `c = a + b` over 256 MiB
//! arrays, far larger than any cache, on 1 and on all threads. The figure counts the three
//! streams the loop names; the write-allocate read of `c` that most CPUs add is not counted.
//!
//!     cargo run --release --example mem_bandwidth

use std::time::Instant;

/// Elements per array: 64 Mi f32 = 256 MiB.
const N: usize = 64 << 20;
const REPEATS: usize = 5;

fn add(a: &[f32], b: &[f32], c: &mut [f32]) {
    for ((c, &a), &b) in c.iter_mut().zip(a).zip(b) {
        *c = a + b;
    }
}

fn main() {
    let a: Vec<f32> = (0..N).map(|i| i as f32).collect();
    let b = vec![1.0f32; N];
    // Written before timing, so that no page is first touched inside the timed loops.
    let mut c = vec![0.0f32; N];
    add(&a, &b, &mut c);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for threads in [1, cores] {
        let per = N.div_ceil(threads);
        let t = Instant::now();
        for _ in 0..REPEATS {
            std::thread::scope(|s| {
                for ((a, b), c) in a.chunks(per).zip(b.chunks(per)).zip(c.chunks_mut(per)) {
                    s.spawn(move || add(a, b, c));
                }
            });
        }
        let bytes = (REPEATS * 3 * N * std::mem::size_of::<f32>()) as f64;
        println!(
            "{threads} thread(s): {:.1} GB/s (c = a + b, 3 × 256 MiB streams; checksum {})",
            bytes / t.elapsed().as_secs_f64() / 1e9,
            c[N / 3]
        );
    }
}
