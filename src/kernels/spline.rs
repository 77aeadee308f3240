//! The rational-quadratic spline of `kind: spline` couplings (see `flow::spline` for the
//! parametrisation and formulas) as one op with an explicit backward pass.
//!
//! Composed of candle ops, one spline evaluation is ~60 whole-tensor ops over `[N, K]`
//! broadcasts (softmax, cumsum, one-hot bin masks, gathers), each allocating its result; at
//! the sizes of `experiments/spline_vs_affine.yaml` that made the spline model's training
//! step slower than PyTorch eager's. Here each element decodes its own `3K − 1` parameters
//! into knots and derivatives on the stack, finds its bin and evaluates the spline and its
//! log-derivative; the backward pass redoes that and runs the chain rule by hand:
//!
//! ```text
//! in bin k: ξ = (x − x_k)/w_k, s = h_k/w_k, t = ξ(1 − ξ), δ = d_k + d_{k+1} − 2s
//!   y    = y_k + h_k (s ξ² + d_k t) / (s + δ t)
//!   logd = ln s² (d_{k+1} ξ² + 2 s t + d_k (1 − ξ)²) − 2 ln (s + δ t)
//! knots: x_j = 2B·Σ_{i<j} p̃_i − B (0 < j < K), p̃ = m + (1 − mK)·softmax(u_w), x_0 = −B, x_K = B
//!   ∂p̃_i = 2B Σ_{0<j<K, j>i} ∂x_j,   ∂u_w = p ⊙ (∂p − ⟨p, ∂p⟩),  ∂p = (1 − mK) ∂p̃
//! derivatives: d_j = m + softplus(u_d,j−1 + c)  →  ∂u_d,j−1 = ∂d_j · σ(u_d,j−1 + c)
//! ```
//!
//! (heights and y-knots alike). The bin index is piecewise constant and gets no gradient, as
//! in the composed version (its one-hot mask is detached). Outside `(−B, B)` the transform is
//! the identity: `∂x = ∂y`, no parameter gradient. Only the forward direction (data → latent,
//! the one training differentiates) has a backward pass; the inverse (sampling) is forward
//! only and its backward is refused with an error.
//!
//! The parameters are read where the coupling network wrote them (`[B, C·(3K−1), H, W]`,
//! no permuted copy), and a coupling's mask is passed in: masked elements are skipped (the
//! identity, log-derivative 0, no parameter gradient), so a checkerboard or channel coupling
//! evaluates half the splines and its output is the op's output, with no blend.
//!
//! Every element is independent, so the results do not depend on the thread count.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::{slice, wide_fn, Real};
use crate::Result;

/// Elements per parallel work item.
const CHUNK: usize = 512;

/// One spline's settings.
#[derive(Debug, Clone, Copy)]
struct Spline {
    bins: usize,
    bound: f64,
    min: f64,
    /// `c` with `softplus(c) = 1 − m`: zero parameters give derivative 1.
    shift: f64,
    inverse: bool,
}

impl Spline {
    fn per_element(&self) -> usize {
        3 * self.bins - 1
    }

    fn check(&self, what: &str, n: usize, raw: &Layout) -> candle_core::Result<()> {
        if raw.shape().elem_count() != n * self.per_element() {
            return Err(candle_core::Error::Msg(format!(
                "{what} kernel: parameters of shape {:?} do not give {} values to each of {n} elements",
                raw.dims(),
                self.per_element()
            )));
        }
        Ok(())
    }
}

/// One element's decoded spline: softmax probabilities and knots in a scratch slice of
/// [`Decoded::len`] values (`p_x`, `p_y`: K; knots: K + 1 each); the derivatives come from
/// [`Decoded::d`] on demand, since an element needs only its bin's two.
struct Decoded<'a, T> {
    px: &'a [T],
    py: &'a [T],
    kx: &'a [T],
    ky: &'a [T],
    /// The K − 1 unconstrained interior derivatives.
    ud: &'a [T],
    min: T,
    shift: T,
}

impl<'a, T: Real> Decoded<'a, T> {
    fn len(k: usize) -> usize {
        2 * k + 2 * (k + 1)
    }

    #[inline(always)]
    fn new(u: &'a [T], sp: &Spline, scratch: &'a mut [T]) -> Self {
        let k = sp.bins;
        let (px, rest) = scratch.split_at_mut(k);
        let (py, rest) = rest.split_at_mut(k);
        let (kx, ky) = rest.split_at_mut(k + 1);
        knots(&u[..k], sp, px, kx);
        knots(&u[k..2 * k], sp, py, &mut ky[..k + 1]);
        Self {
            px,
            py,
            kx,
            ky,
            ud: &u[2 * k..],
            min: T::from_f64(sp.min),
            shift: T::from_f64(sp.shift),
        }
    }

    /// Derivative `d_j` at knot j: 1 at the ends, `m + softplus(u_d,j−1 + c)` inside.
    #[inline(always)]
    fn d(&self, j: usize) -> T {
        if j == 0 || j > self.ud.len() {
            T::ONE
        } else {
            self.min + softplus(self.ud[j - 1] + self.shift)
        }
    }

    /// The bin of `v` (clamped into the domain) among the knots `kn`: how many interior
    /// knots are ≤ v.
    #[inline(always)]
    fn bin(kn: &[T], v: T) -> usize {
        kn[1..kn.len() - 1].iter().filter(|&&q| v >= q).count()
    }
}

#[inline(always)]
fn softplus<T: Real>(v: T) -> T {
    let relu = if v > T::ZERO { v } else { T::ZERO };
    let a = if v > T::ZERO { -v } else { v };
    relu + (a.fast_exp() + T::ONE).ln()
}

/// Softmax of `u` into `p`, and the knots `[−B, 2B·cumsum(p̃)_{<K−1} − B, B]` into `kn`.
#[inline(always)]
fn knots<T: Real>(u: &[T], sp: &Spline, p: &mut [T], kn: &mut [T]) {
    let k = u.len();
    let max = u
        .iter()
        .copied()
        .fold(u[0], |a, b| if b > a { b } else { a });
    let mut sum = T::ZERO;
    for (p, &v) in p.iter_mut().zip(u) {
        *p = (v - max).fast_exp();
        sum += *p;
    }
    let (bound, min) = (T::from_f64(sp.bound), T::from_f64(sp.min));
    let keep = T::ONE - min * T::from_usize(k);
    let two_b = T::from_f64(2.0 * sp.bound);
    kn[0] = -bound;
    let mut cum = T::ZERO;
    for j in 1..k {
        cum += (p[j - 1] / sum) * keep + min;
        kn[j] = cum * two_b - bound;
    }
    kn[k] = bound;
    for p in p.iter_mut() {
        *p = *p / sum;
    }
}

/// Bin k of a decoded spline: its left knots, sizes, end derivatives and slope `s = h/w`.
struct Bin<T> {
    k: usize,
    xk: T,
    wk: T,
    yk: T,
    hk: T,
    dk: T,
    dk1: T,
    s: T,
}

impl<T: Real> Decoded<'_, T> {
    #[inline(always)]
    fn at(&self, k: usize) -> Bin<T> {
        let (wk, hk) = (self.kx[k + 1] - self.kx[k], self.ky[k + 1] - self.ky[k]);
        Bin {
            k,
            xk: self.kx[k],
            wk,
            yk: self.ky[k],
            hk,
            dk: self.d(k),
            dk1: self.d(k + 1),
            s: hk / wk,
        }
    }
}

/// The forward intermediates of one element inside the domain, in its bin (what the
/// backward pass reuses).
struct Eval<T> {
    bin: Bin<T>,
    xi: T,
    xi_raw: T,
    /// `1 − ξ`, `t = ξ(1 − ξ)` and `δ = d_k + d_{k+1} − 2s`.
    om: T,
    t: T,
    delta: T,
    den: T,
    num: T,
    dnum: T,
    q: T,
    y: T,
    logd: T,
}

#[inline(always)]
fn clamp01<T: Real>(v: T) -> T {
    if v < T::ZERO {
        T::ZERO
    } else if v > T::ONE {
        T::ONE
    } else {
        v
    }
}

/// Forward direction: `x` (inside the domain) through the spline.
#[inline(always)]
fn eval_forward<T: Real>(dec: &Decoded<T>, x: T) -> Eval<T> {
    let bin = dec.at(Decoded::bin(dec.kx, x));
    let xi_raw = (x - bin.xk) / bin.wk;
    let mut e = finish(bin, xi_raw);
    e.y = e.bin.yk + e.num / e.den;
    e
}

/// Inverse direction: `y` (inside the domain) back to x, with the forward log-derivative.
#[inline(always)]
fn eval_inverse<T: Real>(dec: &Decoded<T>, y: T) -> Eval<T> {
    let bin = dec.at(Decoded::bin(dec.ky, y));
    let (hk, dk, s) = (bin.hk, bin.dk, bin.s);
    let delta = dk + bin.dk1 - s - s;
    let dy = y - bin.yk;
    let a = hk * (s - dk) + dy * delta;
    let b = hk * dk - dy * delta;
    let c = -(s * dy);
    let disc = b * b - T::from_f64(4.0) * a * c;
    let disc = if disc > T::ZERO { disc } else { T::ZERO };
    let xi_raw = (c + c) / (-b - disc.sqrt());
    let mut e = finish(bin, xi_raw);
    e.y = e.xi * e.bin.wk + e.bin.xk;
    e
}

/// The rest of the evaluation from `ξ` (clamped into [0, 1]): the rational function's
/// numerator and denominator and the log-derivative; `y` is left to the caller.
#[inline(always)]
fn finish<T: Real>(bin: Bin<T>, xi_raw: T) -> Eval<T> {
    let xi = clamp01(xi_raw);
    let (hk, dk, dk1, s) = (bin.hk, bin.dk, bin.dk1, bin.s);
    let om = T::ONE - xi;
    let t = xi * om;
    let delta = dk + dk1 - s - s;
    let den = s + delta * t;
    let num = hk * (s * xi * xi + dk * t);
    let q = dk1 * xi * xi + (s + s) * t + dk * om * om;
    let dnum = s * s * q;
    let logd = dnum.ln() - (den.ln() + den.ln());
    Eval {
        bin,
        xi,
        xi_raw,
        om,
        t,
        delta,
        den,
        num,
        dnum,
        q,
        y: T::ZERO,
        logd,
    }
}

/// Where each element's parameters are and whether it is transformed: `N = M·plane`
/// elements in M rows of `plane`; element `e = m·plane + p` has parameter j at
/// `raw[(m·(3K−1) + j)·plane + p]`, so `plane = 1` is `[N, 3K−1]` and `plane = H·W` is a
/// network's `[B, C·(3K−1), H, W]` output read in place. With `active` (a period of
/// `active.len()` values, repeating over the elements), elements where it is 0 are the
/// identity with log-derivative 0.
#[derive(Clone, Copy)]
struct Placement<'a, T> {
    plane: usize,
    active: &'a [T],
}

impl<T: Real> Placement<'_, T> {
    /// Rows per parallel work item.
    fn rows(&self) -> usize {
        (CHUNK / self.plane).max(1)
    }

    fn is_active(&self, e: usize) -> bool {
        self.active.is_empty() || self.active[e % self.active.len()] != T::ZERO
    }
}

/// `[y; log|dy/dx|]` (2N values) for the N elements `x` and their parameters `raw`.
fn spline_fwd<T: Real>(x: &[T], raw: &[T], lay: Placement<T>, sp: &Spline) -> Vec<T> {
    use rayon::prelude::*;
    let (n, per) = (x.len(), sp.per_element());
    let mut out = vec![T::ZERO; 2 * n];
    let (ys, ls) = out.split_at_mut(n);
    let step = lay.rows() * lay.plane;
    ys.par_chunks_mut(step)
        .zip(ls.par_chunks_mut(step))
        .enumerate()
        .for_each(|(c, (ys, ls))| {
            let (e0, n) = (c * step, ys.len());
            let r = &raw[e0 * per..(e0 + n) * per];
            fwd_chunk(&x[e0..e0 + n], r, ys, ls, e0, &lay, sp);
        });
    out
}

/// Element `i` of a chunk: its row and position, and its parameters gathered into `u`.
#[inline(always)]
fn gather<T: Real>(raw: &[T], plane: usize, per: usize, i: usize, u: &mut [T]) {
    let (row, pos) = (i / plane, i % plane);
    for (j, u) in u.iter_mut().enumerate() {
        *u = raw[(row * per + j) * plane + pos];
    }
}

wide_fn! {
    /// [`spline_fwd`] for one chunk of whole rows, starting at element `e0` (compiled for the
    /// widest vector extension, so `mul_add` is an instruction, not a library call).
    fn fwd_chunk<T: Real>(
        x: &[T],
        raw: &[T],
        ys: &mut [T],
        ls: &mut [T],
        e0: usize,
        lay: &Placement<T>,
        sp: &Spline,
    ) {
        let per = sp.per_element();
        let bound = T::from_f64(sp.bound);
        let mut scratch = [T::ZERO; 5 * MAX_SPLINE_BINS + 3];
        let scratch = &mut scratch[..Decoded::<T>::len(sp.bins)];
        let mut u = [T::ZERO; 3 * MAX_SPLINE_BINS];
        let u = &mut u[..per];
        for (i, (y, l)) in ys.iter_mut().zip(ls.iter_mut()).enumerate() {
            let v = x[i];
            if !(v > -bound && v < bound && lay.is_active(e0 + i)) {
                (*y, *l) = (v, T::ZERO);
                continue;
            }
            gather(raw, lay.plane, per, i, u);
            let dec = Decoded::new(u, sp, scratch);
            let ev = if sp.inverse {
                eval_inverse(&dec, v)
            } else {
                eval_forward(&dec, v)
            };
            (*y, *l) = (ev.y, ev.logd);
        }
    }
}

/// `∂softmax`: `∂u_j = p_j (∂p_j − ⟨p, ∂p⟩)` into `du`.
#[inline(always)]
fn softmax_grad<T: Real>(p: &[T], dp: &[T], du: &mut [T]) {
    let dot = p.iter().zip(dp).fold(T::ZERO, |a, (&p, &g)| a + p * g);
    for ((du, &p), &g) in du.iter_mut().zip(p).zip(dp) {
        *du = p * (g - dot);
    }
}

/// Gradients of the knots `x_k` (`g_pos`) and of the bin size `x_{k+1} − x_k` (`g_size`)
/// back to the unconstrained sizes `du` (K values), through the cumulative sum and softmax.
#[inline(always)]
fn knot_grads<T: Real>(p: &[T], sp: &Spline, k: usize, g_pos: T, g_size: T, du: &mut [T]) {
    let bins = sp.bins;
    let mut dp = [T::ZERO; MAX_SPLINE_BINS];
    let dp = &mut dp[..bins];
    // x_k gets g_pos − g_size, x_{k+1} gets g_size (interior knots only).
    let g_knot = [g_pos - g_size, g_size];
    let two_b = T::from_f64(2.0 * sp.bound);
    let keep = T::ONE - T::from_f64(sp.min) * T::from_usize(bins);
    // knot j (0 < j < K) = 2B·Σ_{i<j} p̃_i − B, so ∂p̃_i = 2B Σ_{j>i, 0<j<K} ∂knot_j.
    for (off, &g) in g_knot.iter().enumerate() {
        let j = k + off;
        if j == 0 || j >= bins {
            continue;
        }
        for d in dp[..j].iter_mut() {
            *d += g * two_b * keep;
        }
    }
    softmax_grad(p, dp, du);
}

/// `[∂x; ∂raw]` (N + N·(3K−1) values, `∂raw` in `raw`'s layout) of the forward spline for
/// the output gradients `g = [∂y; ∂logd]`.
fn spline_grads<T: Real>(x: &[T], raw: &[T], g: &[T], lay: Placement<T>, sp: &Spline) -> Vec<T> {
    use rayon::prelude::*;
    let (n, per) = (x.len(), sp.per_element());
    let (gy, gl) = g.split_at(n);
    let mut out = vec![T::ZERO; n + n * per];
    let (dx, draw) = out.split_at_mut(n);
    let step = lay.rows() * lay.plane;
    dx.par_chunks_mut(step)
        .zip(draw.par_chunks_mut(step * per))
        .enumerate()
        .for_each(|(c, (dx, draw))| {
            let (e0, n) = (c * step, dx.len());
            let r = &raw[e0 * per..(e0 + n) * per];
            let g = (&gy[e0..e0 + n], &gl[e0..e0 + n]);
            grad_chunk(&x[e0..e0 + n], r, g, (dx, draw), e0, &lay, sp);
        });
    out
}

wide_fn! {
    /// [`spline_grads`] for one chunk of whole rows, starting at element `e0`.
    fn grad_chunk<T: Real>(
        x: &[T],
        raw: &[T],
        g: (&[T], &[T]),
        out: (&mut [T], &mut [T]),
        e0: usize,
        lay: &Placement<T>,
        sp: &Spline,
    ) {
        let ((gy, gl), (dx, draw)) = (g, out);
        let (per, k, plane) = (sp.per_element(), sp.bins, lay.plane);
        let bound = T::from_f64(sp.bound);
        let two = T::from_f64(2.0);
        let sh = T::from_f64(sp.shift);
        let mut scratch = [T::ZERO; 5 * MAX_SPLINE_BINS + 3];
        let scratch = &mut scratch[..Decoded::<T>::len(k)];
        let mut u = [T::ZERO; 3 * MAX_SPLINE_BINS];
        let u = &mut u[..per];
        let mut du = [T::ZERO; 3 * MAX_SPLINE_BINS];
        let du = &mut du[..per];
        for (i, dx) in dx.iter_mut().enumerate() {
            let v = x[i];
            if !(v > -bound && v < bound && lay.is_active(e0 + i)) {
                *dx = gy[i];
                continue;
            }
            gather(raw, plane, per, i, u);
            let dec = Decoded::new(u, sp, scratch);
            let ev = eval_forward(&dec, v);
            let Bin {
                k: b,
                wk,
                hk,
                dk,
                dk1,
                s,
                ..
            } = ev.bin;
            let (xi, om, t, delta) = (ev.xi, ev.om, ev.t, ev.delta);
            let (gyv, glv) = (gy[i], gl[i]);
            // Reverse mode through y = y_k + num/den and logd = ln dnum − 2 ln den.
            let g_num = gyv / ev.den;
            let g_den = -(gyv * ev.num / (ev.den * ev.den)) - two * glv / ev.den;
            let g_dnum = glv / ev.dnum;
            let g_yk = gyv;
            let mut g_hk = g_num * (s * xi * xi + dk * t);
            let mut g_s = g_num * hk * xi * xi;
            let mut g_xi = g_num * hk * two * s * xi;
            let mut g_dk = g_num * hk * t;
            let mut g_t = g_num * hk * dk;
            // den = s + δ·t, δ = d_k + d_{k+1} − 2s.
            g_s += g_den;
            let g_delta = g_den * t;
            g_t += g_den * delta;
            g_dk += g_delta;
            let mut g_dk1 = g_delta;
            g_s = g_s - two * g_delta;
            // dnum = s²·q, q = d_{k+1} ξ² + 2s·t + d_k (1 − ξ)².
            g_s += g_dnum * two * s * ev.q;
            let g_q = g_dnum * s * s;
            g_dk1 += g_q * xi * xi;
            g_xi += g_q * (dk1 * two * xi - dk * two * om);
            g_s += g_q * two * t;
            g_t += g_q * two * s;
            g_dk += g_q * om * om;
            g_xi += g_t * (T::ONE - two * xi);
            // ξ = clamp((x − x_k)/w_k): no gradient where the clamp binds.
            if !(ev.xi_raw >= T::ZERO && ev.xi_raw <= T::ONE) {
                g_xi = T::ZERO;
            }
            *dx = g_xi / wk;
            let g_xk = -(g_xi / wk);
            let mut g_wk = -(g_xi * ev.xi_raw / wk);
            // s = h_k/w_k.
            g_hk += g_s / wk;
            g_wk = g_wk - g_s * s / wk;
            let (duw, rest) = du.split_at_mut(k);
            let (duh, dud) = rest.split_at_mut(k);
            knot_grads(dec.px, sp, b, g_xk, g_wk, duw);
            knot_grads(dec.py, sp, b, g_yk, g_hk, duh);
            dud.fill(T::ZERO);
            for (j, gd) in [(b, g_dk), (b + 1, g_dk1)] {
                if j == 0 || j >= k {
                    continue;
                }
                let z = u[2 * k + j - 1] + sh;
                dud[j - 1] += gd / (T::ONE + (-z).fast_exp());
            }
            let (row, pos) = (i / plane, i % plane);
            for (j, &d) in du.iter().enumerate() {
                draw[(row * per + j) * plane + pos] = d;
            }
        }
    }
}

/// Checks the shapes of `(x, raw, active)` against the spline and the plane; returns N.
fn check_inputs(
    what: &str,
    sp: &Spline,
    plane: usize,
    (x, raw, act): (&Layout, &Layout, &Layout),
) -> candle_core::Result<usize> {
    let n = x.shape().elem_count();
    sp.check(what, n, raw)?;
    let period = act.shape().elem_count();
    if plane == 0 || !n.is_multiple_of(plane) || (period > 0 && !n.is_multiple_of(period)) {
        return Err(candle_core::Error::Msg(format!(
            "{what} kernel: {n} elements do not split into rows of {plane} and mask periods of {period}"
        )));
    }
    Ok(n)
}

/// `(x, raw, active) → [y; logd]`, stacked on a new leading axis of 2.
struct RqSpline {
    sp: Spline,
    plane: usize,
}

impl CustomOp3 for RqSpline {
    fn name(&self) -> &'static str {
        "flowlab-rq-spline"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = check_inputs("rq_spline", &self.sp, self.plane, (l1, l2, l3))?;
        let out = crate::kernels::dispatch!("rq_spline", (s1, s2, s3), |x, r, a| {
            let lay = Placement {
                plane: self.plane,
                active: slice(a, l3)?,
            };
            spline_fwd(slice(x, l1)?, slice(r, l2)?, lay, &self.sp)
        })?;
        Ok((out, Shape::from((2, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        raw: &Tensor,
        active: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.sp.inverse {
            return Err(candle_core::Error::Msg(
                "rq_spline kernel: the inverse (sampling) direction has no backward pass; \
                 differentiate the forward direction"
                    .into(),
            ));
        }
        let xg = Tensor::cat(&[&x.flatten_all()?, &g.flatten_all()?], 0)?;
        let all = xg.apply_op3_no_bwd(
            raw,
            active,
            &RqSplineGrad {
                sp: self.sp,
                plane: self.plane,
            },
        )?;
        let n = x.elem_count();
        let dx = all.narrow(0, 0, n)?.reshape(x.shape())?;
        let draw = all
            .narrow(0, n, n * self.sp.per_element())?
            .force_contiguous()?
            .reshape(raw.shape())?;
        Ok((Some(dx), Some(draw), None))
    }
}

/// `([x; ∂y; ∂logd], raw, active) → [∂x; ∂raw]`, flat.
struct RqSplineGrad {
    sp: Spline,
    plane: usize,
}

impl CustomOp3 for RqSplineGrad {
    fn name(&self) -> &'static str {
        "flowlab-rq-spline-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n3 = l1.shape().elem_count();
        if !n3.is_multiple_of(3) {
            return Err(candle_core::Error::Msg(format!(
                "rq_spline grad kernel: [x; ∂y; ∂logd] of {n3} values"
            )));
        }
        let n = n3 / 3;
        let xl = Layout::contiguous(n);
        check_inputs("rq_spline grad", &self.sp, self.plane, (&xl, l2, l3))?;
        let out = crate::kernels::dispatch!("rq_spline grad", (s1, s2, s3), |xg, r, a| {
            let lay = Placement {
                plane: self.plane,
                active: slice(a, l3)?,
            };
            let (x, g) = slice(xg, l1)?.split_at(n);
            spline_grads(x, slice(r, l2)?, g, lay, &self.sp)
        })?;
        Ok((out, Shape::from(n + n * self.sp.per_element())))
    }
}

/// The largest bin count the fused kernel takes (its per-element buffers live on the
/// stack); more bins run the composed candle ops.
pub const MAX_SPLINE_BINS: usize = 64;

/// A rational-quadratic spline: K bins on `[−bound, bound]`, minimum bin size and
/// derivative `min_bin`, and the direction.
#[derive(Debug, Clone, Copy)]
pub struct RqSplineSpec {
    pub bins: usize,
    pub bound: f64,
    pub min_bin: f64,
    /// Map the spline's outputs back to its inputs (sampling; no backward pass).
    pub inverse: bool,
}

/// The rational-quadratic spline of `flow::spline`, elementwise and fused.
///
/// `x` has N elements in rows of `plane`; element `m·plane + p` takes its `3K − 1`
/// parameters from `raw` at `(m·(3K−1) + j)·plane + p`: `plane = 1` reads `raw` as
/// `[…x, 3K−1]`, `plane = H·W` reads a network's `[B, C·(3K−1), H, W]` output for `x`
/// `[B, C, H, W]` in place (no permuted copy). With `active` (N or a divisor of N values,
/// repeating; e.g. a coupling mask as `[C, H, W]`), elements where it is 0 are not
/// transformed: `y = x`, log-derivative 0, no parameter gradient.
///
/// Returns `(y, log|dy/dx|)` shaped like x (with `inverse`: x is the spline's output, the
/// result its input, and the log-derivative the forward one at it); `None` where the fast
/// kernels do not apply (GPU, other dtypes, `Kernels::Candle`, more than
/// [`MAX_SPLINE_BINS`] bins), and the caller composes candle ops instead.
pub fn rq_spline(
    x: &Tensor,
    raw: &Tensor,
    active: Option<&Tensor>,
    plane: usize,
    spec: RqSplineSpec,
) -> Result<Option<(Tensor, Tensor)>> {
    let ts: Vec<&Tensor> = [x, raw].into_iter().chain(active).collect();
    if !super::use_fast(&ts) || !(2..=MAX_SPLINE_BINS).contains(&spec.bins) {
        return Ok(None);
    }
    let sp = Spline {
        bins: spec.bins,
        bound: spec.bound,
        min: spec.min_bin,
        shift: (1.0 - spec.min_bin).exp_m1().ln(),
        inverse: spec.inverse,
    };
    let active = match active {
        Some(a) => a.flatten_all()?.contiguous()?,
        None => Tensor::zeros(0, x.dtype(), x.device())?,
    };
    let out = x
        .contiguous()?
        .apply_op3(&raw.contiguous()?, &active, RqSpline { sp, plane })?;
    let y = out.get(0)?.reshape(x.shape())?;
    let logd = out.get(1)?.reshape(x.shape())?;
    Ok(Some((y, logd)))
}

#[cfg(test)]
mod tests {
    use super::super::{randn, with_kernels, Kernels};
    use super::*;
    use crate::flow::spline::{params_per_element, rq_spline as spline, rq_spline_nchw};
    use crate::testing::max_abs;
    use candle_core::{DType, Device};

    fn spec(bins: usize) -> RqSplineSpec {
        RqSplineSpec {
            bins,
            bound: 3.0,
            min_bin: 1e-3,
            inverse: false,
        }
    }

    /// `x` spread over the domain `(−B, B)` and a little beyond it, `raw` random.
    fn inputs(dims: &[usize], bins: usize, bound: f64, scale: f64, dtype: DType) -> [Tensor; 2] {
        let x = (randn(11, dims, 0.6 * bound, DType::F64).to_dtype(dtype)).unwrap();
        let mut rd = dims.to_vec();
        rd.push(params_per_element(bins));
        [x, randn(12, &rd, scale, dtype)]
    }

    fn both(t: &[Tensor], bins: usize, bound: f64) -> crate::Result<Tensor> {
        let (y, l) = spline(&t[0], &t[1], bins, bound, false)?;
        Ok(Tensor::cat(&[y, l], 0)?)
    }

    #[test]
    fn matches_the_composed_spline_values_and_gradients() {
        // Several bin counts, parameter scales (near-uniform to very uneven bins), odd
        // sizes, elements in both tails; then the coupling's shape in f32.
        for (dims, bins, bound, scale, dtype, tol) in [
            (vec![3, 2, 5], 8, 3.0, 1.0, DType::F64, 1e-9),
            (vec![7, 3], 2, 3.0, 0.5, DType::F64, 1e-9),
            (vec![4, 1, 3, 3], 5, 13.0, 3.0, DType::F64, 1e-9),
            (vec![2, 9], 16, 1.0, 2.0, DType::F64, 1e-9),
            (vec![64, 1, 14, 14], 8, 13.0, 1.0, DType::F32, 2e-4),
        ] {
            let t = inputs(&dims, bins, bound, scale, dtype);
            super::super::check_against_reference(&t, |t| both(t, bins, bound), tol);
        }
    }

    /// A checkerboard mask `[1, 1, H, W]` and a channel mask `[1, C, 1, 1]` (1 = transform).
    fn masks(c: usize, h: usize, w: usize, dtype: DType) -> [Tensor; 2] {
        let board: Vec<f64> = (0..h * w).map(|i| ((i / w + i % w) % 2) as f64).collect();
        let chan: Vec<f64> = (0..c).map(|i| (i >= c / 2) as u8 as f64).collect();
        [
            Tensor::from_vec(board, (1, 1, h, w), &Device::Cpu).unwrap(),
            Tensor::from_vec(chan, (1, c, 1, 1), &Device::Cpu).unwrap(),
        ]
        .map(|t| t.to_dtype(dtype).unwrap())
    }

    #[test]
    fn network_layout_and_masks_match_the_composed_spline() {
        // Parameters read in place from a `[B, C·(3K−1), H, W]` network output, transformed
        // everywhere, under a checkerboard and under a channel mask; then the coupling's
        // shape in f32.
        for (dims, bins, bound, dtype, tol) in [
            ([3, 2, 5, 3], 8, 3.0, DType::F64, 1e-9),
            ([2, 4, 3, 3], 3, 13.0, DType::F64, 1e-9),
            ([64, 1, 14, 14], 8, 13.0, DType::F32, 2e-4),
        ] {
            let [b, c, h, w] = dims;
            let per = params_per_element(bins);
            let x = (randn(21, &dims, 0.6 * bound, DType::F64).to_dtype(dtype)).unwrap();
            let raw = randn(22, &[b, c * per, h, w], 1.0, dtype);
            let [board, chan] = masks(c, h, w, dtype);
            for active in [None, Some(&board), Some(&chan)] {
                super::super::check_against_reference(
                    &[x.clone(), raw.clone()],
                    |t| {
                        let (y, l) = rq_spline_nchw(&t[0], &t[1], active, bins, bound, false)?;
                        Ok(Tensor::cat(&[y, l], 0)?)
                    },
                    tol,
                );
            }
        }
    }

    #[test]
    fn masked_elements_stay_put_with_no_gradient() {
        let (bins, per) = (8, params_per_element(8));
        let x = randn(31, &[2, 2, 4, 4], 1.5, DType::F64);
        let raw = randn(32, &[2, 2 * per, 4, 4], 1.0, DType::F64);
        let [board, _] = masks(2, 4, 4, DType::F64);
        let v = candle_core::Var::from_tensor(&raw).unwrap();
        let (y, ld, g) = with_kernels(Kernels::Fast, || {
            let (y, ld) =
                rq_spline_nchw(&x, v.as_tensor(), Some(&board), bins, 3.0, false).unwrap();
            let g = (y.sqr().unwrap().sum_all().unwrap() + ld.sum_all().unwrap())
                .unwrap()
                .backward()
                .unwrap();
            (y, ld, g.get(v.as_tensor()).unwrap().clone())
        });
        let keep = board
            .affine(-1.0, 1.0)
            .unwrap()
            .broadcast_as(x.shape())
            .unwrap();
        let kept = |t: &Tensor| t.broadcast_mul(&keep).unwrap();
        let diff = max_abs(&(kept(&y) - kept(&x)).unwrap()).unwrap();
        assert_eq!(diff, 0.0, "masked elements are x");
        assert_eq!(max_abs(&kept(&ld)).unwrap(), 0.0, "with log-derivative 0");
        // Parameters of masked elements (every channel's 3K−1 planes at masked pixels).
        let gm = g
            .reshape((2, 2, per, 4, 4))
            .unwrap()
            .broadcast_mul(&keep.reshape((2, 2, 1, 4, 4)).unwrap())
            .unwrap();
        let gmax = max_abs(&gm).unwrap();
        assert_eq!(gmax, 0.0, "no gradient to masked elements' parameters");
        let gall = max_abs(&g).unwrap();
        assert!(
            gall > 1e-6,
            "the transformed elements' parameters get gradients"
        );
    }

    #[test]
    fn an_empty_batch_gives_empty_results_and_gradients() {
        let per = params_per_element(8);
        let x = Tensor::zeros((0, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let h = candle_core::Var::zeros((0, 2 * per, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let [board, _] = masks(2, 3, 3, DType::F32);
        let (y, g) = with_kernels(Kernels::Fast, || {
            let (y, l) = rq_spline_nchw(&x, h.as_tensor(), Some(&board), 8, 3.0, false).unwrap();
            let loss = (y.sum_all().unwrap() + l.sum_all().unwrap()).unwrap();
            (y, loss.backward().unwrap())
        });
        assert_eq!(y.dims(), &[0, 2, 3, 3]);
        assert_eq!(g.get(h.as_tensor()).unwrap().dims(), &[0, 2 * per, 3, 3]);
    }

    #[test]
    fn inverse_matches_the_composed_spline_and_refuses_a_backward_pass() {
        let [x, raw] = inputs(&[5, 2, 7], 8, 3.0, 1.5, DType::F64);
        let run = |k| with_kernels(k, || spline(&x, &raw, 8, 3.0, true).unwrap());
        let ((xf, lf), (xr, lr)) = (run(Kernels::Fast), run(Kernels::Candle));
        let err = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap()).unwrap();
        assert!(err(&xf, &xr) < 1e-9 && err(&lf, &lr) < 1e-9);
        let msg = with_kernels(Kernels::Fast, || {
            let v = candle_core::Var::from_tensor(&raw).unwrap();
            let (y, _) = spline(&x, v.as_tensor(), 8, 3.0, true).unwrap();
            y.sum_all().unwrap().backward().unwrap_err().to_string()
        });
        assert!(msg.contains("inverse"), "{msg}");
    }

    #[test]
    fn gradients_do_not_depend_on_the_thread_count() {
        // More elements than one work chunk, so several threads share the op.
        let [x, raw] = inputs(&[3, 1000], 8, 3.0, 1.0, DType::F32);
        super::super::assert_thread_count_invariant(|| {
            let v = candle_core::Var::from_tensor(&raw).unwrap();
            let (y, l) = spline(&x, v.as_tensor(), 8, 3.0, false).unwrap();
            let loss = ((y.sqr().unwrap().sum_all().unwrap()) + l.sum_all().unwrap()).unwrap();
            super::super::grad_f32(&loss.backward().unwrap(), v.as_tensor())
        });
    }

    #[test]
    fn refuses_parameters_of_the_wrong_size_and_passes_large_bin_counts_on() {
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let raw = Tensor::zeros((2, 3, 10), DType::F32, &Device::Cpu).unwrap();
        let err = with_kernels(Kernels::Fast, || {
            rq_spline(&x, &raw, None, 1, spec(8))
                .unwrap_err()
                .to_string()
        });
        assert!(err.contains("23 values"), "{err}");
        let bins = MAX_SPLINE_BINS + 1;
        let raw = Tensor::zeros((2, 3, 3 * bins - 1), DType::F32, &Device::Cpu).unwrap();
        let r = with_kernels(Kernels::Fast, || rq_spline(&x, &raw, None, 1, spec(bins)));
        assert!(
            r.unwrap().is_none(),
            "more bins than the kernel holds: composed ops"
        );
    }
}
