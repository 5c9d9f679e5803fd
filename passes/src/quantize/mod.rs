//! `quantize`: weights offline, activations online.
//!
//! Assumes a canonical model (linears are `ai.perqc::Linear` with constant weights); run
//! after the exact transforms. Guarantees: every selected linear reads a quantized weight
//! (`DequantizeLinear` of packed codes, or `com.microsoft::MatMulNBits` for `target=ort`)
//! and, unless weight-only, a per-token quantized activation (`ai.perqc::FakeQuantize`,
//! lowered to QuantizeLinear/DequantizeLinear on export). The head (a linear writing a graph
//! output directly: the LM head) stays float unless `head=true`.
//!
//! Math: weights `Ŵ[n, k] = (code − zp) · s` per output channel, per group of `g` inputs or
//! per tensor, scales by max or MSE clipping search, codes by round-to-nearest or GPTQ
//! (`perqc_quant`). Activations per token `Q(x) = (clamp(round(x/s) + z, 0, 2^b − 1) − z) · s`
//! with `s, z` from the row's clipped range. A linear computes `Q(x) Ŵᵀ`.
//!
//! Data: with a `Calibration` resource, GPTQ reads the Gram matrix of each quantizer's
//! output (its name: [`Group::output`]) and the clip search reads the sampled rows of each
//! quantizer's input ([`Group::input`]); the CLI's driver calibrates group by group so each
//! sees the already-quantized prefix.
//!
//! Options: `wbits=4`, `wsym=true`, `wgroup=channel|tensor|G`, `wscale=mse|max`,
//! `format=int|fp4|mxfp4|mxint8`, `abits=4|none`, `asym=true` (asymmetric activations),
//! `aclip=1.0`, `head=false`, `embed=false` (the token embedding table too), `skip=PAT|PAT`
//! (`*` globs on node or weight names; with `embed=true` also on lookup tables and their
//! Gathers),
//! `rounding=rtn|gptq`, `gptqerr=none|online|all` (GPTQ aims at the float output, the
//! activation quantizer's rounding included, at the inputs an online Hadamard computes or at
//! every quantized input), `gptqridge=1` (its ridge), `target=qdq|ort`.

pub mod activations;
pub mod sites;
pub mod weights;

use crate::calibration::Calibration;
use activations::ActQuant;
use ndarray::Array2;
use perqc_ir::{Model, OptionError, Pass, PassContext, PassError, PassOptions, PassOutcome};
use perqc_ops::quant::TokenQuant;
use perqc_ops::stats::ChannelStats;
use perqc_quant::{Format, GptqOptions, Granularity, QWeight, QuantSpec, ScaleSearch};
use rayon::prelude::*;
use sites::Site;

/// The model metadata key a quantized model carries (the configuration, as text): a
/// second run does nothing.
pub const QUANTIZED_KEY: &str = "perqc.quantized";

/// The default-domain opset a quantized model is written in: INT4/UINT4 tensors and
/// blocked QuantizeLinear/DequantizeLinear.
pub const QUANTIZED_OPSET: i64 = 21;

/// Clip ratios the activation search tries.
pub const CLIP_CANDIDATES: [f32; 4] = [1.0, 0.95, 0.9, 0.85];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    Rtn,
    Gptq,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Standard QuantizeLinear / DequantizeLinear.
    Qdq,
    /// ONNX Runtime's `com.microsoft::MatMulNBits` for 4-bit weight-only linears.
    Ort,
}

/// What to quantize and how.
#[derive(Clone, Debug)]
pub struct QuantConfig {
    pub weights: QuantSpec,
    /// Per-token activation quantizer; `None`: weight-only.
    pub act: Option<TokenQuant>,
    /// Search the activation clip ratio (needs calibration samples).
    pub clip_search: bool,
    /// Quantize the head too.
    pub head: bool,
    /// Quantize lookup tables (the token embedding's Gather) with the weight spec, one
    /// scale per entry (or per group along the width).
    pub embedding: bool,
    /// Skip patterns; each must match some linear.
    pub skip: Vec<String>,
    pub rounding: Rounding,
    pub gptq: GptqOptions,
    /// GPTQ aims at the float output `x Wᵀ`, not `Q(x) Wᵀ`, for the groups it names: the
    /// weight is first moved to the ridge fit on the quantized input
    /// ([`perqc_quant::InputErrorFit`]), from the calibration's `(X − Q(X))ᵀ Q(X)` of the
    /// group's input. `None`: off.
    pub gptq_input_error: Option<InputErrorFitting>,
    pub target: Target,
}

/// Where GPTQ aims at the float output, and the fit's ridge.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InputErrorFitting {
    pub scope: FitScope,
    /// Relative to the mean of `diag(H)`, like GPTQ's damping; finite and > 0.
    pub ridge: f64,
}

/// Which groups' weights are fitted to the float output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FitScope {
    /// Inputs an online Hadamard computes (PeRQ's rotation before down_proj): the 4-bit
    /// quantizer errs most there, and the fit gains most (docs/quantization.md).
    Online,
    /// Every input with an activation quantizer.
    All,
}

impl FitScope {
    pub fn name(self) -> &'static str {
        match self {
            FitScope::Online => "online",
            FitScope::All => "all",
        }
    }
}

impl Default for QuantConfig {
    fn default() -> QuantConfig {
        QuantConfig {
            weights: QuantSpec {
                bits: 4,
                signed: true,
                symmetric: true,
                granularity: Granularity::Channel,
                format: Format::Int,
                scale: ScaleSearch::Mse,
            },
            act: Some(TokenQuant {
                bits: 4,
                symmetric: false,
                clip: 1.0,
            }),
            clip_search: false,
            head: false,
            embedding: false,
            skip: Vec::new(),
            rounding: Rounding::Rtn,
            gptq: GptqOptions::default(),
            gptq_input_error: None,
            target: Target::Qdq,
        }
    }
}

impl QuantConfig {
    /// Checks what can be checked without a model: one line per problem.
    pub fn validate(&self) -> Result<(), String> {
        self.weights.validate().map_err(|e| e.to_string())?;
        self.weights.for_weights().map_err(|e| e.to_string())?;
        if let Some(a) = self.act {
            if !(2..=8).contains(&a.bits) {
                return Err(format!(
                    "activation bits must be 2..=8, not {} (or none for weight-only)",
                    a.bits
                ));
            }
            if !(a.clip > 0.0 && a.clip <= 1.0) {
                return Err(format!(
                    "activation clip ratio must be in (0, 1], not {}",
                    a.clip
                ));
            }
        }
        if let Some(InputErrorFitting { ridge: r, .. }) = self.gptq_input_error {
            if !(r.is_finite() && r > 0.0) {
                return Err(format!(
                    "the GPTQ fit's ridge must be finite and > 0, not {r}"
                ));
            }
            if self.rounding != Rounding::Gptq || self.act.is_none() {
                return Err(
                    "the GPTQ fit to the float output needs GPTQ rounding and activation quantizers"
                        .into(),
                );
            }
        }
        if self.target == Target::Ort {
            if self.act.is_some() {
                return Err(
                    "target ort (MatMulNBits) is for weight-only quantization: use no activation quantizer (e.g. the w4a16 preset)"
                        .into(),
                );
            }
            if self.weights.format != Format::Int || self.weights.bits != 4 {
                return Err(format!(
                    "target ort (MatMulNBits) holds 4-bit integer weights, not {}",
                    self.weights
                ));
            }
            match self.weights.granularity {
                Granularity::Group(g) if g >= 16 && g.is_power_of_two() => {}
                _ => {
                    return Err(format!(
                        "target ort (MatMulNBits) needs weight groups of a power of two >= 16, not {}",
                        self.weights
                    ));
                }
            }
        }
        Ok(())
    }

    /// The selected linears of `model`: errors for a skip pattern that matches nothing and
    /// for a group size that does not divide a linear's input width.
    pub fn select(&self, model: &Model) -> Result<Vec<Site>, String> {
        let all = sites::linears(&model.graph);
        let tables = if self.embedding {
            sites::tables(&model.graph)
        } else {
            Vec::new()
        };
        for p in &self.skip {
            let g = &model.graph;
            if !all.iter().any(|s| sites::skipped(g, s, p))
                && !tables.iter().any(|t| sites::table_skipped(g, t, p))
            {
                let what = if self.embedding {
                    "no linear layer or embedding table"
                } else {
                    "no linear layer"
                };
                return Err(format!(
                    "--skip `{p}` matches {what} (patterns match node or weight names; `*` is a wildcard)"
                ));
            }
        }
        let chosen: Vec<Site> = all
            .into_iter()
            .filter(|s| self.head || !s.head)
            .filter(|s| !self.skip.iter().any(|p| sites::skipped(&model.graph, s, p)))
            .collect();
        for s in &chosen {
            self.weights
                .group_len(s.k)
                .map_err(|e| format!("{} (input width {}): {e}", s.name, s.k))?;
        }
        Ok(chosen)
    }
}

/// Linears that read one activation, and its quantizer if any.
#[derive(Clone, Debug)]
pub struct Group {
    /// Indices into [`Quantizer::sites`].
    pub sites: Vec<usize>,
    /// The activation as computed (before its quantizer): clip search samples it.
    pub input: String,
    /// What the linears read (the quantizer's output, or the input when weight-only):
    /// GPTQ's Hessian is its Gram matrix.
    pub output: String,
    pub act: Option<ActQuant>,
    /// GPTQ aims this group's weights at the float output (set with its quantizer, by
    /// [`QuantConfig::gptq_input_error`]'s scope): calibrate its input's
    /// `(X − Q(X))ᵀ Q(X)` too.
    pub fit: bool,
}

/// What one linear got.
#[derive(Clone, Debug)]
pub struct SiteReport {
    pub name: String,
    pub k: usize,
    pub n: usize,
    pub rounding: Rounding,
    /// SQNR (dB) of the quantized weight against the float one.
    pub weight_sqnr: f64,
    /// SQNR (dB) of the layer's output `Q(x) Ŵᵀ` against `x Wᵀ` on the sampled
    /// calibration rows (when the clip search sampled them).
    pub output_sqnr: Option<f64>,
    /// The clip ratio of the activation quantizer it reads, if any.
    pub clip: Option<f32>,
    /// GPTQ aimed its weight at the float output ([`Group::fit`]).
    pub fitted: bool,
}

/// A model being quantized: sites selected and grouped by the activation they read; each
/// group gets its activation quantizer ([`Quantizer::prepare`]) and then its weights
/// ([`Quantizer::quantize`]), group by group.
pub struct Quantizer {
    pub config: QuantConfig,
    pub sites: Vec<Site>,
    pub groups: Vec<Group>,
    done: Vec<bool>,
    prepared: Vec<bool>,
}

impl Quantizer {
    /// Selects the sites and groups them (activation quantizers come with
    /// [`Quantizer::prepare`], clip ratio `act.clip`).
    pub fn new(model: &mut Model, config: QuantConfig) -> Result<Quantizer, String> {
        config.validate()?;
        let sites = config.select(model)?;
        // Packed 4-bit codes and blocked scales are opset 21 (the nodes added below are
        // read at the model's opset).
        crate::opset::upgrade(model, QUANTIZED_OPSET)
            .map_err(|e| format!("quantized ops need opset {QUANTIZED_OPSET}: {e}"))?;
        if config.target == Target::Ort && model.opset("com.microsoft").is_none() {
            model.opset_imports.push(perqc_ir::OpsetImport {
                domain: Some("com.microsoft".into()),
                version: Some(1),
            });
        }
        // Quantizers are placed group by group ([`Quantizer::prepare`]): until then a
        // group's input is the activation its linears read.
        let groups = activations::groups(&sites)
            .into_iter()
            .map(|g| {
                let name = model.graph.value(sites[g[0]].x).name.clone();
                Group {
                    sites: g,
                    input: name.clone(),
                    output: name,
                    act: None,
                    fit: false,
                }
            })
            .collect::<Vec<_>>();
        let done = vec![false; groups.len()];
        let prepared = vec![false; groups.len()];
        Ok(Quantizer {
            config,
            sites,
            groups,
            done,
            prepared,
        })
    }

    /// Places group `g`'s activation quantizer (if any) in front of its linears, on the
    /// activation they read now, and fixes [`Group::input`] and [`Group::output`]. Exact
    /// transforms may change the graph in front of a group (and its linears' weights)
    /// until then; calibration of the group reads these names. Idempotent.
    pub fn prepare(&mut self, model: &mut Model, g: usize) -> Result<(), String> {
        if self.prepared[g] {
            return Ok(());
        }
        let graph = &mut model.graph;
        for &i in &self.groups[g].sites {
            let site = &mut self.sites[i];
            let node = graph.node(site.node);
            match (node.input(0), node.input(1)) {
                (Some(x), Some(w)) if graph.const_tensor(w).is_some() => {
                    site.x = x;
                    site.weight = w;
                }
                _ => {
                    return Err(format!(
                        "{}: no longer a linear with a constant weight",
                        site.name
                    ));
                }
            }
        }
        let group = &mut self.groups[g];
        match self.config.act {
            Some(q) => {
                let a = activations::insert(graph, &self.sites, &group.sites, q)?;
                let online = graph
                    .value(a.input)
                    .producer()
                    .is_some_and(|(n, _)| crate::canonicalize::is_online_hadamard(graph.node(n)));
                group.fit = self.config.rounding == Rounding::Gptq
                    && match self.config.gptq_input_error.map(|f| f.scope) {
                        Some(FitScope::All) => true,
                        Some(FitScope::Online) => online,
                        None => false,
                    };
                group.input = graph.value(a.input).name.clone();
                group.output = graph.value(a.output).name.clone();
                group.act = Some(a);
            }
            None => {
                group.input = graph.value(self.sites[group.sites[0]].x).name.clone();
                group.output = group.input.clone();
            }
        }
        self.prepared[g] = true;
        Ok(())
    }

    /// Quantizes the weights of groups `which` (and chooses their clip ratios when the
    /// calibration has samples of their inputs and the search is on). GPTQ needs the Gram
    /// matrix of each group's output in `calib`. Group by group, so memory holds one
    /// group's float copies at a time; each float weight nothing else reads is dropped
    /// once its replacement is in.
    pub fn quantize(
        &mut self,
        model: &mut Model,
        which: &[usize],
        calib: Option<&Calibration>,
    ) -> Result<Vec<SiteReport>, String> {
        let mut reports = Vec::new();
        for &g in which {
            if !self.done[g] {
                self.prepare(model, g)?;
                reports.extend(self.quantize_group(model, g, calib)?);
                self.done[g] = true;
            }
        }
        Ok(reports)
    }

    fn quantize_group(
        &mut self,
        model: &mut Model,
        g: usize,
        calib: Option<&Calibration>,
    ) -> Result<Vec<SiteReport>, String> {
        let group = &self.groups[g];
        let hessian = match self.config.rounding {
            Rounding::Rtn => None,
            Rounding::Gptq => Some(calibrated(
                calib,
                &group.output,
                ChannelStats::gram,
                "GPTQ needs the Gram matrix",
                "gram",
            )?),
        };
        let floats: Vec<Array2<f32>> = group
            .sites
            .iter()
            .map(|&i| weights::float_weight(&model.graph, &self.sites[i]))
            .collect::<Result<_, _>>()?;
        let (spec, gptq) = (self.config.weights, self.config.gptq);
        let name = &self.sites[group.sites[0]].name;
        // With an activation quantizer, GPTQ's targets moved to the float output: from
        // (X − Q(X))ᵀ Q(X) of the input and the Hessian, once for the group's linears. The
        // fit's factor is dropped before GPTQ factors the Hessian, so that the two n x n
        // factorizations are never in memory at once (on SmolLM2's first layers, where the
        // compile's peak is).
        let targets: Option<Vec<Array2<f32>>> = match (hessian, self.config.gptq_input_error) {
            (Some(h), Some(InputErrorFitting { ridge, .. })) if group.fit => {
                let e = calibrated(
                    calib,
                    &group.input,
                    ChannelStats::quant_error_cross,
                    "GPTQ on the float output needs the quantizer error product",
                    "quant_error",
                )?;
                let fit = perqc_quant::InputErrorFit::new(h.view(), e.view(), ridge)
                    .map_err(|e| format!("{name}: {e}"))?;
                let targets = group
                    .sites
                    .par_iter()
                    .zip(&floats)
                    .map(|(&i, w)| {
                        fit.target(w.view())
                            .map_err(|e| format!("{}: {e}", self.sites[i].name))
                    })
                    .collect::<Result<_, _>>()?;
                Some(targets)
            }
            _ => None,
        };
        // The linears of a group read one input: one Hessian, factored once.
        let factor = hessian
            .map(|h| perqc_quant::GptqFactor::new(h.view(), &gptq))
            .transpose()
            .map_err(|e| format!("{name}: {e}"))?;
        let quantized: Vec<QWeight> = group
            .sites
            .par_iter()
            .zip(targets.as_ref().unwrap_or(&floats))
            .map(|(&i, w)| {
                match &factor {
                    None => perqc_quant::quantize_rtn(w.view(), &spec),
                    Some(f) => perqc_quant::gptq_with(w.view(), f, &spec, &gptq),
                }
                .map_err(|e| format!("{}: {e}", self.sites[i].name))
            })
            .collect::<Result<_, _>>()?;
        let fitted = targets.is_some();
        drop(targets);
        // The clip ratio, on the sampled rows of the input.
        let samples = calib
            .filter(|_| self.config.clip_search && group.act.is_some())
            .and_then(|c| c.get(&group.input))
            .map(|s| s.samples())
            .filter(|x| x.nrows() > 0);
        // Dequantized copies only for the search (a quantized LM head is 113 MB of them).
        let deq: Vec<Array2<f32>> = match samples {
            Some(_) => quantized.par_iter().map(|q| q.dequantize()).collect(),
            None => Vec::new(),
        };
        let mut output_sqnr = vec![None; floats.len()];
        if let (Some(x), Some(act)) = (samples, &group.act) {
            let linears: Vec<_> = floats
                .iter()
                .zip(&deq)
                .map(|(w, d)| (w.view(), d.view()))
                .collect();
            let choice = activations::search_clip(x, &linears, act.quant, &CLIP_CANDIDATES);
            for (o, s) in output_sqnr.iter_mut().zip(&choice.sqnr) {
                *o = Some(*s);
            }
            let best = choice.ratio;
            let act = self.groups[g].act.as_mut().expect("present");
            activations::set_clip(&mut model.graph, act, best)?;
        }

        let group = &self.groups[g];
        let mut reports = Vec::with_capacity(group.sites.len());
        for (((&i, q), w), out) in group
            .sites
            .iter()
            .zip(&quantized)
            .zip(&floats)
            .zip(output_sqnr)
        {
            let site = &self.sites[i];
            match self.config.target {
                Target::Qdq => weights::write_qdq(&mut model.graph, site, q)?,
                Target::Ort => weights::write_nbits(&mut model.graph, site, q)?,
            }
            weights::drop_if_unread(&mut model.graph, site.weight);
            reports.push(SiteReport {
                name: site.name.clone(),
                k: site.k,
                n: site.n,
                rounding: self.config.rounding,
                weight_sqnr: weight_sqnr(w, q),
                output_sqnr: out,
                clip: group.act.as_ref().map(|a| a.quant.clip),
                fitted,
            });
        }
        Ok(reports)
    }

    /// Records the configuration in the model's metadata and drops the float weights
    /// nothing reads any more (after the last group).
    pub fn finish(&self, model: &mut Model) -> Result<(), String> {
        if self.config.embedding {
            for t in sites::tables(&model.graph) {
                let g = &model.graph;
                if self
                    .config
                    .skip
                    .iter()
                    .any(|p| sites::table_skipped(g, &t, p))
                {
                    continue;
                }
                let data = model
                    .graph
                    .const_tensor(t.table)
                    .expect("constant")
                    .to_f32()
                    .map_err(|e| e.to_string())?;
                let w =
                    Array2::from_shape_vec((t.rows, t.cols), data).map_err(|e| e.to_string())?;
                let mut spec = self.config.weights;
                if spec.group_len(t.cols).is_err() {
                    spec.granularity = Granularity::Channel;
                }
                let q = perqc_quant::quantize_rtn(w.view(), &spec)
                    .map_err(|e| format!("embedding table: {e}"))?;
                drop(w);
                weights::write_table(&mut model.graph, &t, &q)?;
                weights::drop_if_unread(&mut model.graph, t.table);
            }
        }
        crate::Dce::default()
            .run(model, &mut PassContext::new(None))
            .map_err(|e| e.to_string())?;
        let c = &self.config;
        let act = match c.act {
            Some(a) => format!(
                "a{} {} per-token",
                a.bits,
                if a.symmetric { "sym" } else { "asym" }
            ),
            None => "a16".into(),
        };
        let text = format!(
            "w: {}; {act}; rounding {:?}{}{}",
            c.weights,
            c.rounding,
            match c.gptq_input_error {
                Some(f) if c.rounding == Rounding::Gptq => {
                    format!(
                        " on the float output at {} inputs (ridge {})",
                        f.scope.name(),
                        f.ridge
                    )
                }
                _ => String::new(),
            },
            if c.embedding {
                "; embedding quantized"
            } else {
                ""
            }
        );
        model.metadata.retain(|(k, _)| k != QUANTIZED_KEY);
        model.metadata.push((QUANTIZED_KEY.to_string(), text));
        Ok(())
    }
}

/// What calibration observed of `value` (`pick`), or the error "`need` of `value`
/// (calibrate with `stats` statistics)".
fn calibrated<'a, T>(
    calib: Option<&'a Calibration>,
    value: &str,
    pick: impl Fn(&'a ChannelStats) -> Option<&'a T>,
    need: &str,
    stats: &str,
) -> Result<&'a T, String> {
    calib
        .and_then(|c| c.get(value))
        .and_then(pick)
        .ok_or_else(|| format!("{need} of `{value}` (calibrate with {stats} statistics)"))
}

/// SQNR (dB) of `q` against the float weight `w` (`[N, K]`), row by row without a
/// dequantized copy.
fn weight_sqnr(w: &Array2<f32>, q: &QWeight) -> f64 {
    let (signal, noise) = (0..w.nrows())
        .into_par_iter()
        .map(|r| {
            w.row(r)
                .iter()
                .enumerate()
                .fold((0f64, 0f64), |(s, n), (c, &x)| {
                    let e = (x - q.value(r, c)) as f64;
                    (s + (x as f64) * (x as f64), n + e * e)
                })
        })
        .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    if noise == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (signal / noise).log10()
    }
}

/// The pass: RTN (or GPTQ from a provided `Calibration` with Gram matrices), all groups.
#[derive(Debug)]
pub struct Quantize {
    config: QuantConfig,
}

impl std::fmt::Debug for Quantizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Quantizer({} sites)", self.sites.len())
    }
}

impl Quantize {
    pub const NAME: &'static str = "quantize";
    pub const DESCRIPTION: &'static str = "quantize linear weights (packed codes + DequantizeLinear, or MatMulNBits) and their inputs per token (FakeQuantize); options wbits=4, wsym=true, wgroup=channel|tensor|G, wscale=mse|max, format=int|fp4|mxfp4|mxint8, abits=4|none, asym=true, aclip=1, head=false, embed=false, skip=PAT|PAT, rounding=rtn|gptq, gptqerr=none|online|all, gptqridge=1, target=qdq|ort";

    pub fn new(config: QuantConfig) -> Quantize {
        Quantize { config }
    }

    pub fn from_options(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        opts.allow_only(&[
            "wbits",
            "wsym",
            "wgroup",
            "wscale",
            "format",
            "abits",
            "asym",
            "aclip",
            "head",
            "embed",
            "skip",
            "rounding",
            "gptqerr",
            "gptqridge",
            "target",
        ])?;
        let invalid = |name: &str, value: &str, expected: &str| OptionError::Invalid {
            pass: Self::NAME.to_string(),
            option: name.to_string(),
            value: value.to_string(),
            expected: expected.to_string(),
        };
        let mut c = QuantConfig::default();
        c.weights.bits = opts.parse_or("wbits", "a bit width 2..=8", 4u32)?;
        let sym = opts.bool_or("wsym", true)?;
        c.weights.symmetric = sym;
        c.weights.signed = sym;
        c.weights.granularity = match opts.get("wgroup").unwrap_or("channel") {
            "channel" => Granularity::Channel,
            "tensor" => Granularity::Tensor,
            g => Granularity::Group(
                g.parse()
                    .map_err(|_| invalid("wgroup", g, "channel, tensor or a group size"))?,
            ),
        };
        c.weights.scale = match opts.choice_or("wscale", &["mse", "max"], "mse")? {
            "max" => ScaleSearch::Max,
            _ => ScaleSearch::Mse,
        };
        c.weights.format =
            match opts.choice_or("format", &["int", "fp4", "mxfp4", "mxint8"], "int")? {
                "fp4" => Format::Fp4,
                "mxfp4" => Format::MxFp4,
                "mxint8" => Format::MxInt8,
                _ => Format::Int,
            };
        if matches!(c.weights.format, Format::MxFp4 | Format::MxInt8) {
            c.weights.granularity = Granularity::Group(32);
            c.weights.symmetric = true;
            c.weights.signed = true;
            c.weights.bits = if c.weights.format == Format::MxInt8 {
                8
            } else {
                4
            };
        }
        c.act = match opts.get("abits").unwrap_or("4") {
            "none" => None,
            b => Some(TokenQuant {
                bits: b
                    .parse()
                    .map_err(|_| invalid("abits", b, "a bit width 2..=8 or none"))?,
                symmetric: !opts.bool_or("asym", true)?,
                clip: opts.parse_or("aclip", "a ratio in (0, 1]", 1.0f32)?,
            }),
        };
        c.head = opts.bool_or("head", false)?;
        c.embedding = opts.bool_or("embed", false)?;
        c.skip = opts
            .get("skip")
            .map(|s| {
                s.split('|')
                    .filter(|p| !p.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        c.rounding = match opts.choice_or("rounding", &["rtn", "gptq"], "rtn")? {
            "gptq" => Rounding::Gptq,
            _ => Rounding::Rtn,
        };
        let scope = match opts.choice_or("gptqerr", &["none", "online", "all"], "none")? {
            "online" => Some(FitScope::Online),
            "all" => Some(FitScope::All),
            _ => None,
        };
        let ridge: f64 = opts.parse_or("gptqridge", "a ridge > 0", 1.0)?;
        if !(ridge.is_finite() && ridge > 0.0) {
            return Err(invalid("gptqridge", &ridge.to_string(), "a ridge > 0"));
        }
        c.gptq_input_error = scope.map(|scope| InputErrorFitting { scope, ridge });
        c.target = match opts.choice_or("target", &["qdq", "ort"], "qdq")? {
            "ort" => Target::Ort,
            _ => Target::Qdq,
        };
        c.validate().map_err(|e| invalid("wbits", "", &e))?;
        Ok(Box::new(Quantize { config: c }))
    }
}

impl Pass for Quantize {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn description(&self) -> &'static str {
        Self::DESCRIPTION
    }

    fn run(&mut self, model: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        if model.metadata.iter().any(|(k, _)| k == QUANTIZED_KEY) {
            ctx.note(format!("already quantized ({QUANTIZED_KEY}): nothing done"));
            return Ok(PassOutcome::from_changed(false));
        }
        let fail = |e: String| PassError::msg(format!("quantize: {e}"));
        let mut q = Quantizer::new(model, self.config.clone()).map_err(fail)?;
        if q.sites.is_empty() {
            ctx.note("no linear layer to quantize");
            return Ok(PassOutcome::from_changed(false));
        }
        let all: Vec<usize> = (0..q.groups.len()).collect();
        let calib = ctx.resource::<Calibration>();
        let reports = q.quantize(model, &all, calib).map_err(fail)?;
        q.finish(model).map_err(fail)?;
        let heads = sites::linears(&model.graph).len(); // float linears left
        Ok(PassOutcome::from_changed(true)
            .with("linears-quantized", reports.len() as u64)
            .with(
                "activation-quantizers",
                q.groups.iter().filter(|g| g.act.is_some()).count() as u64,
            )
            .with("linears-left-float", heads as u64))
    }
}
