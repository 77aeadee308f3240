//! ActNorm's per-channel affine map, fused: `z = (x + b)·s` for x `[B, C, …]` and b, s with
//! C elements each.
//!
//! Backward: `∂x = G·s`, `∂b_c = s_c·Σ G`, `∂s_c = Σ G·(x + b_c)`, the sums running over the
//! images and positions of channel c. candle's broadcast ops compute the same, but their
//! backward reduces over the batch and spatial axes on one thread, which left a Glow step's
//! other core idle for ~5 % of the step.
//!
//! The sums are deterministic: each row adds in 16 fixed lanes, images are summed in fixed
//! groups, and the groups in order, so the result is the same for any thread count.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::{
    dims3, per_image_out, per_image_with_sums, slice, split_grads, sum_lanes, wide, Real, SUM_LANES,
};
use crate::Result;

fn check_params(what: &str, c: usize, l: &[&Layout]) -> candle_core::Result<()> {
    for l in l {
        if l.shape().elem_count() != c {
            return Err(candle_core::Error::Msg(format!(
                "{what} kernel: parameter of shape {:?} must have C = {c} elements",
                l.dims()
            )));
        }
    }
    Ok(())
}

/// `z = (x + b)·s` for one channel row.
#[inline(always)]
fn affine_row<T: Real>(x: &[T], b: T, s: T, z: &mut [T]) {
    for (z, &x) in z.iter_mut().zip(x) {
        *z = (x + b) * s;
    }
}

/// `∂x = G·s` for one channel row, and that row's `(Σ G, Σ G·(x + b))`, each summed in
/// [`SUM_LANES`] fixed lanes (element i in lane i mod 16), over 16-element blocks so that
/// the loop vectorises.
#[inline(always)]
fn grad_row<T: Real>(x: &[T], g: &[T], b: T, s: T, dx: &mut [T]) -> (T, T) {
    let (mut sg, mut sgx) = ([T::ZERO; SUM_LANES], [T::ZERO; SUM_LANES]);
    #[inline(always)]
    fn lane<T: Real>(x: T, g: T, b: T, s: T, dx: &mut T, sg: &mut T, sgx: &mut T) {
        *dx = g * s;
        *sg += g;
        *sgx += g * (x + b);
    }
    let n = x.len();
    let main = n - n % SUM_LANES;
    let blocks = x[..main]
        .chunks_exact(SUM_LANES)
        .zip(g[..main].chunks_exact(SUM_LANES))
        .zip(dx[..main].chunks_exact_mut(SUM_LANES));
    for ((x, g), dx) in blocks {
        for l in 0..SUM_LANES {
            lane(x[l], g[l], b, s, &mut dx[l], &mut sg[l], &mut sgx[l]);
        }
    }
    for (l, i) in (main..n).enumerate() {
        lane(x[i], g[i], b, s, &mut dx[i], &mut sg[l], &mut sgx[l]);
    }
    (sum_lanes(sg), sum_lanes(sgx))
}

fn affine_fwd<T: Real>(x: &[T], b: &[T], s: &[T], (n, c, p): (usize, usize, usize)) -> Vec<T> {
    per_image_out(n * c * p, c * p, 0, |img, z, _, _| {
        let xn = &x[img * c * p..(img + 1) * c * p];
        wide(|| {
            for (ch, (zr, xr)) in z.chunks_mut(p).zip(xn.chunks(p)).enumerate() {
                affine_row(xr, b[ch], s[ch], zr);
            }
        });
    })
}

/// `[∂x; Σ G; Σ G·(x + b)]` (`B·C·P + 2C` values), the sums independent of the thread count
/// ([`per_image_with_sums`]).
fn affine_grads<T: Real>(x: &[T], gy: &[T], bs: &[T], (n, c, p): (usize, usize, usize)) -> Vec<T> {
    let (b, s) = bs.split_at(c);
    let img = c * p;
    per_image_with_sums(n, img, 0, 2 * c, |i, [dxn], _, sums, _| {
        let (xn, gn) = (&x[i * img..(i + 1) * img], &gy[i * img..(i + 1) * img]);
        wide(|| {
            for ch in 0..c {
                let r = ch * p..(ch + 1) * p;
                let (sg, sgx) = grad_row(&xn[r.clone()], &gn[r.clone()], b[ch], s[ch], &mut dxn[r]);
                sums[ch] += sg;
                sums[c + ch] += sgx;
            }
        });
    })
}

/// `(x, b, s) → (x + b)·s`, b and s with C elements.
struct ChannelAffine;

impl CustomOp3 for ChannelAffine {
    fn name(&self) -> &'static str {
        "flowlab-channel-affine"
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
        let d = dims3("channel_affine", l1.dims())?;
        check_params("channel_affine", d.1, &[l2, l3])?;
        let out = crate::kernels::dispatch!("channel_affine", (s1, s2, s3), |x, b, s| {
            affine_fwd(slice(x, l1)?, slice(b, l2)?, slice(s, l3)?, d)
        })?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        s: &Tensor,
        _z: &Tensor,
        gz: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gz = gz.contiguous()?;
        let bs = Tensor::cat(&[b.flatten_all()?, s.flatten_all()?], 0)?;
        let all = x.apply_op3_no_bwd(&gz, &bs, &ChannelAffineGrad)?;
        let (dx, sum_g, ds) = split_grads(&all, x, b, s)?;
        let db = (sum_g * s.reshape(b.shape())?)?;
        Ok((Some(dx), Some(db), Some(ds)))
    }
}

/// `(x, G, [b; s]) → [∂x; Σ G; Σ G·(x + b)]`, flat.
struct ChannelAffineGrad;

impl CustomOp3 for ChannelAffineGrad {
    fn name(&self) -> &'static str {
        "flowlab-channel-affine-grad"
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
        let d = dims3("channel_affine", l1.dims())?;
        if l2.dims() != l1.dims() || l3.shape().elem_count() != 2 * d.1 {
            return Err(candle_core::Error::Msg(format!(
                "channel_affine grad kernel: G {:?} / [b; s] {:?} do not fit x {:?}",
                l2.dims(),
                l3.dims(),
                l1.dims()
            )));
        }
        let out = crate::kernels::dispatch!("channel_affine grad", (s1, s2, s3), |x, g, bs| {
            affine_grads(slice(x, l1)?, slice(g, l2)?, slice(bs, l3)?, d)
        })?;
        Ok((out, Shape::from(d.0 * d.1 * d.2 + 2 * d.1)))
    }
}

/// `(x + b)·s` per channel: x `[B, C, H, W]`, b and s with C elements (shaped `[1, C, 1, 1]`
/// to broadcast). ActNorm's map.
pub fn channel_affine(x: &Tensor, b: &Tensor, s: &Tensor) -> Result<Tensor> {
    if !super::use_fast(&[x, b, s]) {
        return Ok(x.broadcast_add(b)?.broadcast_mul(s)?);
    }
    Ok(x.contiguous()?
        .apply_op3(&b.contiguous()?, &s.contiguous()?, ChannelAffine)?)
}

#[cfg(test)]
mod tests {
    use super::super::randn;
    use super::*;
    use candle_core::DType;

    #[test]
    fn matches_candle_values_and_gradients() {
        // Odd sizes, rows shorter and longer than the 16 lanes, a batch that is not a
        // multiple of the reduction group, and the Glow shapes in f32.
        for (dims, dtype, tol) in [
            (vec![3, 2, 5, 7], DType::F64, 1e-12),
            (vec![1, 3, 1, 1], DType::F64, 1e-12),
            (vec![5, 4, 3, 3], DType::F64, 1e-12),
            (vec![9, 1, 6, 6], DType::F64, 1e-12),
            (vec![64, 4, 14, 14], DType::F32, 1e-5),
            (vec![16, 8, 7, 7], DType::F32, 1e-5),
        ] {
            let c = dims[1];
            super::super::check_against_reference(
                &[
                    randn(1, &dims, 1.5, dtype),
                    randn(2, &[1, c, 1, 1], 1.5, dtype),
                    randn(3, &[1, c, 1, 1], 1.5, dtype),
                ],
                |t| channel_affine(&t[0], &t[1], &t[2]),
                tol,
            );
        }
    }

    #[test]
    fn gradients_do_not_depend_on_the_thread_count() {
        let x = randn(4, &[11, 3, 9, 5], 1.5, DType::F32);
        let b = randn(5, &[1, 3, 1, 1], 1.5, DType::F32);
        let s = randn(6, &[1, 3, 1, 1], 1.5, DType::F32);
        let probe = randn(7, &[11, 3, 9, 5], 1.5, DType::F32);
        super::super::assert_thread_count_invariant(|| {
            let (bv, sv) = (
                candle_core::Var::from_tensor(&b).unwrap(),
                candle_core::Var::from_tensor(&s).unwrap(),
            );
            let xv = candle_core::Var::from_tensor(&x).unwrap();
            let z = channel_affine(xv.as_tensor(), bv.as_tensor(), sv.as_tensor()).unwrap();
            let g = (z * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            [xv.as_tensor(), bv.as_tensor(), sv.as_tensor()]
                .iter()
                .map(|t| super::super::grad_f32(&g, t))
                .collect::<Vec<_>>()
        });
    }

    #[test]
    fn refuses_parameters_of_the_wrong_size() {
        let x = randn(1, &[2, 3, 4, 4], 1.5, DType::F32);
        let b = randn(2, &[1, 2, 1, 1], 1.5, DType::F32);
        let err = super::super::with_kernels(super::super::Kernels::Fast, || {
            channel_affine(&x, &b, &b).unwrap_err().to_string()
        });
        assert!(err.contains("C = 3"), "{err}");
    }
}
