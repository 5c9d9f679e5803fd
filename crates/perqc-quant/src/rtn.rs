//! Round-to-nearest quantization.

use std::borrow::Cow;

use ndarray::ArrayView2;
use rayon::prelude::*;

use crate::error::QuantError;
use crate::grid::Grid;
use crate::params;
use crate::qweight::QWeight;
use crate::spec::QuantSpec;

/// Checks a weight's shape and values and returns it row-major (borrowed when it already
/// is).
pub(crate) fn contiguous<'a>(w: ArrayView2<'a, f32>) -> Result<Cow<'a, [f32]>, QuantError> {
    let (rows, cols) = w.dim();
    if rows == 0 || cols == 0 {
        return Err(QuantError::Shape(format!(
            "weight is {rows} x {cols}; both dims must be >= 1"
        )));
    }
    let data: Cow<'a, [f32]> = match w.to_slice() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(w.iter().copied().collect()),
    };
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::NonFiniteWeight {
            row: i / cols,
            col: i % cols,
            value: data[i],
        });
    }
    Ok(data)
}

/// Quantizes `w` (`rows = output channels x cols = input dim`) to the nearest code of each
/// element's group (see [`crate::params`] for the scales; `spec.scale == Mse` searches
/// them). Rows run in parallel; the result does not depend on the thread count.
pub fn quantize_rtn(w: ArrayView2<'_, f32>, spec: &QuantSpec) -> Result<QWeight, QuantError> {
    spec.for_weights()?;
    let (rows, cols) = w.dim();
    let data = contiguous(w)?;
    let p = params::compute(&data, rows, cols, spec)?;
    let grid = Grid::of(spec);
    let mut codes = vec![0i16; rows * cols];
    codes
        .par_chunks_mut(cols)
        .zip(data.par_chunks(cols))
        .enumerate()
        .for_each(|(r, (codes, row))| {
            for (g, (c, ws)) in codes
                .chunks_mut(p.group)
                .zip(row.chunks(p.group))
                .enumerate()
            {
                grid.quantize_into(ws, p.get(r, g), c);
            }
        });
    Ok(QWeight {
        rows,
        cols,
        group: p.group,
        codes,
        scales: p.scales,
        zero_points: p.zps,
        spec: *spec,
    })
}
