//! Per-token dynamic activation quantization: the math of `ai.perqc::FakeQuantize`.
//!
//! Each row (the last axis, one token) is quantized with its own scale computed from the
//! row, and dequantized again, in f32, exactly as the standard ONNX graph `lower` writes
//! for the op computes it (`ReduceMax`/`ReduceMin`, `Max`/`Min` with 0, `Sub`, `Div`,
//! `Max(·, TINY)`, `Round(Neg(Div(mn, s)))`, then `QuantizeLinear` / `DequantizeLinear`
//! with one block per row):
//!
//! - asymmetric, codes `0 ..= hi = 2^bits - 1`: `mx = max(max_j x_j, 0)·clip`,
//!   `mn = min(min_j x_j, 0)·clip`, `s = max((mx - mn) / hi, TINY)`,
//!   `zp = round(-(mn / s))`, `q = clamp(round(x / s) + zp, 0, hi)`, `y = (q - zp)·s`;
//! - symmetric, codes `lo = -2^(bits-1) ..= hi = 2^(bits-1) - 1`:
//!   `s = max(max_j |x_j|·clip / hi, TINY)`, `q = clamp(round(x / s), lo, hi)`, `y = q·s`;
//!
//! with `round` half to even (ONNX `Round`, `QuantizeLinear`) and every operation one f32
//! rounding in that order (the products by `clip` are skipped when it is 1, as the graph
//! skips them). `zp` needs no clamp: `mx ≥ 0` makes `s ≥ -mn / hi` up to one rounding, so
//! `-mn / s ≤ hi·(1 + 2⁻²²)`, which rounds to at most `hi` (tested exhaustively over the
//! bit widths on random rows).
//!
//! `x / s` is a true division, as ONNX Runtime computes it: its blocked `QuantizeLinear`
//! (onnxruntime/core/providers/cpu/quantization/quantize_linear.cc,
//! `BlockedQuantizeLinear::opLastAxis`) calls `MlasQuantizeLinear` for 8-bit codes, which
//! divides by the scale (`MlasDivideFloat32x4`) and rounds with `cvtps2dq` (half to even),
//! and `std::nearbyint(input / scale)` for 4-bit codes; a probe with 1.6 M exact ties
//! `(k + 0.5)·s` per code type agreed with division everywhere and with a multiplication
//! by `1 / s` on only 89%. Rows with NaN or infinities are not specified (the graph's
//! reductions and casts decide).

use rayon::prelude::*;

/// The smallest scale: an all-zero row (or one whose range is below `TINY · hi`) gets this
/// scale instead of 0, so it quantizes to zeros instead of dividing by zero.
pub const TINY: f32 = 1e-8;

/// One per-token quantizer: `bits` in 2..=8, symmetric (signed codes, no zero point) or
/// asymmetric (unsigned codes, a per-row zero point), and the fraction `clip` in (0, 1] of
/// the row's range the codes cover.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenQuant {
    pub bits: u32,
    pub symmetric: bool,
    pub clip: f32,
}

impl TokenQuant {
    /// The smallest and largest code.
    pub fn code_range(&self) -> (f32, f32) {
        if self.symmetric {
            let h = (1u32 << (self.bits - 1)) as f32;
            (-h, h - 1.0)
        } else {
            (0.0, ((1u32 << self.bits) - 1) as f32)
        }
    }

    /// Whether the parameters are in range (bits 2..=8, clip in (0, 1]).
    pub fn check(&self) -> Result<(), String> {
        if !(2..=8).contains(&self.bits) {
            return Err(format!("bits must be in 2..=8, got {}", self.bits));
        }
        if !(self.clip > 0.0 && self.clip <= 1.0) {
            return Err(format!("clip must be in (0, 1], got {}", self.clip));
        }
        Ok(())
    }

    /// The row's scale and zero point (0 when symmetric) as the graph computes them.
    pub fn params(&self, row: &[f32]) -> (f32, f32) {
        let (_, hi) = self.code_range();
        if self.symmetric {
            let m = abs_max(row);
            let m = if self.clip != 1.0 { m * self.clip } else { m };
            return ((m / hi).max(TINY), 0.0);
        }
        let (lo_x, hi_x) = min_max(row);
        let mut mx = hi_x.max(0.0);
        let mut mn = lo_x.min(0.0);
        if self.clip != 1.0 {
            mx *= self.clip;
            mn *= self.clip;
        }
        let s = ((mx - mn) / hi).max(TINY);
        (s, (-(mn / s)).round_ties_even())
    }
}

/// Lanes of the row reductions: wide enough for one AVX-512 vector.
const LANES: usize = 16;

crate::kernels::vmath::multiversion! {
    /// `(min, max)` of the row, NaNs skipped (`(inf, -inf)` when empty or all NaN). Min and
    /// max are exact, so the lane order does not change the result (up to the sign of a
    /// zero, which the quantizer's `max(·, 0)` / `min(·, 0)` make irrelevant).
    fn min_max(row: &[f32]) -> (f32, f32) {
        let (mut lo, mut hi) = ([f32::INFINITY; LANES], [f32::NEG_INFINITY; LANES]);
        let chunks = row.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
                hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
            }
        }
        let (mut l, mut h) = (f32::INFINITY, f32::NEG_INFINITY);
        for &v in lo.iter().chain(tail) {
            l = if v < l { v } else { l };
        }
        for &v in hi.iter().chain(tail) {
            h = if v > h { v } else { h };
        }
        (l, h)
    }
}

crate::kernels::vmath::multiversion! {
    /// `max |x|` over the row, NaNs skipped (`-inf` when empty or all NaN).
    fn abs_max(row: &[f32]) -> f32 {
        let mut m = [f32::NEG_INFINITY; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                let a = c[i].abs();
                m[i] = if a > m[i] { a } else { m[i] };
            }
        }
        let mut r = f32::NEG_INFINITY;
        for v in m.into_iter().chain(tail.iter().map(|v| v.abs())) {
            r = if v > r { v } else { r };
        }
        r
    }
}

/// Elements above which [`fake_quantize_rows`] splits the rows over rayon's threads.
const PAR_MIN_ELEMS: usize = 1 << 15;

/// Quantizes and dequantizes every `width`-element row of `x` in place (see the module
/// docs for the exact arithmetic). Rows run in parallel on the current rayon pool once `x`
/// is large. `x.len()` must be a multiple of `width` (a `width` of 0 needs an empty `x`).
pub fn fake_quantize_rows(x: &mut [f32], width: usize, p: TokenQuant) {
    if width == 0 || x.is_empty() {
        return;
    }
    assert_eq!(x.len() % width, 0, "rows of {width} elements");
    if x.len() >= PAR_MIN_ELEMS && x.len() > width {
        let rows_per = (PAR_MIN_ELEMS / 4).div_ceil(width).max(1);
        x.par_chunks_mut(rows_per * width)
            .for_each(|c| fake_quantize_rows_serial(c, width, p));
    } else {
        fake_quantize_rows_serial(x, width, p);
    }
}

/// [`fake_quantize_rows`] on the calling thread.
pub fn fake_quantize_rows_serial(x: &mut [f32], width: usize, p: TokenQuant) {
    if width == 0 {
        return;
    }
    let (lo, hi) = p.code_range();
    for row in x.chunks_exact_mut(width) {
        let (s, zp) = p.params(row);
        if p.symmetric {
            quantize_symmetric(row, s, lo, hi);
        } else {
            quantize_asymmetric(row, s, zp, hi);
        }
    }
}

crate::kernels::vmath::multiversion! {
    /// `y = (clamp(round(x / s) + zp, 0, hi) - zp) · s` in place.
    fn quantize_asymmetric(row: &mut [f32], s: f32, zp: f32, hi: f32) {
        for v in row.iter_mut() {
            let q = ((*v / s).round_ties_even() + zp).clamp(0.0, hi);
            *v = (q - zp) * s;
        }
    }
}

crate::kernels::vmath::multiversion! {
    /// `y = clamp(round(x / s), lo, hi) · s` in place.
    fn quantize_symmetric(row: &mut [f32], s: f32, lo: f32, hi: f32) {
        for v in row.iter_mut() {
            *v = (*v / s).round_ties_even().clamp(lo, hi) * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A4: TokenQuant = TokenQuant {
        bits: 4,
        symmetric: false,
        clip: 1.0,
    };
    const S4: TokenQuant = TokenQuant {
        bits: 4,
        symmetric: true,
        clip: 1.0,
    };

    fn fq(x: &[f32], p: TokenQuant) -> Vec<f32> {
        let mut v = x.to_vec();
        fake_quantize_rows(&mut v, x.len(), p);
        v
    }

    /// The definition in f64 where every step is exact in f32 anyway (small integers and
    /// power-of-two scales), as an independent reference.
    #[test]
    fn known_values_asymmetric() {
        // range [-1, 14]: s = 15 / 15 = 1, zp = 1; codes are x + 1 clamped to [0, 15].
        let x = [-1.0, 0.0, 3.0, 14.0, 2.4, 2.6, -0.6];
        let y = fq(&x, A4);
        assert_eq!(y, [-1.0, 0.0, 3.0, 14.0, 2.0, 3.0, -1.0]);
        // All positive: mn = 0, zp = 0, s = 30/15 = 2.
        let y = fq(&[30.0, 1.0, 3.0, 5.0], A4);
        assert_eq!(y, [30.0, 0.0, 4.0, 4.0]);
        // All negative: mx = 0, s = 2, zp = 15.
        let y = fq(&[-30.0, -1.0, -3.0, -5.0], A4);
        assert_eq!(y, [-30.0, -0.0, -4.0, -4.0]);
    }

    #[test]
    fn ties_round_half_to_even() {
        // s = 1 (range [0, 15]); 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4.
        let y = fq(&[15.0, 0.5, 1.5, 2.5, 3.5], A4);
        assert_eq!(y, [15.0, 0.0, 2.0, 2.0, 4.0]);
        // Symmetric 4 bit: s = 7 / 7 = 1; -2.5 -> -2, -3.5 -> -4.
        let y = fq(&[7.0, -2.5, -3.5, 0.5], S4);
        assert_eq!(y, [7.0, -2.0, -4.0, 0.0]);
        // The zero point ties too: mn = -1.5, mx = 13.5, s = 1, zp = round(1.5) = 2.
        let (s, zp) = A4.params(&[-1.5, 13.5]);
        assert_eq!((s, zp), (1.0, 2.0));
    }

    #[test]
    fn all_zero_rows_give_zeros() {
        for bits in [2, 3, 4, 8] {
            for symmetric in [false, true] {
                let p = TokenQuant {
                    bits,
                    symmetric,
                    clip: 0.9,
                };
                let y = fq(&[0.0; 6], p);
                assert!(y.iter().all(|&v| v == 0.0), "{p:?}: {y:?}");
                assert_eq!(p.params(&[0.0; 6]).0, TINY);
            }
        }
    }

    #[test]
    fn symmetric_bits_and_clip() {
        // 8 bit: s = 127 / 127 = 1; codes saturate at -128 / 127.
        let p = TokenQuant {
            bits: 8,
            symmetric: true,
            clip: 1.0,
        };
        assert_eq!(fq(&[127.0, -127.0, 3.4], p), [127.0, -127.0, 3.0]);
        // 2 bit: codes -2..=1, s = 4 / 1 = 4: -4 -> -1·4, 4 -> 1·4, 2 -> round(0.5) = 0.
        let p = TokenQuant {
            bits: 2,
            symmetric: true,
            clip: 1.0,
        };
        assert_eq!(fq(&[4.0, -4.0, 2.0, -6.0 / 4.0], p), [4.0, -4.0, 0.0, -0.0]);
        // 3 bit, clip 0.5: max |x| = 12 -> 6, s = 6 / 3 = 2; 12 saturates at 3·2, -8 at -4·2.
        let p = TokenQuant {
            bits: 3,
            symmetric: true,
            clip: 0.5,
        };
        assert_eq!(fq(&[12.0, -12.0, 2.0, -3.0], p), [6.0, -8.0, 2.0, -4.0]);
    }

    #[test]
    fn asymmetric_bits_and_clip() {
        // 3 bit, codes 0..=7, range [-2, 12] -> s = 2, zp = 1.
        let p = TokenQuant {
            bits: 3,
            symmetric: false,
            clip: 1.0,
        };
        assert_eq!(fq(&[-2.0, 12.0, 5.0, 7.0], p), [-2.0, 12.0, 4.0, 8.0]);
        // 2 bit, clip 0.5: [-6, 12] -> [-3, 6], s = 9 / 3 = 3, zp = 1; 12 saturates at
        // (3 - 1)·3 = 6, -6 at -3.
        let p = TokenQuant {
            bits: 2,
            symmetric: false,
            clip: 0.5,
        };
        assert_eq!(fq(&[-6.0, 12.0, 3.0, 1.0], p), [-3.0, 6.0, 3.0, 0.0]);
        // 8 bit: [0, 255] -> s = 1.
        let p = TokenQuant {
            bits: 8,
            symmetric: false,
            clip: 1.0,
        };
        assert_eq!(fq(&[255.0, 7.5, 8.5, 0.2], p), [255.0, 8.0, 8.0, 0.0]);
    }

    /// The zero point needs no clamp: `round(-(mn / s))` stays in `[0, hi]` on rows with
    /// every kind of range (tiny, one-signed, heavy tails), for every bit width and clip.
    #[test]
    fn zero_point_in_range_without_clamp() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 // [0, 1)
        };
        for bits in 2..=8 {
            for clip in [1.0, 0.9, 0.37] {
                let p = TokenQuant {
                    bits,
                    symmetric: false,
                    clip,
                };
                let (_, hi) = p.code_range();
                for k in 0..4000 {
                    let mag = 10f32.powi((k % 61) - 40);
                    let shift = [0.0, 0.5, 1.0, -0.999_999, 0.999_999][k as usize % 5];
                    let row: Vec<f32> = (0..7).map(|_| (next() - shift) * mag).collect();
                    let (s, zp) = p.params(&row);
                    assert!(s >= TINY);
                    assert!((0.0..=hi).contains(&zp), "{p:?} {row:?}: zp {zp}");
                }
            }
        }
    }

    #[test]
    fn parallel_rows_equal_serial() {
        let width = 96;
        let x: Vec<f32> = (0..width * 700)
            .map(|i| ((i * 7919) % 1013) as f32 / 37.0 - 13.0)
            .collect();
        for p in [A4, S4] {
            let mut a = x.clone();
            let mut b = x.clone();
            fake_quantize_rows(&mut a, width, p);
            fake_quantize_rows_serial(&mut b, width, p);
            assert_eq!(a, b);
        }
    }
}
