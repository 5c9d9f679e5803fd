//! The integer-kernel figures of docs/runtime.md, side by side in one process, on
//! SmolLM2's seq-512 linear shapes: the float MatMul kernel (f32 weights), the
//! integer step (`QuantizeTokens` then `QuantizedLinear`: per-token quantization, integer
//! product, scaling, packed 4-bit weights) and its parts: the activation quantization alone
//! and the integer product alone at each instruction-set level the CPU runs; and rten-gemm's u8 x i8 -> i32 product
//! on the same codes with the weight as prepacked i8 (one byte per weight: the library has
//! no 4-bit weight layout for products of many rows), its zero-point correction left out
//! (ours is in the epilogue above). The last column is the integer product with a weight
//! scale per group of 32 rows of K and symmetric activation codes (weight-only graphs), at the widest level.
//!
//! `--lm-head` adds SmolLM2's head shape, 512 x 576 x 49152.
//!
//! usage: bench_igemm [--threads 2] [--reps 15] [--lm-head] [--shape MxKxN]...
//!
//! `--shape` (repeatable) times the given shapes instead of SmolLM2's.
//!
//! GOP/s counts 2·m·k·n operations (one multiply and one add per product).

use ndarray::{ArrayD, IxDyn};
use perqc_ir::{AttrValue, Graph, NodeSpec};
use perqc_ops::kernels::igemm::{self, Level, Operands, RowTerms};
use perqc_ops::quant::TokenQuant;
use perqc_ops::{KernelCtx, RtTensor, lookup};
use rten_tensor::prelude::*;
use std::mem::MaybeUninit;
use std::time::Instant;

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut threads, mut reps, mut head) = (2usize, 15usize, false);
    let mut custom = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--lm-head" => head = true,
            "--shape" => {
                let spec = args.next().unwrap_or_default();
                let dims: Vec<usize> = spec
                    .split('x')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .map_err(|e| anyhow::anyhow!("--shape {spec}: {e}"))?;
                let [m, k, n] = dims[..] else {
                    anyhow::bail!("--shape {spec}: expected MxKxN");
                };
                custom.push((m, k, n));
            }
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
    let mm = g.add_node(NodeSpec::new("MatMul").named("mm"), &[], &["y"])?;
    let qt = g.add_node(
        NodeSpec::new("QuantizeTokens")
            .named("qt")
            .attr("bits", AttrValue::Int(4)),
        &[],
        &["codes", "terms"],
    )?;
    let ql = g.add_node(NodeSpec::new("QuantizedLinear").named("ql"), &[], &["z"])?;
    let matmul = lookup("", "MatMul", 13)
        .and_then(|d| d.kernel)
        .expect("MatMul");
    let qlinear = lookup(perqc_ops::PERQC_DOMAIN, "QuantizedLinear", 1)
        .and_then(|d| d.kernel)
        .expect("QuantizedLinear");
    let qtokens = lookup(perqc_ops::PERQC_DOMAIN, "QuantizeTokens", 1)
        .and_then(|d| d.kernel)
        .expect("QuantizeTokens");
    let ctx = |id| KernelCtx {
        node: g.node(id),
        opset: 13,
        threads,
        subgraphs: None,
    };
    let time = |f: &mut (dyn FnMut() + Send)| {
        pool.install(|| {
            median(
                (0..reps)
                    .map(|_| {
                        let t = Instant::now();
                        f();
                        t.elapsed().as_secs_f64() * 1e3
                    })
                    .collect(),
            )
        })
    };
    let levels: Vec<Level> = Level::ALL.into_iter().filter(|l| l.available()).collect();
    println!(
        "ms, median of {reps}, {threads} threads; integer level picked: {:?}",
        Level::detect()
    );
    let mut header = format!(
        "{:>16} {:>10} {:>16} {:>9}",
        "m x k x n", "f32 MatMul", "integer step", "quantize"
    );
    for l in &levels {
        header += &format!(" {:>16}", format!("product {l:?}"));
    }
    header += &format!(" {:>16} {:>16}", "rten-gemm u8i8", "grouped g=32");
    println!("{header}");
    let p = TokenQuant {
        bits: 4,
        symmetric: false,
        clip: 1.0,
    };
    let mut shapes = vec![
        (512, 576, 1536),
        (512, 1536, 576),
        (512, 576, 576),
        (512, 576, 192),
    ];
    if !custom.is_empty() {
        shapes = custom;
    }
    if head {
        shapes.push((512, 576, 49152));
    }
    for (m, k, n) in shapes {
        let mut s = 1u64;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let x: Vec<f32> = (0..m * k)
            .map(|_| (next() % 2001) as f32 / 100.0 - 10.0)
            .collect();
        let w: Vec<i8> = (0..k * n).map(|_| (next() % 16) as i8 - 8).collect();
        let w_scale: Vec<f32> = (0..n).map(|_| (next() % 97 + 1) as f32 / 900.0).collect();
        let wf: Vec<f32> = w.iter().map(|&v| v as f32 * 0.01).collect();
        let packed = igemm::pack_weights(&w, k, n, 0).map_err(anyhow::Error::msg)?;

        let tx = RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[1, m, k]), x.clone())?);
        let tw = RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[k, n]), wf)?);
        let f32_ms = time(&mut || drop(matmul(&ctx(mm), &[Some(&tx), Some(&tw)]).unwrap()));
        let shape = igemm::packed_shape(k, n);
        let tp =
            RtTensor::U8(ArrayD::from_shape_vec(IxDyn(&shape), packed.data.clone())?.into_shared());
        let ts = RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[n]), w_scale.clone())?);
        let tc = RtTensor::I32(
            ArrayD::from_shape_vec(IxDyn(&[n]), packed.col_sums.clone())?.into_shared(),
        );
        let ql_ms = time(&mut || {
            let q = qtokens(&ctx(qt), &[Some(&tx)]).unwrap();
            let args = [Some(&q[0]), Some(&q[1]), Some(&tp), Some(&ts), Some(&tc)];
            drop(qlinear(&ctx(ql), &args).unwrap())
        });

        let mut codes = vec![0i8; m * igemm::padded_k(k)];
        let mut terms = vec![RowTerms::default(); m];
        let q_ms = time(&mut || igemm::quantize_rows(&x, k, p, &mut codes, &mut terms));
        let ops = Operands {
            m,
            k,
            n,
            codes: &codes,
            terms: &terms,
            weights: &packed.data,
            col_sums: &packed.col_sums,
            w_scale: &w_scale,
            group: 0,
        };
        let mut out = vec![MaybeUninit::<f32>::uninit(); m * n];
        let mut row = format!(
            "{:>16} {f32_ms:>10.3} {ql_ms:>16.3} {q_ms:>9.3}",
            format!("{m}x{k}x{n}")
        );
        let gop = 2.0 * (m * k * n) as f64 / 1e9;
        for &l in &levels {
            let t = time(&mut || igemm::gemm(&ops, &mut out, l, threads > 1));
            row += &format!(" {:>16}", format!("{t:.3} ({:.0} GOP/s)", gop / t * 1e3));
        }
        // rten-gemm: codes as u8 (c + 128), weights as i8, B prepacked once.
        let exec: rten_gemm::GemmExecutor<u8, i8, i32> = rten_gemm::GemmExecutor::new();
        let a_u8: Vec<u8> = codes[..m * igemm::padded_k(k)]
            .iter()
            .map(|&c| (c as i16 + 128) as u8)
            .collect();
        let a_mat = rten_tensor::NdTensor::from_data([m, igemm::padded_k(k)], a_u8);
        let mut w_pad = w.clone();
        w_pad.resize(igemm::padded_k(k) * n, 0);
        let b_mat = rten_tensor::NdTensor::from_data([igemm::padded_k(k), n], w_pad);
        let b_packed = exec.prepack_b(b_mat.view());
        let mut out_i32 = vec![0i32; m * n];
        let t = time(&mut || {
            exec.gemm(
                &mut out_i32,
                rten_gemm::GemmInputA::Unpacked(a_mat.view()),
                rten_gemm::GemmInputB::Packed(&b_packed),
                rten_gemm::GemmOptions::default(),
            )
            .unwrap()
        });
        row += &format!(" {:>16}", format!("{t:.3} ({:.0} GOP/s)", gop / t * 1e3));
        let g = 32;
        let grouped = igemm::pack_weights(&w, k, n, g).map_err(anyhow::Error::msg)?;
        let g_scale: Vec<f32> = (0..igemm::scale_groups(k, g) * n)
            .map(|i| (i % 97 + 1) as f32 / 900.0)
            .collect();
        // Weight-only linears quantize activations symmetric (no zero point).
        let sym_terms: Vec<RowTerms> = terms.iter().map(|t| RowTerms { zcorr: 0, ..*t }).collect();
        let ops = Operands {
            terms: &sym_terms,
            col_sums: &grouped.col_sums,
            w_scale: &g_scale,
            group: g,
            ..ops
        };
        let best = *levels.last().expect("scalar");
        let t = time(&mut || igemm::gemm(&ops, &mut out, best, threads > 1));
        row += &format!(" {:>16}", format!("{t:.3} ({:.0} GOP/s)", gop / t * 1e3));
        println!("{row}");
    }
    Ok(())
}
