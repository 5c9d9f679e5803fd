//! Where a diagonal scale of a region's channels goes in: which sources take `D W` when
//! every sink takes `W D⁻¹`.
//!
//! A permutation or a rotation must go into every source, because it has to commute with
//! every op between sources and sinks on all of its operands at once. A diagonal `D` has
//! one more way through: an op linear in one operand alone (a product's factor,
//! [`perqc_ops::channel::Commutes::factor`]) passes `D` when only that operand takes it:
//! `D (g ⊙ u) == g ⊙ (D u)`. So in a gated MLP `down(silu(gate(x)) ⊙ up(x))` a scale
//! folds into `up` and `down` and leaves `gate` alone, although SiLU does not commute with
//! it (smoothing's identity).
//!
//! The walk starts from every sink's activation, which must carry `D x`, and goes back to
//! the producers: an op whose operands all pass `D` scales them all (an `Add` scales both
//! operands, a bias included); otherwise one factor takes `D` and the other operands stay
//! as they are, trying each factor in turn. It fails on an op that passes neither way, and
//! where a value would have to be both scaled and not. Then every reader of a scaled value
//! must take the scale: a sink, an op whose result is scaled through that operand, or a
//! result invariant under the scale; else the walk fails (the scale would leak).

use super::Endpoint;
use super::trace::{Env, ScaleRole};
use perqc_ir::{NodeId, Operand, ValueDef, ValueId};
use std::collections::{HashMap, HashSet};

/// The values and nodes one region's channels pass through: where a trace's channels were
/// cut into several regions (a fused projection split into parts), a value outside it
/// carries none of the region's channels, and a node outside it hands none of them on.
pub(super) struct Scope {
    pub values: HashSet<ValueId>,
    pub nodes: HashSet<NodeId>,
}

type Roles = HashMap<NodeId, Vec<(usize, ScaleRole)>>;

/// What the walk decided so far.
#[derive(Clone, Default)]
struct Walk {
    /// Whether a value carries `D x` (true) or stays `x` (false).
    scaled: HashMap<ValueId, bool>,
    /// The values in the order they were decided (for deterministic messages).
    order: Vec<ValueId>,
    /// Per node whose result is scaled, the operands that take `D`.
    operands: HashMap<NodeId, Vec<usize>>,
    /// Constant operands that take `D`: `(node, input)`.
    consts: Vec<(NodeId, usize)>,
}

struct Ctx<'a, 'e> {
    env: &'a Env<'e>,
    roles: &'a Roles,
    signed: bool,
    scope: &'a Scope,
}

impl Ctx<'_, '_> {
    fn legal(&self, r: &ScaleRole) -> bool {
        if self.signed { r.signed } else { r.positive }
    }

    fn name(&self, v: ValueId) -> &str {
        &self.env.graph.value(v).name
    }

    /// Value `v` must carry `D x`.
    fn require(&self, mut w: Walk, v: ValueId) -> Result<Walk, String> {
        match w.scaled.get(&v) {
            Some(true) => return Ok(w),
            Some(false) => {
                return Err(format!(
                    "`{}` would have to be scaled on one path and not on another",
                    self.name(v)
                ));
            }
            None => {}
        }
        w.scaled.insert(v, true);
        w.order.push(v);
        let ValueDef::Node { node, .. } = self.env.graph.value(v).def() else {
            return Err(format!("`{}` is not computed by the graph", self.name(v)));
        };
        // The node's other results that carry the region's channels (another part of a
        // Split) are scaled with this one.
        for &r in self.env.graph.node(node).outputs().iter().flatten() {
            if r == v || !self.scope.values.contains(&r) {
                continue;
            }
            match w.scaled.get(&r) {
                Some(true) => {}
                Some(false) => {
                    return Err(format!(
                        "`{}` would have to be scaled on one path and not on another",
                        self.name(r)
                    ));
                }
                None => {
                    w.scaled.insert(r, true);
                    w.order.push(r);
                }
            }
        }
        let label = || self.env.node_label(node);
        let ops: Vec<(usize, ScaleRole)> = self
            .roles
            .get(&node)
            .map(|o| o.iter().filter(|(_, r)| !r.invariant).copied().collect())
            .unwrap_or_default();
        if ops.is_empty() {
            return Err(format!("{}: no operand passes a scale to it", label()));
        }
        if ops.iter().all(|(_, r)| self.legal(r)) {
            for &(j, _) in &ops {
                w = self.operand(w, node, j)?;
            }
            return Ok(w);
        }
        let mut why = format!("{} does not commute with channel scales", label());
        for &(f, _) in ops.iter().filter(|(_, r)| r.factor) {
            match self.through_factor(w.clone(), node, &ops, f) {
                Ok(done) => return Ok(done),
                Err(e) => why = e,
            }
        }
        Err(why)
    }

    /// `D` through factor `f` of `node`, its other operands as they are.
    fn through_factor(
        &self,
        mut w: Walk,
        node: NodeId,
        ops: &[(usize, ScaleRole)],
        f: usize,
    ) -> Result<Walk, String> {
        for &(j, _) in ops {
            if j != f {
                w = self.keep(w, node, j)?;
            }
        }
        self.operand(w, node, f)
    }

    /// Operand `j` of `node` takes `D`.
    fn operand(&self, mut w: Walk, node: NodeId, j: usize) -> Result<Walk, String> {
        let v = self
            .env
            .graph
            .node(node)
            .input(j)
            .ok_or("an omitted operand")?;
        w.operands.entry(node).or_default().push(j);
        if self.env.graph.const_tensor(v).is_some() {
            w.consts.push((node, j));
            return Ok(w);
        }
        self.require(w, v)
    }

    /// Operand `j` of `node` stays as it is.
    fn keep(&self, mut w: Walk, node: NodeId, j: usize) -> Result<Walk, String> {
        let Some(v) = self.env.graph.node(node).input(j) else {
            return Ok(w);
        };
        if self.env.graph.const_tensor(v).is_some() {
            return Ok(w);
        }
        match w.scaled.get(&v) {
            Some(true) => Err(format!(
                "`{}` would have to be scaled on one path and not on another",
                self.name(v)
            )),
            Some(false) => Ok(w),
            None => {
                w.scaled.insert(v, false);
                w.order.push(v);
                Ok(w)
            }
        }
    }

    /// Every reader of a scaled value takes the scale.
    fn check_readers(&self, w: &Walk, sinks: &[Endpoint]) -> Result<(), String> {
        for &v in w.order.iter().filter(|v| w.scaled[v]) {
            for u in self.env.graph.value(v).uses() {
                let Operand::Input(i) = u.operand else {
                    return Err(format!("`{}` is read inside a subgraph", self.name(v)));
                };
                let i = i as usize;
                // A reader that hands on none of the region's channels (a Slice taking
                // another part) does not see the scale.
                if !self.scope.nodes.contains(&u.node) {
                    continue;
                }
                let sink = sinks
                    .iter()
                    .any(|e| e.node == u.node && e.activation.is_some_and(|(s, _)| s == i));
                let scaled = w.operands.get(&u.node).is_some_and(|o| o.contains(&i));
                let invariant = self
                    .roles
                    .get(&u.node)
                    .and_then(|o| o.iter().find(|(j, _)| *j == i))
                    .is_some_and(|(_, r)| r.invariant && self.legal(r));
                if !(sink || scaled || invariant) {
                    return Err(format!(
                        "{} reads `{}`, which the scale changes, but its result would not take it",
                        self.env.node_label(u.node),
                        self.name(v)
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The indices into `sources` that a diagonal scale (`signed`: with negative entries)
/// folds into when its inverse folds into every sink, or why no choice of sources is exact.
pub(super) fn scaled_sources(
    env: &Env<'_>,
    roles: &Roles,
    sources: &[Endpoint],
    sinks: &[Endpoint],
    signed: bool,
    scope: &Scope,
) -> Result<Vec<usize>, String> {
    if sinks.is_empty() {
        return Err("no weight reads the channels".into());
    }
    let ctx = Ctx {
        env,
        roles,
        signed,
        scope,
    };
    let mut w = Walk::default();
    for e in sinks {
        let Some((_, v)) = e.activation else {
            return Err("a sink without an activation".into());
        };
        w = ctx.require(w, v)?;
    }
    ctx.check_readers(&w, sinks)?;
    let mut out = Vec::new();
    for &(node, input) in &w.consts {
        match sources
            .iter()
            .position(|e| e.node == node && e.input == input)
        {
            Some(i) => out.push(i),
            None => {
                return Err(format!(
                    "{}: a constant that is not one of the region's sources would take the scale",
                    env.node_label(node)
                ));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}
