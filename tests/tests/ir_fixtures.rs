//! Every fixture imports to IR that passes the verifier, prints byte-stably, and survives the
//! registered passes with verification after each. Small fixtures are snapshotted as textual IR.

use perqc_ir::{PassManager, RunOptions, print_model, verify};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(name)
}

const FIXTURES: [&str; 5] = [
    "llama_ts.onnx",
    "llama_dynamo.onnx",
    "encoder_ln_gelu.onnx",
    "control_flow.onnx",
    "custom_domain.onnx",
];

#[test]
fn fixtures_verify_and_print_stably() {
    for name in FIXTURES {
        let m = perqc_onnx::load(&fixture(name)).unwrap().model;
        verify(&m).unwrap_or_else(|e| panic!("{name}: {e}"));
        let a = print_model(&m);
        assert_eq!(a, print_model(&m.clone()), "{name}");
    }
}

#[test]
fn fixtures_survive_the_registered_passes() {
    let all: Vec<&str> = perqc_passes::registry()
        .list()
        .iter()
        .map(|p| p.name)
        .collect();
    for name in FIXTURES {
        let mut m = perqc_onnx::load(&fixture(name)).unwrap().model;
        let mut p = perqc_passes::registry().build(&all.join(",")).unwrap();
        PassManager::new()
            .run(
                &mut m,
                &mut p,
                &mut RunOptions {
                    verify_each: true,
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn small_fixtures_textual_ir() {
    for name in ["control_flow.onnx", "custom_domain.onnx"] {
        let m = perqc_onnx::load(&fixture(name)).unwrap().model;
        insta::assert_snapshot!(name, print_model(&m));
    }
}

#[test]
fn textual_ir_round_trips() {
    // control_flow.onnx has only small tensors, so its text holds every value.
    let m = perqc_onnx::load(&fixture("control_flow.onnx"))
        .unwrap()
        .model;
    let text = print_model(&m);
    let back = perqc_ir::parse_model(&text).unwrap();
    verify(&back).unwrap();
    assert_eq!(print_model(&back), text);
}
