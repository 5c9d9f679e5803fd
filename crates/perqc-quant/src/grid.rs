//! Element grids: how one value becomes a code and back, given its group's parameters.
//!
//! Exact quantization (the codes a [`crate::QWeight`] holds) divides by the scale, as the
//! spec states: `Int` codes are `clamp(round_half_even(w / scale) + zp, lo, hi)` and
//! values `(code - zp) * scale`, all in f32. The scale search estimates errors with a
//! precomputed `1 / scale` instead ([`Grid::sse_approx`]), which can move an element whose
//! quotient sits within an ulp of a rounding boundary; the search therefore re-checks its
//! winner exactly ([`Grid::sse_exact`]) before it replaces the `Max` choice.

use crate::simd::multiversion;
use crate::spec::{Format, QuantSpec};

/// FP4 E2M1 values by code (bit 3 sign, bits 2..1 exponent, bit 0 mantissa): codes 0..=7
/// are `0, 0.5, 1, 1.5, 2, 3, 4, 6`, codes 8..=15 their negations (code 8 is -0).
pub const FP4_E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// The parameters one group of elements shares: `value = (code - zp) * scale` for integer
/// grids (`zp = 0` when symmetric), `value = E2M1(code) * scale` for FP4 grids.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct GroupParams {
    pub scale: f32,
    pub zp: i32,
}

/// The element grid of a format.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Grid {
    /// Integer codes in `[lo, hi]` (`Int`, `MxInt8`), as f32 (exact: |code| <= 255).
    Int { lo: f32, hi: f32 },
    /// E2M1 codes (`Fp4`, `MxFp4`), round to nearest, ties to even mantissa, saturating
    /// at ±6.
    Fp4,
}

/// The E2M1 magnitude index (0..=7) of `a >= 0` (already divided by the scale). The
/// midpoints between neighbours are 0.25, 0.75, 1.25, 1.75, 2.5, 3.5 and 5; a tie goes to
/// the even index (even mantissa), hence `>` where the lower neighbour is even and `>=`
/// where the upper one is.
#[inline(always)]
fn fp4_index(a: f32) -> u8 {
    (a > 0.25) as u8
        + (a >= 0.75) as u8
        + (a > 1.25) as u8
        + (a >= 1.75) as u8
        + (a > 2.5) as u8
        + (a >= 3.5) as u8
        + (a > 5.0) as u8
}

/// [`fp4_index`] as the magnitude itself, by branch-free increments (vectorizes).
#[inline(always)]
fn fp4_magnitude(a: f32) -> f32 {
    let step = |c: bool, d: f32| if c { d } else { 0.0 };
    step(a > 0.25, 0.5)
        + step(a >= 0.75, 0.5)
        + step(a > 1.25, 0.5)
        + step(a >= 1.75, 0.5)
        + step(a > 2.5, 1.0)
        + step(a >= 3.5, 1.0)
        + step(a > 5.0, 2.0)
}

/// `E2M1` code of `x` (already divided by the scale); zero magnitudes get code 0 (+0).
#[inline(always)]
pub(crate) fn fp4_code(x: f32) -> i16 {
    let idx = fp4_index(x.abs());
    let sign = if x < 0.0 && idx > 0 { 8 } else { 0 };
    (idx | sign) as i16
}

#[inline(always)]
fn int_code(w: f32, scale: f32, zp: f32, lo: f32, hi: f32) -> f32 {
    ((w / scale).round_ties_even() + zp).max(lo).min(hi)
}

/// Sum of 16 lanes as a tree (4 dependent vector adds instead of 16 scalar ones).
#[inline(always)]
fn hsum16(a: [f32; 16]) -> f32 {
    let mut b = [0f32; 8];
    for i in 0..8 {
        b[i] = a[i] + a[i + 8];
    }
    let c = [b[0] + b[4], b[1] + b[5], b[2] + b[6], b[3] + b[7]];
    (c[0] + c[2]) + (c[1] + c[3])
}

/// `sum err^2` over the slice in 16 f32 lanes plus a sequential tail, with `err` an
/// expression of the element `$w`. A macro, not a closure-taking function: closures are
/// not always inlined, and a closure compiled outside the multiversioned caller would lose
/// its vector features (and call `rintf` for every rounding).
macro_rules! lanes16 {
    ($ws:expr, |$w:ident| $err:expr) => {{
        let ws: &[f32] = $ws;
        let mut acc = [0f32; 16];
        let mut chunks = ws.chunks_exact(16);
        for c in &mut chunks {
            for l in 0..16 {
                let $w = c[l];
                let e: f32 = $err;
                acc[l] += e * e;
            }
        }
        let mut tail = 0f32;
        for &$w in chunks.remainder() {
            let e: f32 = $err;
            tail += e * e;
        }
        hsum16(acc) + tail
    }};
}

/// `sum err` over the slice in 8 f64 lanes plus a sequential tail (a fixed order).
macro_rules! lanes8_f64 {
    ($ws:expr, |$w:ident| $err:expr) => {{
        let ws: &[f32] = $ws;
        let mut acc = [0f64; 8];
        let mut chunks = ws.chunks_exact(8);
        for c in &mut chunks {
            for l in 0..8 {
                let $w = c[l];
                acc[l] += $err;
            }
        }
        let mut tail = 0f64;
        for &$w in chunks.remainder() {
            tail += $err;
        }
        let c = [
            acc[0] + acc[4],
            acc[1] + acc[5],
            acc[2] + acc[6],
            acc[3] + acc[7],
        ];
        (c[0] + c[2]) + (c[1] + c[3]) + tail
    }};
}

/// Estimated error of an integer grid with `inv = 1 / scale`; `lo`, `hi` are the code
/// bounds minus the zero point: `clamp(r + zp, lo, hi) - zp = clamp(r, lo - zp, hi - zp)`
/// for integers `r`, so the zero point costs nothing per element.
#[inline(always)]
fn sse_int(ws: &[f32], inv: f32, scale: f32, lo: f32, hi: f32) -> f32 {
    lanes16!(ws, |w| {
        let q = (w * inv).round_ties_even();
        // Plain compares (values are never NaN): one min/max instruction each.
        let q = if q < lo { lo } else { q };
        let q = if q > hi { hi } else { q };
        w - q * scale
    })
}

/// Estimated error of the E2M1 grid with `inv = 1 / scale`.
#[inline(always)]
fn sse_fp4(ws: &[f32], inv: f32, scale: f32) -> f32 {
    lanes16!(ws, |w| w.abs() - fp4_magnitude((w * inv).abs()) * scale)
}

/// Exact error of an integer grid (see [`Grid::sse_exact`]).
#[inline(always)]
fn exact_int(ws: &[f32], scale: f32, zp: i32, lo: f32, hi: f32) -> f64 {
    lanes8_f64!(ws, |w| {
        let code = int_code(w, scale, zp as f32, lo, hi) as i32;
        let d = w as f64 - ((code - zp) as f32 * scale) as f64;
        d * d
    })
}

/// Exact error of the E2M1 grid: `|w - E2M1(code) * scale| = ||w| - m * scale|` with `m`
/// the magnitude of the code, computed without a table.
#[inline(always)]
fn exact_fp4(ws: &[f32], scale: f32) -> f64 {
    lanes8_f64!(ws, |w| {
        let m = fp4_magnitude((w / scale).abs());
        let d = w.abs() as f64 - (m * scale) as f64;
        d * d
    })
}

multiversion! {
    fn sse_approx_mv(grid: Grid, ws: &[f32], p: GroupParams) -> f32 {
        grid.sse_approx_inline(ws, p)
    }
}

multiversion! {
    fn sse_exact_mv(grid: Grid, ws: &[f32], p: GroupParams) -> f64 {
        grid.sse_exact_inline(ws, p)
    }
}

multiversion! {
    /// Exact integer codes of a group.
    fn codes_int(ws: &[f32], codes: &mut [i16], scale: f32, zp: f32, lo: f32, hi: f32) {
        for (c, &w) in codes.iter_mut().zip(ws) {
            *c = int_code(w, scale, zp, lo, hi) as i16;
        }
    }
}

multiversion! {
    /// Exact E2M1 codes of a group.
    fn codes_fp4(ws: &[f32], codes: &mut [i16], scale: f32) {
        for (c, &w) in codes.iter_mut().zip(ws) {
            *c = fp4_code(w / scale);
        }
    }
}

/// `(min(min w, 0), max(max w, 0))` of finite values, dispatched on the CPU.
pub(crate) fn range(ws: &[f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // Safety: the feature was just detected.
        return unsafe { avx512::range(ws) };
    }
    let (mut mn, mut mx) = (0f32, 0f32);
    for &w in ws {
        mn = if w < mn { w } else { mn };
        mx = if w > mx { w } else { mx };
    }
    (mn, mx)
}

impl Grid {
    /// The grid of a (valid) spec.
    pub(crate) fn of(spec: &QuantSpec) -> Grid {
        match spec.format {
            Format::Fp4 | Format::MxFp4 => Grid::Fp4,
            Format::Int | Format::MxInt8 => {
                let (lo, hi) = spec.code_range();
                Grid::Int {
                    lo: lo as f32,
                    hi: hi as f32,
                }
            }
        }
    }

    /// The exact code of `w`.
    #[inline(always)]
    pub(crate) fn code(self, w: f32, p: GroupParams) -> i16 {
        match self {
            Grid::Int { lo, hi } => int_code(w, p.scale, p.zp as f32, lo, hi) as i16,
            Grid::Fp4 => fp4_code(w / p.scale),
        }
    }

    /// The value of a code: `(code - zp) * scale` in f32 (integer difference first, as ONNX
    /// `DequantizeLinear`), or `E2M1(code) * scale`.
    #[inline(always)]
    pub(crate) fn value(self, code: i16, p: GroupParams) -> f32 {
        match self {
            Grid::Int { .. } => (code as i32 - p.zp) as f32 * p.scale,
            Grid::Fp4 => FP4_E2M1_VALUES[(code & 15) as usize] * p.scale,
        }
    }

    /// Exact codes of a group into `codes` (same length as `ws`).
    pub(crate) fn quantize_into(self, ws: &[f32], p: GroupParams, codes: &mut [i16]) {
        match self {
            Grid::Int { lo, hi } => codes_int(ws, codes, p.scale, p.zp as f32, lo, hi),
            Grid::Fp4 => codes_fp4(ws, codes, p.scale),
        }
    }

    /// Estimated sum of squared errors of a group (reciprocal scale, f32 lane sums);
    /// inlined into the caller (call it from a multiversioned function).
    #[inline(always)]
    pub(crate) fn sse_approx_inline(self, ws: &[f32], p: GroupParams) -> f32 {
        let inv = 1.0 / p.scale;
        match self {
            Grid::Int { lo, hi } => {
                let zp = p.zp as f32;
                sse_int(ws, inv, p.scale, lo - zp, hi - zp)
            }
            Grid::Fp4 => sse_fp4(ws, inv, p.scale),
        }
    }

    /// Exact error of a group: `sum (w - value(code(w)))^2` with the codes a `QWeight`
    /// holds, differences and squares in f64, summed in 8 f64 lanes (a fixed order);
    /// inlined into the caller.
    #[inline(always)]
    pub(crate) fn sse_exact_inline(self, ws: &[f32], p: GroupParams) -> f64 {
        match self {
            Grid::Int { lo, hi } => exact_int(ws, p.scale, p.zp, lo, hi),
            Grid::Fp4 => exact_fp4(ws, p.scale),
        }
    }

    /// [`sse_approx`](Self::sse_approx) of each of `ps` into `out`, one dispatch for all.
    pub(crate) fn sse_approx_batch(self, ws: &[f32], ps: &[GroupParams], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // Safety: the feature was just detected.
            unsafe { avx512::sse_batch(self, ws, ps, out) };
            return;
        }
        for (o, &p) in out.iter_mut().zip(ps) {
            *o = sse_approx_mv(self, ws, p);
        }
    }

    /// Exact errors of two parameter sets (see [`sse_exact_inline`](Self::sse_exact_inline)),
    /// dispatched on the CPU.
    pub(crate) fn sse_exact2(self, ws: &[f32], a: GroupParams, b: GroupParams) -> (f64, f64) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // Safety: the feature was just detected.
            return unsafe { (avx512::exact(self, ws, a), avx512::exact(self, ws, b)) };
        }
        (sse_exact_mv(self, ws, a), sse_exact_mv(self, ws, b))
    }

    /// [`sse_approx_inline`](Self::sse_approx_inline), dispatched on the CPU: explicit
    /// AVX-512 when available (the compiler's own vectorization of the lane loop varies
    /// with its context), else the multiversioned loop.
    pub(crate) fn sse_approx(self, ws: &[f32], p: GroupParams) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            let inv = 1.0 / p.scale;
            // Safety: the feature was just detected.
            return unsafe {
                match self {
                    Grid::Int { lo, hi } => {
                        let zp = p.zp as f32;
                        avx512::sse_int(ws, inv, p.scale, lo - zp, hi - zp)
                    }
                    Grid::Fp4 => avx512::sse_fp4(ws, inv, p.scale),
                }
            };
        }
        sse_approx_mv(self, ws, p)
    }
}

/// The estimate kernels in AVX-512 intrinsics: the same operations as [`sse_int`] and
/// [`sse_fp4`] per element (and of [`exact_int`], [`exact_fp4`] for the exact check), 16 lanes, the tail by a zero-filled masked load (a zero element
/// has zero error on every grid: `lo - zp <= 0 <= hi - zp`), lanes summed by
/// `_mm512_reduce_add_ps`.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Grid, GroupParams};

    /// Estimates of every candidate of `ps` (the group stays in L1 between them).
    #[target_feature(enable = "avx512f")]
    pub(super) fn sse_batch(grid: Grid, ws: &[f32], ps: &[GroupParams], out: &mut [f32]) {
        for (o, &p) in out.iter_mut().zip(ps) {
            let inv = 1.0 / p.scale;
            *o = match grid {
                Grid::Int { lo, hi } => {
                    let zp = p.zp as f32;
                    sse_int(ws, inv, p.scale, lo - zp, hi - zp)
                }
                Grid::Fp4 => sse_fp4(ws, inv, p.scale),
            };
        }
    }

    /// The E2M1 magnitude of `a >= 0` (see `fp4_magnitude`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn fp4_mag(a: __m512) -> __m512 {
        let mut m = _mm512_setzero_ps();
        let gt = |m: __m512, t: f32, d: f32| {
            let k = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, _mm512_set1_ps(t));
            _mm512_mask_add_ps(m, k, m, _mm512_set1_ps(d))
        };
        let ge = |m: __m512, t: f32, d: f32| {
            let k = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(a, _mm512_set1_ps(t));
            _mm512_mask_add_ps(m, k, m, _mm512_set1_ps(d))
        };
        m = gt(m, 0.25, 0.5);
        m = ge(m, 0.75, 0.5);
        m = gt(m, 1.25, 0.5);
        m = ge(m, 1.75, 0.5);
        m = gt(m, 2.5, 1.0);
        m = ge(m, 3.5, 1.0);
        gt(m, 5.0, 2.0)
    }

    /// Exact error (see `Grid::sse_exact_inline`): codes by division as the quantizer
    /// computes them, differences and squares in f64, 8 + 8 f64 lanes.
    #[target_feature(enable = "avx512f")]
    pub(super) fn exact(grid: Grid, ws: &[f32], p: GroupParams) -> f64 {
        let scale = _mm512_set1_ps(p.scale);
        let zp = _mm512_set1_ps(p.zp as f32);
        let (lo, hi) = match grid {
            Grid::Int { lo, hi } => (lo, hi),
            Grid::Fp4 => (0.0, 0.0),
        };
        let (lo, hi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
        let (mut a0, mut a1) = (_mm512_setzero_pd(), _mm512_setzero_pd());
        let mut i = 0;
        while i < ws.len() {
            let w = load(ws, i);
            let (x, v) = match grid {
                Grid::Int { .. } => {
                    let q = _mm512_roundscale_ps::<RNE>(_mm512_div_ps(w, scale));
                    let c = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(q, zp), lo), hi);
                    (w, _mm512_mul_ps(_mm512_sub_ps(c, zp), scale))
                }
                Grid::Fp4 => {
                    let m = fp4_mag(_mm512_abs_ps(_mm512_div_ps(w, scale)));
                    (_mm512_abs_ps(w), _mm512_mul_ps(m, scale))
                }
            };
            let lo8 = |v: __m512| _mm512_cvtps_pd(_mm512_castps512_ps256(v));
            let hi8 = |v: __m512| {
                _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                    _mm512_castps_pd(v),
                )))
            };
            let d0 = _mm512_sub_pd(lo8(x), lo8(v));
            let d1 = _mm512_sub_pd(hi8(x), hi8(v));
            a0 = _mm512_add_pd(a0, _mm512_mul_pd(d0, d0));
            a1 = _mm512_add_pd(a1, _mm512_mul_pd(d1, d1));
            i += 16;
        }
        _mm512_reduce_add_pd(_mm512_add_pd(a0, a1))
    }

    /// `(min(min w, 0), max(max w, 0))`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn range(ws: &[f32]) -> (f32, f32) {
        let (mut mn, mut mx) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i < ws.len() {
            let w = load(ws, i);
            mn = _mm512_min_ps(mn, w);
            mx = _mm512_max_ps(mx, w);
            i += 16;
        }
        (_mm512_reduce_min_ps(mn), _mm512_reduce_max_ps(mx))
    }

    /// Rounding mode of `round_ties_even` without exceptions.
    const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load(ws: &[f32], i: usize) -> __m512 {
        let left = ws.len() - i;
        if left >= 16 {
            // Safety: 16 elements from i are in bounds.
            unsafe { _mm512_loadu_ps(ws.as_ptr().add(i)) }
        } else {
            let mask: __mmask16 = (1u32 << left) as u16 - 1;
            // Safety: the mask reads only the `left` elements in bounds.
            unsafe { _mm512_maskz_loadu_ps(mask, ws.as_ptr().add(i)) }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn sse_int(ws: &[f32], inv: f32, scale: f32, lo: f32, hi: f32) -> f32 {
        let (inv, scale) = (_mm512_set1_ps(inv), _mm512_set1_ps(scale));
        let (lo, hi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < ws.len() {
            let w = load(ws, i);
            let q = _mm512_roundscale_ps::<RNE>(_mm512_mul_ps(w, inv));
            let q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
            let e = _mm512_sub_ps(w, _mm512_mul_ps(q, scale));
            acc = _mm512_add_ps(acc, _mm512_mul_ps(e, e));
            i += 16;
        }
        _mm512_reduce_add_ps(acc)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn sse_fp4(ws: &[f32], inv: f32, scale: f32) -> f32 {
        let (inv, scale) = (_mm512_set1_ps(inv), _mm512_set1_ps(scale));
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < ws.len() {
            let w = load(ws, i);
            let m = fp4_mag(_mm512_abs_ps(_mm512_mul_ps(w, inv)));
            let e = _mm512_sub_ps(_mm512_abs_ps(w), _mm512_mul_ps(m, scale));
            acc = _mm512_add_ps(acc, _mm512_mul_ps(e, e));
            i += 16;
        }
        _mm512_reduce_add_ps(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                u * u * u * 40.0
            })
            .collect()
    }

    /// The explicit AVX-512 kernels and the portable (multiversioned) ones agree: estimates
    /// up to the f32 lane order, exact errors up to the f64 lane order, and the exact error
    /// equals the error of the codes `quantize_into` produces.
    #[test]
    fn kernels_agree() {
        let grids = [
            (Grid::Int { lo: -8.0, hi: 7.0 }, 0),
            (Grid::Int { lo: 0.0, hi: 15.0 }, 6),
            (Grid::Fp4, 0),
        ];
        for n in [1, 15, 16, 17, 32, 100, 576] {
            let ws = data(n, n as u64);
            for &(grid, zp) in &grids {
                for scale in [0.05f32, 0.3, 1.0] {
                    let p = GroupParams { scale, zp };
                    let approx = sse_approx_mv(grid, &ws, p);
                    let exact = sse_exact_mv(grid, &ws, p);
                    let mut out = [0f32];
                    grid.sse_approx_batch(&ws, &[p], &mut out);
                    let (e2, _) = grid.sse_exact2(&ws, p, p);
                    let mut codes = vec![0i16; n];
                    grid.quantize_into(&ws, p, &mut codes);
                    let direct: f64 = ws
                        .iter()
                        .zip(&codes)
                        .map(|(&w, &c)| {
                            let d = w as f64 - grid.value(c, p) as f64;
                            d * d
                        })
                        .sum();
                    let close =
                        |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * b.abs().max(1e-30);
                    assert!(
                        close(out[0] as f64, approx as f64, 1e-5),
                        "{grid:?} n {n}: {} vs {approx}",
                        out[0]
                    );
                    assert!(
                        close(approx as f64, exact, 1e-4),
                        "{grid:?} n {n}: {approx} vs {exact}"
                    );
                    assert!(close(e2, exact, 1e-12), "{grid:?} n {n}: {e2} vs {exact}");
                    assert!(
                        close(direct, exact, 1e-12),
                        "{grid:?} n {n}: {direct} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn range_matches_scalar() {
        for n in [1, 7, 16, 33] {
            let ws = data(n, 99 + n as u64);
            let mn = ws.iter().fold(0f32, |a, &b| a.min(b));
            let mx = ws.iter().fold(0f32, |a, &b| a.max(b));
            assert_eq!(range(&ws), (mn, mx));
        }
    }
}
