//! The two products inside the attention kernel, on operands that already sit in cache:
//! `C (m x n) = alpha · A (m x k) · B (k x n)` with `A` read row by row (one element
//! broadcast at a time) and `B` a row-major panel whose rows are padded to [`PAD`] columns.
//! The attention kernel packs K transposed (`D x L`) and V (`L x Dv`) once per key/value
//! head into such panels, so its score product `Q Kᵀ` (k = D, small) and its `P V`
//! (k = keys) read them without the per-call packing a general GEMM does.
//!
//! Register tiles: `MR` rows x two vectors of columns, the `MR · 2` accumulators kept in
//! registers over all of k (AVX-512: 8 x 32; AVX2 + FMA: 4 x 16). Each tile is one chain of
//! fused multiply-adds per accumulator over k in order, then one multiplication by `alpha`;
//! CPUs without AVX2 + FMA (and other architectures) run the same product through the
//! `gemm` crate. Levels differ only in rounding (fused or not, summation order inside the
//! `gemm` crate), which the attention kernel's contract ("up to summation order") allows.

use super::linalg::{Mat, gemm_par};

/// Column padding of `B` and `C` panels: a multiple of every level's tile width.
pub(crate) const PAD: usize = 32;
/// Row padding of `A` and `C`: a multiple of every level's tile height.
pub(crate) const ROW_PAD: usize = 8;

/// The instruction set the products run on, the widest the CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    /// The `gemm` crate (its own dispatch).
    Portable,
    Avx2,
    Avx512,
}

impl Level {
    /// Every level, narrowest first.
    pub(crate) const ALL: [Level; 3] = [Level::Portable, Level::Avx2, Level::Avx512];

    pub(crate) fn available(self) -> bool {
        match self {
            Level::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    pub(crate) fn detect() -> Level {
        static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            *Level::ALL
                .iter()
                .rev()
                .find(|l| l.available())
                .expect("portable")
        })
    }
}

/// Operands of [`product`]: row-major, element strides between rows.
#[derive(Clone, Copy)]
pub(crate) struct Operands {
    /// `m x k`, rows `lda` apart (`m` a multiple of [`ROW_PAD`]).
    pub a: *const f32,
    pub lda: usize,
    /// `k x n`, rows `ldb` apart (`n` a multiple of [`PAD`]).
    pub b: *const f32,
    pub ldb: usize,
    /// `m x n`, rows `ldc` apart.
    pub c: *mut f32,
    pub ldc: usize,
}

/// `C = alpha · A · B` for `m x k` by `k x n`.
///
/// Safety: the operands address `m x k`, `k x n` and `m x n` elements at their strides,
/// `C` overlapping neither input; `m % ROW_PAD == 0`, `n % PAD == 0`; `level` is available.
pub(crate) unsafe fn product(
    level: Level,
    (m, n, k): (usize, usize, usize),
    ops: Operands,
    alpha: f32,
) {
    debug_assert!(m % ROW_PAD == 0 && n % PAD == 0 && level.available());
    if m == 0 || n == 0 {
        return;
    }
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { x86::product_avx512(m, n, k, ops, alpha) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { x86::product_avx2(m, n, k, ops, alpha) },
        _ => {
            let mat = |ptr, ld: usize| Mat {
                ptr,
                rs: ld as isize,
                cs: 1,
            };
            // Safety: as above; one thread, so the call stays on this task.
            unsafe {
                gemm_par(
                    (m, n, k),
                    ops.c,
                    ops.ldc,
                    mat(ops.a, ops.lda),
                    mat(ops.b, ops.ldb),
                    0.0,
                    alpha,
                    1,
                )
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Operands;
    use std::arch::x86_64::*;

    /// A level's product: tiles of `$mr` rows by two `$w`-lane vectors; column tiles outer,
    /// so one `k x 2w` slab of `B` stays in L1 while the row tiles pass over it.
    macro_rules! product_level {
        ($name:ident, $features:literal, $mr:literal, $w:literal,
         $zero:expr, $load:expr, $splat:expr, $fma:expr, $mul:expr, $store:expr) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(m: usize, n: usize, k: usize, o: Operands, alpha: f32) {
                const MR: usize = $mr;
                const W: usize = $w;
                let (zero, load, splat, fma, mul, store) =
                    ($zero, $load, $splat, $fma, $mul, $store);
                for j0 in (0..n).step_by(2 * W) {
                    for i0 in (0..m).step_by(MR) {
                        let mut acc = [[zero(); 2]; MR];
                        // Safety (the loads and stores): inside the operands, see `product`.
                        let a = unsafe { o.a.add(i0 * o.lda) };
                        for kk in 0..k {
                            let bp = unsafe { o.b.add(kk * o.ldb + j0) };
                            let (b0, b1) = unsafe { (load(bp), load(bp.add(W))) };
                            for (r, acc) in acc.iter_mut().enumerate() {
                                let x = splat(unsafe { *a.add(r * o.lda + kk) });
                                acc[0] = fma(x, b0, acc[0]);
                                acc[1] = fma(x, b1, acc[1]);
                            }
                        }
                        let alpha = splat(alpha);
                        for (r, acc) in acc.iter().enumerate() {
                            unsafe {
                                let cp = o.c.add((i0 + r) * o.ldc + j0);
                                store(cp, mul(acc[0], alpha));
                                store(cp.add(W), mul(acc[1], alpha));
                            }
                        }
                    }
                }
            }
        };
    }

    product_level!(
        product_avx512,
        "avx512f",
        8,
        16,
        || _mm512_setzero_ps(),
        |p: *const f32| unsafe { _mm512_loadu_ps(p) },
        |x: f32| _mm512_set1_ps(x),
        |a, b, c| _mm512_fmadd_ps(a, b, c),
        |a, b| _mm512_mul_ps(a, b),
        |p: *mut f32, v| unsafe { _mm512_storeu_ps(p, v) }
    );
    product_level!(
        product_avx2,
        "avx2,fma",
        4,
        8,
        || _mm256_setzero_ps(),
        |p: *const f32| unsafe { _mm256_loadu_ps(p) },
        |x: f32| _mm256_set1_ps(x),
        |a, b, c| _mm256_fmadd_ps(a, b, c),
        |a, b| _mm256_mul_ps(a, b),
        |p: *mut f32, v| unsafe { _mm256_storeu_ps(p, v) }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every level the CPU runs matches an f64 product on padded shapes, with strides wider
    /// than the rows.
    #[test]
    fn every_level_matches_f64() {
        let mut s = 3u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        };
        for (m, n, k) in [
            (8, 32, 1),
            (16, 64, 64),
            (24, 96, 37),
            (64, 512, 64),
            (8, 32, 0),
        ] {
            let (lda, ldb, ldc) = (k + 3, n + PAD, n + 5);
            let a: Vec<f32> = (0..m * lda).map(|_| next()).collect();
            let b: Vec<f32> = (0..k.max(1) * ldb).map(|_| next()).collect();
            let alpha = 0.37;
            for level in Level::ALL.into_iter().filter(|l| l.available()) {
                let mut c = vec![f32::NAN; m * ldc];
                let ops = Operands {
                    a: a.as_ptr(),
                    lda,
                    b: b.as_ptr(),
                    ldb,
                    c: c.as_mut_ptr(),
                    ldc,
                };
                unsafe { product(level, (m, n, k), ops, alpha) };
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|kk| a[i * lda + kk] as f64 * b[kk * ldb + j] as f64)
                            .sum::<f64>()
                            * alpha as f64;
                        let got = c[i * ldc + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{level:?} {m}x{n}x{k} [{i}, {j}]: {got} vs {want}"
                        );
                    }
                    assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|x| x.is_nan()));
                }
            }
        }
    }
}
