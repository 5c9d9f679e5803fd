//! The native executor against ONNX Runtime and against itself.
//!
//! Each fixture runs natively on fixed inputs; the inputs and native outputs are written as
//! `.npy` files with a `"native"` conformance case, which `tests/conformance/ort_compare.py`
//! checks by running the model in ONNX Runtime on the same inputs (no Python at
//! `cargo test` time). The torchscript and dynamo exports of the same Llama must also agree
//! with each other natively.

mod common;

use common::{Compare, conformance_case, fixture, kv_decoder_feeds, native_case, out_dir};
use ndarray::{ArrayD, IxDyn};
use perqc_runtime::{RtTensor, Session, SessionOptions};

/// Deterministic pseudo-random numbers (64-bit LCG, top bits).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn normal_ish(&mut self) -> f32 {
        // Sum of 4 uniforms, centred and scaled to unit variance.
        let s: f32 = (0..4)
            .map(|_| self.next() as f32 / (1u64 << 31) as f32)
            .sum();
        (s - 2.0) * 3f32.sqrt()
    }
}

fn ids(batch: usize, seq: usize, seed: u64) -> RtTensor {
    let mut r = Lcg(seed);
    let v: Vec<i64> = (0..batch * seq).map(|_| (r.next() % 256) as i64).collect();
    RtTensor::i64(ArrayD::from_shape_vec(IxDyn(&[batch, seq]), v).unwrap())
}

fn hidden(batch: usize, seq: usize, seed: u64) -> RtTensor {
    let mut r = Lcg(seed);
    let v: Vec<f32> = (0..batch * seq * 64).map(|_| r.normal_ish()).collect();
    RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[batch, seq, 64]), v).unwrap())
}

/// Builds a fixture input of `[batch, seq, ..]` from a seed.
type MakeInput = fn(usize, usize, u64) -> RtTensor;

/// A session on the canonical form of fixture `name` (what `perqc eval` runs).
fn session(name: &str, threads: usize) -> Session {
    let mut loaded = perqc_onnx::load(&fixture(name)).unwrap_or_else(|e| panic!("{e}"));
    perqc_passes::canonicalize(&mut loaded.model).unwrap_or_else(|e| panic!("{name}: {e}"));
    Session::with_options(&loaded.model, &SessionOptions { threads })
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn fixtures_agree_with_onnx_runtime() {
    let out = out_dir("runtime_agreement");
    let cases: [(&str, &str, MakeInput); 4] = [
        ("llama_ts.onnx", "input_ids", ids),
        ("llama_dynamo.onnx", "input_ids", ids),
        ("gemma_like.onnx", "input_ids", ids),
        ("encoder_ln_gelu.onnx", "hidden", hidden),
    ];
    for (model, input, make) in cases {
        let sess = session(model, 2);
        for (k, (batch, seq)) in [(1, 7), (2, 5)].into_iter().enumerate() {
            let x = make(batch, seq, 17 + k as u64);
            let outs = sess
                .run(&[(input, x.clone())])
                .unwrap_or_else(|e| panic!("{model}: {e}"));
            assert_eq!(outs.len(), 1);
            let want = if input == "input_ids" { 256 } else { 64 };
            assert_eq!(outs[0].1.shape(), &[batch, seq, want], "{model}");
            let stem = model.trim_end_matches(".onnx");
            native_case(
                &format!("native_{stem}_{k}"),
                &out,
                &fixture(model),
                &[(input, &x)],
                &outs,
                1e-4,
            );
        }
    }
}

/// Hugging Face exports by torch's dynamo exporter: OPT computes its position ids with
/// CumSum and BERT its token type ids with GatherElements. Token ids stay below 70, inside
/// every fixture's vocabulary.
#[test]
fn hf_opt_and_bert_agree_with_onnx_runtime() {
    let out = out_dir("runtime_agreement_hf");
    for (model, width) in [("hf/opt.onnx", 256), ("hf/bert.onnx", 64)] {
        let sess = session(model, 2);
        for (k, (batch, seq)) in [(1, 7), (2, 5)].into_iter().enumerate() {
            let mut r = Lcg(31 + k as u64);
            let v: Vec<i64> = (0..batch * seq).map(|_| (r.next() % 70) as i64).collect();
            let x = RtTensor::i64(ArrayD::from_shape_vec(IxDyn(&[batch, seq]), v).unwrap());
            let outs = sess
                .run(&[("input_ids", x.clone())])
                .unwrap_or_else(|e| panic!("{model}: {e}"));
            assert_eq!(outs.len(), 1);
            assert_eq!(outs[0].1.shape(), &[batch, seq, width], "{model}");
            let out0 = outs[0].1.as_f32().expect("f32 result");
            assert!(out0.iter().all(|v| v.is_finite()), "{model}");
            let stem = model.trim_start_matches("hf/").trim_end_matches(".onnx");
            native_case(
                &format!("native_hf_{stem}_{k}"),
                &out,
                &fixture(model),
                &[("input_ids", &x)],
                &outs,
                1e-4,
            );
        }
    }
}

#[test]
fn torchscript_and_dynamo_llama_agree_natively() {
    let ts = session("llama_ts.onnx", 1);
    let dy = session("llama_dynamo.onnx", 2);
    for (k, (batch, seq)) in [(1, 9), (3, 4)].into_iter().enumerate() {
        let x = ids(batch, seq, 99 + k as u64);
        let a = ts.run(&[("input_ids", x.clone())]).unwrap();
        let b = dy.run(&[("input_ids", x)]).unwrap();
        let (a, b) = (a[0].1.as_f32().unwrap(), b[0].1.as_f32().unwrap());
        assert_eq!(a.shape(), b.shape());
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
        let err = a
            .iter()
            .zip(b.iter())
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err / scale <= 1e-5, "relative error {}", err / scale);
    }
}

#[test]
fn control_flow_agrees_with_onnx_runtime() {
    // If (both branches), Loop with a scan output, Scan, and f16/bf16/int casts.
    let model = fixture("control_flow.onnx");
    let loaded = perqc_onnx::load(&model).unwrap();
    let s = Session::new(&loaded.model).unwrap();
    let dir = out_dir("native_control_flow");
    let x = RtTensor::F32(
        ndarray::ArrayD::from_shape_vec(
            ndarray::IxDyn(&[2, 3]),
            vec![0.5, -1.0, 2.0, 3.0, -0.25, 1.5],
        )
        .unwrap()
        .into_shared(),
    );
    for flag in [true, false] {
        let f = RtTensor::Bool(ndarray::arr0(flag).into_dyn().into_shared());
        let feeds = [("x", x.clone()), ("flag", f.clone())];
        let out = s.run(&feeds).unwrap();
        assert_eq!(out.len(), 3);
        native_case(
            &format!("native_control_flow_{flag}"),
            &dir,
            &model,
            &[("x", &x), ("flag", &f)],
            &out,
            1e-5,
        );
    }
}

#[test]
fn fused_ops_agree_with_onnx_runtime() {
    // The kernels the fused chains run, on the ONNX ops' own semantics: Attention with
    // grouped heads and float / bool / is_causal masks, RMSNormalization, Swish.
    let model = fixture("fused_ops.onnx");
    let s = session("fused_ops.onnx", 2);
    let dir = out_dir("native_fused_ops");
    let mut r = Lcg(3);
    let mut t = |shape: &[usize]| {
        let n = shape.iter().product();
        RtTensor::f32(
            ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(|_| r.normal_ish()).collect()).unwrap(),
        )
    };
    let (q, k, v, x) = (
        t(&[1, 4, 6, 8]),
        t(&[1, 2, 6, 8]),
        t(&[1, 2, 6, 8]),
        t(&[2, 5, 8]),
    );
    // Every third entry masked (-1e30, below the fixture's -1 threshold), row 2 fully.
    let m: Vec<f32> = (0..36)
        .map(|i| {
            if i % 3 == 0 || i / 6 == 2 {
                -1e30
            } else {
                0.25
            }
        })
        .collect();
    let m = RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[1, 1, 6, 6]), m).unwrap());
    let feeds = [("q", q), ("k", k), ("v", v), ("m", m), ("x", x)];
    let out = s.run(&feeds).unwrap();
    assert_eq!(out.len(), 5);
    let named: Vec<(&str, &RtTensor)> = feeds.iter().map(|(n, t)| (*n, t)).collect();
    native_case("native_fused_ops", &dir, &model, &named, &out, 1e-5);
}

#[test]
fn ort_contrib_ops_agree_with_onnx_runtime() {
    // The contrib ops of onnxruntime-genai's builder, on ONNX Runtime's CPU semantics:
    // SimplifiedLayerNormalization (+ inv_std_var), SkipSimplifiedLayerNormalization (+ the
    // sum), RotaryEmbedding (half split with [B, S] positions, interleaved 4-d with a start
    // position, partial), MatMulNBits (4-bit with zero points and K not a multiple of the
    // block, 8-bit with bias), GroupQueryAttention (packed prefill with rotary over 2
    // batches; interleaved rotary with a local window and softcap; separate q/k/v after a
    // past of 3 with a custom scale).
    let model = fixture("ort_contrib_ops.onnx");
    let s = session("ort_contrib_ops.onnx", 2);
    let dir = out_dir("native_ort_contrib_ops");
    let mut r = Lcg(11);
    let mut t = |shape: &[usize]| {
        let n = shape.iter().product();
        RtTensor::f32(
            ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(|_| r.normal_ish()).collect()).unwrap(),
        )
    };
    let i32s = |shape: &[usize], v: Vec<i32>| {
        RtTensor::I32(
            ArrayD::from_shape_vec(IxDyn(shape), v)
                .unwrap()
                .into_shared(),
        )
    };
    let pos = vec![0, 1, 2, 3, 4, 7, 3, 9, 0, 15];
    let feeds = [
        ("x", t(&[2, 5, 32])),
        ("skip", t(&[2, 5, 32])),
        ("xr", t(&[2, 5, 32])),
        ("xr4", t(&[2, 2, 5, 16])),
        (
            "pos",
            RtTensor::i64(ArrayD::from_shape_vec(IxDyn(&[2, 5]), pos).unwrap()),
        ),
        ("a", t(&[2, 5, 40])),
        ("a8", t(&[3, 32])),
        ("qkv", t(&[2, 6, 128])),
        ("seqlens", i32s(&[2], vec![5, 5])),
        ("total", i32s(&[1], vec![6])),
        ("q", t(&[1, 4, 64])),
        ("k", t(&[1, 4, 32])),
        ("v", t(&[1, 4, 32])),
        ("past_k", t(&[1, 2, 3, 16])),
        ("past_v", t(&[1, 2, 3, 16])),
        ("seqlens2", i32s(&[1], vec![6])),
        ("total2", i32s(&[1], vec![7])),
    ];
    let out = s.run(&feeds).unwrap();
    assert_eq!(out.len(), 16);
    let named: Vec<(&str, &RtTensor)> = feeds.iter().map(|(n, t)| (*n, t)).collect();
    native_case("native_ort_contrib_ops", &dir, &model, &named, &out, 1e-5);
}

#[test]
fn kv_cache_decoder_agrees_with_onnx_runtime() {
    // A builder-style decoder fed an empty KV cache (past length 0), an all-ones mask and
    // positions 0..seq: logits and the present key/value outputs.
    let model = fixture("ort_kv_decoder.onnx");
    let s = session("ort_kv_decoder.onnx", 2);
    let dir = out_dir("native_ort_kv_decoder");
    for (k, (batch, seq)) in [(1, 9), (2, 5)].into_iter().enumerate() {
        let feeds = kv_decoder_feeds(ids(batch, seq, 40 + k as u64));
        let named: Vec<(&str, RtTensor)> =
            feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let out = s.run(&named).unwrap();
        assert_eq!(out[0].1.shape(), &[batch, seq, 256]);
        assert_eq!(out[1].1.shape(), &[batch, 2, seq, 16]);
        let refs: Vec<(&str, &RtTensor)> = named.iter().map(|(n, t)| (*n, t)).collect();
        native_case(
            &format!("native_ort_kv_decoder_{k}"),
            &dir,
            &model,
            &refs,
            &out,
            1e-5,
        );
    }
}

#[test]
fn unsupported_ops_are_reported_before_running() {
    let loaded = perqc_onnx::load(&fixture("custom_domain.onnx")).unwrap();
    let err = Session::new(&loaded.model)
        .err()
        .expect("the custom-domain op has no kernel");
    let msg = err.to_string();
    assert!(
        msg.contains("Mystery") && msg.contains("perqc.test"),
        "{msg}"
    );
}

#[test]
fn bad_feeds_are_errors() {
    let sess = session("llama_ts.onnx", 1);
    let f = RtTensor::f32(ArrayD::zeros(IxDyn(&[1, 3])));
    assert!(sess.run(&[("input_ids", f)]).is_err());
    assert!(sess.run(&[]).is_err());
    let big = RtTensor::i64(ArrayD::from_elem(IxDyn(&[1, 3]), 100_000));
    let err = sess.run(&[("input_ids", big)]).unwrap_err().to_string();
    assert!(err.contains("Gather"), "{err}");
}

/// Watches one value and counts the calls.
struct Watch(Vec<String>, usize);

impl perqc_runtime::Observer for Watch {
    fn watched(&self) -> &[String] {
        &self.0
    }
    fn observe(&mut self, _: &str, _: &RtTensor) -> Result<(), perqc_runtime::RuntimeError> {
        self.1 += 1;
        Ok(())
    }
}

#[test]
fn canonical_attention_rms_norm_and_silu_match_the_exported_graph() {
    // Both exporters' attention chains (MatMul, Mul, Add mask, Softmax, [Cast], MatMul), RMS
    // norms and SiLUs must canonicalize into one op each, compute the same logits, and a
    // value the canonical graph no longer has cannot be observed.
    for name in ["llama_ts.onnx", "llama_dynamo.onnx"] {
        let loaded = perqc_onnx::load(&fixture(name)).unwrap();
        let mut canon = loaded.model.clone();
        perqc_passes::canonicalize(&mut canon).unwrap();
        perqc_ir::verify(&canon).unwrap();
        let opts = SessionOptions { threads: 2 };
        let fused = Session::with_options(&canon, &opts).unwrap();
        let plain = Session::with_options(&loaded.model, &opts).unwrap();
        let g = &loaded.model.graph;
        let softmaxes: Vec<String> = g
            .node_order()
            .iter()
            .map(|&id| g.node(id))
            .filter(|n| n.op_type == "Softmax")
            .map(|n| g.value(n.outputs()[0].unwrap()).name.clone())
            .collect();
        assert!(!softmaxes.is_empty(), "{name}");
        // Transpose, MatMul, Mul, Add, Softmax (+ casts) collapse into one Attention step
        // per layer, which reads the 2 shared KV heads instead of their Expand copies.
        let count = |s: &Session, op: &str| s.step_ops().filter(|o| *o == op).count();
        assert_eq!(count(&fused, "Attention"), softmaxes.len(), "{name}");
        assert_eq!(count(&fused, "Softmax"), 0, "{name}");
        // Every RMS norm (Pow, ReduceMean, Add, Sqrt, 1/x, Mul, [Cast], Mul) is one step.
        assert_eq!(count(&fused, "ReduceMean"), 0, "{name}");
        // SiLU: Mul(g, Sigmoid(g)) is one Swish step.
        assert_eq!(count(&fused, "Sigmoid"), 0, "{name}");
        assert_eq!(count(&fused, "Swish"), count(&plain, "Sigmoid"), "{name}");
        assert_eq!(
            count(&fused, "RMSNormalization"),
            count(&plain, "ReduceMean"),
            "{name}"
        );
        assert_eq!(
            count(&plain, "Expand") - count(&fused, "Expand"),
            2 * softmaxes.len(),
            "{name}"
        );
        // Rotary embeddings (Slice, Slice, Neg, Concat, Mul, Mul, Add) on q and k: one
        // Rotary step each.
        assert_eq!(count(&fused, "Neg"), 0, "{name}");
        assert_eq!(count(&fused, "Rotary"), count(&plain, "Neg"), "{name}");
        assert_eq!(count(&fused, "Rotary"), 2 * softmaxes.len(), "{name}");
        for (k, (batch, seq)) in [(1, 13), (2, 6)].into_iter().enumerate() {
            let x = ids(batch, seq, 5 + k as u64);
            let a = fused.run(&[("input_ids", x.clone())]).unwrap();
            let b = plain.run(&[("input_ids", x.clone())]).unwrap();
            let (a, b) = (a[0].1.as_f32().unwrap(), b[0].1.as_f32().unwrap());
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = a
                .iter()
                .zip(b.iter())
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                err <= 1e-6 * scale,
                "{name}: canonical vs exported error {err}"
            );
        }
        let x = ids(1, 4, 1);
        let mut w = Watch(vec![softmaxes[0].clone()], 0);
        let err = fused
            .run_observed(&[("input_ids", x.clone())], &mut w)
            .unwrap_err();
        assert!(err.to_string().contains("no value"), "{err}");
        plain.run_observed(&[("input_ids", x)], &mut w).unwrap();
        assert_eq!(w.1, 1);
    }
}

/// Gemma 2 soft-caps its attention logits (`t · tanh(s / t)` between the scaling and the
/// mask): each layer's chain (MatMul, Mul, Div, Tanh, Mul, Add mask, Softmax, MatMul)
/// fuses into one Attention step with `softcap`, whose logits match the exported graph
/// natively and in ONNX Runtime. Lowered at the model's opset 18 the cap is the Div / Tanh /
/// Mul chain again, which fuses back; at opset 23 it is ONNX Attention's `softcap`. Both
/// run in ONNX Runtime and agree with the original.
#[test]
fn gemma2_soft_capped_attention_fuses_and_agrees_with_onnx_runtime() {
    let name = "hf/gemma2.onnx";
    let loaded = perqc_onnx::load(&fixture(name)).unwrap();
    let mut canon = loaded.model.clone();
    perqc_passes::canonicalize(&mut canon).unwrap();
    perqc_ir::verify(&canon).unwrap();
    let g = &loaded.model.graph;
    let layers = g.nodes().filter(|(_, n)| n.op_type == "Softmax").count();
    assert_eq!(layers, 2, "{name}: one attention Softmax per layer");
    let capped: Vec<Option<f32>> = canon
        .graph
        .nodes()
        .filter(|(_, n)| n.op_type == "Attention")
        .map(|(_, n)| n.attr_float("softcap"))
        .collect();
    assert_eq!(
        capped,
        vec![Some(50.0); layers],
        "{name}: one capped Attention per layer"
    );
    let opts = SessionOptions { threads: 2 };
    let fused = Session::with_options(&canon, &opts).unwrap();
    let plain = Session::with_options(&loaded.model, &opts).unwrap();
    let count = |s: &Session, op: &str| s.step_ops().filter(|o| *o == op).count();
    assert_eq!(count(&fused, "Attention"), layers);
    assert_eq!(count(&fused, "Softmax"), 0);
    // Only the final logits' cap (Div, Tanh, Mul) keeps its Tanh: the layers' caps are in
    // the Attention steps, the MLPs' tanh in Gelu steps.
    assert_eq!(count(&fused, "Tanh"), 1);
    let out = out_dir("runtime_agreement_gemma2");
    for (k, (batch, seq)) in [(1, 13), (2, 6)].into_iter().enumerate() {
        let x = ids(batch, seq, 41 + k as u64);
        let a = fused.run(&[("input_ids", x.clone())]).unwrap();
        let b = plain.run(&[("input_ids", x.clone())]).unwrap();
        let (fa, fb) = (a[0].1.as_f32().unwrap(), b[0].1.as_f32().unwrap());
        let scale = fb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = fa
            .iter()
            .zip(fb.iter())
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err <= 1e-5 * scale, "{name}: fused vs exported error {err}");
        native_case(
            &format!("native_hf_gemma2_fused_{k}"),
            &out,
            &fixture(name),
            &[("input_ids", &x)],
            &a,
            1e-4,
        );
    }
    let attention = |m: &perqc_ir::Model, op: &str| {
        m.graph
            .nodes()
            .filter(|(_, n)| n.op_type == op && n.attr_float("softcap") == Some(50.0))
            .count()
    };
    // Opset 18: the chain, which canonicalizes back.
    let mut low = canon.clone();
    perqc_passes::lower_for_export(&mut low).unwrap();
    assert_eq!(attention(&low, "Attention"), 0);
    let mut again = low.clone();
    perqc_passes::canonicalize(&mut again).unwrap();
    assert_eq!(
        attention(&again, "Attention"),
        layers,
        "lowered chain fuses back"
    );
    let path = out.join("lowered_opset18.onnx");
    perqc_onnx::save(&low, &path, &Default::default()).unwrap();
    conformance_case(
        "gemma2_attention_lowered_opset18",
        &fixture(name),
        &path,
        Compare::Close(1e-4),
    );
    // Opset 23: ONNX Attention with softcap.
    let mut up = canon.clone();
    perqc_passes::opset::upgrade(&mut up, 23).unwrap();
    perqc_passes::lower_for_export(&mut up).unwrap();
    assert_eq!(attention(&up, "Attention"), layers);
    assert!(
        up.graph
            .nodes()
            .all(|(_, n)| n.domain.is_empty() || n.domain == "ai.onnx")
    );
    let path = out.join("lowered_opset23.onnx");
    perqc_onnx::save(&up, &path, &Default::default()).unwrap();
    conformance_case(
        "gemma2_attention_lowered_opset23",
        &fixture(name),
        &path,
        Compare::Close(1e-4),
    );
}

#[test]
fn fused_rotary_is_bitwise_the_exported_chain() {
    // fuse-rotary alone changes only the rotary steps, whose kernel computes the chain's
    // products and sum: the logits are equal bit for bit (1 and 2 threads, two shapes), and
    // `lower` writes a chain that fuses back into the same graph.
    for name in ["llama_ts.onnx", "llama_dynamo.onnx"] {
        let plain = perqc_onnx::load(&fixture(name)).unwrap().model;
        let mut fused = plain.clone();
        let mut p = perqc_passes::registry()
            .build("fuse-rotary,dce")
            .expect("pipeline");
        let report = perqc_ir::PassManager::new()
            .run(&mut fused, &mut p, &mut perqc_ir::RunOptions::default())
            .unwrap();
        perqc_ir::verify(&fused).unwrap();
        let rotary = |m: &perqc_ir::Model| {
            m.graph
                .nodes()
                .filter(|(_, n)| n.op_type == "Rotary")
                .count()
        };
        assert!(rotary(&fused) >= 2, "{name}: {report:?}");
        let mut round = fused.clone();
        perqc_passes::lower_for_export(&mut round).unwrap();
        assert_eq!(rotary(&round), 0, "{name}");
        let mut p = perqc_passes::registry()
            .build("fuse-rotary,dce")
            .expect("pipeline");
        perqc_ir::PassManager::new()
            .run(&mut round, &mut p, &mut perqc_ir::RunOptions::default())
            .unwrap();
        assert_eq!(
            rotary(&round),
            rotary(&fused),
            "{name}: lowered chain fuses back"
        );
        for threads in [1, 2] {
            let opts = SessionOptions { threads };
            let sessions =
                [&plain, &fused, &round].map(|m| Session::with_options(m, &opts).unwrap());
            for (k, (batch, seq)) in [(1, 13), (2, 6)].into_iter().enumerate() {
                let x = ids(batch, seq, 11 + k as u64);
                let out: Vec<Vec<u32>> = sessions
                    .iter()
                    .map(|s| {
                        let o = s.run(&[("input_ids", x.clone())]).unwrap();
                        o[0].1
                            .as_f32()
                            .unwrap()
                            .iter()
                            .map(|v| v.to_bits())
                            .collect()
                    })
                    .collect();
                assert!(out[0] == out[1], "{name}: fused rotary differs");
                assert!(out[0] == out[2], "{name}: lowered rotary differs");
            }
        }
    }
}

/// `[b, b]` natural-order Sylvester matrix times `1/√b` (PeRQ's online rotation).
fn sylvester(b: usize) -> perqc_ir::Tensor {
    let c = 1.0 / (b as f32).sqrt();
    let v: Vec<f32> = (0..b * b)
        .map(|k| {
            if ((k / b) & (k % b)).count_ones().is_multiple_of(2) {
                c
            } else {
                -c
            }
        })
        .collect();
    perqc_ir::Tensor::from_f32(vec![b as i64, b as i64], &v)
}

#[test]
fn lowered_hadamard_agrees_with_onnx_runtime() {
    // ai.perqc::Hadamard on [batch, seq, 192] with b = 32 and b = 64 (the fast transform)
    // and a rotation that is no Sylvester matrix (12 Givens-like blocks: the dense path),
    // run natively, then lowered to Reshape -> MatMul -> Reshape and saved: ONNX Runtime
    // must reproduce the native outputs within 1e-5 of their max.
    use perqc_ir::{DType, Dim, Graph, Model, NodeSpec, OpsetImport, Type};
    let mut g = Graph::new("online_hadamard");
    let dims = vec![
        Dim::Sym("batch".into()),
        Dim::Sym("seq".into()),
        Dim::Known(192),
    ];
    let x = g
        .add_input("x", Some(Type::tensor(DType::F32, Some(dims))))
        .unwrap();
    // A fixed 12 x 12 rotation: each pair (2i, 2i+1) turned by its own angle, then pairs
    // swapped cyclically (orthogonal, not ±c everywhere).
    let mut rot = vec![0f32; 144];
    for i in 0..6 {
        let t = 0.4 + 0.3 * i as f32;
        let (c, s) = (t.cos(), t.sin());
        let (r0, r1) = (2 * i, 2 * i + 1);
        let (c0, c1) = (2 * ((i + 1) % 6), 2 * ((i + 1) % 6) + 1);
        rot[r0 * 12 + c0] = c;
        rot[r0 * 12 + c1] = -s;
        rot[r1 * 12 + c0] = s;
        rot[r1 * 12 + c1] = c;
    }
    let mut outs = Vec::new();
    for (name, h) in [
        ("h32", sylvester(32)),
        ("h64", sylvester(64)),
        ("r12", perqc_ir::Tensor::from_f32(vec![12, 12], &rot)),
    ] {
        let h = g.add_initializer(name, h).unwrap();
        let mut spec = NodeSpec::new("Hadamard").named(&format!("rotate_{name}"));
        spec.domain = perqc_ops::PERQC_DOMAIN.to_string();
        let y = format!("y_{name}");
        g.add_node(spec, &[Some(x), Some(h)], &[&y]).unwrap();
        outs.push(g.find(&y).unwrap());
    }
    g.outputs = outs;
    let import = |d: Option<&str>, v| OpsetImport {
        domain: d.map(Into::into),
        version: Some(v),
    };
    let mut model = Model {
        ir_version: Some(8),
        opset_imports: vec![import(None, 18), import(Some(perqc_ops::PERQC_DOMAIN), 1)],
        graph: g,
        ..Default::default()
    };
    let map = perqc_ops::infer_model(&model).unwrap();
    perqc_ops::apply(&mut model.graph, &map).unwrap();
    perqc_ir::verify(&model).unwrap();
    let native = Session::with_options(&model, &SessionOptions { threads: 2 }).unwrap();

    let mut lowered = model.clone();
    perqc_passes::lower_for_export(&mut lowered).unwrap();
    perqc_ir::verify(&lowered).unwrap();
    let ops: Vec<&str> = lowered
        .graph
        .node_order()
        .iter()
        .map(|&n| lowered.graph.node(n).op_type.as_str())
        .collect();
    assert_eq!(ops, ["Reshape", "MatMul", "Reshape"].repeat(3));
    assert!(lowered.opset(perqc_ops::PERQC_DOMAIN).is_none());
    // And back: canonicalize finds the three rotations again.
    let mut again = lowered.clone();
    perqc_passes::canonicalize(&mut again).unwrap();
    assert_eq!(
        perqc_ir::print_model(&again),
        perqc_ir::print_model(&model),
        "lower -> canonicalize is not the identity"
    );
    let dir = out_dir("native_hadamard");
    let path = dir.join("hadamard_lowered.onnx");
    perqc_onnx::save(&lowered, &path, &Default::default()).unwrap();
    conformance_case("hadamard_lowered_checker", &path, &path, Compare::CheckOnly);
    let plain = Session::with_options(&lowered, &SessionOptions { threads: 1 }).unwrap();
    for (k, (batch, seq)) in [(2, 7), (1, 5)].into_iter().enumerate() {
        let mut r = Lcg(70 + k as u64);
        let v: Vec<f32> = (0..batch * seq * 192).map(|_| r.normal_ish()).collect();
        let xt = RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[batch, seq, 192]), v).unwrap());
        let out = native.run(&[("x", xt.clone())]).unwrap();
        assert_eq!(out.len(), 3);
        // The lowered graph natively (the MatMul kernel) within round-off.
        let dense = plain.run(&[("x", xt.clone())]).unwrap();
        for ((name, a), (_, b)) in out.iter().zip(&dense) {
            let (a, b) = (a.as_f32().unwrap(), b.as_f32().unwrap());
            assert_eq!(a.shape(), &[batch, seq, 192]);
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(err <= 1e-6 * scale, "{name}: {err} vs max {scale}");
        }
        native_case(
            &format!("native_hadamard_{k}"),
            &dir,
            &path,
            &[("x", &xt)],
            &out,
            1e-5,
        );
    }
}
