//! Scaled dot-product attention in one pass over cache-sized row blocks: ONNX `Attention`
//! (opset 23, 4-D inputs), and `ai.perqc::Attention`, the canonical form of the exported
//! pattern `MatMul(Softmax(Mul(MatMul(Q, Kᵀ), c) + M), V)`.
//!
//! For query head `h` (key/value head `h / (Hq / Hkv)`, grouped-query attention) and query
//! row `i`:
//!
//! ```text
//! s_ij = c · (q_i · k_j)            one rounding of the product, as MatMul then Mul
//! s_ij += M_ij                      float mask; a bool mask adds -inf where false;
//!                                   is_causal adds -inf where j > i
//! p_i  = softmax(s_i)               the same row kernel as Softmax; a row masked
//!                                   everywhere gives p_i = 0 (ONNX), or NaN as Softmax
//!                                   does (ai.perqc::Attention)
//! y_i  = Σ_j p_ij v_j
//! ```
//!
//! Each task owns `ROWS` query rows of one head: their scores (`ROWS x L`) stay in a
//! scratch buffer in cache, so the `[B, H, S, L]` score tensor never goes to memory. Keys
//! whose probability is exactly 0 in every row of the block (the masked future of a causal
//! mask) are left out of `P V` when their value rows are finite; with a non-finite value
//! row the product `0 · v` is NaN, so those keys are kept and the result stays that of the
//! unfused formula (up to summation order).

use super::vmath::{softmax_row, sum_squares_slice};
use crate::kernel::{Arr, KernelCtx, KernelError, RtTensor, opt, output_vec, req_f32};
use ndarray::{ArrayD, Axis, IxDyn};
use rayon::prelude::*;

type In<'a, 'b> = &'a [Option<&'b RtTensor>];
type Out = Result<Vec<RtTensor>, KernelError>;

/// Query rows per task: a 64 x 512 score block is 128 KiB, inside L2.
const ROWS: usize = 64;

/// The mask, broadcast to `[B, Hq, S, L]`, as a base pointer and element strides.
#[derive(Clone, Copy)]
enum Mask {
    None,
    Add(*const f32, [isize; 4]),
    Keep(*const bool, [isize; 4]),
}

/// A 4-d f32 operand: base pointer and element strides.
#[derive(Clone, Copy)]
struct Op4 {
    ptr: *const f32,
    st: [isize; 4],
}

#[derive(Clone, Copy)]
struct Shared {
    q: Op4,
    k: Op4,
    v: Op4,
    mask: Mask,
    out: *mut f32,
    /// (heads per kv head, S, L, D, Dv, Hq)
    dims: (usize, usize, usize, usize, usize, usize),
    scale: f32,
    causal: bool,
    /// Fully masked rows (all `-inf`) get probabilities 0 (ONNX Attention) instead of the
    /// NaN of `Softmax` (the fused unfused-graph semantics).
    zero_masked_rows: bool,
    /// Per (batch, kv head): 1 + the last key whose value row is not all finite (0 if none).
    v_finite_after: *const usize,
    /// Per (batch, kv head): the largest key norm `|k_j|` (NaN or inf if any key is).
    k_norm: *const f32,
}
// Safety: the pointers address arrays that outlive the parallel loop; tasks write disjoint
// output rows.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

fn op4(a: &Arr<f32>) -> Op4 {
    let s = a.strides();
    Op4 {
        ptr: a.as_ptr(),
        st: [s[0], s[1], s[2], s[3]],
    }
}

fn strides4<T>(m: &Arr<T>, shape: [usize; 4]) -> Result<[isize; 4], KernelError> {
    let v = m
        .broadcast(IxDyn(&shape))
        .ok_or_else(|| KernelError::Broadcast {
            a: m.shape().to_vec(),
            b: shape.to_vec(),
        })?;
    let s = v.strides();
    Ok([s[0], s[1], s[2], s[3]])
}

/// ONNX Attention (opset 23) for 4-d Q `[B, Hq, S, D]`, K `[B, Hkv, L, D]`,
/// V `[B, Hkv, L, Dv]`, optional mask broadcastable to `[B, Hq, S, L]`; attributes
/// `scale` (default `1/sqrt(D)`) and `is_causal`. Returns Y `[B, Hq, S, Dv]`.
pub fn attention(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let (q, k, v) = (
        req_f32(inputs, 0)?,
        req_f32(inputs, 1)?,
        req_f32(inputs, 2)?,
    );
    if opt(inputs, 4).is_some() || opt(inputs, 5).is_some() {
        return Err(KernelError::Invalid(
            "Attention with past_key / past_value is not supported".into(),
        ));
    }
    if ctx.float("softcap", 0.0) != 0.0 {
        return Err(KernelError::Invalid(
            "Attention with softcap is not supported".into(),
        ));
    }
    if [q.ndim(), k.ndim(), v.ndim()] != [4, 4, 4] {
        return Err(KernelError::Invalid(format!(
            "Attention on inputs of rank {}, {}, {} is not supported (only 4-d [batch, heads, seq, dim])",
            q.ndim(),
            k.ndim(),
            v.ndim()
        )));
    }
    let (b, hq, s, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let (hkv, l) = (k.shape()[1], k.shape()[2]);
    let dv = v.shape()[3];
    let bad = k.shape()[0] != b
        || v.shape()[0] != b
        || k.shape()[3] != d
        || v.shape()[1] != hkv
        || v.shape()[2] != l
        || hkv == 0
        || hq % hkv != 0;
    if bad {
        return Err(KernelError::Invalid(format!(
            "Attention shapes Q {:?}, K {:?}, V {:?} do not fit \
             ([B, Hq, S, D], [B, Hkv, L, D], [B, Hkv, L, Dv], Hq a multiple of Hkv)",
            q.shape(),
            k.shape(),
            v.shape()
        )));
    }
    let full = [b, hq, s, l];
    let mask = match opt(inputs, 3) {
        None => Mask::None,
        Some(RtTensor::F32(m)) => Mask::Add(m.as_ptr(), strides4(m, full)?),
        Some(RtTensor::Bool(m)) => Mask::Keep(m.as_ptr(), strides4(m, full)?),
        Some(other) => {
            return Err(KernelError::InputType {
                index: 3,
                dtype: other.dtype(),
            });
        }
    };
    let scale = ctx.float("scale", 1.0 / (d as f32).sqrt());
    fn head(a: &Arr<f32>, i: usize, j: usize) -> Result<ndarray::ArrayView2<'_, f32>, KernelError> {
        Ok(a.index_axis(Axis(0), i)
            .index_axis_move(Axis(0), j)
            .into_dimensionality::<ndarray::Ix2>()?)
    }
    let mut v_finite_after = Vec::with_capacity(b * hkv);
    let mut k_norm = Vec::with_capacity(b * hkv);
    for bk in 0..b * hkv {
        let finite = |r: &[f32]| r.iter().fold(true, |all, x| all & x.is_finite());
        let rows_v = rows_of(head(v, bk / hkv, bk % hkv)?, finite);
        v_finite_after.push(rows_v.iter().rposition(|f| !f).map_or(0, |j| j + 1));
        let norms = rows_of(head(k, bk / hkv, bk % hkv)?, |r| {
            sum_squares_slice(r).sqrt()
        });
        k_norm.push(norms.into_iter().fold(0f32, nan_max));
    }
    let total = b * hq * s * dv;
    let mut out: Vec<f32> = output_vec(total);
    let sh = Shared {
        q: op4(q),
        k: op4(k),
        v: op4(v),
        mask,
        out: out.spare_capacity_mut().as_mut_ptr().cast(),
        dims: (hq / hkv, s, l, d, dv, hq),
        scale,
        causal: ctx.int("is_causal", 0) != 0,
        // The canonical form keeps the NaN of the Softmax it replaced.
        zero_masked_rows: ctx.node.domain != crate::PERQC_DOMAIN,
        v_finite_after: v_finite_after.as_ptr(),
        k_norm: k_norm.as_ptr(),
    };
    let blocks = s.div_ceil(ROWS);
    let tasks = b * hq * blocks;
    let run = |t: usize| {
        // Safety: see `Shared`; task `t` writes rows of its own (batch, head, block).
        unsafe { block(&sh, t / (hq * blocks), t / blocks % hq, t % blocks * ROWS) }
    };
    if total > 0 {
        if ctx.threads > 1 && tasks > 1 {
            (0..tasks).into_par_iter().for_each(run);
        } else {
            (0..tasks).for_each(run);
        }
    }
    // Safety: every output row was written by exactly one task (or `total` is 0).
    unsafe { out.set_len(total) };
    Ok(vec![RtTensor::f32(ArrayD::from_shape_vec(
        IxDyn(&[b, hq, s, dv]),
        out,
    )?)])
}

/// A mask entry at or below this is *dead*: its probability is exactly 0 whenever the row
/// has a live entry and scores are bounded by [`SCORE_BOUND`] (see [`block`]).
const DEAD: f32 = -1e30;
/// A mask entry at or above this is *live*.
const LIVE: f32 = -1e20;
/// Bound on `|scale · q·k|` (from the operands' norms) under which dead keys may be skipped.
const SCORE_BOUND: f32 = 1e28;

/// `f` of each row of `m`, borrowing the rows when they are contiguous.
fn rows_of<R>(m: ndarray::ArrayView2<'_, f32>, f: impl Fn(&[f32]) -> R) -> Vec<R> {
    match m.as_slice() {
        Some(all) if m.ncols() > 0 => all.chunks_exact(m.ncols()).map(f).collect(),
        _ => m.outer_iter().map(|r| f(&r.to_vec())).collect(),
    }
}

/// `max` that keeps a NaN (`f32::max` would drop it and certify a NaN operand).
fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

/// A mask entry that is not dead (NaN included: it poisons the row, so it must be kept).
#[inline(always)]
fn not_dead(x: f32) -> bool {
    x > DEAD || x.is_nan()
}

/// The last index of `m` holding a value above [`DEAD`]; chunked so the max vectorizes.
fn last_not_dead(m: &[f32]) -> Option<usize> {
    const CHUNK: usize = 32;
    let mut end = m.len();
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let c = &m[start..end];
        // No early exit inside a chunk, so the test vectorizes; NaN counts as not dead.
        if c.iter().fold(false, |any, &x| any | not_dead(x)) {
            return c.iter().rposition(|&x| not_dead(x)).map(|j| start + j);
        }
        end = start;
    }
    None
}

impl Shared {
    /// 1 + the last key of row `i` whose mask entry is not dead (0 if all are dead).
    ///
    /// Safety: indices inside the checked shapes.
    unsafe fn alive_until(&self, bi: usize, h: usize, i: usize, l: usize) -> usize {
        let upper = if self.causal { l.min(i + 1) } else { l };
        match self.mask {
            Mask::None => upper,
            Mask::Add(p, st) if st[3] == 1 => {
                let off = bi as isize * st[0] + h as isize * st[1] + i as isize * st[2];
                // Safety: a contiguous mask row of `l >= upper` elements.
                let m = unsafe { std::slice::from_raw_parts(p.wrapping_offset(off), upper) };
                last_not_dead(m).map_or(0, |j| j + 1)
            }
            _ => (0..upper)
                .rposition(|j| not_dead(unsafe { self.mask_at(bi, h, i, j) }))
                .map_or(0, |j| j + 1),
        }
    }

    /// The additive mask of row `i` (batch `bi`, head `h`) at key `j`, causal part included.
    ///
    /// Safety: indices inside the checked shapes.
    #[inline(always)]
    unsafe fn mask_at(&self, bi: usize, h: usize, i: usize, j: usize) -> f32 {
        if self.causal && j > i {
            return f32::NEG_INFINITY;
        }
        let at = |st: &[isize; 4]| {
            bi as isize * st[0] + h as isize * st[1] + i as isize * st[2] + j as isize * st[3]
        };
        // Safety: inside the broadcast mask view.
        unsafe {
            match self.mask {
                Mask::None => 0.0,
                Mask::Add(p, st) => *p.wrapping_offset(at(&st)),
                Mask::Keep(p, st) => {
                    if *p.wrapping_offset(at(&st)) {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                }
            }
        }
    }
}

/// Rows `i0 .. i0 + ROWS` (clipped to S) of head `h` in batch `bi`.
///
/// Keys `j >= need` are never scored when each row of the block has a live mask entry, all
/// of those keys are dead in every row, and `|scale · q_i·k_j| <= scale · |q_i| · |k_j| <
/// SCORE_BOUND`: then a dead score is below `DEAD + SCORE_BOUND`, the row maximum is above
/// `LIVE - SCORE_BOUND`, so `exp(score - max) < exp(-9e29)`, which is exactly 0 in f32 and
/// adds exactly 0 to the softmax sum. Leaving those keys out of the max, the sum and `P V`
/// (their value rows being finite) therefore changes nothing. Non-finite operands make the
/// norm test fail (NaN compares false), so they take the full path.
///
/// Safety: `sh` describes live arrays of the checked shapes; no other task writes these
/// output rows.
unsafe fn block(sh: &Shared, bi: usize, h: usize, i0: usize) {
    let (group, s, l, d, dv, hq) = sh.dims;
    let rows = ROWS.min(s - i0);
    let kh = h / group;
    let bk = bi * (hq / group) + kh;
    let at = |o: &Op4, a: usize, b: usize, c: usize| {
        o.ptr
            .wrapping_offset(a as isize * o.st[0] + b as isize * o.st[1] + c as isize * o.st[2])
    };
    // Safety (all unsafe below): reads inside Q, K, V and the mask; writes inside `sc` and
    // this task's output rows.
    let (k_norm, v_bad) = unsafe { (*sh.k_norm.add(bk), *sh.v_finite_after.add(bk)) };
    let masked = sh.causal || !matches!(sh.mask, Mask::None);
    let mut need = l;
    if masked && l > 0 {
        let q_norm = (i0..i0 + rows)
            .map(|i| {
                let r = at(&sh.q, bi, h, i);
                if sh.q.st[3] == 1 {
                    // Safety: a contiguous row of Q.
                    sum_squares_slice(unsafe { std::slice::from_raw_parts(r, d) }).sqrt()
                } else {
                    (0..d)
                        .map(|c| unsafe { *r.wrapping_offset(c as isize * sh.q.st[3]) })
                        .map(|x| x * x)
                        .sum::<f32>()
                        .sqrt()
                }
            })
            .fold(0f32, nan_max);
        if sh.scale.abs() * q_norm * k_norm < SCORE_BOUND {
            // 1 + the last not-dead key over the block's rows; None: some row has no live key.
            let mut last_alive = Some(0);
            for i in i0..i0 + rows {
                let has_live = (0..l).any(|j| unsafe { sh.mask_at(bi, h, i, j) } >= LIVE);
                let until = unsafe { sh.alive_until(bi, h, i, l) };
                last_alive = match (has_live, last_alive) {
                    (true, Some(a)) => Some(a.max(until)),
                    _ => None,
                };
                if last_alive.is_none() {
                    break;
                }
            }
            if let Some(a) = last_alive {
                need = a.max(v_bad);
            }
        }
    }
    let mut sc: Vec<f32> = Vec::with_capacity(rows * need);
    unsafe {
        if need > 0 {
            // sc (rows x need) = scale · Q_blk (rows x D) · Kᵀ (D x need).
            gemm::gemm(
                rows,
                need,
                d,
                sc.as_mut_ptr(),
                1,
                need as isize,
                false,
                at(&sh.q, bi, h, i0),
                sh.q.st[3],
                sh.q.st[2],
                at(&sh.k, bi, kh, 0),
                sh.k.st[2],
                sh.k.st[3],
                0.0,
                sh.scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        sc.set_len(rows * need);
    }
    // Mask and softmax each row; `live` = 1 + the last key with a nonzero probability in
    // any row of the block.
    let mut live = 0;
    for (r, row) in sc.chunks_exact_mut(need.max(1)).enumerate().take(rows) {
        let i = i0 + r;
        if masked {
            match sh.mask {
                Mask::Add(p, st) if st[3] == 1 && !sh.causal => {
                    let off = bi as isize * st[0] + h as isize * st[1] + i as isize * st[2];
                    // Safety: a contiguous mask row of at least `need` elements.
                    let m = unsafe { std::slice::from_raw_parts(p.wrapping_offset(off), need) };
                    row.iter_mut().zip(m).for_each(|(x, m)| *x += m);
                }
                _ => {
                    for (j, x) in row.iter_mut().enumerate() {
                        *x += unsafe { sh.mask_at(bi, h, i, j) };
                    }
                }
            }
        }
        if sh.zero_masked_rows && row.iter().all(|&x| x == f32::NEG_INFINITY) {
            // ONNX Attention: a fully masked row attends to nothing.
            row.fill(0.0);
        } else {
            softmax_row(row);
        }
        if let Some(last) = row.iter().rposition(|&p| p != 0.0) {
            live = live.max(last + 1);
        }
    }
    // Keys past `live` contribute 0 · v_j; leave out those after the last value row
    // holding an inf or NaN.
    let keys = live.max(v_bad).min(need);
    let dst = unsafe { sh.out.add(((bi * hq + h) * s + i0) * dv) };
    unsafe {
        if keys == 0 {
            std::ptr::write_bytes(dst, 0, rows * dv);
        } else {
            // Y_blk (rows x Dv) = P_blk (rows x keys) · V[..keys] (keys x Dv).
            gemm::gemm(
                rows,
                dv,
                keys,
                dst,
                1,
                dv as isize,
                false,
                sc.as_ptr(),
                1,
                need as isize,
                at(&sh.v, bi, kh, 0),
                sh.v.st[3],
                sh.v.st[2],
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}
