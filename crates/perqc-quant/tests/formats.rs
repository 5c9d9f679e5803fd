//! FP4 (E2M1) grid values and rounding, OCP MX shared power-of-two scales.

mod common;

use common::{Rng, fmt};
use ndarray::Array2;
use perqc_quant::{FP4_E2M1_VALUES, Format, Granularity, ScaleSearch, quantize_rtn};

#[test]
fn fp4_table_is_e2m1() {
    // code = sign << 3 | exponent << 1 | mantissa; exponent 0 is subnormal (0, 0.5).
    for code in 0..16u32 {
        let (s, e, m) = (code >> 3, (code >> 1) & 3, code & 1);
        let mag = if e == 0 {
            0.5 * m as f32
        } else {
            (1.0 + 0.5 * m as f32) * 2f32.powi(e as i32 - 1)
        };
        let want = if s == 1 { -mag } else { mag };
        assert_eq!(
            FP4_E2M1_VALUES[code as usize].to_bits(),
            want.to_bits(),
            "code {code}"
        );
    }
}

#[test]
fn fp4_rounds_to_nearest_ties_to_even_and_saturates() {
    // amax 6 -> scale 1, so elements are their own E2M1 inputs.
    let xs = [
        (6.0f32, 6.0f32),
        (0.25, 0.0),
        (0.26, 0.5),
        (0.75, 1.0),
        (1.25, 1.0),
        (1.75, 2.0),
        (2.5, 2.0),
        (2.6, 3.0),
        (3.5, 4.0),
        (5.0, 4.0),
        (5.01, 6.0),
        (-0.75, -1.0),
        (-2.5, -2.0),
        (-3.0, -3.0),
        (0.1, 0.0),
        (-0.1, 0.0),
    ];
    let w = Array2::from_shape_vec((1, xs.len()), xs.iter().map(|x| x.0).collect()).unwrap();
    let q = quantize_rtn(
        w.view(),
        &fmt(Format::Fp4, Granularity::Channel, ScaleSearch::Max),
    )
    .unwrap();
    assert_eq!(q.scales, vec![1.0]);
    for (c, &(x, want)) in xs.iter().enumerate() {
        assert_eq!(q.value(0, c), want, "x = {x}");
        assert!((0..16).contains(&q.codes[c]));
    }
    // Values on the grid times any scale come back exactly.
    let mut rng = Rng(5);
    let s = 0.37f32;
    let vals: Vec<f32> = (0..64)
        .map(|i| {
            FP4_E2M1_VALUES[if i == 0 {
                7
            } else {
                (rng.next_u64() % 16) as usize
            }] * s
        })
        .collect();
    let w = Array2::from_shape_vec((1, 64), vals.clone()).unwrap();
    let q = quantize_rtn(
        w.view(),
        &fmt(Format::Fp4, Granularity::Channel, ScaleSearch::Max),
    )
    .unwrap();
    let want_scale = 6.0 * s / 6.0;
    assert_eq!(q.scales[0], want_scale);
    for (c, v) in vals.iter().enumerate() {
        assert_eq!(
            q.value(0, c),
            v.abs().copysign(*v) / s * want_scale,
            "col {c}"
        );
    }
}

fn is_pow2(x: f32) -> bool {
    x > 0.0 && x.to_bits() & 0x007f_ffff == 0
        || (x.to_bits() >> 23 == 0 && (x.to_bits()).is_power_of_two())
}

#[test]
fn mx_scales_are_powers_of_two_with_the_ocp_exponent() {
    let mut rng = Rng(6);
    let w = rng.matrix(8, 128, |r| {
        r.laplace() * 10f64.powi((r.next_u64() % 5) as i32 - 3)
    });
    for search in [ScaleSearch::Max, ScaleSearch::Mse] {
        for f in [Format::MxFp4, Format::MxInt8] {
            let q = quantize_rtn(w.view(), &fmt(f, Granularity::Group(32), search)).unwrap();
            assert_eq!(q.group, 32);
            assert!(q.zero_points.is_none());
            for (i, &s) in q.scales.iter().enumerate() {
                assert!(is_pow2(s), "{f}: scale {s}");
                if search == ScaleSearch::Max {
                    let (r, g) = (i / 4, i % 4);
                    let amax = (0..32)
                        .map(|c| w[[r, g * 32 + c]].abs())
                        .fold(0f32, f32::max);
                    let e = amax.log2().floor() as i32;
                    let want = match f {
                        Format::MxFp4 => 2f32.powi(e - 2),
                        _ => 2f32.powi(e - 6),
                    };
                    assert_eq!(s, want, "{f} row {r} block {g} amax {amax}");
                }
            }
        }
    }
}

#[test]
fn mx_examples() {
    // MXFP4: amax 5 -> e = 2 - 2 = 0, scale 1; 0.3 -> e = -2 - 2, scale 1/16.
    let mut v = vec![0f32; 64];
    v[0] = 5.0;
    v[1] = 0.74;
    v[32] = 0.3;
    v[33] = -0.1;
    let w = Array2::from_shape_vec((1, 64), v).unwrap();
    let q = quantize_rtn(
        w.view(),
        &fmt(Format::MxFp4, Granularity::Group(32), ScaleSearch::Max),
    )
    .unwrap();
    assert_eq!(q.scales, vec![1.0, 1.0 / 16.0]);
    assert_eq!(q.value(0, 0), 4.0); // tie 5 -> 4 (even mantissa)
    assert_eq!(q.value(0, 1), 0.5);
    assert_eq!(q.value(0, 32), 0.25); // 0.3 * 16 = 4.8 -> 4
    assert_eq!(q.value(0, 33), -1.5 / 16.0); // -1.6 -> -1.5
    // MXINT8: amax 1 -> e = 0, value = code / 64; 1.99 -> 127 / 64.
    let mut v = vec![0f32; 32];
    v[0] = 1.0;
    v[1] = -0.5;
    v[2] = 0.01;
    let w = Array2::from_shape_vec((1, 32), v.clone()).unwrap();
    let q = quantize_rtn(
        w.view(),
        &fmt(Format::MxInt8, Granularity::Group(32), ScaleSearch::Max),
    )
    .unwrap();
    assert_eq!(q.scales, vec![1.0 / 64.0]);
    assert_eq!(&q.codes[..3], &[64, -32, 1]);
    v[0] = 1.99;
    let w = Array2::from_shape_vec((1, 32), v).unwrap();
    let q = quantize_rtn(
        w.view(),
        &fmt(Format::MxInt8, Granularity::Group(32), ScaleSearch::Max),
    )
    .unwrap();
    assert_eq!(q.codes[0], 127);
    assert_eq!(q.value(0, 0), 127.0 / 64.0);
    // A zero block: shared exponent 0.
    let w = Array2::<f32>::zeros((1, 32));
    let q = quantize_rtn(
        w.view(),
        &fmt(Format::MxFp4, Granularity::Group(32), ScaleSearch::Mse),
    )
    .unwrap();
    assert_eq!(q.scales, vec![1.0]);
    assert!(q.dequantize().iter().all(|&x| x == 0.0));
}
