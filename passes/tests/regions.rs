//! The region analysis on the fixtures: counts, dimensions, heads and legality, for both
//! Llama exports, the LayerNorm encoder and the packed-weight decoder.

use perqc_passes::regions::{RegionKind, Regions, TransformKind};
use std::path::PathBuf;

fn regions(name: &str) -> Regions {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(name);
    let mut model = perqc_onnx::load(&path).expect("fixture loads").model;
    perqc_passes::canonicalize(&mut model).expect("canonicalizes");
    let shapes = perqc_ops::infer_model(&model).expect("shapes");
    Regions::find(&model, &shapes)
}

fn count(r: &Regions, kind: RegionKind) -> usize {
    r.of_kind(kind).count()
}

/// The tiny Llama (2 layers, d 64, MLP 192, 4 query / 2 key-value heads of 16) has the
/// shape SmolLM2 has: one residual region (embedding, o_proj and down_proj write it;
/// q/k/v/gate/up of every layer and the lm_head read it), one mlp and one attention_vo
/// region per layer, and query-key regions that rotary embeddings block.
fn llama(name: &str) {
    let r = regions(name);
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
        assert!(qk.why_not(TransformKind::Permutation).is_some(), "rotary");
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
