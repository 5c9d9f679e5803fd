//! Dense linear algebra for GPTQ and its fit to the float output: a checked `gemm` wrapper,
//! a blocked Cholesky factorization and a blocked inverse of a lower-triangular matrix, and
//! from them the upper Cholesky factor of an inverse ([`inverse_upper_factor`]). No LAPACK.
//! f64 for GPTQ; the factorization is generic ([`Real`]) so the well-conditioned ridge of
//! [`crate::InputErrorFit`] runs at f32's rate.
//!
//! Matrices are row-major `n x n` slices. Each parallel step hands every output block to
//! exactly one sequential `gemm` call (`Parallelism::None`) with a partition that depends
//! on `n` only, so results do not depend on the number of threads.

use gemm::Parallelism;
use rayon::prelude::*;

/// Block size of the factorizations (a multiple of gemm's micro-tiles; the unblocked work
/// inside a block is `O(n * NB^2)`).
const NB: usize = 64;

/// The element types: f32 and f64 (`gemm` dispatches on them).
pub(crate) trait Real: num_traits::Float + Send + Sync + 'static {}
impl Real for f32 {}
impl Real for f64 {}

/// Elements spanned by a `rows x cols` view with strides `rs`, `cs`.
fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// A strided read-only operand: element `(i, j)` at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Op<'a, T = f64> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

/// `dst (m x n, row stride dst_rs, unit column stride) = [dst +] beta * lhs (m x k) * rhs
/// (k x n)`; `dst` is read only when `accumulate`. Bounds are checked (a violation is a
/// bug in this crate and panics), then one single-threaded `gemm` call computes it.
#[allow(clippy::too_many_arguments)] // the three operands and the product's scalars
pub(crate) fn gemm_into<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    dst_rs: usize,
    lhs: Op<'_, T>,
    rhs: Op<'_, T>,
    accumulate: bool,
    beta: T,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        span(m, n, dst_rs, 1) <= dst.len(),
        "gemm: dst out of bounds"
    );
    assert!(
        span(m, k, lhs.rs, lhs.cs) <= lhs.data.len(),
        "gemm: lhs out of bounds"
    );
    assert!(
        span(k, n, rhs.rs, rhs.cs) <= rhs.data.len(),
        "gemm: rhs out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_rs).take(m) {
                row[..n].fill(T::zero());
            }
        }
        return;
    }
    // Safety: the three views were checked to lie inside their slices; `dst` is borrowed
    // mutably, so it does not overlap the operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::one(),
            beta,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// In-place Cholesky factorization `A = L L^T` of a symmetric `n x n` matrix: reads the
/// lower triangle of `a` (the diagonal included), writes `L` there; the strict upper
/// triangle is scratch afterwards. Right-looking, blocks of [`NB`]: factor the diagonal
/// block, solve the panel below it against `L11^T` (rows in parallel), then subtract
/// `L21 L21^T` from the trailing lower trapezoid with one `gemm` per block row (in
/// parallel). `Err(j)` names the first pivot that is not positive and finite.
pub(crate) fn cholesky_lower<T: Real>(a: &mut [T], n: usize) -> Result<(), usize> {
    assert_eq!(a.len(), n * n);
    for k0 in (0..n).step_by(NB) {
        let k1 = (k0 + NB).min(n);
        let kb = k1 - k0;
        for j in k0..k1 {
            let d = a[j * n + j];
            if !(d > T::zero() && d.is_finite()) {
                return Err(j);
            }
            let l = d.sqrt();
            a[j * n + j] = l;
            for i in j + 1..k1 {
                a[i * n + j] = a[i * n + j] / l;
            }
            for i in j + 1..k1 {
                let lij = a[i * n + j];
                for c in j + 1..=i {
                    a[i * n + c] = a[i * n + c] - lij * a[c * n + j];
                }
            }
        }
        if k1 == n {
            break;
        }
        // lt[j][l] = L11[l][j]: column j of L11 made contiguous for the panel solve.
        let mut lt = vec![T::zero(); kb * kb];
        for j in 0..kb {
            for l in j..kb {
                lt[j * kb + l] = a[(k0 + l) * n + k0 + j];
            }
        }
        // Panel: x L11^T = a21 per row, column by column (axpy over contiguous memory).
        a[k1 * n..].par_chunks_mut(n).for_each(|row| {
            let x = &mut row[k0..k1];
            for j in 0..kb {
                let v = x[j] / lt[j * kb + j];
                x[j] = v;
                for (xl, &t) in x[j + 1..].iter_mut().zip(&lt[j * kb + j + 1..(j + 1) * kb]) {
                    *xl = *xl - v * t;
                }
            }
        });
        let m = n - k1;
        let mut p = vec![T::zero(); m * kb];
        for (i, dst) in p.chunks_exact_mut(kb).enumerate() {
            dst.copy_from_slice(&a[(k1 + i) * n + k0..][..kb]);
        }
        // Trailing: rows [k1 + r0, k1 + r0 + rows) x columns [k1, k1 + r0 + rows).
        a[k1 * n..]
            .par_chunks_mut(NB * n)
            .enumerate()
            .for_each(|(b, chunk)| {
                let r0 = b * NB;
                let rows = chunk.len() / n;
                let lhs = Op {
                    data: &p[r0 * kb..],
                    rs: kb,
                    cs: 1,
                };
                let rhs = Op {
                    data: &p,
                    rs: 1,
                    cs: kb,
                };
                gemm_into(
                    (rows, r0 + rows, kb),
                    &mut chunk[k1..],
                    n,
                    lhs,
                    rhs,
                    true,
                    -T::one(),
                );
            });
    }
    Ok(())
}

/// Inverse of the `kb x kb` lower-triangular block of `l` at `(o, o)`, by forward
/// substitution, row-major `kb x kb` (zeros above the diagonal).
pub(crate) fn small_lower_inverse<T: Real>(l: &[T], n: usize, o: usize, kb: usize) -> Vec<T> {
    let at = |r: usize, c: usize| l[(o + r) * n + o + c];
    let mut x = vec![T::zero(); kb * kb];
    for c in 0..kb {
        x[c * kb + c] = T::one() / at(c, c);
        for r in c + 1..kb {
            let mut s = T::zero();
            for q in c..r {
                s = s + at(r, q) * x[q * kb + c];
            }
            x[r * kb + c] = -s / at(r, r);
        }
    }
    x
}

/// `f(r, c, v)` for every entry `v = (L^-1)[r][c]`, `c <= r`, of the inverse of the
/// lower-triangular `L` in the lower triangle of `l`. Blocked by columns: the strip of
/// block column `J` is `S_J = L^-1[J.., J]`, built block row by block row,
/// `S_J[I] = -L_II^-1 (L[I, J..I] S_J[J..I])`; strips are independent (in parallel).
pub(crate) fn lower_inverse_each(l: &[f64], n: usize, mut f: impl FnMut(usize, usize, f64)) {
    let nblocks = n.div_ceil(NB);
    let bounds = |b: usize| (b * NB, ((b + 1) * NB).min(n));
    let dinv: Vec<Vec<f64>> = (0..nblocks)
        .into_par_iter()
        .map(|b| {
            let (s, e) = bounds(b);
            small_lower_inverse(l, n, s, e - s)
        })
        .collect();
    let strips: Vec<Vec<f64>> = (0..nblocks)
        .into_par_iter()
        .map(|jb| {
            let (j0, j1) = bounds(jb);
            let w = j1 - j0;
            let mut s = vec![0f64; (n - j0) * w];
            s[..w * w].copy_from_slice(&dinv[jb]);
            let mut t = vec![0f64; NB * w];
            for (ib, dinv_i) in dinv.iter().enumerate().skip(jb + 1) {
                let (i0, i1) = bounds(ib);
                let h = i1 - i0;
                let lhs = Op {
                    data: &l[i0 * n + j0..],
                    rs: n,
                    cs: 1,
                };
                let (done, rest) = s.split_at_mut((i0 - j0) * w);
                let rhs = Op {
                    data: done,
                    rs: w,
                    cs: 1,
                };
                gemm_into((h, w, i0 - j0), &mut t, w, lhs, rhs, false, 1.0);
                let lhs = Op {
                    data: dinv_i,
                    rs: h,
                    cs: 1,
                };
                let rhs = Op {
                    data: &t,
                    rs: w,
                    cs: 1,
                };
                gemm_into((h, w, h), rest, w, lhs, rhs, false, -1.0);
            }
            s
        })
        .collect();
    for (jb, s) in strips.iter().enumerate() {
        let (j0, j1) = bounds(jb);
        let w = j1 - j0;
        for (ri, row) in s.chunks_exact(w).enumerate() {
            let r = j0 + ri;
            for (ci, &v) in row.iter().enumerate() {
                let c = j0 + ci;
                if c <= r {
                    f(r, c, v);
                }
            }
        }
    }
}

/// `L_JJ⁻¹` of each diagonal block `J` of `block` columns of the lower-triangular `l`
/// (`n x n`, row-major; the last block may be narrower), row-major, in parallel.
pub(crate) fn diagonal_block_inverses<T: Real>(l: &[T], n: usize, block: usize) -> Vec<Vec<T>> {
    (0..n.div_ceil(block))
        .into_par_iter()
        .map(|b| {
            let j0 = b * block;
            small_lower_inverse(l, n, j0, block.min(n - j0))
        })
        .collect()
}

/// `Z ← Z (L Lᵀ)⁻¹` for the `rc x n` rows of `z` (row-major), given the lower Cholesky
/// factor `l` (`n x n`, lower triangle read) and its [`diagonal_block_inverses`] of `block`
/// columns: forward `X Lᵀ = Z`, `X_J = (Z_J − X_{<J} L_{J,<J}ᵀ) L_JJ⁻ᵀ`, then backward
/// `Y L = X`, `Y_J = (X_J − Y_{>J} L_{>J,J}) L_JJ⁻¹`, block column by block column with one
/// sequential `gemm` per step (so the result does not depend on the thread count).
pub(crate) fn solve_right_cholesky<T: Real>(
    z: &mut [T],
    rc: usize,
    n: usize,
    l: &[T],
    dinv: &[Vec<T>],
    block: usize,
) {
    fn op<T>(data: &[T], rs: usize, cs: usize) -> Op<'_, T> {
        Op { data, rs, cs }
    }
    let span = |b: usize| (b * block, block.min(n - b * block));
    // `t` (rc x wd, row-major) ← the rc x wd block at the start of `src` (row stride n).
    let copy_block = |t: &mut [T], src: &[T], wd: usize| {
        for (r, row) in t.chunks_exact_mut(wd).take(rc).enumerate() {
            row.copy_from_slice(&src[r * n..r * n + wd]);
        }
    };
    let mut x = vec![T::zero(); rc * n];
    let mut t = vec![T::zero(); rc * block];
    for (b, d) in dinv.iter().enumerate() {
        let (j0, wd) = span(b);
        copy_block(&mut t, &z[j0..], wd);
        if j0 > 0 {
            let (done, lj) = (op(&x[..], n, 1), op(&l[j0 * n..], 1, n));
            gemm_into((rc, wd, j0), &mut t, wd, done, lj, true, -T::one());
        }
        let (tt, d) = (op(&t[..], wd, 1), op(&d[..], 1, wd));
        gemm_into((rc, wd, wd), &mut x[j0..], n, tt, d, false, T::one());
    }
    for b in (0..dinv.len()).rev() {
        let (j0, wd) = span(b);
        let j1 = j0 + wd;
        copy_block(&mut t, &x[j0..], wd);
        if j1 < n {
            let (done, lj) = (op(&z[j1..], n, 1), op(&l[j1 * n + j0..], n, 1));
            gemm_into((rc, wd, n - j1), &mut t, wd, done, lj, true, -T::one());
        }
        let (tt, d) = (op(&t[..], wd, 1), op(&dinv[b][..], wd, 1));
        gemm_into((rc, wd, wd), &mut z[j0..], n, tt, d, false, T::one());
    }
}

/// The upper-triangular `U` with `H^-1 = U^T U` (the upper Cholesky factor of `H^-1`),
/// row-major `n x n`, given `rev[a][b] = H[n-1-a][n-1-b]` (lower triangle read;
/// overwritten).
///
/// Math: with `J` the reversal, `J H J = L L^T` (Cholesky) gives `H = V V^T` with
/// `V = J L J` upper triangular, so `H^-1 = V^-T V^-1 = U^T U` with `U = V^-1 = J L^-1 J`,
/// upper triangular with a positive diagonal: the unique upper Cholesky factor of `H^-1`.
/// One factorization and one triangular inverse (`~2 n^3 / 3` flops), no explicit `H^-1`.
/// `Err(j)`: pivot `j` of the reversed order is not positive.
pub(crate) fn inverse_upper_factor(rev: &mut [f64], n: usize) -> Result<Vec<f64>, usize> {
    cholesky_lower(rev, n)?;
    let mut u = vec![0f64; n * n];
    lower_inverse_each(rev, n, |r, c, v| u[(n - 1 - r) * n + (n - 1 - c)] = v);
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spd(n: usize, seed: u64) -> Vec<f64> {
        // A = B B^T + n I with a deterministic pseudo-random B.
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        };
        let b: Vec<f64> = (0..n * n).map(|_| next()).collect();
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                let mut t = 0.0;
                for k in 0..n {
                    t += b[i * n + k] * b[j * n + k];
                }
                a[i * n + j] = t + if i == j { n as f64 * 0.1 } else { 0.0 };
            }
        }
        a
    }

    #[test]
    fn upper_factor_of_inverse() {
        // Sizes around the block size, and a few blocks with a ragged end.
        for n in [1, 5, 63, 64, 65, 150] {
            let h = spd(n, n as u64);
            let mut rev = vec![0f64; n * n];
            for a in 0..n {
                for b in 0..n {
                    rev[a * n + b] = h[(n - 1 - a) * n + (n - 1 - b)];
                }
            }
            let u = inverse_upper_factor(&mut rev, n).unwrap();
            // U upper with positive diagonal, and H U^T U = I.
            let mut worst = 0f64;
            for i in 0..n {
                assert!(u[i * n + i] > 0.0);
                for j in 0..i {
                    assert_eq!(u[i * n + j], 0.0);
                }
            }
            let mut utu = vec![0f64; n * n];
            for i in 0..n {
                for j in 0..n {
                    utu[i * n + j] = (0..n).map(|k| u[k * n + i] * u[k * n + j]).sum();
                }
            }
            for i in 0..n {
                for j in 0..n {
                    let v: f64 = (0..n).map(|k| h[i * n + k] * utu[k * n + j]).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    worst = worst.max((v - want).abs());
                }
            }
            assert!(worst < 1e-9, "n = {n}: |H U^T U - I| = {worst}");
        }
    }

    #[test]
    fn right_solve_inverts_the_factored_matrix() {
        // Z (L Lᵀ)⁻¹ (L Lᵀ) = Z, with blocks of 64 over 150 columns (a ragged last block).
        let n = 150;
        let a = spd(n, 7);
        let mut l = a.clone();
        cholesky_lower(&mut l, n).unwrap();
        let dinv = diagonal_block_inverses(&l, n, 64);
        let rc = 3;
        let z0: Vec<f64> = (0..rc * n)
            .map(|i| ((i * 37 % 101) as f64) / 50.0 - 1.0)
            .collect();
        let mut y = z0.clone();
        solve_right_cholesky(&mut y, rc, n, &l, &dinv, 64);
        for r in 0..rc {
            for j in 0..n {
                let back: f64 = (0..n).map(|k| y[r * n + k] * a[k * n + j]).sum();
                assert!(
                    (back - z0[r * n + j]).abs() < 1e-9,
                    "row {r} col {j}: {back}"
                );
            }
        }
    }

    #[test]
    fn cholesky_reports_the_failing_pivot() {
        let n = 3;
        // diag(1, -1, 1) fails at pivot 1.
        let mut a = vec![1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0];
        assert_eq!(cholesky_lower(&mut a, n), Err(1));
        // [[4, 2], [2, 2]] = [[2, 0], [1, 1]] [[2, 1], [0, 1]].
        let mut a = vec![4.0, 9.0, 2.0, 2.0];
        assert_eq!(cholesky_lower(&mut a, 2), Ok(()));
        assert_eq!((a[0], a[2], a[3]), (2.0, 1.0, 1.0));
        // A zero pivot fails too.
        let mut a = vec![4.0, 0.0, 2.0, 1.0];
        assert_eq!(cholesky_lower(&mut a, 2), Err(1));
    }
}
