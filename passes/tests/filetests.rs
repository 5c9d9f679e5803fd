//! File tests: each `tests/cases/**/*.ir` names a pipeline, an input model in the textual
//! IR and the IR expected after the pipeline, so a rewrite reads as a diff:
//!
//! ```text
//! # pipeline: fuse-silu
//! # (any other `#` line is a comment saying what the case shows)
//! model ir=10 opsets=[ai.onnx:18]
//! graph main(%x: f32[2, 8]) -> (%y) { ... }
//! # expect:
//! model ... (the printed IR after the pipeline)
//! ```
//!
//! The runner parses the input, verifies it, runs the pipeline through the pass manager
//! with a verifier after every pass, and compares the printed result with the expected
//! text. When every graph input has a static shape, it also runs the input and the result
//! natively on seeded inputs and requires equal outputs (max |a - b| <= 1e-5 max |a|; `#
//! numeric: off` skips this for cases whose input cannot run). A case whose expected
//! section is `# expect: unchanged` must print as its input does.
//!
//! The notes passes leave in the report (`ctx.note`: why a region was not rotated, a norm
//! not folded) are part of the expected section: one `# note: <pass>: <text>` line each,
//! in order, right after the `# expect:` line (before the IR, or after `unchanged`). A case
//! without such lines expects no notes.
//!
//! Two directives, for the channel-transform cases (`cases/transforms/`):
//! - `# inline: N` prints tensors of at most `N` elements with their values (the printer's
//!   default is 8; larger ones print as a byte count and hash), so a weight rewrite shows
//!   the rewritten numbers. Write the input's tensors out in full.
//! - `# calibrate` runs the input natively on the runner's seeded inputs (the ones the
//!   numeric check uses; every graph input must have a static shape) with a
//!   `perqc_runtime::ChannelObserver` on what the sinks of every mlp, residual and
//!   attention_vo region read (`perqc_passes::permute::calibration_values`), and provides
//!   the statistics to the pass manager as a `perqc_passes::calibration::Calibration`,
//!   what `permute(method=massdiff|zigzag|absmax)` needs.
//!
//! `PERQC_BLESS=1 cargo test -p perqc-passes --test filetests` rewrites the expected
//! sections from the actual output (review the diff before committing).

use ndarray::{ArrayD, IxDyn};
use perqc_ir::{
    DType, Model, PassManager, PrintOptions, Report, RunOptions, parse_model, print_model_with,
    verify,
};
use perqc_passes::calibration::{Calibration, CalibrationSource};
use perqc_passes::regions::{RegionKind, Regions};
use perqc_runtime::{ChannelObserver, RtTensor, Session, SessionOptions, StatsOptions};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const EXPECT: &str = "# expect:";
const NOTE: &str = "# note: ";

struct Case {
    pipeline: String,
    numeric: bool,
    calibrate: bool,
    print: PrintOptions,
    /// Lines before the input (directives and comments), verbatim.
    header: String,
    input: String,
    /// `None`: unchanged.
    expected: Option<String>,
    /// `<pass>: <note>`, in report order.
    notes: Vec<String>,
}

fn parse_case(path: &Path, text: &str) -> Case {
    let (head, expected) = text
        .split_once(EXPECT)
        .unwrap_or_else(|| panic!("{}: no `{EXPECT}` line", path.display()));
    let (first, mut rest) = expected.split_once('\n').unwrap_or((expected, ""));
    let unchanged = match first.trim() {
        "unchanged" => true,
        "" => false,
        other => panic!("{}: `{EXPECT} {other}`", path.display()),
    };
    let mut notes = Vec::new();
    while let Some(line) = rest.strip_prefix(NOTE) {
        let (note, r) = line.split_once('\n').unwrap_or((line, ""));
        notes.push(note.to_string());
        rest = r;
    }
    let expected = (!unchanged).then(|| rest.to_string());
    let mut header = String::new();
    let mut input = String::new();
    let (mut pipeline, mut numeric, mut calibrate) = (None, true, false);
    let mut print = PrintOptions::default();
    for line in head.lines() {
        if input.is_empty() && line.starts_with('#') {
            if let Some(p) = line.strip_prefix("# pipeline:") {
                pipeline = Some(p.trim().to_string());
            }
            if line.starts_with("# numeric: off") {
                numeric = false;
            }
            if line.trim_end() == "# calibrate" {
                calibrate = true;
            }
            if let Some(n) = line.strip_prefix("# inline:") {
                print.small_tensor = n
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{}: `{line}`", path.display()));
            }
            header.push_str(line);
            header.push('\n');
        } else {
            input.push_str(line);
            input.push('\n');
        }
    }
    Case {
        pipeline: pipeline.unwrap_or_else(|| panic!("{}: no `# pipeline:` line", path.display())),
        numeric,
        calibrate,
        print,
        header,
        input,
        expected,
        notes,
    }
}

/// Deterministic inputs for every graph input with a static shape; `None` if one has none.
fn feeds(m: &Model) -> Option<Vec<(String, RtTensor)>> {
    let g = &m.graph;
    let mut out = Vec::new();
    for (k, &v) in g.inputs.iter().enumerate() {
        let val = g.value(v);
        let ty = val.ty.as_ref()?;
        let dims: Vec<usize> = ty
            .shape()?
            .iter()
            .map(|d| d.known().and_then(|n| usize::try_from(n).ok()))
            .collect::<Option<_>>()?;
        let n: usize = dims.iter().product();
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (k as u64 + 1);
        let mut next = move || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            x >> 40
        };
        let t = match ty.elem()? {
            DType::F32 => RtTensor::f32(
                ArrayD::from_shape_vec(
                    IxDyn(&dims),
                    (0..n)
                        .map(|_| next() as f32 / (1u64 << 23) as f32 - 1.0)
                        .collect(),
                )
                .ok()?,
            ),
            DType::I64 => RtTensor::i64(
                ArrayD::from_shape_vec(IxDyn(&dims), (0..n).map(|_| (next() % 8) as i64).collect())
                    .ok()?,
            ),
            DType::Bool => RtTensor::bool(
                ArrayD::from_shape_vec(IxDyn(&dims), (0..n).map(|_| next() % 4 != 0).collect())
                    .ok()?,
            ),
            _ => return None,
        };
        out.push((val.name.clone(), t));
    }
    Some(out)
}

/// Statistics of what the sinks of every mlp, residual and attention_vo region read, on
/// `feeds` (`# calibrate`).
fn calibrate(m: &Model, feeds: &[(String, RtTensor)]) -> Result<Calibration, String> {
    let shapes = perqc_ops::infer_model(m).map_err(|e| e.to_string())?;
    let regions = Regions::find(m, &shapes);
    let kinds = [
        RegionKind::Mlp,
        RegionKind::Residual,
        RegionKind::AttentionVo,
    ];
    let watch = perqc_passes::permute::calibration_values(&regions, &kinds);
    let mut obs = ChannelObserver::new(watch, StatsOptions::default());
    let s = Session::with_options(m, &SessionOptions { threads: 1 }).map_err(|e| e.to_string())?;
    let refs: Vec<(&str, RtTensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    s.run_observed(&refs, &mut obs).map_err(|e| e.to_string())?;
    let mut c = Calibration::new(CalibrationSource {
        description: "the file test's seeded inputs".into(),
        ..Default::default()
    });
    for (name, stats) in obs.into_stats() {
        c.insert(&name, stats.ok_or(format!("`{name}` was not observed"))?);
    }
    Ok(c)
}

/// `<pass>: <note>` for every note in the report, in order.
fn notes(report: &Report) -> Vec<String> {
    report
        .passes
        .iter()
        .flat_map(|p| p.notes.iter().map(move |n| format!("{}: {n}", p.name)))
        .collect()
}

fn run_native(m: &Model, feeds: &[(String, RtTensor)]) -> Result<Vec<(String, RtTensor)>, String> {
    let s = Session::with_options(m, &SessionOptions { threads: 1 }).map_err(|e| e.to_string())?;
    let refs: Vec<(&str, RtTensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    s.run(&refs).map_err(|e| e.to_string())
}

/// Checks one case; returns the actual expected section when blessing.
fn check(path: &Path) -> Result<Option<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let case = parse_case(path, &text);
    let before = parse_model(&case.input).map_err(|e| format!("input: {e}"))?;
    verify(&before).map_err(|e| format!("input does not verify: {e}"))?;
    let mut after = before.clone();
    let mut pipeline = perqc_passes::registry()
        .build(&case.pipeline)
        .map_err(|e| e.to_string())?;
    let mut pm = PassManager::new();
    if case.calibrate {
        let inputs = feeds(&before).ok_or("`# calibrate` needs static input shapes")?;
        pm.provide(calibrate(&before, &inputs).map_err(|e| format!("calibration: {e}"))?);
    }
    let report = pm
        .run(
            &mut after,
            &mut pipeline,
            &mut RunOptions {
                verify_each: true,
                ..Default::default()
            },
        )
        .map_err(|e| e.to_string())?;
    let print = |m: &Model| print_model_with(m, &case.print);
    let got = print(&after);
    let got_notes = notes(&report);
    if case.numeric
        && let Some(inputs) = feeds(&before)
    {
        let a = run_native(&before, &inputs).map_err(|e| format!("input runs: {e}"))?;
        let b = run_native(&after, &inputs).map_err(|e| format!("output runs: {e}"))?;
        for ((name, x), (_, y)) in a.iter().zip(&b) {
            let (Some(x), Some(y)) = (x.as_f32(), y.as_f32()) else {
                if x != y {
                    return Err(format!("output `{name}` differs"));
                }
                continue;
            };
            let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = x.iter().zip(y.iter()).fold(0f32, |m, (p, q)| {
                if p.is_nan() && q.is_nan() {
                    m
                } else {
                    m.max((p - q).abs())
                }
            });
            if err.is_nan() || err > 1e-5 * scale.max(f32::MIN_POSITIVE) {
                return Err(format!(
                    "output `{name}`: max |diff| {err} (max |x| {scale})"
                ));
            }
        }
    }
    let want = case.expected.clone().unwrap_or_else(|| print(&before));
    if std::env::var_os("PERQC_BLESS").is_some() {
        let unchanged = got == print(&before);
        let mut out = case.header.clone();
        out.push_str(&case.input);
        let _ = writeln!(out, "{EXPECT}{}", if unchanged { " unchanged" } else { "" });
        for n in &got_notes {
            let _ = writeln!(out, "{NOTE}{n}");
        }
        if !unchanged {
            out.push_str(&got);
        }
        return Ok((out != text).then_some(out));
    }
    if got != want {
        return Err(format!(
            "output differs:\n--- expected\n{want}--- got\n{got}"
        ));
    }
    if got_notes != case.notes {
        return Err(format!(
            "notes differ:\n--- expected\n{}\n--- got\n{}",
            case.notes.join("\n"),
            got_notes.join("\n")
        ));
    }
    Ok(None)
}

fn cases(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            cases(&p, out);
        } else if p.extension().is_some_and(|e| e == "ir") {
            out.push(p);
        }
    }
}

#[test]
fn filetests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases");
    let mut all = Vec::new();
    cases(&root, &mut all);
    assert!(!all.is_empty(), "no cases under {}", root.display());
    let mut failures = Vec::new();
    for path in &all {
        match check(path) {
            Ok(Some(blessed)) => std::fs::write(path, blessed).expect("blessing"),
            Ok(None) => {}
            Err(e) => failures.push(format!("{}: {e}", path.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} file tests failed:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n\n")
    );
}
