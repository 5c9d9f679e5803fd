//! The PeRQ recipe's exact part (`--no-quantize`): canonicalize, permute the mlp channels
//! by calibrated MassDiff, fold the norms, rotate the residual stream (R1) and the
//! value/output heads (R2), and put an online block Hadamard before every down_proj (R3).
//! `--verify` runs the original and the transformed model on calibration windows and
//! fails above a relative error.

use crate::calib::{self, CalibArgs};
use crate::corpus::WindowFeeds;
use crate::quant::LayerwiseMlp;
use anyhow::{Context, Result, bail};
use clap::Args;
use perqc_ir::Model;
use perqc_passes::calibration::Calibration;
use perqc_passes::permutation::PermuteMethod;
use perqc_passes::permute::Permute;
use perqc_passes::regions::{RegionKind, Regions};
use perqc_passes::smooth::Smoothing;
use perqc_runtime::{RtTensor, Session, SessionOptions, StatsOptions};
use std::path::Path;

#[derive(Args)]
pub struct RecipeArgs {
    /// Run the recipe's exact transforms only (permute, fold norms, rotate, online
    /// Hadamard) and write the float model: its outputs equal the input's up to round-off.
    #[arg(long)]
    pub no_quantize: bool,
    /// Permutation of the mlp channels before the online Hadamard: massdiff (the paper's:
    /// balances the mean |x| over the blocks), tokenmax (balances each token's block
    /// energies; about 2048 sampled token profiles per down_proj input, docs/quantization.md),
    /// zigzag, absmax, random or identity (all but random and identity need calibration
    /// data).
    #[arg(long, value_name = "NAME", default_value = "massdiff")]
    pub permute: PermuteMethod,
    /// Where the calibrated permutation's statistics come from when quantizing with GPTQ or
    /// the clip search: float (a calibration pass of the float model first, as the
    /// reference does; docs/quantization.md compares the two) or quantized
    /// (layer by layer from the quantizers' own forward pass, each mlp seeing the quantized
    /// layers before it: one forward pass less).
    #[arg(long, value_name = "FROM", default_value = "float", value_parser = ["float", "quantized"])]
    pub permute_stats: String,
    /// Calibration sequences the float statistics pass runs when only the permutation
    /// reads it, spread evenly over --calib-seqs (0: all). Channel masses settle fast: on
    /// SmolLM2 a permutation from 8 of 16 sequences evens the blocks of the whole data's
    /// masses within 0.2% of one from all 16, for half the pass (docs/quantization.md).
    /// --smooth and --cat, which share the pass, take every sequence; so does
    /// --permute-stats quantized, which has no float pass.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub permute_seqs: usize,
    /// Smoothing of each down_proj input before its rotation: channel j divided by
    /// s_j = a_j^alpha / max_i |W_down[i, j]|^(1 - alpha), folded into up_proj and
    /// down_proj (exact). quantile(q=Q,alpha=A): a_j is the q-quantile of |x_j| over the
    /// calibration tokens (defaults q 0.999, alpha 0.5); max(alpha=A): its maximum; search:
    /// (alpha, statistic) per layer by the down_proj's quantized error on sampled
    /// calibration rows, with the permutation and rotation that follow; none. Needs
    /// calibration data.
    #[arg(long, value_name = "SPEC", default_value = "none", value_parser = parse_smooth)]
    pub smooth: Smooth,
    /// Refine each layer's --smooth scales by STEPS steps of gradient descent on log s
    /// (Adam, the quantizers' rounding passed straight through, each scale within 8x of
    /// where --smooth put it) on the down_proj's quantized error over half the sampled
    /// calibration rows, keeping the scales with the least error on the other half; 0: off.
    /// Needs --smooth.
    #[arg(long, value_name = "STEPS", default_value_t = 0)]
    pub smooth_train: usize,
    /// Block concentration-alignment transform (CAT) of each down_proj input: block(k=K)
    /// computes M = (S_x^-1 # S_w)^1/2 per K x K block from the input's second moments
    /// (calibrated again after the permutation and rotations) and runs M, then the online
    /// Hadamard, before down_proj with the inverse folded in (exact); none. K must divide
    /// the MLP width, and K and --block-size divide one another.
    #[arg(long, value_name = "SPEC", default_value = "none", value_parser = parse_cat)]
    pub cat: CatSpec,
    /// Block size of the online Hadamard before each down_proj and of the permutation's
    /// blocks (must divide the MLP width); full: one Hadamard of the whole width (no
    /// permutation); none: no online rotation.
    #[arg(long, value_name = "B", default_value = "32", value_parser = parse_block)]
    pub block_size: Block,
    /// Rotation of the residual stream and the value/output heads: full (one Hadamard of
    /// the model width; per head for V/O), block (blocks of --block-size, within each head
    /// for V/O, the permutation spreading the residual stream over them as well; full where
    /// the block does not split the width or the head, and with --block-size full) or none
    /// (neither).
    #[arg(long, value_name = "KIND", default_value = "full", value_parser = ["full", "block", "none"])]
    pub rotation: String,
    /// Core order of the residual rotation's Hadamard matrix (`H_M ⊗ Sylvester(d / M)`;
    /// for d = 576: 36, 72, 144, 288 or 576). Default 144 (= 12 ⊗ 12), the best of the five
    /// on SmolLM2 with RTN (docs/results.md; with GPTQ the five are within 4%), where the
    /// width has it; the library's construction otherwise (with a note where the width has
    /// other cores). An order with no Hadamard matrix at all is an error.
    #[arg(long, value_name = "M", default_value_t = 144)]
    pub hadamard_core: usize,
    /// Randomize R1's and R2's Hadamards as `H · diag(s)` with random signs `s` from this
    /// seed (QuaRot's randomized Hadamard). Off by default: on SmolLM2 twelve seeds gave
    /// RTN 1.07-2.6x the perplexity of the plain matrix, and GPTQ the same within its
    /// spread (docs/quantization.md)
    #[arg(long, value_name = "SEED")]
    pub rotation_signs: Option<u64>,
    /// Run the original and the transformed model natively on calibration windows (or
    /// fixed ids without calibration data) and fail if the logits differ by more than
    /// --verify-tol relative (max abs error / max abs value).
    #[arg(long)]
    pub verify: bool,
    /// Relative error --verify accepts.
    #[arg(long, value_name = "TOL", default_value_t = 1e-4)]
    pub verify_tol: f64,
    #[command(flatten)]
    pub calib: CalibArgs,
}

/// `--smooth`: none or a smoothing applied to every mlp region.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Smooth {
    None,
    Fixed(Smoothing),
    Search,
}

fn parse_smooth(s: &str) -> Result<Smooth, String> {
    match s {
        "none" => Ok(Smooth::None),
        "search" => Ok(Smooth::Search),
        spec => Smoothing::parse(spec).map(Smooth::Fixed),
    }
}

/// `--cat`: the CAT block size, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatSpec(pub Option<usize>);

fn parse_cat(s: &str) -> Result<CatSpec, String> {
    if s == "none" {
        return Ok(CatSpec(None));
    }
    let k = match s.trim() {
        "block" => Some("64"),
        t => t
            .strip_prefix("block(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.trim().strip_prefix("k="))
            .map(str::trim),
    };
    match k.map(str::parse::<usize>) {
        Some(Ok(k)) if k > 0 => Ok(CatSpec(Some(k))),
        _ => Err(format!(
            "`{s}` is not a CAT spec (block, block(k=K) with K > 0, or none)"
        )),
    }
}

/// Calibration rows kept whole per smoothed (or CAT-transformed) activation, for the probed
/// layer error: about
/// this many, evenly over the calibration tokens.
const PROBE_ROWS: usize = 256;
/// Row profiles a permutation that reads them (`--permute tokenmax`) samples per down_proj
/// input: 2048 x 1536 bytes, 3 MiB per layer on SmolLM2 (docs/quantization.md).
const PERMUTE_ROWS: usize = 2048;

/// The values the mlp regions' sinks read (the down_proj inputs), in node order.
fn mlp_sink_values(model: &Model) -> Result<Vec<String>> {
    sink_values(model, &[RegionKind::Mlp])
}

/// The values the sinks of regions of `kinds` read, in node order.
fn sink_values(model: &Model, kinds: &[RegionKind]) -> Result<Vec<String>> {
    let shapes = perqc_ops::infer_model(model).context("shape inference")?;
    let regions = Regions::find(model, &shapes);
    Ok(perqc_passes::permute::calibration_values(&regions, kinds))
}

/// Mlp regions per stage of the CAT calibration (SmolLM2: 6 stages of 5 layers).
const CAT_STAGE_REGIONS: usize = 5;

/// The online rotation's block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    Size(usize),
    Full,
    None,
}

fn parse_block(s: &str) -> Result<Block, String> {
    match s {
        "full" => Ok(Block::Full),
        "none" => Ok(Block::None),
        n => match n.parse::<usize>() {
            Ok(0) | Err(_) => Err(format!(
                "`{n}` is not a block size (a positive integer, full or none)"
            )),
            Ok(b) => Ok(Block::Size(b)),
        },
    }
}

impl RecipeArgs {
    /// The calibrated mlp permutation and the online Hadamard behind it, for the quantizing
    /// driver to apply layer by layer (`None` when the recipe has no calibrated permutation
    /// or no calibration data).
    pub fn layerwise(&self) -> Option<LayerwiseMlp> {
        match self.block_size {
            Block::Size(b)
                if self.permutes() && self.calib.given() && self.permute_stats == "quantized" =>
            {
                Some(LayerwiseMlp {
                    permute: Permute::mlp(self.permute, b),
                    block: b,
                    stats: StatsOptions {
                        profile_every: match self.permute.uses_profiles() {
                            true => self.permute_every(0),
                            false => 0,
                        },
                        ..StatsOptions::default()
                    },
                })
            }
            _ => None,
        }
    }

    /// The pass pipeline of the recipe, with notes on what is left out and why. With
    /// `layerwise` the calibrated permutation and the online Hadamard are left to the
    /// quantizing driver ([`RecipeArgs::layerwise`]).
    pub fn pipeline(
        &self,
        notes: &mut Vec<String>,
        layerwise: bool,
        quant: Option<&perqc_passes::quantize::QuantConfig>,
    ) -> Vec<String> {
        let mut passes = Vec::new();
        // Smoothing first: the permutation then sorts the smoothed channels. Its probe
        // quantizes as the recipe will (W4A4 without quantization).
        if self.smooth != Smooth::None {
            let method = match self.smooth {
                Smooth::Fixed(s) => s.pass_spec(),
                _ => "smooth(method=search".into(),
            };
            let method = method.trim_end_matches(')');
            let block = match self.block_size {
                Block::Size(b) => b.to_string(),
                Block::Full => "full".into(),
                Block::None => "none".into(),
            };
            let permute = match self.permute {
                PermuteMethod::Random { .. } => "identity".to_string(),
                m => m.to_string(),
            };
            let (wbits, abits) =
                quant.map_or((4, Some(4)), |q| (q.weights.bits, q.act.map(|a| a.bits)));
            let abits = abits.map_or("none".to_string(), |b| b.to_string());
            let train = match self.smooth_train {
                0 => String::new(),
                n => format!(",train={n}"),
            };
            passes.push(format!(
                "{method}{train},permute={permute},block={block},wbits={wbits},abits={abits})"
            ));
        }
        let b = match self.block_size {
            Block::Size(b) => b,
            // Without blocks a permutation changes nothing the quantizers see.
            Block::Full | Block::None => {
                if self.rotation != "none" {
                    passes.push("center-stream".into());
                    passes.push("fold-norms(rotatable-only=true)".into());
                }
                self.rotations(&mut passes, None);
                if self.block_size == Block::Full && self.cat.0.is_none() {
                    passes.push("online-hadamard(block=full)".into());
                }
                if self.cat_in_first_stage() {
                    passes.extend(self.cat_spec(quant));
                }
                return passes;
            }
        };
        // The identity permutation is no permutation: nothing to run.
        if self.permute.uses_statistics() && !self.calib.given() {
            notes.push(format!(
                "no calibration data (--calib-text with --tokenizer, or --calib-ids): the {} permutation is skipped; the rotations need none",
                self.permute
            ));
        } else if self.permute != PermuteMethod::Identity && !layerwise {
            let method = match self.permute {
                PermuteMethod::Random { seed } => format!("method=random,seed={seed}"),
                m => format!("method={m}"),
            };
            let residual = match self.rotation == "block" {
                true => ",residual=true",
                false => "",
            };
            passes.push(format!("permute({method},block={b}{residual})"));
        }
        // Norm gammas fold into the weights only for the residual rotation (it commutes
        // with a norm without its gamma); otherwise they stay (folded gammas would put
        // their outliers into the weights' input columns).
        if self.rotation != "none" {
            passes.push("center-stream".into());
            passes.push("fold-norms(rotatable-only=true)".into());
        }
        self.rotations(&mut passes, Some(b));
        if !layerwise && self.cat.0.is_none() {
            passes.push(format!("online-hadamard(block={b})"));
        }
        if self.cat_in_first_stage() {
            passes.extend(self.cat_spec(quant));
        }
        passes
    }

    /// Whether the CAT pass can read the first calibration: no permutation runs before it
    /// (block moments cannot be permuted; smoothing divides them exactly, and the
    /// rotations and norm folding leave the down_proj inputs as they are).
    fn cat_in_first_stage(&self) -> bool {
        let permuted = matches!(self.block_size, Block::Size(_))
            && self.permute != PermuteMethod::Identity
            && (self.calib.given() || !self.permute.uses_statistics());
        self.cat.0.is_some() && !permuted
    }

    /// The CAT stage when a permutation runs first: run after [`RecipeArgs::pipeline`] on
    /// statistics calibrated again (`None` without CAT, or when the first stage runs it).
    pub fn cat_pipeline(
        &self,
        quant: Option<&perqc_passes::quantize::QuantConfig>,
    ) -> Option<String> {
        if self.cat_in_first_stage() {
            return None;
        }
        self.cat_spec(quant)
    }

    /// `cat(k=K,block=B,...)`: its online map includes the Hadamard the pipeline leaves out.
    fn cat_spec(&self, quant: Option<&perqc_passes::quantize::QuantConfig>) -> Option<String> {
        let k = self.cat.0?;
        let (wbits, abits) =
            quant.map_or((4, Some(4)), |q| (q.weights.bits, q.act.map(|a| a.bits)));
        let abits = abits.map_or("none".to_string(), |b| b.to_string());
        let block = match self.block_size {
            Block::Size(b) => b.to_string(),
            Block::Full => "full".into(),
            Block::None => "none".into(),
        };
        Some(format!(
            "cat(k={k},block={block},wbits={wbits},abits={abits})"
        ))
    }

    /// Calibration statistics for the CAT stage: the block moments of the mlp sinks'
    /// inputs of `model` as transformed by the first stage.
    pub fn calibrate_cat(
        &self,
        model: &Model,
        release: &dyn Fn(&perqc_ir::Tensor),
    ) -> Result<Option<Calibration>> {
        let Some(k) = self.cat.0 else { return Ok(None) };
        let opts = StatsOptions {
            block_moments: Some(k),
            sample_every: self.probe_every(),
            ..StatsOptions::default()
        };
        // The first stage rewrote the weights (owned now, not mapped): a session over the
        // whole model would hold a second copy, so the windows run a few regions at a time.
        let watch: Vec<(String, StatsOptions)> = mlp_sink_values(model)?
            .into_iter()
            .map(|n| (n, opts.clone()))
            .collect();
        if watch.is_empty() {
            return Ok(None);
        }
        crate::staged::Staged::new(model, &self.calib)?
            .calibrate_in_pieces(model, &watch, CAT_STAGE_REGIONS, release)
            .map(Some)
    }

    /// Keeping every this many calibration rows gives about [`PROBE_ROWS`].
    fn probe_every(&self) -> usize {
        (self.calib.calib_seqs * self.calib.calib_len / PROBE_ROWS).max(1)
    }

    /// Keeping every this many rows of `seqs` calibration sequences (0: all) gives about
    /// [`PERMUTE_ROWS`], what a permutation that reads row profiles samples.
    pub fn permute_every(&self, seqs: usize) -> usize {
        let seqs = match seqs {
            0 => self.calib.calib_seqs,
            n => n.min(self.calib.calib_seqs),
        };
        (seqs * self.calib.calib_len / PERMUTE_ROWS).max(1)
    }

    /// Statistics `opts` of the mlp sinks' inputs of `model` (`None` if it has none), and
    /// with a block R1 the residual stream's readers' inputs (mean and max |x|, and
    /// profiles where `opts` has them), on `seqs` of the calibration sequences (0: all).
    fn calibrate_mlp_sinks(
        &self,
        model: &Model,
        opts: StatsOptions,
        seqs: usize,
        release: &dyn Fn(&perqc_ir::Tensor),
    ) -> Result<Option<Calibration>> {
        let mut watch: Vec<(String, StatsOptions)> = mlp_sink_values(model)?
            .into_iter()
            .map(|n| (n, opts.clone()))
            .collect();
        if self.permutes_residual() {
            let residual = StatsOptions {
                profile_every: opts.profile_every,
                ..StatsOptions::default()
            };
            for n in sink_values(model, &[RegionKind::Residual])? {
                if !watch.iter().any(|(w, _)| *w == n) {
                    watch.push((n, residual.clone()));
                }
            }
        }
        if watch.is_empty() {
            return Ok(None);
        }
        let data = calib::windows(&self.calib)?.spread(seqs);
        calib::calibrate_windows(model, &watch, &data, &self.calib, release).map(Some)
    }

    /// R1 and R2 by --rotation (blocks of `b` for `block`, within each head for R2; a
    /// block that does not split the width or the head gives the full rotation there, and
    /// so does `--block-size full`, `b` = `None`).
    fn rotations(&self, passes: &mut Vec<String>, b: Option<usize>) {
        let core = self.hadamard_core;
        let signs = self
            .rotation_signs
            .map(|s| format!(",signs={s}"))
            .unwrap_or_default();
        match (self.rotation.as_str(), b) {
            ("none", _) => {}
            ("block", Some(b)) => passes.push(format!(
                "rotate(residual=block,heads=block,block={b},core={core}{signs})"
            )),
            _ => passes.push(format!("rotate(residual=full,core={core}{signs})")),
        }
    }

    /// Whether the pipeline runs a calibrated permutation.
    fn permutes(&self) -> bool {
        matches!(self.block_size, Block::Size(_)) && self.permute.uses_statistics()
    }

    /// Whether the calibrated permutation also spreads the residual stream over R1's
    /// blocks (`--rotation block`).
    fn permutes_residual(&self) -> bool {
        self.permutes() && self.rotation == "block"
    }

    /// Refuses a recipe that cannot run: smoothing without calibration data, training
    /// without smoothing.
    pub fn check(&self, layerwise: bool) -> Result<()> {
        if self.smooth_train > 0 && self.smooth == Smooth::None {
            bail!(
                "--smooth-train refines the smoothing's scales: give --smooth (max, quantile or search) with it"
            );
        }
        if self.smooth != Smooth::None && !self.calib.given() {
            bail!(
                "--smooth needs calibration data (--calib-text with --tokenizer, or --calib-ids)"
            );
        }
        if self.cat.0.is_some() && !self.calib.given() {
            bail!("--cat needs calibration data (--calib-text with --tokenizer, or --calib-ids)");
        }
        if self.rotation == "block" && self.block_size == Block::None {
            bail!(
                "--rotation block takes its blocks from --block-size: give a size (or full), not none"
            );
        }
        if self.rotation == "block" && layerwise && self.permutes() {
            bail!(
                "--rotation block permutes the residual stream from the float model's statistics: use --permute-stats float"
            );
        }
        if !perqc_ops::hadamard::constructible(self.hadamard_core) {
            bail!(
                "--hadamard-core {}: no Hadamard matrix of that order (orders are 1, 2 and multiples of 4; 576 has cores 36, 72, 144, 288 and 576)",
                self.hadamard_core
            );
        }
        if self.rotation == "none" && self.rotation_signs.is_some() {
            bail!("--rotation-signs randomizes R1 and R2: it does nothing with --rotation none");
        }
        if self.cat.0.is_some() && layerwise {
            bail!(
                "--cat replaces the online Hadamard the layer-by-layer driver applies: use --permute-stats float"
            );
        }
        Ok(())
    }

    /// Calibration statistics of what the smoothing and the permutation read (the mlp
    /// sinks' inputs), if there is data and a pass needs them; with `layerwise` the
    /// permutation gathers its own. `model` is canonicalized; `release` is called on each
    /// weight once the calibration session has its copy.
    pub fn calibrate(
        &self,
        model: &Model,
        layerwise: bool,
        release: &dyn Fn(&perqc_ir::Tensor),
    ) -> Result<Option<Calibration>> {
        let smooths = self.smooth != Smooth::None;
        let permutes = self.permutes() && !layerwise;
        let cat = self.cat.0.filter(|_| self.cat_in_first_stage());
        if !self.calib.given() || (!smooths && !permutes && cat.is_none()) {
            return Ok(None);
        }
        // Smoothing's quantiles and CAT's moments take every sequence.
        let seqs = match smooths || cat.is_some() {
            true => 0,
            false => self.permute_seqs,
        };
        let opts = StatsOptions {
            quantiles: smooths,
            sample_every: match smooths || cat.is_some() {
                true => self.probe_every(),
                false => 0,
            },
            profile_every: match permutes && self.permute.uses_profiles() {
                true => self.permute_every(seqs),
                false => 0,
            },
            block_moments: cat,
            ..StatsOptions::default()
        };
        self.calibrate_mlp_sinks(model, opts, seqs, release)
    }

    /// Runs the original model (read again from `input` and canonicalized) and the
    /// transformed one on up to two calibration windows (or fixed ids) and compares their
    /// first outputs; returns the relative error, failing above the tolerance. One session
    /// at a time; `files` (the transformed model's maps) gives back the pages of its
    /// weights still in the file once the session has copied them.
    pub fn verify(
        &self,
        input: &Path,
        transformed: &Model,
        files: &perqc_onnx::FileMaps,
    ) -> Result<f64> {
        let windows: Vec<Vec<u32>> = if self.calib.given() {
            let mut args = self.calib.clone();
            args.calib_seqs = args.calib_seqs.min(2);
            calib::windows(&args)?.windows
        } else {
            // Fixed ids below every vocabulary size in use (a small model has 256 tokens).
            vec![(0..64u32).map(|i| (i * 37 + 11) % 250).collect()]
        };
        let len = windows[0].len();
        // A session over `m`, and the first output of one window as floats (a half model's
        // before its boundary Cast, so that both compare within f32 round-off).
        let session = |m: &Model, release: &dyn Fn(&perqc_ir::Tensor)| -> Result<_> {
            let f32_out = perqc_passes::upcast_half::with_f32_outputs(m);
            let m = f32_out.as_ref().unwrap_or(m);
            let s = Session::with_release(m, &SessionOptions::default(), release)?;
            let feeds = WindowFeeds::new(&s, &m.graph, len)?;
            Ok((s, feeds))
        };
        let first = |s: &Session, feeds: &WindowFeeds, w: &[u32]| -> Result<Vec<f32>> {
            let out = s.run(&feeds.feeds(w))?;
            match out.into_iter().next().map(|o| o.1) {
                Some(RtTensor::F32(a)) => Ok(a.iter().copied().collect()),
                _ => bail!("the first output is not float32"),
            }
        };
        // The original's outputs are kept; the transformed model's are compared window by
        // window as they come.
        let a = {
            let original = perqc_onnx::load(input).context("--verify: reading the original")?;
            let mut model = original.model;
            perqc_passes::canonicalize(&mut model).context("canonicalizing")?;
            let (s, feeds) = session(&model, &|t| original.files.release(t))
                .context("--verify: running the original model")?;
            windows
                .iter()
                .map(|w| first(&s, &feeds, w))
                .collect::<Result<Vec<_>>>()
                .context("--verify: running the original model")?
        };
        let (s, feeds) = session(transformed, &|t| files.release(t))
            .context("--verify: running the transformed model")?;
        let (mut err, mut max) = (0f64, 0f64);
        for (w, x) in windows.iter().zip(&a) {
            let y = first(&s, &feeds, w).context("--verify: running the transformed model")?;
            for (p, q) in x.iter().zip(&y) {
                err = err.max(f64::from((p - q).abs()));
                max = max.max(f64::from(p.abs()));
            }
        }
        let rel = if max > 0.0 { err / max } else { err };
        if rel.is_nan() || rel > self.verify_tol {
            bail!(
                "--verify: the transformed model's outputs differ from the original's by {rel:.3e} relative (max abs error {err:.3e}), above --verify-tol {:.1e}",
                self.verify_tol
            );
        }
        Ok(rel)
    }
}
