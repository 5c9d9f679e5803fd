//! One forward pass of a causal LM (input `input_ids` [1, seq]) natively, timed.
//!
//! usage: bench_forward MODEL [--seq 512] [--reps 3] [--threads 2] [--seed 0]
//!                            [--vocab 49152] [--save DIR] [--profile] [--as-is] [--no-int]
//!                            [--fresh-outputs]
//! Prints load, plan and per-run wall times and the median. With `--save`, writes
//! `DIR/input_ids.npy` and `DIR/<output>.npy` (`/` in a name written `_`) (for comparison with ONNX Runtime, see
//! `scripts/bench_runtime.py`). The model is canonicalized first (exported attention, RMS
//! norm and SiLU chains become one op each) unless `--as-is`, and its quantized linears run
//! on the integer kernels (`fuse-int-linear`) unless `--no-int` or `--as-is`. Each run's
//! outputs go back to the runtime (`perqc_runtime::recycle`) before the next run, as
//! `perqc eval` does, unless `--fresh-outputs` (each run then maps its logits anew).

use anyhow::{Context, Result, bail};
use ndarray::{ArrayD, IxDyn};
use perqc_runtime::{Profile, RtTensor, Session, SessionOptions, write_npy};
use std::path::PathBuf;
use std::time::Instant;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut model = None;
    let (mut seq, mut reps, mut threads, mut seed, mut vocab) =
        (512usize, 3usize, 2usize, 0u64, 49152u64);
    let mut save: Option<PathBuf> = None;
    let mut profile = None;
    let mut as_is = false;
    let mut int = true;
    let mut reuse = true;
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--seq" => seq = val()?.parse()?,
            "--reps" => reps = val()?.parse()?,
            "--threads" => threads = val()?.parse()?,
            "--seed" => seed = val()?.parse()?,
            "--vocab" => vocab = val()?.parse()?,
            "--save" => save = Some(val()?.into()),
            "--profile" => profile = Some(Profile::default()),
            "--as-is" => as_is = true,
            "--no-int" => int = false,
            "--fresh-outputs" => reuse = false,
            s if s.starts_with("--") => bail!("unknown option {s}"),
            s => model = Some(PathBuf::from(s)),
        }
    }
    let model = model.context("usage: bench_forward MODEL [--seq N] [--reps N] [--threads N]")?;
    let t = Instant::now();
    let mut loaded = perqc_onnx::load(&model)?;
    let load_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    perqc_runtime::tune_allocator();
    if !as_is {
        perqc_passes::canonicalize(&mut loaded.model)?;
        if int {
            let fused = perqc_passes::fuse_int_linear(&mut loaded.model)?.counter("fused");
            if fused > 0 {
                println!("{fused} quantized linears on the integer kernels");
            }
        }
    }
    let sess = Session::with_options(&loaded.model, &SessionOptions { threads })?;
    let plan_s = t.elapsed().as_secs_f64();
    println!(
        "load {load_s:.3}s, plan {plan_s:.3}s ({} steps after folding), threads {threads}",
        sess.step_count()
    );
    // Token ids from a 64-bit LCG (the same stream as scripts/bench_runtime.py).
    let mut state = seed;
    let ids: Vec<i64> = (0..seq)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % vocab) as i64
        })
        .collect();
    let x = RtTensor::i64(ArrayD::from_shape_vec(IxDyn(&[1, seq]), ids)?);
    let mut times = Vec::new();
    let mut outs = Vec::new();
    for r in 0..reps.max(1) {
        if reuse {
            perqc_runtime::recycle(std::mem::take(&mut outs).into_iter().map(|(_, t)| t));
        } else {
            outs.clear();
        }
        let t = Instant::now();
        outs = sess.run_profiled(&[("input_ids", x.clone())], profile.as_mut())?;
        let s = t.elapsed().as_secs_f64();
        println!("run {r}: {s:.3}s");
        times.push(s);
    }
    times.sort_by(f64::total_cmp);
    println!("median {:.3}s", times[times.len() / 2]);
    if let Some(p) = &profile {
        for (op, t, n) in p.sorted().iter().take(
            std::env::var("PROFILE_TOP")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(12),
        ) {
            println!("  {op:<20} {t:8.3}s  {n} calls");
        }
    }
    if let Some(dir) = save {
        std::fs::create_dir_all(&dir)?;
        write_npy(&dir.join("input_ids.npy"), &x)?;
        for (name, t) in &outs {
            write_npy(&dir.join(format!("{}.npy", name.replace('/', "_"))), t)?;
        }
    }
    Ok(())
}
