//! Shape / type rules, grouped by shape kind. Each rule is an [`InferFn`](super::InferFn):
//! it reads the node's input facts and attributes and returns the facts of its outputs
//! (fewer than the node has outputs means the rest are unknown).

pub mod elementwise;
pub mod index;
pub mod linalg;
pub mod misc;
pub mod movement;
pub mod reduce;

use super::facts::{Facts, norm_axis};
use super::infer::{InferCtx, ShapeError};
use perqc_ir::{DType, Dim};

pub type RuleResult = Result<Vec<Facts>, ShapeError>;

/// Normalizes an axis, reporting it if out of range.
pub(crate) fn axis(a: i64, rank: usize) -> Result<usize, ShapeError> {
    norm_axis(a, rank).ok_or(ShapeError::Axis { axis: a, rank })
}

/// Normalizes a list of axes; duplicates are an error.
pub(crate) fn axes(list: &[i64], rank: usize) -> Result<Vec<usize>, ShapeError> {
    let mut out = Vec::with_capacity(list.len());
    for &a in list {
        let n = axis(a, rank)?;
        if out.contains(&n) {
            return Err(ShapeError::Invalid(format!("axis {a} is repeated")));
        }
        out.push(n);
    }
    Ok(out)
}

/// The common element type of inputs that must agree (unknown ones are skipped).
pub(crate) fn same_dtype<'a>(
    inputs: impl IntoIterator<Item = &'a Facts>,
) -> Result<Option<DType>, ShapeError> {
    let mut seen: Option<DType> = None;
    for f in inputs {
        match (seen, f.dtype) {
            (Some(a), Some(b)) if a != b => return Err(ShapeError::DTypeMismatch { a, b }),
            (None, d) => seen = d,
            _ => {}
        }
    }
    Ok(seen)
}

/// An integer-list attribute.
pub(crate) fn ints_attr(ctx: &InferCtx<'_>, name: &'static str) -> Option<Vec<i64>> {
    ctx.node.attr_ints(name).map(<[i64]>::to_vec)
}

/// The dtype a `to` / `output_dtype` style attribute names.
pub(crate) fn dtype_attr(
    ctx: &InferCtx<'_>,
    name: &'static str,
) -> Result<Option<DType>, ShapeError> {
    match ctx.node.attr_int(name) {
        None | Some(0) => Ok(None),
        Some(code) => DType::from_code(code as i32)
            .map(Some)
            .ok_or(ShapeError::BadAttr {
                name,
                reason: format!("{code} is not an element type"),
            }),
    }
}

/// A vector of `n` unknown dims.
pub(crate) fn unknown_dims(n: usize) -> Vec<Dim> {
    vec![Dim::Unknown; n]
}

/// Output facts of the same type and shape as input 0.
pub(crate) fn like_input0(ctx: &InferCtx<'_>) -> Result<Facts, ShapeError> {
    let x = ctx.req(0)?;
    Ok(Facts::new(x.dtype, x.shape.clone()))
}
