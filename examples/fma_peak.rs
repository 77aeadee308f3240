//! The cores' peak f32 FLOP/s, for putting `flowlab bench`'s GFLOP/s in proportion:
//! independent FMAs on 1 and on all threads — AVX-512 where the CPU has it, else AVX2 with
//! FMA ([`flowlab::bench::fma_peak_gflops`], which `flowlab bench` also runs between its
//! timed steps).
//!
//!     cargo run --release --example fma_peak

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for threads in [1, cores] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a thread pool");
        // 4 GFLOP per thread, best of 3.
        match pool.install(|| flowlab::bench::fma_peak_gflops(4.0, 3)) {
            Some(p) => println!("{threads} thread(s): {p:.1} GFLOP/s peak f32"),
            None => {
                println!("no AVX-512F or AVX2 + FMA on this CPU: nothing to measure");
                return;
            }
        }
    }
}
