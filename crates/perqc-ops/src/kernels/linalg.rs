//! MatMul (numpy-broadcast batched) and Gemm on the `gemm` crate.
//!
//! Operands are passed to `gemm` with their element strides, so transposed or sliced views
//! (zero-copy Transpose/Slice results) need no copy. The result is always a fresh
//! row-major array.

use crate::kernel::{
    KernelCtx, KernelError, RtTensor, broadcast_shape, opt, output_vec, req, req_f32,
};
use gemm::Parallelism;
use ndarray::{Array2, ArrayD, ArrayView2, IxDyn, Zip};
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
pub(super) struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
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
pub(super) unsafe fn gemm_par(
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

/// `a (m x k) · b (k x n)` for 2-D views of any strides (a transposed view costs no copy),
/// split over `threads` threads of the current rayon pool as MatMul splits it (so 1 and 2
/// threads agree bitwise). For offline work on whole matrices (calibration searches); the
/// graph's MatMul goes through [`matmul`]. Panics if the inner dimensions differ.
pub fn matmul_2d(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>, threads: usize) -> Array2<f32> {
    let mut out = Array2::<f32>::zeros((a.nrows(), b.ncols()));
    product_2d(a, b, &mut out, 0.0, threads);
    out
}

/// `dst += a · b`, split as [`matmul_2d`] (1 and 2 threads agree bitwise): a running sum of
/// products without a fresh output per term. Panics if the shapes do not fit or `dst` is
/// not in standard layout.
pub fn matmul_2d_add(
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    dst: &mut Array2<f32>,
    threads: usize,
) {
    product_2d(a, b, dst, 1.0, threads)
}

/// `dst = dst_scale · dst + a · b` (`dst` read only when `dst_scale != 0`).
fn product_2d(
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    dst: &mut Array2<f32>,
    dst_scale: f32,
    threads: usize,
) {
    let ((m, k), (k2, n)) = (a.dim(), b.dim());
    assert_eq!(k, k2, "matmul_2d: inner dimensions {k} and {k2} differ");
    assert_eq!(dst.dim(), (m, n), "matmul_2d: the output is not {m} x {n}");
    assert!(
        dst.is_standard_layout(),
        "matmul_2d: the output is not row-major"
    );
    if m * n == 0 || k == 0 {
        return;
    }
    let mat = |v: &ArrayView2<'_, f32>| Mat {
        ptr: v.as_ptr(),
        rs: v.strides()[0],
        cs: v.strides()[1],
    };
    // Safety: the views are live m x k and k x n matrices with these strides; `dst` is a
    // row-major m x n buffer borrowed mutably, so it overlaps neither.
    unsafe {
        gemm_par(
            (m, n, k),
            dst.as_mut_ptr(),
            n,
            mat(&a),
            mat(&b),
            dst_scale,
            1.0,
            threads.max(1),
        )
    };
}

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

/// `com.microsoft::MatMulNBits` (f32 reference): `Y = A · W (+ bias)` with the `[K, N]`
/// weight dequantized from `bits`-bit blocks of `block_size` rows:
///
/// ```text
/// W[k, n] = (q[n, k] - z[n, k / block_size]) · scale[n, k / block_size]
/// ```
///
/// `q[n, k]` is value `k % block_size` of blob `B[n, k / block_size]`, packed from the
/// low bits of each byte up (`bits` = 2, 4 or 8). Zero points are packed the same way per
/// row `n` (uint8, `ceil(k_blocks · bits / 8)` bytes), or f32 `[N, k_blocks]`; absent they
/// are `2^(bits - 1)`. The weight is dequantized on every call and multiplied by the MatMul
/// kernel.
pub fn matmul_nbits(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let invalid = |m: String| KernelError::Invalid(m);
    let (k, n) = (ctx.int("K", 0), ctx.int("N", 0));
    let (bits, bs) = (ctx.int("bits", 4), ctx.int("block_size", 0));
    if k <= 0 || n <= 0 || ![2, 4, 8].contains(&bits) || bs < 16 || (bs as u64).count_ones() != 1 {
        return Err(invalid(format!(
            "K {k}, N {n}, bits {bits}, block_size {bs}: K and N must be positive, bits 2, 4 \
             or 8, block_size a power of 2 of at least 16"
        )));
    }
    if ctx.int("weight_prepacked", 0) != 0 {
        return Err(invalid("prepacked weights are not supported".into()));
    }
    if opt(inputs, 4).is_some() {
        return Err(invalid("g_idx is not supported".into()));
    }
    let (k, n, bits, bs) = (k as usize, n as usize, bits as usize, bs as usize);
    let kb = k.div_ceil(bs);
    let blob = bs * bits / 8;
    let RtTensor::U8(b) = req(inputs, 1)? else {
        let t = req(inputs, 1)?;
        return Err(KernelError::InputType {
            index: 1,
            dtype: t.dtype(),
        });
    };
    let scales = req_f32(inputs, 2)?;
    if b.len() != n * kb * blob || scales.len() != n * kb {
        return Err(invalid(format!(
            "B {:?} and scales {:?} must hold N·k_blocks·blob = {n}·{kb}·{blob} bytes and \
             N·k_blocks = {} scales",
            b.shape(),
            scales.shape(),
            n * kb
        )));
    }
    let b = b.as_standard_layout();
    let b = b.as_slice().expect("standard layout");
    let scales = scales.as_standard_layout();
    let scales = scales.as_slice().expect("standard layout");
    let mask = (1u32 << bits) - 1;
    // Value `i` of a `bits`-bit packed byte string.
    let unpack = |bytes: &[u8], i: usize| ((bytes[i * bits / 8] as u32) >> (i * bits % 8)) & mask;
    let zrow = (kb * bits).div_ceil(8);
    let zero: Box<dyn Fn(usize, usize) -> f32> = match opt(inputs, 3) {
        None => {
            let z = (1u32 << (bits - 1)) as f32;
            Box::new(move |_, _| z)
        }
        Some(RtTensor::U8(z)) if z.len() == n * zrow => {
            let z = z.as_standard_layout().into_owned();
            let z = z.into_raw_vec_and_offset().0;
            Box::new(move |nn, blk| unpack(&z[nn * zrow..(nn + 1) * zrow], blk) as f32)
        }
        Some(RtTensor::F32(z)) if z.len() == n * kb => {
            let z: Vec<f32> = z.iter().copied().collect();
            Box::new(move |nn, blk| z[nn * kb + blk])
        }
        Some(z) => {
            return Err(invalid(format!(
                "zero_points {} {:?}: expected uint8 with {} bytes or float with {} values",
                z.dtype(),
                z.shape(),
                n * zrow,
                n * kb
            )));
        }
    };
    let mut w = vec![0f32; k * n];
    for nn in 0..n {
        for blk in 0..kb {
            let bytes = &b[(nn * kb + blk) * blob..(nn * kb + blk + 1) * blob];
            let (z, sc) = (zero(nn, blk), scales[nn * kb + blk]);
            for i in 0..bs.min(k - blk * bs) {
                w[(blk * bs + i) * n + nn] = (unpack(bytes, i) as f32 - z) * sc;
            }
        }
    }
    let w = RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[k, n]), w)?);
    let a = req(inputs, 0)?;
    let mut y = matmul(ctx, &[Some(a), Some(&w)])?;
    if opt(inputs, 5).is_some() {
        let bias = req_f32(inputs, 5)?;
        if bias.shape() != [n] {
            return Err(invalid(format!(
                "bias has shape {:?}, expected [{n}]",
                bias.shape()
            )));
        }
        if let Some(RtTensor::F32(out)) = y.first_mut() {
            // Broadcasts [N] over the rows of the fresh (unshared) product.
            *out += &bias.view();
        }
    }
    Ok(y)
}
