//! Every fixture imports to IR that passes the verifier and prints byte-stably; small
//! fixtures are snapshotted as textual IR. (Running the registered passes over every fixture
//! is in roundtrip.rs, which also checks the result in ONNX Runtime.)

mod common;

use common::{FIXTURES, fixture};
use perqc_ir::{print_model, verify};

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
