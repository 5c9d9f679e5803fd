//! `fuse-gelu`: GELU in its exported spellings and contrib ops.
//!
//! ```text
//! x · 0.5 · (1 + Erf(x / √2))                                 == Gelu(x)
//! x · 0.5 · (1 + Tanh(√(2/π) · (x + 0.044715 · x³)))          == Gelu(x, approximate = "tanh")
//! com.microsoft::Gelu(x), ONNX Gelu (opset 20)                 == Gelu(x[, approximate])
//! com.microsoft::FastGelu(x) (no bias)                         == Gelu(x, approximate = "tanh")
//! ```
//!
//! The product may be associated and ordered any way (`Mul(Mul(x, a), 0.5)`,
//! `Mul(Mul(0.5, x), a)`, ...), `x / √2` may be `x · (1/√2)`, `x³` may be `Pow(x, 3)` or
//! `x · x · x`, and every Add may take its operands in either order. Constants are checked
//! to float precision (`|c - c₀| <= 1e-6 |c₀|`).
//!
//! Check: every intermediate is read only inside the pattern and is no graph output; x is
//! f32.
//!
//! `ai.perqc::Gelu` is ONNX `Gelu` (opset 20). Its kernel computes the same formula in
//! f32; the order of the three products may differ from the exported chain (a round-off
//! difference).

use super::{Pattern, canonical};
use perqc_ir::{AttrValue, Matcher, NodeId, Patch, ValueId};

pub static PATTERN: Pattern = Pattern {
    name: "fuse-gelu",
    description: "GELU (erf or tanh form, com.microsoft Gelu/FastGelu, ONNX Gelu) -> ai.perqc::Gelu",
    rewrite,
};

const SQRT_2: f32 = std::f32::consts::SQRT_2;
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const CUBIC: f32 = 0.044_715;

fn close(c: Option<f32>, want: f32) -> bool {
    c.is_some_and(|c| (c - want).abs() <= 1e-6 * want.abs())
}

fn rewrite(m: &Matcher<'_>, end: NodeId) -> Option<Patch> {
    let node = m.node(end);
    let op = (node.domain.as_str(), node.op_type.as_str());
    let approximate = match op {
        ("com.microsoft", "Gelu") => Some("none"),
        ("com.microsoft", "FastGelu") if node.input(1).is_none() => Some("tanh"),
        ("" | "ai.onnx", "Gelu") => Some(
            node.attr_str("approximate")
                .map_or("none", |a| if a == b"tanh" { "tanh" } else { "none" }),
        ),
        _ => None,
    };
    if let Some(approximate) = approximate {
        let x = node.input(0)?;
        return m.is_f32(x).then(|| patch(end, x, approximate));
    }
    if !m.is_op(end, "Mul") {
        return None;
    }
    // The product's factors, expanding single-reader Muls: x, 0.5 and (1 + f(x)).
    let mut factors = Vec::new();
    let (a, b) = m.two(end)?;
    flatten(m, a, &mut factors, 3)?;
    flatten(m, b, &mut factors, 3)?;
    if factors.len() != 3 {
        return None;
    }
    let half = factors.iter().position(|&f| close(m.scalar(f), 0.5))?;
    factors.remove(half);
    let (x, approximate) = m.either(factors[0], factors[1], |x, s| {
        let add = m.sole_op(s, "Add")?;
        let (p, q) = m.two(add)?;
        let f = m.either(p, q, |f, one| close(m.scalar(one), 1.0).then_some(f))?;
        if let Some(erf) = m.sole_op(f, "Erf") {
            return (scaled_input(m, m.input(erf, 0)?, 1.0 / SQRT_2)? == x).then_some((x, "none"));
        }
        let tanh = m.sole_op(f, "Tanh")?;
        (tanh_argument(m, m.input(tanh, 0)?)? == x).then_some((x, "tanh"))
    })?;
    m.is_f32(x).then(|| patch(end, x, approximate))
}

fn patch(end: NodeId, x: ValueId, approximate: &str) -> Patch {
    let mut p = Patch::new();
    p.set_op(
        end,
        canonical("Gelu").attr(
            "approximate",
            AttrValue::String(approximate.as_bytes().to_vec().into()),
        ),
        [Some(x.into())],
    );
    // com.microsoft Gelu and ONNX Gelu have one result, like the canonical op.
    p
}

/// Pushes the factors of `v`: itself, or those of a single-reader `Mul` producing it.
fn flatten(m: &Matcher<'_>, v: ValueId, out: &mut Vec<ValueId>, budget: usize) -> Option<()> {
    match m.sole_op(v, "Mul") {
        Some(mul) if budget > 0 => {
            let (a, b) = m.two(mul)?;
            flatten(m, a, out, budget - 1)?;
            flatten(m, b, out, budget - 1)
        }
        _ => {
            out.push(v);
            (out.len() <= 3).then_some(())
        }
    }
}

/// `v` is `x · c` or `x / (1/c)` for the constant `c`: returns x.
fn scaled_input(m: &Matcher<'_>, v: ValueId, c: f32) -> Option<ValueId> {
    if let Some(d) = m.sole_op(v, "Div") {
        let (x, k) = m.two(d)?;
        return close(m.scalar(k), 1.0 / c).then_some(x);
    }
    let mul = m.sole_op(v, "Mul")?;
    let (a, b) = m.two(mul)?;
    m.either(a, b, |x, k| close(m.scalar(k), c).then_some(x))
}

/// `v` is `√(2/π) · (x + 0.044715 · x³)`: returns x.
fn tanh_argument(m: &Matcher<'_>, v: ValueId) -> Option<ValueId> {
    let inner = {
        let mul = m.sole_op(v, "Mul")?;
        let (a, b) = m.two(mul)?;
        m.either(a, b, |u, k| close(m.scalar(k), SQRT_2_OVER_PI).then_some(u))?
    };
    let add = m.sole_op(inner, "Add")?;
    let (p, q) = m.two(add)?;
    m.either(p, q, |x, w| {
        let mul = m.sole_op(w, "Mul")?;
        let (a, b) = m.two(mul)?;
        let cube = m.either(a, b, |c, k| close(m.scalar(k), CUBIC).then_some(c))?;
        (is_cube_of(m, cube, x)).then_some(x)
    })
}

/// `v` is `Pow(x, 3)`, `Mul(Mul(x, x), x)` or `Mul(x, Mul(x, x))`.
fn is_cube_of(m: &Matcher<'_>, v: ValueId, x: ValueId) -> bool {
    if let Some(p) = m.sole_op(v, "Pow") {
        return m
            .two(p)
            .is_some_and(|(b, e)| b == x && m.scalar(e) == Some(3.0));
    }
    let Some(mul) = m.sole_op(v, "Mul") else {
        return false;
    };
    let square = |s: ValueId| {
        m.sole_op(s, "Mul")
            .and_then(|sq| m.two(sq))
            .is_some_and(|(a, b)| a == x && b == x)
    };
    m.two(mul)
        .and_then(|(a, b)| m.either(a, b, |s, o| (o == x && square(s)).then_some(())))
        .is_some()
}
