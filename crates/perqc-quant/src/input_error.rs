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
//! rises by 2.5 dB and perplexity gets worse). So `H⁻¹` is a ridge inverse,
//! `(H + λ mean(diag H) I)⁻¹ = Uᵀ U` with `U` the upper Cholesky factor [`GptqFactor`]
//! computes (columns in their own order). `E = 0` (an input the quantizer leaves alone)
//! gives `W' = W`.
//!
//! Precision: `U` is factored in f64, `E` summed in f32, both applied in f32: the
//! correction `W E H⁻¹` is a fraction of `W`, which is f32 anyway.

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use crate::error::QuantError;
use crate::gptq::{GptqFactor, GptqOptions};
use crate::rtn::contiguous;

/// Rows per task: a partition of the row count alone (so the result does not depend on the
/// thread count), large enough that each product packs its `n x n` operand once for many
/// rows (SmolLM2's 576 rows: four tasks).
const ROWS_PER_TASK: usize = 144;

/// Columns per block of the triangular products (zero blocks of `U` are skipped).
const BLOCK: usize = 128;

/// What moves the weights of the linears reading one quantized input to their target:
/// `E` and the ridge factor `U` of that input, in f32.
#[derive(Clone, Debug)]
pub struct InputErrorFit {
    n: usize,
    e: Vec<f32>,
    u: Vec<f32>,
}

impl InputErrorFit {
    /// From `h = X̃ᵀ X̃` (f64) and `e = (X − X̃)ᵀ X̃` (f32; `n x n`, sums over the same rows,
    /// or `e` over a sample of them scaled to stand for all) and the ridge `λ` (> 0,
    /// relative to the mean of `diag(h)`).
    pub fn new(
        h: ArrayView2<'_, f64>,
        e: ArrayView2<'_, f32>,
        ridge: f64,
    ) -> Result<InputErrorFit, QuantError> {
        let n = h.nrows();
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
        let opts = GptqOptions {
            damp: ridge,
            act_order: false,
            ..GptqOptions::default()
        };
        let factor = GptqFactor::new(h, &opts)?;
        Ok(InputErrorFit {
            n,
            e: e.iter().copied().collect(),
            u: factor.u.iter().map(|&v| v as f32).collect(),
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
        let (e, u) = (&self.e[..], &self.u[..]);
        let mut out = vec![0f32; rows * n];
        out.par_chunks_mut(ROWS_PER_TASK * n)
            .zip(w.par_chunks(ROWS_PER_TASK * n))
            .for_each(|(dst, src)| {
                let rc = src.len() / n;
                // Z = W E.
                let mut z = vec![0f32; rc * n];
                product((rc, n, n), &mut z, n, (src, n, 1), (e, n, 1), false);
                // Y = Z Uᵀ: column block J reads rows j0.. of Uᵀ (U is upper triangular).
                let mut y = vec![0f32; rc * n];
                for j0 in (0..n).step_by(BLOCK) {
                    let j1 = (j0 + BLOCK).min(n);
                    product(
                        (rc, j1 - j0, n - j0),
                        &mut y[j0..],
                        n,
                        (&z[j0..], n, 1),
                        (&u[j0 * n + j0..], 1, n),
                        false,
                    );
                }
                // W' = W + Y U: column block J reads rows ..j1 of U.
                dst.copy_from_slice(src);
                for j0 in (0..n).step_by(BLOCK) {
                    let j1 = (j0 + BLOCK).min(n);
                    product(
                        (rc, j1 - j0, j1),
                        &mut dst[j0..],
                        n,
                        (&y, n, 1),
                        (&u[j0..], n, 1),
                        true,
                    );
                }
            });
        Ok(Array2::from_shape_vec((rows, n), out).expect("rows x n"))
    }
}

/// A strided f32 operand: element `(i, j)` at `data[i * rs + j * cs]`.
type Operand<'a> = (&'a [f32], usize, usize);

/// `dst (m x n, row stride dst_rs) [+]= lhs (m x k) · rhs (k x n)` (`add`: accumulate), one
/// single-threaded `gemm` call; the operands' extents are checked (a violation is a bug in
/// this module and panics).
fn product(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    (l, l_rs, l_cs): Operand,
    (r, r_rs, r_cs): Operand,
    add: bool,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let end =
        |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs + 1;
    assert!(
        end(m, n, dst_rs, 1) <= dst.len(),
        "product: dst out of bounds"
    );
    assert!(
        end(m, k, l_rs, l_cs) <= l.len(),
        "product: lhs out of bounds"
    );
    assert!(
        end(k, n, r_rs, r_cs) <= r.len(),
        "product: rhs out of bounds"
    );
    // Safety: the three extents were checked against their slices; `dst` is borrowed
    // mutably, so it does not overlap the operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            add,
            l.as_ptr(),
            l_cs as isize,
            l_rs as isize,
            r.as_ptr(),
            r_cs as isize,
            r_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}
