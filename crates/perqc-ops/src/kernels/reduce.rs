//! Reductions (ReduceMean/Sum/Max/Min, axes as attribute or input) and Softmax.

use super::layout::{filled_units, standard, to_standard};
use super::vmath::{max_slice, min_slice, softmax_row_into, sum_slice};
use crate::kernel::{Arr, KernelCtx, KernelError, RtTensor, axis, opt, req, req_f32, req_ints};
use ndarray::{ArrayD, Axis, IxDyn};

type In<'a, 'b> = &'a [Option<&'b RtTensor>];
type Out = Result<Vec<RtTensor>, KernelError>;

/// The axes to reduce, sorted and deduplicated. `attr_form`: axes come from the attribute
/// (older opsets), else from optional input 1. Empty axes mean all axes unless
/// `noop_with_empty_axes` is set (then `None`: the op is the identity).
fn reduce_axes(
    ctx: &KernelCtx<'_>,
    inputs: In,
    rank: usize,
    attr_form: bool,
) -> Result<Option<Vec<usize>>, KernelError> {
    let given: Vec<i64> = if attr_form {
        ctx.ints("axes").map(<[i64]>::to_vec).unwrap_or_default()
    } else if opt(inputs, 1).is_some() {
        req_ints(inputs, 1)?
    } else {
        Vec::new()
    };
    if given.is_empty() {
        if !attr_form && ctx.int("noop_with_empty_axes", 0) != 0 {
            return Ok(None);
        }
        return Ok(Some((0..rank).collect()));
    }
    let mut ax = given
        .iter()
        .map(|&a| axis(a, rank))
        .collect::<Result<Vec<_>, _>>()?;
    ax.sort_unstable();
    ax.dedup();
    Ok(Some(ax))
}

#[derive(Clone, Copy)]
enum Kind {
    Sum,
    Mean,
    Max,
    Min,
}

/// Reduces f32 (and i64 for Sum/Max) over the axes; `keepdims` (default 1) keeps them as 1.
fn reduce(ctx: &KernelCtx<'_>, inputs: In, kind: Kind, attr_until: i64) -> Out {
    let x = req(inputs, 0)?;
    let attr_form = ctx.opset < attr_until;
    let Some(axes) = reduce_axes(ctx, inputs, x.shape().len(), attr_form)? else {
        return Ok(vec![x.clone()]);
    };
    let keep = ctx.int("keepdims", 1) != 0;
    if let (RtTensor::F32(a), Some(k)) = (x, trailing_block(&axes, x.shape().len())) {
        return Ok(vec![RtTensor::f32(reduce_rows(a, k, keep, kind)?)]);
    }
    macro_rules! run {
        ($a:expr, $zero:expr, $fold:expr, $finish:expr) => {{
            let mut r: ArrayD<_> = $a.to_owned();
            let mut count = 1usize;
            for &ax in axes.iter().rev() {
                count *= r.shape()[ax];
                if r.shape()[ax] == 0 && matches!(kind, Kind::Max | Kind::Min) {
                    return Err(KernelError::Invalid(
                        "ReduceMax/Min over an empty axis".into(),
                    ));
                }
                r = r.fold_axis(Axis(ax), $zero, $fold);
                if keep {
                    r = r.insert_axis(Axis(ax));
                }
            }
            $finish(r, count)
        }};
    }
    Ok(vec![match (x, kind) {
        (RtTensor::F32(a), Kind::Sum) => RtTensor::f32(run!(a, 0.0f32, |&s, &v| s + v, |r, _| r)),
        (RtTensor::F32(a), Kind::Mean) => RtTensor::f32(run!(
            a,
            0.0f32,
            |&s, &v| s + v,
            |r: ArrayD<f32>, n: usize| r.mapv_into(|s| s / n as f32)
        )),
        (RtTensor::F32(a), Kind::Max) => RtTensor::f32(run!(
            a,
            f32::NEG_INFINITY,
            |&s: &f32, &v: &f32| if v.is_nan() || v > s { v } else { s },
            |r, _| r
        )),
        (RtTensor::F32(a), Kind::Min) => RtTensor::f32(run!(
            a,
            f32::INFINITY,
            |&s: &f32, &v: &f32| if v.is_nan() || v < s { v } else { s },
            |r, _| r
        )),
        (RtTensor::I64(a), Kind::Sum) => RtTensor::i64(run!(
            a,
            0i64,
            |&s: &i64, &v: &i64| s.wrapping_add(v),
            |r, _| r
        )),
        (RtTensor::I64(a), Kind::Max) => {
            RtTensor::i64(run!(a, i64::MIN, |&s: &i64, &v: &i64| s.max(v), |r, _| r))
        }
        (RtTensor::I64(a), Kind::Min) => {
            RtTensor::i64(run!(a, i64::MAX, |&s: &i64, &v: &i64| s.min(v), |r, _| r))
        }
        (other, _) => {
            return Err(KernelError::InputType {
                index: 0,
                dtype: other.dtype(),
            });
        }
    }])
}

/// `Some(k)` when `axes` (sorted, distinct) are exactly the trailing axes `k..rank`.
fn trailing_block(axes: &[usize], rank: usize) -> Option<usize> {
    let k = rank.checked_sub(axes.len())?;
    let trailing = !axes.is_empty() && axes.iter().enumerate().all(|(i, &a)| a == k + i);
    trailing.then_some(k)
}

/// Reduces `a` over its trailing axes `k..`: in row-major order these are rows of
/// `row = prod(shape[k..])` consecutive elements, one result each. Sums run in vector
/// lanes ([`sum_slice`]), so they may differ from a sequential fold by f32 rounding.
fn reduce_rows(a: &Arr<f32>, k: usize, keep: bool, kind: Kind) -> Result<ArrayD<f32>, KernelError> {
    let row: usize = a.shape()[k..].iter().product();
    if row == 0 && matches!(kind, Kind::Max | Kind::Min) {
        return Err(KernelError::Invalid(
            "ReduceMax/Min over an empty axis".into(),
        ));
    }
    let mut shape = a.shape()[..k].to_vec();
    if keep {
        shape.resize(a.ndim(), 1);
    }
    let src = standard(a);
    let src = src.as_slice().expect("standard layout");
    let one = |r: &[f32]| match kind {
        Kind::Sum => sum_slice(r),
        Kind::Mean => sum_slice(r) / row as f32,
        Kind::Max => max_slice(r),
        Kind::Min => min_slice(r),
    };
    Ok(filled_units(&shape, 1, row, |r0, dst| {
        for (i, d) in dst.iter_mut().enumerate() {
            let at = (r0 + i) * row;
            d.write(one(&src[at..at + row]));
        }
    }))
}

pub fn reduce_sum(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    reduce(ctx, inputs, Kind::Sum, 13)
}

pub fn reduce_mean(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    reduce(ctx, inputs, Kind::Mean, 18)
}

pub fn reduce_max(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    reduce(ctx, inputs, Kind::Max, 18)
}

pub fn reduce_min(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    reduce(ctx, inputs, Kind::Min, 18)
}

/// `softmax(x)_i = exp(x_i - max x) / sum_j exp(x_j - max x)` over each `row`-element row
/// of the row-major `src`, into a fresh array of `shape`; rows are split over the threads
/// in large blocks.
fn softmax_rows(src: &[f32], row: usize, shape: &[usize]) -> ArrayD<f32> {
    // An empty row means an empty tensor; `max(1)` only keeps the chunk size valid.
    let row = row.max(1);
    filled_units(shape, row, 1, |e0, dst| {
        let src = &src[e0..e0 + dst.len()];
        for (s, d) in src.chunks_exact(row).zip(dst.chunks_exact_mut(row)) {
            softmax_row_into(s, d);
        }
    })
}

/// Softmax. From opset 13 along one axis (default -1); before, over the flattened
/// `[prod(shape[..axis]), prod(shape[axis..])]` matrix (default axis 1).
pub fn softmax(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req_f32(inputs, 0)?;
    let rank = x.ndim();
    if rank == 0 {
        return Ok(vec![RtTensor::f32(x.map(|_| 1.0))]);
    }
    let (ax, flat) = if ctx.opset < 13 {
        (axis(ctx.int("axis", 1), rank)?, true)
    } else {
        (axis(ctx.int("axis", -1), rank)?, false)
    };
    if flat || ax == rank - 1 {
        let row: usize = x.shape()[ax..].iter().product();
        let src = standard(x);
        let src = src.as_slice().expect("standard layout");
        return Ok(vec![RtTensor::f32(softmax_rows(src, row, x.shape()))]);
    }
    // Move the axis last, softmax contiguous rows, move it back.
    let mut perm: Vec<usize> = (0..rank).filter(|&i| i != ax).collect();
    perm.push(ax);
    let moved = to_standard(&x.view().permuted_axes(IxDyn(&perm)));
    let src = moved.as_slice().expect("standard layout");
    let out = softmax_rows(src, x.shape()[ax], moved.shape());
    let mut inv = vec![0; rank];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    let out = out.permuted_axes(IxDyn(&inv));
    Ok(vec![RtTensor::f32(to_standard(&out.view()))])
}
