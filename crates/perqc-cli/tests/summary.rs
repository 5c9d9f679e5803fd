//! The main job's summary on stderr says what was done to the model: the passes run (or
//! that none ran and the model is unchanged), the weights changed, the size before and after.

mod common;

use common::fixture;
use std::process::Command;

fn summary(model: &str, extra: &[&str], test: &str) -> Vec<String> {
    let dir = common::scratch("summary", test);
    let out = dir.join("out.onnx");
    let o = Command::new(env!("CARGO_BIN_EXE_perqc"))
        .arg(fixture(model))
        .arg("-o")
        .arg(&out)
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{stderr}");
    stderr.lines().map(str::to_string).collect()
}

#[test]
fn no_passes_says_the_model_is_unchanged() {
    let size = std::fs::metadata(fixture("llama_ts.onnx")).unwrap().len();
    let lines = summary("llama_ts.onnx", &["--passes", "none"], "none");
    assert_eq!(lines[0], "no passes: the model is written back unchanged");
    assert!(
        lines[1].starts_with("weights: 0 initializers changed, added or removed; "),
        "{lines:?}"
    );
    assert_eq!(lines[2], format!("size: {size} bytes before, {size} after"));
    assert!(lines[3].starts_with("wrote "), "{lines:?}");
    assert_eq!(lines.len(), 4, "{lines:?}");
}

#[test]
fn passes_and_external_data_are_counted() {
    let model = std::fs::metadata(fixture("llama_dynamo.onnx"))
        .unwrap()
        .len();
    let data = std::fs::metadata(fixture("llama_dynamo.onnx.data"))
        .unwrap()
        .len();
    let lines = summary(
        "llama_dynamo.onnx",
        &["--passes", "dce", "--inline-data"],
        "dce",
    );
    let find = |prefix: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line: {lines:?}"))
            .clone()
    };
    assert!(find("passes run: dce (").ends_with(')'));
    let weights = find("weights: ");
    assert!(
        weights.contains("initializers changed, added or removed"),
        "{weights}"
    );
    let size = find("size: ");
    assert!(
        size.starts_with(&format!("size: {} bytes before, ", model + data)),
        "{size}"
    );
}

#[test]
fn removed_weights_are_counted() {
    use perqc_onnx::proto as pb;
    use prost::Message;
    let vi = |name: &str| pb::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: Some(1),
                shape: Some(pb::TensorShapeProto { dim: vec![] }),
            })),
            denotation: None,
        }),
        ..Default::default()
    };
    let scalar = |name: &str| pb::TensorProto {
        name: Some(name.into()),
        data_type: Some(1),
        raw_data: Some(vec![0u8; 4].into()),
        ..Default::default()
    };
    let bytes = pb::ModelProto {
        ir_version: Some(8),
        opset_import: vec![pb::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(18),
        }],
        graph: Some(pb::GraphProto {
            name: Some("g".into()),
            node: vec![pb::NodeProto {
                op_type: Some("Add".into()),
                input: vec!["in".into(), "w".into()],
                output: vec!["out".into()],
                ..Default::default()
            }],
            initializer: vec![scalar("w"), scalar("unused")],
            input: vec![vi("in")],
            output: vec![vi("out")],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let dir = common::scratch("summary", "removed");
    let model = dir.join("m.onnx");
    std::fs::write(&model, &bytes).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_perqc"))
        .arg(&model)
        .arg("-o")
        .arg(dir.join("out.onnx"))
        .args(["--passes", "dce"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("\nweights: 1 initializers changed, added or removed; 2 before, 1 after\n"),
        "{stderr}"
    );
}
