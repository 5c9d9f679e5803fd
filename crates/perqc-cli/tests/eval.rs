//! `perqc eval`: perplexity by the bench protocol, its agreement across exports and with
//! ONNX Runtime, and its one-line errors for bad tokenizer, text and id files.

mod common;

use common::fixture;
use perqc_runtime::RtTensor;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn scratch(test: &str) -> PathBuf {
    common::scratch("eval", test)
}

fn perqc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_perqc"))
        .args(args)
        .output()
        .unwrap()
}

/// The `ppl=` value a successful run prints as its last line.
fn ppl(o: &Output) -> f64 {
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    last.strip_prefix("ppl=")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("last line is not ppl=<value>: {last}"))
}

fn eval_text(model: &str, text: &Path) -> Output {
    let tok = fixture("tiny_tokenizer.json");
    perqc(&[
        "eval",
        fixture(model).to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--seq",
        "32",
        "--windows",
        "4",
        "--skip-chars",
        "100",
        "--quiet",
    ])
}

/// A 1-d int64 `.npy` of `ids`.
fn write_ids(path: &Path, ids: &[i64]) {
    let t = RtTensor::I64(ndarray::Array1::from(ids.to_vec()).into_dyn().into_shared());
    perqc_runtime::write_npy(path, &t).unwrap();
}

#[test]
fn text_and_exports_agree() {
    let text = fixture("tiny_text.txt");
    let a = ppl(&eval_text("llama_ts.onnx", &text));
    let b = ppl(&eval_text("llama_dynamo.onnx", &text));
    assert!(a.is_finite() && a > 1.0, "{a}");
    assert!((a - b).abs() <= 1e-4 * a, "torchscript {a} vs dynamo {b}");
}

#[test]
fn ids_agree_with_onnx_runtime() {
    // Register a case for the conformance runner: ONNX Runtime scores the same windows of
    // the same ids and must reach the same perplexity.
    let dir = scratch("ids");
    let ids: Vec<i64> = (0..100).map(|i| (i * 37 + 11) % 256).collect();
    let npy = dir.join("ids.npy");
    write_ids(&npy, &ids);
    let model = fixture("llama_ts.onnx");
    let o = perqc(&[
        "eval",
        model.to_str().unwrap(),
        "--ids",
        npy.to_str().unwrap(),
        "--seq",
        "24",
        "--windows",
        "3",
        "--quiet",
    ]);
    let value = ppl(&o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("tokens=69"),
        "3 windows of 23 predictions: {stdout}"
    );
    let cases = Path::new(env!("CARGO_TARGET_TMPDIR")).join("conformance");
    std::fs::create_dir_all(&cases).unwrap();
    let json = format!(
        "{{\"cases\": [{{\"name\": \"eval_ppl_llama_ts\", \"mode\": \"ppl\", \"model\": {:?}, \"ids\": {:?}, \"seq\": 24, \"windows\": 3, \"ppl\": {value}, \"rtol\": 1e-4}}]}}\n",
        std::fs::canonicalize(&model).unwrap(),
        std::fs::canonicalize(&npy).unwrap(),
    );
    std::fs::write(cases.join("eval_ppl_llama_ts.json"), json).unwrap();
}

#[test]
fn kv_cache_graph_agrees_with_onnx_runtime() {
    // A builder-style graph that takes past key/values, an attention mask and position ids:
    // eval feeds an empty cache, ones and 0..seq, ignores the present.* outputs, and ONNX
    // Runtime must reach the same perplexity on the same feeds.
    let dir = scratch("kv");
    let ids: Vec<i64> = (0..100).map(|i| (i * 53 + 7) % 256).collect();
    let npy = dir.join("ids.npy");
    write_ids(&npy, &ids);
    let model = fixture("ort_kv_decoder.onnx");
    let o = perqc(&[
        "eval",
        model.to_str().unwrap(),
        "--ids",
        npy.to_str().unwrap(),
        "--seq",
        "24",
        "--windows",
        "3",
        "--quiet",
    ]);
    let value = ppl(&o);
    assert!(value.is_finite() && value > 1.0, "{value}");
    let cases = Path::new(env!("CARGO_TARGET_TMPDIR")).join("conformance");
    std::fs::create_dir_all(&cases).unwrap();
    let json = format!(
        "{{\"cases\": [{{\"name\": \"eval_ppl_ort_kv_decoder\", \"mode\": \"ppl\", \"model\": {:?}, \"ids\": {:?}, \"seq\": 24, \"windows\": 3, \"ppl\": {value}, \"rtol\": 1e-4}}]}}\n",
        std::fs::canonicalize(&model).unwrap(),
        std::fs::canonicalize(&npy).unwrap(),
    );
    std::fs::write(cases.join("eval_ppl_ort_kv_decoder.json"), json).unwrap();
}

/// A failed eval: non-zero exit, one error line naming `names`.
fn fails(o: &Output, names: &[&str]) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "succeeded: {stderr}");
    assert_ne!(o.status.code(), Some(101), "panicked: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    for n in names {
        assert!(stderr.contains(n), "error lacks `{n}`: {stderr}");
    }
}

#[test]
fn bad_inputs_name_the_file() {
    let dir = scratch("bad");
    let model = fixture("llama_ts.onnx");
    let m = model.to_str().unwrap();
    let text = fixture("tiny_text.txt");
    let t = text.to_str().unwrap();

    let bad_tok = dir.join("tok.json");
    std::fs::write(&bad_tok, "{ not json").unwrap();
    fails(
        &perqc(&[
            "eval",
            m,
            "--tokenizer",
            bad_tok.to_str().unwrap(),
            "--text",
            t,
        ]),
        &["tok.json", "tokenizer"],
    );

    let tok = fixture("tiny_tokenizer.json");
    let tk = tok.to_str().unwrap();
    fails(
        &perqc(&[
            "eval",
            m,
            "--tokenizer",
            tk,
            "--text",
            "/nonexistent/text.txt",
        ]),
        &["text.txt", "cannot read"],
    );

    let latin1 = dir.join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9 au lait").unwrap();
    fails(
        &perqc(&[
            "eval",
            m,
            "--tokenizer",
            tk,
            "--text",
            latin1.to_str().unwrap(),
        ]),
        &["latin1.txt", "not UTF-8", "offset 3"],
    );

    fails(
        &perqc(&[
            "eval",
            m,
            "--tokenizer",
            tk,
            "--text",
            t,
            "--skip-chars",
            "99999999",
        ]),
        &["tiny_text.txt", "--skip-chars"],
    );

    let floats = dir.join("floats.npy");
    let t = RtTensor::F32(
        ndarray::Array1::from(vec![1.0f32, 2.0])
            .into_dyn()
            .into_shared(),
    );
    perqc_runtime::write_npy(&floats, &t).unwrap();
    fails(
        &perqc(&["eval", m, "--ids", floats.to_str().unwrap()]),
        &["floats.npy"],
    );

    let short = dir.join("short.npy");
    write_ids(&short, &[1, 2, 3]);
    fails(
        &perqc(&["eval", m, "--ids", short.to_str().unwrap(), "--seq", "16"]),
        &["3 tokens", "no complete window"],
    );

    let big = dir.join("big.npy");
    write_ids(&big, &[1, 2, 300, 4]);
    fails(
        &perqc(&[
            "eval",
            m,
            "--ids",
            big.to_str().unwrap(),
            "--seq",
            "4",
            "--windows",
            "1",
        ]),
        &["llama_ts.onnx", "big.npy", "300", "Gather", "out of range"],
    );

    // The model's input is not token ids: the error names the model and the ids file.
    let gelu = fixture("encoder_ln_gelu.onnx");
    let ids = dir.join("ids.npy");
    write_ids(&ids, &[1, 2, 3, 4]);
    fails(
        &perqc(&[
            "eval",
            gelu.to_str().unwrap(),
            "--ids",
            ids.to_str().unwrap(),
            "--seq",
            "4",
            "--windows",
            "1",
        ]),
        &["encoder_ln_gelu.onnx", "ids.npy"],
    );
}

#[test]
fn bad_counts_are_refused() {
    let dir = scratch("counts");
    let ids = dir.join("ids.npy");
    write_ids(&ids, &[1, 2, 3, 4]);
    let m = fixture("llama_ts.onnx");
    let (m, i) = (m.to_str().unwrap(), ids.to_str().unwrap());
    fails(
        &perqc(&["eval", m, "--ids", i, "--seq", "4", "--windows", "0"]),
        &["--windows must be at least 1"],
    );
    fails(
        &perqc(&["eval", m, "--ids", i, "--seq", "4", "--threads", "0"]),
        &["--threads must be at least 1"],
    );
}

#[test]
fn fewer_windows_than_asked_are_reported() {
    let dir = scratch("fewer");
    let ids = dir.join("ids.npy");
    let v: Vec<i64> = (0..50).map(|i| (i * 7 + 3) % 256).collect();
    write_ids(&ids, &v);
    let m = fixture("llama_ts.onnx");
    let o = perqc(&[
        "eval",
        m.to_str().unwrap(),
        "--ids",
        ids.to_str().unwrap(),
        "--seq",
        "24",
        "--windows",
        "16",
        "--quiet",
    ]);
    ppl(&o);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("ids.npy makes 2 windows of 24 tokens; scoring 2 of the 16 asked"),
        "{stderr}"
    );
}

/// A W4A4 file scored on the integer kernels (the default), on the float kernels
/// (`--no-int`) and op by op without canonicalization (`--as-is`): the run says which, and
/// the three perplexities agree (the fixture's
/// weights are random, so no code flips matter at this size; on SmolLM2 the two differ
/// by 0.05-0.4%, see docs/runtime.md).
#[test]
fn integer_plan_and_float_plan_agree() {
    let dir = scratch("int_plan");
    let q = dir.join("w4a4.onnx");
    let (tok, text) = (fixture("tiny_tokenizer.json"), fixture("tiny_text.txt"));
    let compiled = perqc(&[
        fixture("llama_ts.onnx").to_str().unwrap(),
        "-o",
        q.to_str().unwrap(),
        "--calib-text",
        text.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--calib-seqs",
        "2",
        "--calib-len",
        "64",
        "--rounding",
        "rtn",
        "--quiet",
    ]);
    assert!(
        compiled.status.success(),
        "{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let run = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            q.to_str().unwrap(),
            "--tokenizer",
            tok.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--seq",
            "64",
            "--windows",
            "4",
        ];
        args.extend_from_slice(extra);
        perqc(&args)
    };
    let (int, float, as_is) = (run(&[]), run(&["--no-int"]), run(&["--as-is"]));
    let said = String::from_utf8_lossy(&int.stderr);
    let simd =
        perqc_ops::kernels::igemm::Level::detect() != perqc_ops::kernels::igemm::Level::Scalar;
    if simd {
        assert!(
            said.contains("integer kernels") && said.contains("quantized linears"),
            "{said}"
        );
    } else {
        assert!(said.contains("run on the float kernels"), "{said}");
    }
    for plain in [&float, &as_is] {
        assert!(!String::from_utf8_lossy(&plain.stderr).contains("integer kernels"));
    }
    let (a, b, c) = (ppl(&int), ppl(&float), ppl(&as_is));
    assert!(
        (a - b).abs() <= 1e-3 * b,
        "integer plan {a} vs float plan {b}"
    );
    assert!(
        (c - b).abs() <= 1e-4 * b,
        "op by op {c} vs canonical float plan {b}"
    );
}
