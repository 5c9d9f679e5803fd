//! `smooth`: calibrated channel scales that move activation outliers of each mlp region's
//! sink input (the down_proj input) into the weights, folded exactly.
//!
//! Identity: with `x = silu(g) ⊙ u` read by `down`, dividing channel `j` by `s_j` is the
//! diagonal `T = diag(1/s)`; the region sends it through `u` alone (the product is linear
//! in each factor; SiLU does not commute with scales: [`crate::regions`]), so `up`'s rows
//! take `1/s` and `down`'s input columns take `s`, through the one channel-transform
//! mechanism. Nothing remains in the graph.
//!
//! Scales (SmoothQuant's migration, as SmoothRot uses it before the online Hadamard):
//! `s_j = a_j^α / w_j^(1-α)`, where `w_j = max_i |W[i, j]|` over the sinks' weights and
//! `a_j` is the calibration statistic of `|x_j|`: its maximum (`method=max`) or its
//! `q`-quantile (`method=quantile`, the quantile-robust variant of arXiv 2606.09927: a few
//! extreme tokens no longer set the scale). The quantile comes from the streamed histogram
//! of [`perqc_ops::stats::ChannelStats`], exact to one bin (4.4%, i.e. 2.2% of `s` at
//! α = 0.5). A channel with `a_j = 0` or `w_j = 0` keeps `s_j = 1`.
//!
//! `method=search` chooses `(alpha, statistic)` per region from a grid (and "no smoothing")
//! by the W4A4 error of the down_proj it feeds on sampled calibration rows, with the
//! transforms that follow in the recipe (the permutation from the smoothed statistics, the
//! online Hadamard) applied: [`crate::probe`]. With samples, every method reports that
//! error before and after (the mean over regions of `E / ‖x W‖²`).
//!
//! `train=STEPS` then refines each region's scales by gradient descent on `log s` from the
//! fixed or searched ones ([`crate::smooth_train`]): the probed error with a
//! straight-through estimator, on half the sampled rows, keeping the scales best on the
//! other half, and only if they are still better there with the permutation recomputed
//! from them. The trained scales fold through the same [`smooth_region`].
//!
//! The statistics of the smoothed activations are divided by `s` in the `Calibration`
//! resource (exact: every statistic kept is positively homogeneous), so a later `permute`
//! chooses its blocks from what the online Hadamard will see.
//!
//! Counters: `regions-smoothed`, `weights-rewritten`.

use crate::calibration::Calibration;
use crate::permutation::{PermuteMethod, permutation_from, permutation_from_profiles};
use crate::permute::{masses, sink_activations, sink_profiles, sink_stats};
use crate::probe::{LayerError, Probe, SinkSample, sink_samples};
use crate::regions::{Region, RegionKind, Regions, TransformKind};
use crate::smooth_train::{self, Trained, Training};
use crate::transform::{self, ChannelOp, Placement};
use perqc_ir::{Graph, Model, OptionError, Pass, PassContext, PassError, PassOptions, PassOutcome};
use rayon::prelude::*;
use std::fmt;

/// Which statistic of `|x_j|` sets the scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Statistic {
    Max,
    /// The `q`-quantile, `0 < q <= 1`.
    Quantile(f64),
}

/// How one region is smoothed: `s_j = a_j^alpha / w_j^(1 - alpha)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Smoothing {
    pub statistic: Statistic,
    /// Migration strength, `0 <= alpha <= 1` (0: scales from the weights alone; 1: from
    /// the activations alone).
    pub alpha: f64,
}

impl fmt::Display for Smoothing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.statistic {
            Statistic::Max => write!(f, "max(alpha={})", self.alpha),
            Statistic::Quantile(q) => write!(f, "quantile(q={q},alpha={})", self.alpha),
        }
    }
}

impl Smoothing {
    /// The pass invocation that applies this smoothing to every mlp region.
    pub fn pass_spec(&self) -> String {
        match self.statistic {
            Statistic::Max => format!("smooth(method=max,alpha={})", self.alpha),
            Statistic::Quantile(q) => {
                format!("smooth(method=quantile,q={q},alpha={})", self.alpha)
            }
        }
    }

    /// Parses `max`, `max(alpha=A)`, `quantile` or `quantile(q=Q,alpha=A)` (defaults:
    /// alpha 0.5, q 0.999).
    pub fn parse(spec: &str) -> Result<Smoothing, String> {
        let spec = spec.trim();
        let (name, args) = match spec.split_once('(') {
            Some((n, rest)) => {
                let Some(args) = rest.strip_suffix(')') else {
                    return Err(format!("`{spec}`: missing `)`"));
                };
                (n.trim(), args)
            }
            None => (spec, ""),
        };
        let mut alpha = 0.5;
        let mut q = 0.999;
        let number = |k: &str, v: &str| {
            v.trim()
                .parse::<f64>()
                .map_err(|_| format!("`{spec}`: {k} = `{}` is not a number", v.trim()))
        };
        for kv in args.split(',').filter(|a| !a.trim().is_empty()) {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(format!("`{spec}`: `{kv}` is not NAME=VALUE"));
            };
            match (name, k.trim()) {
                (_, "alpha") => alpha = number("alpha", v)?,
                ("quantile", "q") => q = number("q", v)?,
                (_, k) => {
                    let valid = if name == "quantile" {
                        "q, alpha"
                    } else {
                        "alpha"
                    };
                    return Err(format!("`{spec}`: no option `{k}` (valid: {valid})"));
                }
            }
        }
        let statistic = match name {
            "max" => Statistic::Max,
            "quantile" => Statistic::Quantile(q),
            other => {
                return Err(format!(
                    "`{other}` is not a smoothing (max, quantile, search or none)"
                ));
            }
        };
        let s = Smoothing { statistic, alpha };
        s.validate().map_err(|why| format!("`{spec}`: {why}"))?;
        Ok(s)
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(format!("alpha = {} is not in [0, 1]", self.alpha));
        }
        if let Statistic::Quantile(q) = self.statistic
            && !(q > 0.0 && q <= 1.0)
        {
            return Err(format!("q = {q} is not in (0, 1]"));
        }
        Ok(())
    }

    /// The scales `s` from the activation statistic `a` and the weight maxima `w`, per
    /// channel.
    pub fn scales(&self, a: &[f64], w: &[f64]) -> Vec<f64> {
        a.iter()
            .zip(w)
            .map(|(&a, &w)| {
                let s = a.powf(self.alpha) / w.powf(1.0 - self.alpha);
                if a > 0.0 && w > 0.0 && s.is_finite() && s > 0.0 {
                    s
                } else {
                    1.0
                }
            })
            .collect()
    }
}

/// The search grid: migration strengths times statistics (the quantiles and the
/// maximum), and no smoothing.
pub const SEARCH_ALPHAS: [f64; 4] = [0.4, 0.5, 0.6, 0.7];
pub const SEARCH_QUANTILES: [f64; 3] = [0.95, 0.99, 0.999];

/// Every candidate of the search: `None` (no smoothing) first, then the grid.
pub fn search_candidates() -> Vec<Option<Smoothing>> {
    let mut out = vec![None];
    for &alpha in &SEARCH_ALPHAS {
        for statistic in SEARCH_QUANTILES
            .iter()
            .map(|&q| Statistic::Quantile(q))
            .chain([Statistic::Max])
        {
            out.push(Some(Smoothing { statistic, alpha }));
        }
    }
    out
}

/// The online rotation that follows the smoothing in the recipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotation {
    None,
    Block(usize),
    Full,
}

/// What a smoothed layer is probed with: the transforms that follow the smoothing (the
/// permutation, chosen from the smoothed statistics, and the online Hadamard) and the
/// quantizers.
#[derive(Clone, Copy, Debug)]
pub struct Probing {
    pub permute: PermuteMethod,
    pub rotation: Rotation,
    pub probe: Probe,
}

/// A fixed smoothing, or the per-region search.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Fixed(Smoothing),
    Search,
}

#[derive(Debug)]
pub struct Smooth {
    mode: Mode,
    probing: Probing,
    /// Gradient refinement of the scales (`steps` 0: none).
    training: Training,
}

impl Smooth {
    pub const NAME: &'static str = "smooth";
    pub const DESCRIPTION: &'static str = "divide each mlp region's sink input by calibrated channel scales a^alpha / w^(1-alpha), folded into up_proj and down_proj (exact); method=search picks (alpha, statistic) per region by the down_proj's quantized error on sampled rows; train=STEPS refines log s by Adam (lr=0.01) with a straight-through estimator on half the sampled rows, within 8x of the start, keeping the scales best on the other half; options method=max|quantile|search, alpha=0.5, q=0.999, train=0, lr=0.01, and for the error: permute=massdiff, block=32|full|none, wbits=4, abits=4|none";

    pub fn from_options(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        Ok(Box::new(Smooth::parse(opts)?))
    }

    /// The pass the options describe.
    pub fn parse(opts: &PassOptions) -> Result<Smooth, OptionError> {
        opts.allow_only(&[
            "method", "alpha", "q", "train", "lr", "permute", "block", "wbits", "abits",
        ])?;
        let method = opts.choice_or("method", &["max", "quantile", "search"], "quantile")?;
        let invalid = |name: &str, expected: &str| OptionError::Invalid {
            pass: opts.pass().to_string(),
            option: name.to_string(),
            value: opts.get(name).unwrap_or_default().to_string(),
            expected: expected.to_string(),
        };
        // A number in a range, or the option's error.
        let number = |name: &str, expected: &str, default: f64, ok: fn(f64) -> bool| {
            let v = opts.parse_or(name, expected, default)?;
            if ok(v) {
                Ok(v)
            } else {
                Err(invalid(name, expected))
            }
        };
        let alpha = number("alpha", "a number in [0, 1]", 0.5, |a| {
            (0.0..=1.0).contains(&a)
        })?;
        let mode = match method {
            "search" => Mode::Search,
            "max" => Mode::Fixed(Smoothing {
                statistic: Statistic::Max,
                alpha,
            }),
            _ => Mode::Fixed(Smoothing {
                statistic: Statistic::Quantile(number("q", "a number in (0, 1]", 0.999, |q| {
                    q > 0.0 && q <= 1.0
                })?),
                alpha,
            }),
        };
        let permute: PermuteMethod = opts
            .get("permute")
            .unwrap_or("massdiff")
            .parse()
            .map_err(|_| invalid("permute", "massdiff, zigzag, absmax or identity"))?;
        let rotation = match opts.get("block") {
            Some("full") => Rotation::Full,
            Some("none") => Rotation::None,
            _ => Rotation::Block(opts.parse_or("block", "a block size, full or none", 32usize)?),
        };
        let bits = |name: &str| -> Result<Option<u32>, OptionError> {
            match opts.get(name) {
                Some("none") => Ok(None),
                _ => {
                    let b = opts.parse_or(name, "2..8 or none", 4u32)?;
                    if (2..=8).contains(&b) {
                        Ok(Some(b))
                    } else {
                        Err(invalid(name, "2..8 or none"))
                    }
                }
            }
        };
        let wbits = bits("wbits")?.ok_or_else(|| invalid("wbits", "2..8"))?;
        let probe = Probe::w_int_a_int(wbits, bits("abits")?);
        let training = Training {
            steps: opts.parse_or("train", "a number of steps (0: no training)", 0usize)?,
            lr: number(
                "lr",
                "a learning rate in (0, 1]",
                smooth_train::DEFAULT_LR,
                |lr| lr > 0.0 && lr <= 1.0,
            )?,
        };
        Ok(Smooth {
            mode,
            probing: Probing {
                permute,
                rotation,
                probe,
            },
            training,
        })
    }

    /// A smoothing pass without training.
    pub fn new(mode: Mode, probing: Probing) -> Smooth {
        Smooth {
            mode,
            probing,
            training: Training {
                steps: 0,
                lr: smooth_train::DEFAULT_LR,
            },
        }
    }
}

/// Per region channel: the largest |weight| over the sinks' rows that read it.
fn weight_max(graph: &Graph, region: &Region) -> Result<Vec<f64>, String> {
    let mut out = vec![0f64; region.dim];
    for e in &region.sinks {
        let t = graph
            .const_tensor(e.weight)
            .ok_or_else(|| format!("`{}` is not a constant", region.value_name(e.weight)))?;
        let w = t
            .to_f32()
            .map_err(|err| format!("`{}`: {err}", region.value_name(e.weight)))?;
        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        let n = dims[e.axis];
        let inner: usize = dims[e.axis + 1..].iter().product();
        for (k, v) in w.iter().enumerate() {
            let c = e.channels[(k / inner) % n] as usize;
            out[c] = out[c].max(f64::from(v.abs()));
        }
    }
    Ok(out)
}

/// Per region channel: the activation statistic over what the sinks read (the largest
/// over several activations).
fn activation_stat(
    region: &Region,
    calib: &Calibration,
    statistic: Statistic,
) -> Result<Vec<f64>, String> {
    let mut out = vec![0f64; region.dim];
    for (channels, stats, name) in sink_stats(region, calib)? {
        let a: Vec<f64> = match statistic {
            Statistic::Max => stats.max_abs().iter().map(|&m| f64::from(m)).collect(),
            Statistic::Quantile(q) => stats
                .abs_quantile(q)
                .ok_or_else(|| {
                    format!("the statistics of `{name}` were collected without quantiles")
                })?
                .into_iter()
                .map(f64::from)
                .collect(),
        };
        for (&c, a) in channels.iter().zip(a) {
            out[c as usize] = out[c as usize].max(a);
        }
    }
    Ok(out)
}

/// max / median of per-channel values: how far the largest channel stands out.
fn spread(a: &[f64]) -> f64 {
    let mut v: Vec<f64> = a.iter().copied().filter(|x| *x > 0.0).collect();
    if v.is_empty() {
        return 1.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() - 1] / v[v.len() / 2]
}

/// The orthogonal maps that follow smoothing `s` in the recipe: the permutation chosen
/// from the statistics divided by `s` (what the permute pass will see), then the online
/// Hadamard.
fn after_smoothing(
    region: &Region,
    calib: &Calibration,
    s: &[f64],
    probing: &Probing,
) -> Result<Vec<ChannelOp>, String> {
    let mut chain = Vec::new();
    let block = match probing.rotation {
        Rotation::Block(b) => Some(b),
        Rotation::Full => Some(region.dim),
        Rotation::None => None,
    };
    if let Some(b) = block {
        if probing.permute.uses_profiles() && b < region.dim {
            let mut profiles = sink_profiles(region, calib)?;
            let rows = profiles.as_slice_mut().expect("standard layout");
            perqc_ops::stats::divide_profiles(rows, s);
            let perm = permutation_from_profiles(probing.permute, profiles.view(), b)
                .map_err(|e| e.to_string())?;
            chain.push(ChannelOp::Permutation(perm));
        } else if probing.permute.uses_statistics() && b < region.dim {
            let (mean, max) = masses(region, calib)?;
            let mean: Vec<f64> = mean.iter().zip(s).map(|(m, s)| m / s).collect();
            let max: Vec<f32> = max
                .iter()
                .zip(s)
                .map(|(&m, s)| (f64::from(m) / s) as f32)
                .collect();
            let perm =
                permutation_from(probing.permute, &mean, &max, b).map_err(|e| e.to_string())?;
            chain.push(ChannelOp::Permutation(perm));
        }
        chain.push(ChannelOp::hadamard(region.dim, b, None).map_err(|e| e.to_string())?);
    }
    Ok(chain)
}

/// The region's probed error with smoothing `s` (`None`: unsmoothed) and what follows it.
fn probed_error(
    region: &Region,
    calib: &Calibration,
    layers: &[SinkSample],
    s: Option<&[f64]>,
    probing: &Probing,
) -> Result<LayerError, String> {
    let ones = vec![1.0; region.dim];
    let s = s.unwrap_or(&ones);
    let mut chain = vec![ChannelOp::Diagonal(s.iter().map(|v| 1.0 / v).collect())];
    chain.extend(after_smoothing(region, calib, s, probing)?);
    probing.probe.region_error(layers, &chain)
}

/// Smooths one region by the scales `s` (activations divided by them, all positive),
/// folded by the mechanism; returns what it did.
pub fn smooth_region(
    graph: &mut Graph,
    region: &Region,
    s: &[f64],
) -> Result<transform::Applied, String> {
    if s.len() != region.dim || s.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
        return Err(format!(
            "{} scales, not {} positive ones",
            s.len(),
            region.dim
        ));
    }
    let op = ChannelOp::Diagonal(s.iter().map(|v| 1.0 / v).collect());
    transform::apply(graph, region, &op, Placement::Fold)
}

/// `calib` with the statistics of `region`'s sink activations divided by `s` (region
/// channels).
fn divide_statistics(calib: &mut Calibration, region: &Region, s: &[f64]) -> Result<(), String> {
    for name in sink_activations(region) {
        let e = region
            .sinks
            .iter()
            .find(|e| {
                e.activation
                    .is_some_and(|(_, v)| region.activation_name(v) == name)
            })
            .expect("a sink reads it");
        let local: Vec<f64> = e.channels.iter().map(|&c| s[c as usize]).collect();
        if let Some(stats) = calib.get_mut(&name) {
            stats.divide_channels(&local).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// A region's decision before training.
struct Choice {
    smoothing: Option<Smoothing>,
    /// Its scales (ones without smoothing).
    scales: Vec<f64>,
    /// The probed error unsmoothed and with the choice (when rows were sampled).
    errors: Option<(LayerError, LayerError)>,
    /// The search's candidates with their probed errors.
    grid: Vec<(Option<Smoothing>, LayerError)>,
}

/// What training did to one region.
#[derive(Clone, Debug)]
pub struct TrainReport {
    /// The run, the permutation of the starting scales held fixed.
    pub run: Trained,
    /// With the permutation recomputed from the scales (as the permute pass will): the
    /// held-out rows' error at the starting scales and at the trained ones.
    pub held_out: (LayerError, LayerError),
    /// The same on all sampled rows, at the starting scales and at the scales folded.
    pub all_rows: (LayerError, LayerError),
    /// Whether the trained scales replaced the starting ones (their held-out error above
    /// is lower).
    pub kept: bool,
}

/// What the pass decided for one region.
#[derive(Clone, Debug)]
pub struct RegionChoice {
    /// Index among the model's regions.
    pub region: usize,
    /// The fixed or searched smoothing (before training).
    pub smoothing: Option<Smoothing>,
    /// Whether scales were folded (the smoothing's, or trained ones).
    pub smoothed: bool,
    /// The probed error unsmoothed and with the scales folded (when rows were sampled).
    pub before: Option<LayerError>,
    pub after: Option<LayerError>,
    /// The largest channel's statistic over the median channel's, before and after.
    pub spread: Option<(f64, f64)>,
    /// What the mechanism did.
    pub applied: transform::Applied,
    /// The search's candidates with their probed errors (empty for a fixed smoothing).
    pub grid: Vec<(Option<Smoothing>, LayerError)>,
    /// The refinement by training, when asked for.
    pub training: Option<TrainReport>,
}

impl Smooth {
    /// Decides one region: the fixed smoothing, or the search's best candidate. Errors of
    /// the probe are reported when rows were sampled (`layers`; required by the search).
    fn choose(
        &self,
        graph: &Graph,
        region: &Region,
        calib: &Calibration,
        layers: Result<&[SinkSample], &str>,
    ) -> Result<Choice, String> {
        let w = weight_max(graph, region)?;
        let scales = |c: &Smoothing| -> Result<Vec<f64>, String> {
            Ok(c.scales(&activation_stat(region, calib, c.statistic)?, &w))
        };
        let fixed = |sm: Smoothing, errors| -> Result<Choice, String> {
            Ok(Choice {
                smoothing: Some(sm),
                scales: scales(&sm)?,
                errors,
                grid: Vec::new(),
            })
        };
        match (self.mode, layers) {
            (Mode::Fixed(sm), Err(_)) => fixed(sm, None),
            (Mode::Fixed(sm), Ok(layers)) => {
                let before = probed_error(region, calib, layers, None, &self.probing)?;
                let after =
                    probed_error(region, calib, layers, Some(&scales(&sm)?), &self.probing)?;
                fixed(sm, Some((before, after)))
            }
            (Mode::Search, Err(why)) => Err(format!(
                "the search needs sampled calibration rows: {why} (calibrate with sample_every)"
            )),
            (Mode::Search, Ok(layers)) => {
                let mut grid = Vec::new();
                for c in search_candidates() {
                    let s = c.as_ref().map(&scales).transpose()?;
                    let e = probed_error(region, calib, layers, s.as_deref(), &self.probing)?;
                    grid.push((c, e));
                }
                // The least error; the first candidate (no smoothing) on ties.
                let best = grid
                    .iter()
                    .fold(&grid[0], |b, c| if c.1.error < b.1.error { c } else { b });
                let (smoothing, errors) = (best.0, Some((grid[0].1, best.1)));
                let scales = match smoothing {
                    Some(sm) => scales(&sm)?,
                    None => vec![1.0; region.dim],
                };
                Ok(Choice {
                    smoothing,
                    scales,
                    errors,
                    grid,
                })
            }
        }
    }

    /// The scales to fold: the choice's, or (with training) the trained ones when they
    /// lower the held-out error with the permutation recomputed from them.
    fn refine(
        &self,
        region: &Region,
        calib: &Calibration,
        layers: Result<&[SinkSample], &str>,
        choice: &Choice,
    ) -> Result<(Vec<f64>, Option<TrainReport>), String> {
        let s0 = &choice.scales;
        if self.training.steps == 0 {
            return Ok((s0.clone(), None));
        }
        let layers = layers.map_err(|why| {
            format!("training needs sampled calibration rows: {why} (calibrate with sample_every)")
        })?;
        // R: the permutation from the statistics divided by s0, then the Hadamard, fixed
        // while log s moves.
        let orth = after_smoothing(region, calib, s0, &self.probing)?;
        let (train, held) = smooth_train::split_rows(layers)?;
        let run =
            smooth_train::train(&train, &held, s0, &orth, &self.probing.probe, self.training)?;
        // The permute pass recomputes the permutation from the statistics divided by the
        // final scales: the trained ones must win with that permutation too.
        let err = |rows: &[SinkSample], s: &[f64]| {
            probed_error(region, calib, rows, Some(s), &self.probing)
        };
        let h0 = err(&held, s0)?;
        let h1 = if run.step > 0 {
            err(&held, &run.scales)?
        } else {
            h0
        };
        let kept = h1.error < h0.error;
        let s = if kept { run.scales.clone() } else { s0.clone() };
        let a0 = match choice.errors {
            Some((_, a)) => a,
            None => err(layers, s0)?,
        };
        let a1 = if kept { err(layers, &s)? } else { a0 };
        Ok((
            s,
            Some(TrainReport {
                run,
                held_out: (h0, h1),
                all_rows: (a0, a1),
                kept,
            }),
        ))
    }

    /// The pass's work, returning each region's choice.
    pub fn run_regions(
        &self,
        model: &mut Model,
        ctx: &mut PassContext,
    ) -> Result<Vec<RegionChoice>, PassError> {
        let regions = ctx.analysis::<Regions>(model)?;
        // Taken out and provided back changed (no copy of the statistics).
        let Some(mut calib) = ctx.take_resource::<Calibration>() else {
            return Err(PassError::msg(
                "smooth: needs calibration statistics (--calib-text with --tokenizer, or --calib-ids)",
            ));
        };
        // Which regions are smoothed, in order (the rewrite budget is spent here)...
        let mut todo = Vec::new();
        for (i, region) in regions.regions.iter().enumerate() {
            if region.kind != RegionKind::Mlp {
                continue;
            }
            if let Some(why) = region.why_not(TransformKind::Scale) {
                ctx.note(format!(
                    "region #{i} (mlp, d = {}): not smoothed: {why}",
                    region.dim
                ));
                continue;
            }
            if !ctx.rewrite() {
                break;
            }
            todo.push(i);
        }
        // ...then each region's scales, regions in parallel: a region's choice reads only
        // its own sinks' rows and weights, which no other region's smoothing changes.
        let decisions: Vec<_> = todo
            .par_iter()
            .map(|&i| {
                let region = &regions.regions[i];
                let layers = sink_samples(&model.graph, region, &calib);
                let layers = layers.as_deref().map_err(String::as_str);
                self.choose(&model.graph, region, &calib, layers)
                    .and_then(|c| Ok((self.refine(region, &calib, layers, &c)?, c)))
            })
            .collect();
        let mut out = Vec::new();
        for (&i, decided) in todo.iter().zip(decisions) {
            let region = &regions.regions[i];
            let what = format!("region #{i} (mlp, d = {})", region.dim);
            let fail = |e: String| PassError::msg(format!("smooth: {what}: {e}"));
            let ((s, training), choice) = match decided {
                Ok(d) => d,
                Err(e) => {
                    ctx.provide(calib);
                    return Err(fail(e));
                }
            };
            let smoothed = choice.smoothing.is_some() || training.as_ref().is_some_and(|t| t.kept);
            let (mut spread_, mut applied) = (None, transform::Applied::default());
            if smoothed {
                let statistic = choice.smoothing.map_or(Statistic::Max, |sm| sm.statistic);
                let a = activation_stat(region, &calib, statistic).map_err(fail)?;
                applied = smooth_region(&mut model.graph, region, &s).map_err(fail)?;
                let after: Vec<f64> = a.iter().zip(&s).map(|(a, s)| a / s).collect();
                spread_ = Some((spread(&a), spread(&after)));
                divide_statistics(&mut calib, region, &s).map_err(fail)?;
            }
            let after = match &training {
                Some(t) => Some(t.all_rows.1),
                None => choice.errors.map(|e| e.1),
            };
            out.push(RegionChoice {
                region: i,
                smoothing: choice.smoothing,
                smoothed,
                before: choice.errors.map(|e| e.0),
                after,
                spread: spread_,
                applied,
                grid: choice.grid,
                training,
            });
        }
        // What only smoothing reads (the |x| histograms, the sampled rows) is not carried
        // through the passes after it: the permutation reads the sums and maxima.
        for region in regions.regions.iter().filter(|r| r.kind == RegionKind::Mlp) {
            for name in sink_activations(region) {
                if let Some(stats) = calib.get_mut(&name) {
                    stats.drop_sketch_and_rows();
                }
            }
        }
        ctx.provide(calib);
        Ok(out)
    }
}

/// The pass's notes: the channel spread or the probed error, the search's choices, and
/// what training did.
fn notes(mode: Mode, training: Training, choices: &[RegionChoice]) -> Vec<String> {
    let mut notes = Vec::new();
    let what = match mode {
        Mode::Fixed(s) => s.to_string(),
        Mode::Search => "search".to_string(),
    };
    let spreads: Vec<(f64, f64)> = choices.iter().filter_map(|c| c.spread).collect();
    if !spreads.is_empty() {
        let n = spreads.len() as f64;
        let (b, a) = spreads
            .iter()
            .fold((0.0, 0.0), |(x, y), (p, q)| (x + p, y + q));
        notes.push(format!(
            "{what}: the largest channel's statistic over the median channel's: {:.1} before, {:.1} after (mean over {} regions smoothed)",
            b / n,
            a / n,
            spreads.len()
        ));
    }
    let probed: Vec<(f64, f64)> = choices
        .iter()
        .filter_map(|c| Some((c.before?.relative(), c.after?.relative())))
        .collect();
    if !probed.is_empty() {
        let n = probed.len() as f64;
        let (b, a) = probed
            .iter()
            .fold((0.0, 0.0), |(x, y), (p, q)| (x + p, y + q));
        notes.push(format!(
            "{what}: down_proj quantized error on sampled rows (mean E / |xW|^2 over {} regions): {:.5} unsmoothed, {:.5} smoothed ({:+.1}%)",
            probed.len(),
            b / n,
            a / n,
            100.0 * (a / b - 1.0)
        ));
    }
    notes.extend(training_notes(training, choices));
    if mode == Mode::Search {
        let mut counts: Vec<(String, usize)> = Vec::new();
        for c in choices {
            let k = c.smoothing.map_or("none".to_string(), |s| s.to_string());
            match counts.iter_mut().find(|e| e.0 == k) {
                Some(e) => e.1 += 1,
                None => counts.push((k, 1)),
            }
        }
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let list: Vec<String> = counts.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        notes.push(format!("search chose: {}", list.join(", ")));
        // Each candidate as one policy for every region: the mean relative error.
        let n = choices.iter().filter(|c| !c.grid.is_empty()).count();
        if n > 0 {
            let candidates = search_candidates();
            let mean = |k: usize| {
                choices
                    .iter()
                    .filter_map(|c| c.grid.get(k))
                    .map(|g| g.1.relative())
                    .sum::<f64>()
                    / n as f64
            };
            // The per-region best among the max-based and among the quantile candidates:
            // the two smoothings compared, each with its own search.
            let best_of = |keep: &dyn Fn(&Smoothing) -> bool| {
                choices
                    .iter()
                    .filter(|c| !c.grid.is_empty())
                    .map(|c| {
                        c.grid
                            .iter()
                            .filter(|g| g.0.as_ref().is_some_and(keep))
                            .map(|g| g.1.relative())
                            .fold(f64::INFINITY, f64::min)
                    })
                    .sum::<f64>()
                    / n as f64
            };
            let max = best_of(&|c| c.statistic == Statistic::Max);
            let quantile = best_of(&|c| c.statistic != Statistic::Max);
            notes.push(format!(
                "search: per-region best of the max-based candidates {max:.5}, of the quantile ones {quantile:.5} ({:+.1}%)",
                100.0 * (quantile / max - 1.0)
            ));
            notes.push(format!(
                "search grid (mean E / |xW|^2 of one policy for all {n} regions): none {:.5}",
                mean(0)
            ));
            for &alpha in &SEARCH_ALPHAS {
                let row: Vec<String> = candidates
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.is_some_and(|c| c.alpha == alpha))
                    .map(|(k, c)| {
                        let st = match c.expect("some").statistic {
                            Statistic::Max => "max".to_string(),
                            Statistic::Quantile(q) => format!("q={q}"),
                        };
                        format!("{st} {:.5}", mean(k))
                    })
                    .collect();
                notes.push(format!("search grid alpha={alpha}: {}", row.join(", ")));
            }
        }
    }
    notes
}

/// `a -> b (+x%)` for mean relative errors.
fn change(a: f64, b: f64) -> String {
    format!("{a:.5} -> {b:.5} ({:+.1}%)", 100.0 * (b / a - 1.0))
}

/// Training's notes: the mean relative probed errors before and after, on the train and
/// the held-out rows with the starting permutation held, then with the permutation
/// recomputed from the trained scales; how many regions kept them.
fn training_notes(training: Training, choices: &[RegionChoice]) -> Vec<String> {
    let reports: Vec<&TrainReport> = choices.iter().filter_map(|c| c.training.as_ref()).collect();
    if reports.is_empty() {
        return Vec::new();
    }
    let n = reports.len();
    let mean = |f: &dyn Fn(&TrainReport) -> LayerError| {
        reports.iter().map(|r| f(r).relative()).sum::<f64>() / n as f64
    };
    let kept = reports.iter().filter(|r| r.kept).count();
    let mut steps: Vec<usize> = reports.iter().map(|r| r.run.step).collect();
    steps.sort_unstable();
    vec![
        format!(
            "train ({} steps, lr {}): down_proj quantized error (mean E / |xW|^2 over {n} regions, the permutation of the starting scales held): train rows {}, held-out rows {}",
            training.steps,
            training.lr,
            change(mean(&|r| r.run.train.0), mean(&|r| r.run.train.1)),
            change(mean(&|r| r.run.held_out.0), mean(&|r| r.run.held_out.1)),
        ),
        format!(
            "train: with the permutation recomputed from the scales: held-out rows at the trained scales {}, all rows at the scales folded {}; trained scales kept in {kept} of {n} regions (median best step {})",
            change(mean(&|r| r.held_out.0), mean(&|r| r.held_out.1)),
            change(mean(&|r| r.all_rows.0), mean(&|r| r.all_rows.1)),
            steps[n / 2]
        ),
    ]
}

impl Pass for Smooth {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn description(&self) -> &'static str {
        Self::DESCRIPTION
    }

    fn run(&mut self, model: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        if transform::already_applied(model, ctx, Self::NAME) {
            return Ok(PassOutcome::from_changed(false));
        }
        let choices = self.run_regions(model, ctx)?;
        let smoothed = choices.iter().filter(|c| c.smoothed).count() as u64;
        if smoothed > 0 {
            transform::record_applied(model, Self::NAME);
        }
        for n in notes(self.mode, self.training, &choices) {
            ctx.note(n);
        }
        let mut total = transform::Applied::default();
        for c in &choices {
            total += c.applied;
        }
        Ok(PassOutcome::from_changed(smoothed > 0)
            .with("regions-smoothed", smoothed)
            .with("weights-rewritten", (total.rewritten + total.untied) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_follow_the_formula_and_keep_dead_channels() {
        let s = Smoothing {
            statistic: Statistic::Max,
            alpha: 0.5,
        };
        let got = s.scales(&[4.0, 0.0, 9.0, 1.0], &[1.0, 2.0, 4.0, 0.0]);
        assert_eq!(got, [2.0, 1.0, 1.5, 1.0]);
        let all_act = Smoothing { alpha: 1.0, ..s };
        assert_eq!(all_act.scales(&[4.0], &[7.0]), [4.0]);
    }

    /// `train` and `lr` parse into the pass; bad values are errors naming the option.
    #[test]
    fn training_options_parse_and_fail_clearly() {
        let r = crate::registry();
        let build = |spec: &str| r.build(spec).map(|_| ()).map_err(|e| e.to_string());
        assert!(build("smooth(method=search,train=100,lr=0.02)").is_ok());
        assert!(build("smooth(train=0)").is_ok());
        for (spec, want) in [
            (
                "smooth(train=-1)",
                "option `train`: `-1` is not a number of steps",
            ),
            (
                "smooth(train=many)",
                "option `train`: `many` is not a number of steps",
            ),
            (
                "smooth(lr=0)",
                "option `lr`: `0` is not a learning rate in (0, 1]",
            ),
            (
                "smooth(lr=2)",
                "option `lr`: `2` is not a learning rate in (0, 1]",
            ),
            (
                "smooth(lr=NaN)",
                "option `lr`: `NaN` is not a learning rate",
            ),
            (
                "smooth(steps=3)",
                "valid options: method, alpha, q, train, lr",
            ),
        ] {
            let e = build(spec).unwrap_err();
            assert!(e.contains(want), "{spec}: {e}");
        }
        let parse = |kv: &[(&str, &str)]| {
            let kv = kv
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Smooth::parse(&PassOptions::new("smooth", kv))
                .unwrap()
                .training
        };
        assert_eq!(
            parse(&[("train", "100"), ("lr", "0.02")]),
            Training {
                steps: 100,
                lr: 0.02
            }
        );
        assert_eq!(
            parse(&[]),
            Training {
                steps: 0,
                lr: smooth_train::DEFAULT_LR
            }
        );
    }

    #[test]
    fn specs_parse_and_print() {
        let q = Smoothing::parse("quantile(q=0.99, alpha=0.6)").unwrap();
        assert_eq!(q.statistic, Statistic::Quantile(0.99));
        assert_eq!(q.alpha, 0.6);
        assert_eq!(q.to_string(), "quantile(q=0.99,alpha=0.6)");
        assert_eq!(q.pass_spec(), "smooth(method=quantile,q=0.99,alpha=0.6)");
        assert_eq!(
            Smoothing::parse("max").unwrap().pass_spec(),
            "smooth(method=max,alpha=0.5)"
        );
        assert!(Smoothing::parse("max(alpha=2)").is_err());
        // No smoothing first, then every alpha with every statistic.
        let c = search_candidates();
        assert_eq!(
            c.len(),
            1 + SEARCH_ALPHAS.len() * (SEARCH_QUANTILES.len() + 1)
        );
        assert!(c[0].is_none());
    }
}
