//! `perqc inspect --sqnr`: the per-layer SQNR table through the recipe's stages, checked
//! against what the transforms must and must not change.

mod common;

use common::{fixture, scratch};
use serde_json::Value;
use std::process::Command;

fn perqc(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_perqc"))
        .args(args)
        .output()
        .expect("runs");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn calib() -> Vec<String> {
    [
        "--calib-text",
        fixture("tiny_text.txt").to_str().unwrap(),
        "--tokenizer",
        fixture("tiny_tokenizer.json").to_str().unwrap(),
        "--calib-seqs",
        "4",
        "--calib-len",
        "48",
    ]
    .map(String::from)
    .to_vec()
}

/// One metric of every linear at `stage`.
fn at(json: &Value, stage: usize, metric: &str) -> Vec<f64> {
    json["linears"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["stages"][stage][metric].as_f64().expect(metric))
        .collect()
}

/// On both Llama exports: the default recipe's stages in order; every layer at every stage;
/// with every calibration row sampled, the measured alignment never exceeds the bound
/// from the Gram; a permutation changes no SQNR; the residual rotation changes no
/// alignment (it is orthogonal) but raises the concentration of the attention inputs; the
/// online Hadamard raises the down_proj's SQNR; `--report` writes what `--json` prints.
#[test]
fn stages_change_what_their_transforms_change() {
    for model in ["llama_ts.onnx", "llama_dynamo.onnx"] {
        let dir = scratch("sqnr", model);
        let report = dir.join("sqnr.json");
        let mut args = vec![
            "inspect".to_string(),
            fixture(model).display().to_string(),
            "--sqnr".into(),
            "--json".into(),
            "--sqnr-rows".into(),
            "1000".into(),
            "--report".into(),
            report.display().to_string(),
        ];
        args.extend(calib());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out, err) = perqc(&args);
        assert!(ok, "{model}: {err}");
        let json: Value = serde_json::from_str(&out).unwrap();
        let written: Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        assert_eq!(json, written, "{model}");
        let stages: Vec<&str> = json["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert_eq!(
            stages,
            [
                "original",
                "permute(method=massdiff,block=32)",
                "fold-norms(rotatable-only=true)",
                "rotate(residual=full,core=144)",
                "online-hadamard(block=32)"
            ],
            "{model}"
        );
        assert_eq!(json["rows"], 4 * 48, "{model}: every row sampled");
        let linears = json["linears"].as_array().unwrap();
        assert_eq!(linears.len(), 14, "{model}: 7 per layer, no head");
        let names: Vec<&str> = linears
            .iter()
            .map(|l| l["name"].as_str().unwrap())
            .collect();
        let is = |i: usize, what: &str| names[i].contains(what);
        for (i, l) in linears.iter().enumerate() {
            let bound = l["alignment_bound"].as_f64().unwrap();
            assert!(bound > 0.0 && bound <= 1.0, "{}: {bound}", names[i]);
            for st in 0..stages.len() {
                let a = l["stages"][st]["alignment"].as_f64().unwrap();
                assert!(
                    a > 0.0 && a <= bound * (1.0 + 1e-6),
                    "{} stage {st}: {a} > {bound}",
                    names[i]
                );
            }
        }
        let (db0, db1) = (at(&json, 0, "sqnr_db"), at(&json, 1, "sqnr_db"));
        for i in 0..names.len() {
            assert!(
                (db0[i] - db1[i]).abs() < 1e-3,
                "{}: permuted {} vs {}",
                names[i],
                db1[i],
                db0[i]
            );
        }
        let (a2, a3) = (at(&json, 2, "alignment"), at(&json, 3, "alignment"));
        let (c2, c3) = (at(&json, 2, "c_x"), at(&json, 3, "c_x"));
        for i in 0..names.len() {
            assert!(
                (a2[i] / a3[i] - 1.0).abs() < 1e-4,
                "{}: rotated alignment {} vs {}",
                names[i],
                a3[i],
                a2[i]
            );
            if is(i, "q_proj") || is(i, "gate_proj") {
                assert!(
                    c3[i] > 2.0 * c2[i],
                    "{}: C(x) {} -> {}",
                    names[i],
                    c2[i],
                    c3[i]
                );
            }
        }
        let (d3, d4) = (at(&json, 3, "sqnr_db"), at(&json, 4, "sqnr_db"));
        for i in (0..names.len()).filter(|&i| is(i, "down_proj")) {
            assert!(d4[i] > d3[i] + 1.0, "{}: {} -> {}", names[i], d3[i], d4[i]);
        }
    }
}

/// The text form names the stages and every layer; a weight-only preset has no
/// activation concentration term but still a table.
#[test]
fn text_and_weight_only() {
    let mut args = vec![
        "inspect".to_string(),
        fixture("llama_ts.onnx").display().to_string(),
        "--sqnr".into(),
        "--preset".into(),
        "w4a16".into(),
        "--block-size".into(),
        "full".into(),
    ];
    args.extend(calib());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = perqc(&args);
    assert!(ok, "{err}");
    assert!(
        out.contains("float activations") && out.contains("online-hadamard(block=full)"),
        "{out}"
    );
    assert!(
        out.contains("mlp/down_proj") && out.contains("A* "),
        "{out}"
    );
}

#[test]
fn errors_name_what_is_missing() {
    let m = fixture("llama_ts.onnx").display().to_string();
    let (ok, _, err) = perqc(&["inspect", &m, "--sqnr"]);
    assert!(
        !ok && err.contains("--sqnr needs calibration data"),
        "{err}"
    );
    let mut args = vec![
        "inspect".to_string(),
        m.clone(),
        "--sqnr".into(),
        "--sqnr-rows".into(),
        "0".into(),
    ];
    args.extend(calib());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _, err) = perqc(&args);
    assert!(
        !ok && err.contains("--sqnr-rows must be at least 1"),
        "{err}"
    );
    let (ok, _, err) = perqc(&["inspect", &m, "--sqnr", "--verify"]);
    assert!(!ok && err.contains("apply to the compile command"), "{err}");
    let (ok, _, err) = perqc(&["inspect", &m, "--sqnr", "--regions"]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    // A block that does not fit: before any measurement, one line.
    let mut args = vec!["inspect".to_string(), m, "--sqnr".into()];
    args.extend(calib());
    args.extend(["--block-size".into(), "7".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = perqc(&args);
    assert!(
        !ok && err.trim().lines().count() == 1
            && err.contains("cannot run on this model")
            && err.contains("block size 7 does not divide 192"),
        "{err}"
    );
    assert!(out.is_empty(), "{out}");
}
