//! An in-memory image dataset of uint8 `[N, C, H, W]` images with optional labels, and the
//! operations experiments need: deterministic splits, subsets, class filters, downscaling.

use crate::rng::Rng;
use crate::{Error, Result};

/// Images `[N, C, H, W]` as bytes, with one label per image (empty if unlabelled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// Human-readable origin (e.g. `mnist/train (embedded)`).
    pub name: String,
    /// `[C, H, W]`.
    pub shape: [usize; 3],
    /// N·C·H·W bytes, row-major.
    pub images: Vec<u8>,
    /// N labels, or empty.
    pub labels: Vec<u32>,
}

impl Dataset {
    /// Validates that the byte and label counts fit the shape.
    pub fn new(
        name: impl Into<String>,
        shape: [usize; 3],
        images: Vec<u8>,
        labels: Vec<u32>,
    ) -> Result<Self> {
        let name = name.into();
        let per: usize = shape.iter().product();
        if per == 0 || !images.len().is_multiple_of(per) {
            return Err(Error::Data(format!(
                "{name}: {} bytes is not a whole number of {shape:?} images",
                images.len()
            )));
        }
        let n = images.len() / per;
        if !labels.is_empty() && labels.len() != n {
            return Err(Error::Data(format!(
                "{name}: {n} images but {} labels",
                labels.len()
            )));
        }
        Ok(Self {
            name,
            shape,
            images,
            labels,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.len() / self.image_size()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// C·H·W.
    pub fn image_size(&self) -> usize {
        self.shape.iter().product()
    }

    /// The bytes of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let s = self.image_size();
        &self.images[i * s..(i + 1) * s]
    }

    /// The images at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Dataset {
        let mut images = Vec::with_capacity(idx.len() * self.image_size());
        for &i in idx {
            images.extend_from_slice(self.image(i));
        }
        let labels = if self.labels.is_empty() {
            Vec::new()
        } else {
            idx.iter().map(|&i| self.labels[i]).collect()
        };
        Dataset {
            name: self.name.clone(),
            shape: self.shape,
            images,
            labels,
        }
    }

    /// Deterministic split into (train, val) with `val` images held out, chosen by a
    /// permutation drawn from `seed`. Both parts keep their original relative order.
    pub fn split(&self, val: usize, seed: u64) -> Result<(Dataset, Dataset)> {
        let n = self.len();
        if val >= n {
            return Err(Error::Data(format!(
                "{}: cannot hold out {val} validation images from {n}",
                self.name
            )));
        }
        let perm = Rng::new(seed).permutation(n);
        let mut val_idx = perm[..val].to_vec();
        let mut train_idx = perm[val..].to_vec();
        val_idx.sort_unstable();
        train_idx.sort_unstable();
        Ok((self.select(&train_idx), self.select(&val_idx)))
    }

    /// The first `n` images of a seeded shuffle (all if `n ≥ len`).
    pub fn subset(&self, n: usize, seed: u64) -> Dataset {
        if n >= self.len() {
            return self.clone();
        }
        let mut idx = Rng::new(seed).permutation(self.len())[..n].to_vec();
        idx.sort_unstable();
        self.select(&idx)
    }

    /// Only images whose label is in `classes`.
    pub fn filter_classes(&self, classes: &[u32]) -> Result<Dataset> {
        if self.labels.is_empty() {
            return Err(Error::Data(format!(
                "{}: has no labels to filter classes by",
                self.name
            )));
        }
        let missing: Vec<u32> = classes
            .iter()
            .copied()
            .filter(|c| !self.labels.contains(c))
            .collect();
        if !missing.is_empty() {
            let mut present = self.labels.clone();
            present.sort_unstable();
            present.dedup();
            return Err(Error::Data(format!(
                "{}: no images of class {missing:?}; its classes are {present:?}",
                self.name
            )));
        }
        let idx: Vec<usize> = (0..self.len())
            .filter(|&i| classes.contains(&self.labels[i]))
            .collect();
        Ok(self.select(&idx))
    }

    /// Average-pools by `factor` × `factor` blocks, rounding half up (28×28 → 14×14 for 2).
    pub fn downscale(&self, factor: usize) -> Result<Dataset> {
        let [c, h, w] = self.shape;
        if factor == 0 || h % factor != 0 || w % factor != 0 {
            return Err(Error::Data(format!(
                "{}: cannot downscale {h}×{w} by {factor} (must divide both sides)",
                self.name
            )));
        }
        if factor == 1 {
            return Ok(self.clone());
        }
        let (ho, wo) = (h / factor, w / factor);
        let area = (factor * factor) as u32;
        let mut images = Vec::with_capacity(self.len() * c * ho * wo);
        for i in 0..self.len() {
            let img = self.image(i);
            for ch in 0..c {
                for y in 0..ho {
                    for x in 0..wo {
                        let mut s = 0u32;
                        for dy in 0..factor {
                            let row = ch * h * w + (y * factor + dy) * w + x * factor;
                            s += img[row..row + factor]
                                .iter()
                                .map(|&v| v as u32)
                                .sum::<u32>();
                        }
                        images.push(((s + area / 2) / area) as u8);
                    }
                }
            }
        }
        Ok(Dataset {
            name: format!("{} (downscaled ×{factor})", self.name),
            shape: [c, ho, wo],
            images,
            labels: self.labels.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(n: usize) -> Dataset {
        let images = (0..n * 4).map(|v| (v % 256) as u8).collect();
        Dataset::new(
            "toy",
            [1, 2, 2],
            images,
            (0..n as u32).map(|i| i % 3).collect(),
        )
        .unwrap()
    }

    #[test]
    fn split_is_deterministic_disjoint_and_complete() {
        let d = toy(50);
        let (t1, v1) = d.split(10, 3).unwrap();
        let (t2, v2) = d.split(10, 3).unwrap();
        let (_, v3) = d.split(10, 4).unwrap();
        assert_eq!((t1.len(), v1.len()), (40, 10));
        assert_eq!((&t1, &v1), (&t2, &v2));
        assert_ne!(v1, v3);
        let mut all: Vec<u8> = t1
            .images
            .chunks(4)
            .chain(v1.images.chunks(4))
            .map(|c| c[0])
            .collect();
        all.sort_unstable();
        let mut orig: Vec<u8> = d.images.chunks(4).map(|c| c[0]).collect();
        orig.sort_unstable();
        assert_eq!(all, orig);
        assert!(d.split(50, 0).is_err());
    }

    #[test]
    fn downscale_averages_with_rounding() {
        let d = Dataset::new(
            "d",
            [1, 2, 4],
            vec![0, 1, 10, 10, 1, 1, 10, 11 /* */],
            vec![],
        )
        .unwrap();
        let s = d.downscale(2).unwrap();
        assert_eq!(s.shape, [1, 1, 2]);
        // (0+1+1+1)/4 = 0.75 → 1; (10+10+10+11)/4 = 10.25 → 10.
        assert_eq!(s.images, vec![1, 10]);
        assert!(d.downscale(3).is_err());
    }

    #[test]
    fn bad_sizes_classes_and_subsets() {
        assert!(Dataset::new("x", [1, 2, 2], vec![0; 7], vec![]).is_err());
        let e = Dataset::new("x", [1, 2, 2], vec![0; 8], vec![1])
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 images but 1 labels"), "{e}");
        let d = toy(30);
        let f = d.filter_classes(&[1]).unwrap();
        assert_eq!(f.len(), 10);
        assert!(f.labels.iter().all(|&l| l == 1));
        assert_eq!(d.subset(7, 1).len(), 7);
        assert_eq!(d.subset(7, 1), d.subset(7, 1));
        assert_eq!(d.subset(100, 1).len(), 30);
    }
}
