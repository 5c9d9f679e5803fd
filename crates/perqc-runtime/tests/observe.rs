//! Calibration observers on a real graph: streamed statistics over several batches equal
//! the exact statistics of the stored activations, and the fixture's planted outlier
//! channels come out on top.

use ndarray::{Array2, Axis};
use perqc_ir::ValueDef;
use perqc_runtime::{ChannelObserver, Observer, RtTensor, RuntimeError, Session, StatsOptions};
use std::path::Path;

/// Test-only observer that keeps every activation whole (what the streaming one avoids).
struct Store {
    names: Vec<String>,
    seen: Vec<Vec<Array2<f64>>>,
}

impl Observer for Store {
    fn watched(&self) -> &[String] {
        &self.names
    }
    fn observe(&mut self, name: &str, value: &RtTensor) -> Result<(), RuntimeError> {
        let RtTensor::F32(a) = value else {
            panic!("{name} is not f32")
        };
        let c = *a.shape().last().unwrap();
        let x = a
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order((a.len() / c, c))
            .unwrap();
        let i = self.names.iter().position(|n| n == name).unwrap();
        self.seen[i].push(x.mapv(|v| v as f64));
        Ok(())
    }
}

fn ids(batch: usize, seq: usize, seed: u64) -> RtTensor {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let a = Array2::from_shape_fn((batch, seq), |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % 256) as i64
    });
    RtTensor::I64(a.into_dyn().into_shared())
}

#[test]
fn streamed_statistics_equal_exact_ones() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/llama_ts.onnx");
    let model = perqc_onnx::load(&path).unwrap().model;
    let g = &model.graph;
    // By structure: the embedding Gather's result (the residual stream entering layer 0)
    // and the input of every MatMul whose weight is [192, 64] (down_proj).
    let mut names = Vec::new();
    for (_, n) in g.nodes() {
        let weight_dims = |i: usize| {
            n.input(i)
                .and_then(|v| g.const_tensor(v))
                .map(|t| t.dims.clone())
        };
        if n.op_type == "Gather" && weight_dims(0) == Some(vec![256, 64]) {
            names.push(g.value(n.output(0).unwrap()).name.clone());
        }
        if n.op_type == "MatMul" && weight_dims(1) == Some(vec![192, 64]) {
            let v = n.input(0).unwrap();
            assert!(matches!(g.value(v).def(), ValueDef::Node { .. }));
            names.push(g.value(v).name.clone());
        }
    }
    assert_eq!(names.len(), 3, "{names:?}");
    let session = Session::new(&model).unwrap();
    let opts = StatsOptions {
        quantiles: true,
        block_moments: Some(16),
        gram: true,
        sample_every: 5,
        profile_every: 7,
        quant_error: None,
    };
    let mut streamed = ChannelObserver::new(names.clone(), opts);
    let mut stored = Store {
        names: names.clone(),
        seen: vec![Vec::new(); names.len()],
    };
    for seed in 0..4 {
        let x = ids(2, 9 + seed as usize, seed);
        let a = session
            .run_observed(&[("input_ids", x.clone())], &mut streamed)
            .unwrap();
        let b = session
            .run_observed(&[("input_ids", x)], &mut stored)
            .unwrap();
        assert_eq!(
            format!("{a:?}"),
            format!("{b:?}"),
            "observing changed the outputs"
        );
    }
    for (i, name) in names.iter().enumerate() {
        let s = streamed.stats(name).unwrap();
        let views: Vec<_> = stored.seen[i].iter().map(|a| a.view()).collect();
        let all = ndarray::concatenate(Axis(0), &views).unwrap();
        let n = all.nrows() as f64;
        assert_eq!(s.rows(), all.nrows() as u64);
        for c in 0..all.ncols() {
            let col = all.column(c);
            let mean_abs = col.iter().map(|v| v.abs()).sum::<f64>() / n;
            let max_abs = col.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let sum_sq: f64 = col.iter().map(|v| v * v).sum();
            assert!(
                (s.mean_abs()[c] - mean_abs).abs() <= 1e-12 * mean_abs.max(1e-30),
                "{name} c{c}"
            );
            assert_eq!(s.max_abs()[c] as f64, max_abs, "{name} c{c}");
            assert!(
                (s.sum_sq()[c] - sum_sq).abs() <= 1e-9 * sum_sq.max(1e-30),
                "{name} c{c}"
            );
            let mut sorted: Vec<f64> = col.iter().map(|v| v.abs()).collect();
            sorted.sort_by(f64::total_cmp);
            let exact = sorted[(0.9 * n).ceil() as usize - 1];
            let est = s.abs_quantile(0.9).unwrap()[c] as f64;
            assert!(
                est >= exact * 0.999 && est <= exact * 1.045,
                "{name} c{c}: p90 {est} vs {exact}"
            );
        }
        let gram = all.t().dot(&all);
        let scale = gram.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let got = s.gram().unwrap();
        assert!(
            got.iter()
                .zip(gram.iter())
                .all(|(a, e)| (a - e).abs() <= 1e-5 * scale),
            "{name}: Gram"
        );
        let m0 = s.block_moment(1).unwrap();
        let exact = gram.slice(ndarray::s![16..32, 16..32]);
        assert!(
            m0.iter()
                .zip(exact.iter())
                .all(|(a, e)| (a - e).abs() <= 1e-5 * scale),
            "{name}: block 1"
        );
        // Every fifth row kept whole, every seventh as its profile, across the runs.
        let kept: Vec<usize> = (0..all.nrows()).step_by(5).collect();
        assert_eq!(s.samples().nrows(), kept.len(), "{name}");
        for (i, &r) in kept.iter().enumerate() {
            assert_eq!(
                s.samples().row(i).mapv(f64::from),
                all.row(r),
                "{name} row {r}"
            );
        }
        let profiled: Vec<usize> = (0..all.nrows()).step_by(7).collect();
        assert_eq!(s.profiles().nrows(), profiled.len(), "{name}");
        for (i, &r) in profiled.iter().enumerate() {
            let peak = all.row(r).iter().fold(0f64, |m, v| m.max(v.abs()));
            for (&q, &v) in s.profiles().row(i).iter().zip(all.row(r)) {
                let want = (v.abs() / peak * 255.0).round();
                assert!((f64::from(q) - want).abs() <= 1.0, "{name} row {r}");
            }
        }
    }
    // The fixture plants outliers in residual channels 29, 47 and 5.
    let resid = streamed.stats(&names[0]).unwrap().mean_abs();
    let mut order: Vec<usize> = (0..resid.len()).collect();
    order.sort_by(|&a, &b| resid[b].total_cmp(&resid[a]));
    let mut top: Vec<usize> = order[..3].to_vec();
    top.sort();
    assert_eq!(
        top,
        vec![5, 29, 47],
        "top channels by mean |x|: {:?}",
        &order[..6]
    );
    // into_stats hands over every watched value, in watch order.
    let rows: Vec<u64> = names
        .iter()
        .map(|n| streamed.stats(n).unwrap().rows())
        .collect();
    let owned = streamed.into_stats();
    assert_eq!(
        owned.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        names
    );
    assert_eq!(
        owned
            .iter()
            .map(|(_, s)| s.as_ref().unwrap().rows())
            .collect::<Vec<_>>(),
        rows
    );
}
