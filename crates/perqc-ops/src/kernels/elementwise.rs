//! Elementwise kernels: unary maps, numpy-broadcast binary arithmetic, comparisons, logic,
//! variadic Max/Min and Where.
//!
//! Broadcasting: operands are viewed (never copied) at the broadcast shape and combined in
//! one `Zip` pass that allocates only the result.

use super::layout::{SendPtr, Walk, filled, map_slices};
use super::vmath::multiversion;
use crate::kernel::{Arr, KernelCtx, KernelError, RtTensor, broadcast_shape, req, req_f32};
use ndarray::{ArrayD, IxDyn, Zip};
use std::mem::MaybeUninit;

/// The parallel threshold, also used by kernels outside this module.
pub(crate) use super::layout::PAR_MIN_ELEMS;

type In<'a, 'b> = &'a [Option<&'b RtTensor>];
type Out = Result<Vec<RtTensor>, KernelError>;

/// A binary elementwise op as the loops [`zip2_by`] runs on the pieces of its operands:
/// both contiguous (`vv`), the second fixed (`vs`), the first fixed (`sv`). The defaults
/// apply [`Pair::one`] per element; an implementation may replace them with vectorized
/// loops computing the same `one(x, y)` per element.
pub(crate) trait Pair<A: Copy, B: Copy, C>: Sync {
    fn one(&self, x: A, y: B) -> C;

    fn vv(&self, a: &[A], b: &[B], dst: &mut [MaybeUninit<C>]) {
        for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
            d.write(self.one(x, y));
        }
    }

    fn vs(&self, a: &[A], y: B, dst: &mut [MaybeUninit<C>]) {
        for (d, &x) in dst.iter_mut().zip(a) {
            d.write(self.one(x, y));
        }
    }

    fn sv(&self, x: A, b: &[B], dst: &mut [MaybeUninit<C>]) {
        for (d, &y) in dst.iter_mut().zip(b) {
            d.write(self.one(x, y));
        }
    }
}

/// A closure as a [`Pair`] with the default loops.
struct ByElement<F>(F);

impl<A: Copy, B: Copy, C, F: Fn(A, B) -> C + Sync> Pair<A, B, C> for ByElement<F> {
    #[inline(always)]
    fn one(&self, x: A, y: B) -> C {
        (self.0)(x, y)
    }
}

/// `f(a, b)` over the broadcast of `a` and `b`, written to a fresh row-major array (see
/// [`zip2_by`]).
pub(crate) fn zip2<
    A: Copy + Sync + Send + 'static,
    B: Copy + Sync + Send + 'static,
    C: Copy + Send + 'static,
>(
    a: &Arr<A>,
    b: &Arr<B>,
    f: impl Fn(A, B) -> C + Sync + Send,
) -> Result<ArrayD<C>, KernelError> {
    zip2_by(a, b, &ByElement(f))
}

/// `op(a, b)` over the broadcast of `a` and `b`, written to a fresh row-major array.
///
/// The operands are walked in merged runs (see [`Walk`]); runs with unit or zero strides
/// go to the op's slice loops, others are stepped element by element. Large outputs are
/// split into element ranges over the threads.
pub(crate) fn zip2_by<
    A: Copy + Sync + Send + 'static,
    B: Copy + Sync + Send + 'static,
    C: Copy + Send + 'static,
>(
    a: &Arr<A>,
    b: &Arr<B>,
    op: &impl Pair<A, B, C>,
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
    let walk = Walk::new(&shape, [av.strides(), bv.strides()]);
    let [isa, isb] = walk.step;
    let (pa, pb) = (SendPtr(av.as_ptr()), SendPtr(bv.as_ptr()));
    Ok(filled(&shape, |e0, dst| {
        walk.pieces(e0, dst.len(), |at, [oa, ob], take| {
            let seg = &mut dst[at..at + take];
            // Safety: the offsets and steps index the broadcast views of live arrays.
            unsafe {
                let (xa, xb) = (pa.get().offset(oa), pb.get().offset(ob));
                use std::slice::from_raw_parts as slice;
                match (isa, isb) {
                    (1, 1) => op.vv(slice(xa, take), slice(xb, take), seg),
                    (1, 0) => op.vs(slice(xa, take), *xb, seg),
                    (0, 1) => op.sv(*xa, slice(xb, take), seg),
                    _ => {
                        for (t, d) in seg.iter_mut().enumerate() {
                            let t = t as isize;
                            d.write(op.one(*xa.offset(t * isa), *xb.offset(t * isb)));
                        }
                    }
                }
            }
        });
    }))
}

/// Defines `$name`, an f32 [`Pair`] computing `$e` from `$x` and `$y`, whose slice loops
/// are compiled per vector width.
macro_rules! f32_pair {
    ($name:ident, |$x:ident, $y:ident| $e:expr) => {
        struct $name;

        impl $name {
            multiversion! {
                fn vv_loop(a: &[f32], b: &[f32], dst: &mut [MaybeUninit<f32>]) {
                    for ((d, &$x), &$y) in dst.iter_mut().zip(a).zip(b) {
                        d.write($e);
                    }
                }
            }

            multiversion! {
                fn vs_loop(a: &[f32], $y: f32, dst: &mut [MaybeUninit<f32>]) {
                    for (d, &$x) in dst.iter_mut().zip(a) {
                        d.write($e);
                    }
                }
            }

            multiversion! {
                fn sv_loop($x: f32, b: &[f32], dst: &mut [MaybeUninit<f32>]) {
                    for (d, &$y) in dst.iter_mut().zip(b) {
                        d.write($e);
                    }
                }
            }
        }

        impl Pair<f32, f32, f32> for $name {
            #[inline(always)]
            fn one(&self, $x: f32, $y: f32) -> f32 {
                $e
            }

            fn vv(&self, a: &[f32], b: &[f32], dst: &mut [MaybeUninit<f32>]) {
                Self::vv_loop(a, b, dst)
            }

            fn vs(&self, a: &[f32], y: f32, dst: &mut [MaybeUninit<f32>]) {
                Self::vs_loop(a, y, dst)
            }

            fn sv(&self, x: f32, b: &[f32], dst: &mut [MaybeUninit<f32>]) {
                Self::sv_loop(x, b, dst)
            }
        }
    };
}

f32_pair!(AddF32, |x, y| x + y);
f32_pair!(SubF32, |x, y| x - y);
f32_pair!(MulF32, |x, y| x * y);
f32_pair!(DivF32, |x, y| x / y);

fn type_err(i: usize, t: &RtTensor) -> KernelError {
    KernelError::InputType {
        index: i,
        dtype: t.dtype(),
    }
}

// ---- unary -------------------------------------------------------------------------------

/// A vectorizable elementwise f32 map: `dst[i] = f(src[i])`, equal lengths.
type SliceOp = fn(&[f32], &mut [MaybeUninit<f32>]);

/// Input 0 mapped by `op` into a fresh row-major tensor (strided inputs are read in runs;
/// large ones split over the threads).
fn map_f32(inputs: In, op: SliceOp) -> Out {
    Ok(vec![RtTensor::f32(map_slices(req_f32(inputs, 0)?, op))])
}

/// Exp (vectorized, see `vmath::exp`).
pub fn exp(_: &KernelCtx<'_>, inputs: In) -> Out {
    map_f32(inputs, super::vmath::exp_slice)
}

/// Sigmoid `1 / (1 + e^-x)`, finite for large |x| (vectorized).
pub fn sigmoid(_: &KernelCtx<'_>, inputs: In) -> Out {
    map_f32(inputs, super::vmath::sigmoid_slice)
}

/// Swish (opset 24): `x · sigmoid(alpha · x)`. Alpha 1 (SiLU, `ai.perqc::Swish`, the
/// canonical form of `Mul(x, Sigmoid(x))`) is the vectorized path and equals those two ops
/// bitwise.
pub fn swish(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let alpha = ctx.float("alpha", 1.0);
    if alpha == 1.0 {
        return map_f32(inputs, super::vmath::silu_slice);
    }
    let x = req_f32(inputs, 0)?;
    Ok(vec![RtTensor::f32(
        x.mapv(|v| v * super::vmath::sigmoid(alpha * v)),
    )])
}

/// Defines `$slice`, `dst[i] = $f(src[i])` compiled per vector width, and the kernel
/// `$name` applying it to input 0.
macro_rules! unary_f32 {
    ($($name:ident, $slice:ident => $f:expr;)*) => {$(
        multiversion! {
            fn $slice(src: &[f32], dst: &mut [MaybeUninit<f32>]) {
                let f = $f;
                for (d, &x) in dst.iter_mut().zip(src) {
                    d.write(f(x));
                }
            }
        }

        pub fn $name(_: &KernelCtx<'_>, inputs: In) -> Out {
            map_f32(inputs, $slice)
        }
    )*};
}

unary_f32! {
    sqrt, sqrt_slice => f32::sqrt;
    reciprocal, reciprocal_slice => |x: f32| 1.0 / x;
    erf, erf_slice => libm::erff;
    tanh, tanh_slice => f32::tanh;
    relu, relu_slice => |x: f32| x.max(0.0);
    cos, cos_slice => f32::cos;
    sin, sin_slice => f32::sin;
    neg_f32, neg_slice => |x: f32| -x;
    abs_f32, abs_slice => f32::abs;
    // Half to even, as ONNX Round (and ONNX Runtime's `std::nearbyint`).
    round, round_slice => f32::round_ties_even;
    gelu_erf, gelu_erf_slice => |x: f32| {
        0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
    };
    gelu_tanh, gelu_tanh_slice => |x: f32| {
        let c = (2.0f32 / std::f32::consts::PI).sqrt();
        0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
    };
}

multiversion! {
    /// `dst[i] = src[i]^2`, as `x * x` (exactly what `powf(x, 2)` returns).
    fn square_slice(src: &[f32], dst: &mut [MaybeUninit<f32>]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            d.write(x * x);
        }
    }
}

/// Gelu: `x/2 (1 + erf(x/sqrt 2))`, or with `approximate="tanh"`
/// `x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub fn gelu(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    if ctx.string("approximate") == Some(b"tanh") {
        gelu_tanh(ctx, inputs)
    } else {
        gelu_erf(ctx, inputs)
    }
}

pub fn neg(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let a = req(inputs, 0)?;
    Ok(vec![match a {
        RtTensor::F32(_) => return neg_f32(ctx, inputs),
        RtTensor::I64(a) => RtTensor::i64(a.map(|&x| x.wrapping_neg())),
        RtTensor::I32(a) => RtTensor::I32(a.map(|&x| x.wrapping_neg()).into_shared()),
        RtTensor::I8(a) => RtTensor::I8(a.map(|&x| x.wrapping_neg()).into_shared()),
        other => return Err(type_err(0, other)),
    }])
}

pub fn abs(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    Ok(vec![match req(inputs, 0)? {
        RtTensor::F32(_) => return abs_f32(ctx, inputs),
        RtTensor::I64(a) => RtTensor::i64(a.map(|&x| x.wrapping_abs())),
        RtTensor::I32(a) => RtTensor::I32(a.map(|&x| x.wrapping_abs()).into_shared()),
        other => return Err(type_err(0, other)),
    }])
}

/// Clip: `min(max(x, lo), hi)` with the bounds from the `min` / `max` attributes before
/// opset 11, from optional scalar inputs 1 and 2 after (a missing bound does not clip).
/// NaN stays NaN.
pub fn clip(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req(inputs, 0)?;
    let bound = |i: usize, name: &str, default: f32| -> Result<f32, KernelError> {
        if ctx.opset < 11 {
            return Ok(ctx.float(name, default));
        }
        match inputs.get(i).copied().flatten() {
            None => Ok(default),
            Some(RtTensor::F32(b)) if b.len() == 1 => Ok(*b.iter().next().expect("one")),
            Some(other) => Err(type_err(i, other)),
        }
    };
    match x {
        RtTensor::F32(a) => {
            let lo = bound(1, "min", f32::NEG_INFINITY)?;
            let hi = bound(2, "max", f32::INFINITY)?;
            Ok(vec![RtTensor::f32(
                a.map(|&v| if v.is_nan() { v } else { v.max(lo).min(hi) }),
            )])
        }
        other => Err(type_err(0, other)),
    }
}

pub fn not(_: &KernelCtx<'_>, inputs: In) -> Out {
    match req(inputs, 0)? {
        RtTensor::Bool(a) => Ok(vec![RtTensor::bool(a.map(|&x| !x))]),
        other => Err(type_err(0, other)),
    }
}

/// IsNaN: where the input is NaN (f32, f16, bf16). torch's SDPA export guards a fully masked
/// softmax row with `Where(IsNaN(p), 0, p)`.
pub fn is_nan(_: &KernelCtx<'_>, inputs: In) -> Out {
    Ok(vec![RtTensor::bool(match req(inputs, 0)? {
        RtTensor::F32(a) => a.map(|x| x.is_nan()),
        RtTensor::F16(a) => a.map(|x| x.is_nan()),
        RtTensor::BF16(a) => a.map(|x| x.is_nan()),
        other => return Err(type_err(0, other)),
    })])
}

/// IsInf: where the input is +inf (unless `detect_positive = 0`) or -inf (unless
/// `detect_negative = 0`).
pub fn is_inf(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let (pos, neg) = (
        ctx.int("detect_positive", 1) != 0,
        ctx.int("detect_negative", 1) != 0,
    );
    let hit = |x: f32| x.is_infinite() && if x > 0.0 { pos } else { neg };
    Ok(vec![RtTensor::bool(match req(inputs, 0)? {
        RtTensor::F32(a) => a.map(|&x| hit(x)),
        RtTensor::F16(a) => a.map(|x| hit(x.to_f32())),
        RtTensor::BF16(a) => a.map(|x| hit(x.to_f32())),
        other => return Err(type_err(0, other)),
    })])
}

// ---- binary arithmetic ---------------------------------------------------------------------

macro_rules! arith {
    ($name:ident, $ff:expr, $fi:expr) => {
        pub fn $name(_: &KernelCtx<'_>, inputs: In) -> Out {
            let (a, b) = (req(inputs, 0)?, req(inputs, 1)?);
            Ok(vec![match (a, b) {
                (RtTensor::F32(a), RtTensor::F32(b)) => RtTensor::f32(zip2_by(a, b, &$ff)?),
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

arith!(add, AddF32, |x: i64, y: i64| x.wrapping_add(y));
arith!(sub, SubF32, |x: i64, y: i64| x.wrapping_sub(y));
arith!(mul, MulF32, |x: i64, y: i64| x.wrapping_mul(y));
// Integer division truncates toward zero (C semantics, as ONNX Runtime); a zero divisor is
// reported before dividing.
arith!(div_inner, DivF32, |x: i64, y: i64| x.wrapping_div(y));

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
            map_slices(a, square_slice)
        } else if p == 0.5 {
            map_slices(a, sqrt_slice)
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

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};
    use perqc_ir::{AttrValue, Graph, NodeSpec};

    fn run_on(op: &str, attrs: &[(&str, i64)], x: RtTensor) -> Vec<bool> {
        let mut g = Graph::new("t");
        let mut spec = NodeSpec::new(op);
        for (k, v) in attrs {
            spec = spec.attr(k, AttrValue::Int(*v));
        }
        let id = g.add_node(spec, &[], &["y"]).unwrap();
        let ctx = KernelCtx {
            node: g.node(id),
            opset: 20,
            threads: 1,
            subgraphs: None,
        };
        let f = if op == "IsNaN" { is_nan } else { is_inf };
        match &f(&ctx, &[Some(&x)]).unwrap()[0] {
            RtTensor::Bool(a) => a.iter().copied().collect(),
            t => panic!("{op} gave {}", t.dtype()),
        }
    }

    /// Every class of value in f32 and f16, and IsInf's two switches (ONNX examples).
    #[test]
    fn is_nan_and_is_inf_by_value_class() {
        let v = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -1.5, 3e38];
        let f = ArrayD::from_shape_vec(IxDyn(&[2, 3]), v).unwrap();
        let inputs = [
            RtTensor::f32(f.clone()),
            RtTensor::F16(f.mapv(half::f16::from_f32).into_shared()),
        ];
        for x in inputs {
            let f16 = x.dtype() == perqc_ir::DType::F16;
            assert_eq!(
                run_on("IsNaN", &[], x.clone()),
                [true, false, false, false, false, false]
            );
            // 3e38 overflows f16 to +inf.
            let big = f16;
            assert_eq!(
                run_on("IsInf", &[], x.clone()),
                [false, true, true, false, false, big]
            );
            assert_eq!(
                run_on("IsInf", &[("detect_negative", 0)], x.clone()),
                [false, true, false, false, false, big]
            );
            assert_eq!(
                run_on("IsInf", &[("detect_positive", 0)], x.clone()),
                [false, false, true, false, false, false]
            );
        }
        let mut g = Graph::new("t");
        let id = g.add_node(NodeSpec::new("IsNaN"), &[], &["y"]).unwrap();
        let ctx = KernelCtx {
            node: g.node(id),
            opset: 20,
            threads: 1,
            subgraphs: None,
        };
        let ints = RtTensor::i64(ArrayD::from_elem(IxDyn(&[2]), 1));
        assert!(
            is_nan(&ctx, &[Some(&ints)]).is_err(),
            "integers are refused"
        );
    }
}
