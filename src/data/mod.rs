//! Datasets: embedded MNIST, IDX directories, Fashion-MNIST, and batching.

pub mod dataset;
pub mod idx;
pub mod loader;
pub mod mnist;
pub mod sources;

pub use dataset::Dataset;
pub use loader::Loader;

use crate::spec::DataSpec;

/// `[C, H, W]` of a built-in dataset after downscaling, without loading it.
pub fn builtin_shape(spec: &DataSpec) -> Result<[usize; 3], String> {
    let [c, h, w] = match spec.dataset.name.as_str() {
        "mnist" | "fashion_mnist" if spec.dataset.source.is_none() => [1, 28, 28],
        other => {
            return Err(format!(
                "the shape of dataset '{other}' is only known after loading it"
            ))
        }
    };
    let f = spec.downscale.max(1);
    if h % f != 0 || w % f != 0 {
        return Err(format!("downscale {f} does not divide the {h}×{w} images"));
    }
    Ok([c, h / f, w / f])
}

/// A data spec as a map key: two specs with the same key load the same images.
pub fn key(spec: &DataSpec) -> String {
    serde_json::to_string(spec).unwrap_or_default()
}

/// The distinct data specs among `specs`, in first-seen order, each with how many of
/// `specs` it is (a sweep's runs share a few).
pub fn distinct<'a>(specs: impl IntoIterator<Item = &'a DataSpec>) -> Vec<(&'a DataSpec, usize)> {
    let mut out: Vec<(String, &DataSpec, usize)> = Vec::new();
    for spec in specs {
        let k = key(spec);
        match out.iter_mut().find(|(o, _, _)| *o == k) {
            Some(d) => d.2 += 1,
            None => out.push((k, spec, 1)),
        }
    }
    out.into_iter().map(|(_, s, n)| (s, n)).collect()
}

/// Train / validation / test parts of a dataset, after class filters, downscaling and subsets.
#[derive(Debug, Clone)]
pub struct Splits {
    pub train: Dataset,
    pub val: Dataset,
    pub test: Dataset,
}

/// The split of training data into train/validation uses this fixed seed, so runs with
/// different training seeds are validated on the same images.
pub const SPLIT_SEED: u64 = 0x5eed_da7a;

/// The hub repository Fashion-MNIST is fetched from when Debian's package is absent.
pub const FASHION_HUB_REPO: &str = "zalando-datasets/fashion_mnist";

/// Loads the raw (train, test) parts of a dataset.
pub fn load_parts(spec: &DataSpec) -> crate::Result<(Dataset, Dataset)> {
    let ds = &spec.dataset;
    match (ds.name.as_str(), ds.source.as_deref()) {
        ("mnist", None) => Ok((
            mnist::embedded(mnist::Part::Train)?,
            mnist::embedded(mnist::Part::Test)?,
        )),
        ("fashion_mnist", None) => {
            let dir = std::path::Path::new(mnist::FASHION_DIR);
            if dir.is_dir() {
                return Ok((
                    mnist::from_dir("fashion_mnist", dir, mnist::Part::Train)?,
                    mnist::from_dir("fashion_mnist", dir, mnist::Part::Test)?,
                ));
            }
            // Not installed: the hub (or its offline cache).
            sources::hub("fashion_mnist", FASHION_HUB_REPO).map_err(|e| {
                crate::Error::Data(format!(
                    "fashion_mnist: not found offline: looked in {} (Debian: `apt-get install dataset-fashion-mnist`), then on the hub as hf://{FASHION_HUB_REPO}: {e}",
                    mnist::FASHION_DIR
                ))
            })
        }
        (name, Some(src)) => sources::load(name, src),
        (name, None) => Err(crate::Error::Data(format!(
            "unknown dataset '{name}': use mnist, fashion_mnist, or give a source"
        ))),
    }
}

/// Loads and prepares all three parts of a data spec; refuses one whose training part
/// cannot fill a batch.
pub fn load(spec: &DataSpec) -> crate::Result<Splits> {
    let (mut train, mut test) = load_parts(spec)?;
    if let Some(classes) = &spec.classes {
        train = train.filter_classes(classes)?;
        test = test.filter_classes(classes)?;
    }
    if spec.downscale > 1 {
        train = train.downscale(spec.downscale)?;
        test = test.downscale(spec.downscale)?;
    }
    let (mut train, val) = train.split(spec.val_size, SPLIT_SEED)?;
    // A subset larger than its part is the whole part (said, since the spec asked for more).
    let larger = |what: &str, n: usize, d: &Dataset| {
        if n > d.len() {
            tracing::warn!(
                "data.{what}_subset {n} is more than the {} {what} images of {}: using all of them",
                d.len(),
                d.name
            );
        }
    };
    if let Some(n) = spec.train_subset {
        larger("train", n, &train);
        train = train.subset(n, SPLIT_SEED);
    }
    if let Some(n) = spec.test_subset {
        larger("test", n, &test);
        test = test.subset(n, SPLIT_SEED);
    }
    if train.len() < spec.batch_size {
        return Err(crate::Error::Data(format!(
            "{}: only {} training images for data.batch_size {}",
            train.name,
            train.len(),
            spec.batch_size
        )));
    }
    Ok(Splits { train, val, test })
}

/// `[C, H, W]` of a data spec after downscaling: without loading for built-ins, else by loading.
pub fn shape_of(spec: &DataSpec) -> Result<[usize; 3], String> {
    builtin_shape(spec).or_else(|_| {
        let (train, _) = load_parts(spec).map_err(|e| e.to_string())?;
        let [c, h, w] = train.shape;
        let f = spec.downscale.max(1);
        if h % f != 0 || w % f != 0 {
            return Err(format!("downscale {f} does not divide the {h}×{w} images"));
        }
        Ok([c, h / f, w / f])
    })
}
