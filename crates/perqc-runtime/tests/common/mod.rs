//! Shared by the kernel test files: running one op through the op table, seeded data.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use perqc_ir::{AttrValue, Graph, NodeSpec};
use perqc_ops::{KernelCtx, RtTensor, lookup};

/// Runs `op` at `opset` with `attrs` on `inputs` through the op table, inside a rayon pool
/// of `threads` threads (the kernel is told the same count).
pub fn run_threads(
    op: &str,
    opset: i64,
    attrs: Vec<(&str, AttrValue)>,
    inputs: &[Option<&RtTensor>],
    threads: usize,
) -> Vec<RtTensor> {
    run_in("", op, opset, attrs, inputs, threads)
}

/// [`run_threads`] for an op of `domain`.
pub fn run_in(
    domain: &str,
    op: &str,
    opset: i64,
    attrs: Vec<(&str, AttrValue)>,
    inputs: &[Option<&RtTensor>],
    threads: usize,
) -> Vec<RtTensor> {
    let mut g = Graph::new("t");
    let mut spec = NodeSpec::new(op).named("n");
    spec.domain = domain.to_string();
    for (k, v) in attrs {
        spec = spec.attr(k, v);
    }
    let id = g.add_node(spec, &[], &["y"]).unwrap();
    let k = lookup(domain, op, opset)
        .and_then(|d| d.kernel)
        .expect("kernel");
    let ctx = KernelCtx {
        node: g.node(id),
        opset,
        threads,
        subgraphs: None,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| k(&ctx, inputs).unwrap())
}

/// `n` deterministic values, uniform in [-half_width, half_width) (64-bit LCG, top bits).
pub fn uniform(n: usize, seed: u64, half_width: f32) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * half_width
        })
        .collect()
}
