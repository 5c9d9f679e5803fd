//! Integer products for quantized linears: 4-bit weights times 8-bit activation codes,
//! accumulated exactly in i32, scaled once per output element.
//!
//! **What is computed.** A linear `y = FQ(x) · DQ(W)` whose activation quantizer is
//! per-token (`FQ`: codes `q`, scale `s_r` and zero point `z_r` per row, see
//! [`crate::quant`]) and whose weight is symmetric with at most 4 bits and one scale per
//! output column (`W[k, n] = w[k, n] · t_n`, `w` in -8..=7) is, in exact arithmetic,
//!
//! ```text
//! y[r, n] = s_r · t_n · Σ_k (q[r, k] - z_r) · w[k, n]
//! ```
//!
//! The sum is an integer, computed exactly here; the result is `f32(int) · f32(s_r · t_n)`
//! (two roundings, in that order, at every level). The float path computes the same
//! value with a rounding per product and per partial sum, so the two agree within f32
//! round-off of the sum, not bit for bit.
//!
//! **Weight groups.** With one scale per group of `g` rows of K and column
//! (`W[k, n] = w[k, n] · t[k / g, n]`, g a multiple of [`KG`]; weight-only graphs, and
//! MatMulNBits), the sum splits into the groups' integer sums `I_b`, each exact, and
//!
//! ```text
//! y[r, n] = f32(Σ_b f32(I_b) · t[b, n]) · s_r     (left to right, one fused multiply-add
//!                                                  per group, then a multiply)
//! ```
//!
//! **Operands.** The instructions multiply unsigned bytes by signed bytes (`vpdpbusd`,
//! `vpmaddubsw`). Weights are stored unsigned, `u = w + 8` in 0..=15, two per byte; the
//! activation codes are the signed side, `c = q - off` in -128..=127 (`off` = 128 for
//! 8-bit asymmetric codes, else 0). With `acc = Σ_k u·c`, exact in i32 (|acc| <= K·15·128):
//!
//! ```text
//! Σ_k w·(q - z) = Σ_k (u - 8)·c + (off - z)·Σ_k w = acc - 8·Σ_k c + (off - z)·colsum_n
//! ```
//!
//! so each row carries `rowcorr = -8·Σ_k c` and `zcorr = off - z`, each column
//! `colsum = Σ_k w` (with groups: per group, the row's `-8·Σ_{k in b} c` from the codes and
//! `colsum[b, n]`). `vpmaddubsw` adds two `u·c` products in i16 with saturation; they
//! are at most 2·15·128 = 3840, so it never saturates here.
//!
//! **Packed weight layout** (fixed, the same for every level; AVX2 and AVX-VNNI read a
//! panel of a product of many rows unpacked, see `Level::panel_weights`): columns in panels of
//! [`NR`] = 32, K padded with zeros (`u = 8`) to a multiple of [`KG`] = 4; per panel and
//! group of 4 k, 64 bytes: byte `4·l + j` holds `u[k0 + j, c0 + l]` in its low nibble and
//! `u[k0 + j, c0 + 16 + l]` in its high nibble (l in 0..16). A 64-byte load is then two
//! 16-lane vectors of four k each, the operand shape of `vpdpbusd`. Padding columns hold
//! `u = 8` and are never written out.
//!
//! **Levels.** AVX-512 VNNI and AVX-VNNI (`vpdpbusd`), AVX-512BW and AVX2 (`vpmaddubsw`,
//! its pair sums added in i16 over eight groups, then `vpmaddwd` by 1: exact, since eight
//! pair sums stay within ±30720) and portable code, picked at run time. Every level
//! computes the same integers and the same two roundings, so all give the same bits
//! (tested on odd shapes at every level the CPU has, and 1 against 2 threads).

use super::layout::{PAR_MIN_ELEMS, standard};
use crate::kernel::{KernelCtx, KernelError, RtTensor, opt, output_vec, req, req_f32};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;
use std::mem::MaybeUninit;

type In<'a, 'b> = &'a [Option<&'b RtTensor>];
type Out = Result<Vec<RtTensor>, KernelError>;

/// Columns per weight panel.
pub const NR: usize = 32;
/// K per group: four bytes per 32-bit lane.
pub const KG: usize = 4;
/// Bytes per panel and group.
pub const GROUP_BYTES: usize = NR * KG / 2;
/// Rows per micro-kernel call; activation code buffers are padded to a multiple of it.
pub const MR: usize = 8;

/// An instruction-set level of the integer kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Portable code.
    Scalar,
    /// 8-lane AVX2 `vpmaddubsw` / `vpmaddwd`.
    Avx2,
    /// 8-lane AVX-VNNI `vpdpbusd` (VEX-encoded, 256-bit: Intel's hybrid cores without
    /// AVX-512, such as Alder Lake, and later Xeons beside AVX-512 VNNI).
    AvxVnni,
    /// 16-lane AVX-512BW `vpmaddubsw` / `vpmaddwd`.
    Avx512Bw,
    /// 16-lane AVX-512 VNNI `vpdpbusd`.
    Avx512Vnni,
}

impl Level {
    /// Every level, narrowest first.
    pub const ALL: [Level; 5] = [
        Level::Scalar,
        Level::Avx2,
        Level::AvxVnni,
        Level::Avx512Bw,
        Level::Avx512Vnni,
    ];

    /// The fastest level this CPU runs, or a narrower one named by the environment
    /// variable `PERQC_INT_LEVEL` (`scalar`, `avx2`, `avxvnni`, `avx512bw`, `avx512vnni`; to measure
    /// what a CPU without the wider instructions gets). Read once per process.
    pub fn detect() -> Level {
        static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            let widest = *Level::ALL
                .iter()
                .rev()
                .find(|l| l.available())
                .expect("scalar is always available");
            let asked = std::env::var("PERQC_INT_LEVEL").ok().and_then(|v| {
                Level::ALL
                    .into_iter()
                    .find(|l| format!("{l:?}").eq_ignore_ascii_case(&v))
            });
            match asked {
                Some(l) if l.available() => l,
                _ => widest,
            }
        })
    }

    /// Whether this CPU runs the level.
    pub fn available(self) -> bool {
        match self {
            Level::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Level::AvxVnni => {
                Level::Avx2.available() && std::arch::is_x86_feature_detected!("avxvnni")
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx512Bw => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx512Vnni => {
                Level::Avx512Bw.available() && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// One panel's weights as the level's tile reads them for a product of `m` rows: the
    /// packed bytes themselves, or for the 256-bit levels with `m >= UNPACK_MIN_ROWS` the
    /// nibbles unpacked to bytes ([`unpack_panel`]). AVX2 has no 8-bit dot product, so its
    /// tile issues two instructions per `vpmaddubsw`; unpacking in the tile as well (three
    /// more per group and row half) left it at 65% of the instruction's rate. AVX-VNNI
    /// needs the registers the unpacking takes: on unpacked weights its tile keeps twelve
    /// accumulators in flight instead of eight (`tile256_unpacked`). Unpacked once, the
    /// panel is reused by every row block (m / MR of them) from a per-call buffer of
    /// `2 · GROUP_BYTES` per group (48 KiB at K = 1536): the resident weights stay packed.
    /// With few rows the copy costs more than it saves (docs/runtime.md), so they read
    /// the packed bytes. The AVX-512 levels gain nothing from it (docs/runtime.md).
    fn panel_weights(self, packed: &[u8], m: usize) -> PanelWeights<'_> {
        if matches!(self, Level::Avx2 | Level::AvxVnni) && m >= UNPACK_MIN_ROWS {
            PanelWeights {
                bytes: std::borrow::Cow::Owned(unpack_panel(packed)),
                unpacked: true,
            }
        } else {
            PanelWeights {
                bytes: std::borrow::Cow::Borrowed(packed),
                unpacked: false,
            }
        }
    }
}

/// Rows from which the 256-bit levels unpack their panels ([`Level::panel_weights`]).
const UNPACK_MIN_ROWS: usize = 64;

/// One panel's weights, packed or unpacked ([`Level::panel_weights`]).
struct PanelWeights<'a> {
    bytes: std::borrow::Cow<'a, [u8]>,
    unpacked: bool,
}

impl PanelWeights<'_> {
    /// Groups `g0..g1` of the panel (4 k each).
    fn groups(&self, g0: usize, g1: usize) -> &[u8] {
        let per = if self.unpacked {
            UNPACKED_GROUP_BYTES
        } else {
            GROUP_BYTES
        };
        &self.bytes[g0 * per..g1 * per]
    }
}

/// Bytes per group of [`unpack_panel`]'s layout.
const UNPACKED_GROUP_BYTES: usize = 2 * GROUP_BYTES;

/// A panel's groups with one weight per byte, laid out for 256-bit loads: per group,
/// for each half h of the 64 packed bytes (bytes `32h .. 32h + 32`), their low nibbles
/// then their high nibbles, 32 bytes each. Byte `b` of a half keeps its lane (`b / 4`) and
/// its k (`b % 4`), so a 32-byte vector is one operand of the packed layout's nibble
/// vectors: low nibbles are columns `8h + b / 4`, high nibbles `16 + 8h + b / 4`.
fn unpack_panel(packed: &[u8]) -> Vec<u8> {
    debug_assert_eq!(packed.len() % GROUP_BYTES, 0);
    let mut out = vec![0u8; packed.len() * 2];
    for (src, dst) in packed
        .chunks_exact(GROUP_BYTES / 2)
        .zip(out.chunks_exact_mut(GROUP_BYTES))
    {
        let (lo, hi) = dst.split_at_mut(GROUP_BYTES / 2);
        for ((&byte, l), h) in src.iter().zip(lo).zip(hi) {
            *l = byte & 0x0f;
            *h = byte >> 4;
        }
    }
    out
}

/// K rounded up to whole groups.
pub fn padded_k(k: usize) -> usize {
    k.div_ceil(KG) * KG
}

/// The packed weight tensor's shape: `[panels, groups, GROUP_BYTES]`.
pub fn packed_shape(k: usize, n: usize) -> [usize; 3] {
    [n.div_ceil(NR), k.div_ceil(KG), GROUP_BYTES]
}

/// A weight packed for [`gemm`].
#[derive(Clone, Debug, PartialEq)]
pub struct PackedWeights {
    /// `packed_shape(k, n)` bytes in the layout of the module docs.
    pub data: Vec<u8>,
    /// `Σ_k w[k, n]` per column, or with groups of `g` rows `Σ_{k in b} w[k, n]`, row-major
    /// `[ceil(k / g), n]`.
    pub col_sums: Vec<i32>,
}

/// The number of scale groups along K: `ceil(k / group)`, or 1 without groups (`group` 0).
pub fn scale_groups(k: usize, group: usize) -> usize {
    if group == 0 { 1 } else { k.div_ceil(group) }
}

/// Packs row-major `w` `[k, n]` (values in -8..=7) for scales per column (`group` 0) or
/// per group of `group` rows (a multiple of [`KG`]). Errors name the first value out of
/// range.
pub fn pack_weights(w: &[i8], k: usize, n: usize, group: usize) -> Result<PackedWeights, String> {
    if w.len() != k * n {
        return Err(format!("weight has {} values, not {k} x {n}", w.len()));
    }
    if !group.is_multiple_of(KG) {
        return Err(format!(
            "weight groups of {group} rows are not a multiple of {KG}"
        ));
    }
    if let Some(i) = w.iter().position(|v| !(-8..=7).contains(v)) {
        return Err(format!(
            "weight value {} at [{}, {}] is not a 4-bit signed code",
            w[i],
            i / n,
            i % n
        ));
    }
    let [panels, groups, _] = packed_shape(k, n);
    // 0x88: u = 8 (w = 0) in both nibbles, for the padding.
    let mut data = vec![0x88u8; panels * groups * GROUP_BYTES];
    // Byte `4·l + j` of panel p, group g: `u[k0 + j, c0 + l] | u[k0 + j, c0 + 16 + l] << 4`,
    // read from row k0 + j's 32 columns of the panel (padding rows and columns keep u = 8).
    let nib = |row: &[i8], c: usize| row.get(c).map_or(8, |&v| (v + 8) as u8);
    for (pg, block) in data.chunks_exact_mut(GROUP_BYTES).enumerate() {
        let (c0, k0) = (pg / groups * NR, pg % groups * KG);
        for j in 0..KG.min(k.saturating_sub(k0)) {
            let start = (k0 + j) * n + c0;
            let row = &w[start..start + (n - c0).min(NR)];
            for l in 0..16 {
                block[4 * l + j] = nib(row, l) | nib(row, 16 + l) << 4;
            }
        }
    }
    let mut col_sums = vec![0i32; scale_groups(k, group) * n];
    for (kk, row) in w.chunks_exact(n.max(1)).take(k).enumerate() {
        let b = kk.checked_div(group).unwrap_or(0);
        for (s, &v) in col_sums[b * n..].iter_mut().zip(row) {
            *s += i32::from(v);
        }
    }
    Ok(PackedWeights { data, col_sums })
}

/// Per-row terms of the product (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowTerms {
    /// The row's activation scale `s_r`.
    pub scale: f32,
    /// `-8 · Σ_k c`.
    pub rowcorr: i32,
    /// `off - z_r`.
    pub zcorr: i32,
}

/// Quantizes each `k`-element row of `x` with `p` into signed codes `c = q - off` (row
/// stride [`padded_k`]`(k)`, padding 0) and its [`RowTerms`]. The codes are the ones
/// [`crate::quant::fake_quantize_rows`] computes: same scale, zero point and rounding.
/// `codes` and `terms` may be longer than needed (rows past x's are left as they are).
pub fn quantize_rows(
    x: &[f32],
    k: usize,
    p: crate::quant::TokenQuant,
    codes: &mut [i8],
    terms: &mut [RowTerms],
) {
    let kp = padded_k(k);
    if k == 0 {
        return;
    }
    let (lo, hi) = p.code_range();
    let off = if !p.symmetric && hi > 127.0 {
        128.0
    } else {
        0.0
    };
    for ((row, out), t) in x
        .chunks_exact(k)
        .zip(codes.chunks_exact_mut(kp))
        .zip(terms.iter_mut())
    {
        let (s, zp) = p.params(row);
        let sum = quantize_row(row, &mut out[..k], s, zp, lo, hi, off);
        out[k..].fill(0);
        *t = RowTerms {
            scale: s,
            rowcorr: -8 * sum,
            zcorr: (off - zp) as i32,
        };
    }
}

/// `c` for one element: `clamp(round(x / s) + zp, lo, hi) - off`, an integer in
/// -128..=127 (FakeQuantize's arithmetic up to the subtraction, which is exact), read out
/// of the f32 through the 1.5·2²³ trick: `c + 1.5·2²³` is exact and holds `c` in its low
/// mantissa bits (no saturating float-to-int conversion in the loop).
#[inline(always)]
fn code(v: f32, s: f32, zp: f32, lo: f32, hi: f32, off: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    let q = ((v / s).round_ties_even() + zp).clamp(lo, hi) - off;
    ((q + MAGIC).to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32)
}

crate::kernels::vmath::multiversion! {
    /// `c = code(x)` per element; returns `Σ c`. (A plain zip: LLVM vectorizes it whole;
    /// hand-made lanes of 16 made it extract and store the bytes one by one.)
    fn quantize_row(row: &[f32], out: &mut [i8], s: f32, zp: f32, lo: f32, hi: f32, off: f32) -> i32 {
        let mut sum = 0i32;
        for (o, &v) in out.iter_mut().zip(row) {
            let c = code(v, s, zp, lo, hi, off);
            *o = c as i8;
            sum = sum.wrapping_add(c);
        }
        sum
    }
}

/// The operands of one product: `m` rows of codes (stride `padded_k(k)`) with their terms,
/// a packed `[k, n]` weight with its column sums and scales (`[n]`, or `[ceil(k / group), n]`
/// with groups).
pub struct Operands<'a> {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub codes: &'a [i8],
    pub terms: &'a [RowTerms],
    pub weights: &'a [u8],
    pub col_sums: &'a [i32],
    pub w_scale: &'a [f32],
    /// Rows of K per weight scale, a multiple of [`KG`]; 0 for one scale per column.
    pub group: usize,
}

impl Operands<'_> {
    fn check(&self) {
        assert!(self.group.is_multiple_of(KG), "igemm: group");
        let scales = scale_groups(self.k, self.group) * self.n;
        let [panels, groups, bytes] = packed_shape(self.k, self.n);
        assert!(
            self.codes.len() >= self.m * padded_k(self.k),
            "igemm: codes too short"
        );
        assert!(self.terms.len() >= self.m, "igemm: row terms too short");
        assert_eq!(
            self.weights.len(),
            panels * groups * bytes,
            "igemm: packed weight"
        );
        assert_eq!(self.col_sums.len(), scales, "igemm: column sums");
        assert_eq!(self.w_scale.len(), scales, "igemm: weight scales");
    }
}

/// `out[r, c]` (row-major `[m, n]`, every element written) = the product of the module
/// docs, computed at `level` with panels spread over the current rayon pool when
/// `parallel`. Panics (a caller's bug) on operand sizes that do not fit or a level the CPU
/// lacks.
pub fn gemm(ops: &Operands<'_>, out: &mut [MaybeUninit<f32>], level: Level, parallel: bool) {
    ops.check();
    assert_eq!(out.len(), ops.m * ops.n, "igemm: output size");
    assert!(level.available(), "igemm: this CPU does not run {level:?}");
    if ops.m == 0 || ops.n == 0 {
        return;
    }
    let panels = ops.n.div_ceil(NR);
    let out_ptr = SendPtr(out.as_mut_ptr().cast::<f32>());
    // The last rows when m is not a multiple of MR, padded with zero codes: the tiles
    // always read MR rows.
    let kp = padded_k(ops.k);
    let full = ops.m / MR * MR;
    let mut tail = vec![0i8; if full < ops.m { MR * kp } else { 0 }];
    tail[..(ops.m - full) * kp].copy_from_slice(&ops.codes[full * kp..ops.m * kp]);
    // With groups, every row's `-8·Σ_{k in b} c` per group b, row-major `[m, groups]`.
    let group_rowcorr: Vec<i32> = if ops.group == 0 {
        Vec::new()
    } else {
        ops.codes[..ops.m * kp]
            .chunks_exact(kp)
            .flat_map(|row| {
                row[..ops.k]
                    .chunks(ops.group)
                    .map(|b| -8 * b.iter().map(|&c| i32::from(c)).sum::<i32>())
            })
            .collect()
    };
    let run = |p: usize| {
        // Safety: panel p writes only columns p·NR .. min((p + 1)·NR, n) of every row,
        // disjoint from every other panel's.
        unsafe {
            if ops.group == 0 {
                panel(ops, &tail, p, out_ptr, level)
            } else {
                grouped_panel(ops, &tail, &group_rowcorr, p, out_ptr, level)
            }
        }
    };
    if parallel && panels > 1 {
        (0..panels).into_par_iter().for_each(run);
    } else {
        (0..panels).for_each(run);
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// One panel of columns for every row block.
///
/// # Safety
/// `ops` checked, `tail` the padded last row block (empty when `MR` divides m), `out`
/// points to `m · n` f32 that no other thread writes in this panel's columns, `level`
/// available.
unsafe fn panel(ops: &Operands<'_>, tail: &[i8], p: usize, out: SendPtr, level: Level) {
    let groups = ops.k.div_ceil(KG);
    let kp = groups * KG;
    let packed = &ops.weights[p * groups * GROUP_BYTES..(p + 1) * groups * GROUP_BYTES];
    let w = level.panel_weights(packed, ops.m);
    let c0 = p * NR;
    let cols = (ops.n - c0).min(NR);
    let mut col_sum = [0i32; NR];
    let mut col_scale = [0f32; NR];
    col_sum[..cols].copy_from_slice(&ops.col_sums[c0..c0 + cols]);
    col_scale[..cols].copy_from_slice(&ops.w_scale[c0..c0 + cols]);
    // Every tile overwrites it, so it is cleared once, not per row block.
    let mut acc = [[0i32; NR]; MR];
    for r0 in (0..ops.m).step_by(MR) {
        let a = if r0 + MR <= ops.m {
            &ops.codes[r0 * kp..(r0 + MR) * kp]
        } else {
            tail
        };
        unsafe { tile(level, a, kp, &w.bytes, w.unpacked, &mut acc) };
        for (i, acc_row) in acc.iter().enumerate().take((ops.m - r0).min(MR)) {
            let r = r0 + i;
            // Safety: row r < m, columns c0 .. c0 + cols < n.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(r * ops.n + c0), cols) };
            scale_row(acc_row, ops.terms[r], &col_sum, &col_scale, dst);
        }
    }
}

crate::kernels::vmath::multiversion! {
    /// One output row of a tile: `dst[j] = f32(acc[j] + rowcorr + zcorr·col_sum[j]) ·
    /// (scale · col_scale[j])`, the integer exact for terms `QuantizeTokens` made (wrapping,
    /// not a panic, for others). No reduction, so every width gives the same bits.
    fn scale_row(acc: &[i32; NR], t: RowTerms, col_sum: &[i32; NR], col_scale: &[f32; NR], dst: &mut [f32]) {
        for (((d, &a), &cs), &sc) in dst.iter_mut().zip(acc).zip(col_sum).zip(col_scale) {
            let int = a.wrapping_add(t.rowcorr).wrapping_add(t.zcorr.wrapping_mul(cs));
            *d = int as f32 * (t.scale * sc);
        }
    }
}

/// `acc[i][l] = Σ_k u[k, l] · c[i, k]` over the groups in `w` at `level` (overwrites acc).
///
/// # Safety
/// `level` available; `w` holds packed groups, or with `unpacked` (AVX2, AVX-VNNI) the
/// [`unpack_panel`] layout; `a` holds `MR` rows of stride `kp` covering `w`'s groups.
#[inline(always)]
unsafe fn tile(
    level: Level,
    a: &[i8],
    kp: usize,
    w: &[u8],
    unpacked: bool,
    acc: &mut [[i32; NR]; MR],
) {
    debug_assert!(!unpacked || matches!(level, Level::Avx2 | Level::AvxVnni));
    match level {
        Level::Scalar => {
            *acc = [[0; NR]; MR];
            tile_scalar(a, kp, w, acc)
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 if unpacked => unsafe { x86::tile_avx2::<true>(a, kp, w, acc) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { x86::tile_avx2::<false>(a, kp, w, acc) },
        #[cfg(target_arch = "x86_64")]
        Level::AvxVnni if unpacked => unsafe { x86::tile_avxvnni_unpacked(a, kp, w, acc) },
        #[cfg(target_arch = "x86_64")]
        Level::AvxVnni => unsafe { x86::tile_avxvnni(a, kp, w, acc) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Bw => unsafe { x86::tile_avx512bw(a, kp, w, acc) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni => unsafe { x86::tile_avx512vnni(a, kp, w, acc) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("checked available"),
    }
}

/// [`panel`] for weights with a scale per group of rows: the tile runs once per group and
/// the epilogue ([`add_group`]) accumulates `f32(I_b) · t[b, n]` in f32 per element.
///
/// # Safety
/// As [`panel`]; `rowcorr` holds `m · groups` values.
unsafe fn grouped_panel(
    ops: &Operands<'_>,
    tail: &[i8],
    rowcorr: &[i32],
    p: usize,
    out: SendPtr,
    level: Level,
) {
    let groups = ops.k.div_ceil(KG);
    let kp = groups * KG;
    let per = ops.group / KG;
    let nb = scale_groups(ops.k, ops.group);
    let w = &ops.weights[p * groups * GROUP_BYTES..(p + 1) * groups * GROUP_BYTES];
    let panel_w = level.panel_weights(w, ops.m);
    let c0 = p * NR;
    let cols = (ops.n - c0).min(NR);
    // This panel's column sums and scales per group, padding columns 0.
    let mut col_sum = vec![[0i32; NR]; nb];
    let mut col_scale = vec![[0f32; NR]; nb];
    for b in 0..nb {
        let at = b * ops.n + c0;
        col_sum[b][..cols].copy_from_slice(&ops.col_sums[at..at + cols]);
        col_scale[b][..cols].copy_from_slice(&ops.w_scale[at..at + cols]);
    }
    let mut rc = vec![[0i32; MR]; nb];
    for r0 in (0..ops.m).step_by(MR) {
        let a = if r0 + MR <= ops.m {
            &ops.codes[r0 * kp..(r0 + MR) * kp]
        } else {
            tail
        };
        let rows = (ops.m - r0).min(MR);
        let mut zcorr = [0i32; MR];
        for (i, z) in zcorr.iter_mut().enumerate().take(rows) {
            *z = ops.terms[r0 + i].zcorr;
        }
        // Per group, the rows' `-8·Σ_{k in b} c` (0 past the last row).
        for (b, rc) in rc.iter_mut().enumerate() {
            for (i, r) in rc.iter_mut().enumerate() {
                *r = if i < rows {
                    rowcorr[(r0 + i) * nb + b]
                } else {
                    0
                };
            }
        }
        let mut f = [[0f32; NR]; MR];
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512Vnni => unsafe {
                x86::grouped_avx512vnni(a, kp, w, per, &rc, &zcorr, &col_sum, &col_scale, &mut f)
            },
            #[cfg(target_arch = "x86_64")]
            Level::Avx512Bw => unsafe {
                x86::grouped_avx512bw(a, kp, w, per, &rc, &zcorr, &col_sum, &col_scale, &mut f)
            },
            _ => {
                let mut acc = [[0i32; NR]; MR];
                for (b, rc) in rc.iter().enumerate() {
                    let (g0, g1) = (b * per, ((b + 1) * per).min(groups));
                    let w = panel_w.groups(g0, g1);
                    let unpacked = panel_w.unpacked;
                    unsafe { tile(level, &a[g0 * KG..], kp, w, unpacked, &mut acc) };
                    add_group(&acc, rc, &zcorr, &col_sum[b], &col_scale[b], &mut f);
                }
            }
        }
        for (i, f_row) in f.iter().enumerate().take(rows) {
            let r = r0 + i;
            let s = ops.terms[r].scale;
            // Safety: row r < m, columns c0 .. c0 + cols < n.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(r * ops.n + c0), cols) };
            for (d, &v) in dst.iter_mut().zip(f_row) {
                *d = v * s;
            }
        }
    }
}

crate::kernels::vmath::multiversion! {
    /// `f[i][j] += f32(acc[i][j] + rc[i] + zc[i]·cs[j]) · ts[j]`: one group's epilogue, a
    /// fused multiply-add (one rounding) at every level.
    fn add_group(
        acc: &[[i32; NR]; MR],
        rc: &[i32; MR],
        zc: &[i32; MR],
        cs: &[i32; NR],
        ts: &[f32; NR],
        f: &mut [[f32; NR]; MR]
    ) {
        for i in 0..MR {
            for j in 0..NR {
                let int = acc[i][j]
                    .wrapping_add(rc[i])
                    .wrapping_add(zc[i].wrapping_mul(cs[j]));
                f[i][j] = (int as f32).mul_add(ts[j], f[i][j]);
            }
        }
    }
}

/// `acc[i][l] = Σ_k u[k, l] · c[i, k]` for one panel (`w`, all groups) and `MR` code rows
/// (`a`, stride `kp`): the reference every level matches.
fn tile_scalar(a: &[i8], kp: usize, w: &[u8], acc: &mut [[i32; NR]; MR]) {
    for (g, block) in w.chunks_exact(GROUP_BYTES).enumerate() {
        for (i, acc_row) in acc.iter_mut().enumerate() {
            let c = &a[i * kp + g * KG..i * kp + g * KG + KG];
            for l in 0..16 {
                for j in 0..KG {
                    let byte = block[4 * l + j];
                    let cv = i32::from(c[j]);
                    acc_row[l] += i32::from(byte & 0x0f) * cv;
                    acc_row[l + 16] += i32::from(byte >> 4) * cv;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{GROUP_BYTES, KG, MR, NR, UNPACKED_GROUP_BYTES};
    use std::arch::x86_64::*;

    /// Four code bytes of row `i`, group `g`, as one 32-bit lane value.
    #[inline(always)]
    unsafe fn lane(a: &[i8], kp: usize, i: usize, g: usize) -> i32 {
        debug_assert!(i * kp + g * KG + KG <= a.len());
        unsafe { std::ptr::read_unaligned(a.as_ptr().add(i * kp + g * KG).cast::<i32>()) }
    }

    /// One 64-byte weight group (4 k of 32 columns) times code group `g` of the `MR` rows,
    /// added into `lo` (columns 0..16, low nibbles) and `hi` (16..32, high nibbles).
    macro_rules! dot_group {
        ($block:expr, $a:expr, $kp:expr, $g:expr, $mask:expr, $dot:expr, $lo:expr, $hi:expr) => {{
            let v = unsafe { _mm512_loadu_si512($block.as_ptr().cast()) };
            let u0 = _mm512_and_si512(v, $mask);
            let u1 = _mm512_and_si512(_mm512_srli_epi16::<4>(v), $mask);
            for i in 0..MR {
                let c = _mm512_set1_epi32(unsafe { lane($a, $kp, i, $g) });
                $lo[i] = $dot($lo[i], u0, c);
                $hi[i] = $dot($hi[i], u1, c);
            }
        }};
    }

    /// AVX-512 tile: per group, one 64-byte load makes two 16-lane weight vectors (low
    /// and high nibbles: columns 0..16 and 16..32); each code row is broadcast and
    /// multiplied into two accumulators. `$dot(acc, u, c)` adds the 4-byte dot products.
    macro_rules! tile512 {
        ($name:ident, $features:literal, $dot:expr) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(a: &[i8], kp: usize, w: &[u8], acc: &mut [[i32; NR]; MR]) {
                let dot = $dot;
                let mask = _mm512_set1_epi8(0x0f);
                let mut lo = [_mm512_setzero_si512(); MR];
                let mut hi = [_mm512_setzero_si512(); MR];
                for (g, block) in w.chunks_exact(GROUP_BYTES).enumerate() {
                    dot_group!(block, a, kp, g, mask, dot, lo, hi);
                }
                for i in 0..MR {
                    unsafe {
                        _mm512_storeu_si512(acc[i].as_mut_ptr().cast(), lo[i]);
                        _mm512_storeu_si512(acc[i].as_mut_ptr().add(16).cast(), hi[i]);
                    }
                }
            }
        };
    }

    /// [`tile512`] for weights with a scale per group of `per` 4-k groups: each group's
    /// integer sums stay in registers (starting from the rows' corrections) and go through
    /// `super::add_group`'s arithmetic (convert, fused multiply-add: the same rounding)
    /// into `f`.
    macro_rules! grouped512 {
        ($name:ident, $features:literal, $dot:expr) => {
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $name(
                a: &[i8],
                kp: usize,
                w: &[u8],
                per: usize,
                rc: &[[i32; MR]],
                zc: &[i32; MR],
                cs: &[[i32; NR]],
                ts: &[[f32; NR]],
                f: &mut [[f32; NR]; MR],
            ) {
                let dot = $dot;
                let mask = _mm512_set1_epi8(0x0f);
                let with_zero_points = zc.iter().any(|&z| z != 0);
                for (b, blocks) in w.chunks(per * GROUP_BYTES).enumerate() {
                    let mut lo = [_mm512_setzero_si512(); MR];
                    for (l, &r) in lo.iter_mut().zip(&rc[b]) {
                        *l = _mm512_set1_epi32(r);
                    }
                    let mut hi = lo;
                    for (j, block) in blocks.chunks_exact(GROUP_BYTES).enumerate() {
                        dot_group!(block, a, kp, b * per + j, mask, dot, lo, hi);
                    }
                    let (t0, t1, s0, s1) = unsafe {
                        (
                            _mm512_loadu_ps(ts[b].as_ptr()),
                            _mm512_loadu_ps(ts[b].as_ptr().add(16)),
                            _mm512_loadu_si512(cs[b].as_ptr().cast()),
                            _mm512_loadu_si512(cs[b].as_ptr().add(16).cast()),
                        )
                    };
                    for i in 0..MR {
                        let (mut i0, mut i1) = (lo[i], hi[i]);
                        if with_zero_points {
                            let z = _mm512_set1_epi32(zc[i]);
                            i0 = _mm512_add_epi32(i0, _mm512_mullo_epi32(z, s0));
                            i1 = _mm512_add_epi32(i1, _mm512_mullo_epi32(z, s1));
                        }
                        unsafe {
                            let d = f[i].as_mut_ptr();
                            let v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), t0, _mm512_loadu_ps(d));
                            _mm512_storeu_ps(d, v);
                            let d = d.add(16);
                            let v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), t1, _mm512_loadu_ps(d));
                            _mm512_storeu_ps(d, v);
                        }
                    }
                }
            }
        };
    }

    tile512!(
        tile_avx512vnni,
        "avx512f,avx512bw,avx512vnni",
        |acc, u, c| { _mm512_dpbusd_epi32(acc, u, c) }
    );
    grouped512!(
        grouped_avx512vnni,
        "avx512f,avx512bw,avx512vnni",
        |acc, u, c| { _mm512_dpbusd_epi32(acc, u, c) }
    );
    // AVX-512BW: the grouped tile widens every group; the per-column tile is
    // `tile_avx512bw` below (i16 sums, as the AVX2 tile).
    grouped512!(grouped_avx512bw, "avx512f,avx512bw", |acc, u, c| {
        let pairs = _mm512_maddubs_epi16(u, c);
        _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)))
    });
    #[cfg(test)]
    tile512!(tile_avx512bw_widened, "avx512f,avx512bw", |acc, u, c| {
        let pairs = _mm512_maddubs_epi16(u, c);
        _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)))
    });

    /// Groups whose `vpmaddubsw` pair sums are added in i16 before one widening (see
    /// [`tile_avx2`] for why this is exact).
    const I16_GROUPS: usize = 8;

    /// AVX-512BW tile: [`tile512`]'s layout with [`tile_avx2`]'s i16 sums over
    /// [`I16_GROUPS`] groups.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn tile_avx512bw(a: &[i8], kp: usize, w: &[u8], acc: &mut [[i32; NR]; MR]) {
        let mask = _mm512_set1_epi8(0x0f);
        let ones = _mm512_set1_epi16(1);
        let mut lo = [_mm512_setzero_si512(); MR];
        let mut hi = [_mm512_setzero_si512(); MR];
        for (ci, chunk) in w.chunks(I16_GROUPS * GROUP_BYTES).enumerate() {
            let mut lo16 = [_mm512_setzero_si512(); MR];
            let mut hi16 = [_mm512_setzero_si512(); MR];
            for (gi, block) in chunk.chunks_exact(GROUP_BYTES).enumerate() {
                let g = ci * I16_GROUPS + gi;
                let v = unsafe { _mm512_loadu_si512(block.as_ptr().cast()) };
                let u0 = _mm512_and_si512(v, mask);
                let u1 = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
                for i in 0..MR {
                    let c = _mm512_set1_epi32(unsafe { lane(a, kp, i, g) });
                    lo16[i] = _mm512_add_epi16(lo16[i], _mm512_maddubs_epi16(u0, c));
                    hi16[i] = _mm512_add_epi16(hi16[i], _mm512_maddubs_epi16(u1, c));
                }
            }
            for i in 0..MR {
                lo[i] = _mm512_add_epi32(lo[i], _mm512_madd_epi16(lo16[i], ones));
                hi[i] = _mm512_add_epi32(hi[i], _mm512_madd_epi16(hi16[i], ones));
            }
        }
        for i in 0..MR {
            unsafe {
                _mm512_storeu_si512(acc[i].as_mut_ptr().cast(), lo[i]);
                _mm512_storeu_si512(acc[i].as_mut_ptr().add(16).cast(), hi[i]);
            }
        }
    }

    /// 256-bit tile, in two halves of the 64-byte group: bytes 0..32 hold columns 0..8
    /// (low nibbles) and 16..24 (high), bytes 32..64 columns 8..16 and 24..32; four rows
    /// at a time keep 8 accumulators, the two weight vectors and a broadcast code in the
    /// 16 registers. `$dot(acc, u, c)` adds the 4-byte dot products.
    macro_rules! tile256 {
        ($name:ident, $features:literal, $dot:expr) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(a: &[i8], kp: usize, w: &[u8], acc: &mut [[i32; NR]; MR]) {
                let dot = $dot;
                let mask = _mm256_set1_epi8(0x0f);
                const HALF: usize = MR / 2;
                for half in 0..2 {
                    for rows in [0..HALF, HALF..MR] {
                        let mut lo = [_mm256_setzero_si256(); HALF];
                        let mut hi = [_mm256_setzero_si256(); HALF];
                        for (g, block) in w.chunks_exact(GROUP_BYTES).enumerate() {
                            let v =
                                unsafe { _mm256_loadu_si256(block.as_ptr().add(32 * half).cast()) };
                            let u0 = _mm256_and_si256(v, mask);
                            let u1 = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
                            for (j, i) in rows.clone().enumerate() {
                                let c = _mm256_set1_epi32(unsafe { lane(a, kp, i, g) });
                                lo[j] = dot(lo[j], u0, c);
                                hi[j] = dot(hi[j], u1, c);
                            }
                        }
                        for (j, i) in rows.enumerate() {
                            unsafe {
                                let base = acc[i].as_mut_ptr().add(8 * half);
                                _mm256_storeu_si256(base.cast(), lo[j]);
                                _mm256_storeu_si256(base.add(16).cast(), hi[j]);
                            }
                        }
                    }
                }
            }
        };
    }

    tile256!(tile_avxvnni, "avx2,avxvnni", |acc, u, c| {
        _mm256_dpbusd_avx_epi32(acc, u, c)
    });

    /// 256-bit tile on [`super::unpack_panel`]'s layout for a one-instruction dot product.
    /// `vpdpbusd` has a latency of about five cycles and two issue ports, so ten
    /// accumulators are in flight at its rate; [`tile256`]'s eight (four rows, two vectors)
    /// leave it latency-bound. With the weights unpacked no mask or packed vector takes a
    /// register, so rows 0..6 run with twelve accumulators per column half, and rows 6..8
    /// with eight over both halves (four weight vectors).
    macro_rules! tile256_unpacked {
        ($name:ident, $features:literal, $dot:expr) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(a: &[i8], kp: usize, w: &[u8], acc: &mut [[i32; NR]; MR]) {
                let dot = $dot;
                const WIDE: usize = 6;
                for half in 0..2 {
                    let mut lo = [_mm256_setzero_si256(); WIDE];
                    let mut hi = [_mm256_setzero_si256(); WIDE];
                    for (g, block) in w.chunks_exact(UNPACKED_GROUP_BYTES).enumerate() {
                        let (u0, u1) = unsafe {
                            let at = block.as_ptr().add(64 * half);
                            (
                                _mm256_loadu_si256(at.cast()),
                                _mm256_loadu_si256(at.add(32).cast()),
                            )
                        };
                        for i in 0..WIDE {
                            let c = _mm256_set1_epi32(unsafe { lane(a, kp, i, g) });
                            lo[i] = dot(lo[i], u0, c);
                            hi[i] = dot(hi[i], u1, c);
                        }
                    }
                    for i in 0..WIDE {
                        unsafe {
                            let base = acc[i].as_mut_ptr().add(8 * half);
                            _mm256_storeu_si256(base.cast(), lo[i]);
                            _mm256_storeu_si256(base.add(16).cast(), hi[i]);
                        }
                    }
                }
                // Rows 6..8: [lo half 0, hi half 0, lo half 1, hi half 1] per row.
                let mut v = [[_mm256_setzero_si256(); 4]; MR - WIDE];
                for (g, block) in w.chunks_exact(UNPACKED_GROUP_BYTES).enumerate() {
                    let u: [__m256i; 4] = std::array::from_fn(|q| unsafe {
                        _mm256_loadu_si256(block.as_ptr().add(32 * q).cast())
                    });
                    for (j, row) in v.iter_mut().enumerate() {
                        let c = _mm256_set1_epi32(unsafe { lane(a, kp, WIDE + j, g) });
                        for q in 0..4 {
                            row[q] = dot(row[q], u[q], c);
                        }
                    }
                }
                for (j, row) in v.iter().enumerate() {
                    for (q, &r) in row.iter().enumerate() {
                        // Vector q holds columns 8·(q / 2) + 16·(q % 2) onwards.
                        unsafe {
                            let base = acc[WIDE + j].as_mut_ptr().add(8 * (q / 2) + 16 * (q % 2));
                            _mm256_storeu_si256(base.cast(), r);
                        }
                    }
                }
            }
        };
    }

    tile256_unpacked!(tile_avxvnni_unpacked, "avx2,avxvnni", |acc, u, c| {
        _mm256_dpbusd_avx_epi32(acc, u, c)
    });
    #[cfg(test)]
    tile256_unpacked!(
        tile_vnni256_evex_unpacked,
        "avx2,avx512vnni,avx512vl",
        |acc, u, c| { _mm256_dpbusd_epi32(acc, u, c) }
    );
    // The same 256-bit `vpdpbusd` in its EVEX encoding, for testing the tile above on
    // CPUs that have AVX-512 VNNI but not AVX-VNNI (AMD Zen 4, Xeons before Sapphire Rapids).
    #[cfg(test)]
    tile256!(
        tile_vnni256_evex,
        "avx2,avx512vnni,avx512vl",
        |acc, u, c| { _mm256_dpbusd_epi32(acc, u, c) }
    );
    #[cfg(test)]
    // The AVX2 dot as `tile256` spells it (widened to i32 every group), to check the
    // i16-accumulating tile below against.
    tile256!(tile_avx2_widened, "avx2", |acc, u, c| {
        let pairs = _mm256_maddubs_epi16(u, c);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    });

    /// AVX2 tile (the columns and row halves of [`tile256`]), on packed groups or, with
    /// `UNPACKED`, on [`super::unpack_panel`]'s layout (two loads per group and row half
    /// instead of a load and three operations). The i16 pair sums of `vpmaddubsw` are
    /// added in i16 over [`I16_GROUPS`] groups before one `vpmaddwd` by 1 widens them into
    /// the i32 accumulators: half the multiplies of widening every group (AVX2 has no
    /// 8-bit dot product; `vpmaddubsw` and `vpmaddwd` share the multiply ports). Exact, so
    /// the same integers as every other level: a pair sum is at most 2·15·128 = 3840 in
    /// magnitude (u <= 15, |c| <= 128), and 8 of them at most 30720 < 2^15, so neither the
    /// saturating pair sum nor the wrapping i16 add ever overflows.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn tile_avx2<const UNPACKED: bool>(
        a: &[i8],
        kp: usize,
        w: &[u8],
        acc: &mut [[i32; NR]; MR],
    ) {
        let mask = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let group_bytes = if UNPACKED {
            UNPACKED_GROUP_BYTES
        } else {
            GROUP_BYTES
        };
        const HALF: usize = MR / 2;
        for half in 0..2 {
            for rows in [0..HALF, HALF..MR] {
                let mut lo = [_mm256_setzero_si256(); HALF];
                let mut hi = [_mm256_setzero_si256(); HALF];
                for (ci, chunk) in w.chunks(I16_GROUPS * group_bytes).enumerate() {
                    let mut lo16 = [_mm256_setzero_si256(); HALF];
                    let mut hi16 = [_mm256_setzero_si256(); HALF];
                    for (gi, block) in chunk.chunks_exact(group_bytes).enumerate() {
                        let g = ci * I16_GROUPS + gi;
                        let (u0, u1) = unsafe {
                            if UNPACKED {
                                let at = block.as_ptr().add(64 * half);
                                (
                                    _mm256_loadu_si256(at.cast()),
                                    _mm256_loadu_si256(at.add(32).cast()),
                                )
                            } else {
                                let v = _mm256_loadu_si256(block.as_ptr().add(32 * half).cast());
                                (
                                    _mm256_and_si256(v, mask),
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask),
                                )
                            }
                        };
                        for (j, i) in rows.clone().enumerate() {
                            let c = _mm256_set1_epi32(unsafe { lane(a, kp, i, g) });
                            lo16[j] = _mm256_add_epi16(lo16[j], _mm256_maddubs_epi16(u0, c));
                            hi16[j] = _mm256_add_epi16(hi16[j], _mm256_maddubs_epi16(u1, c));
                        }
                    }
                    for j in 0..HALF {
                        lo[j] = _mm256_add_epi32(lo[j], _mm256_madd_epi16(lo16[j], ones));
                        hi[j] = _mm256_add_epi32(hi[j], _mm256_madd_epi16(hi16[j], ones));
                    }
                }
                for (j, i) in rows.enumerate() {
                    unsafe {
                        let base = acc[i].as_mut_ptr().add(8 * half);
                        _mm256_storeu_si256(base.cast(), lo[j]);
                        _mm256_storeu_si256(base.add(16).cast(), hi[j]);
                    }
                }
            }
        }
    }
}

/// Rows rotated at a time before quantization (see [`quantize_tokens`]).
const ROTATE_ROWS: usize = 16;

/// Values per row of the terms tensor: scale, rowcorr, zcorr (the integers exact in f32:
/// |rowcorr| <= 8·128·K < 2²⁴ for K < 16384, checked).
pub const TERMS: usize = 3;

/// `ai.perqc::QuantizeTokens(x, H?)` (attributes `bits`, `symmetric`, `clip`, as
/// FakeQuantize): the codes of every row of x's last axis, i8 `[.., padded_k(K)]`, and the
/// row terms, f32 `[.., 3]` (scale, rowcorr, zcorr; see the module docs). One per quantized
/// activation, read by every `QuantizedLinear` of that activation.
///
/// With `H` (`[b, b]`, a scaled Sylvester matrix: PeRQ's online block rotation) the rows are
/// first rotated as `ai.perqc::Hadamard(x, H)` computes it (the same fast Walsh-Hadamard
/// transform, so the same bits), a few rows at a time in a buffer that stays in cache,
/// instead of in a pass of its own over the activation.
pub fn quantize_tokens(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req_f32(inputs, 0)?;
    let p = super::misc::token_quant(ctx.node).map_err(KernelError::Invalid)?;
    let rotation = match opt(inputs, 1) {
        None => None,
        Some(h) => {
            let h = h
                .as_f32()
                .ok_or_else(|| KernelError::Invalid("QuantizeTokens: H must be f32".into()))?;
            let b = h.shape().first().copied().unwrap_or(0);
            let hs = standard(h);
            let scale = (h.shape() == [b, b])
                .then(|| super::hadamard::sylvester_scale(hs.as_slice().expect("standard"), b))
                .flatten();
            match scale {
                Some(c) if x.shape().last().is_some_and(|&k| k % b == 0) => Some((b, c)),
                _ => {
                    return Err(KernelError::Invalid(format!(
                        "QuantizeTokens: H {:?} must be a scaled natural-order Sylvester \
                         matrix whose order divides the last dim of x {:?}",
                        h.shape(),
                        x.shape()
                    )));
                }
            }
        }
    };
    let Some(&k) = x.shape().last() else {
        return Err(KernelError::Invalid(
            "QuantizeTokens: x must have rank >= 1".into(),
        ));
    };
    if k >= 16384 {
        return Err(KernelError::Invalid(format!(
            "QuantizeTokens: rows of {k} channels; the integer kernels take fewer than 16384"
        )));
    }
    let m: usize = x.shape()[..x.ndim() - 1].iter().product();
    let kp = padded_k(k);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = kp;
    let x = standard(x);
    let x = x.as_slice().expect("standard layout");
    let mut codes = vec![0i8; m * kp];
    let mut terms = vec![RowTerms::default(); m];
    let level = super::hadamard::Level::detect();
    // Rows at a time: a piece of the work, and the rotation buffer (16 rows of 1536 f32:
    // 96 KiB).
    let rows_per = ROTATE_ROWS.min(m.max(1));
    let quantize = |x: &[f32], c: &mut [i8], t: &mut [RowTerms]| match rotation {
        None => quantize_rows(x, k, p, c, t),
        Some((b, scale)) => {
            let mut buf = vec![0f32; rows_per * k];
            for ((x, c), t) in x
                .chunks(rows_per * k)
                .zip(c.chunks_mut(rows_per * kp))
                .zip(t.chunks_mut(rows_per))
            {
                let buf = &mut buf[..x.len()];
                buf.copy_from_slice(x);
                super::hadamard::fwht_in_place(buf, b, scale, level);
                quantize_rows(buf, k, p, c, t);
            }
        }
    };
    if ctx.threads > 1 && m * k >= PAR_MIN_ELEMS && k > 0 {
        let per = (PAR_MIN_ELEMS / 4).div_ceil(k).max(1);
        x.par_chunks(per * k)
            .zip(codes.par_chunks_mut(per * kp))
            .zip(terms.par_chunks_mut(per))
            .for_each(|((x, c), t)| quantize(x, c, t));
    } else {
        quantize(x, &mut codes, &mut terms);
    }
    let flat: Vec<f32> = terms
        .iter()
        .flat_map(|t| [t.scale, t.rowcorr as f32, t.zcorr as f32])
        .collect();
    let codes = RtTensor::I8(ArrayD::from_shape_vec(IxDyn(&shape), codes)?.into_shared());
    *shape.last_mut().expect("rank >= 1") = TERMS;
    Ok(vec![
        codes,
        RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&shape), flat)?),
    ])
}

/// `ai.perqc::QuantizedLinear(codes, terms, w_packed, w_scale, w_sum)`: the codes and terms
/// of `QuantizeTokens` times the packed 4-bit weight, in integers, scaled once per element
/// (the module docs); f32 `[.., N]`. Attribute `group` (default 0): the rows of K per
/// weight scale, with `w_scale` and `w_sum` then `[ceil(K / group), N]`.
pub fn quantized_linear(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let (RtTensor::I8(codes), Some(terms), RtTensor::U8(w), Some(w_scale), RtTensor::I32(w_sum)) = (
        req(inputs, 0)?,
        req(inputs, 1)?.as_f32(),
        req(inputs, 2)?,
        req(inputs, 3)?.as_f32(),
        req(inputs, 4)?,
    ) else {
        return Err(KernelError::Invalid(
            "QuantizedLinear takes i8 codes, f32 row terms, u8 packed weights, f32 scales \
             and i32 column sums"
                .into(),
        ));
    };
    let group = ctx.int("group", 0);
    let (Some(&kp), Some(&n)) = (codes.shape().last(), w_scale.shape().last()) else {
        return Err(KernelError::Invalid(
            "QuantizedLinear: codes and scales must have rank >= 1".into(),
        ));
    };
    let group = match usize::try_from(group) {
        Ok(g) if g.is_multiple_of(KG) => g,
        _ => {
            return Err(KernelError::Invalid(format!(
                "QuantizedLinear: group {group} is not a non-negative multiple of {KG}"
            )));
        }
    };
    let scale_shape = if group == 0 {
        vec![n]
    } else {
        vec![scale_groups(kp, group), n]
    };
    let m: usize = codes.shape()[..codes.ndim() - 1].iter().product();
    let terms_shape: Vec<usize> = codes.shape()[..codes.ndim() - 1]
        .iter()
        .copied()
        .chain([TERMS])
        .collect();
    if !kp.is_multiple_of(KG)
        || w.shape() != packed_shape(kp, n)
        || w_sum.shape() != scale_shape
        || w_scale.shape() != scale_shape
        || terms.shape() != terms_shape
    {
        return Err(KernelError::Invalid(format!(
            "QuantizedLinear: codes {:?}, terms {:?}, packed weight {:?}, scales {:?} and \
             sums {:?} do not fit (for {kp} x {n}, group {group}: packed {:?}, scales \
             {scale_shape:?})",
            codes.shape(),
            terms.shape(),
            w.shape(),
            w_scale.shape(),
            w_sum.shape(),
            packed_shape(kp, n)
        )));
    }
    let codes = standard(codes);
    let terms = standard(terms);
    let terms: Vec<RowTerms> = terms
        .as_slice()
        .expect("standard layout")
        .chunks_exact(TERMS)
        .map(|t| RowTerms {
            scale: t[0],
            rowcorr: t[1] as i32,
            zcorr: t[2] as i32,
        })
        .collect();
    let mut shape = codes.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = n;
    let mut out = output_vec::<f32>(m * n);
    let (w, w_sum, w_scale) = (standard(w), standard(w_sum), standard(w_scale));
    let ops = Operands {
        m,
        k: kp,
        n,
        codes: codes.as_slice().expect("standard layout"),
        terms: &terms,
        weights: w.as_slice().expect("standard layout"),
        col_sums: w_sum.as_slice().expect("standard layout"),
        w_scale: w_scale.as_slice().expect("standard layout"),
        group,
    };
    gemm(
        &ops,
        &mut out.spare_capacity_mut()[..m * n],
        Level::detect(),
        ctx.threads > 1,
    );
    // Safety: `gemm` wrote all m · n elements.
    unsafe { out.set_len(m * n) };
    Ok(vec![RtTensor::f32(ArrayD::from_shape_vec(
        IxDyn(&shape),
        out,
    )?)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::TokenQuant;

    fn lcg(state: &mut u64) -> u32 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*state >> 33) as u32
    }

    /// The product in i64 from unpacked operands, scaled as the kernel scales.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        w: &[i8],
        w_scale: &[f32],
        m: usize,
        k: usize,
        n: usize,
        p: TokenQuant,
        group: usize,
    ) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            let row = &x[r * k..(r + 1) * k];
            let (s, zp) = p.params(row);
            let (lo, hi) = p.code_range();
            let q: Vec<i64> = row
                .iter()
                .map(|&v| ((v / s).round_ties_even() + zp).clamp(lo, hi) as i64)
                .collect();
            let int = |c: usize, ks: std::ops::Range<usize>| -> i64 {
                ks.map(|kk| (q[kk] - zp as i64) * w[kk * n + c] as i64)
                    .sum()
            };
            for c in 0..n {
                out[r * n + c] = if group == 0 {
                    int(c, 0..k) as i32 as f32 * (s * w_scale[c])
                } else {
                    let mut f = 0f32;
                    for b in 0..k.div_ceil(group) {
                        let ks = b * group..((b + 1) * group).min(k);
                        f = (int(c, ks) as i32 as f32).mul_add(w_scale[b * n + c], f);
                    }
                    f * s
                };
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        x: &[f32],
        packed: &PackedWeights,
        w_scale: &[f32],
        m: usize,
        k: usize,
        n: usize,
        p: TokenQuant,
        group: usize,
        level: Level,
        parallel: bool,
    ) -> Vec<f32> {
        let mut codes = vec![0i8; m * padded_k(k)];
        let mut terms = vec![RowTerms::default(); m];
        quantize_rows(x, k, p, &mut codes, &mut terms);
        let ops = Operands {
            m,
            k,
            n,
            codes: &codes,
            terms: &terms,
            weights: &packed.data,
            col_sums: &packed.col_sums,
            w_scale,
            group,
        };
        let mut out = vec![MaybeUninit::new(f32::NAN); m * n];
        gemm(&ops, &mut out, level, parallel);
        out.into_iter()
            .map(|v| unsafe { v.assume_init() })
            .collect()
    }

    /// The signed weight code `w[kk, c]` of a packed weight (the inverse of [`pack_weights`]).
    fn unpacked_weight(data: &[u8], k: usize, kk: usize, c: usize) -> i8 {
        let groups = k.div_ceil(KG);
        let (p, l) = (c / NR, c % NR);
        let byte = data[(p * groups + kk / KG) * GROUP_BYTES + 4 * (l % 16) + kk % KG];
        let u = if l < 16 { byte & 0x0f } else { byte >> 4 };
        u as i8 - 8
    }

    #[test]
    fn packing_round_trips() {
        let (k, n) = (13, 45);
        let mut st = 7;
        let w: Vec<i8> = (0..k * n).map(|_| (lcg(&mut st) % 16) as i8 - 8).collect();
        let packed = pack_weights(&w, k, n, 0).unwrap();
        for kk in 0..k {
            for c in 0..n {
                assert_eq!(unpacked_weight(&packed.data, k, kk, c), w[kk * n + c]);
            }
        }
        assert!(pack_weights(&[9], 1, 1, 0).unwrap_err().contains("[0, 0]"));
        assert!(pack_weights(&w, k, n, 6).is_err(), "groups of 6 rows");
        let grouped = pack_weights(&w, k, n, 8).unwrap();
        assert_eq!(grouped.data, packed.data);
        for c in 0..n {
            let sum = |ks: std::ops::Range<usize>| ks.map(|kk| w[kk * n + c] as i32).sum::<i32>();
            assert_eq!(grouped.col_sums[c], sum(0..8));
            assert_eq!(grouped.col_sums[n + c], sum(8..k));
        }
    }

    /// The 256-bit `vpdpbusd` tiles, on packed and on unpacked panels, equal the AVX2
    /// tile, checked through the instruction's EVEX twin where the CPU lacks AVX-VNNI
    /// itself, and in its VEX form where it has it (`every_level_matches_the_reference`
    /// covers the VEX tiles inside the product too).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vnni256_tile_equals_avx2_tile() {
        let evex = std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl");
        if !Level::Avx2.available() || !evex {
            return;
        }
        let mut st = 7;
        for groups in [1, 3, 16] {
            let kp = groups * KG;
            let a: Vec<i8> = (0..MR * kp).map(|_| lcg(&mut st) as i8).collect();
            let w: Vec<u8> = (0..groups * GROUP_BYTES)
                .map(|_| lcg(&mut st) as u8)
                .collect();
            let unpacked = unpack_panel(&w);
            let (mut want, mut got) = ([[0; NR]; MR], [[0; NR]; MR]);
            unsafe {
                x86::tile_avx2::<false>(&a, kp, &w, &mut want);
                x86::tile_vnni256_evex(&a, kp, &w, &mut got);
            }
            assert_eq!(got, want, "{groups} groups");
            assert!(want.iter().flatten().any(|&v| v != 0));
            let mut got = [[0; NR]; MR];
            unsafe { x86::tile_vnni256_evex_unpacked(&a, kp, &unpacked, &mut got) };
            assert_eq!(got, want, "unpacked, {groups} groups");
            if Level::AvxVnni.available() {
                let mut got = [[0; NR]; MR];
                unsafe { x86::tile_avxvnni_unpacked(&a, kp, &unpacked, &mut got) };
                assert_eq!(got, want, "AVX-VNNI unpacked, {groups} groups");
            }
        }
    }

    /// The AVX2 and AVX-512BW tiles' i16 partial sums do not overflow at the extremes (every code -128
    /// or 127 against u = 15) and equal the every-group widening on random operands, for
    /// group counts around the i16 chunk.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn i16_sums_are_exact() {
        if !Level::Avx2.available() {
            return;
        }
        let mut st = 11;
        for groups in [1, 7, 8, 9, 16, 17, 144] {
            let kp = groups * KG;
            let random: Vec<i8> = (0..MR * kp).map(|_| lcg(&mut st) as i8).collect();
            let w_random: Vec<u8> = (0..groups * GROUP_BYTES)
                .map(|_| lcg(&mut st) as u8)
                .collect();
            let w_max = vec![0xffu8; groups * GROUP_BYTES];
            for (a, w) in [
                (vec![-128i8; MR * kp], &w_max),
                (vec![127i8; MR * kp], &w_max),
                (random, &w_random),
            ] {
                let (mut want, mut got) = ([[0; NR]; MR], [[0; NR]; MR]);
                unsafe {
                    x86::tile_avx2_widened(&a, kp, w, &mut want);
                    x86::tile_avx2::<false>(&a, kp, w, &mut got);
                }
                assert_eq!(got, want, "{groups} groups");
                let mut unpacked = [[0; NR]; MR];
                unsafe { x86::tile_avx2::<true>(&a, kp, &unpack_panel(w), &mut unpacked) };
                assert_eq!(unpacked, want, "unpacked, {groups} groups");
                if Level::Avx512Bw.available() {
                    let (mut want, mut got) = ([[0; NR]; MR], [[0; NR]; MR]);
                    unsafe {
                        x86::tile_avx512bw_widened(&a, kp, w, &mut want);
                        x86::tile_avx512bw(&a, kp, w, &mut got);
                    }
                    assert_eq!(got, want, "AVX-512BW, {groups} groups");
                }
            }
            let mut got = [[0; NR]; MR];
            unsafe { x86::tile_avx2::<false>(&vec![-128i8; MR * kp], kp, &w_max, &mut got) };
            assert_eq!(got[0][0], -128 * 15 * kp as i32, "{groups} groups");
        }
    }

    /// Every level the CPU runs gives the reference's bits on odd shapes, every quantizer
    /// kind, per-column and grouped scales (groups that divide K and that do not), serial
    /// and parallel.
    #[test]
    fn every_level_matches_the_reference() {
        let shapes = [
            (1, 4, 1),
            (3, 5, 7),
            (9, 13, 33),
            (17, 64, 32),
            (8, 96, 70),
            (33, 200, 65),
            // At least UNPACK_MIN_ROWS: AVX2 and AVX-VNNI read unpacked panels (fewer rows:
            // packed).
            (65, 72, 40),
        ];
        assert!(shapes.iter().any(|s| s.0 >= UNPACK_MIN_ROWS));
        let quantizers = [
            TokenQuant {
                bits: 4,
                symmetric: false,
                clip: 1.0,
            },
            TokenQuant {
                bits: 4,
                symmetric: true,
                clip: 0.9,
            },
            TokenQuant {
                bits: 8,
                symmetric: false,
                clip: 1.0,
            },
            TokenQuant {
                bits: 8,
                symmetric: true,
                clip: 1.0,
            },
            TokenQuant {
                bits: 3,
                symmetric: false,
                clip: 0.85,
            },
        ];
        let mut st = 1;
        for &(m, k, n) in &shapes {
            let x: Vec<f32> = (0..m * k)
                .map(|_| (lcg(&mut st) % 2001) as f32 / 100.0 - 9.0)
                .collect();
            let w: Vec<i8> = (0..k * n).map(|_| (lcg(&mut st) % 16) as i8 - 8).collect();
            for group in [0, 4, 12, 32] {
                let w_scale: Vec<f32> = (0..scale_groups(k, group) * n)
                    .map(|_| (lcg(&mut st) % 100 + 1) as f32 / 700.0)
                    .collect();
                let packed = pack_weights(&w, k, n, group).unwrap();
                for &p in &quantizers {
                    let want = reference(&x, &w, &w_scale, m, k, n, p, group);
                    for level in Level::ALL.into_iter().filter(|l| l.available()) {
                        for parallel in [false, true] {
                            let got =
                                run(&x, &packed, &w_scale, m, k, n, p, group, level, parallel);
                            assert_eq!(
                                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                                "{m}x{k}x{n} group {group} {p:?} {level:?} parallel {parallel}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// `QuantizeTokens(x, H)` gives the bits of `QuantizeTokens(Hadamard(x, H))`, serial and
    /// parallel, and rejects an H that is not a scaled Sylvester matrix.
    #[test]
    fn rotation_inside_equals_hadamard_first() {
        use perqc_ir::{AttrValue, Graph, NodeSpec};
        // 701 rows of 96: past the parallel threshold with 2 threads.
        let (m, k, b) = (701usize, 96usize, 32usize);
        let mut st = 11;
        let x: Vec<f32> = (0..m * k)
            .map(|_| (lcg(&mut st) % 4001) as f32 / 97.0 - 20.0)
            .collect();
        let h = crate::kernels::hadamard::tests::sylvester(b, 1.0 / (b as f32).sqrt());
        let tx = RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[1, m, k]), x).unwrap());
        let th = RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[b, b]), h.clone()).unwrap());
        let mut g = Graph::new("t");
        let q = g
            .add_node(
                NodeSpec::new("QuantizeTokens").attr("bits", AttrValue::Int(4)),
                &[],
                &["c", "t"],
            )
            .unwrap();
        let had = g.add_node(NodeSpec::new("Hadamard"), &[], &["y"]).unwrap();
        for threads in [1, 2] {
            let ctx = |id| KernelCtx {
                node: g.node(id),
                opset: 1,
                threads,
                subgraphs: None,
            };
            let rotated =
                crate::kernels::hadamard::hadamard(&ctx(had), &[Some(&tx), Some(&th)]).unwrap();
            let want = quantize_tokens(&ctx(q), &[Some(&rotated[0])]).unwrap();
            let got = quantize_tokens(&ctx(q), &[Some(&tx), Some(&th)]).unwrap();
            assert_eq!(got, want, "threads {threads}");
            let mut bad = h.clone();
            bad[5] = -bad[5];
            let tb = RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[b, b]), bad).unwrap());
            assert!(quantize_tokens(&ctx(q), &[Some(&tx), Some(&tb)]).is_err());
        }
    }

    /// Operands that do not fit are errors naming the shapes, not panics.
    #[test]
    fn mismatched_operands_are_errors() {
        use perqc_ir::{Graph, NodeSpec};
        let mut g = Graph::new("t");
        let id = g
            .add_node(NodeSpec::new("QuantizedLinear"), &[], &["y"])
            .unwrap();
        let ctx = KernelCtx {
            node: g.node(id),
            opset: 1,
            threads: 1,
            subgraphs: None,
        };
        let t = |shape: &[usize]| RtTensor::f32(ArrayD::zeros(IxDyn(shape)));
        let codes = RtTensor::I8(ArrayD::zeros(IxDyn(&[2, 8])).into_shared());
        let sums = RtTensor::I32(ArrayD::zeros(IxDyn(&[40])).into_shared());
        // 8 codes per row are 2 groups; a weight packed for 3 groups does not fit.
        let w = RtTensor::U8(ArrayD::zeros(IxDyn(&[2, 3, GROUP_BYTES])).into_shared());
        let e = quantized_linear(
            &ctx,
            &[
                Some(&codes),
                Some(&t(&[2, 3])),
                Some(&w),
                Some(&t(&[40])),
                Some(&sums),
            ],
        );
        assert!(e.unwrap_err().to_string().contains("do not fit"));
        let w = RtTensor::U8(ArrayD::zeros(IxDyn(&[2, 2, GROUP_BYTES])).into_shared());
        let e = quantized_linear(
            &ctx,
            &[
                Some(&codes),
                Some(&t(&[2, 2])),
                Some(&w),
                Some(&t(&[40])),
                Some(&sums),
            ],
        );
        assert!(e.is_err(), "terms must be [.., 3]");
        let y = quantized_linear(
            &ctx,
            &[
                Some(&codes),
                Some(&t(&[2, 3])),
                Some(&w),
                Some(&t(&[40])),
                Some(&sums),
            ],
        )
        .unwrap();
        assert_eq!(y[0].shape(), [2, 40]);
        let e = quantized_linear(
            &ctx,
            &[
                Some(&t(&[2, 8])),
                Some(&t(&[2, 3])),
                Some(&w),
                Some(&t(&[40])),
                Some(&sums),
            ],
        );
        assert!(e.is_err(), "codes must be i8");
    }

    /// The codes are FakeQuantize's: dequantized they give its output bit for bit.
    #[test]
    fn codes_are_fake_quantize_codes() {
        let k = 37;
        let mut st = 3;
        let x: Vec<f32> = (0..5 * k)
            .map(|_| (lcg(&mut st) % 3001) as f32 / 77.0 - 20.0)
            .collect();
        for p in [
            TokenQuant {
                bits: 4,
                symmetric: false,
                clip: 0.9,
            },
            TokenQuant {
                bits: 8,
                symmetric: false,
                clip: 1.0,
            },
            TokenQuant {
                bits: 6,
                symmetric: true,
                clip: 1.0,
            },
        ] {
            let mut fq = x.clone();
            crate::quant::fake_quantize_rows_serial(&mut fq, k, p);
            let kp = padded_k(k);
            let mut codes = vec![0i8; 8 * kp];
            let mut terms = vec![RowTerms::default(); 8];
            quantize_rows(&x, k, p, &mut codes, &mut terms);
            let (_, hi) = p.code_range();
            let off = if !p.symmetric && hi > 127.0 { 128 } else { 0 };
            for r in 0..5 {
                let t = terms[r];
                let zp = off - t.zcorr;
                let sum: i32 = codes[r * kp..r * kp + k].iter().map(|&c| c as i32).sum();
                assert_eq!(t.rowcorr, -8 * sum);
                for j in 0..k {
                    let q = codes[r * kp + j] as i32 + off;
                    // Equal as numbers (FakeQuantize writes -0 where a code is the zero point).
                    assert_eq!(
                        (q - zp) as f32 * t.scale,
                        fq[r * k + j],
                        "{p:?} row {r} col {j}"
                    );
                }
            }
        }
    }
}
