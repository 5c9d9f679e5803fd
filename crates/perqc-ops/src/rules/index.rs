//! Shape queries and indexing: Shape, Size, Gather, GatherElements, GatherND, and the
//! scatters (which keep the data's facts).

use super::elementwise::with_value;
use super::{RuleResult, axis, unknown_dims};
use crate::facts::{Facts, fmt_shape, known_dims, product_dim};
use crate::infer::{InferCtx, ShapeError};
use perqc_ir::{DType, Dim, Shape};

use Dim::{Known, Unknown};

/// Shape (with `start` / `end` from opset 15): an i64 vector whose value is the dims.
pub fn shape(ctx: &InferCtx<'_>) -> RuleResult {
    let x = ctx.req(0)?;
    let Some(s) = &x.shape else {
        return Ok(vec![Facts::new(Some(DType::I64), Some(vec![Unknown]))]);
    };
    let r = s.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let (start, end) = (
        clamp(ctx.attr_int("start", 0)),
        clamp(ctx.attr_int("end", r)),
    );
    let dims: Shape = if start < end {
        s[start..end].to_vec()
    } else {
        Vec::new()
    };
    Ok(vec![Facts::with_value(
        Some(DType::I64),
        vec![Known(dims.len() as i64)],
        dims,
    )])
}

/// Size: an i64 scalar, the element count.
pub fn size(ctx: &InferCtx<'_>) -> RuleResult {
    let x = ctx.req(0)?;
    let n = x.shape.as_deref().map_or(Unknown, product_dim);
    Ok(vec![Facts::with_value(
        Some(DType::I64),
        Vec::new(),
        vec![n],
    )])
}

/// Gather: `data[..axis] ++ indices.shape ++ data[axis+1..]`; values gathered when known.
pub fn gather(ctx: &InferCtx<'_>) -> RuleResult {
    let (data, idx) = (ctx.req(0)?, ctx.req(1)?);
    let (Some(ds), Some(is)) = (&data.shape, &idx.shape) else {
        return Ok(vec![Facts::new(data.dtype, None)]);
    };
    let ax = axis(ctx.attr_int("axis", 0), ds.len())?;
    let out: Shape = ds[..ax]
        .iter()
        .chain(is)
        .chain(&ds[ax + 1..])
        .cloned()
        .collect();
    // Indices known: check their range, and gather the values if the data has them.
    let mut value = None;
    if let Some(ix) = idx.known_ints() {
        if let Known(n) = ds[ax]
            && let Some(&bad) = ix.iter().find(|&&i| i < -n || i >= n)
        {
            return Err(ShapeError::Invalid(format!(
                "index {bad} is out of range for axis {ax} of {}",
                fmt_shape(ds)
            )));
        }
        value = data.value.as_ref().and_then(|v| {
            let d = known_dims(ds)?;
            let outer: usize = d[..ax].iter().product();
            let inner: usize = d[ax + 1..].iter().product();
            let n = d[ax] as i64;
            let mut out_v = Vec::with_capacity(outer * ix.len() * inner);
            for o in 0..outer {
                for &i in &ix {
                    let i = if i < 0 { i + n } else { i } as usize;
                    let base = (o * d[ax] + i) * inner;
                    out_v.extend_from_slice(&v[base..base + inner]);
                }
            }
            Some(out_v)
        });
    }
    Ok(vec![with_value(data.dtype, Some(out), value)])
}

/// GatherElements: the shape of the indices, the type of the data.
pub fn gather_elements(ctx: &InferCtx<'_>) -> RuleResult {
    let (data, idx) = (ctx.req(0)?, ctx.req(1)?);
    if let (Some(a), Some(b)) = (data.rank(), idx.rank())
        && a != b
    {
        return Err(ShapeError::Invalid(format!(
            "data has rank {a}, indices rank {b}; they must be equal"
        )));
    }
    Ok(vec![Facts::new(data.dtype, idx.shape.clone())])
}

/// GatherND: `indices.shape[..-1] ++ data.shape[batch_dims + indices.shape[-1]..]`.
pub fn gather_nd(ctx: &InferCtx<'_>) -> RuleResult {
    let (data, idx) = (ctx.req(0)?, ctx.req(1)?);
    let b = ctx.attr_int("batch_dims", 0).max(0) as usize;
    let (Some(ds), Some(is)) = (&data.shape, &idx.shape) else {
        return Ok(vec![Facts::new(data.dtype, None)]);
    };
    let Some((last, lead)) = is.split_last() else {
        return Err(ShapeError::Rank {
            what: "indices",
            expected: ">= 1".into(),
            got: 0,
        });
    };
    let Some(k) = last.known() else {
        return Ok(vec![Facts::new(data.dtype, None)]);
    };
    let k = k as usize;
    if b + k > ds.len() {
        return Err(ShapeError::Invalid(format!(
            "indices {} address {k} dims after {b} batch dims, but data {} has rank {}",
            fmt_shape(is),
            fmt_shape(ds),
            ds.len()
        )));
    }
    let out: Shape = lead.iter().chain(&ds[b + k..]).cloned().collect();
    Ok(vec![Facts::new(data.dtype, Some(out))])
}

/// NonZero: `[rank, ?]` i64.
pub fn non_zero(ctx: &InferCtx<'_>) -> RuleResult {
    let x = ctx.req(0)?;
    let rank = x.rank().map_or(Unknown, |r| Known(r as i64));
    Ok(vec![Facts::new(
        Some(DType::I64),
        Some(vec![rank, Unknown]),
    )])
}

/// OneHot(indices, depth, values): the indices' shape with `depth` inserted at `axis`.
pub fn one_hot(ctx: &InferCtx<'_>) -> RuleResult {
    let (idx, depth, values) = (ctx.req(0)?, ctx.req(1)?, ctx.req(2)?);
    let Some(s) = &idx.shape else {
        return Ok(vec![Facts::new(values.dtype, None)]);
    };
    let ax = axis(ctx.attr_int("axis", -1), s.len() + 1)?;
    let d = depth
        .value
        .as_ref()
        .and_then(|v| v.first().cloned())
        .unwrap_or(Unknown);
    let mut out = s.clone();
    out.insert(ax, d);
    Ok(vec![Facts::new(values.dtype, Some(out))])
}

/// TopK: the input with the axis dim set to K; values and i64 indices.
pub fn top_k(ctx: &InferCtx<'_>) -> RuleResult {
    let x = ctx.req(0)?;
    let k = match ctx.input(1) {
        Some(f) => f
            .value
            .as_ref()
            .and_then(|v| v.first().cloned())
            .unwrap_or(Unknown),
        None => ctx.node.attr_int("k").map_or(Unknown, Known),
    };
    let shape = match &x.shape {
        Some(s) => {
            let ax = axis(ctx.attr_int("axis", -1), s.len())?;
            let mut o = s.clone();
            o[ax] = k;
            Some(o)
        }
        None => None,
    };
    Ok(vec![
        Facts::new(x.dtype, shape.clone()),
        Facts::new(Some(DType::I64), shape),
    ])
}

/// Rank-preserving with every dim unknown (Resize-like ops whose sizes come from data).
pub fn same_rank(ctx: &InferCtx<'_>) -> RuleResult {
    let x = ctx.req(0)?;
    Ok(vec![Facts::new(x.dtype, x.rank().map(unknown_dims))])
}
