//! Kernels the fixtures do not reach, checked against hand-computed (numpy-style) results.

mod common;

use common::{run_in, run_threads};
use ndarray::{ArrayD, IxDyn};
use perqc_ir::{AttrValue, Graph, NodeSpec};
use perqc_ops::{KernelCtx, RtTensor, lookup};

fn f32t(shape: &[usize], v: &[f32]) -> RtTensor {
    RtTensor::f32(ArrayD::from_shape_vec(IxDyn(shape), v.to_vec()).unwrap())
}

fn i64t(shape: &[usize], v: &[i64]) -> RtTensor {
    RtTensor::i64(ArrayD::from_shape_vec(IxDyn(shape), v.to_vec()).unwrap())
}

/// Deterministic values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    common::uniform(n, seed, 1.0)
}

/// Runs `op` at `opset` with `attrs` on `inputs` through the op table, on 1 thread.
fn run(
    op: &str,
    opset: i64,
    attrs: Vec<(&str, AttrValue)>,
    inputs: &[Option<&RtTensor>],
) -> Vec<RtTensor> {
    run_threads(op, opset, attrs, inputs, 1)
}

fn vals(t: &RtTensor) -> Vec<f32> {
    match t {
        RtTensor::F32(a) => a.iter().copied().collect(),
        other => other
            .to_i64_vec()
            .unwrap()
            .iter()
            .map(|&v| v as f32)
            .collect(),
    }
}

#[test]
fn slice_negative_step_and_clamping() {
    let x = i64t(&[5], &[0, 1, 2, 3, 4]);
    let (s, e, a, st) = (
        i64t(&[1], &[10]),
        i64t(&[1], &[-10]),
        i64t(&[1], &[0]),
        i64t(&[1], &[-2]),
    );
    let y = run(
        "Slice",
        13,
        vec![],
        &[Some(&x), Some(&s), Some(&e), Some(&a), Some(&st)],
    );
    assert_eq!(vals(&y[0]), vec![4.0, 2.0, 0.0]);
    let (s, e) = (i64t(&[1], &[1]), i64t(&[1], &[i64::MAX]));
    let y = run("Slice", 13, vec![], &[Some(&x), Some(&s), Some(&e)]);
    assert_eq!(vals(&y[0]), vec![1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn matmul_broadcasts_and_promotes_vectors() {
    // [2, 1, 2, 3] x [3] -> [2, 1, 2]
    let a = f32t(
        &[2, 1, 2, 3],
        &[1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12.],
    );
    let b = f32t(&[3], &[1., 0., -1.]);
    let y = run("MatMul", 13, vec![], &[Some(&a), Some(&b)]);
    assert_eq!(y[0].shape(), &[2, 1, 2]);
    assert_eq!(vals(&y[0]), vec![-2., -2., -2., -2.]);
}

/// The offline product (`matmul_2d`, calibration searches) splits as MatMul does: a
/// transposed right operand, 1 and 2 threads bitwise equal, the f64 reference within
/// round-off; `matmul_2d_add` adds the product to what its output holds.
#[test]
fn matmul_2d_of_views_is_exact_and_deterministic() {
    use perqc_ops::kernels::linalg::{matmul_2d, matmul_2d_add};
    for (m, k, n) in [(256, 96, 200), (5, 7, 3), (0, 4, 6)] {
        let a = ndarray::Array2::from_shape_vec((m, k), noise(m * k, 5)).unwrap();
        let w = ndarray::Array2::from_shape_vec((n, k), noise(n * k, 6)).unwrap();
        let pool = |t: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
        };
        let one = pool(1).install(|| matmul_2d(a.view(), w.t(), 1));
        let two = pool(2).install(|| matmul_2d(a.view(), w.t(), 2));
        assert_eq!(one, two, "{m}x{k}x{n}: result depends on the thread count");
        for ((i, j), &got) in two.indexed_iter() {
            let want: f64 = (0..k).map(|p| a[[i, p]] as f64 * w[[j, p]] as f64).sum();
            assert!(
                (got as f64 - want).abs() < 1e-4,
                "[{i},{j}]: {got} vs {want}"
            );
        }
        // Twice the product, summed in place: 1 and 2 threads alike, and 2 x within round-off.
        let twice = |t: usize| {
            let mut acc = ndarray::Array2::<f32>::zeros((m, n));
            pool(t).install(|| {
                matmul_2d_add(a.view(), w.t(), &mut acc, t);
                matmul_2d_add(a.view(), w.t(), &mut acc, t);
            });
            acc
        };
        let sum = twice(2);
        assert_eq!(
            twice(1),
            sum,
            "{m}x{k}x{n}: the sum depends on the thread count"
        );
        for (s, p) in sum.iter().zip(&two) {
            assert!(
                (s - 2.0 * p).abs() <= 1e-5 * p.abs().max(1.0),
                "{s} vs 2 x {p}"
            );
        }
    }
}

#[test]
fn matmul_split_over_threads_is_exact_and_deterministic() {
    // Column split (wide), row split (tall), narrow output (rows), and a product below the
    // parallel threshold; each must equal the f64 reference and the 1-thread result bitwise.
    for (m, k, n) in [(70, 300, 130), (300, 70, 100), (3000, 40, 20), (8, 9, 10)] {
        let (av, bv) = (noise(m * k, 1), noise(k * n, 2));
        let (a, b) = (f32t(&[m, k], &av), f32t(&[k, n], &bv));
        let one = vals(&run_threads("MatMul", 13, vec![], &[Some(&a), Some(&b)], 1)[0]);
        let two = vals(&run_threads("MatMul", 13, vec![], &[Some(&a), Some(&b)], 2)[0]);
        assert_eq!(one, two, "{m}x{k}x{n}: result depends on the thread count");
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|p| av[i * k + p] as f64 * bv[p * n + j] as f64)
                    .sum();
                let got = two[i * n + j] as f64;
                assert!(
                    (got - want).abs() < 1e-4,
                    "{m}x{k}x{n} [{i},{j}]: {got} vs {want}"
                );
            }
        }
    }
    // Gemm with a transposed operand (strided view) through the same split.
    let (m, k, n) = (64, 200, 170);
    let (av, bv) = (noise(m * k, 3), noise(n * k, 4));
    let (a, b) = (f32t(&[m, k], &av), f32t(&[n, k], &bv));
    let attrs = || vec![("transB", AttrValue::Int(1))];
    let one = vals(&run_threads("Gemm", 13, attrs(), &[Some(&a), Some(&b)], 1)[0]);
    let two = vals(&run_threads("Gemm", 13, attrs(), &[Some(&a), Some(&b)], 2)[0]);
    assert_eq!(one, two);
    for i in 0..m {
        for j in 0..n {
            let want: f64 = (0..k)
                .map(|p| av[i * k + p] as f64 * bv[j * k + p] as f64)
                .sum();
            assert!((two[i * n + j] as f64 - want).abs() < 1e-4);
        }
    }
}

#[test]
fn gemm_trans_b_alpha_beta() {
    let a = f32t(&[1, 2], &[1., 2.]);
    let b = f32t(&[2, 2], &[1., 2., 3., 4.]); // B^T = [[1, 3], [2, 4]]
    let c = f32t(&[2], &[10., 20.]);
    let y = run(
        "Gemm",
        13,
        vec![
            ("transB", AttrValue::Int(1)),
            ("alpha", AttrValue::Float(2.0)),
            ("beta", AttrValue::Float(0.5)),
        ],
        &[Some(&a), Some(&b), Some(&c)],
    );
    assert_eq!(vals(&y[0]), vec![2. * 5. + 5., 2. * 11. + 10.]);
}

#[test]
fn blocked_int4_quantize_round_trip() {
    // Blocks of 2 along axis 1; scales [1, 2].
    let x = f32t(&[1, 4], &[1.4, -2.6, 30.0, -3.0]);
    let s = f32t(&[1, 2], &[1.0, 2.0]);
    let zp = RtTensor::I4(ArrayD::from_elem(IxDyn(&[1, 2]), 0i8).into_shared());
    let attrs = || {
        vec![
            ("axis", AttrValue::Int(1)),
            ("block_size", AttrValue::Int(2)),
        ]
    };
    let q = run(
        "QuantizeLinear",
        21,
        attrs(),
        &[Some(&x), Some(&s), Some(&zp)],
    );
    assert_eq!(q[0].dtype(), perqc_ir::DType::I4);
    // round_half_even(-1.5) = -2; 15 saturates to 7.
    assert_eq!(vals(&q[0]), vec![1., -3., 7., -2.]);
    let d = run(
        "DequantizeLinear",
        21,
        attrs(),
        &[Some(&q[0]), Some(&s), Some(&zp)],
    );
    assert_eq!(vals(&d[0]), vec![1., -3., 14., -4.]);
}

#[test]
fn per_axis_dequantize_u8() {
    let x = RtTensor::U8(
        ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![0u8, 10, 20, 30])
            .unwrap()
            .into_shared(),
    );
    let s = f32t(&[2], &[0.5, 2.0]);
    let zp = RtTensor::U8(
        ArrayD::from_shape_vec(IxDyn(&[2]), vec![10u8, 0])
            .unwrap()
            .into_shared(),
    );
    let d = run(
        "DequantizeLinear",
        13,
        vec![("axis", AttrValue::Int(0))],
        &[Some(&x), Some(&s), Some(&zp)],
    );
    assert_eq!(vals(&d[0]), vec![-5., 0., 40., 60.]);
}

#[test]
fn gather_nd_trilu_range_split() {
    let x = f32t(&[2, 2], &[1., 2., 3., 4.]);
    let idx = i64t(&[2, 2], &[0, 1, 1, 0]);
    assert_eq!(
        vals(&run("GatherND", 13, vec![], &[Some(&x), Some(&idx)])[0]),
        vec![2., 3.]
    );
    let t = run("Trilu", 14, vec![("upper", AttrValue::Int(0))], &[Some(&x)]);
    assert_eq!(vals(&t[0]), vec![1., 0., 3., 4.]);
    let r = run(
        "Range",
        11,
        vec![],
        &[
            Some(&i64t(&[], &[5])),
            Some(&i64t(&[], &[0])),
            Some(&i64t(&[], &[-2])),
        ],
    );
    assert_eq!(vals(&r[0]), vec![5., 3., 1.]);
    let mut g = Graph::new("t");
    let id = g
        .add_node(NodeSpec::new("Split").named("s"), &[], &["a", "b"])
        .unwrap();
    let k = lookup("", "Split", 18).and_then(|d| d.kernel).unwrap();
    let ctx = KernelCtx {
        node: g.node(id),
        opset: 18,
        threads: 1,
        subgraphs: None,
    };
    let parts = k(&ctx, &[Some(&f32t(&[3], &[1., 2., 3.]))]).unwrap();
    assert_eq!((vals(&parts[0]), vals(&parts[1])), (vec![1., 2.], vec![3.]));
}

#[test]
fn errors_not_panics() {
    let a = f32t(&[2, 3], &[0.; 6]);
    let b = f32t(&[2, 3], &[0.; 6]);
    let mut g = Graph::new("t");
    let id = g
        .add_node(NodeSpec::new("MatMul").named("m"), &[], &["y"])
        .unwrap();
    let k = lookup("", "MatMul", 13).and_then(|d| d.kernel).unwrap();
    let ctx = KernelCtx {
        node: g.node(id),
        opset: 13,
        threads: 1,
        subgraphs: None,
    };
    assert!(k(&ctx, &[Some(&a), Some(&b)]).is_err());
    let k = lookup("", "Add", 13).and_then(|d| d.kernel).unwrap();
    assert!(k(&ctx, &[Some(&a), Some(&f32t(&[4], &[0.; 4]))]).is_err());
    assert!(k(&ctx, &[Some(&a), None]).is_err());
}

/// Attention in f64: `softmax(scale · q kᵀ + mask) v` per head, kv head `h / (hq / hkv)`;
/// `mask(b, h, i, j)` is additive. A row of all -inf (or with a NaN/inf score) gives NaN,
/// as the unfused Softmax does.
fn attention_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: (usize, usize, usize, usize, usize, usize, usize),
    scale: f32,
    mask: &dyn Fn(usize, usize, usize, usize) -> f32,
) -> Vec<f64> {
    attention_ref_capped(q, k, v, dims, scale, 0.0, mask)
}

/// [`attention_ref`] with the scores soft-capped before the mask when `cap > 0`:
/// `softmax(cap · tanh(scale · q kᵀ / cap) + mask) v`.
fn attention_ref_capped(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (b, hq, hkv, s, l, d, dv): (usize, usize, usize, usize, usize, usize, usize),
    scale: f32,
    cap: f32,
    mask: &dyn Fn(usize, usize, usize, usize) -> f32,
) -> Vec<f64> {
    let mut y = vec![0f64; b * hq * s * dv];
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / (hq / hkv);
            for i in 0..s {
                let sc: Vec<f64> = (0..l)
                    .map(|j| {
                        let dot: f64 = (0..d)
                            .map(|c| {
                                q[((bi * hq + h) * s + i) * d + c] as f64
                                    * k[((bi * hkv + kh) * l + j) * d + c] as f64
                            })
                            .sum();
                        let x = scale as f64 * dot;
                        let x = if cap > 0.0 {
                            cap as f64 * (x / cap as f64).tanh()
                        } else {
                            x
                        };
                        x + mask(bi, h, i, j) as f64
                    })
                    .collect();
                let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..dv {
                    y[((bi * hq + h) * s + i) * dv + c] = (0..l)
                        .map(|j| e[j] / z * v[((bi * hkv + kh) * l + j) * dv + c] as f64)
                        .sum();
                }
            }
        }
    }
    y
}

/// A bool mask `[B, 1, S, L]` keeping about four keys in five, with query row 3 masked
/// everywhere, and its additive form (0 where kept, -inf where masked) by
/// (batch, head, row, key).
fn mask_with_dead_row(
    b: usize,
    s: usize,
    l: usize,
) -> (RtTensor, impl Fn(usize, usize, usize, usize) -> f32) {
    let keep: Vec<bool> = (0..b * s * l)
        .map(|x| (x * 7919) % 5 != 0 && (x / l) % s != 3)
        .collect();
    let mb = RtTensor::Bool(
        ArrayD::from_shape_vec(IxDyn(&[b, 1, s, l]), keep.clone())
            .unwrap()
            .into_shared(),
    );
    let additive = move |bi: usize, _: usize, i: usize, j: usize| {
        if keep[(bi * s + i) * l + j] {
            0.0
        } else {
            f32::NEG_INFINITY
        }
    };
    (mb, additive)
}

/// What ONNX Attention gives where the Softmax chain gives NaN (a row masked everywhere): 0.
fn nan_to_zero(want: &[f64]) -> Vec<f64> {
    want.iter()
        .map(|&y| if y.is_nan() { 0.0 } else { y })
        .collect()
}

fn assert_close_nan(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (n, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = (g.is_nan() && w.is_nan()) || (g as f64 - w).abs() <= 1e-5;
        assert!(ok, "{what}: element {n}: {g} vs {w}");
    }
}

#[test]
fn attention_matches_reference_with_masks_gqa_and_non_finite_values() {
    let (b, hq, hkv, s, l, d, dv) = (2, 4, 2, 70, 70, 8, 5);
    let dims = (b, hq, hkv, s, l, d, dv);
    let (mut qv, mut kv, mut vv) = (
        noise(b * hq * s * d, 11),
        noise(b * hkv * l * d, 12),
        noise(b * hkv * l * dv, 13),
    );
    let scale = 0.3f32;
    // Causal additive mask as torch exports it (finfo.min above the diagonal), [1, 1, S, L].
    let causal: Vec<f32> = (0..s * l)
        .map(|x| if x % l > x / l { f32::MIN } else { 0.0 })
        .collect();
    let run_with = |q: &[f32], k: &[f32], v: &[f32], mask: Option<&RtTensor>, attrs, t| {
        let (q, k, v) = (
            f32t(&[b, hq, s, d], q),
            f32t(&[b, hkv, l, d], k),
            f32t(&[b, hkv, l, dv], v),
        );
        vals(
            &run_threads(
                "Attention",
                23,
                attrs,
                &[Some(&q), Some(&k), Some(&v), mask],
                t,
            )[0],
        )
    };
    let attrs = || vec![("scale", AttrValue::Float(scale))];
    let m = f32t(&[1, 1, s, l], &causal);
    let m_at = |_: usize, _: usize, i: usize, j: usize| causal[i * l + j];
    let want = attention_ref(&qv, &kv, &vv, dims, scale, &m_at);
    let one = run_with(&qv, &kv, &vv, Some(&m), attrs(), 1);
    let two = run_with(&qv, &kv, &vv, Some(&m), attrs(), 2);
    assert_eq!(one, two, "thread count changed the result");
    assert_close_nan(&two, &want, "causal float mask");

    // A float mask that differs per batch entry and head ([B, Hq, S, L]): each (b, h)
    // sees a causal mask shifted by its own offset, so their live ranges differ.
    let shifted: Vec<f32> = (0..b * hq * s * l)
        .map(|x| {
            let (j, i, bh) = (x % l, x / l % s, x / (l * s));
            if j > i + 5 * bh { f32::MIN } else { 0.0 }
        })
        .collect();
    let m_shift = f32t(&[b, hq, s, l], &shifted);
    let shift_at =
        |bi: usize, h: usize, i: usize, j: usize| shifted[((bi * hq + h) * s + i) * l + j];
    let want = attention_ref(&qv, &kv, &vv, dims, scale, &shift_at);
    let one = run_with(&qv, &kv, &vv, Some(&m_shift), attrs(), 1);
    let two = run_with(&qv, &kv, &vv, Some(&m_shift), attrs(), 2);
    assert_eq!(one, two, "thread count changed the result");
    assert_close_nan(&two, &want, "float mask per batch entry and head");

    // No mask: every key of every row.
    let got = run_with(&qv, &kv, &vv, None, attrs(), 2);
    let want = attention_ref(&qv, &kv, &vv, dims, scale, &|_, _, _, _| 0.0);
    assert_close_nan(&got, &want, "no mask");

    // is_causal without a mask tensor, default scale 1/sqrt(D).
    let got = run_with(
        &qv,
        &kv,
        &vv,
        None,
        vec![("is_causal", AttrValue::Int(1))],
        2,
    );
    let inf_above = |_: usize, _: usize, i: usize, j: usize| {
        if j > i { f32::NEG_INFINITY } else { 0.0 }
    };
    let want = attention_ref(&qv, &kv, &vv, dims, 1.0 / (d as f32).sqrt(), &inf_above);
    assert_close_nan(&got, &want, "is_causal");

    // Bool mask [B, 1, S, L] with one fully masked row: 0 for ONNX Attention, NaN (as
    // Softmax of all -inf) for ai.perqc::Attention, the canonical form of exported chains.
    let (mb, m_keep) = mask_with_dead_row(b, s, l);
    let want_nan = attention_ref(&qv, &kv, &vv, dims, scale, &m_keep);
    let got = {
        let (q, k, v) = (
            f32t(&[b, hq, s, d], &qv),
            f32t(&[b, hkv, l, d], &kv),
            f32t(&[b, hkv, l, dv], &vv),
        );
        let inputs = [Some(&q), Some(&k), Some(&v), Some(&mb)];
        vals(&run_in(perqc_ops::PERQC_DOMAIN, "Attention", 1, attrs(), &inputs, 2)[0])
    };
    assert_close_nan(&got, &want_nan, "bool mask, canonical (Softmax) semantics");
    let got = run_with(&qv, &kv, &vv, Some(&mb), attrs(), 2);
    let want_zero = nan_to_zero(&want_nan);
    assert!(want_nan.iter().any(|y| y.is_nan()));
    assert_close_nan(&got, &want_zero, "bool mask, ONNX semantics");

    // Non-finite values in the masked future: a NaN value row poisons every row through
    // 0 · NaN; an inf key makes its scores inf (no key may be skipped).
    vv[((hkv + 1) * l + 60) * dv + 2] = f32::NAN; // batch 1, kv head 1, key 60
    kv[(l + 65) * d] = f32::INFINITY;
    qv[0] = -qv[0];
    let got = run_with(&qv, &kv, &vv, Some(&m), attrs(), 2);
    let want = attention_ref(&qv, &kv, &vv, dims, scale, &m_at);
    assert!(got.iter().any(|x| x.is_nan()));
    assert_close_nan(&got, &want, "non-finite operands");
}

/// Soft-capped attention (`softcap`, as Gemma 2 caps its logits) against the f64 reference:
/// float causal mask (the path that skips the dead upper half), per-(batch, head) mask, no
/// mask, `is_causal`, a bool mask with a fully masked row (ONNX 0, canonical NaN), grouped
/// heads throughout, 1 and 2 threads; operands so large that the skip's norm bound fails
/// and the capped scores are all near `±cap`.
#[test]
fn attention_softcap_matches_reference() {
    let (b, hq, hkv, s, l, d, dv) = (2, 4, 2, 70, 70, 8, 5);
    let dims = (b, hq, hkv, s, l, d, dv);
    // Scores spread over about ±25 with cap 5: most are in tanh's curved part or saturated.
    let qv: Vec<f32> = noise(b * hq * s * d, 31).iter().map(|x| x * 6.0).collect();
    let kv: Vec<f32> = noise(b * hkv * l * d, 32).iter().map(|x| x * 6.0).collect();
    let vv = noise(b * hkv * l * dv, 33);
    let (scale, cap) = (0.4f32, 5.0f32);
    let run_on = |q: &[f32], k: &[f32], mask: Option<&RtTensor>, attrs, domain: &str, t| {
        let (q, k, v) = (
            f32t(&[b, hq, s, d], q),
            f32t(&[b, hkv, l, d], k),
            f32t(&[b, hkv, l, dv], &vv),
        );
        let inputs = [Some(&q), Some(&k), Some(&v), mask];
        let opset = if domain.is_empty() { 23 } else { 1 };
        vals(&run_in(domain, "Attention", opset, attrs, &inputs, t)[0])
    };
    let attrs = || {
        vec![
            ("scale", AttrValue::Float(scale)),
            ("softcap", AttrValue::Float(cap)),
        ]
    };
    let canon = perqc_ops::PERQC_DOMAIN;
    // The cap matters: the uncapped reference is far off.
    let causal: Vec<f32> = (0..s * l)
        .map(|x| if x % l > x / l { f32::MIN } else { 0.0 })
        .collect();
    let m = f32t(&[1, 1, s, l], &causal);
    let m_at = |_: usize, _: usize, i: usize, j: usize| causal[i * l + j];
    let want = attention_ref_capped(&qv, &kv, &vv, dims, scale, cap, &m_at);
    let uncapped = attention_ref(&qv, &kv, &vv, dims, scale, &m_at);
    assert!(
        want.iter().zip(&uncapped).any(|(a, b)| (a - b).abs() > 0.1),
        "the cap changes nothing on these scores"
    );
    for domain in ["", canon] {
        let one = run_on(&qv, &kv, Some(&m), attrs(), domain, 1);
        let two = run_on(&qv, &kv, Some(&m), attrs(), domain, 2);
        assert_eq!(one, two, "thread count changed the result");
        assert_close_nan(&two, &want, &format!("causal float mask, {domain:?}"));
    }
    // A float mask per batch entry and head: live ranges differ per (b, h).
    let shifted: Vec<f32> = (0..b * hq * s * l)
        .map(|x| {
            let (j, i, bh) = (x % l, x / l % s, x / (l * s));
            if j > i + 5 * bh {
                f32::NEG_INFINITY
            } else {
                (j % 3) as f32 * 0.5
            }
        })
        .collect();
    let m_shift = f32t(&[b, hq, s, l], &shifted);
    let shift_at =
        |bi: usize, h: usize, i: usize, j: usize| shifted[((bi * hq + h) * s + i) * l + j];
    let want = attention_ref_capped(&qv, &kv, &vv, dims, scale, cap, &shift_at);
    let got = run_on(&qv, &kv, Some(&m_shift), attrs(), canon, 2);
    assert_close_nan(&got, &want, "float mask per batch entry and head");
    // No mask.
    let want = attention_ref_capped(&qv, &kv, &vv, dims, scale, cap, &|_, _, _, _| 0.0);
    assert_close_nan(&run_on(&qv, &kv, None, attrs(), "", 2), &want, "no mask");
    // is_causal, default scale 1/sqrt(D).
    let inf_above = |_: usize, _: usize, i: usize, j: usize| {
        if j > i { f32::NEG_INFINITY } else { 0.0 }
    };
    let causal_attrs = vec![
        ("is_causal", AttrValue::Int(1)),
        ("softcap", AttrValue::Float(cap)),
    ];
    let want = attention_ref_capped(
        &qv,
        &kv,
        &vv,
        dims,
        1.0 / (d as f32).sqrt(),
        cap,
        &inf_above,
    );
    let got = run_on(&qv, &kv, None, causal_attrs, "", 2);
    assert_close_nan(&got, &want, "is_causal");
    // Bool mask [B, 1, S, L] with row 3 fully masked: a capped -inf would be -cap, but the
    // mask comes after the cap, so the row stays masked (0 in ONNX, NaN canonical).
    let (mb, m_keep) = mask_with_dead_row(b, s, l);
    let want_nan = attention_ref_capped(&qv, &kv, &vv, dims, scale, cap, &m_keep);
    assert!(want_nan.iter().any(|y| y.is_nan()));
    let got = run_on(&qv, &kv, Some(&mb), attrs(), canon, 2);
    assert_close_nan(&got, &want_nan, "bool mask, canonical");
    let want_zero = nan_to_zero(&want_nan);
    let got = run_on(&qv, &kv, Some(&mb), attrs(), "", 2);
    assert_close_nan(&got, &want_zero, "bool mask, ONNX");
    // Operands of norm 1e16: |scale · q·k| may reach 1e32, past the bound under which dead
    // keys are skipped, so the block takes the full path; the cap bounds the scores to ±cap.
    let (qb, kb): (Vec<f32>, Vec<f32>) = (
        qv.iter().map(|x| x * 1e15).collect(),
        kv.iter().map(|x| x * 1e15).collect(),
    );
    let want = attention_ref_capped(&qb, &kb, &vv, dims, scale, cap, &m_at);
    let one = run_on(&qb, &kb, Some(&m), attrs(), canon, 1);
    let two = run_on(&qb, &kb, Some(&m), attrs(), canon, 2);
    assert_eq!(one, two, "thread count changed the result");
    assert_close_nan(&two, &want, "large operands, causal float mask");
}

#[test]
fn rms_normalization_matches_reference() {
    // 300 rows of 70 (parallel path at 2 threads), axis -1, scale [70] and [1].
    let (rows, d) = (300, 70);
    let xv: Vec<f32> = noise(rows * d, 21).iter().map(|v| v * 3.0).collect();
    let x = f32t(&[3, 100, d], &xv);
    for (sv, eps) in [(noise(d, 22), 1e-5f32), (vec![0.5], 1e-2)] {
        let s = f32t(&[sv.len()], &sv);
        let attrs = || vec![("epsilon", AttrValue::Float(eps))];
        let one = vals(&run_threads("RMSNormalization", 23, attrs(), &[Some(&x), Some(&s)], 1)[0]);
        let two = vals(&run_threads("RMSNormalization", 23, attrs(), &[Some(&x), Some(&s)], 2)[0]);
        assert_eq!(one, two);
        for r in 0..rows {
            let row = &xv[r * d..(r + 1) * d];
            let ms: f64 = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            for c in 0..d {
                let want = row[c] as f64 * inv * sv[c % sv.len()] as f64;
                assert!((two[r * d + c] as f64 - want).abs() < 1e-5, "[{r},{c}]");
            }
        }
    }
}

/// DequantizeLinear per tensor, per axis (middle and last) and blocked (first and last axis,
/// a partial last block, with a zero point) gives what indexing the parameter by hand gives.
#[test]
fn dequantize_layouts_match_a_reference() {
    let shape = [5usize, 3, 4];
    let n: usize = shape.iter().product();
    let codes: Vec<i8> = (0..n).map(|i| ((i * 7 + 3) % 16) as i8 - 8).collect();
    let x = RtTensor::I8(
        ArrayD::from_shape_vec(IxDyn(&shape), codes.clone())
            .unwrap()
            .into_shared(),
    );
    let at = |i: usize| [i / 12, i / 4 % 3, i % 4];
    // (axis, block, parameter shape, parameter index of element [a, b, c])
    type Case = (i64, i64, Vec<usize>, fn([usize; 3]) -> usize);
    let cases: [Case; 5] = [
        (1, 0, vec![], |_| 0),
        (1, 0, vec![3], |e| e[1]),
        (2, 0, vec![4], |e| e[2]),
        (0, 2, vec![3, 3, 4], |e| (e[0] / 2) * 12 + e[1] * 4 + e[2]),
        (2, 3, vec![5, 3, 2], |e| e[0] * 6 + e[1] * 2 + e[2] / 3),
    ];
    for (axis, block, pshape, index) in cases {
        let m: usize = pshape.iter().product();
        let scale: Vec<f32> = (0..m).map(|j| 0.25 + j as f32 / 8.0).collect();
        let zero: Vec<i8> = (0..m).map(|j| (j % 5) as i8 - 2).collect();
        let s = f32t(&pshape, &scale);
        let z = RtTensor::I8(
            ArrayD::from_shape_vec(IxDyn(&pshape), zero.clone())
                .unwrap()
                .into_shared(),
        );
        let attrs = vec![
            ("axis", AttrValue::Int(axis)),
            ("block_size", AttrValue::Int(block)),
        ];
        for with_zero in [false, true] {
            let inputs = if with_zero {
                vec![Some(&x), Some(&s), Some(&z)]
            } else {
                vec![Some(&x), Some(&s)]
            };
            let got = vals(&run("DequantizeLinear", 21, attrs.clone(), &inputs)[0]);
            let want: Vec<f32> = (0..n)
                .map(|i| {
                    let j = index(at(i));
                    let zp = if with_zero { zero[j] as f32 } else { 0.0 };
                    (codes[i] as f32 - zp) * scale[j]
                })
                .collect();
            assert_eq!(got, want, "axis {axis} block {block} zero {with_zero}");
        }
    }
    // A parameter that does not fit is an error, not a panic.
    let s = f32t(&[2, 3, 4], &[1.0; 24]);
    let attrs = vec![
        ("axis", AttrValue::Int(0)),
        ("block_size", AttrValue::Int(2)),
    ];
    let d = perqc_ops::lookup("", "DequantizeLinear", 21)
        .unwrap()
        .kernel
        .unwrap();
    let mut g = Graph::new("t");
    let mut spec = NodeSpec::new("DequantizeLinear");
    for (k, v) in attrs {
        spec = spec.attr(k, v);
    }
    let id = g.add_node(spec, &[], &["y"]).unwrap();
    let ctx = perqc_ops::KernelCtx {
        node: g.node(id),
        opset: 21,
        threads: 1,
        subgraphs: None,
    };
    let e = d(&ctx, &[Some(&x), Some(&s)]).unwrap_err();
    assert!(e.to_string().contains("does not fit"), "{e}");
}

/// 4-bit initializers unpack to one byte per element, signed and unsigned, odd counts too.
#[test]
fn int4_tensors_unpack() {
    let signed: Vec<i8> = vec![-8, 7, 0, -1, 3];
    let t = perqc_ir::Tensor::from_int4(vec![5], &signed, true).unwrap();
    match RtTensor::from_tensor(&t).unwrap() {
        RtTensor::I4(a) => assert_eq!(a.iter().copied().collect::<Vec<_>>(), signed),
        other => panic!("{:?}", other.dtype()),
    }
    let unsigned: Vec<i8> = vec![15, 0, 8, 1, 9, 2];
    let t = perqc_ir::Tensor::from_int4(vec![2, 3], &unsigned, false).unwrap();
    match RtTensor::from_tensor(&t).unwrap() {
        RtTensor::U4(a) => assert_eq!(a.iter().map(|&v| v as i8).collect::<Vec<_>>(), unsigned),
        other => panic!("{:?}", other.dtype()),
    }
}
