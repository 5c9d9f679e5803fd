//! MatMul (numpy-broadcast batched) and Gemm on the `gemm` crate.
//!
//! Operands are passed to `gemm` with their element strides, so transposed or sliced views
//! (zero-copy Transpose/Slice results) need no copy. The result is always a fresh
//! row-major array.

use crate::kernel::{KernelCtx, KernelError, RtTensor, broadcast_shape, opt, output_vec, req_f32};
use gemm::Parallelism;
use ndarray::{ArrayD, ArrayView2, IxDyn, Zip};
use rayon::prelude::*;

type In<'a, 'b> = &'a [Option<&'b RtTensor>];
type Out = Result<Vec<RtTensor>, KernelError>;

/// Products smaller than this many multiply-adds run single-threaded per matrix; batches
/// of them are spread over threads instead.
const PAR_MIN_FLOPS: usize = 1 << 21;

/// A raw f32 pointer that may cross threads; each task writes a disjoint block.
#[derive(Clone, Copy)]
struct Ptr(*mut f32);
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

/// One matrix operand: base pointer and (row, column) element strides.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

/// Column blocks handed to different threads start at multiples of this many elements
/// (two AVX-512 vectors), so no block shares a micro-tile with its neighbour.
const COL_ALIGN: usize = 32;
/// Row blocks start at multiples of this many rows (a whole number of micro-tiles).
const ROW_ALIGN: usize = 8;

/// `dst (m x n, row stride dst_rs, unit column stride) = dst_scale * dst + prod_scale *
/// lhs (m x k) * rhs (k x n)`; `dst` is read only when `dst_scale != 0`.
///
/// With `threads > 1` and enough work, the output is cut into `threads` column blocks
/// (or row blocks when it is too narrow) and each block is one single-threaded `gemm`
/// call on the current rayon pool (as fast as `gemm`'s own `Parallelism::Rayon` on
/// SmolLM2's shapes, `bench_gemm`), so the partition is explicit: each element of `dst`
/// is computed by exactly one call, summing over k in `gemm`'s own order (the kernel
/// tests check that 1 and 2 threads agree bitwise on the split shapes).
///
/// Safety: `lhs`/`rhs` address valid `m x k` / `k x n` matrices; `dst` an `m x n` buffer
/// with row stride `dst_rs` that no one else touches during the call.
#[allow(clippy::too_many_arguments)] // mirrors `gemm::gemm`
unsafe fn gemm_par(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: Mat,
    rhs: Mat,
    dst_scale: f32,
    prod_scale: f32,
    threads: usize,
) {
    let dst = Ptr(dst);
    let one = |(r0, rows): (usize, usize), (c0, cols): (usize, usize)| {
        // Capture the whole Send wrappers, not their raw-pointer fields.
        let (dst, lhs, rhs) = (dst, lhs, rhs);
        // Safety: the block [r0, r0 + rows) x [c0, c0 + cols) lies inside every operand,
        // and blocks are disjoint.
        unsafe {
            gemm::gemm(
                rows,
                cols,
                k,
                dst.0.add(r0 * dst_rs + c0),
                1,
                dst_rs as isize,
                dst_scale != 0.0,
                lhs.ptr.wrapping_offset(r0 as isize * lhs.rs),
                lhs.cs,
                lhs.rs,
                rhs.ptr.wrapping_offset(c0 as isize * rhs.cs),
                rhs.cs,
                rhs.rs,
                dst_scale,
                prod_scale,
                false,
                false,
                false,
                Parallelism::None,
            )
        }
    };
    if threads <= 1 || m * n * k < PAR_MIN_FLOPS {
        one((0, m), (0, n));
        return;
    }
    // Split the longer side, in aligned blocks; fall back to rows for narrow outputs.
    let blocks = |len: usize, align: usize| -> Vec<(usize, usize)> {
        let units = len.div_ceil(align);
        let parts = threads.min(units);
        (0..parts)
            .map(|i| {
                let (u0, u1) = (units * i / parts, units * (i + 1) / parts);
                let (s, e) = ((u0 * align).min(len), (u1 * align).min(len));
                (s, e - s)
            })
            .filter(|&(_, len)| len > 0)
            .collect()
    };
    let by_cols = n >= threads * COL_ALIGN && n >= m;
    let parts = if by_cols || m < threads * ROW_ALIGN {
        blocks(n, COL_ALIGN)
    } else {
        blocks(m, ROW_ALIGN)
    };
    let col_split = by_cols || m < threads * ROW_ALIGN;
    parts.into_par_iter().for_each(|part| {
        if col_split {
            one((0, m), part)
        } else {
            one(part, (0, n))
        }
    });
}

/// MatMul with numpy semantics: 1-d operands are promoted (and the added axis removed from
/// the result); leading (batch) axes broadcast.
pub fn matmul(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let (a, b) = (req_f32(inputs, 0)?, req_f32(inputs, 1)?);
    let (a1, b1) = (a.ndim() == 1, b.ndim() == 1);
    let a = if a1 {
        a.view().insert_axis(ndarray::Axis(0))
    } else {
        a.view()
    };
    let b = if b1 {
        b.view().insert_axis(ndarray::Axis(1))
    } else {
        b.view()
    };
    if a.ndim() == 0 || b.ndim() == 0 {
        return Err(KernelError::Invalid("MatMul of a scalar".into()));
    }
    let (ra, rb) = (a.ndim(), b.ndim());
    let (m, k) = (a.shape()[ra - 2], a.shape()[ra - 1]);
    let (k2, n) = (b.shape()[rb - 2], b.shape()[rb - 1]);
    if k != k2 {
        return Err(KernelError::Invalid(format!(
            "MatMul inner dimensions differ: {:?} x {:?}",
            a.shape(),
            b.shape()
        )));
    }
    let batch = broadcast_shape(&a.shape()[..ra - 2], &b.shape()[..rb - 2])?;
    let bcast = |v: &ndarray::ArrayViewD<'_, f32>, r: usize, inner: [usize; 2]| {
        let mut s = batch.clone();
        s.extend_from_slice(&inner);
        v.broadcast(IxDyn(&s))
            .map(|x| x.strides().to_vec())
            .ok_or_else(|| KernelError::Broadcast {
                a: v.shape()[..r - 2].to_vec(),
                b: batch.clone(),
            })
    };
    let sa = bcast(&a, ra, [m, k])?;
    let sb = bcast(&b, rb, [k, n])?;
    let nb: usize = batch.iter().product();
    // Not zeroed: `gemm` with `read_dst = false` writes every element without reading it.
    let total = nb * m * n;
    let mut out: Vec<f32> = output_vec(total);
    // Element offset of batch `i` in an operand with broadcast strides `s`.
    let offset = |mut i: usize, s: &[isize]| -> isize {
        let mut off = 0isize;
        for d in (0..batch.len()).rev() {
            off += (i % batch[d]) as isize * s[d];
            i /= batch[d];
        }
        off
    };
    let nd = batch.len();
    let mat = |base: *const f32, s: &[isize], i: usize| Mat {
        ptr: base.wrapping_offset(offset(i, s)),
        rs: s[nd],
        cs: s[nd + 1],
    };
    let dst = Ptr(out.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    let (pa, pb) = (Ptr(a.as_ptr() as *mut f32), Ptr(b.as_ptr() as *mut f32));
    let work = |i: usize, threads: usize| {
        // Capture the whole Send wrappers, not their raw-pointer fields.
        let (pa, pb, d) = (pa, pb, dst);
        let (lhs, rhs) = (mat(pa.0, &sa, i), mat(pb.0, &sb, i));
        // Safety: offsets come from `broadcast` strides of live views, and batch `i` writes
        // only its own `m x n` block of `out`.
        unsafe {
            gemm_par(
                (m, n, k),
                d.0.add(i * m * n),
                n,
                lhs,
                rhs,
                0.0,
                1.0,
                threads,
            )
        }
    };
    if m * n > 0 {
        if k == 0 {
            // Empty sums: gemm may not touch the destination.
            // Safety: in-capacity writes before `set_len`.
            unsafe { std::ptr::write_bytes(dst.0, 0, total) };
        } else if ctx.threads > 1 && nb > 1 && (m * n * k < PAR_MIN_FLOPS || nb >= 2 * ctx.threads)
        {
            // Attention-sized batches: one whole matrix per task beats splitting each
            // small product over the threads.
            (0..nb).into_par_iter().for_each(|i| work(i, 1));
        } else {
            for i in 0..nb {
                work(i, ctx.threads);
            }
        }
    }
    // Safety: every one of the `total` elements was written above (or `total` is 0).
    unsafe { out.set_len(total) };
    let mut shape = batch;
    if !a1 {
        shape.push(m);
    }
    if !b1 {
        shape.push(n);
    }
    Ok(vec![RtTensor::f32(ArrayD::from_shape_vec(
        IxDyn(&shape),
        out,
    )?)])
}

/// `ai.perqc::Linear`: `y = x W' (+ bias)`, `W' = transB ? W^T : W`, x of any rank >= 1
/// (its leading axes are rows). The transposed weight is a strided view: no copy. The bias
/// (broadcast to `[.., N]`) is added to the fresh product in place.
pub fn linear(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let w = req_f32(inputs, 1)?;
    if w.ndim() != 2 {
        return Err(KernelError::Invalid(format!(
            "Linear weight must be 2-d, got {:?}",
            w.shape()
        )));
    }
    let wt = (ctx.int("transB", 0) != 0).then(|| RtTensor::F32(w.clone().reversed_axes()));
    let b = wt.as_ref().or(inputs[1]);
    let mut y = matmul(ctx, &[inputs[0], b])?.remove(0);
    if let Some(bias) = opt(inputs, 2) {
        let RtTensor::F32(bias) = bias else {
            return Err(KernelError::Invalid("Linear bias must be f32".into()));
        };
        let RtTensor::F32(out) = &mut y else {
            unreachable!("matmul of f32 operands is f32")
        };
        let shape = out.shape().to_vec();
        let bias = bias
            .broadcast(IxDyn(&shape))
            .ok_or_else(|| KernelError::Broadcast {
                a: bias.shape().to_vec(),
                b: shape.clone(),
            })?;
        Zip::from(out.view_mut())
            .and(&bias)
            .for_each(|o, &b| *o += b);
    }
    Ok(vec![y])
}

/// Gemm: `Y = alpha * A' B' + beta * C`, `A' = transA ? A^T : A`, C unidirectionally
/// broadcast to `[M, N]`.
pub fn gemm(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let (a, b) = (req_f32(inputs, 0)?, req_f32(inputs, 1)?);
    fn two(
        x: &ndarray::ArcArray<f32, IxDyn>,
        i: usize,
    ) -> Result<ArrayView2<'_, f32>, KernelError> {
        x.view()
            .into_dimensionality()
            .map_err(|_| KernelError::Invalid(format!("Gemm input {i} must be 2-d")))
    }
    let (mut a2, mut b2) = (two(a, 0)?, two(b, 1)?);
    if ctx.int("transA", 0) != 0 {
        a2 = a2.reversed_axes();
    }
    if ctx.int("transB", 0) != 0 {
        b2 = b2.reversed_axes();
    }
    let ((m, k), (k2, n)) = (a2.dim(), b2.dim());
    if k != k2 {
        return Err(KernelError::Invalid(format!(
            "Gemm inner dimensions differ: {m}x{k} x {k2}x{n}"
        )));
    }
    let (alpha, beta) = (ctx.float("alpha", 1.0), ctx.float("beta", 1.0));
    let mut out = ndarray::Array2::<f32>::zeros((m, n));
    let mut dst_scale = 0.0;
    if let (Some(c), true) = (opt(inputs, 2), beta != 0.0) {
        let c = c.as_f32().ok_or(KernelError::InputType {
            index: 2,
            dtype: c.dtype(),
        })?;
        let cv = c.broadcast((m, n)).ok_or_else(|| KernelError::Broadcast {
            a: c.shape().to_vec(),
            b: vec![m, n],
        })?;
        Zip::from(&mut out).and(&cv).for_each(|o, &c| *o = beta * c);
        dst_scale = 1.0;
    }
    let sa = a2.strides();
    let sb = b2.strides();
    let lhs = Mat {
        ptr: a2.as_ptr(),
        rs: sa[0],
        cs: sa[1],
    };
    let rhs = Mat {
        ptr: b2.as_ptr(),
        rs: sb[0],
        cs: sb[1],
    };
    if m * n > 0 {
        // Safety: views of live arrays; `out` is a contiguous m x n buffer.
        unsafe {
            gemm_par(
                (m, n, k),
                out.as_mut_ptr(),
                n,
                lhs,
                rhs,
                dst_scale,
                alpha,
                ctx.threads,
            )
        }
    }
    Ok(vec![RtTensor::f32(out.into_dyn())])
}
