//! The "Online Hadamard" figures of docs/runtime.md: PeRQ's rotation of a down projection's
//! input, x `[512, 1536]` (SmolLM2's MLP width, 512 tokens) in blocks of b = 32, as the fast
//! Walsh-Hadamard transform against the dense per-block product, in one process.
//!
//! - `op fwht`: `ai.perqc::Hadamard` through the op table with the normalized Sylvester H
//!   (fresh output, the level the CPU has), on 1 thread and on `--threads`;
//! - `fwht <level>`: the transform alone at each vector level this CPU runs, 1 thread, into
//!   a reused buffer;
//! - `op dense`: the same op with H one ulp off a Sylvester matrix, which takes the dense
//!   path (the MatMul kernel on `[512 · 48, 32] x [32, 32]`, what the lowered graph runs);
//! - `matmul`: that MatMul kernel call itself;
//! - `op full` / `op full dense`: the whole width as one block when it is not a power of two
//!   (1536 = 12 · 128): perqc's `H_12 ⊗ S_128`, which takes the structured path, and the
//!   same H one ulp off, which takes the dense product.
//!
//! usage: bench_hadamard [--threads 2] [--reps 51] [--rows 512] [--width 1536] [--block 32]
//! Prints the median and minimum microseconds per call of each case.

use anyhow::{Context, Result, bail};
use ndarray::{ArrayD, IxDyn};
use perqc_ir::{Graph, NodeSpec};
use perqc_ops::kernels::hadamard::{Level, fwht};
use perqc_ops::{KernelCtx, PERQC_DOMAIN, RtTensor, lookup};
use std::mem::MaybeUninit;
use std::time::Instant;

/// Median and minimum of `reps` timed calls of `f`, in microseconds (after one untimed).
fn time(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[t.len() / 2], t[0])
}

/// Runs `op` of `domain` once through the op table with `threads`.
fn call(domain: &str, op: &str, inputs: &[&RtTensor], threads: usize) -> Result<RtTensor> {
    let mut g = Graph::new("b");
    let mut spec = NodeSpec::new(op).named("n");
    spec.domain = domain.to_string();
    let id = g.add_node(spec, &[], &["y"])?;
    let k = lookup(domain, op, if domain.is_empty() { 13 } else { 1 })
        .and_then(|d| d.kernel)
        .with_context(|| format!("no kernel for {op}"))?;
    let ctx = KernelCtx {
        node: g.node(id),
        opset: 1,
        threads,
        subgraphs: None,
    };
    let ins: Vec<Option<&RtTensor>> = inputs.iter().copied().map(Some).collect();
    Ok(k(&ctx, &ins)?.remove(0))
}

fn main() -> Result<()> {
    let (mut threads, mut reps) = (2usize, 51usize);
    let (mut rows, mut width, mut b) = (512usize, 1536usize, 32usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || -> Result<usize> {
            Ok(args
                .next()
                .with_context(|| format!("{a} needs a value"))?
                .parse()?)
        };
        match a.as_str() {
            "--threads" => threads = val()?,
            "--reps" => reps = val()?,
            "--rows" => rows = val()?,
            "--width" => width = val()?,
            "--block" => b = val()?,
            other => bail!("unknown option {other}"),
        }
    }
    if !b.is_power_of_two() || !width.is_multiple_of(b) {
        bail!("--block must be a power of two dividing --width");
    }
    perqc_runtime::tune_allocator();
    let n = rows * width;
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let xv: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    let c = 1.0 / (b as f32).sqrt();
    let hv: Vec<f32> = (0..b * b)
        .map(|k| {
            if ((k / b) & (k % b)).count_ones().is_multiple_of(2) {
                c
            } else {
                -c
            }
        })
        .collect();
    let mut off = hv.clone();
    off[b + 1] = f32::from_bits(off[b + 1].to_bits() + 1);
    let t = |shape: &[usize], v: &[f32]| -> Result<RtTensor> {
        Ok(RtTensor::f32(ArrayD::from_shape_vec(
            IxDyn(shape),
            v.to_vec(),
        )?))
    };
    let (x, h, h_off) = (t(&[rows, width], &xv)?, t(&[b, b], &hv)?, t(&[b, b], &off)?);
    let blocks = t(&[n / b, b], &xv)?;
    // The full rotation of the width, when perqc builds it as core ⊗ Sylvester (the
    // structured path), and one ulp off it (the dense product).
    let full = match perqc_ops::hadamard::hadamard(width) {
        Ok(hm) if !width.is_power_of_two() => {
            let hf = hm.normalized_f32();
            let mut off = hf.clone();
            off[width + 1] = f32::from_bits(off[width + 1].to_bits() + 1);
            Some((t(&[width, width], &hf)?, t(&[width, width], &off)?))
        }
        _ => None,
    };
    println!(
        "x [{rows}, {width}], b = {b}; detected level {:?}; {reps} reps, median / min us",
        Level::detect()
    );
    let report = |name: &str, (med, min): (f64, f64)| {
        println!("{name:<24} {med:>9.1} {min:>9.1}");
    };
    let pool = |k: usize| rayon::ThreadPoolBuilder::new().num_threads(k).build();
    for k in [1, threads] {
        let p = pool(k)?;
        p.install(|| -> Result<()> {
            let op = |h: &RtTensor| call(PERQC_DOMAIN, "Hadamard", &[&x, h], k);
            report(
                &format!("op fwht, {k} thr"),
                time(reps, || drop(op(&h).expect("runs"))),
            );
            report(
                &format!("op dense, {k} thr"),
                time(reps, || drop(op(&h_off).expect("runs"))),
            );
            report(
                &format!("matmul, {k} thr"),
                time(reps, || {
                    drop(call("", "MatMul", &[&blocks, &h], k).expect("runs"))
                }),
            );
            if let Some((hf, hf_off)) = &full {
                let op = |h: &RtTensor| call(PERQC_DOMAIN, "Hadamard", &[&x, h], k);
                report(
                    &format!("op full, {k} thr"),
                    time(reps, || drop(op(hf).expect("runs"))),
                );
                report(
                    &format!("op full dense, {k} thr"),
                    time(reps, || drop(op(hf_off).expect("runs"))),
                );
            }
            Ok(())
        })?;
    }
    let mut dst: Vec<MaybeUninit<f32>> = vec![MaybeUninit::uninit(); n];
    for level in Level::ALL.into_iter().filter(|l| l.available()) {
        report(
            &format!("fwht {level:?}, 1 thr"),
            time(reps, || fwht(&xv, &mut dst, b, c, level)),
        );
    }
    Ok(())
}
