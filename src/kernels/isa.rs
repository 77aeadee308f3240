//! Which microkernel set runs: the AVX-512 kernels (`direct.rs`, `winograd.rs`, the 16-lane
//! tile of `pointwise.rs`), the AVX2 ones (`avx2.rs`, the 8-lane tile of `pointwise.rs`), or
//! none (im2col + GEMM only) — and the FMA loops that measure the cores' rate. The
//! pointwise GEMM serves both sets, and so do the ops built on it (1×1 and few-tap
//! convolutions, the few-output layers of `conv/taps.rs`, Glow's fused network in
//! `conv/glow.rs`); the AVX-512 set had the `gemm` crate and the separate ops until
//! session 23.
//!
//! AVX-512 is not always the faster set where the CPU has it. Intel's server cores run two
//! 16-lane FMAs per cycle, twice what AVX2 reaches; AMD Zen 4 runs a 16-lane FMA as two
//! 8-lane halves, so its 512-bit and 256-bit FMA rates are the same, and there the AVX2
//! kernels (tuned on Zen 3, with fused kernels that then existed only for AVX2) were faster
//! for 8 of 9 models and level for the ninth: Glow's step 443 → 359 ms by median, RealNVP's
//! and the tutorial flows' 3–8 % (results/README.md, session 21). So on a CPU with both,
//! the choice is measured once per process: the AVX-512 set where a 16-lane FMA loop runs
//! at least [`WIDE_PAYS`] times the FLOP/s of an 8-lane one on this thread, else the AVX2
//! set.

/// The vector extension the microkernels run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Isa {
    /// AVX-512F: the kernels in `direct.rs` and `winograd.rs`.
    Avx512,
    /// AVX2 with FMA: the kernels in `avx2.rs` (and `pointwise.rs`, `conv/glow.rs`).
    Avx2,
}

/// The ratio of 16-lane to 8-lane FMA throughput from which the AVX-512 set is chosen:
/// about 2 on cores with two full-width 512-bit FMA units, about 1 where 512-bit FMAs run
/// as two halves; the threshold sits between with room for a noisy measurement.
const WIDE_PAYS: f64 = 1.4;

/// What the CPU has, for [`choose`].
#[derive(Debug, Clone, Copy)]
struct Features {
    /// AVX2 and FMA.
    avx2: bool,
    /// AVX-512F (with AVX2 and FMA).
    avx512: bool,
}

/// The kernel set for these features: `forced` (`FLOWLAB_SIMD`: `none`, `avx2` or
/// `avx512`, honoured where the CPU has it), else AVX-512 where the CPU has it and
/// `wide_pays()` (called only then), else AVX2 where present, else none.
fn choose(forced: Option<&str>, has: Features, wide_pays: impl FnOnce() -> bool) -> Option<Isa> {
    match forced {
        Some("none") => return None,
        Some("avx2") if has.avx2 => return Some(Isa::Avx2),
        Some("avx512") if has.avx512 => return Some(Isa::Avx512),
        _ => {}
    }
    if has.avx512 && wide_pays() {
        Some(Isa::Avx512)
    } else if has.avx2 {
        Some(Isa::Avx2)
    } else {
        None
    }
}

/// The microkernel set of this process, chosen once (see the module's documentation);
/// `None` where the CPU has neither AVX-512F nor AVX2 with FMA (then convolutions run as
/// im2col + GEMM). To test and compare the sets, `FLOWLAB_SIMD=avx2`, `avx512` or `none`
/// picks one the CPU has.
pub(super) fn isa() -> Option<Isa> {
    #[cfg(target_arch = "x86_64")]
    {
        static ISA: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            let has = Features {
                avx2,
                avx512: avx2 && std::arch::is_x86_feature_detected!("avx512f"),
            };
            let forced = std::env::var("FLOWLAB_SIMD").ok();
            let isa = choose(forced.as_deref(), has, || {
                let ratio = wide_fma_ratio().unwrap_or(0.0);
                tracing::debug!("16-lane / 8-lane FMA rate on this core: {ratio:.2}");
                ratio >= WIDE_PAYS
            });
            tracing::debug!("microkernels: {isa:?}");
            isa
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// An FMA loop: the FLOPs per iteration, and the loop, which runs `n` iterations of
/// independent fused multiply-adds and returns a checksum of its accumulators.
pub(crate) type FmaLoop = (usize, fn(usize) -> f32);

/// The 16-lane FMA loop (24 accumulators), where the CPU has AVX-512F.
pub(crate) fn fma_loop_512() -> Option<FmaLoop> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present (checked here).
        return Some((24 * 16 * 2, |n| unsafe { x86::avx512(n) }));
    }
    None
}

/// The 8-lane FMA loop (12 accumulators, in 16 registers), where the CPU has AVX2 and FMA.
pub(crate) fn fma_loop_256() -> Option<FmaLoop> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA are present (checked here).
        return Some((12 * 8 * 2, |n| unsafe { x86::avx2(n) }));
    }
    None
}

/// The time, in seconds, of one run of `run(n)` on this thread.
fn time(run: fn(usize) -> f32, n: usize) -> f64 {
    let t = std::time::Instant::now();
    std::hint::black_box(run(std::hint::black_box(n)));
    t.elapsed().as_secs_f64()
}

/// This thread's 16-lane FMA rate over its 8-lane rate, each the best of 7 interleaved
/// runs of the same 12.6 MFLOP (about 0.1 ms each on a 3 GHz core; the first 512-bit runs
/// on some Intel cores are slow while the core changes its power state, which the best
/// run leaves out). `None` without both loops.
fn wide_fma_ratio() -> Option<f64> {
    let ((f512, run512), (f256, run256)) = (fma_loop_512()?, fma_loop_256()?);
    const FLOP: usize = 1 << 23;
    let (n512, n256) = (FLOP.div_ceil(f512), FLOP.div_ceil(f256));
    let (mut t512, mut t256) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..7 {
        t512 = t512.min(time(run512, n512));
        t256 = t256.min(time(run256, n256));
    }
    Some(((n512 * f512) as f64 / t512) / ((n256 * f256) as f64 / t256))
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

    const BOTH: Features = Features {
        avx2: true,
        avx512: true,
    };
    const AVX2: Features = Features {
        avx2: true,
        avx512: false,
    };
    const NEITHER: Features = Features {
        avx2: false,
        avx512: false,
    };

    #[test]
    fn avx512_is_chosen_only_where_its_fmas_are_faster() {
        assert_eq!(choose(None, BOTH, || true), Some(Isa::Avx512));
        assert_eq!(choose(None, BOTH, || false), Some(Isa::Avx2));
        // Without AVX-512 the rate is not measured at all.
        assert_eq!(choose(None, AVX2, || panic!("measured")), Some(Isa::Avx2));
        assert_eq!(choose(None, NEITHER, || panic!("measured")), None);
    }

    #[test]
    fn a_forced_set_is_honoured_where_the_cpu_has_it() {
        let unmeasured = || panic!("measured");
        assert_eq!(choose(Some("avx512"), BOTH, unmeasured), Some(Isa::Avx512));
        assert_eq!(choose(Some("avx2"), BOTH, unmeasured), Some(Isa::Avx2));
        assert_eq!(choose(Some("none"), BOTH, unmeasured), None);
        // A set the CPU lacks (or an unknown name) falls back to the CPU's own choice.
        assert_eq!(choose(Some("avx512"), AVX2, unmeasured), Some(Isa::Avx2));
        assert_eq!(choose(Some("avx2"), NEITHER, unmeasured), None);
        assert_eq!(choose(Some("sse"), BOTH, || false), Some(Isa::Avx2));
    }

    #[test]
    fn the_loops_compute_what_they_are_timed_on() {
        // Each lane runs v ← 0.999999·v + 1e-7 from 1: after 3 rounds, summed over lanes.
        let mut v = 1.0f32;
        for _ in 0..3 {
            v = v.mul_add(0.999_999, 1e-7);
        }
        for (flop, run) in [fma_loop_512(), fma_loop_256()].into_iter().flatten() {
            let lanes = flop / 2;
            let got = run(3);
            assert!((got - lanes as f32 * v).abs() < 1e-3, "{got}");
        }
    }

    #[test]
    fn the_rate_ratio_is_positive_and_finite_where_both_loops_exist() {
        let r = wide_fma_ratio();
        assert_eq!(
            r.is_some(),
            fma_loop_512().is_some() && fma_loop_256().is_some()
        );
        if let Some(r) = r {
            assert!(r.is_finite() && r > 0.0, "{r}");
        }
    }
}
