//! `forward-identity`: an `Identity`, or a `Cast` to the type its input already has, is its
//! input under another name.
//!
//! ```text
//! y = Identity(x)            ==   x          (every reader of y reads x)
//! y = Cast(x, to = type(x))  ==   x
//! ```
//!
//! The torchscript exporter writes one: it stores equal initializers once and gives every
//! other user an `Identity` of the kept one (the zero biases of a freshly initialized
//! model, tied weights), so a weight that is a constant reaches its layer as the result of
//! an op. Forwarded, the layer reads the constant itself, as the patterns and the
//! transforms need. The no-op Cast is what exporters write around norms, softmax and
//! position tables; one on the residual stream would keep `center-stream` from it.
//!
//! Check: default domain, one input, `Cast`'s `to` is the input's known element type, and `y`
//! is not a graph output (its name is part of the interface) nor read inside a subgraph
//! (which names it).

use super::Pattern;
use perqc_ir::{DType, Matcher, NodeId, Operand, Patch};

pub static PATTERN: Pattern = Pattern {
    name: "forward-identity",
    description: "Identity(x), Cast(x) to x's own type -> x (the readers read x)",
    rewrite,
};

fn rewrite(m: &Matcher<'_>, end: NodeId) -> Option<Patch> {
    let n = m.node(end);
    let (x, y) = (n.input(0)?, n.output(0)?);
    let noop_cast = m.is_op(end, "Cast")
        && n.attr_int("to")
            .and_then(|t| DType::from_code(t as i32))
            .is_some_and(|t| m.dtype(x) == Some(t));
    if !(m.is_op(end, "Identity") || noop_cast) {
        return None;
    }
    // A subgraph reads an outer value by its name: a captured result keeps its node.
    let captured = m
        .graph
        .value(y)
        .uses()
        .iter()
        .any(|u| matches!(u.operand, Operand::Capture(_)));
    if m.graph.outputs.contains(&y) || n.inputs().len() != 1 || captured {
        return None;
    }
    let mut p = Patch::new();
    p.replace(y, x.into());
    Some(p)
}
