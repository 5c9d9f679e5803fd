//! Elementwise kernels: unary maps, numpy-broadcast binary arithmetic, comparisons, logic,
//! variadic Max/Min and Where.
//!
//! Broadcasting: operands are viewed (never copied) at the broadcast shape and combined in
//! one `Zip` pass that allocates only the result.

use crate::ops::kernel::{Arr, KernelCtx, KernelError, RtTensor, broadcast_shape, req, req_f32};
use ndarray::{ArrayD, IxDyn, Zip};

type In<'a, 'b> = &'a [Option<&'b RtTensor>];
type Out = Result<Vec<RtTensor>, KernelError>;

/// `f(a, b)` over the broadcast of `a` and `b`, written to a fresh row-major array.
///
/// The broadcast views' axes are merged where both operands step through them uniformly,
/// leaving an inner run walked with raw strides (unit and zero strides get their own,
/// vectorizable loops); large outputs are split into element ranges over the threads.
pub(crate) fn zip2<A: Copy + Sync + Send, B: Copy + Sync + Send, C: Copy + Send>(
    a: &Arr<A>,
    b: &Arr<B>,
    f: impl Fn(A, B) -> C + Sync + Send,
) -> Result<ArrayD<C>, KernelError> {
    let shape = if a.shape() == b.shape() {
        a.shape().to_vec()
    } else {
        broadcast_shape(a.shape(), b.shape())?
    };
    let bad = || KernelError::Broadcast {
        a: a.shape().to_vec(),
        b: b.shape().to_vec(),
    };
    let av = a.broadcast(IxDyn(&shape)).ok_or_else(bad)?;
    let bv = b.broadcast(IxDyn(&shape)).ok_or_else(bad)?;
    let n: usize = shape.iter().product();
    // (len, stride in a, stride in b), outermost first, unit axes dropped, mergeable
    // neighbours merged.
    let mut dims: Vec<(usize, isize, isize)> = Vec::with_capacity(shape.len());
    for (i, &len) in shape.iter().enumerate() {
        if len == 1 {
            continue;
        }
        let (sa, sb) = (av.strides()[i], bv.strides()[i]);
        if let Some(last) = dims.last_mut()
            && last.1 == sa * len as isize
            && last.2 == sb * len as isize
        {
            *last = (last.0 * len, sa, sb);
            continue;
        }
        dims.push((len, sa, sb));
    }
    let (inner, isa, isb) = dims.pop().unwrap_or((1, 0, 0));
    let outer = dims;
    let mut out: Vec<C> = crate::ops::kernel::output_vec(n);
    if n > 0 {
        let (pa, pb) = (SendPtr(av.as_ptr()), SendPtr(bv.as_ptr()));
        // Fills `dst` = output elements `e0..e0 + dst.len()`.
        let fill = |e0: usize, dst: &mut [std::mem::MaybeUninit<C>]| {
            let (pa, pb) = (pa, pb);
            let mut row = e0 / inner;
            let mut j = e0 % inner;
            let mut done = 0;
            while done < dst.len() {
                // Offsets of output row `row`.
                let (mut oa, mut ob) = (0isize, 0isize);
                let mut r = row;
                for &(len, sa, sb) in outer.iter().rev() {
                    let i = (r % len) as isize;
                    r /= len;
                    oa += i * sa;
                    ob += i * sb;
                }
                let take = (inner - j).min(dst.len() - done);
                let seg = &mut dst[done..done + take];
                // Safety: the offsets index the broadcast views of live arrays (strides
                // from `broadcast`), staying inside the row `row`.
                unsafe {
                    let xa = pa.0.offset(oa + j as isize * isa);
                    let xb = pb.0.offset(ob + j as isize * isb);
                    match (isa, isb) {
                        (1, 1) => {
                            let (sa, sb) = (
                                std::slice::from_raw_parts(xa, take),
                                std::slice::from_raw_parts(xb, take),
                            );
                            for ((d, &x), &y) in seg.iter_mut().zip(sa).zip(sb) {
                                d.write(f(x, y));
                            }
                        }
                        (1, 0) => {
                            let (sa, y) = (std::slice::from_raw_parts(xa, take), *xb);
                            for (d, &x) in seg.iter_mut().zip(sa) {
                                d.write(f(x, y));
                            }
                        }
                        (0, 1) => {
                            let (x, sb) = (*xa, std::slice::from_raw_parts(xb, take));
                            for (d, &y) in seg.iter_mut().zip(sb) {
                                d.write(f(x, y));
                            }
                        }
                        _ => {
                            for (t, d) in seg.iter_mut().enumerate() {
                                let t = t as isize;
                                d.write(f(*xa.offset(t * isa), *xb.offset(t * isb)));
                            }
                        }
                    }
                }
                done += take;
                row += 1;
                j = 0;
            }
        };
        let dst = &mut out.spare_capacity_mut()[..n];
        if n >= PAR_MIN_ELEMS {
            use rayon::prelude::*;
            let chunk = (n / (4 * rayon::current_num_threads().max(1))).max(4096);
            dst.par_chunks_mut(chunk)
                .enumerate()
                .for_each(|(c, d)| fill(c * chunk, d));
        } else {
            fill(0, dst);
        }
        // Safety: `fill` wrote all `n` elements.
        unsafe { out.set_len(n) };
    }
    Ok(ArrayD::from_shape_vec(IxDyn(&shape), out)?)
}

/// A raw element pointer shared by the threads of one kernel (read-only).
#[derive(Clone, Copy)]
struct SendPtr<T>(*const T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

/// Elementwise ops on at least this many elements split the work over the session's
/// threads (rayon); below it the split costs more than it saves.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 16;

fn type_err(i: usize, t: &RtTensor) -> KernelError {
    KernelError::InputType {
        index: i,
        dtype: t.dtype(),
    }
}

// ---- unary -------------------------------------------------------------------------------

fn map_f32(inputs: In, f: impl Fn(f32) -> f32 + Sync + Send) -> Out {
    let a = req_f32(inputs, 0)?;
    Ok(vec![RtTensor::f32(if a.len() >= PAR_MIN_ELEMS {
        Zip::from(a).par_map_collect(|&x| f(x))
    } else {
        a.map(|&x| f(x))
    })])
}

/// `f` (a slice-to-slice map) over a row-major copy of input 0, split over threads for large
/// tensors.
fn map_f32_slices(inputs: In, f: fn(&[f32], &mut [f32])) -> Out {
    let a = req_f32(inputs, 0)?;
    let src = a.as_standard_layout();
    let src = src.as_slice().expect("standard layout");
    let mut out = vec![0f32; src.len()];
    par_slices(src, &mut out, f);
    Ok(vec![RtTensor::f32(ArrayD::from_shape_vec(
        IxDyn(a.shape()),
        out,
    )?)])
}

/// `f(src, dst)` on matching chunks, in parallel when the slices are large.
pub(crate) fn par_slices(src: &[f32], dst: &mut [f32], f: fn(&[f32], &mut [f32])) {
    if src.len() >= PAR_MIN_ELEMS {
        use rayon::prelude::*;
        let chunk = (src.len() / (4 * rayon::current_num_threads().max(1))).max(4096);
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| f(s, d));
    } else {
        f(src, dst);
    }
}

/// Exp (vectorized, see `vmath::exp`).
pub fn exp(_: &KernelCtx<'_>, inputs: In) -> Out {
    map_f32_slices(inputs, super::vmath::exp_slice)
}

/// Sigmoid `1 / (1 + e^-x)`, finite for large |x| (vectorized).
pub fn sigmoid(_: &KernelCtx<'_>, inputs: In) -> Out {
    map_f32_slices(inputs, super::vmath::sigmoid_slice)
}

macro_rules! unary_f32 {
    ($($name:ident => $f:expr;)*) => {$(
        pub fn $name(_: &KernelCtx<'_>, inputs: In) -> Out {
            map_f32(inputs, $f)
        }
    )*};
}

unary_f32! {
    sqrt => f32::sqrt;
    reciprocal => |x: f32| 1.0 / x;

    erf => libm::erff;
    tanh => f32::tanh;
    relu => |x: f32| x.max(0.0);
    cos => f32::cos;
    sin => f32::sin;
}

/// Gelu: `x/2 (1 + erf(x/sqrt 2))`, or with `approximate="tanh"`
/// `x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub fn gelu(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    if ctx.string("approximate") == Some(b"tanh") {
        let c = (2.0f32 / std::f32::consts::PI).sqrt();
        map_f32(inputs, move |x| {
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        })
    } else {
        map_f32(inputs, |x| {
            0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
        })
    }
}

pub fn neg(_: &KernelCtx<'_>, inputs: In) -> Out {
    let a = req(inputs, 0)?;
    Ok(vec![match a {
        RtTensor::F32(a) => RtTensor::f32(a.map(|&x| -x)),
        RtTensor::I64(a) => RtTensor::i64(a.map(|&x| x.wrapping_neg())),
        RtTensor::I32(a) => RtTensor::I32(a.map(|&x| x.wrapping_neg()).into_shared()),
        RtTensor::I8(a) => RtTensor::I8(a.map(|&x| x.wrapping_neg()).into_shared()),
        other => return Err(type_err(0, other)),
    }])
}

pub fn not(_: &KernelCtx<'_>, inputs: In) -> Out {
    match req(inputs, 0)? {
        RtTensor::Bool(a) => Ok(vec![RtTensor::bool(a.map(|&x| !x))]),
        other => Err(type_err(0, other)),
    }
}

// ---- binary arithmetic ---------------------------------------------------------------------

macro_rules! arith {
    ($name:ident, $ff:expr, $fi:expr) => {
        pub fn $name(_: &KernelCtx<'_>, inputs: In) -> Out {
            let (a, b) = (req(inputs, 0)?, req(inputs, 1)?);
            Ok(vec![match (a, b) {
                (RtTensor::F32(a), RtTensor::F32(b)) => RtTensor::f32(zip2(a, b, $ff)?),
                (RtTensor::I64(a), RtTensor::I64(b)) => RtTensor::i64(zip2(a, b, $fi)?),
                (RtTensor::I32(a), RtTensor::I32(b)) => RtTensor::I32(
                    zip2(a, b, |x: i32, y: i32| $fi(x as i64, y as i64) as i32)?.into_shared(),
                ),
                (a, b) if a.dtype() != b.dtype() => return Err(type_err(1, b)),
                (a, _) => return Err(type_err(0, a)),
            }])
        }
    };
}

arith!(add, |x: f32, y: f32| x + y, |x: i64, y: i64| x
    .wrapping_add(y));
arith!(sub, |x: f32, y: f32| x - y, |x: i64, y: i64| x
    .wrapping_sub(y));
arith!(mul, |x: f32, y: f32| x * y, |x: i64, y: i64| x
    .wrapping_mul(y));
// Integer division truncates toward zero (C semantics, as ONNX Runtime); a zero divisor is
// reported before dividing.
arith!(div_inner, |x: f32, y: f32| x / y, |x: i64, y: i64| x
    .wrapping_div(y));

pub fn div(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let b = req(inputs, 1)?;
    if !matches!(b, RtTensor::F32(_)) && b.to_i64_vec().is_some_and(|v| v.contains(&0)) {
        return Err(KernelError::Invalid("integer division by zero".into()));
    }
    div_inner(ctx, inputs)
}

/// Pow: f32 base; f32 or integer exponent. Scalar exponents 2 and 0.5 take exact fast paths
/// (`x*x`, `sqrt x`), which `powf` also returns exactly.
pub fn pow(_: &KernelCtx<'_>, inputs: In) -> Out {
    let a = req_f32(inputs, 0)?;
    let e = req(inputs, 1)?;
    let ef: Arr<f32> = match e {
        RtTensor::F32(e) => e.clone(),
        other => match other.to_i64_vec() {
            Some(v) => {
                ArrayD::from_shape_vec(IxDyn(other.shape()), v.iter().map(|&x| x as f32).collect())?
                    .into_shared()
            }
            None => return Err(type_err(1, other)),
        },
    };
    if ef.len() == 1 && ef.ndim() <= a.ndim() {
        let p = *ef.iter().next().expect("one element");
        let out = if p == 2.0 {
            a.map(|&x| x * x)
        } else if p == 0.5 {
            a.map(|&x| x.sqrt())
        } else {
            a.map(|&x| x.powf(p))
        };
        return Ok(vec![RtTensor::f32(out)]);
    }
    Ok(vec![RtTensor::f32(zip2(a, &ef, f32::powf)?)])
}

// ---- comparisons and logic --------------------------------------------------------------

macro_rules! compare {
    ($name:ident, $op:tt) => {
        pub fn $name(_: &KernelCtx<'_>, inputs: In) -> Out {
            let (a, b) = (req(inputs, 0)?, req(inputs, 1)?);
            let out = match (a, b) {
                (RtTensor::F32(a), RtTensor::F32(b)) => zip2(a, b, |x, y| x $op y)?,
                (RtTensor::I64(a), RtTensor::I64(b)) => zip2(a, b, |x, y| x $op y)?,
                (RtTensor::I32(a), RtTensor::I32(b)) => zip2(a, b, |x, y| x $op y)?,
                (RtTensor::Bool(a), RtTensor::Bool(b)) => zip2(a, b, |x, y| x $op y)?,
                (RtTensor::U8(a), RtTensor::U8(b)) => zip2(a, b, |x, y| x $op y)?,
                (RtTensor::I8(a), RtTensor::I8(b)) => zip2(a, b, |x, y| x $op y)?,
                (a, b) if a.dtype() != b.dtype() => return Err(type_err(1, b)),
                (a, _) => return Err(type_err(0, a)),
            };
            Ok(vec![RtTensor::bool(out)])
        }
    };
}

compare!(equal, ==);
compare!(less, <);
compare!(less_or_equal, <=);
compare!(greater, >);
compare!(greater_or_equal, >=);

macro_rules! logic {
    ($name:ident, $f:expr) => {
        pub fn $name(_: &KernelCtx<'_>, inputs: In) -> Out {
            match (req(inputs, 0)?, req(inputs, 1)?) {
                (RtTensor::Bool(a), RtTensor::Bool(b)) => Ok(vec![RtTensor::bool(zip2(a, b, $f)?)]),
                (RtTensor::Bool(_), b) => Err(type_err(1, b)),
                (a, _) => Err(type_err(0, a)),
            }
        }
    };
}

logic!(and, |x: bool, y: bool| x && y);
logic!(or, |x: bool, y: bool| x || y);
logic!(xor, |x: bool, y: bool| x ^ y);

// ---- variadic ----------------------------------------------------------------------------

macro_rules! variadic {
    ($name:ident, $ff:expr, $fi:expr) => {
        /// Folds the inputs left to right with broadcasting. NaN propagates (as in ONNX
        /// Runtime) for floats.
        pub fn $name(_: &KernelCtx<'_>, inputs: In) -> Out {
            let mut acc = req(inputs, 0)?.clone();
            for (i, t) in inputs.iter().enumerate().skip(1) {
                let Some(t) = t else { continue };
                acc = match (&acc, *t) {
                    (RtTensor::F32(a), RtTensor::F32(b)) => RtTensor::f32(zip2(a, b, $ff)?),
                    (RtTensor::I64(a), RtTensor::I64(b)) => RtTensor::i64(zip2(a, b, $fi)?),
                    (_, b) => return Err(type_err(i, b)),
                };
            }
            if let RtTensor::F32(_) | RtTensor::I64(_) = acc {
                Ok(vec![acc])
            } else {
                Err(type_err(0, &acc))
            }
        }
    };
}

variadic!(
    max,
    |x: f32, y: f32| if x.is_nan() || y.is_nan() {
        f32::NAN
    } else {
        x.max(y)
    },
    |x: i64, y: i64| x.max(y)
);
variadic!(
    min,
    |x: f32, y: f32| if x.is_nan() || y.is_nan() {
        f32::NAN
    } else {
        x.min(y)
    },
    |x: i64, y: i64| x.min(y)
);

/// `Where(c, x, y)`: `x` where `c`, else `y`, with three-way broadcasting.
pub fn where_(_: &KernelCtx<'_>, inputs: In) -> Out {
    let RtTensor::Bool(c) = req(inputs, 0)? else {
        return Err(type_err(0, req(inputs, 0)?));
    };
    let (x, y) = (req(inputs, 1)?, req(inputs, 2)?);
    let shape = broadcast_shape(&broadcast_shape(c.shape(), x.shape())?, y.shape())?;
    let ix = IxDyn(&shape);
    let bad = || KernelError::Broadcast {
        a: c.shape().to_vec(),
        b: shape.clone(),
    };
    let cv = c.broadcast(ix.clone()).ok_or_else(bad)?;
    macro_rules! sel {
        ($x:expr, $y:expr) => {{
            let xv = $x.broadcast(ix.clone()).ok_or_else(bad)?;
            let yv = $y.broadcast(ix.clone()).ok_or_else(bad)?;
            Zip::from(&cv)
                .and(&xv)
                .and(&yv)
                .map_collect(|&c, &x, &y| if c { x } else { y })
                .into_shared()
        }};
    }
    Ok(vec![match (x, y) {
        (RtTensor::F32(x), RtTensor::F32(y)) => RtTensor::F32(sel!(x, y)),
        (RtTensor::I64(x), RtTensor::I64(y)) => RtTensor::I64(sel!(x, y)),
        (RtTensor::I32(x), RtTensor::I32(y)) => RtTensor::I32(sel!(x, y)),
        (RtTensor::Bool(x), RtTensor::Bool(y)) => RtTensor::Bool(sel!(x, y)),
        (RtTensor::U8(x), RtTensor::U8(y)) => RtTensor::U8(sel!(x, y)),
        (RtTensor::I8(x), RtTensor::I8(y)) => RtTensor::I8(sel!(x, y)),
        (_, y) => return Err(type_err(2, y)),
    }])
}
