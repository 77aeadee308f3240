//! MNIST (embedded in the binary) and Fashion-MNIST (Debian's `dataset-fashion-mnist`).
//!
//! The four gzip IDX files of MNIST ship in `data/mnist/` and are compiled into flowlab,
//! so `dataset: mnist` works with no network and no set-up (see `data/mnist/README.md`).

use std::path::{Path, PathBuf};

use super::{idx, Dataset};
use crate::{Error, Result};

/// Which part of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Train,
    Test,
}

impl Part {
    fn stem(self) -> &'static str {
        match self {
            Part::Train => "train",
            Part::Test => "t10k",
        }
    }
}

/// The embedded files: (name, bytes, sha256 of the gzip file).
pub const EMBEDDED: [(&str, &[u8], &str); 4] = [
    (
        "train-images.idx3-ubyte.gz",
        include_bytes!("../../data/mnist/train-images.idx3-ubyte.gz"),
        "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    ),
    (
        "train-labels.idx1-ubyte.gz",
        include_bytes!("../../data/mnist/train-labels.idx1-ubyte.gz"),
        "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    ),
    (
        "t10k-images.idx3-ubyte.gz",
        include_bytes!("../../data/mnist/t10k-images.idx3-ubyte.gz"),
        "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
    ),
    (
        "t10k-labels.idx1-ubyte.gz",
        include_bytes!("../../data/mnist/t10k-labels.idx1-ubyte.gz"),
        "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
    ),
];

fn embedded_bytes(name: &str) -> &'static [u8] {
    EMBEDDED
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, b, _)| *b)
        .expect("embedded file list is fixed")
}

/// Builds a dataset from parsed image and label IDX arrays.
pub fn from_idx(name: &str, images: idx::IdxArray, labels: idx::IdxArray) -> Result<Dataset> {
    let [n, h, w] = images.dims[..] else {
        return Err(Error::Data(format!(
            "{name}: image file has dims {:?}, expected [N, H, W]",
            images.dims
        )));
    };
    if labels.dims.len() != 1 || labels.dims[0] != n {
        return Err(Error::Data(format!(
            "{name}: {n} images but the label file holds dims {:?}",
            labels.dims
        )));
    }
    Dataset::new(
        name,
        [1, h, w],
        images.data,
        labels.data.into_iter().map(u32::from).collect(),
    )
}

/// MNIST from the files compiled into flowlab.
pub fn embedded(part: Part) -> Result<Dataset> {
    let s = part.stem();
    let imgs = format!("{s}-images.idx3-ubyte.gz");
    let labs = format!("{s}-labels.idx1-ubyte.gz");
    from_idx(
        &format!("mnist/{s} (embedded)"),
        idx::parse(embedded_bytes(&imgs), &imgs)?,
        idx::parse(embedded_bytes(&labs), &labs)?,
    )
}

/// The two candidate spellings of IDX file names (`train-images-idx3-ubyte` and
/// `train-images.idx3-ubyte`), gzip or raw.
fn candidates(dir: &Path, part: Part, kind: &str, nd: u8) -> Vec<PathBuf> {
    let s = part.stem();
    let mut v = Vec::new();
    for sep in ['-', '.'] {
        for ext in [".gz", ""] {
            v.push(dir.join(format!("{s}-{kind}{sep}idx{nd}-ubyte{ext}")));
        }
    }
    v
}

/// MNIST-layout IDX files from a directory (either naming convention, gzip or raw).
pub fn from_dir(name: &str, dir: &Path, part: Part) -> Result<Dataset> {
    let find = |kind: &str, nd: u8| -> Result<PathBuf> {
        let c = candidates(dir, part, kind, nd);
        c.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
            Error::Data(format!(
                "{name}: no {} {kind} file in {} (looked for {})",
                part.stem(),
                dir.display(),
                c.iter()
                    .map(|p| p
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    };
    let ip = find("images", 3)?;
    let lp = find("labels", 1)?;
    from_idx(
        &format!("{name}/{} ({})", part.stem(), dir.display()),
        idx::read(&ip)?,
        idx::read(&lp)?,
    )
}

/// Where Debian's `dataset-fashion-mnist` installs its files.
pub const FASHION_DIR: &str = "/usr/share/datasets/fashion-mnist";
