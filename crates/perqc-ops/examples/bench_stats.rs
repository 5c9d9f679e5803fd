//! Per-batch times of the calibration observer (`ChannelStats::update`) on SmolLM2-135M's
//! linear inputs, one 512-token window per batch: the moments alone, the Gram matrix
//! (GPTQ's Hessian), and the quantizer's error cross product `E` (GPTQ's fit to the float
//! output), each with the GFLOP/s its product reaches.
//!
//! usage: bench_stats [--threads 2] [--reps 15]

use ndarray::Array2;
use perqc_ops::quant::TokenQuant;
use perqc_ops::stats::{ChannelStats, StatsOptions};
use std::time::Instant;

fn data(rows: usize, c: usize, seed: u64) -> Array2<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    Array2::from_shape_fn((rows, c), |_| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
    })
}

fn main() {
    let mut threads = 2usize;
    let mut reps = 15usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--threads" => threads = args[i + 1].parse().expect("--threads N"),
            "--reps" => reps = args[i + 1].parse().expect("--reps N"),
            a => panic!("unknown argument {a}"),
        }
        i += 2;
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool");
    let rows = 512;
    let q = TokenQuant {
        bits: 4,
        symmetric: false,
        clip: 1.0,
    };
    println!("{rows} rows per batch, {threads} threads, median of {reps}");
    println!("| channels | what | ms per batch | GFLOP/s |");
    println!("|---|---|---|---|");
    for c in [576usize, 1536] {
        let x = data(rows, c, c as u64);
        let cases: [(&str, StatsOptions, f64); 3] = [
            ("moments", StatsOptions::default(), 0.0),
            (
                "gram",
                StatsOptions {
                    gram: true,
                    ..StatsOptions::default()
                },
                // The symmetric half: c (c + 1) / 2 dot products of `rows` terms.
                (c * (c + 1)) as f64 * rows as f64,
            ),
            (
                "quant error",
                StatsOptions {
                    quant_error: Some(q),
                    ..StatsOptions::default()
                },
                // A sampled 9/16 of the rows, a full c x c product.
                2.0 * (c * c) as f64 * (rows * 9 / 16) as f64,
            ),
        ];
        for (what, opts, flop) in cases {
            let mut st = ChannelStats::new(c, &opts).expect("stats");
            let mut t: Vec<f64> = (0..reps)
                .map(|_| {
                    let s = Instant::now();
                    pool.install(|| st.update(x.view())).expect("update");
                    s.elapsed().as_secs_f64()
                })
                .collect();
            t.sort_by(f64::total_cmp);
            let m = t[reps / 2];
            let rate = if flop > 0.0 {
                format!("{:.0}", flop / m / 1e9)
            } else {
                String::new()
            };
            println!("| {c} | {what} | {:.3} | {rate} |", m * 1e3);
        }
    }
}
