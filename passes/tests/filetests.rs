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
//! `PERQC_BLESS=1 cargo test -p perqc-passes --test filetests` rewrites the expected
//! sections from the actual output (review the diff before committing).

use ndarray::{ArrayD, IxDyn};
use perqc_ir::{DType, Model, PassManager, RunOptions, parse_model, print_model, verify};
use perqc_runtime::{RtTensor, Session, SessionOptions};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const EXPECT: &str = "# expect:";

struct Case {
    pipeline: String,
    numeric: bool,
    /// Lines before the input (directives and comments), verbatim.
    header: String,
    input: String,
    /// `None`: unchanged.
    expected: Option<String>,
}

fn parse_case(path: &Path, text: &str) -> Case {
    let (head, expected) = text
        .split_once(EXPECT)
        .unwrap_or_else(|| panic!("{}: no `{EXPECT}` line", path.display()));
    let expected = expected.trim_start_matches([' ', '\t']);
    let expected = match expected.strip_prefix("unchanged") {
        Some(_) => None,
        None => Some(expected.trim_start_matches('\n').to_string()),
    };
    let mut header = String::new();
    let mut input = String::new();
    let (mut pipeline, mut numeric) = (None, true);
    for line in head.lines() {
        if input.is_empty() && line.starts_with('#') {
            if let Some(p) = line.strip_prefix("# pipeline:") {
                pipeline = Some(p.trim().to_string());
            }
            if line.starts_with("# numeric: off") {
                numeric = false;
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
        header,
        input,
        expected,
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
    PassManager::new()
        .run(
            &mut after,
            &mut pipeline,
            &mut RunOptions {
                verify_each: true,
                ..Default::default()
            },
        )
        .map_err(|e| e.to_string())?;
    let got = print_model(&after);
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
    let want = case
        .expected
        .clone()
        .unwrap_or_else(|| print_model(&before));
    if std::env::var_os("PERQC_BLESS").is_some() {
        let section = if got == print_model(&before) {
            " unchanged\n".to_string()
        } else {
            format!("\n{got}")
        };
        let mut out = case.header.clone();
        out.push_str(&case.input);
        let _ = write!(out, "{EXPECT}{section}");
        return Ok((out != text).then_some(out));
    }
    if got != want {
        return Err(format!(
            "output differs:\n--- expected\n{want}--- got\n{got}"
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
