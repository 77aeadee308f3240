//! Allocator tuning for training loops.
//!
//! Every op of a training step allocates its output afresh. glibc serves buffers above
//! 128 KiB (at first) with `mmap` and returns them with `munmap` on free, so each step
//! page-faults its activations in again and pays TLB shoot-downs on every core: measured
//! at ~25% of a tutorial coupling step on 2 cores (`perf record`). Raising the mmap
//! threshold to its 32 MiB maximum and the trim threshold keeps freed activations in the
//! heap for the next step.

/// Applies the tuning once per process (glibc on Linux only; a no-op elsewhere). Set
/// `FLOWLAB_MALLOC_TUNING=0` to leave glibc's defaults.
pub fn tune_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var("FLOWLAB_MALLOC_TUNING").as_deref() == Ok("0") {
            return;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only adjusts glibc's allocator parameters; it is called once,
        // before the training loop, with documented parameter values.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    });
}
