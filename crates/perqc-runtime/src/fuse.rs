//! Plan-time fusion: rewrites chains of planned steps into one kernel from the op table.
//!
//! Only attention so far. Exporters write scaled dot-product attention as
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

/// Fuses attention chains in `steps` (in order; constants already folded into `consts`).
/// `keep[s]` marks slots that must stay materialized (graph outputs); `shapes` are the
/// graph's inferred shapes. Returns the slots that were fused away.
pub(crate) fn fuse_attention(
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
    let Some(attention) = ops::lookup("", "Attention", 23).and_then(|d| d.kernel) else {
        return Vec::new();
    };
    let mut dead = vec![false; steps.len()];
    let mut fused_slots = Vec::new();
    for i in 0..steps.len() {
        let Some(m) = match_chain(steps, i, consts, keep, &uses) else {
            continue;
        };
        let mut spec =
            NodeSpec::new("Attention").named(&format!("{} (fused attention)", steps[i].node.name));
        spec = spec.attr("scale", AttrValue::Float(m.scale));
        let mut g = Graph::new("fused");
        let Ok(id) = g.add_node(spec, &[], &["y"]) else {
            continue;
        };
        let st = &mut steps[i];
        st.node = g.node(id).clone();
        st.opset = 23;
        st.kernel = attention;
        // Grouped-query attention: read the shared K/V heads instead of their copies.
        let (k, v) = (
            ungroup(steps, m.k, consts, &uses),
            ungroup(steps, m.v, consts, &uses),
        );
        let (k, v) = match (k, v) {
            (Some((k, gk)), Some((v, gv))) if gk == gv => (k, v),
            _ => (m.k, m.v),
        };
        let st = &mut steps[i];
        st.inputs = vec![Some(m.q), Some(k), Some(v), m.mask];
        for &j in &m.absorbed_steps {
            dead[j] = true;
        }
        fused_slots.extend(m.absorbed_slots);
    }
    let mut i = 0;
    steps.retain(|_| {
        i += 1;
        !dead[i - 1]
    });
    drop_unread(steps, keep);
    fused_slots
}

/// Removes steps none of whose results is read (kernels are pure), last to first so
/// chains that only fed them go too.
fn drop_unread(steps: &mut Vec<Step>, keep: &[bool]) {
    let mut readers = vec![0usize; keep.len()];
    for st in steps.iter() {
        for &s in st.inputs.iter().flatten().chain(&st.captures) {
            readers[s] += 1;
        }
    }
    let mut dead = vec![false; steps.len()];
    for (i, st) in steps.iter().enumerate().rev() {
        if st
            .outputs
            .iter()
            .flatten()
            .all(|&s| readers[s] == 0 && !keep[s])
        {
            dead[i] = true;
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
