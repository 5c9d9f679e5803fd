//! `perqc eval`: perplexity of a causal LM under the native runtime, by the bench protocol.

use crate::corpus::{self, WindowFeeds};
use crate::ppl;
use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ndarray::Ix3;
use perqc_runtime::{RtTensor, Session, SessionOptions};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct EvalArgs {
    /// The ONNX model: input `input_ids` [batch, seq] int64, first output logits [batch, seq, vocab].
    /// A KV-cache graph gets an empty past, an all-ones attention_mask and position_ids 0..seq.
    model: PathBuf,
    /// Hugging Face tokenizer.json for --text.
    #[arg(long, requires = "text")]
    tokenizer: Option<PathBuf>,
    /// UTF-8 text to score (tokenized whole, from --skip-chars on).
    #[arg(long, requires = "tokenizer", conflicts_with = "ids")]
    text: Option<PathBuf>,
    /// Pre-tokenized ids instead of text: a .npy of int64 or int32.
    #[arg(long)]
    ids: Option<PathBuf>,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    seq: usize,
    /// Windows to score, at least 1 (fewer if the text is shorter, with a note on stderr).
    #[arg(long, default_value_t = 16)]
    windows: usize,
    /// Characters of --text to skip before tokenizing (the calibration part).
    #[arg(long, default_value_t = 0)]
    skip_chars: usize,
    /// Threads, at least 1 (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Run quantized linears on the float kernels (fake quantization) instead of the
    /// integer ones (`fuse-int-linear`; used where the CPU has AVX2 or AVX-512). Weight-only
    /// linears (w4a16, MatMulNBits) then keep float activations; the integer plan quantizes
    /// them per token to 8 bits.
    #[arg(long)]
    no_int: bool,
    /// Run every op of the graph on its own kernel: no canonicalization (the fused attention,
    /// RMS norm and SiLU kernels) and no integer plan. Slower; for telling what a fused kernel
    /// changes from what the graph computes. A half-precision model needs the canonical graph.
    #[arg(long, conflicts_with = "no_int")]
    as_is: bool,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
}

pub fn run(args: EvalArgs) -> Result<()> {
    if args.seq < 2 {
        bail!("--seq must be at least 2");
    }
    if args.windows == 0 {
        bail!("--windows must be at least 1");
    }
    if args.threads == Some(0) {
        bail!("--threads must be at least 1 (leave it out to use all cores)");
    }
    let (ids, source) = match (&args.tokenizer, &args.text, &args.ids) {
        (Some(tok), Some(text), None) => (corpus::tokenize(tok, text, args.skip_chars)?, text),
        (None, None, Some(ids)) => (corpus::read_ids(ids)?, ids),
        _ => bail!("give --tokenizer and --text, or --ids"),
    };
    let windows = corpus::take_windows(&ids, args.seq, args.windows, source, "--seq", "scoring")?;
    // The tokenizer's many small allocations are freed: give them back before the model's.
    perqc_runtime::trim_allocator();
    let mut loaded = perqc_onnx::load(&args.model)?;
    // The canonical graph runs exported attention, RMS norm and SiLU chains as one op each.
    if !args.as_is {
        perqc_passes::canonicalize(&mut loaded.model)
            .with_context(|| format!("{}: canonicalize", args.model.display()))?;
    }
    // A half model (computed in f32 since canonicalize) is scored on its logits before the
    // boundary Cast rounds them to half.
    if let Some(m) = perqc_passes::upcast_half::with_f32_outputs(&loaded.model) {
        loaded.model = m;
    }
    // The portable integer level is a plain loop, slower than the float kernels: without a
    // SIMD level the quantized linears stay on the float path.
    let level = perqc_ops::kernels::igemm::Level::detect();
    let quantized = loaded.model.graph.nodes().any(|(_, n)| {
        matches!(
            n.op_type.as_str(),
            "FakeQuantize" | "DequantizeLinear" | "MatMulNBits"
        )
    });
    let int = !args.no_int && !args.as_is;
    if int && level == perqc_ops::kernels::igemm::Level::Scalar && quantized && !args.quiet {
        eprintln!(
            "note: no SIMD level of the integer kernels (AVX2 or AVX-512) on this CPU or \
             under PERQC_INT_LEVEL; the quantized linears run on the float kernels"
        );
    }
    if int && level != perqc_ops::kernels::igemm::Level::Scalar {
        let fused = perqc_passes::fuse_int_linear(&mut loaded.model)
            .with_context(|| format!("{}: fuse-int-linear", args.model.display()))?;
        if fused.counter("fused") > 0 && !args.quiet {
            eprintln!(
                "integer kernels ({level:?}) for {} quantized linears{}",
                fused.counter("fused"),
                match fused.counter("left-float") {
                    0 => String::new(),
                    n => format!("; {n} keep the float path"),
                }
            );
        }
    }
    let opts = SessionOptions {
        threads: args.threads.unwrap_or(SessionOptions::default().threads),
    };
    perqc_runtime::tune_allocator();
    // The session copies the weights; the mapped file's pages are given back as it goes.
    let session = Session::with_release(&loaded.model, &opts, &|t| loaded.release(t))
        .with_context(|| args.model.display().to_string())?;
    let feeds = WindowFeeds::new(&session, &loaded.model.graph, args.seq)
        .with_context(|| args.model.display().to_string())?;
    drop(loaded);
    // The graph's own copies (the packed weights fuse-int-linear made, the canonical
    // graph) are freed now that the session holds its own: give them back.
    perqc_runtime::trim_allocator();

    let bar = ProgressBar::new(windows.len() as u64);
    if args.quiet || !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} windows  {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let start = Instant::now();
    let (mut nll, mut count) = (0.0f64, 0usize);
    // Errors while scoring name the model and the file the ids came from.
    let place = |i: usize| {
        format!(
            "{}: window {} of {}",
            args.model.display(),
            i + 1,
            source.display()
        )
    };
    for (i, w) in windows.iter().enumerate() {
        // Outputs after the logits (present key/values) are ignored.
        let out = session.run(&feeds.feeds(w)).with_context(|| place(i))?;
        let logits = match out.into_iter().next() {
            Some((_, RtTensor::F32(a))) => a.into_dimensionality::<Ix3>().map_err(|_| {
                anyhow::anyhow!(
                    "{}: logits must be [batch, seq, vocab]",
                    args.model.display()
                )
            })?,
            _ => bail!(
                "{}: the first output is not float logits",
                args.model.display()
            ),
        };
        let vocab = logits.dim().2;
        if let Some(&bad) = w.iter().find(|&&id| id as usize >= vocab) {
            bail!(
                "{}: token id {bad} is outside the model's vocabulary of {vocab}",
                place(i)
            );
        }
        nll += ppl::window_nll(
            logits
                .as_standard_layout()
                .as_slice()
                .expect("standard layout"),
            vocab,
            w,
        );
        // The next window's logits reuse this buffer instead of faulting in 100 MB anew.
        perqc_runtime::recycle([RtTensor::F32(logits.into_dyn())]);
        count += args.seq - 1;
        bar.inc(1);
        bar.set_message(format!("ppl {:.4}", (nll / count as f64).exp()));
    }
    bar.finish_and_clear();
    println!(
        "tokens={count} seconds={:.1}",
        start.elapsed().as_secs_f64()
    );
    println!("ppl={:.4}", (nll / count as f64).exp());
    Ok(())
}
