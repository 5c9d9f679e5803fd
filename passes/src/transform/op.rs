//! Channel maps `T` and their action on one axis of a weight.
//!
//! Convention (column vectors): a region's activation `x` becomes `x̃ = T x`. A source
//! weight writes the channels on an axis (`y = W x_in`, `W`'s output axis): `W̃ = T W`. A
//! sink weight reads them (`z = V x`, `V`'s input axis): `Ṽ = V T⁻¹`, which along that
//! axis is the action of `T⁻ᵀ`. So every fold is one primitive, [`ChannelOp::apply`]:
//! `t̃[.., i, ..] = Σ_j M[i, j] t[.., j, ..]` along an axis, with `M = T` on the writing
//! side and `M = T⁻ᵀ` on the reading side.
//!
//! Cost of [`ChannelOp::apply`] and [`ChannelOp::apply_owned`]: a payload is transformed in
//! place, the one nothing else holds where it lies (no allocation), any other (a slice of
//! the memory-mapped model file) in one copy of it; no f32 or f64 copy of the whole tensor
//! is made. Block maps work on panels of 64 vectors at a time (a vector: the `n`
//! values along the axis for one position of the other axes), read whole into f64,
//! transformed, and rounded once to the weight's type, so the result is the exact product
//! rounded once, up to f64 round-off (~1e-16 relative). Panels run in parallel on rayon's
//! global pool, in code compiled for AVX-512 or AVX2 when the CPU has them. A Hadamard
//! ([`ChannelOp::Hadamard`]) goes through its Kronecker factorization: `b (log2 s + m)`
//! additions per block of order `b = m · s` instead of `b²` multiply-adds.
//! `cargo run --release -p perqc-passes --example bench_apply` times it on SmolLM2's shapes.

use perqc_ir::{DType, Tensor, TensorData};
use rayon::prelude::*;

/// Vectors per panel: a panel of `b` channels is `b x PANEL` f64 (a 576-channel block:
/// 288 KiB, twice with its scratch, in L2).
const PANEL: usize = 64;

/// A linear map on `n` channels.
#[derive(Clone, Debug, PartialEq)]
pub enum ChannelOp {
    /// `(T x)[p] = x[perm[p]]`: new position `p` holds old channel `perm[p]`.
    Permutation(Vec<usize>),
    /// `T = diag(d)`.
    Diagonal(Vec<f64>),
    /// `T = diag(B_0, .., B_{k-1})`: `k` square blocks of `size` channels (row-major
    /// `size × size` each), any matrices.
    Blocks { size: usize, blocks: Vec<Vec<f64>> },
    /// `T = diag(Q, .., Q)`: copies of one normalized Hadamard block, orthogonal by
    /// construction and applied through its Kronecker factorization (see
    /// [`HadamardBlocks`]). Made by [`ChannelOp::hadamard`].
    Hadamard(HadamardBlocks),
}

/// `count` copies of the normalized (randomized) Hadamard block of order `b = m · s`
///
/// ```text
/// Q = (H_m ⊗ S_s) · diag(signs) / √b,   Q[i1·s + i2, j1·s + j2] = H_m[i1, j1] · S_s[i2, j2] · signs[j1·s + j2] / √b
/// ```
///
/// with `H_m` a ±1 Hadamard matrix (the *core*, `H_m H_mᵀ = m I`) and `S_s` the natural-order
/// Sylvester matrix of the power of two `s` (`S_s[i, j] = (-1)^popcount(i & j)`,
/// `S_s S_sᵀ = s I`). Then `Q Qᵀ = (H_m H_mᵀ ⊗ S_s S_sᵀ) / b = I`: orthogonal in exact
/// arithmetic, so `T⁻ᵀ = T` and no numerical check is needed.
///
/// Applied to a vector: the signs, a fast Walsh-Hadamard transform inside each of the `m`
/// groups of `s` channels (`log2 s` butterfly stages), the core across the groups (`m`
/// signed additions per channel, or `Σ o_k` if the core is a Kronecker product of orders
/// `o_k`), then `1/√b`. For 576 = 36 · 16 that is 40 additions per channel instead of 576
/// multiply-adds; for the core 144 = 12 ⊗ 12 times 4, 26.
#[derive(Clone, Debug, PartialEq)]
pub struct HadamardBlocks {
    /// The core's order `m` and its `m x m` entries (±1, row-major).
    m: usize,
    core: Vec<i8>,
    /// The core's Kronecker factors (`perqc_ops::hadamard::Hadamard::core_factors`; none
    /// when `m = 1`), applied one after the other.
    factors: Vec<(usize, Vec<i8>)>,
    /// The Sylvester factor `s`, a power of two.
    s: usize,
    /// `diag(signs)` (±1, `b` entries), if randomized.
    signs: Option<Vec<f64>>,
    /// Copies along the channels.
    count: usize,
}

impl HadamardBlocks {
    /// The block order `b = m · s`.
    pub fn order(&self) -> usize {
        self.m * self.s
    }

    /// How many copies of the block `T` holds.
    pub fn count(&self) -> usize {
        self.count
    }

    /// `Q` row-major (`b x b`), each entry `±1 · (1/√b)` computed in f64 as
    /// `perqc_ops::hadamard::Hadamard::normalized_f64` does, times its column's sign.
    pub fn dense_block(&self) -> Vec<f64> {
        let b = self.order();
        let scale = 1.0 / (b as f64).sqrt();
        let mut q = Vec::with_capacity(b * b);
        for i in 0..b {
            for j in 0..b {
                let e = self.core[(i / self.s) * self.m + j / self.s]
                    * sylvester(i % self.s, j % self.s);
                let sign = self.signs.as_ref().map_or(1.0, |s| s[j]);
                q.push(f64::from(e) * scale * sign);
            }
        }
        q
    }
}

/// `S_s[i, j] = (-1)^popcount(i & j)`.
fn sylvester(i: usize, j: usize) -> i8 {
    if (i & j).count_ones().is_multiple_of(2) {
        1
    } else {
        -1
    }
}

impl ChannelOp {
    pub fn dim(&self) -> usize {
        match self {
            ChannelOp::Permutation(p) => p.len(),
            ChannelOp::Diagonal(d) => d.len(),
            ChannelOp::Blocks { size, blocks } => size * blocks.len(),
            ChannelOp::Hadamard(h) => h.order() * h.count,
        }
    }

    /// `T = I`: applying it changes nothing.
    pub fn is_identity(&self) -> bool {
        match self {
            ChannelOp::Permutation(p) => p.iter().enumerate().all(|(i, &j)| i == j),
            ChannelOp::Diagonal(d) => d.iter().all(|&x| x == 1.0),
            ChannelOp::Blocks { size, blocks } => blocks.iter().all(|b| {
                b.iter()
                    .enumerate()
                    .all(|(k, &x)| x == if k / size == k % size { 1.0 } else { 0.0 })
            }),
            // The Hadamard matrix of order 1 is [1]; only its sign can differ from I.
            ChannelOp::Hadamard(h) => {
                h.order() == 1 && h.signs.as_ref().is_none_or(|s| s.iter().all(|&x| x == 1.0))
            }
        }
    }

    /// `k` copies of one block.
    pub fn repeated(block: Vec<f64>, size: usize, k: usize) -> ChannelOp {
        ChannelOp::Blocks {
            size,
            blocks: vec![block; k],
        }
    }

    /// `dim / block` copies of the normalized Hadamard matrix of order `block`, times
    /// random signs `diag(s)` (seeded) if asked: an orthogonal map that spreads every
    /// channel's value over its block. A block that does not divide `dim`, or an order with
    /// no construction, is an error that lists the block sizes that work.
    pub fn hadamard(dim: usize, block: usize, signs: Option<u64>) -> Result<ChannelOp, String> {
        ChannelOp::hadamard_with_core(dim, block, None, signs)
    }

    /// Whether [`ChannelOp::hadamard`] builds `dim / block` blocks of `block`, without
    /// building them (an order of thousands is a matrix of millions of entries); its error
    /// where not.
    pub fn hadamard_fits(dim: usize, block: usize) -> Result<(), String> {
        if block > 0 && dim.is_multiple_of(block) && perqc_ops::hadamard::constructible(block) {
            return Ok(());
        }
        ChannelOp::hadamard(dim, block, None).map(drop)
    }

    /// [`ChannelOp::hadamard`] with the block's Hadamard matrix built from core order
    /// `core` (`perqc_ops::hadamard::hadamard_with_core`); `None`: the default construction.
    pub fn hadamard_with_core(
        dim: usize,
        block: usize,
        core: Option<usize>,
        signs: Option<u64>,
    ) -> Result<ChannelOp, String> {
        use perqc_ops::hadamard;
        let valid = || {
            let ok: Vec<String> = (1..=dim)
                .filter(|&b| dim.is_multiple_of(b) && hadamard::constructible(b))
                .map(|b| b.to_string())
                .collect();
            format!("{dim} channels take blocks of {}", ok.join(", "))
        };
        if block == 0 || !dim.is_multiple_of(block) {
            return Err(format!(
                "a block of {block} does not divide {dim} channels; {}",
                valid()
            ));
        }
        let h = match core {
            None => hadamard::hadamard(block).map_err(|e| format!("{e}; {}", valid()))?,
            Some(m) => hadamard::hadamard_with_core(block, m).map_err(|e| e.to_string())?,
        };
        let s = h.sylvester_factor();
        let m = block / s;
        let core: Vec<i8> = (0..m * m)
            .map(|k| h.get((k / m) * s, (k % m) * s))
            .collect();
        // The factorization is perqc_ops::hadamard's contract; check it entry by entry
        // (O(b²), once per map) so that `apply` always computes the matrix `H` is.
        for i in 0..block {
            let row = h.row(i);
            for (j, &e) in row.iter().enumerate() {
                if e != core[(i / s) * m + j / s] * sylvester(i % s, j % s) {
                    return Err(format!(
                        "the Hadamard matrix of order {block} ({}) is not its Kronecker factorization at ({i}, {j})",
                        h.construction()
                    ));
                }
            }
        }
        let factors = h.core_factors().to_vec();
        // The same for the core's factors: their Kronecker product is the core.
        let order: usize = factors.iter().map(|f| f.0).product();
        let product_is_core = order == m
            && (0..m * m).all(|k| {
                let (mut i, mut j, mut rest, mut e) = (k / m, k % m, m, 1i8);
                for (o, f) in &factors {
                    rest /= o;
                    e *= f[(i / rest) * o + j / rest];
                    (i, j) = (i % rest, j % rest);
                }
                e == core[k]
            });
        if !product_is_core {
            return Err(format!(
                "the Hadamard core of order {m} ({}) is not the product of its factors",
                h.construction()
            ));
        }
        Ok(ChannelOp::Hadamard(HadamardBlocks {
            m,
            core,
            factors,
            s,
            signs: signs.map(|seed| hadamard::random_signs(block, seed)),
            count: dim / block,
        }))
    }

    /// Every block orthogonal within `tol` (`Bᵀ B = I`): `T⁻ᵀ = T`. A Hadamard map is
    /// orthogonal by construction (no check); each distinct dense block is checked once
    /// (O(size³)).
    pub fn is_orthogonal(&self, tol: f64) -> bool {
        match self {
            ChannelOp::Permutation(_) | ChannelOp::Hadamard(_) => true,
            ChannelOp::Diagonal(d) => d.iter().all(|x| (x.abs() - 1.0).abs() <= tol),
            ChannelOp::Blocks { size, blocks } => {
                let n = *size;
                let orthogonal = |b: &Vec<f64>| {
                    b.len() == n * n
                        && (0..n).all(|i| {
                            (0..n).all(|j| {
                                let dot: f64 = (0..n).map(|k| b[k * n + i] * b[k * n + j]).sum();
                                (dot - if i == j { 1.0 } else { 0.0 }).abs() <= tol
                            })
                        })
                };
                blocks
                    .iter()
                    .enumerate()
                    .all(|(k, b)| (k > 0 && *b == blocks[k - 1]) || orthogonal(b))
            }
        }
    }

    /// `T⁻ᵀ`, the map a sink's reading axis takes; `None` if `T` is singular.
    pub fn inverse_transpose(&self) -> Option<ChannelOp> {
        Some(match self {
            // P⁻¹ = Pᵀ, so P⁻ᵀ = P.
            ChannelOp::Permutation(p) => ChannelOp::Permutation(p.clone()),
            ChannelOp::Diagonal(d) => {
                if d.iter().any(|&x| x == 0.0 || !x.is_finite()) {
                    return None;
                }
                ChannelOp::Diagonal(d.iter().map(|x| 1.0 / x).collect())
            }
            // Q orthogonal: Q⁻ᵀ = Q.
            ChannelOp::Hadamard(h) => ChannelOp::Hadamard(h.clone()),
            ChannelOp::Blocks { size, blocks } => {
                if self.is_orthogonal(1e-9) {
                    return Some(self.clone());
                }
                let mut out = Vec::with_capacity(blocks.len());
                for b in blocks {
                    if b.len() != size * size {
                        return None;
                    }
                    let inv = invert(b, *size)?;
                    out.push(transpose(&inv, *size));
                }
                ChannelOp::Blocks {
                    size: *size,
                    blocks: out,
                }
            }
        })
    }

    /// `Tᵀ`: the adjoint, what a gradient through `T` takes (`⟨T x, y⟩ = ⟨x, Tᵀ y⟩`). For
    /// an orthogonal map it is `T⁻¹`. An unsigned Hadamard stays structured:
    /// `(H_m ⊗ S_s)ᵀ = H_mᵀ ⊗ S_s` (Sylvester matrices are symmetric), the core
    /// transposed; with signs, `diag(signs)` would come last, so the block is dense.
    pub fn transpose(&self) -> ChannelOp {
        match self {
            // (P x)[i] = x[p[i]]: P[i, p[i]] = 1, so Pᵀ puts x[i] at p[i].
            ChannelOp::Permutation(p) => {
                let mut q = vec![0; p.len()];
                for (i, &j) in p.iter().enumerate() {
                    q[j] = i;
                }
                ChannelOp::Permutation(q)
            }
            ChannelOp::Diagonal(d) => ChannelOp::Diagonal(d.clone()),
            ChannelOp::Blocks { size, blocks } => ChannelOp::Blocks {
                size: *size,
                blocks: blocks.iter().map(|b| transpose(b, *size)).collect(),
            },
            ChannelOp::Hadamard(h) if h.signs.is_none() => {
                let m = h.m;
                let t = |f: &[i8], o: usize| -> Vec<i8> {
                    (0..o * o).map(|k| f[(k % o) * o + k / o]).collect()
                };
                // (F_0 ⊗ F_1 ⊗ ..)ᵀ = F_0ᵀ ⊗ F_1ᵀ ⊗ ..
                ChannelOp::Hadamard(HadamardBlocks {
                    core: t(&h.core, m),
                    factors: (h.factors.iter()).map(|(o, f)| (*o, t(f, *o))).collect(),
                    ..h.clone()
                })
            }
            ChannelOp::Hadamard(h) => {
                ChannelOp::repeated(transpose(&h.dense_block(), h.order()), h.order(), h.count)
            }
        }
    }

    /// The map on an endpoint whose index `i` along its axis is region channel
    /// `channels[i]`. Indices may repeat channels (a query head reads its key/value head's):
    /// the endpoint is cut into runs of consecutive channels, and each run must take
    /// whole blocks of `T` (a permutation closed on the run, blocks aligned to it).
    pub fn localize(&self, channels: &[u32]) -> Result<ChannelOp, String> {
        let n = self.dim();
        if channels.len() == n && channels.iter().enumerate().all(|(i, &c)| c as usize == i) {
            return Ok(self.clone());
        }
        if let Some(&c) = channels.iter().find(|&&c| c as usize >= n) {
            return Err(format!("channel {c} is outside the map's {n}"));
        }
        if let ChannelOp::Diagonal(d) = self {
            return Ok(ChannelOp::Diagonal(
                channels.iter().map(|&c| d[c as usize]).collect(),
            ));
        }
        let mut runs = Vec::new();
        let mut start = 0;
        for i in 1..=channels.len() {
            if i == channels.len() || channels[i] != channels[i - 1] + 1 {
                runs.push((start, channels[start] as usize, i - start));
                start = i;
            }
        }
        let aligned = |size: usize, c0: usize, len: usize| {
            if !c0.is_multiple_of(size) || !len.is_multiple_of(size) {
                Err(format!(
                    "blocks of {size} do not align with channels {c0}..{} read as one run",
                    c0 + len
                ))
            } else {
                Ok(())
            }
        };
        match self {
            ChannelOp::Permutation(p) => {
                let mut local = vec![0; channels.len()];
                for &(s, c0, len) in &runs {
                    for t in 0..len {
                        let to = p[c0 + t];
                        if to < c0 || to >= c0 + len {
                            return Err(format!(
                                "the permutation moves channel {to} into channels {c0}..{} that an endpoint reads as one run",
                                c0 + len
                            ));
                        }
                        local[s + t] = s + to - c0;
                    }
                }
                Ok(ChannelOp::Permutation(local))
            }
            ChannelOp::Blocks { size, blocks } => {
                let mut out = Vec::new();
                for &(_, c0, len) in &runs {
                    aligned(*size, c0, len)?;
                    out.extend_from_slice(&blocks[c0 / size..(c0 + len) / size]);
                }
                Ok(ChannelOp::Blocks {
                    size: *size,
                    blocks: out,
                })
            }
            ChannelOp::Hadamard(h) => {
                // Every block is the same Q: only the count changes.
                let b = h.order();
                for &(_, c0, len) in &runs {
                    aligned(b, c0, len)?;
                }
                Ok(ChannelOp::Hadamard(HadamardBlocks {
                    count: channels.len() / b,
                    ..h.clone()
                }))
            }
            ChannelOp::Diagonal(_) => unreachable!("handled above"),
        }
    }

    /// `t̃[.., i, ..] = Σ_j T[i, j] t[.., j, ..]` along `axis`, in f64, rounded once to the
    /// tensor's own float type, into one new payload (a copy of `t`'s, transformed in
    /// place; see the module documentation for the cost). Permutations move bytes without
    /// arithmetic. The result has `t`'s name, type and dims.
    pub fn apply(&self, t: &Tensor, axis: usize) -> Result<Tensor, String> {
        let lay = self.layout(t, axis)?;
        let mut out = t.raw_bytes().map_err(|e| e.to_string())?.into_owned();
        self.transform(t.dtype, lay, &mut out)?;
        let mut new = Tensor::from_raw(t.dtype, t.dims.clone(), bytes::Bytes::from(out));
        new.name = t.name.clone();
        Ok(new)
    }

    /// [`ChannelOp::apply`] on the indices `part` of `axis` only (distinct, in the order
    /// the map's channels are in): those slices are gathered, transformed and put back; the
    /// other indices keep their bytes (the other parts of a fused projection).
    pub fn apply_part(&self, t: &Tensor, axis: usize, part: &[usize]) -> Result<Tensor, String> {
        let dims: Vec<usize> = t
            .dims
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| format!("dim {d}")))
            .collect::<Result<_, _>>()?;
        let Some(&n) = dims.get(axis) else {
            return Err(format!("axis {axis} of a {:?} tensor", t.dims));
        };
        let mut seen = vec![false; n];
        for &j in part {
            if j >= n || std::mem::replace(&mut seen[j], true) {
                return Err(format!(
                    "the indices of a part are not distinct indices of axis {axis} of {:?}",
                    t.dims
                ));
            }
        }
        let es = match t.dtype.bits() {
            Some(b) if b % 8 == 0 && t.dtype.is_float() => b / 8,
            _ => {
                return Err(format!(
                    "a {:?} weight cannot take a channel transform",
                    t.dtype
                ));
            }
        };
        let outer: usize = dims[..axis].iter().product();
        let run = dims[axis + 1..].iter().product::<usize>() * es;
        let bytes = t.raw_bytes().map_err(|e| e.to_string())?;
        if bytes.len() != outer * n * run {
            return Err(format!("the payload has {} bytes", bytes.len()));
        }
        let k = part.len();
        let mut sub = Vec::with_capacity(outer * k * run);
        for o in 0..outer {
            for &j in part {
                sub.extend_from_slice(&bytes[(o * n + j) * run..][..run]);
            }
        }
        let mut sub_dims = t.dims.clone();
        sub_dims[axis] = k as i64;
        let sub = Tensor::from_raw(t.dtype, sub_dims, bytes::Bytes::from(sub));
        let sub = self.apply(&sub, axis)?;
        let sub = sub.raw_bytes().map_err(|e| e.to_string())?;
        let mut out = bytes.into_owned();
        for o in 0..outer {
            for (i, &j) in part.iter().enumerate() {
                out[(o * n + j) * run..][..run].copy_from_slice(&sub[(o * k + i) * run..][..run]);
            }
        }
        let mut new = Tensor::from_raw(t.dtype, t.dims.clone(), bytes::Bytes::from(out));
        new.name = t.name.clone();
        Ok(new)
    }

    /// [`ChannelOp::apply`] taking the tensor: when its payload is a buffer nothing else
    /// holds (the result of an earlier rewrite), it is transformed where it lies and no
    /// memory is allocated; else (a slice of the model file, a shared buffer) into one new
    /// payload. On error the tensor is handed back unchanged.
    pub fn apply_owned(&self, t: Tensor, axis: usize) -> Result<Tensor, Box<Refused>> {
        let refuse = |tensor, why| Box::new(Refused { tensor, why });
        let lay = match self.layout(&t, axis) {
            Ok(lay) => lay,
            Err(e) => return Err(refuse(t, e)),
        };
        let Tensor {
            name,
            dtype,
            dims,
            data,
            doc_string,
            metadata,
            segment,
        } = t;
        let back = |data| Tensor {
            name: name.clone(),
            dtype,
            dims: dims.clone(),
            data,
            doc_string: doc_string.clone(),
            metadata: metadata.clone(),
            segment: segment.clone(),
        };
        let data = match data {
            TensorData::Raw(b) => match b.try_into_mut() {
                Ok(mut bytes) => {
                    return match self.transform(dtype, lay, &mut bytes) {
                        Ok(()) => {
                            let mut new = Tensor::from_raw(dtype, dims.clone(), bytes.freeze());
                            new.name = name.clone();
                            Ok(new)
                        }
                        // Refused before any byte changed (a payload of the wrong size).
                        Err(e) => Err(refuse(back(TensorData::Raw(bytes.freeze())), e)),
                    };
                }
                Err(b) => TensorData::Raw(b),
            },
            other => other,
        };
        let t = back(data);
        match self.apply(&t, axis) {
            Ok(new) => Ok(new),
            Err(e) => Err(refuse(t, e)),
        }
    }

    /// Whether `self` can act along `axis` of `t`, and the layout around that axis.
    fn layout(&self, t: &Tensor, axis: usize) -> Result<Layout, String> {
        let dims: Vec<usize> = t
            .dims
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| format!("dim {d}")))
            .collect::<Result<_, _>>()?;
        if axis >= dims.len() || dims[axis] != self.dim() {
            return Err(format!(
                "axis {axis} of a {:?} tensor does not have {} channels",
                t.dims,
                self.dim()
            ));
        }
        if !t.dtype.is_float() {
            return Err(format!(
                "a {:?} weight cannot take a channel transform",
                t.dtype
            ));
        }
        match self {
            ChannelOp::Blocks { size, blocks } if blocks.iter().any(|b| b.len() != size * size) => {
                return Err(format!("a block of the map is not {size} x {size}"));
            }
            ChannelOp::Permutation(p) => {
                let mut seen = vec![false; p.len()];
                for &j in p {
                    if j >= p.len() || std::mem::replace(&mut seen[j], true) {
                        return Err(format!("{p:?} is not a permutation"));
                    }
                }
            }
            _ => {}
        }
        Ok(Layout {
            outer: dims[..axis].iter().product(),
            n: dims[axis],
            inner: dims[axis + 1..].iter().product(),
        })
    }

    /// The payload `bytes` (a `[outer, n, inner]` tensor of `dtype`, checked by
    /// [`ChannelOp::layout`]) transformed in place along `n`. Refuses, before changing
    /// anything, a payload of the wrong size or an unsupported float type.
    fn transform(&self, dtype: DType, lay: Layout, bytes: &mut [u8]) -> Result<(), String> {
        let es = match dtype {
            DType::F32 => F32::SIZE,
            DType::F64 => F64::SIZE,
            DType::F16 => F16::SIZE,
            DType::BF16 => BF16::SIZE,
            other => return Err(format!("{other:?} weights are not supported")),
        };
        let numel = lay.outer * lay.n * lay.inner;
        if bytes.len() != numel * es {
            return Err(format!(
                "the payload has {} bytes, not {numel} elements of {es}",
                bytes.len()
            ));
        }
        if numel == 0 {
            return Ok(());
        }
        match dtype {
            DType::F32 => self.transform_as::<F32>(lay, bytes),
            DType::F64 => self.transform_as::<F64>(lay, bytes),
            DType::F16 => self.transform_as::<F16>(lay, bytes),
            _ => self.transform_as::<BF16>(lay, bytes),
        }
        Ok(())
    }

    /// [`ChannelOp::transform`] for elements `E`, on a non-empty payload of the right size.
    fn transform_as<E: Elem>(&self, lay: Layout, bytes: &mut [u8]) {
        let Layout { n, inner, .. } = lay;
        let es = E::SIZE;
        let run = inner * es;
        match self {
            ChannelOp::Permutation(p) if inner == 1 => {
                // Each slab is one row of n values: gather it from a copy.
                let mut old = vec![0u8; n * es];
                for slab in bytes.chunks_exact_mut(n * es) {
                    old.copy_from_slice(slab);
                    for (d, &j) in slab.chunks_exact_mut(E::SIZE).zip(p) {
                        d.copy_from_slice(&old[j * E::SIZE..][..E::SIZE]);
                    }
                }
            }
            ChannelOp::Permutation(p) => {
                // New run i is old run p[i]: follow each cycle i → p[i] → .., saving the
                // run at its start (the only one overwritten before it is read).
                let mut saved = vec![0u8; run];
                let mut done = vec![false; n];
                for slab in bytes.chunks_exact_mut(n * run) {
                    done.fill(false);
                    for start in 0..n {
                        if done[start] || p[start] == start {
                            continue;
                        }
                        saved.copy_from_slice(&slab[start * run..][..run]);
                        let mut cur = start;
                        loop {
                            done[cur] = true;
                            let next = p[cur];
                            if next == start {
                                slab[cur * run..][..run].copy_from_slice(&saved);
                                break;
                            }
                            slab.copy_within(next * run..(next + 1) * run, cur * run);
                            cur = next;
                        }
                    }
                }
            }
            ChannelOp::Diagonal(d) => {
                // Runs of `inner` values cycle through the channels: run r is channel r mod n.
                for (r, x) in bytes.chunks_exact_mut(run).enumerate() {
                    let f = d[r % n];
                    for v in x.chunks_exact_mut(es) {
                        E::put(f * E::get(v), v);
                    }
                }
            }
            ChannelOp::Blocks { size, blocks } => {
                let kernel = Kernel::Dense {
                    size: *size,
                    blocks,
                };
                panels::<E>(&kernel, bytes, lay);
            }
            ChannelOp::Hadamard(h) => panels::<E>(&Kernel::hadamard(h), bytes, lay),
        }
    }
}

/// Why [`ChannelOp::apply_owned`] refused, with the tensor it was given, unchanged.
#[derive(Debug)]
pub struct Refused {
    pub tensor: Tensor,
    pub why: String,
}

/// A weight viewed as `[outer, n, inner]` around its channel axis `n`.
#[derive(Clone, Copy)]
struct Layout {
    outer: usize,
    n: usize,
    inner: usize,
}

/// A block map prepared for panels: `p ← B_k p` on the rows of block `k` of a panel (`size`
/// rows of [`PANEL`] lanes). Every lane is an independent vector and the arithmetic is the
/// same at every vector width (no fused multiply-add, no sums across lanes), so each
/// instruction-set level gives the same bits.
enum Kernel<'a> {
    /// Row-major `size x size` blocks, block `k` on channels `k·size..(k+1)·size`.
    Dense { size: usize, blocks: &'a [Vec<f64>] },
    /// [`HadamardBlocks`]: the signs, `S_s` inside groups of `s` channels, then the core
    /// across the `m` groups, factor by factor of its Kronecker factorization (see
    /// [`CoreFactor`]), then `1/√b`.
    Hadamard {
        count: usize,
        m: usize,
        s: usize,
        signs: Option<&'a [f64]>,
        factors: Vec<CoreFactor>,
        scale: f64,
    },
}

/// One Kronecker factor `F` (order `o`, ±1) of a Hadamard core `H_m = F_0 ⊗ F_1 ⊗ ..`, as
/// signed sums: on a run of `m` rows, output row `q·o·stride + i·stride + t` adds the input
/// rows `q·o·stride + j·stride + t` for `j` in `plus[i]` and subtracts those in `minus[i]`,
/// where `stride` is the product of the later factors' orders. Applying the factors in
/// turn multiplies by `H_m` with `Σ o_k` additions per channel instead of `m` (144 = 12 ⊗
/// 12: 24 instead of 144).
struct CoreFactor {
    order: usize,
    stride: usize,
    plus: Vec<Vec<usize>>,
    minus: Vec<Vec<usize>>,
}

/// Lanes summed at once: `[f64; LANES]` accumulators, 8 AVX-512 registers, so 8
/// independent addition chains hide the adder latency.
const LANES: usize = 64;
const _: () = assert!(PANEL.is_multiple_of(LANES));

type Lanes = [f64; LANES];

impl<'a> Kernel<'a> {
    fn hadamard(h: &'a HadamardBlocks) -> Kernel<'a> {
        let mut stride = h.m;
        let factors = (h.factors.iter())
            .map(|(order, f)| {
                let order = *order;
                stride /= order;
                let row = |i: usize, sign: i8| -> Vec<usize> {
                    (0..order).filter(|&j| f[i * order + j] == sign).collect()
                };
                CoreFactor {
                    order,
                    stride,
                    plus: (0..order).map(|i| row(i, 1)).collect(),
                    minus: (0..order).map(|i| row(i, -1)).collect(),
                }
            })
            .collect();
        Kernel::Hadamard {
            count: h.count,
            m: h.m,
            s: h.s,
            signs: h.signs.as_deref(),
            factors,
            scale: 1.0 / (h.order() as f64).sqrt(),
        }
    }

    /// Channels per block.
    fn size(&self) -> usize {
        match self {
            Kernel::Dense { size, .. } => *size,
            Kernel::Hadamard { m, s, .. } => m * s,
        }
    }

    fn count(&self) -> usize {
        match self {
            Kernel::Dense { blocks, .. } => blocks.len(),
            Kernel::Hadamard { count, .. } => *count,
        }
    }

    /// The panel row holding channel `c` of a block. Dense blocks keep channel order; a
    /// Hadamard block `c = j1·s + i2` goes to row `i2·m + j1`, so that the `m` channels the
    /// core combines are `m` consecutive rows (in L1), and each butterfly of `S_s` pairs
    /// two runs of `m` consecutive rows.
    #[inline(always)]
    fn row(&self, c: usize) -> usize {
        match self {
            Kernel::Dense { .. } => c,
            Kernel::Hadamard { m, s, .. } => (c % s) * m + c / s,
        }
    }

    /// [`Kernel::row`] of every channel of a block, computed once per panel (no division
    /// per element).
    fn rows(&self) -> Vec<usize> {
        (0..self.size()).map(|c| self.row(c)).collect()
    }

    /// `p ← B_k p` through `tmp` (both `size · PANEL`, rows placed by [`Kernel::row`]);
    /// returns the buffer holding the result.
    #[inline(always)]
    fn block<'p>(&self, k: usize, p: &'p mut [f64], tmp: &'p mut [f64]) -> &'p [f64] {
        match self {
            Kernel::Dense { size, blocks } => {
                let b = &blocks[k];
                for r in 0..*size {
                    for l0 in (0..PANEL).step_by(LANES) {
                        let mut acc: Lanes = [0.0; LANES];
                        for (c, &coef) in b[r * size..][..*size].iter().enumerate() {
                            let x = lanes(p, c * PANEL + l0);
                            for (a, &v) in acc.iter_mut().zip(x) {
                                *a += coef * v;
                            }
                        }
                        tmp[r * PANEL + l0..][..LANES].copy_from_slice(&acc);
                    }
                }
                tmp
            }
            Kernel::Hadamard {
                m,
                s,
                signs,
                factors,
                scale,
                ..
            } => {
                let (m, s) = (*m, *s);
                if let Some(signs) = signs {
                    for (c, &sg) in signs.iter().enumerate() {
                        let r = self.row(c);
                        p[r * PANEL..][..PANEL].iter_mut().for_each(|v| *v *= sg);
                    }
                }
                // S_s on i2 for every j1 at once: stage h maps the row runs of i2 and
                // i2 + h (i2 & h == 0) to (u + v, u - v); after the log2 s stages run i2
                // holds Σ_i2' S_s[i2, i2'] · run i2'.
                let run = m * PANEL;
                let mut h = 1;
                while h < s {
                    for pair in p.chunks_exact_mut(2 * h * run) {
                        let (lo, hi) = pair.split_at_mut(h * run);
                        for (u, v) in lo.iter_mut().zip(hi.iter_mut()) {
                            let (a, b) = (*u, *v);
                            *u = a + b;
                            *v = a - b;
                        }
                    }
                    h *= 2;
                }
                if m == 1 {
                    p.iter_mut().for_each(|v| *v *= scale);
                    return p;
                }
                // The core inside each run (row i2·m + i1 of the result is Σ_j1 H_m[i1, j1] ·
                // row i2·m + j1), one Kronecker factor at a time, the ±1 terms as additions
                // and subtractions, from one buffer into the other; the last factor scales.
                let (mut src, mut dst) = (p, tmp);
                for (k, f) in factors.iter().enumerate() {
                    let last = k + 1 == factors.len();
                    let (o, st) = (f.order, f.stride);
                    for (x, y) in src.chunks_exact(run).zip(dst.chunks_exact_mut(run)) {
                        for base in (0..m).step_by(o * st) {
                            for t in 0..st {
                                for i in 0..o {
                                    let out = (base + i * st + t) * PANEL;
                                    for l0 in (0..PANEL).step_by(LANES) {
                                        let mut acc: Lanes = [0.0; LANES];
                                        for &j in &f.plus[i] {
                                            let v = lanes(x, (base + j * st + t) * PANEL + l0);
                                            acc.iter_mut().zip(v).for_each(|(a, &v)| *a += v);
                                        }
                                        for &j in &f.minus[i] {
                                            let v = lanes(x, (base + j * st + t) * PANEL + l0);
                                            acc.iter_mut().zip(v).for_each(|(a, &v)| *a -= v);
                                        }
                                        if last {
                                            acc.iter_mut().for_each(|a| *a *= scale);
                                        }
                                        y[out + l0..][..LANES].copy_from_slice(&acc);
                                    }
                                }
                            }
                        }
                    }
                    std::mem::swap(&mut src, &mut dst);
                }
                src
            }
        }
    }
}

/// `LANES` values of `p` from `at`.
#[inline(always)]
fn lanes(p: &[f64], at: usize) -> &Lanes {
    p[at..at + LANES].try_into().expect("LANES values")
}

/// Defines `$name::<E>(args)`, compiled for AVX-512 (F, with AVX2 and FMA) or AVX2+FMA when
/// the CPU has them, else for the baseline target (as `perqc_ops`' kernels are). Its body
/// and everything it inlines ([`Kernel::block`], [`Elem`]) get the wider vectors.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident<E: Elem>($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$m])* fn $name<E: Elem>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn wide<E: Elem>($($arg: $ty),*) $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast<E: Elem>($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // Safety: the features were just detected.
                    return unsafe { wide::<E>($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // Safety: the features were just detected.
                    return unsafe { fast::<E>($($arg),*) };
                }
            }
            fn base<E: Elem>($($arg: $ty),*) $body
            base::<E>($($arg),*)
        }
    };
}

multiversion! {
    /// One panel of rows `o0..o0 + w` of `[outer, n]` (`inner == 1`), `chunk` those rows:
    /// each block's channels are read transposed into `p` (lane `j` = row `j`),
    /// transformed, and written back.
    fn rows_panel<E: Elem>(kernel: &Kernel, n: usize, chunk: &mut [u8], p: &mut [f64], tmp: &mut [f64]) {
        let (es, size) = (E::SIZE, kernel.size());
        let w = chunk.len() / (n * es);
        let rows = kernel.rows();
        for k in 0..kernel.count() {
            for j in 0..w {
                let v = &chunk[(j * n + k * size) * es..][..size * es];
                for (x, &r) in v.chunks_exact(es).zip(&rows) {
                    p[r * PANEL + j] = E::get(x);
                }
            }
            let y = kernel.block(k, p, tmp);
            for j in 0..w {
                let v = &mut chunk[(j * n + k * size) * es..][..size * es];
                for (out, &r) in v.chunks_exact_mut(es).zip(&rows) {
                    E::put(y[r * PANEL + j], out);
                }
            }
        }
    }
}

multiversion! {
    /// One panel of columns of an `[n, inner]` slab, `rows[c]` channel `c`'s piece of
    /// them (contiguous): read into `p`, transformed, and written back.
    fn cols_panel<E: Elem>(kernel: &Kernel, rows: &mut [&mut [u8]], p: &mut [f64], tmp: &mut [f64]) {
        let (es, size) = (E::SIZE, kernel.size());
        let w = rows[0].len() / es;
        let place = kernel.rows();
        for (k, block) in rows.chunks_exact_mut(size).enumerate() {
            for (row, &r) in block.iter().zip(&place) {
                for (x, slot) in row.chunks_exact(es).zip(&mut p[r * PANEL..][..w]) {
                    *slot = E::get(x);
                }
            }
            let y = kernel.block(k, p, tmp);
            for (row, &r) in block.iter_mut().zip(&place) {
                for (out, &v) in row.chunks_exact_mut(es).zip(&y[r * PANEL..][..w]) {
                    E::put(v, out);
                }
            }
        }
    }
}

/// `bytes ← diag(B_0, ..) · bytes` along `n`, in panels of up to [`PANEL`] vectors, in
/// parallel, each panel read whole before it is written back. Vectors are the rows of
/// `[outer, n]` when `inner == 1` (a panel is a run of rows, read transposed), else the
/// columns of each `[n, inner]` slab (a panel is a run of columns, each channel's values
/// contiguous). Lanes past a partial panel's end carry stale values that are transformed
/// and never written.
fn panels<E: Elem>(kernel: &Kernel, bytes: &mut [u8], lay: Layout) {
    let Layout { n, inner, .. } = lay;
    let es = E::SIZE;
    let size = kernel.size();
    let scratch = || (vec![0f64; size * PANEL], vec![0f64; size * PANEL]);
    if inner == 1 {
        bytes
            .par_chunks_mut(PANEL * n * es)
            .for_each_init(scratch, |(p, tmp), chunk| {
                rows_panel::<E>(kernel, n, chunk, p, tmp)
            });
        return;
    }
    // Each task owns the pieces of its columns in every row of its slab: disjoint borrows.
    let mut tasks: Vec<Vec<&mut [u8]>> = Vec::new();
    for slab in bytes.chunks_mut(n * inner * es) {
        let first = tasks.len();
        tasks.extend((0..inner.div_ceil(PANEL)).map(|_| Vec::with_capacity(n)));
        for row in slab.chunks_mut(inner * es) {
            for (q, piece) in row.chunks_mut(PANEL * es).enumerate() {
                tasks[first + q].push(piece);
            }
        }
    }
    tasks
        .into_par_iter()
        .for_each_init(scratch, |(p, tmp), mut rows| {
            cols_panel::<E>(kernel, &mut rows, p, tmp)
        });
}

/// A float element type read from and written to little-endian bytes through f64.
trait Elem: Sync {
    const SIZE: usize;
    /// The value of the `SIZE` bytes at the start of `b`.
    fn get(b: &[u8]) -> f64;
    /// Writes `v` rounded to nearest into the first `SIZE` bytes of `b`.
    fn put(v: f64, b: &mut [u8]);
}

struct F32;
struct F64;
struct F16;
struct BF16;

impl Elem for F32 {
    const SIZE: usize = 4;
    #[inline(always)]
    fn get(b: &[u8]) -> f64 {
        f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    #[inline(always)]
    fn put(v: f64, b: &mut [u8]) {
        b[..4].copy_from_slice(&(v as f32).to_le_bytes());
    }
}

impl Elem for F64 {
    const SIZE: usize = 8;
    #[inline(always)]
    fn get(b: &[u8]) -> f64 {
        f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    }
    #[inline(always)]
    fn put(v: f64, b: &mut [u8]) {
        b[..8].copy_from_slice(&v.to_le_bytes());
    }
}

impl Elem for F16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn get(b: &[u8]) -> f64 {
        half::f16::from_le_bytes([b[0], b[1]]).to_f64()
    }
    #[inline(always)]
    fn put(v: f64, b: &mut [u8]) {
        b[..2].copy_from_slice(&half::f16::from_f64(v).to_le_bytes());
    }
}

impl Elem for BF16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn get(b: &[u8]) -> f64 {
        half::bf16::from_le_bytes([b[0], b[1]]).to_f64()
    }
    #[inline(always)]
    fn put(v: f64, b: &mut [u8]) {
        b[..2].copy_from_slice(&half::bf16::from_f64(v).to_le_bytes());
    }
}

fn transpose(a: &[f64], n: usize) -> Vec<f64> {
    let mut t = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            t[j * n + i] = a[i * n + j];
        }
    }
    t
}

/// Gauss-Jordan with partial pivoting; `None` if singular.
fn invert(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut m = a.to_vec();
    let mut inv = vec![0.0; n * n];
    for i in 0..n {
        inv[i * n + i] = 1.0;
    }
    let scale = a
        .iter()
        .fold(0f64, |s, x| s.max(x.abs()))
        .max(f64::MIN_POSITIVE);
    for col in 0..n {
        let piv =
            (col..n).max_by(|&r, &s| m[r * n + col].abs().total_cmp(&m[s * n + col].abs()))?;
        if m[piv * n + col].abs() <= scale * 1e-13 {
            return None;
        }
        for k in 0..n {
            m.swap(col * n + k, piv * n + k);
            inv.swap(col * n + k, piv * n + k);
        }
        let p = m[col * n + col];
        for k in 0..n {
            m[col * n + k] /= p;
            inv[col * n + k] /= p;
        }
        for r in 0..n {
            if r != col {
                let f = m[r * n + col];
                if f != 0.0 {
                    for k in 0..n {
                        m[r * n + k] -= f * m[col * n + k];
                        inv[r * n + k] -= f * inv[col * n + k];
                    }
                }
            }
        }
    }
    Some(inv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(op: &ChannelOp) -> Vec<f64> {
        let n = op.dim();
        let mut m = vec![0.0; n * n];
        match op {
            ChannelOp::Permutation(p) => {
                p.iter().enumerate().for_each(|(i, &j)| m[i * n + j] = 1.0)
            }
            ChannelOp::Diagonal(d) => d.iter().enumerate().for_each(|(i, &x)| m[i * n + i] = x),
            ChannelOp::Blocks { size, blocks } => {
                for (k, b) in blocks.iter().enumerate() {
                    for r in 0..*size {
                        for c in 0..*size {
                            m[(k * size + r) * n + k * size + c] = b[r * size + c];
                        }
                    }
                }
            }
            ChannelOp::Hadamard(h) => {
                let (size, b) = (h.order(), h.dense_block());
                for k in 0..h.count() {
                    for r in 0..size {
                        for c in 0..size {
                            m[(k * size + r) * n + k * size + c] = b[r * size + c];
                        }
                    }
                }
            }
        }
        m
    }

    /// `m · x` along `axis` of a tensor of `dims`, in f64: the reference `apply` must equal
    /// once rounded.
    fn reference(m: &[f64], n: usize, x: &[f64], dims: &[usize], axis: usize) -> Vec<f64> {
        let outer: usize = dims[..axis].iter().product();
        let inner: usize = dims[axis + 1..].iter().product();
        let mut y = vec![0.0; x.len()];
        for o in 0..outer {
            for i in 0..n {
                for k in 0..inner {
                    y[(o * n + i) * inner + k] = (0..n)
                        .map(|j| m[i * n + j] * x[(o * n + j) * inner + k])
                        .sum();
                }
            }
        }
        y
    }

    fn seeded(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    fn tensor(dims: &[i64]) -> Tensor {
        let n: i64 = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i * 37 % 17) as f32 - 8.0) / 3.0).collect();
        Tensor::from_slice(dims.to_vec(), &v)
    }

    /// `apply` on every axis position agrees with the dense product, for each kind.
    #[test]
    fn apply_is_the_dense_product_along_the_axis() {
        let ops = [
            ChannelOp::Permutation(vec![2, 0, 3, 1]),
            ChannelOp::Diagonal(vec![1.0, -2.0, 0.5, 3.0]),
            ChannelOp::Blocks {
                size: 2,
                blocks: vec![vec![1.0, 2.0, 3.0, 4.0], vec![0.0, 1.0, -1.0, 0.5]],
            },
            ChannelOp::Blocks {
                size: 4,
                blocks: vec![(0..16).map(|i| (i as f64).sin()).collect()],
            },
            ChannelOp::hadamard(4, 2, Some(3)).unwrap(),
            ChannelOp::hadamard(4, 4, None).unwrap(),
        ];
        for op in &ops {
            let m = dense(op);
            for (dims, axis) in [(vec![4i64, 3], 0), (vec![3, 4], 1), (vec![2, 4, 3], 1)] {
                let t = tensor(&dims);
                let x = t.to_f32().unwrap();
                let y = op.apply(&t, axis).unwrap().to_f32().unwrap();
                let outer: usize = dims[..axis].iter().product::<i64>() as usize;
                let inner: usize = dims[axis + 1..].iter().product::<i64>() as usize;
                for o in 0..outer {
                    for i in 0..4 {
                        for k in 0..inner {
                            let want: f64 = (0..4)
                                .map(|j| m[i * 4 + j] * x[(o * 4 + j) * inner + k] as f64)
                                .sum();
                            let got = y[(o * 4 + i) * inner + k] as f64;
                            assert!((want - got).abs() < 1e-5, "{op:?} {dims:?} {axis}");
                        }
                    }
                }
            }
        }
    }

    /// `T⁻ᵀ` times `Tᵀ` is the identity for every kind.
    #[test]
    fn inverse_transpose() {
        let op = ChannelOp::Blocks {
            size: 2,
            blocks: vec![vec![1.0, 2.0, 3.0, 4.0]],
        };
        let it = dense(&op.inverse_transpose().unwrap());
        let m = dense(&op);
        for i in 0..2 {
            for j in 0..2 {
                // (T⁻ᵀ)ᵀ T = T⁻¹ T = I
                let v: f64 = (0..2).map(|k| it[k * 2 + i] * m[k * 2 + j]).sum();
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
        assert!(
            ChannelOp::Diagonal(vec![1.0, 0.0])
                .inverse_transpose()
                .is_none()
        );
        let p = ChannelOp::Permutation(vec![1, 2, 0]);
        assert_eq!(p.inverse_transpose().unwrap(), p);
    }

    /// An endpoint reading key/value heads twice (grouped query) gets each head's block
    /// twice; a permutation that crosses heads is refused there.
    #[test]
    fn localize_through_repeated_heads() {
        let channels: Vec<u32> = [0, 1, 0, 1, 2, 3, 2, 3].to_vec();
        let op = ChannelOp::Blocks {
            size: 2,
            blocks: vec![vec![1.0; 4], vec![2.0; 4]],
        };
        let ChannelOp::Blocks { blocks, .. } = op.localize(&channels).unwrap() else {
            panic!()
        };
        assert_eq!(
            blocks,
            vec![vec![1.0; 4], vec![1.0; 4], vec![2.0; 4], vec![2.0; 4]]
        );
        let within = ChannelOp::Permutation(vec![1, 0, 3, 2]);
        assert_eq!(
            within.localize(&channels).unwrap(),
            ChannelOp::Permutation(vec![1, 0, 3, 2, 5, 4, 7, 6])
        );
        assert!(
            ChannelOp::Permutation(vec![2, 3, 0, 1])
                .localize(&channels)
                .is_err()
        );
    }

    /// The structured Hadamard equals its dense matrix, which is perqc_ops' normalized
    /// Hadamard times the signs, for pure Sylvester, pure core and mixed orders; `apply`
    /// equals the f64 product rounded once to f32 (within one f32 ulp of it) on both panel
    /// layouts, with partial panels.
    /// The cheap check agrees with building the map, error message included.
    #[test]
    fn hadamard_fits_as_hadamard_builds() {
        for dim in [1, 6, 12, 64, 96, 192, 576, 1536] {
            for block in [0, 1, 2, 3, 4, 7, 8, 12, 20, 32, 64, 96, 128, 576, 1536] {
                let built = ChannelOp::hadamard(dim, block, None).map(drop);
                assert_eq!(
                    ChannelOp::hadamard_fits(dim, block),
                    built,
                    "{dim} / {block}"
                );
            }
        }
    }

    #[test]
    fn hadamard_apply_is_the_rounded_dense_product() {
        for (order, want_s) in [(1, 1), (2, 2), (12, 1), (24, 2), (64, 64), (576, 16)] {
            for signs in [None, Some(7)] {
                let op = ChannelOp::hadamard(order * 2, order, signs).unwrap();
                let ChannelOp::Hadamard(h) = &op else {
                    panic!("{op:?}")
                };
                assert_eq!((h.order(), h.count(), h.s), (order, 2, want_s));
                let mut want = perqc_ops::hadamard::hadamard(order)
                    .unwrap()
                    .normalized_f64();
                if let Some(seed) = signs {
                    let s = perqc_ops::hadamard::random_signs(order, seed);
                    for row in want.chunks_mut(order) {
                        row.iter_mut().zip(&s).for_each(|(x, sj)| *x *= sj);
                    }
                }
                assert_eq!(h.dense_block(), want, "order {order}");
                assert!(op.is_orthogonal(0.0));
                assert_eq!(op.inverse_transpose().unwrap(), op);
                let n = 2 * order;
                let m = dense(&op);
                // Rows then columns: inner == 1 with 70 > PANEL rows, inner 67 > PANEL.
                for (dims, axis) in [(vec![70, n], 1), (vec![n, 67], 0), (vec![3, n, 2], 1)] {
                    let numel: usize = dims.iter().product();
                    let x = seeded(numel, order as u64);
                    let t = Tensor::from_slice(dims.iter().map(|&d| d as i64).collect(), &x);
                    let y = op.apply(&t, axis).unwrap().to_f32().unwrap();
                    let xd: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
                    let r = reference(&m, n, &xd, &dims, axis);
                    for (k, (&got, &want)) in y.iter().zip(&r).enumerate() {
                        let ulp = f64::from(f32::EPSILON) * want.abs().max(1e-30);
                        assert!(
                            (f64::from(got) - want).abs() <= ulp,
                            "order {order} {dims:?} axis {axis} [{k}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Every core construction of 576 (the recipe's R1 choices) applies as its dense
    /// matrix, through whatever Kronecker factors its core has (144 = 12 ⊗ 12).
    #[test]
    fn hadamard_cores_apply_through_their_kronecker_factors() {
        for core in perqc_ops::hadamard::cores(576) {
            let op = ChannelOp::hadamard_with_core(576, 576, Some(core), None).unwrap();
            let ChannelOp::Hadamard(h) = &op else {
                panic!("{op:?}")
            };
            let want = perqc_ops::hadamard::hadamard_with_core(576, core)
                .unwrap()
                .normalized_f64();
            assert_eq!(h.dense_block(), want, "core {core}");
            let m = dense(&op);
            // Transposed factor by factor, it is the dense transpose.
            assert_eq!(dense(&op.transpose()), transpose(&m, 576), "core {core}");
            for (dims, axis) in [(vec![70, 576], 1), (vec![576, 67], 0)] {
                let numel: usize = dims.iter().product();
                let x = seeded(numel, core as u64);
                let t = Tensor::from_slice(dims.iter().map(|&d| d as i64).collect(), &x);
                let y = op.apply(&t, axis).unwrap().to_f32().unwrap();
                let xd: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
                let r = reference(&m, 576, &xd, &dims, axis);
                for (k, (&got, &want)) in y.iter().zip(&r).enumerate() {
                    let ulp = f64::from(f32::EPSILON) * want.abs().max(1e-30);
                    assert!(
                        (f64::from(got) - want).abs() <= ulp,
                        "core {core} {dims:?} axis {axis} [{k}]: {got} vs {want}"
                    );
                }
            }
        }
        let core144 = ChannelOp::hadamard_with_core(576, 576, Some(144), None).unwrap();
        let ChannelOp::Hadamard(h) = &core144 else {
            panic!()
        };
        let orders: Vec<usize> = h.factors.iter().map(|f| f.0).collect();
        assert_eq!(orders, [12, 12]);
    }

    /// A Hadamard map localizes to whole blocks (a key/value head read twice), and refuses
    /// runs that cut a block.
    #[test]
    fn hadamard_localizes_by_whole_blocks() {
        let op = ChannelOp::hadamard(8, 4, Some(1)).unwrap();
        let channels: Vec<u32> = [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7].to_vec();
        let local = op.localize(&channels).unwrap();
        assert_eq!(local.dim(), 12);
        let (m, l) = (dense(&op), dense(&local));
        for (i, &ci) in channels.iter().enumerate() {
            for (j, &cj) in channels.iter().enumerate() {
                let same_run = (i < 4) == (j < 4) && (i < 8) == (j < 8);
                let want = if same_run {
                    m[ci as usize * 8 + cj as usize]
                } else {
                    0.0
                };
                assert_eq!(l[i * 12 + j], want, "({i}, {j})");
            }
        }
        assert!(op.localize(&[0, 1, 2, 3, 4, 5]).is_err());
        assert!(op.localize(&[2, 3, 4, 5]).is_err());
    }

    /// `transpose` is the dense transpose for every kind of map (Hadamard orders whose core
    /// is not symmetric, with and without signs), and applying it undoes an orthogonal map.
    #[test]
    fn transpose_is_the_dense_transpose() {
        let mut ops = vec![
            ChannelOp::Permutation(vec![2, 0, 3, 1, 5, 4]),
            ChannelOp::Diagonal(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            ChannelOp::Blocks {
                size: 3,
                blocks: vec![(0..9).map(f64::from).collect(), vec![1.0; 9]],
            },
        ];
        for (order, signs) in [(12, None), (12, Some(3)), (24, None), (576, None)] {
            ops.push(ChannelOp::hadamard(2 * order, order, signs).unwrap());
        }
        for op in &ops {
            let n = op.dim();
            let t = op.transpose();
            assert_eq!(t.dim(), n);
            assert_eq!(dense(&t), transpose(&dense(op), n), "{op:?}");
            if op.is_orthogonal(1e-12) {
                let x = seeded(3 * n, 5);
                let a = Tensor::from_slice(vec![3, n as i64], &x);
                let back = t.apply(&op.apply(&a, 1).unwrap(), 1).unwrap();
                for (got, want) in back.to_f32().unwrap().iter().zip(&x) {
                    assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0));
                }
            }
        }
        // The 12-core is not symmetric: its transpose is a different structured map.
        let h = ChannelOp::hadamard(12, 12, None).unwrap();
        assert!(matches!(h.transpose(), ChannelOp::Hadamard(_)) && h.transpose() != h);
    }

    /// Every float type goes through f64 and is rounded once to itself.
    #[test]
    fn apply_keeps_the_float_type() {
        let op = ChannelOp::hadamard(4, 4, None).unwrap();
        let x = [1.0f64, 2.0, 3.0, 4.0];
        // H_4 / 2 · x = (5, -1, -2, 0).
        let want = [5.0, -1.0, -2.0, 0.0];
        let f16: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f64(v)).collect();
        let bf16: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f64(v)).collect();
        let ts = [
            Tensor::from_slice(vec![4], &x),
            Tensor::from_slice(vec![4], &f16),
            Tensor::from_slice(vec![4], &bf16),
            Tensor::from_slice(vec![4], &x.map(|v| v as f32)),
        ];
        for t in &ts {
            let y = op.apply(t, 0).unwrap();
            assert_eq!(y.dtype, t.dtype);
            assert_eq!(y.to_f32().unwrap(), want.map(|v| v as f32), "{:?}", t.dtype);
        }
        let ints = Tensor::from_slice(vec![4], &[1i64, 2, 3, 4]);
        assert!(op.apply(&ints, 0).is_err());
        let ragged = ChannelOp::Blocks {
            size: 2,
            blocks: vec![vec![1.0; 3], vec![1.0; 4]],
        };
        assert!(ragged.apply(&tensor(&[4, 3]), 0).is_err());
        assert!(ragged.inverse_transpose().is_none());
        // An empty tensor stays empty.
        let empty = Tensor::from_slice::<f32>(vec![0, 4], &[]);
        assert_eq!(op.apply(&empty, 1).unwrap().dims, vec![0, 4]);
    }

    /// `apply_owned` transforms a payload nothing else holds where it lies (same buffer),
    /// copies a shared one (the other holder keeps the original), gives the tensor back
    /// unchanged on error, and agrees with `apply` bit for bit.
    #[test]
    fn apply_owned_works_in_place_when_it_can() {
        let op = ChannelOp::hadamard(8, 8, Some(2)).unwrap();
        let t = op.apply(&tensor(&[3, 8]), 1).unwrap();
        let want = op.apply(&t, 1).unwrap();
        let at = |t: &Tensor| match &t.data {
            TensorData::Raw(b) => b.as_ptr(),
            _ => panic!("raw"),
        };
        let shared = t.clone();
        let copied = op.apply_owned(t, 1).unwrap();
        assert_ne!(at(&copied), at(&shared), "a shared payload is copied");
        assert_eq!(copied.raw_bytes().unwrap(), want.raw_bytes().unwrap());
        let before = at(&shared);
        let original = shared.raw_bytes().unwrap().into_owned();
        drop(copied);
        let in_place = op.apply_owned(shared, 1).unwrap();
        assert_eq!(
            at(&in_place),
            before,
            "a unique payload is transformed in place"
        );
        assert_eq!(in_place.raw_bytes().unwrap(), want.raw_bytes().unwrap());
        let refused = op.apply_owned(in_place, 0).unwrap_err();
        assert!(
            refused.why.contains("does not have 8 channels"),
            "{}",
            refused.why
        );
        let back = refused.tensor;
        assert_eq!(back.raw_bytes().unwrap(), want.raw_bytes().unwrap());
        assert_ne!(original, want.raw_bytes().unwrap().into_owned());
    }

    /// Permutations move whole runs in place along cycles (run widths 1 and 3, cycles of
    /// several lengths and fixed points); a map that is not a permutation is refused.
    #[test]
    fn permutations_in_place_and_refusals() {
        let p = ChannelOp::Permutation(vec![3, 0, 1, 2, 4, 6, 5]);
        for (dims, axis) in [(vec![2, 7], 1), (vec![7, 3], 0), (vec![2, 7, 3], 1)] {
            let t = tensor(&dims);
            let x = t.to_f32().unwrap();
            let y = p.apply(&t, axis).unwrap().to_f32().unwrap();
            let outer: i64 = dims[..axis].iter().product();
            let inner: i64 = dims[axis + 1..].iter().product();
            let (outer, inner) = (outer as usize, inner as usize);
            let perm = [3, 0, 1, 2, 4, 6, 5];
            for o in 0..outer {
                for (i, &j) in perm.iter().enumerate() {
                    for k in 0..inner {
                        assert_eq!(y[(o * 7 + i) * inner + k], x[(o * 7 + j) * inner + k]);
                    }
                }
            }
        }
        for bad in [vec![0, 0, 1], vec![0, 1, 3]] {
            let e = ChannelOp::Permutation(bad)
                .apply(&tensor(&[3, 2]), 0)
                .unwrap_err();
            assert!(e.contains("is not a permutation"), "{e}");
        }
    }
}
