//! Channel maps `T` and their action on one axis of a weight.
//!
//! Convention (column vectors): a region's activation `x` becomes `x̃ = T x`. A source
//! weight writes the channels on an axis (`y = W x_in`, `W`'s output axis): `W̃ = T W`. A
//! sink weight reads them (`z = V x`, `V`'s input axis): `Ṽ = V T⁻¹`, which along that
//! axis is the action of `T⁻ᵀ`. So every fold is one primitive, [`ChannelOp::apply`]:
//! `t̃[.., i, ..] = Σ_j M[i, j] t[.., j, ..]` along an axis, with `M = T` on the writing
//! side and `M = T⁻ᵀ` on the reading side.

use perqc_ir::{DType, Tensor};

/// A linear map on `n` channels.
#[derive(Clone, Debug, PartialEq)]
pub enum ChannelOp {
    /// `(T x)[p] = x[perm[p]]`: new position `p` holds old channel `perm[p]`.
    Permutation(Vec<usize>),
    /// `T = diag(d)`.
    Diagonal(Vec<f64>),
    /// `T = diag(B_0, .., B_{k-1})`: `k` square blocks of `size` channels (row-major
    /// `size × size` each). A full rotation is one block.
    Blocks { size: usize, blocks: Vec<Vec<f64>> },
}

impl ChannelOp {
    pub fn dim(&self) -> usize {
        match self {
            ChannelOp::Permutation(p) => p.len(),
            ChannelOp::Diagonal(d) => d.len(),
            ChannelOp::Blocks { size, blocks } => size * blocks.len(),
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
        let h = hadamard::hadamard(block).map_err(|e| format!("{e}; {}", valid()))?;
        let mut m = h.normalized_f64();
        if let Some(seed) = signs {
            // H · diag(s): column j times s_j.
            let s = hadamard::random_signs(block, seed);
            for row in m.chunks_mut(block) {
                for (x, sj) in row.iter_mut().zip(&s) {
                    *x *= sj;
                }
            }
        }
        Ok(ChannelOp::repeated(m, block, dim / block))
    }

    /// Every block orthogonal within `tol` (`Bᵀ B = I`): `T⁻ᵀ = T`.
    pub fn is_orthogonal(&self, tol: f64) -> bool {
        match self {
            ChannelOp::Permutation(_) => true,
            ChannelOp::Diagonal(d) => d.iter().all(|x| (x.abs() - 1.0).abs() <= tol),
            ChannelOp::Blocks { size, blocks } => blocks.iter().all(|b| {
                let n = *size;
                (0..n).all(|i| {
                    (0..n).all(|j| {
                        let dot: f64 = (0..n).map(|k| b[k * n + i] * b[k * n + j]).sum();
                        (dot - if i == j { 1.0 } else { 0.0 }).abs() <= tol
                    })
                })
            }),
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
            ChannelOp::Blocks { size, blocks } => {
                if self.is_orthogonal(1e-9) {
                    return Some(self.clone());
                }
                let mut out = Vec::with_capacity(blocks.len());
                for b in blocks {
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
                    if c0 % size != 0 || len % size != 0 {
                        return Err(format!(
                            "blocks of {size} do not align with channels {c0}..{} read as one run",
                            c0 + len
                        ));
                    }
                    out.extend_from_slice(&blocks[c0 / size..(c0 + len) / size]);
                }
                Ok(ChannelOp::Blocks {
                    size: *size,
                    blocks: out,
                })
            }
            ChannelOp::Diagonal(_) => unreachable!("handled above"),
        }
    }

    /// `t̃[.., i, ..] = Σ_j T[i, j] t[.., j, ..]` along `axis`, in f64, written back in
    /// the tensor's own float type. Permutations move values without arithmetic.
    pub fn apply(&self, t: &Tensor, axis: usize) -> Result<Tensor, String> {
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
        let x: Vec<f64> = t
            .to_f32()
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(f64::from)
            .collect();
        let outer: usize = dims[..axis].iter().product();
        let n = dims[axis];
        let inner: usize = dims[axis + 1..].iter().product();
        let mut y = vec![0f64; x.len()];
        match self {
            ChannelOp::Permutation(p) => {
                for o in 0..outer {
                    for (i, &j) in p.iter().enumerate() {
                        let (dst, src) = ((o * n + i) * inner, (o * n + j) * inner);
                        y[dst..dst + inner].copy_from_slice(&x[src..src + inner]);
                    }
                }
            }
            ChannelOp::Diagonal(d) => {
                for o in 0..outer {
                    for (i, &s) in d.iter().enumerate() {
                        let at = (o * n + i) * inner;
                        for k in at..at + inner {
                            y[k] = s * x[k];
                        }
                    }
                }
            }
            ChannelOp::Blocks { size, blocks } => {
                for (k, b) in blocks.iter().enumerate() {
                    blocks_product(b, *size, k * size, (outer, n, inner), &x, &mut y);
                }
            }
        }
        write_like(t, &dims, &y)
    }
}

/// `y[o, r0 + r, i] = Σ_c B[r, c] x[o, r0 + c, i]` for one block, as matrix products
/// (`gemm`, f64): with `inner == 1` one product over all `outer` rows, else one per row.
fn blocks_product(
    b: &[f64],
    size: usize,
    r0: usize,
    (outer, n, inner): (usize, usize, usize),
    x: &[f64],
    y: &mut [f64],
) {
    // (rows of the block) x (columns): dst[r, col] = Σ_c B[r, c] src[c, col].
    let (cols, col_stride, row_stride, count, step) = if inner == 1 {
        (outer, n as isize, 1isize, 1, 0)
    } else {
        (inner, 1isize, inner as isize, outer, n * inner)
    };
    for o in 0..count {
        let off = o * step + r0 * row_stride as usize;
        // Safety: every index r * row_stride + col * col_stride (r < size, col < cols) from
        // `off` stays inside x and y, which have outer * n * inner elements; B is size².
        unsafe {
            gemm::gemm(
                size,
                cols,
                size,
                y.as_mut_ptr().add(off),
                col_stride,
                row_stride,
                false,
                b.as_ptr(),
                1,
                size as isize,
                x.as_ptr().add(off),
                col_stride,
                row_stride,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
    }
}

/// A tensor of `t`'s dtype, dims and name holding `y`.
fn write_like(t: &Tensor, dims: &[usize], y: &[f64]) -> Result<Tensor, String> {
    let d: Vec<i64> = dims.iter().map(|&x| x as i64).collect();
    let mut out = match t.dtype {
        DType::F64 => Tensor::from_slice(d, y),
        DType::F32 => Tensor::from_slice(d, &y.iter().map(|&v| v as f32).collect::<Vec<_>>()),
        DType::F16 => Tensor::from_slice(
            d,
            &y.iter()
                .map(|&v| half::f16::from_f64(v))
                .collect::<Vec<_>>(),
        ),
        DType::BF16 => Tensor::from_slice(
            d,
            &y.iter()
                .map(|&v| half::bf16::from_f64(v))
                .collect::<Vec<_>>(),
        ),
        other => return Err(format!("{other:?} weights are not supported")),
    };
    out.name = t.name.clone();
    Ok(out)
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
        }
        m
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
}
