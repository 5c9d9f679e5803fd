//! `canonicalize`: exporter spellings -> perqc's canonical ops, one identity per file.
//!
//! Each pattern is a [`Pattern`]: given an anchor node (the last op of a chain), it walks
//! up with the IR's [`Matcher`], checks what makes the identity hold, and returns a
//! [`Patch`] that turns the anchor into the canonical op (the chain's other nodes are left
//! unread and go with the patch). Patterns match by structure, never by tensor names.
//!
//! Canonical ops live in the `ai.perqc` domain ([`PERQC_DOMAIN`]) with the semantics of the
//! ONNX op of the same name (differences are stated in each pattern's file), so they exist
//! whatever opset the model declares; the op table gives them shape rules and kernels, so
//! the native runtime plans the canonical graph directly. `lower` turns them back into
//! ops of the model's own opset before export.
//!
//! Every pattern is also a pass of its own (its `NAME`); `canonicalize` runs them all in
//! one sweep over the node order, then `dce`.

pub mod attention;
pub mod fake_quantize;
pub mod gather_table;
pub mod gelu;
pub mod hadamard;
pub use hadamard::is_online_hadamard;
pub mod identity;
pub mod layer_norm;
pub mod linear;
pub mod rms_norm;
pub mod rotary;
pub mod silu;
pub mod skip_rms_norm;

use crate::Dce;
use perqc_ir::{
    Matcher, Model, NodeId, OpsetImport, OptionError, Pass, PassContext, PassError, PassFactory,
    PassOptions, PassOutcome, Patch,
};
use perqc_ops::{PERQC_DOMAIN, ShapeMap};

/// One canonicalization: pattern -> check -> patch at an anchor node.
pub struct Pattern {
    /// Registry name of the pattern as a pass of its own.
    pub name: &'static str,
    pub description: &'static str,
    pub rewrite: fn(&Matcher<'_>, NodeId) -> Option<Patch>,
}

/// Every pattern, in the order they are tried at each node.
pub static PATTERNS: [&Pattern; 12] = [
    &attention::PATTERN,
    &linear::PATTERN,
    &rms_norm::PATTERN,
    &rotary::PATTERN,
    &skip_rms_norm::PATTERN,
    &layer_norm::PATTERN,
    &silu::PATTERN,
    &gelu::PATTERN,
    &hadamard::PATTERN,
    &fake_quantize::PATTERN,
    &gather_table::PATTERN,
    &identity::PATTERN,
];

/// The pass factory of each pattern, in [`PATTERNS`] order.
pub static FACTORIES: [PassFactory; 12] = [
    factory::<0>,
    factory::<1>,
    factory::<2>,
    factory::<3>,
    factory::<4>,
    factory::<5>,
    factory::<6>,
    factory::<7>,
    factory::<8>,
    factory::<9>,
    factory::<10>,
    factory::<11>,
];

fn factory<const I: usize>(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
    opts.allow_only(&[])?;
    Ok(Box::new(PatternPass(PATTERNS[I])))
}

/// A node of a canonical op.
pub fn canonical(op: &str) -> perqc_ir::NodeSpec {
    let mut spec = perqc_ir::NodeSpec::new(op);
    spec.domain = PERQC_DOMAIN.to_string();
    spec
}

/// The constant f32 vector (rank 0 or 1) `v` holds: its length (a scale, gain or bias).
pub fn vector_len(m: &Matcher<'_>, v: perqc_ir::ValueId) -> Option<usize> {
    let t = m.constant(v)?;
    (t.dtype == perqc_ir::DType::F32 && t.dims.len() <= 1).then(|| t.numel().map(|n| n as usize))?
}

/// Whether `v`'s only reader, past no-op Casts, is one of `ops` (default domain) with a
/// constant vector as its other operand: a later anchor (gamma's Mul, beta's Add) that a
/// pattern leaves the chain to.
pub fn scaled_by_reader(m: &Matcher<'_>, mut v: perqc_ir::ValueId, ops: &[&str]) -> bool {
    while let Some(r) = m.only_reader(v) {
        let out = m.node(r).output(0);
        if m.is_op(r, "Cast")
            && out.is_some_and(|o| m.dtype(o).is_some() && m.dtype(o) == m.dtype(v))
        {
            v = out.expect("checked");
            continue;
        }
        return ops.iter().any(|op| m.is_op(r, op))
            && m.two(r).is_some_and(|(a, b)| {
                let other = if a == v { b } else { a };
                vector_len(m, other).is_some()
            });
    }
    false
}

/// Node `end`, an op with the canonical op's semantics under another name (ONNX's own,
/// ONNX Runtime's), becomes canonical op `op` with the same attributes and its first
/// `inputs` inputs, when no result past the first is read. `None` when one is, or input 0
/// is not f32.
pub fn same_op(m: &Matcher<'_>, end: NodeId, op: &str, inputs: usize) -> Option<Patch> {
    let n = m.node(end);
    if m.results_read_from(end, 1) || !m.is_f32(n.input(0)?) {
        return None;
    }
    let mut p = Patch::new();
    p.truncate_outputs(end, 1);
    let spec = perqc_ir::NodeSpec {
        attrs: n.attrs.clone(),
        ..canonical(op)
    };
    p.set_op(
        end,
        spec,
        n.inputs().iter().take(inputs).map(|v| v.map(Into::into)),
    );
    Some(p)
}

/// Runs `patterns` over the main graph in node order; each node is rewritten by the first
/// pattern that matches it. Returns the rewrites per pattern.
fn sweep(
    model: &mut Model,
    ctx: &mut PassContext,
    patterns: &[&Pattern],
) -> Result<Vec<u64>, PassError> {
    let shapes = ctx.analysis::<ShapeMap>(model)?;
    let mut counts = vec![0u64; patterns.len()];
    for id in model.graph.node_order().to_vec() {
        if model.graph.try_node(id).is_none() {
            continue; // absorbed by an earlier rewrite
        }
        let m = Matcher::new(&model.graph, &*shapes);
        let Some((k, patch)) = patterns
            .iter()
            .enumerate()
            .find_map(|(k, p)| (p.rewrite)(&m, id).map(|patch| (k, patch)))
        else {
            continue;
        };
        if !ctx.rewrite() {
            break;
        }
        patch.apply(&mut model.graph)?;
        counts[k] += 1;
    }
    if counts.iter().any(|&c| c > 0) {
        ctx.invalidate_analyses();
        import_perqc_domain(model);
    }
    Ok(counts)
}

/// Adds the `ai.perqc` opset import if missing.
fn import_perqc_domain(model: &mut Model) {
    if model.opset(PERQC_DOMAIN).is_none() {
        model.opset_imports.push(OpsetImport {
            domain: Some(PERQC_DOMAIN.to_string()),
            version: Some(1),
        });
    }
}

/// One pattern as a pass.
pub struct PatternPass(&'static Pattern);

impl Pass for PatternPass {
    fn name(&self) -> &'static str {
        self.0.name
    }

    fn description(&self) -> &'static str {
        self.0.description
    }

    fn run(&mut self, model: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        let n = sweep(model, ctx, &[self.0])?[0];
        Ok(PassOutcome::from_changed(n > 0).with("rewrites", n))
    }
}

/// `canonicalize`: every pattern, then `dce`.
#[derive(Debug, Default)]
pub struct Canonicalize;

impl Canonicalize {
    pub const NAME: &'static str = "canonicalize";
    pub const DESCRIPTION: &'static str = "upcast-half, then rewrite exported spellings (attention, linear, norms, SiLU, GELU, block Hadamard rotations, per-token fake quantization) into canonical ops, then dce";

    pub fn from_options(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        opts.allow_only(&[])?;
        Ok(Box::new(Canonicalize))
    }
}

impl Pass for Canonicalize {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn description(&self) -> &'static str {
        Self::DESCRIPTION
    }

    fn run(&mut self, model: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        // The patterns match f32: a half model is computed in f32 first.
        let half = crate::UpcastHalf.run(model, ctx)?;
        let counts = sweep(model, ctx, &PATTERNS)?;
        let dce = Dce::default().run(model, ctx)?;
        let mut out =
            PassOutcome::from_changed(half.changed || counts.iter().any(|&c| c > 0) || dce.changed);
        for (p, c) in PATTERNS.iter().zip(counts) {
            out = out.with(p.name, c);
        }
        Ok(out
            .with("nodes-removed", dce.counter("nodes-removed"))
            .with("half-tensors-upcast", half.counter("tensors"))
            .with("half-inputs", half.counter("inputs"))
            .with("half-outputs", half.counter("outputs")))
    }
}
