//! `smooth(train=STEPS)`: gradient refinement of one region's smoothing scales after the
//! fixed or searched `s0` (the training step of arXiv 2606.09927's quantile-robust
//! SmoothRot), with a straight-through estimator of the quantizers.
//!
//! **Parameter.** `u = log s` per channel, starting at `log s0` and kept in the box
//! `log s0 - ln 8 <= u <= log s0 + ln 8` (each scale within a factor 8 of where the fixed or
//! searched smoothing put it), projected after every step.
//!
//! **Loss.** For a sink with sampled rows `X` (`[R, K]`), weight `W` (`[K, N]`, ONNX layout)
//! and `Y = X W`, the smoothing `diag(1/s)` is followed by an orthogonal map `O` (the
//! permutation chosen from the statistics divided by `s0`, then the online block
//! Hadamard), held fixed while `u` moves (the permute pass later recomputes the
//! permutation from the statistics divided by the trained `s`; see the hold-out). With
//! `R = Oᵀ` acting on rows:
//!
//! `X̃ = X diag(1/s) R`, `W̃ = Rᵀ diag(s) W = O diag(s) W` (`O⁻ᵀ = O`), so `X̃ W̃ = X W`,
//!
//! `L(u) = Σ_sinks ‖Y - Q_a(X̃) Q_w(W̃)‖² / Σ_sinks ‖Y‖²` over the train rows, with the
//! probe's quantizers ([`Probe`]: `Q_a` per token, `Q_w` RTN per output channel with the
//! probe's scale search, recomputed every step).
//!
//! **Gradient** (straight-through: each quantizer's Jacobian taken as the identity, its
//! scales as constants). With `E = Y - Ŷ`, `Ŷ = Q_a(X̃) Q_w(W̃)`:
//!
//! - `∂L/∂X̃ = -2 E Q_w(W̃)ᵀ` and `∂L/∂W̃ = -2 Q_a(X̃)ᵀ E`;
//! - back through `O`: per row `x̃ = O x'`, so `∂L/∂X' = ∂L/∂X̃ Rᵀ` (each row through `Oᵀ`);
//!   `W̃ = O W'`, so `∂L/∂W' = Oᵀ ∂L/∂W̃` (a permutation then small blocks `Q`: `Qᵀ`
//!   per block, then the inverse gather; any other chain: [`ChannelOp::transpose`] of
//!   each map, last map first);
//! - back through the diagonal: `X' = X diag(1/s)`, `W' = diag(s) W`, so
//!   `g_inv,j = Σ_r ∂L/∂X'[r, j] X[r, j]` (`∂L/∂(1/s_j)`) and
//!   `g_s,j = Σ_n ∂L/∂W'[j, n] W[j, n]` (`∂L/∂s_j` through the weight; computed as
//!   `Σ_r (Oᵀ Q_a(X̃)_r)[j] (E Wᵀ)[r, j]`, the same sum regrouped, in `[R, K]` arrays);
//! - `∂L/∂u_j = s_j (g_s,j - g_inv,j / s_j²) = s_j g_s,j - g_inv,j / s_j`.
//!
//! **Optimizer.** Adam (β1 0.9, β2 0.999, ε 1e-8) on `u`, learning rate [`DEFAULT_LR`]
//! unless given; `STEPS` updates.
//!
//! **Hold-out.** Each sink's sampled rows are split in two halves ([`split_rows`]: ranked
//! by `‖y_r‖`, even ranks train, odd ranks held out). Every step evaluates both halves at
//! the current `s` (one weight quantization serves both); the scales kept are those with
//! the least held-out error seen, `s0` itself at step 0 (kept on ties), so the result is
//! never worse than `s0` on the held-out rows with `O` fixed. The smooth pass then checks
//! the kept scales again with the permutation recomputed from them, as the permute pass
//! will do, and keeps `s0` unless they still win there.

use crate::probe::{LayerError, Probe, SinkSample, apply};
use crate::transform::ChannelOp;
use ndarray::{Array2, Axis};
use perqc_ops::kernels::linalg::matmul_2d;
use rayon::prelude::*;

/// The learning rate of Adam on `log s` (see docs/smoothing-and-cat.md for the tuning).
pub const DEFAULT_LR: f64 = 0.01;

/// Half-width of the box around `log s0`: `ln 8`.
pub const BOX: f64 = 3.0 * std::f64::consts::LN_2;

/// How a region's scales are trained.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Training {
    /// Adam updates (0: no training).
    pub steps: usize,
    pub lr: f64,
}

/// What training gave one region.
#[derive(Clone, Debug)]
pub struct Trained {
    /// The kept scales (`s0` when no step lowered the held-out error).
    pub scales: Vec<f64>,
    /// The step they come from (0: `s0`).
    pub step: usize,
    /// The error with `O` fixed on the train rows and on the held-out rows: at `s0`, and
    /// at the kept scales.
    pub train: (LayerError, LayerError),
    pub held_out: (LayerError, LayerError),
}

/// Each sink's sampled rows split in two, `(train, held out)`: the rows ranked by the norm
/// of their product `‖y_r‖`, even ranks train, odd ranks held out (each half in row
/// order). Ranking first keeps the few rows that dominate the error on both sides: the
/// calibration samples every `T / 256`-th token, so with 512-token windows row `16 k` is
/// always a window's first token, whose down_proj input is orders of magnitude larger in
/// some layers; plain even/odd rows would put all of them in the train half. Every sink
/// needs at least two rows.
pub fn split_rows(sinks: &[SinkSample]) -> Result<(Vec<SinkSample>, Vec<SinkSample>), String> {
    let mut train = Vec::with_capacity(sinks.len());
    let mut held = Vec::with_capacity(sinks.len());
    for l in sinks {
        let r = l.x.nrows();
        if r < 2 {
            return Err(format!(
                "training needs at least 2 sampled rows per sink (one to train, one held out), got {r}"
            ));
        }
        let norms: Vec<f64> =
            l.y.rows()
                .into_iter()
                .map(|y| y.iter().map(|&v| f64::from(v) * f64::from(v)).sum())
                .collect();
        let mut ranked: Vec<usize> = (0..r).collect();
        ranked.sort_by(|&a, &b| norms[b].total_cmp(&norms[a]).then(a.cmp(&b)));
        let half = |parity: usize| {
            let mut rows: Vec<usize> = ranked.iter().copied().skip(parity).step_by(2).collect();
            rows.sort_unstable();
            SinkSample {
                x: l.x.select(Axis(0), &rows),
                w: l.w.clone(),
                y: l.y.select(Axis(0), &rows),
            }
        };
        train.push(half(0));
        held.push(half(1));
    }
    Ok((train, held))
}

/// `a` with column `j` times `f[j]`.
fn scale_columns(a: &Array2<f32>, f: &[f64]) -> Array2<f32> {
    let mut out = a.as_standard_layout().into_owned();
    for mut row in out.rows_mut() {
        for (v, &f) in row.iter_mut().zip(f) {
            *v = (f64::from(*v) * f) as f32;
        }
    }
    out
}

/// `out[j] = Σ_r a[r, j] b[r, j]`, in f64.
fn column_dots(a: &Array2<f32>, b: &Array2<f32>) -> Vec<f64> {
    let mut out = vec![0f64; a.ncols()];
    for (p, q) in a.rows().into_iter().zip(b.rows()) {
        for ((o, &x), &y) in out.iter_mut().zip(p).zip(q) {
            *o += f64::from(x) * f64::from(y);
        }
    }
    out
}

fn sum_sq(a: &Array2<f32>) -> f64 {
    a.iter().map(|&v| f64::from(v) * f64::from(v)).sum()
}

/// Blocks up to this size run as dense block products; a larger block (a full-width
/// Hadamard) through the mechanism's structured transform.
const DENSE_MAX: usize = 128;

/// Rows per parallel task of the dense-block map.
const ROWS_PER_TASK: usize = 16;

/// `O` acting on row vectors (each row of an `[M, K]` array is a vector of `K` channels,
/// `x̃ = O x` per row), and what the gradient needs of its adjoint `Oᵀ`. Both operands
/// live in rows: the sampled inputs `X`, and the weight's output channels `Wᵀ`
/// (`W̃ = O W'` is `W̃ᵀ = W'ᵀ Oᵀ`: each row of `W'ᵀ` through `O`; the weight's map `O⁻ᵀ`
/// is `O`, orthogonal).
enum RowMap {
    /// Permutations, then at most one map of equal `b x b` blocks (`b <= DENSE_MAX`): a
    /// gather of the channels (`(P x)[i] = x[perm[i]]`), then `Q` on each run of `b`.
    Blocked {
        perm: Vec<usize>,
        /// `b`, `Q` and `Qᵀ` row-major, if any block map.
        block: Option<(usize, Vec<f32>, Vec<f32>)>,
    },
    /// Anything else: each map through [`ChannelOp::apply`], the transposes for `Oᵀ`.
    Ops {
        forward: Vec<ChannelOp>,
        adjoint: Vec<ChannelOp>,
    },
}

impl RowMap {
    /// The map of the chain `ops` (first to last) on `dim` channels; every map must be
    /// orthogonal.
    fn new(ops: &[ChannelOp], dim: usize, dense_max: usize) -> Result<RowMap, String> {
        for op in ops {
            if op.dim() != dim {
                return Err(format!(
                    "a map on {} channels for a layer reading {dim}",
                    op.dim()
                ));
            }
            if !op.is_orthogonal(1e-9) {
                return Err("the maps after smoothing must be orthogonal to train".into());
            }
        }
        Ok(
            Self::blocked(ops, dim, dense_max).unwrap_or_else(|| RowMap::Ops {
                forward: ops.to_vec(),
                adjoint: ops.iter().rev().map(ChannelOp::transpose).collect(),
            }),
        )
    }

    /// The chain as permutations then one map of equal small blocks, if it is one.
    fn blocked(ops: &[ChannelOp], dim: usize, dense_max: usize) -> Option<RowMap> {
        let mut perm: Vec<usize> = (0..dim).collect();
        let mut block = None;
        for op in ops {
            match (op, &block) {
                // P2 P1 x: (P1 x)[p2[i]] = x[p1[p2[i]]].
                (ChannelOp::Permutation(p2), None) => {
                    perm = p2.iter().map(|&i| perm[i]).collect();
                }
                (ChannelOp::Hadamard(h), None) if h.order() <= dense_max => {
                    block = Some((h.order(), h.dense_block()));
                }
                (ChannelOp::Blocks { size, blocks }, None)
                    if *size <= dense_max && blocks.windows(2).all(|w| w[0] == w[1]) =>
                {
                    block = Some((*size, blocks.first()?.clone()));
                }
                _ => return None,
            }
        }
        let block = block.map(|(b, q): (usize, Vec<f64>)| {
            let qt = (0..b * b).map(|k| q[(k % b) * b + k / b] as f32).collect();
            (b, q.into_iter().map(|v| v as f32).collect(), qt)
        });
        Some(RowMap::Blocked { perm, block })
    }

    /// Each row of `a diag(scale)` through `O`.
    fn forward(&self, a: &Array2<f32>, scale: &[f64]) -> Result<Array2<f32>, String> {
        let (perm, block) = match self {
            RowMap::Ops { forward, .. } => return through(scale_columns(a, scale), forward),
            RowMap::Blocked { perm, block } => (perm, block),
        };
        let a = a.as_standard_layout();
        let k = perm.len();
        let mut out = Array2::<f32>::zeros(a.dim());
        let (src, dst) = (
            a.as_slice().expect("standard"),
            out.as_slice_mut().expect("standard"),
        );
        dst.par_chunks_mut(k * ROWS_PER_TASK)
            .zip(src.par_chunks(k * ROWS_PER_TASK))
            .for_each(|(dst, src)| {
                let mut g = vec![0f32; k];
                for (y, x) in dst.chunks_exact_mut(k).zip(src.chunks_exact(k)) {
                    for (g, &j) in g.iter_mut().zip(perm) {
                        *g = (f64::from(x[j]) * scale[j]) as f32;
                    }
                    match block {
                        // Q x per run is x Qᵀ in rows.
                        Some((b, _, qt)) => runs_times(&g, qt, *b, y),
                        None => y.copy_from_slice(&g),
                    }
                }
            });
        Ok(out)
    }

    /// `out[j] = Σ_r (Oᵀ g_r)[j] · with[r, j]` over the rows `g_r` of `g`: a gradient taken
    /// back through `O` and contracted with the operand it multiplied.
    fn adjoint_dots(&self, g: &Array2<f32>, with: &Array2<f32>) -> Result<Vec<f64>, String> {
        let (perm, block) = match self {
            RowMap::Ops { adjoint, .. } => {
                return Ok(column_dots(&through(g.to_owned(), adjoint)?, with));
            }
            RowMap::Blocked { perm, block } => (perm, block),
        };
        let (g, with) = (g.as_standard_layout(), with.as_standard_layout());
        let k = perm.len();
        let (g, with) = (
            g.as_slice().expect("standard"),
            with.as_slice().expect("standard"),
        );
        let partial = g
            .par_chunks(k * ROWS_PER_TASK)
            .zip(with.par_chunks(k * ROWS_PER_TASK))
            .map(|(g, with)| {
                let mut out = vec![0f64; k];
                let mut t = vec![0f32; k];
                for (g, w) in g.chunks_exact(k).zip(with.chunks_exact(k)) {
                    match block {
                        // Qᵀ y per run is y Q in rows.
                        Some((b, q, _)) => runs_times(g, q, *b, &mut t),
                        None => t.copy_from_slice(g),
                    }
                    // (Pᵀ z)[perm[i]] = z[i].
                    for (&z, &j) in t.iter().zip(perm) {
                        out[j] += f64::from(z) * f64::from(w[j]);
                    }
                }
                out
            })
            .reduce(
                || vec![0f64; k],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        Ok(partial)
    }
}

/// `y_run = x_run M` for each run of `b` values (`M` row-major `b x b`): the rows of `M`
/// added up lane by lane, in code compiled for AVX-512 or AVX2 with FMA when the CPU has
/// them.
fn runs_times(x: &[f32], m: &[f32], b: usize, y: &mut [f32]) {
    #[inline(always)]
    fn body(x: &[f32], m: &[f32], b: usize, y: &mut [f32]) {
        y.fill(0.0);
        for (y, x) in y.chunks_exact_mut(b).zip(x.chunks_exact(b)) {
            for (&xj, row) in x.iter().zip(m.chunks_exact(b)) {
                y.iter_mut().zip(row).for_each(|(y, m)| *y += m * xj);
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn wide(x: &[f32], m: &[f32], b: usize, y: &mut [f32]) {
            body(x, m, b, y)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fast(x: &[f32], m: &[f32], b: usize, y: &mut [f32]) {
            body(x, m, b, y)
        }
        let fma = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        if fma && std::arch::is_x86_feature_detected!("avx512f") {
            // Safety: the features were just detected.
            return unsafe { wide(x, m, b, y) };
        }
        if fma {
            // Safety: the features were just detected.
            return unsafe { fast(x, m, b, y) };
        }
    }
    body(x, m, b, y)
}

/// Each row of `a` through the maps `ops`, first to last.
fn through(mut a: Array2<f32>, ops: &[ChannelOp]) -> Result<Array2<f32>, String> {
    for op in ops {
        a = apply(&a, op, 1)?;
    }
    Ok(a)
}

/// One sink as training reads it: the weight as rows of output channels (`Wᵀ`, `[N, K]`)
/// and the two halves of its sampled rows.
struct Sink<'a> {
    wt: Array2<f32>,
    train: &'a SinkSample,
    held: &'a SinkSample,
}

/// The errors at scales `s` on the train and held-out rows, and `∂L/∂u` of the train
/// loss (relative to the train signal) when `grad` is asked for.
fn evaluate(
    sinks: &[Sink],
    s: &[f64],
    map: &RowMap,
    probe: &Probe,
    grad: bool,
) -> Result<(LayerError, LayerError, Option<Vec<f64>>), String> {
    let threads = rayon::current_num_threads();
    let k = s.len();
    let inv: Vec<f64> = s.iter().map(|v| 1.0 / v).collect();
    let (mut e_train, mut e_held) = (LayerError::default(), LayerError::default());
    let (mut g_s, mut g_inv) = (vec![0f64; k], vec![0f64; k]);
    for sink in sinks {
        // W̃ᵀ = Wᵀ diag(s) Oᵀ and its quantization serve both halves.
        let wq = probe.quantize_weight_rows(map.forward(&sink.wt, s)?.view())?;
        // Ŷ = Q_a(X̃) Q_w(W̃), X̃ = X diag(1/s) Oᵀ; the error and E = Y - Ŷ.
        let forward = |l: &SinkSample| -> Result<_, String> {
            let xq = probe.quantize_rows(map.forward(&l.x, &inv)?);
            let e = &l.y - &matmul_2d(xq.view(), wq.t(), threads);
            let err = LayerError {
                signal: sum_sq(&l.y),
                error: sum_sq(&e),
            };
            Ok((xq, e, err))
        };
        let (_, _, eh) = forward(sink.held)?;
        e_held.signal += eh.signal;
        e_held.error += eh.error;
        let (xq, e, et) = forward(sink.train)?;
        e_train.signal += et.signal;
        e_train.error += et.error;
        if !grad {
            continue;
        }
        let (gi, gs) = diagonal_gradients(&sink.train.x, &sink.wt, &xq, &wq, &e, map)?;
        g_inv.iter_mut().zip(gi).for_each(|(a, d)| *a += d);
        g_s.iter_mut().zip(gs).for_each(|(a, d)| *a += d);
    }
    let grad = grad.then(|| log_scale_gradient(s, &g_s, &g_inv, e_train.signal));
    Ok((e_train, e_held, grad))
}

/// One sink's `(g_inv, g_s)` up to the factor -2: with `E = Y - Xq Wqᵀ` (`xq = Q_a(X̃)`,
/// `wq = Q_w(W̃)ᵀ`, both `[., K]` rows), straight through:
///
/// - `∂L/∂X̃ = E Wq`, each row back through `Oᵀ` and dotted with `X`'s columns;
/// - `∂L/∂W̃ = Xqᵀ E`, so `g_s,j = Σ_n (Oᵀ Xqᵀ E)[j, n] W[j, n]
///   = Σ_r (Oᵀ xq_r)[j] Z[r, j]` with `Z = E W_onnxᵀ = E wt` (`wt = Wᵀ`): the rows of `Xq`
///   back through `Oᵀ`, dotted with `Z`'s columns. `Z` is `[R, K]`, never the `[K, N]`
///   gradient itself.
fn diagonal_gradients(
    x: &Array2<f32>,
    wt: &Array2<f32>,
    xq: &Array2<f32>,
    wq: &Array2<f32>,
    e: &Array2<f32>,
    map: &RowMap,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    let threads = rayon::current_num_threads();
    let g_inv = map.adjoint_dots(&matmul_2d(e.view(), wq.view(), threads), x)?;
    let g_s = map.adjoint_dots(xq, &matmul_2d(e.view(), wt.view(), threads))?;
    Ok((g_inv, g_s))
}

/// `∂L/∂u_j = s_j g_s,j - g_inv,j / s_j` with the factor -2 of `∂‖E‖²/∂Ŷ` and the loss
/// taken relative to `signal`.
fn log_scale_gradient(s: &[f64], g_s: &[f64], g_inv: &[f64], signal: f64) -> Vec<f64> {
    let c = if signal > 0.0 { -2.0 / signal } else { 0.0 };
    s.iter()
        .zip(g_s.iter().zip(g_inv))
        .map(|(s, (gs, gi))| c * (s * gs - gi / s))
        .collect()
}

/// Adam's moments.
struct Adam {
    lr: f64,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl Adam {
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(n: usize, lr: f64) -> Adam {
        Adam {
            lr,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    /// One step of `u` against `g`, then `u` projected into `[lo, hi]`.
    fn step(&mut self, u: &mut [f64], g: &[f64], lo: &[f64], hi: &[f64]) {
        self.t += 1;
        let (c1, c2) = (1.0 - Self::B1.powi(self.t), 1.0 - Self::B2.powi(self.t));
        for j in 0..u.len() {
            self.m[j] = Self::B1 * self.m[j] + (1.0 - Self::B1) * g[j];
            self.v[j] = Self::B2 * self.v[j] + (1.0 - Self::B2) * g[j] * g[j];
            let step = self.lr * (self.m[j] / c1) / ((self.v[j] / c2).sqrt() + Self::EPS);
            u[j] = (u[j] - step).clamp(lo[j], hi[j]);
        }
    }
}

/// Trains the scales from `s0` on `train`, keeping the best on `held` (the two halves of
/// [`split_rows`]), with the orthogonal maps `orth` after the smoothing held fixed.
pub fn train(
    train: &[SinkSample],
    held: &[SinkSample],
    s0: &[f64],
    orth: &[ChannelOp],
    probe: &Probe,
    cfg: Training,
) -> Result<Trained, String> {
    let k = s0.len();
    if let Some(v) = s0.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
        return Err(format!("a starting scale is {v}, not a positive number"));
    }
    if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
        return Err(format!("the learning rate {} is not positive", cfg.lr));
    }
    if train.len() != held.len() || train.is_empty() {
        return Err("training needs the same sinks in both halves of the rows".into());
    }
    for l in train.iter().chain(held) {
        if l.x.ncols() != k || l.w.nrows() != k || l.y.dim() != (l.x.nrows(), l.w.ncols()) {
            return Err(format!(
                "a sink's rows {:?}, weight {:?} and product {:?} do not fit {k} channels",
                l.x.dim(),
                l.w.dim(),
                l.y.dim()
            ));
        }
    }
    let map = RowMap::new(orth, k, DENSE_MAX)?;
    let sinks: Vec<Sink> = train
        .iter()
        .zip(held)
        .map(|(t, h)| Sink {
            wt: t.w.t().as_standard_layout().into_owned(),
            train: t,
            held: h,
        })
        .collect();
    let u0: Vec<f64> = s0.iter().map(|v| v.ln()).collect();
    let lo: Vec<f64> = u0.iter().map(|u| u - BOX).collect();
    let hi: Vec<f64> = u0.iter().map(|u| u + BOX).collect();
    let mut u = u0;
    let mut adam = Adam::new(k, cfg.lr);
    let mut start = None;
    let mut best: Option<Trained> = None;
    for step in 0..=cfg.steps {
        // Step 0 is s0 itself, not exp(log s0).
        let s: Vec<f64> = if step == 0 {
            s0.to_vec()
        } else {
            u.iter().map(|v| v.exp()).collect()
        };
        let (et, eh, grad) = evaluate(&sinks, &s, &map, probe, step < cfg.steps)?;
        let (t0, h0) = *start.get_or_insert((et, eh));
        if best.as_ref().is_none_or(|b| eh.error < b.held_out.1.error) {
            best = Some(Trained {
                scales: s,
                step,
                train: (t0, et),
                held_out: (h0, eh),
            });
        }
        let Some(g) = grad else { break };
        if let Some(j) = g.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "the gradient of channel {j} is not finite at step {step}"
            ));
        }
        adam.step(&mut u, &g, &lo, &hi);
    }
    Ok(best.expect("step 0 is evaluated"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeded uniform generator in [-0.5, 0.5).
    fn uniform(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
    }

    /// Rows with outlier channels (a few tokens far out on channels 3 and 17, channel 40
    /// large everywhere), a weight with a heavy input row, and `Y = X W`.
    fn sink(rows: usize, k: usize, n: usize, seed: u64) -> SinkSample {
        let mut r = uniform(seed);
        let x = Array2::from_shape_fn((rows, k), |(i, c)| {
            let v = r();
            match c {
                3 if i % 7 == 0 => 60.0 * v,
                17 if i % 11 == 0 => 40.0 * v,
                40 => 12.0 * v,
                _ => v,
            }
        });
        let w = Array2::from_shape_fn((k, n), |(c, _)| if c == 9 { 8.0 * r() } else { r() });
        let y = x.dot(&w);
        SinkSample { x, w, y }
    }

    fn w4a4() -> Probe {
        Probe::w_int_a_int(4, Some(4))
    }

    /// The orthogonal part the recipe puts after smoothing: a permutation, then a block
    /// Hadamard.
    fn orth(k: usize) -> Vec<ChannelOp> {
        let perm: Vec<usize> = (0..k).map(|i| (i * 5 + 3) % k).collect();
        vec![
            ChannelOp::Permutation(perm),
            ChannelOp::hadamard(k, 16, None).unwrap(),
        ]
    }

    /// The dense-block map and the mechanism's maps agree, forward and adjoint, and the
    /// adjoint is the transpose: `Σ_r ⟨O x_r, y_r⟩ = Σ_r ⟨x_r, Oᵀ y_r⟩`.
    #[test]
    fn row_maps_agree_and_the_adjoint_is_the_transpose() {
        let k = 64;
        let ops = orth(k);
        let (blocked, by_ops) = (
            RowMap::new(&ops, k, DENSE_MAX).unwrap(),
            RowMap::new(&ops, k, 0).unwrap(),
        );
        assert!(matches!(blocked, RowMap::Blocked { .. }));
        assert!(matches!(by_ops, RowMap::Ops { .. }));
        let (x, y) = (sink(40, k, 1, 1).x, sink(40, k, 1, 2).x);
        let s: Vec<f64> = (0..k).map(|j| 1.0 + j as f64 / 10.0).collect();
        let (a, b) = (
            blocked.forward(&x, &s).unwrap(),
            by_ops.forward(&x, &s).unwrap(),
        );
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * a.abs().max(1.0);
        assert!(
            a.iter()
                .zip(&b)
                .all(|(a, b)| close(f64::from(*a), f64::from(*b)))
        );
        let (da, db) = (
            blocked.adjoint_dots(&y, &x).unwrap(),
            by_ops.adjoint_dots(&y, &x).unwrap(),
        );
        assert!(
            da.iter().zip(&db).all(|(a, b)| close(*a, *b)),
            "{da:?} {db:?}"
        );
        let ox = blocked.forward(&x, &vec![1.0; k]).unwrap();
        let lhs: f64 = ox.iter().zip(&y).map(|(a, b)| f64::from(a * b)).sum();
        let rhs: f64 = da.iter().sum();
        assert!(close(lhs, rhs), "{lhs} vs {rhs}");
    }

    /// The chain rule is exact where the straight-through estimator is the true
    /// derivative: for "quantizers" that add fixed noise (`Q_a(X̃) = X̃ + Na`,
    /// `Q_w(W̃) = W̃ + Nw`), the gradient matches central differences of the loss along
    /// a random direction, through either kind of map.
    #[test]
    fn gradient_matches_finite_differences_with_additive_noise() {
        let (k, n) = (64, 24);
        let l = sink(20, k, n, 3);
        let wt = l.w.t().as_standard_layout().into_owned();
        let ops = orth(k);
        for map in [
            RowMap::new(&ops, k, DENSE_MAX).unwrap(),
            RowMap::new(&ops, k, 0).unwrap(),
        ] {
            let mut r = uniform(9);
            let na = Array2::from_shape_fn((20, k), |_| 0.2 * r());
            let nw = Array2::from_shape_fn((n, k), |_| 0.2 * r());
            // The noisy product at u; the loss in f64.
            let forward = |u: &[f64]| {
                let s: Vec<f64> = u.iter().map(|v| v.exp()).collect();
                let inv: Vec<f64> = s.iter().map(|v| 1.0 / v).collect();
                let xq = map.forward(&l.x, &inv).unwrap() + &na;
                let wq = map.forward(&wt, &s).unwrap() + &nw;
                let e = l.y.mapv(f64::from) - xq.mapv(f64::from).dot(&wq.mapv(f64::from).t());
                (s, xq, wq, e)
            };
            let loss = |u: &[f64]| forward(u).3.iter().map(|v| v * v).sum::<f64>() / sum_sq(&l.y);
            let u: Vec<f64> = (0..k).map(|_| 2.0 * f64::from(r())).collect();
            let (s, xq, wq, e) = forward(&u);
            let e = e.mapv(|v| v as f32);
            let (gi, gs) = diagonal_gradients(&l.x, &wt, &xq, &wq, &e, &map).unwrap();
            let grad = log_scale_gradient(&s, &gs, &gi, sum_sq(&l.y));
            let v: Vec<f64> = (0..k).map(|_| f64::from(r())).collect();
            let h = 1e-3;
            let at = |t: f64| -> Vec<f64> { u.iter().zip(&v).map(|(a, b)| a + t * b).collect() };
            let numeric = (loss(&at(h)) - loss(&at(-h))) / (2.0 * h);
            let analytic: f64 = grad.iter().zip(&v).map(|(g, v)| g * v).sum();
            assert!(
                numeric.abs() > 1e-3,
                "a direction the loss moves along: {numeric}"
            );
            assert!(
                (numeric - analytic).abs() <= 0.01 * numeric.abs(),
                "{numeric} vs {analytic}"
            );
            // One wrong sign in the diagonal's chain rule is far off.
            let flipped: Vec<f64> = gi.iter().map(|g| -g).collect();
            let wrong = log_scale_gradient(&s, &gs, &flipped, sum_sq(&l.y));
            let wrong: f64 = wrong.iter().zip(&v).map(|(g, v)| g * v).sum();
            assert!((numeric - wrong).abs() > 0.05 * numeric.abs());
        }
    }

    /// On outlier-heavy data training lowers the held-out error from `s0 = 1` and from
    /// smoothing-like scales, and never raises it; its train error falls too.
    #[test]
    fn training_lowers_the_held_out_error() {
        let (k, n) = (64, 32);
        let sinks = [sink(256, k, n, 1), sink(256, k, n, 2)];
        let (train_rows, held) = split_rows(&sinks).unwrap();
        let ops = orth(k);
        let probe = w4a4();
        let ones = vec![1.0; k];
        // SmoothQuant-like s0 from the column maxima (alpha 0.5).
        let amax: Vec<f64> = (0..k)
            .map(|j| {
                sinks[0]
                    .x
                    .column(j)
                    .iter()
                    .fold(0f64, |m, v| m.max(f64::from(v.abs())))
            })
            .collect();
        let smooth: Vec<f64> = amax.iter().map(|a| a.sqrt()).collect();
        for s0 in [&ones, &smooth] {
            let cfg = Training {
                steps: 60,
                lr: 0.05,
            };
            let t = train(&train_rows, &held, s0, &ops, &probe, cfg).unwrap();
            let (h0, h1) = t.held_out;
            assert!(t.step > 0, "no step helped: {h0:?}");
            assert!(
                h1.relative() < 0.9 * h0.relative(),
                "held out {} -> {}",
                h0.relative(),
                h1.relative()
            );
            assert!(t.train.1.error < t.train.0.error);
            // In the box.
            for (s, s0) in t.scales.iter().zip(s0.iter()) {
                assert!((s / s0).ln().abs() <= BOX + 1e-9);
            }
            // Step 0 is s0's probed error with the same chain (up to the f32 dense blocks'
            // round-off).
            let mut chain = vec![ChannelOp::Diagonal(s0.iter().map(|v| 1.0 / v).collect())];
            chain.extend(ops.iter().cloned());
            let direct = probe.region_error(&held, &chain).unwrap();
            assert!(
                (direct.error - h0.error).abs() <= 1e-3 * h0.error,
                "{direct:?} {h0:?}"
            );
        }
        // Zero steps keep s0.
        let cfg = Training { steps: 0, lr: 0.01 };
        let t = train(&train_rows, &held, &ones, &ops, &probe, cfg).unwrap();
        assert_eq!((t.step, t.scales.as_slice()), (0, ones.as_slice()));
    }

    /// A learning rate far too large moves the scales to the box's walls; what is kept is
    /// still never worse than s0 on the held-out rows.
    #[test]
    fn the_held_out_rows_guard_against_a_bad_run() {
        let (k, n) = (64, 16);
        let sinks = [sink(64, k, n, 5)];
        let (train_rows, held) = split_rows(&sinks).unwrap();
        let cfg = Training { steps: 20, lr: 3.0 };
        let t = train(&train_rows, &held, &vec![1.0; k], &orth(k), &w4a4(), cfg).unwrap();
        assert!(t.held_out.1.error <= t.held_out.0.error);
    }

    /// Rows far larger than the rest at a stride (a window's first token) are shared by
    /// the two halves; plain even/odd rows would put them all in one.
    #[test]
    fn the_split_shares_the_largest_rows() {
        let mut r = uniform(7);
        let x = Array2::from_shape_fn(
            (64, 16),
            |(i, _)| {
                if i % 16 == 0 { 100.0 * r() } else { r() }
            },
        );
        let w = Array2::from_shape_fn((16, 4), |_| r());
        let l = SinkSample { y: x.dot(&w), x, w };
        let sq = |y: ndarray::ArrayView1<f32>| y.iter().map(|v| v * v).sum::<f32>();
        let usual =
            l.y.rows()
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i % 16 != 0)
                .map(|(_, y)| sq(y))
                .fold(0f32, f32::max);
        let (t, h) = split_rows(std::slice::from_ref(&l)).unwrap();
        let big = |s: &SinkSample| {
            s.y.rows()
                .into_iter()
                .filter(|y| sq(*y) > 100.0 * usual)
                .count()
        };
        assert_eq!((t[0].x.nrows(), h[0].x.nrows()), (32, 32));
        assert_eq!((big(&t[0]), big(&h[0])), (2, 2));
        // Each half keeps its rows' pairing of x and y.
        let d = (&t[0].x.dot(&l.w) - &t[0].y)
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        assert!(d < 1e-3, "{d}");
    }

    #[test]
    fn bad_input_is_an_error() {
        let (k, n) = (32, 8);
        let sinks = [sink(8, k, n, 1)];
        let (tr, he) = split_rows(&sinks).unwrap();
        let ops = vec![ChannelOp::hadamard(k, 16, None).unwrap()];
        let probe = w4a4();
        let cfg = Training { steps: 2, lr: 0.01 };
        let mut s0 = vec![1.0; k];
        s0[3] = 0.0;
        let e = train(&tr, &he, &s0, &ops, &probe, cfg).unwrap_err();
        assert!(e.contains("not a positive number"), "{e}");
        let e = train(&tr, &he, &[1.0; 16], &ops, &probe, cfg).unwrap_err();
        assert!(e.contains("do not fit 16 channels"), "{e}");
        let scale = vec![ChannelOp::Diagonal(vec![2.0; k])];
        let e = train(&tr, &he, &[1.0; 32], &scale, &probe, cfg).unwrap_err();
        assert!(e.contains("orthogonal"), "{e}");
        let bad_lr = Training { steps: 2, lr: 0.0 };
        let e = train(&tr, &he, &[1.0; 32], &ops, &probe, bad_lr).unwrap_err();
        assert!(e.contains("learning rate"), "{e}");
        let one = [SinkSample {
            x: sinks[0].x.slice(ndarray::s![..1, ..]).to_owned(),
            w: sinks[0].w.clone(),
            y: sinks[0].y.slice(ndarray::s![..1, ..]).to_owned(),
        }];
        assert!(split_rows(&one).unwrap_err().contains("at least 2"));
    }
}
