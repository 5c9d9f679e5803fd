//! Walking strided (transposed, sliced, broadcast) operands in row-major output order, in
//! long runs, and filling fresh outputs over the threads.
//!
//! A [`Walk`] describes `K` operands viewed at one common shape. Axes of length 1 are
//! dropped and neighbouring axes merged wherever every operand steps through them
//! uniformly, so a row-major operand is one run of all its elements and e.g. a transposed
//! `[1, 9, 512, 64]` is `9 * 512` runs of 64 contiguous elements. Kernels then handle a run
//! as a slice (unit stride), a splat (stride 0) or a strided loop.

use crate::kernel::{Arr, output_vec};
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use std::mem::MaybeUninit;

/// Operations on at least this many elements split the work over the session's threads
/// (rayon); below it the split costs more than it saves.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 16;

/// `K` operands of one shape as `outer` axes (length, per-operand element stride),
/// outermost first, around an `inner` run of `inner` elements stepping `step`.
pub(crate) struct Walk<const K: usize> {
    outer: Vec<(usize, [isize; K])>,
    pub(crate) inner: usize,
    pub(crate) step: [isize; K],
}

impl<const K: usize> Walk<K> {
    /// The merged layout of operands with element strides `strides[k]` over `shape`.
    pub(crate) fn new(shape: &[usize], strides: [&[isize]; K]) -> Walk<K> {
        let mut dims: Vec<(usize, [isize; K])> = Vec::with_capacity(shape.len());
        for (i, &len) in shape.iter().enumerate() {
            if len == 1 {
                continue;
            }
            let st: [isize; K] = std::array::from_fn(|k| strides[k][i]);
            // Axis i merges into the previous one when, for every operand, stepping the
            // previous axis once equals stepping axis i `len` times.
            if let Some(last) = dims.last_mut()
                && (0..K).all(|k| last.1[k] == st[k] * len as isize)
            {
                *last = (last.0 * len, st);
                continue;
            }
            dims.push((len, st));
        }
        let (inner, step) = dims.pop().unwrap_or((1, [0; K]));
        Walk {
            outer: dims,
            inner,
            step,
        }
    }

    /// Element offsets of the first element of run `row` in each operand.
    fn row_offsets(&self, row: usize) -> [isize; K] {
        let mut off = [0isize; K];
        let mut r = row;
        for &(len, st) in self.outer.iter().rev() {
            let i = (r % len) as isize;
            r /= len;
            for (o, s) in off.iter_mut().zip(st) {
                *o += i * s;
            }
        }
        off
    }

    /// Calls `f(at, offsets, take)` for the pieces of runs covering the row-major elements
    /// `e0 .. e0 + len`: `take` elements starting at output element `e0 + at`, whose first
    /// element sits at `offsets[k]` in operand `k` (later ones `step[k]` apart).
    pub(crate) fn pieces(
        &self,
        e0: usize,
        len: usize,
        mut f: impl FnMut(usize, [isize; K], usize),
    ) {
        if len == 0 {
            // Also covers operands with a zero-length axis (then `inner` may be 0).
            return;
        }
        let mut row = e0 / self.inner;
        let mut j = e0 % self.inner;
        let mut at = 0;
        while at < len {
            let mut off = self.row_offsets(row);
            for (o, st) in off.iter_mut().zip(self.step) {
                *o += j as isize * st;
            }
            let take = (self.inner - j).min(len - at);
            f(at, off, take);
            at += take;
            row += 1;
            j = 0;
        }
    }
}

/// A raw element pointer shared by the threads of one kernel (read-only).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *const T);

impl<T> SendPtr<T> {
    /// The pointer. (A method, so closures capture the whole `SendPtr`, which is `Sync`,
    /// rather than its raw pointer field, which is not.)
    pub(crate) fn get(self) -> *const T {
        self.0
    }
}
// Safety: only ever read through, while the array it points into is alive.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

/// Calls `fill(e0, dst)` on consecutive pieces of `out` (`dst` = elements `e0..`). `out`
/// is made of `unit`-element units (rows) that are never split, and each output element
/// costs about `cost` input elements of work; once the work reaches [`PAR_MIN_ELEMS`]
/// elements it is split over the threads in a few large pieces.
pub(crate) fn par_fill_units<C: Send>(
    out: &mut [MaybeUninit<C>],
    unit: usize,
    cost: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<C>]) + Sync,
) {
    let unit = unit.max(1);
    let units = out.len() / unit;
    let unit_work = unit.saturating_mul(cost.max(1));
    let work = units.saturating_mul(unit_work);
    if work >= PAR_MIN_ELEMS && units > 1 {
        use rayon::prelude::*;
        // About four pieces per thread (for balance when threads are busy elsewhere),
        // none under 4096 elements of work.
        let piece_work = (work / (4 * rayon::current_num_threads().max(1))).max(4096);
        let chunk = piece_work.div_ceil(unit_work).max(1) * unit;
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(c, d)| fill(c * chunk, d));
    } else {
        fill(0, out);
    }
}

/// A fresh row-major array of `shape` whose elements `fill` writes (see
/// [`par_fill_units`]; here units are single elements of unit cost).
///
/// `fill` must initialize every element of each `dst` it is given.
pub(crate) fn filled<C: Send + 'static>(
    shape: &[usize],
    fill: impl Fn(usize, &mut [MaybeUninit<C>]) + Sync,
) -> ArrayD<C> {
    filled_units(shape, 1, 1, fill)
}

/// [`filled`] in pieces of whole `unit`s, with `cost` as in [`par_fill_units`].
pub(crate) fn filled_units<C: Send + 'static>(
    shape: &[usize],
    unit: usize,
    cost: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<C>]) + Sync,
) -> ArrayD<C> {
    let n: usize = shape.iter().product();
    let mut out: Vec<C> = output_vec(n);
    par_fill_units(&mut out.spare_capacity_mut()[..n], unit, cost, fill);
    // Safety: `fill` initialized all `n` elements (the contract above).
    unsafe { out.set_len(n) };
    ArrayD::from_shape_vec(IxDyn(shape), out).expect("the element count matches the shape")
}

/// `dst[i] = *src.offset(i * step)`.
///
/// # Safety
/// `src` must be valid for reads at those `dst.len()` offsets.
pub(crate) unsafe fn gather<T: Copy>(src: *const T, step: isize, dst: &mut [MaybeUninit<T>]) {
    match step {
        // Safety (all arms): the caller's contract.
        1 => unsafe {
            let s = std::slice::from_raw_parts(src, dst.len());
            for (d, &x) in dst.iter_mut().zip(s) {
                d.write(x);
            }
        },
        0 => {
            let x = unsafe { *src };
            dst.iter_mut().for_each(|d| {
                d.write(x);
            });
        }
        _ => {
            for (i, d) in dst.iter_mut().enumerate() {
                d.write(unsafe { *src.offset(i as isize * step) });
            }
        }
    }
}

/// The elements of `v` in row-major order, in a fresh row-major array (a memcpy of runs
/// for strided views, a splat for broadcast axes).
pub(crate) fn to_standard<T: Copy + Send + Sync + 'static>(v: &ArrayViewD<'_, T>) -> ArrayD<T> {
    let walk = Walk::new(v.shape(), [v.strides()]);
    let src = SendPtr(v.as_ptr());
    filled(v.shape(), |e0, dst| {
        walk.pieces(e0, dst.len(), |at, [o], take| {
            // Safety: the walk's offsets index the view's elements.
            unsafe { gather(src.get().offset(o), walk.step[0], &mut dst[at..at + take]) }
        });
    })
}

/// `a` in row-major order: shared without a copy when it already is.
pub(crate) fn standard<T: Copy + Send + Sync + 'static>(a: &Arr<T>) -> Arr<T> {
    if a.is_standard_layout() {
        a.clone()
    } else {
        to_standard(&a.view()).into_shared()
    }
}

/// Elements gathered at a time from a non-unit-stride run before a slice op sees them.
const GATHER: usize = 256;

/// `op(src, dst)` over the elements of `a` in row-major order, into a fresh row-major array.
/// `op` must write every element of `dst` (`dst.len() == src.len()`), elementwise.
pub(crate) fn map_slices(a: &Arr<f32>, op: fn(&[f32], &mut [MaybeUninit<f32>])) -> ArrayD<f32> {
    let walk = Walk::new(a.shape(), [a.strides()]);
    let src = SendPtr(a.as_ptr());
    let step = walk.step[0];
    filled(a.shape(), |e0, dst| {
        walk.pieces(e0, dst.len(), |at, [o], take| {
            let dst = &mut dst[at..at + take];
            if step == 1 {
                // Safety: a unit-stride run of `take` elements of `a`.
                op(
                    unsafe { std::slice::from_raw_parts(src.get().offset(o), take) },
                    dst,
                );
                return;
            }
            let mut buf = [MaybeUninit::<f32>::uninit(); GATHER];
            for (c, d) in dst.chunks_mut(GATHER).enumerate() {
                let b = &mut buf[..d.len()];
                // Safety: elements `c * GATHER ..` of the run, inside `a`.
                unsafe { gather(src.get().offset(o + (c * GATHER) as isize * step), step, b) };
                // Safety: `gather` initialized all of `b`.
                op(
                    unsafe { &*(b as *const [MaybeUninit<f32>] as *const [f32]) },
                    d,
                );
            }
        });
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array, Axis, Slice};

    #[test]
    fn walks_merge_uniform_axes() {
        let a =
            Array::from_shape_vec(IxDyn(&[2, 3, 4, 5]), (0..120).collect::<Vec<i32>>()).unwrap();
        let w = Walk::new(a.shape(), [a.strides()]);
        assert_eq!((w.outer.len(), w.inner, w.step), (0, 120, [1]));
        // [2, 4, 3, 5]: runs of 5 contiguous elements.
        let t = a.view().permuted_axes(IxDyn(&[0, 2, 1, 3]));
        let w = Walk::new(t.shape(), [t.strides()]);
        assert_eq!((w.inner, w.step), (5, [1]));
        let mut seen = Vec::new();
        w.pieces(3, 14, |at, [o], take| seen.push((at, o, take)));
        // Elements 3..17 of the transposed order: [3, 4] of run 0, run 1 (at offset 20),
        // run 2 (offset 40), then [0..2] of run 3 (offset 5).
        assert_eq!(seen, vec![(0, 3, 2), (2, 20, 5), (7, 40, 5), (12, 5, 2)]);
        assert_eq!(
            to_standard(&t).iter().collect::<Vec<_>>(),
            t.iter().collect::<Vec<_>>()
        );
        // A broadcast axis has stride 0; a reversed one a negative stride.
        let b = a.slice_axis(Axis(1), Slice::from(0..1));
        let b = b.broadcast(IxDyn(&[2, 3, 4, 5])).unwrap();
        let mut r = a.view();
        r.invert_axis(Axis(3));
        for v in [b, r] {
            assert_eq!(
                to_standard(&v).iter().collect::<Vec<_>>(),
                v.iter().collect::<Vec<_>>()
            );
        }
        let empty = Array::<i32, _>::zeros(IxDyn(&[3, 0, 2]));
        assert_eq!(to_standard(&empty.view()).shape(), &[3, 0, 2]);
    }
}
