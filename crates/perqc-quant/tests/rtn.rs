//! Round-to-nearest: ranges, error bounds, exact zero groups, bitwise values, errors,
//! thread-count independence.

mod common;

use common::{Rng, int};
use ndarray::Array2;
use perqc_quant::{
    Granularity, QWeight, QuantError, QuantSpec, ScaleSearch, quantize_rtn, sqnr_db,
};

fn check_range_and_bound(w: &Array2<f32>, q: &QWeight) {
    let (lo, hi) = q.spec.code_range();
    assert!(
        q.codes.iter().all(|&c| (lo..=hi).contains(&(c as i32))),
        "codes outside [{lo}, {hi}]"
    );
    let ng = q.cols / q.group;
    assert_eq!(q.scales.len(), q.rows * ng);
    for r in 0..q.rows {
        for c in 0..q.cols {
            let s = q.scales[r * ng + c / q.group];
            let err = (w[[r, c]] - q.value(r, c)).abs();
            // Half a step, plus the f32 rounding of the products.
            assert!(
                err <= 0.5 * s * (1.0 + 1e-5) + 1e-6 * w[[r, c]].abs(),
                "{}: ({r}, {c}) w = {} value = {} scale = {s}",
                q.spec,
                w[[r, c]],
                q.value(r, c)
            );
        }
    }
}

#[test]
fn int_codes_in_range_and_error_within_half_a_step() {
    let mut rng = Rng(1);
    let w = rng.matrix(24, 96, |r| r.laplace() * 0.05);
    let wpos = w.mapv(f32::abs);
    for bits in [2, 3, 4, 8] {
        for g in [
            Granularity::Tensor,
            Granularity::Channel,
            Granularity::Group(32),
            Granularity::Group(1),
        ] {
            for sym in [true, false] {
                for signed in [true, false] {
                    let spec = QuantSpec {
                        signed,
                        ..int(bits, sym, g, ScaleSearch::Max)
                    };
                    // Unsigned symmetric grids are for non-negative data.
                    let data = if sym && !signed { &wpos } else { &w };
                    let q = quantize_rtn(data.view(), &spec).unwrap();
                    assert_eq!(q.zero_points.is_some(), !sym);
                    check_range_and_bound(data, &q);
                    if g == Granularity::Tensor {
                        assert!(q.scales.iter().all(|&s| s == q.scales[0]));
                    }
                }
            }
        }
    }
}

#[test]
fn symmetric_scale_is_amax_over_qmax() {
    let w = Array2::from_shape_vec((1, 4), vec![0.1f32, -0.7, 0.3, 0.2]).unwrap();
    let q = quantize_rtn(
        w.view(),
        &int(4, true, Granularity::Channel, ScaleSearch::Max),
    )
    .unwrap();
    assert_eq!(q.scales[0], 0.7f32 / 7.0);
    assert_eq!(q.codes, vec![1, -7, 3, 2]);
    let w = Array2::from_shape_vec((1, 2), vec![0.25f32, -0.25]).unwrap();
    // scale = 0.25 / 7; 0.25 / scale = 7 exactly; ties: 0.5 steps round to even.
    let q = quantize_rtn(
        w.view(),
        &int(4, true, Granularity::Channel, ScaleSearch::Max),
    )
    .unwrap();
    assert_eq!(q.codes, vec![7, -7]);
}

#[test]
fn asymmetric_zero_group_is_exact() {
    let mut w = Array2::<f32>::zeros((3, 8));
    w[[1, 5]] = 0.5;
    w[[2, 0]] = -0.25;
    for signed in [false, true] {
        let spec = QuantSpec {
            signed,
            ..int(4, false, Granularity::Group(4), ScaleSearch::Mse)
        };
        let q = quantize_rtn(w.view(), &spec).unwrap();
        let (lo, _) = spec.code_range();
        let zps = q.zero_points.as_ref().unwrap();
        // Row 0 (both groups), row 1 group 0 and row 2 group 1 are zero.
        for i in [0, 1, 2, 5] {
            assert_eq!(q.scales[i], 1.0, "group {i}");
            assert_eq!(zps[i] as i32, lo, "group {i}");
        }
        let d = q.dequantize();
        for r in 0..3 {
            for c in 0..8 {
                if w[[r, c]] == 0.0 && !(r == 1 && c >= 4) && !(r == 2 && c < 4) {
                    assert_eq!(d[[r, c]].to_bits(), 0f32.to_bits(), "({r}, {c})");
                }
            }
        }
        check_range_and_bound(&w, &q);
    }
    // Symmetric zero rows: scale 1, codes 0.
    let q = quantize_rtn(
        w.view(),
        &int(4, true, Granularity::Channel, ScaleSearch::Max),
    )
    .unwrap();
    assert_eq!(q.scales[0], 1.0);
    assert!(q.codes[..8].iter().all(|&c| c == 0));
}

#[test]
fn value_is_code_minus_zp_times_scale_bitwise() {
    let mut rng = Rng(2);
    let w = rng.matrix(16, 64, |r| r.normal() * 0.3 + 0.1);
    for spec in [
        int(4, false, Granularity::Group(16), ScaleSearch::Mse),
        int(8, false, Granularity::Channel, ScaleSearch::Max),
        QuantSpec {
            signed: false,
            ..int(3, false, Granularity::Tensor, ScaleSearch::Mse)
        },
        int(4, true, Granularity::Group(32), ScaleSearch::Mse),
    ] {
        let q = quantize_rtn(w.view(), &spec).unwrap();
        let d = q.dequantize();
        let ng = q.cols / q.group;
        for r in 0..q.rows {
            for c in 0..q.cols {
                let i = r * ng + c / q.group;
                let zp = q.zero_points.as_ref().map_or(0, |z| z[i] as i32);
                let want = (q.codes[r * q.cols + c] as i32 - zp) as f32 * q.scales[i];
                assert_eq!(q.value(r, c).to_bits(), want.to_bits(), "{spec} ({r}, {c})");
                assert_eq!(d[[r, c]].to_bits(), want.to_bits());
            }
        }
    }
}

#[test]
fn asymmetric_params_follow_the_formula() {
    // mn = -0.25, mx = 0.5, uint4: scale = 0.75 / 15, zp = round(0 - (-0.25) / scale) = 5.
    let w = Array2::from_shape_vec((1, 3), vec![-0.25f32, 0.5, 0.1]).unwrap();
    let spec = QuantSpec {
        signed: false,
        ..int(4, false, Granularity::Channel, ScaleSearch::Max)
    };
    let q = quantize_rtn(w.view(), &spec).unwrap();
    let scale = (0.5f32 - -0.25f32) / 15.0;
    assert_eq!(q.scales[0], scale);
    assert_eq!(q.zero_points.as_ref().unwrap()[0], 5);
    assert_eq!(q.codes[0], 0);
    assert_eq!(q.codes[1], 15);
    // Positive data: mn = 0, zp = lo.
    let w = Array2::from_shape_vec((1, 2), vec![0.5f32, 1.5]).unwrap();
    let q = quantize_rtn(
        w.view(),
        &int(4, false, Granularity::Channel, ScaleSearch::Max),
    )
    .unwrap();
    assert_eq!(q.zero_points.unwrap()[0], -8);
}

#[test]
fn bad_inputs_are_errors() {
    let spec = int(4, true, Granularity::Group(32), ScaleSearch::Max);
    let w = Array2::<f32>::zeros((2, 48));
    assert!(matches!(
        quantize_rtn(w.view(), &spec),
        Err(QuantError::Spec(_))
    ));
    let w = Array2::<f32>::zeros((0, 32));
    assert!(matches!(
        quantize_rtn(w.view(), &spec),
        Err(QuantError::Shape(_))
    ));
    let mut w = Array2::<f32>::zeros((2, 32));
    w[[1, 3]] = f32::NAN;
    assert_eq!(
        quantize_rtn(w.view(), &spec).unwrap_err().to_string(),
        "weight[1, 3] = NaN is not finite"
    );
    let token = int(4, true, Granularity::Token, ScaleSearch::Max);
    let w = Array2::<f32>::zeros((2, 32));
    assert!(matches!(
        quantize_rtn(w.view(), &token),
        Err(QuantError::Spec(_))
    ));
    // A range beyond f32 (asymmetric) is an error, not a NaN scale.
    let w = Array2::from_shape_vec((1, 2), vec![-3e38f32, 3e38]).unwrap();
    let e = quantize_rtn(
        w.view(),
        &int(8, false, Granularity::Channel, ScaleSearch::Max),
    )
    .unwrap_err();
    assert_eq!(e, QuantError::ScaleOverflow { row: 0, group: 0 });
}

#[test]
fn strided_input_equals_contiguous() {
    let mut rng = Rng(3);
    let w = rng.matrix(32, 40, |r| r.normal());
    let spec = int(4, false, Granularity::Group(8), ScaleSearch::Mse);
    let t = w.t().to_owned();
    let a = quantize_rtn(t.t(), &spec).unwrap();
    let b = quantize_rtn(w.view(), &spec).unwrap();
    assert_eq!(a, b);
}

#[test]
fn same_result_on_1_and_2_threads() {
    let mut rng = Rng(4);
    let w = rng.matrix(64, 256, |r| r.laplace());
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let two = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for spec in [
        int(4, true, Granularity::Channel, ScaleSearch::Mse),
        int(4, true, Granularity::Tensor, ScaleSearch::Mse),
        int(3, false, Granularity::Group(32), ScaleSearch::Mse),
    ] {
        let a = one.install(|| quantize_rtn(w.view(), &spec).unwrap());
        let b = two.install(|| quantize_rtn(w.view(), &spec).unwrap());
        assert_eq!(a, b, "{spec}");
    }
}

#[test]
fn sqnr() {
    assert_eq!(sqnr_db(&[1.0, 2.0], &[1.0, 2.0]), f64::INFINITY);
    assert!((sqnr_db(&[1.0, 1.0], &[1.0, 0.0]) - 10.0 * 2f64.log10()).abs() < 1e-12);
    assert!((sqnr_db(&[3.0, 4.0], &[3.0, 4.5]) - 10.0 * 100f64.log10()).abs() < 1e-12);
}
