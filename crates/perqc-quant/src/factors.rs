//! The quantization SQNR of a linear layer `y = x W` factored into concentration and
//! alignment (the analysis behind CAT, arXiv 2603.04359), for `perqc inspect --sqnr`.
//!
//! With rows `x` of width `K`, `W` of `K` inputs and `N` outputs, and rounding noise that
//! is white with variance `Δ²/12` per element (`Δ` the quantizer's step):
//!
//! - per-token activation noise has `Δ = κ_a · max_j |x_j|`, so the output noise it causes
//!   is `‖W‖²_F κ_a² E[max x²] / 12` against the signal `E‖x W‖² = A ‖W‖²_F E‖x‖²`:
//!   `SQNR_a = 12 K C(x) A / κ_a²`;
//! - per-output-channel weight noise likewise gives `SQNR_w = 12 K C(W) A / κ_w²`;
//! - both together: `1 / SQNR = 1 / SQNR_a + 1 / SQNR_w`.
//!
//! The factors: concentration `C(x) = E‖x‖² / (K E[max_j x_j²])` in `[1/K, 1]` (1: flat,
//! `1/K`: one channel carries everything), likewise `C(W) = ‖W‖²_F / (K Σ_n max_k W_kn²)`
//! over the output channels, and alignment `A = E‖x W‖² / (‖W‖²_F E‖x‖²)`, how much of the
//! input's energy falls where the weight has its gains. A rotation changes the
//! concentrations only; `x ↦ x T`, `W ↦ T⁻¹ W` with any invertible `T` can also change the
//! alignment, up to the bound `A* = tr(S_x S_w) / (Σ_i √λ_i)²`, `λ_i` the eigenvalues of
//! `S_x S_w` (`S_x = E[xᵀ x]`, `S_w = W Wᵀ`): the minimum over `T` of
//! `tr(T⁻¹ S_w T⁻ᵀ) tr(Tᵀ S_x T)` is `(tr (S_x^½ S_w S_x^½)^½)²` (matrix Cauchy–Schwarz),
//! reached by CAT's geometric-mean transform. `A ≤ A*` always (`‖W S_x^½‖_* ≤ ‖W‖_F
//! ‖S_x^½‖_F`).

use crate::error::QuantError;
use crate::linalg::{Op, cholesky_lower, gemm_into};
use crate::spd::sym_eigenvalues;
use ndarray::ArrayView2;

/// `C(x)` of rows `[R, K]`: `Σ_r ‖x_r‖² / (K Σ_r max_j x_rj²)` (1 for no rows or zeros).
pub fn row_concentration(rows: ArrayView2<f32>) -> f64 {
    let k = rows.ncols();
    let (mut energy, mut peak) = (0f64, 0f64);
    for r in rows.rows() {
        let mut m = 0f64;
        for &v in r {
            let v2 = f64::from(v) * f64::from(v);
            energy += v2;
            m = m.max(v2);
        }
        peak += m;
    }
    if peak == 0.0 {
        1.0
    } else {
        energy / (k as f64 * peak)
    }
}

/// `A = ‖x W‖² / (‖W‖²_F ‖x‖²_F)` from the three sums of squares (over the same rows).
pub fn alignment(signal: f64, weight_sq: f64, input_sq: f64) -> f64 {
    let d = weight_sq * input_sq;
    if d > 0.0 { signal / d } else { 0.0 }
}

/// The step of a `bits`-bit uniform quantizer relative to the largest magnitude it covers:
/// `1 / (2^(b-1) - 1)` symmetric, `2 / (2^b - 1)` asymmetric (a range of about `2 max`).
pub fn relative_step(bits: u32, symmetric: bool) -> f64 {
    if symmetric {
        1.0 / ((1u64 << (bits - 1)) - 1).max(1) as f64
    } else {
        2.0 / ((1u64 << bits) - 1) as f64
    }
}

/// The SQNR (dB) the white-noise model predicts from the factors: `k` the input width,
/// `act` the activation's concentration and relative step (`None`: float activations),
/// `weights` the weight's concentration and relative step.
pub fn predicted_sqnr_db(
    k: usize,
    alignment: f64,
    act: Option<(f64, f64)>,
    weights: (f64, f64),
) -> f64 {
    let inv = |(c, step): (f64, f64)| step * step / (12.0 * k as f64 * c * alignment);
    let noise = inv(weights) + act.map_or(0.0, inv);
    -10.0 * noise.log10()
}

/// The alignment of a layer from its input Gram, and the bound any invertible transform
/// of its input can reach.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AlignmentBound {
    /// `tr(W S_x Wᵀ) / (‖W‖²_F tr S_x)`.
    pub alignment: f64,
    /// `A*`.
    pub bound: f64,
}

/// [`AlignmentBound`] of `W` (`[N, K]`, rows are output channels) on inputs with Gram
/// `gram` (`K x K` row-major, any positive scale: `Σ xᵀ x`). The eigenvalues are those of
/// the smaller of `W S_x Wᵀ` (`N x N`) and `Lᵀ Wᵀ W L` (`K x K`, `S_x = L Lᵀ`), which share
/// the nonzero spectrum of `S_x S_w`. A Gram that is not finite, or indefinite beyond
/// round-off, is an error; a singular one is factored with the least damping of `1e-10` ..
/// `1e-4` of its largest diagonal entry that lets it factor.
pub fn alignment_bound(gram: &[f64], w: ArrayView2<f32>) -> Result<AlignmentBound, QuantError> {
    let (n, k) = w.dim();
    if gram.len() != k * k {
        return Err(QuantError::Singular(format!(
            "a Gram of {} elements for a layer of {k} inputs",
            gram.len()
        )));
    }
    let wd: Vec<f64> = w.iter().map(|&v| f64::from(v)).collect();
    let w_sq: f64 = wd.iter().map(|v| v * v).sum();
    let trace_s: f64 = (0..k).map(|i| gram[i * k + i]).sum();
    if !(trace_s.is_finite() && w_sq.is_finite()) {
        return Err(QuantError::Singular(
            "the Gram or the weight is not finite".into(),
        ));
    }
    if trace_s <= 0.0 || w_sq == 0.0 {
        return Ok(AlignmentBound {
            alignment: 0.0,
            bound: 0.0,
        });
    }
    let wop = Op {
        data: &wd,
        rs: k,
        cs: 1,
    };
    let wt = Op {
        data: &wd,
        rs: 1,
        cs: k,
    };
    let (b, m) = if n <= k {
        // W S Wᵀ.
        let mut t = vec![0f64; n * k];
        gemm_into(
            (n, k, k),
            &mut t,
            k,
            wop,
            Op {
                data: gram,
                rs: k,
                cs: 1,
            },
            false,
            1.0,
        );
        let mut b = vec![0f64; n * n];
        gemm_into(
            (n, n, k),
            &mut b,
            n,
            Op {
                data: &t,
                rs: k,
                cs: 1,
            },
            wt,
            false,
            1.0,
        );
        (b, n)
    } else {
        // Lᵀ (Wᵀ W) L. A Gram summed from f32 products carries round-off of about 1e-7 of
        // its largest entries; where it is singular (fewer rows than inputs) that leaves it
        // slightly indefinite, so the damping goes up to 1e-4 of the largest diagonal entry.
        let top = (0..k).map(|i| gram[i * k + i]).fold(0f64, f64::max);
        let mut l = Vec::new();
        for damp in [0.0, 1e-10, 1e-8, 1e-6, 1e-5, 1e-4] {
            l = gram.to_vec();
            for i in 0..k {
                l[i * k + i] += damp * top;
            }
            if cholesky_lower(&mut l, k).is_ok() {
                break;
            }
            l.clear();
        }
        if l.is_empty() {
            return Err(QuantError::Singular(
                "the input Gram is not positive semi-definite".into(),
            ));
        }
        for i in 0..k {
            for j in i + 1..k {
                l[i * k + j] = 0.0;
            }
        }
        let mut g = vec![0f64; k * k];
        gemm_into((k, k, n), &mut g, k, wt, wop, false, 1.0);
        let mut t = vec![0f64; k * k];
        gemm_into(
            (k, k, k),
            &mut t,
            k,
            Op {
                data: &l,
                rs: 1,
                cs: k,
            },
            Op {
                data: &g,
                rs: k,
                cs: 1,
            },
            false,
            1.0,
        );
        let mut b = vec![0f64; k * k];
        gemm_into(
            (k, k, k),
            &mut b,
            k,
            Op {
                data: &t,
                rs: k,
                cs: 1,
            },
            Op {
                data: &l,
                rs: k,
                cs: 1,
            },
            false,
            1.0,
        );
        (b, k)
    };
    let trace_b: f64 = (0..m).map(|i| b[i * m + i]).sum();
    let nuclear: f64 = sym_eigenvalues(&b, m)
        .iter()
        .map(|&l| l.max(0.0).sqrt())
        .sum();
    Ok(AlignmentBound {
        alignment: trace_b / (w_sq * trace_s),
        bound: if nuclear > 0.0 {
            trace_b / (nuclear * nuclear)
        } else {
            0.0
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn rows(r: usize, c: usize, seed: u64, outlier: f32) -> Array2<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        Array2::from_shape_fn((r, c), |(_, j)| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            if j == 2 { outlier * u } else { u }
        })
    }

    fn gram(x: &Array2<f32>) -> Vec<f64> {
        let xd = x.mapv(f64::from);
        xd.t().dot(&xd).iter().copied().collect()
    }

    #[test]
    fn concentration_is_one_when_flat_and_one_over_k_for_one_channel() {
        let flat = Array2::from_elem((4, 8), -3.0f32);
        assert!((row_concentration(flat.view()) - 1.0).abs() < 1e-12);
        let mut one = Array2::zeros((4, 8));
        one.column_mut(5).fill(2.0f32);
        assert!((row_concentration(one.view()) - 1.0 / 8.0).abs() < 1e-12);
        assert_eq!(row_concentration(Array2::<f32>::zeros((3, 8)).view()), 1.0);
        assert!(relative_step(4, true) == 1.0 / 7.0 && relative_step(4, false) == 2.0 / 15.0);
    }

    /// Both forms of the bound (N <= K and N > K) agree with the spectrum of `S_x S_w`
    /// computed directly; `A <= A*`; the Gram's alignment matches the rows'; an invertible
    /// diagonal transform of the input changes `A` but not `A*`, and a weight matched to
    /// the input (`W = S_x`-shaped) is better aligned than a random one.
    #[test]
    fn the_bound_is_the_spectrum_of_the_product_and_invariant() {
        let (k, r) = (12, 200);
        let x = rows(r, k, 1, 20.0);
        let s = gram(&x);
        for n in [5, 12, 30] {
            let w = rows(n, k, 7 + n as u64, 1.0);
            let got = alignment_bound(&s, w.view()).unwrap();
            // Direct: eigenvalues of S^½ S_w S^½ from the Jacobi eigendecomposition.
            let e = crate::spd::sym_eigen(&s, k);
            let half = e.map(|l| l.max(0.0).sqrt());
            let wd = w.mapv(f64::from);
            let sw: Vec<f64> = wd.t().dot(&wd).iter().copied().collect();
            let inner = crate::spd::matmul(&crate::spd::matmul(&half, &sw, k), &half, k);
            let lam = sym_eigenvalues(&inner, k);
            let tr: f64 = lam.iter().sum();
            let nuc: f64 = lam.iter().map(|l| l.max(0.0).sqrt()).sum();
            // Round-off eigenvalues (~1e-13 of the largest) add their square roots: 1e-6.
            assert!(
                (got.bound / (tr / (nuc * nuc)) - 1.0).abs() < 1e-6,
                "n = {n}: {got:?}"
            );
            let y = x.dot(&w.t());
            let a_rows = alignment(
                y.iter().map(|&v| f64::from(v).powi(2)).sum(),
                w.iter().map(|&v| f64::from(v).powi(2)).sum(),
                x.iter().map(|&v| f64::from(v).powi(2)).sum(),
            );
            assert!((got.alignment - a_rows).abs() < 1e-5 * a_rows, "n = {n}");
            assert!(
                got.alignment <= got.bound + 1e-12 && got.bound <= 1.0,
                "{got:?}"
            );
            // x ↦ x D, W ↦ D⁻¹ W (rows of `w` are output channels: columns scale).
            let dvec: Vec<f32> = (0..k).map(|j| 0.25 + j as f32).collect();
            let xs = Array2::from_shape_fn((r, k), |(i, j)| x[[i, j]] * dvec[j]);
            let ws = Array2::from_shape_fn((n, k), |(i, j)| w[[i, j]] / dvec[j]);
            let moved = alignment_bound(&gram(&xs), ws.view()).unwrap();
            assert!(
                (moved.bound - got.bound).abs() < 1e-6 * got.bound,
                "n = {n}"
            );
            assert!((moved.alignment - got.alignment).abs() > 1e-3 * got.alignment);
        }
        // Weights reading the outlier channel align with the inputs.
        let mut matched = rows(6, k, 3, 1.0);
        matched.column_mut(2).mapv_inplace(|v| v * 50.0);
        let random = rows(6, k, 3, 1.0);
        assert!(
            alignment_bound(&s, matched.view()).unwrap().alignment
                > 5.0 * alignment_bound(&s, random.view()).unwrap().alignment
        );
        assert!(alignment_bound(&s[1..], random.view()).is_err());
    }

    /// Fewer rows than inputs (one calibration window of a wide layer) give a singular
    /// Gram, and summed in f32 (as the observers' blocked products are) an outlier channel
    /// leaves its round-off on the null directions: slightly indefinite. The bound still
    /// comes out, at most 1, and at least the alignment.
    #[test]
    fn a_rank_deficient_gram_summed_in_f32_has_a_bound() {
        let (k, r, n) = (576, 512, 1536);
        // Channel scales over five decades, and a shared component on a few channels (a
        // massive activation), as a norm's output has.
        let base = rows(r, k, 5, 1.0);
        let shared = rows(r, 1, 9, 1.0);
        let x = Array2::from_shape_fn((r, k), |(i, j)| {
            let scale = 10f32.powf((j * 37 % 101) as f32 / 20.0 - 2.0);
            let massive = if j % 97 == 3 {
                4000.0 * shared[[i, 0]]
            } else {
                0.0
            };
            base[[i, j]] * scale + massive
        });
        let x32: Vec<f32> = x.t().dot(&x).iter().copied().collect();
        let s: Vec<f64> = x32.iter().map(|&v| f64::from(v)).collect();
        let w = rows(n, k, 11, 1.0);
        let got = alignment_bound(&s, w.view()).expect("a bound");
        assert!(
            got.bound <= 1.0 + 1e-9 && got.alignment <= got.bound * (1.0 + 1e-6),
            "{got:?}"
        );
    }

    /// The prediction rises about 6 dB per bit, and is higher without activation noise.
    #[test]
    fn prediction_tracks_bits() {
        let a = predicted_sqnr_db(
            64,
            0.5,
            Some((0.2, relative_step(4, false))),
            (0.3, relative_step(4, true)),
        );
        let b = predicted_sqnr_db(
            64,
            0.5,
            Some((0.2, relative_step(5, false))),
            (0.3, relative_step(5, true)),
        );
        assert!((b - a - 6.0).abs() < 0.6, "{a} {b}");
        let weight_only = predicted_sqnr_db(64, 0.5, None, (0.3, relative_step(4, true)));
        assert!(weight_only > a);
    }
}
