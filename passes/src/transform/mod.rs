//! The one channel-transform mechanism: every weight rewrite of a region goes through
//! [`apply`].
//!
//! A transform `T` ([`ChannelOp`]) on a region has
//! - a **source side**: each weight that writes the channels takes `W ← T W` on that axis
//!   (a bias or a LayerNorm parameter, which carry the channels too, likewise); a diagonal
//!   goes into the sources the region's scale walk chose ([`Region::sources_for`]: `up`
//!   and not `gate` in a gated MLP, through one factor of the product);
//! - a **sink side**: each weight that reads them takes `W ← W T⁻¹`, i.e. `T⁻ᵀ` along its
//!   reading axis;
//! - an **online part** where `T` does not commute with what lies between (a rotation
//!   across a SiLU): then `x̃ = T x` is computed in the graph right before the sinks, and
//!   only the sink side is folded (repeated blocks: one `ai.perqc::Hadamard`; blocks that
//!   differ, CAT's: a block-wise `MatMul` between two `Reshape`s).
//!
//! Folding is legal only if the region allows `T`'s kind ([`Region::why_not`]); the
//! refusal carries the region's reason. A weight read by several endpoints that all need
//! the same rewrite is rewritten once, in place (a tied embedding and lm_head under a
//! rotation stay tied); otherwise each endpoint gets its own copy (the tie is broken only
//! when one side changes).

pub mod op;

pub use op::ChannelOp;

use crate::regions::{Endpoint, Region, TransformKind};
use perqc_ir::{
    AttrValue, Graph, Model, NodeId, Operand, OptionError, PassContext, PassOptions, Tensor,
    ValueDef, ValueId,
};
use std::collections::HashMap;

/// Where `T` goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Into the sources and the sinks (`T` commutes with everything between).
    Fold,
    /// Computed before the sinks, folded into the sinks only.
    Online,
}

/// What [`apply`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Weights rewritten in place.
    pub rewritten: usize,
    /// Endpoints that got their own copy of a shared weight.
    pub untied: usize,
    /// Nodes inserted for the online part.
    pub online_nodes: usize,
}

impl std::ops::AddAssign for Applied {
    fn add_assign(&mut self, o: Applied) {
        self.rewritten += o.rewritten;
        self.untied += o.untied;
        self.online_nodes += o.online_nodes;
    }
}

/// The model metadata key listing the transform passes applied to a model, comma-separated:
/// a transform pass run again on its own output does nothing and says so (a second
/// symmetric Hadamard would undo the first; a second permutation would be computed from
/// statistics of the unpermuted channels).
pub const APPLIED_KEY: &str = "perqc.transforms";

/// Whether transform pass `pass` has already run on `model`; if so, says so in a note
/// (the pass then does nothing).
pub fn already_applied(model: &Model, ctx: &mut PassContext, pass: &str) -> bool {
    let done = model
        .metadata
        .iter()
        .any(|(k, v)| k == APPLIED_KEY && v.split(',').any(|p| p == pass));
    if done {
        ctx.note(format!(
            "already applied to this model ({APPLIED_KEY} lists it): nothing done"
        ));
    }
    done
}

/// An optional seed option (`signs=SEED` of the rotation passes): `None` when absent.
pub fn seed_option(opts: &PassOptions, name: &str) -> Result<Option<u64>, OptionError> {
    match opts.get(name) {
        None => Ok(None),
        Some(_) => opts
            .parse_or(name, "a seed (non-negative integer)", 0u64)
            .map(Some),
    }
}

/// Records that transform pass `pass` ran on `model`.
pub fn record_applied(model: &mut Model, pass: &str) {
    match model.metadata.iter_mut().find(|(k, _)| k == APPLIED_KEY) {
        Some((_, v)) => {
            v.push(',');
            v.push_str(pass);
        }
        None => model
            .metadata
            .push((APPLIED_KEY.to_string(), pass.to_string())),
    }
}

/// The transform kind a region must allow for `op` to fold.
pub fn kind_of(op: &ChannelOp) -> TransformKind {
    match op {
        ChannelOp::Permutation(_) => TransformKind::Permutation,
        ChannelOp::Diagonal(d) if d.iter().all(|&x| x > 0.0) => TransformKind::Scale,
        ChannelOp::Diagonal(_) => TransformKind::SignedScale,
        ChannelOp::Blocks { .. } | ChannelOp::Hadamard(_) => TransformKind::Rotation,
    }
}

/// Applies `op` to `region` of `graph`. Errors name the region's reason when the kind is
/// not legal there, or the endpoint that cannot take the map.
pub fn apply(
    graph: &mut Graph,
    region: &Region,
    op: &ChannelOp,
    placement: Placement,
) -> Result<Applied, String> {
    if op.dim() != region.dim {
        return Err(format!(
            "a map on {} channels for a region of {}",
            op.dim(),
            region.dim
        ));
    }
    if op.is_identity() {
        return Ok(Applied::default());
    }
    let mut updates = Vec::new();
    let mut applied = Applied::default();
    match placement {
        Placement::Fold => {
            let kind = kind_of(op);
            if matches!(op, ChannelOp::Blocks { .. }) && !op.is_orthogonal(1e-9) {
                // A general linear map needs every kind.
                for k in [
                    TransformKind::Permutation,
                    TransformKind::Rotation,
                    TransformKind::SignedScale,
                ] {
                    if let Some(why) = region.why_not(k) {
                        return Err(format!("not {}: {why}", k.as_str()));
                    }
                }
            } else if let Some(why) = region.why_not(kind) {
                return Err(format!("no {}: {why}", kind.as_str()));
            }
            // A scale may go into some sources only (one factor of a product).
            for e in region.sources_for(kind) {
                updates.push(update(graph, region, e, op)?);
            }
            // Parameters that are uniform stay as they are; permutations move any.
            if kind == TransformKind::Permutation {
                for e in &region.params {
                    updates.push(update(graph, region, e, op)?);
                }
            }
        }
        Placement::Online => {
            applied.online_nodes = insert_online(graph, region, op)?;
        }
    }
    let inv = op
        .inverse_transpose()
        .ok_or_else(|| "the map is singular".to_string())?;
    for e in &region.sinks {
        updates.push(update(graph, region, e, &inv)?);
    }
    let (rewritten, untied) = write(graph, updates)?;
    applied.rewritten = rewritten;
    applied.untied = untied;
    Ok(applied)
}

/// One endpoint's rewrite: `m` along `axis` of input `input` of `node`, on the indices
/// `part` of that axis only where the weight carries other regions' channels too.
struct Update {
    node: NodeId,
    input: usize,
    axis: usize,
    m: ChannelOp,
    part: Option<Vec<usize>>,
}

impl Update {
    fn apply(&self, t: &Tensor) -> Result<Tensor, String> {
        match &self.part {
            Some(part) => self.m.apply_part(t, self.axis, part),
            None => self.m.apply(t, self.axis),
        }
    }
}

fn update(graph: &Graph, region: &Region, e: &Endpoint, m: &ChannelOp) -> Result<Update, String> {
    let (m, part) = match m.localize(&e.channels) {
        Ok(local) => (local, e.part.clone()),
        // The indices in another order (a slice that reverses or strides the channels):
        // each channel's first reading index in channel order, then the second ones, ...,
        // so that runs of consecutive channels take whole blocks; the rewrite gathers the
        // indices in that order.
        Err(why) => {
            let mut seen: HashMap<u32, usize> = HashMap::new();
            let mut order: Vec<(usize, u32, usize)> = e
                .channels
                .iter()
                .enumerate()
                .map(|(i, &c)| {
                    let n = seen.entry(c).or_insert(0);
                    *n += 1;
                    (*n, c, i)
                })
                .collect();
            order.sort_unstable();
            let channels: Vec<u32> = order.iter().map(|&(_, c, _)| c).collect();
            let local = m.localize(&channels).map_err(|_| {
                format!(
                    "{} ({}): {why}",
                    region.node_name(e.node),
                    region.value_name(e.weight)
                )
            })?;
            let at = |i: usize| e.part.as_ref().map_or(i, |p| p[i]);
            (local, Some(order.iter().map(|&(_, _, i)| at(i)).collect()))
        }
    };
    if graph
        .try_node(e.node)
        .and_then(|n| n.input(e.input))
        .is_none()
    {
        return Err(format!("{}: the weight is gone", region.node_name(e.node)));
    }
    Ok(Update {
        node: e.node,
        input: e.input,
        axis: e.axis,
        m,
        part,
    })
}

/// Rewrites the weights: in place where every reader of a weight takes the same rewrite,
/// else a copy per endpoint. Returns (rewritten in place, copies made).
///
/// In place means the initializer's tensor is replaced: its payload is transformed where it
/// lies when the graph holds the only reference to it (a weight an earlier transform
/// rewrote), else into one new buffer, and the original (a slice of the model file) is
/// dropped with its last reference. So the graph never holds two versions of a weight, and
/// untouched weights are never copied.
fn write(graph: &mut Graph, updates: Vec<Update>) -> Result<(usize, usize), String> {
    let mut by_weight: Vec<(ValueId, Vec<Update>)> = Vec::new();
    for u in updates {
        let w = graph
            .node(u.node)
            .input(u.input)
            .expect("checked by update");
        match by_weight.iter_mut().find(|(v, _)| *v == w) {
            Some((_, list)) => list.push(u),
            None => by_weight.push((w, vec![u])),
        }
    }
    let (mut rewritten, mut copies) = (0, 0);
    for (w, ups) in by_weight {
        let name = graph.value(w).name.clone();
        if graph.const_tensor(w).is_none() {
            return Err(format!("`{name}` is not a constant"));
        }
        let readers: Vec<(NodeId, usize)> = graph
            .value(w)
            .uses()
            .iter()
            .filter_map(|u| match u.operand {
                Operand::Input(i) => Some((u.node, i as usize)),
                Operand::Capture(_) => None,
            })
            .collect();
        let covered = graph.value(w).uses().len() == readers.len()
            && readers
                .iter()
                .all(|r| ups.iter().any(|u| (u.node, u.input) == *r));
        let same = ups
            .windows(2)
            .all(|p| p[0].axis == p[1].axis && p[0].m == p[1].m && p[0].part == p[1].part);
        let fail = |e: String| format!("`{name}`: {e}");
        if covered && same && graph.value(w).def() == ValueDef::Initializer && ups[0].part.is_some()
        {
            // A part of the weight: the rewritten copy replaces it.
            let slot = &mut graph.value_mut(w).tensor;
            let new = ups[0].apply(slot.as_ref().expect("an initializer has its tensor"));
            *slot = Some(new.map_err(fail)?);
            rewritten += 1;
            continue;
        }
        if covered && same && graph.value(w).def() == ValueDef::Initializer {
            let slot = &mut graph.value_mut(w).tensor;
            let old = slot.take().expect("an initializer has its tensor");
            match ups[0].m.apply_owned(old, ups[0].axis) {
                // Same name, type and dims, a payload of the full size: what
                // `replace_initializer` checks.
                Ok(new) => *slot = Some(new),
                Err(refused) => {
                    *slot = Some(refused.tensor);
                    return Err(fail(refused.why));
                }
            }
            rewritten += 1;
            continue;
        }
        let t = graph.const_tensor(w).expect("checked above").clone();
        for u in ups {
            let new = u.apply(&t).map_err(fail)?;
            let copy = graph.fresh_name(&name);
            let v = graph
                .add_initializer(&copy, new)
                .map_err(|e| fail(e.to_string()))?;
            graph.set_input(u.node, u.input, Some(v));
            copies += 1;
        }
    }
    Ok((rewritten, copies))
}

/// Inserts `x̃ = T x` before the sinks, once per activation they read; returns how many
/// nodes. The channels must be the activation's last axis, read whole by each sink.
fn insert_online(graph: &mut Graph, region: &Region, op: &ChannelOp) -> Result<usize, String> {
    let mut by_activation: HashMap<ValueId, Vec<&Endpoint>> = HashMap::new();
    let mut order = Vec::new();
    for e in &region.sinks {
        let Some((_, x)) = e.activation else {
            return Err(format!("{}: no activation", region.node_name(e.node)));
        };
        let identity = e.part.is_none()
            && e.channels.len() == region.dim
            && e.channels.iter().enumerate().all(|(i, &c)| c as usize == i);
        if !identity {
            return Err(format!(
                "{} reads the channels through heads; an online map needs them whole",
                region.node_name(e.node)
            ));
        }
        if !by_activation.contains_key(&x) {
            order.push(x);
        }
        by_activation.entry(x).or_default().push(e);
    }
    let mut inserted = 0;
    for x in order {
        let sinks = &by_activation[&x];
        let first = sinks
            .iter()
            .min_by_key(|e| graph.order_position(e.node).unwrap_or(usize::MAX))
            .expect("at least one sink")
            .node;
        let xname = graph.value(x).name.clone();
        let out = graph.fresh_name(&format!("{xname}.transformed"));
        match op {
            ChannelOp::Blocks { size, blocks } if blocks.windows(2).any(|w| w[0] != w[1]) => {
                insert_block_map(graph, first, x, *size, blocks, &out)?;
            }
            _ => {
                let (spec, extra) = online_node(graph, op, &xname)?;
                let mut inputs = vec![Some(x)];
                inputs.extend(extra.into_iter().map(Some));
                graph
                    .insert_node_before(first, spec, &inputs, &[out.as_str()])
                    .map_err(|e| e.to_string())?;
            }
        }
        let y = graph.find(&out).expect("just defined");
        for e in sinks {
            let (slot, _) = e.activation.expect("checked");
            graph.set_input(e.node, slot, Some(y));
        }
        inserted += 1;
    }
    Ok(inserted)
}

/// `out = T x` on the last axis of `x` for a block-diagonal `T` whose blocks differ (CAT's
/// per-block matrices), in standard ops before node `first`: the rows cut into blocks,
/// `Reshape(x, [-1, nb, 1, b])`, one product per block against the stacked `B_jᵀ`
/// (`MatMul` with a `[nb, b, b]` constant: `y_j = x_j B_jᵀ`), and the result put back in
/// x's shape (`Reshape(y, Shape(x))`).
fn insert_block_map(
    graph: &mut Graph,
    first: NodeId,
    x: ValueId,
    b: usize,
    blocks: &[Vec<f64>],
    out: &str,
) -> Result<(), String> {
    let nb = blocks.len();
    if blocks.iter().any(|m| m.len() != b * b) {
        return Err(format!("an online map with blocks that are not {b} x {b}"));
    }
    let xname = graph.value(x).name.clone();
    let mut stacked = Vec::with_capacity(nb * b * b);
    for m in blocks {
        stacked.extend((0..b * b).map(|k| m[(k % b) * b + k / b] as f32));
    }
    let mats = graph.fresh_name(&format!("{xname}/online_blocks"));
    let mats = graph
        .add_initializer(
            &mats,
            Tensor::from_slice(vec![nb as i64, b as i64, b as i64], &stacked),
        )
        .map_err(|e| e.to_string())?;
    let split = graph.fresh_name(&format!("{xname}/online_split"));
    let split = graph
        .add_initializer(
            &split,
            Tensor::from_slice(vec![4], &[-1i64, nb as i64, 1, b as i64]),
        )
        .map_err(|e| e.to_string())?;
    let mut step = |spec: perqc_ir::NodeSpec, inputs: &[Option<ValueId>], name: &str| {
        let v = if name == out {
            out.to_string()
        } else {
            graph.fresh_name(&format!("{xname}/{name}"))
        };
        let spec = spec.named(&graph.fresh_name(&format!("{xname}/{name}")));
        graph
            .insert_node_before(first, spec, inputs, &[v.as_str()])
            .map_err(|e| e.to_string())?;
        Ok::<ValueId, String>(graph.find(&v).expect("just defined"))
    };
    let shape = step(perqc_ir::NodeSpec::new("Shape"), &[Some(x)], "online_shape")?;
    let xb = step(
        perqc_ir::NodeSpec::new("Reshape"),
        &[Some(x), Some(split)],
        "online_rows",
    )?;
    let yb = step(
        perqc_ir::NodeSpec::new("MatMul"),
        &[Some(xb), Some(mats)],
        "online_product",
    )?;
    step(
        perqc_ir::NodeSpec::new("Reshape"),
        &[Some(yb), Some(shape)],
        out,
    )?;
    Ok(())
}

/// The node computing `T x` on the last axis, and the constants it reads.
fn online_node(
    graph: &mut Graph,
    op: &ChannelOp,
    xname: &str,
) -> Result<(perqc_ir::NodeSpec, Vec<ValueId>), String> {
    let name = graph.fresh_name(&format!("{xname}/online"));
    // One initializer per distinct constant: layers rotated by the same block share it.
    let constant = |graph: &mut Graph, base: &str, t: Tensor| -> Result<ValueId, String> {
        let same = |v: ValueId| {
            graph.const_tensor(v).is_some_and(|c| {
                c.dtype == t.dtype && c.dims == t.dims && c.raw_bytes().ok() == t.raw_bytes().ok()
            })
        };
        let mut k = 0;
        let mut n = base.to_string();
        while let Some(v) = graph.find(&n) {
            if same(v) {
                return Ok(v);
            }
            k += 1;
            n = format!("{base}_{k}");
        }
        graph.add_initializer(&n, t).map_err(|e| e.to_string())
    };
    // Per block, row vectors: y_blk = x_blk Bᵀ, the op's `x · H` with H = Bᵀ.
    let block_constant = |graph: &mut Graph, n: usize, b: &[f64]| {
        let h: Vec<f32> = (0..n * n).map(|k| b[(k % n) * n + k / n] as f32).collect();
        constant(
            graph,
            &format!("perqc.online_block{n}"),
            Tensor::from_slice(vec![n as i64, n as i64], &h),
        )
    };
    match op {
        ChannelOp::Hadamard(h) => {
            let v = block_constant(graph, h.order(), &h.dense_block())?;
            let spec = crate::canonicalize::canonical("Hadamard").named(&name);
            Ok((spec, vec![v]))
        }
        ChannelOp::Blocks { size, blocks } => {
            if blocks.windows(2).any(|w| w[0] != w[1]) {
                return Err("an online map with different blocks is not supported".into());
            }
            let Some(b) = blocks.first() else {
                return Err("an online map with no blocks".into());
            };
            let v = block_constant(graph, *size, b)?;
            let spec = crate::canonicalize::canonical("Hadamard").named(&name);
            Ok((spec, vec![v]))
        }
        ChannelOp::Diagonal(d) => {
            let s: Vec<f32> = d.iter().map(|&x| x as f32).collect();
            let v = constant(
                graph,
                "perqc.online_scale",
                Tensor::from_slice(vec![s.len() as i64], &s),
            )?;
            Ok((perqc_ir::NodeSpec::new("Mul").named(&name), vec![v]))
        }
        ChannelOp::Permutation(p) => {
            let idx: Vec<i64> = p.iter().map(|&i| i as i64).collect();
            let v = constant(
                graph,
                "perqc.online_perm",
                Tensor::from_slice(vec![idx.len() as i64], &idx),
            )?;
            let spec = perqc_ir::NodeSpec::new("Gather")
                .named(&name)
                .attr("axis", AttrValue::Int(-1));
            Ok((spec, vec![v]))
        }
    }
}
