//! Calibration: run a causal LM on calibration text under streaming observers and collect
//! the per-channel statistics of chosen values, which PeRQ computes its permutations from.
//!
//! The text is tokenized whole (from its start) and cut into `--calib-seqs` non-overlapping
//! windows of `--calib-len` tokens; each window is run from scratch exactly as `perqc eval`
//! runs one ([`WindowFeeds`]: `input_ids`, and for a KV-cache graph an all-ones
//! `attention_mask`, `position_ids` 0..len and an empty past). A `ChannelObserver` sees every
//! watched value of every run and keeps only running per-channel sums, so memory is the
//! session's plus O(channels) per watched value, whatever the number of tokens.

use crate::corpus::{self, WindowFeeds};
use anyhow::{Context, Result, bail};
use clap::Args;
use perqc_passes::calibration::{Calibration, CalibrationSource};
use perqc_runtime::{ChannelObserver, Session, SessionOptions, StatsOptions};
use std::path::PathBuf;

/// Where the calibration tokens come from and how many to run.
#[derive(Args, Clone, Debug)]
pub struct CalibArgs {
    /// UTF-8 text to calibrate on, tokenized whole with --tokenizer; windows are cut from its
    /// start.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tokenizer",
        conflicts_with = "calib_ids"
    )]
    pub calib_text: Option<PathBuf>,
    /// Hugging Face tokenizer.json for --calib-text.
    #[arg(
        long,
        value_name = "FILE",
        requires = "calib_text",
        conflicts_with = "calib_ids"
    )]
    pub tokenizer: Option<PathBuf>,
    /// Pre-tokenized calibration ids instead of text: a .npy of int64 or int32.
    #[arg(long, value_name = "FILE.npy")]
    pub calib_ids: Option<PathBuf>,
    /// Calibration sequences, at least 1 (fewer if the data is shorter, with a note on stderr).
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub calib_seqs: usize,
    /// Tokens per calibration sequence, at least 1.
    #[arg(long, value_name = "L", default_value_t = 512)]
    pub calib_len: usize,
    /// Threads for the calibration runs, at least 1 (default: all cores).
    #[arg(long, value_name = "N")]
    pub calib_threads: Option<usize>,
    /// Run the already-quantized linears on the float kernels (DequantizeLinear, MatMul:
    /// what ONNX Runtime runs) during layer-by-layer calibration, instead of the integer
    /// kernels `perqc eval` runs them on.
    #[arg(long)]
    pub calib_float: bool,
}

impl CalibArgs {
    /// Whether calibration data was given (--calib-text or --calib-ids).
    pub fn given(&self) -> bool {
        self.calib_text.is_some() || self.calib_ids.is_some()
    }
}

/// The calibration windows `args` describe, with the file they came from.
pub struct Windows {
    pub windows: Vec<Vec<u32>>,
    pub source: PathBuf,
    pub description: String,
}

impl Windows {
    /// `n` of the windows spread evenly over them (window `⌊i · len / n⌋` for `i < n`), or
    /// all of them if there are no more than `n`; the description says which.
    pub fn spread(self, n: usize) -> Windows {
        let len = self.windows.len();
        if n == 0 || n >= len {
            return self;
        }
        let keep: Vec<usize> = (0..n).map(|i| i * len / n).collect();
        let windows = (self.windows.into_iter().enumerate())
            .filter(|(k, _)| keep.contains(k))
            .map(|(_, w)| w)
            .collect();
        Windows {
            windows,
            source: self.source,
            description: format!("{} ({n} of {len} windows, spread)", self.description),
        }
    }
}

/// Tokenizes (or reads) the calibration data and cuts `--calib-seqs` windows of
/// `--calib-len` tokens from its start. Errors: bad arguments, unreadable or short data
/// (naming the file).
pub fn windows(args: &CalibArgs) -> Result<Windows> {
    check_args(args)?;
    let (ids, source, description) = match (&args.tokenizer, &args.calib_text, &args.calib_ids) {
        (Some(tok), Some(text), None) => (
            corpus::tokenize_prefix(tok, text, args.calib_seqs.saturating_mul(args.calib_len))?,
            text,
            format!("{} (tokenizer {})", text.display(), tok.display()),
        ),
        (None, None, Some(ids)) => (corpus::read_ids(ids)?, ids, ids.display().to_string()),
        _ => bail!("calibration needs --calib-text with --tokenizer, or --calib-ids"),
    };
    let windows = corpus::take_windows(
        &ids,
        args.calib_len,
        args.calib_seqs,
        source,
        "--calib-len",
        "calibrating on",
    )?;
    Ok(Windows {
        windows: windows.iter().map(|w| w.to_vec()).collect(),
        source: source.clone(),
        description,
    })
}

/// The argument checks every calibration makes first.
fn check_args(args: &CalibArgs) -> Result<()> {
    if args.calib_seqs == 0 {
        bail!("--calib-seqs must be at least 1");
    }
    if args.calib_len == 0 {
        bail!("--calib-len must be at least 1");
    }
    if args.calib_threads == Some(0) {
        bail!("--calib-threads must be at least 1 (leave it out to use all cores)");
    }
    Ok(())
}

/// Runs `model` (already canonicalized: watch the names of the graph the session plans) on
/// `data` (windows cut by [`windows`] from what `args` names, all of them or a
/// [`Windows::spread`]) and returns the [`perqc_runtime::ChannelStats`] of each value in
/// `watch`, collected with its options (the first entry of a repeated name wins). A value's
/// last axis is the channel axis; every other axis counts as rows, so a `[1, len, C]` value
/// adds `len` rows per window.
///
/// The result has one entry per distinct watched name, in watch order, each over
/// `sequences · len` rows; its source names the data, the sequences and the tokens run.
/// Errors: bad arguments, a watched value the graph does not have or that no run produced
/// (naming it), any runtime error (naming the window and the file). `release` is called on
/// each initializer once the session has its copy (to give back mapped pages, as `perqc
/// eval` does).
pub fn calibrate_windows(
    model: &perqc_ir::Model,
    watch: &[(String, StatsOptions)],
    data: &Windows,
    args: &CalibArgs,
    release: &dyn Fn(&perqc_ir::Tensor),
) -> Result<Calibration> {
    check_args(args)?;
    let mut names: Vec<String> = Vec::with_capacity(watch.len());
    let mut options: Vec<(String, StatsOptions)> = Vec::with_capacity(watch.len());
    for (n, o) in watch {
        if !names.contains(n) {
            names.push(n.clone());
            options.push((n.clone(), o.clone()));
        }
    }
    if names.is_empty() {
        bail!("calibration: no values to watch");
    }
    let (windows, source, description) = (&data.windows, &data.source, &data.description);
    let session_opts = SessionOptions {
        threads: args
            .calib_threads
            .unwrap_or(SessionOptions::default().threads),
    };
    // Only what computes the watched values runs: no LM head, no logits.
    let pruned = watched_part(model, &names).context("calibration: pruning the model")?;
    let model = pruned.as_ref().unwrap_or(model);
    let session = Session::with_release(model, &session_opts, release)
        .context("calibration: planning the model")?;
    let feeds = WindowFeeds::new(&session, &model.graph, args.calib_len)
        .context("calibration: feeding the model")?;
    let mut observer = ChannelObserver::with_options(options);
    for (i, w) in windows.iter().enumerate() {
        // The outputs (logits, present key/values) are dropped at once; only the observer's
        // running sums outlive the run.
        session
            .run_observed(&feeds.feeds(w), &mut observer)
            .with_context(|| {
                format!(
                    "calibration window {} of {} from {}",
                    i + 1,
                    windows.len(),
                    source.display()
                )
            })?;
    }

    let mut calib = Calibration::new(CalibrationSource {
        description: description.clone(),
        sequences: windows.len(),
        tokens: (windows.len() * args.calib_len) as u64,
    });
    let mut missing = Vec::new();
    for (name, stats) in observer.into_stats() {
        match stats {
            Some(s) => {
                calib.insert(name, s);
            }
            None => missing.push(format!("`{name}`")),
        }
    }
    if !missing.is_empty() {
        bail!(
            "calibration: no run produced {} (watched values must be computed by the graph \
             the session plans)",
            missing.join(", ")
        );
    }
    Ok(calib)
}

/// `model` cut down to the nodes the watched values depend on, with as outputs the watched
/// values no other watched value is computed from (in a decoder, the last layer's): the
/// observer sees every watched value as before, and what follows them (the final norm, the
/// LM head and its `[1, len, vocab]` logits) is neither run nor given weights. `None` when
/// a name is not a value of the graph (the run then reports it) or nothing would be cut.
fn watched_part(model: &perqc_ir::Model, names: &[String]) -> Result<Option<perqc_ir::Model>> {
    use perqc_ir::{ValueDef, ValueId};
    let g = &model.graph;
    let Some(watched) = names
        .iter()
        .map(|n| g.find(n))
        .collect::<Option<Vec<ValueId>>>()
    else {
        return Ok(None);
    };
    // inner[i]: another watched value is computed from watched value i.
    let mut outputs = Vec::new();
    let mut inner = vec![false; watched.len()];
    for &w in &watched {
        let mut seen = std::collections::HashSet::from([w]);
        let mut stack = vec![w];
        while let Some(v) = stack.pop() {
            let ValueDef::Node { node, .. } = g.value(v).def() else {
                continue;
            };
            let n = g.node(node);
            for u in n.inputs().iter().flatten().chain(n.captures()) {
                if seen.insert(*u) {
                    if let Some(i) = watched.iter().position(|x| x == u) {
                        inner[i] = true;
                    }
                    stack.push(*u);
                }
            }
        }
    }
    for (i, &w) in watched.iter().enumerate() {
        if !inner[i] && !outputs.contains(&w) {
            outputs.push(w);
        }
    }
    if outputs == g.outputs {
        return Ok(None);
    }
    let mut pruned = model.clone();
    pruned.graph.outputs = outputs;
    perqc_ir::Pass::run(
        &mut perqc_passes::Dce::default(),
        &mut pruned,
        &mut perqc_ir::PassContext::new(None),
    )?;
    Ok(Some(pruned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use perqc_passes::permutation::{PermuteMethod, inverse, permutation};
    use std::path::Path;

    /// [`calibrate_windows`] on all the windows, `opts` for every watched value.
    fn calibrate(
        model: &perqc_ir::Model,
        watch: &[String],
        args: &CalibArgs,
        opts: StatsOptions,
    ) -> Result<Calibration> {
        let watch: Vec<(String, StatsOptions)> =
            watch.iter().map(|n| (n.clone(), opts.clone())).collect();
        calibrate_windows(model, &watch, &windows(args)?, args, &|_| {})
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        calib: CalibArgs,
    }

    fn parse(args: &[&str]) -> Result<CalibArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("perqc").chain(args.iter().copied())).map(|c| c.calib)
    }

    fn fixture(name: &str) -> String {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures")
            .join(name)
            .to_string_lossy()
            .into_owned()
    }

    /// llama_ts, canonicalized.
    fn llama() -> perqc_ir::Model {
        let mut model = perqc_onnx::load(Path::new(&fixture("llama_ts.onnx")))
            .unwrap()
            .model;
        perqc_passes::canonicalize(&mut model).unwrap();
        model
    }

    /// The inputs of the canonical `ai.perqc::Linear` nodes whose name contains `down_proj`.
    fn down_proj_inputs(model: &perqc_ir::Model) -> Vec<String> {
        let g = &model.graph;
        g.nodes()
            .filter(|(_, n)| {
                n.domain == perqc_ir::PERQC_DOMAIN
                    && n.op_type == "Linear"
                    && n.name.contains("down_proj")
            })
            .map(|(_, n)| g.value(n.input(0).unwrap()).name.clone())
            .collect()
    }

    fn text_args(seqs: &str, len: &str) -> CalibArgs {
        parse(&[
            "--calib-text",
            &fixture("tiny_text.txt"),
            "--tokenizer",
            &fixture("tiny_tokenizer.json"),
            "--calib-seqs",
            seqs,
            "--calib-len",
            len,
            "--calib-threads",
            "1",
        ])
        .unwrap()
    }

    /// Tokenizing a prefix gives the whole text's first ids, for counts below and at the
    /// prefix boundaries (the fixture text is a few thousand tokens).
    #[test]
    fn prefix_tokenization_matches_the_whole_text() {
        let tok = fixture("tiny_tokenizer.json");
        let text = fixture("tiny_text.txt");
        let whole = crate::corpus::tokenize(Path::new(&tok), Path::new(&text), 0).unwrap();
        for need in [1, 7, 100, 511, 512, 600, whole.len() - 2, whole.len() + 50] {
            let got =
                crate::corpus::tokenize_prefix(Path::new(&tok), Path::new(&text), need).unwrap();
            let want = &whole[..need.min(whole.len())];
            assert_eq!(&got[..want.len()], want, "need {need}");
            assert!(got.len() >= want.len(), "need {need}");
        }
    }

    #[test]
    fn calibrates_down_proj_inputs_of_llama() {
        let model = llama();
        let watch = down_proj_inputs(&model);
        assert_eq!(watch.len(), 2, "one down_proj per layer: {watch:?}");
        let calib = calibrate(
            &model,
            &watch,
            &text_args("2", "16"),
            StatsOptions::default(),
        )
        .unwrap();
        assert_eq!(calib.len(), watch.len());
        assert_eq!(calib.source().sequences, 2);
        assert_eq!(calib.source().tokens, 32);
        assert!(
            calib.source().description.contains("tiny_text.txt"),
            "{}",
            calib.source()
        );
        for (name, want) in calib.iter().map(|(n, _)| n).zip(&watch) {
            assert_eq!(name, want, "watch order");
        }
        for (name, s) in calib.iter() {
            assert_eq!(s.rows(), 2 * 16, "{name}");
            assert!(s.mean_abs().iter().any(|&m| m > 0.0), "{name}");
            let perm = permutation(PermuteMethod::MassDiff, s, 64).unwrap();
            assert_eq!(perm.len(), s.channels(), "{name}");
            inverse(&perm).unwrap();
        }
    }

    /// The run stops at the last down projection (no LM head, one output) and gives the
    /// statistics the whole graph gives, bit for bit; unknown names cut nothing.
    #[test]
    fn the_pruned_run_gives_the_whole_models_statistics() {
        let model = llama();
        let watch = down_proj_inputs(&model);
        let pruned = watched_part(&model, &watch)
            .unwrap()
            .expect("the LM head is cut");
        assert!(pruned.graph.node_order().len() < model.graph.node_order().len());
        let outputs: Vec<&str> = pruned
            .graph
            .outputs
            .iter()
            .map(|&v| pruned.graph.value(v).name.as_str())
            .collect();
        assert_eq!(outputs, [watch[1].as_str()], "the last layer's only");
        assert!(
            !pruned
                .graph
                .nodes()
                .any(|(_, n)| n.name.contains("lm_head"))
        );
        let args = text_args("2", "16");
        let calib = calibrate(&model, &watch, &args, StatsOptions::default()).unwrap();
        let data = windows(&args).unwrap();
        let s = Session::with_options(&model, &SessionOptions { threads: 1 }).unwrap();
        let feeds = WindowFeeds::new(&s, &model.graph, 16).unwrap();
        let mut whole = perqc_runtime::ChannelObserver::new(watch.clone(), StatsOptions::default());
        for w in &data.windows {
            s.run_observed(&feeds.feeds(w), &mut whole).unwrap();
        }
        for ((name, a), (other, b)) in calib.iter().zip(whole.into_stats()) {
            let b = b.unwrap();
            assert_eq!(name, &other);
            assert_eq!(a.rows(), b.rows());
            assert_eq!(a.sum_abs(), b.sum_abs(), "{name}");
            assert_eq!(a.sum_sq(), b.sum_sq(), "{name}");
            assert_eq!(a.max_abs(), b.max_abs(), "{name}");
        }
        assert!(
            watched_part(&model, &["no_such_value".into()])
                .unwrap()
                .is_none()
        );
    }

    /// The CAT stage's calibration one region per stage gives the one-session statistics
    /// bit for bit: sums, maxima, sampled rows and block moments.
    #[test]
    fn staged_pieces_give_the_whole_runs_statistics() {
        let model = llama();
        let watch = down_proj_inputs(&model);
        let args = text_args("2", "16");
        let opts = StatsOptions {
            block_moments: Some(16),
            sample_every: 3,
            ..StatsOptions::default()
        };
        let whole = calibrate(&model, &watch, &args, opts.clone()).unwrap();
        let each: Vec<(String, StatsOptions)> =
            watch.iter().map(|n| (n.clone(), opts.clone())).collect();
        let pieces = crate::staged::Staged::new(&model, &args)
            .unwrap()
            .calibrate_in_pieces(&model, &each, 1, &|_| {})
            .unwrap();
        assert_eq!(pieces.len(), whole.len());
        for ((name, a), (other, b)) in whole.iter().zip(pieces.iter()) {
            assert_eq!(name, other);
            assert_eq!(a.sum_abs(), b.sum_abs(), "{name}");
            assert_eq!(a.sum_sq(), b.sum_sq(), "{name}");
            assert_eq!(a.max_abs(), b.max_abs(), "{name}");
            assert_eq!(a.samples(), b.samples(), "{name}");
            for k in 0..a.channels() / 16 {
                assert_eq!(a.block_moment(k), b.block_moment(k), "{name} block {k}");
            }
        }
    }

    #[test]
    fn ids_file_gives_the_same_statistics_as_its_text() {
        let model = llama();
        let watch = down_proj_inputs(&model);
        let from_text = calibrate(
            &model,
            &watch,
            &text_args("2", "16"),
            StatsOptions::default(),
        )
        .unwrap();
        let ids = corpus::tokenize(
            Path::new(&fixture("tiny_tokenizer.json")),
            Path::new(&fixture("tiny_text.txt")),
            0,
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!("perqc-calib-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ids.npy");
        let t = ndarray::Array1::from_iter(ids.iter().map(|&i| i as i64));
        perqc_runtime::write_npy(
            &path,
            &perqc_runtime::RtTensor::I64(t.into_dyn().into_shared()),
        )
        .unwrap();
        let args = parse(&[
            "--calib-ids",
            path.to_str().unwrap(),
            "--calib-seqs",
            "2",
            "--calib-len",
            "16",
        ])
        .unwrap();
        let from_ids = calibrate(&model, &watch, &args, StatsOptions::default()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(from_ids.source().description, path.display().to_string());
        for ((_, a), (_, b)) in from_text.iter().zip(from_ids.iter()) {
            assert_eq!(a.sum_abs(), b.sum_abs());
            assert_eq!(a.max_abs(), b.max_abs());
        }
    }

    #[test]
    fn short_data_gives_fewer_sequences() {
        let model = llama();
        let watch = down_proj_inputs(&model);
        let ids = corpus::tokenize(
            Path::new(&fixture("tiny_tokenizer.json")),
            Path::new(&fixture("tiny_text.txt")),
            0,
        )
        .unwrap();
        let len = ids.len() / 3;
        let calib = calibrate(
            &model,
            &watch,
            &text_args("10", &len.to_string()),
            StatsOptions::default(),
        )
        .unwrap();
        assert_eq!(calib.source().sequences, 3);
        assert_eq!(calib.iter().next().unwrap().1.rows(), 3 * len as u64);
    }

    #[test]
    fn flags() {
        let a = parse(&[]).unwrap();
        assert_eq!((a.calib_seqs, a.calib_len), (16, 512));
        assert!(!a.given() && a.calib_threads.is_none());
        let t = fixture("tiny_text.txt");
        let k = fixture("tiny_tokenizer.json");
        assert!(
            parse(&["--calib-text", &t, "--tokenizer", &k])
                .unwrap()
                .given()
        );
        assert!(parse(&["--calib-ids", "ids.npy"]).unwrap().given());
        for bad in [
            &["--calib-text", &t][..],
            &["--tokenizer", &k],
            &["--tokenizer", &k, "--calib-ids", "ids.npy"],
            &[
                "--calib-text",
                &t,
                "--tokenizer",
                &k,
                "--calib-ids",
                "ids.npy",
            ],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn spread_keeps_evenly_spaced_windows() {
        let all = |len: u32| Windows {
            windows: (0..len).map(|i| vec![i]).collect(),
            source: PathBuf::from("t.txt"),
            description: "t.txt".into(),
        };
        let firsts = |w: Windows| w.windows.iter().map(|w| w[0]).collect::<Vec<_>>();
        assert_eq!(firsts(all(16).spread(4)), [0, 4, 8, 12]);
        assert_eq!(firsts(all(16).spread(3)), [0, 5, 10]);
        assert_eq!(firsts(all(5).spread(2)), [0, 2]);
        assert_eq!(firsts(all(4).spread(4)), [0, 1, 2, 3]);
        assert_eq!(firsts(all(4).spread(9)), [0, 1, 2, 3]);
        assert_eq!(firsts(all(4).spread(0)), [0, 1, 2, 3]);
        assert_eq!(
            all(16).spread(4).description,
            "t.txt (4 of 16 windows, spread)"
        );
        assert_eq!(all(16).spread(16).description, "t.txt");
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let model = llama();
        let watch = down_proj_inputs(&model);
        let err = |watch: &[String], args: &CalibArgs| {
            let e = calibrate(&model, watch, args, StatsOptions::default()).unwrap_err();
            e.chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ")
        };
        let long = err(&watch, &text_args("2", "100000"));
        assert!(
            long.ends_with("tokens make no complete window of --calib-len 100000")
                && long.contains("tiny_text.txt"),
            "{long}"
        );
        assert_eq!(
            err(&watch, &text_args("0", "16")),
            "--calib-seqs must be at least 1"
        );
        assert_eq!(
            err(&watch, &text_args("2", "0")),
            "--calib-len must be at least 1"
        );
        assert_eq!(
            err(&["no_such_value".to_string()], &text_args("2", "16")),
            "calibration window 1 of 2 from {}: no value `no_such_value` to observe"
                .replace("{}", &fixture("tiny_text.txt"))
        );
        assert_eq!(
            err(&[], &text_args("2", "16")),
            "calibration: no values to watch"
        );
        assert_eq!(
            err(&watch, &parse(&[]).unwrap()),
            "calibration needs --calib-text with --tokenizer, or --calib-ids"
        );
        let bad_block = StatsOptions {
            block_moments: Some(7),
            ..Default::default()
        };
        let e = calibrate(&model, &watch, &text_args("1", "16"), bad_block).unwrap_err();
        let msg = e
            .chain()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(": ");
        assert!(
            msg.contains(&watch[0]) && msg.contains("block size 7 does not divide 192 channels"),
            "{msg}"
        );
    }
}
