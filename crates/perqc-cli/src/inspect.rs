//! `perqc inspect`: what the analyses see in a model.

use crate::quant::QuantArgs;
use crate::recipe::RecipeArgs;
use crate::sqnr;
use anyhow::{Context, Result, bail};
use clap::Args;
use perqc_ir::{PassManager, RunOptions};
use perqc_passes::regions::Regions;
use std::path::PathBuf;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["regions", "sqnr"])))]
pub struct InspectArgs {
    /// The ONNX model to inspect (canonicalized first, as the compiler does).
    model: PathBuf,
    /// The permutation-equivariant regions: kind, dimension, heads, sources and sinks, and
    /// which transforms are legal (with the reason where one is not).
    #[arg(long)]
    regions: bool,
    /// The quantized SQNR (dB) of every linear layer the recipe quantizes, with its
    /// concentration and alignment factors and the alignment bound, measured on sampled
    /// calibration rows before the recipe and after each of its transforms (the recipe
    /// and quantizer flags of the compile command choose them). Needs calibration data.
    #[arg(long)]
    sqnr: bool,
    /// Calibration rows sampled per layer input for --sqnr.
    #[arg(long, value_name = "N", default_value_t = 512)]
    sqnr_rows: usize,
    /// Print JSON instead of text.
    #[arg(long, conflicts_with = "dot")]
    json: bool,
    /// Print the regions as a Graphviz graph.
    #[arg(long, requires = "regions")]
    dot: bool,
    #[command(flatten)]
    recipe: RecipeArgs,
    #[command(flatten)]
    quant: QuantArgs,
}

pub fn run(args: InspectArgs) -> Result<()> {
    if args.sqnr {
        return run_sqnr(args);
    }
    let mut model = crate::load(&args.model, false)?;
    perqc_passes::canonicalize(&mut model)
        .with_context(|| format!("{}: canonicalizing", args.model.display()))?;
    let shapes = perqc_ops::infer_model(&model)
        .with_context(|| format!("{}: shape inference", args.model.display()))?;
    let regions = Regions::find(&model, &shapes);
    if args.json {
        crate::emit(&(serde_json::to_string_pretty(&regions.to_json())? + "\n"))?;
    } else if args.dot {
        crate::emit(&regions.to_dot())?;
    } else {
        crate::emit(&regions.summary())?;
    }
    Ok(())
}

/// `--sqnr`: measures the model, then runs the recipe's transform passes one at a time
/// (with the calibration they read, as the compile command provides it) and measures again
/// after each pass that changed the model. `--report FILE` also writes the JSON there.
fn run_sqnr(args: InspectArgs) -> Result<()> {
    let (recipe, path) = (&args.recipe, &args.model);
    // The compile command's output flags have nothing to act on here.
    if recipe.no_quantize || recipe.verify || args.quant.target != "qdq" {
        bail!("--no-quantize, --verify and --target apply to the compile command, not to inspect");
    }
    if !recipe.calib.given() {
        bail!("--sqnr needs calibration data (--calib-text with --tokenizer, or --calib-ids)");
    }
    if args.sqnr_rows == 0 {
        bail!("--sqnr-rows must be at least 1");
    }
    let mut notes = Vec::new();
    let config = args.quant.config(true, &mut notes)?;
    recipe.check(false)?;
    if recipe.permute_stats == "quantized" {
        notes.push(
            "the permutation's statistics come from the float model here (--permute-stats quantized takes them from the quantized prefix while quantizing)".into(),
        );
    }
    let passes = recipe.pipeline(&mut notes, false, Some(&config));
    let registry = perqc_passes::registry();
    // Every stage's pass is built before any work.
    let mut stages = passes
        .iter()
        .map(|p| registry.build(p).map_err(|e| anyhow::anyhow!("{p}: {e}")))
        .collect::<Result<Vec<_>>>()?;
    let cat = recipe.cat_pipeline(Some(&config));
    let cat_stage = cat
        .as_deref()
        .map(|p| registry.build(p).map_err(|e| anyhow::anyhow!("{p}: {e}")))
        .transpose()?;

    let loaded = perqc_onnx::load(path)?;
    let (mut model, files) = (loaded.model, loaded.files);
    let release = |t: &perqc_ir::Tensor| files.release(t);
    perqc_runtime::tune_allocator();
    perqc_passes::canonicalize(&mut model)
        .with_context(|| format!("{}: canonicalizing", path.display()))?;
    config
        .select(&model)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    for stage in stages.iter().chain(&cat_stage) {
        stage
            .check(&model)
            .with_context(|| path.display().to_string())?;
    }
    let mut table = sqnr::Table::new(sqnr::probe(&config));
    let measure = |table: &mut sqnr::Table, label: &str, model: &perqc_ir::Model| {
        table
            .measure(
                label,
                model,
                &config,
                &recipe.calib,
                args.sqnr_rows,
                &release,
            )
            .with_context(|| path.display().to_string())
    };
    measure(&mut table, "original", &model)?;
    let mut manager = PassManager::new();
    if let Some(c) = recipe
        .calibrate(&model, false, &release)
        .with_context(|| path.display().to_string())?
    {
        manager.provide(c);
    }
    let mut opts = RunOptions::default();
    for (spec, stage) in passes.iter().zip(&mut stages) {
        let report = manager
            .run(&mut model, stage, &mut opts)
            .with_context(|| format!("{}: {spec}", path.display()))?;
        for p in &report.passes {
            notes.extend(p.notes.iter().map(|n| format!("{}: {n}", p.name)));
        }
        if report.changed() {
            measure(&mut table, spec, &model)?;
        } else {
            notes.push(format!("{spec} changed nothing: not measured"));
        }
    }
    if let (Some(spec), Some(mut stage)) = (cat, cat_stage) {
        drop(manager);
        let mut m = PassManager::new();
        if let Some(c) = recipe
            .calibrate_cat(&model, &release)
            .with_context(|| format!("{}: calibrating for --cat", path.display()))?
        {
            m.provide(c);
        }
        let report = m
            .run(&mut model, &mut stage, &mut opts)
            .with_context(|| format!("{}: {spec}", path.display()))?;
        if report.changed() {
            measure(&mut table, &spec, &model)?;
        }
    }
    let json = table.json();
    if let Some(file) = &args.quant.report {
        crate::write_atomically(file, serde_json::to_string_pretty(&json)?.as_bytes())
            .with_context(|| format!("--report: cannot write {}", file.display()))?;
    }
    if args.json {
        crate::emit(&(serde_json::to_string_pretty(&json)? + "\n"))?;
    } else {
        crate::emit(&table.text())?;
    }
    for n in notes {
        eprintln!("note: {n}");
    }
    Ok(())
}
