//! Gather, GatherElements and GatherND (any element type; i64 or i32 indices, negative
//! indices count from the end).

use super::layout::standard;
use crate::kernel::{Arr, KernelCtx, KernelError, RtTensor, axis, req, req_ints};
use crate::rt_map;
use ndarray::{ArrayD, IxDyn};

type In<'a, 'b> = &'a [Option<&'b RtTensor>];
type Out = Result<Vec<RtTensor>, KernelError>;

fn norm_index(i: i64, dim: usize) -> Result<usize, KernelError> {
    let d = dim as i64;
    let v = if i < 0 { i + d } else { i };
    if (0..d).contains(&v) {
        Ok(v as usize)
    } else {
        Err(KernelError::Invalid(format!(
            "index {i} out of range for dim {dim}"
        )))
    }
}

/// `out[o, j.., i] = data[o, idx[j..], i]` with `data` viewed as `[outer, dim, inner]`.
fn gather_arr<T: Clone>(
    a: &Arr<T>,
    ax: usize,
    idx: &[usize],
    idx_shape: &[usize],
) -> Result<Arr<T>, KernelError> {
    let shape = a.shape();
    let outer: usize = shape[..ax].iter().product();
    let dim = shape[ax];
    let inner: usize = shape[ax + 1..].iter().product();
    let std = a.as_standard_layout();
    let src = std.as_slice().expect("standard layout");
    let mut out = Vec::with_capacity(outer * idx.len() * inner);
    for o in 0..outer {
        for &i in idx {
            let base = (o * dim + i) * inner;
            out.extend_from_slice(&src[base..base + inner]);
        }
    }
    let mut oshape = shape[..ax].to_vec();
    oshape.extend_from_slice(idx_shape);
    oshape.extend_from_slice(&shape[ax + 1..]);
    Ok(ArrayD::from_shape_vec(IxDyn(&oshape), out)?.into_shared())
}

pub fn gather(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req(inputs, 0)?;
    let rank = x.shape().len();
    let ax = axis(ctx.int("axis", 0), rank)?;
    let dim = x.shape()[ax];
    let ind = req(inputs, 1)?;
    let idx: Vec<usize> = req_ints(inputs, 1)?
        .iter()
        .map(|&i| norm_index(i, dim))
        .collect::<Result<_, _>>()?;
    let ishape = ind.shape().to_vec();
    Ok(vec![rt_map!(x, a => gather_arr(a, ax, &idx, &ishape)?)])
}

/// GatherElements (opsets 11 and 13): `out[j] = data[j with j[axis] replaced by
/// indices[j]]` for every position `j` of the indices, which have the rank of the data and,
/// off the axis, at most its sizes (as ONNX Runtime and torch.gather require); the result
/// has the shape of the indices and the type of the data. Indices are int32 or int64,
/// negative ones count from the end of the axis; one outside `[-dim, dim)` is an error
/// naming it and the axis size.
pub fn gather_elements(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req(inputs, 0)?;
    let ind = req(inputs, 1)?;
    if !matches!(ind, RtTensor::I32(_) | RtTensor::I64(_)) {
        return Err(KernelError::InputType {
            index: 1,
            dtype: ind.dtype(),
        });
    }
    let (ds, is) = (x.shape().to_vec(), ind.shape().to_vec());
    let rank = ds.len();
    let ax = axis(ctx.int("axis", 0), rank)?;
    if is.len() != rank || (0..rank).any(|d| d != ax && is[d] > ds[d]) {
        return Err(KernelError::Invalid(format!(
            "GatherElements: indices {is:?} do not fit data {ds:?} off axis {ax}"
        )));
    }
    // Row-major element strides of the data (it is read through `standard` below).
    let mut strides = vec![1usize; rank];
    for d in (0..rank.saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * ds[d + 1];
    }
    // Offsets of the gathered elements in the row-major data, in the indices' row-major
    // order. `pos` is the current position in the indices and `base` its offset in the data
    // without the axis term; both advance like an odometer, last axis fastest. Every
    // offset is < len(data): off the axis `pos[d] < is[d] <= ds[d]`, on it the index was
    // normalized into `[0, ds[ax])`.
    let idx = req_ints(inputs, 1)?;
    let mut offs = Vec::with_capacity(idx.len());
    let mut pos = vec![0usize; rank];
    let mut base = 0usize;
    for &i in &idx {
        offs.push(base + norm_index(i, ds[ax])? * strides[ax]);
        for d in (0..rank).rev() {
            pos[d] += 1;
            if d != ax {
                base += strides[d];
            }
            if pos[d] < is[d] {
                break;
            }
            if d != ax {
                base -= is[d] * strides[d];
            }
            pos[d] = 0;
        }
    }
    Ok(vec![rt_map!(x, a => {
        let src = standard(a);
        let src = src.as_slice().expect("standard layout");
        ArrayD::from_shape_vec(IxDyn(&is), offs.iter().map(|&o| src[o]).collect())?.into_shared()
    })])
}

/// GatherND with `batch_dims = b`: for indices `[B.., M.., q]` (q = last dim), each index
/// tuple addresses `data[B.., i_1..i_q, rest..]`; the result is `[B.., M.., rest..]`.
pub fn gather_nd(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req(inputs, 0)?;
    let ind = req(inputs, 1)?;
    let idx = req_ints(inputs, 1)?;
    let b = usize::try_from(ctx.int("batch_dims", 0))
        .map_err(|_| KernelError::Invalid("negative batch_dims".into()))?;
    let ds = x.shape().to_vec();
    let is = ind.shape().to_vec();
    let q = *is
        .last()
        .ok_or_else(|| KernelError::Invalid("GatherND indices are a scalar".into()))?;
    if b >= is.len() || b + q > ds.len() || ds[..b] != is[..b] {
        return Err(KernelError::Invalid(format!(
            "GatherND: data {ds:?}, indices {is:?}, batch_dims {b}"
        )));
    }
    let nbatch: usize = ds[..b].iter().product();
    let per_batch: usize = is[b..is.len() - 1].iter().product();
    let rest: usize = ds[b + q..].iter().product();
    let batch_stride: usize = ds[b..].iter().product();
    // Offsets (in elements of the row-major data) of each gathered block.
    let mut offs = Vec::with_capacity(nbatch * per_batch);
    for bi in 0..nbatch {
        for m in 0..per_batch {
            let t = &idx[(bi * per_batch + m) * q..][..q];
            let mut off = 0usize;
            for (j, &v) in t.iter().enumerate() {
                off = off * ds[b + j] + norm_index(v, ds[b + j])?;
            }
            offs.push(bi * batch_stride + off * rest);
        }
    }
    let mut oshape = is[..is.len() - 1].to_vec();
    oshape.extend_from_slice(&ds[b + q..]);
    Ok(vec![rt_map!(x, a => {
        let std = a.as_standard_layout();
        let src = std.as_slice().expect("standard layout");
        let mut out = Vec::with_capacity(offs.len() * rest);
        for &o in &offs {
            out.extend_from_slice(&src[o..o + rest]);
        }
        ArrayD::from_shape_vec(IxDyn(&oshape), out)?.into_shared()
    })])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::layout::to_standard;
    use perqc_ir::{AttrValue, Graph, NodeId, NodeSpec};

    fn node(axis: i64) -> (Graph, NodeId) {
        let mut g = Graph::new("t");
        let spec = NodeSpec::new("GatherElements").attr("axis", AttrValue::Int(axis));
        let id = g.add_node(spec, &[], &["y"]).unwrap();
        (g, id)
    }

    fn run(g: &Graph, id: NodeId, x: &RtTensor, ind: &RtTensor) -> Out {
        let ctx = KernelCtx {
            node: g.node(id),
            opset: 13,
            threads: 1,
            subgraphs: None,
        };
        gather_elements(&ctx, &[Some(x), Some(ind)])
    }

    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// Element by element: `y[j] = x[j with j[ax] = idx[j] (+ dim if negative)]`.
    fn reference<T: Copy>(x: &ArrayD<T>, ax: usize, idx: &ArrayD<i64>) -> ArrayD<T> {
        let dim = x.shape()[ax] as i64;
        ArrayD::from_shape_fn(idx.raw_dim(), |j| {
            let i = idx[&j];
            let mut at = j.clone();
            at[ax] = if i < 0 { i + dim } else { i } as usize;
            x[&at]
        })
    }

    /// Odd shapes, every axis in both signs, indices smaller than the data off the axis and
    /// longer or shorter on it, negative indices, i32 and i64 indices, f32 / i64 / bool /
    /// f16 data, row-major and transposed data and indices.
    #[test]
    fn gather_elements_matches_the_scalar_reference() {
        let mut r = Lcg(5);
        for ds in [vec![7], vec![3, 5], vec![2, 3, 5], vec![3, 1, 4, 5]] {
            let rank = ds.len() as i64;
            let n: usize = ds.iter().product();
            let f =
                ArrayD::from_shape_vec(IxDyn(&ds), (0..n).map(|k| k as f32 * 0.5 - 3.0).collect())
                    .unwrap();
            let ft = to_standard(&f.view().reversed_axes()).reversed_axes();
            assert_eq!(ft, f);
            for a in -rank..rank {
                let ax = if a < 0 { a + rank } else { a } as usize;
                let (g, id) = node(a);
                // Off the axis as large as the data or one smaller; on it 0 ..= dim + 2.
                for variant in 0..3u64 {
                    let is: Vec<usize> = ds
                        .iter()
                        .enumerate()
                        .map(|(d, &n)| {
                            if d == ax {
                                (1 + variant as usize * 2 + n) % (n + 3)
                            } else if variant == 1 {
                                n.saturating_sub(1).max(1)
                            } else {
                                n
                            }
                        })
                        .collect();
                    let dim = ds[ax] as u64;
                    let m: usize = is.iter().product();
                    let iv: Vec<i64> = (0..m)
                        .map(|_| r.below(2 * dim) as i64 - dim as i64)
                        .collect();
                    let idx = ArrayD::from_shape_vec(IxDyn(&is), iv).unwrap();
                    let case = format!("data {ds:?} axis {a} indices {is:?}");
                    let want = reference(&f, ax, &idx);
                    let i64s = RtTensor::i64(idx.clone());
                    let i32s = RtTensor::I32(idx.mapv(|v| v as i32).into_shared());
                    let i64t = RtTensor::I64(
                        to_standard(&idx.view().reversed_axes())
                            .reversed_axes()
                            .into_shared(),
                    );
                    for x in [&f, &ft] {
                        for ind in [&i64s, &i32s, &i64t] {
                            let got = run(&g, id, &RtTensor::f32(x.clone()), ind).unwrap();
                            assert_eq!(got[0], RtTensor::f32(want.clone()), "{case}");
                        }
                    }
                    let xi = f.mapv(|v| (v * 2.0) as i64);
                    let got = run(&g, id, &RtTensor::i64(xi.clone()), &i32s).unwrap();
                    assert_eq!(got[0], RtTensor::i64(reference(&xi, ax, &idx)), "{case}");
                    let xb = f.mapv(|v| v > 0.0);
                    let got = run(&g, id, &RtTensor::bool(xb.clone()), &i64s).unwrap();
                    assert_eq!(got[0], RtTensor::bool(reference(&xb, ax, &idx)), "{case}");
                    let xh = f.mapv(half::f16::from_f32);
                    let got = run(&g, id, &RtTensor::F16(xh.clone().into_shared()), &i64s).unwrap();
                    let want = RtTensor::F16(reference(&xh, ax, &idx).into_shared());
                    assert_eq!(got[0], want, "{case}");
                }
            }
        }
    }

    /// The ONNX examples (axis 1 and axis 0, the latter with a negative index).
    #[test]
    fn gather_elements_onnx_examples() {
        let t = |shape: &[usize], v: Vec<i64>| {
            RtTensor::i64(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
        };
        let (g, id) = node(1);
        let got = run(
            &g,
            id,
            &t(&[2, 2], vec![1, 2, 3, 4]),
            &t(&[2, 2], vec![0, 0, 1, 0]),
        )
        .unwrap();
        assert_eq!(got[0], t(&[2, 2], vec![1, 1, 4, 3]));
        let (g, id) = node(0);
        let data = t(&[3, 3], (1..=9).collect());
        let got = run(&g, id, &data, &t(&[2, 3], vec![1, 2, 0, 2, 0, -3])).unwrap();
        assert_eq!(got[0], t(&[2, 3], vec![4, 8, 3, 7, 2, 3]));
    }

    /// Out-of-range indices (either sign) name the index and the axis size; mismatched
    /// ranks, indices larger than the data off the axis, float indices and bad axes are
    /// errors too; empty indices give an empty result.
    #[test]
    fn gather_elements_rejects_bad_indices() {
        let data = RtTensor::f32(ArrayD::zeros(IxDyn(&[3, 4])));
        let t = |shape: &[usize], v: Vec<i64>| {
            RtTensor::i64(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
        };
        let (g, id) = node(-1);
        let err = |ind: &RtTensor| run(&g, id, &data, ind).unwrap_err().to_string();
        let e = err(&t(&[1, 2], vec![0, 4]));
        assert!(e.contains("index 4") && e.contains("dim 4"), "{e}");
        let e = err(&RtTensor::I32(
            ArrayD::from_shape_vec(IxDyn(&[1, 1]), vec![-5])
                .unwrap()
                .into_shared(),
        ));
        assert!(e.contains("index -5") && e.contains("dim 4"), "{e}");
        assert!(err(&t(&[2], vec![0, 1])).contains("do not fit"));
        assert!(err(&t(&[4, 1], vec![0; 4])).contains("do not fit"));
        let fl = RtTensor::f32(ArrayD::zeros(IxDyn(&[1, 1])));
        assert!(err(&fl).contains("input 1"));
        let (g2, id2) = node(2);
        let e = run(&g2, id2, &data, &t(&[1, 1], vec![0]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("axis 2 out of range"), "{e}");
        // Wider than the data along the axis is fine; empty indices give an empty result.
        let got = run(&g, id, &data, &t(&[1, 6], vec![0, 1, 2, 3, -1, -4])).unwrap();
        assert_eq!(got[0].shape(), &[1, 6]);
        let got = run(&g, id, &data, &t(&[0, 4], vec![])).unwrap();
        assert_eq!(got[0].shape(), &[0, 4]);
        // An empty axis has no valid index.
        let empty = RtTensor::f32(ArrayD::zeros(IxDyn(&[3, 0])));
        let e = run(&g, id, &empty, &t(&[1, 1], vec![0]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("index 0") && e.contains("dim 0"), "{e}");
    }
}
