//! Shared helpers for the end-to-end tests in `tests/tests/`.
//!
//! Tests that emit models register them as ONNX Runtime conformance cases: a small JSON file
//! per case under `target/tmp/conformance/`, which `tests/conformance/ort_compare.py` (run by
//! `scripts/check` after `cargo test`) loads to check the emitted model against its reference.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Every generated ONNX fixture.
pub const FIXTURES: [&str; 9] = [
    "llama_ts.onnx",
    "llama_dynamo.onnx",
    "gemma_like.onnx",
    "encoder_ln_gelu.onnx",
    "control_flow.onnx",
    "custom_domain.onnx",
    "fused_ops.onnx",
    "ort_contrib_ops.onnx",
    "ort_kv_decoder.onnx",
];

/// The repository's `fixtures/` folder.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// A fresh folder for one test's outputs under the target dir.
pub fn out_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("emitted")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the test output folder");
    dir
}

/// How the conformance runner compares a candidate with its reference.
pub enum Compare {
    /// Outputs equal bit for bit.
    Bitwise,
    /// Only `onnx.checker` (the model cannot run in ONNX Runtime, e.g. a custom domain).
    CheckOnly,
    /// Outputs equal bit for bit, without `onnx.checker` (which does not know ONNX Runtime's
    /// default-domain contrib ops such as SimplifiedLayerNormalization).
    BitwiseUnchecked,
    /// Registered but neither checked nor run: random inputs are not valid for the model
    /// (GroupQueryAttention needs consistent sequence lengths).
    NotRun,
    /// Outputs within `rtol` of the max |reference|, without `onnx.checker`: a rewrite that
    /// changes which ONNX Runtime kernels compute the same formula.
    CloseUnchecked(f64),
    /// Outputs within `rtol` of the max |reference|, and `onnx.checker` accepts the
    /// candidate: an exact transform, equal up to float round-off.
    Close(f64),
}

/// Registers `candidate` for the ONNX Runtime conformance run.
pub fn conformance_case(name: &str, reference: &Path, candidate: &Path, compare: Compare) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("conformance");
    std::fs::create_dir_all(&dir).expect("creating the conformance folder");
    let abs = |p: &Path| std::fs::canonicalize(p).expect("emitted model exists");
    let (mode, rtol, run, check) = match compare {
        Compare::Bitwise => ("bitwise", 0.0, true, true),
        Compare::CheckOnly => ("bitwise", 0.0, false, true),
        Compare::BitwiseUnchecked => ("bitwise", 0.0, true, false),
        Compare::NotRun => ("bitwise", 0.0, false, false),
        Compare::CloseUnchecked(rtol) => ("close", rtol, true, false),
        Compare::Close(rtol) => ("close", rtol, true, true),
    };
    let json = format!(
        "{{\"cases\": [{{\"name\": {name:?}, \"reference\": {:?}, \"candidate\": {:?}, \"mode\": \"{mode}\", \"rtol\": {rtol}, \"check\": {check}, \"run\": {run}}}]}}\n",
        abs(reference),
        abs(candidate),
    );
    std::fs::write(dir.join(format!("{name}.json")), json).expect("writing the conformance case");
}

/// Registers a `"native"` conformance case: the runner feeds `inputs` to `model` in ONNX
/// Runtime and checks its outputs against `outputs` (perqc's native results) within
/// `rtol` of the max |reference|. Tensors are written as `.npy` files next to the case.
pub fn native_case(
    name: &str,
    dir: &Path,
    model: &Path,
    inputs: &[(&str, &perqc_runtime::RtTensor)],
    outputs: &[(String, perqc_runtime::RtTensor)],
    rtol: f64,
) {
    let conf = Path::new(env!("CARGO_TARGET_TMPDIR")).join("conformance");
    std::fs::create_dir_all(&conf).expect("creating the conformance folder");
    let write = |kind: &str, items: Vec<(&str, &perqc_runtime::RtTensor)>| -> String {
        let mut parts = Vec::new();
        for (i, (n, t)) in items.into_iter().enumerate() {
            let p = dir.join(format!("{name}.{kind}{i}.npy"));
            perqc_runtime::write_npy(&p, t).expect("writing .npy");
            let p = std::fs::canonicalize(&p).expect("written");
            parts.push(format!("{n:?}: {:?}", p.display().to_string()));
        }
        format!("{{{}}}", parts.join(", "))
    };
    let ins = write("in", inputs.to_vec());
    let outs = write(
        "out",
        outputs.iter().map(|(n, t)| (n.as_str(), t)).collect(),
    );
    let model = std::fs::canonicalize(model).expect("model exists");
    let json = format!(
        "{{\"cases\": [{{\"name\": {name:?}, \"mode\": \"native\", \"model\": {:?}, \"inputs\": {ins}, \"outputs\": {outs}, \"rtol\": {rtol}}}]}}\n",
        model.display().to_string()
    );
    std::fs::write(conf.join(format!("{name}.json")), json).expect("writing the conformance case");
}

/// The feeds of `ort_kv_decoder.onnx` for one window scored from scratch: `ids`
/// `[batch, seq]`, an all-ones attention mask, positions `0..seq` and empty caches.
pub fn kv_decoder_feeds(ids: perqc_runtime::RtTensor) -> Vec<(String, perqc_runtime::RtTensor)> {
    let model = perqc_onnx::load(&fixture("ort_kv_decoder.onnx"))
        .expect("loads")
        .model;
    decoder_feeds(&model, ids, 0, 0)
}

/// Feeds for every input of `model`: its first input is `ids` (token ids `[batch, seq]`,
/// or any tensor for a one-input model), `attention_mask` all ones over `past + seq`
/// positions, `position_ids` `past..past + seq`, and each cache input (a name with `past`)
/// seeded values of shape `[batch, .., past, ..]` in its declared type (f32 or f16): its
/// declared dims, a symbolic one named for the batch taking `batch` and any other one `past`.
pub fn decoder_feeds(
    model: &perqc_ir::Model,
    ids: perqc_runtime::RtTensor,
    past: usize,
    seed: u64,
) -> Vec<(String, perqc_runtime::RtTensor)> {
    use ndarray::{ArrayD, IxDyn};
    use perqc_ir::Dim;
    use perqc_runtime::RtTensor;
    let g = &model.graph;
    let (batch, seq) = (ids.shape()[0], ids.shape().get(1).copied().unwrap_or(1));
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let mut normal = move || {
        // Sum of four uniforms, centered: close enough to N(0, 1/3) for cache contents.
        (0..4)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 24) as f32
            })
            .sum::<f32>()
            - 2.0
    };
    let mut feeds = vec![(g.value(g.inputs[0]).name.clone(), ids)];
    for &v in &g.inputs[1..] {
        let value = g.value(v);
        let name = value.name.clone();
        let t = if name == "attention_mask" {
            RtTensor::i64(ArrayD::from_elem(IxDyn(&[batch, past + seq]), 1))
        } else if name == "position_ids" {
            RtTensor::i64(ArrayD::from_shape_fn(IxDyn(&[batch, seq]), |i| {
                (past + i[1]) as i64
            }))
        } else if name.contains("past") {
            let dims: Vec<usize> = value
                .ty
                .as_ref()
                .and_then(|t| t.shape())
                .unwrap_or_else(|| panic!("{name}: no declared shape"))
                .iter()
                .map(|d| match d {
                    Dim::Known(k) => *k as usize,
                    Dim::Sym(n) if n.contains("batch") => batch,
                    _ => past,
                })
                .collect();
            let n: usize = dims.iter().product();
            let data: Vec<f32> = (0..n).map(|_| normal()).collect();
            let a = ArrayD::from_shape_vec(IxDyn(&dims), data).unwrap();
            match value.ty.as_ref().and_then(|t| t.elem()) {
                Some(perqc_ir::DType::F16) => {
                    RtTensor::F16(a.mapv(half::f16::from_f32).into_shared())
                }
                _ => RtTensor::f32(a),
            }
        } else {
            panic!("{name}: no feed for this input");
        };
        feeds.push((name, t));
    }
    feeds
}

/// A float tensor's values as f32 (f16 and bf16 widened exactly).
pub fn floats(t: &perqc_runtime::RtTensor) -> Vec<f32> {
    use perqc_runtime::RtTensor;
    match t {
        RtTensor::F32(a) => a.iter().copied().collect(),
        RtTensor::F16(a) => a.iter().map(|v| v.to_f32()).collect(),
        RtTensor::BF16(a) => a.iter().map(|v| v.to_f32()).collect(),
        t => panic!("a {} tensor, not a float one", t.dtype()),
    }
}

/// `values` (f32) as a tensor of `like`'s float type and `shape`: the expected outputs of a
/// half model, registered for ONNX Runtime in its own type.
pub fn float_like(
    like: perqc_ir::DType,
    shape: &[usize],
    values: Vec<f32>,
) -> perqc_runtime::RtTensor {
    use ndarray::{ArrayD, IxDyn};
    use perqc_runtime::RtTensor;
    let a = ArrayD::from_shape_vec(IxDyn(shape), values).unwrap();
    match like {
        perqc_ir::DType::F16 => RtTensor::F16(a.mapv(half::f16::from_f32).into_shared()),
        perqc_ir::DType::BF16 => RtTensor::BF16(a.mapv(half::bf16::from_f32).into_shared()),
        _ => RtTensor::f32(a),
    }
}
