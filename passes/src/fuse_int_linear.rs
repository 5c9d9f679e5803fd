//! `fuse-int-linear`: quantized linears -> the runtime's integer linears.
//!
//! ```text
//! a = ai.perqc::FakeQuantize(x);  MatMul(a, DequantizeLinear(w_i, t_i, axis = 1))  (i = 1..)
//!     == (codes, terms) = ai.perqc::QuantizeTokens(x);
//!        ai.perqc::QuantizedLinear(codes, terms, pack(w_i), t_i, colsum(w_i))   (up to f32 round-off)
//! ```
//!
//! for constant `w_i` `[K, N_i]` of signed 4-bit codes (int4, or int8 holding values in
//! -8..=7) with one f32 scale per column and no zero point (or an all-zero one), and a
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
//! The packed weight is a u8 initializer in the kernel's layout (panels of 32 columns,
//! two codes per byte), so a session holds the weight at 4 bits. Everything else (blocked
//! or asymmetric weights, FP4/MX formats, weight-only graphs) keeps the float path; the
//! pass counts what it left. A FakeQuantize with readers of both kinds stays for the
//! float ones.
//!
//! `lower` has no ONNX spelling for the ops: export the graph before this pass.

use crate::Dce;
use perqc_ir::{
    DType, Matcher, Model, NodeId, OptionError, Pass, PassContext, PassError, PassOptions,
    PassOutcome, Patch, Tensor, ValueId,
};
use perqc_ops::kernels::igemm;
use perqc_ops::{PERQC_DOMAIN, ShapeMap};

#[derive(Debug, Default)]
pub struct FuseIntLinear;

impl FuseIntLinear {
    pub const NAME: &'static str = "fuse-int-linear";
    pub const DESCRIPTION: &'static str = "MatMul(FakeQuantize(x), DequantizeLinear(int4 W, per-column scale)) -> ai.perqc::QuantizeTokens (once per activation) + QuantizedLinear, the native runtime's integer product (not bit-exact; no ONNX lowering)";

    pub fn from_options(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        opts.allow_only(&[])?;
        Ok(Box::new(FuseIntLinear))
    }
}

/// The counter of MatMuls reading a FakeQuantize that keep the float path.
const LEFT_FLOAT: &str = "left-float";

/// The weight side: signed 4-bit codes `[K, N]` and their per-column scale value.
struct Weight {
    codes: Vec<i8>,
    k: usize,
    n: usize,
    scale: ValueId,
    name: String,
}

/// `DequantizeLinear(w, t, z?)` with `w` constant `[K, N]` int4 (or int8 in -8..=7), `t`
/// constant f32 `[N]` on axis 1, no block size, `z` absent or zero.
fn weight(m: &Matcher<'_>, v: ValueId) -> Option<Weight> {
    let dq = m.def_op(v, "DequantizeLinear")?;
    let n = m.node(dq);
    let (w, t) = (n.input(0)?, n.input(1)?);
    let wt = m.constant(w)?;
    if wt.dims.len() != 2 || !matches!(wt.dtype, DType::I4 | DType::I8) {
        return None;
    }
    let (k, cols) = (wt.dims[0] as usize, wt.dims[1] as usize);
    let axis = n.attr_int("axis").unwrap_or(1);
    if (axis != 1 && axis != -1) || n.attr_int("block_size").unwrap_or(0) != 0 {
        return None;
    }
    let tt = m.constant(t)?;
    if tt.dtype != DType::F32 || tt.dims != [cols as i64] {
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
            a.as_standard_layout().iter().copied().collect::<Vec<i8>>()
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
        scale: t,
        name: m.graph.value(w).name.clone(),
    })
}

/// The rewrite of every fusable MatMul reading FakeQuantize node `fq` (one patch: the
/// `QuantizeTokens` they share and their `QuantizedLinear`s), with the count of MatMuls
/// reading it that stay float; `None` when none is fusable.
fn rewrite(m: &Matcher<'_>, fq: NodeId) -> Option<(Patch, u64, u64)> {
    let fq_node = m.node(fq);
    perqc_ops::kernels::misc::token_quant(fq_node).ok()?;
    let (x, a) = (fq_node.input(0)?, fq_node.output(0)?);
    if m.rank(x).is_some_and(|r| r < 1) {
        return None;
    }
    let mut fused = Vec::new();
    let mut left = 0u64;
    for u in m.graph.value(a).uses() {
        let end = u.node;
        if !m.is_op(end, "MatMul") || m.input(end, 0) != Some(a) {
            continue;
        }
        match m.input(end, 1).and_then(|b| weight(m, b)) {
            Some(w) => fused.push((end, w)),
            None => left += 1,
        }
    }
    if fused.is_empty() {
        return None;
    }
    let mut p = Patch::new();
    let mut spec =
        crate::canonicalize::canonical("QuantizeTokens").named(&format!("{}/codes", fq_node.name));
    for name in ["bits", "symmetric", "clip"] {
        if let Some(v) = fq_node.attr(name) {
            spec = spec.attr(name, v.clone());
        }
    }
    let base = m.graph.value(x).name.clone();
    let (src, rotation) = rotated_input(m, x).map_or((x, None), |(x0, h)| (x0, Some(h)));
    let q = p.insert(
        fq,
        spec,
        [Some(src.into()), rotation.map(Into::into)],
        &[&format!("{base}.codes"), &format!("{base}.terms")],
    );
    let (codes, terms) = (q[0], q[1]);
    let count = fused.len() as u64;
    for (end, w) in fused {
        let packed = igemm::pack_weights(&w.codes, w.k, w.n).ok()?;
        let dims: Vec<i64> = igemm::packed_shape(w.k, w.n)
            .iter()
            .map(|&d| d as i64)
            .collect();
        let sums = p.add_initializer(
            &format!("{}.colsum", w.name),
            Tensor::from_slice(vec![w.n as i64], &packed.col_sums),
        );
        let packed = p.add_initializer(
            &format!("{}.packed", w.name),
            Tensor::from_slice(dims, &packed.data),
        );
        p.set_op(
            end,
            crate::canonicalize::canonical("QuantizedLinear"),
            [
                Some(codes),
                Some(terms),
                Some(packed),
                Some(w.scale.into()),
                Some(sums),
            ],
        );
    }
    Some((p, count, left))
}

/// `x = ai.perqc::Hadamard(x0, H)` read only by the quantizer, with H a constant scaled
/// Sylvester matrix (the fast transform's case): `(x0, H)`, which `QuantizeTokens` rotates
/// itself.
fn rotated_input(m: &Matcher<'_>, x: ValueId) -> Option<(ValueId, ValueId)> {
    let had = m.producer(x)?;
    let n = m.node(had);
    if n.domain != PERQC_DOMAIN || n.op_type != "Hadamard" || !m.single_reader(x) {
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
        for id in model.graph.node_order().to_vec() {
            let is_fq = model
                .graph
                .try_node(id)
                .is_some_and(|n| n.domain == PERQC_DOMAIN && n.op_type == "FakeQuantize");
            if !is_fq {
                continue;
            }
            let m = Matcher::new(&model.graph, &*shapes);
            let Some((patch, n, l)) = rewrite(&m, id) else {
                let a = model.graph.node(id).output(0);
                left += a.map_or(0, |a| {
                    m.graph
                        .value(a)
                        .uses()
                        .iter()
                        .filter(|u| m.is_op(u.node, "MatMul"))
                        .count() as u64
                });
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
                "{left} quantized MatMul(s) keep the float path (weights not symmetric per-column 4-bit codes)"
            ));
        }
        Ok(PassOutcome::from_changed(fused > 0)
            .with("fused", fused)
            .with(LEFT_FLOAT, left)
            .with("nodes-removed", removed))
    }
}
