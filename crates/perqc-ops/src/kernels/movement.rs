//! Data movement. Transpose, Slice, Split, Squeeze, Unsqueeze, Identity and Reshape /
//! Flatten of row-major data are views of the shared input (no copy); Concat, Expand and
//! Reshape of strided data copy.

use super::layout::{SendPtr, Walk, filled_units, standard, to_standard};
use crate::kernel::{
    Arr, KernelCtx, KernelError, RtTensor, axis, broadcast_shape, opt, req, req_ints,
};
use crate::{rt_map, rt_with};
use ndarray::{Axis, IxDyn, Slice};

type In<'a, 'b> = &'a [Option<&'b RtTensor>];
type Out = Result<Vec<RtTensor>, KernelError>;

pub fn identity(_: &KernelCtx<'_>, inputs: In) -> Out {
    Ok(vec![req(inputs, 0)?.clone()])
}

/// `a` reshaped to `shape` (same element count), copying only if `a` is not row-major.
fn reshape_arr<T: Copy + Send + Sync + 'static>(
    a: &Arr<T>,
    shape: &[usize],
) -> Result<Arr<T>, KernelError> {
    Ok(standard(a).into_shape_with_order(IxDyn(shape))?)
}

fn reshape_to(t: &RtTensor, shape: &[usize]) -> Result<RtTensor, KernelError> {
    Ok(rt_map!(t, a => reshape_arr(a, shape)?))
}

/// Reshape: `0` copies the input dim (unless `allowzero`), one `-1` is inferred.
pub fn reshape(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req(inputs, 0)?;
    let spec: Vec<i64> = if ctx.opset < 5 {
        ctx.ints("shape").map(<[i64]>::to_vec).unwrap_or_default()
    } else {
        req_ints(inputs, 1)?
    };
    let allow_zero = ctx.int("allowzero", 0) != 0;
    let mut shape = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &d) in spec.iter().enumerate() {
        shape.push(match d {
            -1 if infer.is_none() => {
                infer = Some(i);
                1
            }
            0 if !allow_zero => *x.shape().get(i).ok_or_else(|| {
                KernelError::Invalid(format!("Reshape: 0 at {i} beyond input rank"))
            })?,
            d if d >= 0 => d as usize,
            _ => return Err(KernelError::Invalid(format!("Reshape: bad shape {spec:?}"))),
        });
    }
    let total = x.len();
    if let Some(i) = infer {
        let rest: usize = shape.iter().product();
        if rest == 0 || total % rest != 0 {
            return Err(KernelError::Invalid(format!(
                "Reshape: cannot infer -1 in {spec:?} for {:?}",
                x.shape()
            )));
        }
        shape[i] = total / rest;
    }
    if shape.iter().product::<usize>() != total {
        return Err(KernelError::Invalid(format!(
            "Reshape: {:?} does not fit {spec:?}",
            x.shape()
        )));
    }
    Ok(vec![reshape_to(x, &shape)?])
}

/// Flatten to `[prod(shape[..axis]), prod(shape[axis..])]` (axis default 1, may equal rank).
pub fn flatten(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req(inputs, 0)?;
    let r = x.shape().len() as i64;
    let a = ctx.int("axis", 1);
    let a = if a < 0 { a + r } else { a };
    if !(0..=r).contains(&a) {
        return Err(KernelError::Invalid(format!(
            "Flatten axis {a} for rank {r}"
        )));
    }
    let (outer, inner) = x.shape().split_at(a as usize);
    let shape = [outer.iter().product(), inner.iter().product()];
    Ok(vec![reshape_to(x, &shape)?])
}

/// Transpose by `perm` (default: reversed axes). A view: only strides change.
pub fn transpose(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req(inputs, 0)?;
    let rank = x.shape().len();
    let perm: Vec<usize> = match ctx.ints("perm") {
        Some(p) => p.iter().map(|&a| axis(a, rank)).collect::<Result<_, _>>()?,
        None => (0..rank).rev().collect(),
    };
    let mut seen = vec![false; rank];
    if perm.len() != rank || perm.iter().any(|&p| std::mem::replace(&mut seen[p], true)) {
        return Err(KernelError::Invalid(format!(
            "Transpose: bad perm {perm:?} for rank {rank}"
        )));
    }
    Ok(vec![rt_map!(x, a => a.clone().permuted_axes(IxDyn(&perm)))])
}

/// The axes of Squeeze/Unsqueeze: attribute before opset 13, input from 13.
fn axes_arg(ctx: &KernelCtx<'_>, inputs: In) -> Result<Option<Vec<i64>>, KernelError> {
    if ctx.opset < 13 {
        Ok(ctx.ints("axes").map(<[i64]>::to_vec))
    } else if opt(inputs, 1).is_some() {
        Ok(Some(req_ints(inputs, 1)?))
    } else {
        Ok(None)
    }
}

/// Squeeze the given axes (each must be 1), or every axis of size 1.
pub fn squeeze(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req(inputs, 0)?;
    let rank = x.shape().len();
    let mut axes: Vec<usize> = match axes_arg(ctx, inputs)? {
        Some(a) => a.iter().map(|&v| axis(v, rank)).collect::<Result<_, _>>()?,
        None => (0..rank).filter(|&i| x.shape()[i] == 1).collect(),
    };
    axes.sort_unstable();
    axes.dedup();
    if let Some(&bad) = axes.iter().find(|&&a| x.shape()[a] != 1) {
        return Err(KernelError::Invalid(format!(
            "Squeeze: axis {bad} of {:?} is not 1",
            x.shape()
        )));
    }
    Ok(vec![rt_map!(x, a => {
        let mut a = a.clone();
        for &ax in axes.iter().rev() {
            a = a.index_axis_move(Axis(ax), 0);
        }
        a
    })])
}

/// Unsqueeze: insert size-1 axes at the given positions of the output.
pub fn unsqueeze(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req(inputs, 0)?;
    let axes_in = axes_arg(ctx, inputs)?
        .ok_or_else(|| KernelError::Invalid("Unsqueeze needs axes".into()))?;
    let out_rank = x.shape().len() + axes_in.len();
    let mut axes: Vec<usize> = axes_in
        .iter()
        .map(|&v| axis(v, out_rank))
        .collect::<Result<_, _>>()?;
    axes.sort_unstable();
    if axes.windows(2).any(|w| w[0] == w[1]) {
        return Err(KernelError::Invalid(format!(
            "Unsqueeze: repeated axes {axes_in:?}"
        )));
    }
    Ok(vec![rt_map!(x, a => {
        let mut a = a.clone();
        for &ax in &axes {
            a = a.insert_axis(Axis(ax));
        }
        a
    })])
}

/// Concat along `axis` (all inputs the same type; equal dims elsewhere).
pub fn concat(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let first = req(inputs, 0)?;
    let ax = axis(ctx.int("axis", 1), first.shape().len().max(1))?;
    let parts: Vec<&RtTensor> = inputs.iter().flatten().copied().collect();
    Ok(vec![concatenate(&parts, ax)?])
}

/// Joins `parts` (same type, equal dims but along `ax`) along axis `ax`.
pub fn concatenate(parts: &[&RtTensor], ax: usize) -> Result<RtTensor, KernelError> {
    let first = parts.first().ok_or(KernelError::MissingInput(0))?;
    macro_rules! cat {
        ($v:ident) => {{
            let mut views = Vec::with_capacity(parts.len());
            for (i, p) in parts.iter().enumerate() {
                match p {
                    RtTensor::$v(a) => views.push(a.view()),
                    other => {
                        return Err(KernelError::InputType {
                            index: i,
                            dtype: other.dtype(),
                        });
                    }
                }
            }
            RtTensor::$v(cat_rows(ax, &views)?.into_shared())
        }};
    }
    Ok(match first {
        RtTensor::F32(_) => cat!(F32),
        RtTensor::I64(_) => cat!(I64),
        RtTensor::I32(_) => cat!(I32),
        RtTensor::Bool(_) => cat!(Bool),
        RtTensor::U8(_) => cat!(U8),
        RtTensor::I8(_) => cat!(I8),
        RtTensor::U4(_) => cat!(U4),
        RtTensor::I4(_) => cat!(I4),
        RtTensor::F16(_) => cat!(F16),
        RtTensor::BF16(_) => cat!(BF16),
    })
}

/// Concatenation along `ax` as block copies: the result is `outer = prod(shape[..ax])` rows,
/// each the parts' rows (`prod(part.shape[ax..])` elements, in row-major order) side by
/// side. Strided parts are read in runs (see [`Walk`]), without a row-major copy first.
fn cat_rows<T: Copy + Send + Sync + 'static>(
    ax: usize,
    views: &[ndarray::ArrayViewD<'_, T>],
) -> Result<ndarray::ArrayD<T>, KernelError> {
    let first = views
        .first()
        .ok_or_else(|| KernelError::Invalid("Concat of nothing".into()))?;
    let mut shape = first.shape().to_vec();
    if ax >= shape.len() {
        // Rank 0: let ndarray report it.
        return Ok(ndarray::concatenate(Axis(ax), views)?);
    }
    shape[ax] = 0;
    for v in views {
        let ok = v.ndim() == shape.len()
            && v.shape()
                .iter()
                .zip(first.shape())
                .enumerate()
                .all(|(i, (a, b))| i == ax || a == b);
        if !ok {
            return Err(KernelError::Invalid(format!(
                "Concat inputs {:?} and {:?} differ off axis {ax}",
                first.shape(),
                v.shape()
            )));
        }
        shape[ax] += v.shape()[ax];
    }
    // (walk, base pointer, elements per output row) of each part.
    let parts: Vec<(Walk<1>, SendPtr<T>, usize)> = views
        .iter()
        .map(|v| {
            let walk = Walk::new(v.shape(), [v.strides()]);
            (walk, SendPtr(v.as_ptr()), v.shape()[ax..].iter().product())
        })
        .collect();
    let row: usize = shape[ax..].iter().product();
    Ok(filled_units(&shape, row, 1, |e0, dst| {
        let o0 = e0 / row.max(1);
        for (o, out_row) in dst.chunks_exact_mut(row.max(1)).enumerate() {
            let mut at = 0;
            for (walk, ptr, inner) in &parts {
                let seg = &mut out_row[at..at + inner];
                walk.pieces((o0 + o) * inner, *inner, |p, [off], take| {
                    // Safety: the walk's offsets index the part's elements.
                    unsafe {
                        super::layout::gather(
                            ptr.get().offset(off),
                            walk.step[0],
                            &mut seg[p..p + take],
                        )
                    }
                });
                at += inner;
            }
        }
    }))
}

/// ONNX slice bounds for one axis of size `dim` as an ndarray `Slice`.
///
/// Positive step: start and end clamp to `[0, dim]`, elements `start, start+step, .. < end`.
/// Negative step: start clamps to `[0, dim-1]`, end to `[-1, dim-1]`; elements
/// `start, start+step, .. > end`, i.e. the range `end+1 ..= start` walked backwards (which
/// is what ndarray's negative step does: it starts from the end of the range).
fn onnx_slice(start: i64, end: i64, step: i64, dim: usize) -> Result<Slice, KernelError> {
    if step == 0 {
        return Err(KernelError::Invalid("Slice step 0".into()));
    }
    let d = dim as i64;
    let norm = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
    let (s, e) = (norm(start), norm(end));
    Ok(if step > 0 {
        let s = s.clamp(0, d);
        let e = e.clamp(0, d).max(s);
        Slice::new(s as isize, Some(e as isize), step as isize)
    } else {
        let s = s.clamp(0, d - 1);
        let e = e.clamp(-1, d - 1);
        let lo = (e + 1).min(s + 1).max(0);
        Slice::new(lo as isize, Some((s + 1).max(lo) as isize), step as isize)
    })
}

/// Slice (attributes before opset 10; starts/ends/axes/steps inputs from 10). A view.
pub fn slice(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req(inputs, 0)?;
    let rank = x.shape().len();
    let (starts, ends, axes, steps) = if ctx.opset < 10 {
        let get = |n| ctx.ints(n).map(<[i64]>::to_vec);
        (
            get("starts").unwrap_or_default(),
            get("ends").unwrap_or_default(),
            get("axes"),
            None,
        )
    } else {
        let o = |i| -> Result<Option<Vec<i64>>, KernelError> {
            opt(inputs, i).map(|_| req_ints(inputs, i)).transpose()
        };
        (req_ints(inputs, 1)?, req_ints(inputs, 2)?, o(3)?, o(4)?)
    };
    let axes: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&v| axis(v, rank)).collect::<Result<_, _>>()?,
        None => (0..starts.len()).collect(),
    };
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(KernelError::Invalid(
            "Slice: starts/ends/axes/steps lengths differ".into(),
        ));
    }
    let mut slices = Vec::with_capacity(axes.len());
    for i in 0..axes.len() {
        slices.push((
            axes[i],
            onnx_slice(starts[i], ends[i], steps[i], x.shape()[axes[i]])?,
        ));
    }
    Ok(vec![rt_map!(x, a => {
        let mut a = a.clone();
        for &(ax, s) in &slices {
            a.slice_axis_inplace(Axis(ax), s);
        }
        a
    })])
}

/// Split along `axis` into the given sizes (attribute before 13, input from 13), or into
/// equal parts (`num_outputs` from 18, else the node's result count; the last may be
/// smaller from 18). Views.
pub fn split(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req(inputs, 0)?;
    let rank = x.shape().len();
    let ax = axis(ctx.int("axis", 0), rank)?;
    let dim = x.shape()[ax];
    let sizes: Vec<usize> = {
        let given = if ctx.opset < 13 {
            ctx.ints("split").map(<[i64]>::to_vec)
        } else {
            opt(inputs, 1).map(|_| req_ints(inputs, 1)).transpose()?
        };
        match given {
            Some(s) => s
                .iter()
                .map(|&v| {
                    usize::try_from(v).map_err(|_| KernelError::Invalid("negative split".into()))
                })
                .collect::<Result<_, _>>()?,
            None => {
                let n = ctx
                    .node
                    .attr_int("num_outputs")
                    .map_or(ctx.node.outputs().len(), |v| v.max(1) as usize);
                let part = dim.div_ceil(n.max(1));
                (0..n)
                    .map(|i| part.min(dim.saturating_sub(i * part)))
                    .collect()
            }
        }
    };
    if sizes.iter().sum::<usize>() != dim {
        return Err(KernelError::Invalid(format!(
            "Split sizes {sizes:?} do not sum to {dim}"
        )));
    }
    let mut out = Vec::with_capacity(sizes.len());
    let mut at = 0;
    for s in sizes {
        let sl = Slice::from(at as isize..(at + s) as isize);
        out.push(rt_map!(x, a => {
            let mut a = a.clone();
            a.slice_axis_inplace(Axis(ax), sl);
            a
        }));
        at += s;
    }
    Ok(out)
}

/// Expand: broadcast the input against `shape` (either may supply a dim). Materialized.
pub fn expand(_: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req(inputs, 0)?;
    let want: Vec<usize> = req_ints(inputs, 1)?
        .iter()
        .map(|&v| {
            usize::try_from(v).map_err(|_| KernelError::Invalid("negative Expand dim".into()))
        })
        .collect::<Result<_, _>>()?;
    let shape = broadcast_shape(x.shape(), &want)?;
    if shape == x.shape() {
        return Ok(vec![x.clone()]);
    }
    let bad = || KernelError::Broadcast {
        a: x.shape().to_vec(),
        b: shape.clone(),
    };
    Ok(vec![
        rt_map!(x, a => to_standard(&a.broadcast(IxDyn(&shape)).ok_or_else(bad)?).into_shared()),
    ])
}

/// The shape of `x` (as i64), sliced by `start`/`end` (opset 15).
pub fn shape(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req(inputs, 0)?;
    let dims: Vec<i64> = rt_with!(x, a => a.shape().iter().map(|&d| d as i64).collect());
    let r = dims.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let s = clamp(ctx.int("start", 0));
    let e = clamp(ctx.int("end", r));
    Ok(vec![RtTensor::i64_vec(dims[s..e.max(s)].to_vec())])
}
