//! Vectorizable f32 math for the hot kernels (exp, sigmoid, tanh, softmax rows).
//!
//! The scalar functions are branch-free so LLVM vectorizes the slice loops; each slice loop
//! is compiled three times, for AVX-512, for AVX2+FMA (the widest the CPU has is picked at
//! run time) and for the baseline target.
//!
//! `exp` is the Cephes `expf` polynomial (|rel. error| < 2 ulp on the finite range): inputs
//! below -87.3 give 0 (the true value is below the smallest normal f32, so the absolute
//! error is < 1.2e-38), above 88.72 give +inf, NaN stays NaN.

use std::mem::MaybeUninit;

#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LO: f32 = -87.336_54;
    const HI: f32 = 88.722_83;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split into an exactly representable high part and a low correction.
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // Round to nearest through the 1.5 * 2^23 trick (no SSE4.1 `round` needed).
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI);
    let t = xc * LOG2E + MAGIC;
    let fx = t - MAGIC;
    let r = xc - fx * C1 - fx * C2;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5; // Cephes 5.0000001201e-1, which rounds to 0.5 in f32
    let y = p * z + r + 1.0;
    // fx is in [-126, 128]; 2^fx as a float built from its exponent bits, applied in two
    // halves so 2^128 does not overflow the exponent field.
    // The low mantissa bits of `t` hold fx as an integer (an int op instead of a cast).
    let n = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let h = n >> 1;
    let s1 = f32::from_bits(((h + 127) as u32) << 23);
    let s2 = f32::from_bits(((n - h + 127) as u32) << 23);
    let v = y * s1 * s2;
    let v = if x < LO { 0.0 } else { v };
    if x > HI { f32::INFINITY } else { v }
}

/// `1 / (1 + e^-x)`, finite for all finite `x`.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    let e = exp(-x.abs());
    let s = 1.0 / (1.0 + e);
    if x >= 0.0 { s } else { e * s }
}

/// `tanh(x)`, branch-free: the Cephes `tanhf` split (|rel. error| about 2 ulp). For
/// `|x| < 0.625` the odd polynomial `x + x³ P(x²)`; above it `1 - 2 / (e^{2|x|} + 1)` with
/// `x`'s sign (computed for `|x|`, then signed), which is 1 once `e^{2|x|}` overflows to inf. `±inf` gives `±1`, NaN stays
/// NaN (it takes the second form), `-0` stays `-0`.
#[inline(always)]
pub(crate) fn tanh(x: f32) -> f32 {
    // tanh(|x|), then x's sign (tanh is odd).
    let a = x.abs();
    let z = a * a;
    let small = ((((-0.005_704_988_7 * z + 0.020_639_088) * z - 0.053_739_715) * z + 0.133_314_42)
        * z
        - 0.333_332_8)
        * z
        * a
        + a;
    let big = 1.0 - 2.0 / (exp(2.0 * a) + 1.0);
    (if a < 0.625 { small } else { big }).copysign(x)
}

/// Defines `$name(args)` that runs `$body` compiled for AVX-512 (F, with AVX2 and FMA) or
/// for AVX2+FMA when the CPU has them, else for the baseline target. The three copies
/// compute the same expressions (only the vector width differs), so results agree bit for
/// bit except where a lane count changes an accumulation order.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? $body
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // Safety: the features were just detected.
                    return unsafe { wide($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // Safety: the features were just detected.
                    return unsafe { fast($($arg),*) };
                }
            }
            fn base($($arg: $ty),*) $(-> $ret)? $body
            base($($arg),*)
        }
    };
}
pub(crate) use multiversion;

multiversion! {
    /// `dst[i] = exp(src[i])`.
    pub(crate) fn exp_slice(src: &[f32], dst: &mut [MaybeUninit<f32>]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            d.write(exp(s));
        }
    }
}

multiversion! {
    /// `dst[i] = src[i] · sigmoid(src[i])` (SiLU, ONNX Swish with alpha 1).
    pub(crate) fn silu_slice(src: &[f32], dst: &mut [MaybeUninit<f32>]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            d.write(s * sigmoid(s));
        }
    }
}

multiversion! {
    /// Soft-capping in place: `r[i] = cap · tanh(r[i] / cap)` (attention logit soft-capping,
    /// ONNX Attention's `softcap`). `|result| <= min(|r[i]|, cap)` up to a few ulp.
    pub(crate) fn softcap_row(r: &mut [f32], cap: f32) {
        for v in r.iter_mut() {
            *v = cap * tanh(*v / cap);
        }
    }
}

multiversion! {
    /// `dst[i] = sigmoid(src[i])`.
    pub(crate) fn sigmoid_slice(src: &[f32], dst: &mut [MaybeUninit<f32>]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            d.write(sigmoid(s));
        }
    }
}

/// Independent partial maxima / sums per row: 16 lanes, one AVX-512 or two AVX2 registers,
/// so the reductions vectorize and the additions do not wait on each other.
const LANES: usize = 16;

/// The largest element of `r` (NaN if any is NaN), `-inf` for an empty row.
#[inline(always)]
fn row_max(r: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = r.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m || v.is_nan() { v } else { *m };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(chunks.remainder()) {
        m = if v > m || v.is_nan() { v } else { m };
    }
    m
}

/// `Σ f(r_i)` in [`LANES`] partial sums (lane `i % LANES`), then the tail, then the lanes:
/// a different order than a left-to-right fold, equal up to f32 rounding. Inlined into
/// each per-width copy below, so it vectorizes at that width.
/// The terms may be summed in f64 (`T`), with the same order.
#[inline(always)]
fn lane_sum<T>(r: &[f32], f: impl Fn(f32) -> T) -> T
where
    T: Copy + Default + std::ops::AddAssign + std::ops::Add<Output = T>,
    T: for<'a> std::iter::Sum<&'a T>,
{
    let mut lanes = [T::default(); LANES];
    let mut chunks = r.chunks_exact(LANES);
    for c in &mut chunks {
        for (acc, &v) in lanes.iter_mut().zip(c) {
            *acc += f(v);
        }
    }
    let mut s = T::default();
    for &v in chunks.remainder() {
        s += f(v);
    }
    s + lanes.iter().sum::<T>()
}

multiversion! {
    /// The sum of `r` (lane order of [`lane_sum`]).
    pub(crate) fn sum_slice(r: &[f32]) -> f32 {
        lane_sum(r, |v| v)
    }
}

multiversion! {
    /// `Σ r_i²` (lane order of [`lane_sum`]).
    pub(crate) fn sum_squares_slice(r: &[f32]) -> f32 {
        lane_sum(r, |v| v * v)
    }
}

multiversion! {
    /// `dst[i] = (src[i] * r) * g[i]` (two roundings, in that order).
    pub(crate) fn scale_row_into(src: &[f32], r: f32, g: &[f32], dst: &mut [MaybeUninit<f32>]) {
        for ((d, &v), &w) in dst.iter_mut().zip(src).zip(g) {
            d.write(v * r * w);
        }
    }
}

/// The smallest element of `r` (NaN if any is NaN), `inf` for an empty row.
#[inline(always)]
fn row_min(r: &[f32]) -> f32 {
    let mut lanes = [f32::INFINITY; LANES];
    let mut chunks = r.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v < *m || v.is_nan() { v } else { *m };
        }
    }
    let mut m = f32::INFINITY;
    for &v in lanes.iter().chain(chunks.remainder()) {
        m = if v < m || v.is_nan() { v } else { m };
    }
    m
}

multiversion! {
    /// The smallest element of `r`; NaN if any is NaN; `inf` if `r` is empty.
    pub(crate) fn min_slice(r: &[f32]) -> f32 {
        row_min(r)
    }
}

multiversion! {
    /// The largest element of `r`; NaN if any is NaN; `-inf` if `r` is empty.
    pub(crate) fn max_slice(r: &[f32]) -> f32 {
        row_max(r)
    }
}

/// The largest non-NaN element of `r` (`-inf` if there is none).
///
/// In a softmax a NaN element makes every result NaN whether or not the maximum saw it:
/// `exp(NaN - m)` is NaN, so is the sum and every `exp(x - m) / sum`. Skipping NaN here
/// (one `max` instruction per vector) therefore gives the results of the NaN-propagating
/// maximum.
#[inline(always)]
fn row_max_skip_nan(r: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = r.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(chunks.remainder()) {
        m = if v > m { v } else { m };
    }
    m
}

/// The softmax of `r` in place given its largest non-NaN element `m`: exp and sum, then
/// scale. Sums in [`LANES`] partial sums (lane `i % LANES`), then the tail, then the lanes:
/// the order of [`softmax_row_into`], so the two agree bit for bit.
///
/// `r` may be the first part of a row of `full >= r.len()` entries whose rest have
/// exponentials of exactly 0 (dead keys of an attention row): the entries are then split
/// between the lanes and the tail as that whole row splits them (its tail starts at the
/// last multiple of `LANES` not above `full`), and since adding an exact 0 changes no
/// partial sum, the bits are those of the whole row's softmax.
#[inline(always)]
fn softmax_from_max(r: &mut [f32], m: f32, full: usize) {
    if m == f32::NEG_INFINITY {
        // Every entry is -inf or NaN: exp(x - max) is NaN in the reference formula.
        r.iter_mut().for_each(|v| *v = f32::NAN);
        return;
    }
    let split = (full / LANES * LANES).min(r.len());
    let (body, tail) = r.split_at_mut(split);
    let mut lanes = [0f32; LANES];
    let mut chunks = body.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (acc, v) in lanes.iter_mut().zip(c) {
            let e = exp(*v - m);
            *v = e;
            *acc += e;
        }
    }
    // A partial chunk of the body (only when `full` reaches past `r`) still goes to lanes.
    for (acc, v) in lanes.iter_mut().zip(chunks.into_remainder()) {
        let e = exp(*v - m);
        *v = e;
        *acc += e;
    }
    let mut s = 0f32;
    for v in tail {
        let e = exp(*v - m);
        *v = e;
        s += e;
    }
    let s = s + lanes.iter().sum::<f32>();
    let inv = 1.0 / s;
    r.iter_mut().for_each(|v| *v *= inv);
}

multiversion! {
    /// Softmax of one contiguous row in place: max, then exp and sum, then scale.
    pub(crate) fn softmax_row(r: &mut [f32]) {
        let m = row_max_skip_nan(r);
        softmax_from_max(r, m, r.len());
    }
}

multiversion! {
    /// [`softmax_row`] of `r`, the live start of a row of `full` entries whose rest have
    /// exponentials of exactly 0: the bits of the whole row's softmax (see
    /// [`softmax_from_max`]).
    pub(crate) fn softmax_row_of(r: &mut [f32], full: usize) {
        let m = row_max_skip_nan(r);
        softmax_from_max(r, m, full);
    }
}

multiversion! {
    /// `r = softmax(r + mask)` in place (`mask` at least as long as `r`): the sum and the
    /// max in one pass, then [`softmax_row_of`]'s arithmetic for a row of `full` entries,
    /// so the bits are those of adding the mask and calling it.
    pub(crate) fn softmax_masked_row(r: &mut [f32], mask: &[f32], full: usize) {
        let mask = &mask[..r.len()];
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let mut rc = r.chunks_exact_mut(LANES);
        let mut mc = mask.chunks_exact(LANES);
        for (c, mk) in (&mut rc).zip(&mut mc) {
            for ((mx, v), &a) in lanes.iter_mut().zip(c).zip(mk) {
                *v += a;
                *mx = if *v > *mx { *v } else { *mx };
            }
        }
        let mut m = f32::NEG_INFINITY;
        for (v, &a) in rc.into_remainder().iter_mut().zip(mc.remainder()) {
            *v += a;
            m = if *v > m { *v } else { m };
        }
        // The max of the lanes and the tail is the row's max whatever the order.
        for &v in &lanes {
            m = if v > m { v } else { m };
        }
        softmax_from_max(r, m, full);
    }
}

multiversion! {
    /// `ln Σ_j exp(r_j)` of one row, for log-likelihoods over a vocabulary: `m + ln Σ
    /// exp(r_j - m)` with `m` the row's max, each term by the f32 [`exp`] (about 2 ulp),
    /// summed in f64 in [`lane_sum`]'s fixed order, so every dispatch level gives the same
    /// bits. NaN if the row holds one; `-inf` for an empty row or one of `-inf` only;
    /// `+inf` if it holds `+inf`.
    pub fn log_sum_exp(r: &[f32]) -> f64 {
        let m = row_max(r);
        if m.is_nan() || m == f32::NEG_INFINITY || m == f32::INFINITY {
            return f64::from(m);
        }
        f64::from(m) + lane_sum(r, |v| f64::from(exp(v - m))).ln()
    }
}

multiversion! {
    /// `dst` = the softmax of the row `src` (same length): the arithmetic of
    /// [`softmax_row`], reading `src` once and writing `dst` without a copy.
    pub(crate) fn softmax_row_into(src: &[f32], dst: &mut [MaybeUninit<f32>]) {
        let (src, dst) = (src, &mut dst[..src.len()]);
        let m = row_max_skip_nan(src);
        if m == f32::NEG_INFINITY {
            dst.iter_mut().for_each(|v| { v.write(f32::NAN); });
            return;
        }
        // The summation order of `softmax_row`.
        let mut lanes = [0f32; LANES];
        let mut sc = src.chunks_exact(LANES);
        let mut dc = dst.chunks_exact_mut(LANES);
        for (c, d) in (&mut sc).zip(&mut dc) {
            for ((acc, &x), o) in lanes.iter_mut().zip(c).zip(d) {
                let e = exp(x - m);
                o.write(e);
                *acc += e;
            }
        }
        let mut s = 0f32;
        for (&x, o) in sc.remainder().iter().zip(dc.into_remainder()) {
            let e = exp(x - m);
            o.write(e);
            s += e;
        }
        let s = s + lanes.iter().sum::<f32>();
        let inv = 1.0 / s;
        // Safety: the loop above wrote every element of `dst`.
        let dst = unsafe { &mut *(dst as *mut [MaybeUninit<f32>] as *mut [f32]) };
        dst.iter_mut().for_each(|v| *v *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.5 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst rel err {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn tanh_matches_f64() {
        // Relative error against f64 over the range where tanh is not yet 1 in f32, both
        // branches and the switch between them included.
        let mut worst = 0f64;
        let mut x = 1e-6f32;
        while x < 12.0 {
            for v in [x, -x] {
                let want = (v as f64).tanh();
                worst = worst.max(((tanh(v) as f64 - want) / want).abs());
            }
            x *= 1.0007;
        }
        assert!(worst < 4e-7, "worst rel err {worst}");
        for v in [0.624_999_9f32, 0.625, 0.625_000_1] {
            let want = (v as f64).tanh();
            assert!(((tanh(v) as f64 - want) / want).abs() < 4e-7, "{v}");
        }
        assert_eq!(tanh(0.0).to_bits(), 0f32.to_bits());
        assert_eq!(tanh(-0.0).to_bits(), (-0f32).to_bits());
        assert_eq!(tanh(1e-30), 1e-30);
        assert_eq!(tanh(30.0), 1.0);
        assert_eq!(tanh(100.0), 1.0);
        assert_eq!(tanh(f32::INFINITY), 1.0);
        assert_eq!(tanh(f32::NEG_INFINITY), -1.0);
        assert!(tanh(f32::NAN).is_nan());
        // The slice form (each dispatch width) against the scalar one, and its bound.
        let cap = 50.0f32;
        let src: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.37).collect();
        let mut r = src.clone();
        softcap_row(&mut r, cap);
        for (&y, &x) in r.iter().zip(&src) {
            assert_eq!(y, cap * tanh(x / cap));
            assert!(
                y.abs() <= cap && y.abs() <= x.abs() * (1.0 + 1e-6),
                "{x} -> {y}"
            );
        }
    }

    #[test]
    fn log_sum_exp_matches_f64() {
        for n in [1usize, 15, 16, 17, 1000, 49152] {
            // Logits-like rows: spread over about 30 nats, one tall entry.
            let mut r: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 30.0)
                .collect();
            r[n / 2] = 18.5;
            let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let want = m + r.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            let got = log_sum_exp(&r);
            assert!((got - want).abs() < 1e-6, "{n}: {got} vs {want}");
        }
        assert_eq!(log_sum_exp(&[]), f64::NEG_INFINITY);
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]), f64::NEG_INFINITY);
        assert_eq!(log_sum_exp(&[0.0, f32::INFINITY]), f64::INFINITY);
        assert!(log_sum_exp(&[0.0, f32::NAN, 1.0]).is_nan());
        assert!((log_sum_exp(&[f32::NEG_INFINITY, 0.0]) - 0.0).abs() < 1e-12);
    }

    #[test]
    fn sigmoid_and_softmax() {
        for x in [-100.0f32, -10.0, -1.0, 0.0, 0.5, 3.0, 50.0] {
            let want = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!((sigmoid(x) as f64 - want).abs() < 1e-7, "{x}");
        }
        let mut r: Vec<f32> = (0..21).map(|i| i as f32 * 0.3 - 2.0).collect();
        r[3] = f32::NEG_INFINITY;
        let want: Vec<f64> = {
            let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = r.iter().map(|&v| (v as f64 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        softmax_row(&mut r);
        for (a, b) in r.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-7);
        }
        let mut all_masked = [f32::NEG_INFINITY; 3];
        softmax_row(&mut all_masked);
        assert!(all_masked.iter().all(|v| v.is_nan()));
    }

    #[test]
    fn softmax_forms_agree_bitwise_and_sums_are_close() {
        for n in [1usize, 15, 16, 17, 100, 512, 515] {
            let src: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.11)
                .collect();
            let mut inplace = src.clone();
            softmax_row(&mut inplace);
            let mut out = vec![MaybeUninit::uninit(); n];
            softmax_row_into(&src, &mut out);
            // Safety: softmax_row_into writes all of `out`.
            let out: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
            assert_eq!(
                inplace.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "n = {n}"
            );
            let want: f64 = src.iter().map(|&v| v as f64).sum();
            assert!(
                (sum_slice(&src) as f64 - want).abs() < 1e-4 * n as f64,
                "n = {n}"
            );
            let m = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_slice(&src), m);
            let sq: f64 = src.iter().map(|&v| v as f64 * v as f64).sum();
            assert!((sum_squares_slice(&src) as f64 - sq).abs() < 1e-5 * sq.max(1.0));
            let g: Vec<f32> = (0..n).map(|i| 1.0 + i as f32 * 0.01).collect();
            let mut y = vec![MaybeUninit::uninit(); n];
            scale_row_into(&src, 0.3, &g, &mut y);
            for ((y, &x), &w) in y.iter().zip(&src).zip(&g) {
                // Safety: scale_row_into writes all of `y`.
                assert_eq!(unsafe { y.assume_init() }, x * 0.3 * w);
            }
        }
        for n in [1usize, 15, 16, 17, 100, 515] {
            let src: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.11)
                .collect();
            let mask: Vec<f32> = (0..n)
                .map(|i| match i % 7 {
                    0 => f32::NEG_INFINITY,
                    3 => f32::MIN,
                    _ => (i % 5) as f32 * 0.25,
                })
                .collect();
            let mut added: Vec<f32> = src.iter().zip(&mask).map(|(x, m)| x + m).collect();
            softmax_row(&mut added);
            let mut fused = src.clone();
            softmax_masked_row(&mut fused, &mask, n);
            assert_eq!(
                added.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                fused.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "masked, n = {n}"
            );
        }
        let mut masked_out = [1.0f32, 2.0];
        softmax_masked_row(&mut masked_out, &[f32::NEG_INFINITY; 2], 2);
        assert!(masked_out.iter().all(|v| v.is_nan()));
        // A live prefix of a row whose rest is dead (exp exactly 0): the prefix forms give
        // the whole row's bits for every prefix length, across and inside chunk borders.
        for full in [1usize, 15, 16, 17, 40, 100, 515] {
            let row: Vec<f32> = (0..full)
                .map(|i| ((i * 53 % 97) as f32 - 40.0) * 0.13)
                .collect();
            for live in 1..=full {
                let mut whole: Vec<f32> = row
                    .iter()
                    .enumerate()
                    .map(|(j, &x)| if j < live { x } else { -1e30 })
                    .collect();
                softmax_row(&mut whole);
                let mut prefix = row[..live].to_vec();
                softmax_row_of(&mut prefix, full);
                let mut masked = row[..live].to_vec();
                softmax_masked_row(&mut masked, &vec![0.0; live], full);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&prefix), bits(&whole[..live]), "{live} of {full}");
                assert_eq!(
                    bits(&masked),
                    bits(&whole[..live]),
                    "masked, {live} of {full}"
                );
                assert!(whole[live..].iter().all(|&p| p.to_bits() == 0));
            }
        }
        let mut with_nan = [1.0f32, f32::NAN, 3.0];
        assert!(max_slice(&with_nan).is_nan());
        softmax_row(&mut with_nan);
        assert!(with_nan.iter().all(|v| v.is_nan()));
        assert_eq!(max_slice(&[]), f32::NEG_INFINITY);
        assert_eq!(sum_slice(&[]), 0.0);
    }
}
