//! The quantized weight.

use ndarray::Array2;
use rayon::prelude::*;

use crate::grid::{Grid, GroupParams};
use crate::spec::QuantSpec;

/// A quantized weight, laid out rows = output channels, cols = input (contracted) dim.
///
/// Invariants (upheld by the quantizers): `group >= 1` divides `cols`; `codes` is
/// row-major `rows x cols` with every code in `spec.code_range()`; `scales` is row-major
/// `rows x (cols / group)`, finite and positive, all equal for `Tensor` granularity (MX:
/// powers of two, the multiplier of a code: `2^e` for MXFP4, `2^(e - 6)` for MXINT8);
/// `zero_points` has the shape of `scales` and is present exactly for asymmetric `Int`.
///
/// The value of an element is, in f32: `(code - zp) * scale` for `Int` (integer difference
/// first, as ONNX `DequantizeLinear`; `zp = 0` when symmetric), `code * scale` for MXINT8,
/// `E2M1(code) * scale` for FP4 and MXFP4 ([`crate::FP4_E2M1_VALUES`]).
#[derive(Clone, Debug, PartialEq)]
pub struct QWeight {
    pub rows: usize,
    pub cols: usize,
    /// Columns per scale.
    pub group: usize,
    pub codes: Vec<i16>,
    pub scales: Vec<f32>,
    pub zero_points: Option<Vec<i16>>,
    pub spec: QuantSpec,
}

impl QWeight {
    fn params(&self, r: usize, g: usize) -> GroupParams {
        let i = r * (self.cols / self.group) + g;
        GroupParams {
            scale: self.scales[i],
            zp: self.zero_points.as_ref().map_or(0, |z| z[i] as i32),
        }
    }

    /// The value of element `(r, c)` (see the type doc). Panics when out of range.
    pub fn value(&self, r: usize, c: usize) -> f32 {
        assert!(r < self.rows && c < self.cols, "({r}, {c}) out of range");
        let p = self.params(r, c / self.group);
        Grid::of(&self.spec).value(self.codes[r * self.cols + c], p)
    }

    /// All values, `rows x cols` (rows in parallel).
    pub fn dequantize(&self) -> Array2<f32> {
        let grid = Grid::of(&self.spec);
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            out.par_chunks_mut(self.cols)
                .enumerate()
                .for_each(|(r, dst)| {
                    let codes = &self.codes[r * self.cols..][..self.cols];
                    for (g, (d, c)) in dst
                        .chunks_mut(self.group)
                        .zip(codes.chunks(self.group))
                        .enumerate()
                    {
                        let p = self.params(r, g);
                        for (d, &c) in d.iter_mut().zip(c) {
                            *d = grid.value(c, p);
                        }
                    }
                });
        }
        Array2::from_shape_vec((self.rows, self.cols), out).expect("rows x cols elements")
    }
}
