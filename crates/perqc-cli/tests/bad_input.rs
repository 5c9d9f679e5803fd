//! Bad input: each case exits non-zero with a one-line error naming the file and the place
//! (node, value or offset), never panics, and leaves no output (or temporary) file behind.

use perqc_onnx::proto as pb;
use prost::Message;
mod common;

use common::fixture;
use std::path::{Path, PathBuf};
use std::process::Command;

fn scratch(test: &str) -> PathBuf {
    common::scratch("bad_input", test)
}

/// Runs `perqc MODEL -o OUT` and checks the failure is clean; returns the error line.
fn fails_cleanly(model: &Path, out: &Path, expect: &[&str]) -> String {
    let dir = out.parent().unwrap();
    let before: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    let o = Command::new(env!("CARGO_BIN_EXE_perqc"))
        .arg(model)
        .arg("-o")
        .arg(out)
        .arg("--quiet")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "succeeded on bad input: {stderr}");
    assert_ne!(o.status.code(), Some(101), "panicked: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    let line = lines[0];
    assert!(line.starts_with("error: "), "{line}");
    for e in expect {
        assert!(line.contains(e), "error line lacks `{e}`: {line}");
    }
    assert!(!out.exists(), "output file left behind");
    let after: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert_eq!(before, after, "files appeared in the output folder");
    line.to_string()
}

fn value_info(name: &str) -> pb::ValueInfoProto {
    use pb::type_proto::{Tensor, Value};
    pb::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(pb::TypeProto {
            value: Some(Value::TensorType(Tensor {
                elem_type: Some(1),
                shape: Some(pb::TensorShapeProto { dim: vec![] }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

fn node(name: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> pb::NodeProto {
    pb::NodeProto {
        name: Some(name.into()),
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A model with input `in`, output `out` and the given nodes and initializers.
fn model(nodes: Vec<pb::NodeProto>, initializers: Vec<pb::TensorProto>) -> Vec<u8> {
    pb::ModelProto {
        ir_version: Some(8),
        opset_import: vec![pb::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(18),
        }],
        graph: Some(pb::GraphProto {
            name: Some("g".into()),
            node: nodes,
            initializer: initializers,
            input: vec![value_info("in")],
            output: vec![value_info("out")],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn truncated_file() {
    let dir = scratch("truncated");
    let bytes = std::fs::read(fixture("llama_ts.onnx")).unwrap();
    let m = write(&dir, "cut.onnx", &bytes[..bytes.len() / 2]);
    fails_cleanly(
        &m,
        &dir.join("out.onnx"),
        &["cut.onnx", "not a valid ONNX model", "byte offset"],
    );
}

#[test]
fn random_bytes() {
    let dir = scratch("random");
    let mut x = 0x9E3779B97F4A7C15u64;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let m = write(&dir, "noise.onnx", &bytes);
    fails_cleanly(
        &m,
        &dir.join("out.onnx"),
        &["noise.onnx", "not a valid ONNX model"],
    );
}

#[test]
fn missing_file() {
    let dir = scratch("missing");
    fails_cleanly(
        &dir.join("absent.onnx"),
        &dir.join("out.onnx"),
        &["absent.onnx", "cannot read"],
    );
}

#[test]
fn missing_external_data_file() {
    let dir = scratch("missing_data");
    let m = dir.join("llama_dynamo.onnx");
    std::fs::copy(fixture("llama_dynamo.onnx"), &m).unwrap();
    fails_cleanly(
        &m,
        &dir.join("out.onnx"),
        &[
            "llama_dynamo.onnx",
            "llama_dynamo.onnx.data",
            "cannot read",
            "initializer",
        ],
    );
}

#[test]
fn external_data_offset_past_end() {
    let dir = scratch("short_data");
    let m = dir.join("llama_dynamo.onnx");
    std::fs::copy(fixture("llama_dynamo.onnx"), &m).unwrap();
    let data = std::fs::read(fixture("llama_dynamo.onnx.data")).unwrap();
    std::fs::write(dir.join("llama_dynamo.onnx.data"), &data[..100]).unwrap();
    fails_cleanly(
        &m,
        &dir.join("out.onnx"),
        &[
            "llama_dynamo.onnx.data",
            "offset",
            "runs past the end of the file (100 bytes)",
        ],
    );
}

#[test]
fn cycle() {
    let dir = scratch("cycle");
    let bytes = model(
        vec![
            node("a", "Add", &["in", "y"], &["x"]),
            node("b", "Relu", &["x"], &["y"]),
            node("c", "Identity", &["x"], &["out"]),
        ],
        vec![],
    );
    let m = write(&dir, "cycle.onnx", &bytes);
    fails_cleanly(
        &m,
        &dir.join("out.onnx"),
        &["cycle.onnx", "cycle through node `a` (Add)"],
    );
}

#[test]
fn undefined_value() {
    let dir = scratch("undefined");
    let bytes = model(vec![node("n1", "Relu", &["nope"], &["out"])], vec![]);
    let m = write(&dir, "undef.onnx", &bytes);
    fails_cleanly(
        &m,
        &dir.join("out.onnx"),
        &["undef.onnx", "node n1 (Relu)", "`nope`"],
    );
}

#[test]
fn duplicate_value_names() {
    let dir = scratch("duplicate");
    let bytes = model(
        vec![
            node("first", "Relu", &["in"], &["x"]),
            node("second", "Neg", &["in"], &["x"]),
            node("o", "Identity", &["x"], &["out"]),
        ],
        vec![],
    );
    let m = write(&dir, "dup.onnx", &bytes);
    fails_cleanly(
        &m,
        &dir.join("out.onnx"),
        &["dup.onnx", "node second (Neg)", "`x` is defined twice"],
    );
}

#[test]
fn output_listed_twice_in_one_node() {
    // Valid protobuf, invalid ONNX: the loader used to panic building the graph.
    let dir = scratch("same_output_twice");
    let bytes = model(
        vec![
            node("split", "Split", &["in"], &["y", "y"]),
            node("o", "Identity", &["y"], &["out"]),
        ],
        vec![],
    );
    let m = write(&dir, "split.onnx", &bytes);
    fails_cleanly(
        &m,
        &dir.join("out.onnx"),
        &[
            "split.onnx",
            "node split (Split)",
            "`y` is defined twice (output 0 of node `split` (Split) and output 1",
        ],
    );
}

#[test]
fn unknown_dtype() {
    let dir = scratch("dtype");
    let w = pb::TensorProto {
        name: Some("w".into()),
        data_type: Some(99),
        dims: vec![1],
        raw_data: Some(vec![0u8; 4].into()),
        ..Default::default()
    };
    let bytes = model(vec![node("n", "Add", &["in", "w"], &["out"])], vec![w]);
    let m = write(&dir, "dtype.onnx", &bytes);
    fails_cleanly(
        &m,
        &dir.join("out.onnx"),
        &["dtype.onnx", "initializer w", "unknown data_type 99"],
    );
}

#[test]
fn payload_length_mismatch() {
    let dir = scratch("payload");
    let w = pb::TensorProto {
        name: Some("w".into()),
        data_type: Some(1),
        dims: vec![2, 3],
        raw_data: Some(vec![0u8; 20].into()),
        ..Default::default()
    };
    let bytes = model(vec![node("n", "Add", &["in", "w"], &["out"])], vec![w]);
    let m = write(&dir, "short.onnx", &bytes);
    fails_cleanly(
        &m,
        &dir.join("out.onnx"),
        &["short.onnx", "initializer w", "20 bytes", "needs 24"],
    );
}

#[test]
fn unwritable_output() {
    let dir = scratch("unwritable");
    let out = dir.join("no/such/folder/out.onnx");
    let o = Command::new(env!("CARGO_BIN_EXE_perqc"))
        .arg(fixture("llama_ts.onnx"))
        .arg("-o")
        .arg(&out)
        .arg("--quiet")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("out.onnx") && stderr.contains("cannot write"),
        "{stderr}"
    );
    assert!(!out.exists());
}
