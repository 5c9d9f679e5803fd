//! Plan-time fusion: rewrites chains of planned steps into one step of an ONNX op whose
//! kernel is in the op table: attention (`Attention`, opset 23), RMS normalization
//! (`RMSNormalization`, opset 23; see [`rms_norm`]) and SiLU (`Swish`, opset 24; [`silu`]).
//!
//! Exporters write scaled dot-product attention as
//!
//! ```text
//! kt = Transpose(k, perm = [0, 1, 3, 2])
//! s  = MatMul(q, kt) ; s = Mul(s, c) ; s = Add(s, mask) ; p = Softmax(s, axis = -1)
//! p  = Cast(p, to = FLOAT)*            (torch.onnx writes two no-op casts)
//! y  = MatMul(p, v)
//! ```
//!
//! (`Mul` by a constant scalar and `Add` optional), which materializes and re-reads the
//! `[B, H, S, L]` scores five times. When k and v are key/value heads repeated for
//! grouped-query attention (`Reshape(Expand(Unsqueeze(x, [2])))`), the step reads the
//! shared heads `x` directly; steps left without readers (the copies and the shape
//! arithmetic that fed them) are dropped. The chain becomes one ONNX `Attention` (opset 23) step
//! with `scale = c`, whose kernel keeps each block of scores in cache and computes the same
//! formula (scores rounded once after scaling, as MatMul then Mul). It applies only when
//! every intermediate has that single reader and is no graph output, and q, k and v are
//! known to be 4-d. The intermediates no longer exist at run time; the session remembers
//! their slots so an observer asking for one gets an error instead of silence.

use crate::session::Step;
use perqc_ir::ops::kernels::attention::SOFTMAX_NAN_ROWS;
use perqc_ir::ops::{self, RtTensor, ShapeMap};
use perqc_ir::{AttrValue, Dim, Graph, NodeSpec};

/// Slot readers, the producing step of each slot, and inferred slot ranks.
struct Uses<'a> {
    readers: Vec<usize>,
    producer: Vec<Option<usize>>,
    shapes: &'a ShapeMap,
}

impl Uses<'_> {
    fn shape(&self, slot: usize) -> Option<&[Dim]> {
        self.shapes.shape(perqc_ir::ValueId::from_index(slot))
    }

    fn rank(&self, slot: usize) -> Option<usize> {
        self.shape(slot).map(<[_]>::len)
    }
}

/// Equal dims, known to be: the same number or the same symbol.
fn same(a: &Dim, b: &Dim) -> bool {
    !matches!(a, Dim::Unknown) && a == b
}

/// A chain ending at one step, to be replaced by one node of an opset-23 ONNX op.
struct Rewrite {
    op: &'static str,
    /// The ONNX opset of `op`'s version.
    opset: i64,
    attrs: Vec<(&'static str, AttrValue)>,
    inputs: Vec<Option<usize>>,
    /// Earlier steps of the chain and the slots they produced.
    absorbed_steps: Vec<usize>,
    absorbed_slots: Vec<usize>,
}

/// Matches a chain ending at step `end`.
type Matcher = fn(&[Step], usize, &Ctx<'_>) -> Option<Rewrite>;

/// What matchers read besides the steps.
struct Ctx<'a> {
    consts: &'a [Option<RtTensor>],
    keep: &'a [bool],
    uses: Uses<'a>,
}

/// Fuses chains in `steps` (in order; constants already folded into `consts`): attention
/// and RMS normalization. `keep[s]` marks slots that must stay materialized (graph
/// outputs); `shapes` are the graph's inferred shapes. Returns the slots fused away.
pub(crate) fn fuse(
    steps: &mut Vec<Step>,
    consts: &[Option<RtTensor>],
    keep: &[bool],
    shapes: &ShapeMap,
) -> Vec<usize> {
    let n = consts.len();
    let mut uses = Uses {
        readers: vec![0; n],
        producer: vec![None; n],
        shapes,
    };
    for (i, st) in steps.iter().enumerate() {
        for &s in st.inputs.iter().flatten().chain(&st.captures) {
            uses.readers[s] += 1;
        }
        for &s in st.outputs.iter().flatten() {
            uses.producer[s] = Some(i);
        }
    }
    let cx = Ctx { consts, keep, uses };
    let matchers: [Matcher; 3] = [attention, rms_norm, silu];
    let mut dead = vec![false; steps.len()];
    let mut fused_slots = Vec::new();
    for i in 0..steps.len() {
        // Chains are disjoint: every absorbed slot has its one reader inside the chain.
        let Some(rw) = matchers.iter().find_map(|m| m(steps, i, &cx)) else {
            continue;
        };
        let Some(kernel) = ops::lookup("", rw.op, rw.opset).and_then(|d| d.kernel) else {
            continue;
        };
        let mut spec =
            NodeSpec::new(rw.op).named(&format!("{} (fused {})", steps[i].node.name, rw.op));
        for (k, v) in rw.attrs {
            spec = spec.attr(k, v);
        }
        let mut g = Graph::new("fused");
        let Ok(id) = g.add_node(spec, &[], &["y"]) else {
            continue;
        };
        let st = &mut steps[i];
        st.node = g.node(id).clone();
        st.opset = rw.opset;
        st.kernel = kernel;
        st.inputs = rw.inputs;
        for &j in &rw.absorbed_steps {
            dead[j] = true;
        }
        fused_slots.extend(rw.absorbed_slots);
    }
    let mut i = 0;
    steps.retain(|_| {
        i += 1;
        !dead[i - 1]
    });
    fused_slots.extend(drop_unread(steps, keep));
    fused_slots
}

/// Attention: the chain in the module docs, ending at `MatMul(p, v)`.
fn attention(steps: &[Step], end: usize, cx: &Ctx<'_>) -> Option<Rewrite> {
    let m = match_chain(steps, end, cx.consts, cx.keep, &cx.uses)?;
    // Grouped-query attention: read the shared K/V heads instead of their copies.
    let (k, v) = match (
        ungroup(steps, m.k, cx.consts, &cx.uses),
        ungroup(steps, m.v, cx.consts, &cx.uses),
    ) {
        (Some((k, gk)), Some((v, gv))) if gk == gv => (k, v),
        _ => (m.k, m.v),
    };
    Some(Rewrite {
        op: "Attention",
        opset: 23,
        // The unfused Softmax makes a fully masked row NaN; ONNX Attention would give 0.
        attrs: vec![
            ("scale", AttrValue::Float(m.scale)),
            (SOFTMAX_NAN_ROWS, AttrValue::Int(1)),
        ],
        inputs: vec![Some(m.q), Some(k), Some(v), m.mask],
        absorbed_steps: m.absorbed_steps,
        absorbed_slots: m.absorbed_slots,
    })
}

/// SiLU: `Mul(x, Sigmoid(x))` (either operand order) becomes `Swish(x)` (opset 24,
/// alpha 1), one pass instead of two; the products are the same, so the result is too.
fn silu(steps: &[Step], end: usize, cx: &Ctx<'_>) -> Option<Rewrite> {
    let nd = &steps[end].node;
    if nd.op_type != "Mul" || !ops::canonical_domain(&nd.domain).is_empty() {
        return None;
    }
    let ins = &steps[end].inputs;
    let (a, b) = (
        ins.first().copied().flatten()?,
        ins.get(1).copied().flatten()?,
    );
    let sigmoid_of = |s: usize| -> Option<(usize, usize)> {
        let j = cx.uses.producer[s]?;
        let st = &steps[j];
        let ok = st.node.op_type == "Sigmoid"
            && ops::canonical_domain(&st.node.domain).is_empty()
            && cx.uses.readers[s] == 1
            && !cx.keep[s];
        ok.then_some((j, st.inputs.first().copied().flatten()?))
    };
    let (j, s, x) = match (sigmoid_of(b), sigmoid_of(a)) {
        (Some((j, x)), _) if x == a => (j, b, a),
        (_, Some((j, x))) if x == b => (j, a, b),
        _ => return None,
    };
    if cx.uses.shapes.dtype(perqc_ir::ValueId::from_index(x)) != Some(perqc_ir::DType::F32) {
        return None;
    }
    Some(Rewrite {
        op: "Swish",
        opset: 24,
        attrs: vec![("alpha", AttrValue::Float(1.0))],
        inputs: vec![Some(x)],
        absorbed_steps: vec![j],
        absorbed_slots: vec![s],
    })
}

/// The one f32 value of a constant slot holding a single element.
fn scalar(consts: &[Option<RtTensor>], slot: usize) -> Option<f32> {
    match consts[slot].as_ref()? {
        RtTensor::F32(c) if c.len() == 1 => c.iter().next().copied(),
        _ => None,
    }
}

/// RMS normalization as exporters write it, ending at the scale `Mul`:
///
/// ```text
/// r = Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2), axes = [-1], keepdims = 1), eps)))
///                                    (or Div(1, Sqrt(..)), as torch.onnx writes it)
/// y = Mul(Cast*(Mul(x, r)), scale)   scale: a constant of shape [D] or [1]; Casts to FLOAT
/// ```
///
/// becomes `RMSNormalization(x, scale, axis = -1, epsilon = eps)`, whose kernel computes the
/// same operations in the same order per row.
fn rms_norm(steps: &[Step], end: usize, cx: &Ctx<'_>) -> Option<Rewrite> {
    let is = |i: usize, op: &str| {
        let nd = &steps[i].node;
        nd.op_type == op && ops::canonical_domain(&nd.domain).is_empty()
    };
    let sole = |slot: usize| -> Option<usize> {
        let j = cx.uses.producer[slot]?;
        (cx.uses.readers[slot] == 1 && !cx.keep[slot] && steps[j].outputs.len() == 1).then_some(j)
    };
    let two = |i: usize| -> Option<(usize, usize)> {
        let ins = &steps[i].inputs;
        (ins.len() == 2).then_some((ins[0]?, ins[1]?))
    };
    let first = |i: usize| steps[i].inputs.first().copied().flatten();
    if !is(end, "Mul") {
        return None;
    }
    let (a, b) = two(end)?;
    let vector = |s: usize| match cx.consts[s].as_ref() {
        Some(RtTensor::F32(c)) => c.ndim() <= 1,
        _ => false,
    };
    let (normed, scale) = if vector(b) { (a, b) } else { (b, a) };
    if !vector(scale) {
        return None;
    }
    let mut absorbed_steps = Vec::new();
    let mut absorbed_slots = Vec::new();
    // Casts to FLOAT of the (f32) normalized value are identities.
    let mut normed = normed;
    while let Some(c) = sole(normed).filter(|&j| is(j, "Cast")) {
        if steps[c].node.attr_int("to") != Some(1) {
            return None;
        }
        absorbed_steps.push(c);
        absorbed_slots.push(normed);
        normed = first(c)?;
    }
    // `1 / s` as Reciprocal(s) or Div(1, s) (the same correctly rounded division): the
    // producing step and `s`.
    let one_over = |r: usize| -> Option<(usize, usize)> {
        let j = sole(r)?;
        if is(j, "Reciprocal") {
            return Some((j, first(j)?));
        }
        let (n, d) = two(j).filter(|_| is(j, "Div"))?;
        (scalar(cx.consts, n) == Some(1.0)).then_some((j, d))
    };
    let m1 = sole(normed).filter(|&j| is(j, "Mul"))?;
    let (a, b) = two(m1)?;
    // The other operand of the Mul is x.
    let (x, r) = if one_over(b).is_some() {
        (a, b)
    } else {
        (b, a)
    };
    let (rj, sqrt) = one_over(r)?;
    absorbed_steps.extend([m1, rj]);
    absorbed_slots.extend([normed, r]);
    let mut take = |slot: usize, op: &str| -> Option<usize> {
        let j = sole(slot)?;
        is(j, op).then(|| {
            absorbed_steps.push(j);
            absorbed_slots.push(slot);
            j
        })
    };
    let sj = take(sqrt, "Sqrt")?;
    let add = take(first(sj)?, "Add")?;
    let (a, b) = two(add)?;
    let (mean, eps) = match (scalar(cx.consts, a), scalar(cx.consts, b)) {
        (None, Some(e)) => (a, e),
        (Some(e), None) => (b, e),
        _ => return None,
    };
    let rm = take(mean, "ReduceMean")?;
    let rank = cx.uses.rank(x)? as i64;
    if cx.uses.shapes.dtype(perqc_ir::ValueId::from_index(x)) != Some(perqc_ir::DType::F32) {
        return None;
    }
    let axes: Vec<i64> = match steps[rm].node.attr_ints("axes") {
        Some(a) => a.to_vec(),
        None => cx.consts[steps[rm].inputs.get(1).copied().flatten()?]
            .as_ref()?
            .to_i64_vec()?,
    };
    let last_axis = axes.len() == 1 && (axes[0] == -1 || axes[0] == rank - 1);
    if !last_axis || steps[rm].node.attr_int("keepdims").unwrap_or(1) != 1 {
        return None;
    }
    let pw = take(first(rm)?, "Pow")?;
    let (base, e) = two(pw)?;
    if base != x || scalar(cx.consts, e) != Some(2.0) {
        return None;
    }
    // A length-1 scale broadcasts like the Mul; a longer one must be the last dim.
    let len = match cx.consts[scale].as_ref()? {
        RtTensor::F32(c) => c.len(),
        _ => return None,
    };
    let d = cx.uses.shape(x)?.last()?.known();
    if len != 1 && d != Some(len as i64) {
        return None;
    }
    Some(Rewrite {
        op: "RMSNormalization",
        opset: 23,
        attrs: vec![
            ("axis", AttrValue::Int(-1)),
            ("epsilon", AttrValue::Float(eps)),
        ],
        inputs: vec![Some(x), Some(scale)],
        absorbed_steps,
        absorbed_slots,
    })
}

/// Removes steps none of whose results is read (kernels are pure), last to first so
/// chains that only fed them go too. Returns the slots they would have produced.
fn drop_unread(steps: &mut Vec<Step>, keep: &[bool]) -> Vec<usize> {
    let mut readers = vec![0usize; keep.len()];
    for st in steps.iter() {
        for &s in st.inputs.iter().flatten().chain(&st.captures) {
            readers[s] += 1;
        }
    }
    let mut dead = vec![false; steps.len()];
    let mut gone = Vec::new();
    for (i, st) in steps.iter().enumerate().rev() {
        if st
            .outputs
            .iter()
            .flatten()
            .all(|&s| readers[s] == 0 && !keep[s])
        {
            dead[i] = true;
            gone.extend(st.outputs.iter().flatten());
            for &s in st.inputs.iter().flatten().chain(&st.captures) {
                readers[s] -= 1;
            }
        }
    }
    let mut i = 0;
    steps.retain(|_| {
        i += 1;
        !dead[i - 1]
    });
    gone
}

/// If `slot` is `Reshape(Expand(Unsqueeze(x, axes = [2]), [B, H, G, L, D]), [B, H·G, L, D])`
/// (how exporters repeat each of H key/value heads G times), returns `(x, G)`: head `h` of
/// the result is head `h / G` of `x`, which is how `Attention` maps query heads to
/// key/value heads.
fn ungroup(
    steps: &[Step],
    slot: usize,
    consts: &[Option<RtTensor>],
    uses: &Uses<'_>,
) -> Option<(usize, i64)> {
    let producer = |s: usize, op: &str| {
        let j = uses.producer[s]?;
        let nd = &steps[j].node;
        (nd.op_type == op && ops::canonical_domain(&nd.domain).is_empty()).then_some(j)
    };
    let first = |j: usize| steps[j].inputs.first().copied().flatten();
    let r = producer(slot, "Reshape")?;
    let expanded = first(r)?;
    let e = producer(expanded, "Expand")?;
    let unsqueezed = first(e)?;
    let u = producer(unsqueezed, "Unsqueeze")?;
    let x = first(u)?;
    let axes: Vec<i64> = match steps[u].node.attr_ints("axes") {
        Some(a) => a.to_vec(),
        None => consts[steps[u].inputs.get(1).copied().flatten()?]
            .as_ref()?
            .to_i64_vec()?,
    };
    let (xs, es, rs) = (uses.shape(x)?, uses.shape(expanded)?, uses.shape(slot)?);
    if axes != [2] || xs.len() != 4 || es.len() != 5 || rs.len() != 4 {
        return None;
    }
    let g = es[2].known()?;
    let heads_ok = match (xs[1].known(), rs[1].known()) {
        (Some(h), Some(hg)) => h * g == hg,
        _ => false,
    };
    let kept = [(0, 0), (1, 1), (2, 3), (3, 4)]
        .iter()
        .all(|&(a, b)| same(&xs[a], &es[b]));
    (heads_ok && kept && same(&rs[0], &xs[0]) && same(&rs[2], &xs[2]) && same(&rs[3], &xs[3]))
        .then_some((x, g))
}

struct Chain {
    q: usize,
    k: usize,
    v: usize,
    mask: Option<usize>,
    scale: f32,
    absorbed_steps: Vec<usize>,
    absorbed_slots: Vec<usize>,
}

/// Matches the chain ending in step `end` (the `MatMul(p, v)`), walking producers back.
fn match_chain(
    steps: &[Step],
    end: usize,
    consts: &[Option<RtTensor>],
    keep: &[bool],
    uses: &Uses<'_>,
) -> Option<Chain> {
    let is = |i: usize, op: &str| {
        let nd = &steps[i].node;
        nd.op_type == op && ops::canonical_domain(&nd.domain).is_empty()
    };
    // The producer of `slot` if it is a step whose only result is read once, here.
    let sole = |slot: usize| -> Option<usize> {
        let j = uses.producer[slot]?;
        (uses.readers[slot] == 1 && !keep[slot] && steps[j].outputs.len() == 1).then_some(j)
    };
    let ins = |i: usize| &steps[i].inputs;
    if !is(end, "MatMul") || ins(end).len() != 2 {
        return None;
    }
    let (mut p, v) = (ins(end)[0]?, ins(end)[1]?);
    let mut absorbed_steps = Vec::new();
    let mut absorbed_slots = Vec::new();
    // Casts to FLOAT of the (f32) softmax output are identities.
    let mut j = sole(p)?;
    while is(j, "Cast") && steps[j].node.attr_int("to") == Some(1) {
        absorbed_steps.push(j);
        absorbed_slots.push(p);
        p = ins(j).first().copied().flatten()?;
        j = sole(p)?;
    }
    let softmax = j;
    if !is(softmax, "Softmax")
        || steps[softmax].opset < 13
        || steps[softmax].node.attr_int("axis").unwrap_or(-1) != -1
    {
        return None;
    }
    absorbed_steps.push(softmax);
    absorbed_slots.push(p);
    let mut s = ins(softmax).first().copied().flatten()?;
    let mut j = sole(s)?;
    let mut mask = None;
    if is(j, "Add") {
        // The scores come from the Mul / MatMul chain; the other operand is the mask.
        let (a, b) = (
            ins(j).first().copied().flatten()?,
            ins(j).get(1).copied().flatten()?,
        );
        let from_chain = |x: usize| sole(x).is_some_and(|k| is(k, "Mul") || is(k, "MatMul"));
        let (scores, m) = if from_chain(a) { (a, b) } else { (b, a) };
        if !from_chain(scores) {
            return None;
        }
        mask = Some(m);
        absorbed_steps.push(j);
        absorbed_slots.push(s);
        s = scores;
        j = sole(s)?;
    }
    let mut scale = 1.0f32;
    if is(j, "Mul") {
        let (a, b) = (
            ins(j).first().copied().flatten()?,
            ins(j).get(1).copied().flatten()?,
        );
        let scalar = |x: usize| match consts[x].as_ref() {
            Some(RtTensor::F32(c)) if c.len() == 1 => c.iter().next().copied(),
            _ => None,
        };
        let (scores, c) = match (scalar(a), scalar(b)) {
            (_, Some(c)) => (a, c),
            (Some(c), None) => (b, c),
            _ => return None,
        };
        scale = c;
        absorbed_steps.push(j);
        absorbed_slots.push(s);
        s = scores;
        j = sole(s)?;
    }
    if !is(j, "MatMul") {
        return None;
    }
    absorbed_steps.push(j);
    absorbed_slots.push(s);
    let (q, kt) = (
        ins(j).first().copied().flatten()?,
        ins(j).get(1).copied().flatten()?,
    );
    let t = sole(kt)?;
    if !is(t, "Transpose") || steps[t].node.attr_ints("perm") != Some(&[0, 1, 3, 2][..]) {
        return None;
    }
    absorbed_steps.push(t);
    absorbed_slots.push(kt);
    let k = ins(t).first().copied().flatten()?;
    // Ranks the kernel handles; a mask of higher rank would have broadcast the scores up.
    if [q, k, v].iter().any(|&x| uses.rank(x) != Some(4))
        || mask.is_some_and(|m| uses.rank(m).is_none_or(|r| r > 4))
    {
        return None;
    }
    Some(Chain {
        q,
        k,
        v,
        mask,
        scale,
        absorbed_steps,
        absorbed_slots,
    })
}
