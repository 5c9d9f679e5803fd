//! The exact transforms, each alone and chained as the recipe chains them, emitted as ONNX:
//! ONNX Runtime must run every file (onnx.checker accepts it) and give the original
//! fixture's outputs within 1e-4 relative (max abs error / max abs value), on both Llama
//! exports, the Gemma-like decoder, the encoder and the Hugging Face exports with fused
//! projections (Phi-3, GPT-2, GPT-NeoX) and Gemma 2 (soft-capped attention). Registered as
//! conformance cases for `scripts/check`.

mod common;

use common::{Compare, conformance_case, fixture, out_dir};
use perqc_ir::{PassManager, RunOptions};

const PIPELINES: [(&str, &str); 6] = [
    (
        "permute",
        "permute(method=random,seed=5,residual=true,heads=true,block=16)",
    ),
    ("fold_norms", "fold-norms"),
    ("rotate", "fold-norms,rotate"),
    (
        "rotate_block",
        "fold-norms,rotate(residual=block,heads=block,block=8,signs=3)",
    ),
    ("online_hadamard", "online-hadamard(block=32)"),
    (
        "chain",
        "permute(method=random,seed=1,block=32),fold-norms,rotate,online-hadamard(block=32)",
    ),
];

fn emit(fixture_name: &str, tag: &str, pipeline: &str) {
    let src = fixture(fixture_name);
    let mut model = perqc_onnx::load(&src).expect("loads").model;
    perqc_passes::canonicalize(&mut model).expect("canonicalizes");
    let mut p = perqc_passes::registry().build(pipeline).expect("pipeline");
    PassManager::new()
        .run(&mut model, &mut p, &mut RunOptions::default())
        .unwrap_or_else(|e| panic!("{fixture_name} {pipeline}: {e}"));
    perqc_passes::lower_for_export(&mut model).expect("lowers");
    let stem = fixture_name.trim_end_matches(".onnx").replace('/', "_");
    let dir = out_dir(&format!("transforms_{stem}_{tag}"));
    let out = dir.join("model.onnx");
    perqc_onnx::save(&model, &out, &Default::default()).expect("saves");
    conformance_case(
        &format!("transform_{stem}_{tag}"),
        &src,
        &out,
        Compare::Close(1e-4),
    );
}

#[test]
fn llama_torchscript() {
    for (tag, p) in PIPELINES {
        emit("llama_ts.onnx", tag, p);
    }
}

#[test]
fn llama_dynamo() {
    for (tag, p) in PIPELINES {
        emit("llama_dynamo.onnx", tag, p);
    }
}

/// The Gemma-like decoder: the residual rotation is refused (post-norm gammas), the rest
/// applies.
#[test]
fn gemma_like() {
    for (tag, p) in PIPELINES {
        emit("gemma_like.onnx", tag, p);
    }
}

/// The encoder: the residual rotation is refused (the stream is the graph's input), the
/// rest applies.
#[test]
fn encoder() {
    for (tag, p) in PIPELINES {
        emit("encoder_ln_gelu.onnx", tag, p);
    }
}

/// Phi-3: one `qkv_proj` sliced into q, k and v, one `gate_up_proj` split into gate and up.
/// The value part of qkv_proj's columns and o_proj take R2 and the heads permutation; the
/// mlp region pairs gate's and up's column j, so the permutations move both halves of
/// gate_up_proj's columns alike, and the online Hadamard goes before down_proj.
#[test]
fn phi3_fused_projections() {
    for (tag, p) in PIPELINES {
        emit("hf/phi3.onnx", tag, p);
    }
}

/// GPT-2: Conv1D (Gemm) writing q, k and v, split into three along the channels.
#[test]
fn gpt2_fused_qkv() {
    for (tag, p) in PIPELINES {
        emit("hf/gpt2.onnx", tag, p);
    }
}

/// GPT-NeoX: the fused projection (and its bias, shared with other layers' linears in this
/// export) reshaped to [B, S, H, 3·D] and split per head on the last axis: the value part
/// is every head's last third.
#[test]
fn gpt_neox_fused_qkv_per_head() {
    for (tag, p) in PIPELINES {
        emit("hf/gpt_neox.onnx", tag, p);
    }
}

/// Gemma 2 (fixtures/hf): its soft-capped attention canonicalizes into Attention with
/// `softcap`, so the V/O head rotation applies; the residual rotation is refused (post-norm
/// gammas), the rest applies. Lowered at opset 18, the cap is written back as its chain.
#[test]
fn gemma2_soft_capped_attention() {
    for (tag, p) in PIPELINES {
        emit("hf/gemma2.onnx", tag, p);
    }
}
