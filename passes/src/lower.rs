//! `lower`: canonical `ai.perqc` ops back into ops of the model's own opset, for export.
//!
//! Assumes: shapes inferable (grouped attention needs head counts and head dims).
//!
//! Guarantees: no `ai.perqc` node is left and the `ai.perqc` opset import is gone, so the
//! model uses only ops its declared opsets have. Each canonical op becomes the ONNX op of
//! the same name where the model's default opset has it, else the chain canonicalization
//! read (the last node of the chain takes over the canonical node's results, so value
//! names, graph outputs included, stay). An op it cannot lower is an error naming the node.
//!
//! Identities, per op (the inverse of `canonicalize`'s):
//! - `Linear(x, W, b, transB) == Add(MatMul(x, W'), b)` with `W' = Transpose(W)` under
//!   transB; `Gemm(x, W, b, transB = 1)` for a 2-d x with transB (no ONNX op of its own).
//! - `Swish(x, alpha) == Mul(x, Sigmoid(x))` for alpha 1, `Mul(x, Sigmoid(Mul(x, alpha)))`
//!   otherwise (ONNX Swish from opset 24).
//! - `RMSNormalization(x, g, eps) == Mul(Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Mul(x, x),
//!   [-1]), eps)))), g)` (ONNX from opset 23).
//! - `Gelu(x) == Mul(Mul(x, Add(Erf(Div(x, √2)), 1)), 0.5)`, the tanh form for
//!   `approximate = "tanh"` (ONNX Gelu from opset 20).
//! - `LayerNormalization(x, g, b, eps) == Add(Mul(Div(d, Sqrt(Add(ReduceMean(Mul(d, d)),
//!   eps))), g), b)` with `d = Sub(x, ReduceMean(x))` over the normalized axes (ONNX from
//!   opset 17).
//! - `Attention(q, k, v, m, c) == MatMul(Softmax(Add(Mul(MatMul(q, kᵀ), c), m)), v)` with
//!   one key/value head per query head (with `softcap = t > 0`, the scaled scores `x` go
//!   through `Mul(Tanh(Div(x, t)), t)` before the `Add`, the chain `fuse-attention` reads); with G query heads per key/value head, q is viewed
//!   as `[B, Hkv, G, S, D]` and k, v get a broadcast axis of size 1 at 2, so MatMul's
//!   broadcasting pairs each group with its shared head and no copy is made; the result
//!   is reshaped back to `[B, Hq, S, Dv]` (ONNX from opset 23, where a fully masked row
//!   gives 0 instead of the NaN of this chain and of `ai.perqc::Attention`).
//! - `Hadamard(x, H) == Reshape(MatMul(Reshape(x, [0, .., 0, f/b, b]), H), [0, .., 0, f])`
//!   for x `[.., f]` of rank r (r - 1 zeros: Reshape copies those dims) and H `[b, b]`:
//!   MatMul applies H to every block of b channels, which is the op's definition (no ONNX
//!   op of its own). `-1` stands for `f/b` and `f` when f is not a known number.
//! - `Rotary(x, cos, sin) == Add(Mul(x, cos), Mul(Concat(Neg(Slice(x, [h, D))), Slice(x,
//!   [0, h)), axis = last), sin))` for x's last dim D (a known number), h = D / 2 (no ONNX
//!   op of its own: ONNX's RotaryEmbedding takes half-width caches).
//! - `FakeQuantize(x, bits, symmetric, clip)` (per-token dynamic quantization, no ONNX op
//!   of its own; see `perqc_ops::quant`) becomes the graph that computes it, which needs
//!   default opset 21 (uint4 / int4 and blocked `QuantizeLinear`): a model below it is
//!   upgraded first ([`crate::opset::upgrade`], refused with the node that blocks it). The
//!   scale, axes `[-1]`, keepdims 1, `TINY = perqc_ops::quant::TINY`, `hi` the largest code:
//!   asymmetric `s = Max(Div(Sub(Max(ReduceMax(x), 0)·c, Min(ReduceMin(x), 0)·c), hi), TINY)`
//!   and `zf = Round(Neg(Div(Min(ReduceMin(x), 0)·c, s)))`; symmetric
//!   `s = Max(Div(ReduceMax(Abs(x))·c, hi), TINY)` (`·c` = `Mul(·, clip)`, absent when clip
//!   is 1). For 4 bits the codes are ONNX's: `QuantizeLinear(x, s, zp, axis = -1,
//!   block_size = D) -> DequantizeLinear(·, s, zp, same)` with one block per row (D the
//!   last dim, which must be a known number), `zp = Cast(zf, to = uint4)`, or no zero point
//!   and `output_dtype = int4` when symmetric. Other widths are written in float ops:
//!   `Mul(Sub(Clip(Add(Round(Div(x, s)), zf), 0, hi), zf), s)`, symmetric
//!   `Mul(Clip(Round(Div(x, s)), lo, hi), s)` (for 8 bits ONNX has code types, but ONNX
//!   Runtime fuses an 8-bit per-token QDQ before a MatMul into a kernel that rejects
//!   per-token zero points; `fuse-fake-quantize` still reads 8-bit QDQ written elsewhere). Both
//!   compute the kernel's f32 arithmetic step for step (Q/DQ in int32, exact for codes).

use perqc_ir::{
    AttrValue, DType, Graph, Model, NodeId, NodeSpec, OptionError, Pass, PassContext, PassError,
    PassOptions, PassOutcome, Patch, PatchValue, Tensor, ValueId,
};
use perqc_ops::{PERQC_DOMAIN, ShapeMap};

/// The default opset `FakeQuantize`'s lowering needs (uint4 / int4, blocked Q/DQ).
pub const FAKE_QUANTIZE_OPSET: i64 = 21;

#[derive(Debug, Default)]
pub struct Lower;

impl Lower {
    pub const NAME: &'static str = "lower";
    pub const DESCRIPTION: &'static str =
        "turn canonical ai.perqc ops back into ops of the model's opset (before export)";

    pub fn from_options(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        opts.allow_only(&[])?;
        Ok(Box::new(Lower))
    }
}

/// What lowering one node needs to know about the model.
struct Env<'a> {
    g: &'a Graph,
    shapes: &'a ShapeMap,
    opset: i64,
}

impl Env<'_> {
    fn known_dim(&self, v: ValueId, axis: usize) -> Option<i64> {
        self.shapes.shape(v)?.get(axis)?.known()
    }
}

/// A node spec of the default domain.
fn op(op_type: &str) -> NodeSpec {
    NodeSpec::new(op_type)
}

/// Inserts `spec` before `at` with one result named after `base`.
fn emit(
    p: &mut Patch,
    at: NodeId,
    spec: NodeSpec,
    inputs: &[PatchValue],
    base: &str,
) -> PatchValue {
    p.insert(at, spec, inputs.iter().map(|&v| Some(v)), &[base])[0]
}

fn ints(p: &mut Patch, name: &str, v: &[i64]) -> PatchValue {
    p.add_initializer(name, Tensor::from_i64(vec![v.len() as i64], v))
}

/// `Unsqueeze(x, [axis])` in the opset's spelling.
fn unsqueeze(e: &Env<'_>, p: &mut Patch, at: NodeId, x: PatchValue, axis: i64) -> PatchValue {
    if e.opset < 13 {
        emit(
            p,
            at,
            op("Unsqueeze").attr("axes", AttrValue::Ints(vec![axis])),
            &[x],
            "unsq",
        )
    } else {
        let axes = ints(p, "unsqueeze_axes", &[axis]);
        emit(p, at, op("Unsqueeze"), &[x, axes], "unsq")
    }
}

fn swish(e: &Env<'_>, id: NodeId) -> Result<Patch, String> {
    let n = e.g.node(id);
    let x: PatchValue = n.input(0).ok_or("has no input")?.into();
    let alpha = n.attr_float("alpha").unwrap_or(1.0);
    let mut p = Patch::new();
    let arg = if alpha == 1.0 {
        x
    } else {
        let a = scalar(&mut p, "swish_alpha", alpha);
        emit(&mut p, id, op("Mul"), &[x, a], "swish_ax")
    };
    let s = emit(&mut p, id, op("Sigmoid"), &[arg], "swish_sigmoid");
    p.set_op(id, op("Mul"), [Some(x), Some(s)]);
    Ok(p)
}

fn rms_norm(e: &Env<'_>, id: NodeId) -> Result<Patch, String> {
    let n = e.g.node(id);
    let (Some(x), Some(gamma)) = (n.input(0), n.input(1)) else {
        return Err("needs x and scale".into());
    };
    let axes = norm_axes(e, x, n.attr_int("axis").unwrap_or(-1))?;
    let eps = n.attr_float("epsilon").unwrap_or(1e-5);
    let mut p = Patch::new();
    let x: PatchValue = x.into();
    let sq = emit(&mut p, id, op("Mul"), &[x, x], "rms_square");
    let mean = reduce_mean(e, &mut p, id, sq, &axes, "rms_mean");
    let eps = scalar(&mut p, "rms_eps", eps);
    let sum = emit(&mut p, id, op("Add"), &[mean, eps], "rms_add_eps");
    let root = emit(&mut p, id, op("Sqrt"), &[sum], "rms_sqrt");
    let r = emit(&mut p, id, op("Reciprocal"), &[root], "rms_reciprocal");
    let normed = emit(&mut p, id, op("Mul"), &[x, r], "rms_normed");
    p.set_op(id, op("Mul"), [Some(normed), Some(gamma.into())]);
    Ok(p)
}

fn linear(e: &Env<'_>, id: NodeId) -> Result<Patch, String> {
    let n = e.g.node(id);
    let (Some(x), Some(w)) = (n.input(0), n.input(1)) else {
        return Err("needs x and W".into());
    };
    let trans = n.attr_int("transB").unwrap_or(0) != 0;
    let bias = n.input(2);
    let mut p = Patch::new();
    if trans && e.shapes.shape(x).map(<[_]>::len) == Some(2) {
        // A 2-d input with a stored [out, in] weight: Gemm, as exporters write nn.Linear.
        let spec = op("Gemm").attr("transB", AttrValue::Int(1));
        p.set_op(
            id,
            spec,
            [Some(x.into()), Some(w.into()), bias.map(Into::into)],
        );
        return Ok(p);
    }
    let w: PatchValue = if trans {
        let spec = op("Transpose").attr("perm", AttrValue::Ints(vec![1, 0]));
        emit(&mut p, id, spec, &[w.into()], "linear_weight_t")
    } else {
        w.into()
    };
    match bias {
        None => {
            p.set_op(id, op("MatMul"), [Some(x.into()), Some(w)]);
        }
        Some(b) => {
            let y = emit(&mut p, id, op("MatMul"), &[x.into(), w], "linear_product");
            p.set_op(id, op("Add"), [Some(y), Some(b.into())]);
        }
    }
    Ok(p)
}

/// `Reshape(x, shape)` in the opset's spelling (the shape as an attribute before opset 5).
fn reshape(
    e: &Env<'_>,
    p: &mut Patch,
    x: PatchValue,
    shape: &[i64],
    name: &str,
) -> (NodeSpec, Vec<Option<PatchValue>>) {
    if e.opset < 5 {
        let spec = op("Reshape").attr("shape", AttrValue::Ints(shape.to_vec()));
        (spec, vec![Some(x)])
    } else {
        (op("Reshape"), vec![Some(x), Some(ints(p, name, shape))])
    }
}

fn hadamard(e: &Env<'_>, id: NodeId) -> Result<Patch, String> {
    let n = e.g.node(id);
    let (Some(x), Some(h)) = (n.input(0), n.input(1)) else {
        return Err("needs x and H".into());
    };
    let rank = e.shapes.shape(x).ok_or("x has no known rank")?.len();
    if rank == 0 {
        return Err("x has no channel axis".into());
    }
    let b = e.known_dim(h, 0).ok_or("the size of H is unknown")?;
    // The width if it is a number (so empty leading dims work too), else -1.
    let (blocks, width) = match e.known_dim(x, rank - 1) {
        Some(f) if b > 0 && f % b == 0 => (f / b, f),
        Some(f) => return Err(format!("block size {b} does not divide the last dim {f}")),
        None => (-1, -1),
    };
    let mut split = vec![0; rank - 1];
    split.extend([blocks, b]);
    let mut merge = vec![0; rank - 1];
    merge.push(width);
    let mut p = Patch::new();
    let (spec, ins) = reshape(e, &mut p, x.into(), &split, "hadamard_blocks_shape");
    let xb = p.insert(id, spec, ins, &["hadamard_blocks"])[0];
    let rot = emit(
        &mut p,
        id,
        op("MatMul"),
        &[xb, h.into()],
        "hadamard_rotated",
    );
    let (spec, ins) = reshape(e, &mut p, rot, &merge, "hadamard_shape");
    p.set_op(id, spec, ins);
    Ok(p)
}

/// `ai.perqc::Rotary` as the chain `fuse-rotary` reads (see the module docs).
fn rotary(e: &Env<'_>, id: NodeId) -> Result<Patch, String> {
    let n = e.g.node(id);
    let (Some(x), Some(cos), Some(sin)) = (n.input(0), n.input(1), n.input(2)) else {
        return Err("needs x, cos and sin".into());
    };
    let rank = e.shapes.shape(x).ok_or("x has no known rank")?.len();
    if rank == 0 {
        return Err("x has no axis to rotate".into());
    }
    let d = e
        .known_dim(x, rank - 1)
        .ok_or("the size of x's last axis is unknown")?;
    let (h, axis) = (d / 2, rank as i64 - 1);
    let mut p = Patch::new();
    let xv: PatchValue = x.into();
    let slice = |p: &mut Patch, start: i64, end: i64, base: &str| {
        if e.opset < 10 {
            let spec = op("Slice")
                .attr("starts", AttrValue::Ints(vec![start]))
                .attr("ends", AttrValue::Ints(vec![end]))
                .attr("axes", AttrValue::Ints(vec![axis]));
            emit(p, id, spec, &[xv], base)
        } else {
            let ins = [
                xv,
                ints(p, "rotary_starts", &[start]),
                ints(p, "rotary_ends", &[end]),
                ints(p, "rotary_axes", &[axis]),
            ];
            emit(p, id, op("Slice"), &ins, base)
        }
    };
    let high = slice(&mut p, h, d, "rotary_high");
    let low = slice(&mut p, 0, h, "rotary_low");
    let neg = emit(&mut p, id, op("Neg"), &[high], "rotary_neg_high");
    let rot = emit(
        &mut p,
        id,
        op("Concat").attr("axis", AttrValue::Int(axis)),
        &[neg, low],
        "rotary_rotated",
    );
    let xc = emit(&mut p, id, op("Mul"), &[xv, cos.into()], "rotary_cos");
    let rs = emit(&mut p, id, op("Mul"), &[rot, sin.into()], "rotary_sin");
    p.set_op(id, op("Add"), [Some(xc), Some(rs)]);
    Ok(p)
}

/// `ai.perqc::FakeQuantize`, at default opset >= 21 (see the module docs).
fn fake_quantize(e: &Env<'_>, id: NodeId) -> Result<Patch, String> {
    let n = e.g.node(id);
    let xv = n.input(0).ok_or("has no input")?;
    let q = perqc_ops::kernels::misc::token_quant(n)?;
    let rank = e.shapes.shape(xv).ok_or("x has no known rank")?.len();
    if rank == 0 {
        return Err("x has no channel axis".into());
    }
    let (lo, hi) = q.code_range();
    let mut p = Patch::new();
    let x: PatchValue = xv.into();
    let axes = ints(&mut p, "fq_axes", &[-1]);
    let keep = || AttrValue::Int(1);
    let reduce = |p: &mut Patch, op_type: &str, v: PatchValue, base: &str| {
        emit(
            p,
            id,
            op(op_type).attr("keepdims", keep()),
            &[v, axes],
            base,
        )
    };
    let clip = |p: &mut Patch, v: PatchValue, base: &str| {
        if q.clip == 1.0 {
            v
        } else {
            let c = scalar(p, "fq_clip", q.clip);
            emit(p, id, op("Mul"), &[v, c], base)
        }
    };
    let hi_c = scalar(&mut p, "fq_hi", hi);
    let tiny = scalar(&mut p, "fq_tiny", perqc_ops::quant::TINY);
    let (s, zf) = if q.symmetric {
        let a = emit(&mut p, id, op("Abs"), &[x], "fq_abs");
        let m = reduce(&mut p, "ReduceMax", a, "fq_absmax");
        let m = clip(&mut p, m, "fq_absmax_clipped");
        let s0 = emit(&mut p, id, op("Div"), &[m, hi_c], "fq_scale_raw");
        (emit(&mut p, id, op("Max"), &[s0, tiny], "fq_scale"), None)
    } else {
        let zero = scalar(&mut p, "fq_zero", 0.0);
        let mx = reduce(&mut p, "ReduceMax", x, "fq_max");
        let mn = reduce(&mut p, "ReduceMin", x, "fq_min");
        let mx0 = emit(&mut p, id, op("Max"), &[mx, zero], "fq_max0");
        let mn0 = emit(&mut p, id, op("Min"), &[mn, zero], "fq_min0");
        let mx0 = clip(&mut p, mx0, "fq_max_clipped");
        let mn0 = clip(&mut p, mn0, "fq_min_clipped");
        let r = emit(&mut p, id, op("Sub"), &[mx0, mn0], "fq_range");
        let s0 = emit(&mut p, id, op("Div"), &[r, hi_c], "fq_scale_raw");
        let s = emit(&mut p, id, op("Max"), &[s0, tiny], "fq_scale");
        let t = emit(&mut p, id, op("Div"), &[mn0, s], "fq_min_steps");
        let t = emit(&mut p, id, op("Neg"), &[t], "fq_zero_point_raw");
        (
            s,
            Some(emit(&mut p, id, op("Round"), &[t], "fq_zero_point_f")),
        )
    };
    // 4-bit codes as QuantizeLinear/DequantizeLinear; other widths as the same f32
    // arithmetic. 8 bits too: ONNX Runtime (1.32) fuses an 8-bit per-token QDQ in front of
    // a MatMul with a dequantized weight into MatMulIntegerToFloat, whose CPU kernel then
    // rejects the per-token zero points ("Per-Channel is not supported yet").
    if q.bits == 4 {
        let d = e
            .known_dim(xv, rank - 1)
            .ok_or("the last dim of x (the block size) is not a known number")?;
        let code = match (q.symmetric, q.bits) {
            (false, 4) => DType::U4,
            (false, _) => DType::U8,
            (true, 4) => DType::I4,
            (true, _) => DType::I8,
        };
        let blocked = |spec: NodeSpec| {
            spec.attr("axis", AttrValue::Int(-1))
                .attr("block_size", AttrValue::Int(d))
        };
        match zf {
            Some(zf) => {
                let cast = op("Cast").attr("to", AttrValue::Int(code.code() as i64));
                let zp = emit(&mut p, id, cast, &[zf], "fq_zero_point");
                let qv = emit(
                    &mut p,
                    id,
                    blocked(op("QuantizeLinear")),
                    &[x, s, zp],
                    "fq_codes",
                );
                p.set_op(
                    id,
                    blocked(op("DequantizeLinear")),
                    [Some(qv), Some(s), Some(zp)],
                );
            }
            None => {
                let spec = blocked(op("QuantizeLinear"))
                    .attr("output_dtype", AttrValue::Int(code.code() as i64));
                let qv = emit(&mut p, id, spec, &[x, s], "fq_codes");
                p.set_op(id, blocked(op("DequantizeLinear")), [Some(qv), Some(s)]);
            }
        }
        return Ok(p);
    }
    let steps = emit(&mut p, id, op("Div"), &[x, s], "fq_steps");
    let r = emit(&mut p, id, op("Round"), &[steps], "fq_rounded");
    match zf {
        Some(zf) => {
            let shifted = emit(&mut p, id, op("Add"), &[r, zf], "fq_shifted");
            let zero = scalar(&mut p, "fq_code_lo", 0.0);
            let c = emit(&mut p, id, op("Clip"), &[shifted, zero, hi_c], "fq_codes");
            let centered = emit(&mut p, id, op("Sub"), &[c, zf], "fq_centered");
            p.set_op(id, op("Mul"), [Some(centered), Some(s)]);
        }
        None => {
            let lo_c = scalar(&mut p, "fq_code_lo", lo);
            let c = emit(&mut p, id, op("Clip"), &[r, lo_c, hi_c], "fq_codes");
            p.set_op(id, op("Mul"), [Some(c), Some(s)]);
        }
    }
    Ok(p)
}

fn scalar(p: &mut Patch, name: &str, v: f32) -> PatchValue {
    p.add_initializer(name, Tensor::from_f32(vec![], &[v]))
}

fn gelu(e: &Env<'_>, id: NodeId) -> Result<Patch, String> {
    let n = e.g.node(id);
    let x: PatchValue = n.input(0).ok_or("has no input")?.into();
    let tanh = n.attr_str("approximate") == Some(b"tanh");
    let mut p = Patch::new();
    let half = scalar(&mut p, "gelu_half", 0.5);
    let one = scalar(&mut p, "gelu_one", 1.0);
    let inner = if tanh {
        // tanh(√(2/π) · (x + 0.044715 · x³))
        let three = scalar(&mut p, "gelu_three", 3.0);
        let c = scalar(&mut p, "gelu_cubic", 0.044_715);
        let k = scalar(&mut p, "gelu_sqrt_2_over_pi", 0.797_884_6);
        let cube = emit(&mut p, id, op("Pow"), &[x, three], "gelu_cube");
        let w = emit(&mut p, id, op("Mul"), &[cube, c], "gelu_cubic_term");
        let u = emit(&mut p, id, op("Add"), &[x, w], "gelu_inner");
        let t = emit(&mut p, id, op("Mul"), &[u, k], "gelu_tanh_arg");
        emit(&mut p, id, op("Tanh"), &[t], "gelu_tanh")
    } else {
        let root2 = scalar(&mut p, "gelu_sqrt_2", std::f32::consts::SQRT_2);
        let z = emit(&mut p, id, op("Div"), &[x, root2], "gelu_scaled");
        emit(&mut p, id, op("Erf"), &[z], "gelu_erf")
    };
    // torch's order of the products: (x · (1 + f)) · 0.5.
    let a = emit(&mut p, id, op("Add"), &[inner, one], "gelu_one_plus");
    let xa = emit(&mut p, id, op("Mul"), &[x, a], "gelu_x_one_plus");
    p.set_op(id, op("Mul"), [Some(xa), Some(half)]);
    Ok(p)
}

/// ReduceMean over `axes` with keepdims, in the opset's spelling.
fn reduce_mean(
    e: &Env<'_>,
    p: &mut Patch,
    at: NodeId,
    x: PatchValue,
    axes: &[i64],
    base: &str,
) -> PatchValue {
    if e.opset < 18 {
        let spec = op("ReduceMean")
            .attr("axes", AttrValue::Ints(axes.to_vec()))
            .attr("keepdims", AttrValue::Int(1));
        emit(p, at, spec, &[x], base)
    } else {
        let a = ints(p, "mean_axes", axes);
        emit(
            p,
            at,
            op("ReduceMean").attr("keepdims", AttrValue::Int(1)),
            &[x, a],
            base,
        )
    }
}

/// The axes `axis..` of a normalization, negative when `axis` is (no rank needed).
fn norm_axes(e: &Env<'_>, x: ValueId, axis: i64) -> Result<Vec<i64>, String> {
    Ok(if axis < 0 {
        (axis..0).collect()
    } else {
        let rank = e
            .shapes
            .shape(x)
            .map(<[_]>::len)
            .ok_or("x has no known rank")?;
        (axis..rank as i64).collect()
    })
}

fn layer_norm(e: &Env<'_>, id: NodeId) -> Result<Patch, String> {
    let n = e.g.node(id);
    let (Some(xv), Some(gamma)) = (n.input(0), n.input(1)) else {
        return Err("needs x and scale".into());
    };
    let axes = norm_axes(e, xv, n.attr_int("axis").unwrap_or(-1))?;
    let eps = n.attr_float("epsilon").unwrap_or(1e-5);
    let mut p = Patch::new();
    let x: PatchValue = xv.into();
    let mean = reduce_mean(e, &mut p, id, x, &axes, "ln_mean");
    let d = emit(&mut p, id, op("Sub"), &[x, mean], "ln_centered");
    let sq = emit(&mut p, id, op("Mul"), &[d, d], "ln_square");
    let var = reduce_mean(e, &mut p, id, sq, &axes, "ln_var");
    let eps = scalar(&mut p, "ln_eps", eps);
    let sum = emit(&mut p, id, op("Add"), &[var, eps], "ln_add_eps");
    let root = emit(&mut p, id, op("Sqrt"), &[sum], "ln_std");
    let normed = emit(&mut p, id, op("Div"), &[d, root], "ln_normed");
    match n.input(2) {
        Some(beta) => {
            let scaled = emit(&mut p, id, op("Mul"), &[normed, gamma.into()], "ln_scaled");
            p.set_op(id, op("Add"), [Some(scaled), Some(beta.into())]);
        }
        None => {
            p.set_op(id, op("Mul"), [Some(normed), Some(gamma.into())]);
        }
    }
    Ok(p)
}

fn attention(e: &Env<'_>, id: NodeId) -> Result<Patch, String> {
    let n = e.g.node(id);
    let (Some(qv), Some(kv), Some(vv)) = (n.input(0), n.input(1), n.input(2)) else {
        return Err("needs q, k and v".into());
    };
    let mask = n.input(3);
    let scale = n.attr_float("scale");
    let softcap = n.attr_float("softcap").unwrap_or(0.0);
    let hq = e.known_dim(qv, 1).ok_or("query head count unknown")?;
    let hkv = e.known_dim(kv, 1).ok_or("key/value head count unknown")?;
    if hkv <= 0 || hq % hkv != 0 {
        return Err(format!(
            "{hq} query heads do not group over {hkv} key/value heads"
        ));
    }
    let groups = hq / hkv;
    let mut p = Patch::new();
    let (mut q, mut k, mut v): (PatchValue, PatchValue, PatchValue) =
        (qv.into(), kv.into(), vv.into());
    let mut mask = mask.map(PatchValue::from);
    let perm: Vec<i64> = if groups == 1 {
        vec![0, 1, 3, 2]
    } else {
        // q [B, Hq, S, D] -> [B, Hkv, G, S, D]; k, v [B, Hkv, L, .] -> [B, Hkv, 1, L, .].
        let d = e.known_dim(qv, 3).ok_or("head dim unknown")?;
        let shape = ints(&mut p, "attn_group_shape", &[0, hkv, groups, -1, d]);
        q = emit(&mut p, id, op("Reshape"), &[q, shape], "attn_q_grouped");
        k = unsqueeze(e, &mut p, id, k, 2);
        v = unsqueeze(e, &mut p, id, v, 2);
        if let (Some(m), Some(mv)) = (mask, n.input(3)) {
            mask = Some(group_mask(e, &mut p, id, m, mv, hq)?);
        }
        vec![0, 1, 2, 4, 3]
    };
    let kt = emit(
        &mut p,
        id,
        op("Transpose").attr("perm", AttrValue::Ints(perm)),
        &[k],
        "attn_kt",
    );
    let mut s = emit(&mut p, id, op("MatMul"), &[q, kt], "attn_scores");
    let scale = match scale {
        Some(c) => c,
        None => 1.0 / (e.known_dim(qv, 3).ok_or("head dim unknown")? as f32).sqrt(),
    };
    if scale != 1.0 {
        let c = scalar(&mut p, "attn_scale", scale);
        s = emit(&mut p, id, op("Mul"), &[s, c], "attn_scaled");
    }
    if softcap > 0.0 {
        // One constant read by both ends, as exporters write the cap.
        let t = scalar(&mut p, "attn_softcap", softcap);
        s = emit(&mut p, id, op("Div"), &[s, t], "attn_capped_in");
        s = emit(&mut p, id, op("Tanh"), &[s], "attn_capped_tanh");
        s = emit(&mut p, id, op("Mul"), &[s, t], "attn_capped");
    }
    if let Some(m) = mask {
        s = emit(&mut p, id, op("Add"), &[s, m], "attn_masked");
    }
    let mut probs = emit(
        &mut p,
        id,
        op("Softmax").attr("axis", AttrValue::Int(-1)),
        &[s],
        "attn_probs",
    );
    if n.attr_int("zero_masked_rows").unwrap_or(0) != 0 {
        // A row masked everywhere: Softmax gives NaN, the guard 0 (as torch writes it).
        let nan = emit(&mut p, id, op("IsNaN"), &[probs], "attn_masked_row");
        let zero = scalar(&mut p, "attn_zero", 0.0);
        probs = emit(
            &mut p,
            id,
            op("Where"),
            &[nan, zero, probs],
            "attn_probs_guarded",
        );
    }
    if groups == 1 {
        p.set_op(id, op("MatMul"), [Some(probs), Some(v)]);
    } else {
        let dv = e.known_dim(vv, 3).ok_or("value head dim unknown")?;
        let y = emit(&mut p, id, op("MatMul"), &[probs, v], "attn_grouped_out");
        let shape = ints(&mut p, "attn_heads_shape", &[0, hq, -1, dv]);
        p.set_op(id, op("Reshape"), [Some(y), Some(shape)]);
    }
    Ok(p)
}

/// A mask `[.., H?, S, L]` made to broadcast against grouped scores `[B, Hkv, G, S, L]`.
fn group_mask(
    e: &Env<'_>,
    p: &mut Patch,
    at: NodeId,
    m: PatchValue,
    mv: ValueId,
    hq: i64,
) -> Result<PatchValue, String> {
    let shape = e.shapes.shape(mv).ok_or("mask rank unknown")?;
    match shape.len() {
        0..=2 => Ok(m),
        r => match shape[r - 3].known() {
            // The head axis broadcasts: give it a second size-1 axis for the group.
            Some(1) => Ok(unsqueeze(e, p, at, m, r as i64 - 2)),
            Some(h) if h == hq => Err("a per-head mask over grouped heads is not lowered".into()),
            _ => Err("mask head axis unknown".into()),
        },
    }
}

impl Pass for Lower {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn description(&self) -> &'static str {
        Self::DESCRIPTION
    }

    fn run(&mut self, model: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        let mut opset = model.opset("").unwrap_or(1);
        let mut upgraded = 0u64;
        let fake_quantize_ops = model
            .graph
            .nodes()
            .any(|(_, n)| n.domain == PERQC_DOMAIN && n.op_type == "FakeQuantize");
        if fake_quantize_ops && opset < FAKE_QUANTIZE_OPSET {
            crate::opset::upgrade(model, FAKE_QUANTIZE_OPSET).map_err(|e| {
                PassError::msg(format!("lowering ai.perqc::FakeQuantize needs it: {e}"))
            })?;
            ctx.invalidate_analyses();
            ctx.note(format!(
                "default opset upgraded from {opset} to {FAKE_QUANTIZE_OPSET} for FakeQuantize's Q/DQ"
            ));
            opset = FAKE_QUANTIZE_OPSET;
            upgraded = 1;
        }
        let canonical: Vec<NodeId> = model
            .graph
            .node_order()
            .iter()
            .copied()
            .filter(|&id| model.graph.node(id).domain == PERQC_DOMAIN)
            .collect();
        let mut lowered = 0u64;
        let mut renamed = 0u64;
        if !canonical.is_empty() {
            let shapes = ctx.analysis::<ShapeMap>(model)?;
            for id in canonical {
                let node = model.graph.node(id);
                let native = match node.op_type.as_str() {
                    "LayerNormalization" => opset >= 17,
                    "Gelu" => opset >= 20,
                    "Attention" | "RMSNormalization" => opset >= 23,
                    "Swish" => opset >= 24,
                    _ => false,
                };
                let e = Env {
                    g: &model.graph,
                    shapes: &shapes,
                    opset,
                };
                let patch = if native {
                    let mut p = Patch::new();
                    // ONNX Attention zeroes a fully masked row: the canonical flag saying
                    // so is no ONNX attribute.
                    let spec = NodeSpec {
                        attrs: node
                            .attrs
                            .iter()
                            .filter(|a| a.name != "zero_masked_rows")
                            .cloned()
                            .collect(),
                        ..op(&node.op_type)
                    };
                    p.set_op(id, spec, node.inputs().iter().map(|v| v.map(Into::into)));
                    Ok(p)
                } else {
                    match node.op_type.as_str() {
                        "Attention" => attention(&e, id),
                        "RMSNormalization" => rms_norm(&e, id),
                        "Swish" => swish(&e, id),
                        "Linear" => linear(&e, id),
                        "Gelu" => gelu(&e, id),
                        "LayerNormalization" => layer_norm(&e, id),
                        "Hadamard" => hadamard(&e, id),
                        "Rotary" => rotary(&e, id),
                        "FakeQuantize" => fake_quantize(&e, id),
                        "QuantizeTokens" | "QuantizedLinear" => Err(
                            "it is part of the native runtime's integer linears (codes and \
                             packed weights, from fuse-int-linear), which have no ONNX \
                             spelling; export the graph before that pass"
                                .into(),
                        ),
                        other => Err(format!("no lowering for ai.perqc::{other}")),
                    }
                };
                let patch = patch.map_err(|why| {
                    PassError::msg(format!(
                        "node `{}` (ai.perqc::{}): cannot lower to opset {opset}: {why}",
                        node.name, node.op_type
                    ))
                })?;
                if !ctx.rewrite() {
                    break;
                }
                patch.apply(&mut model.graph)?;
                if native {
                    renamed += 1;
                } else {
                    lowered += 1;
                }
            }
        }
        let left = model.graph.nodes().any(|(_, n)| n.domain == PERQC_DOMAIN);
        let before = model.opset_imports.len();
        if !left {
            model
                .opset_imports
                .retain(|o| o.domain.as_deref() != Some(PERQC_DOMAIN));
        }
        let changed = lowered + renamed + upgraded > 0 || model.opset_imports.len() != before;
        Ok(PassOutcome::from_changed(changed)
            .with("decomposed", lowered)
            .with("to-onnx-op", renamed)
            .with("opset-upgraded", upgraded))
    }
}
