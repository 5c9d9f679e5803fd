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
//! A policy per region (`alpha`, `q`, chosen by a search on the quantized layer's error)
//! can replace the pass-wide one: [`SmoothPolicy`], a pass resource.
//!
//! The statistics of the smoothed activations are divided by `s` in the `Calibration`
//! resource (exact: every statistic kept is positively homogeneous), so a later `permute`
//! chooses its blocks from what the online Hadamard will see.
//!
//! Counters: `regions-smoothed`, `weights-rewritten`.

use crate::calibration::Calibration;
use crate::permute::sink_activations;
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

    /// The statistics option the calibration needs for this smoothing.
    pub fn needs_quantiles(&self) -> bool {
        matches!(self.statistic, Statistic::Quantile(_))
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

/// Per mlp region (by index among the mlp regions, in [`Regions`] order), the smoothing
/// to apply instead of the pass's own; `None` entries are left unsmoothed. A pass resource.
#[derive(Clone, Debug, Default)]
pub struct SmoothPolicy(pub Vec<Option<Smoothing>>);

#[derive(Debug)]
pub struct Smooth {
    smoothing: Smoothing,
}

impl Smooth {
    pub const NAME: &'static str = "smooth";
    pub const DESCRIPTION: &'static str = "divide each mlp region's sink input by calibrated channel scales a^alpha / w^(1-alpha), folded into up_proj and down_proj (exact); options method=max|quantile, alpha=0.5, q=0.999";

    pub fn from_options(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        opts.allow_only(&["method", "alpha", "q"])?;
        let method = opts.choice_or("method", &["max", "quantile"], "quantile")?;
        // A number in a range, or the option's error.
        let number = |name: &str, expected: &str, default: f64, ok: fn(f64) -> bool| {
            let v = opts.parse_or(name, expected, default)?;
            if ok(v) {
                Ok(v)
            } else {
                Err(OptionError::Invalid {
                    pass: opts.pass().to_string(),
                    option: name.to_string(),
                    value: opts.get(name).unwrap_or_default().to_string(),
                    expected: expected.to_string(),
                })
            }
        };
        let alpha = number("alpha", "a number in [0, 1]", 0.5, |a| {
            (0.0..=1.0).contains(&a)
        })?;
        let statistic = match method {
            "max" => Statistic::Max,
            _ => Statistic::Quantile(number("q", "a number in (0, 1]", 0.999, |q| {
                q > 0.0 && q <= 1.0
            })?),
        };
        Ok(Box::new(Smooth {
            smoothing: Smoothing { statistic, alpha },
        }))
    }

    pub fn new(smoothing: Smoothing) -> Smooth {
        Smooth { smoothing }
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
    let mut seen = Vec::new();
    for e in &region.sinks {
        let Some((_, v)) = e.activation else { continue };
        if seen.contains(&v) {
            continue;
        }
        seen.push(v);
        let name = region.activation_name(v);
        let stats = calib.get(name).ok_or_else(|| {
            format!("no calibration statistics for `{name}` (calibrate with --calib-text or --calib-ids)")
        })?;
        if stats.channels() != e.channels.len() {
            return Err(format!(
                "statistics of `{name}` have {} channels, the region reads {}",
                stats.channels(),
                e.channels.len()
            ));
        }
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
        for (&c, a) in e.channels.iter().zip(a) {
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

/// Smooths one region: returns the scales `s` (activations divided by them) and what the
/// mechanism did. The region must admit positive scales.
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
        if let Some(mut stats) = calib.get(&name).cloned() {
            stats.divide_channels(&local).map_err(|e| e.to_string())?;
            calib.insert(name, stats);
        }
    }
    Ok(())
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
        let Some(mut calib) = ctx.resource::<Calibration>().cloned() else {
            return Err(PassError::msg(
                "smooth: needs calibration statistics (--calib-text with --tokenizer, or --calib-ids)",
            ));
        };
        let policy = ctx.resource::<SmoothPolicy>().cloned();
        let regions = ctx.analysis::<Regions>(model)?;
        let (mut smoothed, mut total) = (0u64, transform::Applied::default());
        let mut spreads: Vec<(f64, f64)> = Vec::new();
        for (k, (i, region)) in regions
            .regions
            .iter()
            .enumerate()
            .filter(|(_, r)| r.kind == RegionKind::Mlp)
            .enumerate()
        {
            let what = format!("region #{i} (mlp, d = {})", region.dim);
            let smoothing = match &policy {
                Some(p) => match p.0.get(k).copied().flatten() {
                    Some(s) => s,
                    None => continue,
                },
                None => self.smoothing,
            };
            if let Some(why) = region.why_not(TransformKind::Scale) {
                ctx.note(format!("{what}: not smoothed: {why}"));
                continue;
            }
            if !ctx.rewrite() {
                break;
            }
            let before = activation_stat(region, &calib, smoothing.statistic)
                .map_err(|e| PassError::msg(format!("smooth: {what}: {e}")))?;
            let (s, a) = smooth_region(&mut model.graph, region, &calib, smoothing)
                .map_err(|e| PassError::msg(format!("smooth: {what}: {e}")))?;
            let after: Vec<f64> = before.iter().zip(&s).map(|(a, s)| a / s).collect();
            spreads.push((spread(&before), spread(&after)));
            divide_statistics(&mut calib, region, &s)
                .map_err(|e| PassError::msg(format!("smooth: {what}: {e}")))?;
            smoothed += 1;
            total += a;
        }
        if smoothed > 0 {
            transform::record_applied(model, Self::NAME);
            let n = spreads.len() as f64;
            let (b, a) = spreads
                .iter()
                .fold((0.0, 0.0), |(x, y), (p, q)| (x + p, y + q));
            ctx.note(format!(
                "{}: the largest channel's {} over the median channel's: {:.1} before, {:.1} after (mean over {} regions)",
                policy.as_ref().map_or(self.smoothing.to_string(), |_| "per-region policy".into()),
                match self.smoothing.statistic {
                    Statistic::Max => "max |x|",
                    Statistic::Quantile(_) => "|x| quantile",
                },
                b / n,
                a / n,
                spreads.len()
            ));
            ctx.provide(calib);
        }
        Ok(PassOutcome::from_changed(smoothed > 0)
            .with("regions-smoothed", smoothed)
            .with("weights-rewritten", (total.rewritten + total.untied) as u64))
    }
}
