//! Per-group quantization parameters (scale, zero point) and the scale search.
//!
//! A group's parameters are a function of its range only: `mn = min(min w, 0)`,
//! `mx = max(max w, 0)`, `amax = max(-mn, mx)`, and of a clip factor `c` (or, for the MX
//! formats, an exponent offset). In f32, in this order:
//!
//! - `Int` symmetric: `scale = (c * amax) / hi` (`hi` = the largest code, `2^(b-1) - 1`
//!   signed, `2^b - 1` unsigned: an unsigned symmetric grid has zero point 0 and is meant
//!   for non-negative data; negative values clamp to code 0).
//! - `Int` asymmetric: `scale = (mx * c - mn * c) / (hi - lo)`,
//!   `zp = clamp(round_half_even(lo - (mn * c) / scale), lo, hi)`.
//! - `Fp4`: `scale = (c * amax) / 6`.
//! - `MxFp4`: `scale = 2^e`, `e = floor(log2 amax) - 2 + d`; `MxInt8`:
//!   `scale = 2^(e - 6)`, `e = floor(log2 amax) + d`; `e` clamped to the E8M0 range
//!   `[-127, 127]`, `floor(log2)` exact from the f32 bits.
//!
//! A group of zeros gets scale 1 (MX: shared exponent 0) and the zero point the formula
//! gives for `mn = 0` (`lo`), so it dequantizes exactly to zero. A positive scale below
//! `f32::MIN_POSITIVE` (a range of a few subnormals) is raised to it so `w / scale` stays
//! finite; a scale that overflows f32 is an error ([`QuantError::ScaleOverflow`]).
//!
//! **Search.** [`ScaleSearch::Max`] uses `c = 1` (MX: `d = 0`). [`ScaleSearch::Mse`]
//! searches the clip grid `c = 1.00, 0.99, ..., 0.20` ([`MSE_CLIPS`] = 81 candidates, the
//! range of the GPTQ reference's grid search, which shrinks the range by up to 0.8) coarse
//! to fine: every fifth clip (1.00, 0.95, ..., 0.20), then the clips within 0.04 of the
//! coarse winner, 25 estimates instead of 81 (on the bench's data every spec's mean SQNR
//! is the same to 0.01 dB as with the full scan). MX formats try `d` in `{0, -1, +1}` (the
//! shared scale is a power of two: -1 clips more, +1 saturates nothing). Each estimate is
//! the group's sum of squared errors computed with a reciprocal scale in f32 lanes
//! (explicit AVX-512 where available); the winner replaces the `Max` choice only if its
//! *exact* error (the codes a `QWeight` will hold, f64 differences and sums) is strictly
//! below that of `Max`: MSE is never worse than Max, group by group.

use rayon::prelude::*;

use crate::error::QuantError;
use crate::grid::{Grid, GroupParams};
use crate::simd::multiversion;
use crate::spec::{Format, Granularity, QuantSpec, ScaleSearch};

/// Candidates of the clip grid: `c_k = (100 - k) / 100`, `k = 0..MSE_CLIPS`.
pub const MSE_CLIPS: usize = 81;

/// Parameters of every group of a `rows x cols` weight, row-major `rows x ngroups`.
#[derive(Clone, Debug)]
pub(crate) struct Params {
    pub group: usize,
    pub ngroups: usize,
    pub scales: Vec<f32>,
    /// Asymmetric `Int` only.
    pub zps: Option<Vec<i16>>,
}

impl Params {
    #[inline(always)]
    pub(crate) fn get(&self, row: usize, group: usize) -> GroupParams {
        let i = row * self.ngroups + group;
        GroupParams {
            scale: self.scales[i],
            zp: self.zps.as_ref().map_or(0, |z| z[i] as i32),
        }
    }
}

/// How a range and a candidate index become parameters.
#[derive(Clone, Copy, Debug)]
enum Kind {
    IntSym { hi: f32 },
    IntAsym { lo: f32, hi: f32 },
    Fp4,
    MxFp4,
    MxInt8,
}

/// `mn = min(min w, 0)`, `mx = max(max w, 0)` of finite values.
#[derive(Clone, Copy, Debug)]
struct Range {
    mn: f32,
    mx: f32,
}

impl Range {
    #[inline(always)]
    fn of(ws: &[f32]) -> Range {
        let (mn, mx) = crate::grid::range(ws);
        Range { mn, mx }
    }

    #[inline(always)]
    fn is_zero(self) -> bool {
        self.mn == 0.0 && self.mx == 0.0
    }

    #[inline(always)]
    fn amax(self) -> f32 {
        (-self.mn).max(self.mx)
    }
}

/// `floor(log2 a)` of a positive finite f32, exact (subnormals included).
#[inline(always)]
pub(crate) fn floor_log2(a: f32) -> i32 {
    let bits = a.to_bits() & 0x7fff_ffff;
    let exp = (bits >> 23) as i32;
    if exp == 0 {
        // Subnormal: a = mant * 2^-149.
        -149 + (31 - bits.leading_zeros() as i32)
    } else {
        exp - 127
    }
}

/// `2^e` as f32, exact for `e` in `[-149, 127]` (subnormal below -126).
#[inline(always)]
pub(crate) fn pow2(e: i32) -> f32 {
    debug_assert!((-149..=127).contains(&e));
    if e >= -126 {
        f32::from_bits(((e + 127) as u32) << 23)
    } else {
        f32::from_bits(1u32 << (e + 149))
    }
}

const MX_OFFSETS: [i32; 3] = [0, -1, 1];

#[inline(always)]
fn clip(k: usize) -> f32 {
    (100 - k) as f32 / 100.0
}

#[inline(always)]
fn floor_normal(scale: f32) -> f32 {
    if scale < f32::MIN_POSITIVE {
        f32::MIN_POSITIVE
    } else {
        scale
    }
}

impl Kind {
    fn of(spec: &QuantSpec) -> Kind {
        let (lo, hi) = spec.code_range();
        match spec.format {
            Format::Int if spec.symmetric => Kind::IntSym { hi: hi as f32 },
            Format::Int => Kind::IntAsym {
                lo: lo as f32,
                hi: hi as f32,
            },
            Format::Fp4 => Kind::Fp4,
            Format::MxFp4 => Kind::MxFp4,
            Format::MxInt8 => Kind::MxInt8,
        }
    }

    fn candidates(self, search: ScaleSearch) -> usize {
        match (search, self) {
            (ScaleSearch::Max, _) => 1,
            (ScaleSearch::Mse, Kind::MxFp4 | Kind::MxInt8) => MX_OFFSETS.len(),
            (ScaleSearch::Mse, _) => MSE_CLIPS,
        }
    }

    /// Candidate `k` (0 = the `Max` choice) for range `r`; the scale may be infinite only
    /// for an asymmetric range beyond f32.
    #[inline(always)]
    fn candidate(self, r: Range, k: usize) -> GroupParams {
        let zero_zp = match self {
            Kind::IntAsym { lo, .. } => lo as i32,
            _ => 0,
        };
        if r.is_zero() {
            let scale = match self {
                Kind::MxInt8 => pow2(-6),
                _ => 1.0,
            };
            return GroupParams { scale, zp: zero_zp };
        }
        let amax = r.amax();
        let mx_scale = |elem_emax: i32, frac: i32| {
            let e = (floor_log2(amax) - elem_emax + MX_OFFSETS[k]).clamp(-127, 127);
            pow2(e - frac)
        };
        match self {
            Kind::IntSym { hi } => GroupParams {
                scale: floor_normal(clip(k) * amax / hi),
                zp: 0,
            },
            Kind::IntAsym { lo, hi } => {
                let c = clip(k);
                let (mxc, mnc) = (r.mx * c, r.mn * c);
                let scale = floor_normal((mxc - mnc) / (hi - lo));
                let zp = (lo - mnc / scale).round_ties_even().max(lo).min(hi);
                GroupParams {
                    scale,
                    zp: zp as i32,
                }
            }
            Kind::Fp4 => GroupParams {
                scale: floor_normal(clip(k) * amax / 6.0),
                zp: 0,
            },
            Kind::MxFp4 => GroupParams {
                scale: mx_scale(2, 0),
                zp: 0,
            },
            Kind::MxInt8 => GroupParams {
                scale: mx_scale(0, 6),
                zp: 0,
            },
        }
    }
}

/// Coarse step of the clip search (in grid indices); the fine pass covers the indices
/// within `COARSE - 1` of the coarse winner.
const COARSE: usize = 5;
/// The most candidates one pass evaluates.
const PASS: usize = 3 * COARSE + 2;

/// Candidate `k` and its estimated error (infinite for a non-finite scale).
#[inline(always)]
fn estimate(grid: Grid, kind: Kind, r: Range, ws: &[f32], k: usize) -> (GroupParams, f32) {
    let p = kind.candidate(r, k);
    let e = if p.scale.is_finite() {
        grid.sse_approx(ws, p)
    } else {
        f32::INFINITY
    };
    (p, e)
}

/// The candidate with the smallest estimate among `ks` (the first on ties; NaN never
/// wins), starting from `best`.
#[inline(always)]
#[allow(clippy::too_many_arguments)] // the group and the candidates
fn best_of(
    grid: Grid,
    kind: Kind,
    r: Range,
    ws: &[f32],
    par: bool,
    ks: &[usize],
    mut best: (usize, GroupParams, f32),
) -> (usize, GroupParams, f32) {
    let mut out = [(GroupParams { scale: 0.0, zp: 0 }, f32::INFINITY); PASS];
    let out = &mut out[..ks.len()];
    if par {
        ks.par_iter()
            .zip(out.par_iter_mut())
            .for_each(|(&k, o)| *o = estimate(grid, kind, r, ws, k));
    } else {
        let mut ps = [GroupParams { scale: 1.0, zp: 0 }; PASS];
        let mut es = [f32::INFINITY; PASS];
        for (&k, (p, o)) in ks.iter().zip(ps.iter_mut().zip(out.iter_mut())) {
            let c = kind.candidate(r, k);
            o.0 = c;
            // A non-finite candidate is estimated at scale 1 and never wins.
            *p = if c.scale.is_finite() {
                c
            } else {
                GroupParams { scale: 1.0, zp: 0 }
            };
        }
        grid.sse_approx_batch(ws, &ps[..ks.len()], &mut es[..ks.len()]);
        for (o, &e) in out.iter_mut().zip(&es) {
            o.1 = if o.0.scale.is_finite() {
                e
            } else {
                f32::INFINITY
            };
        }
    }
    for (&k, &(p, e)) in ks.iter().zip(out.iter()) {
        if e < best.2 {
            best = (k, p, e);
        }
    }
    best
}

/// The parameters of one group (see the module doc).
///
/// Search: all candidates when there are few (MX); else every `COARSE`-th clip
/// (`c = 1.00, 0.95, ..., 0.20`), then the clips within 0.04 of the coarse winner. The
/// error is close to unimodal in the clip, and the fine pass recovers the 0.01 resolution
/// with 25 estimates instead of 81 (on the bench's data the mean SQNR of every spec is the
/// same to 0.01 dB as with the full scan). The winner then replaces `Max` only if its exact
/// error is strictly smaller.
///
/// `par` evaluates the candidates on the rayon pool (for one large group), else one batch
/// call per pass evaluates them in turn (the group stays in L1); each estimate is one
/// sequential sum either way, so the choice does not depend on the thread count.
#[inline(always)]
fn choose(grid: Grid, kind: Kind, n: usize, ws: &[f32], par: bool) -> GroupParams {
    let r = Range::of(ws);
    let max = kind.candidate(r, 0);
    if n == 1 || r.is_zero() || !max.scale.is_finite() {
        return max;
    }
    let mut ks = [0usize; PASS];
    let fine = n > 3 * COARSE;
    let mut len = 0;
    for k in (0..n).step_by(if fine { COARSE } else { 1 }) {
        ks[len] = k;
        len += 1;
    }
    let none = (0, max, f32::INFINITY);
    let mut best = best_of(grid, kind, r, ws, par, &ks[..len], none);
    if fine {
        let kb = best.0;
        len = 0;
        for k in kb.saturating_sub(COARSE - 1)..(kb + COARSE).min(n) {
            if k % COARSE != 0 {
                ks[len] = k;
                len += 1;
            }
        }
        best = best_of(grid, kind, r, ws, par, &ks[..len], best);
    }
    let best = best.1;
    if best == max {
        return max;
    }
    let (eb, em) = grid.sse_exact2(ws, best, max);
    if eb < em { best } else { max }
}

multiversion! {
    /// [`choose`] for every group of one row, compiled for the CPU as a whole.
    fn choose_row(
        grid: Grid,
        kind: Kind,
        n: usize,
        row: &[f32],
        group: usize,
        scales: &mut [f32],
        zps: &mut [i16],
    ) {
        for (g, ws) in row.chunks_exact(group).enumerate() {
            let p = choose(grid, kind, n, ws, false);
            scales[g] = p.scale;
            zps[g] = p.zp as i16;
        }
    }
}

/// Computes the parameters of every group of a finite, row-major `rows x cols` weight
/// (`rows, cols >= 1`) for a spec valid for weights, rows in parallel.
pub(crate) fn compute(
    w: &[f32],
    rows: usize,
    cols: usize,
    spec: &QuantSpec,
) -> Result<Params, QuantError> {
    debug_assert_eq!(w.len(), rows * cols);
    let group = spec.group_len(cols)?;
    let ngroups = cols / group;
    let (grid, kind) = (Grid::of(spec), Kind::of(spec));
    let n = kind.candidates(spec.scale);
    let mut scales = vec![0f32; rows * ngroups];
    let mut zps = vec![0i16; rows * ngroups];
    if spec.granularity == Granularity::Tensor {
        let p = choose(grid, kind, n, w, true);
        scales.fill(p.scale);
        zps.fill(p.zp as i16);
    } else {
        scales
            .par_chunks_mut(ngroups)
            .zip(zps.par_chunks_mut(ngroups))
            .zip(w.par_chunks(cols))
            .for_each(|((s, z), row)| choose_row(grid, kind, n, row, group, s, z));
    }
    if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
        return Err(QuantError::ScaleOverflow {
            row: i / ngroups,
            group: i % ngroups,
        });
    }
    let zps = matches!(kind, Kind::IntAsym { .. }).then_some(zps);
    Ok(Params {
        group,
        ngroups,
        scales,
        zps,
    })
}
