//! Which linear is the model's head (kept float by the W4A4 recipe), on real export shapes:
//! only the LM head of a decoder, none of an encoder that returns its hidden states, and
//! no key/value projection whose result is also a KV cache output.

use perqc_passes::quantize::sites;
use std::path::PathBuf;

fn heads(name: &str) -> (Vec<String>, usize) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(name);
    let mut model = perqc_onnx::load(&path).expect("fixture loads").model;
    perqc_passes::canonicalize(&mut model).expect("canonicalizes");
    let all = sites::linears(&model.graph);
    // The node's name and its weight's (dynamo exports name nodes `node_linear_N`).
    let heads = all
        .iter()
        .filter(|s| s.head)
        .map(|s| format!("{} {}", s.name, model.graph.value(s.weight).name))
        .collect();
    (heads, all.len())
}

#[test]
fn a_decoder_has_its_lm_head() {
    for f in ["llama_ts.onnx", "llama_dynamo.onnx", "gemma_like.onnx"] {
        let (h, n) = heads(f);
        assert_eq!(h.len(), 1, "{f}: {h:?} of {n}");
        assert!(h[0].contains("lm_head"), "{f}: {h:?}");
    }
}

/// The residual stream is the output: o_proj and the FFN's output projection write into it
/// through residual Adds and LayerNorms, which mix them with other data.
#[test]
fn an_encoder_without_a_task_layer_has_no_head() {
    for f in ["encoder_ln_gelu.onnx", "hf/bert.onnx"] {
        let (h, n) = heads(f);
        assert!(h.is_empty(), "{f}: {h:?} of {n}");
        assert_eq!(n, 12, "{f}");
    }
}

/// The packed QKV projection of layer 1 also writes `present.1.key/value`: not a head.
#[test]
fn a_kv_cache_output_does_not_make_a_head() {
    let (h, _) = heads("ort_kv_decoder.onnx");
    assert_eq!(h.len(), 1, "{h:?}");
    assert!(h[0].contains("lm_head"), "{h:?}");
}

/// A projection whose result is a graph output on its own (a prefill's `present` value) and
/// also read by a later linear: the later one is the head.
#[test]
fn a_linear_with_a_linear_after_it_is_not_a_head() {
    let text = "model ir=10 opsets=[ai.onnx:18, ai.perqc:1]
graph main(%x: f32[2, 4]) -> (%y, %present_v) {
  const %wv: f32[4, 4] = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
  const %wo: f32[4, 4] = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
  const %shape: i64[3] = [0, 2, 2]
  %v = ai.perqc::Linear(%x, %wv, _) {transB = 0}  // v_proj
  %present_v = Reshape(%v, %shape) {allowzero = 0}  // present
  %y = ai.perqc::Linear(%v, %wo, _) {transB = 0}  // o_proj
}
";
    let model = perqc_ir::parse_model(text).expect("parses");
    let s = sites::linears(&model.graph);
    let heads: Vec<&str> = s
        .iter()
        .filter(|s| s.head)
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(heads, ["o_proj"]);
}
