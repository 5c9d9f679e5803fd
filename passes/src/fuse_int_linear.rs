//! `fuse-int-linear`: quantized linears -> the runtime's integer linears.
//!
//! ```text
//! a = ai.perqc::FakeQuantize(x);  MatMul(a, DequantizeLinear(w_i, t_i))  (i = 1..)
//!     == (codes, terms) = ai.perqc::QuantizeTokens(x);
//!        ai.perqc::QuantizedLinear(codes, terms, pack(w_i), t_i, colsum(w_i))   (up to f32 round-off)
//! ```
//!
//! (the product a `MatMul`, or the canonical `ai.perqc::Linear` with `transB = 0` that the
//! quantizer writes during compilation, its bias then added after the integer product)
//! for constant `w_i` `[K, N_i]` of signed 4-bit codes (int4, or int8 holding values in
//! -8..=7) with one f32 scale per column (`axis = 1`) or per group of `g` rows (`axis = 0,
//! block_size = g`, g a multiple of 4) and no zero point (or an all-zero one), and a
//! FakeQuantize of any width (per-token, 2..8 bits; the codes fit a signed byte, see
//! `perqc_ops::kernels::igemm`). One `QuantizeTokens` serves every linear that reads the
//! same FakeQuantize (q/k/v, gate/up), so each activation is quantized once. When the
//! quantizer's input is PeRQ's online block rotation `ai.perqc::Hadamard(x0, H)` (a scaled
//! Sylvester H, read by nothing else), `QuantizeTokens(x0, H)` rotates the rows itself. The kernel sums
//! the products of the codes exactly in integers and scales each result once; the float
//! graph rounds every product and partial sum. So the rewrite is not bit-exact: it is an
//! execution plan, not a canonical form, and is not part of `canonicalize`. `perqc eval`
//! runs it unless `--no-int`.
//!
//! **Weight-only linears** (option `weight-only`, on by default): a MatMul of a float
//! activation by such a weight, or a `com.microsoft::MatMulNBits` (4 bits, symmetric: no
//! zero points or all 8; its bias becomes an Add), runs the same integer product on the
//! activation quantized per token to 8 bits, symmetric, as ONNX Runtime's MatMulNBits does
//! at `accuracy_level = 4`. This is an approximation the graph does not state: on SmolLM2's
//! w4a16 file it moves perplexity by 0.11% (docs/runtime.md); `weight-only=false` keeps those
//! linears float.
//!
//! The packed weight is a u8 initializer in the kernel's layout (panels of 32 columns,
//! two codes per byte), so a session holds the weight at 4 bits. Everything else
//! (asymmetric weights, FP4/MX formats, 8-bit weights) keeps the float path; the pass
//! counts what it left. A FakeQuantize with readers of both kinds stays for the float ones.
//!
//! `lower` has no ONNX spelling for the ops: export the graph before this pass.

use crate::Dce;
use crate::canonicalize::is_online_hadamard;
use perqc_ir::{
    AttrValue, DType, Matcher, Model, NodeId, NodeSpec, OptionError, Pass, PassContext, PassError,
    PassOptions, PassOutcome, Patch, PatchValue, Tensor, ValueId,
};
use perqc_ops::kernels::igemm;
use perqc_ops::{PERQC_DOMAIN, ShapeMap};
use std::collections::HashSet;

#[derive(Debug)]
pub struct FuseIntLinear {
    /// Whether linears whose activation is float run on 8-bit per-token codes.
    pub weight_only: bool,
}

impl Default for FuseIntLinear {
    fn default() -> Self {
        FuseIntLinear { weight_only: true }
    }
}

impl FuseIntLinear {
    pub const NAME: &'static str = "fuse-int-linear";
    pub const DESCRIPTION: &'static str = "MatMul or Linear(FakeQuantize(x), DequantizeLinear(int4 W, per-column or grouped scale)) -> ai.perqc::QuantizeTokens (once per activation) + QuantizedLinear, the native runtime's integer product; with weight-only=true (default) also float-activation linears on 4-bit weights and MatMulNBits, on 8-bit per-token activation codes (not bit-exact; no ONNX lowering)";

    pub fn from_options(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        opts.allow_only(&["weight-only"])?;
        Ok(Box::new(FuseIntLinear {
            weight_only: opts.bool_or("weight-only", true)?,
        }))
    }
}

/// The counter of quantized linears that keep the float path.
const LEFT_FLOAT: &str = "left-float";

/// The activation quantizer weight-only linears get: 8 bits, symmetric, per token.
const WEIGHT_ONLY_BITS: i64 = 8;

/// Where a weight's scales come from: an initializer of the graph, or a new one.
enum Scales {
    Value(ValueId),
    New(Tensor),
}

/// The weight side: signed 4-bit codes `[K, N]`, their scales (`[N]`, or `[ceil(K / group),
/// N]` with `group` > 0), and the bias a MatMulNBits adds.
struct Weight {
    codes: Vec<i8>,
    k: usize,
    n: usize,
    group: usize,
    scales: Scales,
    bias: Option<ValueId>,
    name: String,
}

/// `DequantizeLinear(w, t, z?)` with `w` constant `[K, N]` int4 (or int8 in -8..=7), `t`
/// constant f32, `[N]` on axis 1 or `[ceil(K / g), N]` on axis 0 with `block_size = g` a
/// multiple of 4, `z` absent or zero.
fn dq_weight(m: &Matcher<'_>, v: ValueId) -> Option<Weight> {
    let dq = m.def_op(v, "DequantizeLinear")?;
    let n = m.node(dq);
    let (w, t) = (n.input(0)?, n.input(1)?);
    let wt = m.constant(w)?;
    if wt.dims.len() != 2 || !matches!(wt.dtype, DType::I4 | DType::I8) {
        return None;
    }
    let (k, cols) = (wt.dims[0] as usize, wt.dims[1] as usize);
    let axis = n.attr_int("axis").unwrap_or(1);
    let block = n.attr_int("block_size").unwrap_or(0);
    let (group, scale_dims) = match (axis, block) {
        (1 | -1, 0) => (0, vec![cols as i64]),
        (0 | -2, g) if g > 0 && (g as usize).is_multiple_of(igemm::KG) => {
            let g = g as usize;
            (g, vec![k.div_ceil(g) as i64, cols as i64])
        }
        _ => return None,
    };
    let tt = m.constant(t)?;
    if tt.dtype != DType::F32 || tt.dims != scale_dims {
        return None;
    }
    if let Some(z) = n.input(2) {
        let zt = perqc_ops::RtTensor::from_tensor(&*m.constant(z)?).ok()?;
        let zero = match &zt {
            perqc_ops::RtTensor::I4(a) | perqc_ops::RtTensor::I8(a) => a.iter().all(|&v| v == 0),
            _ => false,
        };
        if !zero {
            return None;
        }
    }
    let codes = match perqc_ops::RtTensor::from_tensor(&wt).ok()? {
        perqc_ops::RtTensor::I4(a) | perqc_ops::RtTensor::I8(a) => {
            // A slice copy: ndarray's element iterator costs several times as much.
            let a = a.as_standard_layout();
            a.as_slice().expect("standard layout").to_vec()
        }
        _ => return None,
    };
    if codes.iter().any(|c| !(-8..=7).contains(c)) {
        return None;
    }
    Some(Weight {
        codes,
        k,
        n: cols,
        group,
        scales: Scales::Value(t),
        bias: None,
        name: m.graph.value(w).name.clone(),
    })
}

/// `com.microsoft::MatMulNBits` node `id` with 4 bits, constant B `[N, K / bs, bs / 2]` and
/// scales, symmetric codes (no zero points, or all 8) and no `g_idx`: its weight as codes
/// `u - 8` and scales transposed to `[K / bs, N]`.
fn nbits_weight(m: &Matcher<'_>, id: NodeId) -> Option<Weight> {
    let n = m.node(id);
    let int = |name| n.attr_int(name).and_then(|v| usize::try_from(v).ok());
    let (k, cols, bs) = (int("K")?, int("N")?, int("block_size")?);
    if int("bits") != Some(4)
        || n.attr_int("weight_prepacked").unwrap_or(0) != 0
        || n.input(4).is_some()
        || bs == 0
        || !bs.is_multiple_of(2 * igemm::KG)
    {
        return None;
    }
    let kb = k.div_ceil(bs);
    let b = m.constant(n.input(1)?)?;
    let t = m.constant(n.input(2)?)?;
    if b.dtype != DType::U8 || t.dtype != DType::F32 {
        return None;
    }
    let bytes: Vec<u8> = b.to_vec::<u8>().ok()?;
    let scales: Vec<f32> = t.to_f32().ok()?;
    if bytes.len() != cols * kb * bs / 2 || scales.len() != cols * kb {
        return None;
    }
    if let Some(z) = n.input(3) {
        let zt = m.constant(z)?;
        let eight = match zt.dtype {
            // Two 4-bit zero points per byte (a row's odd last nibble is padding).
            DType::U8 => {
                let per_row = kb.div_ceil(2);
                let z = zt.to_vec::<u8>().ok()?;
                z.len() == cols * per_row
                    && (0..cols).all(|r| {
                        (0..kb).all(|j| (z[r * per_row + j / 2] >> (4 * (j % 2))) & 0xF == 8)
                    })
            }
            DType::F32 => zt.to_f32().ok()?.iter().all(|&v| v == 8.0),
            _ => false,
        };
        if !eight {
            return None;
        }
    }
    let mut codes = vec![0i8; k * cols];
    for c in 0..cols {
        for kk in 0..k {
            let byte = bytes[(c * kb + kk / bs) * bs / 2 + (kk % bs) / 2];
            let u = (byte >> (4 * (kk % 2))) & 0xF;
            codes[kk * cols + c] = u as i8 - 8;
        }
    }
    let mut t_kn = vec![0f32; kb * cols];
    for c in 0..cols {
        for j in 0..kb {
            t_kn[j * cols + c] = scales[c * kb + j];
        }
    }
    Some(Weight {
        codes,
        k,
        n: cols,
        group: bs,
        scales: Scales::New(Tensor::from_slice(vec![kb as i64, cols as i64], &t_kn)),
        bias: n.input(5),
        name: m.graph.value(n.input(1)?).name.clone(),
    })
}

/// Whether `end` multiplies its input 0 by its input 1 as stored (`[K, N]`): a MatMul, or
/// the canonical `ai.perqc::Linear` with `transB = 0` (the quantizer writes those; its
/// optional bias is added after the product).
fn plain_product(m: &Matcher<'_>, end: NodeId) -> bool {
    let n = m.node(end);
    m.is_op(end, "MatMul")
        || (n.domain == PERQC_DOMAIN
            && n.op_type == "Linear"
            && n.attr_int("transB").unwrap_or(0) == 0)
}

/// The 4-bit weight of linear `end` if it reads `a` as its activation: a MatMul (or
/// canonical Linear) of `a` by a `DequantizeLinear` (see [`dq_weight`]) or a MatMulNBits
/// (see [`nbits_weight`]).
fn weight(m: &Matcher<'_>, end: NodeId, a: ValueId) -> Option<Weight> {
    if m.input(end, 0) != Some(a) {
        return None;
    }
    if plain_product(m, end) {
        let mut w = dq_weight(m, m.input(end, 1)?)?;
        w.bias = m.input(end, 2);
        return Some(w);
    }
    let n = m.node(end);
    (n.domain == "com.microsoft" && n.op_type == "MatMulNBits")
        .then(|| nbits_weight(m, end))
        .flatten()
}

/// Whether `end` reads `a` as a linear of a quantized weight (a MatMul or Linear by a
/// `DequantizeLinear`, or a MatMulNBits), fusable or not.
fn quantized_linear_of(m: &Matcher<'_>, end: NodeId, a: ValueId) -> bool {
    let n = m.node(end);
    m.input(end, 0) == Some(a)
        && ((plain_product(m, end)
            && m.input(end, 1)
                .is_some_and(|b| m.def_op(b, "DequantizeLinear").is_some()))
            || (n.domain == "com.microsoft" && n.op_type == "MatMulNBits"))
}

/// The activation a group of linears reads and how it is quantized.
enum Activation {
    /// A `FakeQuantize` node: its input is quantized with its parameters.
    Quantizer(NodeId),
    /// A float value read by weight-only linears, the first of them in graph order.
    Float { x: ValueId, first: NodeId },
}

/// The rewrite of every fusable linear reading activation `act` (one patch: the
/// `QuantizeTokens` they share and their `QuantizedLinear`s), with the counts of linears
/// fused and left float; `None` when none is fusable.
fn rewrite(m: &Matcher<'_>, act: &Activation) -> Option<(Patch, u64, u64)> {
    let (x, a, anchor, spec) = match *act {
        Activation::Quantizer(fq) => {
            let fq_node = m.node(fq);
            perqc_ops::kernels::misc::token_quant(fq_node).ok()?;
            let mut spec = crate::canonicalize::canonical("QuantizeTokens")
                .named(&format!("{}/codes", fq_node.name));
            for name in ["bits", "symmetric", "clip"] {
                if let Some(v) = fq_node.attr(name) {
                    spec = spec.attr(name, v.clone());
                }
            }
            (fq_node.input(0)?, fq_node.output(0)?, fq, spec)
        }
        Activation::Float { x, first } => {
            let spec = crate::canonicalize::canonical("QuantizeTokens")
                .named(&format!("{}/codes", m.graph.value(x).name))
                .attr("bits", AttrValue::Int(WEIGHT_ONLY_BITS))
                .attr("symmetric", AttrValue::Int(1));
            (x, x, first, spec)
        }
    };
    // A FakeQuantize reads f32 by its rule; a float activation must be known to be f32.
    let float_unknown = matches!(act, Activation::Float { .. }) && !m.is_f32(x);
    if m.rank(x).is_some_and(|r| r < 1) || float_unknown {
        return None;
    }
    let mut fused = Vec::new();
    let mut left = 0u64;
    for u in m.graph.value(a).uses() {
        let end = u.node;
        match weight(m, end, a) {
            Some(w) => fused.push((end, w)),
            None => {
                let counted = match act {
                    Activation::Quantizer(_) => plain_product(m, end),
                    Activation::Float { .. } => quantized_linear_of(m, end, a),
                };
                left += u64::from(counted);
            }
        }
    }
    if fused.is_empty() {
        return None;
    }
    let mut p = Patch::new();
    let base = m.graph.value(x).name.clone();
    let rotated = match act {
        Activation::Quantizer(_) => rotated_input(m, x),
        Activation::Float { .. } => None,
    };
    let (src, rotation) = rotated.map_or((x, None), |(x0, h)| (x0, Some(h)));
    let q = p.insert(
        anchor,
        spec,
        [Some(src.into()), rotation.map(Into::into)],
        &[&format!("{base}.codes"), &format!("{base}.terms")],
    );
    let (codes, terms) = (q[0], q[1]);
    let count = fused.len() as u64;
    for (end, w) in fused {
        let packed = igemm::pack_weights(&w.codes, w.k, w.n, w.group).ok()?;
        let dims: Vec<i64> = igemm::packed_shape(w.k, w.n)
            .iter()
            .map(|&d| d as i64)
            .collect();
        let groups = igemm::scale_groups(w.k, w.group);
        let sum_dims = if w.group == 0 {
            vec![w.n as i64]
        } else {
            vec![groups as i64, w.n as i64]
        };
        let sums = p.add_initializer(
            &format!("{}.colsum", w.name),
            Tensor::from_slice(sum_dims, &packed.col_sums),
        );
        // The packed bytes become the tensor's raw data as they are (no copy).
        let packed = p.add_initializer(
            &format!("{}.packed", w.name),
            Tensor::from_raw(DType::U8, dims, packed.data.into()),
        );
        let scales: PatchValue = match w.scales {
            Scales::Value(v) => v.into(),
            Scales::New(t) => p.add_initializer(&format!("{}.scales_kn", w.name), t),
        };
        let mut linear = crate::canonicalize::canonical("QuantizedLinear");
        if w.group > 0 {
            linear = linear.attr("group", AttrValue::Int(w.group as i64));
        }
        let inputs = [
            Some(codes),
            Some(terms),
            Some(packed),
            Some(scales),
            Some(sums),
        ];
        match w.bias {
            None => {
                p.set_op(end, linear, inputs);
            }
            Some(bias) => {
                let out = m.node(end).output(0)?;
                let y = p.insert(
                    end,
                    linear,
                    inputs,
                    &[&format!("{}.nobias", m.graph.value(out).name)],
                );
                p.set_op(end, NodeSpec::new("Add"), [Some(y[0]), Some(bias.into())]);
            }
        }
    }
    Some((p, count, left))
}

/// `x = ai.perqc::Hadamard(x0, H)` read only by the quantizer, with H a constant scaled
/// Sylvester matrix (the fast transform's case): `(x0, H)`, which `QuantizeTokens` rotates
/// itself.
fn rotated_input(m: &Matcher<'_>, x: ValueId) -> Option<(ValueId, ValueId)> {
    let had = m.producer(x)?;
    let n = m.node(had);
    if !is_online_hadamard(n) || !m.single_reader(x) {
        return None;
    }
    let (x0, h) = (n.input(0)?, n.input(1)?);
    let t = m.constant(h)?;
    let b = *t.dims.first()? as usize;
    let k = m.shape(x0)?.last()?.known()? as usize;
    let vals = t.to_f32().ok()?;
    (t.dims.len() == 2 && b > 0 && k.is_multiple_of(b))
        .then(|| perqc_ops::kernels::hadamard::sylvester_scale(&vals, b))
        .flatten()
        .map(|_| (x0, h))
}

impl Pass for FuseIntLinear {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn description(&self) -> &'static str {
        Self::DESCRIPTION
    }

    fn run(&mut self, model: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        let shapes = ctx.analysis::<ShapeMap>(model)?;
        let (mut fused, mut left) = (0u64, 0u64);
        let mut seen: HashSet<ValueId> = HashSet::new();
        for id in model.graph.node_order().to_vec() {
            let Some(node) = model.graph.try_node(id) else {
                continue;
            };
            let m = Matcher::new(&model.graph, &*shapes);
            let act = if node.domain == PERQC_DOMAIN && node.op_type == "FakeQuantize" {
                Activation::Quantizer(id)
            } else if let Some(x) = node.input(0)
                && quantized_linear_of(&m, id, x)
                && m.producer(x).is_none_or(|p| {
                    let p = m.node(p);
                    p.domain != PERQC_DOMAIN || p.op_type != "FakeQuantize"
                })
                && seen.insert(x)
            {
                Activation::Float { x, first: id }
            } else {
                continue;
            };
            let patched = match act {
                Activation::Float { .. } if !self.weight_only => None,
                _ => rewrite(&m, &act),
            };
            let Some((patch, n, l)) = patched else {
                left += match act {
                    Activation::Quantizer(fq) => m.node(fq).output(0).map_or(0, |a| {
                        m.graph
                            .value(a)
                            .uses()
                            .iter()
                            .filter(|u| plain_product(&m, u.node))
                            .count() as u64
                    }),
                    Activation::Float { x, .. } => m
                        .graph
                        .value(x)
                        .uses()
                        .iter()
                        .filter(|u| quantized_linear_of(&m, u.node, x))
                        .count() as u64,
                };
                continue;
            };
            if !ctx.rewrite() {
                break;
            }
            patch.apply(&mut model.graph)?;
            fused += n;
            left += l;
        }
        let mut removed = 0;
        if fused > 0 {
            ctx.invalidate_analyses();
            removed = Dce::default().run(model, ctx)?.counter("nodes-removed");
        }
        if left > 0 {
            ctx.note(format!(
                "{left} quantized linear(s) keep the float path (weights not symmetric 4-bit \
                 codes with per-column or grouped scales{})",
                if self.weight_only {
                    ""
                } else {
                    ", or a float activation with weight-only=false"
                }
            ));
        }
        Ok(PassOutcome::from_changed(fused > 0)
            .with("fused", fused)
            .with(LEFT_FLOAT, left)
            .with("nodes-removed", removed))
    }
}
