//! `perqc`: reads an ONNX model, runs a pass pipeline over it, writes the result.
//!
//! Every failure is one line on stderr, `error: <file>: <where>: <what>`, and a non-zero exit;
//! the output file is written to a temporary name and renamed only on success.

mod eval;
mod ppl;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};
use perqc_ir::{PassManager, RunOptions};
use perqc_onnx::{ExternalPolicy, SaveOptions};
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
}

#[derive(Args)]
struct CompileArgs {
    /// The ONNX model to compile (external data is read from its folder).
    #[arg(required = true)]
    model: Option<PathBuf>,
    /// Where to write the result (and `<OUT>.data` when tensors go external).
    #[arg(short = 'o', long = "output", value_name = "OUT", required = true)]
    output: Option<PathBuf>,
    /// The pass pipeline: `a,b(opt=1),c`; `none` writes the model back unchanged.
    #[arg(long, default_value = "none")]
    passes: String,
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
    let mut out = std::io::stdout().lock();
    out.write_all(perqc_ir::print::print_model(&model).as_bytes())?;
    Ok(())
}

fn compile(args: CompileArgs) -> Result<()> {
    let registry = perqc_passes::registry();
    if args.list_passes {
        print!("{}", registry.help());
        return Ok(());
    }
    let (Some(input), Some(output)) = (args.model, args.output) else {
        bail!("usage: perqc MODEL -o OUT (see --help)");
    };
    // Validate the pipeline before reading anything.
    let mut pipeline = registry
        .build(&args.passes)
        .map_err(|e| anyhow::anyhow!("--passes: {e}"))?;

    let t = Instant::now();
    let mut model = load(&input, args.quiet)?;
    let load_time = t.elapsed();

    let mut stderr = std::io::stderr();
    let mut opts = RunOptions {
        verify_each: args.verify_each,
        print_ir_after: args.print_ir_after,
        print_sink: Some(&mut stderr),
        rewrite_budget: args.rewrite_budget,
    };
    let report = PassManager::new()
        .run(&mut model, &mut pipeline, &mut opts)
        .with_context(|| input.display().to_string())?;

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
        if saved.forced_external {
            eprintln!(
                "note: the model passes protobuf's 2 GiB limit; tensors went to external data"
            );
        }
        let passes = if pipeline.is_empty() {
            String::new()
        } else {
            format!("passes {:.2?}, ", report.total_time())
        };
        let data = match &saved.data {
            Some((p, n)) => format!(" + {} ({n} bytes)", p.display()),
            None => String::new(),
        };
        eprintln!(
            "wrote {} ({} bytes){data}; load {load_time:.2?}, {passes}save {save_time:.2?}",
            output.display(),
            saved.model_bytes,
        );
    }
    Ok(())
}
