//! Lossless round trip: every fixture loads, verifies, and saves back to the same model.
//!
//! Fixtures written by the `onnx` Python package are canonical protobuf, so the round trip
//! is checked byte for byte; the emitted files are also registered for the ONNX Runtime
//! conformance run (bit-identical outputs, `onnx.checker` full check).

use perqc_onnx::{ExternalPolicy, SaveOptions};
mod common;

use common::{Compare, FIXTURES, conformance_case, fixture, out_dir};
use std::path::Path;

fn load(path: &Path) -> perqc_ir::Model {
    let loaded = perqc_onnx::load(path).unwrap_or_else(|e| panic!("{e}"));
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    perqc_ir::verify::verify(&loaded.model).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    loaded.model
}

fn runs_in_ort(name: &str) -> Compare {
    if name == "custom_domain.onnx" {
        Compare::CheckOnly
    } else if name == "ort_contrib_ops.onnx" {
        Compare::NotRun
    } else if name.starts_with("ort_") {
        Compare::BitwiseUnchecked
    } else {
        Compare::Bitwise
    }
}

#[test]
fn fixtures_round_trip_byte_for_byte() {
    let out = out_dir("roundtrip");
    for name in FIXTURES {
        let src = fixture(name);
        let model = load(&src);
        let dst = out.join(name);
        perqc_onnx::save(&model, &dst, &SaveOptions::default()).unwrap();
        let data_src = src.with_extension("onnx.data");
        if data_src.exists() {
            // The data file is named after the output, so the model bytes differ in the
            // location string; the tensors must be the same.
            let again = load(&dst);
            assert_eq!(
                perqc_onnx::to_bytes(&again),
                perqc_onnx::to_bytes(&model),
                "{name}"
            );
        } else {
            let a = std::fs::read(&src).unwrap();
            let b = std::fs::read(&dst).unwrap();
            assert!(
                a == b,
                "{name}: round trip is not byte-identical ({} vs {} bytes)",
                a.len(),
                b.len()
            );
        }
        // A second round trip is a fixed point.
        let dst2 = out.join(format!("again_{name}"));
        perqc_onnx::save(&load(&dst), &dst2, &SaveOptions::default()).unwrap();
        assert_eq!(
            perqc_onnx::to_bytes(&load(&dst2)),
            perqc_onnx::to_bytes(&load(&dst)),
            "{name}: second round trip changed the model"
        );
        conformance_case(&format!("roundtrip_{name}"), &src, &dst, runs_in_ort(name));
    }
}

#[test]
fn external_data_on_request_and_back_inline() {
    let out = out_dir("external");
    let src = fixture("llama_ts.onnx");
    let model = load(&src);
    let dst = out.join("llama_ts_ext.onnx");
    let opts = SaveOptions {
        external: ExternalPolicy::All,
        ..SaveOptions::default()
    };
    let saved = perqc_onnx::save(&model, &dst, &opts).unwrap();
    let (data_path, data_len) = saved.data.clone().expect("weights moved to external data");
    assert_eq!(data_path, out.join("llama_ts_ext.onnx.data"));
    assert!(data_len > 0 && saved.model_bytes < data_len, "{saved:?}");
    let external = load(&dst);
    let moved = external
        .graph
        .initializers
        .iter()
        .filter(|&&v| {
            matches!(
                external.graph.value(v).tensor.as_ref().unwrap().data,
                perqc_ir::TensorData::External { .. }
            )
        })
        .count();
    assert!(moved > 0, "no initializer was written externally");
    // Loading the external form and encoding it inline gives back the original bytes.
    assert!(perqc_onnx::to_bytes(&external) == std::fs::read(&src).unwrap());
    conformance_case("external_llama_ts", &src, &dst, Compare::Bitwise);

    // The dynamo fixture is external already; inline it on request.
    let dyn_src = fixture("llama_dynamo.onnx");
    let dyn_model = load(&dyn_src);
    let inline = out.join("llama_dynamo_inline.onnx");
    let opts = SaveOptions {
        external: ExternalPolicy::Inline,
        ..SaveOptions::default()
    };
    let saved = perqc_onnx::save(&dyn_model, &inline, &opts).unwrap();
    assert!(saved.data.is_none(), "{saved:?}");
    conformance_case("inline_llama_dynamo", &dyn_src, &inline, Compare::Bitwise);
}

#[test]
fn external_data_is_automatic_past_the_inline_limit() {
    // The real limit is protobuf's 2 GiB; a small limit shows the switch on a fixture.
    let out = out_dir("forced_external");
    let src = fixture("llama_ts.onnx");
    let dst = out.join("big.onnx");
    let opts = SaveOptions {
        inline_limit: 64 << 10,
        ..SaveOptions::default()
    };
    let saved = perqc_onnx::save(&load(&src), &dst, &opts).unwrap();
    assert!(saved.forced_external, "{saved:?}");
    // What stays inline is the graph and the small Constant-node tensors.
    let (_, data_len) = saved.data.clone().expect("data file written");
    assert!(saved.model_bytes * 4 < data_len, "{saved:?}");
    assert!(perqc_onnx::to_bytes(&load(&dst)) == std::fs::read(&src).unwrap());
    conformance_case("forced_external_llama_ts", &src, &dst, Compare::Bitwise);
}

#[test]
fn weights_are_slices_of_the_file_buffer() {
    // Decoding must not copy raw payloads: each one points into the buffer the model was
    // decoded from (for `load`, the file's memory map).
    let path = fixture("llama_ts.onnx");
    let buf = bytes::Bytes::from(std::fs::read(&path).unwrap());
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let model = perqc_onnx::load_bytes(buf.clone(), &path, path.parent().unwrap())
        .unwrap()
        .model;
    let g = &model.graph;
    let mut raw = 0;
    for &v in &g.initializers {
        if let perqc_ir::TensorData::Raw(b) = &g.value(v).tensor.as_ref().unwrap().data {
            let p = b.as_ptr() as usize;
            assert!(
                b.is_empty() || (range.contains(&p) && p + b.len() <= range.end),
                "{} was copied",
                g.value(v).name
            );
            raw += 1;
        }
    }
    assert!(
        raw >= 4,
        "expected raw initializers in the fixture, found {raw}"
    );
}

#[test]
fn every_registered_pass_keeps_outputs_bit_identical() {
    // Passes before quantization are exact; these ones do not even reorder arithmetic, so
    // ONNX Runtime must give the same bits.
    let out = out_dir("all_passes");
    let registry = perqc_passes::registry();
    // The weight transforms are exact only up to round-off: checked below.
    let all: Vec<&str> = registry
        .list()
        .iter()
        .map(|p| p.name)
        .filter(|n| !perqc_passes::TRANSFORM_PASSES.contains(n))
        .collect();
    let pipeline_src = all.join(",");
    for name in FIXTURES {
        let src = fixture(name);
        let mut model = load(&src);
        let mut pipeline = registry.build(&pipeline_src).unwrap();
        let mut opts = perqc_ir::RunOptions {
            verify_each: true,
            print_ir_after: vec![],
            print_sink: None,
            rewrite_budget: None,
        };
        perqc_ir::PassManager::new()
            .run(&mut model, &mut pipeline, &mut opts)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let dst = out.join(name);
        perqc_onnx::save(&model, &dst, &SaveOptions::default()).unwrap();
        // Canonicalize + lower spells ONNX Runtime's fused norms (SimplifiedLayerNormalization
        // and its Skip form) as the decomposed chain the opset has, which ORT rounds apart
        // from its fused kernels: within 1e-6, not bitwise.
        let compare = match runs_in_ort(name) {
            Compare::BitwiseUnchecked => Compare::CloseUnchecked(1e-6),
            c => c,
        };
        conformance_case(&format!("passes_{name}"), &src, &dst, compare);
    }
}

#[test]
fn every_transform_pass_keeps_outputs_within_round_off() {
    // On every fixture, the weight transforms with every region kind enabled: where a region
    // is blocked they leave it (with a note), elsewhere the outputs move by round-off only.
    let out = out_dir("transform_passes");
    let pipeline_src = "canonicalize,permute(method=random,seed=1,residual=true,heads=true,block=8),\
                        fold-norms,rotate,online-hadamard(block=8),lower";
    for name in FIXTURES {
        let src = fixture(name);
        let mut model = load(&src);
        let mut pipeline = perqc_passes::registry().build(pipeline_src).unwrap();
        let mut opts = perqc_ir::RunOptions {
            verify_each: true,
            ..Default::default()
        };
        perqc_ir::PassManager::new()
            .run(&mut model, &mut pipeline, &mut opts)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let dst = out.join(name);
        perqc_onnx::save(&model, &dst, &SaveOptions::default()).unwrap();
        let compare = match runs_in_ort(name) {
            Compare::Bitwise | Compare::BitwiseUnchecked => Compare::CloseUnchecked(1e-4),
            c => c,
        };
        conformance_case(&format!("transform_passes_{name}"), &src, &dst, compare);
    }
}

#[test]
fn released_pages_read_back_unchanged() {
    // `Loaded::release` drops resident pages of the file map; the payloads must read the
    // same afterwards (faulted back in from the file), for inline and external data.
    for name in ["llama_ts.onnx", "llama_dynamo.onnx"] {
        let loaded = perqc_onnx::load(&fixture(name)).unwrap();
        let before = perqc_onnx::to_bytes(&loaded.model);
        let g = &loaded.model.graph;
        for &v in &g.initializers {
            loaded.release(g.value(v).tensor.as_ref().unwrap());
        }
        assert!(
            perqc_onnx::to_bytes(&loaded.model) == before,
            "{name}: payloads changed"
        );
    }
}

#[test]
fn spilled_payloads_are_mapped_and_read_back_unchanged() {
    // `FileMaps::spill` moves heap payloads (here: the float16 fixture's weights after
    // `upcast-half`) into a mapped temporary file: the model serializes to the same bytes
    // before and after, every large payload is then in the maps, and releasing its pages
    // reads the same again.
    let mut loaded = perqc_onnx::load(&fixture("hf/qwen2_kv_fp16.onnx")).unwrap();
    perqc_passes::canonicalize(&mut loaded.model).unwrap();
    let before = perqc_onnx::to_bytes(&loaded.model);
    let large = |m: &perqc_ir::Model| -> Vec<perqc_ir::ValueId> {
        m.graph
            .initializers
            .iter()
            .copied()
            .filter(|&v| {
                m.graph
                    .value(v)
                    .tensor
                    .as_ref()
                    .unwrap()
                    .raw_bytes()
                    .unwrap()
                    .len()
                    >= 4096
            })
            .collect()
    };
    let heap = large(&loaded.model)
        .into_iter()
        .filter(|&v| {
            let t = loaded.model.graph.value(v).tensor.as_ref().unwrap();
            loaded.files.locate(t).is_none()
        })
        .count();
    assert!(heap > 0, "the upcast weights are heap copies");
    let moved = loaded
        .files
        .spill(&mut loaded.model, 4096, &std::env::temp_dir())
        .unwrap();
    assert!(moved > 0);
    assert!(
        perqc_onnx::to_bytes(&loaded.model) == before,
        "payloads changed"
    );
    let g = &loaded.model.graph;
    for v in large(&loaded.model) {
        let t = g.value(v).tensor.as_ref().unwrap();
        assert!(loaded.files.locate(t).is_some(), "`{}` not mapped", t.name);
        loaded.release(t);
    }
    assert!(
        perqc_onnx::to_bytes(&loaded.model) == before,
        "payloads changed after release"
    );
    assert_eq!(
        loaded
            .files
            .spill(&mut loaded.model, 4096, &std::env::temp_dir())
            .unwrap(),
        0,
        "nothing left"
    );
}
