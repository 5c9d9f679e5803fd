//! Every exact transform leaves the model's logits unchanged within float round-off, on the
//! fixtures' real graph shapes, run by the native runtime (the ONNX Runtime check of the
//! emitted files is in tests/).

use perqc_ir::{Model, PassManager, Report, RunOptions};
use perqc_passes::calibration::{Calibration, CalibrationSource};
use perqc_passes::regions::{RegionKind, Regions};
use perqc_runtime::{ChannelObserver, RtTensor, Session, StatsOptions};
use std::path::PathBuf;

fn load(name: &str) -> Model {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(name);
    let mut model = perqc_onnx::load(&path).expect("fixture loads").model;
    perqc_passes::canonicalize(&mut model).expect("canonicalizes");
    model
}

/// Logits of the Llama and Gemma-like fixtures for fixed ids, batch 2 x 7.
fn logits(model: &Model) -> Vec<f32> {
    let ids: Vec<i64> = (0..14).map(|i| (i * 53 + 7) % 256).collect();
    let ids = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 7]), ids).unwrap();
    let s = Session::new(model).expect("plans");
    let out = s.run(&[("input_ids", RtTensor::i64(ids))]).expect("runs");
    match &out[0].1 {
        RtTensor::F32(a) => a.iter().copied().collect(),
        other => panic!("{:?}", other.dtype()),
    }
}

/// max |a - b| / max |a|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let m = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    let e = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    e / m
}

fn run(model: &mut Model, pipeline: &str) -> String {
    format!("{}", run_report(model, pipeline))
}

fn run_report(model: &mut Model, pipeline: &str) -> Report {
    let mut p = perqc_passes::registry().build(pipeline).expect("pipeline");
    let mut pm = PassManager::new();
    if pipeline.contains("permute") {
        pm.provide(calibrate(model));
    }
    pm.run(model, &mut p, &mut RunOptions::default())
        .expect("runs")
}

/// Statistics of every region's sink inputs on the test ids (the CLI's calibration does
/// the same on text).
fn calibrate(model: &Model) -> Calibration {
    let shapes = perqc_ops::infer_model(model).unwrap();
    let regions = Regions::find(model, &shapes);
    let kinds = [
        RegionKind::Mlp,
        RegionKind::Residual,
        RegionKind::AttentionVo,
    ];
    let watch = perqc_passes::permute::calibration_values(&regions, &kinds);
    let mut obs = ChannelObserver::new(watch, StatsOptions::default());
    let s = Session::new(model).expect("plans");
    let input = model.graph.value(model.graph.inputs[0]).name.clone();
    let feed = if input == "input_ids" {
        let ids: Vec<i64> = (0..32).map(|i| (i * 29 + 3) % 256).collect();
        RtTensor::i64(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 16]), ids).unwrap())
    } else {
        let x: Vec<f32> = (0..2 * 16 * 64)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 5.0)
            .collect();
        RtTensor::f32(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 16, 64]), x).unwrap())
    };
    s.run_observed(&[(input.as_str(), feed)], &mut obs)
        .expect("runs");
    let mut c = Calibration::new(CalibrationSource {
        description: "test ids".into(),
        sequences: 2,
        tokens: 32,
    });
    for (name, stats) in obs.into_stats() {
        c.insert(name, stats.expect("observed"));
    }
    c
}

fn exact(fixture: &str, pipeline: &str) -> Model {
    exact_report(fixture, pipeline).0
}

/// [`exact`], with what the passes did.
fn exact_report(fixture: &str, pipeline: &str) -> (Model, Report) {
    let mut model = load(fixture);
    let before = logits(&model);
    let report = run_report(&mut model, pipeline);
    let after = logits(&model);
    let e = rel_err(&before, &after);
    assert!(
        e < 1e-5,
        "{fixture} {pipeline}: relative error {e}\n{report}"
    );
    (model, report)
}

/// The notes of every pass in a run.
fn notes(report: &Report) -> Vec<&str> {
    report
        .passes
        .iter()
        .flat_map(|p| p.notes.iter().map(String::as_str))
        .collect()
}

fn hadamards(model: &Model) -> usize {
    model
        .graph
        .nodes()
        .filter(|(_, n)| n.op_type == "Hadamard")
        .count()
}

#[test]
fn fold_norms_is_exact_and_unlocks_rotation() {
    for f in ["llama_ts.onnx", "llama_dynamo.onnx"] {
        let model = exact(f, "fold-norms");
        let shapes = perqc_ops::infer_model(&model).unwrap();
        let r = perqc_passes::regions::Regions::find(&model, &shapes);
        let res = r
            .of_kind(perqc_passes::regions::RegionKind::Residual)
            .next()
            .unwrap();
        assert_eq!(
            res.why_not(perqc_passes::regions::TransformKind::Rotation),
            None,
            "{f}"
        );
    }
}

#[test]
fn rotations_are_exact() {
    for f in ["llama_ts.onnx", "llama_dynamo.onnx"] {
        exact(f, "fold-norms,rotate");
        exact(f, "fold-norms,rotate(residual=block,block=16,signs=7)");
        exact(f, "fold-norms,rotate(residual=block,heads=block,block=8)");
        exact(f, "rotate(residual=none)");
    }
    // The encoder: R1 refused (the stream is the graph input), R2 on each layer.
    exact_encoder("rotate");
    exact_encoder("rotate(heads=block,block=8)");
}

/// A block that does not split the stream into two or more blocks gives the full R1, with
/// a note; the residual permutation is left out there, with a note (no permutation changes
/// what a full rotation does). Blocks of R2 fall back to the whole head the same way.
#[test]
fn block_rotations_that_do_not_split_fall_back_to_full() {
    for (pipeline, note) in [
        (
            "fold-norms,rotate(residual=block,heads=block,block=48)",
            "R1: a block of 48 does not split 64 channels into blocks; the full rotation is used",
        ),
        (
            "permute(block=48,residual=true,mlp=false)",
            "(residual, d = 64): no permutation: a block of 48 does not split it",
        ),
        (
            "permute(block=64,residual=true,mlp=false)",
            "(residual, d = 64): no permutation: a block of 64 does not split it",
        ),
    ] {
        let (_, report) = exact_report("llama_ts.onnx", pipeline);
        let notes = notes(&report);
        assert!(
            notes.iter().any(|n| n.contains(note)),
            "{pipeline}: {notes:?}"
        );
    }
    let (full, _) = exact_report("llama_ts.onnx", "fold-norms,rotate");
    let (fallback, _) = exact_report(
        "llama_ts.onnx",
        "fold-norms,rotate(residual=block,heads=block,block=48)",
    );
    assert_eq!(embedding(&full), embedding(&fallback));
}

/// The embedding table (the first Gather's constant table).
fn embedding(model: &Model) -> Vec<f32> {
    let g = &model.graph;
    g.nodes()
        .filter(|(_, n)| n.op_type == "Gather")
        .find_map(|(_, n)| g.const_tensor(n.input(0)?))
        .expect("an embedding table")
        .to_f32()
        .unwrap()
}

/// The residual permutation balances the blocks R1 will hold: the stream after
/// `fold-norms`, `x / rms(x)`, not the norms' outputs with their own γ. Calibrated with
/// the gammas in place, it chooses what it chooses calibrated after folding them.
#[test]
fn the_residual_permutation_reads_the_stream_without_the_gammas() {
    let pipeline = "permute(block=16,residual=true,mlp=false)";
    for f in ["llama_ts.onnx", "llama_dynamo.onnx"] {
        let (before_fold, report) = exact_report(f, pipeline);
        assert_eq!(report.counter("permute", "regions-permuted"), 1, "{report}");
        let mut folded = load(f);
        run(&mut folded, "fold-norms");
        assert_eq!(
            embedding(&folded),
            embedding(&load(f)),
            "fold-norms leaves the table"
        );
        run(&mut folded, pipeline);
        assert_eq!(embedding(&before_fold), embedding(&folded), "{f}");
        assert_ne!(
            embedding(&before_fold),
            embedding(&load(f)),
            "{f}: permuted"
        );
    }
}

/// The encoder fixture takes hidden states.
fn exact_encoder(pipeline: &str) -> Model {
    let mut model = load("encoder_ln_gelu.onnx");
    let x: Vec<f32> = (0..2 * 5 * 64)
        .map(|i| ((i * 31 % 23) as f32 - 11.0) / 7.0)
        .collect();
    let x = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 5, 64]), x).unwrap();
    let out = |m: &Model| -> Vec<f32> {
        let s = Session::new(m).expect("plans");
        match &s
            .run(&[("hidden", RtTensor::f32(x.clone()))])
            .expect("runs")[0]
            .1
        {
            RtTensor::F32(a) => a.iter().copied().collect(),
            other => panic!("{:?}", other.dtype()),
        }
    };
    let before = out(&model);
    let report = run(&mut model, pipeline);
    let e = rel_err(&before, &out(&model));
    assert!(e < 1e-5, "encoder {pipeline}: relative error {e}\n{report}");
    model
}

#[test]
fn permutations_are_exact() {
    for f in ["llama_ts.onnx", "llama_dynamo.onnx"] {
        exact(f, "permute(block=16,residual=true,heads=true)");
        exact(
            f,
            "permute(method=random,seed=3,residual=true,heads=true,block=8)",
        );
        exact(f, "permute(method=zigzag),fold-norms,rotate");
    }
    exact_encoder("permute(method=absmax,block=64,heads=true)");
}

/// The default recipe's transforms, and the online rotation alone at several block sizes
/// (64 and 192 = 12 · 16 take the dense path of the kernel, 32 and 16 the fast one).
#[test]
fn online_hadamard_and_the_whole_chain_are_exact() {
    for f in ["llama_ts.onnx", "llama_dynamo.onnx"] {
        for b in [16, 32, 64, 192] {
            exact(f, &format!("online-hadamard(block={b})"));
        }
        let m = exact(
            f,
            "permute(block=32),fold-norms,rotate,online-hadamard(block=32,signs=1)",
        );
        let hadamards = m
            .graph
            .nodes()
            .filter(|(_, n)| n.op_type == "Hadamard")
            .count();
        assert_eq!(hadamards, 2, "one per layer");
    }
    exact_encoder("online-hadamard(block=64)");
}

#[test]
fn a_block_that_does_not_divide_lists_the_sizes_that_do() {
    let mut model = load("llama_ts.onnx");
    let mut p = perqc_passes::registry()
        .build("online-hadamard(block=40)")
        .unwrap();
    let err = PassManager::new()
        .run(&mut model, &mut p, &mut RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not divide 192") && err.contains("1, 2, 4, 8, 12, 16, 24"),
        "{err}"
    );
}

/// A transform pass run again on its own output does nothing and says so; the model's
/// metadata lists what ran. An identity permutation changes nothing and reports no change.
#[test]
fn transform_passes_run_once() {
    let mut model = load("llama_ts.onnx");
    let before = logits(&model);
    let first = run(&mut model, "fold-norms,rotate,online-hadamard");
    assert!(first.contains("residual-rotated=1"), "{first}");
    let again = run(&mut model, "fold-norms,rotate,online-hadamard");
    assert!(again.contains("already applied"), "{again}");
    assert!(!again.contains("residual-rotated=1"), "{again}");
    assert!(rel_err(&before, &logits(&model)) < 1e-5);
    let (_, v) = model
        .metadata
        .iter()
        .find(|(k, _)| k == perqc_passes::transform::APPLIED_KEY)
        .expect("recorded");
    assert_eq!(v, "rotate,online-hadamard");

    let mut model = load("llama_ts.onnx");
    let report = run(&mut model, "permute(method=identity)");
    assert!(report.contains("regions-permuted=0"), "{report}");
}

/// The Gemma-like decoder's sandwich norms: `fold-norms` folds the two pre-norms of each
/// layer and the final norm (their `1 + w` gammas go into q/k/v, gate/up and the lm_head)
/// and leaves the four post-norms, whose outputs are added to the residual, with a note.
/// Their gammas still keep rotations off the residual stream.
#[test]
fn gemma_fold_norms_is_exact_and_leaves_the_post_norms() {
    let (model, report) = exact_report("gemma_like.onnx", "fold-norms");
    assert_eq!(report.counter("fold-norms", "norms-folded"), 5, "{report}");
    let notes = notes(&report);
    let post: Vec<&&str> = notes
        .iter()
        .filter(|n| n.contains("not folded") && n.contains("/post_"))
        .collect();
    assert_eq!(post.len(), 4, "{notes:?}");
    assert!(
        post.iter().all(|n| n.contains("post-norm residual")),
        "{notes:?}"
    );

    let shapes = perqc_ops::infer_model(&model).unwrap();
    let r = Regions::find(&model, &shapes);
    let res = r.of_kind(RegionKind::Residual).next().unwrap();
    let why = res
        .why_not(perqc_passes::regions::TransformKind::Rotation)
        .expect("post-norm gammas block rotations");
    assert!(
        why.contains("post_attention_layernorm") && why.contains("not uniform"),
        "{why}"
    );

    // The recipe's fold: where a gamma stays (and so no rotation follows), none folds.
    let (_, report) = exact_report("gemma_like.onnx", "fold-norms(rotatable-only=true)");
    assert_eq!(report.counter("fold-norms", "norms-folded"), 0, "{report}");
    let left = crate::notes(&report);
    assert!(
        left.iter()
            .any(|n| n.contains("(residual, d = 64): no norm folded")
                && n.contains("post-norm residual")),
        "{left:?}"
    );
    for f in ["llama_ts.onnx", "llama_dynamo.onnx"] {
        let (_, report) = exact_report(f, "fold-norms(rotatable-only=true)");
        assert_eq!(
            report.counter("fold-norms", "norms-folded"),
            5,
            "{f}\n{report}"
        );
    }
}

/// Random permutations of the residual stream (its post-norm gammas are permuted with it)
/// and of both GeGLU regions.
#[test]
fn gemma_permutations_are_exact() {
    let (_, report) = exact_report(
        "gemma_like.onnx",
        "permute(method=random,seed=2,residual=true,heads=true,block=16)",
    );
    // The residual stream and 2 mlp regions (the attention_vo regions are missing: see
    // regions.rs, gemma_attention_regions_with_one_key_value_head).
    assert!(
        report.counter("permute", "regions-permuted") >= 3,
        "{report}"
    );
    exact("gemma_like.onnx", "permute(block=32,residual=true)");
    exact(
        "gemma_like.onnx",
        "permute(method=zigzag),fold-norms,rotate",
    );
}

/// R1 is refused on the Gemma-like decoder (the post-norms' gammas), with the region's
/// reason in a note; what `rotate` does apply is exact.
#[test]
fn gemma_rotate_is_exact_and_refuses_the_residual_stream() {
    for pipeline in [
        "fold-norms,rotate",
        "fold-norms,rotate(residual=block,block=16,signs=7)",
        "rotate",
    ] {
        let (_, report) = exact_report("gemma_like.onnx", pipeline);
        assert_eq!(
            report.counter("rotate", "residual-rotated"),
            0,
            "{pipeline}\n{report}"
        );
        let notes = notes(&report);
        assert!(
            notes
                .iter()
                .any(|n| n.contains("(residual, d = 64): no rotation") && n.contains("not uniform")),
            "{pipeline}: {notes:?}"
        );
    }
}

/// R3 before each GeGLU down_proj (d 256) at several block sizes, and the recipe's chain.
#[test]
fn gemma_online_hadamard_and_the_whole_chain_are_exact() {
    for b in [16, 32, 256] {
        let m = exact("gemma_like.onnx", &format!("online-hadamard(block={b})"));
        assert_eq!(hadamards(&m), 2, "one per layer");
    }
    let m = exact(
        "gemma_like.onnx",
        "permute(block=32),fold-norms,rotate,online-hadamard(block=32,signs=1)",
    );
    assert_eq!(hadamards(&m), 2, "one per layer");
}

/// `rotate` on the Gemma-like decoder applies R2: one `H_256` on each layer's single
/// value head and on o_proj's two reads of it (regions.rs,
/// gemma_attention_regions_with_one_key_value_head).
#[test]
fn gemma_rotate_rotates_the_value_heads() {
    let (_, report) = exact_report("gemma_like.onnx", "fold-norms,rotate");
    assert_eq!(report.counter("rotate", "heads-rotated"), 2, "{report}");
}
