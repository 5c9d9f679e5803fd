//! The machine's peak for each integer product level and for f32 FMAs, on one core: the
//! dot-product step of each `igemm` level (and the f32 fused multiply-add) issued in
//! independent chains from registers, no loads, so only the execution ports limit it. The
//! integer kernels' GOP/s (`bench_igemm`) divided by these is how close they get.
//!
//! Steps, with the operations each counts (a multiply and an add per product):
//!
//! - VNNI 512 / 256: `vpdpbusd` on 64 / 32 byte pairs: 128 / 64 ops.
//! - AVX-512BW / AVX2: `vpmaddubsw` then `vpaddw` (the i16 sums of the tiles; their
//!   widening, one `vpmaddwd` per eight groups, is left out): 128 / 64 ops.
//! - f32 FMA 512 / 256: `vfmadd` on 16 / 8 lanes: 32 / 16 flops.
//!
//! usage: bench_peak [--reps 9]

use std::time::Instant;

/// Steps per chain per timed run.
const ITERS: usize = 20_000_000;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::ITERS;
    use std::arch::x86_64::*;
    use std::hint::black_box;

    /// `$chains` independent accumulators, each stepped `ITERS` times by `$step(acc)`; the
    /// accumulators end in `black_box` so the loop is kept. Returns the steps taken.
    macro_rules! chains {
        ($name:ident, $features:literal, $ty:ty, $zero:expr, $chains:literal, $step:expr) => {
            #[target_feature(enable = $features)]
            pub unsafe fn $name() -> usize {
                let step = $step;
                let mut acc: [$ty; $chains] = [$zero; $chains];
                for _ in 0..ITERS {
                    for a in acc.iter_mut() {
                        *a = step(*a);
                    }
                }
                black_box(acc);
                $chains * ITERS
            }
        };
    }

    chains!(
        vnni512,
        "avx512f,avx512bw,avx512vnni",
        __m512i,
        _mm512_setzero_si512(),
        20,
        {
            let (u, c) = (
                black_box(_mm512_set1_epi8(3)),
                black_box(_mm512_set1_epi8(-5)),
            );
            move |a| _mm512_dpbusd_epi32(a, u, c)
        }
    );
    chains!(
        vnni256,
        "avx2,avxvnni",
        __m256i,
        _mm256_setzero_si256(),
        12,
        {
            let (u, c) = (
                black_box(_mm256_set1_epi8(3)),
                black_box(_mm256_set1_epi8(-5)),
            );
            move |a| _mm256_dpbusd_avx_epi32(a, u, c)
        }
    );
    // The product reads the accumulator so it cannot be hoisted out of the loop; its
    // chain is then a multiply and an add long, so more chains cover the latency (as many
    // as fit the registers: 15 AVX2 chains spill and measure 30% less).
    chains!(
        bw512,
        "avx512f,avx512bw",
        __m512i,
        _mm512_setzero_si512(),
        24,
        {
            let u = black_box(_mm512_set1_epi8(3));
            move |a| _mm512_add_epi16(a, _mm512_maddubs_epi16(u, a))
        }
    );
    chains!(avx2, "avx2", __m256i, _mm256_setzero_si256(), 12, {
        let u = black_box(_mm256_set1_epi8(3));
        move |a| _mm256_add_epi16(a, _mm256_maddubs_epi16(u, a))
    });
    chains!(fma512, "avx512f", __m512, _mm512_setzero_ps(), 20, {
        let (x, y) = (
            black_box(_mm512_set1_ps(0.5)),
            black_box(_mm512_set1_ps(1e-9)),
        );
        move |a| _mm512_fmadd_ps(a, x, y)
    });
    chains!(fma256, "avx2,fma", __m256, _mm256_setzero_ps(), 12, {
        let (x, y) = (
            black_box(_mm256_set1_ps(0.5)),
            black_box(_mm256_set1_ps(1e-9)),
        );
        move |a| _mm256_fmadd_ps(a, x, y)
    });

    /// (name, available, run, ops per step)
    pub type Case = (&'static str, bool, unsafe fn() -> usize, f64);

    pub fn cases() -> Vec<Case> {
        let has = |f: &str| match f {
            "avx512vnni" => is_x86_feature_detected!("avx512vnni"),
            "avxvnni" => is_x86_feature_detected!("avxvnni"),
            "avx512bw" => is_x86_feature_detected!("avx512bw"),
            "avx512f" => is_x86_feature_detected!("avx512f"),
            "avx2" => is_x86_feature_detected!("avx2"),
            "fma" => is_x86_feature_detected!("fma"),
            _ => false,
        };
        vec![
            (
                "vpdpbusd 512 (AVX-512 VNNI)",
                has("avx512vnni") && has("avx512bw"),
                vnni512 as unsafe fn() -> usize,
                128.0,
            ),
            (
                "vpdpbusd 256 (AVX-VNNI)",
                has("avxvnni") && has("avx2"),
                vnni256,
                64.0,
            ),
            (
                "vpmaddubsw + vpaddw 512 (AVX-512BW)",
                has("avx512bw"),
                bw512,
                128.0,
            ),
            ("vpmaddubsw + vpaddw 256 (AVX2)", has("avx2"), avx2, 64.0),
            ("vfmadd 512 f32 (AVX-512F)", has("avx512f"), fma512, 32.0),
            (
                "vfmadd 256 f32 (AVX2 + FMA)",
                has("avx2") && has("fma"),
                fma256,
                16.0,
            ),
        ]
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut reps = 9usize;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--reps" => reps = args.next().unwrap_or_default().parse()?,
            other => anyhow::bail!("unknown option {other}"),
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        println!("one core, median of {reps} runs of {ITERS} steps per chain");
        for (name, available, run, ops) in x86::cases() {
            if !available {
                println!("{name:>38}: not on this CPU");
                continue;
            }
            let mut steps = 0;
            let mut t: Vec<f64> = (0..reps)
                .map(|_| {
                    let start = Instant::now();
                    // Safety: the features were detected above.
                    steps = unsafe { run() };
                    start.elapsed().as_secs_f64()
                })
                .collect();
            t.sort_by(f64::total_cmp);
            let secs = t[t.len() / 2];
            let gops = ops * steps as f64 / secs / 1e9;
            println!("{name:>38}: {gops:7.1} G ops/s");
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("bench_peak measures x86-64 instruction peaks only");
    Ok(())
}
