//! Small dense linear algebra on the host in f64.
//!
//! candle has no LU, inverse or determinant. Flows only need them for C×C matrices
//! (C ≤ a few hundred) and for brute-force Jacobians in tests, so a straightforward
//! partial-pivoting LU in f64 is exact enough and fast.
//!
//! Matrices are row-major `Vec<f64>` of `n * n` values.

use crate::rng::Rng;
use crate::{Error, Result};

/// LU decomposition with partial pivoting: `P·A = L·U`, stored packed.
#[derive(Debug, Clone)]
pub struct Lu {
    n: usize,
    /// Packed factors: strictly-lower part is L (unit diagonal implied), upper part is U.
    lu: Vec<f64>,
    /// `perm[i]` = row of A that ended up in row i of P·A.
    perm: Vec<usize>,
    /// +1 or −1: the sign of the permutation.
    perm_sign: f64,
}

impl Lu {
    /// Factorises the `n × n` row-major matrix `a`. Fails on a non-square input; a singular
    /// matrix factorises but has a zero pivot (see [`Lu::log_abs_det`]).
    pub fn new(a: &[f64], n: usize) -> Result<Self> {
        if a.len() != n * n {
            return Err(Error::Linalg(format!(
                "expected {n}×{n} = {} values, got {}",
                n * n,
                a.len()
            )));
        }
        let mut lu = a.to_vec();
        let mut perm: Vec<usize> = (0..n).collect();
        let mut perm_sign = 1.0;
        for k in 0..n {
            let (p, _) = (k..n)
                .map(|i| (i, lu[i * n + k].abs()))
                .fold(
                    (k, -1.0),
                    |best, cur| if cur.1 > best.1 { cur } else { best },
                );
            if p != k {
                for j in 0..n {
                    lu.swap(k * n + j, p * n + j);
                }
                perm.swap(k, p);
                perm_sign = -perm_sign;
            }
            let pivot = lu[k * n + k];
            if pivot == 0.0 {
                continue;
            }
            for i in k + 1..n {
                let f = lu[i * n + k] / pivot;
                lu[i * n + k] = f;
                if f != 0.0 {
                    for j in k + 1..n {
                        lu[i * n + j] -= f * lu[k * n + j];
                    }
                }
            }
        }
        Ok(Self {
            n,
            lu,
            perm,
            perm_sign,
        })
    }

    /// Dimension n.
    pub fn n(&self) -> usize {
        self.n
    }

    /// (sign, log|det A|); sign is 0 and the log −∞ for a singular matrix.
    pub fn sign_log_abs_det(&self) -> (f64, f64) {
        let mut sign = self.perm_sign;
        let mut log = 0.0;
        for i in 0..self.n {
            let d = self.lu[i * self.n + i];
            if d == 0.0 {
                return (0.0, f64::NEG_INFINITY);
            }
            sign *= d.signum();
            log += d.abs().ln();
        }
        (sign, log)
    }

    /// log|det A|.
    pub fn log_abs_det(&self) -> f64 {
        self.sign_log_abs_det().1
    }

    /// Solves A·x = b.
    pub fn solve(&self, b: &[f64]) -> Result<Vec<f64>> {
        let n = self.n;
        if b.len() != n {
            return Err(Error::Linalg(format!(
                "rhs has {} values, expected {n}",
                b.len()
            )));
        }
        let mut y: Vec<f64> = self.perm.iter().map(|&p| b[p]).collect();
        for i in 0..n {
            for j in 0..i {
                y[i] -= self.lu[i * n + j] * y[j];
            }
        }
        for i in (0..n).rev() {
            for j in i + 1..n {
                y[i] -= self.lu[i * n + j] * y[j];
            }
            let d = self.lu[i * n + i];
            if d == 0.0 {
                return Err(Error::Linalg("matrix is singular".into()));
            }
            y[i] /= d;
        }
        Ok(y)
    }

    /// A⁻¹ (row-major).
    pub fn inverse(&self) -> Result<Vec<f64>> {
        let n = self.n;
        let mut inv = vec![0.0; n * n];
        let mut e = vec![0.0; n];
        for j in 0..n {
            e.iter_mut().for_each(|v| *v = 0.0);
            e[j] = 1.0;
            let col = self.solve(&e)?;
            for i in 0..n {
                inv[i * n + j] = col[i];
            }
        }
        Ok(inv)
    }

    /// The factors as separate dense matrices `(P, L, U)` with `A = P·L·U`
    /// (P a permutation matrix, L unit lower triangular, U upper triangular).
    pub fn factors(&self) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let n = self.n;
        let mut p = vec![0.0; n * n];
        // P·A = L·U with rows permuted by `perm`, hence A = Pᵀ·L·U; return that Pᵀ.
        for (i, &r) in self.perm.iter().enumerate() {
            p[r * n + i] = 1.0;
        }
        let mut l = vec![0.0; n * n];
        let mut u = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                let v = self.lu[i * n + j];
                match i.cmp(&j) {
                    std::cmp::Ordering::Greater => l[i * n + j] = v,
                    std::cmp::Ordering::Equal => {
                        l[i * n + j] = 1.0;
                        u[i * n + j] = v;
                    }
                    std::cmp::Ordering::Less => u[i * n + j] = v,
                }
            }
        }
        (p, l, u)
    }
}

/// Row-major product of two `n × n` matrices.
pub fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut c = vec![0.0; n * n];
    for i in 0..n {
        for k in 0..n {
            let aik = a[i * n + k];
            if aik == 0.0 {
                continue;
            }
            for j in 0..n {
                c[i * n + j] += aik * b[k * n + j];
            }
        }
    }
    c
}

/// Transpose of a row-major `n × n` matrix.
pub fn transpose(a: &[f64], n: usize) -> Vec<f64> {
    let mut t = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            t[j * n + i] = a[i * n + j];
        }
    }
    t
}

/// A random orthogonal `n × n` matrix: QR (modified Gram–Schmidt) of a Gaussian matrix,
/// with column signs fixed so the distribution is uniform (Haar).
pub fn random_orthogonal(n: usize, rng: &mut Rng) -> Vec<f64> {
    loop {
        let a = rng.normal_vec(n * n, 1.0);
        if let Some(q) = gram_schmidt(&a, n) {
            return q;
        }
    }
}

/// Orthonormalises the columns of `a`; `None` if they are (numerically) dependent.
fn gram_schmidt(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut q = a.to_vec();
    for j in 0..n {
        for k in 0..j {
            let dot: f64 = (0..n).map(|i| q[i * n + j] * q[i * n + k]).sum();
            for i in 0..n {
                q[i * n + j] -= dot * q[i * n + k];
            }
        }
        let norm: f64 = (0..n).map(|i| q[i * n + j].powi(2)).sum::<f64>().sqrt();
        if norm < 1e-8 {
            return None;
        }
        for i in 0..n {
            q[i * n + j] /= norm;
        }
    }
    Some(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() < tol)
    }

    fn eye(n: usize) -> Vec<f64> {
        let mut e = vec![0.0; n * n];
        (0..n).for_each(|i| e[i * n + i] = 1.0);
        e
    }

    #[test]
    fn det_of_known_matrices() {
        // det [[0, 2], [3, 4]] = -6 (needs a pivot swap).
        let lu = Lu::new(&[0.0, 2.0, 3.0, 4.0], 2).unwrap();
        let (s, l) = lu.sign_log_abs_det();
        assert_eq!(s, -1.0);
        assert!((l - 6f64.ln()).abs() < 1e-12);
        // Triangular: product of the diagonal.
        let a = [2.0, 1.0, 5.0, 0.0, -3.0, 4.0, 0.0, 0.0, 0.5];
        let (s, l) = Lu::new(&a, 3).unwrap().sign_log_abs_det();
        assert_eq!(s, -1.0);
        assert!((l - 3f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn singular_matrix_has_zero_det_and_no_inverse() {
        let lu = Lu::new(&[1.0, 2.0, 2.0, 4.0], 2).unwrap();
        assert_eq!(lu.sign_log_abs_det().0, 0.0);
        assert!(lu.inverse().is_err());
        assert!(Lu::new(&[1.0, 2.0, 3.0], 2).is_err());
    }

    #[test]
    fn inverse_and_factors_reconstruct() {
        let mut rng = Rng::new(0);
        for n in [1, 2, 5, 17] {
            let a = rng.normal_vec(n * n, 1.0);
            let lu = Lu::new(&a, n).unwrap();
            let inv = lu.inverse().unwrap();
            assert!(close(&matmul(&a, &inv, n), &eye(n), 1e-9));
            let (p, l, u) = lu.factors();
            assert!(close(&matmul(&p, &matmul(&l, &u, n), n), &a, 1e-9));
        }
    }

    #[test]
    fn random_orthogonal_is_orthogonal_with_unit_abs_det() {
        let mut rng = Rng::new(1);
        let q = random_orthogonal(6, &mut rng);
        assert!(close(&matmul(&transpose(&q, 6), &q, 6), &eye(6), 1e-10));
        assert!(Lu::new(&q, 6).unwrap().log_abs_det().abs() < 1e-10);
    }
}
