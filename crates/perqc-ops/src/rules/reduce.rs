//! Reductions (axes from an attribute before the opset that made them an input), ArgMax /
//! ArgMin, and the axis-checked softmaxes.

use super::movement::{AxesArg, axes_input};
use super::{RuleResult, axes, axis, like_input0, unknown_dims};
use crate::constprop::{Arith, Num, arith};
use crate::facts::Facts;
use crate::infer::InferCtx;
use perqc_ir::{DType, Dim};

fn axes_attr(ctx: &InferCtx<'_>) -> AxesArg {
    match ctx.node.attr_ints("axes") {
        Some(a) => AxesArg::Known(a.to_vec()),
        None => AxesArg::Absent,
    }
}

/// Reduces `x` over `ax`; `fold` computes the value of a reduced rank-1 tensor.
fn reduce(ctx: &InferCtx<'_>, ax: AxesArg, fold: Option<Arith>) -> RuleResult {
    let x = ctx.req(0)?;
    let keep = ctx.attr_int("keepdims", 1) != 0;
    let noop = ctx.attr_int("noop_with_empty_axes", 0) != 0;
    let Some(s) = &x.shape else {
        return Ok(vec![Facts::new(x.dtype, None)]);
    };
    let list = match ax {
        AxesArg::Absent if noop => return Ok(vec![x.clone()]),
        AxesArg::Known(a) if a.is_empty() && noop => return Ok(vec![x.clone()]),
        AxesArg::Absent => (0..s.len()).collect(),
        AxesArg::Known(a) if a.is_empty() => (0..s.len()).collect(),
        AxesArg::Known(a) => axes(&a, s.len())?,
        AxesArg::Unknown(n) => {
            // Each dim is either kept or becomes 1 (keepdims) / is dropped.
            let out = if keep {
                Some(
                    s.iter()
                        .map(|d| {
                            if *d == Dim::Known(1) {
                                d.clone()
                            } else {
                                Dim::Unknown
                            }
                        })
                        .collect(),
                )
            } else {
                n.map(|n| unknown_dims(s.len().saturating_sub(n)))
            };
            return Ok(vec![Facts::new(x.dtype, out)]);
        }
    };
    let mut out = Vec::with_capacity(s.len());
    for (i, d) in s.iter().enumerate() {
        if !list.contains(&i) {
            out.push(d.clone());
        } else if keep {
            out.push(Dim::Known(1));
        }
    }
    let value = match (fold, &x.value) {
        (Some(op), Some(v)) if s.len() == 1 && !v.is_empty() => {
            let num = Num::of(x.dtype);
            Some(vec![
                v[1..]
                    .iter()
                    .fold(v[0].clone(), |acc, e| arith(op, num, &acc, e)),
            ])
        }
        _ => None,
    };
    Ok(vec![super::elementwise::with_value(
        x.dtype,
        Some(out),
        value,
    )])
}

/// ReduceMean, ReduceL2, ... with an `axes` attribute.
pub fn reduce_attr(ctx: &InferCtx<'_>) -> RuleResult {
    reduce(ctx, axes_attr(ctx), None)
}
/// ReduceMean, ReduceL2, ... with an `axes` input.
pub fn reduce_input(ctx: &InferCtx<'_>) -> RuleResult {
    reduce(ctx, axes_input(ctx, 1), None)
}
pub fn reduce_sum_attr(ctx: &InferCtx<'_>) -> RuleResult {
    reduce(ctx, axes_attr(ctx), Some(Arith::Add))
}
pub fn reduce_sum_input(ctx: &InferCtx<'_>) -> RuleResult {
    reduce(ctx, axes_input(ctx, 1), Some(Arith::Add))
}
pub fn reduce_prod_attr(ctx: &InferCtx<'_>) -> RuleResult {
    reduce(ctx, axes_attr(ctx), Some(Arith::Mul))
}
pub fn reduce_prod_input(ctx: &InferCtx<'_>) -> RuleResult {
    reduce(ctx, axes_input(ctx, 1), Some(Arith::Mul))
}
pub fn reduce_max_attr(ctx: &InferCtx<'_>) -> RuleResult {
    reduce(ctx, axes_attr(ctx), Some(Arith::Max))
}
pub fn reduce_max_input(ctx: &InferCtx<'_>) -> RuleResult {
    reduce(ctx, axes_input(ctx, 1), Some(Arith::Max))
}
pub fn reduce_min_attr(ctx: &InferCtx<'_>) -> RuleResult {
    reduce(ctx, axes_attr(ctx), Some(Arith::Min))
}
pub fn reduce_min_input(ctx: &InferCtx<'_>) -> RuleResult {
    reduce(ctx, axes_input(ctx, 1), Some(Arith::Min))
}

/// ArgMax / ArgMin: one axis reduced, i64 indices.
pub fn arg_reduce(ctx: &InferCtx<'_>) -> RuleResult {
    let a = ctx.attr_int("axis", 0);
    let mut out = reduce(ctx, AxesArg::Known(vec![a]), None)?;
    out[0].dtype = Some(DType::I64);
    out[0].value = None;
    Ok(out)
}

/// Softmax, LogSoftmax, Hardmax: same shape; the axis must exist.
pub fn softmax(ctx: &InferCtx<'_>) -> RuleResult {
    let x = ctx.req(0)?;
    if let Some(r) = x.rank() {
        let default = if ctx.opset >= 13 { -1 } else { 1 };
        let a = ctx.attr_int("axis", default);
        if r > 0 {
            axis(a, r)?;
        }
    }
    Ok(vec![like_input0(ctx)?])
}
