//! `ai.perqc::Hadamard(x, H)`: PeRQ's online block rotation of the input of an MLP
//! down-projection.
//!
//! x `[.., f]` is cut into `f / b` blocks of `b` consecutive channels, H is `[b, b]`, and
//! every block is multiplied by H from the right (MatMul's semantics, so the op lowers to
//! `Reshape -> MatMul -> Reshape` exactly):
//!
//! ```text
//! y[.., k·b + i] = Σ_j x[.., k·b + j] · H[j, i]
//! ```
//!
//! **Fast path.** When `b` is a power of two and H is `c · S_b`, `S_b` the natural-order
//! (Sylvester) Hadamard matrix `S_b[j, i] = (-1)^popcount(i & j)` and `c = H[0, 0]` a finite
//! nonzero f32 (PeRQ stores `c = 1/√b`), each block goes through a fast Walsh-Hadamard
//! transform: in-place butterflies `(u, v) -> (u + v, u - v)` on the pairs `(j, j + h)` of
//! every stage `h = 1, 2, 4, .., b/2` in that order, then one multiplication of every element
//! by `c`. That is `log2(b)` additions per element instead of `b` multiply-adds. The test of
//! H is exact: every entry must equal `c` or `-c` bit for bit, with the Sylvester signs;
//! `c` is the stored value, so H normalized in f32 or in f64 and then rounded both qualify.
//! **Structured path.** When H is exactly `A ⊗ S_p` ([`kronecker_sylvester`]: `p < b` a
//! power of two, A any finite `[m, m]` with `m = b / p`; perqc builds Hadamard matrices of
//! other orders this way, SmolLM2's full 1536-channel rotation is `H_12 ⊗ S_128`), each block
//! is `m` sub-blocks of p: they go through the transform above unscaled, then `y[a'·p + s']
//! = Σ_a A[a, a'] · t[a·p + s']` mixes them (`log2 p` additions and `m` multiply-adds per
//! element instead of `b`; 1536 multiply-adds per element on the dense path).
//! Any other H (a 12 x 12 Hadamard, a random rotation, a Sylvester matrix with one entry
//! off by an ulp) takes the **dense path**: the MatMul kernel on x viewed as
//! `[numel / b, b]` (no copy for row-major x), correct for every H.
//!
//! The two paths agree up to f32 round-off: the transform adds exact `±x_j` and rounds the
//! partial sums of a tree, then scales once; the product rounds each `x_j · (±c)` and sums
//! in the GEMM's order.
//!
//! **Vector levels.** The transform is compiled three times, for AVX-512F (16 lanes), AVX2
//! (8 lanes) and portable scalar code, and [`Level::detect`] picks the widest the CPU runs.
//! All three perform the same butterflies on the same operands in the same stage order, and
//! the same final scale (no fused multiply-add anywhere), so they give bitwise identical
//! results (NaN results are NaN at every level, with unspecified payload bits): stages with
//! `h` below the vector width work inside one register, as `t + (±v)` with `t` the vector
//! whose lanes `j` and `j ^ h` are swapped and `-` on the lanes with bit `h` set, which is
//! `v[j] + v[j + h]` and `v[j] - v[j + h]` exactly (IEEE addition commutes, and `a + (-b)`
//! is `a - b`); wider stages are whole-vector butterflies. Blocks smaller than a vector are packed several to a register; blocks up to
//! 8 vectors stay in registers for all stages; larger ones are transformed in the output
//! buffer (in L1).
//!
//! **Threads.** Blocks are independent, so the output is filled in pieces of whole blocks
//! over the session's threads once it reaches [`super::layout::PAR_MIN_ELEMS`] elements;
//! the result does not depend on the split (tests check 1 and 2 threads bitwise).

use super::layout::{SendPtr, par_fill_units, standard};
use super::linalg::matmul;
use crate::kernel::{KernelCtx, KernelError, RtTensor, output_vec, req, req_f32};
use ndarray::{ArrayD, IxDyn};
use std::mem::MaybeUninit;

type In<'a, 'b> = &'a [Option<&'b RtTensor>];
type Out = Result<Vec<RtTensor>, KernelError>;

/// An instruction-set level of the transform's loops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Portable code (what the compiler makes of it for the baseline target).
    Scalar,
    /// 8-lane AVX2 vectors.
    Avx2,
    /// 16-lane AVX-512F vectors.
    Avx512,
}

impl Level {
    /// Every level, narrowest first.
    pub const ALL: [Level; 3] = [Level::Scalar, Level::Avx2, Level::Avx512];

    /// The widest level this CPU runs.
    pub fn detect() -> Level {
        if Level::Avx512.available() {
            Level::Avx512
        } else if Level::Avx2.available() {
            Level::Avx2
        } else {
            Level::Scalar
        }
    }

    /// Whether this CPU runs the level.
    pub fn available(self) -> bool {
        match self {
            Level::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// `c` when the row-major `b x b` matrix `h` is `c · S_b` bit for bit: `b` a power of two,
/// `c = h[0]` finite and nonzero, and `h[j·b + i]` equal to `c` where `popcount(i & j)` is
/// even and to `-c` where it is odd. `None` otherwise (also when `h.len() != b²`).
pub fn sylvester_scale(h: &[f32], b: usize) -> Option<f32> {
    if !b.is_power_of_two() || b.checked_mul(b) != Some(h.len()) {
        return None;
    }
    let c = h[0];
    if !c.is_finite() || c == 0.0 {
        return None;
    }
    let (pos, neg) = (c.to_bits(), (-c).to_bits());
    let ok = h.chunks_exact(b).enumerate().all(|(j, row)| {
        row.iter().enumerate().all(|(i, v)| {
            let want = if (i & j).count_ones().is_multiple_of(2) {
                pos
            } else {
                neg
            };
            v.to_bits() == want
        })
    });
    ok.then_some(c)
}

/// `(p, A)` when H (`[b, b]`, row-major) is exactly `A ⊗ S_p`: `S_p` the natural-order
/// Sylvester matrix of a power of two `p < b` dividing b, `A` any finite `[b/p, b/p]`
/// matrix, `H[a·p + s, a'·p + s'] = A[a, a'] · S_p[s, s']` bit for bit (a sign flip is
/// exact). The largest such p is returned: the cheapest transform. This is how perqc builds
/// a Hadamard matrix whose order is not a power of two (`core ⊗ Sylvester`, see
/// `perqc_ops::hadamard`): the full online rotation of SmolLM2's 1536 channels is
/// `H_12 ⊗ S_128`. Early exit on the first entry that differs.
pub fn kronecker_sylvester(h: &[f32], b: usize) -> Option<(usize, Vec<f32>)> {
    if b < 2 || b.checked_mul(b) != Some(h.len()) {
        return None;
    }
    let mut p = 1usize << b.trailing_zeros();
    if p == b {
        p /= 2;
    }
    while p >= 2 {
        let m = b / p;
        let a: Vec<f32> = (0..m * m)
            .map(|k| h[(k / m) * p * b + (k % m) * p])
            .collect();
        if a.iter().all(|v| v.is_finite()) && is_kronecker(h, b, p, &a) {
            return Some((p, a));
        }
        p /= 2;
    }
    None
}

/// Whether `h == a ⊗ S_p` bit for bit (see [`kronecker_sylvester`]). Row by row, each
/// compared whole against its expected bits (a loop without early exit that vectorizes),
/// stopping at the first row that differs: about 0.2 ms for 1536 x 1536.
fn is_kronecker(h: &[f32], b: usize, p: usize, a: &[f32]) -> bool {
    let m = b / p;
    // A few rows first (the last row, the rows around the first sub-block boundary): a
    // wrong p usually fails there, before the sign table is built.
    let row_fits = |r: usize| {
        let (ar, sr) = (r / p, r % p);
        h[r * b..(r + 1) * b].iter().enumerate().all(|(c, v)| {
            let sign = ((sr & (c % p)).count_ones() & 1) << 31;
            v.to_bits() == a[ar * m + c / p].to_bits() ^ sign
        })
    };
    if ![b - 1, p - 1, p].into_iter().all(row_fits) {
        return false;
    }
    // The sign bit of S_p[s, s'], row-major.
    let signs: Vec<u32> = (0..p * p)
        .map(|k| (((k / p) & (k % p)).count_ones() & 1) << 31)
        .collect();
    h.chunks_exact(b).enumerate().all(|(r, row)| {
        let (ar, sr) = (r / p, r % p);
        let sign_row = &signs[sr * p..(sr + 1) * p];
        let diff =
            row.chunks_exact(p)
                .zip(&a[ar * m..(ar + 1) * m])
                .fold(0u32, |acc, (part, av)| {
                    let base = av.to_bits();
                    part.iter()
                        .zip(sign_row)
                        .fold(acc, |acc, (v, sg)| acc | (v.to_bits() ^ base ^ sg))
                });
        diff == 0
    })
}

super::vmath::multiversion! {
    /// One block of [`kronecker_sylvester`]'s transform: `t` holds the `m` sub-blocks of `p`
    /// already through `S_p`; `y[a'·p + s'] = Σ_a A[a, a'] · t[a·p + s']`, summed over `a`
    /// in order (a product, then an addition: the same bits at every vector level).
    fn mix_blocks(t: &[f32], a: &[f32], m: usize, y: &mut [MaybeUninit<f32>]) {
        let p = t.len() / m;
        for (ac, out) in y.chunks_exact_mut(p).enumerate() {
            let c0 = a[ac];
            for (o, &v) in out.iter_mut().zip(&t[..p]) {
                o.write(c0 * v);
            }
            // Safety: every element of `out` was just written.
            let out = unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) };
            for (ar, part) in t.chunks_exact(p).enumerate().skip(1) {
                let c = a[ar * m + ac];
                for (o, &v) in out.iter_mut().zip(part) {
                    *o += c * v;
                }
            }
        }
    }
}

/// `dst` = the transform of every `b`-block of `src`, times `scale` (see the module doc):
/// for each block, `dst_blk = scale · (src_blk · S_b)`, computed at `level`.
///
/// Every element of `dst` is written. Panics (a caller's bug, not a model's) unless
/// `src.len() == dst.len()`, `b` is a power of two dividing the length, and the CPU runs
/// `level`.
pub fn fwht(src: &[f32], dst: &mut [MaybeUninit<f32>], b: usize, scale: f32, level: Level) {
    let n = src.len();
    assert_eq!(n, dst.len(), "fwht: source and destination lengths differ");
    assert!(
        b.is_power_of_two() && n.is_multiple_of(b),
        "fwht: block size {b} is not a power of two dividing {n}"
    );
    assert!(level.available(), "fwht: this CPU does not run {level:?}");
    // Safety: both buffers hold `n` elements, `b` divides `n`, the level's features exist.
    unsafe { fwht_raw(src.as_ptr(), dst.as_mut_ptr().cast(), n, b, scale, level) }
}

/// [`fwht`] in place.
pub fn fwht_in_place(v: &mut [f32], b: usize, scale: f32, level: Level) {
    let n = v.len();
    assert!(
        b.is_power_of_two() && n.is_multiple_of(b),
        "fwht: block size {b} is not a power of two dividing {n}"
    );
    assert!(level.available(), "fwht: this CPU does not run {level:?}");
    let p = v.as_mut_ptr();
    // Safety: as in `fwht`; every level reads a block (or a vector) before writing it.
    unsafe { fwht_raw(p, p, n, b, scale, level) }
}

/// The transform of `n / b` blocks from `src` to `dst` (which may be `src`).
///
/// # Safety
/// `src` readable and `dst` writable for `n` elements, either equal or not overlapping;
/// `b` a power of two dividing `n`; the CPU has `level`'s features.
unsafe fn fwht_raw(src: *const f32, dst: *mut f32, n: usize, b: usize, s: f32, level: Level) {
    // Safety (all arms): the caller's contract.
    match level {
        Level::Scalar => unsafe { scalar_blocks(src, dst, n, b, s) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2::run(src, dst, n, b, s) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { avx512::run(src, dst, n, b, s) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only x86_64 has vector levels"),
    }
}

/// The reference transform of one block in place: stages `h = 1, 2, .., b/2`, butterflies
/// `(v[j], v[j + h]) -> (v[j] + v[j + h], v[j] - v[j + h])`, then `v *= s`.
fn block_scalar(v: &mut [f32], s: f32) {
    let b = v.len();
    let mut h = 1;
    while h < b {
        for pair in v.chunks_exact_mut(2 * h) {
            let (lo, hi) = pair.split_at_mut(h);
            for (x, y) in lo.iter_mut().zip(hi) {
                let (u, w) = (*x, *y);
                *x = u + w;
                *y = u - w;
            }
        }
        h *= 2;
    }
    for x in v {
        *x *= s;
    }
}

/// [`block_scalar`] on every block of `src`, written to `dst`.
///
/// # Safety
/// As [`fwht_raw`].
unsafe fn scalar_blocks(src: *const f32, dst: *mut f32, n: usize, b: usize, s: f32) {
    for k in 0..n / b {
        // Safety: block `k` lies inside both buffers; `copy` allows `src == dst`, and the
        // block is initialized before the slice is made.
        unsafe {
            let (from, to) = (src.add(k * b), dst.add(k * b));
            std::ptr::copy(from, to, b);
            block_scalar(std::slice::from_raw_parts_mut(to, b), s);
        }
    }
}

/// The vector drivers, shared by both widths: each ISA module defines `W` (lanes), the
/// vector type `V`, and `load`, `store`, `add`, `sub`, `mul`, `splat` and `in_register(v, b)`
/// (the stages `h < min(b, W)` inside one register), then invokes this macro.
#[cfg(target_arch = "x86_64")]
macro_rules! drivers {
    ($feature:literal) => {
        /// The transform of `n / b` blocks from `src` to `dst` (may be `src`).
        ///
        /// # Safety
        /// As `fwht_raw`, with this module's features.
        #[target_feature(enable = $feature)]
        pub(super) unsafe fn run(src: *const f32, dst: *mut f32, n: usize, b: usize, s: f32) {
            // Safety (all calls): the caller's contract.
            unsafe {
                if b <= W {
                    packed(src, dst, n, b, s)
                } else {
                    match b / W {
                        2 => in_registers::<2>(src, dst, n, s),
                        4 => in_registers::<4>(src, dst, n, s),
                        8 => in_registers::<8>(src, dst, n, s),
                        _ => in_memory(src, dst, n, b, s),
                    }
                }
            }
        }

        /// Blocks of at most `W` elements, `W / b` to a register; the last `n % W`
        /// elements (whole blocks) by the scalar code.
        #[target_feature(enable = $feature)]
        unsafe fn packed(src: *const f32, dst: *mut f32, n: usize, b: usize, s: f32) {
            let sv = splat(s);
            let full = n / W * W;
            let mut i = 0;
            while i < full {
                // Safety: elements i .. i + W exist in both buffers.
                unsafe {
                    let v = in_register(load(src.add(i)), b);
                    store(dst.add(i), mul(v, sv));
                }
                i += W;
            }
            // Safety: the rest is `n - full` elements, a multiple of `b` (both `n` and `W`
            // are multiples of the power of two `b <= W`).
            unsafe { super::scalar_blocks(src.add(full), dst.add(full), n - full, b, s) }
        }

        /// Blocks of `N · W` elements, each held in `N` registers through every stage.
        #[target_feature(enable = $feature)]
        unsafe fn in_registers<const N: usize>(src: *const f32, dst: *mut f32, n: usize, s: f32) {
            let sv = splat(s);
            let b = N * W;
            for o in (0..n).step_by(b) {
                let mut v = [sv; N];
                for (k, r) in v.iter_mut().enumerate() {
                    // Safety: vector k of the block at o.
                    *r = in_register(unsafe { load(src.add(o + k * W)) }, W);
                }
                // Stages h = W, 2W, .. b/2: butterflies between whole registers.
                let mut h = 1;
                while h < N {
                    for i in (0..N).step_by(2 * h) {
                        for j in i..i + h {
                            let (x, y) = (v[j], v[j + h]);
                            v[j] = add(x, y);
                            v[j + h] = sub(x, y);
                        }
                    }
                    h *= 2;
                }
                for (k, r) in v.iter().enumerate() {
                    // Safety: vector k of the block at o.
                    unsafe { store(dst.add(o + k * W), mul(*r, sv)) };
                }
            }
        }

        /// Blocks of more than 8 registers: the in-register stages vector by vector into
        /// `dst`, then each wider stage over the block in `dst` (the last one scaled).
        #[target_feature(enable = $feature)]
        unsafe fn in_memory(src: *const f32, dst: *mut f32, n: usize, b: usize, s: f32) {
            let sv = splat(s);
            for o in (0..n).step_by(b) {
                // Safety (this block): elements o .. o + b exist in both buffers.
                unsafe {
                    for k in (0..b).step_by(W) {
                        store(dst.add(o + k), in_register(load(src.add(o + k)), W));
                    }
                    let d = dst.add(o);
                    let mut h = W;
                    while h < b {
                        let last = 2 * h == b;
                        for i in (0..b).step_by(2 * h) {
                            for j in (i..i + h).step_by(W) {
                                let (x, y) = (load(d.add(j)), load(d.add(j + h)));
                                let (u, w) = (add(x, y), sub(x, y));
                                if last {
                                    store(d.add(j), mul(u, sv));
                                    store(d.add(j + h), mul(w, sv));
                                } else {
                                    store(d.add(j), u);
                                    store(d.add(j + h), w);
                                }
                            }
                        }
                        h *= 2;
                    }
                }
            }
        }
    };
}

/// 8-lane AVX2 code.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    const W: usize = 8;

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load(p: *const f32) -> __m256 {
        // Safety: the caller's pointer addresses 8 elements.
        unsafe { _mm256_loadu_ps(p) }
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn store(p: *mut f32, v: __m256) {
        // Safety: the caller's pointer addresses 8 elements.
        unsafe { _mm256_storeu_ps(p, v) }
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    fn sub(a: __m256, b: __m256) -> __m256 {
        _mm256_sub_ps(a, b)
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    fn splat(s: f32) -> __m256 {
        _mm256_set1_ps(s)
    }

    /// Stages `h = 1, 2, 4` (those below `b`) of every block inside `v`: `t` is `v` with
    /// lanes `j` and `j ^ h` swapped, and the result is `t + ±v` with `-` on the lanes with
    /// bit `h` set: `v[j + h] + v[j]` on the others, `v[j - h] + (-v[j])` on those. IEEE
    /// addition commutes and `a + (-b)` is `a - b` exactly, so these are the scalar
    /// butterflies' values bit for bit, in three instructions instead of add, sub and blend.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn in_register(mut v: __m256, b: usize) -> __m256 {
        let (p, n) = (0.0f32, -0.0f32);
        if b > 1 {
            let t = _mm256_permute_ps::<0b10_11_00_01>(v);
            let sign = _mm256_setr_ps(p, n, p, n, p, n, p, n);
            v = _mm256_add_ps(t, _mm256_xor_ps(v, sign));
        }
        if b > 2 {
            let t = _mm256_permute_ps::<0b01_00_11_10>(v);
            let sign = _mm256_setr_ps(p, p, n, n, p, p, n, n);
            v = _mm256_add_ps(t, _mm256_xor_ps(v, sign));
        }
        if b > 4 {
            let t = _mm256_permute2f128_ps::<0x01>(v, v);
            let sign = _mm256_setr_ps(p, p, p, p, n, n, n, n);
            v = _mm256_add_ps(t, _mm256_xor_ps(v, sign));
        }
        v
    }

    drivers!("avx2");
}

/// 16-lane AVX-512F code.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    const W: usize = 16;

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load(p: *const f32) -> __m512 {
        // Safety: the caller's pointer addresses 16 elements.
        unsafe { _mm512_loadu_ps(p) }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store(p: *mut f32, v: __m512) {
        // Safety: the caller's pointer addresses 16 elements.
        unsafe { _mm512_storeu_ps(p, v) }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn sub(a: __m512, b: __m512) -> __m512 {
        _mm512_sub_ps(a, b)
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn splat(s: f32) -> __m512 {
        _mm512_set1_ps(s)
    }

    /// `v` with the sign bit flipped on the lanes set in `mask` (AVX-512F has no float xor).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn negate(v: __m512, mask: __mmask16) -> __m512 {
        let sign = _mm512_maskz_mov_epi32(mask, _mm512_set1_epi32(i32::MIN));
        _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), sign))
    }

    /// Stages `h = 1, 2, 4, 8` (those below `b`) inside `v`, as in the AVX2 code: `t` swaps
    /// lanes `j` and `j ^ h`, and the result is `t + ±v`, negated on the lanes with bit `h`
    /// set (the mask).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn in_register(mut v: __m512, b: usize) -> __m512 {
        if b > 1 {
            let t = _mm512_permute_ps::<0b10_11_00_01>(v);
            v = _mm512_add_ps(t, negate(v, 0xAAAA));
        }
        if b > 2 {
            let t = _mm512_permute_ps::<0b01_00_11_10>(v);
            v = _mm512_add_ps(t, negate(v, 0xCCCC));
        }
        if b > 4 {
            let t = _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v);
            v = _mm512_add_ps(t, negate(v, 0xF0F0));
        }
        if b > 8 {
            let t = _mm512_shuffle_f32x4::<0b01_00_11_10>(v, v);
            v = _mm512_add_ps(t, negate(v, 0xFF00));
        }
        v
    }

    drivers!("avx512f");
}

/// The block size of `Hadamard(x, H)`: H `[b, b]` with `b > 0` dividing x's last dim.
fn block_size(x: &[usize], h: &[usize]) -> Result<usize, KernelError> {
    let b = match h {
        &[r, c] if r == c && r > 0 => r,
        _ => {
            return Err(KernelError::Invalid(format!(
                "H must be a non-empty square matrix, got shape {h:?}"
            )));
        }
    };
    match x.last() {
        Some(f) if f % b == 0 => Ok(b),
        Some(f) => Err(KernelError::Invalid(format!(
            "block size {b} does not divide the last dim {f} of x {x:?}"
        ))),
        None => Err(KernelError::Invalid("x must have a channel axis".into())),
    }
}

/// The fast paths of [`hadamard`] (module docs).
enum Fast {
    /// `H = c · S_b`.
    Sylvester(f32),
    /// `H = A ⊗ S_p` ([`kronecker_sylvester`]).
    Kronecker(usize, Vec<f32>),
}

/// `ai.perqc::Hadamard(x, H)`: see the module doc.
pub fn hadamard(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let (x, h) = (req_f32(inputs, 0)?, req_f32(inputs, 1)?);
    let b = block_size(x.shape(), h.shape())?;
    let hs = standard(h);
    let scale = sylvester_scale(hs.as_slice().expect("standard layout"), b);
    let xs = standard(x);
    let n = xs.len();
    let fast = match scale {
        Some(c) => Some(Fast::Sylvester(c)),
        None => kronecker_sylvester(hs.as_slice().expect("standard layout"), b)
            .map(|(p, a)| Fast::Kronecker(p, a)),
    };
    let Some(fast) = fast else {
        // The dense product, block rows against H, on the MatMul kernel.
        let rows = RtTensor::F32(xs.into_shape_with_order(IxDyn(&[n / b, b]))?);
        let y = matmul(ctx, &[Some(&rows), Some(req(inputs, 1)?)])?;
        let RtTensor::F32(y) = &y[0] else {
            unreachable!("MatMul of f32 operands is f32")
        };
        let y = y.clone().into_shape_with_order(IxDyn(x.shape()))?;
        return Ok(vec![RtTensor::F32(y)]);
    };
    let src = xs.as_slice().expect("standard layout");
    let level = Level::detect();
    let mut out: Vec<f32> = output_vec(n);
    let dst = &mut out.spare_capacity_mut()[..n];
    let sp = SendPtr(src.as_ptr());
    let fill = |e0: usize, d: &mut [MaybeUninit<f32>]| {
        // Safety: `d` is elements e0 .. e0 + d.len() of the output, so the same range of
        // the source exists.
        let s = unsafe { std::slice::from_raw_parts(sp.get().add(e0), d.len()) };
        match &fast {
            Fast::Sylvester(c) => fwht(s, d, b, *c, level),
            Fast::Kronecker(p, a) => {
                // Every p-block of the piece through S_p at once (the sub-blocks are
                // p-blocks of x), then each b-block mixed from a copy.
                fwht(s, d, *p, 1.0, level);
                let mut t = vec![0f32; b];
                for db in d.chunks_exact_mut(b) {
                    // Safety: `fwht` wrote every element of `d`.
                    t.copy_from_slice(unsafe {
                        &*(db as *const [MaybeUninit<f32>] as *const [f32])
                    });
                    mix_blocks(&t, a, b / p, db);
                }
            }
        }
    };
    if ctx.threads > 1 {
        // Work per element: one pass of the transform, plus the mix's b/p terms.
        let cost = match &fast {
            Fast::Sylvester(_) => 1,
            Fast::Kronecker(p, _) => 1 + b / p,
        };
        par_fill_units(dst, b, cost, fill);
    } else {
        fill(0, dst);
    }
    // Safety: every piece is whole blocks, each written by `fwht` (and `mix_blocks`).
    unsafe { out.set_len(n) };
    Ok(vec![RtTensor::f32(ArrayD::from_shape_vec(
        IxDyn(x.shape()),
        out,
    )?)])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Natural-order Sylvester matrix times `c`, row-major (also the integer kernels' tests).
    pub(crate) fn sylvester(b: usize, c: f32) -> Vec<f32> {
        (0..b * b)
            .map(|k| {
                let (j, i) = (k / b, k % b);
                if (i & j).count_ones().is_multiple_of(2) {
                    c
                } else {
                    -c
                }
            })
            .collect()
    }

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn run(src: &[f32], b: usize, s: f32, level: Level) -> Vec<u32> {
        let mut out = vec![MaybeUninit::uninit(); src.len()];
        fwht(src, &mut out, b, s, level);
        // Safety: `fwht` writes every element.
        out.iter()
            .map(|v| unsafe { v.assume_init() }.to_bits())
            .collect()
    }

    #[test]
    fn sylvester_scale_is_exact() {
        for b in [1usize, 2, 4, 8, 16, 32, 64, 128, 256] {
            let c = 1.0 / (b as f32).sqrt();
            assert_eq!(sylvester_scale(&sylvester(b, c), b), Some(c), "b = {b}");
            assert_eq!(sylvester_scale(&sylvester(b, -2.5), b), Some(-2.5));
            if b > 1 {
                let mut h = sylvester(b, c);
                let k = b * b - 2;
                h[k] = f32::from_bits(h[k].to_bits() + 1); // one ulp off
                assert_eq!(sylvester_scale(&h, b), None, "b = {b}");
                let mut h = sylvester(b, c);
                h[b + 1] = -h[b + 1]; // a sign off
                assert_eq!(sylvester_scale(&h, b), None);
            }
        }
        assert_eq!(sylvester_scale(&sylvester(4, 0.0), 4), None);
        assert_eq!(sylvester_scale(&sylvester(4, f32::NAN), 4), None);
        assert_eq!(sylvester_scale(&sylvester(4, f32::INFINITY), 4), None);
        assert_eq!(sylvester_scale(&[1.0; 9], 3), None);
        assert_eq!(sylvester_scale(&[1.0; 8], 4), None);
        // -0.0 entries do not equal +0.0 bitwise, and 0 is refused anyway.
        assert_eq!(sylvester_scale(&[-0.0], 1), None);
    }

    #[test]
    fn every_level_agrees_bitwise_with_the_scalar_transform() {
        let levels: Vec<Level> = Level::ALL.into_iter().filter(|l| l.available()).collect();
        eprintln!("levels run here: {levels:?}");
        for b in [1usize, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024] {
            let s = 1.0 / (b as f32).sqrt();
            // Block counts that leave a tail after the vector loops (odd, 1, prime).
            for blocks in [1usize, 3, 7, 17, 40] {
                let src = noise(b * blocks, (b * 31 + blocks) as u64);
                let want = run(&src, b, s, Level::Scalar);
                for &l in &levels {
                    assert_eq!(run(&src, b, s, l), want, "b = {b}, {blocks} blocks, {l:?}");
                    let mut v = src.clone();
                    fwht_in_place(&mut v, b, s, l);
                    let got: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
                    assert_eq!(got, want, "in place: b = {b}, {blocks} blocks, {l:?}");
                }
            }
        }
    }

    #[test]
    fn the_transform_is_the_product_with_the_sylvester_matrix() {
        for b in [1usize, 2, 4, 8, 16, 32, 64, 128, 256] {
            let s = 1.0 / (b as f32).sqrt();
            let h = sylvester(b, s);
            let src = noise(3 * b, b as u64);
            for l in Level::ALL.into_iter().filter(|l| l.available()) {
                let got = run(&src, b, s, l);
                for (k, blk) in src.chunks_exact(b).enumerate() {
                    for i in 0..b {
                        let want: f64 = (0..b).map(|j| blk[j] as f64 * h[j * b + i] as f64).sum();
                        let g = f32::from_bits(got[k * b + i]) as f64;
                        // log2(b) roundings of partial sums (each below b, |x| < 1), then
                        // the scale s = 1/√b and its rounding.
                        let tol =
                            (b.ilog2() as f64 + 2.0) * f32::EPSILON as f64 * (b as f64).sqrt();
                        assert!(
                            (g - want).abs() <= tol,
                            "b {b} block {k} [{i}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// perqc's constructions `core ⊗ Sylvester` are found with their Sylvester factor; a
    /// core alone, a power of two (the Sylvester path's) or one flipped entry are not.
    #[test]
    fn kronecker_structure_is_detected_exactly() {
        for (n, p) in [(24usize, 2usize), (96, 8), (1536, 128)] {
            let h = crate::hadamard::hadamard(n).unwrap().normalized_f32();
            let (got, a) = kronecker_sylvester(&h, n).expect("core ⊗ Sylvester");
            assert_eq!(got, p, "n = {n}");
            assert_eq!(a.len(), (n / p) * (n / p));
            let mut bad = h.clone();
            bad[n * (n - 1) + 3] = -bad[n * (n - 1) + 3];
            assert_eq!(kronecker_sylvester(&bad, n), None, "n = {n}");
        }
        let h12 = crate::hadamard::hadamard(12).unwrap().normalized_f32();
        assert_eq!(kronecker_sylvester(&h12, 12), None);
        assert_eq!(
            kronecker_sylvester(&sylvester(64, 0.125), 64).map(|k| k.0),
            Some(32)
        );
    }

    /// The kernel on `H_12 ⊗ S_p` (the structured path) equals the product with H up to
    /// round-off, on 1 and 2 threads bitwise alike; H with one entry off takes the dense
    /// path and still equals the product.
    #[test]
    fn structured_hadamard_is_the_product() {
        use perqc_ir::{Graph, NodeSpec};
        let mut g = Graph::new("t");
        let id = g.add_node(NodeSpec::new("Hadamard"), &[], &["y"]).unwrap();
        for n in [96usize, 1536] {
            let mut h = crate::hadamard::hadamard(n).unwrap().normalized_f32();
            let rows = 2 * 64;
            let src = noise(rows * n, n as u64);
            let tx =
                RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[2, 64, n]), src.clone()).unwrap());
            for off in [false, true] {
                if off {
                    h[5] = f32::from_bits(h[5].to_bits() + 1);
                }
                let th = RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[n, n]), h.clone()).unwrap());
                let outs: Vec<Vec<f32>> = [1, 2]
                    .map(|threads| {
                        let ctx = KernelCtx {
                            node: g.node(id),
                            opset: 1,
                            threads,
                            subgraphs: None,
                        };
                        let y = hadamard(&ctx, &[Some(&tx), Some(&th)]).unwrap();
                        y[0].as_f32().unwrap().iter().copied().collect()
                    })
                    .into();
                if !off {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&outs[0]), bits(&outs[1]), "n = {n}: threads");
                }
                for (r, blk) in src.chunks_exact(n).enumerate().step_by(17) {
                    for i in (0..n).step_by(7) {
                        let want: f64 = (0..n).map(|j| blk[j] as f64 * h[j * n + i] as f64).sum();
                        let got = outs[0][r * n + i] as f64;
                        assert!(
                            (got - want).abs() < 2e-5,
                            "n {n} off {off} [{r}, {i}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn non_finite_inputs_propagate() {
        // One inf reaches every output of its block; inf - inf in a butterfly is NaN.
        let mut src = vec![0.5f32; 16];
        src[3] = f32::INFINITY;
        src[8] = f32::NAN;
        for l in Level::ALL.into_iter().filter(|l| l.available()) {
            let got = run(&src, 8, 0.25, l);
            assert!(
                got[..8].iter().all(|&v| f32::from_bits(v).is_infinite()),
                "{l:?}"
            );
            assert!(
                got[8..].iter().all(|&v| f32::from_bits(v).is_nan()),
                "{l:?}"
            );
        }
    }

    #[test]
    fn block_sizes_are_checked() {
        assert_eq!(block_size(&[2, 64], &[32, 32]).unwrap(), 32);
        assert_eq!(block_size(&[12], &[12, 12]).unwrap(), 12);
        for (x, h) in [
            (&[2, 48][..], &[32, 32][..]),
            (&[2, 64], &[32, 16]),
            (&[2, 64], &[32]),
            (&[2, 64], &[0, 0]),
            (&[], &[1, 1]),
        ] {
            assert!(block_size(x, h).is_err(), "{x:?} {h:?}");
        }
    }
}
