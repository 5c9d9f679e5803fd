//! Gather and GatherND (any element type; i64 or i32 indices, negative indices count from
//! the end).

use crate::kernel::{Arr, KernelCtx, KernelError, RtTensor, axis, req, req_ints};
use crate::rt_map;
use ndarray::{ArrayD, IxDyn};

type In<'a, 'b> = &'a [Option<&'b RtTensor>];
type Out = Result<Vec<RtTensor>, KernelError>;

fn norm_index(i: i64, dim: usize) -> Result<usize, KernelError> {
    let d = dim as i64;
    let v = if i < 0 { i + d } else { i };
    if (0..d).contains(&v) {
        Ok(v as usize)
    } else {
        Err(KernelError::Invalid(format!(
            "index {i} out of range for dim {dim}"
        )))
    }
}

/// `out[o, j.., i] = data[o, idx[j..], i]` with `data` viewed as `[outer, dim, inner]`.
fn gather_arr<T: Clone>(
    a: &Arr<T>,
    ax: usize,
    idx: &[usize],
    idx_shape: &[usize],
) -> Result<Arr<T>, KernelError> {
    let shape = a.shape();
    let outer: usize = shape[..ax].iter().product();
    let dim = shape[ax];
    let inner: usize = shape[ax + 1..].iter().product();
    let std = a.as_standard_layout();
    let src = std.as_slice().expect("standard layout");
    let mut out = Vec::with_capacity(outer * idx.len() * inner);
    for o in 0..outer {
        for &i in idx {
            let base = (o * dim + i) * inner;
            out.extend_from_slice(&src[base..base + inner]);
        }
    }
    let mut oshape = shape[..ax].to_vec();
    oshape.extend_from_slice(idx_shape);
    oshape.extend_from_slice(&shape[ax + 1..]);
    Ok(ArrayD::from_shape_vec(IxDyn(&oshape), out)?.into_shared())
}

pub fn gather(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req(inputs, 0)?;
    let rank = x.shape().len();
    let ax = axis(ctx.int("axis", 0), rank)?;
    let dim = x.shape()[ax];
    let ind = req(inputs, 1)?;
    let idx: Vec<usize> = req_ints(inputs, 1)?
        .iter()
        .map(|&i| norm_index(i, dim))
        .collect::<Result<_, _>>()?;
    let ishape = ind.shape().to_vec();
    Ok(vec![rt_map!(x, a => gather_arr(a, ax, &idx, &ishape)?)])
}

/// GatherND with `batch_dims = b`: for indices `[B.., M.., q]` (q = last dim), each index
/// tuple addresses `data[B.., i_1..i_q, rest..]`; the result is `[B.., M.., rest..]`.
pub fn gather_nd(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req(inputs, 0)?;
    let ind = req(inputs, 1)?;
    let idx = req_ints(inputs, 1)?;
    let b = usize::try_from(ctx.int("batch_dims", 0))
        .map_err(|_| KernelError::Invalid("negative batch_dims".into()))?;
    let ds = x.shape().to_vec();
    let is = ind.shape().to_vec();
    let q = *is
        .last()
        .ok_or_else(|| KernelError::Invalid("GatherND indices are a scalar".into()))?;
    if b >= is.len() || b + q > ds.len() || ds[..b] != is[..b] {
        return Err(KernelError::Invalid(format!(
            "GatherND: data {ds:?}, indices {is:?}, batch_dims {b}"
        )));
    }
    let nbatch: usize = ds[..b].iter().product();
    let per_batch: usize = is[b..is.len() - 1].iter().product();
    let rest: usize = ds[b + q..].iter().product();
    let batch_stride: usize = ds[b..].iter().product();
    // Offsets (in elements of the row-major data) of each gathered block.
    let mut offs = Vec::with_capacity(nbatch * per_batch);
    for bi in 0..nbatch {
        for m in 0..per_batch {
            let t = &idx[(bi * per_batch + m) * q..][..q];
            let mut off = 0usize;
            for (j, &v) in t.iter().enumerate() {
                off = off * ds[b + j] + norm_index(v, ds[b + j])?;
            }
            offs.push(bi * batch_stride + off * rest);
        }
    }
    let mut oshape = is[..is.len() - 1].to_vec();
    oshape.extend_from_slice(&ds[b + q..]);
    Ok(vec![rt_map!(x, a => {
        let std = a.as_standard_layout();
        let src = std.as_slice().expect("standard layout");
        let mut out = Vec::with_capacity(offs.len() * rest);
        for &o in &offs {
            out.extend_from_slice(&src[o..o + rest]);
        }
        ArrayD::from_shape_vec(IxDyn(&oshape), out)?.into_shared()
    })])
}
