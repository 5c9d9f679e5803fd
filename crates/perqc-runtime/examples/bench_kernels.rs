//! Per-call times of the non-GEMM kernels on the shapes of a SmolLM2-135M forward pass at
//! sequence length 512, with the input layouts the model produces (e.g. slices of
//! transposed views), through the op table.
//!
//! usage: bench_kernels [--threads 2] [--reps 30] [FILTER]
//! Prints the median and minimum microseconds per call of each case whose name contains
//! FILTER.

use anyhow::{Context, Result, bail};
use ndarray::{ArrayD, IxDyn};
use perqc_ir::{AttrValue, Graph, NodeSpec};
use perqc_ops::{KernelCtx, RtTensor, lookup};
use std::time::Instant;

/// A kernel call ready to run: op, opset, attributes and inputs.
struct Case {
    name: &'static str,
    op: &'static str,
    opset: i64,
    attrs: Vec<(&'static str, AttrValue)>,
    inputs: Vec<RtTensor>,
}

/// Runs `op` once through the op table on the current rayon pool.
fn call(
    op: &str,
    opset: i64,
    attrs: &[(&str, AttrValue)],
    inputs: &[RtTensor],
    threads: usize,
) -> Result<Vec<RtTensor>> {
    let mut g = Graph::new("b");
    let mut spec = NodeSpec::new(op).named("n");
    for (k, v) in attrs {
        spec = spec.attr(k, v.clone());
    }
    let id = g.add_node(spec, &[], &["y"])?;
    let k = lookup("", op, opset)
        .and_then(|d| d.kernel)
        .with_context(|| format!("no kernel for {op}"))?;
    let ctx = KernelCtx {
        node: g.node(id),
        opset,
        threads,
        subgraphs: None,
    };
    let ins: Vec<Option<&RtTensor>> = inputs.iter().map(Some).collect();
    Ok(k(&ctx, &ins)?)
}

/// Deterministic pseudo-random values in [-4, 4).
fn f32t(shape: &[usize], seed: u64) -> RtTensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let v = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
        })
        .collect();
    RtTensor::f32(ArrayD::from_shape_vec(IxDyn(shape), v).expect("shape"))
}

/// `[1, 1, n, n]`: 0 where key `j <= i`, `f32::MIN` above the diagonal.
fn causal_mask(n: usize) -> RtTensor {
    let m = ArrayD::from_shape_fn(IxDyn(&[1, 1, n, n]), |ix| {
        if ix[3] <= ix[2] { 0.0 } else { f32::MIN }
    });
    RtTensor::f32(m)
}

fn i64v(v: &[i64]) -> RtTensor {
    RtTensor::i64_vec(v.to_vec())
}

/// `[1, h, 512, 64]` as the model has it: a `[1, 512, h, 64]` product transposed (a view).
fn heads(h: usize, seed: u64, threads: usize) -> Result<RtTensor> {
    let x = f32t(&[1, 512, h, 64], seed);
    let perm = AttrValue::Ints(vec![0, 2, 1, 3]);
    Ok(call("Transpose", 13, &[("perm", perm)], &[x], threads)?.remove(0))
}

/// Half `[.., lo..hi]` of the last axis of `x` (a view).
fn half(x: &RtTensor, lo: i64, hi: i64, threads: usize) -> Result<RtTensor> {
    let ins = [x.clone(), i64v(&[lo]), i64v(&[hi]), i64v(&[-1])];
    Ok(call("Slice", 13, &[], &ins, threads)?.remove(0))
}

fn cases(threads: usize) -> Result<Vec<Case>> {
    let c = |name, op, opset, attrs, inputs| Case {
        name,
        op,
        opset,
        attrs,
        inputs,
    };
    let q = heads(9, 7, threads)?;
    let k = heads(3, 8, threads)?;
    let q2 = half(&q, 32, 64, threads)?;
    let q1 = half(&q, 0, 32, threads)?;
    let neg_q2 = call("Neg", 13, &[], std::slice::from_ref(&q2), threads)?.remove(0);
    let k5 = f32t(&[1, 3, 1, 512, 64], 9);
    let ctx_t = f32t(&[1, 9, 512, 64], 10);
    let big = f32t(&[1, 9, 512, 512], 1);
    let hid = f32t(&[1, 512, 576], 3);
    let mlp = f32t(&[1, 512, 1536], 4);
    Ok(vec![
        c("softmax", "Softmax", 13, vec![], vec![big.clone()]),
        c(
            "mul_scores_scalar",
            "Mul",
            13,
            vec![],
            vec![big.clone(), f32t(&[], 2)],
        ),
        c(
            "add_mask",
            "Add",
            13,
            vec![],
            vec![big.clone(), f32t(&[1, 1, 512, 512], 5)],
        ),
        c(
            "mul_mlp",
            "Mul",
            13,
            vec![],
            vec![mlp.clone(), f32t(&[1, 512, 1536], 6)],
        ),
        c("sigmoid_mlp", "Sigmoid", 13, vec![], vec![mlp.clone()]),
        c(
            "reduce_mean_hidden",
            "ReduceMean",
            18,
            vec![],
            vec![hid.clone(), i64v(&[-1])],
        ),
        c(
            "pow2_hidden",
            "Pow",
            13,
            vec![],
            vec![
                hid.clone(),
                RtTensor::f32(ArrayD::from_elem(IxDyn(&[]), 2.0)),
            ],
        ),
        c(
            "mul_hidden_row",
            "Mul",
            13,
            vec![],
            vec![hid.clone(), f32t(&[1, 512, 1], 12)],
        ),
        c(
            "mul_weight_hidden",
            "Mul",
            13,
            vec![],
            vec![f32t(&[576], 13), hid.clone()],
        ),
        c(
            "add_hidden",
            "Add",
            13,
            vec![],
            vec![hid.clone(), f32t(&[1, 512, 576], 14)],
        ),
        c(
            "mul_rope_q",
            "Mul",
            13,
            vec![],
            vec![q.clone(), f32t(&[1, 1, 512, 64], 15)],
        ),
        c("neg_rope_q", "Neg", 13, vec![], vec![q2.clone()]),
        c(
            "concat_rope_q",
            "Concat",
            13,
            vec![("axis", AttrValue::Int(-1))],
            vec![neg_q2, q1],
        ),
        c(
            "expand_kv",
            "Expand",
            13,
            vec![],
            vec![k5, i64v(&[1, 3, 3, 512, 64])],
        ),
        c(
            "reshape_ctx",
            "Reshape",
            13,
            vec![],
            vec![
                call(
                    "Transpose",
                    13,
                    &[("perm", AttrValue::Ints(vec![0, 2, 1, 3]))],
                    &[ctx_t],
                    threads,
                )?
                .remove(0),
                i64v(&[1, 512, 576]),
            ],
        ),
        c(
            "neg_rope_k",
            "Neg",
            13,
            vec![],
            vec![half(&k, 32, 64, threads)?],
        ),
        c(
            "concat_shape",
            "Concat",
            13,
            vec![("axis", AttrValue::Int(0))],
            vec![i64v(&[1]), i64v(&[512]), i64v(&[9]), i64v(&[64])],
        ),
        c("sqrt_row", "Sqrt", 13, vec![], vec![f32t(&[1, 512, 1], 16)]),
        // One layer's grouped attention as the canonical graph runs it: transposed views,
        // the export's additive causal mask (float min above the diagonal).
        c(
            "attention_causal_gqa",
            "Attention",
            23,
            vec![("scale", AttrValue::Float(0.125))],
            vec![
                q.clone(),
                k.clone(),
                heads(3, 17, threads)?,
                causal_mask(512),
            ],
        ),
    ])
}

fn main() -> Result<()> {
    let (mut threads, mut reps, mut filter) = (2usize, 30usize, String::new());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--threads" => threads = val()?.parse()?,
            "--reps" => reps = val()?.parse()?,
            s if s.starts_with("--") => bail!("unknown option {s}"),
            s => filter = s.to_string(),
        }
    }
    perqc_runtime::tune_allocator();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    pool.install(|| -> Result<()> {
        for case in cases(threads)? {
            if !case.name.contains(&filter) {
                continue;
            }
            let mut t = Vec::with_capacity(reps);
            for _ in 0..reps.max(1) {
                let s = Instant::now();
                let out = call(case.op, case.opset, &case.attrs, &case.inputs, threads)?;
                t.push(s.elapsed().as_secs_f64() * 1e6);
                drop(out);
            }
            t.sort_by(f64::total_cmp);
            println!(
                "{:<22} {:>9.1} us median {:>9.1} us min",
                case.name,
                t[t.len() / 2],
                t[0]
            );
        }
        Ok(())
    })
}
