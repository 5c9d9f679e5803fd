//! `fuse-fake-quantize`: per-token dynamic quantization as `lower` writes it, back into
//! `ai.perqc::FakeQuantize`.
//!
//! ```text
//! asymmetric:  s  = Max(Div(Sub(Max(ReduceMax(x), 0)·c, Min(ReduceMin(x), 0)·c), hi), TINY)
//!              zf = Round(Neg(Div(Min(ReduceMin(x), 0)·c, s)))
//!              DequantizeLinear(QuantizeLinear(x, s, zp), s, zp),  zp = Cast(zf, uint4|uint8)
//!           or Mul(Sub(Clip(Add(Round(Div(x, s)), zf), 0, hi), zf), s)
//! symmetric:   s  = Max(Div(ReduceMax(Abs(x))·c, hi), TINY)
//!              DequantizeLinear(QuantizeLinear(x, s, output_dtype = int4|int8), s)
//!           or Mul(Clip(Round(Div(x, s)), lo, hi), s)
//!   ==  ai.perqc::FakeQuantize(x, bits, symmetric, clip = c)
//! ```
//!
//! (`·c` is `Mul(·, c)` with a constant c in (0, 1], or nothing for c = 1; reductions over
//! the last axis with keepdims; Max, Min, Add, Mul operands in either order.)
//!
//! Check: x is f32 with a known rank; every constant by value: 0, `TINY` (exactly
//! `perqc_ops::quant::TINY`), `hi` and `lo` the code range of a width in 2..=8 (`2^b - 1`,
//! or `2^(b-1) - 1` and `-2^(b-1)` when symmetric); Q/DQ on axis -1 (or rank - 1) with
//! `block_size` equal to x's known last dim, the same scale and zero point in both, code
//! type matching `hi` (uint4 for 15, uint8 for 255, int4 for 7, int8 for 127); the clip
//! factor the same on both extremes. Every value the chain computes is read only by the
//! chain and is no graph output (the scale and zero point have several readers, all in the
//! chain).
//!
//! The chain computes exactly the kernel's f32 arithmetic (see `perqc_ops::quant`), so the
//! fused op equals it bit for bit.

use super::{Pattern, canonical};
use perqc_ir::{AttrValue, DType, Dim, Matcher, NodeId, Patch, ValueId};
use perqc_ops::quant::{TINY, TokenQuant};

pub static PATTERN: Pattern = Pattern {
    name: "fuse-fake-quantize",
    description: "per-token dynamic Q/DQ (row max/min scale, blocked QuantizeLinear -> DequantizeLinear, or its float form) -> ai.perqc::FakeQuantize",
    rewrite,
};

/// The nodes matched so far, and x.
struct Chain<'m, 'a> {
    m: &'m Matcher<'a>,
    nodes: Vec<NodeId>,
    x: Option<ValueId>,
}

impl Chain<'_, '_> {
    /// The producer of `v` when it is the default-domain op `op`; recorded in the chain.
    fn op(&mut self, v: ValueId, op: &str) -> Option<NodeId> {
        let n = self.m.def_op(v, op)?;
        if self.m.node(n).outputs().len() != 1 {
            return None;
        }
        if !self.nodes.contains(&n) {
            self.nodes.push(n);
        }
        Some(n)
    }

    /// `v` is the same x as before (the first call sets it).
    fn same_x(&mut self, v: ValueId) -> Option<()> {
        match self.x {
            None => {
                self.x = Some(v);
                Some(())
            }
            Some(x) => (x == v).then_some(()),
        }
    }

    /// Operand `v`, when it is a constant scalar equal to `want` bit for bit.
    fn is_const(&self, v: ValueId, want: f32) -> bool {
        self.m
            .scalar(v)
            .is_some_and(|c| c.to_bits() == want.to_bits())
    }

    /// The non-constant operand of a two-input `op` node computing `v` whose other operand
    /// is the constant `want` (either order).
    fn with_const(&mut self, v: ValueId, op: &str, want: f32) -> Option<ValueId> {
        let n = self.op(v, op)?;
        let (a, b) = self.m.two(n)?;
        self.m
            .either(a, b, |a, c| self.is_const(c, want).then_some(a))
    }

    /// `v = Mul(inner, c)` with a constant `c` in (0, 1) and `inner` computed by `inner_op`,
    /// else `v` itself with clip 1.
    fn clipped(&mut self, v: ValueId, inner_op: &str) -> Option<(ValueId, f32)> {
        if self.m.def_op(v, inner_op).is_some() {
            return Some((v, 1.0));
        }
        let n = self.op(v, "Mul")?;
        let (a, b) = self.m.two(n)?;
        self.m.either(a, b, |inner, c| {
            let c = self.m.scalar(c)?;
            (c > 0.0 && c < 1.0 && self.m.def_op(inner, inner_op).is_some()).then_some((inner, c))
        })
    }

    /// `v = Reduce<op>(x, axes = [-1] | [rank - 1], keepdims = 1)`; returns x.
    fn reduce_last(&mut self, v: ValueId, op: &str) -> Option<ValueId> {
        let n = self.op(v, op)?;
        let x = self.m.input(n, 0)?;
        let rank = self.m.rank(x)? as i64;
        let axes = self.m.attr_or_input_ints(n, "axes", 1)?;
        let keep = self.m.node(n).attr_int("keepdims").unwrap_or(1);
        (keep == 1 && (axes == [-1] || axes == [rank - 1])).then_some(x)
    }
}

/// The code range's `hi` to (bits, lo) for the given kind, if it is one of 2..=8 bits.
fn width(hi: f32, symmetric: bool) -> Option<(u32, f32)> {
    (2..=8u32).find_map(|bits| {
        let q = TokenQuant {
            bits,
            symmetric,
            clip: 1.0,
        };
        let (lo, h) = q.code_range();
        (h == hi).then_some((bits, lo))
    })
}

/// What the scale chain says: symmetric or not, clip, hi, and (asymmetric) the clipped
/// row minimum `mn0·c` the zero point is computed from.
struct Scale {
    symmetric: bool,
    clip: f32,
    hi: f32,
    min: Option<ValueId>,
}

/// `s = Max(Div(r, hi), TINY)` with r the range (asymmetric) or the clipped absolute max.
fn scale(c: &mut Chain<'_, '_>, s: ValueId) -> Option<Scale> {
    let s0 = c.with_const(s, "Max", TINY)?;
    let div = c.op(s0, "Div")?;
    let (r, hi) = c.m.two(div)?;
    let hi = c.m.scalar(hi)?;
    if let Some(sub) = c.m.def_op(r, "Sub") {
        c.op(r, "Sub")?;
        let (mx, mn) = c.m.two(sub)?;
        let (mx0, clip) = c.clipped(mx, "Max")?;
        let (mn0, clip_mn) = c.clipped(mn, "Min")?;
        if clip.to_bits() != clip_mn.to_bits() {
            return None;
        }
        let mx = c.with_const(mx0, "Max", 0.0)?;
        let mn_raw = c.with_const(mn0, "Min", 0.0)?;
        let x = c.reduce_last(mx, "ReduceMax")?;
        c.same_x(x)?;
        let x = c.reduce_last(mn_raw, "ReduceMin")?;
        c.same_x(x)?;
        return Some(Scale {
            symmetric: false,
            clip,
            hi,
            min: Some(mn),
        });
    }
    let (m, clip) = c.clipped(r, "ReduceMax")?;
    let a = c.reduce_last(m, "ReduceMax")?;
    let abs = c.op(a, "Abs")?;
    c.same_x(c.m.input(abs, 0)?)?;
    Some(Scale {
        symmetric: true,
        clip,
        hi,
        min: None,
    })
}

/// `zf = Round(Neg(Div(min, s)))`.
fn zero_point(c: &mut Chain<'_, '_>, zf: ValueId, min: ValueId, s: ValueId) -> Option<()> {
    let round = c.op(zf, "Round")?;
    let neg = c.op(c.m.input(round, 0)?, "Neg")?;
    let div = c.op(c.m.input(neg, 0)?, "Div")?;
    (c.m.two(div)? == (min, s)).then_some(())
}

/// `Round(Div(x, s))`; returns x.
fn rounded_steps(c: &mut Chain<'_, '_>, r: ValueId, s: ValueId) -> Option<ValueId> {
    let round = c.op(r, "Round")?;
    let div = c.op(c.m.input(round, 0)?, "Div")?;
    let (x, s2) = c.m.two(div)?;
    (s2 == s).then_some(x)
}

/// The constant bounds of a `Clip(v, lo, hi)` node and its operand.
fn clip_bounds(c: &mut Chain<'_, '_>, v: ValueId) -> Option<(ValueId, f32, f32)> {
    let n = c.op(v, "Clip")?;
    let node = c.m.node(n);
    if node.inputs().len() != 3 {
        return None;
    }
    Some((
        node.input(0)?,
        c.m.scalar(node.input(1)?)?,
        c.m.scalar(node.input(2)?)?,
    ))
}

/// The float form ending in `Mul(·, s)` (either order): returns (x, s, zf).
fn float_form(c: &mut Chain<'_, '_>, end: NodeId) -> Option<(ValueId, ValueId, Option<ValueId>)> {
    let (a, b) = c.m.two(end)?;
    for (body, s) in [(a, b), (b, a)] {
        let (nodes, x) = (c.nodes.clone(), c.x);
        if let Some(r) = float_body(c, body, s) {
            return Some(r);
        }
        (c.nodes, c.x) = (nodes, x);
    }
    None
}

fn float_body(
    c: &mut Chain<'_, '_>,
    body: ValueId,
    s: ValueId,
) -> Option<(ValueId, ValueId, Option<ValueId>)> {
    if let Some(sub) = c.m.def_op(body, "Sub") {
        // Asymmetric: Sub(Clip(Add(Round(Div(x, s)), zf), 0, hi), zf).
        c.op(body, "Sub")?;
        let (clipped, zf) = c.m.two(sub)?;
        let (shifted, lo, _) = clip_bounds(c, clipped)?;
        if lo.to_bits() != 0f32.to_bits() {
            return None;
        }
        let add = c.op(shifted, "Add")?;
        let (p, q) = c.m.two(add)?;
        let x = c.m.either(p, q, |r, z| {
            if z != zf {
                return None;
            }
            let round = c.m.def_op(r, "Round")?;
            let div = c.m.def_op(c.m.input(round, 0)?, "Div")?;
            (c.m.input(div, 1)? == s).then_some(r)
        })?;
        let x = rounded_steps(c, x, s)?;
        return Some((x, s, Some(zf)));
    }
    let (r, _, _) = clip_bounds(c, body)?;
    let x = rounded_steps(c, r, s)?;
    Some((x, s, None))
}

fn rewrite(m: &Matcher<'_>, end: NodeId) -> Option<Patch> {
    let mut c = Chain {
        m,
        nodes: Vec::new(),
        x: None,
    };
    let (x, s, zf, qdq) = if m.is_op(end, "DequantizeLinear") {
        let dq = m.node(end);
        let (qv, s) = (dq.input(0)?, dq.input(1)?);
        let zp = dq.input(2);
        let q = c.op(qv, "QuantizeLinear")?;
        let qn = m.node(q);
        let x = qn.input(0)?;
        if qn.input(1)? != s || qn.input(2) != zp || dq.inputs().len() > 3 {
            return None;
        }
        let rank = m.rank(x)?;
        let d = match m.shape(x)?.last()? {
            Dim::Known(d) => *d,
            _ => return None,
        };
        for n in [dq, qn] {
            let axis = n.attr_int("axis").unwrap_or(1);
            if (axis != -1 && axis != rank as i64 - 1) || n.attr_int("block_size") != Some(d) {
                return None;
            }
            if n.attr_int("saturate").is_some_and(|v| v != 1) {
                return None;
            }
        }
        if dq
            .attr_int("output_dtype")
            .is_some_and(|t| t != DType::F32.code() as i64)
        {
            return None;
        }
        let code = match zp {
            Some(zp) => {
                let cast = c.op(zp, "Cast")?;
                let to = m.node(cast).attr_int("to")?;
                let zf = m.input(cast, 0)?;
                (DType::from_code(to as i32)?, Some(zf))
            }
            None => {
                let to = qn.attr_int("output_dtype")?;
                (DType::from_code(to as i32)?, None)
            }
        };
        (x, s, code.1, Some(code.0))
    } else if m.is_op(end, "Mul") {
        let (x, s, zf) = float_form(&mut c, end)?;
        (x, s, zf, None)
    } else {
        return None;
    };
    if !m.is_f32(x) || m.rank(x).is_none_or(|r| r == 0) {
        return None;
    }
    c.same_x(x)?;
    let sc = scale(&mut c, s)?;
    if sc.symmetric != zf.is_none() {
        return None;
    }
    if let (Some(zf), Some(min)) = (zf, sc.min) {
        zero_point(&mut c, zf, min, s)?;
    }
    let (bits, lo) = width(sc.hi, sc.symmetric)?;
    match qdq {
        Some(code) => {
            let want = match (sc.symmetric, bits) {
                (false, 4) => DType::U4,
                (false, 8) => DType::U8,
                (true, 4) => DType::I4,
                (true, 8) => DType::I8,
                _ => return None,
            };
            if code != want {
                return None;
            }
        }
        None => {
            // The Clip's bounds: [0, hi] (asymmetric, checked 0 above) or [lo, hi].
            let clip = c.nodes.iter().copied().find(|&n| m.is_op(n, "Clip"))?;
            let node = m.node(clip);
            let (l, h) = (m.scalar(node.input(1)?)?, m.scalar(node.input(2)?)?);
            let want_lo = if sc.symmetric { lo } else { 0.0 };
            if l.to_bits() != want_lo.to_bits() || h.to_bits() != sc.hi.to_bits() {
                return None;
            }
        }
    }
    // Every value the chain computes is read only by the chain (or the anchor).
    let inside = |n: NodeId| n == end || c.nodes.contains(&n);
    for &n in &c.nodes {
        for &o in m.node(n).outputs().iter().flatten() {
            let v = m.graph.value(o);
            if m.graph.outputs.contains(&o) || !v.uses().iter().all(|u| inside(u.node)) {
                return None;
            }
        }
    }
    let mut spec = canonical("FakeQuantize")
        .attr("bits", AttrValue::Int(bits as i64))
        .attr("symmetric", AttrValue::Int(sc.symmetric as i64));
    if sc.clip != 1.0 {
        spec = spec.attr("clip", AttrValue::Float(sc.clip));
    }
    let mut p = Patch::new();
    p.set_op(end, spec, [Some(x.into())]);
    Some(p)
}
