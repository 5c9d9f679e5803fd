//! `ai.perqc::FakeQuantize` end to end: the lowered graph (standard ONNX, opset 21) run
//! natively equals the fused kernel bit for bit on random, heavy-tailed, one-signed, zero
//! and tie rows; canonicalize fuses it back; ONNX Runtime runs the exported file and must
//! give the native outputs bit for bit (a `"native"` conformance case with rtol 0: both
//! compute the same f32 operations, and ONNX Runtime's blocked QuantizeLinear divides by
//! the scale and rounds half to even as the kernel does). Also the opset upgrade the
//! lowering needs, on the fixtures and on a node it must refuse.

mod common;

use common::{Compare, FIXTURES, conformance_case, fixture, native_case, out_dir};
use ndarray::{ArrayD, IxDyn};
use perqc_ir::Model;
use perqc_runtime::{RtTensor, Session};

const ROWS: usize = 4 * 33;
const D: usize = 64;

/// Every form the lowering writes: Q/DQ for 4 and 8 bits, float ops for the others, both
/// kinds, clip 1 or not.
const CASES: [(&str, &str); 8] = [
    ("a4", "bits = 4, symmetric = 0"),
    ("s4", "bits = 4, symmetric = 1"),
    ("a8c", "bits = 8, symmetric = 0, clip = 0.9"),
    ("s8", "bits = 8, symmetric = 1"),
    ("a4c", "bits = 4, clip = 0.9"),
    ("a2", "bits = 2, symmetric = 0"),
    ("s3c", "bits = 3, symmetric = 1, clip = 0.8"),
    ("a5", "bits = 5"),
];

/// An opset-18 model (the lowering upgrades it) with one FakeQuantize per case.
fn model() -> Model {
    let outs: Vec<&str> = CASES.iter().map(|c| c.0).collect();
    let mut text = format!(
        "model ir=8 opsets=[ai.onnx:18, ai.perqc:1]\ngraph main(%x: f32[4, 33, {D}]) -> (%{}) {{\n",
        outs.join(", %")
    );
    for (name, attrs) in CASES {
        text += &format!("  %{name} = ai.perqc::FakeQuantize(%x) {{{attrs}}}\n");
    }
    text += "}\n";
    perqc_ir::parse_model(&text).expect("parses")
}

struct Lcg(u64);

impl Lcg {
    fn uniform(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 40) as f32 + 0.5) / (1u64 << 24) as f32 // (0, 1)
    }
}

/// Rows of every kind: Gaussian-ish, Cauchy (heavy tails), one outlier, all positive, all
/// negative, all zero, tiny values, and exact ties (max 15 or 255 or 7 or 127 with 0, so the
/// scale is 1 and `k + 0.5` rounds half to even).
fn input() -> RtTensor {
    let mut r = Lcg(7);
    let mut v = Vec::with_capacity(ROWS * D);
    for row in 0..ROWS {
        let kind = row % 9;
        for j in 0..D {
            let u = r.uniform();
            let x = match kind {
                0 => (u - 0.5) * 6.0,
                1 => (std::f32::consts::PI * (u - 0.5)).tan(),
                2 if j == 5 => 300.0,
                2 => u - 0.5,
                3 => u * 4.0,
                4 => -u * 4.0,
                5 => 0.0,
                6 => (u - 0.5) * 1e-7,
                _ => {
                    // Symmetric rows (7, 127) also get negative ties.
                    let hi: f32 = [15.0, 255.0, 7.0, 127.0][(row / 9) % 4];
                    let sign = if hi < 15.0 || hi == 127.0 { -1.0 } else { 1.0 };
                    match j {
                        0 => hi,
                        1 => 0.0,
                        _ if j % 2 == 1 => sign * ((j as f32 % (hi - 1.0).min(40.0)) + 0.5),
                        _ => (j as f32 % (hi - 1.0).min(40.0)) + 0.5,
                    }
                }
            };
            v.push(x);
        }
    }
    RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[4, 33, D]), v).unwrap())
}

fn run(m: &Model, x: &RtTensor) -> Vec<(String, RtTensor)> {
    Session::new(m)
        .unwrap_or_else(|e| panic!("{e}"))
        .run(&[("x", x.clone())])
        .unwrap_or_else(|e| panic!("{e}"))
}

fn count(m: &Model, op: &str) -> usize {
    m.graph.nodes().filter(|(_, n)| n.op_type == op).count()
}

#[test]
fn lowered_equals_fused_natively_and_in_onnx_runtime() {
    let fused = model();
    let x = input();
    let want = run(&fused, &x);

    let mut lowered = fused.clone();
    perqc_passes::lower_for_export(&mut lowered).expect("lowers");
    assert_eq!(lowered.opset(""), Some(21));
    assert_eq!(lowered.ir_version, Some(10));
    assert_eq!(count(&lowered, "FakeQuantize"), 0);
    // The 4-bit variants (8-bit ones are written in float ops: see `lower`).
    assert_eq!(count(&lowered, "QuantizeLinear"), 3);
    let got = run(&lowered, &x);
    assert_eq!(got.len(), want.len());
    for ((name, a), (_, b)) in want.iter().zip(&got) {
        let (a, b) = (a.as_f32().unwrap(), b.as_f32().unwrap());
        let diff = a
            .iter()
            .zip(b.iter())
            .filter(|(p, q)| p.to_bits() != q.to_bits() && !(**p == 0.0 && **q == 0.0))
            .count();
        assert_eq!(diff, 0, "{name}: {diff} elements differ");
        assert!(a.iter().any(|&v| v != 0.0), "{name} is not all zeros");
    }

    // Canonicalize fuses every chain back into the same op.
    let mut back = lowered.clone();
    perqc_passes::canonicalize(&mut back).expect("canonicalizes");
    assert_eq!(count(&back, "FakeQuantize"), CASES.len());
    assert_eq!(back.graph.nodes().count(), CASES.len());
    for ((_, a), (_, b)) in want.iter().zip(&run(&back, &x)) {
        assert_eq!(a.as_f32().unwrap(), b.as_f32().unwrap());
    }

    // Declared types for the outputs (the text model leaves them out), so onnx.checker
    // accepts the file.
    let facts = perqc_ops::infer_model(&lowered).expect("infers");
    perqc_ops::apply(&mut lowered.graph, &facts).expect("applies");
    let dir = out_dir("fake_quantize");
    let path = dir.join("model.onnx");
    perqc_onnx::save(&lowered, &path, &Default::default()).expect("saves");
    // The file reloads and fuses the same way (what `perqc eval` does with it).
    let mut reloaded = perqc_onnx::load(&path).expect("loads").model;
    perqc_passes::canonicalize(&mut reloaded).expect("canonicalizes");
    assert_eq!(count(&reloaded, "FakeQuantize"), CASES.len());
    native_case("fake_quantize", &dir, &path, &[("x", &x)], &want, 0.0);
}

#[test]
fn shape_rule_rejects_non_f32_and_bad_attributes() {
    let m = perqc_ir::parse_model(
        "model ir=10 opsets=[ai.onnx:21, ai.perqc:1]
         graph main(%x: i64[2, 8]) -> (%y) {
           %y = ai.perqc::FakeQuantize(%x) {bits = 4}  // fq_ints
         }",
    )
    .unwrap();
    let e = perqc_ops::infer_model(&m).unwrap_err().to_string();
    assert!(e.contains("fq_ints") && e.contains("f32"), "{e}");
    let m = perqc_ir::parse_model(
        "model ir=10 opsets=[ai.onnx:21, ai.perqc:1]
         graph main(%x: f32[2, 8]) -> (%y) {
           %y = ai.perqc::FakeQuantize(%x) {bits = 9}  // fq_wide
         }",
    )
    .unwrap();
    let e = perqc_ops::infer_model(&m).unwrap_err().to_string();
    assert!(e.contains("fq_wide") && e.contains("bits"), "{e}");
}

/// Every fixture upgrades (every default-domain node keeps its op table row between its
/// opset, 17 or 18, and 21, If/Loop/Scan bodies included); those below 21 still run in
/// ONNX Runtime with the original's outputs bit for bit.
#[test]
fn fixtures_upgrade_to_opset_21() {
    let mut summary = Vec::new();
    for name in FIXTURES {
        let src = fixture(name);
        let mut model = perqc_onnx::load(&src).expect("loads").model;
        let from = model.opset("").unwrap();
        match perqc_passes::opset::upgrade(&mut model, 21) {
            Ok(u) => {
                assert_eq!(model.opset(""), Some(from.max(21)));
                summary.push(format!("{name}: {from} -> ok ({} nodes)", u.nodes));
                if from < 21 {
                    let stem = name.trim_end_matches(".onnx");
                    let dir = out_dir(&format!("opset21_{stem}"));
                    let out = dir.join("model.onnx");
                    perqc_onnx::save(&model, &out, &Default::default()).expect("saves");
                    conformance_case(&format!("opset21_{stem}"), &src, &out, Compare::Bitwise);
                }
            }
            Err(e) => summary.push(format!("{name}: {from} -> {e}")),
        }
    }
    insta::assert_snapshot!(summary.join("\n"));
}

#[test]
fn upgrade_refuses_a_changed_op_and_lower_names_it() {
    let text = "model ir=8 opsets=[ai.onnx:17, ai.perqc:1]
        graph main(%x: f32[2, 8]) -> (%y) {
          %m = ReduceMean(%x) {axes = [-1]}  // centre
          %c = Sub(%x, %m)
          %y = ai.perqc::FakeQuantize(%c) {bits = 4}
        }";
    let mut m = perqc_ir::parse_model(text).unwrap();
    let e = perqc_passes::opset::upgrade(&mut m, 21).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot upgrade the default opset from 17 to 21: node `centre` (ReduceMean): the op \
         changed between opset 17 (row since 1) and opset 21 (row since 18); rewrite the node \
         first"
    );
    assert_eq!(m.opset(""), Some(17), "a refused upgrade changes nothing");
    let e = perqc_passes::lower_for_export(&mut m)
        .unwrap_err()
        .to_string();
    assert!(e.contains("FakeQuantize") && e.contains("`centre`"), "{e}");

    // Inside an If body too.
    let text = "model ir=8 opsets=[ai.onnx:12]
graph main(%x: f32[2, 8], %flag: bool[]) -> (%out) {
  %out = If(%flag) captures(%x) {  // branch
    then_branch = graph then() outer(%x) -> (%t) {
      %t = Softmax(%x) {axis = 1}  // flat
    }
    else_branch = graph else() outer(%x) -> (%x) {
    }
  }
}
";
    let mut m = perqc_ir::parse_model(text).unwrap();
    let e = perqc_passes::opset::upgrade(&mut m, 21)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("in subgraph `then` of `branch`: node `flat` (Softmax)"),
        "{e}"
    );
}
