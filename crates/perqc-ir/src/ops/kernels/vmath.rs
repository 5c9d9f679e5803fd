//! Vectorizable f32 math for the hot kernels (exp, sigmoid, softmax rows).
//!
//! The scalar functions are branch-free so LLVM vectorizes the slice loops; each slice loop
//! is compiled twice, once for AVX2+FMA (picked at run time when the CPU has it) and once
//! for the baseline target.
//!
//! `exp` is the Cephes `expf` polynomial (|rel. error| < 2 ulp on the finite range): inputs
//! below -87.3 give 0 (the true value is below the smallest normal f32, so the absolute
//! error is < 1.2e-38), above 88.72 give +inf, NaN stays NaN.

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

/// Defines `$name(args)` that runs `$body` with AVX2+FMA enabled when the CPU has them.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // Safety: the features were just detected.
                    return unsafe { fast($($arg),*) };
                }
            }
            fn base($($arg: $ty),*) $body
            base($($arg),*)
        }
    };
}

multiversion! {
    /// `dst[i] = exp(src[i])`.
    pub(crate) fn exp_slice(src: &[f32], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = exp(s);
        }
    }
}

multiversion! {
    /// `dst[i] = sigmoid(src[i])`.
    pub(crate) fn sigmoid_slice(src: &[f32], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = sigmoid(s);
        }
    }
}

multiversion! {
    /// Softmax of one contiguous row in place: max, then exp and sum, then scale.
    pub(crate) fn softmax_row(r: &mut [f32]) {
        // Eight running maxima so the reduction vectorizes.
        let mut m8 = [f32::NEG_INFINITY; 8];
        let mut chunks = r.chunks_exact(8);
        for c in &mut chunks {
            for (m, &v) in m8.iter_mut().zip(c) {
                *m = if v > *m || v.is_nan() { v } else { *m };
            }
        }
        let mut m = f32::NEG_INFINITY;
        for &v in m8.iter().chain(chunks.remainder()) {
            m = if v > m || v.is_nan() { v } else { m };
        }
        if m == f32::NEG_INFINITY {
            // Every entry is -inf: exp(x - max) is NaN in the reference formula.
            r.iter_mut().for_each(|v| *v = f32::NAN);
            return;
        }
        let mut s8 = [0f32; 8];
        let mut chunks = r.chunks_exact_mut(8);
        for c in &mut chunks {
            for (s, v) in s8.iter_mut().zip(c) {
                *v = exp(*v - m);
                *s += *v;
            }
        }
        let mut s = 0f32;
        for v in chunks.into_remainder() {
            *v = exp(*v - m);
            s += *v;
        }
        let s = s + s8.iter().sum::<f32>();
        let inv = 1.0 / s;
        r.iter_mut().for_each(|v| *v *= inv);
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
}
