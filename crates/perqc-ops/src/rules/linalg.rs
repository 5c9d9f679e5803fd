//! Contractions: MatMul (numpy batched, 1-D promotion), Gemm, MatMulInteger,
//! com.microsoft MatMulNBits, Einsum.

use super::{RuleResult, same_dtype};
use crate::facts::{Facts, broadcast_shapes, fmt_shape, unify_dim};
use crate::infer::{InferCtx, ShapeError};
use perqc_ir::{DType, Dim, Shape};
use std::collections::HashMap;

/// The shape of `a @ b` under numpy rules, `None` if a rank is unknown.
fn matmul_shape(a: Option<&Shape>, b: Option<&Shape>) -> Result<Option<Shape>, ShapeError> {
    let (Some(a), Some(b)) = (a, b) else {
        return Ok(None);
    };
    if a.is_empty() || b.is_empty() {
        return Err(ShapeError::Invalid(format!(
            "MatMul operands must have rank >= 1, got {} and {}",
            fmt_shape(a),
            fmt_shape(b)
        )));
    }
    let one = Dim::Known(1);
    // 1-D operands are promoted ([k] -> [1, k] on the left, [k, 1] on the right) and the
    // added dim is dropped from the result.
    let a2: Shape = if a.len() == 1 {
        vec![one.clone(), a[0].clone()]
    } else {
        a.clone()
    };
    let b2: Shape = if b.len() == 1 {
        vec![b[0].clone(), one.clone()]
    } else {
        b.clone()
    };
    let (ka, kb) = (&a2[a2.len() - 1], &b2[b2.len() - 2]);
    unify_dim(ka, kb).ok_or_else(|| ShapeError::InnerDims {
        a: ka.clone(),
        b: kb.clone(),
        sa: fmt_shape(a),
        sb: fmt_shape(b),
    })?;
    let batch = broadcast_shapes(&a2[..a2.len() - 2], &b2[..b2.len() - 2]).ok_or_else(|| {
        ShapeError::Broadcast {
            a: fmt_shape(a),
            b: fmt_shape(b),
        }
    })?;
    let mut out = batch;
    if a.len() > 1 {
        out.push(a2[a2.len() - 2].clone());
    }
    if b.len() > 1 {
        out.push(b2[b2.len() - 1].clone());
    }
    Ok(Some(out))
}

pub fn matmul(ctx: &InferCtx<'_>) -> RuleResult {
    let (a, b) = (ctx.req(0)?, ctx.req(1)?);
    let dtype = same_dtype([a, b])?;
    let shape = matmul_shape(a.shape.as_ref(), b.shape.as_ref())?;
    Ok(vec![Facts::new(dtype, shape)])
}

/// `ai.perqc::Linear(x, W, bias?)`: `[.., K] x W -> [.., N]`, W `[K, N]`, or `[N, K]` with
/// transB (the layout is kept as stored, no copy).
pub fn linear(ctx: &InferCtx<'_>) -> RuleResult {
    let (x, w) = (ctx.req(0)?, ctx.req(1)?);
    let dtype = same_dtype([x, w])?;
    let trans = ctx.attr_int("transB", 0) != 0;
    let shape = match (&x.shape, &w.shape) {
        (Some(xs), Some(ws)) if ws.len() == 2 && !xs.is_empty() => {
            let (k, n) = if trans {
                (&ws[1], &ws[0])
            } else {
                (&ws[0], &ws[1])
            };
            let kx = &xs[xs.len() - 1];
            unify_dim(kx, k).ok_or_else(|| ShapeError::InnerDims {
                a: kx.clone(),
                b: k.clone(),
                sa: fmt_shape(xs),
                sb: fmt_shape(ws),
            })?;
            let mut out = xs[..xs.len() - 1].to_vec();
            out.push(n.clone());
            Some(out)
        }
        (_, Some(ws)) if ws.len() != 2 => {
            return Err(ShapeError::Rank {
                what: "W",
                expected: "2".into(),
                got: ws.len(),
            });
        }
        _ => None,
    };
    Ok(vec![Facts::new(dtype, shape)])
}

/// `ai.perqc::Hadamard(x, H)`: the online block rotation `y_blk = x_blk · H` on every block
/// of `b` consecutive channels of x's last axis, H `[b, b]`. y has x's shape. Errors when
/// H is not a square matrix, x has no last axis, or `b` does not divide a known last dim.
pub fn hadamard(ctx: &InferCtx<'_>) -> RuleResult {
    let (x, h) = (ctx.req(0)?, ctx.req(1)?);
    let dtype = same_dtype([x, h])?;
    if let Some(hs) = &h.shape {
        if hs.len() != 2 {
            return Err(ShapeError::Rank {
                what: "H",
                expected: "2".into(),
                got: hs.len(),
            });
        }
        if let (Some(r), Some(c)) = (hs[0].known(), hs[1].known())
            && (r != c || r == 0)
        {
            return Err(ShapeError::Invalid(format!(
                "H must be a non-empty square matrix, got {}",
                fmt_shape(hs)
            )));
        }
    }
    if let Some(xs) = &x.shape {
        let Some(last) = xs.last() else {
            return Err(ShapeError::Rank {
                what: "x",
                expected: ">= 1".into(),
                got: 0,
            });
        };
        let b = h
            .shape
            .as_ref()
            .and_then(|hs| hs[0].known().or(hs[1].known()));
        if let (Some(f), Some(b)) = (last.known(), b)
            && b > 0
            && f % b != 0
        {
            return Err(ShapeError::Invalid(format!(
                "block size {b} (H {}) does not divide the last dim {f} of x {}",
                fmt_shape(h.shape.as_deref().unwrap_or(&[])),
                fmt_shape(xs)
            )));
        }
    }
    Ok(vec![Facts::new(dtype, x.shape.clone())])
}

/// Attention (opset 23) on 4-d inputs: Y is Q's shape `[B, Hq, S, D]` with V's last dim.
/// (Only output 0 is described; 3-d inputs with head-count attributes get an unknown shape.)
pub fn attention(ctx: &InferCtx<'_>) -> RuleResult {
    let (q, v) = (ctx.req(0)?, ctx.req(2)?);
    let dtype = same_dtype([q, ctx.req(1)?, v])?;
    let shape = match (&q.shape, &v.shape) {
        (Some(qs), Some(vs)) if qs.len() == 4 && vs.len() == 4 => Some(vec![
            qs[0].clone(),
            qs[1].clone(),
            qs[2].clone(),
            vs[3].clone(),
        ]),
        _ => None,
    };
    Ok(vec![Facts::new(dtype, shape)])
}

/// com.microsoft GroupQueryAttention: output `[B, S, Hq·D]`, present key/value
/// `[B, Hkv, ?, D]` (their length depends on `total_sequence_length`'s value); `D` from the
/// query width (packed: `Hq + 2·Hkv` heads).
pub fn group_query_attention(ctx: &InferCtx<'_>) -> RuleResult {
    let q = ctx.req(0)?;
    let (hq, hkv) = (
        ctx.attr_int("num_heads", 0),
        ctx.attr_int("kv_num_heads", 0),
    );
    if hq <= 0 || hkv <= 0 {
        return Err(ShapeError::Invalid(format!(
            "num_heads {hq} and kv_num_heads {hkv} must be positive"
        )));
    }
    let heads = if ctx.input(1).is_none() {
        hq + 2 * hkv
    } else {
        hq
    };
    let Some(qs) = &q.shape else {
        return Ok(vec![Facts::new(q.dtype, None)]);
    };
    if qs.len() != 3 {
        return Err(ShapeError::Rank {
            what: "query",
            expected: "3".into(),
            got: qs.len(),
        });
    }
    let d = match &qs[2] {
        Dim::Known(w) if w % heads != 0 => {
            return Err(ShapeError::Invalid(format!(
                "query width {w} is not a multiple of {heads} heads"
            )));
        }
        Dim::Known(w) => Dim::Known(w / heads),
        _ => Dim::Unknown,
    };
    let width = match &d {
        Dim::Known(d) => Dim::Known(d * hq),
        _ => Dim::Unknown,
    };
    let present = Facts::new(
        q.dtype,
        Some(vec![qs[0].clone(), Dim::Known(hkv), Dim::Unknown, d]),
    );
    Ok(vec![
        Facts::new(q.dtype, Some(vec![qs[0].clone(), qs[1].clone(), width])),
        present.clone(),
        present,
    ])
}

/// MatMulInteger: the MatMul shape, i32 result.
pub fn matmul_integer(ctx: &InferCtx<'_>) -> RuleResult {
    let (a, b) = (ctx.req(0)?, ctx.req(1)?);
    let shape = matmul_shape(a.shape.as_ref(), b.shape.as_ref())?;
    Ok(vec![Facts::new(Some(DType::I32), shape)])
}

/// Gemm: `[M, K] x [K, N] -> [M, N]` with `transA` / `transB`.
pub fn gemm(ctx: &InferCtx<'_>) -> RuleResult {
    let (a, b) = (ctx.req(0)?, ctx.req(1)?);
    let dtype = same_dtype([a, b])?;
    let (Some(sa), Some(sb)) = (&a.shape, &b.shape) else {
        return Ok(vec![Facts::new(dtype, Some(vec![Dim::Unknown; 2]))]);
    };
    for (what, s) in [("A", sa), ("B", sb)] {
        if s.len() != 2 {
            return Err(ShapeError::Rank {
                what,
                expected: "2".into(),
                got: s.len(),
            });
        }
    }
    let ta = ctx.attr_int("transA", 0) != 0;
    let tb = ctx.attr_int("transB", 0) != 0;
    let (m, ka) = if ta {
        (&sa[1], &sa[0])
    } else {
        (&sa[0], &sa[1])
    };
    let (kb, n) = if tb {
        (&sb[1], &sb[0])
    } else {
        (&sb[0], &sb[1])
    };
    unify_dim(ka, kb).ok_or_else(|| ShapeError::InnerDims {
        a: ka.clone(),
        b: kb.clone(),
        sa: fmt_shape(sa),
        sb: fmt_shape(sb),
    })?;
    Ok(vec![Facts::new(dtype, Some(vec![m.clone(), n.clone()]))])
}

/// com.microsoft MatMulNBits: `A[.., K] -> [.., N]` (N from the attribute), A's type.
pub fn matmul_nbits(ctx: &InferCtx<'_>) -> RuleResult {
    let a = ctx.req(0)?;
    let n = ctx
        .node
        .attr_int("N")
        .ok_or(ShapeError::MissingAttr { name: "N" })?;
    let shape = a.shape.as_ref().map(|s| {
        let mut o = s.clone();
        match o.last_mut() {
            Some(d) => *d = Dim::Known(n),
            None => o.push(Dim::Known(n)),
        }
        o
    });
    if let (Some(s), Some(k)) = (&a.shape, ctx.node.attr_int("K"))
        && let Some(Dim::Known(got)) = s.last()
        && *got != k
    {
        return Err(ShapeError::InnerDims {
            a: Dim::Known(*got),
            b: Dim::Known(k),
            sa: fmt_shape(s),
            sb: format!("K = {k}"),
        });
    }
    Ok(vec![Facts::new(a.dtype, shape)])
}

/// Einsum: labels bound to dims across operands; the output from the explicit or implicit
/// (sorted labels used once) form. Ellipses broadcast. Unknown rank anywhere: unknown.
pub fn einsum(ctx: &InferCtx<'_>) -> RuleResult {
    let inputs = ctx.present_inputs();
    let dtype = same_dtype(inputs.iter().copied())?;
    let eq = ctx
        .node
        .attr_str("equation")
        .ok_or(ShapeError::MissingAttr { name: "equation" })?;
    let eq: String = String::from_utf8_lossy(eq)
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let bad = |why: &str| ShapeError::BadAttr {
        name: "equation",
        reason: format!("`{eq}`: {why}"),
    };
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l, Some(r)),
        None => (eq.as_str(), None),
    };
    let terms: Vec<&str> = lhs.split(',').collect();
    if terms.len() != inputs.len() {
        return Err(bad(&format!(
            "{} operands for {} inputs",
            terms.len(),
            inputs.len()
        )));
    }
    let mut dims: HashMap<char, Dim> = HashMap::new();
    let mut counts: HashMap<char, usize> = HashMap::new();
    let mut ellipsis: Option<Shape> = None;
    for (term, f) in terms.iter().zip(&inputs) {
        let Some(s) = &f.shape else {
            return Ok(vec![Facts::new(dtype, None)]);
        };
        let (pre, post) = match term.split_once("...") {
            Some((p, q)) => (p, Some(q)),
            None => (*term, None),
        };
        let labels: Vec<char> = pre.chars().chain(post.unwrap_or("").chars()).collect();
        if labels.iter().any(|c| !c.is_ascii_alphabetic()) {
            return Err(bad("labels must be letters"));
        }
        let ell_rank = match post {
            Some(_) if s.len() >= labels.len() => s.len() - labels.len(),
            None if s.len() == labels.len() => 0,
            _ => {
                return Err(bad(&format!(
                    "term `{term}` does not match rank {}",
                    s.len()
                )));
            }
        };
        let npre = pre.len();
        if post.is_some() {
            let e = &s[npre..npre + ell_rank];
            ellipsis = Some(match &ellipsis {
                None => e.to_vec(),
                Some(prev) => broadcast_shapes(prev, e).ok_or_else(|| ShapeError::Broadcast {
                    a: fmt_shape(prev),
                    b: fmt_shape(e),
                })?,
            });
        }
        for (i, c) in labels.iter().enumerate() {
            let d = if i < npre { &s[i] } else { &s[i + ell_rank] };
            *counts.entry(*c).or_default() += 1;
            let merged = match dims.get(c) {
                None => d.clone(),
                // A label bound to 1 in one operand may broadcast against another.
                Some(prev) => match (prev, d) {
                    (Dim::Known(1), x) | (x, Dim::Known(1)) => x.clone(),
                    _ => unify_dim(prev, d).ok_or_else(|| {
                        bad(&format!(
                            "label `{c}` is {prev} in one operand and {d} in another"
                        ))
                    })?,
                },
            };
            dims.insert(*c, merged);
        }
    }
    let out_labels: String = match rhs {
        Some(r) => r.to_string(),
        None => {
            let mut once: Vec<char> = counts
                .iter()
                .filter(|(_, n)| **n == 1)
                .map(|(c, _)| *c)
                .collect();
            once.sort_unstable();
            let body: String = once.into_iter().collect();
            if ellipsis.is_some() {
                format!("...{body}")
            } else {
                body
            }
        }
    };
    let mut out = Vec::new();
    let (pre, post) = match out_labels.split_once("...") {
        Some((p, q)) => (p, Some(q)),
        None => (out_labels.as_str(), None),
    };
    let label = |c: char| {
        dims.get(&c)
            .cloned()
            .ok_or_else(|| bad(&format!("output label `{c}` is not in any input")))
    };
    for c in pre.chars() {
        out.push(label(c)?);
    }
    if let Some(q) = post {
        out.extend(ellipsis.clone().unwrap_or_default());
        for c in q.chars() {
            out.push(label(c)?);
        }
    }
    Ok(vec![Facts::new(dtype, Some(out))])
}
