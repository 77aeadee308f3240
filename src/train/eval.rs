//! Evaluation: mean bits per dimension over a set of images.

use std::ops::ControlFlow;

use candle_core::Tensor;

use super::derive_seed;
use super::shard::Sharding;
use crate::data::Loader;
use crate::flow::FlowModel;
use crate::{Error, Result};

/// Mean bpd over `batches` of `loader`. With `importance_samples` K > 1 each image's
/// likelihood is the importance-sampled logsumexp over K dequantization draws; K = 1 is
/// the single-draw bound. Batch `i`'s dequantization noise comes from
/// `derive_seed(seed, 0, i)` (per shard on the CPU, [`Sharding::map`]), so repeated
/// evaluations of the same model agree exactly, whatever the thread count. `poll` is called
/// before each batch and at the end (see [`Poll`]).
pub fn mean_bpd(
    model: &FlowModel,
    loader: &Loader,
    batches: &[Vec<usize>],
    importance_samples: usize,
    seed: u64,
    poll: Poll<'_>,
) -> Result<f64> {
    Ok(bpd_by_class(model, loader, batches, importance_samples, seed, poll)?.0)
}

/// Called with (images evaluated, images in all) before each batch and once at the end,
/// for progress; `Break` before a batch ends the evaluation with [`Error::Stopped`].
pub type Poll<'a> = &'a mut dyn FnMut(usize, usize) -> ControlFlow<()>;

/// A [`Poll`] that only stops, when `stop()` says so.
pub fn stop_when(stop: &dyn Fn() -> bool) -> impl FnMut(usize, usize) -> ControlFlow<()> + '_ {
    move |_, _| {
        if stop() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

/// Like [`mean_bpd`], also returning the mean bpd per class label (sorted by label; empty
/// for unlabelled data). For a class-conditional model these are of p(x | y).
pub fn bpd_by_class(
    model: &FlowModel,
    loader: &Loader,
    batches: &[Vec<usize>],
    importance_samples: usize,
    seed: u64,
    poll: Poll<'_>,
) -> Result<(f64, Vec<(u64, f64)>)> {
    let sharding = Sharding::new(model);
    let mut total = 0.0;
    let mut n = 0usize;
    let mut per_class: std::collections::BTreeMap<u64, (f64, usize)> = Default::default();
    let all: usize = batches.iter().map(Vec::len).sum();
    for (i, idx) in batches.iter().enumerate() {
        if poll(n, all).is_break() {
            return Err(Error::Stopped);
        }
        let (x, y) = loader.batch(idx)?;
        let batch_seed = derive_seed(seed, 0, i as u64);
        let parts = sharding.map(model, &x, y.as_ref(), batch_seed, |ctx, xs| {
            let bpd: Tensor = if importance_samples > 1 {
                model.bpd_importance(xs, importance_samples, ctx)?
            } else {
                model.bpd(xs, ctx)?.detach()
            };
            Ok(bpd.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?)
        })?;
        let v = parts.concat();
        total += v.iter().sum::<f64>();
        n += idx.len();
        if let Some(y) = y {
            let labels = y.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
            for (b, l) in v.iter().zip(labels) {
                let e = per_class.entry(l as u64).or_insert((0.0, 0));
                e.0 += b;
                e.1 += 1;
            }
        }
    }
    let _ = poll(n, all);
    let mean = if n == 0 { f64::NAN } else { total / n as f64 };
    let classes = per_class
        .into_iter()
        .map(|(k, (s, c))| (k, s / c as f64))
        .collect();
    Ok((mean, classes))
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
