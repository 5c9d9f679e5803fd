//! `fuse-hadamard`: the online block rotation as ONNX spells it (and as `lower` writes it).
//!
//! ```text
//! Reshape(MatMul(Reshape(x, [.., f/b, b]), H), [.., f])  ==  ai.perqc::Hadamard(x, H)
//! ```
//!
//! H is a constant f32 `[b, b]` (initializer or `Constant`; other readers allowed). The
//! MatMul may already be an `ai.perqc::Linear(·, H)` (no bias; with transB only when H is
//! symmetric bit for bit, as a Sylvester matrix is), since `fuse-linear` sees it first in
//! `canonicalize`'s sweep.
//!
//! Check: x is f32 of rank r >= 1; the inferred shapes prove both reshapes, whatever their
//! shape operands say (constants with `0` or `-1`, computed shapes): the blocks are
//! `[d_0 .. d_{r-2}, m, b]` with x's leading dims and `m · b` = x's last dim (as products
//! of dims, so a symbolic width passes when the shapes say so), and the result has x's
//! shape. The blocks and the product are read only by the chain.
//!
//! Row-major reshapes with the same leading dims keep every element's flat index, so
//! element `[.., k·b + i]` of x is `[.., k, i]` of the blocks, and the MatMul computes
//! `y_blk = x_blk · H`: exactly `ai.perqc::Hadamard`'s definition, whose kernel runs a fast
//! Walsh-Hadamard transform when H is a scaled Sylvester matrix and the same product
//! otherwise (equal up to round-off).

use super::{Pattern, canonical};
use perqc_ir::{DType, Dim, Matcher, NodeId, Patch, ValueId};
use perqc_ops::PERQC_DOMAIN;
use perqc_ops::facts::Mono;

/// Whether `n` is the online block rotation `ai.perqc::Hadamard` (this pattern's result, and
/// what `transform` inserts for an online rotation).
pub fn is_online_hadamard(n: &perqc_ir::Node) -> bool {
    n.domain == PERQC_DOMAIN && n.op_type == "Hadamard"
}

pub static PATTERN: Pattern = Pattern {
    name: "fuse-hadamard",
    description: "Reshape(MatMul(Reshape(x, [.., f/b, b]), H [b, b] constant), [.., f]) -> ai.perqc::Hadamard",
    rewrite,
};

/// The block size of a constant f32 square matrix `[b, b]`, and whether it is symmetric
/// bit for bit.
fn square(m: &Matcher<'_>, h: ValueId) -> Option<(i64, bool)> {
    let t = m.graph.const_tensor(h)?;
    let (&[r, c], DType::F32) = (t.dims.as_slice(), t.dtype) else {
        return None;
    };
    if r != c || r <= 0 {
        return None;
    }
    let v = t.to_f32().ok()?;
    let b = r as usize;
    let symmetric =
        (0..b).all(|j| (0..j).all(|i| v[j * b + i].to_bits() == v[i * b + j].to_bits()));
    Some((r, symmetric))
}

/// The product's operands (blocks, H) when `v` is computed by a MatMul, or an
/// `ai.perqc::Linear` without bias, read only by the pattern.
fn product(m: &Matcher<'_>, v: ValueId) -> Option<(ValueId, ValueId)> {
    if let Some(mm) = m.sole_op(v, "MatMul") {
        let (blocks, h) = m.two(mm)?;
        square(m, h)?;
        return Some((blocks, h));
    }
    let l = m.sole(v)?;
    let n = m.node(l);
    if n.domain != PERQC_DOMAIN || n.op_type != "Linear" || n.input(2).is_some() {
        return None;
    }
    let (blocks, h) = (n.input(0)?, n.input(1)?);
    let (_, symmetric) = square(m, h)?;
    let trans = n.attr_int("transB").unwrap_or(0) != 0;
    (!trans || symmetric).then_some((blocks, h))
}

/// Dims equal for every value of the symbols (unknown dims prove nothing).
fn same(a: &[Dim], b: &[Dim]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x == y && !matches!(x, Dim::Unknown))
}

fn rewrite(m: &Matcher<'_>, end: NodeId) -> Option<Patch> {
    if !m.is_op(end, "Reshape") {
        return None;
    }
    let y = m.node(end).output(0)?;
    let (blocks, h) = product(m, m.input(end, 0)?)?;
    let split = m.sole_op(blocks, "Reshape")?;
    let x = m.input(split, 0)?;
    if !m.is_f32(x) {
        return None;
    }
    let (xs, bs, ys) = (m.shape(x)?, m.shape(blocks)?, m.shape(y)?);
    let r = xs.len();
    let b = m.graph.const_tensor(h)?.dims[0];
    if r == 0 || bs.len() != r + 1 || ys.len() != r || bs[r] != Dim::Known(b) {
        return None;
    }
    // Leading dims kept by both reshapes; the last one split into [m, b] and merged back.
    let lead = &xs[..r - 1];
    let width = Mono::product(&xs[r - 1..])?;
    let prove = same(&bs[..r - 1], lead)
        && same(&ys[..r - 1], lead)
        && Mono::product(&bs[r - 1..]) == Some(width.clone())
        && Mono::product(&ys[r - 1..]) == Some(width);
    if !prove {
        return None;
    }
    let mut p = Patch::new();
    p.set_op(end, canonical("Hadamard"), [Some(x.into()), Some(h.into())]);
    Some(p)
}
