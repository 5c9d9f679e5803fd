//! GPTQ: output error below RTN on correlated inputs, agreement with a naive reference,
//! determinism across runs and thread counts, dead columns, damping failure, errors.

mod common;

use common::{Rng, correlated_x, fmt, hessian, int, output_err};
use ndarray::{Array2, ArrayView2};
use perqc_quant::{
    Format, GptqOptions, Granularity, InputErrorFit, QWeight, QuantError, QuantSpec, ScaleSearch,
    gptq, quantize_rtn,
};

fn setup(seed: u64, rows: usize, cols: usize) -> (Array2<f32>, Array2<f64>) {
    let mut rng = Rng(seed);
    let x = correlated_x(&mut rng, 2048, cols);
    let w = rng.matrix(rows, cols, |r| r.normal() * 0.05);
    (w, hessian(x.view()))
}

#[test]
fn gptq_beats_rtn_on_the_output() {
    let (w, h) = setup(20, 48, 192);
    let specs = [
        int(4, true, Granularity::Channel, ScaleSearch::Max),
        int(3, false, Granularity::Channel, ScaleSearch::Mse),
        int(4, false, Granularity::Group(32), ScaleSearch::Max),
        int(4, true, Granularity::Group(64), ScaleSearch::Mse),
        int(4, true, Granularity::Tensor, ScaleSearch::Max),
        fmt(Format::Fp4, Granularity::Group(32), ScaleSearch::Mse),
        fmt(Format::MxFp4, Granularity::Group(32), ScaleSearch::Max),
    ];
    for spec in specs {
        let rtn = output_err(w.view(), &quantize_rtn(w.view(), &spec).unwrap(), h.view());
        for act_order in [false, true] {
            // block 64 < cols: three lazy batches.
            let opts = GptqOptions {
                act_order,
                block: 64,
                ..GptqOptions::default()
            };
            let q = gptq(w.view(), h.view(), &spec, &opts).unwrap();
            let (lo, hi) = spec.code_range();
            assert!(q.codes.iter().all(|&c| (lo..=hi).contains(&(c as i32))));
            let e = output_err(w.view(), &q, h.view());
            eprintln!("{spec} act_order={act_order}: gptq/rtn = {:.3}", e / rtn);
            assert!(
                e < 0.8 * rtn,
                "{spec} act_order={act_order}: gptq {e} vs rtn {rtn}"
            );
        }
    }
}

#[test]
fn static_groups_keep_the_rtn_parameters() {
    // Scales and zero points come from the original W (same as RTN's), whatever the order.
    let (w, h) = setup(21, 16, 128);
    let spec = int(4, false, Granularity::Group(32), ScaleSearch::Mse);
    let r = quantize_rtn(w.view(), &spec).unwrap();
    let q = gptq(w.view(), h.view(), &spec, &GptqOptions::default()).unwrap();
    assert_eq!(q.scales, r.scales);
    assert_eq!(q.zero_points, r.zero_points);
    assert_eq!(q.group, 32);
}

/// GPTQ in its plain OBS form: `Hinv = (H + damp)^-1` by Gauss-Jordan; per column
/// quantize, spread the error with `Hinv[i, j] / Hinv[i, i]`, then eliminate column `i`
/// from `Hinv`. No blocks, no Cholesky, natural order.
fn naive_gptq(w: ArrayView2<f32>, h: ArrayView2<f64>, rtn: &QWeight, damp: f64) -> Vec<i16> {
    let n = w.ncols();
    let mean = (0..n).map(|i| h[[i, i]]).sum::<f64>() / n as f64;
    let mut a = h.to_owned();
    for i in 0..n {
        a[[i, i]] += damp * mean;
    }
    // Gauss-Jordan inverse.
    let mut inv = Array2::<f64>::eye(n);
    for c in 0..n {
        let p = a[[c, c]];
        for j in 0..n {
            a[[c, j]] /= p;
            inv[[c, j]] /= p;
        }
        for r in 0..n {
            if r != c {
                let f = a[[r, c]];
                for j in 0..n {
                    a[[r, j]] -= f * a[[c, j]];
                    inv[[r, j]] -= f * inv[[c, j]];
                }
            }
        }
    }
    let mut codes = vec![0i16; w.len()];
    let ng = n / rtn.group;
    for r in 0..w.nrows() {
        let mut hinv = inv.clone();
        let mut row: Vec<f64> = w.row(r).iter().map(|&v| v as f64).collect();
        for i in 0..n {
            // Quantize with RTN's parameters: find the code whose value is nearest the
            // current weight by quantizing a one-element copy.
            let g = r * ng + i / rtn.group;
            let zp = rtn.zero_points.as_ref().map_or(0, |z| z[g] as i32);
            let (lo, hi) = rtn.spec.code_range();
            let s = rtn.scales[g];
            let code =
                (((row[i] as f32) / s).round_ties_even() + zp as f32).clamp(lo as f32, hi as f32);
            let q = (code as i32 - zp) as f32 * s;
            codes[r * n + i] = code as i16;
            let e = (row[i] - q as f64) / hinv[[i, i]];
            for j in i + 1..n {
                row[j] -= e * hinv[[i, j]];
            }
            let d = hinv[[i, i]];
            let col: Vec<f64> = (0..n).map(|k| hinv[[k, i]]).collect();
            for k in 0..n {
                for j in 0..n {
                    hinv[[k, j]] -= col[k] * col[j] / d;
                }
            }
        }
    }
    codes
}

#[test]
fn agrees_with_a_naive_reference() {
    let (w, h) = setup(22, 8, 64);
    let spec = int(4, false, Granularity::Group(16), ScaleSearch::Max);
    let rtn = quantize_rtn(w.view(), &spec).unwrap();
    let want = naive_gptq(w.view(), h.view(), &rtn, 0.01);
    for block in [1, 16, 64, 128] {
        let opts = GptqOptions {
            act_order: false,
            block,
            ..GptqOptions::default()
        };
        let q = gptq(w.view(), h.view(), &spec, &opts).unwrap();
        let same = q.codes.iter().zip(&want).filter(|(a, b)| a == b).count();
        // The two differ only in float rounding, which can flip a code at a tie.
        assert!(
            same * 1000 >= want.len() * 995,
            "block {block}: {same} of {} codes agree",
            want.len()
        );
    }
}

#[test]
fn deterministic_across_runs_and_thread_counts() {
    // 80 rows: three row chunks of 32.
    let (w, h) = setup(23, 80, 256);
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
        int(4, false, Granularity::Group(32), ScaleSearch::Max),
    ] {
        let opts = GptqOptions::default();
        let a = two.install(|| gptq(w.view(), h.view(), &spec, &opts).unwrap());
        let b = two.install(|| gptq(w.view(), h.view(), &spec, &opts).unwrap());
        let c = one.install(|| gptq(w.view(), h.view(), &spec, &opts).unwrap());
        assert_eq!(a, b, "{spec}: two runs differ");
        assert_eq!(a, c, "{spec}: 1 and 2 threads differ");
    }
}

#[test]
fn dead_columns_quantize_to_zero() {
    let mut rng = Rng(24);
    let mut x = correlated_x(&mut rng, 512, 64);
    for &c in &[3usize, 40] {
        x.column_mut(c).fill(0.0);
    }
    let h = hessian(x.view());
    let w = rng.matrix(8, 64, |r| r.normal());
    let spec = int(4, false, Granularity::Group(16), ScaleSearch::Max);
    let q = gptq(w.view(), h.view(), &spec, &GptqOptions::default()).unwrap();
    for r in 0..8 {
        assert_eq!(q.value(r, 3), 0.0);
        assert_eq!(q.value(r, 40), 0.0);
    }
}

#[test]
fn not_positive_definite_after_three_retries() {
    let n = 16;
    // An eigenvalue of -49 against mean(diag) = 1: damping up to 10 cannot fix it. Columns
    // are factored last to first, so column 2 (after 9) is where it fails.
    let mut h = Array2::<f64>::eye(n);
    h[[2, 9]] = 50.0;
    h[[9, 2]] = 50.0;
    let w = Array2::<f32>::ones((4, n));
    let spec = int(4, true, Granularity::Channel, ScaleSearch::Max);
    let e = gptq(
        w.view(),
        h.view(),
        &spec,
        &GptqOptions {
            act_order: false,
            ..Default::default()
        },
    )
    .unwrap_err();
    match &e {
        QuantError::NotPositiveDefinite { pivot, tried } => {
            assert_eq!(*pivot, 2);
            assert_eq!(tried.len(), 4);
            assert!((tried[3] / tried[0] - 1000.0).abs() < 1e-9);
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("not positive definite"), "{e}");
    // Raised damping rescues a mildly indefinite H (eigenvalue -1, mean(diag) 1).
    h[[2, 9]] = 2.0;
    h[[9, 2]] = 2.0;
    gptq(w.view(), h.view(), &spec, &GptqOptions::default()).unwrap();
}

#[test]
fn bad_inputs_are_errors() {
    let (w, h) = setup(25, 4, 32);
    let spec = int(4, true, Granularity::Channel, ScaleSearch::Max);
    let h_bad = Array2::<f64>::eye(31);
    assert!(matches!(
        gptq(w.view(), h_bad.view(), &spec, &GptqOptions::default()),
        Err(QuantError::Shape(m)) if m.contains("31 x 31") && m.contains("32 x 32")
    ));
    let opts = GptqOptions {
        damp: -1.0,
        ..Default::default()
    };
    assert!(matches!(
        gptq(w.view(), h.view(), &spec, &opts),
        Err(QuantError::Options(_))
    ));
    let opts = GptqOptions {
        block: 0,
        ..Default::default()
    };
    assert!(matches!(
        gptq(w.view(), h.view(), &spec, &opts),
        Err(QuantError::Options(_))
    ));
    let token = QuantSpec {
        granularity: Granularity::Token,
        ..spec
    };
    assert!(matches!(
        gptq(w.view(), h.view(), &token, &GptqOptions::default()),
        Err(QuantError::Spec(_))
    ));
    let mut h_nan = h.clone();
    h_nan[[3, 1]] = f64::NAN;
    assert!(matches!(
        gptq(w.view(), h_nan.view(), &spec, &GptqOptions::default()),
        Err(QuantError::NonFiniteHessian { row: 3, col: 1, .. })
    ));
}

/// One factor of the Hessian serves every linear that reads the input: `gptq_with` equals
/// `gptq` exactly, dead columns included.
#[test]
fn shared_factor_equals_per_linear_gptq() {
    let (w, mut h) = setup(41, 24, 96);
    for j in 0..96 {
        h[[7, j]] = 0.0;
        h[[j, 7]] = 0.0;
    }
    let (w2, _) = setup(42, 40, 96);
    let opts = GptqOptions::default();
    let spec = int(4, true, Granularity::Channel, ScaleSearch::Mse);
    let f = perqc_quant::GptqFactor::new(h.view(), &opts).unwrap();
    for w in [&w, &w2] {
        let a = perqc_quant::gptq_with(w.view(), &f, &spec, &opts).unwrap();
        assert_eq!(a, gptq(w.view(), h.view(), &spec, &opts).unwrap());
        assert!(
            (0..a.rows).all(|r| a.value(r, 7) == 0.0),
            "dead column zeroed"
        );
    }
    let narrow = Array2::<f32>::zeros((4, 95));
    assert!(matches!(
        perqc_quant::gptq_with(narrow.view(), &f, &spec, &opts),
        Err(QuantError::Shape(_))
    ));
}

/// Per-row asymmetric 4-bit fake quantization (a stand-in for the per-token activation
/// quantizer): the input a quantized linear reads.
fn quantize_rows(x: &Array2<f32>) -> Array2<f32> {
    let mut q = x.clone();
    for mut row in q.rows_mut() {
        let lo = row.iter().fold(0f32, |m, &v| m.min(v));
        let hi = row.iter().fold(0f32, |m, &v| m.max(v));
        let s = ((hi - lo) / 15.0).max(1e-8);
        let z = (-lo / s).round();
        row.mapv_inplace(|v| ((v / s).round() + z).clamp(0.0, 15.0) * s - z * s);
    }
    q
}

/// `A⁻¹` of a small symmetric positive definite matrix, by Gauss-Jordan elimination.
fn naive_inverse(a: &Array2<f64>) -> Array2<f64> {
    let n = a.nrows();
    let mut m = ndarray::concatenate![ndarray::Axis(1), a.clone(), Array2::eye(n)];
    for c in 0..n {
        let p = m[[c, c]];
        m.row_mut(c).mapv_inplace(|v| v / p);
        for r in 0..n {
            if r != c {
                let f = m[[r, c]];
                let pivot = m.row(c).to_owned();
                m.row_mut(r).zip_mut_with(&pivot, |v, &p| *v -= f * p);
            }
        }
    }
    m.slice(ndarray::s![.., n..]).to_owned()
}

/// The target for a quantized input is `W + W E (H + λ mean(diag H) I)⁻¹` (`E = (X − X̃)ᵀ
/// X̃`, `H = X̃ᵀ X̃`), `W` itself when `E = 0`, and GPTQ of it gives a lower
/// error against the float output `X Wᵀ` than GPTQ of `W`.
#[test]
fn input_error_target_fits_the_float_output() {
    let mut rng = Rng(51);
    // 200 rows: a full task of 144 rows and a partial one; 300 columns: two whole blocks
    // of 128 and a partial one in the triangular products.
    let (rows, cols) = (200, 300);
    let x = correlated_x(&mut rng, 4096, cols);
    let w = rng.matrix(rows, cols, |r| r.normal() * 0.05);
    let xq = quantize_rows(&x);
    let (x64, xq64) = (x.mapv(f64::from), xq.mapv(f64::from));
    let h = hessian(xq.view());
    let e64 = (&x64 - &xq64).t().dot(&xq64);
    let e = e64.mapv(|v| v as f32);
    let opts = GptqOptions::default();
    let f = perqc_quant::GptqFactor::new(h.view(), &opts).unwrap();

    let ridge = 0.05;
    let fit = InputErrorFit::new(h.view(), e.view(), ridge).unwrap();
    // 200 rows: a full task of rows and a partial one.
    let target = fit.target(w.view()).unwrap();
    let mean = (0..cols).map(|i| h[[i, i]]).sum::<f64>() / cols as f64;
    let damped = &h + &(Array2::<f64>::eye(cols) * (ridge * mean));
    let w64 = w.mapv(f64::from);
    let want = &w64 + &w64.dot(&e64).dot(&naive_inverse(&damped));
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    for (a, b) in target.iter().zip(&want) {
        assert!((f64::from(*a) - b).abs() <= 1e-4 * scale, "{a} vs {b}");
    }

    let zero = Array2::<f32>::zeros((cols, cols));
    let same = InputErrorFit::new(h.view(), zero.view(), ridge).unwrap();
    assert_eq!(same.target(w.view()).unwrap(), w);

    // ‖X Wᵀ − X̃ Ŵᵀ‖² for each rounding.
    let float_out = x64.dot(&w64.t());
    let err = |q: &QWeight| {
        let out = xq64.dot(&q.dequantize().mapv(f64::from).t());
        (&float_out - &out).mapv(|v| v * v).sum()
    };
    let spec = int(4, true, Granularity::Channel, ScaleSearch::Mse);
    let plain = err(&perqc_quant::gptq_with(w.view(), &f, &spec, &opts).unwrap());
    let aimed = err(&perqc_quant::gptq_with(target.view(), &f, &spec, &opts).unwrap());
    eprintln!("error against the float output: plain {plain:.4}, aimed {aimed:.4}");
    assert!(aimed < 0.9 * plain, "aimed {aimed} vs plain {plain}");

    let narrow = Array2::<f32>::zeros((4, cols - 1));
    assert!(matches!(
        fit.target(narrow.view()),
        Err(QuantError::Shape(_))
    ));
    let small = Array2::<f32>::zeros((cols - 1, cols - 1));
    assert!(matches!(
        InputErrorFit::new(h.view(), small.view(), ridge),
        Err(QuantError::Shape(_))
    ));
    assert!(matches!(
        InputErrorFit::new(h.view(), e.view(), 0.0),
        Err(QuantError::Options(_))
    ));
}
