//! Fast CPU kernels for the hot ops of coupling networks, as candle custom ops with
//! explicit backward passes.
//!
//! Stock candle 0.11 runs a 3×3 convolution at ~9 GFLOP/s and its input gradient through
//! a direct `conv_transpose2d` loop, and every elementwise op of ConcatELU, gating and the
//! channel LayerNorm allocates its own temporary. Here:
//! - [`conv2d`]: stride-1 zero-padded convolution with bias. With the AVX-512 kernel set
//!   (f32, spatial kernels with enough taps) it runs as a direct convolution of
//!   zero-padded planes with register-tiled microkernels (module `direct`): forward, the
//!   input gradient as the transposed convolution, and the weight gradient vectorised over
//!   output channels. The AVX2 set runs the same kernels in 8-lane vectors (module `avx2`);
//!   module `isa` picks the set per CPU (AVX-512 only where its FMAs are faster) and
//!   [`simd`] says which.
//!   Elsewhere — 1×1 and few-tap kernels, f64, other CPUs — it is im2col + GEMM per image in
//!   L2-sized bands of output rows, with `∂W = Σₙ Gₙ·colsₙᵀ` and the input gradient as the
//!   transposed convolution of `Gₙ` (col2im of `Wᵀ·Gₙ` where that does not fit, and for
//!   few-tap kernels). The GEMMs are the pointwise kernel (module `pointwise`, with either
//!   set) when images run in parallel, else the `gemm` crate (the one candle's matmul
//!   uses). Images are spread over rayon's threads.
//!   3×3 padding-1 convolutions with enough channels and positions (the coupling
//!   networks' hidden layers) run as Winograd along rows (module `winograd`: F(4, 3), 6
//!   multiplications per 4 outputs and kernel row instead of 12, on AVX2 and on AVX-512
//!   for maps at least 28 wide; else F(2, 3), 4 per output pair instead of 6), forward and
//!   both gradients;
//!   [`Kernels::Direct`] turns that off.
//! - [`conv2d_concat_elu`], [`conv2d_relu`]: the same convolution of ConcatELU (or ReLU) of
//!   its input, computed per image in scratch so the activation never becomes a tensor.
//! - [`concat_elu`], [`gate`]: fused elementwise forward and backward.
//! - [`tune_allocator`], [`tune_candle_pool`]: process settings for training loops (glibc's
//!   heap keeps activations; candle's workers park instead of spinning between ops).
//! - [`layer_norm_channels`]: a per-pixel LayerNorm over channels with affine weight and
//!   bias (`x̂ = (x − μ)/√(σ² + ε)`, then `x̂·w + b`), forward and backward in one pass each.
//! - [`rq_spline`]: the rational-quadratic spline of spline couplings, each element's
//!   knots decoded on the stack, with a hand-written backward pass.
//! - [`gated_tail`]: the tail of the tutorial's gated block — 1×1 convolution of ConcatELU,
//!   gate, residual and LayerNorm — as one op run image by image in cache; its backward
//!   recomputes the image's activations instead of storing them.
//! - [`glow_net`]: Glow's coupling network — 3×3 convolution, ReLU, 1×1 convolution, ReLU,
//!   3×3 convolution — as one op run image by image (7×7 maps four images at a time) while
//!   the activations are in cache, forward and backward (AVX2 set).
//!
//! Every op falls back to the composed candle reference (module [`reference`](mod@reference)) on
//! non-CPU devices, for dtypes other than f32/f64, and when [`set_kernels`] selects
//! [`Kernels::Candle`] (`flowlab bench --kernels candle` measures that side by side;
//! `--kernels direct` the fast kernels without Winograd).
//! The tests compare values and gradients against the reference on several shapes.

/// Runs a generic kernel on f32 or f64 CPU storages of one dtype.
macro_rules! dispatch {
    ($name:literal, ($($s:ident),+), |$($v:ident),+| $body:expr) => {
        match ($($s,)+) {
            ($(candle_core::CpuStorage::F32($v),)+) => Ok(candle_core::CpuStorage::F32($body)),
            ($(candle_core::CpuStorage::F64($v),)+) => Ok(candle_core::CpuStorage::F64($body)),
            _ => Err(candle_core::Error::Msg(
                concat!($name, ": f32 or f64 inputs of one dtype expected").into(),
            )),
        }
    };
}
pub(crate) use dispatch;

mod adam;
mod affine;
mod alloc;
mod avx2;
mod conv;
mod direct;
mod elementwise;
mod gated;
mod isa;
mod norm;
mod pointwise;
mod pool;
pub mod reference;
mod spline;
mod winograd;

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{DType, Tensor};

pub use adam::{adam_step, AdamStep};
pub use affine::channel_affine;
pub use alloc::{tune_allocator, HugePageAlloc};
pub use conv::{conv2d, conv2d_concat_elu, conv2d_relu, glow_net};
pub use elementwise::{concat_elu, gate};
pub use gated::gated_tail;
pub(crate) use isa::{fma_loop_256, fma_loop_512, FmaLoop};
pub use norm::layer_norm_channels;
pub use pool::tune_candle_pool;
pub use spline::{rq_spline, RqSplineSpec, MAX_SPLINE_BINS};

/// Which implementation the hot ops use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// flowlab's fused CPU kernels (the default); candle's ops elsewhere.
    Fast,
    /// The fused CPU kernels without the Winograd convolutions: every 3×3 convolution by
    /// the direct kernels (to measure what Winograd gains).
    Direct,
    /// candle's own ops everywhere (the reference; slower on CPU).
    Candle,
}

static KERNELS: AtomicU8 = AtomicU8::new(0);

/// Selects the kernels for the whole process (used by benchmarks and tests).
pub fn set_kernels(k: Kernels) {
    KERNELS.store(
        match k {
            Kernels::Fast => 0,
            Kernels::Direct => 1,
            Kernels::Candle => 2,
        },
        Ordering::Relaxed,
    );
}

#[cfg(test)]
thread_local! {
    /// A test's choice for the ops it calls on its own thread ([`with_kernels`]); the ops
    /// decide on the calling thread, before spreading work over rayon's.
    static TEST_KERNELS: std::cell::Cell<Option<Kernels>> = const { std::cell::Cell::new(None) };
}

/// The kernels currently selected.
pub fn kernels() -> Kernels {
    #[cfg(test)]
    if let Some(k) = TEST_KERNELS.with(|k| k.get()) {
        return k;
    }
    match KERNELS.load(Ordering::Relaxed) {
        0 => Kernels::Fast,
        1 => Kernels::Direct,
        _ => Kernels::Candle,
    }
}

/// The vector extension the convolution microkernels run on in this process: `avx512`,
/// `avx2` (AVX2 with FMA), or `none` (im2col + GEMM only). Chosen once from the CPU (AVX-512
/// only where its FMAs are faster than AVX2's; see `isa.rs`); `FLOWLAB_SIMD=avx512`, `avx2`
/// or `none` picks one the CPU has (to test and compare them).
pub fn simd() -> &'static str {
    match isa::isa() {
        Some(isa::Isa::Avx512) => "avx512",
        Some(isa::Isa::Avx2) => "avx2",
        None => "none",
    }
}

/// Whether the fast CPU path applies to these tensors.
fn use_fast(ts: &[&Tensor]) -> bool {
    kernels() != Kernels::Candle
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64))
        && ts.windows(2).all(|w| w[0].dtype() == w[1].dtype())
}

/// The float types the kernels are written for.
trait Real:
    Copy
    + Send
    + Sync
    + 'static
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
{
    const ZERO: Self;
    const ONE: Self;
    /// `eˣ` in straight-line arithmetic that vectorises: f32 gets a Cephes-style degree-6
    /// polynomial after range reduction (≤ 2 ulp on [−87, 88]; clamped outside), f64 the
    /// library `exp`.
    fn fast_exp(self) -> Self;
    fn sqrt(self) -> Self;
    /// The natural logarithm (the library's).
    fn ln(self) -> Self;
    fn from_f64(v: f64) -> Self;
    fn from_usize(v: usize) -> Self;
    /// Runs `f` on this thread's reusable scratch buffer of at least `len` elements
    /// (contents unspecified), so kernels neither allocate nor zero per call.
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
}

macro_rules! impl_real {
    ($t:ty, $fast_exp:path) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn fast_exp(self) -> Self {
                $fast_exp(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn from_usize(v: usize) -> Self {
                v as $t
            }
            fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
                thread_local! {
                    static SCRATCH: std::cell::RefCell<Vec<$t>> = const { std::cell::RefCell::new(Vec::new()) };
                }
                SCRATCH.with(|s| match s.try_borrow_mut() {
                    Ok(mut v) => {
                        if v.len() < len {
                            v.resize(len, 0.0);
                        }
                        f(&mut v[..len])
                    }
                    // Re-entered on this thread (a nested kernel): use a fresh buffer.
                    Err(_) => f(&mut vec![0.0; len]),
                })
            }
        }
    };
}
impl_real!(f32, exp_f32);
impl_real!(f64, f64::exp);

/// `eˣ` for f32 without a library call, so loops over it vectorise (see [`Real::fast_exp`]).
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    // Fused multiply-adds (`mul_add`): one instruction each inside the AVX2/AVX-512 kernels
    // (see [`wide`]), where separate multiplies and adds made the exponential-bearing loops
    // of ConcatELU and the gate twice as long.
    let x = x.clamp(-87.0, 88.0);
    let t = x.mul_add(LOG2E, ROUND);
    let r = t - ROUND;
    let f = (-r).mul_add(LN2_LO, (-r).mul_add(LN2_HI, x));
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(f, 1.398_199_9e-3);
    p = p.mul_add(f, 8.333_452e-3);
    p = p.mul_add(f, 4.166_579_6e-2);
    p = p.mul_add(f, 1.666_666_5e-1);
    p = p.mul_add(f, 0.5);
    let y = (p * f).mul_add(f, f) + 1.0;
    // 2^r built from t's bits (t = ROUND + r exactly, so its low mantissa bits hold r):
    // a bit cast vectorises, where a saturating `r as i32` goes lane by lane.
    let r_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    y * f32::from_bits(r_bits.wrapping_add(127) << 23)
}

/// The widest vector extension the elementwise code is compiled for on this CPU: 2 for
/// AVX-512F (with AVX2 and FMA), 1 for AVX2+FMA, 0 for neither (checked once by std).
#[inline(always)]
fn wide_level() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        let has_avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        if has_avx2 && std::arch::is_x86_feature_detected!("avx512f") {
            return 2;
        }
        if has_avx2 {
            return 1;
        }
    }
    0
}

/// Runs `f` inside a function compiled for AVX-512F (else AVX2+FMA) when the CPU has it, so
/// the `#[inline(always)]` elementwise loops it calls vectorise 16 (else 8) wide; else runs
/// it as is. Each element's arithmetic is the same at every width, so the results are too.
/// (16 wide measured 3–8 % faster per tutorial coupling step than 8 wide, in 5 of 6
/// interleaved rounds: the exp-bearing loops of ConcatELU and the gate are compute-bound.)
///
/// This works only where LLVM inlines the closure into the feature-enabled function, which
/// it does for a single short loop. Larger bodies go in a [`wide_fn!`] instead.
#[inline(always)]
fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        match wide_level() {
            // SAFETY: the CPU supports the enabled features (checked by `wide_level`).
            2 => return unsafe { avx512(f) },
            // SAFETY: as above.
            1 => return unsafe { avx2(f) },
            _ => {}
        }
    }
    f()
}

/// Defines `fn name<T: Real>(args) -> R` whose body is compiled three times (for AVX-512F,
/// for AVX2+FMA, and plain) and runs in the widest the CPU has, like [`wide`]. The body is an
/// `#[inline(always)]` function, so it is always compiled inside the feature-enabled
/// function; a closure handed to [`wide`] is not once it is larger than a short loop (then
/// it runs as SSE code). Arguments are plain identifiers; for use inside `kernels`.
macro_rules! wide_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident<T: Real>($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name<T: Real>($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body<T: Real>($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512<T: Real>($($a: $t),*) $(-> $r)? {
                    body($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2<T: Real>($($a: $t),*) $(-> $r)? {
                    body($($a),*)
                }
                match $crate::kernels::wide_level() {
                    // SAFETY: the CPU supports the enabled features (checked by `wide_level`).
                    2 => return unsafe { avx512($($a),*) },
                    // SAFETY: as above.
                    1 => return unsafe { avx2($($a),*) },
                    _ => {}
                }
            }
            body($($a),*)
        }
    };
}
pub(crate) use wide_fn;

/// The contiguous slice a layout describes (the public entry points make inputs contiguous).
fn slice<'a, T>(data: &'a [T], layout: &candle_core::Layout) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => Err(candle_core::Error::Msg(
            "flowlab kernel: input is not contiguous".into(),
        )),
    }
}

/// `[B, C, …]` → (B, C, positions per channel), for the per-channel kernel `what`.
fn dims3(what: &str, dims: &[usize]) -> candle_core::Result<(usize, usize, usize)> {
    match dims {
        [b, c, rest @ ..] if *c > 0 => Ok((*b, *c, rest.iter().product())),
        _ => Err(candle_core::Error::Msg(format!(
            "{what} kernel: expected [B, C, …] with C > 0, got {dims:?}"
        ))),
    }
}

/// Lanes of the per-channel kernels' partial sums over positions. Element i of a row goes to
/// lane i mod 16 and the lanes are added in order at the end, so the loops vectorise and the
/// result does not depend on the vector width. The loops walk 16-element blocks
/// (`chunks_exact`), then the tail: indexed by `i0 + l`, LLVM could not prove the indices in
/// bounds and ran the LayerNorm's backward sums on scalars.
const SUM_LANES: usize = 16;

/// The lanes of a [`SUM_LANES`] sum, added in lane order.
#[inline(always)]
fn sum_lanes<T: Real>(v: [T; SUM_LANES]) -> T {
    v.iter().fold(T::ZERO, |a, &b| a + b)
}

/// `[out₀; …; out_{K−1}; sums]` of a kernel with per-channel parameter gradients and `K`
/// outputs of `n·img` values each: `f(image, outs, scratch, sums, par)` fills image n's
/// `img` values of every output and adds its share into `sums` (`sums_len` values). Images
/// run in parallel in fixed groups of [`REDUCE_GROUP`] (scheduled as [`per_image`]), each
/// group's sums starting from zero; the groups' sums are added in group order, so the
/// result is the same for any thread count. Each group's output chunks are zeroed by the
/// worker that fills them, as in [`per_image_out`]. Empty images (`img = 0`) run nothing.
fn per_image_with_sums<T: Real, const K: usize, F>(
    n: usize,
    img: usize,
    scratch_len: usize,
    sums_len: usize,
    f: F,
) -> Vec<T>
where
    F: Fn(usize, [&mut [T]; K], &mut [T], &mut [T], gemm::Parallelism) + Send + Sync,
{
    let zeroed =
        |i: usize, outs: [&mut [std::mem::MaybeUninit<T>]; K], s: &mut [T], sums: &mut [T], par| {
            f(i, outs.map(|o| init_zeroed(o)), s, sums, par)
        };
    // SAFETY: `zeroed` zeroes every output chunk before `f` sees it.
    unsafe { per_image_with_sums_write(n, img, scratch_len, sums_len, zeroed) }
}

/// [`per_image_with_sums`] without zeroing the outputs, as [`per_image_write`] is to
/// [`per_image_out`].
///
/// # Safety
///
/// `f` must initialise all `img` values of each of the `K` output chunks it is handed.
unsafe fn per_image_with_sums_write<T: Real, const K: usize, F>(
    n: usize,
    img: usize,
    scratch_len: usize,
    sums_len: usize,
    f: F,
) -> Vec<T>
where
    F: Fn(usize, [&mut [std::mem::MaybeUninit<T>]; K], &mut [T], &mut [T], gemm::Parallelism)
        + Send
        + Sync,
{
    let group = |first: usize,
                 mut outs: [&mut [std::mem::MaybeUninit<T>]; K],
                 s: &mut [T],
                 sums: &mut [T],
                 par| {
        for j in 0..outs[0].len() / img {
            let image = outs.each_mut().map(|o| &mut o[j * img..(j + 1) * img]);
            f(first + j, image, s, sums, par);
        }
    };
    // SAFETY: `group` hands each image's chunk of each output to `f`, which by the caller's
    // promise initialises it.
    unsafe { per_group_with_sums_write(n, img, scratch_len, sums_len, group) }
}

/// The scheduling of [`per_image_with_sums_write`], one call per fixed group of
/// [`REDUCE_GROUP`] images: `f(first image, outs, scratch, sums, par)` gets the group's
/// chunk of each output (`images·img` values, the last group possibly short) and a zeroed
/// `sums` of its own; the groups' sums are added in group order after all have run.
///
/// # Safety
///
/// `f` must initialise every value of each output chunk it is handed.
unsafe fn per_group_with_sums_write<T: Real, const K: usize, F>(
    n: usize,
    img: usize,
    scratch_len: usize,
    sums_len: usize,
    f: F,
) -> Vec<T>
where
    F: Fn(usize, [&mut [std::mem::MaybeUninit<T>]; K], &mut [T], &mut [T], gemm::Parallelism)
        + Send
        + Sync,
{
    use std::sync::Mutex;
    let len = K * n * img;
    let mut out: Vec<T> = Vec::with_capacity(len + sums_len);
    let mut parts = Vec::new();
    if img > 0 {
        let groups = n.div_ceil(REDUCE_GROUP);
        let partial: Vec<Mutex<Vec<T>>> = (0..groups).map(|_| Mutex::new(Vec::new())).collect();
        // Per group, its chunk of each output (the last group may be short).
        let mut outputs: Vec<_> = out.spare_capacity_mut()[..len]
            .chunks_mut(n * img)
            .map(|o| o.chunks_mut(REDUCE_GROUP * img))
            .collect();
        let mut chunks: Vec<[&mut [std::mem::MaybeUninit<T>]; K]> = (0..groups)
            .map(|_| std::array::from_fn(|k| outputs[k].next().expect("one chunk per group")))
            .collect();
        for_chunks::<T, _, _>(&mut chunks, 1, scratch_len, |gi, group, s, par| {
            let mut sums = vec![T::ZERO; sums_len];
            let outs = group[0].each_mut().map(|o| &mut **o);
            f(gi * REDUCE_GROUP, outs, s, &mut sums, par);
            *partial[gi].lock().unwrap_or_else(|e| e.into_inner()) = sums;
        });
        parts = partial
            .into_iter()
            .map(|part| part.into_inner().unwrap_or_else(|e| e.into_inner()))
            .collect();
    }
    // SAFETY: with img > 0, `for_chunks` ran the closure on every group, which handed the
    // group's chunk of each of the K outputs to `f`, which by the caller's promise
    // initialised it; together they cover all `len` elements (len = 0 otherwise).
    unsafe { out.set_len(len) };
    out.extend_from_slice(&sum_in_order(sums_len, parts));
    out
}

/// `s` as possibly uninitialised values, for a kernel that takes its output that way.
///
/// # Safety
///
/// Nothing but initialised values may be written through the result.
unsafe fn as_uninit<T>(s: &mut [T]) -> &mut [std::mem::MaybeUninit<T>] {
    // SAFETY: `MaybeUninit<T>` has the layout of `T`; the caller writes only initialised
    // values, so `s` stays initialised.
    unsafe { &mut *(s as *mut [T] as *mut [std::mem::MaybeUninit<T>]) }
}

/// Zeroes `o` and returns it as initialised values.
fn init_zeroed<T: Real>(o: &mut [std::mem::MaybeUninit<T>]) -> &mut [T] {
    for v in o.iter_mut() {
        v.write(T::ZERO);
    }
    // SAFETY: every element of `o` was initialised just above.
    unsafe { assume_init_mut(o) }
}

/// `o` as initialised values.
///
/// # Safety
///
/// Every element of `o` must be initialised.
unsafe fn assume_init_mut<T>(o: &mut [std::mem::MaybeUninit<T>]) -> &mut [T] {
    // SAFETY: `MaybeUninit<T>` has the layout of `T`, and the caller promises every element
    // is initialised.
    unsafe { &mut *(o as *mut [std::mem::MaybeUninit<T>] as *mut [T]) }
}

/// A gradient op's flat `[∂x; ∂a; ∂b]` split into `∂x` shaped like `x`, and `∂a`, `∂b` (as
/// many values as `a` has) shaped like `a` and `b`. `∂a` and `∂b` get their own storage: as
/// views they would keep the whole buffer, `∂x` included, alive in the gradient store until
/// the optimizer step.
fn split_grads(
    all: &Tensor,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (n, c) = (x.elem_count(), a.elem_count());
    let dx = all.narrow(0, 0, n)?.reshape(x.shape())?;
    let da = all
        .narrow(0, n, c)?
        .force_contiguous()?
        .reshape(a.shape())?;
    let db = all
        .narrow(0, n + c, c)?
        .force_contiguous()?
        .reshape(b.shape())?;
    Ok((dx, da, db))
}

/// Images per partial sum of a batch reduction ([`reduce_images`]). Fixed, so the rounding of
/// a reduction does not depend on the thread count or on rayon's work stealing.
const REDUCE_GROUP: usize = 4;

/// `Σ_g f(range_g)` over fixed consecutive groups of [`REDUCE_GROUP`] of `0..n`, computed in
/// parallel and added in group order: bit-identical results run to run, so training is
/// reproducible and resumable exactly. `f` returns a partial sum of `len` elements.
fn reduce_images<T: Real>(
    n: usize,
    len: usize,
    f: impl Fn(std::ops::Range<usize>) -> Vec<T> + Send + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    let groups = n.div_ceil(REDUCE_GROUP);
    let parts: Vec<Vec<T>> = (0..groups)
        .into_par_iter()
        .map(|g| f(g * REDUCE_GROUP..((g + 1) * REDUCE_GROUP).min(n)))
        .collect();
    sum_in_order(len, parts)
}

/// `Σ parts`, elementwise over `len` values, added in the parts' order (so a batch reduction
/// over fixed groups gives the same bits for any thread count). Long sums run in parallel
/// over slices of the output; each element is still added in the parts' order.
fn sum_in_order<T: Real>(len: usize, parts: impl IntoIterator<Item = Vec<T>>) -> Vec<T> {
    use rayon::prelude::*;
    let parts: Vec<Vec<T>> = parts.into_iter().collect();
    debug_assert!(parts.iter().all(|p| p.len() == len));
    let mut total = vec![T::ZERO; len];
    let add_slice = |i: usize, t: &mut [T]| {
        for p in &parts {
            for (t, &v) in t.iter_mut().zip(&p[i * SUM_SLICE..]) {
                *t += v;
            }
        }
    };
    if len >= 2 * SUM_SLICE && rayon::current_num_threads() > 1 {
        total
            .par_chunks_mut(SUM_SLICE)
            .enumerate()
            .for_each(|(i, t)| add_slice(i, t));
    } else {
        total
            .chunks_mut(SUM_SLICE)
            .enumerate()
            .for_each(|(i, t)| add_slice(i, t));
    }
    total
}

/// Elements per task of [`sum_in_order`]: 16 KiB of f32 output.
const SUM_SLICE: usize = 4096;

/// Runs `f(index, chunk, scratch)` over the `chunk`-sized pieces of `out`, in parallel over
/// rayon's threads when there are at least as many pieces as threads; otherwise in order,
/// handing the GEMM inside `f` the threads instead. `scratch` is a per-thread reused
/// buffer of `scratch_len` elements with unspecified contents.
fn per_image<T: Real, F>(out: &mut [T], chunk: usize, scratch_len: usize, f: F)
where
    F: Fn(usize, &mut [T], &mut [T], gemm::Parallelism) + Send + Sync,
{
    for_chunks::<T, T, F>(out, chunk, scratch_len, f)
}

/// [`per_image`] into a new `len`-element output (`len` a multiple of `chunk`). Each chunk is
/// zeroed by the worker that fills it, in parallel and while it is cache-hot, instead of
/// the whole buffer by one thread up front.
fn per_image_out<T: Real, F>(len: usize, chunk: usize, scratch_len: usize, f: F) -> Vec<T>
where
    F: Fn(usize, &mut [T], &mut [T], gemm::Parallelism) + Send + Sync,
{
    if chunk == 0 || !len.is_multiple_of(chunk) {
        let mut out = vec![T::ZERO; len];
        per_image(&mut out, chunk, scratch_len, f);
        return out;
    }
    let zeroed = |n: usize, o: &mut [std::mem::MaybeUninit<T>], s: &mut [T], par| {
        f(n, init_zeroed(o), s, par)
    };
    // SAFETY: `zeroed` zeroes each chunk before `f` sees it.
    unsafe { per_image_write(len, chunk, scratch_len, zeroed) }
}

/// [`per_image_out`] without the zeroing, for kernels that write every element of their
/// chunk before (or without) reading it, so the output is written once instead of twice.
/// Zeroing outputs was 3.5–5 % of the tutorial coupling step's samples (`perf record`).
///
/// # Safety
///
/// `f` must initialise every element of each chunk it is handed; `len` must be a multiple
/// of `chunk` (checked).
unsafe fn per_image_write<T: Real, F>(len: usize, chunk: usize, scratch_len: usize, f: F) -> Vec<T>
where
    F: Fn(usize, &mut [std::mem::MaybeUninit<T>], &mut [T], gemm::Parallelism) + Send + Sync,
{
    assert!(
        if chunk == 0 {
            len == 0
        } else {
            len.is_multiple_of(chunk)
        },
        "{len} values do not split into chunks of {chunk}"
    );
    let mut out: Vec<T> = Vec::with_capacity(len);
    for_chunks::<T, _, _>(&mut out.spare_capacity_mut()[..len], chunk, scratch_len, f);
    // SAFETY: `for_chunks` ran `f` on each of the `len / chunk` chunks, which by the
    // caller's promise initialised all `len` elements.
    unsafe { out.set_len(len) };
    out
}

/// The scheduling of [`per_image`] for chunks of any element type `U`.
///
/// Work is split down to single pieces (rayon's adaptive splitting, no minimum length), so
/// the thread that finishes first steals single images rather than waiting while the other
/// works through a block of several. With a minimum of `pieces / (4 · threads)` (8 images
/// at batch 64 on 2 threads) a core idled at the end of each op: the tutorial coupling
/// step ran at 1.83–1.87 CPUs utilised (`perf stat`), and without it at 1.88–1.90 and
/// faster in 6 of 6 interleaved rounds (median 258 → 222 ms); the simple flow and the
/// multi-scale flow gained 2–3 % (4 of 4 rounds each), Glow nothing measurable.
fn for_chunks<T: Real, U: Send, F>(out: &mut [U], chunk: usize, scratch_len: usize, f: F)
where
    F: Fn(usize, &mut [U], &mut [T], gemm::Parallelism) + Send + Sync,
{
    use rayon::prelude::*;
    if chunk == 0 {
        return;
    }
    let pieces = out.len() / chunk;
    let threads = rayon::current_num_threads();
    if threads > 1 && pieces >= threads {
        out.par_chunks_mut(chunk).enumerate().for_each(|(n, o)| {
            T::with_scratch(scratch_len, |s| f(n, o, s, gemm::Parallelism::None))
        });
    } else {
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        T::with_scratch(scratch_len, |s| {
            for (n, o) in out.chunks_mut(chunk).enumerate() {
                f(n, o, s, par);
            }
        });
    }
}

/// Checks a fast op against its reference in tests: max |a − b| / max(1, max |b|).
#[cfg(test)]
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let b = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

/// A tensor of N(0, std²) values from seed `seed`, on the CPU, for the kernel tests.
#[cfg(test)]
fn randn(seed: u64, dims: &[usize], std: f64, dtype: DType) -> Tensor {
    crate::rng::Rng::new(seed)
        .normal(dims, std, dtype, &candle_core::Device::Cpu)
        .unwrap()
}

/// Runs `f` with the given kernels selected for the ops it calls on this thread, and
/// serialised against other tests that switch. (The choice was once the process-wide
/// one: tests running beside a switch to candle's ops could then compute a forward pass
/// with one set of kernels and its inverse with another, and
/// `dequant::variational_dequant_recovers_pixels`, which asks for exact pixels back,
/// failed a CI run.)
#[cfg(test)]
fn with_kernels<R>(k: Kernels, f: impl FnOnce() -> R) -> R {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    /// Clears this thread's choice however `f` ends.
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            TEST_KERNELS.with(|t| t.set(None));
        }
    }
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    TEST_KERNELS.with(|t| t.set(Some(k)));
    let _reset = Reset;
    f()
}

/// The gradient of `t` in `grads`, flattened to f32 values (thread-count tests compare
/// these bit for bit).
#[cfg(test)]
fn grad_f32(grads: &candle_core::backprop::GradStore, t: &Tensor) -> Vec<f32> {
    grads
        .get(t)
        .expect("a gradient for the tensor")
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Values and gradients of `f` on the fast and the reference kernels, compared.
/// `inputs` become variables; the loss is `Σ f(inputs) · probe` with a fixed random probe.
/// Asserts that `f`, run with the fast kernels, gives identical results on rayon pools of 1,
/// 2, 3 and 8 threads (batch reductions must not depend on the scheduling).
#[cfg(test)]
fn assert_thread_count_invariant<R: PartialEq + std::fmt::Debug + Send>(f: impl Fn() -> R + Sync) {
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| with_kernels(Kernels::Fast, &f))
    };
    let one = run(1);
    for t in [2, 3, 8] {
        assert_eq!(run(t), one, "{t} threads");
    }
}

#[cfg(test)]
fn check_against_reference(
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> crate::Result<Tensor>,
    tol: f64,
) {
    let run = |k: Kernels| {
        with_kernels(k, || {
            let vars: Vec<candle_core::Var> = inputs
                .iter()
                .map(|t| candle_core::Var::from_tensor(t).unwrap())
                .collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts).unwrap();
            let probe = crate::rng::Rng::new(99)
                .normal(y.dims(), 1.0, y.dtype(), y.device())
                .unwrap();
            let loss = (&y * &probe).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let gs: Vec<Tensor> = ts
                .iter()
                .map(|t| {
                    grads
                        .get(t)
                        .cloned()
                        .unwrap_or_else(|| t.zeros_like().unwrap())
                })
                .collect();
            (y, gs)
        })
    };
    let (y_fast, g_fast) = run(Kernels::Fast);
    let (y_ref, g_ref) = run(Kernels::Candle);
    assert_eq!(y_fast.dims(), y_ref.dims());
    let e = rel_err(&y_fast, &y_ref);
    assert!(e < tol, "value error {e}");
    for (i, (a, b)) in g_fast.iter().zip(&g_ref).enumerate() {
        assert_eq!(a.dims(), b.dims());
        let e = rel_err(a, b);
        assert!(e < tol, "gradient of input {i}: error {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::{kernels, with_kernels, Kernels};

    #[test]
    fn a_test_switching_kernels_leaves_other_threads_on_theirs() {
        with_kernels(Kernels::Candle, || {
            assert_eq!(kernels(), Kernels::Candle);
            // Another test's thread, meanwhile.
            let other = std::thread::spawn(kernels).join().unwrap();
            assert_eq!(other, Kernels::Fast);
        });
        assert_eq!(kernels(), Kernels::Fast);
    }

    #[test]
    fn sum_in_order_adds_each_element_in_part_order_on_any_pool() {
        // Long enough for the parallel slices (and a short last slice), with values whose
        // sum depends on the order of the additions in f32.
        let len = 3 * super::SUM_SLICE + 17;
        let parts: Vec<Vec<f32>> = (0..7)
            .map(|k| {
                (0..len)
                    .map(|i| {
                        ((i * 31 + k * 17) % 101) as f32 * 1e-3
                            + if k % 2 == 0 { 1e4 } else { -1e4 }
                    })
                    .collect()
            })
            .collect();
        let want: Vec<f32> = (0..len)
            .map(|i| parts.iter().fold(0.0f32, |a, p| a + p[i]))
            .collect();
        for threads in [1, 2, 3] {
            let got = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| super::sum_in_order(len, parts.clone()));
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{threads} threads"
            );
        }
    }
}
