//! Evaluation: mean bits per dimension over a set of images.

use candle_core::Tensor;

use crate::data::Loader;
use crate::flow::{FlowCtx, FlowModel};
use crate::Result;

/// Mean bpd over `batches` of `loader`. With `importance_samples` K > 1 each image's
/// likelihood is the importance-sampled logsumexp over K dequantization draws; K = 1 is
/// the single-draw bound. Dequantization noise comes from `seed`, so repeated
/// evaluations of the same model agree exactly.
pub fn mean_bpd(
    model: &FlowModel,
    loader: &Loader,
    batches: &[Vec<usize>],
    importance_samples: usize,
    seed: u64,
) -> Result<f64> {
    let mut ctx = FlowCtx::new(seed);
    let mut total = 0.0;
    let mut n = 0usize;
    for idx in batches {
        let (x, _) = loader.batch(idx)?;
        let bpd: Tensor = if importance_samples > 1 {
            model.bpd_importance(&x, importance_samples, &mut ctx)?
        } else {
            model.bpd(&x, &mut ctx)?.detach()
        };
        total += bpd
            .to_dtype(candle_core::DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        n += idx.len();
    }
    Ok(if n == 0 { f64::NAN } else { total / n as f64 })
}

/// The first batches of `loader` covering at most `limit` images (all if `None`).
pub fn first_batches(loader: &Loader, limit: Option<usize>) -> Vec<Vec<usize>> {
    let mut left = limit.unwrap_or(usize::MAX);
    let mut out = Vec::new();
    for mut b in loader.ordered() {
        if left == 0 {
            break;
        }
        b.truncate(left);
        left -= b.len();
        out.push(b);
    }
    out
}
