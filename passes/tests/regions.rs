//! The region analysis on the fixtures: counts, dimensions, heads and legality, for both
//! Llama exports, the Gemma-like decoder, the LayerNorm encoder and the packed-weight decoder.

use perqc_ir::Model;
use perqc_passes::regions::{Region, RegionKind, Regions, TransformKind};
use std::path::PathBuf;

fn regions(name: &str) -> Regions {
    regions_of(name).1
}

/// The canonicalized fixture and its regions.
fn regions_of(name: &str) -> (Model, Regions) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(name);
    let mut model = perqc_onnx::load(&path).expect("fixture loads").model;
    perqc_passes::canonicalize(&mut model).expect("canonicalizes");
    let shapes = perqc_ops::infer_model(&model).expect("shapes");
    let r = Regions::find(&model, &shapes);
    (model, r)
}

fn count(r: &Regions, kind: RegionKind) -> usize {
    r.of_kind(kind).count()
}

/// The tiny Llama (2 layers, d 64, MLP 192, 4 query / 2 key-value heads of 16) has the
/// shape SmolLM2 has: one residual region (embedding, o_proj and down_proj write it;
/// q/k/v/gate/up of every layer and the lm_head read it), one mlp and one attention_vo
/// region per layer, and query-key regions that rotary embeddings block.
fn llama(name: &str) {
    let (model, r) = regions_of(name);
    assert_eq!(count(&r, RegionKind::Residual), 1, "{}", r.summary());
    assert_eq!(count(&r, RegionKind::Mlp), 2, "{}", r.summary());
    assert_eq!(count(&r, RegionKind::AttentionVo), 2, "{}", r.summary());
    assert_eq!(count(&r, RegionKind::AttentionQk), 2, "{}", r.summary());

    let res = r.of_kind(RegionKind::Residual).next().unwrap();
    assert_eq!(res.dim, 64);
    assert_eq!(
        res.sources.len(),
        1 + 2 * 2,
        "embedding + o_proj and down_proj per layer"
    );
    assert_eq!(
        res.sinks.len(),
        2 * 5 + 1,
        "q/k/v/gate/up per layer + lm_head"
    );
    assert_eq!(
        res.params.len(),
        2 * 2 + 1,
        "two norms per layer + the final norm"
    );
    assert!(res.why_not(TransformKind::Permutation).is_none());
    let why = res
        .why_not(TransformKind::Rotation)
        .expect("gammas block rotations");
    assert!(why.contains("fold-norms"), "{why}");

    for mlp in r.of_kind(RegionKind::Mlp) {
        assert_eq!(mlp.dim, 192);
        assert_eq!((mlp.sources.len(), mlp.sinks.len()), (2, 1));
        assert!(mlp.why_not(TransformKind::Permutation).is_none());
        assert!(mlp.why_not(TransformKind::Rotation).is_some());
        scales_through_up_alone(&model, mlp);
    }
    // The residual stream's scales stop at the norms; the value/output heads take them
    // whole (v_proj is their only source).
    let why = res.why_not(TransformKind::Scale).expect("norms");
    assert!(why.contains("RMSNormalization"), "{why}");
    for vo in r.of_kind(RegionKind::AttentionVo) {
        assert!(vo.why_not(TransformKind::SignedScale).is_none());
        assert_eq!(vo.sources_for(TransformKind::Scale).len(), vo.sources.len());
    }
    for vo in r.of_kind(RegionKind::AttentionVo) {
        assert_eq!(vo.dim, 32, "2 key/value heads of 16");
        let h = vo.heads.expect("heads");
        assert_eq!((h.heads, h.kv_heads, h.head_dim), (4, 2, 16));
        assert!(vo.why_not(TransformKind::Rotation).is_none());
        // o_proj reads 4 query heads: each key/value head's channels twice.
        let sink = &vo.sinks[0];
        assert_eq!(sink.channels.len(), 64);
        assert_eq!(&sink.channels[..16], &sink.channels[16..32]);
        assert_eq!(vo.groups.iter().filter(|&&g| g == 0).count(), 16);
    }
    for qk in r.of_kind(RegionKind::AttentionQk) {
        assert_eq!(qk.sources.len(), 2, "q_proj and k_proj");
        let why = qk.why_not(TransformKind::Permutation).expect("rotary");
        assert!(why.contains("ai.perqc::Rotary"), "{why}");
    }
}

/// A gated mlp `down(act(gate(x)) ⊙ up(x))`: a channel scale goes through the product's
/// `up` factor alone (the activation does not commute with it), so it folds into up_proj
/// and not gate_proj, any sign.
fn scales_through_up_alone(model: &Model, mlp: &Region) {
    let g = &model.graph;
    // The op reading a source's output.
    let reader = |node| {
        let out = g.node(node).output(0).expect("a result");
        let u = g.value(out).uses()[0].node;
        g.node(u).op_type.clone()
    };
    let gate: Vec<String> = mlp.sources.iter().map(|e| reader(e.node)).collect();
    assert!(
        gate.iter().any(|op| op == "Swish" || op == "Gelu"),
        "{gate:?}"
    );
    for kind in [TransformKind::Scale, TransformKind::SignedScale] {
        assert!(mlp.why_not(kind).is_none(), "{:?}", mlp.why_not(kind));
        let into = mlp.sources_for(kind);
        assert_eq!(into.len(), 1);
        assert_eq!(reader(into[0].node), "Mul", "up_proj feeds the product");
    }
}

#[test]
fn llama_torchscript_regions() {
    llama("llama_ts.onnx");
}

#[test]
fn llama_dynamo_regions() {
    llama("llama_dynamo.onnx");
}

/// The Gemma-like decoder (2 layers, d 64, sandwich norms, GeGLU 256, q/k norms, 2 query
/// heads over 1 key/value head of 256, every norm scaled by a folded `1 + w`):
///
/// - one residual region: the embedding (scaled by a constant `sqrt(64)`, which commutes
///   with everything), o_proj and down_proj write it. o_proj and down_proj reach it
///   *through* the post-norms (an RMS norm passes its channels on), so the post-norms'
///   gammas are parameters of the stream, next to the pre-norms' and the final norm's.
///   Permutations are legal (they permute the gammas too); rotations are not while any
///   gamma is non-uniform. `fold-norms` folds the pre-norms and the final norm into their
///   readers but cannot fold a post-norm, whose output is added to the residual, so
///   rotations stay illegal (transforms.rs checks the notes and the reason after it);
/// - one mlp region per layer (gate and up write, down_proj reads): the tanh GELU and the
///   gate product commute with permutations only;
/// - one attention_qk region per layer, 2 query heads over 1 key/value head of 256 (the
///   q/k norms' gammas are its parameters), blocked by the rotary embedding.
///
/// The attention_vo regions are missing, and the query-key regions lack k_proj: see
/// `gemma_attention_regions_with_one_key_value_head`.
#[test]
fn gemma_regions() {
    let (model, r) = regions_of("gemma_like.onnx");
    assert_eq!(count(&r, RegionKind::Residual), 1, "{}", r.summary());
    assert_eq!(count(&r, RegionKind::Mlp), 2, "{}", r.summary());
    assert_eq!(count(&r, RegionKind::AttentionQk), 2, "{}", r.summary());

    let res = r.of_kind(RegionKind::Residual).next().unwrap();
    assert_eq!(res.dim, 64);
    assert_eq!(
        res.sources.len(),
        1 + 2 * 2,
        "embedding + o_proj and down_proj per layer"
    );
    assert_eq!(
        res.sinks.len(),
        2 * 5 + 1,
        "q/k/v/gate/up per layer + lm_head"
    );
    // By node name (the trace's discovery order is not part of the contract).
    let mut norms: Vec<&str> = res
        .params
        .iter()
        .map(|p| res.node_name(p.node).rsplit('/').nth(1).unwrap())
        .collect();
    norms.sort_unstable();
    assert_eq!(
        norms,
        [
            "input_layernorm",
            "input_layernorm",
            "norm",
            "post_attention_layernorm",
            "post_attention_layernorm",
            "post_feedforward_layernorm",
            "post_feedforward_layernorm",
            "pre_feedforward_layernorm",
            "pre_feedforward_layernorm",
        ],
        "four sandwich norms per layer + the final norm; the q/k norms are not on the stream"
    );
    assert!(res.why_not(TransformKind::Permutation).is_none());
    let why = res
        .why_not(TransformKind::Rotation)
        .expect("gammas block rotations");
    assert!(
        why.contains("input_layernorm") && why.contains("not uniform"),
        "{why}"
    );
    assert!(res.why_not(TransformKind::Scale).is_some(), "RMS norms");

    for mlp in r.of_kind(RegionKind::Mlp) {
        assert_eq!(mlp.dim, 256);
        assert_eq!((mlp.sources.len(), mlp.sinks.len()), (2, 1));
        assert!(mlp.heads.is_none());
        assert!(mlp.why_not(TransformKind::Permutation).is_none());
        let why = mlp.why_not(TransformKind::Rotation).expect("GELU");
        assert!(why.contains("Gelu"), "{why}");
        scales_through_up_alone(&model, mlp);
    }
    for qk in r.of_kind(RegionKind::AttentionQk) {
        assert_eq!(qk.dim, 256);
        let h = qk.heads.expect("heads");
        assert_eq!((h.heads, h.kv_heads, h.head_dim), (2, 1, 256));
        let norms: Vec<&str> = qk.params.iter().map(|p| qk.node_name(p.node)).collect();
        assert!(
            norms.len() == 2 && norms[0].contains("/q_norm/") && norms[1].contains("/k_norm/"),
            "{norms:?}"
        );
        let why = qk.why_not(TransformKind::Permutation).expect("rotary");
        assert!(why.contains("ai.perqc::Rotary"), "{why}");
    }
}

/// The attention of the Gemma-like decoder (one key/value head): per layer an attention_vo
/// region (v_proj writes 256 channels, o_proj reads them twice: heads 2 / kv 1 / head dim
/// 256; every transform legal, R2 applies `H_256`) and an attention_qk region written by
/// q_proj *and* k_proj (through the q/k norms; blocked by the rotary embedding). The
/// exporter's `Reshape [B, S, 256] -> [B, S, 1, 256]` makes the size-1 heads axis: the
/// Reshape rule answers `Regroup` for a new size-1 axis in front of the channels, and the
/// regrouped run takes it in, so attention repeats that head over the query heads.
#[test]
fn gemma_attention_regions_with_one_key_value_head() {
    let r = regions("gemma_like.onnx");
    assert_eq!(count(&r, RegionKind::AttentionVo), 2, "{}", r.summary());
    assert_eq!(count(&r, RegionKind::AttentionQk), 2, "{}", r.summary());
    for vo in r.of_kind(RegionKind::AttentionVo) {
        assert_eq!(vo.dim, 256, "1 key/value head of 256");
        let h = vo.heads.expect("heads");
        assert_eq!((h.heads, h.kv_heads, h.head_dim), (2, 1, 256));
        assert!(vo.why_not(TransformKind::Rotation).is_none());
        let sink = &vo.sinks[0];
        assert_eq!(sink.channels.len(), 512, "o_proj reads the head twice");
        assert_eq!(&sink.channels[..256], &sink.channels[256..]);
    }
    for qk in r.of_kind(RegionKind::AttentionQk) {
        assert_eq!(qk.sources.len(), 2, "q_proj and k_proj");
        let why = qk.why_not(TransformKind::Permutation).expect("rotary");
        assert!(why.contains("ai.perqc::Rotary"), "{why}");
    }
}

/// Post-LN BERT: the residual stream is the graph's input and output (no transform can be
/// folded there), the LayerNorm only permutes; attention and MLP regions are legal, with
/// their biases as sources.
#[test]
fn encoder_regions() {
    let r = regions("encoder_ln_gelu.onnx");
    assert_eq!(count(&r, RegionKind::Residual), 1, "{}", r.summary());
    assert_eq!(count(&r, RegionKind::Mlp), 2);
    assert_eq!(count(&r, RegionKind::AttentionVo), 2);
    assert_eq!(count(&r, RegionKind::AttentionQk), 2);
    let res = r.of_kind(RegionKind::Residual).next().unwrap();
    let why = res.why_not(TransformKind::Permutation).unwrap();
    assert!(why.contains("input `hidden`"), "{why}");
    for mlp in r.of_kind(RegionKind::Mlp) {
        assert_eq!(mlp.dim, 256);
        assert_eq!(
            (mlp.sources.len(), mlp.sinks.len()),
            (2, 1),
            "fc1 weight and bias"
        );
        assert!(mlp.why_not(TransformKind::Permutation).is_none());
        // fc2(gelu(fc1 x + b)): no factor to take a scale past the GELU.
        let why = mlp.why_not(TransformKind::Scale).expect("GELU");
        assert!(why.contains("Gelu") && why.contains("scales"), "{why}");
    }
    for qk in r.of_kind(RegionKind::AttentionQk) {
        assert!(qk.why_not(TransformKind::Rotation).is_none());
        assert!(qk.why_not(TransformKind::Scale).is_some());
    }
}

/// Packed 4-bit weights cannot take a transform: the region says so at each.
#[test]
fn packed_weights_block() {
    let r = regions("ort_kv_decoder.onnx");
    let res = r.of_kind(RegionKind::Residual).next().expect("residual");
    let why = res.why_not(TransformKind::Permutation).unwrap();
    assert!(
        why.contains("MatMulNBits") && why.contains("packed"),
        "{why}"
    );
}

#[test]
fn json_has_the_documented_fields() {
    let r = regions("llama_ts.onnx");
    let j = r.to_json();
    let first = &j["regions"][0];
    for key in [
        "kind",
        "dim",
        "sources",
        "sinks",
        "heads",
        "head_dim",
        "kv_heads",
        "blocked_by",
    ] {
        assert!(first.get(key).is_some(), "missing {key}: {first}");
    }
    assert!(r.to_dot().starts_with("digraph regions {"));
}

/// The columns of a weight a region's endpoint covers (`None`: all of them).
fn columns(e: &perqc_passes::regions::Endpoint) -> Option<Vec<usize>> {
    e.part.clone()
}

/// Phi-3 computes q, k and v with one `qkv_proj` (q 64, k 32, v 32 columns) sliced along
/// the channels, and gate and up with one `gate_up_proj` split in halves. The slices hand
/// each part its columns, so the trace from qkv_proj is cut into the query-key region (q
/// and k, blocked by the rotary embedding) and the value/output region (v's columns and
/// o_proj, every transform legal), and the gated mlp pairs gate's and up's column `j`
/// (the product `silu(gate) · up` pairs them): one region of 192 channels whose source is
/// read twice.
#[test]
fn phi3_fused_projections_regions() {
    let r = regions("hf/phi3.onnx");
    assert_eq!(count(&r, RegionKind::Residual), 1, "{}", r.summary());
    assert_eq!(count(&r, RegionKind::AttentionQk), 2, "{}", r.summary());
    assert_eq!(count(&r, RegionKind::AttentionVo), 2, "{}", r.summary());
    assert_eq!(count(&r, RegionKind::Mlp), 2, "{}", r.summary());
    assert!(r.unformed.is_empty(), "{}", r.summary());
    for vo in r.of_kind(RegionKind::AttentionVo) {
        assert_eq!(vo.dim, 32);
        let h = vo.heads.expect("heads");
        assert_eq!((h.heads, h.kv_heads, h.head_dim), (4, 2, 16));
        assert_eq!(vo.sources.len(), 1);
        let src = &vo.sources[0];
        assert_eq!(columns(src), Some((96..128).collect()), "v's columns");
        assert_eq!(src.channels, (0..32).collect::<Vec<u32>>());
        for k in [
            TransformKind::Permutation,
            TransformKind::Rotation,
            TransformKind::Scale,
        ] {
            assert!(vo.why_not(k).is_none(), "{:?}", vo.why_not(k));
        }
        assert_eq!(vo.sources_for(TransformKind::Scale).len(), 1);
        assert_eq!(vo.sinks[0].part, None);
    }
    for qk in r.of_kind(RegionKind::AttentionQk) {
        assert_eq!(qk.dim, 32, "2 key heads of 16, each read by 2 query heads");
        assert_eq!(columns(&qk.sources[0]), Some((0..96).collect()));
        let why = qk.why_not(TransformKind::Permutation).expect("rotary");
        assert!(why.contains("ai.perqc::Rotary"), "{why}");
    }
    for mlp in r.of_kind(RegionKind::Mlp) {
        assert_eq!(mlp.dim, 192);
        assert_eq!((mlp.sources.len(), mlp.sinks.len()), (1, 1));
        let src = &mlp.sources[0];
        assert_eq!(columns(src), None, "gate and up: every column");
        let want: Vec<u32> = (0..192).chain(0..192).collect();
        assert_eq!(src.channels, want, "gate's and up's column j are channel j");
        assert!(mlp.why_not(TransformKind::Permutation).is_none());
        let why = mlp.why_not(TransformKind::Rotation).expect("SiLU");
        assert!(why.contains("Swish"), "{why}");
        // A scale of channel j would scale gate's column j too, which SiLU does not pass.
        let why = mlp
            .why_not(TransformKind::Scale)
            .expect("gate shares the weight");
        assert!(why.contains("Swish"), "{why}");
    }
}

/// GPT-2's Conv1D writes q, k and v as one [64, 192] weight, split in three along the
/// channels: v is columns 128..192.
#[test]
fn gpt2_fused_qkv_regions() {
    let r = regions("hf/gpt2.onnx");
    assert_eq!(count(&r, RegionKind::AttentionVo), 2, "{}", r.summary());
    assert_eq!(count(&r, RegionKind::AttentionQk), 2, "{}", r.summary());
    assert_eq!(count(&r, RegionKind::Mlp), 2, "{}", r.summary());
    for vo in r.of_kind(RegionKind::AttentionVo) {
        assert_eq!(vo.dim, 64);
        let h = vo.heads.expect("heads");
        assert_eq!((h.heads, h.kv_heads, h.head_dim), (4, 4, 16));
        assert_eq!(columns(&vo.sources[0]), Some((128..192).collect()));
        assert!(vo.why_not(TransformKind::Rotation).is_none());
    }
    // No rotary embedding: q and k (columns 0..128) take any orthogonal map together.
    for qk in r.of_kind(RegionKind::AttentionQk) {
        assert_eq!(columns(&qk.sources[0]), Some((0..128).collect()));
        assert!(qk.why_not(TransformKind::Rotation).is_none());
    }
}

/// GPT-NeoX reshapes its fused projection to [B, S, 4 heads, 3 · 16] and splits the last
/// axis: the value part is the last 16 of every head's 48 columns, in the weight and in
/// its bias alike. The query and key parts meet a partial rotary embedding (a slice of
/// each head, concatenated back) and form no region, which does not block the values.
#[test]
fn gpt_neox_per_head_split_regions() {
    let r = regions("hf/gpt_neox.onnx");
    assert_eq!(count(&r, RegionKind::AttentionVo), 2, "{}", r.summary());
    assert_eq!(count(&r, RegionKind::Mlp), 2, "{}", r.summary());
    let want: Vec<usize> = (0..4).flat_map(|h| h * 48 + 32..h * 48 + 48).collect();
    for vo in r.of_kind(RegionKind::AttentionVo) {
        assert_eq!(vo.dim, 64);
        let h = vo.heads.expect("heads");
        assert_eq!((h.heads, h.kv_heads, h.head_dim), (4, 4, 16));
        assert_eq!(vo.sources.len(), 2, "weight and bias");
        for src in &vo.sources {
            assert_eq!(columns(src), Some(want.clone()));
            assert_eq!(src.channels, (0..64).collect::<Vec<u32>>());
        }
        assert!(vo.why_not(TransformKind::Rotation).is_none());
        assert!(vo.barriers.is_empty(), "{:?}", vo.barriers);
    }
}

/// The ONNX Runtime builder's decoder: layer 1's packed q/k/v projection feeds
/// GroupQueryAttention, whose packed heads stop the channels before any weight reads them;
/// the analysis says so (the recipe's passes print it).
#[test]
fn packed_qkv_is_reported() {
    let r = regions("ort_kv_decoder.onnx");
    assert_eq!(r.unformed.len(), 1, "{}", r.summary());
    let note = r.unformed_notes().remove(0);
    assert!(
        note.contains("qkv_proj") && note.contains("GroupQueryAttention"),
        "{note}"
    );
}

/// Phi's partial rotary embedding concatenates each layer's q and k parts back, so their
/// channels (64 each: Phi has as many key/value heads as query heads) form no region, in
/// both layers: the passes' notes give one line for the one cause, not four.
#[test]
fn unformed_notes_share_a_line_per_cause() {
    let r = regions("hf/phi.onnx");
    assert_eq!(r.unformed.len(), 4, "{}", r.summary());
    let notes = r.unformed_notes();
    assert_eq!(notes.len(), 1, "{notes:#?}");
    assert!(
        notes[0].contains("Concat") && notes[0].ends_with("(and the same for 3 more linears)"),
        "{notes:?}"
    );
}

/// The tracer reaches a slice's result *backward* (from the other operand of an Add) and
/// widens it to the sliced value, whose other channels get ids of their own: the region
/// holds `w1`'s columns 15 down to 8 (`y[.., 15:7:-1]`) paired with `w2`'s columns, and
/// leaves `w1`'s first 8 columns out. A random
/// permutation and a Hadamard applied through the mechanism then touch only those columns
/// of `w1` and keep the output: checked on the native runtime.
#[test]
fn slice_reached_backward_takes_a_part_of_the_weight() {
    use perqc_ir::{DType, Dim, Graph, NodeSpec, Tensor, Type};
    use perqc_passes::transform::{self, ChannelOp, Placement};
    let mut g = Graph::new("main");
    let dims = vec![Dim::Sym("b".into()), Dim::Known(8)];
    let x = g
        .add_input("x", Some(Type::tensor(DType::F32, Some(dims))))
        .unwrap();
    let seeded = |n: usize, k: u64| -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u64 * 2654435761 + k * 97) % 1000) as f32 / 500.0) - 1.0)
            .collect()
    };
    let w2 = g
        .add_initializer("w2", Tensor::from_f32(vec![8, 8], &seeded(64, 2)))
        .unwrap();
    let w1 = g
        .add_initializer("w1", Tensor::from_f32(vec![8, 16], &seeded(128, 1)))
        .unwrap();
    let w3 = g
        .add_initializer("w3", Tensor::from_f32(vec![8, 4], &seeded(32, 3)))
        .unwrap();
    let starts = g
        .add_initializer("starts", Tensor::from_i64(vec![1], &[15]))
        .unwrap();
    let ends = g
        .add_initializer("ends", Tensor::from_i64(vec![1], &[7]))
        .unwrap();
    let axes = g
        .add_initializer("axes", Tensor::from_i64(vec![1], &[-1]))
        .unwrap();
    let steps = g
        .add_initializer("steps", Tensor::from_i64(vec![1], &[-1]))
        .unwrap();
    // w2's product comes first, so its trace starts the region.
    g.add_node(
        NodeSpec::new("MatMul").named("mm2"),
        &[Some(x), Some(w2)],
        &["z"],
    )
    .unwrap();
    g.add_node(
        NodeSpec::new("MatMul").named("mm1"),
        &[Some(x), Some(w1)],
        &["y"],
    )
    .unwrap();
    let (y, z) = (g.find("y").unwrap(), g.find("z").unwrap());
    g.add_node(
        NodeSpec::new("Slice").named("slice"),
        &[Some(y), Some(starts), Some(ends), Some(axes), Some(steps)],
        &["s"],
    )
    .unwrap();
    let s = g.find("s").unwrap();
    g.add_node(
        NodeSpec::new("Add").named("add"),
        &[Some(z), Some(s)],
        &["a"],
    )
    .unwrap();
    let a = g.find("a").unwrap();
    g.add_node(
        NodeSpec::new("MatMul").named("mm3"),
        &[Some(a), Some(w3)],
        &["out"],
    )
    .unwrap();
    let out = g.find("out").unwrap();
    g.outputs.push(out);
    let mut model = Model {
        ir_version: Some(10),
        opset_imports: vec![perqc_ir::OpsetImport {
            domain: None,
            version: Some(18),
        }],
        graph: g,
        ..Default::default()
    };
    let shapes = perqc_ops::infer_model(&model).expect("shapes");
    let r = Regions::find(&model, &shapes);
    assert_eq!(r.regions.len(), 1, "{}", r.summary());
    let region = r.regions[0].clone();
    assert_eq!(region.dim, 8);
    assert!(region.barriers.is_empty(), "{:?}", region.barriers);
    let src = |w: perqc_ir::ValueId| region.sources.iter().find(|e| e.weight == w).unwrap();
    assert_eq!(src(w2).part, None);
    assert_eq!(src(w2).channels, (0..8).collect::<Vec<u32>>());
    // s[k] = y[15 - k]: column 15 - k of w1 is channel k.
    assert_eq!(src(w1).part, Some((8..16).collect()));
    assert_eq!(src(w1).channels, (0..8).rev().collect::<Vec<u32>>());

    let run = |m: &Model| -> Vec<f32> {
        use perqc_runtime::RtTensor;
        let sess = perqc_runtime::Session::new(m).expect("session");
        let xs = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[3, 8]), seeded(24, 9)).unwrap();
        let outs = sess.run(&[("x", RtTensor::f32(xs))]).expect("runs");
        match &outs[0].1 {
            RtTensor::F32(a) => a.iter().copied().collect(),
            other => panic!("{other:?}"),
        }
    };
    let before = run(&model);
    let w1_before = model.graph.const_tensor(w1).unwrap().to_f32().unwrap();
    let ops = [
        ChannelOp::Permutation(vec![3, 7, 0, 5, 1, 6, 2, 4]),
        ChannelOp::hadamard(8, 8, Some(4)).unwrap(),
    ];
    for op in ops {
        transform::apply(&mut model.graph, &region, &op, Placement::Fold).expect("applies");
    }
    let w1_after = model.graph.const_tensor(w1).unwrap().to_f32().unwrap();
    for row in 0..8 {
        assert_eq!(
            w1_after[row * 16..row * 16 + 8],
            w1_before[row * 16..row * 16 + 8],
            "columns 0..8 of w1 are another part"
        );
    }
    assert_ne!(w1_after, w1_before);
    let after = run(&model);
    let max = before.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (p, q) in before.iter().zip(&after) {
        assert!((p - q).abs() <= 1e-5 * max, "{p} vs {q}");
    }
}

/// GroupQueryAttention's packed heads are a barrier for the value channels, so its result
/// (`[B, S, 4 heads · 16]`) read by a float o_proj forms an online-only attention_vo region:
/// no source, o_proj as the sink, one group per query head, nothing folds (the reason names
/// the op, "online only"). The fixture's o_proj is a packed MatMulNBits (no sink: no
/// region), so layer 1's is made a float MatMul first.
#[test]
fn packed_attention_output_is_online_only() {
    let r = regions("ort_kv_decoder.onnx");
    assert_eq!(r.online_only().count(), 0, "{}", r.summary());
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/ort_kv_decoder.onnx");
    let mut model = perqc_onnx::load(&path).expect("fixture loads").model;
    let g = &mut model.graph;
    let o = g
        .nodes()
        .find(|(_, n)| n.name == "/model/layers.1/attn/o_proj/MatMulNBits")
        .map(|(id, _)| id)
        .expect("o_proj");
    let w = g
        .add_initializer(
            "o_proj.weight",
            perqc_ir::Tensor::from_slice(vec![64, 64], &vec![0.01f32; 64 * 64]),
        )
        .unwrap();
    let x = g.node(o).input(0);
    g.set_op(o, perqc_ir::NodeSpec::new("MatMul"), &[x, Some(w)])
        .unwrap();
    perqc_passes::canonicalize(&mut model).expect("canonicalizes");
    let shapes = perqc_ops::infer_model(&model).expect("shapes");
    let r = Regions::find(&model, &shapes);
    let online: Vec<&Region> = r.online_only().collect();
    assert_eq!(online.len(), 1, "{}", r.summary());
    let o = online[0];
    assert_eq!(o.kind, RegionKind::AttentionVo);
    assert!(o.sources.is_empty() && o.barriers.is_empty());
    assert_eq!((o.sinks.len(), o.dim), (1, 64));
    let h = o.heads.expect("heads");
    assert_eq!((h.heads, h.head_dim), (4, 16));
    assert_eq!((o.groups[15], o.groups[16]), (0, 1));
    let cause = o.online_only.as_ref().unwrap();
    assert!(
        cause.at.as_deref().unwrap().contains("GroupQueryAttention"),
        "{cause:?}"
    );
    let why = o.why_not(TransformKind::Rotation).unwrap();
    assert!(
        why.contains("packed") && why.contains("online only"),
        "{why}"
    );
    assert!(r.summary().contains("online only"));
}
