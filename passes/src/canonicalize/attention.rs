//! `fuse-attention`: scaled dot-product attention as exporters write it.
//!
//! ```text
//! MatMul(Guard?(Cast*(Softmax(Add?(Cap?(Mul?(MatMul(q, Transpose(k, [0,1,3,2])), c)), mask),
//!     axis=-1))), v)
//!   == ai.perqc::Attention(q, k, v, mask?, scale = c, softcap = t)
//! Cap(x) = Mul(Tanh(Div(x, t)), t)      (logit soft-capping, Gemma 2)
//! Guard(p) = Where(IsNaN(p), 0, p)      (torch's SDPA: a fully masked row gives 0)
//! ```
//!
//! torch's SDPA decomposition also scales both factors, `MatMul(Mul(q, a), Mul(kᵀ, b))`
//! with scalars `a = b = c^½`, where the others scale the product: that spelling reads as
//! scale `a·b` (equal up to the rounding of the two products, as the summation order is),
//! and the guard as `zero_masked_rows = 1`, the ONNX Attention behaviour. The dynamo
//! exporter's kᵀ is `Reshape(Transpose(Reshape(k, [-1, L, D]), [0, 2, 1]), [B, H, D, L])`
//! (the heads flattened into the batch): read as `Transpose(k, [0, 1, 3, 2])` when both
//! shapes say exactly that.
//!
//! `Mul` by a constant scalar `c` (either operand order; or `Div` by `1/c`) and `Add` of
//! the mask are optional (neither: scale 1); the `Cast`s are no-ops (to the type they
//! read). The soft cap `Cap` is optional too (no `softcap` attribute: none); `t` is one
//! positive finite scalar constant, read by both ends (the outer `Mul` in either operand
//! order; the inner step may be `Mul` by a constant equal to `1/t` in f32 instead of the
//! `Div`). It sits where ONNX Attention applies `softcap`: after the scaling, before the
//! mask. A cap anywhere else (after the mask `Add`, which would turn `-inf` into `-t`) does
//! not match, so that chain stays unfused. `kᵀ` may come from another layout of k in one Transpose (BERT's
//! `Transpose(k [B, L, H, D], [0, 2, 3, 1])`): the canonical op then reads
//! `Transpose(k, [0, 2, 1, 3])`. When k and v are
//! key/value heads repeated for grouped-query attention, `Reshape(Expand(Unsqueeze(x, [2]),
//! [B, H, G, L, D]), [B, H·G, L, D])`, the canonical op reads the shared heads `x`
//! directly: query head `h` attends key/value head `h / G`, as in ONNX Attention.
//!
//! Check: every absorbed intermediate has the chain as its only reader and is no graph
//! output; q, k and v are 4-d f32; the mask has rank at most 4; the Softmax is over the
//! last axis at opset 13 or later (earlier opsets flatten to 2-d); both constants of the
//! cap are the same `t > 0`, finite.
//!
//! `ai.perqc::Attention` is ONNX `Attention` (opset 23, 4-d inputs, no cache) except that a
//! query row masked everywhere gives NaN, as the Softmax it replaces does (ONNX gives 0).
//! Its kernel scales each block of scores once, as MatMul then Mul round, so the result
//! matches the chain up to summation order (and, with a cap, up to the vectorized tanh's
//! few ulp against the Tanh kernel's).

use super::{Pattern, canonical};
use perqc_ir::{AttrValue, Dim, Matcher, NodeId, NodeSpec, Patch, PatchValue, ValueId};

pub static PATTERN: Pattern = Pattern {
    name: "fuse-attention",
    description: "MatMul(Softmax(scale * q kᵀ + mask), v) -> ai.perqc::Attention (reads grouped K/V heads directly)",
    rewrite,
};

fn rewrite(m: &Matcher<'_>, end: NodeId) -> Option<Patch> {
    if m.is_op(end, "Reshape") {
        return rewrite_grouped(m, end);
    }
    if !m.is_op(end, "MatMul") {
        return None;
    }
    let (p, v) = m.two(end)?;
    let sc = scores(m, p)?;
    let (q, kt) = match sc.split {
        Some(qk) => qk,
        None => m.two(sc.qk)?,
    };
    if let Some(k) = flat_transpose(m, kt) {
        return fused(m, end, &sc, q, (k, k.into()), v, Patch::new());
    }
    let t = m.sole_op(kt, "Transpose")?;
    // kᵀ = Transpose(x, perm) of some layout x of k: k itself is x transposed by `perm`
    // with its last two entries swapped (the identity when x is k).
    let mut perm = m.node(t).attr_ints("perm")?.to_vec();
    if perm.len() != 4 || perm[0] != 0 {
        return None;
    }
    perm.swap(2, 3);
    let x = m.input(t, 0)?;
    let mut patch = Patch::new();
    let k = if perm == [0, 1, 2, 3] {
        (x, x.into())
    } else {
        // k in its own layout, read through kᵀ (the same rank and element type).
        let spec = NodeSpec::new("Transpose").attr("perm", AttrValue::Ints(perm));
        (
            kt,
            patch.insert(end, spec, [Some(x.into())], &["attention_k"])[0],
        )
    };
    fused(m, end, &sc, q, k, v, patch)
}

/// The canonical node at `end` reading q, k and v, when the kernel handles their ranks;
/// grouped key/value heads are read where they are shared. `k` is `(a value with k's rank
/// and element type, what the node reads)`: k itself, or kᵀ and a new layout of k that
/// `patch` inserts.
fn fused(
    m: &Matcher<'_>,
    end: NodeId,
    sc: &Scores,
    q: ValueId,
    (k_like, k): (ValueId, PatchValue),
    v: ValueId,
    mut patch: Patch,
) -> Option<Patch> {
    // Ranks the kernel handles; a mask of higher rank would have broadcast the scores up.
    if [q, k_like, v]
        .iter()
        .any(|&x| m.rank(x) != Some(4) || !m.is_f32(x))
        || sc.mask.is_some_and(|mk| m.rank(mk).is_none_or(|r| r > 4))
    {
        return None;
    }
    // Grouped-query attention: read the shared K/V heads instead of their copies.
    let k_old = match k {
        PatchValue::Old(k) => Some(k),
        PatchValue::New(_) => None,
    };
    let (k, v) = match (k_old.and_then(|k| ungroup(m, k)), ungroup(m, v)) {
        (Some((k, gk)), Some((v, gv))) if gk == gv => (k.into(), v),
        _ => (k, v),
    };
    patch.set_op(
        end,
        attention_spec(sc),
        [
            Some(q.into()),
            Some(k),
            Some(v.into()),
            sc.mask.map(Into::into),
        ],
    );
    Some(patch)
}

/// torch's dynamo spelling of `kᵀ` in SDPA: `Reshape(Transpose(Reshape(k, [-1, L, D]),
/// [0, 2, 1]), [B, H, D, L])` for k `[B, H, L, D]`, the heads flattened into the batch for a
/// 3-d transpose. Returns k when the two shapes say exactly that (symbols included).
fn flat_transpose(m: &Matcher<'_>, kt: ValueId) -> Option<ValueId> {
    let outer = m.sole_op(kt, "Reshape")?;
    let t = m.sole_op(m.input(outer, 0)?, "Transpose")?;
    if m.node(t).attr_ints("perm")? != [0, 2, 1] {
        return None;
    }
    let inner = m.sole_op(m.input(t, 0)?, "Reshape")?;
    let k = m.input(inner, 0)?;
    let ks = m.shape(k)?;
    let (s1, s2) = (
        m.dims_value(m.input(inner, 1)?)?,
        m.dims_value(m.input(outer, 1)?)?,
    );
    let allowzero = |r: NodeId| m.node(r).attr_int("allowzero").unwrap_or(0);
    (ks.len() == 4
        && s1.len() == 3
        && s1[0] == Dim::Known(-1)
        && same(&s1[1], &ks[2])
        && same(&s1[2], &ks[3])
        && s2.len() == 4
        && [(0, 0), (1, 1), (2, 3), (3, 2)]
            .iter()
            .all(|&(a, b)| same(&s2[a], &ks[b]) && s2[a] != Dim::Known(0))
        && ks.iter().all(|d| *d != Dim::Known(0))
        && allowzero(inner) == 0
        && allowzero(outer) == 0)
        .then_some(k)
}

/// The canonical node: `scale`, `softcap` when there is one (0: none, no attribute), and
/// `zero_masked_rows = 1` when the chain guarded fully masked rows.
fn attention_spec(sc: &Scores) -> NodeSpec {
    let mut spec = canonical("Attention").attr("scale", AttrValue::Float(sc.scale));
    if sc.softcap > 0.0 {
        spec = spec.attr("softcap", AttrValue::Float(sc.softcap));
    }
    if sc.zero_masked_rows {
        spec = spec.attr("zero_masked_rows", AttrValue::Int(1));
    }
    spec
}

/// The scores side of the chain, from the probabilities `p` up: the `q kᵀ` MatMul, the
/// mask, the scale and the soft cap (0: none).
struct Scores {
    qk: NodeId,
    /// `(q, kᵀ)` when each factor of `qk` was scaled on its own (the scale is their product).
    split: Option<(ValueId, ValueId)>,
    mask: Option<ValueId>,
    scale: f32,
    softcap: f32,
    /// The probabilities were guarded by [`nan_guard`].
    zero_masked_rows: bool,
}

/// `Mul(Tanh(Div(x, t)), t)` at `s` (or `Mul(Tanh(Mul(x, 1/t)), t)`; the `Mul`s in either
/// operand order) with `t` a positive finite scalar: `(x, t)`.
fn soft_cap(m: &Matcher<'_>, s: ValueId) -> Option<(ValueId, f32)> {
    let outer = m.sole_op(s, "Mul")?;
    let (a, b) = m.two(outer)?;
    let (th, t) = m.either(a, b, |x, y| {
        let c = m.scalar(y)?;
        m.sole_op(x, "Tanh").map(|th| (th, c))
    })?;
    if !(t > 0.0 && t.is_finite()) {
        return None;
    }
    let inner = m.input(th, 0)?;
    if let Some(div) = m.sole_op(inner, "Div") {
        let (x, d) = m.two(div)?;
        return (m.scalar(d)? == t).then_some((x, t));
    }
    let mul = m.sole_op(inner, "Mul")?;
    let (a, b) = m.two(mul)?;
    m.either(a, b, |x, y| (m.scalar(y)? == 1.0 / t).then_some((x, t)))
}

/// torch's guard of a fully masked row, `Where(IsNaN(p), 0, p)` at `g`: `p`, read by these
/// two nodes only.
fn nan_guard(m: &Matcher<'_>, g: ValueId) -> Option<ValueId> {
    let w = m.sole_op(g, "Where")?;
    let n = m.node(w);
    let (c, zero, p) = (n.input(0)?, n.input(1)?, n.input(2)?);
    let is_nan = m.sole_op(c, "IsNaN")?;
    let val = m.graph.value(p);
    let readers_ok = val.uses().len() == 2 && !m.graph.outputs.contains(&p);
    (m.input(is_nan, 0)? == p && m.scalar(zero)? == 0.0 && readers_ok).then_some(p)
}

/// `Cast*(Softmax(Add?(Mul?(MatMul(..), c), mask), axis = -1))` at `p`, or that guarded by
/// [`nan_guard`] (see the module docs).
fn scores(m: &Matcher<'_>, p: ValueId) -> Option<Scores> {
    let p = m.skip_noop_casts(p);
    let (p, zero_masked_rows) = match nan_guard(m, p) {
        Some(inner) => (inner, true),
        None => (p, false),
    };
    let softmax = m.def_op(p, "Softmax")?;
    if !zero_masked_rows && m.sole(p).is_none() {
        return None;
    }
    let opset = m.opset()?;
    if opset < 13 || m.node(softmax).attr_int("axis").unwrap_or(-1) != -1 {
        return None;
    }
    let mut s = m.input(softmax, 0)?;
    let mut mask = None;
    if let Some(add) = m.sole_op(s, "Add") {
        // The scores come from the Mul / MatMul chain; the other operand is the mask.
        let (a, b) = m.two(add)?;
        let scores_from = |x: ValueId| m.sole_op(x, "Mul").or(m.sole_op(x, "MatMul"));
        let (scores, mk) = m.either(a, b, |x, y| scores_from(x).map(|_| (x, y)))?;
        mask = Some(mk);
        s = scores;
    }
    // The cap before the mask; a Mul(Tanh(..), t) that is not a whole cap is no scale either
    // (its operand is no MatMul), so the chain is left alone.
    let mut softcap = 0.0f32;
    if let Some((x, t)) = soft_cap(m, s) {
        softcap = t;
        s = x;
    }
    let mut scale = 1.0f32;
    if let Some(mul) = m.sole_op(s, "Mul") {
        let (a, b) = m.two(mul)?;
        let (scores, c) = m.either(a, b, |x, y| m.scalar(y).map(|c| (x, c)))?;
        scale = c;
        s = scores;
    } else if let Some(div) = m.sole_op(s, "Div") {
        let (scores, d) = m.two(div)?;
        scale = 1.0 / m.scalar(d)?;
        s = scores;
    }
    let qk = m.sole_op(s, "MatMul")?;
    // torch's SDPA spelling scales both factors by sqrt(c) instead of the product by c.
    let (a, b) = m.two(qk)?;
    let by_scalar = |x: ValueId| {
        let mul = m.sole_op(x, "Mul")?;
        let (u, w) = m.two(mul)?;
        m.either(u, w, |y, c| m.scalar(c).map(|c| (y, c)))
    };
    let split = match (by_scalar(a), by_scalar(b)) {
        (Some((q, ca)), Some((kt, cb))) if scale == 1.0 => {
            scale = ca * cb;
            Some((q, kt))
        }
        _ => None,
    };
    Some(Scores {
        qk,
        split,
        mask,
        scale,
        softcap,
        zero_masked_rows,
    })
}

/// The grouped-query spelling `lower` writes below opset 23 (see passes/src/lower.rs):
///
/// ```text
/// Reshape(MatMul(Softmax(Add?(Cap?(Mul?(MatMul(Reshape(q, [0, Hkv, G, -1, D]),
///     Transpose(Unsqueeze(k, [2]), [0, 1, 2, 4, 3])), c)), mask'), axis = -1),
///     Unsqueeze(v, [2])), [0, Hkv·G, -1, Dv])
///   == ai.perqc::Attention(q, k, v, mask?, scale = c, softcap = t)
/// ```
///
/// with `mask' = mask` of rank <= 2, or `Unsqueeze(mask, [r - 2])` of a rank-r mask whose
/// head axis is 1. So a model perqc wrote reads back with its attention fused.
fn rewrite_grouped(m: &Matcher<'_>, end: NodeId) -> Option<Patch> {
    let (y, _) = m.two(end)?;
    let pv = m.sole_op(y, "MatMul")?;
    let (p, v5) = m.two(pv)?;
    let sc = scores(m, p)?;
    if sc.split.is_some() {
        return None;
    }
    let mask = sc.mask;
    let (q5, kt5) = m.two(sc.qk)?;
    let t = m.sole_op(kt5, "Transpose")?;
    if m.node(t).attr_ints("perm")? != [0, 1, 2, 4, 3] {
        return None;
    }
    let at_2 = |x: ValueId| {
        let u = m.def_op(x, "Unsqueeze")?;
        (m.attr_or_input_ints(u, "axes", 1)? == [2]).then(|| m.input(u, 0))?
    };
    let (k, v) = (at_2(m.input(t, 0)?)?, at_2(v5)?);
    let q = m.input(m.def_op(q5, "Reshape")?, 0)?;
    let mask = match mask {
        Some(mk) if m.rank(mk)? > 2 => {
            let u = m.def_op(mk, "Unsqueeze")?;
            let inner = m.input(u, 0)?;
            let r = m.rank(inner)?;
            let axes = m.attr_or_input_ints(u, "axes", 1)?;
            (r <= 4 && axes == [r as i64 - 2] && m.shape(inner)?[r - 3].known() == Some(1))
                .then_some(Some(inner))?
        }
        other => other,
    };
    // q [B, Hq, S, D] grouped as [B, Hkv, G, S, D]; k, v [B, Hkv, L, .]; the result
    // [B, Hq, S, Dv].
    let (qs, q5s, ks) = (m.shape(q)?, m.shape(q5)?, m.shape(k)?);
    let ok = [q, k, v]
        .iter()
        .all(|&x| m.rank(x) == Some(4) && m.is_f32(x))
        && m.rank(m.node(end).output(0)?) == Some(4)
        && q5s.len() == 5
        && match (qs[1].known(), q5s[1].known(), q5s[2].known(), ks[1].known()) {
            (Some(hq), Some(hkv), Some(g), Some(hk)) => hkv * g == hq && hk == hkv,
            _ => false,
        };
    if !ok {
        return None;
    }
    let mut patch = Patch::new();
    patch.set_op(
        end,
        attention_spec(&sc),
        [
            Some(q.into()),
            Some(k.into()),
            Some(v.into()),
            mask.map(Into::into),
        ],
    );
    Some(patch)
}

/// Equal dims, known to be: the same number or the same symbol.
fn same(a: &Dim, b: &Dim) -> bool {
    !matches!(a, Dim::Unknown) && a == b
}

/// If `v` is `Reshape(Expand(Unsqueeze(x, axes = [2]), [B, H, G, L, D]), [B, H·G, L, D])`
/// (how exporters repeat each of H key/value heads G times), returns `(x, G)`: head `h` of
/// the result is head `h / G` of `x`. The copies need not be single-use: they are only
/// bypassed.
fn ungroup(m: &Matcher<'_>, v: ValueId) -> Option<(ValueId, i64)> {
    let r = m.def_op(v, "Reshape")?;
    let expanded = m.input(r, 0)?;
    let e = m.def_op(expanded, "Expand")?;
    let u = m.def_op(m.input(e, 0)?, "Unsqueeze")?;
    let x = m.input(u, 0)?;
    let (xs, es, rs) = (m.shape(x)?, m.shape(expanded)?, m.shape(v)?);
    if m.attr_or_input_ints(u, "axes", 1)? != [2] || xs.len() != 4 || es.len() != 5 || rs.len() != 4
    {
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
