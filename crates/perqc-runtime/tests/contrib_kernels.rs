//! ONNX Runtime contrib kernels on shapes the fixtures do not reach, against hand-computed
//! results, and their one-line errors on inconsistent inputs (never a panic).

mod common;

use common::run_in;
use ndarray::{ArrayD, IxDyn};
use perqc_ir::{AttrValue, Graph, NodeSpec};
use perqc_ops::{KernelCtx, KernelError, RtTensor, lookup};

const MS: &str = "com.microsoft";

fn f32t(shape: &[usize], v: &[f32]) -> RtTensor {
    RtTensor::f32(ArrayD::from_shape_vec(IxDyn(shape), v.to_vec()).unwrap())
}

fn vals(t: &RtTensor) -> Vec<f32> {
    t.as_f32().unwrap().iter().copied().collect()
}

/// GroupQueryAttention with 2 query heads over 1 key/value head.
fn gqa_attrs() -> Vec<(&'static str, AttrValue)> {
    vec![
        ("num_heads", AttrValue::Int(2)),
        ("kv_num_heads", AttrValue::Int(1)),
    ]
}

fn i32s(v: Vec<i32>) -> RtTensor {
    RtTensor::I32(
        ArrayD::from_shape_vec(IxDyn(&[v.len()]), v)
            .unwrap()
            .into_shared(),
    )
}

/// Runs a com.microsoft kernel and returns its error.
fn fails(op: &str, attrs: Vec<(&str, AttrValue)>, inputs: &[Option<&RtTensor>]) -> String {
    let mut g = Graph::new("t");
    let mut spec = NodeSpec::new(op).named("n");
    spec.domain = MS.into();
    for (k, v) in attrs {
        spec = spec.attr(k, v);
    }
    let id = g.add_node(spec, &[], &["y"]).unwrap();
    let k = lookup(MS, op, 1).and_then(|d| d.kernel).unwrap();
    let ctx = KernelCtx {
        node: g.node(id),
        opset: 1,
        threads: 1,
        subgraphs: None,
    };
    let e: KernelError = k(&ctx, inputs).expect_err("inconsistent inputs must fail");
    e.to_string()
}

#[test]
fn matmul_nbits_2_bit_partial_block_float_zero_points() {
    // K = 20 over blocks of 16 (the second block has 4 values), N = 2, 2-bit values packed
    // four per byte from the low bits; zero points as floats.
    let (k, n) = (20usize, 2usize);
    let q: Vec<Vec<u8>> = (0..n)
        .map(|c| (0..32).map(|i| ((i * 3 + c) % 4) as u8).collect())
        .collect();
    let packed: Vec<u8> = q
        .iter()
        .flat_map(|row| {
            row.chunks(4)
                .map(|c| c[0] | c[1] << 2 | c[2] << 4 | c[3] << 6)
        })
        .collect();
    let b = RtTensor::U8(
        ArrayD::from_shape_vec(IxDyn(&[n, 2, 4]), packed)
            .unwrap()
            .into_shared(),
    );
    let scales = f32t(&[n, 2], &[0.5, -1.0, 0.25, 2.0]);
    let zp = f32t(&[n, 2], &[1.0, 2.0, 1.5, 0.0]);
    let a = f32t(
        &[1, 3, k],
        &(0..3 * k).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<_>>(),
    );
    let attrs = || {
        vec![
            ("K", AttrValue::Int(k as i64)),
            ("N", AttrValue::Int(n as i64)),
            ("bits", AttrValue::Int(2)),
            ("block_size", AttrValue::Int(16)),
        ]
    };
    let y = run_in(
        MS,
        "MatMulNBits",
        1,
        attrs(),
        &[Some(&a), Some(&b), Some(&scales), Some(&zp)],
        1,
    );
    assert_eq!(y[0].shape(), &[1, 3, n]);
    let (sc, z) = (vals(&scales), vals(&zp));
    let av = vals(&a);
    for r in 0..3 {
        for c in 0..n {
            let want: f32 = (0..k)
                .map(|i| {
                    let blk = i / 16;
                    av[r * k + i] * ((q[c][i] as f32 - z[c * 2 + blk]) * sc[c * 2 + blk])
                })
                .sum();
            let got = vals(&y[0])[r * n + c];
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{r},{c}: {got} vs {want}"
            );
        }
    }
    let short = f32t(&[n, 1], &[1.0, 1.0]);
    let e = fails("MatMulNBits", attrs(), &[Some(&a), Some(&b), Some(&short)]);
    assert!(e.contains("scales"), "{e}");
}

#[test]
fn skip_simplified_norm_broadcasts_a_2d_skip() {
    // input [2, 1, 4], skip [1, 4] (broadcast), no bias.
    let x = f32t(&[2, 1, 4], &[1., 2., 3., 4., -1., 0., 1., 2.]);
    let skip = f32t(&[1, 4], &[1., 1., 1., 1.]);
    let g = f32t(&[4], &[1., 2., 1., 2.]);
    let y = run_in(
        MS,
        "SkipSimplifiedLayerNormalization",
        1,
        vec![("epsilon", AttrValue::Float(0.0))],
        &[Some(&x), Some(&skip), Some(&g)],
        1,
    );
    let sum = vals(&y[3]);
    assert_eq!(sum, vec![2., 3., 4., 5., 0., 1., 2., 3.]);
    let out = vals(&y[0]);
    for (row, inv) in [(0, vals(&y[2])[0]), (1, vals(&y[2])[1])] {
        let s = &sum[row * 4..row * 4 + 4];
        let want = 1.0 / (s.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((inv - want).abs() < 1e-6);
        for i in 0..4 {
            let w = s[i] * want * [1., 2., 1., 2.][i];
            assert!((out[row * 4 + i] - w).abs() < 1e-5);
        }
    }
    let bad = f32t(&[3], &[1., 1., 1.]);
    let e = fails(
        "SkipSimplifiedLayerNormalization",
        vec![],
        &[Some(&x), Some(&bad), Some(&g)],
    );
    assert!(e.contains("broadcast"), "{e}");
}

#[test]
fn rotary_errors_name_the_problem() {
    let x = f32t(&[1, 2, 8], &[0.5; 16]);
    let cos = f32t(&[2, 4], &[1.0; 8]);
    let sin = f32t(&[2, 4], &[0.0; 8]);
    let pos = RtTensor::i64(ArrayD::from_shape_vec(IxDyn(&[1, 2]), vec![0, 5]).unwrap());
    let e = fails(
        "RotaryEmbedding",
        vec![],
        &[Some(&x), Some(&pos), Some(&cos), Some(&sin)],
    );
    assert!(e.contains("position 5"), "{e}");
    let pos = RtTensor::i64(ArrayD::from_shape_vec(IxDyn(&[1]), vec![0]).unwrap());
    // cos/sin with 0 and 1 (identity at position 0): the input comes back unchanged.
    let y = run_in(
        MS,
        "RotaryEmbedding",
        1,
        vec![],
        &[Some(&x), Some(&pos), Some(&cos), Some(&sin)],
        1,
    );
    assert_eq!(vals(&y[0]), vec![0.5; 16]);
    let e = fails(
        "RotaryEmbedding",
        vec![("num_heads", AttrValue::Int(3))],
        &[Some(&x), Some(&pos), Some(&cos), Some(&sin)],
    );
    assert!(e.contains("hidden size 8"), "{e}");
}

#[test]
fn gqa_rejects_inconsistent_lengths_and_widths() {
    // Packed width 4 heads x 8 = 32; 30 is not a multiple of 4 heads.
    let bad = f32t(&[1, 3, 30], &[0.1; 90]);
    let e = fails(
        "GroupQueryAttention",
        gqa_attrs(),
        &[
            Some(&bad),
            None,
            None,
            None,
            None,
            Some(&i32s(vec![2])),
            Some(&i32s(vec![3])),
        ],
    );
    assert!(e.contains("multiple of 4 heads"), "{e}");
    // Token generation (S = 1) after 5 tokens, but the past holds only 2 rows.
    let q = f32t(&[1, 1, 32], &[0.1; 32]);
    let past = f32t(&[1, 1, 2, 8], &[0.0; 16]);
    let e = fails(
        "GroupQueryAttention",
        gqa_attrs(),
        &[
            Some(&q),
            None,
            None,
            Some(&past),
            Some(&past),
            Some(&i32s(vec![5])),
            Some(&i32s(vec![6])),
        ],
    );
    assert!(e.contains("outside the past"), "{e}");
    // A single token with nothing before it attends only to itself: output = its value.
    let v: Vec<f32> = (0..32).map(|i| i as f32 / 8.0).collect();
    let qkv = f32t(&[1, 1, 32], &v);
    let y = run_in(
        MS,
        "GroupQueryAttention",
        1,
        gqa_attrs(),
        &[
            Some(&qkv),
            None,
            None,
            None,
            None,
            Some(&i32s(vec![0])),
            Some(&i32s(vec![1])),
        ],
        1,
    );
    assert_eq!(y[0].shape(), &[1, 1, 16]);
    let value = &v[24..32];
    assert_eq!(vals(&y[0]), [value, value].concat());
    assert_eq!(y[1].shape(), &[1, 1, 1, 8]);
}

#[test]
fn gqa_empty_past_needs_no_head_dim() {
    // Model-builder graphs declare the cache's head dim as a symbol, so `perqc eval` feeds
    // [B, Hkv, 0, 0]: nothing cached, the same result as no past at all.
    let v: Vec<f32> = (0..96).map(|i| (i as f32 * 0.37).sin()).collect();
    let qkv = f32t(&[1, 3, 32], &v);
    let empty = f32t(&[1, 1, 0, 0], &[]);
    let run = |past: Option<&RtTensor>| {
        run_in(
            MS,
            "GroupQueryAttention",
            1,
            gqa_attrs(),
            &[
                Some(&qkv),
                None,
                None,
                past,
                past,
                Some(&i32s(vec![2])),
                Some(&i32s(vec![3])),
            ],
            1,
        )
    };
    let (with, without) = (run(Some(&empty)), run(None));
    assert_eq!(vals(&with[0]), vals(&without[0]));
    assert_eq!(with[1].shape(), &[1, 1, 3, 8]);
}
