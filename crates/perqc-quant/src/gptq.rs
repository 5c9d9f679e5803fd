//! GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
//! Pre-trained Transformers"): quantize a weight column by column, each time spreading the
//! rounding error of the column over the columns not yet quantized so that the layer output
//! `X W^T` on the calibration inputs moves as little as possible.
//!
//! With `H = X^T X` and `U` the upper Cholesky factor of `H^-1` (`H^-1 = U^T U`), quantizing
//! column `i` of a row `w` to `q_i` and updating `w_j -= (w_i - q_i) / U_ii * U_ij` for
//! `j > i` is the optimal (OBS) compensation of that column's error under the quadratic
//! output loss, given the columns before it are fixed. Rows are independent.
//!
//! Steps, as implemented:
//! 1. Dead columns (`H_ii == 0`, an input that never fired): `H_ii = 1`, `W[:, i] = 0`.
//! 2. Parameters (scales, zero points) of every group from this `W`, once, before the loop
//!    ("static groups"; with the MSE search when `spec.scale == Mse`), so a column keeps the
//!    parameters of its original group whatever order it is processed in.
//! 3. `act_order`: process columns by decreasing `H_ii` (stable: ties keep column order).
//! 4. Damping: `H += damp * mean(diag H) * I`; `U` by a Cholesky factorization of the
//!    reversed `H` and a triangular inverse (`linalg::inverse_upper_factor`); if
//!    `H` is not positive definite the damping is multiplied by 10, up to 3 times (from 1e-3
//!    if it was 0), then [`QuantError::NotPositiveDefinite`].
//! 5. Lazy batch updates: within a block of `block` columns, column by column with the
//!    update restricted to the block; then the rest of the row is updated by one product
//!    `W[:, i2..] -= E U[i1..i2, i2..]` (gemm) with the block's scaled errors `E`.
//!
//! Precision: the weights being updated, the errors and `U` are f64 (the products are f64
//! gemm); each column is quantized from its current value rounded to f32, with the exact
//! operations of the RTN quantizer (`grid.rs`), so every code dequantizes as the
//! `QWeight` says. Only the lower triangle of `H` is read.
//!
//! Parallelism: rows are cut into chunks of [`ROW_CHUNK`] rows (a partition of the row
//! count alone), processed in parallel, each with sequential gemm calls; so results are the
//! same for any number of threads. Within a chunk, a block's column loop runs on tiles of
//! 8 rows (`TILE`), one vector across the rows per update (each row's arithmetic is what it
//! would be alone).

use ndarray::ArrayView2;
use rayon::prelude::*;

use crate::error::QuantError;
use crate::grid::Grid;
use crate::linalg::{self, Op};
use crate::params::{self, Params};
use crate::qweight::QWeight;
use crate::rtn::contiguous;
use crate::spec::QuantSpec;

/// Rows per parallel task.
pub const ROW_CHUNK: usize = 32;

/// Options of [`gptq`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptqOptions {
    /// Damping relative to the mean of `diag(H)`, finite and `>= 0` (default 0.01).
    pub damp: f64,
    /// Process columns by decreasing `diag(H)` (default true).
    pub act_order: bool,
    /// Columns per lazy batch update, `>= 1` (default 128).
    pub block: usize,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions {
            damp: 0.01,
            act_order: true,
            block: 128,
        }
    }
}

/// Rows of a tile of [`block_tile`]: one f64 vector of AVX-512 (two of AVX2).
const TILE: usize = 8;

/// What one call of [`block_tile`] reads: the weight's quantizer, the processing order, the
/// factor `U` (row-major `n x n`, processing order) and which rows and columns it covers.
#[derive(Clone, Copy)]
struct BlockStep<'a> {
    grid: Grid,
    params: &'a Params,
    perm: &'a [usize],
    u: &'a [f64],
    /// First weight row of the tile (for its quantizer parameters).
    r0: usize,
    /// Rows in the tile, at most [`TILE`].
    rows: usize,
    /// The block's columns, `i1..i2` in processing order.
    i1: usize,
    i2: usize,
}

/// What one call of [`block_tile`] writes.
struct TileOut<'a> {
    /// The block's columns of the tile's rows, column-major: `tile[(j - i1) * TILE + r]`.
    tile: &'a mut [f64],
    /// The rows' codes, row-major `rows x n` (columns `i1..i2` written).
    codes: &'a mut [i16],
    /// The scaled errors, row-major `rows x (i2 - i1)`.
    err: &'a mut [f64],
}

/// Columns `i1..i2` (processing order) of the tile's rows `r0..r0 + rows` (`rows <= TILE`):
/// quantize each column, record its scaled error `(w_i - q_i) / U_ii` in `err`, and update
/// the rest of the block, `w_j -= err_i * U_ij` for `i < j < i2`. The tile is column-major,
/// so each update is one vector across the rows; every row sees the same operations in the
/// same order as alone (a product, then a difference: no fused multiply-add), so the tiling
/// changes no bit. Lanes past `rows` stay zero.
fn block_tile(step: &BlockStep<'_>, out: TileOut<'_>) {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
            // Safety: the features were just detected.
            return unsafe { x86::block_tile_avx512(step, out) };
        }
        if avx2 {
            // Safety: the features were just detected.
            return unsafe { x86::block_tile_avx2(step, out) };
        }
    }
    block_tile_with(step, out, update_portable)
}

/// The block update of [`block_tile_with`] in plain code (the portable level).
fn update_portable(rest: &mut [f64], u: &[f64], e: &[f64; TILE]) {
    for (col, &uij) in rest.chunks_exact_mut(TILE).zip(u) {
        for (x, &e) in col.iter_mut().zip(e) {
            *x -= e * uij;
        }
    }
}

/// [`block_tile`] with the block update `update(rest, u, e)`: `rest[j TILE + r] -= e[r] *
/// u[j]` for every column `j` of `rest` (written per level: left to itself, the compiler
/// vectorizes across columns with gathers and scatters).
#[inline(always)]
fn block_tile_with(
    step: &BlockStep<'_>,
    out: TileOut<'_>,
    update: impl Fn(&mut [f64], &[f64], &[f64; TILE]),
) {
    let &BlockStep {
        grid,
        params,
        perm,
        u,
        r0,
        rows,
        i1,
        i2,
    } = step;
    let TileOut { tile, codes, err } = out;
    let (n, bc) = (codes.len() / rows.max(1), i2 - i1);
    for i in i1..i2 {
        let k = i - i1;
        let group = perm[i] / params.group;
        let uii = u[i * n + i];
        let mut e = [0f64; TILE];
        for (r, e) in e.iter_mut().enumerate().take(rows) {
            let gp = params.get(r0 + r, group);
            let x = tile[k * TILE + r];
            let code = grid.code(x as f32, gp);
            codes[r * n + i] = code;
            *e = (x - grid.value(code, gp) as f64) / uii;
            err[r * bc + k] = *e;
        }
        update(
            &mut tile[(k + 1) * TILE..],
            &u[i * n + i + 1..i * n + i2],
            &e,
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BlockStep, TILE, TileOut, block_tile_with};
    use std::arch::x86_64::*;

    /// `block_tile` compiled for `$features`, with `$update` as its block update.
    macro_rules! level {
        ($name:ident, $features:literal, |$rest:ident, $u:ident, $e:ident| $update:block) => {
            #[target_feature(enable = $features)]
            pub(super) fn $name(step: &BlockStep<'_>, out: TileOut<'_>) {
                let update = |$rest: &mut [f64], $u: &[f64], $e: &[f64; TILE]| $update;
                block_tile_with(step, out, update)
            }
        };
    }

    level!(block_tile_avx512, "avx512f,avx2,fma", |rest, u, e| {
        // Safety: `e` and every column are TILE = 8 f64.
        unsafe {
            let ev = _mm512_loadu_pd(e.as_ptr());
            for (col, &uij) in rest.chunks_exact_mut(TILE).zip(u) {
                let p = col.as_mut_ptr();
                let x = _mm512_loadu_pd(p);
                _mm512_storeu_pd(p, _mm512_sub_pd(x, _mm512_mul_pd(ev, _mm512_set1_pd(uij))));
            }
        }
    });

    level!(block_tile_avx2, "avx2,fma", |rest, u, e| {
        // Safety: `e` and every column are TILE = 8 f64, two vectors of 4.
        unsafe {
            let (e0, e1) = (
                _mm256_loadu_pd(e.as_ptr()),
                _mm256_loadu_pd(e.as_ptr().add(4)),
            );
            for (col, &uij) in rest.chunks_exact_mut(TILE).zip(u) {
                let p = col.as_mut_ptr();
                let b = _mm256_set1_pd(uij);
                let (x0, x1) = (_mm256_loadu_pd(p), _mm256_loadu_pd(p.add(4)));
                _mm256_storeu_pd(p, _mm256_sub_pd(x0, _mm256_mul_pd(e0, b)));
                _mm256_storeu_pd(p.add(4), _mm256_sub_pd(x1, _mm256_mul_pd(e1, b)));
            }
        }
    });
}

/// What GPTQ derives from the Hessian alone (steps 1, 3 and 4 of the module doc): shared
/// by every linear that reads one input (q/k/v, gate/up), so it is computed once for them.
#[derive(Clone, Debug)]
pub struct GptqFactor {
    pub(crate) n: usize,
    /// Input columns that never fired (`H_ii == 0`): their weights are zeroed.
    dead: Vec<usize>,
    /// Processing order of the columns.
    pub(crate) perm: Vec<usize>,
    /// Upper Cholesky factor of the damped `H^-1`, in processing order, row-major `n x n`.
    pub(crate) u: Vec<f64>,
}

impl GptqFactor {
    /// Damps and factors `h = X^T X` (`n x n`, f64; only the lower triangle is read) by
    /// `opts` (the damping retries of the module doc).
    pub fn new(h: ArrayView2<'_, f64>, opts: &GptqOptions) -> Result<GptqFactor, QuantError> {
        check_options(opts)?;
        let n = checked_hessian(h)?;

        // 1. Dead columns.
        let dead: Vec<usize> = (0..n).filter(|&i| h[[i, i]] == 0.0).collect();
        let diag = live_diagonal(h);

        // 3. Column order.
        let mut perm: Vec<usize> = (0..n).collect();
        if opts.act_order {
            perm.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
        }

        // 4. Damping and U.
        let mean = diag.iter().sum::<f64>() / n as f64;
        let entry = |a: usize, b: usize| {
            // H in processing order, lower triangle of the original read.
            let (pa, pb) = (perm[a], perm[b]);
            if pa == pb {
                diag[pa]
            } else {
                h[[pa.max(pb), pa.min(pb)]]
            }
        };
        let mut tried = Vec::new();
        let mut damp = opts.damp;
        let u = loop {
            tried.push(damp);
            let mut rev = vec![0f64; n * n];
            rev.par_chunks_mut(n.max(1))
                .enumerate()
                .for_each(|(a, row)| {
                    for (b, v) in row[..=a].iter_mut().enumerate() {
                        *v = entry(n - 1 - a, n - 1 - b);
                    }
                    row[a] += damp * mean;
                });
            match linalg::inverse_upper_factor(&mut rev, n) {
                Ok(u) => break u,
                Err(pivot) if tried.len() > 3 => {
                    return Err(QuantError::NotPositiveDefinite {
                        pivot: perm[n - 1 - pivot],
                        tried,
                    });
                }
                Err(_) => damp = if damp > 0.0 { damp * 10.0 } else { 1e-3 },
            }
        };
        Ok(GptqFactor { n, dead, perm, u })
    }
}

/// The size of `h`, checked square with a finite lower triangle (the part GPTQ and the fit
/// to the float output read).
pub(crate) fn checked_hessian(h: ArrayView2<'_, f64>) -> Result<usize, QuantError> {
    let n = h.nrows();
    if h.ncols() != n {
        return Err(QuantError::Shape(format!(
            "hessian is {} x {}, not square",
            h.nrows(),
            h.ncols()
        )));
    }
    for ((r, c), &v) in h.indexed_iter() {
        if c <= r && !v.is_finite() {
            return Err(QuantError::NonFiniteHessian {
                row: r,
                col: c,
                value: v,
            });
        }
    }
    Ok(n)
}

/// `diag(h)` with an input that never fired (`H_ii == 0`) counted as 1: what the damping's
/// mean and the column order read.
pub(crate) fn live_diagonal(h: ArrayView2<'_, f64>) -> Vec<f64> {
    (0..h.nrows())
        .map(|i| if h[[i, i]] == 0.0 { 1.0 } else { h[[i, i]] })
        .collect()
}

fn check_options(opts: &GptqOptions) -> Result<(), QuantError> {
    if !(opts.damp.is_finite() && opts.damp >= 0.0) {
        return Err(QuantError::Options(format!(
            "damp = {} is not allowed; allowed: a finite value >= 0",
            opts.damp
        )));
    }
    if opts.block == 0 {
        return Err(QuantError::Options(
            "block = 0 is not allowed; allowed: block >= 1".into(),
        ));
    }
    Ok(())
}

/// GPTQ-quantizes `w` (`rows = output channels x cols = input dim`) given the Hessian
/// proxy `h = X^T X` (`cols x cols`, f64, accumulated over calibration rows; any positive
/// multiple gives the same result). See the module doc for the algorithm.
pub fn gptq(
    w: ArrayView2<'_, f32>,
    h: ArrayView2<'_, f64>,
    spec: &QuantSpec,
    opts: &GptqOptions,
) -> Result<QWeight, QuantError> {
    spec.for_weights()?;
    check_options(opts)?;
    let n = w.ncols();
    if h.dim() != (n, n) {
        return Err(QuantError::Shape(format!(
            "hessian is {} x {} but the weight has {n} input columns (expected {n} x {n})",
            h.dim().0,
            h.dim().1
        )));
    }
    gptq_with(w, &GptqFactor::new(h, opts)?, spec, opts)
}

/// [`gptq`] with the Hessian's factor computed once ([`GptqFactor::new`] with the same
/// `opts`) for every linear that reads one input.
pub fn gptq_with(
    w: ArrayView2<'_, f32>,
    factor: &GptqFactor,
    spec: &QuantSpec,
    opts: &GptqOptions,
) -> Result<QWeight, QuantError> {
    spec.for_weights()?;
    check_options(opts)?;
    let (rows, n) = w.dim();
    if factor.n != n {
        return Err(QuantError::Shape(format!(
            "hessian is {0} x {0} but the weight has {n} input columns (expected {n} x {n})",
            factor.n
        )));
    }
    let mut data = contiguous(w)?;
    if !factor.dead.is_empty() {
        for row in data.to_mut().chunks_exact_mut(n) {
            for &i in &factor.dead {
                row[i] = 0.0;
            }
        }
    }

    // 2. Static group parameters.
    let params = params::compute(&data, rows, n, spec)?;
    let grid = Grid::of(spec);
    let (perm, u) = (&factor.perm, &factor.u);

    // 5. The column loop, rows in parallel chunks, each chunk's rows taken to f64 (in
    // processing order) by its own task: the working copy is a chunk per task, not the
    // whole weight.
    let mut codes = vec![0i16; rows * n];
    let block = opts.block.min(n);
    codes
        .par_chunks_mut(ROW_CHUNK * n)
        .zip(data.par_chunks(ROW_CHUNK * n))
        .enumerate()
        .for_each(|(chunk, (cc, src))| {
            let r0 = chunk * ROW_CHUNK;
            let rc = cc.len() / n;
            let mut wc = vec![0f64; rc * n];
            for (dst, src) in wc.chunks_exact_mut(n).zip(src.chunks_exact(n)) {
                for (d, &p) in dst.iter_mut().zip(perm) {
                    *d = src[p] as f64;
                }
            }
            let mut cp = vec![0i16; rc * n];
            let mut err = vec![0f64; rc * block];
            let mut tile = vec![0f64; block * TILE];
            for i1 in (0..n).step_by(block) {
                let i2 = (i1 + block).min(n);
                let bc = i2 - i1;
                for t0 in (0..rc).step_by(TILE) {
                    let rows = TILE.min(rc - t0);
                    let tile = &mut tile[..bc * TILE];
                    tile.fill(0.0);
                    for r in 0..rows {
                        let src = &wc[(t0 + r) * n + i1..(t0 + r) * n + i2];
                        for (k, &v) in src.iter().enumerate() {
                            tile[k * TILE + r] = v;
                        }
                    }
                    let step = BlockStep {
                        grid,
                        params: &params,
                        perm,
                        u,
                        r0: r0 + t0,
                        rows,
                        i1,
                        i2,
                    };
                    block_tile(
                        &step,
                        TileOut {
                            tile,
                            codes: &mut cp[t0 * n..(t0 + rows) * n],
                            err: &mut err[t0 * bc..(t0 + rows) * bc],
                        },
                    );
                }
                if i2 < n {
                    let lhs = Op {
                        data: &err,
                        rs: bc,
                        cs: 1,
                    };
                    let rhs = Op {
                        data: &u[i1 * n + i2..],
                        rs: n,
                        cs: 1,
                    };
                    linalg::gemm_into((rc, n - i2, bc), &mut wc[i2..], n, lhs, rhs, true, -1.0);
                }
            }
            // Codes back in column order.
            for (dst, src) in cc.chunks_exact_mut(n).zip(cp.chunks_exact(n)) {
                for (&c, &p) in src.iter().zip(perm) {
                    dst[p] = c;
                }
            }
        });
    Ok(QWeight {
        rows,
        cols: n,
        group: params.group,
        codes,
        scales: params.scales,
        zero_points: params.zps,
        spec: *spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Format, Granularity, ScaleSearch};

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    }

    /// Every level of the block step (AVX-512, AVX2, portable, as the CPU runs them)
    /// gives the same codes, errors and updated tile, bit for bit, on a partial tile.
    #[test]
    fn block_tile_levels_agree_bitwise() {
        let (n, rows, i1, i2) = (40, 5, 3, 37);
        let mut seed = 7;
        let w: Vec<f32> = (0..rows * n).map(|_| lcg(&mut seed) as f32).collect();
        let spec = QuantSpec {
            bits: 4,
            signed: true,
            symmetric: false,
            granularity: Granularity::Group(8),
            format: Format::Int,
            scale: ScaleSearch::Max,
        };
        let params = params::compute(&w, rows, n, &spec).unwrap();
        let grid = Grid::of(&spec);
        let perm: Vec<usize> = (0..n).rev().collect();
        // An upper-triangular U with a positive diagonal.
        let u: Vec<f64> = (0..n * n)
            .map(|k| match (k / n, k % n) {
                (r, c) if r == c => 1.0 + lcg(&mut seed).abs(),
                (r, c) if c > r => lcg(&mut seed) * 0.3,
                _ => 0.0,
            })
            .collect();
        let bc = i2 - i1;
        let fresh = || {
            let mut tile = vec![0f64; bc * TILE];
            for r in 0..rows {
                for k in 0..bc {
                    tile[k * TILE + r] = f64::from(w[r * n + perm[i1 + k]]);
                }
            }
            (tile, vec![0i16; rows * n], vec![0f64; rows * bc])
        };
        let step = BlockStep {
            grid,
            params: &params,
            perm: &perm,
            u: &u,
            r0: 0,
            rows,
            i1,
            i2,
        };
        fn out(b: &mut (Vec<f64>, Vec<i16>, Vec<f64>)) -> TileOut<'_> {
            TileOut {
                tile: &mut b.0,
                codes: &mut b.1,
                err: &mut b.2,
            }
        }
        let mut portable = fresh();
        block_tile_with(&step, out(&mut portable), update_portable);
        let (tile, codes, err) = &portable;
        assert!(err.iter().any(|&e| e != 0.0));
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        #[cfg(target_arch = "x86_64")]
        {
            type Level = fn(&BlockStep<'_>, TileOut<'_>);
            let mut levels: Vec<(&str, Level)> = Vec::new();
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
                levels.push(("avx512", |s, o| unsafe { x86::block_tile_avx512(s, o) }));
            }
            if avx2 {
                levels.push(("avx2", |s, o| unsafe { x86::block_tile_avx2(s, o) }));
            }
            for (name, level) in levels {
                let mut got = fresh();
                level(&step, out(&mut got));
                assert_eq!(&got.1, codes, "{name}: codes");
                assert_eq!(bits(&got.2), bits(err), "{name}: errors");
                assert_eq!(bits(&got.0), bits(tile), "{name}: tile");
            }
        }
        // Each row alone (one lane) gives what it gives in the tile.
        for r in 0..rows {
            let mut one = vec![0f64; bc * TILE];
            for k in 0..bc {
                one[k * TILE] = f64::from(w[r * n + perm[i1 + k]]);
            }
            let (mut c1, mut e1) = (vec![0i16; n], vec![0f64; bc]);
            let one_row = BlockStep {
                r0: r,
                rows: 1,
                ..step
            };
            block_tile(
                &one_row,
                TileOut {
                    tile: &mut one,
                    codes: &mut c1,
                    err: &mut e1,
                },
            );
            assert_eq!(c1[i1..i2], codes[r * n + i1..r * n + i2], "row {r}: codes");
            assert_eq!(
                bits(&e1),
                bits(&err[r * bc..(r + 1) * bc]),
                "row {r}: errors"
            );
        }
    }
}
