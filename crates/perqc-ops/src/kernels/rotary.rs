//! Rotary position embeddings: `com.microsoft::RotaryEmbedding`, and the rotation
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

use crate::kernel::{Arr, KernelCtx, KernelError, RtTensor, opt, req_f32, req_ints};

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
