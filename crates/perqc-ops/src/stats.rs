//! Streaming per-channel statistics of activations (calibration data).
//!
//! [`ChannelStats`] sees activations batch by batch as `[rows, channels]` (every axis but the
//! last flattened into rows: tokens) and keeps only running sums, so its memory depends on
//! the channel count, never on how many tokens it has seen. All sums are f64.
//!
//! Per channel c over all rows r: count, sum |x|, max |x|, sum x^2, and a quantile sketch of
//! |x|. On request: per-block second moments M_k = sum_r x_{r,B_k} x_{r,B_k}^T (b x b, for
//! blocks B_k of `b` consecutive channels), the full Gram matrix G = X^T X (for GPTQ) and,
//! for a per-token quantizer Q read by linears, the cross product E = (X - Q(X))^T Q(X) of
//! its rounding error with its output (GPTQ's correction for a quantized input).
//!
//! The runtime's `ChannelObserver` (perqc-runtime, `observe.rs`) feeds these from a running
//! session; passes receive them through `perqc_passes::calibration::Calibration`.

use ndarray::{Array2, ArrayView2, Axis};

crate::kernels::vmath::multiversion! {
    /// One row into the per-channel sums: `sum_abs += |x|`, `sum_sq += x²` (in f64), and
    /// `max_abs = max(max_abs, |x|)` (a NaN never replaces the maximum). Channel by channel
    /// in row order, so the sums are the same at every vector width.
    fn moments(row: &[f32], sum_abs: &mut [f64], sum_sq: &mut [f64], max_abs: &mut [f32]) {
        let sums = sum_abs.iter_mut().zip(sum_sq.iter_mut());
        for ((sa, sq), (mx, &v)) in sums.zip(max_abs.iter_mut().zip(row)) {
            let a = v.abs();
            *sa += a as f64;
            *sq += (v as f64) * (v as f64);
            // `max` keeps the other operand when one is NaN; a select here compiles to
            // a masked store per vector, several times slower.
            *mx = mx.max(a);
        }
    }
}

/// The |x| histogram: log-spaced bins, `SUB` per octave, covering [2^MIN_EXP, 2^MAX_EXP).
/// A quantile read from it is exact up to one bin: a relative error of 2^(1/SUB) - 1
/// (4.4%). Values below the range land in bin 0 (reported as 0), above it in the last bin.
const SUB: usize = 16;
/// The range is about float16's (2^-16 .. 2^16), what these models' activations live in:
/// 513 counters per channel (95 MB for SmolLM2's 30 down_proj inputs of 1536 channels).
const MIN_EXP: i32 = -16;
const MAX_EXP: i32 = 16;
const BINS: usize = (MAX_EXP - MIN_EXP) as usize * SUB + 1;

/// What to collect besides the always-on per-channel moments.
#[derive(Clone, Debug, Default)]
pub struct StatsOptions {
    /// Keep the |x| quantile sketch (BINS counters per channel).
    pub quantiles: bool,
    /// Block size for per-block second moments; must divide the channel count.
    pub block_moments: Option<usize>,
    /// Accumulate the full Gram matrix X^T X.
    pub gram: bool,
    /// Accumulate E = (X - Q(X))^T Q(X) for this per-token quantizer Q, computed here with
    /// the runtime's `FakeQuantize` arithmetic (so Q(X) is what the linears read), over a
    /// stratified sample of each batch's rows (`quant_error_rows`), in f32.
    pub quant_error: Option<crate::quant::TokenQuant>,
    /// Keep every `n`-th row seen (rows 0, n, 2n, ... in arrival order) whole: a fixed,
    /// deterministic subsample for searches that need actual rows (a clip ratio chosen on
    /// output error). 0 keeps none.
    pub sample_every: usize,
    /// Keep every `n`-th row (counted as for `sample_every`) as its profile: each |x| over
    /// the row's largest, in 255ths (rounded). A quarter of a kept row, for choices that
    /// read which channels carry each token's energy (the `tokenmax` permutation). Rows
    /// with a non-finite value are left out. 0 keeps none.
    pub profile_every: usize,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StatsError {
    #[error("batch has {got} channels, the observer was made for {want}")]
    Channels { got: usize, want: usize },
    #[error("block size {block} does not divide {channels} channels")]
    Block { block: usize, channels: usize },
    #[error("channel {channel}: divisor {value} is not positive and finite")]
    Divisor { channel: usize, value: f64 },
}

/// Running statistics of one value, per channel (its last axis).
#[derive(Clone, Debug)]
pub struct ChannelStats {
    channels: usize,
    rows: u64,
    sum_abs: Vec<f64>,
    max_abs: Vec<f32>,
    sum_sq: Vec<f64>,
    /// `[channels, BINS]` counts, if quantiles were requested.
    hist: Option<Vec<u32>>,
    /// Per channel, what the histogram's values are to be multiplied by (1 until
    /// [`ChannelStats::divide_channels`]; its bins stay those of the values seen).
    hist_scale: Vec<f64>,
    block: Option<(usize, Vec<f64>)>,
    gram: Option<Array2<f64>>,
    quant_error: Option<(crate::quant::TokenQuant, Array2<f32>)>,
    sample_every: usize,
    /// The kept rows, row-major `[kept, channels]`.
    samples: Vec<f32>,
    profile_every: usize,
    /// The kept profiles, row-major `[kept, channels]`.
    profiles: Vec<u8>,
}

impl ChannelStats {
    pub fn new(channels: usize, opts: &StatsOptions) -> Result<ChannelStats, StatsError> {
        let block = match opts.block_moments {
            Some(b) if b == 0 || !channels.is_multiple_of(b) => {
                return Err(StatsError::Block { block: b, channels });
            }
            Some(b) => Some((b, vec![0.0; channels * b])),
            None => None,
        };
        Ok(ChannelStats {
            channels,
            rows: 0,
            sum_abs: vec![0.0; channels],
            max_abs: vec![0.0; channels],
            sum_sq: vec![0.0; channels],
            hist: opts.quantiles.then(|| vec![0; channels * BINS]),
            hist_scale: vec![1.0; channels],
            block,
            gram: opts.gram.then(|| Array2::zeros((channels, channels))),
            quant_error: opts
                .quant_error
                .map(|q| (q, Array2::zeros((channels, channels)))),
            sample_every: opts.sample_every,
            samples: Vec::new(),
            profile_every: opts.profile_every,
            profiles: Vec::new(),
        })
    }

    /// Adds a batch of rows.
    pub fn update(&mut self, x: ArrayView2<f32>) -> Result<(), StatsError> {
        let (rows, c) = x.dim();
        if c != self.channels {
            return Err(StatsError::Channels {
                got: c,
                want: self.channels,
            });
        }
        for r in kept(self.rows, rows, self.sample_every) {
            self.samples.extend(x.row(r).iter());
        }
        for r in kept(self.rows, rows, self.profile_every) {
            push_profile(x.row(r), &mut self.profiles);
        }
        if let Some((q, e)) = &mut self.quant_error {
            let (residual, xq) = quant_error_rows(x, *q);
            let threads = rayon::current_num_threads();
            crate::kernels::linalg::matmul_2d_add(residual.t(), xq.view(), e, threads);
        }
        self.rows += rows as u64;
        for row in x.axis_iter(Axis(0)) {
            match row.as_slice() {
                Some(r) => moments(r, &mut self.sum_abs, &mut self.sum_sq, &mut self.max_abs),
                None => {
                    let r: Vec<f32> = row.iter().copied().collect();
                    moments(&r, &mut self.sum_abs, &mut self.sum_sq, &mut self.max_abs);
                }
            }
            if let Some(h) = &mut self.hist {
                for (ch, &v) in row.iter().enumerate() {
                    h[ch * BINS + bin(v.abs())] += 1;
                }
            }
        }
        if let Some((b, m)) = &mut self.block {
            let b = *b;
            // M_k[i][j] += sum_r x[r, kb+i] x[r, kb+j]; a batch product in f32, then summed
            // into the f64 accumulator.
            for k in 0..self.channels / b {
                let xb = x.slice(ndarray::s![.., k * b..(k + 1) * b]);
                let prod = xb.t().dot(&xb);
                for (acc, p) in m[k * b * b..(k + 1) * b * b].iter_mut().zip(prod.iter()) {
                    *acc += *p as f64;
                }
            }
        }
        if let Some(g) = &mut self.gram {
            gram_update(x, g);
        }
        Ok(())
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Rows (tokens) seen.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Mean |x| per channel (what MassDiff sorts by).
    pub fn mean_abs(&self) -> Vec<f64> {
        let n = self.rows.max(1) as f64;
        self.sum_abs.iter().map(|s| s / n).collect()
    }

    pub fn max_abs(&self) -> &[f32] {
        &self.max_abs
    }

    pub fn sum_abs(&self) -> &[f64] {
        &self.sum_abs
    }

    pub fn sum_sq(&self) -> &[f64] {
        &self.sum_sq
    }

    /// Root mean square per channel.
    pub fn rms(&self) -> Vec<f64> {
        let n = self.rows.max(1) as f64;
        self.sum_sq.iter().map(|s| (s / n).sqrt()).collect()
    }

    /// The `q`-quantile of |x| per channel (the smallest bin edge below which a fraction
    /// >= q of the values fall), if quantiles were requested.
    pub fn abs_quantile(&self, q: f64) -> Option<Vec<f32>> {
        let h = self.hist.as_ref()?;
        let target = (q.clamp(0.0, 1.0) * self.rows as f64).ceil().max(1.0) as u64;
        Some(
            (0..self.channels)
                .map(|ch| {
                    let mut seen = 0u64;
                    for (i, &n) in h[ch * BINS..(ch + 1) * BINS].iter().enumerate() {
                        seen += n as u64;
                        if seen >= target {
                            let q = (f64::from(bin_upper(i)) * self.hist_scale[ch]) as f32;
                            return q.min(self.max_abs[ch]);
                        }
                    }
                    self.max_abs[ch]
                })
                .collect(),
        )
    }

    /// Turns these into the statistics of `x_c / s_c`, as if the values had been divided
    /// channel by channel before they were seen (a smoothing scale folded into the
    /// weights): sums of |x| and the maxima divide by `s_c`, second moments by `s_i s_j`,
    /// kept rows by `s_c`; quantiles divide by `s_c` when read. Every `s_c` must be
    /// positive and finite.
    pub fn divide_channels(&mut self, s: &[f64]) -> Result<(), StatsError> {
        if s.len() != self.channels {
            return Err(StatsError::Channels {
                got: s.len(),
                want: self.channels,
            });
        }
        if let Some((channel, &value)) = s
            .iter()
            .enumerate()
            .find(|(_, d)| !(d.is_finite() && **d > 0.0))
        {
            return Err(StatsError::Divisor { channel, value });
        }
        let c = self.channels;
        for (ch, &d) in s.iter().enumerate() {
            self.sum_abs[ch] /= d;
            self.sum_sq[ch] /= d * d;
            self.max_abs[ch] = (f64::from(self.max_abs[ch]) / d) as f32;
            self.hist_scale[ch] /= d;
        }
        for row in self.samples.chunks_mut(c.max(1)) {
            for (x, d) in row.iter_mut().zip(s) {
                *x = (f64::from(*x) / d) as f32;
            }
        }
        divide_profiles(&mut self.profiles, s);
        if let Some((b, m)) = &mut self.block {
            let b = *b;
            for (k, blk) in m.chunks_mut(b * b).enumerate() {
                for i in 0..b {
                    for j in 0..b {
                        blk[i * b + j] /= s[k * b + i] * s[k * b + j];
                    }
                }
            }
        }
        if let Some(g) = &mut self.gram {
            for ((i, j), v) in g.indexed_iter_mut() {
                *v /= s[i] * s[j];
            }
        }
        // Rounding does not commute with a channel scale: the error of the scaled values
        // is not known from these sums.
        self.quant_error = None;
        Ok(())
    }

    /// Frees the quantile sketch and the kept rows (the sums, maxima, second moments and
    /// profiles stay): what a consumer does once it has read them, so that later work does
    /// not carry them.
    pub fn drop_sketch_and_rows(&mut self) {
        self.hist = None;
        self.samples = Vec::new();
    }

    /// Second-moment matrix of block `k` (`b x b`, row-major), if requested.
    pub fn block_moment(&self, k: usize) -> Option<&[f64]> {
        let (b, m) = self.block.as_ref()?;
        m.get(k * b * b..(k + 1) * b * b)
    }

    /// The Gram matrix X^T X, if requested.
    pub fn gram(&self) -> Option<&Array2<f64>> {
        self.gram.as_ref()
    }

    /// E = (X - Q(X))^T Q(X) for [`StatsOptions::quant_error`]'s quantizer Q, if requested
    /// (and no channel division came after).
    pub fn quant_error_cross(&self) -> Option<&Array2<f32>> {
        self.quant_error.as_ref().map(|(_, e)| e)
    }

    /// The rows kept by `sample_every`, `[kept, channels]` (empty if none were asked for).
    pub fn samples(&self) -> ArrayView2<'_, f32> {
        let n = self.samples.len() / self.channels.max(1);
        ArrayView2::from_shape((n, self.channels), &self.samples).expect("whole rows")
    }

    /// The profiles kept by `profile_every`, `[kept, channels]` (empty if none were asked
    /// for).
    pub fn profiles(&self) -> ArrayView2<'_, u8> {
        let n = self.profiles.len() / self.channels.max(1);
        ArrayView2::from_shape((n, self.channels), &self.profiles).expect("whole rows")
    }
}

/// The rows of a batch of `rows` to keep when every `every`-th row overall is kept (0: none)
/// and `seen` rows came before it: row `r` of the batch is row `seen + r` overall.
fn kept(seen: u64, rows: usize, every: usize) -> impl Iterator<Item = usize> {
    let first = match every {
        0 => rows as u64,
        n => (n as u64 - seen % n as u64) % n as u64,
    };
    (first..rows as u64)
        .step_by(every.max(1))
        .map(|r| r as usize)
}

/// Row profiles `[rows, s.len()]` (row-major, see [`StatsOptions::profile_every`]) turned
/// into those of the values divided by `s` channel by channel: divided in their own units
/// and scaled again to their row's largest (the first rounding to 255ths is not undone).
/// Every `s_c` must be positive and finite.
pub fn divide_profiles(profiles: &mut [u8], s: &[f64]) {
    let mut divided = vec![0f32; s.len()];
    let mut fresh = Vec::with_capacity(s.len());
    for row in profiles.chunks_mut(s.len().max(1)) {
        for ((y, &q), d) in divided.iter_mut().zip(row.iter()).zip(s) {
            *y = (f64::from(q) / d) as f32;
        }
        fresh.clear();
        push_profile(ndarray::ArrayView1::from(&divided[..]), &mut fresh);
        row.copy_from_slice(&fresh);
    }
}

/// Appends the profile of `row` (see [`StatsOptions::profile_every`]) unless it holds a
/// non-finite value; an all-zero row's profile is all zero.
fn push_profile(row: ndarray::ArrayView1<f32>, out: &mut Vec<u8>) {
    let mut peak = 0f32;
    for &v in row {
        if !v.is_finite() {
            return;
        }
        peak = peak.max(v.abs());
    }
    let scale = if peak > 0.0 { 255.0 / peak } else { 0.0 };
    out.extend(
        row.iter()
            .map(|&v| (v.abs() * scale).round().min(255.0) as u8),
    );
}

/// Column blocks of the Gram product: one task computes one `GRAM_BLOCK`-square block.
const GRAM_BLOCK: usize = 128;

/// `acc += Xᵀ X` for a batch `x` (`[rows, c]`): the batch product in f32 (one `gemm` call
/// per block on or below the diagonal, blocks in parallel on the current rayon pool),
/// mirrored and summed into the f64 accumulator. Each block's sum over rows runs in
/// `gemm`'s own order, independent of the thread count.
fn gram_update(x: ArrayView2<f32>, acc: &mut Array2<f64>) {
    use rayon::prelude::*;
    let x = x.as_standard_layout();
    let (rows, c) = x.dim();
    if c == 0 {
        return;
    }
    assert_eq!(acc.dim(), (c, c), "the accumulator is c x c");
    let nb = c.div_ceil(GRAM_BLOCK);
    let tasks: Vec<(usize, usize)> = (0..nb).flat_map(|i| (0..=i).map(move |j| (i, j))).collect();
    let span = |b: usize| {
        (
            b * GRAM_BLOCK,
            ((b + 1) * GRAM_BLOCK).min(c) - b * GRAM_BLOCK,
        )
    };
    let acc = AccPtr(
        acc.as_slice_mut()
            .expect("the accumulator is standard layout")
            .as_mut_ptr(),
    );
    tasks.par_iter().for_each_init(
        || vec![0f32; GRAM_BLOCK * GRAM_BLOCK],
        |out, &(i, j)| {
            let ((r0, m), (c0, n)) = (span(i), span(j));
            let base = x.as_ptr();
            // Safety: lhs is Xᵀ rows r0..r0+m (x[k, r0 + r] at base + k·c + r0 + r), rhs is
            // X columns c0..c0+n, both inside `x`; `out` holds m x n row-major.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    rows,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    base.add(r0),
                    c as isize,
                    1,
                    base.add(c0),
                    1,
                    c as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            // Block (i, j), j <= i, adds into acc[r0.., c0..] and, mirrored, into
            // acc[c0.., r0..] (a diagonal block is whole: only the first). No other task
            // writes either region, and each element gets exactly one addition per batch,
            // which is what keeps the accumulator exactly symmetric.
            let acc = &acc;
            for r in 0..m {
                // Safety: row r0 + r, columns c0..c0+n of the c x c accumulator.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(acc.0.add((r0 + r) * c + c0), n) };
                for (d, &v) in dst.iter_mut().zip(&out[r * n..(r + 1) * n]) {
                    *d += f64::from(v);
                }
            }
            if i != j {
                for q in 0..n {
                    // Safety: row c0 + q, columns r0..r0+m, above the diagonal (c0 + n <= r0).
                    let dst =
                        unsafe { std::slice::from_raw_parts_mut(acc.0.add((c0 + q) * c + r0), m) };
                    for (r, d) in dst.iter_mut().enumerate() {
                        *d += f64::from(out[r * n + q]);
                    }
                }
            }
        },
    );
}

/// The Gram accumulator shared by the block tasks of [`gram_update`], each of which writes
/// only its own block and that block's mirror image.
struct AccPtr(*mut f64);
// Safety: see `gram_update`: the tasks' regions are disjoint.
unsafe impl Sync for AccPtr {}

/// The `rows / QE_TOP` rows of a batch with the largest quantizer steps are all in `E`'s
/// sample, with weight 1.
const QE_TOP: usize = 8;
/// Of the other rows, every `QE_STRIDE`-th (in row order) is in it, with weight
/// `QE_STRIDE`.
const QE_STRIDE: usize = 2;

/// The rows `E = (X − Q(X))ᵀ Q(X)` is summed over, as `(w_t (x_t − Q(x_t)), Q(x_t))`: a
/// stratified sample of the batch. Row t's term scales as its quantizer step squared, and
/// a few tokens (the first of a sequence, delimiters) have steps tens of times the
/// median, so those rows are all kept (the `rows / QE_TOP` largest steps, ties by row
/// order) and the rest are sampled systematically, each kept row standing for
/// `QE_STRIDE`. The choice depends on the batch alone, not on the thread count.
fn quant_error_rows(x: ArrayView2<f32>, q: crate::quant::TokenQuant) -> (Array2<f32>, Array2<f32>) {
    let (rows, c) = x.dim();
    let x = x.as_standard_layout();
    let flat = x.as_slice().expect("standard layout");
    let step = |r: usize| q.params(&flat[r * c..(r + 1) * c]).0;
    let mut order: Vec<(f32, usize)> = (0..rows).map(|r| (step(r), r)).collect();
    let n_top = rows / QE_TOP;
    // Largest step first, ties by row (`params` skips NaNs, so a step is never NaN).
    order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut weight = vec![0f32; rows];
    for &(_, r) in &order[..n_top] {
        weight[r] = 1.0;
    }
    let mut rank = 0usize;
    for w in weight.iter_mut() {
        if *w == 0.0 {
            if rank.is_multiple_of(QE_STRIDE) {
                *w = QE_STRIDE as f32;
            }
            rank += 1;
        }
    }
    let kept: Vec<usize> = (0..rows).filter(|&r| weight[r] > 0.0).collect();
    let mut xq = Array2::<f32>::zeros((kept.len(), c));
    for (dst, &r) in xq.outer_iter_mut().zip(&kept) {
        dst.into_slice()
            .expect("row-major")
            .copy_from_slice(&flat[r * c..(r + 1) * c]);
    }
    let mut residual = xq.clone();
    crate::quant::fake_quantize_rows(xq.as_slice_mut().expect("row-major"), c, q);
    for ((mut d, qr), &r) in residual.outer_iter_mut().zip(xq.outer_iter()).zip(&kept) {
        let w = weight[r];
        d.iter_mut().zip(qr).for_each(|(d, &v)| *d = (*d - v) * w);
    }
    (residual, xq)
}

/// The histogram bin of |x| = `a`.
fn bin(a: f32) -> usize {
    let smallest = f32::from_bits(((MIN_EXP + 127) as u32) << 23); // 2^MIN_EXP
    if a.is_nan() || a < smallest {
        return 0;
    }
    let pos = ((a.log2() - MIN_EXP as f32) * SUB as f32) as usize + 1;
    pos.min(BINS - 1)
}

/// Upper edge of bin `i` (0 for the underflow bin).
fn bin_upper(i: usize) -> f32 {
    if i == 0 {
        return 0.0;
    }
    2f32.powf(MIN_EXP as f32 + i as f32 / SUB as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, s};

    /// Deterministic heavy-tailed test data with two outlier channels.
    fn data(rows: usize, channels: usize, seed: u64) -> Array2<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        Array2::from_shape_fn((rows, channels), |(_, c)| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            let scale = if c == 3 || c == 10 { 40.0 } else { 1.0 };
            (u * scale * (1.0 + 5.0 * u * u)) as f32
        })
    }

    #[test]
    fn profiles_skip_rows_with_non_finite_values() {
        let opts = StatsOptions {
            profile_every: 1,
            ..StatsOptions::default()
        };
        let mut s = ChannelStats::new(3, &opts).unwrap();
        let x = ndarray::arr2(&[[1.0f32, -2.0, 0.5], [f32::NAN, 1.0, 1.0], [0.0, 0.0, 0.0]]);
        s.update(x.view()).unwrap();
        assert_eq!(s.profiles(), ndarray::arr2(&[[128u8, 255, 64], [0, 0, 0]]));
        // Profiles are for the permutation after the smoothing that drops its rows.
        s.drop_sketch_and_rows();
        assert_eq!(s.profiles().nrows(), 2);
    }

    #[test]
    fn profiles_divide_and_scale_again() {
        let opts = StatsOptions {
            profile_every: 1,
            ..StatsOptions::default()
        };
        let mut s = ChannelStats::new(3, &opts).unwrap();
        s.update(ndarray::arr2(&[[2.0f32, 4.0, -1.0]]).view())
            .unwrap();
        assert_eq!(s.profiles(), ndarray::arr2(&[[128u8, 255, 64]]));
        // 128 / 0.5 = 256, 255 / 4 = 63.75, 64 / 2 = 32: over the new peak 256, in 255ths.
        s.divide_channels(&[0.5, 4.0, 2.0]).unwrap();
        assert_eq!(s.profiles(), ndarray::arr2(&[[255u8, 64, 32]]));
    }

    #[test]
    fn streaming_matches_exact_statistics() {
        let (channels, b) = (16, 4);
        let batches: Vec<Array2<f32>> = (0..5).map(|i| data(37 + i, channels, i as u64)).collect();
        let opts = StatsOptions {
            quantiles: true,
            block_moments: Some(b),
            gram: true,
            sample_every: 3,
            profile_every: 4,
            quant_error: None,
        };
        let mut s = ChannelStats::new(channels, &opts).unwrap();
        for batch in &batches {
            s.update(batch.view()).unwrap();
        }
        let views: Vec<_> = batches.iter().map(|a| a.view()).collect();
        let all = ndarray::concatenate(Axis(0), &views).unwrap();
        let all64 = all.mapv(|v| v as f64);
        assert_eq!(s.rows(), all.nrows() as u64);
        // Every third row overall, across batch boundaries.
        let kept: Vec<usize> = (0..all.nrows()).step_by(3).collect();
        assert_eq!(s.samples().nrows(), kept.len());
        for (i, &r) in kept.iter().enumerate() {
            assert_eq!(s.samples().row(i), all.row(r));
        }
        // Every fourth row's profile: |x| over the row's largest, in 255ths.
        let profiled: Vec<usize> = (0..all.nrows()).step_by(4).collect();
        assert_eq!(s.profiles().nrows(), profiled.len());
        for (i, &r) in profiled.iter().enumerate() {
            let peak = all.row(r).iter().fold(0f32, |m, v| m.max(v.abs()));
            let want: Vec<u8> = all
                .row(r)
                .iter()
                .map(|v| (v.abs() / peak * 255.0).round() as u8)
                .collect();
            let got = s.profiles().row(i).to_vec();
            assert!(got.contains(&255));
            for (g, w) in got.iter().zip(&want) {
                assert!(g.abs_diff(*w) <= 1, "row {r}: {got:?} vs {want:?}");
            }
        }
        let n = all.nrows() as f64;
        for c in 0..channels {
            let col = all64.column(c);
            let mean_abs = col.iter().map(|v| v.abs()).sum::<f64>() / n;
            let max_abs = col.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let sum_sq: f64 = col.iter().map(|v| v * v).sum();
            assert!((s.mean_abs()[c] - mean_abs).abs() < 1e-12 * mean_abs.max(1.0));
            assert_eq!(s.max_abs()[c] as f64, max_abs);
            assert!((s.sum_sq()[c] - sum_sq).abs() < 1e-9 * sum_sq);
            // Quantiles: within one bin of the exact order statistic.
            let mut sorted: Vec<f64> = col.iter().map(|v| v.abs()).collect();
            sorted.sort_by(f64::total_cmp);
            for q in [0.5, 0.9, 0.99] {
                let exact = sorted[((q * n).ceil() as usize).max(1) - 1];
                let est = s.abs_quantile(q).unwrap()[c] as f64;
                let tol = 2f64.powf(1.0 / SUB as f64);
                assert!(
                    est >= exact / tol * 0.999 && est <= exact * tol * 1.001,
                    "c{c} q{q}: {est} vs {exact}"
                );
            }
        }
        let gram = all64.t().dot(&all64);
        let g = s.gram().unwrap();
        let scale = gram.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(
            g.iter()
                .zip(gram.iter())
                .all(|(a, e)| (a - e).abs() < 1e-5 * scale)
        );
        for k in 0..channels / b {
            let exact = gram.slice(s![k * b..(k + 1) * b, k * b..(k + 1) * b]);
            let got = s.block_moment(k).unwrap();
            assert!(
                got.iter()
                    .zip(exact.iter())
                    .all(|(a, e)| (a - e).abs() < 1e-5 * scale)
            );
        }
    }

    /// Statistics of `x` divided by `s` afterwards are those of `x / s`: exactly for
    /// powers of two (then even the histogram's bins move by whole octaves), within
    /// round-off and one bin otherwise.
    #[test]
    fn dividing_channels_is_observing_the_divided_values() {
        let (channels, b) = (8, 4);
        let opts = StatsOptions {
            quantiles: true,
            block_moments: Some(b),
            gram: true,
            sample_every: 2,
            profile_every: 3,
            quant_error: None,
        };
        let x = data(91, channels, 3);
        for s in [
            vec![2.0, 0.5, 4.0, 8.0, 1.0, 0.25, 2.0, 16.0],
            vec![1.3, 0.7, 3.1, 9.0, 1.0, 0.2, 2.5, 17.0],
        ] {
            let exact = s.iter().all(|v: &f64| v.log2().fract() == 0.0);
            let mut divided = ChannelStats::new(channels, &opts).unwrap();
            divided.update(x.view()).unwrap();
            divided.divide_channels(&s).unwrap();
            let xs = Array2::from_shape_fn(x.dim(), |(r, c)| (f64::from(x[(r, c)]) / s[c]) as f32);
            let mut direct = ChannelStats::new(channels, &opts).unwrap();
            direct.update(xs.view()).unwrap();
            let close = |a: f64, e: f64| {
                if exact {
                    a == e
                } else {
                    (a - e).abs() <= 1e-5 * e.abs().max(1e-6)
                }
            };
            for c in 0..channels {
                assert!(close(divided.mean_abs()[c], direct.mean_abs()[c]));
                assert!(close(divided.sum_sq()[c], direct.sum_sq()[c]));
                assert!(close(
                    divided.max_abs()[c].into(),
                    direct.max_abs()[c].into()
                ));
                let (qa, qd) = (
                    divided.abs_quantile(0.9).unwrap()[c],
                    direct.abs_quantile(0.9).unwrap()[c],
                );
                let bin = 2f32.powf(1.0 / SUB as f32) * 1.0001;
                assert!(if exact {
                    qa == qd
                } else {
                    qa <= qd * bin && qd <= qa * bin
                });
            }
            for (a, e) in divided.samples().iter().zip(direct.samples().iter()) {
                assert!(close(f64::from(*a), f64::from(*e)));
            }
            // Profiles: the same rows (their values: `profiles_divide_and_scale_again`).
            assert_eq!(divided.profiles().dim(), direct.profiles().dim());
            for (a, e) in divided.gram().unwrap().iter().zip(direct.gram().unwrap()) {
                assert!((a - e).abs() <= 1e-4 * e.abs().max(1e-3));
            }
            for k in 0..channels / b {
                let (a, e) = (
                    divided.block_moment(k).unwrap(),
                    direct.block_moment(k).unwrap(),
                );
                assert!(
                    a.iter()
                        .zip(e)
                        .all(|(a, e)| (a - e).abs() <= 1e-4 * e.abs().max(1e-3))
                );
            }
        }
        let mut s = ChannelStats::new(channels, &opts).unwrap();
        assert!(s.divide_channels(&[1.0; 3]).is_err());
        let mut zero = [1.0; 8];
        zero[5] = 0.0;
        assert_eq!(
            s.divide_channels(&zero).unwrap_err().to_string(),
            "channel 5: divisor 0 is not positive and finite"
        );
    }

    /// The blocked Gram update (3 x 3 blocks of 128, the last partial) against the plain
    /// product, summed over batches.
    #[test]
    fn gram_blocks_match_the_product() {
        let c = 300;
        let opts = StatsOptions {
            gram: true,
            ..Default::default()
        };
        let mut s = ChannelStats::new(c, &opts).unwrap();
        let batches: Vec<Array2<f32>> = (0..3).map(|i| data(50 + i, c, 7 + i as u64)).collect();
        let mut want = Array2::<f64>::zeros((c, c));
        for b in &batches {
            s.update(b.view()).unwrap();
            let b64 = b.mapv(|v| v as f64);
            want += &b64.t().dot(&b64);
        }
        let got = s.gram().unwrap();
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (g, w) in got.iter().zip(want.iter()) {
            assert!((g - w).abs() <= 1e-5 * scale, "{g} vs {w}");
        }
        // Symmetric bit for bit.
        for i in 0..c {
            for j in 0..i {
                assert_eq!(got[[i, j]].to_bits(), got[[j, i]].to_bits());
            }
        }
    }

    /// E = (X − Q(X))ᵀ Q(X) over batches, Q the runtime's per-token quantizer, on the
    /// stratified sample of rows; a thread pool of one or two gives the same bits; a
    /// channel division drops it.
    #[test]
    fn quant_error_cross_sums_the_stratified_sample() {
        let c = 300;
        let q = crate::quant::TokenQuant {
            bits: 4,
            symmetric: false,
            clip: 0.9,
        };
        let opts = StatsOptions {
            quant_error: Some(q),
            ..Default::default()
        };
        // Rows of different sizes, as tokens are: row r scaled by 1 + (5 r mod 13).
        let batches: Vec<Array2<f32>> = (0..3)
            .map(|i| {
                let mut b = data(40 + i, c, 9 + i as u64);
                for (r, mut row) in b.outer_iter_mut().enumerate() {
                    row *= 1.0 + ((5 * r) % 13) as f32;
                }
                b
            })
            .collect();
        // The sample, chosen naively: the rows / 8 largest steps with weight 1, then every
        // 2nd of the other rows in order with weight 2; the sum in f64.
        let mut want = Array2::<f64>::zeros((c, c));
        for b in &batches {
            let rows = b.nrows();
            let step = |r: usize| q.params(b.row(r).as_slice().unwrap()).0;
            let mut by_step: Vec<usize> = (0..rows).collect();
            by_step.sort_by(|&i, &j| step(j).total_cmp(&step(i)).then(i.cmp(&j)));
            let top = &by_step[..rows / 8];
            let rest: Vec<usize> = (0..rows).filter(|r| !top.contains(r)).collect();
            let picked = top
                .iter()
                .map(|&r| (r, 1.0))
                .chain(rest.iter().step_by(2).map(|&r| (r, 2.0)));
            for (r, w) in picked {
                let mut xq = b.row(r).to_vec();
                crate::quant::fake_quantize_rows(&mut xq, c, q);
                for i in 0..c {
                    let d = w * (f64::from(b[[r, i]]) - f64::from(xq[i]));
                    for j in 0..c {
                        want[[i, j]] += d * f64::from(xq[j]);
                    }
                }
            }
        }
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut s = ChannelStats::new(c, &opts).unwrap();
                for b in &batches {
                    s.update(b.view()).unwrap();
                }
                s
            })
        };
        let s = run(1);
        let got = s.quant_error_cross().unwrap();
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.0);
        for (g, w) in got.iter().zip(want.iter()) {
            assert!((f64::from(*g) - w).abs() <= 1e-5 * scale, "{g} vs {w}");
        }
        assert_eq!(got, run(2).quant_error_cross().unwrap());
        let mut divided = s.clone();
        divided.divide_channels(&vec![2.0; c]).unwrap();
        assert!(divided.quant_error_cross().is_none());
    }

    #[test]
    fn memory_does_not_grow_with_tokens() {
        let mut s = ChannelStats::new(
            8,
            &StatsOptions {
                quantiles: true,
                ..Default::default()
            },
        )
        .unwrap();
        let before = (s.sum_abs.len(), s.hist.as_ref().unwrap().len());
        for i in 0..50 {
            s.update(data(64, 8, i).view()).unwrap();
        }
        assert_eq!(before, (s.sum_abs.len(), s.hist.as_ref().unwrap().len()));
        assert_eq!(s.rows(), 50 * 64);
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let mut s = ChannelStats::new(8, &StatsOptions::default()).unwrap();
        assert_eq!(
            s.update(data(2, 9, 0).view()),
            Err(StatsError::Channels { got: 9, want: 8 })
        );
        let bad = StatsOptions {
            block_moments: Some(3),
            ..Default::default()
        };
        assert!(matches!(
            ChannelStats::new(8, &bad),
            Err(StatsError::Block {
                block: 3,
                channels: 8
            })
        ));
    }

    #[test]
    fn bins_are_monotone_and_cover_their_values() {
        for &a in &[2e-5f32, 1e-3, 0.5, 1.0, 3.7, 1e4] {
            let i = bin(a);
            assert!(a <= bin_upper(i) * 1.0001, "{a} above bin {i}");
            assert!(
                i == 0 || a >= bin_upper(i - 1) * 0.9999,
                "{a} below bin {i}"
            );
        }
        assert_eq!(bin(0.0), 0);
        assert_eq!(bin(1e-9), 0, "below the range: the underflow bin");
        assert_eq!(bin(1e-5), 0, "below 2^-16");
        assert_eq!(bin(1e6), BINS - 1, "above 2^16: the last bin");
        assert_eq!(bin(f32::NAN), 0);
    }
}
