//! The MSE scale search: never worse than Max per group, strictly better with outliers.

mod common;

use common::{Rng, fmt, group_sse, int};
use perqc_quant::{Format, Granularity, QuantSpec, ScaleSearch, quantize_rtn};

fn specs() -> Vec<QuantSpec> {
    vec![
        int(4, true, Granularity::Channel, ScaleSearch::Max),
        int(3, true, Granularity::Group(32), ScaleSearch::Max),
        int(4, false, Granularity::Group(16), ScaleSearch::Max),
        int(2, false, Granularity::Channel, ScaleSearch::Max),
        int(8, true, Granularity::Tensor, ScaleSearch::Max),
        fmt(Format::Fp4, Granularity::Group(32), ScaleSearch::Max),
        fmt(Format::MxFp4, Granularity::Group(32), ScaleSearch::Max),
        fmt(Format::MxInt8, Granularity::Group(32), ScaleSearch::Max),
    ]
}

#[test]
fn mse_never_worse_than_max_per_group() {
    let mut rng = Rng(10);
    // Heavy tails: Laplace, and a Student-like ratio of normals (clamped to stay finite).
    let lap = rng.matrix(48, 128, |r| r.laplace());
    let cauchy = rng.matrix(48, 128, |r| {
        (r.normal() / r.normal().abs().max(0.05)).clamp(-50.0, 50.0)
    });
    for w in [&lap, &cauchy] {
        for max in specs() {
            let mse = QuantSpec {
                scale: ScaleSearch::Mse,
                ..max
            };
            let qm = quantize_rtn(w.view(), &max).unwrap();
            let qs = quantize_rtn(w.view(), &mse).unwrap();
            let ng = qm.cols / qm.group;
            // Per-tensor: the group is the whole tensor.
            let groups: Vec<Vec<(usize, usize)>> = if max.granularity == Granularity::Tensor {
                vec![(0..qm.rows).map(|r| (r, 0)).collect()]
            } else {
                (0..qm.rows)
                    .flat_map(|r| (0..ng).map(move |g| vec![(r, g)]))
                    .collect()
            };
            for group in groups {
                let em: f64 = group
                    .iter()
                    .map(|&(r, g)| group_sse(w.view(), &qm, r, g))
                    .sum();
                let es: f64 = group
                    .iter()
                    .map(|&(r, g)| group_sse(w.view(), &qs, r, g))
                    .sum();
                // The search compares errors summed in f64 lanes; allow their rounding.
                assert!(
                    es <= em * (1.0 + 1e-12),
                    "{mse}: {:?}: mse {es} > max {em}",
                    group[0]
                );
            }
        }
    }
}

#[test]
fn mse_strictly_better_with_outliers() {
    let mut rng = Rng(11);
    let mut w = rng.matrix(32, 128, |r| r.normal());
    // One large outlier per row.
    for r in 0..32 {
        w[[r, (r * 37) % 128]] = if r % 2 == 0 { 12.0 } else { -12.0 };
    }
    // int8 per tensor has steps fine enough that clipping 32 outliers never pays; int4 does.
    let mut list = specs();
    list.retain(|s| s.bits != 8 || s.granularity != Granularity::Tensor);
    list.push(int(4, true, Granularity::Tensor, ScaleSearch::Max));
    for max in list {
        let mse = QuantSpec {
            scale: ScaleSearch::Mse,
            ..max
        };
        let qm = quantize_rtn(w.view(), &max).unwrap();
        let qs = quantize_rtn(w.view(), &mse).unwrap();
        let total = |q| {
            let ng = 128 / qm.group;
            (0..32)
                .flat_map(|r| (0..ng).map(move |g| (r, g)))
                .map(|(r, g)| group_sse(w.view(), q, r, g))
                .sum::<f64>()
        };
        let (em, es) = (total(&qm), total(&qs));
        eprintln!("{mse}: mse/max = {:.4}", es / em);
        // Strictly better everywhere; by 10% where one scale spans the whole outlier row.
        let whole_row = matches!(max.granularity, Granularity::Channel | Granularity::Tensor);
        let margin = if whole_row && max.format == Format::Int {
            0.9
        } else {
            1.0
        };
        assert!(es < em * margin, "{mse}: mse {es} vs max {em}");
    }
}
