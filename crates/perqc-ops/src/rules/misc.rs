//! Constants and generators (Constant, ConstantOfShape, Range), casts, normalizations,
//! Dropout, quantization ops, and control flow.

use super::elementwise::with_value;
use super::{RuleResult, axis, dtype_attr, like_input0};
use crate::constprop::cast as cast_elem;
use crate::facts::{Facts, MAX_VALUE_ELEMS, float_dim, known_numel};
use crate::infer::{InferCtx, ShapeError};
use perqc_ir::graph::{AttrValue, Graph};
use perqc_ir::{DType, Dim, Shape};

use Dim::{Known, Unknown};

/// Constant: the facts of whichever `value*` attribute is set.
pub fn constant(ctx: &InferCtx<'_>) -> RuleResult {
    let n = ctx.node;
    let f = match n.attrs.first().map(|a| (a.name.as_str(), &a.value)) {
        Some(("value", AttrValue::Tensor(t))) => Facts::of_tensor(t),
        Some(("value_float", AttrValue::Float(x))) => {
            Facts::with_value(Some(DType::F32), Vec::new(), vec![float_dim(*x as f64)])
        }
        Some(("value_floats", AttrValue::Floats(v))) => Facts::with_value(
            Some(DType::F32),
            vec![Known(v.len() as i64)],
            v.iter().map(|x| float_dim(*x as f64)).collect(),
        ),
        Some(("value_int", AttrValue::Int(x))) => {
            Facts::with_value(Some(DType::I64), Vec::new(), vec![Known(*x)])
        }
        Some(("value_ints", AttrValue::Ints(v))) => Facts::with_value(
            Some(DType::I64),
            vec![Known(v.len() as i64)],
            v.iter().map(|&x| Known(x)).collect(),
        ),
        Some(("value_string", _)) => Facts::new(Some(DType::String), Some(Vec::new())),
        Some(("value_strings", AttrValue::Strings(v))) => {
            Facts::new(Some(DType::String), Some(vec![Known(v.len() as i64)]))
        }
        // sparse_value: the dense shape is inside the encoded proto; left unknown.
        Some(("sparse_value", _)) => Facts::default(),
        _ => {
            return Err(ShapeError::Invalid(
                "Constant needs exactly one value attribute (value, value_float, ...)".into(),
            ));
        }
    };
    Ok(vec![f])
}

/// ConstantOfShape: shape from input 0's value, type and fill from the `value` tensor
/// attribute (default f32 0).
pub fn constant_of_shape(ctx: &InferCtx<'_>) -> RuleResult {
    let s = ctx.req(0)?;
    let (dtype, fill) = match ctx.node.attr("value") {
        Some(AttrValue::Tensor(t)) => {
            let fill = Facts::of_tensor(t)
                .value
                .and_then(|v| v.first().cloned())
                .unwrap_or(Unknown);
            (t.dtype, fill)
        }
        _ => (DType::F32, Known(0)),
    };
    let shape: Option<Shape> = s.dims_value().or_else(|| {
        let n = s.shape.as_ref()?.first()?;
        let n = usize::try_from(n.known()?).ok()?;
        (n <= MAX_VALUE_ELEMS).then(|| vec![Unknown; n])
    });
    if let Some(bad) = shape
        .iter()
        .flatten()
        .find(|d| matches!(d, Known(n) if *n < 0))
    {
        return Err(ShapeError::Invalid(format!("negative dimension {bad}")));
    }
    let value = shape
        .as_deref()
        .and_then(known_numel)
        .filter(|&n| n <= MAX_VALUE_ELEMS)
        .map(|n| vec![fill.clone(); n]);
    Ok(vec![with_value(Some(dtype), shape, value)])
}

/// Range(start, limit, delta): length `max(ceil((limit - start) / delta), 0)`.
pub fn range(ctx: &InferCtx<'_>) -> RuleResult {
    let (start, limit, delta) = (ctx.req(0)?, ctx.req(1)?, ctx.req(2)?);
    for (i, f) in [start, limit, delta].into_iter().enumerate() {
        if let Some(s) = &f.shape
            && known_numel(s).is_some_and(|n| n != 1)
        {
            return Err(ShapeError::Invalid(format!(
                "input {i} has shape {}; Range takes scalars",
                crate::facts::fmt_shape(s)
            )));
        }
    }
    let scalar = |f: &Facts| {
        f.value
            .as_ref()
            .and_then(|v| v.first().cloned())
            .unwrap_or(Unknown)
    };
    let (s, l, d) = (scalar(start), scalar(limit), scalar(delta));
    let (len, value) = match (&s, &l, &d) {
        (Known(s), Known(l), Known(d)) if *d != 0 => {
            let n = ((*l as f64 - *s as f64) / *d as f64).ceil().max(0.0) as i64;
            let v = (n as usize <= MAX_VALUE_ELEMS).then(|| {
                (0..n)
                    .map(|i| {
                        i.checked_mul(*d)
                            .and_then(|x| x.checked_add(*s))
                            .map_or(Unknown, Known)
                    })
                    .collect()
            });
            (Known(n), v)
        }
        (Known(0), l @ Dim::Sym(_), Known(1)) => (l.clone(), None),
        _ => (Unknown, None),
    };
    Ok(vec![with_value(start.dtype, Some(vec![len]), value)])
}

/// Cast: the `to` type; integer values carried over where exact.
pub fn cast(ctx: &InferCtx<'_>) -> RuleResult {
    let x = ctx.req(0)?;
    let to = dtype_attr(ctx, "to")?.ok_or(ShapeError::MissingAttr { name: "to" })?;
    Ok(vec![cast_to(x, to)])
}

/// CastLike: the type of input 1.
pub fn cast_like(ctx: &InferCtx<'_>) -> RuleResult {
    let (x, like) = (ctx.req(0)?, ctx.req(1)?);
    Ok(vec![match like.dtype {
        Some(to) => cast_to(x, to),
        None => Facts::new(None, x.shape.clone()),
    }])
}

fn cast_to(x: &Facts, to: DType) -> Facts {
    let value = x
        .value
        .as_ref()
        .map(|v| v.iter().map(|d| cast_elem(d, to)).collect());
    with_value(Some(to), x.shape.clone(), value)
}

/// Dropout: output like the input, optional bool mask of the same shape.
pub fn dropout(ctx: &InferCtx<'_>) -> RuleResult {
    let y = like_input0(ctx)?;
    let mask = Facts::new(Some(DType::Bool), y.shape.clone());
    Ok(vec![y, mask])
}

/// LayerNormalization: Y like X; Mean and InvStdDev keep the dims before `axis` and are 1
/// from there, in the `stash_type` element type (default f32).
pub fn layer_norm(ctx: &InferCtx<'_>) -> RuleResult {
    let y = like_input0(ctx)?;
    let stash = dtype_attr(ctx, "stash_type")?.unwrap_or(DType::F32);
    let stats = match &y.shape {
        Some(s) => {
            let a = axis(ctx.attr_int("axis", -1), s.len())?;
            let mut o = s.clone();
            o[a..].fill(Known(1));
            Some(o)
        }
        None => None,
    };
    Ok(vec![
        y,
        Facts::new(Some(stash), stats.clone()),
        Facts::new(Some(stash), stats),
    ])
}

/// Per-row statistics of a norm over `axis..`: f32, `x`'s shape with those axes 1.
fn norm_stats(x: &Facts, ax: i64) -> Result<Facts, ShapeError> {
    let shape = match &x.shape {
        Some(s) => {
            let a = axis(ax, s.len())?;
            let mut o = s.clone();
            o[a..].fill(Known(1));
            Some(o)
        }
        None => None,
    };
    Ok(Facts::new(Some(DType::F32), shape))
}

/// ONNX Runtime's SimplifiedLayerNormalization: Y like X, inv_std_var per row.
pub fn simplified_layer_norm(ctx: &InferCtx<'_>) -> RuleResult {
    let y = like_input0(ctx)?;
    let inv = norm_stats(&y, ctx.attr_int("axis", -1))?;
    Ok(vec![y, inv])
}

/// com.microsoft SkipSimplifiedLayerNormalization: output and input_skip_bias_sum like
/// input; mean and inv_std_var per row (over the last axis).
pub fn skip_layer_norm(ctx: &InferCtx<'_>) -> RuleResult {
    let y = like_input0(ctx)?;
    let stats = norm_stats(&y, -1)?;
    Ok(vec![y.clone(), stats.clone(), stats, y])
}

/// BatchNormalization and friends: Y like X; running statistics (training) unknown.
pub fn batch_norm(ctx: &InferCtx<'_>) -> RuleResult {
    Ok(vec![like_input0(ctx)?])
}

/// QuantizeLinear: x's shape; element type from the zero point, else `output_dtype`
/// (opset 21), else u8.
pub fn quantize_linear(ctx: &InferCtx<'_>) -> RuleResult {
    let x = ctx.req(0)?;
    let dtype = match ctx.input(2).and_then(|z| z.dtype) {
        Some(d) => d,
        None => dtype_attr(ctx, "output_dtype")?.unwrap_or(DType::U8),
    };
    Ok(vec![Facts::new(Some(dtype), x.shape.clone())])
}

/// DequantizeLinear: x's shape; element type from `output_dtype` (opset 25), else the
/// scale's type (f32 before opset 19).
pub fn dequantize_linear(ctx: &InferCtx<'_>) -> RuleResult {
    let x = ctx.req(0)?;
    let scale = ctx.req(1)?;
    let dtype = match dtype_attr(ctx, "output_dtype")? {
        Some(d) => Some(d),
        None if ctx.opset < 19 => Some(DType::F32),
        None => scale.dtype,
    };
    Ok(vec![Facts::new(dtype, x.shape.clone())])
}

/// `ai.perqc::FakeQuantize`: y has x's shape and type; x must be f32 (or unknown), and the
/// attributes in range (`bits` 2..=8, `symmetric` 0/1, `clip` in (0, 1]).
pub fn fake_quantize(ctx: &InferCtx<'_>) -> RuleResult {
    let x = ctx.req(0)?;
    if let Some(d) = x.dtype
        && d != DType::F32
    {
        return Err(ShapeError::Invalid(format!(
            "FakeQuantize takes f32 activations, got {d}"
        )));
    }
    crate::kernels::misc::token_quant(ctx.node).map_err(ShapeError::Invalid)?;
    Ok(vec![Facts::new(Some(DType::F32), x.shape.clone())])
}

/// `ai.perqc::QuantizeTokens(x [.., K], H [b, b]?)`: codes i8 `[.., ceil(K / 4)·4]` and row
/// terms f32 `[.., 3]` (see `kernels::igemm`); b must divide K.
pub fn quantize_tokens(ctx: &InferCtx<'_>) -> RuleResult {
    let x = ctx.req(0)?;
    if let Some(h) = ctx.input(1)
        && let (Some(hs), Some(xs)) = (&h.shape, &x.shape)
        && let (Some(b), Some(k)) = (
            hs.first().and_then(|d| d.known()),
            xs.last().and_then(|d| d.known()),
        )
        && (hs.len() != 2 || b == 0 || k % b != 0)
    {
        return Err(ShapeError::Invalid(format!(
            "QuantizeTokens: H {} is not a square block dividing the {k} channels of x",
            crate::facts::fmt_shape(hs)
        )));
    }
    if let Some(d) = x.dtype
        && d != DType::F32
    {
        return Err(ShapeError::Invalid(format!(
            "QuantizeTokens takes f32 activations, got {d}"
        )));
    }
    crate::kernels::misc::token_quant(ctx.node).map_err(ShapeError::Invalid)?;
    let with_last = |last: Dim| {
        x.shape.as_ref().and_then(|s| {
            let (_, lead) = s.split_last()?;
            Some(lead.iter().cloned().chain([last]).collect::<Vec<_>>())
        })
    };
    let kg = crate::kernels::igemm::KG as i64;
    let kp = match x.shape.as_ref().and_then(|s| s.last()?.known()) {
        Some(k) => Known((k + kg - 1) / kg * kg),
        None => Unknown,
    };
    Ok(vec![
        Facts::new(Some(DType::I8), with_last(kp)),
        Facts::new(
            Some(DType::F32),
            with_last(Known(crate::kernels::igemm::TERMS as i64)),
        ),
    ])
}

/// `ai.perqc::QuantizedLinear(codes i8 [.., Kp], terms f32 [.., 3], w_packed u8 [P, G, 64],
/// w_scale f32 [N], w_sum i32 [N])`: f32 `[.., N]` (see `kernels::igemm`). The packed
/// weight holds `P = ceil(N / 32)` panels of `G = Kp / 4` groups. With attribute `group`
/// (rows of K per scale) `w_scale` and `w_sum` are `[ceil(Kp / group), N]`.
pub fn quantized_linear(ctx: &InferCtx<'_>) -> RuleResult {
    let (codes, terms, w, scale, sum) = (
        ctx.req(0)?,
        ctx.req(1)?,
        ctx.req(2)?,
        ctx.req(3)?,
        ctx.req(4)?,
    );
    for (what, f, want) in [
        ("codes", codes, DType::I8),
        ("terms", terms, DType::F32),
        ("w_packed", w, DType::U8),
        ("w_scale", scale, DType::F32),
        ("w_sum", sum, DType::I32),
    ] {
        if let Some(d) = f.dtype
            && d != want
        {
            return Err(ShapeError::Invalid(format!(
                "QuantizedLinear {what} must be {want}, got {d}"
            )));
        }
    }
    let group = ctx.node.attr_int("group").unwrap_or(0);
    if group < 0 || group % crate::kernels::igemm::KG as i64 != 0 {
        return Err(ShapeError::Invalid(format!(
            "QuantizedLinear: group {group} is not a non-negative multiple of {}",
            crate::kernels::igemm::KG
        )));
    }
    let n = scale
        .shape
        .as_ref()
        .and_then(|s| match (s.as_slice(), group) {
            ([d], 0) | ([_, d], 1..) => Some(d.clone()),
            _ => None,
        });
    if let Some(s) = &scale.shape
        && n.is_none()
    {
        return Err(ShapeError::Invalid(format!(
            "QuantizedLinear: w_scale {} must be [N] without groups, [K / group, N] with",
            crate::facts::fmt_shape(s)
        )));
    }
    let known = |f: &Facts, i: usize| f.shape.as_ref().and_then(|s| s.get(i)?.known());
    let nr = crate::kernels::igemm::NR as i64;
    if let (Some(Known(n)), Some(p)) = (&n, known(w, 0))
        && p != (n + nr - 1) / nr
    {
        return Err(ShapeError::Invalid(format!(
            "QuantizedLinear: {p} weight panels do not hold {n} columns"
        )));
    }
    let shape = match (&codes.shape, n) {
        (Some(cs), Some(n)) if !cs.is_empty() => {
            if let (Some(kp), Some(g)) = (cs[cs.len() - 1].known(), known(w, 1))
                && g * crate::kernels::igemm::KG as i64 != kp
            {
                return Err(ShapeError::Invalid(format!(
                    "QuantizedLinear: {g} weight groups do not hold the {kp} codes per row"
                )));
            }
            let mut s = cs.clone();
            *s.last_mut().expect("non-empty") = n;
            Some(s)
        }
        _ => None,
    };
    Ok(vec![Facts::new(Some(DType::F32), shape)])
}

/// DynamicQuantizeLinear: y (u8, x's shape), scalar f32 scale and u8 zero point.
pub fn dynamic_quantize_linear(ctx: &InferCtx<'_>) -> RuleResult {
    let x = ctx.req(0)?;
    Ok(vec![
        Facts::new(Some(DType::U8), x.shape.clone()),
        Facts::new(Some(DType::F32), Some(Vec::new())),
        Facts::new(Some(DType::U8), Some(Vec::new())),
    ])
}

fn graph_attr<'a>(ctx: &InferCtx<'a>, name: &str) -> Option<&'a Graph> {
    match ctx.node.attr(name) {
        Some(AttrValue::Graph(g)) => Some(g.as_ref()),
        _ => None,
    }
}

/// If: both branches are inferred; an output keeps what they agree on.
pub fn if_(ctx: &InferCtx<'_>) -> RuleResult {
    let (Some(then_g), Some(else_g)) = (
        graph_attr(ctx, "then_branch"),
        graph_attr(ctx, "else_branch"),
    ) else {
        return Ok(Vec::new());
    };
    let a = ctx.infer_subgraph(then_g, &[])?;
    let b = ctx.infer_subgraph(else_g, &[])?;
    Ok(a.into_iter().zip(b).map(|(x, y)| merge(&x, &y)).collect())
}

/// What two facts agree on (dims that differ become unknown; values are dropped).
fn merge(a: &Facts, b: &Facts) -> Facts {
    let dtype = if a.dtype == b.dtype { a.dtype } else { None };
    let shape = match (&a.shape, &b.shape) {
        (Some(x), Some(y)) if x.len() == y.len() => Some(
            x.iter()
                .zip(y)
                .map(|(p, q)| if p == q { p.clone() } else { Unknown })
                .collect(),
        ),
        _ => None,
    };
    Facts::new(dtype, shape)
}

/// A loop-carried value: what the initial value and the body's result agree on (if the
/// body maps the initial shape to itself, every iteration keeps it).
fn carried(init: &Facts, body_out: &Facts) -> Facts {
    merge(init, body_out)
}

fn without_value(f: Option<&Facts>) -> Facts {
    f.map(|f| Facts::new(f.dtype, f.shape.clone()))
        .unwrap_or_default()
}

/// Loop(M, cond, v_initial...): carried values, then scan outputs stacked along a new
/// leading axis (length M when there is no condition input, else unknown).
pub fn loop_(ctx: &InferCtx<'_>) -> RuleResult {
    let Some(body) = graph_attr(ctx, "body") else {
        return Ok(Vec::new());
    };
    let n = ctx.num_inputs().saturating_sub(2);
    let mut body_in = vec![
        Facts::new(Some(DType::I64), Some(Vec::new())),
        Facts::new(Some(DType::Bool), Some(Vec::new())),
    ];
    body_in.extend((0..n).map(|i| without_value(ctx.input(2 + i))));
    let outs = ctx.infer_subgraph(body, &body_in)?;
    let trips = match (ctx.input(0), ctx.node.input(1)) {
        (Some(m), None) => m
            .value
            .as_ref()
            .and_then(|v| v.first().cloned())
            .unwrap_or(Unknown),
        _ => Unknown,
    };
    let mut res: Vec<Facts> = (0..n)
        .map(|i| {
            carried(
                &body_in[2 + i],
                outs.get(1 + i).unwrap_or(&Facts::default()),
            )
        })
        .collect();
    res.extend(
        outs.iter()
            .skip(1 + n)
            .map(|f| stacked(f, 0, trips.clone())),
    );
    Ok(res)
}

/// `f` with a dim of length `len` inserted at `axis` (of the result).
fn stacked(f: &Facts, axis_attr: i64, len: Dim) -> Facts {
    let shape = f.shape.as_ref().and_then(|s| {
        let a = crate::facts::norm_axis(axis_attr, s.len() + 1)?;
        let mut o = s.clone();
        o.insert(a, len);
        Some(o)
    });
    Facts::new(f.dtype, shape)
}

/// Scan (opset 9+): states, then scan inputs sliced along their scan axes; outputs the
/// final states and the per-iteration outputs stacked along `scan_output_axes`.
pub fn scan(ctx: &InferCtx<'_>) -> RuleResult {
    let Some(body) = graph_attr(ctx, "body") else {
        return Ok(Vec::new());
    };
    let k = ctx
        .node
        .attr_int("num_scan_inputs")
        .ok_or(ShapeError::MissingAttr {
            name: "num_scan_inputs",
        })? as usize;
    let n = ctx.num_inputs().checked_sub(k).ok_or_else(|| {
        ShapeError::Invalid(format!(
            "num_scan_inputs is {k} but the node has {} inputs",
            ctx.num_inputs()
        ))
    })?;
    let in_axes = ctx
        .node
        .attr_ints("scan_input_axes")
        .map(<[i64]>::to_vec)
        .unwrap_or_else(|| vec![0; k]);
    let out_axes = ctx.node.attr_ints("scan_output_axes").map(<[i64]>::to_vec);
    let mut body_in: Vec<Facts> = (0..n).map(|i| without_value(ctx.input(i))).collect();
    let mut len = Unknown;
    for j in 0..k {
        let x = without_value(ctx.input(n + j));
        let a = in_axes.get(j).copied().unwrap_or(0);
        let slice = match &x.shape {
            Some(s) => {
                let ax = axis(a, s.len())?;
                if j == 0 {
                    len = s[ax].clone();
                }
                let mut o = s.clone();
                o.remove(ax);
                Some(o)
            }
            None => None,
        };
        body_in.push(Facts::new(x.dtype, slice));
    }
    let outs = ctx.infer_subgraph(body, &body_in)?;
    let mut res: Vec<Facts> = (0..n)
        .map(|i| carried(&body_in[i], outs.get(i).unwrap_or(&Facts::default())))
        .collect();
    for (j, f) in outs.iter().skip(n).enumerate() {
        let a = out_axes
            .as_ref()
            .and_then(|v| v.get(j).copied())
            .unwrap_or(0);
        res.push(stacked(f, a, len.clone()));
    }
    Ok(res)
}

/// Subgraph ops not modelled (Scan-8): outputs unknown (declared types still apply).
pub fn opaque(_ctx: &InferCtx<'_>) -> RuleResult {
    Ok(Vec::new())
}
