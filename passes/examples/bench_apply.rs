//! Times `ChannelOp::apply` on SmolLM2's weight shapes: the full 576-channel Hadamard
//! (R1: 36 · 16, and the recipe's default core 144 = 12 ⊗ 12, times 4), a 64-channel head block (R2), the 32-block sink of the online Hadamard,
//! a 1536-channel permutation and a diagonal, on both layouts (channels on the last axis:
//! vectors are rows; on the first: vectors are columns).
//!
//! `cargo run --release -p perqc-passes --example bench_apply [REPS]`

use perqc_ir::Tensor;
use perqc_passes::transform::ChannelOp;
use std::time::Instant;

fn tensor(rows: usize, cols: usize) -> Tensor {
    let v: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 2654435761) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    Tensor::from_slice(vec![rows as i64, cols as i64], &v)
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let h576 = ChannelOp::hadamard(576, 576, None).unwrap();
    let h144 = ChannelOp::hadamard_with_core(576, 576, Some(144), None).unwrap();
    let h64 = ChannelOp::hadamard(576, 64, None).unwrap();
    let h32 = ChannelOp::hadamard(1536, 32, None).unwrap();
    let perm = ChannelOp::Permutation((0..1536).rev().collect());
    let diag = ChannelOp::Diagonal((0..576).map(|i| 1.0 + i as f64 / 576.0).collect());
    let cases: Vec<(&str, &ChannelOp, Tensor, usize)> = vec![
        (
            "R1 embedding [49152, 576] axis 1",
            &h576,
            tensor(49152, 576),
            1,
        ),
        (
            "R1 lm_head [576, 49152] axis 0",
            &h576,
            tensor(576, 49152),
            0,
        ),
        ("R1 up [576, 1536] axis 0", &h576, tensor(576, 1536), 0),
        (
            "R1 core 144 embedding [49152, 576] axis 1",
            &h144,
            tensor(49152, 576),
            1,
        ),
        (
            "R1 core 144 up [576, 1536] axis 0",
            &h144,
            tensor(576, 1536),
            0,
        ),
        ("R1 down [1536, 576] axis 1", &h576, tensor(1536, 576), 1),
        ("R2 v [576, 192] axis 1 (b=64)", &h64, tensor(576, 576), 1),
        (
            "R3 down [1536, 576] axis 0 (b=32)",
            &h32,
            tensor(1536, 576),
            0,
        ),
        ("perm up [576, 1536] axis 1", &perm, tensor(576, 1536), 1),
        ("perm down [1536, 576] axis 0", &perm, tensor(1536, 576), 0),
        (
            "diag lm_head [576, 49152] axis 0",
            &diag,
            tensor(576, 49152),
            0,
        ),
    ];
    for (name, op, t, axis) in &cases {
        let mut times = Vec::new();
        for _ in 0..reps {
            let t0 = Instant::now();
            let y = op.apply(t, *axis).unwrap();
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            std::hint::black_box(y);
        }
        times.sort_by(f64::total_cmp);
        let mb = t.byte_len() as f64 / 1e6;
        let med = times[times.len() / 2];
        println!(
            "{name:40} {med:8.2} ms median of {reps} ({:.0} MB/s)",
            mb / med * 1e3
        );
    }
}
