//! Shared test helpers: a deterministic RNG, specs, Hessians and the GPTQ output error.
#![allow(dead_code)]

use ndarray::{Array2, ArrayView2};
use perqc_quant::{Format, Granularity, QWeight, QuantSpec, ScaleSearch};

/// SplitMix64 with Gaussian and Laplace draws.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
    pub fn laplace(&mut self) -> f64 {
        let e = -self.uniform().ln();
        if self.uniform() < 0.5 { -e } else { e }
    }
    pub fn matrix(&mut self, rows: usize, cols: usize, f: impl Fn(&mut Rng) -> f64) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |_| f(self) as f32)
    }
}

pub fn int(bits: u32, symmetric: bool, granularity: Granularity, scale: ScaleSearch) -> QuantSpec {
    QuantSpec {
        bits,
        signed: true,
        symmetric,
        granularity,
        format: Format::Int,
        scale,
    }
}

pub fn fmt(format: Format, granularity: Granularity, scale: ScaleSearch) -> QuantSpec {
    QuantSpec {
        bits: if format == Format::MxInt8 { 8 } else { 4 },
        signed: true,
        symmetric: true,
        granularity,
        format,
        scale,
    }
}

/// `H = X^T X` in f64.
pub fn hessian(x: ArrayView2<f32>) -> Array2<f64> {
    let x64 = x.mapv(|v| v as f64);
    x64.t().dot(&x64)
}

/// `||X W^T - X Q^T||_F^2 = sum_r d_r^T H d_r` with `d = W - Q`.
pub fn output_err(w: ArrayView2<f32>, q: &QWeight, h: ArrayView2<f64>) -> f64 {
    let d = (&w.mapv(|v| v as f64) - &q.dequantize().mapv(|v| v as f64)).to_owned();
    let dh = d.dot(&h);
    (&dh * &d).sum()
}

/// `X = Z A`: `rows` samples with correlated features.
pub fn correlated_x(rng: &mut Rng, rows: usize, cols: usize) -> Array2<f32> {
    let z = rng.matrix(rows, cols, |r| r.normal()).mapv(|v| v as f64);
    let a = rng
        .matrix(cols, cols, |r| r.normal())
        .mapv(|v| v as f64 / (cols as f64).sqrt());
    // Uneven feature scales, so act_order has something to order.
    let s = Array2::from_shape_fn((1, cols), |(_, j)| {
        0.2 + 2.0 * ((j * 7919) % cols) as f64 / cols as f64
    });
    (z.dot(&a) * &s).mapv(|v| v as f32)
}

/// Sum of squared errors of group `g` of row `r`, in f64, element order.
pub fn group_sse(w: ArrayView2<f32>, q: &QWeight, r: usize, g: usize) -> f64 {
    (g * q.group..(g + 1) * q.group)
        .map(|c| {
            let d = w[[r, c]] as f64 - q.value(r, c) as f64;
            d * d
        })
        .sum()
}
