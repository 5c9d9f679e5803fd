//! Rotary position embeddings: `com.microsoft::RotaryEmbedding`, `ai.perqc::Rotary` (the
//! exported "rotate half" chain, [`rotate_half`]), and the rotation
//! `com.microsoft::GroupQueryAttention` applies to its new query and key heads
//! (`do_rotary`).
//!
//! A head row `x` of `D` elements at position `p` is rotated over its first `R` elements
//! (`R` even, `R <= D`; the rest pass through) with `c = cos_cache[p]`, `s = sin_cache[p]`
//! (`R / 2` entries each), pairing element `i` with:
//!
//! ```text
//! half split (interleaved = 0): (x_i, x_{i+R/2}) for i < R/2
//! interleaved:                  (x_{2i}, x_{2i+1}) for i < R/2
//! each pair (a, b) -> (a · c_i - b · s_i, b · c_i + a · s_i)
//! ```
//!
//! as ONNX Runtime's CPU kernel computes it (one product per term, then one add).

use super::layout::{SendPtr, Walk, filled_units};
use super::vmath::multiversion;
use crate::kernel::{Arr, KernelCtx, KernelError, RtTensor, opt, req_f32, req_ints};
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use std::mem::MaybeUninit;

type In<'a, 'b> = &'a [Option<&'b RtTensor>];
type Out = Result<Vec<RtTensor>, KernelError>;

/// The cos and sin caches `[max_position, R / 2]` of one rotation.
pub(crate) struct Caches<'a> {
    cos: &'a [f32],
    sin: &'a [f32],
    /// `R / 2`.
    half: usize,
    positions: usize,
}

impl<'a> Caches<'a> {
    /// Checks that `cos` and `sin` are equal-shaped 2-d tensors, stored row-major.
    pub(crate) fn new(cos: &'a Arr<f32>, sin: &'a Arr<f32>) -> Result<Caches<'a>, KernelError> {
        if cos.ndim() != 2 || cos.shape() != sin.shape() {
            return Err(KernelError::Invalid(format!(
                "cos_cache {:?} and sin_cache {:?} must be 2-d of the same shape \
                 [max_position, rotary_dim / 2]",
                cos.shape(),
                sin.shape()
            )));
        }
        let (Some(c), Some(s)) = (cos.as_slice(), sin.as_slice()) else {
            return Err(KernelError::Invalid(
                "cos_cache and sin_cache must be row-major".into(),
            ));
        };
        Ok(Caches {
            cos: c,
            sin: s,
            half: cos.shape()[1],
            positions: cos.shape()[0],
        })
    }

    /// The rotary dimension `R`.
    pub(crate) fn dim(&self) -> usize {
        2 * self.half
    }

    /// Rotates `row` (one head, `D >= R` elements) in place for position `p`.
    pub(crate) fn rotate(
        &self,
        row: &mut [f32],
        p: i64,
        interleaved: bool,
    ) -> Result<(), KernelError> {
        let at = usize::try_from(p)
            .ok()
            .filter(|&p| p < self.positions)
            .ok_or_else(|| {
                KernelError::Invalid(format!(
                    "position {p} is outside the cos/sin caches of {} positions",
                    self.positions
                ))
            })?;
        let h = self.half;
        let (c, s) = (
            &self.cos[at * h..(at + 1) * h],
            &self.sin[at * h..(at + 1) * h],
        );
        for i in 0..h {
            let (ia, ib) = if interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + h)
            };
            let (a, b) = (row[ia], row[ib]);
            row[ia] = a * c[i] - b * s[i];
            row[ib] = b * c[i] + a * s[i];
        }
        Ok(())
    }
}

/// `com.microsoft::RotaryEmbedding`: input `[B, S, N·D]` (heads found from `num_heads`, or
/// `D = 2 · cos_cache.shape[1]` when it is 0) or `[B, N, S, D]`; position_ids one start
/// position (row `s` is at `start + s`) or `[B, S]`; caches `[max_position, R / 2]` with
/// `R = rotary_embedding_dim` (default `D`). `scale` is not applied (nor is it by ONNX
/// Runtime's CPU kernel).
pub fn rotary_embedding(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req_f32(inputs, 0)?;
    let pos = req_ints(inputs, 1)?;
    let (cos, sin) = (req_f32(inputs, 2)?, req_f32(inputs, 3)?);
    let caches = Caches::new(cos, sin)?;
    let interleaved = ctx.int("interleaved", 0) != 0;
    let num_heads = ctx.int("num_heads", 0);
    let rot_attr = ctx.int("rotary_embedding_dim", 0);
    let sh = x.shape();
    // (batch, seq, heads, head size, seq-major layout)
    let (b, s, n, d, seq_major) = match *sh {
        [b, s, hidden] => {
            let heads = if num_heads > 0 {
                num_heads as usize
            } else {
                hidden / caches.dim().max(1)
            };
            if heads == 0
                || hidden % heads != 0
                || (num_heads <= 0 && heads * caches.dim() != hidden)
            {
                return Err(KernelError::Invalid(format!(
                    "hidden size {hidden} does not split into heads (num_heads {num_heads}, \
                     cos_cache {:?})",
                    cos.shape()
                )));
            }
            (b, s, heads, hidden / heads, true)
        }
        [b, n, s, d] => (b, s, n, d, false),
        _ => {
            return Err(KernelError::Invalid(format!(
                "input has shape {sh:?}; expected [batch, seq, hidden] or [batch, heads, seq, head_size]"
            )));
        }
    };
    let rot = if rot_attr > 0 { rot_attr as usize } else { d };
    if rot > d || rot % 2 != 0 || caches.dim() != rot {
        return Err(KernelError::Invalid(format!(
            "rotary dimension {rot} must be even, at most the head size {d}, and twice \
             cos_cache's last dimension {}",
            caches.half
        )));
    }
    let per_row = opt(inputs, 1).is_some_and(|p| p.shape().len() == 2);
    if per_row && opt(inputs, 1).map(|p| p.shape()) != Some(&[b, s][..]) {
        return Err(KernelError::Invalid(format!(
            "position_ids must hold one start position or be [batch, seq] = [{b}, {s}]"
        )));
    }
    if !per_row && pos.len() != 1 {
        return Err(KernelError::Invalid(format!(
            "position_ids has {} elements; expected one start position or [batch, seq]",
            pos.len()
        )));
    }
    let mut y = x.as_standard_layout().into_owned();
    let data = y.as_slice_mut().expect("standard layout");
    for bi in 0..b {
        for si in 0..s {
            let p = if per_row {
                pos[bi * s + si]
            } else {
                pos[0] + si as i64
            };
            for h in 0..n {
                let off = if seq_major {
                    ((bi * s + si) * n + h) * d
                } else {
                    ((bi * n + h) * s + si) * d
                };
                caches.rotate(&mut data[off..off + d], p, interleaved)?;
            }
        }
    }
    Ok(vec![RtTensor::f32(y)])
}

/// `ai.perqc::Rotary(x, cos, sin)`, the exported "rotate half" chain (passes'
/// `fuse-rotary`): over x's last axis of `D` (even) elements, `h = D / 2`,
///
/// ```text
/// y_j = x_j · c_j + r_j · s_j,   r = (-x[h..D], x[0..h])
/// ```
///
/// with cos and sin broadcast to x's shape (the result has x's shape). One product per
/// term and one sum, in the chain's order, so the result is bitwise the chain's.
pub fn rotate_half(_: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req_f32(inputs, 0)?;
    let (cos, sin) = (req_f32(inputs, 1)?, req_f32(inputs, 2)?);
    let shape = x.shape().to_vec();
    let Some((&d, rows)) = shape.split_last() else {
        return Err(KernelError::Invalid(
            "Rotary needs x of rank >= 1 (its last axis is rotated)".into(),
        ));
    };
    if d % 2 != 0 {
        return Err(KernelError::Invalid(format!(
            "Rotary rotates halves of the last axis; its size {d} is odd"
        )));
    }
    fn to_x<'a>(c: &'a Arr<f32>, shape: &[usize]) -> Result<ArrayViewD<'a, f32>, KernelError> {
        c.broadcast(IxDyn(shape)).ok_or_else(|| {
            KernelError::Invalid(format!(
                "Rotary: cos/sin of shape {:?} do not broadcast to x's {shape:?}",
                c.shape()
            ))
        })
    }
    let (c, s) = (to_x(cos, &shape)?, to_x(sin, &shape)?);
    if d == 0 {
        return Ok(vec![RtTensor::f32(ArrayD::zeros(IxDyn(&shape)))]);
    }
    let r = rows.len();
    let walk = Walk::new(
        rows,
        [&x.strides()[..r], &c.strides()[..r], &s.strides()[..r]],
    );
    let last = [x.strides()[r], c.strides()[r], s.strides()[r]];
    let (px, pc, ps) = (
        SendPtr(x.as_ptr()),
        SendPtr(c.as_ptr()),
        SendPtr(s.as_ptr()),
    );
    let out = filled_units(&shape, d, 3, |e0, dst| {
        walk.pieces(e0 / d, dst.len() / d, |at, [ox, oc, os], take| {
            for t in 0..take {
                let row = &mut dst[(at + t) * d..(at + t + 1) * d];
                let t = t as isize;
                // Safety: the offsets, steps and last-axis strides index the broadcast
                // views of live arrays, `d` elements per row.
                unsafe {
                    let (xr, cr, sr) = (
                        px.get().offset(ox + t * walk.step[0]),
                        pc.get().offset(oc + t * walk.step[1]),
                        ps.get().offset(os + t * walk.step[2]),
                    );
                    if last == [1, 1, 1] {
                        use std::slice::from_raw_parts as slice;
                        rotate_row(slice(xr, d), slice(cr, d), slice(sr, d), row);
                    } else {
                        let at = |p: *const f32, st: isize, j: usize| *p.offset(j as isize * st);
                        let h = d / 2;
                        for (j, y) in row.iter_mut().enumerate() {
                            let r = if j < h {
                                -at(xr, last[0], j + h)
                            } else {
                                at(xr, last[0], j - h)
                            };
                            y.write(
                                at(xr, last[0], j) * at(cr, last[1], j) + r * at(sr, last[2], j),
                            );
                        }
                    }
                }
            }
        });
    });
    Ok(vec![RtTensor::f32(out)])
}

multiversion! {
    /// One row of [`rotate_half`], all operands contiguous (`x.len()` even).
    fn rotate_row(x: &[f32], c: &[f32], s: &[f32], y: &mut [MaybeUninit<f32>]) {
        let h = x.len() / 2;
        let (lo, hi) = x.split_at(h);
        let (y_lo, y_hi) = y.split_at_mut(h);
        let ((c_lo, c_hi), (s_lo, s_hi)) = (c.split_at(h), s.split_at(h));
        for ((((y, &a), &b), &c), &s) in y_lo.iter_mut().zip(lo).zip(hi).zip(c_lo).zip(s_lo) {
            y.write(a * c + -b * s);
        }
        for ((((y, &a), &b), &c), &s) in y_hi.iter_mut().zip(lo).zip(hi).zip(c_hi).zip(s_hi) {
            y.write(b * c + a * s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use perqc_ir::{Graph, NodeSpec};

    /// The chain `x·c + concat(-x[h..], x[..h])·s`, element by element in f32.
    fn chain(x: &ArrayD<f32>, c: &ArrayD<f32>, s: &ArrayD<f32>) -> ArrayD<f32> {
        let d = *x.shape().last().unwrap();
        let h = d / 2;
        let (c, s) = (
            c.broadcast(x.raw_dim()).unwrap(),
            s.broadcast(x.raw_dim()).unwrap(),
        );
        let mut y = ArrayD::zeros(x.raw_dim());
        for (idx, v) in y.indexed_iter_mut() {
            let j = idx[x.ndim() - 1];
            let mut other = idx.clone();
            other[x.ndim() - 1] = if j < h { j + h } else { j - h };
            let r = if j < h { -x[&other] } else { x[&other] };
            *v = x[&idx] * c[&idx] + r * s[&idx];
        }
        y
    }

    /// Contiguous rows, a transposed x (strided rows of contiguous elements), cos and sin
    /// broadcast over heads, and a cos constant along the last axis (stride 0): all bitwise
    /// the chain; odd widths and shapes that do not broadcast to x are errors.
    #[test]
    fn rotate_half_is_the_chain_bitwise() {
        let mut g = Graph::new("t");
        let id = g.add_node(NodeSpec::new("Rotary"), &[], &["y"]).unwrap();
        let val = |shape: &[usize], seed: usize| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| (((i + seed) * 7919 % 2003) as f32 - 1001.0) / 97.0)
                .collect();
            ArrayD::from_shape_vec(IxDyn(shape), v).unwrap()
        };
        let x = val(&[2, 6, 3, 8], 1);
        let xt = x.clone().permuted_axes(IxDyn(&[0, 2, 1, 3]));
        let cases = [
            (xt.clone(), val(&[1, 1, 6, 8], 2), val(&[1, 1, 6, 8], 3)),
            (
                xt.as_standard_layout().to_owned(),
                val(&[6, 8], 4),
                val(&[6, 8], 5),
            ),
            (xt.clone(), val(&[6, 1], 6), val(&[1, 6, 8], 7)),
        ];
        for threads in [1, 2] {
            let ctx = KernelCtx {
                node: g.node(id),
                opset: 1,
                threads,
                subgraphs: None,
            };
            for (x, c, s) in &cases {
                let want = chain(x, c, s);
                let t = |a: &ArrayD<f32>| RtTensor::f32(a.clone());
                let got = rotate_half(&ctx, &[Some(&t(x)), Some(&t(c)), Some(&t(s))]).unwrap();
                let got = got[0].as_f32().unwrap();
                assert_eq!(got.shape(), want.shape());
                assert!(
                    got.iter()
                        .zip(want.iter())
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "cos {:?}, sin {:?}",
                    c.shape(),
                    s.shape()
                );
            }
            let t = |shape: &[usize]| RtTensor::f32(ArrayD::zeros(IxDyn(shape)));
            let odd = rotate_half(&ctx, &[Some(&t(&[2, 7])), Some(&t(&[7])), Some(&t(&[7]))]);
            assert!(odd.unwrap_err().to_string().contains("odd"));
            let wide = rotate_half(
                &ctx,
                &[Some(&t(&[2, 8])), Some(&t(&[3, 8])), Some(&t(&[8]))],
            );
            assert!(wide.unwrap_err().to_string().contains("broadcast"));
        }
    }
}
