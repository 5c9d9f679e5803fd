//! `fuse-rotary`: the rotary position embedding as Hugging Face models export it
//! ("rotate half"), and as `lower` writes it back.
//!
//! ```text
//! Add(Mul(x, cos), Mul(Concat(Neg(Slice(x, [h, D))), Slice(x, [0, h)), axis = last), sin))
//!     ==  ai.perqc::Rotary(x, cos, sin)
//! ```
//!
//! (the Add and both Muls in either operand order; the Slices on the last axis, as
//! attributes or inputs, constant or computed from shapes).
//!
//! Check: x, cos and sin are f32; x's last dim D is a known even number and h = D / 2; the
//! Slices take exactly `[h, D)` and `[0, h)` of the last axis with step 1; the shapes prove
//! that cos and sin broadcast to x's shape (so the result has x's shape); the Slices, the
//! Neg, the Concat and both products are read only by the chain.
//!
//! `ai.perqc::Rotary` computes `y_j = x_j · c_j + r_j · s_j` with `r = (-x[h..D], x[0..h])`
//! (c, s broadcast to x): per element the chain's two products and one sum, so the result
//! is bitwise the chain's. It is not ONNX's `RotaryEmbedding`, whose caches hold `D / 2`
//! angles per position; exporters write full-width cos and sin whose halves repeat, which
//! this form does not need to prove.

use super::{Pattern, canonical};
use perqc_ir::{Dim, Matcher, NodeId, Patch, ValueId};

pub static PATTERN: Pattern = Pattern {
    name: "fuse-rotary",
    description: "Add(Mul(x, cos), Mul(Concat(Neg(x[.., h:]), x[.., :h]), sin)) -> ai.perqc::Rotary",
    rewrite,
};

/// The `[start, end)` a Slice node takes of the last axis of its input (rank `rank`, last
/// dim `d`), when it slices only that axis with step 1; bounds clamped as ONNX does.
fn last_axis_range(m: &Matcher<'_>, s: NodeId, rank: usize, d: i64) -> Option<(i64, i64)> {
    let starts = m.attr_or_input_ints(s, "starts", 1)?;
    let ends = m.attr_or_input_ints(s, "ends", 2)?;
    let axes = match m.attr_or_input_ints(s, "axes", 3) {
        Some(a) => a,
        // Absent axes mean [0, 1, ..]; one axis that is the last only for rank 1. (An
        // absent optional input and an unknown one look alike here: require the former.)
        None if m.input(s, 3).is_none() && m.node(s).attr_ints("axes").is_none() => vec![0],
        None => return None,
    };
    if let Some(steps) = m.input(s, 4)
        && m.ints(steps)? != [1]
    {
        return None;
    }
    let (&[start], &[end], &[axis]) = (&starts[..], &ends[..], &axes[..]) else {
        return None;
    };
    let last = rank as i64 - 1;
    if axis != last && axis != -1 {
        return None;
    }
    let clamp = |v: i64| if v < 0 { v.saturating_add(d) } else { v }.clamp(0, d);
    Some((clamp(start), clamp(end)))
}

/// `c` broadcasts to `shape` with the result `shape` itself: right-aligned, each of its dims
/// is 1 or the same dim (unknown dims prove nothing).
fn broadcasts_to(c: &[Dim], shape: &[Dim]) -> bool {
    c.len() <= shape.len()
        && c.iter()
            .rev()
            .zip(shape.iter().rev())
            .all(|(a, b)| *a == Dim::Known(1) || (a == b && !matches!(a, Dim::Unknown)))
}

/// `(x, sin)` when `v` is `Mul(Concat(Neg(Slice(x, h..D)), Slice(x, 0..h)), sin)` read
/// only by the pattern, for the `h` and `D` of x.
fn rotated_half(m: &Matcher<'_>, v: ValueId) -> Option<(ValueId, ValueId)> {
    let mul = m.sole_op(v, "Mul")?;
    let (a, b) = m.two(mul)?;
    m.either(a, b, |rot, sin| {
        let cat = m.sole_op(rot, "Concat")?;
        let (neg_v, low_v) = m.two(cat)?;
        let neg = m.sole_op(neg_v, "Neg")?;
        let high = m.sole_op(m.input(neg, 0)?, "Slice")?;
        let low = m.sole_op(low_v, "Slice")?;
        let x = m.input(low, 0)?;
        if m.input(high, 0)? != x {
            return None;
        }
        let shape = m.shape(x)?;
        let rank = shape.len();
        let d = shape.last()?.known()?;
        if d <= 0 || d % 2 != 0 {
            return None;
        }
        let axis = m.node(cat).attr_int("axis")?;
        if axis != rank as i64 - 1 && axis != -1 {
            return None;
        }
        let h = d / 2;
        (last_axis_range(m, high, rank, d)? == (h, d)
            && last_axis_range(m, low, rank, d)? == (0, h))
            .then_some((x, sin))
    })
}

fn rewrite(m: &Matcher<'_>, end: NodeId) -> Option<Patch> {
    if !m.is_op(end, "Add") {
        return None;
    }
    let (a, b) = m.two(end)?;
    let (x, cos, sin) = m.either(a, b, |direct, rotated| {
        let (x, sin) = rotated_half(m, rotated)?;
        let mul = m.sole_op(direct, "Mul")?;
        let (p, q) = m.two(mul)?;
        let cos = m.either(p, q, |xx, cos| (xx == x).then_some(cos))?;
        Some((x, cos, sin))
    })?;
    if ![x, cos, sin].iter().all(|&v| m.is_f32(v)) {
        return None;
    }
    let shape = m.shape(x)?;
    if !broadcasts_to(m.shape(cos)?, shape) || !broadcasts_to(m.shape(sin)?, shape) {
        return None;
    }
    let mut p = Patch::new();
    p.set_op(
        end,
        canonical("Rotary"),
        [Some(x.into()), Some(cos.into()), Some(sin.into())],
    );
    Some(p)
}
