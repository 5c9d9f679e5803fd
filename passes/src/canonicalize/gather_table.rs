//! `gather-table`: a lookup table stored transposed, as ONNX Runtime's model builder writes a
//! tied embedding (`Gather(Transpose(W_head), ids)` with the LM head's `W_head [K, V]`).
//!
//! ```text
//! Gather(Transpose(W, perm = [1, 0]), ids, axis = 0)  ==  Gather(Wᵀ, ids, axis = 0)
//! ```
//!
//! with `Wᵀ [V, K]` stored as an initializer of its own, the table every other export has:
//! the quantizer's embedding option and `tie-head` find lookup tables as constants read by a
//! Gather, and the recipe's transforms untie such a pair anyway (the table takes `E R`, the
//! head `Rᵀ diag(γ) Eᵀ`); `tie-head` then lets the head read the table again, so the
//! emitted file holds one copy. The values are moved, not computed: the lookups are the
//! same bits.
//!
//! Check: W is a 2-d f32 constant; the Transpose swaps its two axes; the Gather is along
//! axis 0.

use super::Pattern;
use perqc_ir::{AttrValue, Matcher, NodeId, NodeSpec, Patch, Tensor};

pub static PATTERN: Pattern = Pattern {
    name: "gather-table",
    description: "Gather(Transpose(W), ids) of a constant 2-d W -> Gather(Wᵀ stored, ids)",
    rewrite,
};

fn rewrite(m: &Matcher<'_>, end: NodeId) -> Option<Patch> {
    let n = m.node(end);
    if !m.is_op(end, "Gather") || n.attr_int("axis").unwrap_or(0) != 0 {
        return None;
    }
    let t = m.def_op(n.input(0)?, "Transpose")?;
    let w = m.input(t, 0)?;
    let perm = m.node(t).attr_ints("perm");
    if !matches!(perm, None | Some([1, 0])) {
        return None;
    }
    let table = m.constant(w)?;
    if table.dtype != perqc_ir::DType::F32 || table.dims.len() != 2 {
        return None;
    }
    let (rows, cols) = (table.dims[0] as usize, table.dims[1] as usize);
    let values = table.to_f32().ok()?;
    let mut moved = vec![0f32; values.len()];
    for (r, row) in values.chunks_exact(cols.max(1)).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            moved[c * rows + r] = v;
        }
    }
    let name = format!("{}/transposed", m.graph.value(w).name);
    let mut p = Patch::new();
    let stored = p.add_initializer(
        &name,
        Tensor::from_f32(vec![cols as i64, rows as i64], &moved),
    );
    let ids = n.input(1)?;
    p.set_op(
        end,
        NodeSpec::new("Gather").attr("axis", AttrValue::Int(0)),
        [Some(stored), Some(ids.into())],
    );
    Some(p)
}
