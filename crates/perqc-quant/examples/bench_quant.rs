//! Times RTN (max and MSE scale search) and GPTQ on the linear shapes of SmolLM2-135M
//! (hidden 576, 3 KV heads of 64, MLP 1536, 30 layers), on random data.
//!
//!     cargo run --release -p perqc-quant --example bench_quant [-- ROUNDS [rtn|gptq|fit]]
//!
//! RTN: all 210 linears of the model per round. GPTQ: each of one layer's 7 linears, with
//! `H = X^T X` from 2048 random calibration rows whose columns have log-normal scales; also
//! the column loop alone (`gptq_with` on a factor made once, as the pipeline shares one per
//! input), the rest being the factor.
//! fit (only when asked for): GPTQ's fit to the float output on down_proj's shape, its ridge
//! factor and its target, next to GPTQ's own factor of the same `H`.
//! Prints the median over ROUNDS rounds (default 5).

use std::time::Instant;

use ndarray::Array2;
use perqc_quant::{
    Format, GptqFactor, GptqOptions, Granularity, InputErrorFit, QuantSpec, ScaleSearch, gptq,
    gptq_with, quantize_rtn, sqnr_db,
};

const SHAPES: [(&str, usize, usize); 7] = [
    ("q_proj", 576, 576),
    ("k_proj", 192, 576),
    ("v_proj", 192, 576),
    ("o_proj", 576, 576),
    ("gate_proj", 1536, 576),
    ("up_proj", 1536, 576),
    ("down_proj", 576, 1536),
];
const LAYERS: usize = 30;

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn weight(rng: &mut Rng, rows: usize, cols: usize) -> Array2<f32> {
    // Gaussian with a few outliers, like trained linears.
    Array2::from_shape_fn((rows, cols), |_| {
        let x = rng.normal() * 0.02;
        (if rng.uniform() < 0.001 { x * 10.0 } else { x }) as f32
    })
}

fn hessian(rng: &mut Rng, cols: usize, samples: usize) -> Array2<f64> {
    let scale: Vec<f64> = (0..cols).map(|_| (rng.normal() * 0.7).exp()).collect();
    let x: Vec<f64> = (0..samples * cols)
        .map(|i| rng.normal() * scale[i % cols])
        .collect();
    let mut h = vec![0f64; cols * cols];
    // Safety: x is samples x cols row-major, h cols x cols; h = x^T x.
    unsafe {
        gemm::gemm(
            cols,
            cols,
            samples,
            h.as_mut_ptr(),
            1,
            cols as isize,
            false,
            x.as_ptr(),
            cols as isize,
            1,
            x.as_ptr(),
            1,
            cols as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
    Array2::from_shape_vec((cols, cols), h).unwrap()
}

fn spec(granularity: Granularity, scale: ScaleSearch) -> QuantSpec {
    QuantSpec {
        bits: 4,
        signed: true,
        symmetric: true,
        granularity,
        format: Format::Int,
        scale,
    }
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let only = std::env::args().nth(2).unwrap_or_default();
    if only == "fit" {
        fit_bench(rounds);
        return;
    }
    println!(
        "rayon threads: {}, rounds: {rounds}",
        rayon::current_num_threads()
    );
    let mut rng = Rng(42);
    let weights: Vec<Array2<f32>> = SHAPES
        .iter()
        .map(|&(_, r, c)| weight(&mut rng, r, c))
        .collect();
    let params: usize = SHAPES.iter().map(|&(_, r, c)| r * c).sum::<usize>() * LAYERS;

    println!(
        "\nRTN, all {} linears ({params} weights), median wall time:",
        SHAPES.len() * LAYERS
    );
    let specs = [
        spec(Granularity::Channel, ScaleSearch::Max),
        spec(Granularity::Channel, ScaleSearch::Mse),
        spec(Granularity::Group(64), ScaleSearch::Mse),
        spec(Granularity::Group(32), ScaleSearch::Mse),
        QuantSpec {
            bits: 8,
            symmetric: false,
            signed: false,
            ..spec(Granularity::Channel, ScaleSearch::Mse)
        },
        QuantSpec {
            format: Format::Fp4,
            ..spec(Granularity::Group(32), ScaleSearch::Mse)
        },
        QuantSpec {
            format: Format::MxFp4,
            ..spec(Granularity::Group(32), ScaleSearch::Mse)
        },
    ];
    for s in specs.iter().filter(|_| only != "gptq") {
        let mut times = Vec::new();
        let mut sq = 0.0;
        for _ in 0..rounds {
            let t = Instant::now();
            for _ in 0..LAYERS {
                for w in &weights {
                    std::hint::black_box(quantize_rtn(w.view(), s).unwrap());
                }
            }
            times.push(t.elapsed().as_secs_f64());
        }
        for w in &weights {
            let q = quantize_rtn(w.view(), s).unwrap();
            sq += sqnr_db(w.as_slice().unwrap(), q.dequantize().as_slice().unwrap());
        }
        println!(
            "  {:<28} {:>8.3} s   (mean SQNR {:.2} dB)",
            s.to_string(),
            median(times),
            sq / weights.len() as f64
        );
    }

    println!("\nGPTQ, one layer (2048 calibration rows), median wall time per linear:");
    let hs: Vec<Array2<f64>> = [576usize, 1536]
        .iter()
        .map(|&c| hessian(&mut rng, c, 2048))
        .collect();
    let h_of = |cols: usize| if cols == 576 { &hs[0] } else { &hs[1] };
    let gspecs = [
        spec(Granularity::Channel, ScaleSearch::Max),
        spec(Granularity::Group(64), ScaleSearch::Mse),
    ];
    for s in gspecs.iter().filter(|_| only != "rtn") {
        println!("  {s}, act_order, block 128:");
        let (mut total, mut columns) = (0.0, 0.0);
        for (&(name, r, c), w) in SHAPES.iter().zip(&weights) {
            let opts = GptqOptions::default();
            let times: Vec<f64> = (0..rounds)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(gptq(w.view(), h_of(c).view(), s, &opts).unwrap());
                    t.elapsed().as_secs_f64()
                })
                .collect();
            // The column loop alone, on a factor made once (the pipeline shares one per
            // input: q/k/v, gate/up).
            let factor = GptqFactor::new(h_of(c).view(), &opts).unwrap();
            let loops: Vec<f64> = (0..rounds)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(gptq_with(w.view(), &factor, s, &opts).unwrap());
                    t.elapsed().as_secs_f64()
                })
                .collect();
            let (m, l) = (median(times), median(loops));
            total += m;
            columns += l;
            println!(
                "    {name:<10} [{r:>4} x {c:>4}] {:>8.1} ms   column loop {:>6.1} ms",
                m * 1e3,
                l * 1e3
            );
        }
        println!(
            "    layer total           {:>8.1} ms   column loops {:>5.1} ms",
            total * 1e3,
            columns * 1e3
        );
    }
}

/// `InputErrorFit::new` and `target` on down_proj (576 x 1536, ridge 1), and
/// `GptqFactor::new` of the same `H`.
fn fit_bench(rounds: usize) {
    let mut rng = Rng(7);
    let h = hessian(&mut rng, 1536, 2048);
    let e = Array2::from_shape_fn((1536, 1536), |_| (rng.normal() * 0.01) as f32);
    let w = weight(&mut rng, 576, 1536);
    let (mut factor, mut target, mut gptq_factor) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        let fit = InputErrorFit::new(h.view(), e.view(), 1.0).unwrap();
        factor.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        std::hint::black_box(fit.target(w.view()).unwrap());
        target.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        std::hint::black_box(GptqFactor::new(h.view(), &GptqOptions::default()).unwrap());
        gptq_factor.push(t.elapsed().as_secs_f64());
    }
    println!(
        "fit to the float output, down_proj [576 x 1536], median wall time:\n  ridge factor {:.1} ms, target {:.1} ms (GPTQ's factor of the same H: {:.1} ms)",
        median(factor) * 1e3,
        median(target) * 1e3,
        median(gptq_factor) * 1e3
    );
}
