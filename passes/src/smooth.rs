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
//! The statistics of the smoothed activations are divided by `s` in the `Calibration`
//! resource (exact: every statistic kept is positively homogeneous), so a later `permute`
//! chooses its blocks from what the online Hadamard will see.
//!
//! Counters: `regions-smoothed`, `weights-rewritten`.

use crate::calibration::Calibration;
use crate::permutation::{PermuteMethod, permutation_from};
use crate::permute::{masses, sink_activations, sink_stats};
use crate::probe::{LayerError, Probe, SinkSample, sink_samples};
use crate::regions::{Region, RegionKind, Regions, TransformKind};
use crate::transform::{self, ChannelOp, Placement};
use perqc_ir::{Graph, Model, OptionError, Pass, PassContext, PassError, PassOptions, PassOutcome};
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
}

impl Smooth {
    pub const NAME: &'static str = "smooth";
    pub const DESCRIPTION: &'static str = "divide each mlp region's sink input by calibrated channel scales a^alpha / w^(1-alpha), folded into up_proj and down_proj (exact); method=search picks (alpha, statistic) per region by the down_proj's quantized error on sampled rows; options method=max|quantile|search, alpha=0.5, q=0.999, and for the error: permute=massdiff, block=32|full|none, wbits=4, abits=4|none";

    pub fn from_options(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        opts.allow_only(&["method", "alpha", "q", "permute", "block", "wbits", "abits"])?;
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
        Ok(Box::new(Smooth {
            mode,
            probing: Probing {
                permute,
                rotation,
                probe,
            },
        }))
    }

    pub fn new(mode: Mode, probing: Probing) -> Smooth {
        Smooth { mode, probing }
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
    let block = match probing.rotation {
        Rotation::Block(b) => Some(b),
        Rotation::Full => Some(region.dim),
        Rotation::None => None,
    };
    if let Some(b) = block {
        if probing.permute.uses_statistics() && b < region.dim {
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
    probing.probe.region_error(layers, &chain)
}

/// Smooths one region by `smoothing`: returns the scales `s` (activations divided by them)
/// and what the mechanism did. The region must admit positive scales.
pub fn smooth_region(
    graph: &mut Graph,
    region: &Region,
    calib: &Calibration,
    smoothing: Smoothing,
) -> Result<(Vec<f64>, transform::Applied), String> {
    let a = activation_stat(region, calib, smoothing.statistic)?;
    let w = weight_max(graph, region)?;
    let s = smoothing.scales(&a, &w);
    let op = ChannelOp::Diagonal(s.iter().map(|v| 1.0 / v).collect());
    let applied = transform::apply(graph, region, &op, Placement::Fold)?;
    Ok((s, applied))
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

/// A region's smoothing, its probed error before and after, and the search's grid.
type Choice = (
    Option<Smoothing>,
    Option<(LayerError, LayerError)>,
    Vec<(Option<Smoothing>, LayerError)>,
);

/// What the pass decided for one region.
#[derive(Clone, Debug)]
pub struct RegionChoice {
    /// Index among the model's regions.
    pub region: usize,
    pub smoothing: Option<Smoothing>,
    /// The probed error unsmoothed and with the choice (when rows were sampled).
    pub before: Option<LayerError>,
    pub after: Option<LayerError>,
    /// The largest channel's statistic over the median channel's, before and after.
    pub spread: Option<(f64, f64)>,
    /// What the mechanism did.
    pub applied: transform::Applied,
    /// The search's candidates with their probed errors (empty for a fixed smoothing).
    pub grid: Vec<(Option<Smoothing>, LayerError)>,
}

impl Smooth {
    /// Decides one region: the fixed smoothing, or the search's best candidate. Errors of
    /// the probe are reported when rows were sampled (required by the search).
    fn choose(
        &self,
        graph: &Graph,
        region: &Region,
        calib: &Calibration,
    ) -> Result<Choice, String> {
        let layers = sink_samples(graph, region, calib);
        let w = weight_max(graph, region)?;
        let scales = |c: &Smoothing| -> Result<Vec<f64>, String> {
            Ok(c.scales(&activation_stat(region, calib, c.statistic)?, &w))
        };
        match (self.mode, layers) {
            (Mode::Fixed(sm), Err(_)) => Ok((Some(sm), None, Vec::new())),
            (Mode::Fixed(sm), Ok(layers)) => {
                let before = probed_error(region, calib, &layers, None, &self.probing)?;
                let after =
                    probed_error(region, calib, &layers, Some(&scales(&sm)?), &self.probing)?;
                Ok((Some(sm), Some((before, after)), Vec::new()))
            }
            (Mode::Search, Err(why)) => Err(format!(
                "the search needs sampled calibration rows: {why} (calibrate with sample_every)"
            )),
            (Mode::Search, Ok(layers)) => {
                let mut grid = Vec::new();
                for c in search_candidates() {
                    let s = c.as_ref().map(&scales).transpose()?;
                    let e = probed_error(region, calib, &layers, s.as_deref(), &self.probing)?;
                    grid.push((c, e));
                }
                // The least error; the first candidate (no smoothing) on ties.
                let best = grid
                    .iter()
                    .fold(&grid[0], |b, c| if c.1.error < b.1.error { c } else { b });
                Ok((best.0, Some((grid[0].1, best.1)), grid))
            }
        }
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
        let mut out = Vec::new();
        for (i, region) in regions.regions.iter().enumerate() {
            if region.kind != RegionKind::Mlp {
                continue;
            }
            let what = format!("region #{i} (mlp, d = {})", region.dim);
            if let Some(why) = region.why_not(TransformKind::Scale) {
                ctx.note(format!("{what}: not smoothed: {why}"));
                continue;
            }
            if !ctx.rewrite() {
                break;
            }
            let fail = |e: String| PassError::msg(format!("smooth: {what}: {e}"));
            let (smoothing, errors, grid) = match self.choose(&model.graph, region, &calib) {
                Ok(c) => c,
                Err(e) => {
                    ctx.provide(calib);
                    return Err(fail(e));
                }
            };
            let (mut spread_, mut applied) = (None, transform::Applied::default());
            if let Some(sm) = smoothing {
                let a = activation_stat(region, &calib, sm.statistic).map_err(fail)?;
                let (s, done) =
                    smooth_region(&mut model.graph, region, &calib, sm).map_err(fail)?;
                let after: Vec<f64> = a.iter().zip(&s).map(|(a, s)| a / s).collect();
                spread_ = Some((spread(&a), spread(&after)));
                applied = done;
                divide_statistics(&mut calib, region, &s).map_err(fail)?;
            }
            out.push(RegionChoice {
                region: i,
                smoothing,
                before: errors.map(|e| e.0),
                after: errors.map(|e| e.1),
                spread: spread_,
                applied,
                grid,
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

/// The pass's notes: the channel spread or the probed error, and the search's choices.
fn notes(mode: Mode, choices: &[RegionChoice]) -> Vec<String> {
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
        let smoothed = choices.iter().filter(|c| c.smoothing.is_some()).count() as u64;
        if smoothed > 0 {
            transform::record_applied(model, Self::NAME);
        }
        for n in notes(self.mode, &choices) {
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
