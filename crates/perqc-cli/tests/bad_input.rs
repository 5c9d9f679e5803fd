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
fn empty_file() {
    let dir = scratch("empty");
    let m = write(&dir, "empty.onnx", b"");
    let line = fails_cleanly(&m, &dir.join("out.onnx"), &["empty.onnx", "empty file"]);
    assert!(!line.contains("graph"), "{line}");
}

#[test]
fn text_file() {
    // Plain words first, the decoder's detail after.
    let dir = scratch("text");
    let m = write(&dir, "notes.onnx", b"hello world, this is text\n");
    let line = fails_cleanly(&m, &dir.join("out.onnx"), &["notes.onnx", "byte offset"]);
    assert!(
        line.starts_with(&format!(
            "error: {}: not a valid ONNX model: the bytes do not decode as protobuf (",
            m.display()
        )),
        "{line}"
    );
}

#[test]
fn protobuf_without_graph() {
    // Bytes that happen to decode as a ModelProto but hold no graph: not an ONNX model.
    let dir = scratch("no_graph");
    let m = write(&dir, "ir.onnx", &[0x08, 0x07]);
    fails_cleanly(
        &m,
        &dir.join("out.onnx"),
        &["ir.onnx", "not a valid ONNX model", "holds no graph"],
    );
}

#[test]
fn unknown_command() {
    let dir = scratch("unknown_command");
    let model = fixture("llama_ts.onnx");
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_perqc"))
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    for args in [vec!["inspekt", model.to_str().unwrap()], vec!["inspekt"]] {
        let (code, stderr) = run(&args);
        assert_eq!(code, Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with(
                "error: unknown command `inspekt`; the commands are `print`, `eval`, `inspect`"
            ),
            "{stderr}"
        );
    }
    // A known command with its arguments missing says what is missing.
    let (code, stderr) = run(&["inspect", model.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("required arguments were not provided") && stderr.contains("--regions"),
        "{stderr}"
    );
    // The main job, without a command, still runs; a model that does not exist says so.
    let out = dir.join("out.onnx");
    let o = Command::new(env!("CARGO_BIN_EXE_perqc"))
        .arg(&model)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.exists());
    fails_cleanly(
        &dir.join("inspect"),
        &dir.join("out2.onnx"),
        &["inspect", "No such file or directory"],
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
fn graph_input_without_a_name() {
    // The `load` fuzz target's crash-ea5887f5 (2026-12-01): ModelProto { graph { input { } } },
    // four bytes; it loaded, and the model then failed verification.
    let dir = scratch("nameless_input");
    let m = write(&dir, "nameless.onnx", &[0x3a, 0x02, 0x5a, 0x00]);
    fails_cleanly(
        &m,
        &dir.join("out.onnx"),
        &["nameless.onnx", "graph input has an empty name"],
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

/// Runs `perqc llama_ts.onnx -o OUT` plus `extra` arguments (`--passes none` unless they
/// choose the passes: the model is written back unchanged).
fn compile_to(out: &Path, extra: &[&str]) -> std::process::Output {
    let passes: &[&str] = if extra.contains(&"--passes") {
        &[]
    } else {
        &["--passes", "none"]
    };
    Command::new(env!("CARGO_BIN_EXE_perqc"))
        .arg(fixture("llama_ts.onnx"))
        .arg("-o")
        .arg(out)
        .arg("--quiet")
        .args(passes)
        .args(extra)
        .output()
        .unwrap()
}

fn mkfifo(path: &Path) {
    let st = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(st.success(), "mkfifo {}", path.display());
}

fn is_fifo(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false)
}

/// The one error line of a failed run, checked to name `expect`.
fn one_error(o: &std::process::Output, expect: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "succeeded: {stderr}");
    assert_ne!(o.status.code(), Some(101), "panicked: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    for e in expect {
        assert!(stderr.contains(e), "error lacks `{e}`: {stderr}");
    }
    stderr
}

#[test]
fn output_through_a_symlink_writes_its_target() {
    let dir = scratch("out_symlink");
    std::fs::create_dir(dir.join("real")).unwrap();
    let target = dir.join("real/model.onnx");
    std::fs::write(&target, b"old").unwrap();
    let link = dir.join("link.onnx");
    std::os::unix::fs::symlink("real/model.onnx", &link).unwrap();
    let o = compile_to(&link, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the symlink was replaced"
    );
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        Path::new("real/model.onnx")
    );
    let written = std::fs::read(&target).unwrap();
    assert_eq!(written, std::fs::read(fixture("llama_ts.onnx")).unwrap());
    // No temporary file left in either folder.
    let names = |d: &Path| -> Vec<_> {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&dir), ["link.onnx", "real"]);
    assert_eq!(names(&dir.join("real")), ["model.onnx"]);
}

#[test]
fn output_over_a_fifo_is_refused() {
    let dir = scratch("out_fifo");
    let fifo = dir.join("pipe");
    mkfifo(&fifo);
    one_error(
        &compile_to(&fifo, &[]),
        &["pipe", "is a FIFO, not a regular file"],
    );
    assert!(is_fifo(&fifo), "the FIFO was replaced");
    // Through a symlink too: the link and the FIFO stay.
    let link = dir.join("link.onnx");
    std::os::unix::fs::symlink(&fifo, &link).unwrap();
    one_error(
        &compile_to(&link, &[]),
        &["link.onnx", "is a symlink to", "which is a FIFO"],
    );
    assert!(is_fifo(&fifo));
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // A folder is not replaced either.
    std::fs::create_dir(dir.join("folder")).unwrap();
    one_error(&compile_to(&dir.join("folder"), &[]), &["is a folder"]);
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["folder", "link.onnx", "pipe"],
        "no other file appeared"
    );
}

#[test]
fn external_data_over_a_fifo_is_refused() {
    let dir = scratch("data_fifo");
    let out = dir.join("out.onnx");
    let fifo = dir.join("out.onnx.data");
    mkfifo(&fifo);
    one_error(
        &compile_to(&out, &["--external-data"]),
        &["out.onnx.data", "is a FIFO, not a regular file"],
    );
    assert!(is_fifo(&fifo), "the FIFO was replaced");
    assert!(!out.exists(), "the model was written without its data");
    // Without external data the FIFO beside the output is no concern.
    let o = compile_to(&out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(is_fifo(&fifo));
}

#[test]
fn output_through_a_dangling_symlink() {
    // A dangling symlink is written through when its target's folder exists (as a shell
    // redirection would), and refused, naming where it leads, when it does not.
    let dir = scratch("out_dangling");
    let link = dir.join("link.onnx");
    std::os::unix::fs::symlink("made.onnx", &link).unwrap();
    let o = compile_to(&link, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        std::fs::read(dir.join("made.onnx")).unwrap(),
        std::fs::read(fixture("llama_ts.onnx")).unwrap()
    );

    let nowhere = dir.join("nowhere.onnx");
    std::os::unix::fs::symlink("no/such/folder/x.onnx", &nowhere).unwrap();
    one_error(
        &compile_to(&nowhere, &[]),
        &[
            "nowhere.onnx",
            "does not exist",
            "the symlink leads to",
            "no/such/folder/x.onnx",
        ],
    );
    assert!(
        std::fs::symlink_metadata(&nowhere)
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

/// A reader that stops early (`perqc print MODEL | head`) ends the output quietly: no
/// panic, success.
#[test]
fn closed_stdout_is_not_a_panic() {
    // The textual IR of the fixture (about 90 KB) is more than a pipe buffers.
    let mut child = Command::new(env!("CARGO_BIN_EXE_perqc"))
        .arg("print")
        .arg(fixture("llama_ts.onnx"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !stderr.contains("panicked"),
        "{stderr}"
    );
}
