//! Scaled dot-product attention in one pass over cache-sized row blocks: ONNX `Attention`
//! (opset 23, 4-D inputs), and `ai.perqc::Attention`, the canonical form of the exported
//! pattern `MatMul(Softmax(Mul(MatMul(Q, Kᵀ), c) + M), V)` (with `t · tanh(· / t)` after
//! the `Mul` when soft-capped, attribute `softcap`); also the attention step of
//! `com.microsoft::GroupQueryAttention` ([`group_query_attention`]: its KV cache, rotary and
//! window become K, V and a mask for [`sdpa`], with an optional softcap of the scores).
//!
//! For query head `h` (key/value head `h / (Hq / Hkv)`, grouped-query attention) and query
//! row `i`:
//!
//! ```text
//! s_ij = c · (q_i · k_j)            one rounding of the product, as MatMul then Mul
//! s_ij = t · tanh(s_ij / t)         softcap t > 0 only (vmath's tanh, about 2 ulp)
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

use super::attn_gemm::{self, Level, Operands, PAD, ROW_PAD};
use super::vmath::{
    multiversion, softcap_row, softmax_masked_row, softmax_row, softmax_row_of, sum_squares_slice,
};
use crate::kernel::{Arr, KernelCtx, KernelError, RtTensor, opt, output_vec, req_f32, req_ints};
use ndarray::{ArrayD, ArrayView4, Axis, IxDyn};
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
    mask: Mask,
    out: *mut f32,
    /// Element strides of the output over (batch, head, row); columns are contiguous.
    out_st: [usize; 3],
    /// Scores become `softcap · tanh(s / softcap)` before the mask when positive.
    softcap: f32,
    /// (heads per kv head, S, L, D, Dv, Hq)
    dims: (usize, usize, usize, usize, usize, usize),
    scale: f32,
    causal: bool,
    /// Fully masked rows (all `-inf`) get probabilities 0 (ONNX Attention) instead of the
    /// NaN of `Softmax` (what `ai.perqc::Attention` keeps from the exported chain).
    zero_masked_rows: bool,
    /// Per (batch, kv head): 1 + the last key whose value row is not all finite (0 if none).
    v_finite_after: *const usize,
    /// Per (batch, kv head): the largest key norm `|k_j|` (NaN or inf if any key is).
    k_norm: *const f32,
    /// Per (batch, kv head): Kᵀ as `D x lp` (zero columns past L) and V as `L x dvp`
    /// (zero columns past Dv), the panels [`attn_gemm::product`] reads.
    k_t: *const f32,
    v_p: *const f32,
    lp: usize,
    dvp: usize,
    level: Level,
    /// Per mask row, [`Shared::live_row`]: 1 + its last not-dead key, or 0 when it has no
    /// live key; one entry per (batch, head, query row) the mask distinguishes (the mask's
    /// broadcast axes share one), empty without a mask or causal flag.
    live: *const usize,
    /// Element strides of `live` over (batch, head, row): 0 on the mask's broadcast axes.
    live_st: [usize; 3],
}
// Safety: the pointers address arrays that outlive the parallel loop; tasks write disjoint
// output rows.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

fn op4(a: &ArrayView4<'_, f32>) -> Op4 {
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
/// `scale` (default `1/sqrt(D)`), `softcap` (`t > 0`: scores `t · tanh(s / t)` after the
/// scaling, before the mask) and `is_causal`. Returns Y `[B, Hq, S, Dv]`.
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
    if [q.ndim(), k.ndim(), v.ndim()] != [4, 4, 4] {
        return Err(KernelError::Invalid(format!(
            "Attention on inputs of rank {}, {}, {} is not supported (only 4-d [batch, heads, seq, dim])",
            q.ndim(),
            k.ndim(),
            v.ndim()
        )));
    }
    fn four(a: &Arr<f32>) -> Result<ArrayView4<'_, f32>, ndarray::ShapeError> {
        a.view().into_dimensionality()
    }
    let (q, k, v) = (four(q)?, four(k)?, four(v)?);
    let (b, hq, s) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let dv = v.shape()[3];
    let p = Params {
        scale: ctx.float("scale", 1.0 / (q.shape()[3] as f32).sqrt()),
        causal: ctx.int("is_causal", 0) != 0,
        // The canonical form keeps the NaN of the Softmax it replaced, unless the exported
        // chain guarded it (`zero_masked_rows = 1`, torch's SDPA spelling).
        zero_masked_rows: ctx.node.domain != crate::PERQC_DOMAIN
            || ctx.int("zero_masked_rows", 0) != 0,
        // As in the ONNX reference, a softcap that is not positive caps nothing.
        softcap: ctx.float("softcap", 0.0),
        seq_major_out: false,
    };
    let out = sdpa(q, k, v, opt(inputs, 3), &p, ctx.threads, Level::detect())?;
    Ok(vec![RtTensor::f32(ArrayD::from_shape_vec(
        IxDyn(&[b, hq, s, dv]),
        out,
    )?)])
}

/// How [`sdpa`] scores and lays out its result.
pub(crate) struct Params {
    pub scale: f32,
    /// Keys `j > i` are masked (top-left aligned, as ONNX `is_causal`).
    pub causal: bool,
    /// A row masked everywhere gives 0 (ONNX) instead of NaN (`Softmax`).
    pub zero_masked_rows: bool,
    /// `s = softcap · tanh(s / softcap)` after scaling, before the mask (0: none).
    pub softcap: f32,
    /// Output `[B, S, Hq, Dv]` instead of `[B, Hq, S, Dv]`.
    pub seq_major_out: bool,
}

/// Attention of Q `[B, Hq, S, D]` over K `[B, Hkv, L, D]`, V `[B, Hkv, L, Dv]` (any
/// strides; query head `h` reads key/value head `h / (Hq / Hkv)`), with an optional f32
/// (added) or bool (kept where true) mask broadcastable to `[B, Hq, S, L]`. Returns Y
/// row-major in the layout `p.seq_major_out` selects; the products run at `level`.
pub(crate) fn sdpa(
    q: ArrayView4<'_, f32>,
    k: ArrayView4<'_, f32>,
    v: ArrayView4<'_, f32>,
    mask: Option<&RtTensor>,
    p: &Params,
    threads: usize,
    level: Level,
) -> Result<Vec<f32>, KernelError> {
    let (b, hq, s, d) = q.dim();
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
    let mask = match mask {
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
    fn head<'a>(a: &ArrayView4<'a, f32>, i: usize, j: usize) -> ndarray::ArrayView2<'a, f32> {
        (*a).index_axis_move(Axis(0), i).index_axis_move(Axis(0), j)
    }
    // Per (batch, kv head): the panels, the value rows' finiteness and the key norms.
    let (lp, dvp) = (l.next_multiple_of(PAD), dv.next_multiple_of(PAD));
    let mut k_t = vec![0f32; b * hkv * d * lp];
    let mut v_p = vec![0f32; b * hkv * l * dvp];
    let prepare = |(bk, (kt, vp)): (usize, (&mut [f32], &mut [f32]))| -> (usize, f32) {
        let (kh, vh) = (head(&k, bk / hkv, bk % hkv), head(&v, bk / hkv, bk % hkv));
        // Kᵀ in tiles of TILE keys: the tile's key rows stay in L1 while each of its D
        // columns is written as one contiguous run.
        const TILE: usize = 64;
        let (krs, kcs) = (kh.strides()[0], kh.strides()[1]);
        for j0 in (0..l).step_by(TILE) {
            let j1 = (j0 + TILE).min(l);
            for (c, col) in kt.chunks_exact_mut(lp).enumerate() {
                let src = kh.as_ptr().wrapping_offset(c as isize * kcs);
                for (j, o) in (j0..j1).zip(&mut col[j0..j1]) {
                    // Safety: (j, c) inside K's head view.
                    *o = unsafe { *src.wrapping_offset(j as isize * krs) };
                }
            }
        }
        for (row, out) in vh.outer_iter().zip(vp.chunks_exact_mut(dvp.max(1))) {
            match row.as_slice() {
                Some(r) => out[..dv].copy_from_slice(r),
                None => row.iter().zip(out.iter_mut()).for_each(|(&x, o)| *o = x),
            }
        }
        let finite = |r: &[f32]| r.iter().fold(true, |all, x| all & x.is_finite());
        let rows_v = rows_of(vh, finite);
        let norms = rows_of(kh, |r| sum_squares_slice(r).sqrt());
        (
            rows_v.iter().rposition(|f| !f).map_or(0, |j| j + 1),
            norms.into_iter().fold(0f32, nan_max),
        )
    };
    let heads = split(&mut k_t, b * hkv)
        .into_iter()
        .zip(split(&mut v_p, b * hkv))
        .enumerate();
    let per_head: Vec<(usize, f32)> = if threads > 1 && b * hkv > 1 {
        heads
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(prepare)
            .collect()
    } else {
        heads.map(prepare).collect()
    };
    let (v_finite_after, k_norm): (Vec<usize>, Vec<f32>) = per_head.into_iter().unzip();
    // The live range of every distinct mask row, once (not once per query head it serves).
    let (mb, mh) = match mask {
        Mask::Add(_, st) | Mask::Keep(_, st) => (
            if st[0] == 0 { 1 } else { b },
            if st[1] == 0 { 1 } else { hq },
        ),
        Mask::None => (1, 1),
    };
    let masked = p.causal || !matches!(mask, Mask::None);
    let live_st = [
        if mb == 1 { 0 } else { mh * s },
        if mh == 1 { 0 } else { s },
        1,
    ];
    let total = b * hq * s * dv;
    let mut out: Vec<f32> = output_vec(total);
    let out_st = if p.seq_major_out {
        [s * hq * dv, dv, hq * dv]
    } else {
        [hq * s * dv, s * dv, dv]
    };
    let sh = Shared {
        q: op4(&q),
        mask,
        out: out.spare_capacity_mut().as_mut_ptr().cast(),
        out_st,
        softcap: p.softcap,
        dims: (hq / hkv, s, l, d, dv, hq),
        scale: p.scale,
        causal: p.causal,
        zero_masked_rows: p.zero_masked_rows,
        v_finite_after: v_finite_after.as_ptr(),
        k_norm: k_norm.as_ptr(),
        k_t: k_t.as_ptr(),
        v_p: v_p.as_ptr(),
        lp,
        dvp,
        level,
        live: std::ptr::null(),
        live_st,
    };
    let live_rows = if masked && l > 0 { mb * mh * s } else { 0 };
    let row_live = |x: usize| {
        // Safety: (batch, head, row) inside the mask's shape.
        unsafe { sh.live_row(x / (mh * s), x / s % mh, x % s) }
    };
    let live: Vec<usize> = if threads > 1 && live_rows > ROWS {
        (0..live_rows).into_par_iter().map(row_live).collect()
    } else {
        (0..live_rows).map(row_live).collect()
    };
    let sh = Shared {
        live: live.as_ptr(),
        ..sh
    };
    let blocks = s.div_ceil(ROWS);
    let tasks = b * hq * blocks;
    let run = |t: usize| {
        // Safety: see `Shared`; task `t` writes rows of its own (batch, head, block).
        unsafe { block(&sh, t / (hq * blocks), t / blocks % hq, t % blocks * ROWS) }
    };
    if total > 0 {
        if threads > 1 && tasks > 1 {
            (0..tasks).into_par_iter().for_each(run);
        } else {
            (0..tasks).for_each(run);
        }
    }
    // Safety: every output row was written by exactly one task (or `total` is 0).
    unsafe { out.set_len(total) };
    Ok(out)
}

/// `buf` cut into `n` equal parts (empty parts for an empty `buf`).
fn split(buf: &mut [f32], n: usize) -> Vec<&mut [f32]> {
    if buf.is_empty() {
        return (0..n).map(|_| &mut [][..]).collect();
    }
    buf.chunks_mut(buf.len() / n).collect()
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

multiversion! {
    /// The last index of `m` holding a value above [`DEAD`] (or NaN); chunked so the test
    /// vectorizes.
    fn last_not_dead(m: &[f32]) -> Option<usize> {
        const CHUNK: usize = 64;
        let mut end = m.len();
        while end > 0 {
            let start = end.saturating_sub(CHUNK);
            let c = &m[start..end];
            // No early exit inside a chunk, so the test vectorizes; NaN counts as not dead.
            if c.iter().fold(0u32, |any, &x| any | u32::from(not_dead(x))) != 0 {
                return c.iter().rposition(|&x| not_dead(x)).map(|j| start + j);
            }
            end = start;
        }
        None
    }
}

impl Shared {
    /// 1 + the last key of mask row `i` that is not dead, or 0 when the row has no live key
    /// (no entry at or above [`LIVE`]).
    ///
    /// Safety: indices inside the checked shapes.
    unsafe fn live_row(&self, bi: usize, h: usize, i: usize) -> usize {
        let l = self.dims.2;
        if !(0..l).any(|j| unsafe { self.mask_at(bi, h, i, j) } >= LIVE) {
            return 0;
        }
        unsafe { self.alive_until(bi, h, i, l) }
    }

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
/// adds exactly 0 to the softmax sum.
///
/// Invariant with a softcap `t`: the bound is on the scores *before* the mask, and the cap
/// comes before the mask too, so it only has to keep them bounded: `|t · tanh(s / t)| <=
/// min(|s|, t)` (tanh shrinks towards 0), plus a few ulp of rounding (vmath's `tanh` is
/// within about 2 ulp of the true one; see `softcap_row`), far inside the margin
/// (`DEAD - LIVE + 2 · SCORE_BOUND` is about `-9.8e29`). A dead key's entry stays at or
/// below `DEAD` after the cap because its mask is added afterwards, unchanged, so it is
/// still exactly 0 after the exp. (A cap after the mask would map `-inf` to `-t` and break
/// this; the ONNX op and the canonical chain cap before it.) The norm test reads q and k,
/// not the capped scores, so non-finite operands still take the full path even where the
/// cap would have made their scores finite. Leaving those keys out of the max, the sum and `P V`
/// (their value rows being finite) therefore changes nothing. Non-finite operands make the
/// norm test fail (NaN compares false), so they take the full path. Under the same bound
/// each row's softmax runs over its own live range only (keys below `Shared::live`'s
/// entry for the row; the rest of the row's probabilities are set to 0), summed in the
/// lanes the block's whole row would use (`vmath::softmax_row_of`): the same bits.
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
    let rows_p = rows.next_multiple_of(ROW_PAD);
    SCRATCH.with_borrow_mut(|scratch| {
        // Q rows of the block, contiguous, then zero rows up to `rows_p`.
        let (qp, rest) = grow(
            scratch,
            rows_p * d + rows_p * l.next_multiple_of(PAD) + rows_p * sh.dvp,
        )
        .split_at_mut(rows_p * d);
        // (With D = 0 `qp` is empty and both loops over its rows are too.)
        for (r, dst) in qp.chunks_exact_mut(d.max(1)).enumerate() {
            if r < rows {
                let src = at(&sh.q, bi, h, i0 + r);
                if sh.q.st[3] == 1 {
                    // Safety: a contiguous Q row of D elements.
                    dst.copy_from_slice(unsafe { std::slice::from_raw_parts(src, d) });
                } else {
                    for (c, x) in dst.iter_mut().enumerate() {
                        // Safety: inside Q's row.
                        *x = unsafe { *src.wrapping_offset(c as isize * sh.q.st[3]) };
                    }
                }
            } else {
                dst.fill(0.0);
            }
        }
        let masked = sh.causal || !matches!(sh.mask, Mask::None);
        let mut need = l;
        // With the bound below: per row, 1 + its last not-dead key (its probabilities past
        // that are exactly 0), and every row has a live key.
        let mut until = [0usize; ROWS];
        let mut trimmed = false;
        if masked && l > 0 {
            let q_norm = qp
                .chunks_exact(d.max(1))
                .take(rows)
                .map(|r| sum_squares_slice(r).sqrt())
                .fold(0f32, nan_max);
            if sh.scale.abs() * q_norm * k_norm < SCORE_BOUND {
                // 1 + the last not-dead key over the block's rows; None: some row has no live key.
                let [lb, lh, lr] = sh.live_st;
                let mut last_alive = Some(0);
                for (r, u) in until.iter_mut().enumerate().take(rows) {
                    // Safety: inside the live table (`masked`, l > 0).
                    *u = unsafe { *sh.live.add(bi * lb + h * lh + (i0 + r) * lr) };
                    if *u == 0 {
                        last_alive = None;
                        break;
                    }
                    last_alive = last_alive.map(|a: usize| a.max(*u));
                }
                if let Some(a) = last_alive {
                    need = a.max(v_bad);
                    trimmed = true;
                }
            }
        }
        let need_p = need.next_multiple_of(PAD);
        let (sc, rest) = rest.split_at_mut(rows_p * need_p);
        let yt = &mut rest[..rows_p * sh.dvp];
        // sc (rows_p x need_p) = scale · Q_blk (rows_p x D) · Kᵀ (D x need_p).
        // Safety: the panels hold `D x lp` and `L x dvp` with need_p <= lp; the scratch
        // parts are disjoint.
        let kt = unsafe { sh.k_t.add(bk * d * sh.lp) };
        let ops = Operands {
            a: qp.as_ptr(),
            lda: d,
            b: kt,
            ldb: sh.lp,
            c: sc.as_mut_ptr(),
            ldc: need_p,
        };
        unsafe { attn_gemm::product(sh.level, (rows_p, need_p, d), ops, sh.scale) };
        // Mask and softmax each row; `live` = 1 + the last key with a nonzero probability
        // in any row of the block (or past it).
        let mut live = 0;
        if trimmed {
            // Row r: keys past until[r] are dead, so their probabilities are exactly 0 (see
            // above) and the softmax runs over the first until[r] only. An until[r] >= 1 (a
            // live key), so the row is never fully masked.
            for (r, row) in sc.chunks_exact_mut(need_p).enumerate().take(rows) {
                let (row, dead) = row[..need].split_at_mut(until[r]);
                let i = i0 + r;
                if sh.softcap > 0.0 {
                    softcap_row(row, sh.softcap);
                }
                match sh.mask {
                    // A contiguous float mask: the causal part, if any, is 0 on the live
                    // range (until[r] <= i + 1).
                    Mask::Add(p, st) if st[3] == 1 => {
                        let off = bi as isize * st[0] + h as isize * st[1] + i as isize * st[2];
                        // Safety: a contiguous mask row of at least `until[r]` elements.
                        let m = unsafe {
                            std::slice::from_raw_parts(p.wrapping_offset(off), row.len())
                        };
                        softmax_masked_row(row, m, need);
                    }
                    Mask::None => softmax_row_of(row, need),
                    _ => {
                        for (j, x) in row.iter_mut().enumerate() {
                            *x += unsafe { sh.mask_at(bi, h, i, j) };
                        }
                        softmax_row_of(row, need);
                    }
                }
                dead.fill(0.0);
            }
            live = need;
        } else if need > 0 {
            for (r, row) in sc.chunks_exact_mut(need_p).enumerate().take(rows) {
                let row = &mut row[..need];
                let i = i0 + r;
                if sh.softcap > 0.0 {
                    softcap_row(row, sh.softcap);
                }
                if masked {
                    match sh.mask {
                        Mask::Add(p, st) if st[3] == 1 && !sh.causal => {
                            let off = bi as isize * st[0] + h as isize * st[1] + i as isize * st[2];
                            // Safety: a contiguous mask row of at least `need` elements.
                            let m =
                                unsafe { std::slice::from_raw_parts(p.wrapping_offset(off), need) };
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
        }
        // Keys past `live` contribute 0 · v_j; leave out those after the last value row
        // holding an inf or NaN.
        let keys = live.max(v_bad).min(need);
        let [ob, oh, os] = sh.out_st;
        let dst = unsafe { sh.out.add(bi * ob + h * oh + i0 * os) };
        if keys > 0 {
            // Y (rows_p x dvp) = P_blk (rows_p x keys) · V[..keys] (keys x dvp); the rows
            // past `rows` are padding and not written out.
            let ops = Operands {
                a: sc.as_ptr(),
                lda: need_p,
                b: unsafe { sh.v_p.add(bk * l * sh.dvp) },
                ldb: sh.dvp,
                c: yt.as_mut_ptr(),
                ldc: sh.dvp,
            };
            unsafe { attn_gemm::product(sh.level, (rows_p, sh.dvp, keys), ops, 1.0) };
        }
        for r in 0..rows {
            // Safety: this task's output rows (not yet initialized: written, never read).
            unsafe {
                if keys > 0 {
                    std::ptr::copy_nonoverlapping(yt.as_ptr().add(r * sh.dvp), dst.add(r * os), dv);
                } else {
                    std::ptr::write_bytes(dst.add(r * os), 0, dv);
                }
            }
        }
    });
}

thread_local! {
    /// Each worker's block buffers (packed Q rows, scores, output tile), kept across calls.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The first `n` elements of `v`, grown (with zeros) if shorter.
fn grow(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// `com.microsoft::GroupQueryAttention` (float, as ONNX Runtime's CPU kernel): query
/// `[B, S, Hq·D]` with key and value `[B, S, Hkv·D]`, or packed `[B, S, (Hq + 2·Hkv)·D]`
/// when key and value are absent; past key/value `[B, Hkv, Lp, D]`; `seqlens_k[b]` = the
/// total length `T_b` of batch entry `b` minus 1; `total_sequence_length` (scalar).
///
/// - A first prompt (`S == total_sequence_length`) has no past: `P_b = 0`. Otherwise row
///   `s` of the new tokens sits at `P_b + s` with `P_b = T_b - S` (a later prompt chunk
///   needs `B = 1`; token generation `S = 1`).
/// - present_key/value `[B, Hkv, max(total_sequence_length, Lp), D]` hold past rows
///   `0..P_b`, then the new rows (rotated keys), then zeros.
/// - `do_rotary`: query and new key heads are rotated at positions `P_b + s` with the
///   caches (`R = 2 · cos_cache.shape[1]`, `rotary_interleaved`), see `rotary.rs`.
/// - Row `s` attends keys `j <= P_b + s`, and with `local_window_size = w > 0` only the
///   last `w` of them (`P_b + s - j < w`, as ONNX Runtime 1.32 counts the window); scores `scale · q·k` (default `1/sqrt(D)`), then
///   `softcap · tanh(score / softcap)` when `softcap > 0`, then softmax.
///
/// Output `[B, S, Hq·D]`. The attention runs through [`sdpa`] with an additive mask of
/// 0 / -inf per (b, s, key), the causal skipping included.
pub fn group_query_attention(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let invalid = |m: String| KernelError::Invalid(m);
    let (hq, hkv) = (ctx.int("num_heads", 0), ctx.int("kv_num_heads", 0));
    if hq <= 0 || hkv <= 0 || hq % hkv != 0 {
        return Err(invalid(format!(
            "num_heads {hq} must be a positive multiple of kv_num_heads {hkv}"
        )));
    }
    let (hq, hkv) = (hq as usize, hkv as usize);
    for (name, default) in [
        ("smooth_softmax", 0),
        ("sliding_window_cache", 0),
        ("causal", 1),
    ] {
        if ctx.int(name, default) != default {
            return Err(invalid(format!(
                "{name} = {} is not supported",
                ctx.int(name, default)
            )));
        }
    }
    if let Some(i) = (9..inputs.len()).find(|&i| opt(inputs, i).is_some()) {
        return Err(invalid(format!(
            "input {i} (position_ids, attention_bias, head_sink, KV-cache quantization, \
             q/k norm or query_seqlens) is not supported"
        )));
    }
    let query = req_f32(inputs, 0)?;
    let qs = query.shape().to_vec();
    let [b, s, width] = qs[..] else {
        return Err(invalid(format!(
            "query has shape {qs:?}; expected [batch, seq, hidden]"
        )));
    };
    let packed = opt(inputs, 1).is_none();
    if packed != opt(inputs, 2).is_none() {
        return Err(invalid(
            "key and value must both be given or both be absent".into(),
        ));
    }
    let heads_in = if packed { hq + 2 * hkv } else { hq };
    if width % heads_in != 0 || width == 0 {
        return Err(invalid(format!(
            "query width {width} is not a multiple of {heads_in} heads"
        )));
    }
    let d = width / heads_in;
    // [B, S, N·D] as [B, N, S, D] views (no copy).
    let heads =
        |a: &'_ Arr<f32>, n: usize, what: &str| -> Result<ndarray::Array4<f32>, KernelError> {
            if a.shape() != [b, s, n * d] {
                return Err(KernelError::Invalid(format!(
                    "{what} has shape {:?}; expected [{b}, {s}, {}]",
                    a.shape(),
                    n * d
                )));
            }
            Ok(a.as_standard_layout()
                .into_owned()
                .into_shape_with_order((b, s, n, d))?
                .permuted_axes([0, 2, 1, 3]))
        };
    let (q_all, k_new, v_new) = if packed {
        let all = heads(query, heads_in, "packed query")?;
        let q = all.slice(ndarray::s![.., ..hq, .., ..]).to_owned();
        let k = all.slice(ndarray::s![.., hq..hq + hkv, .., ..]).to_owned();
        let v = all.slice(ndarray::s![.., hq + hkv.., .., ..]).to_owned();
        (q, k, v)
    } else {
        (
            heads(query, hq, "query")?,
            heads(req_f32(inputs, 1)?, hkv, "key")?,
            heads(req_f32(inputs, 2)?, hkv, "value")?,
        )
    };
    // An empty past (no cached positions) holds nothing, whatever head dim it declares: a
    // graph whose cache inputs have a symbolic head dim can be fed [B, Hkv, 0, 0].
    let empty = |i: usize| opt(inputs, i).is_some_and(|t| t.shape().get(2) == Some(&0));
    let past = match (opt(inputs, 3), opt(inputs, 4)) {
        (None, None) => None,
        (Some(_), Some(_)) if empty(3) && empty(4) => None,
        (Some(_), Some(_)) => {
            let (pk, pv) = (req_f32(inputs, 3)?, req_f32(inputs, 4)?);
            let ok =
                |a: &Arr<f32>| a.ndim() == 4 && a.shape()[..2] == [b, hkv] && a.shape()[3] == d;
            if !ok(pk) || pk.shape() != pv.shape() {
                return Err(invalid(format!(
                    "past_key {:?} and past_value {:?} must both be [{b}, {hkv}, past, {d}]",
                    pk.shape(),
                    pv.shape()
                )));
            }
            Some((pk, pv))
        }
        _ => {
            return Err(invalid(
                "past_key and past_value must both be given or both be absent".into(),
            ));
        }
    };
    let lp = past.map_or(0, |(pk, _)| pk.shape()[2]);
    let seqlens = req_ints(inputs, 5)?;
    let total = req_ints(inputs, 6)?;
    let (&[total], true) = (&total[..], seqlens.len() == b) else {
        return Err(invalid(format!(
            "seqlens_k must have {b} entries and total_sequence_length one (got {} and {})",
            seqlens.len(),
            total.len()
        )));
    };
    let first_prompt = s == total as usize;
    if !first_prompt && s > 1 && b != 1 {
        return Err(invalid(format!(
            "a prompt chunk of {s} tokens after past context needs batch 1 (batch {b})"
        )));
    }
    let present_len = (total.max(0) as usize).max(lp);
    let mut past_len = Vec::with_capacity(b);
    for (bi, &sk) in seqlens.iter().enumerate() {
        let t = sk + 1;
        let p = if first_prompt { 0 } else { t - s as i64 };
        if p < 0 || p as usize > lp || p as usize + s > present_len {
            return Err(invalid(format!(
                "batch {bi}: seqlens_k {sk} puts the {s} new tokens at {p}.., outside the past \
                 ({lp} rows) or the present ({present_len} rows)"
            )));
        }
        past_len.push(p as usize);
    }
    let (mut q_all, mut k_new) = (q_all, k_new);
    if ctx.int("do_rotary", 0) != 0 {
        let (Some(cos), Some(sin)) = (opt(inputs, 7), opt(inputs, 8)) else {
            return Err(invalid("do_rotary needs cos_cache and sin_cache".into()));
        };
        fn f32_of(t: &RtTensor, index: usize) -> Result<&Arr<f32>, KernelError> {
            t.as_f32().ok_or(KernelError::InputType {
                index,
                dtype: t.dtype(),
            })
        }
        let (cos, sin) = (f32_of(cos, 7)?, f32_of(sin, 8)?);
        let caches = super::rotary::Caches::new(cos, sin)?;
        if caches.dim() > d {
            return Err(invalid(format!(
                "rotary dimension {} exceeds the head size {d}",
                caches.dim()
            )));
        }
        let interleaved = ctx.int("rotary_interleaved", 0) != 0;
        for a in [&mut q_all, &mut k_new] {
            for (bi, &p) in past_len.iter().enumerate() {
                for n in 0..a.shape()[1] {
                    for si in 0..s {
                        let mut row = a.slice_mut(ndarray::s![bi, n, si, ..]);
                        // The head axis is the innermost axis of the input: stride 1.
                        let row = row.as_slice_mut().expect("contiguous head rows");
                        caches.rotate(row, (p + si) as i64, interleaved)?;
                    }
                }
            }
        }
    }
    let mut present_k = ndarray::Array4::<f32>::zeros((b, hkv, present_len, d));
    let mut present_v = present_k.clone();
    for (bi, &p) in past_len.iter().enumerate() {
        use ndarray::s as at;
        if let Some((pk, pv)) = past {
            present_k
                .slice_mut(at![bi, .., ..p, ..])
                .assign(&pk.slice(at![bi, .., ..p, ..]));
            present_v
                .slice_mut(at![bi, .., ..p, ..])
                .assign(&pv.slice(at![bi, .., ..p, ..]));
        }
        present_k
            .slice_mut(at![bi, .., p..p + s, ..])
            .assign(&k_new.slice(at![bi, .., .., ..]));
        present_v
            .slice_mut(at![bi, .., p..p + s, ..])
            .assign(&v_new.slice(at![bi, .., .., ..]));
    }
    // Row s of batch bi sees keys j <= P_b + s, and within the local window if any.
    let window = ctx.int("local_window_size", -1);
    if window == 0 {
        return Err(invalid(
            "local_window_size 0 is not supported (-1: no window)".into(),
        ));
    }
    let mask = ndarray::Array4::from_shape_fn((b, 1, s, present_len), |(bi, _, si, j)| {
        let i = past_len[bi] + si;
        let seen = j <= i && (window < 0 || ((i - j) as i64) < window);
        if seen { 0.0 } else { f32::NEG_INFINITY }
    });
    let mask = RtTensor::f32(mask.into_dyn());
    let scale = match ctx.float("scale", 0.0) {
        0.0 => 1.0 / (d as f32).sqrt(),
        x => x,
    };
    let p = Params {
        scale,
        causal: false,
        zero_masked_rows: true,
        softcap: ctx.float("softcap", 0.0),
        seq_major_out: true,
    };
    let out = sdpa(
        q_all.view(),
        present_k.view(),
        present_v.view(),
        Some(&mask),
        &p,
        ctx.threads,
        Level::detect(),
    )?;
    Ok(vec![
        RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[b, s, hq * d]), out)?),
        RtTensor::f32(present_k.into_dyn()),
        RtTensor::f32(present_v.into_dyn()),
    ])
}
