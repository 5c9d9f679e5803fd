//! Data-movement ops: reshapes (Reshape, Flatten, Squeeze, Unsqueeze, Identity),
//! Transpose, Concat, Split, Slice, Expand, Tile, Pad. Element values pass through when
//! the output shape is known.

use super::elementwise::with_value;
use super::{RuleResult, axes, axis, same_dtype, unknown_dims};
use crate::constprop::{Arith, Num, advance, arith, strides, values_or_unknown, zip_broadcast};
use crate::facts::{
    Facts, Mono, add_dims, broadcast_shapes, fmt_opt_shape, fmt_shape, known_dims, product_dim,
    unify_dim,
};
use crate::infer::{InferCtx, ShapeError};
use perqc_ir::{Dim, Shape};

use Dim::{Known, Sym, Unknown};

/// Identity (and other pure pass-throughs): same facts, value included.
pub fn identity(ctx: &InferCtx<'_>) -> RuleResult {
    Ok(vec![ctx.req(0)?.clone()])
}

/// A reshape-like result: `x`'s values carried over to `shape` (row-major order is kept).
fn reshaped(x: &Facts, shape: Option<Shape>) -> Facts {
    with_value(x.dtype, shape, x.value.clone())
}

/// Reshape (opset >= 5): target shape from input 1.
pub fn reshape(ctx: &InferCtx<'_>) -> RuleResult {
    let x = ctx.req(0)?;
    let t = ctx.req(1)?;
    let target = t.dims_value();
    let allowzero = ctx.attr_int("allowzero", 0) != 0;
    reshape_to(x, target, allowzero)
}

/// Reshape-1: target shape from the `shape` attribute.
pub fn reshape_attr(ctx: &InferCtx<'_>) -> RuleResult {
    let x = ctx.req(0)?;
    let target = super::ints_attr(ctx, "shape").map(|v| v.into_iter().map(Known).collect());
    reshape_to(x, target, false)
}

fn reshape_to(x: &Facts, target: Option<Vec<Dim>>, allowzero: bool) -> RuleResult {
    let Some(target) = target else {
        return Ok(vec![Facts::new(x.dtype, None)]);
    };
    let mut out = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, t) in target.iter().enumerate() {
        match t {
            Known(0) if !allowzero => out.push(match &x.shape {
                Some(s) => s.get(i).cloned().ok_or_else(|| {
                    ShapeError::Invalid(format!(
                        "target {} copies input dim {i}, but the input {} has rank {}",
                        fmt_shape(&target),
                        fmt_shape(s),
                        s.len()
                    ))
                })?,
                None => Unknown,
            }),
            Known(-1) => {
                if infer_at.replace(i).is_some() {
                    return Err(ShapeError::Invalid(format!(
                        "target {} has more than one -1",
                        fmt_shape(&target)
                    )));
                }
                out.push(Unknown);
            }
            Known(n) if *n < 0 => {
                return Err(ShapeError::Invalid(format!(
                    "target {} has a negative size",
                    fmt_shape(&target)
                )));
            }
            d => out.push(d.clone()),
        }
    }
    let numel_in = x.shape.as_deref().and_then(Mono::product);
    let count_err = || ShapeError::ElementCount {
        from: fmt_opt_shape(x.shape.as_deref()),
        to: fmt_shape(&target),
        from_numel: numel_in.as_ref().map_or("?".into(), mono_str),
        to_numel: Mono::product(out.iter().filter(|d| **d != Unknown))
            .map_or("?".into(), |m| mono_str(&m)),
    };
    if let Some(i) = infer_at {
        let rest = Mono::product(
            out.iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, d)| d),
        );
        if let (Some(a), Some(b)) = (&numel_in, &rest) {
            match a.div(b) {
                Some(m) => out[i] = m.to_dim(),
                None if a.syms.is_empty() && b.syms.is_empty() && b.coef != 0 => {
                    return Err(count_err());
                }
                None => {}
            }
        }
    } else if let (Some(a), Some(b)) = (&numel_in, Mono::product(&out)) {
        // Equal symbols, different coefficients: wrong for every value of the symbols.
        if a.syms == b.syms && a.coef != b.coef {
            return Err(count_err());
        }
    }
    Ok(vec![reshaped(x, Some(out))])
}

fn mono_str(m: &Mono) -> String {
    let mut parts: Vec<String> = m.syms.clone();
    if m.coef != 1 || parts.is_empty() {
        parts.insert(0, m.coef.to_string());
    }
    parts.join("*")
}

/// Flatten: `[prod(d[..axis]), prod(d[axis..])]`.
pub fn flatten(ctx: &InferCtx<'_>) -> RuleResult {
    let x = ctx.req(0)?;
    let Some(s) = &x.shape else {
        return Ok(vec![Facts::new(x.dtype, Some(unknown_dims(2)))]);
    };
    let a = ctx.attr_int("axis", 1);
    let r = s.len() as i64;
    let a = if a < 0 { a + r } else { a };
    if !(0..=r).contains(&a) {
        return Err(ShapeError::Axis {
            axis: ctx.attr_int("axis", 1),
            rank: s.len(),
        });
    }
    let (head, tail) = s.split_at(a as usize);
    Ok(vec![reshaped(
        x,
        Some(vec![product_dim(head), product_dim(tail)]),
    )])
}

/// Transpose: `perm` (default: reversed axes).
pub fn transpose(ctx: &InferCtx<'_>) -> RuleResult {
    let x = ctx.req(0)?;
    let Some(s) = &x.shape else {
        let rank = ctx.node.attr_ints("perm").map(|p| unknown_dims(p.len()));
        return Ok(vec![Facts::new(x.dtype, rank)]);
    };
    let perm: Vec<usize> = match ctx.node.attr_ints("perm") {
        Some(p) => {
            let mut seen = vec![false; s.len()];
            let ok = p.len() == s.len()
                && p.iter().all(|&a| {
                    usize::try_from(a)
                        .is_ok_and(|a| a < s.len() && !std::mem::replace(&mut seen[a], true))
                });
            if !ok {
                return Err(ShapeError::BadAttr {
                    name: "perm",
                    reason: format!(
                        "{p:?} is not a permutation of the {} axes of {}",
                        s.len(),
                        fmt_shape(s)
                    ),
                });
            }
            p.iter().map(|&a| a as usize).collect()
        }
        None => (0..s.len()).rev().collect(),
    };
    let out: Shape = perm.iter().map(|&a| s[a].clone()).collect();
    let value = x.value.as_ref().and_then(|v| {
        let dims = known_dims(s)?;
        let st = strides(&dims);
        let od: Vec<usize> = perm.iter().map(|&a| dims[a]).collect();
        let mut idx = vec![0; od.len()];
        Some(
            (0..v.len())
                .map(|_| {
                    let flat: usize = idx.iter().zip(&perm).map(|(i, &a)| i * st[a]).sum();
                    advance(&mut idx, &od);
                    v[flat].clone()
                })
                .collect(),
        )
    });
    Ok(vec![with_value(x.dtype, Some(out), value)])
}

/// Axes from the `axes` attribute (older opsets).
fn axes_attr(ctx: &InferCtx<'_>) -> AxesArg {
    match ctx.node.attr_ints("axes") {
        Some(a) => AxesArg::Known(a.to_vec()),
        None => AxesArg::Absent,
    }
}

/// Axes from input `i` (newer opsets).
pub(crate) fn axes_input(ctx: &InferCtx<'_>, i: usize) -> AxesArg {
    match ctx.input(i) {
        None => AxesArg::Absent,
        Some(f) => match f.known_ints() {
            Some(v) => AxesArg::Known(v),
            None => AxesArg::Unknown(
                f.shape
                    .as_ref()
                    .and_then(|s| s.first()?.known())
                    .and_then(|n| usize::try_from(n).ok())
                    .filter(|&n| n <= crate::facts::MAX_VALUE_ELEMS),
            ),
        },
    }
}

/// An axes operand: not given, known, or given with unknown values (maybe known count).
pub(crate) enum AxesArg {
    Absent,
    Known(Vec<i64>),
    Unknown(Option<usize>),
}

pub fn squeeze_attr(ctx: &InferCtx<'_>) -> RuleResult {
    squeeze(ctx, axes_attr(ctx))
}
pub fn squeeze_input(ctx: &InferCtx<'_>) -> RuleResult {
    squeeze(ctx, axes_input(ctx, 1))
}

fn squeeze(ctx: &InferCtx<'_>, ax: AxesArg) -> RuleResult {
    let x = ctx.req(0)?;
    let Some(s) = &x.shape else {
        return Ok(vec![Facts::new(x.dtype, None)]);
    };
    let out = match ax {
        // No axes: drop every dim known to be 1; symbols are taken to be other than 1.
        AxesArg::Absent => {
            if s.contains(&Unknown) {
                None
            } else {
                Some(s.iter().filter(|d| **d != Known(1)).cloned().collect())
            }
        }
        AxesArg::Known(a) => {
            let a = axes(&a, s.len())?;
            for &i in &a {
                if matches!(s[i], Known(n) if n != 1) {
                    return Err(ShapeError::Invalid(format!(
                        "cannot squeeze axis {i} of size {} (shape {})",
                        s[i],
                        fmt_shape(s)
                    )));
                }
            }
            Some(
                s.iter()
                    .enumerate()
                    .filter(|(i, _)| !a.contains(i))
                    .map(|(_, d)| d.clone())
                    .collect(),
            )
        }
        AxesArg::Unknown(n) => n.map(|n| unknown_dims(s.len().saturating_sub(n))),
    };
    Ok(vec![reshaped(x, out)])
}

pub fn unsqueeze_attr(ctx: &InferCtx<'_>) -> RuleResult {
    unsqueeze(ctx, axes_attr(ctx))
}
pub fn unsqueeze_input(ctx: &InferCtx<'_>) -> RuleResult {
    unsqueeze(ctx, axes_input(ctx, 1))
}

fn unsqueeze(ctx: &InferCtx<'_>, ax: AxesArg) -> RuleResult {
    let x = ctx.req(0)?;
    let out = match (&x.shape, ax) {
        (_, AxesArg::Absent) => return Err(ShapeError::MissingAttr { name: "axes" }),
        (Some(s), AxesArg::Known(a)) => {
            let rank = s.len() + a.len();
            let a = axes(&a, rank)?;
            let mut rest = s.iter();
            Some(
                (0..rank)
                    .map(|i| {
                        if a.contains(&i) {
                            Known(1)
                        } else {
                            rest.next().unwrap().clone()
                        }
                    })
                    .collect(),
            )
        }
        (Some(s), AxesArg::Unknown(Some(n))) => Some(unknown_dims(s.len() + n)),
        _ => None,
    };
    Ok(vec![reshaped(x, out)])
}

/// Concat along `axis`: other dims must agree, the axis dim is the sum.
pub fn concat(ctx: &InferCtx<'_>) -> RuleResult {
    let inputs = ctx.present_inputs();
    if inputs.is_empty() {
        return Err(ShapeError::MissingInput { index: 0 });
    }
    let dtype = same_dtype(inputs.iter().copied())?;
    let a = match ctx.node.attr_int("axis") {
        Some(a) => a,
        None if ctx.opset < 4 => 1,
        None => return Err(ShapeError::MissingAttr { name: "axis" }),
    };
    let ranks: Vec<usize> = inputs.iter().filter_map(|f| f.rank()).collect();
    let Some(&rank) = ranks.first() else {
        return Ok(vec![Facts::new(dtype, None)]);
    };
    if let Some(&r) = ranks.iter().find(|&&r| r != rank) {
        return Err(ShapeError::Invalid(format!(
            "inputs have ranks {rank} and {r}"
        )));
    }
    let ax = axis(a, rank)?;
    let mut out: Shape = unknown_dims(rank);
    let mut total = Known(0);
    for f in &inputs {
        let Some(s) = &f.shape else {
            total = Unknown;
            continue;
        };
        for (i, d) in s.iter().enumerate() {
            if i == ax {
                total = add_dims(&total, d);
            } else {
                out[i] = unify_dim(&out[i], d).ok_or_else(|| ShapeError::DimMismatch {
                    axis: i,
                    a: out[i].clone(),
                    b: d.clone(),
                })?;
            }
        }
    }
    out[ax] = total;
    let value = concat_values(&inputs, &out, ax);
    Ok(vec![with_value(dtype, Some(out), value)])
}

fn concat_values(inputs: &[&Facts], out: &[Dim], ax: usize) -> Option<Vec<Dim>> {
    if inputs.iter().all(|f| f.value.is_none()) {
        return None;
    }
    let od = known_dims(out)?;
    let outer: usize = od[..ax].iter().product();
    let parts: Vec<(Vec<Dim>, usize)> = inputs
        .iter()
        .map(|f| {
            let d = known_dims(f.shape.as_ref()?)?;
            Some((values_or_unknown(f)?, d[ax..].iter().product()))
        })
        .collect::<Option<_>>()?;
    let mut v = Vec::new();
    for o in 0..outer {
        for (vals, chunk) in &parts {
            v.extend_from_slice(&vals[o * chunk..(o + 1) * chunk]);
        }
    }
    Some(v)
}

pub fn split_attr(ctx: &InferCtx<'_>) -> RuleResult {
    let sizes = super::ints_attr(ctx, "split").map(|v| v.into_iter().map(Known).collect());
    split(ctx, sizes, false)
}
pub fn split_input(ctx: &InferCtx<'_>) -> RuleResult {
    let sizes = ctx.input(1).map(|f| f.dims_value().unwrap_or_default());
    split(ctx, sizes, false)
}
/// Split-18: `split` input or `num_outputs`; the last chunk may be smaller.
pub fn split_18(ctx: &InferCtx<'_>) -> RuleResult {
    let sizes = ctx.input(1).map(|f| f.dims_value().unwrap_or_default());
    split(ctx, sizes, true)
}

fn split(ctx: &InferCtx<'_>, sizes: Option<Vec<Dim>>, uneven: bool) -> RuleResult {
    let x = ctx.req(0)?;
    let n = ctx.num_outputs();
    let Some(s) = &x.shape else {
        return Ok(vec![Facts::new(x.dtype, None); n]);
    };
    let ax = axis(ctx.attr_int("axis", 0), s.len())?;
    let d = &s[ax];
    let sizes: Vec<Dim> = match sizes {
        Some(v) if v.len() == n => {
            if let (Some(total), Some(d)) =
                (v.iter().map(Dim::known).sum::<Option<i64>>(), d.known())
                && total != d
            {
                return Err(ShapeError::Invalid(format!(
                    "split sizes {} sum to {total}, but axis {ax} of {} has {d}",
                    fmt_shape(&v),
                    fmt_shape(s)
                )));
            }
            v
        }
        Some(v) if !v.is_empty() => {
            return Err(ShapeError::Invalid(format!(
                "{} split sizes for {n} outputs",
                v.len()
            )));
        }
        Some(_) => unknown_dims(n),
        None => match d {
            Known(d) if *d >= 0 => {
                let parts = ctx.node.attr_int("num_outputs").unwrap_or(n as i64).max(1);
                let chunk = d / parts + i64::from(d % parts != 0);
                let last = chunk.checked_mul(parts - 1).map_or(-1, |used| d - used);
                if (!uneven && d % parts != 0) || last < 0 {
                    return Err(ShapeError::Invalid(format!(
                        "axis {ax} of {} does not split into {parts} parts",
                        fmt_shape(s)
                    )));
                }
                (0..n)
                    .map(|i| Known(if i + 1 == n { last } else { chunk }))
                    .collect()
            }
            d if n == 1 => vec![d.clone()],
            _ => unknown_dims(n),
        },
    };
    Ok(sizes
        .into_iter()
        .map(|sz| {
            let mut o = s.clone();
            o[ax] = sz;
            Facts::new(x.dtype, Some(o))
        })
        .collect())
}

/// Slice-1: starts / ends / axes attributes.
pub fn slice_attr(ctx: &InferCtx<'_>) -> RuleResult {
    let get = |n| super::ints_attr(ctx, n).map(|v| v.into_iter().map(Known).collect());
    let axes = match ctx.node.attr_ints("axes") {
        Some(a) => AxesArg::Known(a.to_vec()),
        None => AxesArg::Absent,
    };
    slice(ctx, get("starts"), get("ends"), axes, None)
}

/// Slice-10+: starts, ends, axes, steps inputs.
pub fn slice_input(ctx: &InferCtx<'_>) -> RuleResult {
    let get = |i: usize| ctx.input(i).and_then(Facts::dims_value);
    slice(
        ctx,
        get(1),
        get(2),
        axes_input(ctx, 3),
        ctx.input(4).map(|f| f.dims_value()),
    )
}

/// Where a slice starts and how far it steps on one axis, and its length.
struct AxisSlice {
    start: Option<i64>,
    step: i64,
    len: Dim,
}

fn slice_axis(d: &Dim, start: &Dim, end: &Dim, step: &Dim) -> AxisSlice {
    let unknown = AxisSlice {
        start: None,
        step: 1,
        len: Unknown,
    };
    let Some(step) = step.known().filter(|&s| s != 0) else {
        return unknown;
    };
    let to_end = |e: &Dim| match e {
        Known(e) => (step > 0 && *e >= i32::MAX as i64) || (step < 0 && *e <= i32::MIN as i64),
        e => step == 1 && e == d,
    };
    match (d, start.known()) {
        (Known(d), _) if *d < 0 => unknown,
        (Known(0), Some(_)) => AxisSlice {
            start: Some(0),
            step,
            len: Known(0),
        },
        (Known(d), Some(s)) => {
            let e = match end {
                Known(e) => *e,
                _ if to_end(end) => {
                    if step > 0 {
                        *d
                    } else {
                        -d - 1
                    }
                }
                _ => return unknown,
            };
            let (s, e) = (if s < 0 { s + d } else { s }, if e < 0 { e + d } else { e });
            let (s, e) = if step > 0 {
                (s.clamp(0, *d), e.clamp(0, *d))
            } else {
                (s.clamp(0, d - 1), e.clamp(-1, d - 1))
            };
            let (s, e, st) = (s as i128, e as i128, step as i128);
            let len = if st > 0 {
                (e - s + st - 1) / st
            } else {
                (s - e - st - 1) / -st
            };
            AxisSlice {
                start: Some(s as i64),
                step,
                len: Known(len.max(0) as i64),
            }
        }
        // A symbolic axis taken whole.
        (Sym(_), Some(0)) if step == 1 && to_end(end) => AxisSlice {
            start: Some(0),
            step,
            len: d.clone(),
        },
        _ => unknown,
    }
}

fn slice(
    ctx: &InferCtx<'_>,
    starts: Option<Vec<Dim>>,
    ends: Option<Vec<Dim>>,
    ax: AxesArg,
    steps: Option<Option<Vec<Dim>>>,
) -> RuleResult {
    let x = ctx.req(0)?;
    let Some(s) = &x.shape else {
        return Ok(vec![Facts::new(x.dtype, None)]);
    };
    let (Some(starts), Some(ends)) = (starts, ends) else {
        return Ok(vec![Facts::new(x.dtype, Some(unknown_dims(s.len())))]);
    };
    if starts.len() != ends.len() {
        return Err(ShapeError::Invalid(format!(
            "{} starts but {} ends",
            starts.len(),
            ends.len()
        )));
    }
    let axes_list = match ax {
        AxesArg::Absent => (0..starts.len()).collect(),
        AxesArg::Known(a) => axes(&a, s.len())?,
        AxesArg::Unknown(_) => return Ok(vec![Facts::new(x.dtype, Some(unknown_dims(s.len())))]),
    };
    let steps = match steps {
        None => vec![Known(1); starts.len()],
        Some(Some(v)) => v,
        Some(None) => unknown_dims(starts.len()),
    };
    if axes_list.len() != starts.len() || steps.len() != starts.len() {
        return Err(ShapeError::Invalid(format!(
            "{} starts, {} axes, {} steps",
            starts.len(),
            axes_list.len(),
            steps.len()
        )));
    }
    let mut per_axis: Vec<AxisSlice> = s
        .iter()
        .map(|d| AxisSlice {
            start: Some(0),
            step: 1,
            len: d.clone(),
        })
        .collect();
    for (k, &a) in axes_list.iter().enumerate() {
        if steps[k] == Known(0) {
            return Err(ShapeError::Invalid("a step is 0".into()));
        }
        per_axis[a] = slice_axis(&s[a], &starts[k], &ends[k], &steps[k]);
    }
    let out: Shape = per_axis.iter().map(|p| p.len.clone()).collect();
    let value = x.value.as_ref().and_then(|v| {
        let od = known_dims(&out)?;
        let st = strides(&known_dims(s)?);
        let params: Vec<(i64, i64)> = per_axis
            .iter()
            .map(|p| Some((p.start?, p.step)))
            .collect::<Option<_>>()?;
        let mut idx = vec![0usize; od.len()];
        let n: usize = od.iter().product();
        Some(
            (0..n)
                .map(|_| {
                    let flat: i64 = idx
                        .iter()
                        .zip(&params)
                        .zip(&st)
                        .map(|((&i, &(s0, step)), &stride)| (s0 + i as i64 * step) * stride as i64)
                        .sum();
                    advance(&mut idx, &od);
                    v[flat as usize].clone()
                })
                .collect(),
        )
    });
    Ok(vec![with_value(x.dtype, Some(out), value)])
}

/// Expand: bidirectional broadcast of the input with the target shape (input 1's value).
pub fn expand(ctx: &InferCtx<'_>) -> RuleResult {
    let x = ctx.req(0)?;
    let target = ctx.req(1)?.dims_value();
    let (Some(s), Some(t)) = (&x.shape, target) else {
        return Ok(vec![Facts::new(x.dtype, None)]);
    };
    let out = broadcast_shapes(s, &t).ok_or_else(|| ShapeError::Broadcast {
        a: fmt_shape(s),
        b: fmt_shape(&t),
    })?;
    let value = zip_broadcast(&[x], &out, |a| a[0].clone());
    Ok(vec![with_value(x.dtype, Some(out), value)])
}

/// Tile: each dim times its repeat count.
pub fn tile(ctx: &InferCtx<'_>) -> RuleResult {
    let x = ctx.req(0)?;
    let reps = ctx.req(1)?.dims_value();
    let Some(s) = &x.shape else {
        return Ok(vec![Facts::new(
            x.dtype,
            reps.map(|r| unknown_dims(r.len())),
        )]);
    };
    let out = match reps {
        Some(r) if r.len() == s.len() => s
            .iter()
            .zip(&r)
            .map(|(d, k)| arith(Arith::Mul, Num::Int, d, k))
            .collect(),
        Some(r) => {
            return Err(ShapeError::Invalid(format!(
                "{} repeats for input {}",
                r.len(),
                fmt_shape(s)
            )));
        }
        None => unknown_dims(s.len()),
    };
    Ok(vec![Facts::new(x.dtype, Some(out))])
}

/// Pad-1 (`paddings`) and Pad-2 (`pads`) attributes.
pub fn pad_attr(ctx: &InferCtx<'_>) -> RuleResult {
    let pads = super::ints_attr(ctx, "pads")
        .or_else(|| super::ints_attr(ctx, "paddings"))
        .map(|v| v.into_iter().map(Known).collect());
    pad(ctx, pads, AxesArg::Absent)
}

/// Pad-11+: `pads` input (and `axes` input from 18).
pub fn pad_input(ctx: &InferCtx<'_>) -> RuleResult {
    let pads = ctx.input(1).and_then(Facts::dims_value);
    pad(ctx, pads, axes_input(ctx, 3))
}

fn pad(ctx: &InferCtx<'_>, pads: Option<Vec<Dim>>, ax: AxesArg) -> RuleResult {
    let x = ctx.req(0)?;
    let Some(s) = &x.shape else {
        return Ok(vec![Facts::new(x.dtype, None)]);
    };
    let axes_list = match ax {
        AxesArg::Absent => (0..s.len()).collect(),
        AxesArg::Known(a) => axes(&a, s.len())?,
        AxesArg::Unknown(_) => return Ok(vec![Facts::new(x.dtype, Some(unknown_dims(s.len())))]),
    };
    let Some(pads) = pads else {
        return Ok(vec![Facts::new(x.dtype, Some(unknown_dims(s.len())))]);
    };
    let k = axes_list.len();
    if pads.len() != 2 * k {
        return Err(ShapeError::Invalid(format!(
            "{} pads for {k} axes of {}",
            pads.len(),
            fmt_shape(s)
        )));
    }
    let mut out = s.clone();
    for (j, &a) in axes_list.iter().enumerate() {
        out[a] = add_dims(&add_dims(&s[a], &pads[j]), &pads[j + k]);
    }
    Ok(vec![Facts::new(x.dtype, Some(out))])
}
