//! `perqc eval`: perplexity of a causal LM under the native runtime, by the bench protocol.

use crate::ppl;
use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ndarray::{Array2, Ix3};
use perqc_runtime::{RtTensor, Session, SessionOptions};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
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
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
}

fn tokenize(tokenizer: &Path, text: &Path, skip_chars: usize) -> Result<Vec<u32>> {
    let tok = tokenizers::Tokenizer::from_file(tokenizer).map_err(|e| {
        anyhow::anyhow!("{}: not a usable tokenizer.json: {e}", tokenizer.display())
    })?;
    let raw = std::fs::read(text).with_context(|| format!("{}: cannot read", text.display()))?;
    let text_str = std::str::from_utf8(&raw).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text: invalid byte at offset {}",
            text.display(),
            e.valid_up_to()
        )
    })?;
    let body = match text_str.char_indices().nth(skip_chars) {
        Some((at, _)) => &text_str[at..],
        None => bail!(
            "{}: --skip-chars {skip_chars} skips the whole text ({} characters)",
            text.display(),
            text_str.chars().count()
        ),
    };
    let enc = tok.encode(body, true).map_err(|e| {
        anyhow::anyhow!(
            "{}: tokenizing {}: {e}",
            tokenizer.display(),
            text.display()
        )
    })?;
    Ok(enc.get_ids().to_vec())
}

fn read_ids(path: &Path) -> Result<Vec<u32>> {
    let t = perqc_runtime::read_npy(path)?;
    let as_u32 = |v: i64, i: usize| {
        u32::try_from(v).map_err(|_| {
            anyhow::anyhow!(
                "{}: id {v} at index {i} is negative or too large",
                path.display()
            )
        })
    };
    match t {
        RtTensor::I64(a) => a.iter().enumerate().map(|(i, &v)| as_u32(v, i)).collect(),
        RtTensor::I32(a) => a
            .iter()
            .enumerate()
            .map(|(i, &v)| as_u32(v as i64, i))
            .collect(),
        other => bail!(
            "{}: ids must be int64 or int32, not {:?}",
            path.display(),
            other.dtype()
        ),
    }
}

/// Feeds for the graph inputs besides the token ids, for one window of `seq` tokens scored
/// from scratch: an all-ones `attention_mask` `[1, seq]`, `position_ids` `0..seq`, and each
/// past key/value (an input whose name contains `past`) empty: its declared shape with a
/// symbolic first (batch) dim 1 and every other symbolic dim (the past length) 0. Inputs
/// with a default (an initializer) are left to it; any other input is an error naming it.
fn extra_feeds(g: &perqc_ir::Graph, ids: &str, seq: usize) -> Result<Vec<(String, RtTensor)>> {
    use perqc_ir::{DType, Dim};
    let mut feeds = Vec::new();
    for &vid in &g.inputs {
        let v = g.value(vid);
        if v.name == ids || v.tensor.is_some() {
            continue;
        }
        let dtype = v.ty.as_ref().and_then(|t| t.elem());
        let ints = |vals: Vec<i64>| -> Result<RtTensor> {
            let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[1, seq]), vals)?;
            Ok(match dtype {
                Some(DType::I64) => RtTensor::i64(a),
                Some(DType::I32) => RtTensor::I32(a.mapv(|x| x as i32).into_shared()),
                other => bail!("input `{}` is {other:?}; expected int64 or int32", v.name),
            })
        };
        let t = if v.name == "attention_mask" {
            ints(vec![1; seq])?
        } else if v.name == "position_ids" {
            ints((0..seq as i64).collect())?
        } else if v.name.contains("past") {
            let Some(shape) = v.ty.as_ref().and_then(|t| t.shape()) else {
                bail!(
                    "input `{}` (a past key/value) has no declared shape",
                    v.name
                );
            };
            let dims: Vec<usize> = shape
                .iter()
                .enumerate()
                .map(|(i, d)| match d {
                    Dim::Known(n) => usize::try_from(*n).unwrap_or(0),
                    _ if i == 0 => 1,
                    _ => 0,
                })
                .collect();
            if dtype != Some(DType::F32) {
                bail!(
                    "input `{}` (a past key/value) is {dtype:?}; only float32 caches are supported",
                    v.name
                );
            }
            RtTensor::f32(ndarray::ArrayD::zeros(ndarray::IxDyn(&dims)))
        } else {
            bail!(
                "input `{}` is none of input_ids, attention_mask, position_ids or a past \
                 key/value; perqc eval cannot feed it",
                v.name
            );
        };
        feeds.push((v.name.clone(), t));
    }
    Ok(feeds)
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
        (Some(tok), Some(text), None) => (tokenize(tok, text, args.skip_chars)?, text),
        (None, None, Some(ids)) => (read_ids(ids)?, ids),
        _ => bail!("give --tokenizer and --text, or --ids"),
    };
    let windows: Vec<&[u32]> = ppl::windows(&ids, args.seq, args.windows).collect();
    if windows.is_empty() {
        bail!(
            "{}: {} tokens make no complete window of --seq {}",
            source.display(),
            ids.len(),
            args.seq
        );
    }
    if windows.len() < args.windows {
        let n = windows.len();
        eprintln!(
            "note: {} makes {n} window{} of {} tokens; scoring {n} of the {} asked",
            source.display(),
            if n == 1 { "" } else { "s" },
            args.seq,
            args.windows
        );
    }
    let mut loaded = perqc_onnx::load(&args.model)?;
    // The canonical graph runs exported attention, RMS norm and SiLU chains as one op each.
    perqc_passes::canonicalize(&mut loaded.model)
        .with_context(|| format!("{}: canonicalize", args.model.display()))?;
    let opts = SessionOptions {
        threads: args.threads.unwrap_or(SessionOptions::default().threads),
    };
    perqc_runtime::tune_allocator();
    // The session copies the weights; the mapped file's pages are given back as it goes.
    let session = Session::with_release(&loaded.model, &opts, &|t| loaded.release(t))
        .with_context(|| args.model.display().to_string())?;
    let input = session
        .input_names()
        .find(|n| *n == "input_ids")
        .or_else(|| session.input_names().next())
        .map(str::to_string)
        .context("the model has no inputs")?;
    let extra = extra_feeds(&loaded.model.graph, &input, args.seq)
        .with_context(|| args.model.display().to_string())?;
    drop(loaded);

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
        let x = Array2::from_shape_fn((1, args.seq), |(_, t)| w[t] as i64)
            .into_dyn()
            .into_shared();
        let mut feeds = vec![(input.as_str(), RtTensor::I64(x))];
        feeds.extend(extra.iter().map(|(n, t)| (n.as_str(), t.clone())));
        // Outputs after the logits (present key/values) are ignored.
        let out = session.run(&feeds).with_context(|| place(i))?;
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
        let logits = logits.as_standard_layout();
        nll += ppl::window_nll(logits.as_slice().expect("standard layout"), vocab, w);
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
