//! Symmetric positive definite matrices in f64: the eigendecomposition (cyclic Jacobi), and
//! from it square roots and the matrix geometric mean, for the concentration-alignment
//! transform (CAT). Matrices are row-major `n x n` slices; sizes are small (CAT blocks of
//! 64 or 128), so the O(n³) per sweep of Jacobi is cheap and its accuracy (eigenvalues to
//! high relative accuracy for definite matrices) is what matters.
//!
//! [`sym_eigenvalues`] is the spectrum alone of a large matrix (the alignment bound of a
//! whole layer, order 576 and more): Householder reduction to tridiagonal form, then the
//! implicit QL iteration, `4/3 n³` operations instead of Jacobi's ~`10 · 4 n³`.

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

/// The eigenvalues of a symmetric matrix (only its upper triangle is read), ascending.
///
/// Householder reduction: step `k` reflects the column below the diagonal of the trailing
/// block onto `±‖x‖ e₁` with `H = I - 2 v vᵀ`; with `p = A v` and `q = p - (vᵀ p) v`,
/// `H A H = A - 2 (v qᵀ + q vᵀ)`, a rank-2 update of rows (row-major friendly). The
/// tridiagonal matrix then has `d` on its diagonal and `e` beside it, and shares the
/// spectrum. Its eigenvalues come from QL sweeps with Wilkinson's shift, deflating where an
/// off-diagonal entry falls below round-off of its neighbours (quadratic, in practice
/// cubic, convergence; at most 60 sweeps per eigenvalue).
pub fn sym_eigenvalues(a: &[f64], n: usize) -> Vec<f64> {
    assert_eq!(a.len(), n * n, "an n x n matrix");
    let mut m = a.to_vec();
    for i in 0..n {
        for j in 0..i {
            m[i * n + j] = m[j * n + i];
        }
    }
    let mut d = vec![0f64; n];
    let mut e = vec![0f64; n];
    let (mut v, mut p) = (vec![0f64; n], vec![0f64; n]);
    for k in 0..n.saturating_sub(1) {
        let r = k + 1;
        let norm = (r..n).map(|i| m[i * n + k].powi(2)).sum::<f64>().sqrt();
        d[k] = m[k * n + k];
        let x0 = m[r * n + k];
        let alpha = if x0 > 0.0 { -norm } else { norm };
        e[k] = alpha;
        // v = (x - alpha e1) / |x - alpha e1|; nothing to do for a zero column.
        for i in r..n {
            v[i] = m[i * n + k];
        }
        v[r] -= alpha;
        let vn = (r..n).map(|i| v[i] * v[i]).sum::<f64>().sqrt();
        if vn == 0.0 || norm == 0.0 {
            e[k] = x0;
            continue;
        }
        for x in &mut v[r..n] {
            *x /= vn;
        }
        for i in r..n {
            let row = &m[i * n + r..i * n + n];
            p[i] = row.iter().zip(&v[r..n]).map(|(a, b)| a * b).sum();
        }
        let kk: f64 = (r..n).map(|i| v[i] * p[i]).sum();
        for i in r..n {
            p[i] -= kk * v[i];
        }
        for i in r..n {
            let (vi, qi) = (2.0 * v[i], 2.0 * p[i]);
            let row = &mut m[i * n + r..i * n + n];
            for ((a, &vj), &qj) in row.iter_mut().zip(&v[r..n]).zip(&p[r..n]) {
                *a -= vi * qj + qi * vj;
            }
        }
    }
    if n > 0 {
        d[n - 1] = m[(n - 1) * n + n - 1];
    }
    tridiagonal_eigenvalues(&mut d, &mut e);
    d.sort_by(f64::total_cmp);
    d
}

/// The eigenvalues of the symmetric tridiagonal matrix with diagonal `d` and off-diagonal
/// `e` (`e[i]` couples `i` and `i + 1`; `e[n - 1]` is ignored), into `d`: implicit QL.
fn tridiagonal_eigenvalues(d: &mut [f64], e: &mut [f64]) {
    let n = d.len();
    if n == 0 {
        return;
    }
    e[n - 1] = 0.0;
    for l in 0..n {
        for _ in 0..60 {
            // The first negligible coupling at or after l bounds the unreduced block.
            let mut m = l;
            while m + 1 < n {
                let scale = d[m].abs() + d[m + 1].abs();
                if e[m].abs() <= f64::EPSILON * scale {
                    break;
                }
                m += 1;
            }
            if m == l {
                break;
            }
            // Wilkinson's shift from the leading 2 x 2 block.
            let g = (d[l + 1] - d[l]) / (2.0 * e[l]);
            let r = g.hypot(1.0);
            let mut g = d[m] - d[l] + e[l] / (g + r.copysign(g));
            let (mut s, mut c, mut p) = (1.0f64, 1.0f64, 0.0f64);
            let mut deflated = false;
            for i in (l..m).rev() {
                let f = s * e[i];
                let b = c * e[i];
                let r = f.hypot(g);
                e[i + 1] = r;
                if r == 0.0 {
                    // An exact zero coupling splits the block: start over from it.
                    d[i + 1] -= p;
                    e[m] = 0.0;
                    deflated = true;
                    break;
                }
                s = f / r;
                c = g / r;
                let g2 = d[i + 1] - p;
                let r2 = (d[i] - g2) * s + 2.0 * c * b;
                p = s * r2;
                d[i + 1] = g2 + p;
                g = c * r2 - b;
            }
            if deflated {
                continue;
            }
            d[l] -= p;
            e[l] = g;
            e[m] = 0.0;
        }
    }
}

/// `X` with `A X = B`, `A` symmetric positive definite (`n x n`, lower triangle read) and
/// `B` `n x m`, both row-major: Cholesky `A = L Lᵀ`, then `L Y = B` and `Lᵀ X = Y` by
/// substitution. A pivot that is not positive is [`QuantError::Singular`].
pub fn solve_definite(a: &[f64], n: usize, b: &[f64], m: usize) -> Result<Vec<f64>, QuantError> {
    assert_eq!(a.len(), n * n, "an n x n matrix");
    assert_eq!(b.len(), n * m, "an n x m right-hand side");
    let mut l = a.to_vec();
    crate::linalg::cholesky_lower(&mut l, n).map_err(|j| {
        QuantError::Singular(format!("the matrix is not positive definite (pivot {j})"))
    })?;
    let mut x = b.to_vec();
    for i in 0..n {
        for k in 0..i {
            let f = l[i * n + k];
            for c in 0..m {
                x[i * m + c] -= f * x[k * m + c];
            }
        }
        let d = l[i * n + i];
        for c in 0..m {
            x[i * m + c] /= d;
        }
    }
    for i in (0..n).rev() {
        for k in i + 1..n {
            let f = l[k * n + i];
            for c in 0..m {
                x[i * m + c] -= f * x[k * m + c];
            }
        }
        let d = l[i * n + i];
        for c in 0..m {
            x[i * m + c] /= d;
        }
    }
    Ok(x)
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

    /// The tridiagonal route gives Jacobi's spectrum: definite, indefinite (a shifted
    /// matrix), singular (a repeated row) and diagonal inputs, odd and tiny orders.
    #[test]
    fn eigenvalues_agree_with_jacobi() {
        for n in [0usize, 1, 2, 3, 7, 33, 64] {
            let mut cases = vec![spd(n, 7 + n as u64)];
            let mut shifted = spd(n, 9);
            for i in 0..n {
                shifted[i * n + i] -= 0.5 * shifted[i * n + i];
            }
            cases.push(shifted);
            if n > 2 {
                let mut singular = spd(n, 3);
                for j in 0..n {
                    singular[n + j] = singular[j];
                }
                for i in 0..n {
                    singular[i * n + 1] = singular[i * n];
                }
                singular[n + 1] = singular[0];
                cases.push(singular);
            }
            cases.push(
                (0..n * n)
                    .map(|k| if k / n == k % n { (k % 5) as f64 } else { 0.0 })
                    .collect(),
            );
            for a in cases {
                let got = sym_eigenvalues(&a, n);
                let mut want = sym_eigen(&a, n).values;
                want.sort_by(f64::total_cmp);
                let scale = want.iter().fold(1e-300f64, |m, v| m.max(v.abs()));
                assert_eq!(got.len(), n);
                assert!(
                    max_diff(&got, &want) < 1e-11 * scale,
                    "n = {n}: {got:?} vs {want:?}"
                );
            }
        }
    }

    /// `A X = B` for a definite `A`; a singular one is an error.
    #[test]
    fn solve_definite_solves() {
        let n = 9;
        let a = spd(n, 4);
        let b: Vec<f64> = (0..n * 3).map(|k| (k as f64 * 0.37).sin()).collect();
        let x = solve_definite(&a, n, &b, 3).unwrap();
        for i in 0..n {
            for c in 0..3 {
                let ax: f64 = (0..n).map(|k| a[i * n + k] * x[k * 3 + c]).sum();
                assert!(
                    (ax - b[i * 3 + c]).abs() < 1e-10,
                    "{ax} vs {}",
                    b[i * 3 + c]
                );
            }
        }
        let mut s = a.clone();
        for i in 0..n {
            s[i * n + 2] = 0.0;
            s[2 * n + i] = 0.0;
        }
        assert!(solve_definite(&s, n, &b, 3).is_err());
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
