//! Normalizations over trailing axes: LayerNormalization, and the RMS norm: ONNX
//! RMSNormalization (opset 23), ONNX Runtime's SimplifiedLayerNormalization and
//! com.microsoft::SkipSimplifiedLayerNormalization, and `ai.perqc::RMSNormalization`, the
//! canonical form of the exported chain
//! `Mul(Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2)), eps)))), scale)`.
//!
//! Per row `x` of the trailing axes `axis..`, in the chain's order of operations:
//! `r = 1 / sqrt(Σ x² / n + eps)`, `y = (x · r) · scale`. Only the summation order of
//! `Σ x²` may differ from the exported chain (a round-off difference): it is summed in vector
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

/// RMS-normalizes each `row`-long row of `xs`: `y = (x · r) · s` with
/// `r = 1 / sqrt(Σ x² / row + eps)`. Returns `y` (row-major, like `xs`) and `r` per row.
fn rms_rows(xs: &[f32], row: usize, s: &[f32], eps: f32, threads: usize) -> (Vec<f32>, Vec<f32>) {
    let n = xs.len();
    let rows = n.checked_div(row).unwrap_or(0);
    let mut out: Vec<f32> = output_vec(n);
    let mut inv = vec![0f32; rows];
    if row > 0 && n > 0 {
        let dst = &mut out.spare_capacity_mut()[..n];
        let one = |((src, dst), r_out): ((&[f32], &mut [std::mem::MaybeUninit<f32>]), &mut f32)| {
            let ms = sum_squares_slice(src) / row as f32;
            let r = 1.0 / (ms + eps).sqrt();
            *r_out = r;
            scale_row_into(src, r, s, dst);
        };
        if threads > 1 && n >= super::elementwise::PAR_MIN_ELEMS {
            xs.par_chunks(row * ROWS_PER_TASK)
                .zip(dst.par_chunks_mut(row * ROWS_PER_TASK))
                .zip(inv.par_chunks_mut(ROWS_PER_TASK))
                .for_each(|((src, dst), inv)| {
                    src.chunks(row)
                        .zip(dst.chunks_mut(row))
                        .zip(inv.iter_mut())
                        .for_each(one)
                });
        } else {
            xs.chunks(row)
                .zip(dst.chunks_mut(row))
                .zip(inv.iter_mut())
                .for_each(one);
        }
    }
    // Safety: every element was written above: `n` is a multiple of `row`, and `row` is 0
    // only when `n` is.
    unsafe { out.set_len(n) };
    (out, inv)
}

/// The shape of per-row statistics: `x`'s shape with the normalized axes `axis..` set to 1.
fn stat_shape(shape: &[usize], ax: usize) -> Vec<usize> {
    let mut s = shape[..ax].to_vec();
    s.resize(shape.len(), 1);
    s
}

/// RMS norm of `x` over axes `axis..` with `scale`: `(y, 1/rms per row)`.
fn rms_norm_of(
    x: &Arr<f32>,
    scale: &Arr<f32>,
    ax: usize,
    eps: f32,
    threads: usize,
) -> Result<(RtTensor, RtTensor), KernelError> {
    let norm_shape = &x.shape()[ax..];
    let row: usize = norm_shape.iter().product();
    let s = per_row(scale, norm_shape)?;
    let s = s.as_slice().expect("standard layout");
    let xs = x.as_standard_layout();
    let (y, inv) = rms_rows(
        xs.as_slice().expect("standard layout"),
        row,
        s,
        eps,
        threads,
    );
    Ok((
        RtTensor::f32(ArrayD::from_shape_vec(IxDyn(x.shape()), y)?),
        RtTensor::f32(ArrayD::from_shape_vec(
            IxDyn(&stat_shape(x.shape(), ax)),
            inv,
        )?),
    ))
}

/// ONNX RMSNormalization (opset 23) and `ai.perqc::RMSNormalization`: Y only.
pub fn rms_norm(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let (x, scale) = (req_f32(inputs, 0)?, req_f32(inputs, 1)?);
    let ax = axis(ctx.int("axis", -1), x.ndim())?;
    let (y, _) = rms_norm_of(x, scale, ax, ctx.float("epsilon", 1e-5), ctx.threads)?;
    Ok(vec![y])
}

/// ONNX Runtime's `SimplifiedLayerNormalization` (default domain): the same RMS norm, plus
/// `inv_std_var` = `1 / sqrt(Σ x² / n + eps)` per row (shape of `x` with axes `axis..` = 1;
/// computed in f32, whatever `stash_type` says).
pub fn simplified_layer_norm(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let (x, scale) = (req_f32(inputs, 0)?, req_f32(inputs, 1)?);
    let ax = axis(ctx.int("axis", -1), x.ndim())?;
    let (y, inv) = rms_norm_of(x, scale, ax, ctx.float("epsilon", 1e-5), ctx.threads)?;
    Ok(vec![y, inv])
}

/// `com.microsoft::SkipSimplifiedLayerNormalization`: `sum = (input + skip) + bias` (skip
/// broadcast to input's shape, bias `[hidden]`), then the RMS norm of `sum` over the last
/// axis times `gamma`. Results: output, mean (all 0: an RMS norm subtracts no mean),
/// inv_std_var (`[.., 1]`), input_skip_bias_sum.
pub fn skip_simplified_layer_norm(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let (x, skip, gamma) = (
        req_f32(inputs, 0)?,
        req_f32(inputs, 1)?,
        req_f32(inputs, 2)?,
    );
    if x.ndim() == 0 {
        return Err(KernelError::Invalid("input must have a hidden axis".into()));
    }
    let skip = skip
        .broadcast(IxDyn(x.shape()))
        .ok_or_else(|| KernelError::Broadcast {
            a: skip.shape().to_vec(),
            b: x.shape().to_vec(),
        })?;
    let mut sum = x.to_owned();
    Zip::from(&mut sum).and(&skip).for_each(|s, &k| *s += k);
    if opt(inputs, 3).is_some() {
        let bias = req_f32(inputs, 3)?;
        let hidden = &x.shape()[x.ndim() - 1..];
        if bias.shape() != hidden {
            return Err(KernelError::Invalid(format!(
                "bias has shape {:?}, expected [{}] (the hidden size)",
                bias.shape(),
                hidden[0]
            )));
        }
        let b = bias
            .broadcast(IxDyn(x.shape()))
            .expect("[hidden] broadcasts to x");
        Zip::from(&mut sum).and(&b).for_each(|s, &b| *s += b);
    }
    let sum = sum.into_shared();
    let ax = x.ndim() - 1;
    let (y, inv) = rms_norm_of(&sum, gamma, ax, ctx.float("epsilon", 1e-5), ctx.threads)?;
    let mean = RtTensor::f32(ArrayD::zeros(IxDyn(&stat_shape(x.shape(), ax))));
    Ok(vec![y, mean, inv, RtTensor::F32(sum)])
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
    let stats = stat_shape(x.shape(), ax);
    let mean = ArrayD::from_shape_vec(IxDyn(&stats), means)?;
    let inv = ArrayD::from_shape_vec(IxDyn(&stats), invs)?;
    Ok(vec![
        RtTensor::f32(y),
        RtTensor::f32(mean),
        RtTensor::f32(inv),
    ])
}
