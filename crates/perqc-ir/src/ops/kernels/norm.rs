//! RMSNormalization (ONNX opset 23), also the runtime's fused form of the exported chain
//! `Mul(Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2)), eps)))), scale)`.
//!
//! Per row `x` of the trailing axes `axis..`, in the chain's order of operations:
//! `r = 1 / sqrt(Σ x² / n + eps)`, `y = (x · r) · scale`. Only the summation order of
//! `Σ x²` may differ from the unfused ops (a round-off difference): it is summed in vector
//! lanes (`vmath::sum_squares_slice`).

use super::vmath::{scale_row_into, sum_squares_slice};
use crate::ops::kernel::{KernelCtx, KernelError, RtTensor, axis, output_vec, req_f32};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

type In<'a, 'b> = &'a [Option<&'b RtTensor>];
type Out = Result<Vec<RtTensor>, KernelError>;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 16;

pub fn rms_norm(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let (x, scale) = (req_f32(inputs, 0)?, req_f32(inputs, 1)?);
    let ax = axis(ctx.int("axis", -1), x.ndim())?;
    let eps = ctx.float("epsilon", 1e-5);
    let norm_shape = &x.shape()[ax..];
    let row: usize = norm_shape.iter().product();
    let s = scale
        .broadcast(IxDyn(norm_shape))
        .ok_or_else(|| KernelError::Broadcast {
            a: scale.shape().to_vec(),
            b: norm_shape.to_vec(),
        })?
        .as_standard_layout()
        .into_owned();
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
