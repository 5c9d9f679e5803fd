//! The quantization error of one linear layer on sampled calibration rows, under a chain of
//! channel transforms of its input: what smoothing's search minimizes, and how a recipe's
//! transforms are compared layer by layer.
//!
//! For rows `x` (`[R, K]`), the weight `W` (`[K, N]`, ONNX layout) and a chain of channel
//! maps `T = T_m ⋯ T_1`, the layer computes `x̃ = T x` per row and reads it with
//! `W̃ = T^-T W`, so `x̃ W̃ = x W` exactly; each map is applied by [`ChannelOp::apply`], the
//! primitive every fold uses. The error is
//!
//! `E = ‖x W − Q_a(x̃) Q_w(W̃)‖²_F`,
//!
//! with `Q_w` the weight quantizer (per output column of `W̃`, RTN) and `Q_a` the per-token
//! activation quantizer (none: weight-only). [`LayerError`] keeps `E` and the signal
//! `‖x W‖²_F`: SQNR = 10 log10(signal / E).

use crate::calibration::Calibration;
use crate::regions::Region;
use crate::transform::ChannelOp;
use ndarray::{Array2, ArrayView2};
use perqc_ir::{Graph, Tensor};
use perqc_ops::kernels::linalg::matmul_2d;
use perqc_ops::quant::{TokenQuant, fake_quantize_rows};
use perqc_quant::QuantSpec;

/// Output error and signal of one layer, sums of squares over the sampled rows.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LayerError {
    pub signal: f64,
    pub error: f64,
}

impl LayerError {
    /// `E / ‖x W‖²`.
    pub fn relative(&self) -> f64 {
        if self.signal > 0.0 {
            self.error / self.signal
        } else {
            0.0
        }
    }

    /// `10 log10(‖x W‖² / E)` (infinite without error).
    pub fn sqnr_db(&self) -> f64 {
        if self.error == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (self.signal / self.error).log10()
        }
    }
}

/// The quantizers a layer is probed with.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub weights: QuantSpec,
    pub act: Option<TokenQuant>,
}

/// Applies `op` along `axis` of a 2-d array (the mechanism's own primitive).
pub(crate) fn apply(a: &Array2<f32>, op: &ChannelOp, axis: usize) -> Result<Array2<f32>, String> {
    let dims = vec![a.nrows() as i64, a.ncols() as i64];
    let t = Tensor::from_f32(dims, a.as_standard_layout().as_slice().expect("standard"));
    let out = op.apply(&t, axis)?.to_f32().map_err(|e| e.to_string())?;
    Ok(Array2::from_shape_vec(a.dim(), out).expect("same shape"))
}

impl Probe {
    /// Integer weights of `wbits` (symmetric, per output channel, MSE scales) and
    /// activations of `abits` (asymmetric, per token; `None`: weight-only): the recipe's
    /// quantizers.
    pub fn w_int_a_int(wbits: u32, abits: Option<u32>) -> Probe {
        Probe {
            weights: perqc_quant::QuantSpec {
                bits: wbits,
                signed: true,
                symmetric: true,
                granularity: perqc_quant::Granularity::Channel,
                format: perqc_quant::Format::Int,
                scale: perqc_quant::ScaleSearch::Mse,
            },
            act: abits.map(|bits| TokenQuant {
                bits,
                symmetric: false,
                clip: 1.0,
            }),
        }
    }

    /// `x̃ = T x` (rows) and `W̃ = T^-T W` for the chain `ops` (applied first to last).
    pub fn transform(
        x: ArrayView2<f32>,
        w: ArrayView2<f32>,
        ops: &[ChannelOp],
    ) -> Result<(Array2<f32>, Array2<f32>), String> {
        let (mut xt, mut wt) = (x.to_owned(), w.to_owned());
        for op in ops {
            if op.dim() != xt.ncols() || op.dim() != wt.nrows() {
                return Err(format!(
                    "a map on {} channels for a layer reading {}",
                    op.dim(),
                    xt.ncols()
                ));
            }
            let inv = op.inverse_transpose().ok_or("the map is singular")?;
            xt = apply(&xt, op, 1)?;
            wt = apply(&wt, &inv, 0)?;
        }
        Ok((xt, wt))
    }

    /// `Q_a(x̃)`: each row quantized as a token (unchanged without an activation
    /// quantizer).
    pub fn quantize_rows(&self, xt: Array2<f32>) -> Array2<f32> {
        let Some(a) = self.act else { return xt };
        let mut xt = if xt.is_standard_layout() {
            xt
        } else {
            xt.as_standard_layout().into_owned()
        };
        let width = xt.ncols();
        fake_quantize_rows(xt.as_slice_mut().expect("standard"), width, a);
        xt
    }

    /// `Q_w(W̃)` for `W̃` in ONNX layout (`[K, N]`), returned as rows of output channels
    /// (`[N, K]`): the layout the weight quantizer works on, one scale per row.
    pub fn quantize_weight(&self, wt: ArrayView2<f32>) -> Result<Array2<f32>, String> {
        self.quantize_weight_rows(wt.t())
    }

    /// `Q_w(W̃)ᵀ` from `W̃ᵀ` (`[N, K]`, rows of output channels).
    pub fn quantize_weight_rows(&self, rows: ArrayView2<f32>) -> Result<Array2<f32>, String> {
        let rows = rows.as_standard_layout();
        Ok(perqc_quant::quantize_rtn(rows.view(), &self.weights)
            .map_err(|e| e.to_string())?
            .dequantize())
    }

    /// The layer's error on rows `x` with weight `w` after the chain `ops`; `reference` is
    /// `x W` when the caller has it (it does not depend on the chain).
    pub fn error(
        &self,
        x: ArrayView2<f32>,
        w: ArrayView2<f32>,
        ops: &[ChannelOp],
        reference: Option<&Array2<f32>>,
    ) -> Result<LayerError, String> {
        let threads = rayon::current_num_threads();
        let owned;
        let y = match reference {
            Some(y) => y,
            None => {
                owned = matmul_2d(x, w, threads);
                &owned
            }
        };
        let (xt, wt) = Self::transform(x, w, ops)?;
        let xq = self.quantize_rows(xt);
        let wq = self.quantize_weight(wt.view())?;
        let yq = matmul_2d(xq.view(), wq.t(), threads);
        let sq = |v: f32| f64::from(v) * f64::from(v);
        Ok(LayerError {
            signal: y.iter().map(|&v| sq(v)).sum(),
            error: y.iter().zip(yq.iter()).map(|(&a, &b)| sq(a - b)).sum(),
        })
    }
}

/// One sink of a region as the probe sees it: sampled input rows `[R, dim]` and the weight
/// `[dim, N]`, both in region channel order, and the float product.
#[derive(Debug)]
pub struct SinkSample {
    pub x: Array2<f32>,
    pub w: Array2<f32>,
    pub y: Array2<f32>,
}

/// The region's sinks with their sampled inputs, or why there are none (no samples, a sink
/// that reads the channels in another order or through a weight that is not 2-d).
pub fn sink_samples(
    graph: &Graph,
    region: &Region,
    calib: &Calibration,
) -> Result<Vec<SinkSample>, String> {
    let mut out = Vec::new();
    for e in &region.sinks {
        let Some((_, v)) = e.activation else { continue };
        let name = region.activation_name(v);
        let x = calib
            .get(name)
            .map(|s| s.samples().to_owned())
            .filter(|x| x.nrows() > 0)
            .ok_or_else(|| format!("no sampled rows of `{name}`"))?;
        if e.channels.iter().enumerate().any(|(i, &c)| c as usize != i) || x.ncols() != region.dim {
            return Err(format!(
                "`{name}` does not carry the channels in region order"
            ));
        }
        let t = graph
            .const_tensor(e.weight)
            .ok_or_else(|| format!("`{}` is not a constant", region.value_name(e.weight)))?;
        if t.dims.len() != 2 {
            return Err(format!("`{}` is not 2-d", region.value_name(e.weight)));
        }
        let (r, c) = (t.dims[0] as usize, t.dims[1] as usize);
        let w = Array2::from_shape_vec((r, c), t.to_f32().map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        let w = if e.axis == 0 {
            w
        } else {
            w.t().as_standard_layout().into_owned()
        };
        let y = matmul_2d(x.view(), w.view(), rayon::current_num_threads());
        out.push(SinkSample { x, w, y });
    }
    Ok(out)
}

impl Probe {
    /// The summed error over a region's sinks under the chain `ops`.
    pub fn region_error(
        &self,
        sinks: &[SinkSample],
        ops: &[ChannelOp],
    ) -> Result<LayerError, String> {
        let mut total = LayerError::default();
        for l in sinks {
            let e = self.error(l.x.view(), l.w.view(), ops, Some(&l.y))?;
            total.signal += e.signal;
            total.error += e.error;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use perqc_quant::{Format, Granularity, ScaleSearch};

    fn data(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        Array2::from_shape_fn((rows, cols), |(_, c)| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            // Channel 5 is an outlier.
            if c == 5 { 40.0 * u } else { u }
        })
    }

    fn int4() -> Probe {
        Probe {
            weights: QuantSpec {
                bits: 4,
                signed: true,
                symmetric: true,
                granularity: Granularity::Channel,
                format: Format::Int,
                scale: ScaleSearch::Max,
            },
            act: Some(TokenQuant {
                bits: 4,
                symmetric: false,
                clip: 1.0,
            }),
        }
    }

    /// The transformed pair computes the same product; a Hadamard spreads the outlier
    /// channel and lowers the W4A4 error; an 8-bit probe errs far less than a 4-bit one.
    #[test]
    fn transforms_are_exact_and_rotation_helps() {
        let (x, w) = (data(64, 32, 1), data(32, 16, 2));
        let h = ChannelOp::hadamard(32, 32, None).unwrap();
        let d = ChannelOp::Diagonal((0..32).map(|i| 1.0 + i as f64 / 8.0).collect());
        let p = ChannelOp::Permutation((0..32).rev().collect());
        let (xt, wt) = Probe::transform(x.view(), w.view(), &[d.clone(), p, h.clone()]).unwrap();
        let (y, yt) = (x.dot(&w), xt.dot(&wt));
        let err = y
            .iter()
            .zip(&yt)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err < 1e-4 * y.iter().fold(0f32, |m, v| m.max(v.abs())),
            "{err}"
        );

        let probe = int4();
        let plain = probe.error(x.view(), w.view(), &[], None).unwrap();
        let rotated = probe.error(x.view(), w.view(), &[h], Some(&y)).unwrap();
        assert!(plain.signal > 0.0 && (plain.signal - rotated.signal).abs() < 1e-9);
        assert!(
            rotated.relative() < plain.relative(),
            "{rotated:?} vs {plain:?}"
        );
        let mut eight = probe;
        eight.weights.bits = 8;
        eight.act = Some(TokenQuant {
            bits: 8,
            symmetric: false,
            clip: 1.0,
        });
        let fine = eight.error(x.view(), w.view(), &[], None).unwrap();
        assert!(fine.sqnr_db() > plain.sqnr_db() + 15.0);
        assert!(
            probe
                .error(
                    x.view(),
                    w.view(),
                    &[ChannelOp::hadamard(16, 16, None).unwrap()],
                    None
                )
                .is_err()
        );
    }
}
