//! GPTQ's target weight when a linear's input is itself quantized.
//!
//! The linear should give `X Wᵀ` (its float input `X`, `[tokens, n]`) but reads
//! `X̃ = Q(X)`. With `E = (X − X̃)ᵀ X̃` and `H = X̃ᵀ X̃`, the least-squares weight on what it
//! reads is
//!
//! ```text
//! W' = argmin_V ‖X Wᵀ − X̃ Vᵀ‖² = W + W E H⁻¹,
//! ```
//!
//! and for any `Ŵ`, `‖X Wᵀ − X̃ Ŵᵀ‖² = ‖X̃ (W' − Ŵ)ᵀ‖² + const` (the residual of the
//! least-squares fit is orthogonal to `X̃`'s columns). So GPTQ of `W'` on `H` minimizes the
//! linear's error against its float output, rounding of the input included (the asymmetric
//! calibration of GPTAQ, Li et al. 2025, here for the linear's own input quantizer only).
//!
//! `E` and `H` come from a few thousand tokens, and the exact fit follows their noise (on
//! SmolLM2's down_proj, 8192 tokens for 1536 inputs: the output SQNR on the calibration rows
//! rises by 2.5 dB and perplexity gets worse). So `H⁻¹` is a ridge inverse: with
//! `H_λ = H + λ μ I` (`μ` the mean of `diag H`, an input that never fired counting 1 there
//! as in GPTQ's damping) and its Cholesky factor `H_λ = L Lᵀ`, the correction
//! `Y = W E H_λ⁻¹` is two triangular solves, `Z Lᵀ = W E` then `Y L = Z`. `E = 0` (an input
//! the quantizer leaves alone) gives `W' = W`.
//!
//! Precision: all f32. `H_λ`'s condition number is at most `n / λ + 1` (its eigenvalues lie
//! in `[λ μ, n μ + λ μ]`, since `H`'s sum to `n μ`), so at the ridges that help (λ ~ 1) the
//! solve's relative error is at most about `κ · 2⁻²⁴` (1e-4 at SmolLM2's 1536 inputs), far
//! below the correction's own sampling noise; the correction is a fraction of `W`, which is
//! f32 anyway. (An f64 factor of the inverse, as GPTQ's, took 2.5x as long.)

use std::borrow::Cow;

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use crate::error::QuantError;
use crate::gptq::{checked_hessian, live_diagonal};
use crate::linalg::{self, Op};
use crate::rtn::contiguous;

/// Rows per task: a partition of the row count alone (so the result does not depend on the
/// thread count), large enough that each product packs its `n x n` operand once for many
/// rows (SmolLM2's 576 rows: four tasks).
const ROWS_PER_TASK: usize = 144;

/// Columns per block of the triangular solves ([`linalg::solve_right_cholesky`]).
const BLOCK: usize = 128;

/// What moves the weights of the linears reading one quantized input to their target:
/// `E` (borrowed when it is contiguous: on SmolLM2's down_proj it is 9 MiB, held where the
/// compile's memory peaks), the ridge's lower Cholesky factor `L` and the inverses of its
/// diagonal blocks.
#[derive(Clone, Debug)]
pub struct InputErrorFit<'a> {
    n: usize,
    e: Cow<'a, [f32]>,
    /// `L`, row-major `n x n`, lower triangle (the strict upper triangle is scratch).
    l: Vec<f32>,
    /// `L_JJ⁻¹` of each diagonal block `J` of [`BLOCK`] columns, row-major.
    dinv: Vec<Vec<f32>>,
}

impl<'a> InputErrorFit<'a> {
    /// From `h = X̃ᵀ X̃` (f64; only the lower triangle is read) and `e = (X − X̃)ᵀ X̃`
    /// (f32; `n x n`, sums over the same rows, or `e` over a sample of them scaled to
    /// stand for all) and the ridge `λ` (> 0, relative to the mean of `diag(h)`).
    pub fn new(
        h: ArrayView2<'_, f64>,
        e: ArrayView2<'a, f32>,
        ridge: f64,
    ) -> Result<InputErrorFit<'a>, QuantError> {
        let n = checked_hessian(h)?;
        if e.dim() != (n, n) {
            return Err(QuantError::Shape(format!(
                "input error is {} x {}, the hessian {n} x {n}",
                e.nrows(),
                e.ncols()
            )));
        }
        if !(ridge.is_finite() && ridge > 0.0) {
            return Err(QuantError::Options(format!(
                "ridge = {ridge} is not allowed; allowed: a finite value > 0"
            )));
        }
        let diag = live_diagonal(h);
        let shift = ridge * diag.iter().sum::<f64>() / n.max(1) as f64;
        let mut l = vec![0f32; n * n];
        l.par_chunks_mut(n.max(1)).enumerate().for_each(|(r, row)| {
            for (c, v) in row[..r].iter_mut().enumerate() {
                *v = h[[r, c]] as f32;
            }
            row[r] = (diag[r] + shift) as f32;
        });
        linalg::cholesky_lower(&mut l, n).map_err(|pivot| QuantError::NotPositiveDefinite {
            pivot,
            tried: vec![ridge],
        })?;
        let dinv = linalg::diagonal_block_inverses(&l, n, BLOCK);
        Ok(InputErrorFit {
            n,
            e: match e.to_slice() {
                Some(s) => Cow::Borrowed(s),
                None => Cow::Owned(e.iter().copied().collect()),
            },
            l,
            dinv,
        })
    }

    /// `W' = W + W E (H + λ mean(diag H) I)⁻¹` for a weight `rows x n`.
    pub fn target(&self, w: ArrayView2<'_, f32>) -> Result<Array2<f32>, QuantError> {
        let (rows, n) = w.dim();
        if n != self.n {
            return Err(QuantError::Shape(format!(
                "the weight has {n} input columns, the input error {0} x {0}",
                self.n
            )));
        }
        let w = contiguous(w)?;
        let (e, l) = (&self.e[..], &self.l[..]);
        let mut out = vec![0f32; rows * n];
        out.par_chunks_mut(ROWS_PER_TASK * n)
            .zip(w.par_chunks(ROWS_PER_TASK * n))
            .for_each(|(dst, src)| {
                let rc = src.len() / n;
                // Z = W E.
                let mut z = vec![0f32; rc * n];
                linalg::gemm_into(
                    (rc, n, n),
                    &mut z,
                    n,
                    op(src, n, 1),
                    op(e, n, 1),
                    false,
                    1.0,
                );
                // Y = Z H_λ⁻¹, in place.
                linalg::solve_right_cholesky(&mut z, rc, n, l, &self.dinv, BLOCK);
                for ((d, &s), &y) in dst.iter_mut().zip(src).zip(&z) {
                    *d = s + y;
                }
            });
        Ok(Array2::from_shape_vec((rows, n), out).expect("rows x n"))
    }
}

/// An f32 operand with row stride `rs` and column stride `cs`.
fn op(data: &[f32], rs: usize, cs: usize) -> Op<'_, f32> {
    Op { data, rs, cs }
}
