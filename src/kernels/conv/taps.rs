//! Convolutions with few output channels (a coupling network's last layer: 192 → 4 in
//! Glow, 64 → 2 in the tutorial's nets) as pointwise GEMMs over the input channels, one
//! row per output channel and tap, f32 on the pointwise GEMM (AVX2 or AVX-512).
//!
//! With `a` one image's convolution input `[Ci, H, W]`, taps `t = (i, j)` of a `kh × kw`
//! kernel, padding `p` (a "same" convolution: `H' = H`, `W' = W`) and
//! `sₜ(q) = q + (i − p, j − p)`:
//!
//! ```text
//! T[(o, t), q]  = Σ_c w[o, c, t]·a[c, q]                 [Co·kh·kw, H·W]   (forward)
//! y[o, q]       = b[o] + Σₜ T[(o, t), sₜ(q)]             (shift and add; zero outside)
//! Gₛ[(o, t), q] = G[o, q − (i − p, j − p)]               (the transposed convolution's
//!                                                          patch matrix of G)
//! ∂w[o, c, t]   = Σ_q Gₛ[(o, t), q]·a[c, q]              [Co·kh·kw, Ci]    (∂W)
//! ```
//!
//! The GEMMs' inner dimension is `Ci` (forward) or `H·W` (∂W) instead of the output
//! channels, so the few outputs no longer starve the register tile; the shift-add touches
//! `Co·kh·kw·H·W` values, a `Ci`-th of the products. ∂x is the transposed convolution's
//! `Wᵀ·Gₛ` with `K = Co·kh·kw` (`conv_input_grad`, on the `gemm` crate: the pointwise
//! kernel measured no faster at `K` = 18–72, and 10 % slower for 64 → 2 at 28×28).
//!
//! `timing::conv_op_timings`, two threads, batch 64, three runs, direct kernels → here
//! (GFLOP/s): 192 → 4 at 14×14 forward 90–99 → 101–106, ∂W 91–97 → 115–123; 192 → 8 at
//! 7×7 97–99 → 96–102, 80–82 → 85–105; the tutorial's 64 → 2 (ConcatELU of 32 channels)
//! at 28×28 48–63 → 71–78, 53–59 → 61–80; 96 → 4 at 14×14 77 → 90–94, 72–77 → 94–101;
//! 128 → 8 at 7×7 68–82 → 88–92, 56–72 → 88–92 (`Ci` counted after ConcatELU).

use std::mem::MaybeUninit;

use super::{add_bias_grad, bands, flip_transpose_dims, im2col, matmul_bt, pointwise, Geom, View};
use super::{as_uninit, assume_init_mut, per_image_write, wide, Real};
use crate::kernels::reduce_images;

/// `W` (`[Co, Ci, kh, kw]`) as `[Co·kh·kw, Ci]`: row `(o, t)` holds `w[o, ·, t]` (each
/// output channel's `[Ci, kh·kw]` block transposed).
pub(super) fn taps_major(w: &[f32], g: &Geom) -> Vec<f32> {
    let taps = g.kh * g.kw;
    w.chunks_exact(g.ci * taps)
        .flat_map(|wo| flip_transpose_dims(wo, (g.ci, taps), 1))
        .collect()
}

/// `y[o, q] = b[o] + Σₜ T[(o, t), sₜ(q)]` for one image: `tm` is `T` (`[Co·kh·kw, H·W]`,
/// rows `rs ≥ H·W` values apart), `y` `[Co, H', W']`; taps reaching outside the image add
/// nothing.
pub(super) fn shift_add(
    (tm, rs): (&[f32], usize),
    b: &[f32],
    g: &Geom,
    y: &mut [MaybeUninit<f32>],
) {
    let (hw, ohw) = (g.h * g.w, g.out_hw());
    for (o, yo) in y.chunks_exact_mut(ohw).enumerate() {
        for v in yo.iter_mut() {
            v.write(b[o]);
        }
        // SAFETY: every element was written just above.
        let yo = unsafe { assume_init_mut(yo) };
        for i in 0..g.kh {
            // Output rows whose source row y + i − p is inside the image.
            let (y0, y1) = (g.pad.saturating_sub(i), (g.h + g.pad - i).min(g.oh));
            for j in 0..g.kw {
                let row = &tm[((o * g.kh + i) * g.kw + j) * rs..][..hw];
                let (lo, hi, off) = g.col_range(j);
                if lo >= hi {
                    continue;
                }
                for oy in y0..y1 {
                    let sy = oy + i - g.pad;
                    let src = &row[sy * g.w..][(lo as isize + off) as usize..][..hi - lo];
                    let dst = &mut yo[oy * g.ow + lo..oy * g.ow + hi];
                    wide(|| add_row(dst, src));
                }
            }
        }
    }
}

/// `dst += src`.
#[inline(always)]
fn add_row(dst: &mut [f32], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// The forward pass: per image `T = W_taps·aₙ` on the pointwise GEMM, then [`shift_add`].
pub(super) fn forward_taps(x: &[f32], w: &[f32], b: &[f32], g: &Geom) -> Vec<f32> {
    let (m, hw) = (g.co * g.kh * g.kw, g.h * g.w);
    let wt = taps_major(w, g);
    let wv = View {
        data: &wt,
        rs: g.ci,
    };
    let image = |n: usize, y: &mut [MaybeUninit<f32>], scratch: &mut [f32], _| {
        let (act, tm) = scratch.split_at_mut(g.act_scratch());
        let a = g.activate(&x[n * g.in_len()..(n + 1) * g.in_len()], act);
        let av = View { data: a, rs: hw };
        // SAFETY: `product` writes f32 values only.
        pointwise::product(wv, av, (m, hw, g.ci), unsafe { as_uninit(tm) }, hw, None);
        shift_add((tm, hw), b, g, y);
    };
    let (len, chunk) = (g.b * g.co * g.out_hw(), g.co * g.out_hw());
    // SAFETY: `shift_add` writes every element of `y`.
    unsafe { per_image_write(len, chunk, g.act_scratch() + m * hw, image) }
}

/// `[∂W; ∂b]`: per fixed group of images `∂W' += Gₛ·aₙᵀ` (`Gₛ` the transposed
/// convolution's patch matrix of `Gₙ`, band by band), then `∂w[o, c, i, j]` from row
/// `(o, kh − 1 − i, kw − 1 − j)` of `∂W'` (that patch matrix runs over the flipped taps).
pub(super) fn weight_grad_taps(x: &[f32], gy: &[f32], g: &Geom) -> Vec<f32> {
    let t = g.transposed().expect("a square same-size kernel");
    let (m, hw, ohw) = (t.k(), g.h * g.w, g.out_hw());
    let part = |range: std::ops::Range<usize>| {
        let mut out = vec![0.0; m * g.ci + g.co];
        let (dw, db) = out.split_at_mut(m * g.ci);
        f32::with_scratch(g.act_scratch() + m * hw, |scratch| {
            let (act, cols) = scratch.split_at_mut(g.act_scratch());
            for (i, n) in range.enumerate() {
                let a = g.activate(&x[n * g.in_len()..(n + 1) * g.in_len()], act);
                let gn = &gy[n * g.co * ohw..(n + 1) * g.co * ohw];
                add_bias_grad(db, gn, ohw);
                for (k, (y0, y1)) in bands::<f32>(&t, m).enumerate() {
                    let len = (y1 - y0) * t.ow;
                    im2col(gn, cols, &t, (y0, y1));
                    let (lhs, rhs) = ((&cols[..], len), (&a[y0 * t.ow..], hw));
                    let none = gemm::Parallelism::None;
                    matmul_bt(dw, g.ci, (m, g.ci, len), lhs, rhs, i > 0 || k > 0, none);
                }
            }
        });
        out
    };
    let sums = reduce_images(g.b, m * g.ci + g.co, part);
    let (dwf, db) = sums.split_at(m * g.ci);
    let mut out = vec![0.0; g.co * g.k() + g.co];
    flipped_taps_to_weights(dwf, g, &mut out[..g.co * g.k()]);
    out[g.co * g.k()..].copy_from_slice(db);
    out
}

/// `dw` (`[Co, Ci, kh, kw]`) from `dwf`, the weight gradient in the tap-major rows of the
/// transposed convolution's patch matrix (`[Co·kh·kw, Ci]`, taps flipped):
/// `dw[o, c, t] = dwf[(o, kh·kw − 1 − t), c]`.
pub(super) fn flipped_taps_to_weights(dwf: &[f32], g: &Geom, dw: &mut [f32]) {
    let taps = g.kh * g.kw;
    for o in 0..g.co {
        for tap in 0..taps {
            let row = &dwf[(o * taps + taps - 1 - tap) * g.ci..][..g.ci];
            for (c, &v) in row.iter().enumerate() {
                dw[(o * g.ci + c) * taps + tap] = v;
            }
        }
    }
}
