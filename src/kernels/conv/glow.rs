//! Glow's coupling network as one op, run image by image while the image's activations sit
//! in the L2 cache (f32 on the pointwise GEMM, AVX2 or AVX-512).
//!
//! For one image `x` (`[Ci, H, W]`, `P = H·W` positions), `W₁` `[h, Ci, 3, 3]`, `W₂`
//! `[h, h, 1, 1]`, `W₃` `[Co, h, 3, 3]` (padding 1, so every map is `H × W`):
//!
//! ```text
//! r₁ = relu(W₁ ⋆ x + b₁)            [h, P]   (im2col of x, K = 9·Ci)
//! r₂ = relu(W₂·r₁ + b₂)             [h, P]   (the 1×1 convolution: most of the FLOPs)
//! y  = W₃ ⋆ r₂ + b₃                 [Co, P]  (as in `taps`: T = W₃,taps·r₂, then shift-add)
//! ```
//!
//! As three convolution ops, each layer writes its whole-batch output to memory and the
//! next reads it back (150 KB per image and layer at h = 192, 14×14; 9.6 MB per batch), and
//! so do their gradients. Here an image's `r₁` and `r₂` are written where the next product
//! reads them while they are in L2. The forward pass keeps `r₁` and `r₂` for the backward
//! pass (as the separate ops kept their outputs) when the inputs track gradients; the
//! backward pass, per image, with `G = ∂y`:
//!
//! ```text
//! ∂h₂ = (W₃ᵀ ⋆ G)·[r₂ > 0]                 (the transposed convolution: Wᵀ·Gₛ, K = 9·Co)
//! ∂W₃ += G ⋆ r₂,  ∂b₃ += Σ_p G              (`taps`' ∂W: Gₛ·r₂ᵀ, Gₛ the patch matrix of G)
//! ∂h₁ = (W₂ᵀ·∂h₂)·[r₁ > 0]
//! ∂W₂ += ∂h₂·r₁ᵀ,  ∂b₂ += Σ_p ∂h₂
//! ∂W₁ += ∂h₁·colsᵀ,  ∂b₁ += Σ_p ∂h₁        (cols: the patch matrix of x)
//! ∂x = col2im(W₁ᵀ·∂h₁)
//! ```
//!
//! Small maps go several images at a time ([`unit_for`]): a unit's matrices hold its images
//! side by side in columns, so at 7×7 each product has 196 columns (and each weight
//! gradient 196 terms) instead of 49.
//!
//! No log-determinant: this is a conditioner network, not a flow layer. The parameter
//! gradients are summed over fixed groups of images in order, so they do not depend on the
//! thread count.
//!
//! Measured (session 20, 2 threads, batch 64, h = 192): `timing::glow_net_rate` ran the
//! 14×14 level at 103–119 GFLOP/s forward and 93–123 backward; the 7×7 level's backward
//! went 63 → 78–85 GFLOP/s with four images per unit. Against the three separate ops,
//! interleaved `flowlab bench … --variant glow --batch 64 --steps 4` rounds of one binary:
//! Glow's step faster in 9 of 10, median 772 → 732 ms. The backward pass in the order
//! above (each mask's pass over the kept activations before the weight gradient that
//! reads them), against ∂W before the mask: faster in 9 of 10 rounds, 790 → 738 ms.

use std::mem::MaybeUninit;
use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor};

use super::taps::{flipped_taps_to_weights, shift_add, taps_major};
use super::{
    add_bias_grad, col2im_rs, flip_transpose, flip_transpose_dims, im2col_rs, matmul_bt, pointwise,
    Geom, Pre, View, TAPS_MAX_M,
};
use super::{as_uninit, assume_init_mut, init_zeroed, slice, wide};
use crate::kernels::{for_chunks, per_group_with_sums_write};
use crate::Result;

/// Hidden channels below which the fused op is not used (its products are too small for the
/// pointwise GEMM's tiles to pay; the separate ops' paths were measured there).
const MIN_HIDDEN: usize = 16;

/// The network's sizes and the geometries of its two 3×3 convolutions.
#[derive(Debug, Clone, Copy)]
struct Net {
    b: usize,
    ci: usize,
    hid: usize,
    co: usize,
    /// `W₁ ⋆ x`: `[B, Ci, H, W]` → `[B, h, H, W]`.
    g1: Geom,
    /// `W₃ ⋆ r₂`: `[B, h, H, W]` → `[B, Co, H, W]`.
    g3: Geom,
    /// The transposed convolution of `g3` (`G` `[Co, H, W]` → `[h, H, W]`).
    t3: Geom,
    /// Images per unit ([`unit_for`]).
    unit: usize,
}

impl Net {
    fn new(x: &[usize], (ci, hid, co): (usize, usize, usize)) -> candle_core::Result<Self> {
        let &[b, cx, h, w] = x else {
            return Err(candle_core::Error::Msg(format!(
                "glow net kernel: expected a 4-d input, got {x:?}"
            )));
        };
        if cx != ci {
            return Err(candle_core::Error::Msg(format!(
                "glow net kernel: input has {cx} channels, the first layer expects {ci}"
            )));
        }
        let g1 = Geom::new(&[b, ci, h, w], &[hid, ci, 3, 3], 1, Pre::Identity)?;
        let g3 = Geom::new(&[b, hid, h, w], &[co, hid, 3, 3], 1, Pre::Identity)?;
        let t3 = g3.transposed().ok_or_else(|| {
            candle_core::Error::Msg("glow net kernel: no transposed convolution".into())
        })?;
        Ok(Self {
            b,
            ci,
            hid,
            co,
            g1,
            g3,
            t3,
            unit: unit_for(h * w),
        })
    }

    /// Positions per channel.
    fn p(&self) -> usize {
        self.g1.h * self.g1.w
    }

    /// Rows of the first layer's patch matrix (`9·Ci`).
    fn k1(&self) -> usize {
        self.g1.k()
    }

    /// Rows of the last layer's tap matrix (`9·Co`).
    fn m3(&self) -> usize {
        self.co * 9
    }

    /// One image's kept activations `[r₁; r₂]`.
    fn kept(&self) -> usize {
        2 * self.hid * self.p()
    }

    /// Parameter counts `[W₁, b₁, W₂, b₂, W₃, b₃]`, in the flat vector's order.
    fn param_lens(&self) -> [usize; 6] {
        let h = self.hid;
        [h * self.k1(), h, h * h, h, self.co * h * 9, self.co]
    }

    fn param_len(&self) -> usize {
        self.param_lens().iter().sum()
    }
}

/// The flat parameter vector (or its gradient), split.
struct Params<'a> {
    w1: &'a [f32],
    b1: &'a [f32],
    w2: &'a [f32],
    b2: &'a [f32],
    w3: &'a [f32],
    b3: &'a [f32],
}

impl<'a> Params<'a> {
    fn new(p: &'a [f32], n: &Net) -> Self {
        let [l1, l2, l3, l4, l5, _] = n.param_lens();
        let (w1, p) = p.split_at(l1);
        let (b1, p) = p.split_at(l2);
        let (w2, p) = p.split_at(l3);
        let (b2, p) = p.split_at(l4);
        let (w3, b3) = p.split_at(l5);
        Self {
            w1,
            b1,
            w2,
            b2,
            w3,
            b3,
        }
    }
}

/// `v = max(v, 0)`.
#[inline(always)]
fn relu_in_place(v: &mut [f32]) {
    for x in v {
        *x = x.max(0.0);
    }
}

/// `d = d·[r > 0]`.
#[inline(always)]
fn relu_mask(r: &[f32], d: &mut [f32]) {
    for (d, &r) in d.iter_mut().zip(r) {
        *d = if r > 0.0 { *d } else { 0.0 };
    }
}

/// Images side by side in one unit's matrices: as many of 4, 2, 1 as keep a unit within
/// 256 columns (7×7 maps go 4 at a time: a product then has `N = 196` columns and, for the
/// weight gradients, `K = 196` terms, instead of 49 — three full 16-column panels and a
/// 1-column remainder).
fn unit_for(p: usize) -> usize {
    [4, 2, 1].into_iter().find(|&u| u * p <= 256).unwrap_or(1)
}

/// One unit's forward pass: for `u` images `xs` (`[u, Ci, P]`), `r₁` and `r₂` (`[h, u·P]`,
/// image j in columns `j·P..(j + 1)·P`) and `y` (`[u, Co, P]`) written whole. Scratch:
/// `cols` (`9·Ci·u·P`), `tm` (`9·Co·u·P`). `w3t` is `W₃` taps-major (`[9·Co, h]`).
#[allow(clippy::too_many_arguments)]
fn unit_forward<'r>(
    xs: &[f32],
    u: usize,
    pr: &Params,
    w3t: &[f32],
    n: &Net,
    (cols, tm): (&mut [f32], &mut [f32]),
    (r1, r2): (&'r mut [MaybeUninit<f32>], &'r mut [MaybeUninit<f32>]),
    y: &mut [MaybeUninit<f32>],
) -> (&'r [f32], &'r [f32]) {
    let (p, h, k1) = (n.p(), n.hid, n.k1());
    let q = u * p;
    for (j, xn) in xs.chunks_exact(n.ci * p).enumerate() {
        im2col_rs(xn, &mut cols[j * p..], q, &n.g1, (0, n.g1.oh));
    }
    let w1 = View {
        data: pr.w1,
        rs: k1,
    };
    pointwise::product(
        w1,
        View { data: cols, rs: q },
        (h, q, k1),
        r1,
        q,
        Some(pr.b1),
    );
    // SAFETY: `product` wrote all h·u·P values.
    let r1 = unsafe { assume_init_mut(r1) };
    wide(|| relu_in_place(r1));
    let w2 = View { data: pr.w2, rs: h };
    pointwise::product(w2, View { data: r1, rs: q }, (h, q, h), r2, q, Some(pr.b2));
    // SAFETY: as above.
    let r2 = unsafe { assume_init_mut(r2) };
    wide(|| relu_in_place(r2));
    let w3 = View { data: w3t, rs: h };
    // SAFETY: `product` writes f32 values only.
    let t = unsafe { as_uninit(tm) };
    pointwise::product(w3, View { data: r2, rs: q }, (n.m3(), q, h), t, q, None);
    for (j, yn) in y.chunks_exact_mut(n.co * p).enumerate() {
        shift_add((&tm[j * p..], q), pr.b3, &n.g3, yn);
    }
    (r1, r2)
}

/// The units of a batch of `b` images: `(first image, images)`, never across a reduction
/// group (the unit size divides [`REDUCE_GROUP`](crate::kernels::REDUCE_GROUP)).
fn units(b: usize, unit: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..b).step_by(unit).map(move |i| (i, unit.min(b - i)))
}

/// `y` for the whole batch, and every unit's `[r₁; r₂]` when `keep` (`2·h·P` values per
/// image, at the unit's first image).
fn net_fwd(x: &[f32], params: &[f32], n: &Net, keep: bool) -> (Vec<f32>, Option<Vec<f32>>) {
    let pr = Params::new(params, n);
    let w3t = taps_major(pr.w3, &n.g3);
    let (p, kl, unit) = (n.p(), n.kept(), n.unit);
    let (ylen, xlen) = (n.co * p, n.ci * p);
    let mut y: Vec<f32> = Vec::with_capacity(n.b * ylen);
    let mut stash: Vec<f32> = Vec::with_capacity(if keep { n.b * kl } else { 0 });
    {
        let ys = y.spare_capacity_mut()[..n.b * ylen].chunks_mut(unit * ylen);
        let mut jobs: Vec<_> = if keep {
            let ks = stash.spare_capacity_mut()[..n.b * kl].chunks_mut(unit * kl);
            ys.zip(ks.map(Some)).collect()
        } else {
            ys.map(|y| (y, None)).collect()
        };
        let q = unit * p;
        let scratch = (n.k1() + n.m3()) * q + if keep { 0 } else { unit * kl };
        for_chunks::<f32, _, _>(&mut jobs, 1, scratch, |i, job, s, _| {
            let (yu, ku) = &mut job[0];
            let u = yu.len() / ylen;
            let (cols, s) = s.split_at_mut(n.k1() * u * p);
            let (tm, s) = s.split_at_mut(n.m3() * u * p);
            // SAFETY: `unit_forward` writes f32 values only.
            let ku = ku.as_deref_mut().unwrap_or_else(|| unsafe { as_uninit(s) });
            let r = ku[..u * kl].split_at_mut(u * kl / 2);
            let xs = &x[i * unit * xlen..][..u * xlen];
            unit_forward(xs, u, &pr, &w3t, n, (cols, tm), r, yu);
        });
    }
    // SAFETY: `for_chunks` ran the closure on every unit, which wrote its `y` chunk whole
    // (`shift_add`) and, when kept, its `r₁` and `r₂` (`unit_forward`).
    unsafe {
        y.set_len(n.b * ylen);
        if keep {
            stash.set_len(n.b * kl);
        }
    }
    (y, keep.then_some(stash))
}

/// `[∂x; ∂params]` for the output gradient `gy`, from the kept `[r₁; r₂]` of every unit
/// (recomputed per unit when there are none).
fn net_grads(x: &[f32], gy: &[f32], params: &[f32], kept: Option<&[f32]>, n: &Net) -> Vec<f32> {
    let (pr, p, h, unit) = (Params::new(params, n), n.p(), n.hid, n.unit);
    let (k1, m3, kl) = (n.k1(), n.m3(), n.kept());
    let (xlen, ylen) = (n.ci * p, n.co * p);
    // `W₃` taps-major, for the forward pass again where none was kept.
    let w3t = if kept.is_none() {
        taps_major(pr.w3, &n.g3)
    } else {
        Vec::new()
    };
    // The transposed products' left operands: W₃ for ∂r₂ (`[h, 9·Co]`, flipped), W₂ᵀ and
    // W₁ᵀ (`[9·Ci, h]`).
    let wt3 = flip_transpose(pr.w3, &n.g3);
    let wt2 = flip_transpose_dims(pr.w2, (h, h), 1);
    let wt1 = flip_transpose_dims(pr.w1, (h, k1), 1);
    let [l1, l2, l3, l4, _, _] = n.param_lens();
    let (m3h, sums_len) = (m3 * h, l1 + l2 + l3 + l4 + m3 * h + n.co);
    let q = unit * p;
    let recompute = if kept.is_some() {
        0
    } else {
        unit * kl + (m3 + n.co) * q
    };
    let scratch = m3 * q + 2 * h * q + 2 * k1 * q + recompute;
    let none = gemm::Parallelism::None;
    // One unit of `u` images from image i: its ∂x written into `dxu` (zeroed), its shares of
    // the parameter gradients added into `sums`.
    let unit_grads = |(i, u): (usize, usize), dxu: &mut [f32], s: &mut [f32], sums: &mut [f32]| {
        let q = u * p;
        let (dw1, rest) = sums.split_at_mut(l1);
        let (db1, rest) = rest.split_at_mut(l2);
        let (dw2, rest) = rest.split_at_mut(l3);
        let (db2, rest) = rest.split_at_mut(l4);
        let (dw3, db3) = rest.split_at_mut(m3h);
        let (gcols, s) = s.split_at_mut(m3 * q);
        let (d2, s) = s.split_at_mut(h * q);
        let (d1, s) = s.split_at_mut(h * q);
        let (cols, s) = s.split_at_mut(k1 * q);
        let (dcols, s) = s.split_at_mut(k1 * q);
        let xs = &x[i * xlen..][..u * xlen];
        let (r1, r2): (&[f32], &[f32]) = match kept {
            Some(k) => k[i * kl..][..u * kl].split_at(u * kl / 2),
            None => {
                // The forward pass again, into scratch.
                let (rk, s) = s.split_at_mut(u * kl);
                let (tm, yd) = s.split_at_mut(m3 * q);
                // SAFETY: `unit_forward` writes f32 values only.
                let r = unsafe { as_uninit(rk) }.split_at_mut(u * kl / 2);
                let y = unsafe { as_uninit(&mut yd[..u * ylen]) };
                unit_forward(xs, u, &pr, &w3t, n, (&mut *cols, tm), r, y)
            }
        };
        let gs = &gy[i * ylen..][..u * ylen];
        // ∂b₃, and the patch matrix `Gₛ` of G (the transposed convolution's) that ∂r₂ and
        // ∂W₃ (tap-major rows, flipped taps: reordered after the sum) are products of.
        for (j, gn) in gs.chunks_exact(ylen).enumerate() {
            add_bias_grad(db3, gn, p);
            im2col_rs(gn, &mut gcols[j * p..], q, &n.t3, (0, n.t3.oh));
        }
        // The last layer (`Gₛ` → ∂h₂, ∂W₃), then the 1×1 layer (∂h₂ → ∂h₁, ∂W₂).
        back_through_relu((&wt3, m3), (gcols, q), r2, d2, dw3);
        add_bias_grad(db2, d2, q);
        back_through_relu((&wt2, h), (d2, q), r1, d1, dw2);
        // The first layer.
        add_bias_grad(db1, d1, q);
        for (j, xn) in xs.chunks_exact(xlen).enumerate() {
            im2col_rs(xn, &mut cols[j * p..], q, &n.g1, (0, n.g1.oh));
        }
        matmul_bt(dw1, k1, (h, k1, q), (d1, q), (cols, q), true, none);
        let wv = View { data: &wt1, rs: h };
        // SAFETY: `product` writes f32 values only.
        let out = unsafe { as_uninit(dcols) };
        pointwise::product(wv, View { data: d1, rs: q }, (k1, q, h), out, q, None);
        for (j, dxn) in dxu.chunks_exact_mut(xlen).enumerate() {
            col2im_rs(&dcols[j * p..], q, dxn, &n.g1);
        }
    };
    // Fixed groups of REDUCE_GROUP images, their units in order.
    let group =
        |first: usize, [dxg]: [&mut [MaybeUninit<f32>]; 1], s: &mut [f32], sums: &mut [f32], _| {
            let dxg = init_zeroed(dxg);
            for (i, u) in units(dxg.len() / xlen, unit) {
                let dxu = &mut dxg[i * xlen..][..u * xlen];
                unit_grads((first + i, u), dxu, s, sums);
            }
        };
    // SAFETY: `group` zeroes its chunk of ∂x.
    let mut all = unsafe { per_group_with_sums_write(n.b, xlen, scratch, sums_len, group) };
    // ∂W₃ from its tap-major rows, as `taps`' ∂W.
    let at = n.b * xlen + l1 + l2 + l3 + l4;
    let dwf = all[at..at + m3h].to_vec();
    flipped_taps_to_weights(&dwf, &n.g3, &mut all[at..at + m3h]);
    all
}

/// One layer's step back through the ReLU before it: `d = (wt·b)·[r > 0]` (`wt` `[h, k]`,
/// `b` `[k, q]`, `r` and `d` `[h, q]`), then `dw += b·rᵀ` (`[k, h]`). The mask's sequential
/// pass over `r` (kept by the forward pass, in memory, cold) brings it into cache before
/// the weight gradient's product reads it in panels of 16 rows: read cold in the
/// products' panel order it made the backward pass 7–11 % slower (`glow_net_rate`, 12
/// paired rounds).
fn back_through_relu(
    (wt, k): (&[f32], usize),
    (b, q): (&[f32], usize),
    r: &[f32],
    d: &mut [f32],
    dw: &mut [f32],
) {
    let h = r.len() / q;
    // SAFETY: `product` writes f32 values only.
    let out = unsafe { as_uninit(d) };
    pointwise::product(
        View { data: wt, rs: k },
        View { data: b, rs: q },
        (h, q, k),
        out,
        q,
        None,
    );
    wide(|| relu_mask(r, d));
    matmul_bt(
        dw,
        h,
        (k, h, q),
        (b, q),
        (r, q),
        true,
        gemm::Parallelism::None,
    );
}

/// `(x, params) → y`; keeps `[r₁; r₂]` for the backward pass when `keep`.
struct GlowNetOp {
    dims: (usize, usize, usize),
    keep: bool,
    kept: OnceLock<Arc<Vec<f32>>>,
}

/// The network's sizes from the input's layout and the parameter count, checked.
fn net_for(op: (usize, usize, usize), lx: &Layout, params: usize) -> candle_core::Result<Net> {
    let n = Net::new(lx.dims(), op)?;
    if params != n.param_len() {
        return Err(candle_core::Error::Msg(format!(
            "glow net kernel: {params} parameters, expected {}",
            n.param_len()
        )));
    }
    Ok(n)
}

/// `s`'s f32 values, or an error naming `what`.
fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => slice(v, l),
        _ => Err(candle_core::Error::Msg(format!(
            "glow net kernel: {what} must be f32"
        ))),
    }
}

impl CustomOp2 for GlowNetOp {
    fn name(&self) -> &'static str {
        "flowlab-glow-net"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = net_for(self.dims, l1, l2.shape().elem_count())?;
        let (x, params) = (f32s(s1, l1, "the input")?, f32s(s2, l2, "the parameters")?);
        let (y, kept) = net_fwd(x, params, &n, self.keep);
        if let Some(k) = kept {
            // Set once: candle runs an op's forward pass once per op value.
            let _ = self.kept.set(Arc::new(k));
        }
        let (_, _, h, w) = l1.shape().dims4()?;
        Ok((CpuStorage::F32(y), Shape::from((n.b, n.co, h, w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = GlowNetGrad {
            dims: self.dims,
            params: params.clone(),
            kept: self.kept.get().cloned(),
        };
        let all = x.apply_op2_no_bwd(&gy.contiguous()?, &grad)?;
        let nx = x.elem_count();
        let dx = all.narrow(0, 0, nx)?.reshape(x.shape())?;
        // The parameter gradient, kept until the optimizer step, gets storage of its own.
        let dp = all
            .narrow(0, nx, params.elem_count())?
            .force_contiguous()?
            .reshape(params.shape())?;
        Ok((Some(dx), Some(dp)))
    }
}

/// `(x, ∂y) → [∂x; ∂params]`, the parameters and the kept activations held by the op.
struct GlowNetGrad {
    dims: (usize, usize, usize),
    params: Tensor,
    kept: Option<Arc<Vec<f32>>>,
}

impl CustomOp2 for GlowNetGrad {
    fn name(&self) -> &'static str {
        "flowlab-glow-net-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (ps, lp) = self.params.storage_and_layout();
        let n = net_for(self.dims, l1, lp.shape().elem_count())?;
        let (_, _, h, w) = l1.shape().dims4()?;
        if l2.dims() != [n.b, n.co, h, w] {
            return Err(candle_core::Error::Msg(format!(
                "glow net grad: output gradient {:?}, expected {:?}",
                l2.dims(),
                [n.b, n.co, h, w]
            )));
        }
        let Storage::Cpu(ps) = &*ps else {
            return Err(candle_core::Error::Msg(
                "glow net grad: parameters not on the CPU".into(),
            ));
        };
        let kept = self.kept.as_deref().map(|k| k.as_slice());
        let out = net_grads(
            f32s(s1, l1, "the input")?,
            f32s(s2, l2, "the output gradient")?,
            f32s(ps, lp, "the parameters")?,
            kept,
            &n,
        );
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// Whether the fused op takes this network: f32 CPU tensors on the fast kernels with the
/// pointwise GEMM (either kernel set), the shapes of [`glow_net`], at least [`MIN_HIDDEN`] hidden channels
/// and at most [`TAPS_MAX_M`] rows in the last layer's tap matrix, non-empty images.
fn fused_applies(x: &Tensor, [w1, b1, w2, b2, w3, b3]: [&Tensor; 6]) -> bool {
    let (Ok((b, ci, h, w)), Ok((hid, ci1, 3, 3)), Ok((co, hid3, 3, 3))) =
        (x.dims4(), w1.dims4(), w3.dims4())
    else {
        return false;
    };
    ci1 == ci
        && hid3 == hid
        && b1.dims() == [hid]
        && w2.dims() == [hid, hid, 1, 1]
        && b2.dims() == [hid]
        && b3.dims() == [co]
        && b * h * w > 0
        && hid >= MIN_HIDDEN
        && co * 9 <= TAPS_MAX_M
        && x.dtype() == candle_core::DType::F32
        && super::super::use_fast(&[x, w1, b1, w2, b2, w3, b3])
        && pointwise::available()
}

/// Glow's coupling network `W₃ ⋆ relu(W₂ ⋆ relu(W₁ ⋆ x + b₁) + b₂) + b₃`: x `[B, Ci, H, W]`,
/// `w1` `[h, Ci, 3, 3]`, `w2` `[h, h, 1, 1]`, `w3` `[Co, h, 3, 3]` (both 3×3 layers with
/// padding 1), biases `[h]`, `[h]`, `[Co]`; `[B, Co, H, W]`. One fused op for f32 CPU
/// tensors on the fast kernels of an AVX2 or AVX-512 CPU with at least 16 hidden channels
/// and at most 72 rows (9·Co) in the last layer's tap matrix; otherwise the three
/// convolution ops, the ReLUs fused into the convolutions that consume them. Equal up to
/// rounding either way.
pub fn glow_net(
    x: &Tensor,
    (w1, b1): (&Tensor, &Tensor),
    (w2, b2): (&Tensor, &Tensor),
    (w3, b3): (&Tensor, &Tensor),
) -> Result<Tensor> {
    if !fused_applies(x, [w1, b1, w2, b2, w3, b3]) {
        let h = super::conv2d(x, w1, b1, 1)?;
        let h = super::conv2d_relu(&h, w2, b2, 0)?;
        return super::conv2d_relu(&h, w3, b3, 1);
    }
    let (ci, hid, co) = (x.dims()[1], w1.dims()[0], w3.dims()[0]);
    let params = Tensor::cat(
        &[
            w1.flatten_all()?,
            b1.flatten_all()?,
            w2.flatten_all()?,
            b2.flatten_all()?,
            w3.flatten_all()?,
            b3.flatten_all()?,
        ],
        0,
    )?;
    let op = GlowNetOp {
        dims: (ci, hid, co),
        keep: x.track_op() || params.track_op(),
        kept: OnceLock::new(),
    };
    Ok(x.contiguous()?.apply_op2(&params, op)?)
}

#[cfg(test)]
mod tests {
    use super::super::super::{
        assert_thread_count_invariant, check_against_reference, grad_f32, randn, with_kernels,
        Kernels,
    };
    use super::*;
    use candle_core::{DType, Var};

    /// `[x, w1, b1, w2, b2, w3, b3]` for `b` images of `ci` channels, `hid` hidden and `co`
    /// output channels, `h × w`; the last layer non-zero so every gradient is exercised.
    fn inputs(
        b: usize,
        (ci, hid, co): (usize, usize, usize),
        (h, w): (usize, usize),
    ) -> Vec<Tensor> {
        let f = DType::F32;
        vec![
            randn(1, &[b, ci, h, w], 1.0, f),
            randn(2, &[hid, ci, 3, 3], 0.3, f),
            randn(3, &[hid], 0.3, f),
            randn(4, &[hid, hid, 1, 1], 1.0 / (hid as f64).sqrt(), f),
            randn(5, &[hid], 0.3, f),
            randn(6, &[co, hid, 3, 3], 0.1, f),
            randn(7, &[co], 0.3, f),
        ]
    }

    fn run(t: &[Tensor]) -> Result<Tensor> {
        glow_net(&t[0], (&t[1], &t[2]), (&t[3], &t[4]), (&t[5], &t[6]))
    }

    /// The tensors as variables, and their tensors.
    fn vars(t: &[Tensor]) -> (Vec<Var>, Vec<Tensor>) {
        let vars: Vec<Var> = t.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts = vars.iter().map(|v| v.as_tensor().clone()).collect();
        (vars, ts)
    }

    #[test]
    fn matches_the_reference_values_and_gradients() {
        // Glow's two levels (2 → 4 channels at 14×14 and 4 → 8 at 7×7, scaled down in
        // width), odd sizes, a single pixel, a single row, 72 tap rows, batches below and
        // above one reduction group.
        for (b, dims, hw) in [
            (3, (2, 16, 4), (14, 14)),
            (5, (4, 24, 8), (7, 7)),
            (2, (3, 17, 6), (5, 9)),
            (6, (1, 16, 2), (1, 1)),
            (4, (2, 20, 4), (1, 6)),
        ] {
            let t = inputs(b, dims, hw);
            // The fused op must be what is tested here on AVX2 and AVX-512 machines.
            let fused = with_kernels(Kernels::Fast, || {
                fused_applies(&t[0], std::array::from_fn(|i| &t[i + 1]))
            });
            assert_eq!(fused, pointwise::available(), "{dims:?} {hw:?}");
            check_against_reference(&t, run, 1e-4);
        }
    }

    #[test]
    fn values_match_with_and_without_gradient_tracking() {
        with_kernels(Kernels::Fast, || {
            let t = inputs(5, (2, 16, 4), (6, 5));
            let plain = run(&t).unwrap();
            let (_v, ts) = vars(&t);
            let tracked = run(&ts).unwrap();
            assert_eq!(
                plain.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                tracked.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        });
    }

    #[test]
    fn gradients_without_kept_activations_match() {
        // The backward pass recomputes an image's activations when the forward pass kept
        // none: both ways give the same bits.
        if !pointwise::available() {
            return;
        }
        let t = inputs(6, (2, 16, 4), (5, 6));
        let n = Net::new(t[0].dims(), (2, 16, 4)).unwrap();
        let params: Vec<f32> = t[1..]
            .iter()
            .flat_map(|p| p.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        let x = t[0].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (y, kept) = net_fwd(&x, &params, &n, true);
        let gy: Vec<f32> = y.iter().map(|v| v.sin()).collect();
        let with = net_grads(&x, &gy, &params, kept.as_deref(), &n);
        let without = net_grads(&x, &gy, &params, None, &n);
        assert_eq!(with, without);
        assert_eq!(with.len(), x.len() + n.param_len());
    }

    #[test]
    fn gradients_do_not_depend_on_the_thread_count() {
        // 33 images: 9 groups of 4.
        let t = inputs(33, (2, 16, 4), (6, 7));
        assert_thread_count_invariant(|| {
            let (_v, ts) = vars(&t);
            let y = run(&ts).unwrap();
            let g = (y.sqr().unwrap() * 0.5)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            ts.iter().map(|t| grad_f32(&g, t)).collect::<Vec<_>>()
        });
    }

    #[test]
    fn refuses_mismatched_shapes() {
        let mut t = inputs(2, (2, 16, 4), (4, 4));
        t[3] = randn(8, &[16, 15, 1, 1], 0.3, DType::F32);
        assert!(run(&t).is_err());
        let n = Net::new(&[2, 3, 4, 4], (2, 16, 4));
        assert!(n.is_err());
    }
}

/// `cargo test --release --lib glow_net_rate -- --ignored --nocapture`: the fused op on
/// Glow's two levels (h = 192, batch 64, the process's rayon pool), best of 9 (`GLOW_SIDE=7`
/// or `14`: one level only).
#[cfg(test)]
mod timing {
    use super::*;

    #[test]
    #[ignore]
    fn glow_net_rate() {
        if !pointwise::available() {
            eprintln!("skipped: neither the AVX2 nor the AVX-512 kernel set");
            return;
        }
        let only: Option<usize> = std::env::var("GLOW_SIDE").ok().and_then(|v| v.parse().ok());
        for (ci, co, side) in [(2usize, 4usize, 14usize), (4, 8, 7)] {
            if only.is_some_and(|o| o != side) {
                continue;
            }
            let (b, hid) = (64, 192);
            let n = Net::new(&[b, ci, side, side], (ci, hid, co)).unwrap();
            let params: Vec<f32> = (0..n.param_len())
                .map(|i| ((i % 13) as f32 - 6.0) * 0.01)
                .collect();
            let x: Vec<f32> = (0..b * ci * n.p())
                .map(|i| ((i % 7) as f32 - 3.0) * 0.3)
                .collect();
            let gy: Vec<f32> = (0..b * co * n.p())
                .map(|i| ((i % 5) as f32 - 2.0) * 0.1)
                .collect();
            let p = n.p() as f64;
            let (h, k1, m3) = (hid as f64, n.k1() as f64, n.m3() as f64);
            let flops = 2.0 * b as f64 * p * h * (k1 + h + m3);
            let best = |f: &mut dyn FnMut()| {
                (0..9)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        f();
                        t.elapsed().as_secs_f64()
                    })
                    .fold(f64::INFINITY, f64::min)
            };
            let mut kept = None;
            let tf = best(&mut || kept = net_fwd(&x, &params, &n, true).1);
            let kept = kept.unwrap();
            let tb = best(&mut || {
                std::hint::black_box(net_grads(&x, &gy, &params, Some(&kept), &n));
            });
            eprintln!(
                "{ci} → {hid} → {co} at {side}×{side}: forward {:.2} ms ({:.1} GFLOP/s), backward {:.2} ms ({:.1} GFLOP/s)",
                tf * 1e3,
                flops / tf / 1e9,
                tb * 1e3,
                2.0 * flops / tb / 1e9
            );
        }
    }
}
