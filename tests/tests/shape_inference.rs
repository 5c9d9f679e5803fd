//! Shape inference over the fixtures: every op is in the table, the outputs come out with
//! their declared shapes, the exporters' shape arithmetic resolves, and the declared
//! `value_info` of the dynamo export agrees with what is inferred.

use perqc_ir::{Dim, Model, ValueDef, verify};
use perqc_ops::{self as ops, ShapeMap};
mod common;

use common::fixture;

fn load(name: &str) -> (Model, ShapeMap) {
    let m = perqc_onnx::load(&fixture(name)).unwrap().model;
    let map = ops::infer_model(&m).unwrap_or_else(|e| panic!("{name}: {e}"));
    (m, map)
}

fn shape_str(map: &ShapeMap, m: &Model, value: &str) -> String {
    let v = m
        .graph
        .find(value)
        .unwrap_or_else(|| panic!("no value `{value}`"));
    let dims: Vec<String> = map
        .shape(v)
        .unwrap_or_else(|| panic!("`{value}` has no shape"))
        .iter()
        .map(Dim::to_string)
        .collect();
    format!("[{}]", dims.join(", "))
}

/// Node outputs whose rank or some dim stayed unknown.
fn unresolved(m: &Model, map: &ShapeMap) -> Vec<String> {
    m.graph
        .values()
        .filter(|(_, v)| matches!(v.def(), ValueDef::Node { .. }))
        .filter(|(id, _)| map.shape(*id).is_none_or(|s| s.contains(&Dim::Unknown)))
        .map(|(_, v)| v.name.clone())
        .collect()
}

#[test]
fn llama_exports_infer_fully() {
    for name in ["llama_ts.onnx", "llama_dynamo.onnx"] {
        let (m, map) = load(name);
        assert!(map.unknown_ops.is_empty(), "{name}: {:?}", map.unknown_ops);
        assert_eq!(shape_str(&map, &m, "logits"), "[batch, seq, 256]", "{name}");
        // Only the causal mask's batch*seq products have no single name.
        let left = unresolved(&m, &map);
        assert!(left.len() <= 2, "{name}: {left:?}");
    }
}

#[test]
fn torchscript_shape_arithmetic_resolves() {
    let (m, map) = load("llama_ts.onnx");
    let q = "/m/model/layers.0/self_attn/Reshape_output_0";
    let k = "/m/model/layers.0/self_attn/Transpose_1_output_0";
    assert_eq!(shape_str(&map, &m, q), "[batch, seq, 4, 16]");
    assert_eq!(shape_str(&map, &m, k), "[batch, 2, seq, 16]");
    let mask = "/m/model/Where_1_output_0";
    assert_eq!(shape_str(&map, &m, mask), "[batch, 1, seq, seq]");
}

#[test]
fn dynamo_declarations_agree_and_get_refined() {
    let (mut m, map) = load("llama_dynamo.onnx");
    let stats = ops::apply(&mut m.graph, &map).unwrap();
    assert!(stats.refined > 0, "{stats:?}");
    verify(&m).unwrap();
    // Applying again changes nothing.
    let again = ops::infer_model(&m).unwrap();
    assert_eq!(
        ops::apply(&mut m.graph, &again).unwrap(),
        Default::default()
    );
}

#[test]
fn other_fixtures() {
    let (m, map) = load("encoder_ln_gelu.onnx");
    assert!(map.unknown_ops.is_empty(), "{:?}", map.unknown_ops);
    assert_eq!(shape_str(&map, &m, "output"), "[batch, sequence, 64]");

    let (m, map) = load("control_flow.onnx");
    assert!(map.unknown_ops.is_empty(), "{:?}", map.unknown_ops);
    assert!(
        unresolved(&m, &map).is_empty(),
        "{:?}",
        unresolved(&m, &map)
    );
    assert_eq!(shape_str(&map, &m, "loop_rows"), "[3, 2]");

    let (_, map) = load("custom_domain.onnx");
    let names: Vec<&str> = map.unknown_ops.iter().map(|u| u.op_type.as_str()).collect();
    assert_eq!(names, ["Mystery"]);
}

#[test]
fn inferred_types_survive_verify_and_print() {
    for name in ["llama_ts.onnx", "encoder_ln_gelu.onnx", "control_flow.onnx"] {
        let (mut m, map) = load(name);
        ops::apply(&mut m.graph, &map).unwrap();
        verify(&m).unwrap_or_else(|e| panic!("{name}: {e}"));
        let _ = perqc_ir::print_model(&m);
    }
}
