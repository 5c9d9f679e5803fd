//! The GEMM figures of docs/runtime.md, side by side in one process: SmolLM2's seq-512
//! products through `gemm` on 1 thread, through `gemm`'s own `Parallelism::Rayon`, and
//! through the runtime's MatMul kernel (its own split over the pool, huge-page-advised
//! output); the LM head into a fresh unadvised buffer vs a reused one; and the LM head's
//! weight row-major vs a transposed view of the `[vocab, hidden]` table (the tied head).
//!
//! usage: bench_gemm [--threads 2] [--reps 9]

use ndarray::{ArrayD, IxDyn};
use perqc_ir::{Graph, NodeSpec};
use perqc_ops::{KernelCtx, RtTensor, lookup};
use std::time::Instant;

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// `c = a b` with `gemm` (row-major `m x k`, `k x n`, `m x n`).
fn gemm_into(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    (m, k, n): (usize, usize, usize),
    par: gemm::Parallelism,
) {
    // Safety: the slices hold m*k, k*n and m*n elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut threads, mut reps) = (2usize, 9usize);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--threads" => threads = args.next().unwrap_or_default().parse()?,
            "--reps" => reps = args.next().unwrap_or_default().parse()?,
            other => anyhow::bail!("unknown option {other}"),
        }
    }
    perqc_runtime::tune_allocator();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let mut g = Graph::new("bench");
    let id = g.add_node(NodeSpec::new("MatMul").named("mm"), &[], &["y"])?;
    let kernel = lookup("", "MatMul", 13)
        .and_then(|d| d.kernel)
        .expect("MatMul kernel");
    let ctx = KernelCtx {
        node: g.node(id),
        opset: 13,
        threads,
        subgraphs: None,
    };
    let time = |f: &mut dyn FnMut()| {
        median(
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect(),
        )
    };
    println!(
        "{:>20} {:>10} {:>14} {:>14}   (ms, median of {reps}, {threads} threads)",
        "m x k x n", "1 thread", "gemm Rayon", "perqc MatMul"
    );
    for (m, k, n) in [
        (512, 576, 1536),
        (512, 1536, 576),
        (512, 576, 576),
        (512, 576, 192),
        (512, 576, 49152),
    ] {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut c = vec![0f32; m * n];
        let one = time(&mut || gemm_into(&mut c, &a, &b, (m, k, n), gemm::Parallelism::None));
        let ray = pool.install(|| {
            time(&mut || gemm_into(&mut c, &a, &b, (m, k, n), gemm::Parallelism::Rayon(threads)))
        });
        let (ta, tb) = (
            RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[m, k]), a.clone())?),
            RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[k, n]), b.clone())?),
        );
        let ours =
            pool.install(|| time(&mut || drop(kernel(&ctx, &[Some(&ta), Some(&tb)]).unwrap())));
        println!(
            "{:>20} {one:>10.3} {ray:>14.3} {ours:>14.3}",
            format!("{m}x{k}x{n}")
        );
    }
    // The LM head's 100 MB output: written into a fresh, unadvised buffer each time (what a
    // plain Vec gets above the mmap threshold) vs one reused buffer; the MatMul row above
    // is the advised fresh buffer.
    let (m, k, n) = (512, 576, 49152);
    let (a, b) = (vec![0.5f32; m * k], vec![0.25f32; k * n]);
    let mut reused = vec![0f32; m * n];
    let fresh = pool.install(|| {
        time(&mut || {
            let mut c = vec![0f32; m * n]; // calloc: fresh zero pages, faulted on first write
            gemm_into(&mut c, &a, &b, (m, k, n), gemm::Parallelism::Rayon(threads));
        })
    });
    let warm = pool.install(|| {
        time(&mut || {
            gemm_into(
                &mut reused,
                &a,
                &b,
                (m, k, n),
                gemm::Parallelism::Rayon(threads),
            )
        })
    });
    println!("LM head output: fresh unadvised buffer {fresh:.3} ms, reused buffer {warm:.3} ms");
    // The tied head reads the embedding table `[n, k]` as a transposed view (`Linear`
    // with transB): the MatMul kernel on that view against a row-major `[k, n]` copy.
    let ta = RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[m, k]), a.clone())?);
    let row_major = RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[k, n]), b.clone())?);
    let table = ArrayD::from_shape_vec(IxDyn(&[n, k]), vec![0.25f32; n * k])?;
    let transposed = RtTensor::F32(table.into_shared().reversed_axes());
    let mut pair = [0f64; 2];
    for (t, w) in pair.iter_mut().zip([&row_major, &transposed]) {
        *t = pool.install(|| time(&mut || drop(kernel(&ctx, &[Some(&ta), Some(w)]).unwrap())));
    }
    println!(
        "LM head weight: row-major [k, n] {:.3} ms, transposed view of [n, k] {:.3} ms",
        pair[0], pair[1]
    );
    Ok(())
}
