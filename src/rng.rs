//! The seeded random source of flowlab.
//!
//! candle's CPU backend cannot be seeded, so every random tensor (parameter init,
//! dequantization noise, sampling, shuffling) is drawn here on the host from a
//! [`StdRng`] and then moved to the target device. Same seed → same numbers.

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use crate::Result;

/// A seeded random number generator producing candle tensors.
#[derive(Debug, Clone)]
pub struct Rng {
    inner: StdRng,
}

impl Rng {
    /// A generator whose stream depends only on `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            inner: StdRng::seed_from_u64(seed),
        }
    }

    /// A generator seeded from the operating system (for ad-hoc, non-reproducible use).
    pub fn from_entropy() -> Self {
        Self {
            inner: StdRng::from_os_rng(),
        }
    }

    /// A child generator for an independent stream (e.g. one per epoch).
    pub fn fork(&mut self) -> Self {
        Self::new(self.inner.random())
    }

    /// A uniform `u64` (for deriving seeds).
    pub fn next_u64(&mut self) -> u64 {
        self.inner.random()
    }

    /// `n` samples of U[lo, hi) as f64.
    pub fn uniform_vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.inner.random_range(lo..hi)).collect()
    }

    /// `n` samples of N(0, std²) as f64.
    pub fn normal_vec(&mut self, n: usize, std: f64) -> Vec<f64> {
        (0..n)
            .map(|_| {
                let e: f64 = StandardNormal.sample(&mut self.inner);
                e * std
            })
            .collect()
    }

    /// A tensor of U[lo, hi) values.
    pub fn uniform(
        &mut self,
        shape: &[usize],
        lo: f64,
        hi: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let n = shape.iter().product();
        host_tensor(self.uniform_vec(n, lo, hi), shape, dtype, device)
    }

    /// A tensor of N(0, std²) values.
    pub fn normal(
        &mut self,
        shape: &[usize],
        std: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let n = shape.iter().product();
        host_tensor(self.normal_vec(n, std), shape, dtype, device)
    }

    /// A uniformly random permutation of `0..n` (Fisher–Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.inner.random_range(0..=i);
            p.swap(i, j);
        }
        p
    }
}

/// Builds a tensor of `dtype` on `device` from host f64 values.
pub fn host_tensor(v: Vec<f64>, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_different_seed_different_stream() {
        let a = Rng::new(7).normal_vec(16, 1.0);
        let b = Rng::new(7).normal_vec(16, 1.0);
        let c = Rng::new(8).normal_vec(16, 1.0);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = Rng::new(1).permutation(100);
        assert_ne!(p, (0..100).collect::<Vec<_>>());
        p.sort();
        assert_eq!(p, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn uniform_in_range_and_normal_moments() {
        let mut r = Rng::new(3);
        let u = r.uniform_vec(10_000, 0.0, 1.0);
        assert!(u.iter().all(|&x| (0.0..1.0).contains(&x)));
        let n = r.normal_vec(20_000, 2.0);
        let mean = n.iter().sum::<f64>() / n.len() as f64;
        let var = n.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((var - 4.0).abs() < 0.15, "var {var}");
    }
}
