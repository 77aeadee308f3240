//! The hot ops composed from candle's own differentiable ops: the fallback on GPUs and
//! the reference the fast kernels are tested against.

use candle_core::Tensor;

use crate::Result;

/// `[B, c_in, H, W] ⊛ [c_out, c_in, kh, kw] + bias[c_out]`, stride 1, zero padding `pad`.
pub fn conv2d(x: &Tensor, w: &Tensor, b: &Tensor, pad: usize) -> Result<Tensor> {
    let y = x.conv2d(w, pad, 1, 1, 1)?;
    let c = b.dim(0)?;
    Ok(y.broadcast_add(&b.reshape((1, c, 1, 1))?)?)
}

/// `[B, C, H, W] → [B, 2C, H, W]`: `[elu(x), elu(−x)]`.
pub fn concat_elu(x: &Tensor) -> Result<Tensor> {
    Ok(Tensor::cat(&[x.elu(1.0)?, x.neg()?.elu(1.0)?], 1)?)
}

/// `x + val·σ(gate)` with `[val, gate] = h` split along channels (`h`: `[B, 2C, H, W]`).
pub fn gate(x: &Tensor, h: &Tensor) -> Result<Tensor> {
    let c = x.dim(1)?;
    let val = h.narrow(1, 0, c)?;
    let g = h.narrow(1, c, c)?;
    Ok((x + (val * candle_nn::ops::sigmoid(&g)?)?)?)
}

/// `(x − μ)/√(σ² + ε)` with μ, σ² over the channel axis of `[B, C, H, W]` (biased variance).
pub fn channel_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(1)?;
    Ok(xc.broadcast_div(&(var + eps)?.sqrt()?)?)
}
