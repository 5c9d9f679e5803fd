//! `fuse-layer-norm`: layer normalization, decomposed or as the ONNX op.
//!
//! ```text
//! d = Sub(x, ReduceMean(x, [-1]))
//! n = Div(d, Sqrt(Add(ReduceMean(d², [-1]), eps)))         (or Mul(d, Reciprocal(..)))
//! Add(Mul(n, gamma), beta)  ==  ai.perqc::LayerNormalization(x, gamma, beta, axis = -1, epsilon = eps)
//! LayerNormalization(x, gamma, beta?) (opset 17, Mean / InvStdDev results unread)  ==  the same
//! ```
//!
//! The square may be `Pow(d, 2)` or `Mul(d, d)`, axes an attribute or an input, gamma and
//! beta on either side; without beta the Mul is the anchor, without gamma the Div (the op
//! then gets a scale of ones).
//!
//! Check: the intermediates are read only inside the pattern (`d` by the square and the
//! division) and are no graph outputs; both means are over the last axis with keepdims;
//! x is f32; gamma and beta are constants of length 1 or the last dim.
//!
//! `ai.perqc::LayerNormalization` is ONNX `LayerNormalization` (opset 17) with one result:
//! per row `y = (x - mean) / sqrt(var + eps) · gamma + beta` (population variance), the
//! chain's operations up to summation order.

use super::{Pattern, canonical, same_op, scaled_by_reader, vector_len};
use perqc_ir::{AttrValue, Matcher, NodeId, Patch, PatchValue, Tensor, ValueId};

pub static PATTERN: Pattern = Pattern {
    name: "fuse-layer-norm",
    description: "(x - mean) / sqrt(var + eps) * gamma + beta, or LayerNormalization -> ai.perqc::LayerNormalization",
    rewrite,
};

fn rewrite(m: &Matcher<'_>, end: NodeId) -> Option<Patch> {
    if m.is_op(end, "LayerNormalization") {
        return same_op(m, end, "LayerNormalization", 3);
    }
    // With beta: Add(Mul(n, gamma), beta) or Add(n, beta).
    if m.is_op(end, "Add") {
        let (a, b) = m.two(end)?;
        if let Some((x, eps, gamma, beta)) = m.either(a, b, |scaled, beta| {
            let len = vector_len(m, beta)?;
            let (x, eps, gamma) = scaled_norm(m, scaled)?;
            fits(m, x, len).then_some((x, eps, gamma, beta))
        }) {
            return patch(m, end, x, eps, gamma, Some(beta));
        }
        return None;
    }
    // Without beta: Mul(n, gamma); without either: the division. Either is left to a later
    // anchor (gamma's Mul, beta's Add) when one reads it.
    if m.node(end)
        .output(0)
        .is_some_and(|y| scaled_by_reader(m, y, &["Mul", "Add"]))
    {
        return None;
    }
    if m.is_op(end, "Mul")
        && let Some((x, eps, gamma)) = {
            let (a, b) = m.two(end)?;
            m.either(a, b, |n, gamma| {
                let len = vector_len(m, gamma)?;
                let (x, eps) = normalization(m, m.sole(n)?)?;
                fits(m, x, len).then_some((x, eps, Some(gamma)))
            })
        }
    {
        return patch(m, end, x, eps, gamma, None);
    }
    let (x, eps) = normalization(m, end)?;
    patch(m, end, x, eps, None, None)
}

/// `v` is `Mul(n, gamma)` or `n` itself, n the normalization: `(x, eps, gamma)`.
fn scaled_norm(m: &Matcher<'_>, v: ValueId) -> Option<(ValueId, f32, Option<ValueId>)> {
    let j = m.sole(v)?;
    if m.is_op(j, "Mul")
        && let Some(r) = m.two(j).and_then(|(a, b)| {
            m.either(a, b, |n, gamma| {
                let len = vector_len(m, gamma)?;
                let (x, eps) = normalization(m, m.sole(n)?)?;
                fits(m, x, len).then_some((x, eps, Some(gamma)))
            })
        })
    {
        return Some(r);
    }
    let (x, eps) = normalization(m, j)?;
    Some((x, eps, None))
}

fn patch(
    m: &Matcher<'_>,
    end: NodeId,
    x: ValueId,
    eps: f32,
    gamma: Option<ValueId>,
    beta: Option<ValueId>,
) -> Option<Patch> {
    let mut p = Patch::new();
    let gamma: PatchValue = match gamma {
        Some(g) => g.into(),
        None => {
            let d = m.shape(x)?.last()?.known()?;
            let ones = vec![1.0; usize::try_from(d).ok()?];
            p.add_initializer("layer_norm_ones", Tensor::from_f32(vec![d], &ones))
        }
    };
    p.set_op(
        end,
        canonical("LayerNormalization")
            .attr("axis", AttrValue::Int(-1))
            .attr("epsilon", AttrValue::Float(eps)),
        [Some(x.into()), Some(gamma), beta.map(Into::into)],
    );
    Some(p)
}

/// A parameter of length `len` broadcasts over x's last axis.
fn fits(m: &Matcher<'_>, x: ValueId, len: usize) -> bool {
    len == 1
        || m.shape(x)
            .and_then(|s| s.last()?.known())
            .is_some_and(|d| d == len as i64)
}

/// A ReduceMean of `v` over the last axis of `x`'s rank, keepdims.
fn mean_over_last(m: &Matcher<'_>, rm: NodeId, rank: usize) -> bool {
    let axes = m.attr_or_input_ints(rm, "axes", 1);
    let last = axes.is_some_and(|a| a.len() == 1 && (a[0] == -1 || a[0] == rank as i64 - 1));
    last && m.node(rm).attr_int("keepdims").unwrap_or(1) == 1
}

/// `node` computes `(x - mean(x)) / sqrt(mean((x - mean(x))²) + eps)`: `(x, eps)`.
fn normalization(m: &Matcher<'_>, node: NodeId) -> Option<(ValueId, f32)> {
    let (d, den) = if m.is_op(node, "Div") {
        m.two(node)?
    } else if m.is_op(node, "Mul") {
        let (a, b) = m.two(node)?;
        m.either(a, b, |d, r| {
            let j = m.sole_op(r, "Reciprocal")?;
            Some((d, m.input(j, 0)?))
        })?
    } else {
        return None;
    };
    let sqrt = m.sole_op(den, "Sqrt")?;
    let add = m.sole_op(m.input(sqrt, 0)?, "Add")?;
    let (p, q) = m.two(add)?;
    let (var, eps) = m.either(p, q, |v, e| m.scalar(e).map(|e| (v, e)))?;
    let vm = m.sole_op(var, "ReduceMean")?;
    let sq_v = m.input(vm, 0)?;
    let sq = m.sole(sq_v)?;
    let (base, e) = m.two(sq)?;
    let is_square =
        (m.is_op(sq, "Pow") && m.scalar(e) == Some(2.0)) || (m.is_op(sq, "Mul") && e == base);
    if !is_square || base != d {
        return None;
    }
    // d = Sub(x, mean(x)), read by exactly the square and the division.
    let readers = m.graph.value(d).uses();
    let square_reads = if m.is_op(sq, "Mul") { 2 } else { 1 };
    if readers.len() != square_reads + 1 || m.graph.outputs.contains(&d) {
        return None;
    }
    let sub = m.producer(d).filter(|&s| m.is_op(s, "Sub"))?;
    let (x, mean) = m.two(sub)?;
    let mm = m.sole_op(mean, "ReduceMean")?;
    let rank = m.rank(x)?;
    let ok = m.input(mm, 0)? == x
        && mean_over_last(m, mm, rank)
        && mean_over_last(m, vm, rank)
        && m.is_f32(x);
    ok.then_some((x, eps))
}
