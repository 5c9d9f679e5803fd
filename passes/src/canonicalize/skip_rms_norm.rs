//! `fuse-skip-rms-norm`: ONNX Runtime's fused residual add and RMS norm.
//!
//! ```text
//! com.microsoft::SkipSimplifiedLayerNormalization(x, skip, gamma, bias?)
//!   == (ai.perqc::RMSNormalization(s, gamma, epsilon), s)  with  s = Add(Add(x, skip), bias?)
//! ```
//!
//! Result 0 is the normalized sum, result 3 (`input_skip_bias_sum`) the sum itself, which
//! the next layer's residual reads; results 1 and 2 (mean, inverse std) must be unread.
//! Splitting the op exposes the residual stream as an ordinary Add, which the region
//! analysis follows like an exported model's.
//!
//! Check: the operands are f32; results 1 and 2 are unread; the sum is no graph output.

use super::{Pattern, canonical};
use perqc_ir::{AttrValue, Matcher, NodeId, NodeSpec, Patch};

pub static PATTERN: Pattern = Pattern {
    name: "fuse-skip-rms-norm",
    description: "com.microsoft::SkipSimplifiedLayerNormalization -> Add + ai.perqc::RMSNormalization",
    rewrite,
};

fn rewrite(m: &Matcher<'_>, end: NodeId) -> Option<Patch> {
    let n = m.node(end);
    if n.domain != "com.microsoft" || n.op_type != "SkipSimplifiedLayerNormalization" {
        return None;
    }
    let (x, skip, gamma) = (n.input(0)?, n.input(1)?, n.input(2)?);
    let outs = n.outputs();
    let read = |k: usize| {
        outs.get(k)
            .copied()
            .flatten()
            .is_some_and(|o| !m.graph.value(o).uses().is_empty() || m.graph.outputs.contains(&o))
    };
    // The sum takes a new name: a graph output keeps its own, so it must not be one.
    let sum_is_output = outs
        .get(3)
        .copied()
        .flatten()
        .is_some_and(|o| m.graph.outputs.contains(&o));
    // x, skip and gamma share one type (T); the first two may come from an earlier split
    // (a fresh Add without inferred facts), gamma is an initializer with a declared type.
    let f32 = [x, skip, gamma].iter().any(|&v| m.is_f32(v));
    if read(1) || read(2) || sum_is_output || !f32 {
        return None;
    }
    let eps = n.attr_float("epsilon").unwrap_or(1e-5);
    let mut p = Patch::new();
    let mut sum = p.insert(
        end,
        NodeSpec::new("Add"),
        [Some(x.into()), Some(skip.into())],
        &["skip_sum"],
    )[0];
    if let Some(bias) = n.input(3) {
        sum = p.insert(
            end,
            NodeSpec::new("Add"),
            [Some(sum), Some(bias.into())],
            &["skip_bias_sum"],
        )[0];
    }
    if let Some(s) = outs.get(3).copied().flatten() {
        p.replace(s, sum);
    }
    p.truncate_outputs(end, 1);
    p.set_op(
        end,
        canonical("RMSNormalization")
            .attr("axis", AttrValue::Int(-1))
            .attr("epsilon", AttrValue::Float(eps)),
        [Some(sum), Some(gamma.into())],
    );
    Some(p)
}
