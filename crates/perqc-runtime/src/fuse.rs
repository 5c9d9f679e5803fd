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
use perqc_ir::{AttrValue, Dim, Graph, NodeSpec};
use perqc_ops::kernels::attention::SOFTMAX_NAN_ROWS;
use perqc_ops::{self as ops, RtTensor, ShapeMap};

/// The plan as matchers see it: steps, constants, slot readers and producers, shapes.
struct Plan<'a> {
    steps: &'a [Step],
    consts: &'a [Option<RtTensor>],
    /// Slots that must stay materialized (graph outputs).
    keep: &'a [bool],
    readers: Vec<usize>,
    producer: Vec<Option<usize>>,
    shapes: &'a ShapeMap,
}

impl Plan<'_> {
    /// Step `j` is the default-domain op `op`.
    fn is(&self, j: usize, op: &str) -> bool {
        let nd = &self.steps[j].node;
        nd.op_type == op && ops::canonical_domain(&nd.domain).is_empty()
    }

    /// Input `i` of step `j`, if present.
    fn input(&self, j: usize, i: usize) -> Option<usize> {
        self.steps[j].inputs.get(i).copied().flatten()
    }

    /// Both inputs of a two-input step.
    fn two(&self, j: usize) -> Option<(usize, usize)> {
        (self.steps[j].inputs.len() == 2).then_some((self.input(j, 0)?, self.input(j, 1)?))
    }

    /// The producer of `slot` if it is a one-result step whose result is read once (by the
    /// chain being matched) and is no graph output: a step the chain may absorb.
    fn sole(&self, slot: usize) -> Option<usize> {
        let j = self.producer[slot]?;
        (self.readers[slot] == 1 && !self.keep[slot] && self.steps[j].outputs.len() == 1)
            .then_some(j)
    }

    /// [`Plan::sole`] when that step is `op`.
    fn sole_op(&self, slot: usize, op: &str) -> Option<usize> {
        self.sole(slot).filter(|&j| self.is(j, op))
    }

    /// The one f32 value of a constant slot holding a single element.
    fn scalar(&self, slot: usize) -> Option<f32> {
        match self.consts[slot].as_ref()? {
            RtTensor::F32(c) if c.len() == 1 => c.iter().next().copied(),
            _ => None,
        }
    }

    /// Integer list given as attribute `name` (older opsets) or as constant input `i`.
    fn ints(&self, j: usize, name: &str, i: usize) -> Option<Vec<i64>> {
        match self.steps[j].node.attr_ints(name) {
            Some(a) => Some(a.to_vec()),
            None => self.consts[self.input(j, i)?].as_ref()?.to_i64_vec(),
        }
    }

    fn shape(&self, slot: usize) -> Option<&[Dim]> {
        self.shapes.shape(perqc_ir::ValueId::from_index(slot))
    }

    fn rank(&self, slot: usize) -> Option<usize> {
        self.shape(slot).map(<[_]>::len)
    }

    fn is_f32(&self, slot: usize) -> bool {
        self.shapes.dtype(perqc_ir::ValueId::from_index(slot)) == Some(perqc_ir::DType::F32)
    }
}

/// Equal dims, known to be: the same number or the same symbol.
fn same(a: &Dim, b: &Dim) -> bool {
    !matches!(a, Dim::Unknown) && a == b
}

/// A chain ending at one step, to be replaced by one node of an ONNX op.
struct Rewrite {
    op: &'static str,
    /// The ONNX opset of `op`'s version.
    opset: i64,
    attrs: Vec<(&'static str, AttrValue)>,
    inputs: Vec<Option<usize>>,
    absorbed: Absorbed,
}

/// Earlier steps of a chain and the slots they produced.
#[derive(Default)]
struct Absorbed {
    steps: Vec<usize>,
    slots: Vec<usize>,
}

impl Absorbed {
    /// Absorbs step `j`, the producer of `slot`; returns `j`.
    fn take(&mut self, slot: usize, j: usize) -> usize {
        self.steps.push(j);
        self.slots.push(slot);
        j
    }

    /// Walks back over no-op `Cast(to = FLOAT)` steps from an f32 `slot`, absorbing them;
    /// returns the slot they start from.
    fn float_casts(&mut self, plan: &Plan<'_>, mut slot: usize) -> Option<usize> {
        while let Some(c) = plan.sole_op(slot, "Cast") {
            if plan.steps[c].node.attr_int("to") != Some(1) {
                break;
            }
            self.take(slot, c);
            slot = plan.input(c, 0)?;
        }
        Some(slot)
    }
}

/// Matches a chain ending at step `end`.
type Matcher = fn(&Plan<'_>, usize) -> Option<Rewrite>;

/// Fuses chains in `steps` (in order; constants already folded into `consts`): attention,
/// RMS normalization, SiLU. `keep[s]` marks slots that must stay materialized (graph
/// outputs); `shapes` are the graph's inferred shapes. Returns the slots fused away.
pub(crate) fn fuse(
    steps: &mut Vec<Step>,
    consts: &[Option<RtTensor>],
    keep: &[bool],
    shapes: &ShapeMap,
) -> Vec<usize> {
    let n = consts.len();
    let (mut readers, mut producer) = (vec![0; n], vec![None; n]);
    for (i, st) in steps.iter().enumerate() {
        for &s in st.inputs.iter().flatten().chain(&st.captures) {
            readers[s] += 1;
        }
        for &s in st.outputs.iter().flatten() {
            producer[s] = Some(i);
        }
    }
    let matchers: [Matcher; 3] = [attention, rms_norm, silu];
    let mut rewrites = Vec::new();
    {
        let plan = Plan {
            steps,
            consts,
            keep,
            readers,
            producer,
            shapes,
        };
        // Chains are disjoint: every absorbed slot has its one reader inside the chain.
        for i in 0..steps.len() {
            if let Some(rw) = matchers.iter().find_map(|m| m(&plan, i)) {
                rewrites.push((i, rw));
            }
        }
    }
    let mut dead = vec![false; steps.len()];
    let mut fused_slots = Vec::new();
    for (i, rw) in rewrites {
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
        for &j in &rw.absorbed.steps {
            dead[j] = true;
        }
        fused_slots.extend(rw.absorbed.slots);
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
fn attention(plan: &Plan<'_>, end: usize) -> Option<Rewrite> {
    if !plan.is(end, "MatMul") {
        return None;
    }
    let (p, v) = plan.two(end)?;
    let mut ab = Absorbed::default();
    let p = ab.float_casts(plan, p)?;
    let softmax = plan.sole_op(p, "Softmax")?;
    let sm = &plan.steps[softmax];
    if sm.opset < 13 || sm.node.attr_int("axis").unwrap_or(-1) != -1 {
        return None;
    }
    ab.take(p, softmax);
    let mut s = plan.input(softmax, 0)?;
    let mut mask = None;
    if let Some(add) = plan.sole_op(s, "Add") {
        // The scores come from the Mul / MatMul chain; the other operand is the mask.
        let (a, b) = plan.two(add)?;
        let scores_from = |x: usize| plan.sole_op(x, "Mul").or(plan.sole_op(x, "MatMul"));
        let (scores, m) = if scores_from(a).is_some() {
            (a, b)
        } else {
            (b, a)
        };
        scores_from(scores)?;
        mask = Some(m);
        ab.take(s, add);
        s = scores;
    }
    let mut scale = 1.0f32;
    if let Some(mul) = plan.sole_op(s, "Mul") {
        let (a, b) = plan.two(mul)?;
        let (scores, c) = match (plan.scalar(a), plan.scalar(b)) {
            (_, Some(c)) => (a, c),
            (Some(c), None) => (b, c),
            _ => return None,
        };
        scale = c;
        ab.take(s, mul);
        s = scores;
    }
    let qk = ab.take(s, plan.sole_op(s, "MatMul")?);
    let (q, kt) = plan.two(qk)?;
    let t = plan.sole_op(kt, "Transpose")?;
    if plan.steps[t].node.attr_ints("perm") != Some(&[0, 1, 3, 2][..]) {
        return None;
    }
    ab.take(kt, t);
    let k = plan.input(t, 0)?;
    // Ranks the kernel handles; a mask of higher rank would have broadcast the scores up.
    if [q, k, v].iter().any(|&x| plan.rank(x) != Some(4))
        || mask.is_some_and(|m| plan.rank(m).is_none_or(|r| r > 4))
    {
        return None;
    }
    // Grouped-query attention: read the shared K/V heads instead of their copies.
    let (k, v) = match (ungroup(plan, k), ungroup(plan, v)) {
        (Some((k, gk)), Some((v, gv))) if gk == gv => (k, v),
        _ => (k, v),
    };
    Some(Rewrite {
        op: "Attention",
        opset: 23,
        // The unfused Softmax makes a fully masked row NaN; ONNX Attention would give 0.
        attrs: vec![
            ("scale", AttrValue::Float(scale)),
            (SOFTMAX_NAN_ROWS, AttrValue::Int(1)),
        ],
        inputs: vec![Some(q), Some(k), Some(v), mask],
        absorbed: ab,
    })
}

/// SiLU: `Mul(x, Sigmoid(x))` (either operand order) becomes `Swish(x)` (opset 24,
/// alpha 1), one pass instead of two; the products are the same, so the result is too.
fn silu(plan: &Plan<'_>, end: usize) -> Option<Rewrite> {
    if !plan.is(end, "Mul") {
        return None;
    }
    let (a, b) = plan.two(end)?;
    // (sigmoid slot, its step, x) when the other operand is the Sigmoid's input.
    let sigmoid_of = |s: usize, other: usize| {
        let j = plan.sole_op(s, "Sigmoid")?;
        (plan.input(j, 0)? == other).then_some((s, j, other))
    };
    let (s, j, x) = sigmoid_of(b, a).or_else(|| sigmoid_of(a, b))?;
    if !plan.is_f32(x) {
        return None;
    }
    let mut ab = Absorbed::default();
    ab.take(s, j);
    Some(Rewrite {
        op: "Swish",
        opset: 24,
        attrs: vec![("alpha", AttrValue::Float(1.0))],
        inputs: vec![Some(x)],
        absorbed: ab,
    })
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
fn rms_norm(plan: &Plan<'_>, end: usize) -> Option<Rewrite> {
    if !plan.is(end, "Mul") {
        return None;
    }
    let (a, b) = plan.two(end)?;
    // The scale: a constant vector, of length 1 (broadcast like the Mul) or the last dim.
    let scale_len = |s: usize| match plan.consts[s].as_ref() {
        Some(RtTensor::F32(c)) if c.ndim() <= 1 => Some(c.len()),
        _ => None,
    };
    let (normed, scale) = if scale_len(b).is_some() {
        (a, b)
    } else {
        (b, a)
    };
    let len = scale_len(scale)?;
    let mut ab = Absorbed::default();
    let normed = ab.float_casts(plan, normed)?;
    // `1 / s` as Reciprocal(s) or Div(1, s) (the same correctly rounded division): the
    // producing step and `s`.
    let one_over = |r: usize| -> Option<(usize, usize)> {
        if let Some(j) = plan.sole_op(r, "Reciprocal") {
            return Some((j, plan.input(j, 0)?));
        }
        let j = plan.sole_op(r, "Div")?;
        let (n, d) = plan.two(j)?;
        (plan.scalar(n) == Some(1.0)).then_some((j, d))
    };
    let m1 = ab.take(normed, plan.sole_op(normed, "Mul")?);
    let (a, b) = plan.two(m1)?;
    // The other operand of the Mul is x.
    let (x, r) = if one_over(b).is_some() {
        (a, b)
    } else {
        (b, a)
    };
    let (rj, sqrt) = one_over(r)?;
    ab.take(r, rj);
    let sj = ab.take(sqrt, plan.sole_op(sqrt, "Sqrt")?);
    let summed = plan.input(sj, 0)?;
    let add = ab.take(summed, plan.sole_op(summed, "Add")?);
    let (a, b) = plan.two(add)?;
    let (mean, eps) = match (plan.scalar(a), plan.scalar(b)) {
        (None, Some(e)) => (a, e),
        (Some(e), None) => (b, e),
        _ => return None,
    };
    let rm = ab.take(mean, plan.sole_op(mean, "ReduceMean")?);
    let rank = plan.rank(x)? as i64;
    let axes = plan.ints(rm, "axes", 1)?;
    let last_axis = axes.len() == 1 && (axes[0] == -1 || axes[0] == rank - 1);
    if !plan.is_f32(x) || !last_axis || plan.steps[rm].node.attr_int("keepdims").unwrap_or(1) != 1 {
        return None;
    }
    let squares = plan.input(rm, 0)?;
    let pw = ab.take(squares, plan.sole_op(squares, "Pow")?);
    let (base, e) = plan.two(pw)?;
    if base != x || plan.scalar(e) != Some(2.0) {
        return None;
    }
    if len != 1 && plan.shape(x)?.last()?.known() != Some(len as i64) {
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
        absorbed: ab,
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
/// key/value heads. The copies need not be single-use: they are only bypassed.
fn ungroup(plan: &Plan<'_>, slot: usize) -> Option<(usize, i64)> {
    let producer = |s: usize, op: &str| plan.producer[s].filter(|&j| plan.is(j, op));
    let r = producer(slot, "Reshape")?;
    let expanded = plan.input(r, 0)?;
    let e = producer(expanded, "Expand")?;
    let u = producer(plan.input(e, 0)?, "Unsqueeze")?;
    let x = plan.input(u, 0)?;
    let (xs, es, rs) = (plan.shape(x)?, plan.shape(expanded)?, plan.shape(slot)?);
    if plan.ints(u, "axes", 1)? != [2] || xs.len() != 4 || es.len() != 5 || rs.len() != 4 {
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
