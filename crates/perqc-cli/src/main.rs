//! `perqc`: reads an ONNX model, runs a pass pipeline over it, writes the result.
//!
//! Every failure is one line on stderr, `error: <file>: <where>: <what>`, and a non-zero exit;
//! the output file is written to a temporary name and renamed only on success.

// Calibration is wired into the compile command with the region analysis and transforms.
mod calib;
mod corpus;
mod eval;
mod inspect;
mod ppl;
mod quant;
mod recipe;
mod sqnr;
mod staged;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};
use perqc_ir::{AttrValue, Graph, PassManager, RunOptions, Tensor, TensorData};
use perqc_onnx::{ExternalPolicy, SaveOptions};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "perqc",
    version,
    about = "perqc: Permute, Rotate, then Quantize: a compiler that quantizes ONNX transformer models",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    compile: CompileArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Print a model's textual IR.
    Print {
        /// The ONNX model to print.
        model: PathBuf,
    },
    /// Perplexity of a causal LM on a text, run natively (prints `ppl=<value>` last).
    Eval(eval::EvalArgs),
    /// What the analyses find in a model (`--regions`: permutation-equivariant regions).
    Inspect(Box<inspect::InspectArgs>),
}

#[derive(Args)]
struct CompileArgs {
    /// The ONNX model to compile (external data is read from its folder).
    #[arg(required = true)]
    model: Option<PathBuf>,
    /// Where to write the result (and `<OUT>.data` when tensors go external).
    #[arg(short = 'o', long = "output", value_name = "OUT", required = true)]
    output: Option<PathBuf>,
    /// Run this pass pipeline instead of the recipe: `a,b(opt=1),c`; `none` writes the
    /// model back unchanged.
    #[arg(long)]
    passes: Option<String>,
    /// Write initializers of at least --external-threshold bytes to `<OUT>.data`. Without it,
    /// tensors that were external stay external, and everything goes external when the
    /// model would pass protobuf's 2 GiB limit.
    #[arg(long, conflicts_with = "inline_data")]
    external_data: bool,
    /// Write every tensor inline, also those that were external (unless the model would
    /// pass 2 GiB).
    #[arg(long)]
    inline_data: bool,
    /// Smallest initializer (bytes) that --external-data moves out.
    #[arg(long, default_value_t = 1024, value_name = "BYTES")]
    external_threshold: u64,
    /// Check the IR invariants before the pipeline and after every pass.
    #[arg(long)]
    verify_each: bool,
    /// Print the textual IR to stderr after this pass (repeatable; `all` for every pass).
    #[arg(long, value_name = "PASS")]
    print_ir_after: Vec<String>,
    /// Stop rewriting after this many rewrites (to bisect a miscompile).
    #[arg(long, value_name = "N")]
    rewrite_budget: Option<usize>,
    /// List the registered passes and exit.
    #[arg(long, exclusive = true)]
    list_passes: bool,
    /// Print nothing but errors.
    #[arg(short, long)]
    quiet: bool,
    #[command(flatten)]
    recipe: recipe::RecipeArgs,
    #[command(flatten)]
    quant: quant::QuantArgs,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if let Some(word) = unknown_command(&e) {
                let commands: Vec<String> = Cli::command()
                    .get_subcommands()
                    .map(|c| format!("`{}`", c.get_name()))
                    .collect();
                eprintln!(
                    "error: unknown command `{word}`; the commands are {}, and `perqc MODEL -o OUT` compiles a model (see --help)",
                    commands.join(", ")
                );
                return ExitCode::from(2);
            }
            e.exit();
        }
    };
    let result = match cli.command {
        Some(Command::Print { model }) => print(model),
        Some(Command::Eval(args)) => eval::run(args),
        Some(Command::Inspect(args)) => inspect::run(*args),
        None => compile(cli.compile),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of contexts, outermost first; a cause that its parent's
            // message already spells out is not repeated.
            let mut msg = String::new();
            for cause in e.chain().map(|c| c.to_string()) {
                if !msg.ends_with(&cause) {
                    if !msg.is_empty() {
                        msg.push_str(": ");
                    }
                    msg.push_str(&cause);
                }
            }
            eprintln!("error: {}", msg.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// The first argument, when the command line does not parse and that argument is neither an
/// option nor anything like a model path: an unknown (or mistyped) command, which clap alone
/// would report as a misplaced positional argument.
fn unknown_command(e: &clap::Error) -> Option<String> {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        return None;
    }
    let first = std::env::args_os().nth(1)?.into_string().ok()?;
    // A known command with bad arguments is clap's to explain.
    if Cli::command()
        .get_subcommands()
        .any(|c| c.get_name() == first)
    {
        return None;
    }
    let path_like = first.contains(['/', '.']) || Path::new(&first).exists();
    (!first.is_empty() && !first.starts_with('-') && !path_like).then_some(first)
}

fn load(path: &Path, quiet: bool) -> Result<perqc_ir::Model> {
    let loaded = perqc_onnx::load(path)?;
    if !quiet {
        for w in &loaded.warnings {
            eprintln!("warning: {w}");
        }
    }
    Ok(loaded.model)
}

fn print(model: PathBuf) -> Result<()> {
    let model = load(&model, false)?;
    emit(&perqc_ir::print::print_model(&model))
}

fn compile(args: CompileArgs) -> Result<()> {
    // Before any thread allocates: calibration sessions and the rounding between them
    // reuse one arena's free memory (see `share_arenas`).
    perqc_runtime::share_arenas();
    let registry = perqc_passes::registry();
    if args.list_passes {
        emit(&registry.help())?;
        return Ok(());
    }
    let (Some(input), Some(output)) = (args.model, args.output) else {
        bail!("usage: perqc MODEL -o OUT (see --help)");
    };
    // Validate the pipeline before reading anything.
    let mut notes = Vec::new();
    // Without --passes the recipe runs: its exact transforms, then (unless --no-quantize)
    // quantization.
    let recipe = args.passes.is_none();
    let quantize = recipe && !args.recipe.no_quantize;
    if !recipe && args.recipe.no_quantize {
        bail!("--passes and --no-quantize both choose the passes; give one");
    }
    if !recipe
        && (args.recipe.verify
            || args.recipe.calib.given()
            || args.recipe.smooth != recipe::Smooth::None
            || args.recipe.smooth_train > 0)
    {
        bail!(
            "--verify, --smooth, --smooth-train and calibration data apply to the recipe: leave out --passes"
        );
    }
    if quantize && args.recipe.verify {
        bail!(
            "--verify checks the exact transforms: add --no-quantize (a quantized model's outputs differ by design)"
        );
    }
    let quant_config = if quantize {
        Some(args.quant.config(args.recipe.calib.given(), &mut notes)?)
    } else {
        None
    };
    // With a calibrating quantizer (GPTQ, clip search) the calibrated mlp permutation and
    // its online Hadamard are applied layer by layer from the quantizers' forward pass
    // instead of a calibration pass of their own.
    let layerwise = quant_config
        .as_ref()
        .filter(|c| c.rounding == perqc_passes::quantize::Rounding::Gptq || c.clip_search)
        .and_then(|_| args.recipe.layerwise());
    if recipe {
        args.recipe.check(layerwise.is_some())?;
    }
    let passes = match &args.passes {
        None => args
            .recipe
            .pipeline(&mut notes, layerwise.is_some(), quant_config.as_ref())
            .join(","),
        Some(p) => p.clone(),
    };
    let mut pipeline = registry
        .build(&passes)
        .map_err(|e| anyhow::anyhow!("--passes: {e}"))?;
    // The CAT stage, run on its own calibration after the pipeline.
    let cat_stage = match recipe
        .then(|| args.recipe.cat_pipeline(quant_config.as_ref()))
        .flatten()
    {
        Some(stage) => Some(
            registry
                .build(&stage)
                .map_err(|e| anyhow::anyhow!("--cat: {e}"))?,
        ),
        None => None,
    };

    let t = Instant::now();
    let loaded = perqc_onnx::load(&input)?;
    if !args.quiet {
        for w in &loaded.warnings {
            eprintln!("warning: {w}");
        }
    }
    let (mut model, mut files) = (loaded.model, loaded.files);
    let load_time = t.elapsed();
    let mut manager = PassManager::new();
    let mut calib_time = None;
    if recipe {
        // Calibration and --verify run sessions as `perqc eval` does, with its allocator
        // settings (activation buffers reused across runs).
        perqc_runtime::tune_allocator();
        let canonical = perqc_passes::canonicalize(&mut model)
            .with_context(|| format!("{}: canonicalizing", input.display()))?;
        if canonical.counter("half-tensors-upcast") > 0 {
            // The upcast weights are heap copies: mapped from a temporary file instead, their
            // pages go back once the calibration session has copied them, as the f32 model
            // file's do.
            // Next to the output, on a disk the output fits on (a tmpfs would keep them in
            // memory).
            let dir = match output.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => std::path::PathBuf::from("."),
            };
            files.spill(&mut model, 1 << 16, &dir).with_context(|| {
                format!(
                    "{}: moving the upcast weights to a temporary file",
                    input.display()
                )
            })?;
            notes.push(format!(
                "a float16/bfloat16 model: computed, calibrated and quantized in float32 ({} half tensors upcast); its {} half inputs and {} half outputs keep their type through Casts",
                canonical.counter("half-tensors-upcast"),
                canonical.counter("half-inputs"),
                canonical.counter("half-outputs")
            ));
        }
        // What would stop quantization (a skip pattern matching nothing, a group size that
        // does not divide) is found before any calibration.
        if let Some(c) = &quant_config {
            c.select(&model)
                .map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
        }
        // So is what the passes cannot do on this model (a block that does not divide a
        // width).
        for stage in std::iter::once(&pipeline).chain(&cat_stage) {
            stage
                .check(&model)
                .with_context(|| input.display().to_string())?;
        }
        let t = Instant::now();
        // The calibration session copies the weights; their mapped pages go back as it does.
        if let Some(c) = args
            .recipe
            .calibrate(&model, layerwise.is_some(), &|t| files.release(t))
            .with_context(|| input.display().to_string())?
        {
            notes.push(format!("calibrated on {}", c.source()));
            calib_time = Some(t.elapsed());
            manager.provide(c);
            // The session is gone: its memory goes back to the system, and the passes will
            // read the weights it copied and gave back.
            perqc_runtime::trim_allocator();
            files.will_need();
        }
        // The passes are not sessions: their transient buffers go back as they are freed.
        perqc_runtime::untune_allocator();
    }
    // With --report: each linear's output SQNR under one probe, before the transforms and
    // after them (the last stage is measured just before quantizing).
    let mut probe = match (&quant_config, &args.quant.report) {
        (Some(c), Some(_)) if recipe && args.recipe.calib.given() => {
            let mut t = sqnr::Table::without_bounds(sqnr::probe(c), PROBE_PIECE_GROUPS);
            measure_probe(
                &mut t,
                "without the transforms",
                &model,
                c,
                &args.recipe.calib,
                &files,
            )?;
            Some(t)
        }
        _ => None,
    };
    let size_before = files_size(&input, &model.graph);
    // The initializers as loaded, to count what the passes changed (none run: none changed).
    let weights_before: Option<Vec<Before>> = (!pipeline.is_empty()).then(|| {
        initializers(&model.graph)
            .map(|(name, t)| Before::of(name, t, &files))
            .collect()
    });

    let mut stderr = std::io::stderr();
    let mut opts = RunOptions {
        verify_each: args.verify_each,
        print_ir_after: args.print_ir_after,
        print_sink: Some(&mut stderr),
        rewrite_budget: args.rewrite_budget,
    };
    let report = manager
        .run(&mut model, &mut pipeline, &mut opts)
        .with_context(|| input.display().to_string())?;
    // Stages run after the pipeline, each with its own report: CAT on its own calibration,
    // and tie-head after quantization.
    let mut late: Vec<(&str, perqc_ir::Report)> = Vec::new();
    // CAT: its statistics are of the inputs as the first stage left them.
    if let Some(mut cat) = cat_stage {
        drop(manager);
        perqc_runtime::trim_allocator();
        perqc_runtime::tune_allocator();
        let mut m = PassManager::new();
        if let Some(c) = args
            .recipe
            .calibrate_cat(&model, &|t| files.release(t))
            .with_context(|| format!("{}: calibrating for --cat", input.display()))?
        {
            m.provide(c);
        }
        perqc_runtime::trim_allocator();
        perqc_runtime::untune_allocator();
        late.push((
            perqc_passes::Cat::NAME,
            m.run(&mut model, &mut cat, &mut opts)
                .with_context(|| input.display().to_string())?,
        ));
        manager = m;
    }
    if let (Some(t), Some(c)) = (&mut probe, &quant_config) {
        if layerwise.is_some() {
            notes.push(
                "--report: `with the transforms` is measured before quantizing, so without the mlp permutation and online rotation --permute-stats quantized applies layer by layer"
                    .into(),
            );
        }
        measure_probe(
            t,
            "with the transforms",
            &model,
            c,
            &args.recipe.calib,
            &files,
        )?;
    }
    let mut quant_summary = None;
    if let Some(config) = quant_config {
        drop(manager);
        perqc_runtime::trim_allocator();
        // The quantizers' calibration runs sessions again.
        perqc_runtime::tune_allocator();
        let s = quant::run(
            &mut model,
            config,
            &args.recipe.calib,
            layerwise.as_ref(),
            &|t| files.release(t),
        )
        .with_context(|| format!("{}: quantizing", input.display()))?;
        if let Some(path) = &args.quant.report {
            quant::write_report(path, &s.reports, probe.as_ref())?;
        }
        quant_summary = Some(s);
    }
    if recipe {
        // The head reads the embedding table again where the transforms untied the two (or
        // the export stored the table twice); a quantized head or table does not match.
        let mut tie = registry
            .build(perqc_passes::TieHead::NAME)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        late.push((
            perqc_passes::TieHead::NAME,
            PassManager::new()
                .run(&mut model, &mut tie, &mut opts)
                .with_context(|| input.display().to_string())?,
        ));
    }
    if recipe && args.recipe.verify {
        // The original is read again from the file (and canonicalized the same way) rather
        // than kept from before the passes.
        let rel = args
            .recipe
            .verify(&input, &model, &files)
            .with_context(|| input.display().to_string())?;
        notes.push(format!(
            "--verify: outputs match the original within {rel:.2e} relative (tolerance {:.0e})",
            args.recipe.verify_tol
        ));
    }
    // Canonical ops exist only inside perqc: the file gets ops of the model's own opset.
    perqc_passes::lower_for_export(&mut model)
        .with_context(|| format!("{}: lowering canonical ops for export", input.display()))?;

    let save = SaveOptions {
        external: match (args.external_data, args.inline_data) {
            (true, _) => ExternalPolicy::All,
            (_, true) => ExternalPolicy::Inline,
            _ => ExternalPolicy::Keep,
        },
        threshold: args.external_threshold,
        ..SaveOptions::default()
    };
    let t = Instant::now();
    let saved = perqc_onnx::save(&model, &output, &save)?;
    let save_time = t.elapsed();

    if !args.quiet {
        if !pipeline.is_empty() {
            eprint!("{report}");
        }
        for (_, r) in &late {
            eprint!("{r}");
        }
        for n in &notes {
            eprintln!("note: {n}");
        }
        if let Some(t) = calib_time {
            eprintln!("calibration: {t:.2?}");
        }
        if let Some(q) = &quant_summary {
            for n in &q.notes {
                eprintln!("note: {n}");
            }
            eprint!("{}", quant::summary_text(q, probe.as_ref()));
        }
        if saved.forced_external {
            eprintln!(
                "note: the model passes protobuf's 2 GiB limit; tensors went to external data"
            );
        }
        // What was done to the model: passes, weights changed, size before and after.
        let weights = initializers(&model.graph).count();
        if pipeline.is_empty() && quant_summary.is_none() {
            eprintln!("no passes: the model is written back unchanged");
        } else {
            // The late stages count too.
            let (mut names, mut time) = (pipeline.names(), report.total_time());
            for (name, r) in &late {
                names.push(name);
                time += r.total_time();
            }
            eprintln!("passes run: {} ({time:.2?})", names.join(", "));
        }
        let (changed, before) = weights_before.as_ref().map_or((0, weights), |before| {
            (changed_weights(before, &model.graph, &files), before.len())
        });
        eprintln!(
            "weights: {changed} initializers changed, added or removed; {before} before, {weights} after"
        );
        let size_after = saved.model_bytes + saved.data.as_ref().map_or(0, |d| d.1);
        eprintln!("size: {size_before} bytes before, {size_after} after");
        let data = match &saved.data {
            Some((p, n)) => format!(" + {} ({n} bytes)", p.display()),
            None => String::new(),
        };
        eprintln!(
            "wrote {} ({} bytes){data}; load {load_time:.2?}, save {save_time:.2?}",
            output.display(),
            saved.model_bytes,
        );
    }
    Ok(())
}

/// Calibration windows and sampled rows per linear of a `--report` probe stage.
const PROBE_WINDOWS: usize = 2;
const PROBE_ROWS: usize = 256;
/// Activation groups per piece of a probe stage: about 5 layers of a Llama (4 groups each).
const PROBE_PIECE_GROUPS: usize = 20;

/// Measures `model` as stage `label` of the `--report` probe, on the first
/// [`PROBE_WINDOWS`] calibration windows.
fn measure_probe(
    table: &mut sqnr::Table,
    label: &str,
    model: &perqc_ir::Model,
    config: &perqc_passes::quantize::QuantConfig,
    calib: &calib::CalibArgs,
    files: &perqc_onnx::FileMaps,
) -> Result<()> {
    let calib = calib::CalibArgs {
        calib_seqs: calib.calib_seqs.min(PROBE_WINDOWS),
        ..calib.clone()
    };
    perqc_runtime::tune_allocator();
    let done = table
        .measure(label, model, config, &calib, PROBE_ROWS, &|t| {
            files.release(t)
        })
        .with_context(|| format!("--report: measuring {label}"));
    perqc_runtime::trim_allocator();
    perqc_runtime::untune_allocator();
    done
}

/// Writes `text` to stdout. A reader that went away (`perqc inspect ... | head`) is not
/// an error: the output was simply not wanted past that point.
fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing stdout"),
        _ => Ok(()),
    }
}

/// Writes `bytes` to a temporary file beside `path`, then renames it: `path` is either
/// the old file or the whole new one.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
}

/// The initializers of `g`, by name.
fn initializers(g: &Graph) -> impl Iterator<Item = (String, Tensor)> + '_ {
    g.initializers.iter().filter_map(|&v| {
        let val = g.value(v);
        Some((val.name.clone(), val.tensor.clone()?))
    })
}

/// An initializer before the passes: its type, shape, and where its payload is.
struct Before {
    name: String,
    dtype: perqc_ir::DType,
    dims: Vec<i64>,
    payload: Payload,
}

enum Payload {
    /// In the loaded file: its place there and its address when loaded. Only the place is
    /// kept, not the payload: holding it would keep every replaced original alive (and its
    /// pages resident) until the end.
    Mapped(perqc_onnx::MappedRange, usize),
    /// Not in the file (typed fields, tensors made by canonicalization): the tensor.
    Held(Tensor),
}

impl Before {
    fn of(name: String, t: Tensor, files: &perqc_onnx::FileMaps) -> Before {
        let (dtype, dims) = (t.dtype, t.dims.clone());
        let payload = match files.locate(&t).zip(payload_address(&t)) {
            Some((range, at)) => Payload::Mapped(range, at),
            None => Payload::Held(t),
        };
        Before {
            name,
            dtype,
            dims,
            payload,
        }
    }

    /// Whether `t` is this initializer unchanged. A payload still at its address in the
    /// file map is (map addresses are not reused while the maps live); a replaced one is
    /// compared with the file's bytes, whose pages are given back after.
    fn same(&self, t: &Tensor, files: &perqc_onnx::FileMaps) -> bool {
        if self.dtype != t.dtype || self.dims != t.dims {
            return false;
        }
        match &self.payload {
            Payload::Held(old) => {
                matches!((old.raw_bytes(), t.raw_bytes()), (Ok(x), Ok(y)) if x == y)
            }
            Payload::Mapped(range, at) => {
                if payload_address(t) == Some(*at) && files.locate(t) == Some(*range) {
                    return true;
                }
                let Ok(new) = t.raw_bytes() else {
                    return false;
                };
                if new.len() != range.len() {
                    return false;
                }
                // Piece by piece, so one piece of the original is resident at a time.
                let mut at = 0;
                for piece in range.pieces(4 << 20) {
                    let equal = files
                        .mapped_bytes(piece)
                        .is_some_and(|old| old == &new[at..at + piece.len()]);
                    files.release_range(piece);
                    if !equal {
                        return false;
                    }
                    at += piece.len();
                }
                true
            }
        }
    }
}

/// The address of a raw or external payload.
fn payload_address(t: &Tensor) -> Option<usize> {
    match &t.data {
        TensorData::Raw(b) | TensorData::External { bytes: b, .. } => Some(b.as_ptr() as usize),
        TensorData::Typed(_) => None,
    }
}

/// How many initializers differ from `before`: added, removed, or with another type, shape
/// or payload.
fn changed_weights(before: &[Before], g: &Graph, files: &perqc_onnx::FileMaps) -> usize {
    let old: HashMap<&str, &Before> = before.iter().map(|b| (b.name.as_str(), b)).collect();
    let mut kept = 0;
    let mut changed = 0;
    for (name, t) in initializers(g) {
        match old.get(name.as_str()) {
            Some(b) if b.same(&t, files) => kept += 1,
            _ => changed += 1,
        }
    }
    changed + (before.len() - kept)
}

/// Bytes of the model file `path` plus the external data files its tensors read.
fn files_size(path: &Path, g: &Graph) -> u64 {
    fn locations(g: &Graph, out: &mut HashSet<String>) {
        for &v in &g.initializers {
            if let Some(Tensor {
                data: TensorData::External { entries, .. },
                ..
            }) = &g.value(v).tensor
                && let Some((_, loc)) = entries.iter().find(|(k, _)| k == "location")
            {
                out.insert(loc.clone());
            }
        }
        for (_, n) in g.nodes() {
            for a in &n.attrs {
                match &a.value {
                    AttrValue::Graph(sub) => locations(sub, out),
                    AttrValue::Graphs(subs) => subs.iter().for_each(|s| locations(s, out)),
                    _ => {}
                }
            }
        }
    }
    let mut locs = HashSet::new();
    locations(g, &mut locs);
    let dir = path.parent().unwrap_or(Path::new(""));
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    size(path) + locs.iter().map(|l| size(&dir.join(l))).sum::<u64>()
}
