//! The strided and parallel paths of the elementwise, reduction, softmax and movement
//! kernels: transposed, sliced and broadcast inputs, odd lengths, and 1 vs 2 threads,
//! each against a straightforward computation over the logical (row-major) elements.

mod common;

use ndarray::{ArcArray, ArrayD, Axis, IxDyn, Slice};
use perqc_ir::{AttrValue, Graph, NodeSpec};
use perqc_ops::{KernelCtx, RtTensor, lookup};

/// [`common::run_threads`] with every input present.
fn run_threads(
    op: &str,
    opset: i64,
    attrs: Vec<(&str, AttrValue)>,
    inputs: &[&RtTensor],
    threads: usize,
) -> Vec<RtTensor> {
    let ins: Vec<Option<&RtTensor>> = inputs.iter().map(|&t| Some(t)).collect();
    common::run_threads(op, opset, attrs, &ins, threads)
}

/// [`run_threads`] on 1 and on 2 threads; asserts both give the same result bit for bit and
/// returns it.
fn run_1_2(op: &str, opset: i64, attrs: Vec<(&str, AttrValue)>, inputs: &[&RtTensor]) -> RtTensor {
    let one = run_threads(op, opset, attrs.clone(), inputs, 1).remove(0);
    let two = run_threads(op, opset, attrs, inputs, 2).remove(0);
    assert_eq!(one.shape(), two.shape(), "{op}: shape depends on threads");
    assert!(
        f32s(&one)
            .iter()
            .zip(f32s(&two))
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "{op}: result depends on the thread count"
    );
    one
}

/// Deterministic values in [-4, 4).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    common::uniform(n, seed, 4.0)
}

fn arr(shape: &[usize], seed: u64) -> ArcArray<f32, IxDyn> {
    let n = shape.iter().product();
    ArrayD::from_shape_vec(IxDyn(shape), noise(n, seed))
        .unwrap()
        .into_shared()
}

fn i64v(v: &[i64]) -> RtTensor {
    RtTensor::i64_vec(v.to_vec())
}

/// Elements in logical row-major order.
fn f32s(t: &RtTensor) -> Vec<f32> {
    t.as_f32().expect("f32").iter().copied().collect()
}

fn logical(a: &ArcArray<f32, IxDyn>) -> Vec<f32> {
    a.iter().copied().collect()
}

/// Test inputs, small (odd sizes) or large (past the parallel threshold): row-major; a
/// transposed view; the upper half of the last axis of a transposed view; a view with
/// negative strides.
fn layouts(big: bool) -> Vec<(&'static str, ArcArray<f32, IxDyn>)> {
    let (s, d) = if big { (300, 70) } else { (7, 5) };
    let base = arr(&[2, s, 3, d], 1);
    let t = base.clone().permuted_axes(IxDyn(&[0, 2, 1, 3]));
    let mut half = t.clone();
    half.slice_axis_inplace(Axis(3), Slice::from(d as isize / 2..));
    let mut rev = arr(&[2, 3, s, d], 2);
    rev.slice_axis_inplace(Axis(1), Slice::new(0, None, -1));
    rev.slice_axis_inplace(Axis(3), Slice::new(0, None, -1));
    vec![
        ("row-major", base),
        ("transposed", t),
        ("transposed half", half),
        ("reversed", rev),
    ]
}

#[test]
fn unary_maps_on_strided_inputs() {
    type Case = (&'static str, fn(f32) -> f64, f64);
    let cases: [Case; 6] = [
        ("Neg", |x| -(x as f64), 0.0),
        ("Sqrt", |x| (x.abs() as f64).sqrt(), 0.0),
        ("Sigmoid", |x| 1.0 / (1.0 + (-(x as f64)).exp()), 1e-6),
        ("Exp", |x| (x as f64).exp(), 1e-6),
        ("Relu", |x| x.max(0.0) as f64, 0.0),
        ("Reciprocal", |x| 1.0 / x as f64, 1e-6),
    ];
    for big in [false, true] {
        for (what, a) in layouts(big) {
            for (op, f, rel) in cases {
                // Sqrt is checked on |x| so the reference is finite.
                let a = if op == "Sqrt" {
                    a.mapv(f32::abs).into_shared()
                } else {
                    a.clone()
                };
                let y = run_1_2(op, 13, vec![], &[&RtTensor::F32(a.clone())]);
                assert_eq!(y.shape(), a.shape());
                for (i, (&got, &x)) in f32s(&y).iter().zip(&logical(&a)).enumerate() {
                    let want = f(x);
                    let err = (got as f64 - want).abs();
                    assert!(
                        err <= rel * want.abs().max(1.0) + f32::EPSILON as f64 * want.abs(),
                        "{op} {what} [{i}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn pow_square_and_integer_neg_keep_their_paths() {
    let a = arr(&[3, 50, 41], 3).permuted_axes(IxDyn(&[2, 0, 1]));
    let two = RtTensor::f32(ArrayD::from_elem(IxDyn(&[]), 2.0));
    let y = run_1_2("Pow", 13, vec![], &[&RtTensor::F32(a.clone()), &two]);
    let want: Vec<f32> = logical(&a).iter().map(|x| x * x).collect();
    assert_eq!(f32s(&y), want);
    let y = run_threads("Neg", 13, vec![], &[&i64v(&[3, -4, i64::MIN])], 1);
    assert_eq!(y[0].to_i64_vec().unwrap(), vec![-3, 4, i64::MIN]);
}

#[test]
fn binary_broadcasts_over_strided_inputs() {
    for big in [false, true] {
        for (what, a) in layouts(big) {
            let shape = a.shape().to_vec();
            let r = shape.len();
            // Same shape, a [1, .., 1, S, D]-like operand, a scalar, and one broadcasting
            // along the last axis only.
            let others = [
                arr(&shape, 4),
                arr(&[1, 1, shape[r - 2], shape[r - 1]], 5),
                arr(&[], 6),
                arr(&[shape[0], shape[1], shape[2], 1], 7),
            ];
            for b in others {
                for (op, f) in [
                    ("Mul", (|x, y| x * y) as fn(f32, f32) -> f32),
                    ("Add", |x, y| x + y),
                    ("Sub", |x, y| x - y),
                    ("Div", |x, y| x / y),
                ] {
                    for (l, rt) in [(&a, &b), (&b, &a)] {
                        let y = run_1_2(
                            op,
                            13,
                            vec![],
                            &[&RtTensor::F32(l.clone()), &RtTensor::F32(rt.clone())],
                        );
                        let want: Vec<f32> = {
                            let lv = l.broadcast(IxDyn(&shape)).unwrap();
                            let rv = rt.broadcast(IxDyn(&shape)).unwrap();
                            lv.iter().zip(rv.iter()).map(|(&x, &y)| f(x, y)).collect()
                        };
                        assert_eq!(y.shape(), &shape[..]);
                        assert_eq!(f32s(&y), want, "{op} {what} with {:?}", b.shape());
                    }
                }
            }
        }
    }
}

/// Softmax over the rows of `x` moved so `axis` is last, in f64.
fn softmax_ref(x: &ArcArray<f32, IxDyn>, axis: usize) -> Vec<f64> {
    let mut y = x.mapv(|v| v as f64);
    for mut lane in y.lanes_mut(Axis(axis)) {
        let m =
            lane.iter().copied().fold(
                f64::NEG_INFINITY,
                |m, v| {
                    if v.is_nan() || v > m { v } else { m }
                },
            );
        lane.mapv_inplace(|v| (v - m).exp());
        let s: f64 = lane.sum();
        lane.mapv_inplace(|v| v / s);
    }
    y.iter().copied().collect()
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_nan() {
            g.is_nan()
        } else {
            (g as f64 - w).abs() <= tol * w.abs().max(1.0)
        };
        assert!(ok, "{what} [{i}]: {g} vs {w}");
    }
}

#[test]
fn softmax_rows_any_axis_and_layout() {
    for big in [false, true] {
        for (what, a) in layouts(big) {
            for ax in [3i64, -1, 1, 0] {
                let y = run_1_2(
                    "Softmax",
                    13,
                    vec![("axis", AttrValue::Int(ax))],
                    &[&RtTensor::F32(a.clone())],
                );
                let axu = ax.rem_euclid(4) as usize;
                assert_close(&f32s(&y), &softmax_ref(&a, axu), 1e-6, what);
            }
        }
    }
    // Opset < 13: softmax over the flattened trailing axes [axis..].
    let a = arr(&[3, 4, 17], 8);
    let y = run_1_2(
        "Softmax",
        11,
        vec![("axis", AttrValue::Int(1))],
        &[&RtTensor::F32(a.clone())],
    );
    let flat = a.clone().into_shape_with_order(IxDyn(&[3, 68])).unwrap();
    assert_close(&f32s(&y), &softmax_ref(&flat, 1), 1e-6, "opset 11");
    // Odd length 37: a row with a NaN, an all -inf row (exp(-inf - -inf)) and a row with
    // +inf (exp(inf - inf)) are all NaN.
    let mut v = noise(3 * 37, 9);
    v[5] = f32::NAN;
    for x in &mut v[37..74] {
        *x = f32::NEG_INFINITY;
    }
    v[80] = f32::INFINITY;
    let a = ArrayD::from_shape_vec(IxDyn(&[3, 37]), v)
        .unwrap()
        .into_shared();
    let y = f32s(&run_1_2(
        "Softmax",
        13,
        vec![],
        &[&RtTensor::F32(a.clone())],
    ));
    assert!(y.iter().all(|v| v.is_nan()));
    let mut b = a.to_owned();
    b.index_axis_mut(Axis(0), 0).fill(1.0);
    b.index_axis_mut(Axis(0), 1).fill(2.0);
    b[[2, 6]] = 0.5; // was +inf
    b[[2, 3]] = f32::NEG_INFINITY;
    let b = b.into_shared();
    let y = f32s(&run_1_2(
        "Softmax",
        13,
        vec![],
        &[&RtTensor::F32(b.clone())],
    ));
    assert_close(&y, &softmax_ref(&b, 1), 1e-6, "masked");
    assert_eq!(y[37 * 2 + 3], 0.0);
    // Empty rows and an empty batch give empty results.
    for shape in [[3usize, 0], [0, 5]] {
        let e = RtTensor::f32(ArrayD::zeros(IxDyn(&shape)));
        for ax in [-1i64, 0] {
            let y = run_1_2("Softmax", 13, vec![("axis", AttrValue::Int(ax))], &[&e]);
            assert_eq!(y.shape(), &shape[..]);
        }
    }
}

/// `kind` (Sum, Mean or Max) of `x` over `axes`, in f64, row-major over the kept axes.
fn reduce_ref(x: &ArcArray<f32, IxDyn>, axes: &[usize], kind: &str) -> Vec<f64> {
    let mut y = x.mapv(|v| v as f64);
    for &ax in axes.iter().rev() {
        let n = y.shape()[ax] as f64;
        y = match kind {
            "Max" => y.fold_axis(Axis(ax), f64::NEG_INFINITY, |&m, &v| {
                if v.is_nan() || v > m { v } else { m }
            }),
            "Mean" => y.sum_axis(Axis(ax)).mapv(|s| s / n),
            _ => y.sum_axis(Axis(ax)),
        };
    }
    y.iter().copied().collect()
}

#[test]
fn reductions_over_trailing_axes() {
    for big in [false, true] {
        for (what, a) in layouts(big) {
            for axes in [vec![3usize], vec![2, 3], vec![1, 2, 3], vec![0, 1, 2, 3]] {
                for kind in ["Sum", "Mean", "Max"] {
                    for keep in [0i64, 1] {
                        let ax: Vec<i64> = axes.iter().map(|&v| v as i64 - 4).collect();
                        let y = run_1_2(
                            &format!("Reduce{kind}"),
                            18,
                            vec![("keepdims", AttrValue::Int(keep))],
                            &[&RtTensor::F32(a.clone()), &i64v(&ax)],
                        );
                        let mut shape: Vec<usize> = a.shape().to_vec();
                        for &x in axes.iter().rev() {
                            if keep == 1 {
                                shape[x] = 1;
                            } else {
                                shape.remove(x);
                            }
                        }
                        assert_eq!(y.shape(), &shape[..], "{kind} {what} {axes:?}");
                        let tol = if kind == "Max" { 0.0 } else { 1e-5 };
                        let want = reduce_ref(&a, &axes, kind);
                        // Sums of n terms of size <= 4: absolute error ~ n * 4 * eps.
                        let n: usize = axes.iter().map(|&x| a.shape()[x]).product();
                        let scale = if kind == "Sum" { n as f64 * 4.0 } else { 4.0 };
                        for (i, (&g, &w)) in f32s(&y).iter().zip(&want).enumerate() {
                            assert!(
                                (g as f64 - w).abs() <= tol * scale,
                                "{kind} {what} {axes:?} [{i}]: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }
    // NaN propagates through ReduceMax; Mean of an empty row is NaN; Max of one is an error.
    let mut v = noise(2 * 19, 10);
    v[22] = f32::NAN;
    let a = RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[2, 19]), v).unwrap());
    let y = f32s(&run_1_2("ReduceMax", 18, vec![], &[&a, &i64v(&[1])]));
    assert!(!y[0].is_nan() && y[1].is_nan());
    let empty = RtTensor::f32(ArrayD::zeros(IxDyn(&[3, 0])));
    let y = f32s(&run_1_2("ReduceMean", 18, vec![], &[&empty, &i64v(&[1])]));
    assert!(y.len() == 3 && y.iter().all(|v| v.is_nan()));
    let k = lookup("", "ReduceMax", 18).and_then(|d| d.kernel).unwrap();
    let mut g = Graph::new("t");
    let id = g.add_node(NodeSpec::new("ReduceMax"), &[], &["y"]).unwrap();
    let ctx = KernelCtx {
        node: g.node(id),
        opset: 18,
        threads: 1,
        subgraphs: None,
    };
    assert!(k(&ctx, &[Some(&empty), Some(&i64v(&[1]))]).is_err());
}

#[test]
fn concat_expand_reshape_of_strided_inputs() {
    for big in [false, true] {
        let parts = layouts(big);
        let (a, b) = (&parts[1].1, &parts[2].1);
        for ax in 0..4 {
            // `a` cut to `b`'s extent off the concat axis, so the pair concatenates.
            let mut a2 = a.clone();
            for i in 0..4 {
                if i != ax {
                    a2.slice_axis_inplace(Axis(i), Slice::from(..b.shape()[i] as isize));
                }
            }
            let y = run_1_2(
                "Concat",
                13,
                vec![("axis", AttrValue::Int(ax as i64))],
                &[
                    &RtTensor::F32(a2.clone()),
                    &RtTensor::F32(b.clone()),
                    &RtTensor::F32(a2.clone()),
                ],
            );
            let want = ndarray::concatenate(Axis(ax), &[a2.view(), b.view(), a2.view()]).unwrap();
            assert_eq!(y.shape(), want.shape());
            assert_eq!(
                f32s(&y),
                want.iter().copied().collect::<Vec<_>>(),
                "axis {ax}"
            );
        }
        // Expand a transposed [.., 1, ..] view; Reshape a transposed view.
        let k = arr(&[1, 3, if big { 400 } else { 5 }, 1, 8], 11)
            .permuted_axes(IxDyn(&[0, 1, 3, 2, 4]));
        let mut want_shape = k.shape().to_vec();
        want_shape[2] = 3;
        let shape_arg: Vec<i64> = want_shape.iter().map(|&v| v as i64).collect();
        let y = run_1_2(
            "Expand",
            13,
            vec![],
            &[&RtTensor::F32(k.clone()), &i64v(&shape_arg)],
        );
        let want = k.broadcast(IxDyn(&want_shape)).unwrap();
        assert_eq!(f32s(&y), want.iter().copied().collect::<Vec<_>>());
        let y = run_1_2(
            "Reshape",
            13,
            vec![],
            &[&RtTensor::F32(a.clone()), &i64v(&[2, -1])],
        );
        assert_eq!(y.shape(), &[2, a.len() / 2]);
        assert_eq!(f32s(&y), logical(a));
    }
    // Tiny int64 shape concatenation (the shape-computation case).
    let y = run_threads(
        "Concat",
        13,
        vec![("axis", AttrValue::Int(0))],
        &[&i64v(&[1]), &i64v(&[]), &i64v(&[512, 9]), &i64v(&[64])],
        1,
    );
    assert_eq!(y[0].to_i64_vec().unwrap(), vec![1, 512, 9, 64]);
}
