//! Symmetric positive definite matrices in f64: the eigendecomposition (cyclic Jacobi), and
//! from it square roots and the matrix geometric mean, for the concentration-alignment
//! transform (CAT). Matrices are row-major `n x n` slices; sizes are small (CAT blocks of
//! 64 or 128), so the O(n³) per sweep of Jacobi is cheap and its accuracy (eigenvalues to
//! high relative accuracy for definite matrices) is what matters.

use crate::error::QuantError;

/// Eigenvalues and eigenvectors of a symmetric matrix: `A = V diag(λ) Vᵀ`, `V` row-major
/// with eigenvector `i` in column `i`.
#[derive(Clone, Debug)]
pub struct SymEigen {
    pub n: usize,
    pub values: Vec<f64>,
    pub vectors: Vec<f64>,
}

/// Cyclic Jacobi: sweeps of plane rotations zeroing each off-diagonal entry until the
/// off-diagonal mass is below `1e-15` of the whole (at most 60 sweeps; definite matrices
/// of order 64 need about 8). `a` must be symmetric (only its upper triangle is trusted:
/// the lower one is mirrored from it).
pub fn sym_eigen(a: &[f64], n: usize) -> SymEigen {
    assert_eq!(a.len(), n * n, "an n x n matrix");
    let mut m = a.to_vec();
    for i in 0..n {
        for j in 0..i {
            m[i * n + j] = m[j * n + i];
        }
    }
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let total: f64 = m.iter().map(|x| x * x).sum();
    for _ in 0..60 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| m[i * n + j] * m[i * n + j])
            .sum();
        if off <= 1e-30 * total.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let (app, aqq) = (m[p * n + p], m[q * n + q]);
                // The rotation angle: tan(2θ) = 2 a_pq / (a_qq - a_pp), the smaller root.
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // A ← Jᵀ A J on rows and columns p, q.
                for k in 0..n {
                    let (akp, akq) = (m[k * n + p], m[k * n + q]);
                    m[k * n + p] = c * akp - s * akq;
                    m[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (m[p * n + k], m[q * n + k]);
                    m[p * n + k] = c * apk - s * aqk;
                    m[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    SymEigen {
        n,
        values: (0..n).map(|i| m[i * n + i]).collect(),
        vectors: v,
    }
}

impl SymEigen {
    /// `V diag(f(λ)) Vᵀ`.
    pub fn map(&self, f: impl Fn(f64) -> f64) -> Vec<f64> {
        let n = self.n;
        let fv: Vec<f64> = self.values.iter().map(|&l| f(l)).collect();
        let mut out = vec![0f64; n * n];
        for i in 0..n {
            for j in i..n {
                let s: f64 = (0..n)
                    .map(|k| self.vectors[i * n + k] * fv[k] * self.vectors[j * n + k])
                    .sum();
                out[i * n + j] = s;
                out[j * n + i] = s;
            }
        }
        out
    }
}

/// `a · b` for row-major `n x n` matrices.
pub fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut out = vec![0f64; n * n];
    for i in 0..n {
        for k in 0..n {
            let aik = a[i * n + k];
            if aik == 0.0 {
                continue;
            }
            for j in 0..n {
                out[i * n + j] += aik * b[k * n + j];
            }
        }
    }
    out
}

/// The eigendecomposition of a definite matrix, or which way it is not: the smallest
/// eigenvalue against the largest.
fn definite(a: &[f64], n: usize, what: &str) -> Result<SymEigen, QuantError> {
    let e = sym_eigen(a, n);
    let max = e.values.iter().fold(0f64, |m, &v| m.max(v.abs()));
    let min = e.values.iter().fold(f64::INFINITY, |m, &v| m.min(v));
    if min.is_nan() || min <= 1e-12 * max || !max.is_finite() {
        return Err(QuantError::Singular(format!(
            "{what} is not positive definite (eigenvalues {min:.3e} .. {max:.3e})"
        )));
    }
    Ok(e)
}

/// `A + λ mean(diag A) I`: the damping that keeps a sample covariance definite.
pub fn damped(a: &[f64], n: usize, lambda: f64) -> Vec<f64> {
    let mean = (0..n).map(|i| a[i * n + i]).sum::<f64>() / n.max(1) as f64;
    let mut out = a.to_vec();
    for i in 0..n {
        out[i * n + i] += lambda * mean;
    }
    out
}

/// The matrix geometric mean `A⁻¹ # B = A^{-1/2} (A^{1/2} B A^{1/2})^{1/2} A^{-1/2}`: the
/// definite `G` with `G A G = B`. With `M = G^{1/2}` (what this returns as its second
/// value), `M A M = M⁻¹ B M⁻¹`: the input covariance `A` and the weight Gram `B`
/// transformed by `x ↦ M x`, `W ↦ W M⁻¹` are equal, the alignment-optimal point of CAT.
/// Returns `(M, M⁻¹)`.
pub fn alignment_transform(
    a: &[f64],
    b: &[f64],
    n: usize,
) -> Result<(Vec<f64>, Vec<f64>), QuantError> {
    let ea = definite(a, n, "the input covariance block")?;
    definite(b, n, "the weight Gram block")?;
    let a_half = ea.map(f64::sqrt);
    let a_mhalf = ea.map(|l| 1.0 / l.sqrt());
    let inner = matmul(&matmul(&a_half, b, n), &a_half, n);
    let inner_half = definite(&inner, n, "A^1/2 B A^1/2")?.map(f64::sqrt);
    let g = matmul(&matmul(&a_mhalf, &inner_half, n), &a_mhalf, n);
    let eg = definite(&g, n, "the geometric mean")?;
    Ok((eg.map(f64::sqrt), eg.map(|l| 1.0 / l.sqrt())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic definite matrix `X Xᵀ / n + 0.1 I` with uneven scales.
    fn spd(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let x: Vec<f64> = (0..n * n)
            .map(|k| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                u * (1.0 + 10.0 * ((k % n) == 3) as i32 as f64)
            })
            .collect();
        let mut a = matmul(&x, &transpose(&x, n), n);
        for i in 0..n {
            a[i * n + i] += 0.1;
        }
        a
    }

    fn transpose(a: &[f64], n: usize) -> Vec<f64> {
        (0..n * n).map(|k| a[(k % n) * n + k / n]).collect()
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()))
    }

    #[test]
    fn eigen_reconstructs_and_is_orthogonal() {
        for n in [1, 2, 5, 64] {
            let a = spd(n, n as u64);
            let e = sym_eigen(&a, n);
            let scale = a.iter().fold(0f64, |m, v| m.max(v.abs()));
            assert!(max_diff(&e.map(|l| l), &a) < 1e-12 * scale, "n = {n}");
            let vtv = matmul(&transpose(&e.vectors, n), &e.vectors, n);
            let eye: Vec<f64> = (0..n * n).map(|k| (k / n == k % n) as i32 as f64).collect();
            assert!(max_diff(&vtv, &eye) < 1e-12, "n = {n}");
        }
    }

    /// `M A M = M⁻¹ B M⁻¹`, and `M M⁻¹ = I`.
    #[test]
    fn alignment_transform_equalizes_the_two_sides() {
        let n = 16;
        let (a, b) = (spd(n, 1), spd(n, 2));
        let (m, mi) = alignment_transform(&a, &b, n).unwrap();
        let left = matmul(&matmul(&m, &a, n), &m, n);
        let right = matmul(&matmul(&mi, &b, n), &mi, n);
        let scale = left.iter().fold(0f64, |x, v| x.max(v.abs()));
        assert!(max_diff(&left, &right) < 1e-9 * scale);
        let eye: Vec<f64> = (0..n * n).map(|k| (k / n == k % n) as i32 as f64).collect();
        assert!(max_diff(&matmul(&m, &mi, n), &eye) < 1e-9);
        // A singular block is refused with a reason; damping makes it definite.
        let mut s = a.clone();
        for i in 0..n {
            s[i * n + 3] = 0.0;
            s[3 * n + i] = 0.0;
        }
        let e = alignment_transform(&s, &b, n).unwrap_err().to_string();
        assert!(
            e.contains("input covariance") && e.contains("not positive definite"),
            "{e}"
        );
        assert!(alignment_transform(&damped(&s, n, 1e-2), &b, n).is_ok());
    }
}
