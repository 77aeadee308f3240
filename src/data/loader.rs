//! Batches for training and evaluation.
//!
//! The dataset is uploaded once as a uint8 tensor `[N, C, H, W]` on the target device;
//! each batch is an `index_select` of it, converted to the model's float dtype (integer
//! values 0..=255). Nothing is re-copied per epoch.

use candle_core::{DType, Device, Tensor};

use super::Dataset;
use crate::rng::Rng;
use crate::Result;

/// A dataset resident on a device, cut into batches.
#[derive(Debug, Clone)]
pub struct Loader {
    images: Tensor,
    labels: Option<Tensor>,
    len: usize,
    batch_size: usize,
    dtype: DType,
}

impl Loader {
    /// Uploads `data` to `device`; batches come out as `dtype`.
    pub fn new(data: &Dataset, batch_size: usize, dtype: DType, device: &Device) -> Result<Self> {
        let [c, h, w] = data.shape;
        let images = Tensor::from_slice(&data.images, (data.len(), c, h, w), device)?;
        let labels = if data.labels.is_empty() {
            None
        } else {
            Some(Tensor::from_slice(&data.labels, data.len(), device)?)
        };
        Ok(Self {
            images,
            labels,
            len: data.len(),
            batch_size: batch_size.max(1),
            dtype,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The images (and labels, if any) at `idx`.
    pub fn batch(&self, idx: &[usize]) -> Result<(Tensor, Option<Tensor>)> {
        let ids: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
        let ids = Tensor::from_vec(ids, idx.len(), self.images.device())?;
        let x = self.images.index_select(&ids, 0)?.to_dtype(self.dtype)?;
        let y = self
            .labels
            .as_ref()
            .map(|l| l.index_select(&ids, 0))
            .transpose()?;
        Ok((x, y))
    }

    /// One epoch of shuffled index batches (the last, partial batch dropped so every
    /// step sees the same batch size).
    pub fn shuffled_epoch(&self, rng: &mut Rng) -> Vec<Vec<usize>> {
        let perm = rng.permutation(self.len);
        perm.chunks(self.batch_size)
            .filter(|c| c.len() == self.batch_size || self.len < self.batch_size)
            .map(|c| c.to_vec())
            .collect()
    }

    /// Index batches in order, covering every image once (for evaluation).
    pub fn ordered(&self) -> Vec<Vec<usize>> {
        (0..self.len)
            .collect::<Vec<_>>()
            .chunks(self.batch_size)
            .map(|c| c.to_vec())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_the_data_and_shuffle_deterministically() {
        let d = Dataset::new("t", [1, 1, 2], (0..20).collect(), (0..10).collect()).unwrap();
        let l = Loader::new(&d, 3, DType::F32, &Device::Cpu).unwrap();
        let e1 = l.shuffled_epoch(&mut Rng::new(1));
        assert_eq!(e1.len(), 3);
        assert_eq!(e1, l.shuffled_epoch(&mut Rng::new(1)));
        let all: usize = l.ordered().iter().map(|b| b.len()).sum();
        assert_eq!(all, 10);
        let (x, y) = l.batch(&[4, 0]).unwrap();
        assert_eq!(x.dims(), &[2, 1, 1, 2]);
        assert_eq!(
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![8., 9., 0., 1.]
        );
        assert_eq!(y.unwrap().to_vec1::<u32>().unwrap(), vec![4, 0]);
    }
}
