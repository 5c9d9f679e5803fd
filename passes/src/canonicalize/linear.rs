//! `fuse-linear`: linear layers in their exported spellings.
//!
//! ```text
//! MatMul(x, W)                               == Linear(x, W)              W constant [K, N]
//! MatMul(x, Transpose(W, perm = [1, 0]))     == Linear(x, W, transB = 1)  W constant [N, K]
//! Gemm(x, W, b?, transB) (alpha = beta = 1)  == Linear(x, W, b?, transB)
//! Add(Linear(x, W), b)   (either order)      == Linear(x, W, b)           b constant [N]
//! ```
//!
//! The weight stays in the layout it was stored in (torch's `[out, in]` behind a Transpose,
//! as the dynamo exporter writes a tied lm_head, is read with transB, not copied). The bias
//! Add fuses after the MatMul became a Linear (node order visits the MatMul first).
//!
//! Check: W is a 2-d f32 constant (initializer or `Constant`); for Gemm transA = 0 and
//! alpha = beta = 1 with a bias of shape `[N]` or `[1, N]`; for Add the bias is a constant
//! `[N]` and the Linear's result has that Add as its only reader.
//!
//! `ai.perqc::Linear(x, W, bias?)` computes `x W` (`x Wᵀ` with transB) over x's last axis,
//! then adds the bias: MatMul's products and Gemm's (whose bias is added in the same f32
//! rounding), up to the summation order of the product.

use super::{Pattern, canonical};
use perqc_ir::{AttrValue, DType, Matcher, NodeId, Patch, ValueId};

pub static PATTERN: Pattern = Pattern {
    name: "fuse-linear",
    description: "MatMul / Gemm with a constant weight (+ bias Add) -> ai.perqc::Linear",
    rewrite,
};

/// A 2-d f32 constant weight: its dims.
fn weight(m: &Matcher<'_>, w: ValueId) -> Option<[i64; 2]> {
    let t = m.graph.const_tensor(w)?;
    (t.dtype == DType::F32 && t.dims.len() == 2).then(|| [t.dims[0], t.dims[1]])
}

fn linear(
    x: ValueId,
    w: ValueId,
    bias: Option<ValueId>,
    trans: bool,
) -> (perqc_ir::NodeSpec, [Option<perqc_ir::PatchValue>; 3]) {
    (
        canonical("Linear").attr("transB", AttrValue::Int(trans as i64)),
        [Some(x.into()), Some(w.into()), bias.map(Into::into)],
    )
}

fn rewrite(m: &Matcher<'_>, end: NodeId) -> Option<Patch> {
    let (spec, inputs) = if m.is_op(end, "MatMul") {
        let (x, b) = m.two(end)?;
        if !m.is_f32(x) || m.rank(x).is_none_or(|r| r < 1) {
            return None;
        }
        match weight(m, b) {
            Some(_) => linear(x, b, None, false),
            None => {
                let t = m.def_op(b, "Transpose")?;
                let w = m.input(t, 0)?;
                let perm = m.node(t).attr_ints("perm");
                if !matches!(perm, None | Some([1, 0])) {
                    return None;
                }
                weight(m, w)?;
                linear(x, w, None, true)
            }
        }
    } else if m.is_op(end, "Gemm") {
        let n = m.node(end);
        let (x, w) = (n.input(0)?, n.input(1)?);
        let trans = n.attr_int("transB").unwrap_or(0) != 0;
        if n.attr_int("transA").unwrap_or(0) != 0
            || n.attr_float("alpha").unwrap_or(1.0) != 1.0
            || n.attr_float("beta").unwrap_or(1.0) != 1.0
            || !m.is_f32(x)
        {
            return None;
        }
        let dims = weight(m, w)?;
        let cols = if trans { dims[0] } else { dims[1] };
        let bias = n.input(2);
        if let Some(b) = bias {
            let t = m.graph.const_tensor(b)?;
            let ok = t.dtype == DType::F32 && (t.dims == [cols] || t.dims == [1, cols]);
            if !ok {
                return None;
            }
        }
        linear(x, w, bias, trans)
    } else if m.is_op(end, "Add") {
        let (a, b) = m.two(end)?;
        m.either(a, b, |y, bias| {
            let l = m.sole(y)?;
            let ln = m.node(l);
            if ln.domain != perqc_ops::PERQC_DOMAIN
                || ln.op_type != "Linear"
                || ln.input(2).is_some()
            {
                return None;
            }
            let (x, w) = (ln.input(0)?, ln.input(1)?);
            let trans = ln.attr_int("transB").unwrap_or(0) != 0;
            let dims = weight(m, w)?;
            let t = m.graph.const_tensor(bias)?;
            let cols = if trans { dims[0] } else { dims[1] };
            (t.dtype == DType::F32 && t.dims == [cols]).then(|| linear(x, w, Some(bias), trans))
        })?
    } else {
        return None;
    };
    let mut p = Patch::new();
    p.set_op(end, spec, inputs);
    Some(p)
}
