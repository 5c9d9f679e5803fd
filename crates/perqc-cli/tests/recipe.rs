//! `perqc MODEL -o OUT [--no-quantize]`: the recipe from the command line, with
//! calibration, `--verify`, the fallback without calibration data, quantization and its
//! report, and the errors.

mod common;

use common::{close_case, fixture, scratch};
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

/// Calibration on the fixture text: `seqs` windows of `len` tokens.
fn calib_args(seqs: usize, len: usize) -> Vec<String> {
    vec![
        "--calib-text".into(),
        s(&fixture("tiny_text.txt")),
        "--tokenizer".into(),
        s(&fixture("tiny_tokenizer.json")),
        "--calib-seqs".into(),
        seqs.to_string(),
        "--calib-len".into(),
        len.to_string(),
    ]
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

    // The permutation's statistics from 2 of the 3 sequences (--permute-seqs), unless
    // smoothing shares the pass: then from all of them.
    // TokenMax reads sampled token profiles (divided by the smoothing's scales when it
    // runs first); exact all the same.
    for (extra, want) in [
        (&[][..], "(2 of 3 windows, spread): 2 sequences, 128 tokens"),
        (&["--smooth", "max"][..], ": 3 sequences, 192 tokens"),
        (
            &["--permute", "tokenmax"][..],
            "permute(method=tokenmax,block=32)",
        ),
        (
            &["--permute", "tokenmax", "--smooth", "max"][..],
            "permute=tokenmax",
        ),
        // A block R1: the permutation spreads the residual stream over its blocks too, and
        // R2 rotates blocks within each head.
        (
            &["--rotation", "block", "--block-size", "16"][..],
            "permute(method=massdiff,block=16,residual=true)",
        ),
        (
            &["--rotation", "block", "--block-size", "8"][..],
            "rotate(residual=block,heads=block,block=8,core=144)",
        ),
        // Randomized Hadamards stay exact.
        (
            &["--rotation-signs", "7"][..],
            "rotate(residual=full,core=144,signs=7)",
        ),
    ] {
        let mut args = vec![
            s(&fixture("llama_dynamo.onnx")),
            "-o".into(),
            s(&out),
            "--no-quantize".into(),
            "--permute-seqs".into(),
            "2".into(),
            "--verify".into(),
        ];
        args.extend(calib_args(3, 64));
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, err) = perqc(&args);
        assert!(ok, "{err}");
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
}

/// After the recipe's transforms the LM head reads the embedding table again, through the
/// small map the norm fold and the rotation left (`tie-head`): the head's own table is gone
/// from the file and the outputs still match (`--verify`, and ONNX Runtime on random
/// inputs), on both Llama exports (a table stored twice; one table behind a Transpose). The
/// Gemma-like decoder's stream is neither folded nor rotated (its post-norms), so its head
/// reads the table directly. Quantized (W4A4 keeps the head float), it is tied too.
#[test]
fn the_head_reads_the_embedding_table_again() {
    let calib = calib_args(2, 32);
    for model in ["llama_ts.onnx", "llama_dynamo.onnx", "gemma_like.onnx"] {
        let dir = scratch("recipe", &format!("tie_{model}"));
        for quantize in [false, true] {
            let out = dir.join(if quantize { "q.onnx" } else { "m.onnx" });
            let mut args = vec![s(&fixture(model)), "-o".into(), s(&out)];
            args.extend(calib.iter().cloned());
            if !quantize {
                args.extend(["--no-quantize".into(), "--verify".into()]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (ok, err) = perqc(&args);
            assert!(ok, "{model}: {err}");
            let how = match model {
                "gemma_like.onnx" => "reads the embedding table directly (the same table)",
                _ => "reads the embedding table through a 64 x 64 map",
            };
            assert!(
                err.contains("heads-tied=1 weights-removed=1") && err.contains(how),
                "{model}: {err}"
            );
            // The embedding's table has a second reader (the head, through a Transpose
            // in the exported file).
            let m = perqc_onnx::load(&out).expect("loads").model;
            let g = &m.graph;
            let table = g
                .nodes()
                .find(|(_, n)| n.op_type == "Gather")
                .and_then(|(_, n)| n.input(0))
                .expect("an embedding Gather");
            assert!(g.const_tensor(table).is_some(), "{model}");
            assert_eq!(g.value(table).uses().len(), 2, "{model}");
            if !quantize {
                assert!(err.contains("--verify: outputs match"), "{err}");
                let stem = model.trim_end_matches(".onnx");
                close_case(&format!("tie_head_{stem}"), &fixture(model), &out, 1e-4);
                // Quantizing the tied file later keeps the map in front of the head float,
                // as the head: 7 linears per layer are quantized, not 15.
                let mut again = vec![s(&out), "-o".into(), s(&dir.join("q2.onnx"))];
                again.extend(calib.iter().cloned());
                let again: Vec<&str> = again.iter().map(String::as_str).collect();
                let (ok, err) = perqc(&again);
                assert!(ok, "{model}: {err}");
                assert!(err.contains("quantize: 14 linears"), "{model}: {err}");
                assert!(
                    err.contains("already reads the embedding table"),
                    "{model}: {err}"
                );
            }
        }
    }
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
    assert!(
        err.contains("rotate(residual=block,heads=block,block=16,core=144)"),
        "{err}"
    );
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

/// `--smooth` (max and quantile, searched, trained) before the PeRQ transforms and before
/// full rotation: the native `--verify` and ONNX Runtime (a conformance case against the
/// original fixture) both see the original outputs; the gated mlps are smoothed through
/// up_proj.
#[test]
fn smoothing_is_exact() {
    let calib = calib_args(3, 64);
    for model in ["llama_ts.onnx", "llama_dynamo.onnx", "gemma_like.onnx"] {
        for (tag, spec, block, train) in [
            ("max", "max(alpha=0.5)", "32", "0"),
            ("quantile", "quantile(q=0.99,alpha=0.6)", "32", "0"),
            ("quantile_full", "quantile", "full", "0"),
            ("search", "search", "16", "0"),
            ("quantile_train", "quantile", "32", "40"),
            ("search_train_full", "search", "full", "20"),
        ] {
            let stem = model.trim_end_matches(".onnx");
            let dir = scratch("recipe", &format!("smooth_{stem}_{tag}"));
            let out = dir.join("m.onnx");
            let mut args = vec![
                s(&fixture(model)),
                "-o".into(),
                s(&out),
                "--no-quantize".into(),
                "--smooth".into(),
                spec.into(),
                "--block-size".into(),
                block.into(),
                "--smooth-train".into(),
                train.into(),
                "--verify".into(),
            ];
            args.extend(calib.iter().cloned());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (ok, err) = perqc(&args);
            assert!(ok, "{model} {spec}: {err}");
            for want in [
                "regions-smoothed=2",
                "weights-rewritten=4",
                "--verify: outputs match",
            ] {
                assert!(err.contains(want), "{model} {spec}: no `{want}` in\n{err}");
            }
            // The probed down_proj error: smoothing lowers it here (an outlier-heavy
            // fixture), and the search never ends above no smoothing.
            let probed = err
                .lines()
                .find(|l| l.contains("down_proj quantized error"))
                .unwrap_or_else(|| panic!("{model} {spec}: no probed error in\n{err}"));
            let pct: f64 = probed
                .rsplit('(')
                .next()
                .and_then(|p| p.trim_end_matches("%)").parse().ok())
                .unwrap_or_else(|| panic!("{probed}"));
            assert!(pct <= 0.0, "{model} {spec}: {probed}");
            if tag == "search" {
                assert!(err.contains("search chose:"), "{err}");
                assert!(err.contains("search grid alpha=0.5: q=0.95"), "{err}");
            }
            // Training runs in the pass and reports its errors; the held-out rows' error
            // never rises (the scales kept are never worse there).
            if train != "0" {
                assert!(err.contains(&format!("train={train}")), "{err}");
                let line = err
                    .lines()
                    .find(|l| l.contains(&format!("train ({train} steps, lr 0.01)")))
                    .unwrap_or_else(|| panic!("{model} {tag}: no training note in\n{err}"));
                let held = line.split("held-out rows ").nth(1).expect("held-out");
                let pct: f64 = held
                    .rsplit('(')
                    .next()
                    .and_then(|p| p.trim_end_matches("%)").parse().ok())
                    .unwrap_or_else(|| panic!("{line}"));
                assert!(pct <= 0.0, "{model} {tag}: {line}");
                assert!(err.contains("trained scales kept in"), "{err}");
            } else {
                assert!(!err.contains("train ("), "{err}");
            }
            close_case(&format!("smooth_{stem}_{tag}"), &fixture(model), &out, 1e-4);
        }
    }
}

/// `--cat` (block CAT with the online Hadamard after it, alone and after smoothing; after a
/// permutation on statistics calibrated again, else on the first ones): the native
/// `--verify` and ONNX Runtime see the original outputs; the online map is standard ONNX (a
/// block-wise MatMul between Reshapes).
#[test]
fn cat_is_exact() {
    for model in ["llama_ts.onnx", "llama_dynamo.onnx", "gemma_like.onnx"] {
        for (tag, extra) in [
            ("k32", &["--cat", "block(k=32)"][..]),
            (
                "k64_b16",
                &["--cat", "block(k=64)", "--block-size", "16"][..],
            ),
            (
                "k16_smooth",
                &["--cat", "block(k=16)", "--smooth", "quantile"][..],
            ),
            // No permutation: CAT reads the first calibration (smoothing divides it).
            (
                "k32_identity_smooth",
                &[
                    "--cat",
                    "block(k=32)",
                    "--permute",
                    "identity",
                    "--smooth",
                    "max",
                ][..],
            ),
        ] {
            let stem = model.trim_end_matches(".onnx");
            let dir = scratch("recipe", &format!("cat_{stem}_{tag}"));
            let out = dir.join("m.onnx");
            let (m, o) = (s(&fixture(model)), s(&out));
            let (text, tok) = (
                s(&fixture("tiny_text.txt")),
                s(&fixture("tiny_tokenizer.json")),
            );
            let mut args = vec![
                m.as_str(),
                "-o",
                o.as_str(),
                "--no-quantize",
                "--verify",
                "--calib-text",
                text.as_str(),
                "--tokenizer",
                tok.as_str(),
                "--calib-seqs",
                "3",
                "--calib-len",
                "64",
            ];
            args.extend_from_slice(extra);
            let (ok, err) = perqc(&args);
            assert!(ok, "{model} {tag}: {err}");
            for want in ["regions-transformed=2", "--verify: outputs match"] {
                assert!(err.contains(want), "{model} {tag}: no `{want}` in\n{err}");
            }
            assert!(
                !err.contains("online-hadamard"),
                "CAT brings its own rotation: {err}"
            );
            close_case(&format!("cat_{stem}_{tag}"), &fixture(model), &out, 1e-4);
        }
    }
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
    // Smoothing: calibration data, known statistics, options in range.
    let (ok, err) = perqc(&[&m, "-o", &s(&out), "--no-quantize", "--smooth", "max"]);
    assert!(
        !ok && err.contains("--smooth needs calibration data"),
        "{err}"
    );
    for (spec, want) in [
        ("median", "not a smoothing (max, quantile"),
        ("max(q=0.9)", "no option `q` (valid: alpha)"),
        ("quantile(q=1.5)", "q = 1.5 is not in (0, 1]"),
        ("quantile(alpha=x)", "alpha = `x` is not a number"),
        ("max(alpha=0.5", "missing `)`"),
    ] {
        let (ok, err) = perqc(&[&m, "-o", &s(&out), "--smooth", spec]);
        assert!(!ok && err.contains(want), "{spec}: {err}");
    }
    assert!(!out.exists(), "no output on failure");
    // Training refines a smoothing: alone it is refused, naming both flags.
    let (ok, err) = perqc(&[&m, "-o", &s(&out), "--no-quantize", "--smooth-train", "10"]);
    assert!(
        !ok && err.contains("--smooth-train refines the smoothing's scales: give --smooth"),
        "{err}"
    );
    let (ok, err) = perqc(&[&m, "-o", &s(&out), "--smooth", "max", "--smooth-train", "x"]);
    assert!(!ok && err.contains("--smooth-train"), "{err}");
    let (ok, err) = perqc(&[&m, "-o", &s(&out), "--passes", "dce", "--smooth-train", "3"]);
    assert!(!ok && err.contains("leave out --passes"), "{err}");
    // Zero steps is off, with or without --smooth.
    let (ok, err) = perqc(&[&m, "-o", &s(&out), "--no-quantize", "--smooth-train", "0"]);
    assert!(ok, "{err}");
    std::fs::remove_file(&out).unwrap();
    let (ok, err) = perqc(&[&m, "-o", &s(&out), "--cat", "block(k=0)"]);
    assert!(!ok && err.contains("not a CAT spec"), "{err}");
    let (ok, err) = perqc(&[&m, "-o", &s(&out), "--no-quantize", "--cat", "block"]);
    assert!(!ok && err.contains("--cat needs calibration data"), "{err}");
    // A block R1 takes its block from --block-size: none has none; full is the full R1.
    for (size, ok_want, want) in [
        (
            "none",
            false,
            "--rotation block takes its blocks from --block-size",
        ),
        ("full", true, "rotate(residual=full,core=144)"),
    ] {
        let args = [&m, "-o", &s(&out), "--no-quantize", "--rotation", "block"];
        let (ok, err) = perqc(&[&args[..], &["--block-size", size]].concat());
        assert!(ok == ok_want && err.contains(want), "{size}: {err}");
    }
    std::fs::remove_file(&out).unwrap();
    let args = [&m, "-o", &s(&out), "--no-quantize", "--rotation", "none"];
    let (ok, err) = perqc(&[&args[..], &["--rotation-signs", "1"]].concat());
    assert!(!ok && err.contains("--rotation-signs randomizes"), "{err}");
    // A core no width has is an error; one this width lacks falls back (the default 144
    // on the fixture's 64 channels).
    let args = [&m, "-o", &s(&out), "--no-quantize", "--hadamard-core", "6"];
    let (ok, err) = perqc(&args);
    assert!(
        !ok && err.contains("--hadamard-core 6: no Hadamard matrix of that order"),
        "{err}"
    );
    let (ok, err) = perqc(&[&m, "-o", &s(&out), "--passes", "rotate(core=6)"]);
    assert!(
        !ok && err.contains("is not the order of a Hadamard matrix"),
        "{err}"
    );
    assert!(!out.exists(), "no output on failure");
    // The residual permutation of a block R1 reads the float model's statistics.
    let mut args = vec![m.clone(), "-o".into(), s(&out)];
    args.extend(calib_args(2, 32));
    args.extend(["--rotation", "block", "--permute-stats", "quantized"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, err) = perqc(&args);
    assert!(
        !ok && err.contains("--rotation block permutes the residual stream")
            && err.contains("--permute-stats float"),
        "{err}"
    );
    assert!(!out.exists(), "no output on failure");
}

/// The default job quantizes: W4A4 with GPTQ and the clip search when there is calibration
/// text, the report as JSON; the file runs natively and has no float linear but the head.
#[test]
fn default_job_quantizes_and_reports() {
    let dir = scratch("recipe", "quantize");
    let out = dir.join("q.onnx");
    let report = dir.join("report.json");
    // The default job on two short calibration windows, writing `out`, plus `extra`.
    let job = |out: &std::path::Path, extra: &[&str]| {
        let (model, out) = (s(&fixture("llama_ts.onnx")), s(out));
        let (text, tok) = (
            s(&fixture("tiny_text.txt")),
            s(&fixture("tiny_tokenizer.json")),
        );
        let mut args = vec![model.as_str(), "-o", &out, "--calib-text", &text];
        args.extend([
            "--tokenizer",
            &tok,
            "--calib-seqs",
            "2",
            "--calib-len",
            "64",
        ]);
        args.extend_from_slice(extra);
        perqc(&args)
    };
    let (ok, err) = job(&out, &["--report", &s(&report)]);
    assert!(ok, "{err}");
    for want in [
        "quantize: 14 linears",
        "outputs",
        "max / mean mass of a block of 32",
        "rotate(residual=full,core=144)",
    ] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let rows = json["linears"].as_array().unwrap();
    assert_eq!(rows.len(), 14);
    assert!(
        rows.iter()
            .all(|r| r["rounding"] == "gptq" && r["output_sqnr_db"].is_f64())
    );
    // The fit to the float output: the down_projs' inputs, which the online Hadamard
    // computes.
    for r in rows {
        let down = r["linear"].as_str().unwrap().contains("down_proj");
        assert_eq!(r["fit_to_float_output"], down, "{r}");
    }
    // The probe: every linear's output SQNR without and with the transforms, printed by
    // layer kind; the transforms change what every linear reads but the lm_head (not
    // quantized), so the two stages differ for (nearly) every linear.
    let stages = ["without the transforms", "with the transforms"];
    assert_eq!(json["probe"]["stages"], serde_json::json!(stages));
    let pairs: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| {
            let p = &r["probe_sqnr_db"];
            (
                p[stages[0]].as_f64().unwrap(),
                p[stages[1]].as_f64().unwrap(),
            )
        })
        .collect();
    let moved = pairs.iter().filter(|(a, b)| (a - b).abs() > 1e-3).count();
    assert!(moved >= 12, "{pairs:?}");
    for want in [
        "without the transforms -> with the transforms",
        "/mlp/down_proj/MatMul (2): ",
    ] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
    let m = perqc_onnx::load(&out).expect("loads").model;
    assert_eq!(m.opset(""), Some(21));
    let dq = m
        .graph
        .nodes()
        .filter(|(_, n)| n.op_type == "DequantizeLinear")
        .count();
    // 14 weights, and 4 activation quantizers a layer (q/k/v, o, gate/up and down read
    // one each) in 2 layers.
    assert_eq!(dq, 14 + 8, "weights and activations dequantized");
    // GPTQ fitted to the float output moves the weights before they are rounded: by
    // default the down_projs' alone (the inputs the online Hadamard computes), with `all`
    // every linear's; the file says where.
    let says = |m: &perqc_ir::Model, what: &str| {
        assert!(
            m.metadata.iter().any(|(_, v)| v.contains(what)),
            "{what}: {:?}",
            m.metadata
        )
    };
    says(
        &m,
        "rounding Gptq on the float output at online inputs (ridge 1)",
    );
    // Each linear's packed weight codes, by the name of the linear reading them, in graph
    // order.
    let weights = |m: &perqc_ir::Model| -> Vec<(String, Vec<u8>)> {
        m.graph
            .nodes()
            .filter(|(_, n)| n.op_type == "DequantizeLinear")
            .filter_map(|(_, n)| {
                let t = m.graph.const_tensor(n.input(0)?)?;
                let reader = m.graph.value(n.output(0)?).uses().first()?.node;
                Some((
                    m.graph.node(reader).name.clone(),
                    t.raw_bytes().unwrap().to_vec(),
                ))
            })
            .collect()
    };
    // Calibration runs on the quantized prefix, so a moved weight moves every later one:
    // the linears before the first that differs are where the two compiles agree.
    let first_moved = |a: &perqc_ir::Model, b: &perqc_ir::Model| -> (usize, String) {
        let (wa, wb) = (weights(a), weights(b));
        assert_eq!(wa.len(), wb.len());
        let i = wa
            .iter()
            .zip(&wb)
            .position(|(x, y)| x != y)
            .expect("a weight moved");
        (i, wa[i].0.clone())
    };
    assert_eq!(weights(&m).len(), 14);
    let other = dir.join("other.onnx");
    let (ok, err) = job(&other, &["--gptq-input-error", "none"]);
    assert!(ok && err.contains("quantize: 14 linears"), "{err}");
    let plain = perqc_onnx::load(&other).expect("loads").model;
    assert!(
        !plain
            .metadata
            .iter()
            .any(|(_, v)| v.contains("float output"))
    );
    let (i, name) = first_moved(&m, &plain);
    assert!(
        i >= 4 && name.contains("layers.0/mlp/down_proj"),
        "{i}: {name}"
    );
    let (ok, err) = job(
        &other,
        &["--gptq-input-error", "all", "--gptq-ridge", "0.5"],
    );
    assert!(ok, "{err}");
    let all = perqc_onnx::load(&other).expect("loads").model;
    says(
        &all,
        "rounding Gptq on the float output at all inputs (ridge 0.5)",
    );
    let (i, name) = first_moved(&all, &plain);
    assert!(i == 0 && name.contains("layers.0/self_attn"), "{i}: {name}");
    // Without calibration data: round to nearest, and it says so.
    let (ok, err) = perqc(&[&s(&fixture("llama_ts.onnx")), "-o", &s(&out)]);
    assert!(
        ok && err.contains("no calibration data: weights rounded to nearest"),
        "{err}"
    );
}

/// Layer-by-layer calibration runs the already-quantized linears on the integer kernels
/// where the CPU has them (`--calib-float`: on the float ones, as ONNX Runtime does). The
/// two plans differ by f32 round-off, so every linear's rounding sees nearly the same
/// inputs: its SQNRs and clip ratio come out (nearly) the same.
#[test]
fn integer_and_float_calibration_agree() {
    let dir = scratch("recipe", "calib_int");
    let level = perqc_ops::kernels::igemm::Level::detect();
    let mut reports = Vec::new();
    for (tag, extra) in [("int", None), ("float", Some("--calib-float"))] {
        let out = dir.join(format!("{tag}.onnx"));
        let report = dir.join(format!("{tag}.json"));
        let mut args = vec![
            s(&fixture("llama_ts.onnx")),
            "-o".into(),
            s(&out),
            "--report".into(),
            s(&report),
        ];
        args.extend(calib_args(2, 64));
        args.extend(extra.map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, err) = perqc(&args);
        assert!(ok, "{err}");
        let int = err.contains("quantized prefix on the integer kernels");
        let want = tag == "int" && level != perqc_ops::kernels::igemm::Level::Scalar;
        assert_eq!(int, want, "{tag} ({level:?}):\n{err}");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        reports.push(json["linears"].as_array().unwrap().clone());
    }
    let (int, float) = (&reports[0], &reports[1]);
    assert_eq!(int.len(), 14);
    let mut deltas = Vec::new();
    for (a, b) in int.iter().zip(float) {
        assert_eq!(a["name"], b["name"]);
        for key in ["weight_sqnr_db", "output_sqnr_db"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            deltas.push((x - y).abs());
            assert!((x - y).abs() < 1.0, "{}: {key} {x} vs {y}", a["name"]);
        }
    }
    let mean = deltas.iter().sum::<f64>() / deltas.len() as f64;
    assert!(mean < 0.25, "mean SQNR difference {mean} dB");
}

/// With `--permute-stats quantized` (and a calibrating quantizer) the mlp permutation and
/// its online Hadamard are applied layer by layer inside the quantizers' forward pass;
/// otherwise by the pipeline after a calibration pass of their own. Both give the same
/// graph: every transform in, each activation quantizer behind the rotation its linears
/// read.
#[test]
fn layer_by_layer_transforms_build_the_pipelines_graph() {
    let dir = scratch("recipe", "layerwise");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(name);
        let mut args = vec![
            s(&fixture("llama_ts.onnx")),
            "-o".into(),
            s(&out),
            "--calib-text".into(),
            s(&fixture("tiny_text.txt")),
            "--tokenizer".into(),
            s(&fixture("tiny_tokenizer.json")),
            "--calib-seqs".into(),
            "2".into(),
            "--calib-len".into(),
            "64".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, err) = perqc(&refs);
        assert!(ok, "{err}");
        let m = perqc_onnx::load(&out).expect("loads").model;
        // Mul left out: a clip ratio below 1 (searched in one run, not the other) scales
        // the quantizer's range.
        let ops: Vec<String> = m
            .graph
            .node_order()
            .iter()
            .map(|&n| m.graph.node(n).op_type.clone())
            .filter(|op| op != "Mul")
            .collect();
        (ops, err)
    };
    let (layerwise, err) = run(
        "layerwise.onnx",
        &["--rounding", "rtn", "--permute-stats", "quantized"],
    );
    assert!(
        err.contains("layer by layer: permute (massdiff) and online-hadamard (block 32) applied to 2 of 2 mlp regions")
            && !err.contains("permute(method=massdiff"),
        "{err}"
    );
    let (piped, err) = run("piped.onnx", &["--rounding", "rtn", "--clip", "none"]);
    assert!(
        err.contains("permute(method=massdiff,block=32)")
            && err.contains("online-hadamard(block=32)"),
        "{err}"
    );
    assert_eq!(layerwise, piped);
    // The float model's statistics, asked for: the pipeline's route with the clip search.
    let (float, err) = run(
        "float.onnx",
        &["--rounding", "rtn", "--permute-stats", "float"],
    );
    assert!(
        err.contains("permute(method=massdiff,block=32)") && err.contains("calibrated on"),
        "{err}"
    );
    assert_eq!(layerwise, float);
    // GPTQ's fit to the float output finds the online rotations placed layer by layer too:
    // the two down_projs, as on the pipeline's route.
    for stats in ["quantized", "float"] {
        let (_, err) = run("gptq.onnx", &["--permute-stats", stats]);
        assert!(
            err.contains("(GPTQ aimed at the float output: 2 linears)"),
            "{stats}: {err}"
        );
    }
    // TokenMax's profiles come from the quantized prefix too.
    let (_, err) = run(
        "tokenmax.onnx",
        &[
            "--rounding",
            "rtn",
            "--permute-stats",
            "quantized",
            "--permute",
            "tokenmax",
        ],
    );
    assert!(
        err.contains("layer by layer: permute (tokenmax) and online-hadamard (block 32) applied to 2 of 2 mlp regions"),
        "{err}"
    );
    // A region whose sources stay float is transformed from a calibration run of its own.
    let (_, err) = run(
        "alone.onnx",
        &[
            "--permute-stats",
            "quantized",
            "--skip",
            "*layers.0/mlp/gate_proj*",
            "--skip",
            "*layers.0/mlp/up_proj*",
        ],
    );
    assert!(
        err.contains("quantize: 12 linears") && err.contains("applied to 2 of 2 mlp regions"),
        "{err}"
    );
}

/// Settings that cannot work fail in one line before any work, and write nothing.
#[test]
fn quantization_errors_come_first() {
    let dir = scratch("recipe", "quant_errors");
    let out = dir.join("q.onnx");
    let m = s(&fixture("llama_ts.onnx"));
    for (args, want) in [
        (&["--w-bits", "9"][..], "bits"),
        (&["--a-bits", "1"][..], "activation bits must be 2..=8"),
        (
            &["--skip", "*no_such_layer*"][..],
            "matches no linear layer",
        ),
        (&["--w-granularity", "48"][..], "does not divide"),
        (
            &["--format", "mxfp4", "--w-granularity", "16"][..],
            "does not fit",
        ),
        (&["--target", "ort"][..], "weight-only"),
        (&["--rounding", "gptq"][..], "needs calibration data"),
        (
            &["--gptq-input-error", "online"][..],
            "needs GPTQ rounding and activation",
        ),
        (&["--gptq-ridge", "0"][..], "not a ridge > 0"),
        (
            &["--gptq-input-error", "none", "--gptq-ridge", "2"][..],
            "which is off",
        ),
        (&["--clip", "1.5"][..], "clip ratio"),
    ] {
        let mut all = vec![m.as_str(), "-o", out.to_str().unwrap()];
        all.extend_from_slice(args);
        let (ok, err) = perqc(&all);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(!out.exists(), "{args:?}: no output on failure");
    }
    // Blocks that do not fit the model's widths fail before the calibration, from the
    // passes' checks (`Pass::check`), not when the pass would run.
    let calib = calib_args(2, 32);
    for (args, want) in [
        (
            &["--block-size", "7"][..],
            "pass `permute` (#1) cannot run on this model: permute: region #3 (mlp, d = 192): block size 7 does not divide 192 channels",
        ),
        (
            &["--block-size", "7", "--permute", "identity"][..],
            "pass `online-hadamard` (#4) cannot run on this model: online-hadamard: region #3 (mlp, d = 192): a block of 7 does not divide 192 channels",
        ),
        (
            &["--block-size", "7", "--rounding", "rtn", "--clip", "none"][..],
            "block size 7 does not divide 192",
        ),
        (
            &["--cat", "block(k=7)"][..],
            "pass `cat` (#1) cannot run on this model: cat: region #3 (mlp, d = 192): k = 7 does not divide the width 192",
        ),
        (
            &["--cat", "block(k=64)", "--block-size", "12"][..],
            "the Hadamard block 12 and the CAT block 64 must divide one another",
        ),
    ] {
        let mut all = vec![m.as_str(), "-o", out.to_str().unwrap()];
        all.extend(calib.iter().map(String::as_str));
        all.extend_from_slice(args);
        let (ok, err) = perqc(&all);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(!out.exists(), "{args:?}: no output on failure");
    }
}

/// Where R1 cannot apply (the Gemma-like decoder's post-norms), the recipe folds none of the
/// residual stream's norms: folded without a rotation their gammas' outliers would land in
/// q/k/v and gate/up's input columns. The probe of `--report` shows those linears no worse
/// with the transforms than without (folding them took q/k/v from 15 to 4 dB).
#[test]
fn a_stream_that_cannot_rotate_keeps_its_norms() {
    let dir = scratch("recipe", "gemma_norms");
    let (out, report) = (dir.join("q.onnx"), dir.join("report.json"));
    let mut args = vec![s(&fixture("gemma_like.onnx")), "-o".into(), s(&out)];
    args.extend(calib_args(2, 64));
    args.extend(["--report".to_string(), s(&report)]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, err) = perqc(&args);
    assert!(ok && err.contains("no norm folded"), "{err}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    for r in json["linears"].as_array().unwrap() {
        let name = r["linear"].as_str().unwrap();
        if ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
            .iter()
            .any(|k| name.contains(k))
        {
            let p = &r["probe_sqnr_db"];
            let (before, after) = (
                p["without the transforms"].as_f64().unwrap(),
                p["with the transforms"].as_f64().unwrap(),
            );
            assert!(after > before - 1.0, "{name}: {before} -> {after} dB");
        }
    }
}

/// `--skip` also keeps a lookup table float when the preset quantizes the embedding, and a
/// pattern that names only the table is not an error.
#[test]
fn skip_keeps_the_embedding_table_float() {
    let dir = scratch("recipe", "skip_embedding");
    let m = s(&fixture("llama_ts.onnx"));
    // Whether the token embedding's Gather reads a float constant (else a DequantizeLinear).
    let float_table = |extra: &[&str]| {
        let out = dir.join("q.onnx");
        let mut args = vec![m.as_str(), "-o", out.to_str().unwrap(), "--preset", "w4a16"];
        args.extend_from_slice(extra);
        let (ok, err) = perqc(&args);
        assert!(ok, "{extra:?}: {err}");
        let model = perqc_onnx::load(&out).expect("loads").model;
        let g = &model.graph;
        let ids = g.find("input_ids").expect("input_ids");
        let (_, gather) = g
            .nodes()
            .find(|(_, n)| n.op_type == "Gather" && n.input(1) == Some(ids))
            .expect("the embedding Gather");
        let table = gather.input(0).expect("a table");
        g.const_tensor(table)
            .is_some_and(|t| t.dtype == perqc_ir::DType::F32)
    };
    assert!(!float_table(&[]));
    assert!(float_table(&["--skip", "*embed_tokens*"]));
}
