//! `fuse-rms-norm`: RMS normalization as exporters write it.
//!
//! ```text
//! r = 1 / Sqrt(Add(ReduceMean(x², axes = [-1], keepdims = 1), eps))
//! Mul(Cast*(Mul(x, r)), gamma)  ==  ai.perqc::RMSNormalization(x, gamma, axis = -1, epsilon = eps)
//! ```
//!
//! Spellings matched, by structure: the square as `Pow(x, 2)` or `Mul(x, x)`; ReduceMean's
//! axes as attribute or input (`[-1]` or the last axis); `1 / s` as `Reciprocal(s)`,
//! `Div(1, s)`, or the whole `x · r` as `Div(x, s)`; `eps` on either side of the Add;
//! no-op `Cast`s between the normalization and the scale; `gamma` on either side of the
//! Mul and any constant of shape `[D]` or `[1]`, including a folded `1 + gamma`. Without a
//! scale `Mul`, the normalization alone becomes the op with a scale of ones.
//!
//! Check: each intermediate is read only by the chain and is no graph output; x is f32;
//! gamma's length is 1 or x's known last dim.
//!
//! The ops ONNX Runtime's model builder and newer exporters write mean the same:
//! `SimplifiedLayerNormalization` (ORT's contrib op, registered in the default domain) and
//! ONNX `RMSNormalization` (opset 23) become the canonical op when their extra results
//! (inverse std) are unread.
//!
//! `ai.perqc::RMSNormalization` is ONNX `RMSNormalization` (opset 23): per row,
//! `y = (x · 1/sqrt(Σx²/n + eps)) · gamma` in that order of operations, so the result is
//! the chain's up to the summation order of Σx² (and one rounding for the `Div(x, s)`
//! spelling, which divides where the op multiplies by the reciprocal).

use super::{Pattern, canonical, same_op, scaled_by_reader, vector_len};
use perqc_ir::{AttrValue, Matcher, NodeId, Patch, Tensor, ValueId};

pub static PATTERN: Pattern = Pattern {
    name: "fuse-rms-norm",
    description: "x / sqrt(mean(x²) + eps) * gamma in any exported spelling -> ai.perqc::RMSNormalization",
    rewrite,
};

fn rewrite(m: &Matcher<'_>, end: NodeId) -> Option<Patch> {
    if m.is_op(end, "SimplifiedLayerNormalization") || m.is_op(end, "RMSNormalization") {
        return same_op(m, end, "RMSNormalization", 2);
    }
    if !m.is_op(end, "Mul") && !m.is_op(end, "Div") {
        return None;
    }
    // With a scale: `end` multiplies the normalized value by gamma.
    if m.is_op(end, "Mul") {
        let (a, b) = m.two(end)?;
        let scaled = m.either(a, b, |normed, gamma| {
            let len = vector_len(m, gamma)?;
            let core = m.sole(m.skip_noop_casts(normed))?;
            let (x, eps) = normalization(m, core)?;
            let d = m.shape(x)?.last()?.known();
            (len == 1 || Some(len as i64) == d).then_some((x, gamma, eps))
        });
        if let Some((x, gamma, eps)) = scaled {
            return Some(patch(end, x, gamma.into(), eps));
        }
    }
    // Without one: `end` is the normalization, unless a scale Mul reads it (that Mul is the
    // anchor then, later in node order).
    let (x, eps) = normalization(m, end)?;
    if scaled_by_reader(m, m.node(end).output(0)?, &["Mul"]) {
        return None;
    }
    let d = m.shape(x)?.last()?.known()?;
    Some(patch(end, x, gamma_ones(d)?, eps))
}

enum Scale {
    Value(ValueId),
    Ones(Tensor),
}

impl From<ValueId> for Scale {
    fn from(v: ValueId) -> Scale {
        Scale::Value(v)
    }
}

fn gamma_ones(d: i64) -> Option<Scale> {
    let n = usize::try_from(d).ok()?;
    Some(Scale::Ones(Tensor::from_f32(vec![d], &vec![1.0; n])))
}

fn patch(end: NodeId, x: ValueId, scale: Scale, eps: f32) -> Patch {
    let mut p = Patch::new();
    let scale = match scale {
        Scale::Value(v) => v.into(),
        Scale::Ones(t) => p.add_initializer("rms_norm_ones", t),
    };
    p.set_op(
        end,
        canonical("RMSNormalization")
            .attr("axis", AttrValue::Int(-1))
            .attr("epsilon", AttrValue::Float(eps)),
        [Some(x.into()), Some(scale)],
    );
    p
}

/// `node` computes `x / sqrt(mean(x²) + eps)` over the last axis: returns `(x, eps)`.
fn normalization(m: &Matcher<'_>, node: NodeId) -> Option<(ValueId, f32)> {
    let (a, b) = m.two(node)?;
    let (x, sqrt) = if m.is_op(node, "Div") {
        (a, b)
    } else if m.is_op(node, "Mul") {
        m.either(a, b, |x, r| one_over(m, r).map(|s| (x, s)))?
    } else {
        return None;
    };
    let sq = m.sole_op(sqrt, "Sqrt")?;
    let summed = m.input(sq, 0)?;
    let add = m.sole_op(summed, "Add")?;
    let (p, q) = m.two(add)?;
    let (mean, eps) = m.either(p, q, |mean, e| m.scalar(e).map(|e| (mean, e)))?;
    let rm = m.sole_op(mean, "ReduceMean")?;
    let rank = m.rank(x)? as i64;
    let axes = m.attr_or_input_ints(rm, "axes", 1)?;
    let last_axis = axes.len() == 1 && (axes[0] == -1 || axes[0] == rank - 1);
    if !m.is_f32(x) || !last_axis || m.node(rm).attr_int("keepdims").unwrap_or(1) != 1 {
        return None;
    }
    let squares = m.input(rm, 0)?;
    let square = m.sole(squares)?;
    let (base, e) = m.two(square)?;
    let is_square = (m.is_op(square, "Pow") && m.scalar(e) == Some(2.0))
        || (m.is_op(square, "Mul") && e == base);
    (is_square && base == x).then_some((x, eps))
}

/// `r` is `1 / s` as `Reciprocal(s)` or `Div(1, s)` (the same correctly rounded division),
/// absorbed with `r`: returns `s`.
fn one_over(m: &Matcher<'_>, r: ValueId) -> Option<ValueId> {
    if let Some(j) = m.sole_op(r, "Reciprocal") {
        return m.input(j, 0);
    }
    let j = m.sole_op(r, "Div")?;
    let (n, d) = m.two(j)?;
    (m.scalar(n) == Some(1.0)).then_some(d)
}
