//! Normalizations over trailing axes: LayerNormalization, and RMSNormalization (ONNX
//! opset 23), the latter also the runtime's fused form of the exported chain
//! `Mul(Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2)), eps)))), scale)`.
//!
//! Per row `x` of the trailing axes `axis..`, in the chain's order of operations:
//! `r = 1 / sqrt(Σ x² / n + eps)`, `y = (x · r) · scale`. Only the summation order of
//! `Σ x²` may differ from the unfused ops (a round-off difference): it is summed in vector
//! lanes (`vmath::sum_squares_slice`).

use super::vmath::{scale_row_into, sum_squares_slice};
use crate::kernel::{Arr, KernelCtx, KernelError, RtTensor, axis, opt, output_vec, req_f32};
use ndarray::{ArrayD, IxDyn, Zip};
use rayon::prelude::*;

type In<'a, 'b> = &'a [Option<&'b RtTensor>];
type Out = Result<Vec<RtTensor>, KernelError>;

/// A per-element parameter (scale, bias) broadcast to the normalized trailing shape, as a
/// row-major array.
fn per_row(p: &Arr<f32>, norm_shape: &[usize]) -> Result<ArrayD<f32>, KernelError> {
    Ok(p.broadcast(IxDyn(norm_shape))
        .ok_or_else(|| KernelError::Broadcast {
            a: p.shape().to_vec(),
            b: norm_shape.to_vec(),
        })?
        .as_standard_layout()
        .into_owned())
}

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 16;

pub fn rms_norm(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let (x, scale) = (req_f32(inputs, 0)?, req_f32(inputs, 1)?);
    let ax = axis(ctx.int("axis", -1), x.ndim())?;
    let eps = ctx.float("epsilon", 1e-5);
    let norm_shape = &x.shape()[ax..];
    let row: usize = norm_shape.iter().product();
    let s = per_row(scale, norm_shape)?;
    let s = s.as_slice().expect("standard layout");
    let xs = x.as_standard_layout();
    let xs = xs.as_slice().expect("standard layout");
    let n = xs.len();
    let mut out: Vec<f32> = output_vec(n);
    if row > 0 && n > 0 {
        let dst = &mut out.spare_capacity_mut()[..n];
        let one = |(src, dst): (&[f32], &mut [std::mem::MaybeUninit<f32>])| {
            let ms = sum_squares_slice(src) / row as f32;
            let r = 1.0 / (ms + eps).sqrt();
            scale_row_into(src, r, s, dst);
        };
        if ctx.threads > 1 && n >= super::elementwise::PAR_MIN_ELEMS {
            xs.par_chunks(row * ROWS_PER_TASK)
                .zip(dst.par_chunks_mut(row * ROWS_PER_TASK))
                .for_each(|(src, dst)| src.chunks(row).zip(dst.chunks_mut(row)).for_each(one));
        } else {
            xs.chunks(row).zip(dst.chunks_mut(row)).for_each(one);
        }
    }
    // Safety: every element was written above: `n` is a multiple of `row`, and `row` is 0
    // only when `n` is.
    unsafe { out.set_len(n) };
    Ok(vec![RtTensor::f32(ArrayD::from_shape_vec(
        IxDyn(x.shape()),
        out,
    )?)])
}

/// LayerNormalization over axes `axis..`: `y = (x - mean) / sqrt(var + eps) * scale + bias`
/// (population variance). Also returns Mean and InvStdDev (shape `[d0..d_{axis-1}, 1...]`).
pub fn layer_norm(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req_f32(inputs, 0)?;
    let scale = req_f32(inputs, 1)?;
    let bias: Option<&Arr<f32>> = match opt(inputs, 2) {
        Some(b) => Some(req_f32(inputs, 2).map_err(|_| KernelError::InputType {
            index: 2,
            dtype: b.dtype(),
        })?),
        None => None,
    };
    let rank = x.ndim();
    let ax = axis(ctx.int("axis", -1), rank)?;
    let eps = ctx.float("epsilon", 1e-5);
    let row: usize = x.shape()[ax..].iter().product();
    let rows: usize = x.shape()[..ax].iter().product();
    let norm_shape = &x.shape()[ax..];
    let sv = per_row(scale, norm_shape)?;
    let bv = bias.map(|b| per_row(b, norm_shape)).transpose()?;
    let s = sv.as_slice().expect("standard layout");
    let bsl = bv.as_ref().map(|b| b.as_slice().expect("standard layout"));
    let mut y = x.as_standard_layout().into_owned();
    let mut means = vec![0f32; rows];
    let mut invs = vec![0f32; rows];
    if row > 0 {
        let data = y.as_slice_mut().expect("standard layout");
        for (r, chunk) in data.chunks_exact_mut(row).enumerate() {
            let mean = chunk.iter().sum::<f32>() / row as f32;
            let var = chunk.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / row as f32;
            let inv = 1.0 / (var + eps).sqrt();
            means[r] = mean;
            invs[r] = inv;
            match bsl {
                Some(b) => Zip::from(&mut *chunk).and(s).and(b).for_each(|v, &g, &b| {
                    *v = (*v - mean) * inv * g + b;
                }),
                None => Zip::from(&mut *chunk)
                    .and(s)
                    .for_each(|v, &g| *v = (*v - mean) * inv * g),
            }
        }
    }
    let mut stat_shape = x.shape()[..ax].to_vec();
    stat_shape.resize(rank, 1);
    let mean = ArrayD::from_shape_vec(IxDyn(&stat_shape), means)?;
    let inv = ArrayD::from_shape_vec(IxDyn(&stat_shape), invs)?;
    Ok(vec![
        RtTensor::f32(y),
        RtTensor::f32(mean),
        RtTensor::f32(inv),
    ])
}
