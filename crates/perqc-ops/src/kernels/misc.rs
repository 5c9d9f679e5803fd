//! Constants and generators (Constant, ConstantOfShape, Range), casts, Trilu, and
//! QuantizeLinear / DequantizeLinear (per-tensor, per-axis and blocked), and
//! `ai.perqc::FakeQuantize` (per-token dynamic quantization, [`crate::quant`]).

use crate::kernel::{Arr, KernelCtx, KernelError, RtTensor, axis, opt, req, req_f32, req_ints};
use ndarray::{ArrayD, Axis, IxDyn};
use perqc_ir::{AttrValue, DType, Tensor};

type In<'a, 'b> = &'a [Option<&'b RtTensor>];
type Out = Result<Vec<RtTensor>, KernelError>;

/// The node's value attribute (`value`, `value_float(s)`, `value_int(s)`).
pub fn constant(ctx: &KernelCtx<'_>, _: In) -> Out {
    let node = ctx.node;
    let t = match node.attrs.first().map(|a| (a.name.as_str(), &a.value)) {
        Some(("value", AttrValue::Tensor(t))) => RtTensor::from_tensor(t)?,
        Some(("value_float", AttrValue::Float(v))) => {
            RtTensor::f32(ArrayD::from_elem(IxDyn(&[]), *v))
        }
        Some(("value_floats", AttrValue::Floats(v))) => {
            RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.clone())?)
        }
        Some(("value_int", AttrValue::Int(v))) => RtTensor::i64(ArrayD::from_elem(IxDyn(&[]), *v)),
        Some(("value_ints", AttrValue::Ints(v))) => RtTensor::i64_vec(v.clone()),
        other => {
            return Err(KernelError::Invalid(format!(
                "Constant: unsupported value attribute {:?}",
                other.map(|o| o.0)
            )));
        }
    };
    Ok(vec![t])
}

/// A tensor of the given shape filled with the `value` attribute (default f32 0).
pub fn constant_of_shape(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let shape: Vec<usize> = req_ints(inputs, 0)?
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| KernelError::Invalid("negative dim".into())))
        .collect::<Result<_, _>>()?;
    let ix = IxDyn(&shape);
    let value = match ctx.tensor("value") {
        Some(t) => RtTensor::from_tensor(t)?,
        None => RtTensor::from_tensor(&Tensor::from_f32(vec![1], &[0.0]))?,
    };
    if value.len() != 1 {
        return Err(KernelError::Invalid(
            "ConstantOfShape value must have one element".into(),
        ));
    }
    Ok(vec![crate::rt_map!(&value, a => {
        let v = a.iter().next().cloned().expect("one element");
        ArrayD::from_elem(ix, v).into_shared()
    })])
}

/// `start, start + delta, ...` while before `limit`: `max(ceil((limit - start) / delta), 0)`
/// elements.
pub fn range(_: &KernelCtx<'_>, inputs: In) -> Out {
    let (s, l, d) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
    let scalar = |t: &RtTensor| -> Result<f64, KernelError> {
        match t {
            RtTensor::F32(a) if a.len() == 1 => Ok(a.iter().next().copied().unwrap_or(0.0) as f64),
            t if t.len() == 1 => {
                Ok(t.to_i64_vec().and_then(|v| v.first().copied()).unwrap_or(0) as f64)
            }
            _ => Err(KernelError::Invalid(
                "Range operands must be scalars".into(),
            )),
        }
    };
    let (fs, fl, fd) = (scalar(s)?, scalar(l)?, scalar(d)?);
    if fd == 0.0 {
        return Err(KernelError::Invalid("Range delta is 0".into()));
    }
    let n = ((fl - fs) / fd).ceil().max(0.0) as usize;
    Ok(vec![match s {
        RtTensor::F32(_) => {
            let (s, d) = (fs as f32, fd as f32);
            RtTensor::f32(ArrayD::from_shape_fn(IxDyn(&[n]), |i| s + i[0] as f32 * d))
        }
        RtTensor::I64(_) | RtTensor::I32(_) => {
            let (st, d) = (fs as i64, fd as i64);
            let v = ArrayD::from_shape_fn(IxDyn(&[n]), |i| st + i[0] as i64 * d);
            if let RtTensor::I32(_) = s {
                RtTensor::I32(v.mapv(|x| x as i32).into_shared())
            } else {
                RtTensor::i64(v)
            }
        }
        other => {
            return Err(KernelError::InputType {
                index: 0,
                dtype: other.dtype(),
            });
        }
    }])
}

/// Any tensor's values as f32 (bools as 0/1).
fn to_f32(t: &RtTensor) -> Arr<f32> {
    match t {
        RtTensor::F32(a) => a.clone(),
        RtTensor::I64(a) => a.mapv(|v| v as f32).into_shared(),
        RtTensor::I32(a) => a.mapv(|v| v as f32).into_shared(),
        RtTensor::Bool(a) => a.mapv(|v| v as u8 as f32).into_shared(),
        RtTensor::U8(a) | RtTensor::U4(a) => a.mapv(|v| v as f32).into_shared(),
        RtTensor::I8(a) | RtTensor::I4(a) => a.mapv(|v| v as f32).into_shared(),
        RtTensor::F16(a) => a.mapv(f32::from).into_shared(),
        RtTensor::BF16(a) => a.mapv(f32::from).into_shared(),
    }
}

/// Converts to `to`. Float to integer truncates toward zero (saturating); integer to
/// narrower integer wraps (two's complement), as C casts do in ONNX Runtime.
pub fn cast_to(t: &RtTensor, to: DType) -> Result<RtTensor, KernelError> {
    if t.dtype() == to {
        return Ok(t.clone());
    }
    macro_rules! int_to {
        ($ty:ty, $v:ident) => {
            match t {
                RtTensor::F32(a) => a.mapv(|x| x as $ty).into_shared(),
                RtTensor::F16(a) => a.mapv(|x| f32::from(x) as $ty).into_shared(),
                RtTensor::BF16(a) => a.mapv(|x| f32::from(x) as $ty).into_shared(),
                RtTensor::Bool(a) => a.mapv(|x| x as $ty).into_shared(),
                other => {
                    let v = other.to_i64_vec().expect("integer tensor");
                    ArrayD::from_shape_vec(
                        IxDyn(other.shape()),
                        v.into_iter().map(|x| x as $ty).collect(),
                    )?
                    .into_shared()
                }
            }
        };
    }
    Ok(match to {
        DType::F32 => RtTensor::F32(to_f32(t)),
        DType::F16 => RtTensor::F16(to_f32(t).mapv(half::f16::from_f32).into_shared()),
        DType::BF16 => RtTensor::BF16(to_f32(t).mapv(half::bf16::from_f32).into_shared()),
        DType::Bool => RtTensor::Bool(match t {
            RtTensor::F32(a) => a.mapv(|x| x != 0.0).into_shared(),
            RtTensor::F16(a) => a.mapv(|x| f32::from(x) != 0.0).into_shared(),
            RtTensor::BF16(a) => a.mapv(|x| f32::from(x) != 0.0).into_shared(),
            other => {
                let v = other.to_i64_vec().expect("integer tensor");
                ArrayD::from_shape_vec(
                    IxDyn(other.shape()),
                    v.into_iter().map(|x| x != 0).collect(),
                )?
                .into_shared()
            }
        }),
        DType::I64 => RtTensor::I64(int_to!(i64, I64)),
        DType::I32 => RtTensor::I32(int_to!(i32, I32)),
        DType::U8 => RtTensor::U8(int_to!(u8, U8)),
        DType::I8 => RtTensor::I8(int_to!(i8, I8)),
        // 4-bit: exact for in-range values (FakeQuantize's lowering casts zero points in
        // [0, hi]); outside the range this keeps the low nibble of the 8-bit conversion,
        // which is not checked against ONNX Runtime.
        DType::U4 => RtTensor::U4(int_to!(u8, U8).mapv(|v| v & 0xF).into_shared()),
        DType::I4 => RtTensor::I4(
            int_to!(i8, I8)
                .mapv(|v| ((v as u8 & 0xF) as i8) << 4 >> 4)
                .into_shared(),
        ),
        other => return Err(KernelError::UnsupportedType(other)),
    })
}

pub fn cast(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let to = DType::from_code(ctx.int("to", 0) as i32)
        .ok_or_else(|| KernelError::Invalid("Cast: missing or unknown `to`".into()))?;
    Ok(vec![cast_to(req(inputs, 0)?, to)?])
}

pub fn cast_like(_: &KernelCtx<'_>, inputs: In) -> Out {
    Ok(vec![cast_to(req(inputs, 0)?, req(inputs, 1)?.dtype())?])
}

/// Trilu: keeps `j - i >= k` (upper, default) or `j - i <= k` (lower) of the last two axes
/// and zeroes the rest.
pub fn trilu(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req(inputs, 0)?;
    let k = match opt(inputs, 1) {
        Some(_) => req_ints(inputs, 1)?.first().copied().unwrap_or(0),
        None => 0,
    };
    let upper = ctx.int("upper", 1) != 0;
    let r = x.shape().len();
    if r < 2 {
        return Err(KernelError::Invalid("Trilu needs rank >= 2".into()));
    }
    let keep = move |i: usize, j: usize| {
        let d = j as i64 - i as i64;
        if upper { d >= k } else { d <= k }
    };
    macro_rules! tri {
        ($a:expr, $zero:expr) => {{
            let mut o = $a.to_owned();
            for mut m in o
                .lanes_mut(Axis(r - 1))
                .into_iter()
                .enumerate()
                .map(|(n, l)| (n, l))
            {
                let i = m.0 % x.shape()[r - 2];
                for (j, v) in m.1.iter_mut().enumerate() {
                    if !keep(i, j) {
                        *v = $zero;
                    }
                }
            }
            o.into_shared()
        }};
    }
    Ok(vec![match x {
        RtTensor::F32(a) => RtTensor::F32(tri!(a, 0.0)),
        RtTensor::I64(a) => RtTensor::I64(tri!(a, 0)),
        RtTensor::I32(a) => RtTensor::I32(tri!(a, 0)),
        RtTensor::Bool(a) => RtTensor::Bool(tri!(a, false)),
        RtTensor::U8(a) => RtTensor::U8(tri!(a, 0)),
        RtTensor::U4(a) => RtTensor::U4(tri!(a, 0)),
        RtTensor::I8(a) => RtTensor::I8(tri!(a, 0)),
        RtTensor::I4(a) => RtTensor::I4(tri!(a, 0)),
        RtTensor::F16(a) => RtTensor::F16(tri!(a, half::f16::ZERO)),
        RtTensor::BF16(a) => RtTensor::BF16(tri!(a, half::bf16::ZERO)),
    }])
}

/// Where each element of a quantized tensor of `shape` finds its scale (and zero point)
/// in a parameter tensor: one value (per tensor), one per index along `axis` (1-d of
/// `shape[axis]`), or blocked (the same shape but `ceil(shape[axis] / block)` along `axis`:
/// element index `j` there uses parameter index `j / block`). Walked in row-major order,
/// so the parameter is never expanded to the tensor's size.
struct ParamIndex {
    per_tensor: bool,
    /// Elements of `shape` after `axis`, and `shape[axis]`.
    inner: usize,
    along: usize,
    /// 0 per axis, else the block length; `blocks` = `ceil(along / block)`.
    block: usize,
    blocks: usize,
}

impl ParamIndex {
    fn new(p: &[usize], shape: &[usize], ax: usize, block: usize) -> Result<Self, KernelError> {
        let bad = || {
            KernelError::Invalid(format!(
                "quantization parameter {p:?} does not fit {shape:?} (axis {ax}, block {block})"
            ))
        };
        let numel: usize = p.iter().product();
        let along = shape.get(ax).copied().unwrap_or(1);
        let inner = shape.get(ax + 1..).map_or(1, |s| s.iter().product());
        let per_tensor = numel == 1 && block == 0;
        let blocks = if block == 0 {
            along
        } else {
            along.div_ceil(block)
        };
        let fits = per_tensor
            || (block == 0 && p.len() == 1 && p[0] == along && !shape.is_empty())
            || (block > 0
                && p.len() == shape.len()
                && p.iter()
                    .zip(shape)
                    .enumerate()
                    .all(|(d, (&pd, &sd))| if d == ax { pd == blocks } else { pd == sd }));
        if !fits {
            return Err(bad());
        }
        Ok(ParamIndex {
            per_tensor,
            inner,
            along,
            block,
            blocks,
        })
    }

    /// `f(i, j)` for every element `i` of a tensor of `total` elements, in order, with `j`
    /// its parameter's index (row-major in the parameter).
    fn for_each(&self, total: usize, mut f: impl FnMut(usize, usize)) {
        if self.per_tensor {
            (0..total).for_each(|i| f(i, 0));
            return;
        }
        let row = self.along * self.inner;
        let mut i = 0;
        for o in 0..total.checked_div(row).unwrap_or(0) {
            for a in 0..self.along {
                match a.checked_div(self.block) {
                    // Per axis: parameter `a` for the whole slice.
                    None => {
                        for _ in 0..self.inner {
                            f(i, a);
                            i += 1;
                        }
                    }
                    Some(b) => {
                        let base = (o * self.blocks + b) * self.inner;
                        for n in 0..self.inner {
                            f(i, base + n);
                            i += 1;
                        }
                    }
                }
            }
        }
    }
}

/// A parameter (scale or zero point) as a row-major f32 vector.
fn param_values(t: &RtTensor) -> Vec<f32> {
    let f = to_f32(t);
    super::layout::standard(&f)
        .as_slice()
        .expect("standard layout")
        .to_vec()
}

fn q_axis(ctx: &KernelCtx<'_>, rank: usize) -> Result<(usize, usize), KernelError> {
    let ax = if rank == 0 {
        0
    } else {
        axis(ctx.int("axis", 1), rank)?
    };
    let block = usize::try_from(ctx.int("block_size", 0))
        .map_err(|_| KernelError::Invalid("negative block_size".into()))?;
    Ok((ax, block))
}

/// The scale and zero point of a (De)QuantizeLinear, row-major, with their layout.
struct QParams {
    index: ParamIndex,
    scale: Vec<f32>,
    zero: Option<Vec<f32>>,
}

/// The [`QParams`] of a (De)QuantizeLinear over `shape`; a zero point must have the
/// scale's shape.
fn q_params(ctx: &KernelCtx<'_>, inputs: In, shape: &[usize]) -> Result<QParams, KernelError> {
    let (ax, block) = q_axis(ctx, shape.len())?;
    let scale = req(inputs, 1)?;
    if scale.dtype() != DType::F32 {
        return Err(KernelError::InputType {
            index: 1,
            dtype: scale.dtype(),
        });
    }
    let index = ParamIndex::new(scale.shape(), shape, ax, block)?;
    let zero = match opt(inputs, 2) {
        Some(z) if z.shape() != scale.shape() => {
            return Err(KernelError::Invalid(format!(
                "zero point {:?} and scale {:?} differ in shape",
                z.shape(),
                scale.shape()
            )));
        }
        z => z.map(param_values),
    };
    Ok(QParams {
        index,
        scale: param_values(scale),
        zero,
    })
}

/// `y = (x - zero_point) * scale` (`x * scale` without a zero point), element by element
/// with no tensor-sized temporaries (a quantized embedding table is folded this way).
pub fn dequantize_linear(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req(inputs, 0)?;
    if let RtTensor::F32(_) = x {
        return Err(KernelError::InputType {
            index: 0,
            dtype: x.dtype(),
        });
    }
    let shape = x.shape().to_vec();
    let q = q_params(ctx, inputs, &shape)?;
    let (index, s, z) = (&q.index, &q.scale, &q.zero);
    let total = shape.iter().product();
    let mut y: Vec<f32> = Vec::with_capacity(total);
    macro_rules! run {
        ($a:expr, $conv:expr) => {{
            let a = super::layout::standard($a);
            let xs = a.as_slice().expect("standard layout");
            let conv = $conv;
            match &z {
                None => index.for_each(total, |i, j| y.push(conv(xs[i]) * s[j])),
                Some(z) => index.for_each(total, |i, j| y.push((conv(xs[i]) - z[j]) * s[j])),
            }
        }};
    }
    match x {
        RtTensor::U8(a) | RtTensor::U4(a) => run!(a, |v: u8| v as f32),
        RtTensor::I8(a) | RtTensor::I4(a) => run!(a, |v: i8| v as f32),
        RtTensor::I32(a) => run!(a, |v: i32| v as f32),
        RtTensor::I64(a) => run!(a, |v: i64| v as f32),
        RtTensor::Bool(a) => run!(a, |v: bool| v as u8 as f32),
        RtTensor::F16(a) => run!(a, f32::from),
        RtTensor::BF16(a) => run!(a, f32::from),
        RtTensor::F32(_) => unreachable!("rejected above"),
    }
    Ok(vec![RtTensor::f32(ArrayD::from_shape_vec(
        IxDyn(&shape),
        y,
    )?)])
}

/// `y = saturate(round_half_even(x / scale) + zero_point)` into the zero point's type, else
/// `output_dtype` (opset 21), else u8.
pub fn quantize_linear(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req_f32(inputs, 0)?;
    let shape = x.shape().to_vec();
    let q = q_params(ctx, inputs, &shape)?;
    let (index, s, z) = (&q.index, &q.scale, &q.zero);
    let to = match opt(inputs, 2) {
        Some(z) => z.dtype(),
        None => match ctx.int("output_dtype", 0) {
            0 => DType::U8,
            c => DType::from_code(c as i32)
                .ok_or(KernelError::Invalid(format!("unknown output_dtype {c}")))?,
        },
    };
    let (lo, hi) = match to {
        DType::U8 => (0.0, 255.0),
        DType::I8 => (-128.0, 127.0),
        DType::U4 => (0.0, 15.0),
        DType::I4 => (-8.0, 7.0),
        other => return Err(KernelError::UnsupportedType(other)),
    };
    let xs = super::layout::standard(x);
    let xs = xs.as_slice().expect("standard layout");
    let total = xs.len();
    let mut q: Vec<f32> = Vec::with_capacity(total);
    index.for_each(total, |i, j| {
        let zp = z.as_ref().map_or(0.0, |z| z[j]);
        q.push(((xs[i] / s[j]).round_ties_even() + zp).clamp(lo, hi));
    });
    let q = ArrayD::from_shape_vec(IxDyn(&shape), q)?;
    Ok(vec![match to {
        DType::U8 => RtTensor::U8(q.mapv(|v| v as u8).into_shared()),
        DType::U4 => RtTensor::U4(q.mapv(|v| v as u8).into_shared()),
        DType::I8 => RtTensor::I8(q.mapv(|v| v as i8).into_shared()),
        _ => RtTensor::I4(q.mapv(|v| v as i8).into_shared()),
    }])
}

/// `ai.perqc::FakeQuantize(x)`: every row of x's last axis quantized with its own dynamic
/// scale and dequantized ([`crate::quant::fake_quantize_rows`]; attributes `bits`,
/// `symmetric`, `clip`).
pub fn fake_quantize(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let x = req_f32(inputs, 0)?;
    let p = token_quant(ctx.node).map_err(KernelError::Invalid)?;
    let width = x.shape().last().copied().unwrap_or(1);
    let mut v = super::layout::standard(x)
        .as_slice()
        .expect("standard layout")
        .to_vec();
    if ctx.threads > 1 {
        crate::quant::fake_quantize_rows(&mut v, width, p);
    } else {
        crate::quant::fake_quantize_rows_serial(&mut v, width, p);
    }
    Ok(vec![RtTensor::f32(ArrayD::from_shape_vec(
        IxDyn(x.shape()),
        v,
    )?)])
}

/// The quantizer a FakeQuantize node's attributes describe (checked).
pub fn token_quant(node: &perqc_ir::Node) -> Result<crate::quant::TokenQuant, String> {
    let bits = node
        .attr_int("bits")
        .ok_or("attribute `bits` is required")?;
    let p = crate::quant::TokenQuant {
        bits: u32::try_from(bits).unwrap_or(0),
        symmetric: match node.attr_int("symmetric").unwrap_or(0) {
            0 => false,
            1 => true,
            other => return Err(format!("symmetric must be 0 or 1, got {other}")),
        },
        clip: node.attr_float("clip").unwrap_or(1.0),
    };
    p.check()?;
    Ok(p)
}
