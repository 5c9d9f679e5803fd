//! `perqc MODEL -o OUT --no-quantize`: the recipe's exact part from the command line, with
//! calibration, `--verify`, the fallback without calibration data, and its errors.

mod common;

use common::{fixture, scratch};
use std::process::Command;

fn perqc(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_perqc"))
        .args(args)
        .output()
        .expect("runs");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn s(p: &std::path::Path) -> String {
    p.display().to_string()
}

#[test]
fn calibrated_recipe_verifies_and_writes_a_model() {
    let dir = scratch("recipe", "calibrated");
    let out = dir.join("m.onnx");
    let (ok, err) = perqc(&[
        &s(&fixture("llama_dynamo.onnx")),
        "-o",
        &s(&out),
        "--no-quantize",
        "--calib-text",
        &s(&fixture("tiny_text.txt")),
        "--tokenizer",
        &s(&fixture("tiny_tokenizer.json")),
        "--calib-seqs",
        "3",
        "--calib-len",
        "64",
        "--verify",
    ]);
    assert!(ok, "{err}");
    for want in [
        "permute(method=massdiff,block=32)",
        "regions-permuted=2",
        "norms-folded=5",
        "residual-rotated=1 heads-rotated=2",
        "nodes-inserted=2",
        "calibrated on",
        "3 sequences, 192 tokens",
        "note: --verify: outputs match the original within",
    ] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
    // The output is a loadable model whose online rotations are standard ops again.
    let m = perqc_onnx::load(&out).expect("loads").model;
    assert!(m.graph.nodes().all(|(_, n)| n.domain != "ai.perqc"));
}

#[test]
fn without_calibration_the_permutation_is_skipped_with_a_note() {
    let dir = scratch("recipe", "uncalibrated");
    let out = dir.join("m.onnx");
    let (ok, err) = perqc(&[
        &s(&fixture("llama_ts.onnx")),
        "-o",
        &s(&out),
        "--no-quantize",
        "--rotation",
        "block",
        "--block-size",
        "16",
        "--verify",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("the massdiff permutation is skipped"), "{err}");
    assert!(err.contains("rotate(residual=block,block=16)"), "{err}");
    assert!(err.contains("--verify: outputs match"), "{err}");
    let (ok, err) = perqc(&[
        &s(&fixture("llama_ts.onnx")),
        "-o",
        &s(&out),
        "--no-quantize",
        "--permute",
        "random",
    ]);
    assert!(ok && err.contains("permute(method=random"), "{err}");
}

#[test]
fn recipe_errors_say_what_to_change() {
    let dir = scratch("recipe", "errors");
    let out = dir.join("m.onnx");
    let m = s(&fixture("llama_ts.onnx"));
    let (ok, err) = perqc(&[&m, "-o", &s(&out), "--no-quantize", "--block-size", "40"]);
    assert!(
        !ok && err.contains("does not divide 192") && err.contains("48"),
        "{err}"
    );
    assert!(!out.exists(), "no output on failure");
    let (ok, err) = perqc(&[&m, "-o", &s(&out), "--no-quantize", "--passes", "dce"]);
    assert!(!ok && err.contains("give one"), "{err}");
    let (ok, err) = perqc(&[&m, "-o", &s(&out), "--verify"]);
    assert!(!ok && err.contains("add --no-quantize"), "{err}");
    let (ok, err) = perqc(&[&m, "-o", &s(&out), "--no-quantize", "--permute", "best"]);
    assert!(!ok && err.contains("massdiff"), "{err}");
}
