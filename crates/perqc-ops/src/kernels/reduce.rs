//! Reductions (ReduceMean/Sum/Max/Min, axes as attribute or input), Softmax, and the
//! running sum CumSum.

use super::layout::{filled_units, standard, to_standard};
use super::vmath::{max_slice, min_slice, softmax_row_into, sum_slice};
use crate::kernel::{Arr, KernelCtx, KernelError, RtTensor, axis, opt, req, req_f32, req_ints};
use ndarray::{ArrayD, Axis, IxDyn};

type In<'a, 'b> = &'a [Option<&'b RtTensor>];
type Out = Result<Vec<RtTensor>, KernelError>;

/// The axes to reduce, sorted and deduplicated. `attr_form`: axes come from the attribute
/// (older opsets), else from optional input 1. Empty axes mean all axes unless
/// `noop_with_empty_axes` is set (then `None`: the op is the identity).
fn reduce_axes(
    ctx: &KernelCtx<'_>,
    inputs: In,
    rank: usize,
    attr_form: bool,
) -> Result<Option<Vec<usize>>, KernelError> {
    let given: Vec<i64> = if attr_form {
        ctx.ints("axes").map(<[i64]>::to_vec).unwrap_or_default()
    } else if opt(inputs, 1).is_some() {
        req_ints(inputs, 1)?
    } else {
        Vec::new()
    };
    if given.is_empty() {
        if !attr_form && ctx.int("noop_with_empty_axes", 0) != 0 {
            return Ok(None);
        }
        return Ok(Some((0..rank).collect()));
    }
    let mut ax = given
        .iter()
        .map(|&a| axis(a, rank))
        .collect::<Result<Vec<_>, _>>()?;
    ax.sort_unstable();
    ax.dedup();
    Ok(Some(ax))
}

#[derive(Clone, Copy)]
enum Kind {
    Sum,
    Mean,
    Max,
    Min,
}

/// Reduces f32 (and i64 for Sum/Max) over the axes; `keepdims` (default 1) keeps them as 1.
fn reduce(ctx: &KernelCtx<'_>, inputs: In, kind: Kind, attr_until: i64) -> Out {
    let x = req(inputs, 0)?;
    let attr_form = ctx.opset < attr_until;
    let Some(axes) = reduce_axes(ctx, inputs, x.shape().len(), attr_form)? else {
        return Ok(vec![x.clone()]);
    };
    let keep = ctx.int("keepdims", 1) != 0;
    if let (RtTensor::F32(a), Some(k)) = (x, trailing_block(&axes, x.shape().len())) {
        return Ok(vec![RtTensor::f32(reduce_rows(a, k, keep, kind)?)]);
    }
    macro_rules! run {
        ($a:expr, $zero:expr, $fold:expr, $finish:expr) => {{
            let mut r: ArrayD<_> = $a.to_owned();
            let mut count = 1usize;
            for &ax in axes.iter().rev() {
                count *= r.shape()[ax];
                if r.shape()[ax] == 0 && matches!(kind, Kind::Max | Kind::Min) {
                    return Err(KernelError::Invalid(
                        "ReduceMax/Min over an empty axis".into(),
                    ));
                }
                r = r.fold_axis(Axis(ax), $zero, $fold);
                if keep {
                    r = r.insert_axis(Axis(ax));
                }
            }
            $finish(r, count)
        }};
    }
    Ok(vec![match (x, kind) {
        (RtTensor::F32(a), Kind::Sum) => RtTensor::f32(run!(a, 0.0f32, |&s, &v| s + v, |r, _| r)),
        (RtTensor::F32(a), Kind::Mean) => RtTensor::f32(run!(
            a,
            0.0f32,
            |&s, &v| s + v,
            |r: ArrayD<f32>, n: usize| r.mapv_into(|s| s / n as f32)
        )),
        (RtTensor::F32(a), Kind::Max) => RtTensor::f32(run!(
            a,
            f32::NEG_INFINITY,
            |&s: &f32, &v: &f32| if v.is_nan() || v > s { v } else { s },
            |r, _| r
        )),
        (RtTensor::F32(a), Kind::Min) => RtTensor::f32(run!(
            a,
            f32::INFINITY,
            |&s: &f32, &v: &f32| if v.is_nan() || v < s { v } else { s },
            |r, _| r
        )),
        (RtTensor::I64(a), Kind::Sum) => RtTensor::i64(run!(
            a,
            0i64,
            |&s: &i64, &v: &i64| s.wrapping_add(v),
            |r, _| r
        )),
        (RtTensor::I64(a), Kind::Max) => {
            RtTensor::i64(run!(a, i64::MIN, |&s: &i64, &v: &i64| s.max(v), |r, _| r))
        }
        (RtTensor::I64(a), Kind::Min) => {
            RtTensor::i64(run!(a, i64::MAX, |&s: &i64, &v: &i64| s.min(v), |r, _| r))
        }
        (other, _) => {
            return Err(KernelError::InputType {
                index: 0,
                dtype: other.dtype(),
            });
        }
    }])
}

/// `Some(k)` when `axes` (sorted, distinct) are exactly the trailing axes `k..rank`.
fn trailing_block(axes: &[usize], rank: usize) -> Option<usize> {
    let k = rank.checked_sub(axes.len())?;
    let trailing = !axes.is_empty() && axes.iter().enumerate().all(|(i, &a)| a == k + i);
    trailing.then_some(k)
}

/// Reduces `a` over its trailing axes `k..`: in row-major order these are rows of
/// `row = prod(shape[k..])` consecutive elements, one result each. Sums run in vector
/// lanes ([`sum_slice`]), so they may differ from a sequential fold by f32 rounding.
fn reduce_rows(a: &Arr<f32>, k: usize, keep: bool, kind: Kind) -> Result<ArrayD<f32>, KernelError> {
    let row: usize = a.shape()[k..].iter().product();
    if row == 0 && matches!(kind, Kind::Max | Kind::Min) {
        return Err(KernelError::Invalid(
            "ReduceMax/Min over an empty axis".into(),
        ));
    }
    let mut shape = a.shape()[..k].to_vec();
    if keep {
        shape.resize(a.ndim(), 1);
    }
    let src = standard(a);
    let src = src.as_slice().expect("standard layout");
    let one = |r: &[f32]| match kind {
        Kind::Sum => sum_slice(r),
        Kind::Mean => sum_slice(r) / row as f32,
        Kind::Max => max_slice(r),
        Kind::Min => min_slice(r),
    };
    Ok(filled_units(&shape, 1, row, |r0, dst| {
        for (i, d) in dst.iter_mut().enumerate() {
            let at = (r0 + i) * row;
            d.write(one(&src[at..at + row]));
        }
    }))
}

pub fn reduce_sum(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    reduce(ctx, inputs, Kind::Sum, 13)
}

pub fn reduce_mean(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    reduce(ctx, inputs, Kind::Mean, 18)
}

pub fn reduce_max(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    reduce(ctx, inputs, Kind::Max, 18)
}

pub fn reduce_min(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    reduce(ctx, inputs, Kind::Min, 18)
}

/// `softmax(x)_i = exp(x_i - max x) / sum_j exp(x_j - max x)` over each `row`-element row
/// of the row-major `src`, into a fresh array of `shape`; rows are split over the threads
/// in large blocks.
fn softmax_rows(src: &[f32], row: usize, shape: &[usize]) -> ArrayD<f32> {
    // An empty row means an empty tensor; `max(1)` only keeps the chunk size valid.
    let row = row.max(1);
    filled_units(shape, row, 1, |e0, dst| {
        let src = &src[e0..e0 + dst.len()];
        for (s, d) in src.chunks_exact(row).zip(dst.chunks_exact_mut(row)) {
            softmax_row_into(s, d);
        }
    })
}

/// Softmax. From opset 13 along one axis (default -1); before, over the flattened
/// `[prod(shape[..axis]), prod(shape[axis..])]` matrix (default axis 1).
pub fn softmax(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req_f32(inputs, 0)?;
    let rank = x.ndim();
    if rank == 0 {
        return Ok(vec![RtTensor::f32(x.map(|_| 1.0))]);
    }
    let (ax, flat) = if ctx.opset < 13 {
        (axis(ctx.int("axis", 1), rank)?, true)
    } else {
        (axis(ctx.int("axis", -1), rank)?, false)
    };
    if flat || ax == rank - 1 {
        let row: usize = x.shape()[ax..].iter().product();
        let src = standard(x);
        let src = src.as_slice().expect("standard layout");
        return Ok(vec![RtTensor::f32(softmax_rows(src, row, x.shape()))]);
    }
    // Move the axis last, softmax contiguous rows, move it back.
    let mut perm: Vec<usize> = (0..rank).filter(|&i| i != ax).collect();
    perm.push(ax);
    let moved = to_standard(&x.view().permuted_axes(IxDyn(&perm)));
    let src = moved.as_slice().expect("standard layout");
    let out = softmax_rows(src, x.shape()[ax], moved.shape());
    let mut inv = vec![0; rank];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    let out = out.permuted_axes(IxDyn(&inv));
    Ok(vec![RtTensor::f32(to_standard(&out.view()))])
}

/// The CumSum axis: input 1, one int32 or int64 element (0-D or shape `[1]`), possibly
/// negative, normalized against `rank`.
fn cumsum_axis(inputs: In, rank: usize) -> Result<usize, KernelError> {
    let t = req(inputs, 1)?;
    if !matches!(t, RtTensor::I32(_) | RtTensor::I64(_)) {
        return Err(KernelError::InputType {
            index: 1,
            dtype: t.dtype(),
        });
    }
    match req_ints(inputs, 1)?.as_slice() {
        &[a] => axis(a, rank),
        v => Err(KernelError::Invalid(format!(
            "CumSum axis must hold one element, got {}",
            v.len()
        ))),
    }
}

/// The running sum of `a` along `ax`, with `a` viewed row-major as `[outer, dim, inner]`:
/// for each `(o, i)` the `dim` elements `k = 0, 1, ..` (`reverse`: `dim - 1, dim - 2, ..`)
/// are added in that order into an accumulator of type `A` starting at `zero`; element `k`
/// of the result is the accumulator after adding it, or before (`exclusive`, so the first
/// one is `zero`). A whole `inner` row is accumulated at a time, so reads and writes stay
/// contiguous; each sum is still the sequential one along the axis (as ONNX Runtime's).
fn scan<T: Copy + Send + Sync + 'static, A: Copy>(
    a: &Arr<T>,
    ax: usize,
    exclusive: bool,
    reverse: bool,
    zero: A,
    add: impl Fn(A, T) -> A,
    out_of: impl Fn(A) -> T,
) -> Result<Arr<T>, KernelError> {
    let shape = a.shape();
    let outer: usize = shape[..ax].iter().product();
    let dim = shape[ax];
    let inner: usize = shape[ax + 1..].iter().product();
    let n = outer * dim * inner;
    let src = standard(a);
    let src = src.as_slice().expect("standard layout");
    let mut out: Vec<T> = crate::kernel::output_vec(n);
    // Every element is overwritten below; the fill only makes the buffer initialized.
    if let Some(&first) = src.first() {
        out.resize(n, first);
    }
    let mut acc = vec![zero; inner];
    for o in 0..outer {
        acc.fill(zero);
        for step in 0..dim {
            let k = if reverse { dim - 1 - step } else { step };
            let at = (o * dim + k) * inner;
            let (x, y) = (&src[at..at + inner], &mut out[at..at + inner]);
            for ((s, &v), d) in acc.iter_mut().zip(x).zip(y) {
                if exclusive {
                    *d = out_of(*s);
                    *s = add(*s, v);
                } else {
                    *s = add(*s, v);
                    *d = out_of(*s);
                }
            }
        }
    }
    Ok(ArrayD::from_shape_vec(IxDyn(shape), out)?.into_shared())
}

/// CumSum (opsets 11 and 14): the running sum of input 0 along the axis given by input 1,
/// with attributes `exclusive` (leave the current element out) and `reverse` (sum from the
/// end). f32 adds in f32; f16 and bf16 accumulate in f32 and round each result once;
/// integers wrap (two's complement), as C additions do in ONNX Runtime.
pub fn cumsum(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req(inputs, 0)?;
    let ax = cumsum_axis(inputs, x.shape().len())?;
    let exclusive = ctx.int("exclusive", 0) != 0;
    let reverse = ctx.int("reverse", 0) != 0;
    macro_rules! run {
        ($a:expr, $zero:expr, $add:expr, $out:expr) => {
            scan($a, ax, exclusive, reverse, $zero, $add, $out)?
        };
    }
    Ok(vec![match x {
        RtTensor::F32(a) => RtTensor::F32(run!(a, 0f32, |s, v| s + v, |s| s)),
        RtTensor::F16(a) => RtTensor::F16(run!(
            a,
            0f32,
            |s, v: half::f16| s + f32::from(v),
            half::f16::from_f32
        )),
        RtTensor::BF16(a) => RtTensor::BF16(run!(
            a,
            0f32,
            |s, v: half::bf16| s + f32::from(v),
            half::bf16::from_f32
        )),
        RtTensor::I64(a) => RtTensor::I64(run!(a, 0i64, i64::wrapping_add, |s| s)),
        RtTensor::I32(a) => RtTensor::I32(run!(a, 0i32, i32::wrapping_add, |s| s)),
        RtTensor::I8(a) => RtTensor::I8(run!(a, 0i8, i8::wrapping_add, |s| s)),
        RtTensor::U8(a) => RtTensor::U8(run!(a, 0u8, u8::wrapping_add, |s| s)),
        // 4-bit sums would need their own wrapping; bools are not numbers here.
        other @ (RtTensor::Bool(_) | RtTensor::U4(_) | RtTensor::I4(_)) => {
            return Err(KernelError::InputType {
                index: 0,
                dtype: other.dtype(),
            });
        }
    }])
}

#[cfg(test)]
mod tests {
    use super::*;
    use perqc_ir::{AttrValue, Graph, NodeId, NodeSpec};

    fn node(exclusive: i64, reverse: i64) -> (Graph, NodeId) {
        let mut g = Graph::new("t");
        let spec = NodeSpec::new("CumSum")
            .attr("exclusive", AttrValue::Int(exclusive))
            .attr("reverse", AttrValue::Int(reverse));
        let id = g.add_node(spec, &[], &["y"]).unwrap();
        (g, id)
    }

    fn run(g: &Graph, id: NodeId, opset: i64, x: &RtTensor, ax: &RtTensor) -> Out {
        let ctx = KernelCtx {
            node: g.node(id),
            opset,
            threads: 1,
            subgraphs: None,
        };
        cumsum(&ctx, &[Some(x), Some(ax)])
    }

    /// The axis as a 0-D int64 tensor or a `[1]` int32 tensor.
    fn axis_t(a: i64, one_d: bool) -> RtTensor {
        if one_d {
            RtTensor::I32(ArrayD::from_elem(IxDyn(&[1]), a as i32).into_shared())
        } else {
            RtTensor::i64(ArrayD::from_elem(IxDyn(&[]), a))
        }
    }

    /// Element by element: `y[j] = sum of x[k]` over the positions `k` of `j`'s line along
    /// `ax` that come at or before `j` (`exclusive`: strictly before) in summation order
    /// (`reverse`: from the end), added in that order.
    fn reference<T: Copy, A: Copy>(
        x: &ArrayD<T>,
        ax: usize,
        exclusive: bool,
        reverse: bool,
        zero: A,
        add: impl Fn(A, T) -> A,
        out_of: impl Fn(A) -> T,
    ) -> ArrayD<T> {
        let dim = x.shape()[ax];
        ArrayD::from_shape_fn(x.raw_dim(), |j| {
            let jk = j[ax];
            let order: Vec<usize> = if reverse {
                (0..dim).rev().collect()
            } else {
                (0..dim).collect()
            };
            let mut s = zero;
            for k in order {
                let before = if reverse { k > jk } else { k < jk };
                if !(before || (!exclusive && k == jk)) {
                    break;
                }
                let mut at = j.clone();
                at[ax] = k;
                s = add(s, x[&at]);
            }
            out_of(s)
        })
    }

    fn vals(shape: &[usize], seed: u64) -> Vec<i64> {
        let n: usize = shape.iter().product();
        let mut r = seed;
        (0..n)
            .map(|_| {
                r = r
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (r >> 33) as i64 % 2001 - 1000
            })
            .collect()
    }

    /// Odd shapes, every axis in both signs and both axis encodings, all four
    /// exclusive/reverse combinations, for f32 (bitwise), i64, i32 and f16, on row-major and
    /// transposed inputs.
    #[test]
    fn cumsum_matches_the_scalar_reference() {
        for shape in [vec![7], vec![3, 5], vec![2, 3, 5], vec![3, 1, 4, 5]] {
            let rank = shape.len() as i64;
            let v = vals(&shape, 7 + rank as u64);
            let f =
                ArrayD::from_shape_vec(IxDyn(&shape), v.iter().map(|&x| x as f32 / 7.0).collect())
                    .unwrap();
            let i = ArrayD::from_shape_vec(IxDyn(&shape), v.clone()).unwrap();
            // The same shape, stored transposed (reversed axes).
            let ft = to_standard(&f.view().reversed_axes()).reversed_axes();
            assert!(!ft.is_standard_layout() || rank == 1);
            assert_eq!(ft, f);
            for exclusive in [0, 1] {
                for reverse in [0, 1] {
                    let (g, id) = node(exclusive, reverse);
                    let (ex, rev) = (exclusive != 0, reverse != 0);
                    for a in -rank..rank {
                        let ax = if a < 0 { a + rank } else { a } as usize;
                        let t = axis_t(a, a % 2 != 0);
                        let case = format!("{shape:?} axis {a} ex {ex} rev {rev}");

                        let want = reference(&f, ax, ex, rev, 0f32, |s, v| s + v, |s| s);
                        for x in [&f, &ft] {
                            let got = run(&g, id, 14, &RtTensor::f32(x.clone()), &t).unwrap();
                            let got = got[0].as_f32().unwrap();
                            assert_eq!(got.shape(), want.shape(), "{case}");
                            assert!(
                                got.iter()
                                    .zip(&want)
                                    .all(|(p, q)| p.to_bits() == q.to_bits()),
                                "f32 {case}: {got:?} vs {want:?}"
                            );
                        }

                        let want = reference(&i, ax, ex, rev, 0i64, |s, v| s + v, |s| s);
                        let got = run(&g, id, 11, &RtTensor::i64(i.clone()), &t).unwrap();
                        assert_eq!(got[0], RtTensor::i64(want.clone()), "i64 {case}");

                        let i32s = RtTensor::I32(i.mapv(|x| x as i32).into_shared());
                        let got = run(&g, id, 11, &i32s, &t).unwrap();
                        let want32 = RtTensor::I32(want.mapv(|x| x as i32).into_shared());
                        assert_eq!(got[0], want32, "i32 {case}");

                        let h = f.mapv(half::f16::from_f32);
                        let want = reference(
                            &h,
                            ax,
                            ex,
                            rev,
                            0f32,
                            |s, v| s + f32::from(v),
                            half::f16::from_f32,
                        );
                        let got = run(&g, id, 14, &RtTensor::F16(h.into_shared()), &t).unwrap();
                        assert_eq!(got[0], RtTensor::F16(want.into_shared()), "f16 {case}");
                    }
                }
            }
        }
    }

    /// The ONNX example: `[1, 2, 3]` with each attribute combination.
    #[test]
    fn cumsum_onnx_examples() {
        let x = RtTensor::F32(
            ArrayD::from_shape_vec(IxDyn(&[3]), vec![1f32, 2., 3.])
                .unwrap()
                .into_shared(),
        );
        for (ex, rev, want) in [
            (0, 0, [1f32, 3., 6.]),
            (1, 0, [0., 1., 3.]),
            (0, 1, [6., 5., 3.]),
            (1, 1, [5., 3., 0.]),
        ] {
            let (g, id) = node(ex, rev);
            let got = run(&g, id, 14, &x, &axis_t(0, false)).unwrap();
            let got: Vec<f32> = got[0].as_f32().unwrap().iter().copied().collect();
            assert_eq!(got, want, "exclusive {ex} reverse {rev}");
        }
    }

    /// Integers wrap; empty tensors give empty results.
    #[test]
    fn cumsum_wraps_and_handles_empty_tensors() {
        let (g, id) = node(0, 0);
        let x = RtTensor::i64_vec(vec![i64::MAX, 1, 1]);
        let got = run(&g, id, 14, &x, &axis_t(0, false)).unwrap();
        assert_eq!(
            got[0],
            RtTensor::i64_vec(vec![i64::MAX, i64::MIN, i64::MIN + 1])
        );
        for shape in [[0usize, 3], [2, 0]] {
            let x = RtTensor::f32(ArrayD::zeros(IxDyn(&shape)));
            for a in [0, 1] {
                let got = run(&g, id, 14, &x, &axis_t(a, false)).unwrap();
                assert_eq!(got[0].shape(), &shape);
            }
        }
    }

    /// Bad axes and element types are errors, not panics.
    #[test]
    fn cumsum_rejects_bad_axes_and_types() {
        let (g, id) = node(0, 0);
        let x = RtTensor::f32(ArrayD::zeros(IxDyn(&[2, 3])));
        let err = |x: &RtTensor, a: &RtTensor| run(&g, id, 14, x, a).unwrap_err().to_string();
        assert!(err(&x, &axis_t(2, false)).contains("axis 2 out of range"));
        assert!(err(&x, &axis_t(-3, true)).contains("axis -3 out of range"));
        assert!(err(&x, &RtTensor::i64_vec(vec![0, 1])).contains("one element"));
        let fa = RtTensor::f32(ArrayD::zeros(IxDyn(&[])));
        assert!(err(&x, &fa).contains("input 1"));
        let b = RtTensor::bool(ArrayD::from_elem(IxDyn(&[2]), true));
        assert!(err(&b, &axis_t(0, false)).contains("input 0"));
        let scalar = RtTensor::f32(ArrayD::zeros(IxDyn(&[])));
        assert!(err(&scalar, &axis_t(0, false)).contains("rank 0"));
        let ctx = KernelCtx {
            node: g.node(id),
            opset: 14,
            threads: 1,
            subgraphs: None,
        };
        assert!(matches!(
            cumsum(&ctx, &[Some(&x), None]),
            Err(KernelError::MissingInput(1))
        ));
    }
}
