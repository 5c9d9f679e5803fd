//! Elementwise ops: unary (shape-preserving), numpy-broadcast binary and variadic ops,
//! comparisons and logic (bool results), Where. Values propagate where exact.

use super::{RuleResult, like_input0, same_dtype};
use crate::constprop::{
    self as cp, Arith, Cmp, Logic, Num, Unary, arith, compare, logic, zip_broadcast,
};
use crate::facts::{Facts, broadcast_shapes, fmt_shape};
use crate::infer::{InferCtx, ShapeError};
use perqc_ir::{DType, Dim, Shape};

/// Same type and shape as input 0; values dropped (Sqrt, Exp, Softmax, Relu, ...).
pub fn unary(ctx: &InferCtx<'_>) -> RuleResult {
    Ok(vec![like_input0(ctx)?])
}

/// Same shape as input 0, bool elements (IsNaN, IsInf).
pub fn unary_bool(ctx: &InferCtx<'_>) -> RuleResult {
    let x = ctx.req(0)?;
    Ok(vec![Facts::new(Some(DType::Bool), x.shape.clone())])
}

fn unary_value(ctx: &InferCtx<'_>, op: Unary) -> RuleResult {
    let x = ctx.req(0)?;
    let value = x
        .value
        .as_ref()
        .map(|v| v.iter().map(|d| cp::unary(op, d)).collect::<Vec<_>>());
    Ok(vec![with_value(x.dtype, x.shape.clone(), value)])
}

pub fn neg(ctx: &InferCtx<'_>) -> RuleResult {
    unary_value(ctx, Unary::Neg)
}
pub fn abs(ctx: &InferCtx<'_>) -> RuleResult {
    unary_value(ctx, Unary::Abs)
}
pub fn not(ctx: &InferCtx<'_>) -> RuleResult {
    unary_value(ctx, Unary::Not)
}
pub fn sign(ctx: &InferCtx<'_>) -> RuleResult {
    unary_value(ctx, Unary::Sign)
}
/// Floor, Ceil, Round: the identity on the integer values tracked.
pub fn integral(ctx: &InferCtx<'_>) -> RuleResult {
    unary_value(ctx, Unary::Integral)
}

pub(crate) fn with_value(
    dtype: Option<DType>,
    shape: Option<Shape>,
    value: Option<Vec<Dim>>,
) -> Facts {
    match (shape, value) {
        (Some(s), Some(v)) => Facts::with_value(dtype, s, v),
        (s, _) => Facts::new(dtype, s),
    }
}

/// Broadcast shape of all present inputs (`None` if a rank is unknown).
pub(crate) fn broadcast_all(inputs: &[&Facts]) -> Result<Option<Shape>, ShapeError> {
    let mut acc: Shape = Vec::new();
    for f in inputs {
        let Some(s) = &f.shape else { return Ok(None) };
        acc = broadcast_shapes(&acc, s).ok_or_else(|| ShapeError::Broadcast {
            a: fmt_shape(&acc),
            b: fmt_shape(s),
        })?;
    }
    Ok(Some(acc))
}

/// Broadcast inputs with element function `f`, output dtype `dtype`.
fn broadcast_with(
    ctx: &InferCtx<'_>,
    dtype: Option<DType>,
    f: impl Fn(&[&Dim]) -> Dim,
) -> RuleResult {
    let inputs = ctx.present_inputs();
    let shape = broadcast_all(&inputs)?;
    let value = shape.as_ref().and_then(|s| zip_broadcast(&inputs, s, f));
    Ok(vec![with_value(dtype, shape, value)])
}

fn binary_arith(ctx: &InferCtx<'_>, op: Arith) -> RuleResult {
    ctx.req(0)?;
    ctx.req(1)?;
    let dtype = same_dtype(ctx.present_inputs())?;
    let num = Num::of(dtype);
    broadcast_with(ctx, dtype, |a| arith(op, num, a[0], a[1]))
}

pub fn add(ctx: &InferCtx<'_>) -> RuleResult {
    binary_arith(ctx, Arith::Add)
}
pub fn sub(ctx: &InferCtx<'_>) -> RuleResult {
    binary_arith(ctx, Arith::Sub)
}
pub fn mul(ctx: &InferCtx<'_>) -> RuleResult {
    binary_arith(ctx, Arith::Mul)
}
pub fn div(ctx: &InferCtx<'_>) -> RuleResult {
    binary_arith(ctx, Arith::Div)
}
pub fn modulo(ctx: &InferCtx<'_>) -> RuleResult {
    if ctx.attr_int("fmod", 0) != 0 {
        let dtype = same_dtype(ctx.present_inputs())?;
        return broadcast_with(ctx, dtype, |_| Dim::Unknown);
    }
    binary_arith(ctx, Arith::Mod)
}

/// Pow: the base's type (the exponent may differ).
pub fn pow(ctx: &InferCtx<'_>) -> RuleResult {
    let base = ctx.req(0)?;
    ctx.req(1)?;
    let num = Num::of(base.dtype);
    broadcast_with(ctx, base.dtype, |a| arith(Arith::Pow, num, a[0], a[1]))
}

/// Broadcast binary op of one type, no value (BitShift, Bitwise*, PRelu-like).
pub fn broadcast_same(ctx: &InferCtx<'_>) -> RuleResult {
    ctx.req(0)?;
    let dtype = same_dtype(ctx.present_inputs())?;
    broadcast_with(ctx, dtype, |_| Dim::Unknown)
}

fn variadic(ctx: &InferCtx<'_>, op: Option<Arith>) -> RuleResult {
    ctx.req(0)?;
    let dtype = same_dtype(ctx.present_inputs())?;
    let num = Num::of(dtype);
    broadcast_with(ctx, dtype, |a| match op {
        Some(op) => a[1..]
            .iter()
            .fold(a[0].clone(), |acc, x| arith(op, num, &acc, x)),
        None => Dim::Unknown,
    })
}

pub fn max(ctx: &InferCtx<'_>) -> RuleResult {
    variadic(ctx, Some(Arith::Max))
}
pub fn min(ctx: &InferCtx<'_>) -> RuleResult {
    variadic(ctx, Some(Arith::Min))
}
pub fn sum(ctx: &InferCtx<'_>) -> RuleResult {
    variadic(ctx, Some(Arith::Add))
}
/// Mean: broadcast, no value.
pub fn mean(ctx: &InferCtx<'_>) -> RuleResult {
    variadic(ctx, None)
}

fn comparison(ctx: &InferCtx<'_>, op: Cmp) -> RuleResult {
    ctx.req(0)?;
    ctx.req(1)?;
    same_dtype(ctx.present_inputs())?;
    broadcast_with(ctx, Some(DType::Bool), |a| compare(op, a[0], a[1]))
}

pub fn equal(ctx: &InferCtx<'_>) -> RuleResult {
    comparison(ctx, Cmp::Eq)
}
pub fn less(ctx: &InferCtx<'_>) -> RuleResult {
    comparison(ctx, Cmp::Lt)
}
pub fn less_or_equal(ctx: &InferCtx<'_>) -> RuleResult {
    comparison(ctx, Cmp::Le)
}
pub fn greater(ctx: &InferCtx<'_>) -> RuleResult {
    comparison(ctx, Cmp::Gt)
}
pub fn greater_or_equal(ctx: &InferCtx<'_>) -> RuleResult {
    comparison(ctx, Cmp::Ge)
}

fn logical(ctx: &InferCtx<'_>, op: Logic) -> RuleResult {
    ctx.req(0)?;
    ctx.req(1)?;
    broadcast_with(ctx, Some(DType::Bool), |a| logic(op, a[0], a[1]))
}

pub fn and(ctx: &InferCtx<'_>) -> RuleResult {
    logical(ctx, Logic::And)
}
pub fn or(ctx: &InferCtx<'_>) -> RuleResult {
    logical(ctx, Logic::Or)
}
pub fn xor(ctx: &InferCtx<'_>) -> RuleResult {
    logical(ctx, Logic::Xor)
}

/// Where(cond, x, y): broadcast of all three, the type of x and y.
pub fn where_(ctx: &InferCtx<'_>) -> RuleResult {
    ctx.req(0)?;
    let (x, y) = (ctx.req(1)?, ctx.req(2)?);
    let dtype = same_dtype([x, y])?;
    broadcast_with(ctx, dtype, |a| match a[0].known() {
        Some(0) => a[2].clone(),
        Some(_) => a[1].clone(),
        None if a[1] == a[2] => a[1].clone(),
        None => Dim::Unknown,
    })
}
