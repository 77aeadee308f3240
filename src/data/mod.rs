//! Datasets: embedded MNIST, IDX directories, Fashion-MNIST, and batching.

pub mod dataset;
pub mod idx;
pub mod loader;
pub mod mnist;

pub use dataset::Dataset;
pub use loader::Loader;

use crate::spec::DataSpec;

/// `[C, H, W]` of a built-in dataset after downscaling, without loading it.
pub fn builtin_shape(spec: &DataSpec) -> Result<[usize; 3], String> {
    let [c, h, w] = match spec.dataset.name.as_str() {
        "mnist" | "fashion_mnist" if spec.dataset.source.is_none() => [1, 28, 28],
        other => return Err(format!("the shape of dataset '{other}' is only known after loading it")),
    };
    let f = spec.downscale.max(1);
    if h % f != 0 || w % f != 0 {
        return Err(format!("downscale {f} does not divide the {h}×{w} images"));
    }
    Ok([c, h / f, w / f])
}
