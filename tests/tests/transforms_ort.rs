//! The exact transforms, each alone and chained as the recipe chains them, emitted as ONNX:
//! ONNX Runtime must run every file (onnx.checker accepts it) and give the original
//! fixture's outputs within 1e-4 relative (max abs error / max abs value), on both Llama
//! exports, the Gemma-like decoder, the encoder and the Hugging Face exports with fused
//! projections (Phi-3, GPT-2, GPT-NeoX), Gemma 2 (soft-capped attention) and KV-cache
//! exports (optimum's form, and ONNX Runtime's model builder's). Registered as conformance
//! cases for `scripts/check`.

mod common;

use common::{Compare, conformance_case, decoder_feeds, fixture, kv_decoder_feeds, out_dir};
use perqc_ir::{PassManager, RunOptions};

const PIPELINES: [(&str, &str); 6] = [
    (
        "permute",
        "permute(method=random,seed=5,residual=true,heads=true,block=16)",
    ),
    ("fold_norms", "fold-norms"),
    ("rotate", "fold-norms,rotate"),
    (
        "rotate_block",
        "fold-norms,rotate(residual=block,heads=block,block=8,signs=3)",
    ),
    ("online_hadamard", "online-hadamard(block=32)"),
    (
        "chain",
        "permute(method=random,seed=1,block=32),fold-norms,rotate,online-hadamard(block=32)",
    ),
];

/// The recipe's exact transforms in its order (a random permutation: no calibration data).
const RECIPE: &str = "permute(method=random,seed=1,block=32),center-stream,fold-norms(rotatable-only=true),rotate,online-hadamard(block=32)";

/// Runs [`RECIPE`] on `model` and returns the report with its counts of residual streams
/// rotated, value/output heads rotated (`heads`: the counter's name, folded or online), mlp
/// regions permuted and online Hadamards.
fn run_recipe(
    model: &mut perqc_ir::Model,
    name: &str,
    heads: &str,
) -> (perqc_ir::Report, (u64, u64, u64, u64)) {
    let mut p = perqc_passes::registry().build(RECIPE).expect("pipeline");
    let report = PassManager::new()
        .run(model, &mut p, &mut RunOptions::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let counts = (
        report.counter("rotate", "residual-rotated"),
        report.counter("rotate", heads),
        report.counter("permute", "regions-permuted"),
        report.counter("online-hadamard", "regions-rotated"),
    );
    (report, counts)
}

fn emit(fixture_name: &str, tag: &str, pipeline: &str) {
    emit_within(fixture_name, tag, pipeline, 1e-4);
}

/// [`emit`] with tolerance `rtol` against the original in ONNX Runtime (a half model runs
/// there in f16, the transformed one computes in f32: their difference is the half
/// model's own arithmetic error).
fn emit_within(fixture_name: &str, tag: &str, pipeline: &str, rtol: f64) {
    let src = fixture(fixture_name);
    let mut model = perqc_onnx::load(&src).expect("loads").model;
    perqc_passes::canonicalize(&mut model).expect("canonicalizes");
    let mut p = perqc_passes::registry().build(pipeline).expect("pipeline");
    PassManager::new()
        .run(&mut model, &mut p, &mut RunOptions::default())
        .unwrap_or_else(|e| panic!("{fixture_name} {pipeline}: {e}"));
    perqc_passes::lower_for_export(&mut model).expect("lowers");
    let stem = fixture_name.trim_end_matches(".onnx").replace('/', "_");
    let dir = out_dir(&format!("transforms_{stem}_{tag}"));
    let out = dir.join("model.onnx");
    perqc_onnx::save(&model, &out, &Default::default()).expect("saves");
    conformance_case(
        &format!("transform_{stem}_{tag}"),
        &src,
        &out,
        Compare::Close(rtol),
    );
}

#[test]
fn llama_torchscript() {
    for (tag, p) in PIPELINES {
        emit("llama_ts.onnx", tag, p);
    }
}

#[test]
fn llama_dynamo() {
    for (tag, p) in PIPELINES {
        emit("llama_dynamo.onnx", tag, p);
    }
}

/// The Gemma-like decoder: the residual rotation is refused (post-norm gammas), the rest
/// applies.
#[test]
fn gemma_like() {
    for (tag, p) in PIPELINES {
        emit("gemma_like.onnx", tag, p);
    }
}

/// The encoder: the residual rotation is refused (the stream is the graph's input), the
/// rest applies.
#[test]
fn encoder() {
    for (tag, p) in PIPELINES {
        emit("encoder_ln_gelu.onnx", tag, p);
    }
}

/// Phi-3: one `qkv_proj` sliced into q, k and v, one `gate_up_proj` split into gate and up.
/// The value part of qkv_proj's columns and o_proj take R2 and the heads permutation; the
/// mlp region pairs gate's and up's column j, so the permutations move both halves of
/// gate_up_proj's columns alike, and the online Hadamard goes before down_proj.
#[test]
fn phi3_fused_projections() {
    for (tag, p) in PIPELINES {
        emit("hf/phi3.onnx", tag, p);
    }
}

/// GPT-2: Conv1D (Gemm) writing q, k and v, split into three along the channels.
#[test]
fn gpt2_fused_qkv() {
    for (tag, p) in PIPELINES {
        emit("hf/gpt2.onnx", tag, p);
    }
}

/// GPT-NeoX: the fused projection (and its bias, shared with other layers' linears in this
/// export) reshaped to [B, S, H, 3·D] and split per head on the last axis: the value part
/// is every head's last third.
#[test]
fn gpt_neox_fused_qkv_per_head() {
    for (tag, p) in PIPELINES {
        emit("hf/gpt_neox.onnx", tag, p);
    }
}

/// Gemma 2 (fixtures/hf): its soft-capped attention canonicalizes into Attention with
/// `softcap`, so the V/O head rotation applies; the residual rotation is refused (post-norm
/// gammas), the rest applies. Lowered at opset 18, the cap is written back as its chain.
#[test]
fn gemma2_soft_capped_attention() {
    for (tag, p) in PIPELINES {
        emit("hf/gemma2.onnx", tag, p);
    }
}

/// Every output of `got` within `tol` of `want`'s (max abs error over max |want|, per
/// output; half outputs compared as f32).
fn assert_outputs_close(
    what: &str,
    want: &[(String, perqc_runtime::RtTensor)],
    got: &[(String, perqc_runtime::RtTensor)],
    tol: f64,
) {
    assert_eq!(want.len(), got.len(), "{what}: outputs");
    for ((name, a), (_, b)) in want.iter().zip(got) {
        assert_eq!(a.shape(), b.shape(), "{what} {name}");
        let (a, b) = (common::floats(a), common::floats(b));
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let err = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        let rel = f64::from(err / scale);
        assert!(rel < tol, "{what} {name}: relative error {rel:e}");
    }
}

/// The builder-style KV-cache decoder with layer 1's o_proj made a float MatMul (the
/// fixture's is MatMulNBits, which no transform can fold into): the GroupQueryAttention
/// output it reads forms an online-only region, so `rotate` applies R2 online there (an
/// `ai.perqc::Hadamard` of one head before o_proj, its transpose folded into o_proj's
/// rows). The logits and every present key/value equal the original's: natively here, and
/// in ONNX Runtime through the registered cases (valid cache inputs, not random ones).
#[test]
fn kv_decoder_online_head_rotation() {
    use ndarray::{ArrayD, IxDyn};
    use perqc_ir::{NodeSpec, Tensor};
    use perqc_runtime::{RtTensor, Session, SessionOptions};

    let mut model = perqc_onnx::load(&fixture("ort_kv_decoder.onnx"))
        .expect("loads")
        .model;
    let g = &mut model.graph;
    let o = g
        .nodes()
        .find(|(_, n)| n.name == "/model/layers.1/attn/o_proj/MatMulNBits")
        .map(|(id, _)| id)
        .expect("layer 1 o_proj");
    let (k, n) = {
        let node = g.node(o);
        (
            node.attr_int("K").unwrap() as usize,
            node.attr_int("N").unwrap() as usize,
        )
    };
    let w: Vec<f32> = (0..k * n)
        .map(|i| (((i * 7919) % 113) as f32 / 113.0 - 0.5) / (k as f32).sqrt())
        .collect();
    let wv = g
        .add_initializer(
            "model.layers.1.attn.o_proj.weight",
            Tensor::from_slice(vec![k as i64, n as i64], &w),
        )
        .unwrap();
    let x = g.node(o).input(0);
    g.set_op(o, NodeSpec::new("MatMul"), &[x, Some(wv)])
        .unwrap();
    let dir = out_dir("transforms_ort_kv_decoder_online");
    let reference = dir.join("reference.onnx");
    perqc_onnx::save(&model, &reference, &Default::default()).expect("saves");

    perqc_passes::canonicalize(&mut model).expect("canonicalizes");
    let session = |m: &perqc_ir::Model| Session::with_options(m, &SessionOptions { threads: 2 });
    let before = session(&model).expect("session");
    let mut p = perqc_passes::registry()
        .build("fold-norms,rotate")
        .expect("pipeline");
    let mut opts = perqc_ir::RunOptions::default();
    let report = PassManager::new()
        .run(&mut model, &mut p, &mut opts)
        .expect("runs");
    let text = format!("{report:?}");
    assert!(
        text.contains("R2 online") && text.contains("heads-rotated-online"),
        "{text}"
    );
    let had: Vec<_> = model
        .graph
        .nodes()
        .filter(|(_, n)| n.op_type == "Hadamard")
        .map(|(_, n)| n.name.clone())
        .collect();
    assert_eq!(had.len(), 1, "one online head rotation: {had:?}");
    let after = session(&model).expect("session");
    perqc_passes::lower_for_export(&mut model).expect("lowers");
    let out = dir.join("model.onnx");
    perqc_onnx::save(&model, &out, &Default::default()).expect("saves");

    for (case, (batch, seq)) in [(1, 9), (2, 5)].into_iter().enumerate() {
        let ids: Vec<i64> = (0..batch * seq)
            .map(|i| ((i * 37 + 11) % 256) as i64)
            .collect();
        let feeds = kv_decoder_feeds(RtTensor::i64(
            ArrayD::from_shape_vec(IxDyn(&[batch, seq]), ids).unwrap(),
        ));
        let named: Vec<(&str, RtTensor)> =
            feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let want = before.run(&named).expect("runs");
        let got = after.run(&named).expect("runs");
        assert_eq!(want.len(), 5, "logits and four present tensors");
        assert_outputs_close("kv decoder", &want, &got, 1e-4);
        let refs: Vec<(&str, &RtTensor)> = named.iter().map(|(n, t)| (*n, t)).collect();
        common::native_case(
            &format!("transform_ort_kv_decoder_online_{case}"),
            &dir,
            &out,
            &refs,
            &want,
            1e-4,
        );
    }
}

/// The LayerNorm decoders (GPT-2, OPT, GPT-NeoX, Phi, StableLM): `center-stream` centers
/// every writer of the residual stream and turns its LayerNorms into RMS norms (β into the
/// readers' biases), so that `fold-norms` folds their gammas and `rotate` applies R1. No
/// LayerNorm is left, and ONNX Runtime gives the original's outputs. The encoder's stream
/// is its graph input: nothing is centered there, and it stays exact.
#[test]
fn layer_norm_streams_centered_and_rotated() {
    const CENTERED: [(&str, &str); 2] = [
        ("center_rotate", "center-stream,fold-norms,rotate"),
        ("center_chain", RECIPE),
    ];
    for name in [
        "hf/gpt2.onnx",
        "hf/opt.onnx",
        "hf/gpt_neox.onnx",
        "hf/phi.onnx",
        "hf/stablelm.onnx",
    ] {
        let mut model = perqc_onnx::load(&fixture(name)).expect("loads").model;
        perqc_passes::canonicalize(&mut model).expect("canonicalizes");
        let mut p = perqc_passes::registry()
            .build("center-stream,fold-norms(rotatable-only=true)")
            .expect("pipeline");
        PassManager::new()
            .run(&mut model, &mut p, &mut RunOptions::default())
            .expect("runs");
        let left = model
            .graph
            .nodes()
            .filter(|(_, n)| n.op_type == "LayerNormalization")
            .count();
        assert_eq!(left, 0, "{name}: {left} LayerNorms left");
        let regions = <perqc_passes::regions::Regions as perqc_ir::Analysis>::compute(&model)
            .expect("regions");
        let residual = regions
            .of_kind(perqc_passes::regions::RegionKind::Residual)
            .next()
            .expect("a residual region");
        let why = residual.why_not(perqc_passes::regions::TransformKind::Rotation);
        assert!(
            why.is_none(),
            "{name}: no rotation after centering: {why:?}"
        );
        for (tag, p) in CENTERED {
            emit(name, tag, p);
        }
    }
    for (tag, p) in CENTERED {
        emit("encoder_ln_gelu.onnx", tag, p);
    }
}

/// Optimum-style KV-cache decoders (fixtures/hf `*_kv.onnx`, torchscript exports: cache in as
/// `past_key_values.*`, out as `present.*`). The value heads leave the graph as the cache, so
/// no rotation folds into v_proj; R2 goes online at each o_proj (a Hadamard of one head on
/// its input, the transpose folded into its rows) and the rest of the recipe applies: R1
/// (GPT-2 after `center-stream`, through the exporter's `Identity`-shared biases, no-op
/// Casts and `Shape` readers), the mlp permutations and the online Hadamards. With a cache
/// of 3 positions the logits and every present key/value equal the original's, natively and
/// in ONNX Runtime; the registered transform cases run them with an empty cache.
#[test]
fn kv_cache_exports_online_head_rotation() {
    use ndarray::{ArrayD, IxDyn};
    use perqc_runtime::{RtTensor, Session, SessionOptions};
    for name in [
        "hf/qwen2_kv.onnx",
        "hf/gpt2_kv.onnx",
        "hf/phi3_kv.onnx",
        "hf/qwen2_kv_fp16.onnx",
    ] {
        // Measured: the half export against its f32 computation in ONNX Runtime, 6.6e-4.
        let rtol = if name.contains("fp16") { 5e-3 } else { 1e-4 };
        // Natively both compute in f32; a half output rounds each to 11 bits, so one step of
        // that rounding (2^-11 of the value) is the margin there.
        let tol: f64 = if name.contains("fp16") { 1e-3 } else { 1e-4 };
        for (tag, p) in PIPELINES {
            emit_within(name, tag, p, rtol);
        }
        let mut model = perqc_onnx::load(&fixture(name)).expect("loads").model;
        perqc_passes::canonicalize(&mut model).expect("canonicalizes");
        let session =
            |m: &perqc_ir::Model| Session::with_options(m, &SessionOptions { threads: 2 });
        let before = session(&model).expect("session");
        let (report, counts) = run_recipe(&mut model, name, "heads-rotated-online");
        assert_eq!(
            counts,
            (1, 2, 2, 2),
            "{name}: R1, R2 online per layer, mlp permutations and Hadamards\n{report}"
        );
        // The value channels stop at the online Hadamard R2 put before o_proj: transformed
        // there, so no pass reports them as skipped.
        let notes: Vec<&String> = report.passes.iter().flat_map(|p| &p.notes).collect();
        assert!(
            !notes
                .iter()
                .any(|n| n.contains("form no region") && n.contains("ai.perqc::Hadamard")),
            "{name}: {notes:#?}"
        );
        let after = session(&model).expect("session");
        perqc_passes::lower_for_export(&mut model).expect("lowers");
        let stem = name.trim_end_matches(".onnx").replace('/', "_");
        let dir = out_dir(&format!("transforms_{stem}_cache"));
        let out = dir.join("model.onnx");
        perqc_onnx::save(&model, &out, &Default::default()).expect("saves");
        for (case, (batch, seq)) in [(1, 7), (2, 4)].into_iter().enumerate() {
            let ids: Vec<i64> = (0..batch * seq)
                .map(|i| ((i * 37 + 11) % 256) as i64)
                .collect();
            let ids = RtTensor::i64(ArrayD::from_shape_vec(IxDyn(&[batch, seq]), ids).unwrap());
            let feeds = decoder_feeds(&model, ids, 3, case as u64);
            let named: Vec<(&str, RtTensor)> =
                feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
            let want = before.run(&named).expect("runs");
            let got = after.run(&named).expect("runs");
            assert_eq!(want.len(), 5, "{name}: logits and four present tensors");
            assert_eq!(want[2].1.shape()[2], 3 + seq, "{name}: the cache grew");
            assert_outputs_close(name, &want, &got, tol);
            let refs: Vec<(&str, &RtTensor)> = named.iter().map(|(n, t)| (*n, t)).collect();
            common::native_case(
                &format!("transform_{stem}_cache_{case}"),
                &dir,
                &out,
                &refs,
                &want,
                tol,
            );
        }
    }
}

/// transformers' default attention, SDPA, as the torchscript exporter decomposes it
/// (fixtures/hf/qwen2_sdpa.onnx): q and kᵀ each scaled by sqrt(scale), the probabilities
/// guarded by `Where(IsNaN(p), 0, p)`, and the repeated values' shape read by `Shape`. The
/// attention fuses (`zero_masked_rows = 1`), the channels that only reach `Shape` do not stop
/// the value heads, and the recipe's transforms apply as on the eager export: R1, R2
/// folded into v_proj and o_proj, the mlp permutations and Hadamards.
///
/// The dynamo exporter (qwen2_sdpa_dynamo.onnx) transposes k through 3-d Reshapes
/// (`Reshape(Transpose(Reshape(k, [-1, L, D]), [0, 2, 1]), [B, H, D, L])`), read as kᵀ.
#[test]
fn sdpa_export() {
    for name in ["hf/qwen2_sdpa.onnx", "hf/qwen2_sdpa_dynamo.onnx"] {
        sdpa_case(name);
    }
}

fn sdpa_case(name: &str) {
    for (tag, p) in PIPELINES {
        emit(name, tag, p);
    }
    emit(name, "recipe", RECIPE);
    let mut model = perqc_onnx::load(&fixture(name)).expect("loads").model;
    perqc_passes::canonicalize(&mut model).expect("canonicalizes");
    let fused: Vec<_> = model
        .graph
        .nodes()
        .filter(|(_, n)| n.op_type == "Attention")
        .map(|(_, n)| n.attr_int("zero_masked_rows"))
        .collect();
    assert_eq!(
        fused,
        [Some(1), Some(1)],
        "{name}: both layers' attention fused"
    );
    let (report, counts) = run_recipe(&mut model, name, "heads-rotated");
    assert_eq!(counts, (1, 2, 2, 2), "{name}: {report}");
}
