//! Quantization in the compile command: presets and flags into a
//! [`perqc_passes::quantize::QuantConfig`], and the driver that calibrates what the weights
//! and clip ratios need, group of layers by group of layers, so each group sees the
//! already-quantized prefix and memory holds one group's Gram matrices at a time.

use crate::calib::CalibArgs;
use crate::sqnr::Table;
use crate::staged::Staged;
use anyhow::{Context, Result, bail};
use clap::Args;
use perqc_ir::Model;
use perqc_ops::quant::TokenQuant;
use perqc_passes::permute::Permute;
use perqc_passes::quantize::{
    FitScope, InputErrorFitting, QuantConfig, Quantizer, Rounding, SiteReport, Target,
};
use perqc_passes::regions::{Region, RegionKind, Regions, TransformKind};
use perqc_quant::{Format, Granularity, ScaleSearch};
use perqc_runtime::StatsOptions;
use std::io::IsTerminal;
use std::time::Instant;

#[derive(Args, Clone, Debug)]
pub struct QuantArgs {
    /// Starting point for the settings below: w4a4 (INT4 weights per channel, INT4
    /// per-token activations, head float), w4a16 (INT4 weights in groups of 32, head
    /// included, float activations), w8a8, mxfp4 (MXFP4 weights, float activations).
    #[arg(long, value_name = "NAME", default_value = "w4a4", value_parser = ["w4a4", "w4a16", "w8a8", "mxfp4"])]
    pub preset: String,
    /// Weight bits (2..=8).
    #[arg(long, value_name = "N")]
    pub w_bits: Option<u32>,
    /// Weight scale granularity: channel, tensor, or a group size along the input.
    #[arg(long, value_name = "G")]
    pub w_granularity: Option<String>,
    /// Weight scale choice: mse (clipping search) or max.
    #[arg(long, value_name = "HOW", value_parser = ["mse", "max"])]
    pub w_scale: Option<String>,
    /// Asymmetric weights (unsigned codes with a zero point).
    #[arg(long)]
    pub w_asym: bool,
    /// Weight format: int, fp4 (E2M1 with a float scale per group), mxfp4, mxint8.
    #[arg(long, value_name = "FMT", value_parser = ["int", "fp4", "mxfp4", "mxint8"])]
    pub format: Option<String>,
    /// Activation bits (2..=8), or none for weight-only.
    #[arg(long, value_name = "N")]
    pub a_bits: Option<String>,
    /// Symmetric activation quantizers (default asymmetric).
    #[arg(long)]
    pub a_sym: bool,
    /// Weight rounding: rtn or gptq (default gptq with calibration data, else rtn).
    #[arg(long, value_name = "HOW", value_parser = ["rtn", "gptq"])]
    pub rounding: Option<String>,
    /// Where GPTQ aims at the linear's float output: before rounding, the weight moves to
    /// the ridge fit of `x Wᵀ` on the quantized input `Q(x)`, so the rounding also makes up
    /// for the activation quantizer's error where it can (docs/quantization.md). online (the
    /// default with GPTQ and activation quantizers): the inputs an online Hadamard computes,
    /// before down_proj; all: every quantized input (about 1.1x the compile time of online);
    /// none.
    #[arg(long, value_name = "WHERE", value_parser = ["online", "all", "none"])]
    pub gptq_input_error: Option<String>,
    /// The ridge of that fit, relative to the mean of the Hessian's diagonal (1 is the
    /// measured choice).
    #[arg(long, value_name = "R")]
    pub gptq_ridge: Option<f64>,
    /// Activation clip ratio: search (per quantizer, on calibration output error; the
    /// default with calibration data), none (1.0) or a fixed ratio in (0, 1].
    #[arg(long, value_name = "HOW")]
    pub clip: Option<String>,
    /// Quantize the head (LM head) too; w4a16 does by default.
    #[arg(long)]
    pub quantize_head: bool,
    /// Quantize the token embedding table (weight-only, the weight settings with one
    /// scale per entry or per group along the width); w4a16 does by default.
    #[arg(long)]
    pub quantize_embedding: bool,
    /// Leave linears whose node or weight name matches this pattern (`*` wildcard) float
    /// (repeatable); with the embedding quantized, also a lookup table whose Gather or table
    /// name matches.
    #[arg(long, value_name = "PATTERN")]
    pub skip: Vec<String>,
    /// Export form of the weights: qdq (DequantizeLinear) or ort (com.microsoft
    /// MatMulNBits, weight-only 4-bit groups).
    #[arg(long, value_name = "T", default_value = "qdq", value_parser = ["qdq", "ort"])]
    pub target: String,
    /// Write the per-linear report as JSON. With calibration data it also measures each
    /// linear's output SQNR with and without the recipe's transforms (the weight quantizer
    /// rounding to nearest, the activation quantizer at clip 1, on sampled rows of the first
    /// two calibration windows; two more passes over the model, printed by layer kind).
    #[arg(long, value_name = "FILE")]
    pub report: Option<std::path::PathBuf>,
}

impl QuantArgs {
    /// The configuration the preset and flags give; `calibrated` says whether calibration
    /// data is there (GPTQ and the clip search default on with it). One-line errors.
    pub fn config(&self, calibrated: bool, notes: &mut Vec<String>) -> Result<QuantConfig> {
        let mut c = QuantConfig::default();
        match self.preset.as_str() {
            "w4a16" => {
                c.weights.granularity = Granularity::Group(32);
                c.act = None;
                c.head = true;
                c.embedding = true;
            }
            "w8a8" => {
                c.weights.bits = 8;
                c.act = Some(TokenQuant {
                    bits: 8,
                    symmetric: false,
                    clip: 1.0,
                });
            }
            "mxfp4" => {
                c.weights.format = Format::MxFp4;
                c.weights.granularity = Granularity::Group(32);
                c.act = None;
            }
            _ => {}
        }
        if let Some(b) = self.w_bits {
            c.weights.bits = b;
        }
        if let Some(g) = &self.w_granularity {
            c.weights.granularity = match g.as_str() {
                "channel" => Granularity::Channel,
                "tensor" => Granularity::Tensor,
                n => Granularity::Group(n.parse().map_err(|_| {
                    anyhow::anyhow!("--w-granularity: `{n}` is not channel, tensor or a group size")
                })?),
            };
        }
        if let Some(s) = &self.w_scale {
            c.weights.scale = if s == "max" {
                ScaleSearch::Max
            } else {
                ScaleSearch::Mse
            };
        }
        if self.w_asym {
            c.weights.symmetric = false;
            c.weights.signed = false;
        }
        if let Some(f) = &self.format {
            c.weights.format = match f.as_str() {
                "fp4" => Format::Fp4,
                "mxfp4" => Format::MxFp4,
                "mxint8" => Format::MxInt8,
                _ => Format::Int,
            };
            if matches!(c.weights.format, Format::MxFp4 | Format::MxInt8) {
                if self.w_granularity.as_deref().is_some_and(|g| g != "32") {
                    bail!(
                        "--format {f} has blocks of 32 along the input; --w-granularity {} does not fit (leave it out)",
                        self.w_granularity.as_deref().unwrap_or_default()
                    );
                }
                c.weights.granularity = Granularity::Group(32);
            }
            c.weights.bits = match c.weights.format {
                Format::MxInt8 => 8,
                Format::Int => c.weights.bits,
                _ => 4,
            };
        }
        match self.a_bits.as_deref() {
            None => {}
            Some("none") => c.act = None,
            Some(b) => {
                let bits: u32 = b.parse().map_err(|_| {
                    anyhow::anyhow!("--a-bits: `{b}` is not a bit width 2..=8 or none")
                })?;
                c.act = Some(TokenQuant {
                    bits,
                    symmetric: false,
                    clip: 1.0,
                });
            }
        }
        if let Some(a) = &mut c.act {
            a.symmetric = self.a_sym;
        }
        c.head |= self.quantize_head;
        c.embedding |= self.quantize_embedding;
        c.skip = self.skip.clone();
        c.target = if self.target == "ort" {
            Target::Ort
        } else {
            Target::Qdq
        };
        c.rounding = match self.rounding.as_deref() {
            Some("gptq") if !calibrated => {
                bail!(
                    "--rounding gptq needs calibration data (--calib-text with --tokenizer, or --calib-ids)"
                )
            }
            Some("gptq") => Rounding::Gptq,
            Some(_) => Rounding::Rtn,
            None if calibrated => Rounding::Gptq,
            None => {
                notes.push(
                    "no calibration data: weights rounded to nearest (no GPTQ), activation clip ratio 1 (no search)".into(),
                );
                Rounding::Rtn
            }
        };
        match self.clip.as_deref() {
            None => c.clip_search = calibrated && c.act.is_some(),
            Some("search") if !calibrated => {
                bail!(
                    "--clip search needs calibration data (--calib-text with --tokenizer, or --calib-ids)"
                )
            }
            Some("search") => c.clip_search = true,
            Some("none") => {}
            Some(r) => {
                let ratio: f32 = r
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--clip: `{r}` is not search, none or a ratio"))?;
                match &mut c.act {
                    Some(a) => a.clip = ratio,
                    None => bail!(
                        "--clip applies to activation quantizers; this configuration has none"
                    ),
                }
            }
        }
        if c.clip_search && c.act.is_none() {
            c.clip_search = false;
        }
        let ridge = self.gptq_ridge.unwrap_or(1.0);
        if !(ridge.is_finite() && ridge > 0.0) {
            bail!("--gptq-ridge: {ridge} is not a ridge > 0");
        }
        let scope = match self.gptq_input_error.as_deref() {
            // By default wherever it applies (GPTQ and activation quantizers).
            None if c.rounding == Rounding::Gptq && c.act.is_some() => Some(FitScope::Online),
            Some("online") => Some(FitScope::Online),
            Some("all") => Some(FitScope::All),
            _ => None,
        };
        if scope.is_none() && self.gptq_ridge.is_some() {
            bail!("--gptq-ridge applies to the GPTQ fit to the float output, which is off");
        }
        c.gptq_input_error = scope.map(|scope| InputErrorFitting { scope, ridge });
        c.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(c)
    }
}

/// Rows the clip search samples per quantizer.
const CLIP_ROWS: usize = 256;

/// The mlp transforms of the recipe that read calibration statistics (the permutation and
/// the online block Hadamard behind it), applied by the driver region by region as the
/// staged calibration reaches each region, instead of by a calibration pass of their own
/// before the pipeline: the statistics come from the same forward pass as the quantizers',
/// on the already-quantized prefix.
pub struct LayerwiseMlp {
    pub permute: Permute,
    /// Block of the online Hadamard (the permutation's blocks).
    pub block: usize,
    /// What the permutation's statistics of each sink input keep (row profiles for
    /// `tokenmax`).
    pub stats: StatsOptions,
}

/// One mlp region waiting for its transforms.
struct Pending {
    region: Region,
    /// What its sinks read: the permutation's statistics.
    watch: Vec<String>,
    /// The first group (by index) that quantizes one of its sources, if any: the region is
    /// transformed after that group's stage (before its weights are rounded).
    group: Option<usize>,
}

/// What the driver did.
pub struct QuantSummary {
    pub reports: Vec<SiteReport>,
    pub calibration: std::time::Duration,
    pub rounding: std::time::Duration,
    pub runs: usize,
    /// The most memory the values kept between calibration stages held.
    pub stage_bytes: usize,
    /// Quantized linears the stages ran on the integer kernels (counted once per stage).
    pub int_linears: u64,
    /// What the layer-by-layer mlp transforms did (notes).
    pub notes: Vec<String>,
}

/// Quantizes `model` (canonical, transforms applied) by `config`, calibrating on `calib`
/// where the configuration needs data. `release` gives back mapped weight pages once a
/// session has its copy.
pub fn run(
    model: &mut Model,
    config: QuantConfig,
    calib_args: &CalibArgs,
    layerwise: Option<&LayerwiseMlp>,
    release: &dyn Fn(&perqc_ir::Tensor),
) -> Result<QuantSummary> {
    // The regions before any quantizer is in (the analysis reads float linears).
    let mut pending = match layerwise {
        Some(_) => mlp_regions(model)?,
        None => Vec::new(),
    };
    let mut q = Quantizer::new(model, config.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
    for p in &mut pending {
        p.group = q.groups.iter().position(|g| {
            g.sites
                .iter()
                .any(|&i| p.region.sources.iter().any(|e| e.node == q.sites[i].node))
        });
    }
    let mut summary = QuantSummary {
        reports: Vec::new(),
        calibration: Default::default(),
        rounding: Default::default(),
        runs: 0,
        stage_bytes: 0,
        int_linears: 0,
        notes: Vec::new(),
    };
    let all: Vec<usize> = (0..q.groups.len()).collect();
    let needs_data = config.rounding == Rounding::Gptq || config.clip_search;
    if layerwise.is_some() && !needs_data {
        bail!(
            "layer-by-layer mlp transforms need a calibrating configuration (GPTQ or the clip search)"
        );
    }
    if !needs_data {
        let t = Instant::now();
        summary.reports = q
            .quantize(model, &all, None)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        summary.rounding += t.elapsed();
        q.finish(model).map_err(|e| anyhow::anyhow!("{e}"))?;
        return Ok(summary);
    }
    // Group by group in node order, each calibrated on the model with every earlier group
    // already quantized (one forward pass in all: see `staged`).
    let gram = StatsOptions {
        gram: config.rounding == Rounding::Gptq,
        ..StatsOptions::default()
    };
    let samples = StatsOptions {
        sample_every: (calib_args.calib_seqs * calib_args.calib_len / CLIP_ROWS).max(1),
        ..StatsOptions::default()
    };
    let mut staged = Staged::new(model, calib_args)?;
    let progress = std::io::stderr().is_terminal();
    let mut spread = Vec::new();
    let mut transformed = 0usize;
    // Regions no group quantizes a source of: transformed first, from a calibration run of
    // their own (a separate `Staged`, so none of its values, computed before any quantizer,
    // is reused by the stages below).
    let alone: Vec<usize> = (0..pending.len())
        .filter(|&p| pending[p].group.is_none())
        .collect();
    if let Some(layerwise) = layerwise
        && !alone.is_empty()
    {
        let t = Instant::now();
        let names = watched(&pending, &alone);
        let watch: Vec<(String, StatsOptions)> = names
            .iter()
            .map(|n| (n.clone(), layerwise.stats.clone()))
            .collect();
        let c = Staged::new(model, calib_args)?
            .run(model, &watch, &names, release)
            .context("calibrating the mlp permutations")?;
        summary.calibration += t.elapsed();
        summary.runs += 1;
        transformed += transform_regions(
            model,
            &pending,
            &alone,
            layerwise,
            &c,
            &mut spread,
            &mut summary.notes,
        )?;
    }
    let n = q.groups.len();
    for g in 0..n {
        q.prepare(model, g).map_err(|e| anyhow::anyhow!("{e}"))?;
        let group = &q.groups[g];
        let mut watch = Vec::new();
        if config.rounding == Rounding::Gptq {
            watch.push((group.output.clone(), gram.clone()));
        }
        // The quantizer's input: the clip search samples it, and it is kept for the next
        // stage, which computes the quantizer's output again from it (see `transient`)
        // instead of the layers in front of it.
        if let Some(act) = &group.act {
            let mut opts = match config.clip_search {
                true => samples.clone(),
                false => StatsOptions::default(),
            };
            if group.fit {
                opts.quant_error = Some(act.quant);
            }
            watch.push((group.input.clone(), opts));
        }
        // The mlp regions this group feeds: their sinks' inputs, computed with this
        // group's weights still float (they are permuted before they are rounded).
        let regions: Vec<usize> = (0..pending.len())
            .filter(|&p| pending[p].group == Some(g))
            .collect();
        let region_values = watched(&pending, &regions);
        for v in &region_values {
            let opts = layerwise.map_or_else(StatsOptions::default, |l| l.stats.clone());
            watch.push((v.clone(), opts));
        }
        if watch.is_empty() {
            continue;
        }
        let t = Instant::now();
        // The quantizer's output is computed again after the group is quantized (the clip
        // search may change its ratio, and the next stage then runs the whole quantized
        // linear, which the integer kernels take as one step), so it is not kept; nor are
        // the region values (the transforms change what computes them).
        let mut transient = region_values.clone();
        if group.act.is_some() {
            transient.push(group.output.clone());
        }
        let c = staged
            .run(model, &watch, &transient, release)
            .with_context(|| {
                format!("calibrating the inputs of {}", q.sites[group.sites[0]].name)
            })?;
        summary.calibration += t.elapsed();
        summary.runs += 1;
        if let Some(layerwise) = layerwise {
            transformed += transform_regions(
                model,
                &pending,
                &regions,
                layerwise,
                &c,
                &mut spread,
                &mut summary.notes,
            )?;
            staged.forget(model, &region_values);
        }
        // No trim here or after the rounding: the stage's freed buffers serve the rounding
        // and the next stage (one arena, `perqc_runtime::share_arenas`), which would
        // otherwise page-fault them in again.
        let t = Instant::now();
        let r = q
            .quantize(model, &[g], Some(&c))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        summary.rounding += t.elapsed();
        summary.reports.extend(r);
        drop(c);
        // The quantizer's output is computed again (see `transient`).
        if q.groups[g].act.is_some() {
            staged.forget(model, &[q.groups[g].output.clone()]);
        }
        if progress {
            eprint!("\rquantize: {}/{n} activation groups", g + 1);
        }
    }
    if progress {
        eprintln!();
    }
    if let Some(layerwise) = layerwise {
        if let Some(note) = layerwise.permute.spread_note(&spread) {
            summary.notes.push(note);
        }
        summary.notes.push(format!(
            "layer by layer: permute ({}) and online-hadamard (block {}) applied to {transformed} of {} mlp regions as calibration reached them",
            layerwise.permute.method(),
            layerwise.block,
            pending.len()
        ));
    }
    summary.stage_bytes = staged.peak_bytes;
    summary.int_linears = staged.int_linears;
    // Groups nothing calibrated (none, with the settings above) are rounded without data.
    let t = Instant::now();
    summary.reports.extend(
        q.quantize(model, &all, None)
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    summary.rounding += t.elapsed();
    // The last stage's session and the float weights are gone: give their memory back
    // before the embedding table (if asked for) is quantized.
    perqc_runtime::trim_allocator();
    q.finish(model).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(summary)
}

/// The mlp regions of `model` (transforms before quantization applied, no quantizer yet),
/// with what their sinks read.
fn mlp_regions(model: &Model) -> Result<Vec<Pending>> {
    let shapes = perqc_ops::infer_model(model).context("shape inference")?;
    let regions = Regions::find(model, &shapes);
    Ok(regions
        .regions
        .into_iter()
        .filter(|r| r.kind == RegionKind::Mlp)
        .map(|region| Pending {
            watch: perqc_passes::permute::sink_activations(&region),
            region,
            group: None,
        })
        .collect())
}

/// What the sinks of regions `which` read.
fn watched(pending: &[Pending], which: &[usize]) -> Vec<String> {
    which
        .iter()
        .flat_map(|&p| pending[p].watch.iter().cloned())
        .collect()
}

/// [`transform_region`] on regions `which`; returns how many got their rotation.
fn transform_regions(
    model: &mut Model,
    pending: &[Pending],
    which: &[usize],
    layerwise: &LayerwiseMlp,
    calib: &perqc_passes::calibration::Calibration,
    spread: &mut Vec<(f64, f64)>,
    notes: &mut Vec<String>,
) -> Result<usize> {
    let mut rotated = 0;
    for &p in which {
        rotated += transform_region(model, &pending[p], layerwise, calib, spread, notes)?;
    }
    Ok(rotated)
}

/// Permutes one region by its statistics in `calib` (where it admits a permutation) and
/// puts the online Hadamard in front of its sinks; returns 1 if the rotation went in (a
/// refusal is noted, as the pipeline's pass notes it).
fn transform_region(
    model: &mut Model,
    p: &Pending,
    layerwise: &LayerwiseMlp,
    calib: &perqc_passes::calibration::Calibration,
    spread: &mut Vec<(f64, f64)>,
    notes: &mut Vec<String>,
) -> Result<usize> {
    let mut region = std::borrow::Cow::Borrowed(&p.region);
    match region.why_not(TransformKind::Permutation) {
        Some(why) => notes.push(format!(
            "an mlp region (d = {}): no permutation: {why}",
            region.dim
        )),
        None => {
            let (a, s) = layerwise
                .permute
                .apply_region(&mut model.graph, &region, Some(calib))
                .map_err(|e| anyhow::anyhow!("permuting an mlp region: {e}"))?;
            spread.extend(s);
            if a.untied > 0 {
                // A shared weight got its own copy: the region's endpoints are read again.
                let sinks: Vec<_> = region.sinks.iter().map(|e| e.node).collect();
                let fresh = mlp_regions(model)?
                    .into_iter()
                    .find(|r| {
                        r.region
                            .sinks
                            .iter()
                            .map(|e| e.node)
                            .eq(sinks.iter().copied())
                    })
                    .context("the permuted mlp region is no longer found")?;
                region = std::borrow::Cow::Owned(fresh.region);
            }
        }
    }
    match perqc_passes::online_hadamard::rotate_region(
        &mut model.graph,
        &region,
        Some(layerwise.block),
        None,
    ) {
        Ok(_) => Ok(1),
        Err(why) => {
            notes.push(format!(
                "an mlp region (d = {}): no online Hadamard: {why}",
                region.dim
            ));
            Ok(0)
        }
    }
}

/// The per-linear report as JSON; with `probe`, each linear's output SQNR at each of its
/// stages too (`probe_sqnr_db`, by stage label).
pub fn report_json(reports: &[SiteReport], probe: Option<&Table>) -> String {
    let rows: Vec<serde_json::Value> = reports
        .iter()
        .map(|r| {
            let mut row = serde_json::json!({
                "linear": r.name,
                "k": r.k,
                "n": r.n,
                "rounding": format!("{:?}", r.rounding).to_lowercase(),
                "weight_sqnr_db": r.weight_sqnr,
                "output_sqnr_db": r.output_sqnr,
                "clip": r.clip,
                "fit_to_float_output": r.fitted,
            });
            if let Some(t) = probe {
                let by_stage: serde_json::Map<String, serde_json::Value> = t
                    .stages
                    .iter()
                    .enumerate()
                    .map(|(st, label)| {
                        let v = t.sqnr_db(st, &r.name).filter(|v| v.is_finite());
                        (label.clone(), serde_json::json!(v))
                    })
                    .collect();
                row["probe_sqnr_db"] = by_stage.into();
            }
            row
        })
        .collect();
    let mut out = serde_json::json!({ "linears": rows });
    if let Some(t) = probe {
        out["probe"] = serde_json::json!({
            "what": probe_what(t),
            "stages": t.stages,
            "rows": t.rows,
        });
    }
    serde_json::to_string_pretty(&out).unwrap_or_default()
}

/// Writes the JSON report to `path` through a temporary file (never half-written).
pub fn write_report(
    path: &std::path::Path,
    reports: &[SiteReport],
    probe: Option<&Table>,
) -> Result<()> {
    crate::write_atomically(path, report_json(reports, probe).as_bytes())
        .with_context(|| format!("--report: cannot write {}", path.display()))
}

/// What a probe table measures, in a phrase.
fn probe_what(t: &Table) -> String {
    let w = &t.probe.weights;
    let act = match t.probe.act {
        Some(a) => format!("A{} per token at clip 1", a.bits),
        None => "float activations".into(),
    };
    format!(
        "output SQNR with W{} {:?} {:?} rounded to nearest ({:?} scales), {act}, on {} sampled calibration rows",
        w.bits, w.format, w.granularity, w.scale, t.rows
    )
}

/// A few lines for the terminal: what was quantized, how long it took, the layers with the
/// lowest output SQNR (weight SQNR without calibration samples).
pub fn summary_text(s: &QuantSummary, probe: Option<&Table>) -> String {
    let mut out = String::new();
    let n = s.reports.len();
    if n == 0 {
        return "quantize: no linear layer quantized\n".into();
    }
    let mean = |f: &dyn Fn(&SiteReport) -> Option<f64>| {
        let v: Vec<f64> = s.reports.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let w = mean(&|r| Some(r.weight_sqnr)).unwrap_or(f64::NAN);
    let o = mean(&|r| r.output_sqnr);
    let fitted = s.reports.iter().filter(|r| r.fitted).count();
    out.push_str(&format!(
        "quantize: {n} linears; SQNR mean: weights {w:.1} dB{}; calibration {:.2?} in {} stages (kept between stages: {:.0} MiB{}), rounding {:.2?}{}\n",
        o.map(|o| format!(", outputs {o:.1} dB on calibration rows")).unwrap_or_default(),
        s.calibration,
        s.runs,
        s.stage_bytes as f64 / (1 << 20) as f64,
        if s.int_linears > 0 {
            "; quantized prefix on the integer kernels"
        } else {
            ""
        },
        s.rounding,
        match fitted {
            0 => String::new(),
            f => format!(" (GPTQ aimed at the float output: {f} linears)"),
        }
    ));
    let key = |r: &SiteReport| r.output_sqnr.unwrap_or(r.weight_sqnr);
    let mut worst: Vec<&SiteReport> = s.reports.iter().collect();
    worst.sort_by(|a, b| key(a).total_cmp(&key(b)));
    for r in worst.iter().take(3) {
        out.push_str(&format!(
            "  lowest: {} [{}x{}] {:.1} dB {}{}\n",
            r.name,
            r.k,
            r.n,
            key(r),
            if r.output_sqnr.is_some() {
                "output"
            } else {
                "weight"
            },
            r.clip.map(|c| format!(", clip {c}")).unwrap_or_default()
        ));
    }
    if let Some(t) = probe {
        out.push_str(&format!(
            "  by layer kind, {}: {}\n",
            probe_what(t),
            t.stages.join(" -> ")
        ));
        for (kind, n, means) in t.kind_means() {
            let means: Vec<String> = means.iter().map(|m| format!("{m:.1}")).collect();
            out.push_str(&format!("    {kind} ({n}): {} dB\n", means.join(" -> ")));
        }
    }
    out
}
