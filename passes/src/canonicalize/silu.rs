//! `fuse-silu`: SiLU as exporters write it.
//!
//! ```text
//! Mul(x, Sigmoid(x))  ==  ai.perqc::Swish(x, alpha = 1)      (either operand order)
//! ```
//!
//! Check: the Sigmoid's result is read only by the Mul; x is f32.
//!
//! `ai.perqc::Swish` is ONNX `Swish` (opset 24), `x · sigmoid(alpha · x)`; with alpha 1
//! its kernel computes the same product of the same two roundings, so the result is
//! bitwise the chain's.

use super::{Pattern, canonical};
use perqc_ir::{AttrValue, Matcher, NodeId, Patch};

pub static PATTERN: Pattern = Pattern {
    name: "fuse-silu",
    description: "Mul(x, Sigmoid(x)) -> ai.perqc::Swish(alpha = 1)",
    rewrite,
};

fn rewrite(m: &Matcher<'_>, end: NodeId) -> Option<Patch> {
    if !m.is_op(end, "Mul") {
        return None;
    }
    let (a, b) = m.two(end)?;
    let x = m.either(a, b, |x, s| {
        let sig = m.sole_op(s, "Sigmoid")?;
        (m.input(sig, 0)? == x).then_some(x)
    })?;
    if !m.is_f32(x) {
        return None;
    }
    let mut p = Patch::new();
    p.set_op(
        end,
        canonical("Swish").attr("alpha", AttrValue::Float(1.0)),
        [Some(x.into())],
    );
    Some(p)
}
