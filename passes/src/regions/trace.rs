//! The dataflow behind [`super::Regions`]: follow channel axes through the op table's
//! channel column ([`perqc_ops::channel::flow`]) from the weights that write them to the
//! weights that read them.
//!
//! A *port* is a value with the axes that carry the region's channels, in order of
//! significance (`[.., H, .., D]` after a head split and a transpose), and a *map* from
//! the port's local channel index (row-major over those axes) to channel ids. Ids are
//! merged in a union-find wherever two ports must take the same transform at paired
//! indices (a residual `Add`'s operands, a query head and its key/value head); the classes
//! are the region's channels. A port is reached forward (a reader's rule says where the
//! channels go) or backward (an operand that must carry the same channels, `with`, is
//! traced to where it was produced). Rules are asked per axis; this file matches on the
//! rule's answer, never on op types.
//!
//! A rule may hand a result a part of an axis ([`ChannelFlow::Parts`]: Split or Slice along
//! the channels): the result's port gets the ids at the selected indices (`select_axis`);
//! traced back from such a result, the operand's other indices get fresh ids
//! (`scatter_axis`). Everything the trace finds that limits transforms (a barrier, an op
//! that commutes with some kinds only, a residual sum, an invariant end) is recorded with
//! the ids of the port it was found at, so that [`super::classify`] can give it to the
//! channels it concerns: a trace's channels are cut into regions by the values they travel
//! through (the query and value parts of one fused projection end up in different regions).

use super::Blocker;
use perqc_ir::{Dim, Graph, Model, NodeId, ValueDef, ValueId};
use perqc_ops::ShapeMap;
use perqc_ops::channel::{self, ChannelFlow, Commutes, Fanout, Part};
use perqc_ops::facts::Mono;
use smallvec::SmallVec;
use std::collections::{HashMap, VecDeque};

pub type Axes = SmallVec<[usize; 2]>;

/// Ports of a node with how their heads axis pairs with the operand's.
type Fanned = Vec<(channel::Port, Fanout)>;

/// Channel ids with union-find.
#[derive(Default)]
pub(super) struct Ids {
    parent: Vec<u32>,
}

impl Ids {
    fn fresh(&mut self, n: usize) -> Vec<u32> {
        let start = self.parent.len() as u32;
        self.parent.extend(start..start + n as u32);
        (start..start + n as u32).collect()
    }

    pub(super) fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let p = self.parent[x as usize];
            self.parent[x as usize] = self.parent[p as usize];
            x = p;
        }
        x
    }

    fn union(&mut self, a: u32, b: u32) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            let (lo, hi) = if a < b { (a, b) } else { (b, a) };
            self.parent[hi as usize] = lo;
        }
    }
}

/// An endpoint before its ids are resolved to region channels.
pub(super) struct RawEndpoint {
    pub node: NodeId,
    pub input: usize,
    pub weight: ValueId,
    pub axis: usize,
    pub ids: Vec<u32>,
    /// For sinks: the operand carrying the channels into the node.
    pub activation: Option<(usize, ValueId)>,
}

/// A port whose axis along which indices are heads: `(ids, extents, head axis position)`.
pub(super) struct HeadPort {
    pub ids: Vec<u32>,
    pub extents: Vec<usize>,
    pub pos: usize,
}

/// Everything one traced region collected, before classification.
#[derive(Default)]
pub(super) struct Trace {
    pub ids: Ids,
    /// The ids of the first source, in order: the region's channel order.
    pub seed_ids: Vec<u32>,
    pub sources: Vec<RawEndpoint>,
    pub sinks: Vec<RawEndpoint>,
    pub params: Vec<RawEndpoint>,
    pub ports: Vec<(ValueId, Axes)>,
    pub nodes: Vec<NodeId>,
    pub head_ports: Vec<HeadPort>,
    /// Barriers, with the node each is at (none: a graph input or output) and the ids of
    /// the port that hit it.
    pub blockers: Vec<(Blocker, Option<NodeId>, Vec<u32>)>,
    /// Ops between sources and sinks that rule out permutations or rotations, in the order
    /// found, with the ids they see (scales: [`super::scale`]).
    pub limits: Vec<Limit>,
    /// Ids of channel streams that are added (a residual connection).
    pub sums: Vec<u32>,
    /// Ids of channels that end in an invariant (a query-key product).
    pub invariant_ends: Vec<u32>,
    /// Per node, the ids that pass through it (for a part-taking op, only those it hands
    /// on).
    pub node_ids: HashMap<NodeId, Vec<u32>>,
    /// Per node, how a diagonal scale passes each operand that carries the channels
    /// (constant ones included: sources), by operand index.
    pub roles: HashMap<NodeId, Vec<(usize, ScaleRole)>>,
    pub seen: HashMap<ValueId, (Axes, Vec<u32>)>,
    done_nodes: HashMap<(NodeId, usize), ()>,
    queue: VecDeque<ValueId>,
}

/// An op that rules out some kinds of transform for the channels it sees.
pub(super) struct Limit {
    pub node: NodeId,
    pub permutation: bool,
    pub rotation: bool,
    pub ids: Vec<u32>,
}

/// How a diagonal scale of the channels passes one operand of a node, from the rule's
/// answers on its channel axes (all of them must allow it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ScaleRole {
    /// A positive diagonal on this operand and every operand paired with it scales the
    /// result the same way.
    pub positive: bool,
    /// Likewise for diagonals with negative entries.
    pub signed: bool,
    /// The op is linear in this operand alone ([`Commutes::factor`]).
    pub factor: bool,
    /// The result does not carry the channels ([`ChannelFlow::Invariant`]): a scale it
    /// commutes with leaves it as it is.
    pub invariant: bool,
}

impl ScaleRole {
    /// From the flows of the operand's channel axes: reshapes and heads only move the
    /// channels, so a diagonal in region channels passes them.
    fn of(flows: &[ChannelFlow]) -> ScaleRole {
        let mut r = ScaleRole {
            positive: true,
            signed: true,
            factor: true,
            invariant: false,
        };
        for f in flows {
            match f {
                ChannelFlow::Through { commutes, .. } | ChannelFlow::Invariant { commutes, .. } => {
                    r.positive &= commutes.positive_scale;
                    r.signed &= commutes.signed_scale;
                    r.factor &= commutes.factor;
                    r.invariant |= matches!(f, ChannelFlow::Invariant { .. });
                }
                ChannelFlow::Regroup | ChannelFlow::Heads { .. } | ChannelFlow::Parts { .. } => {}
                ChannelFlow::Contracted { .. } | ChannelFlow::Barrier(_) => {
                    r.positive = false;
                    r.signed = false;
                    r.factor = false;
                }
            }
        }
        r
    }
}

/// The graph and its facts, shared by every trace.
pub(super) struct Env<'a> {
    pub model: &'a Model,
    pub graph: &'a Graph,
    pub shapes: &'a ShapeMap,
    outputs: Vec<ValueId>,
    /// By node index: whether the node's result data reach a graph output. A node whose
    /// results only ever feed `Shape`/`Size` (torch's SDPA export reads the shape of the
    /// repeated values this way) reads no data of the channels, so the trace passes it by.
    reads_data: Vec<bool>,
}

impl<'a> Env<'a> {
    pub fn new(model: &'a Model, shapes: &'a ShapeMap) -> Env<'a> {
        let graph = &model.graph;
        // Backwards over the node order: a value is live when a graph output is it or a live
        // node reads its data.
        let mut live = vec![false; graph.value_capacity()];
        for &o in &graph.outputs {
            live[o.index()] = true;
        }
        let mut reads_data = vec![false; graph.node_capacity()];
        for &id in graph.node_order().iter().rev() {
            let n = graph.node(id);
            let used = n.subgraphs().next().is_some()
                || n.outputs().iter().flatten().any(|o| live[o.index()]);
            if used && !n.reads_shape_only() {
                reads_data[id.index()] = true;
                for v in n.inputs().iter().flatten().chain(n.captures()) {
                    live[v.index()] = true;
                }
            }
        }
        Env {
            model,
            graph,
            shapes,
            outputs: graph.outputs.clone(),
            reads_data,
        }
    }

    pub fn flow(&self, node: NodeId, input: usize, axis: usize) -> ChannelFlow {
        let opset = |d: &str| self.model.opset(d);
        channel::flow(self.graph, node, self.shapes, &opset, input, axis)
    }

    fn is_const(&self, v: ValueId) -> bool {
        self.graph.const_tensor(v).is_some()
    }

    /// Known sizes of `axes` of `v`.
    pub(crate) fn extents(&self, v: ValueId, axes: &[usize]) -> Option<Vec<usize>> {
        let shape = self.shapes.shape(v)?;
        axes.iter()
            .map(|&a| match shape.get(a)? {
                Dim::Known(n) if *n > 0 => Some(*n as usize),
                _ => None,
            })
            .collect()
    }

    pub fn node_label(&self, node: NodeId) -> String {
        let n = self.graph.node(node);
        let op = if n.domain.is_empty() || n.domain == "ai.onnx" {
            n.op_type.clone()
        } else {
            format!("{}::{}", n.domain, n.op_type)
        };
        if n.name.is_empty() {
            format!("{op} ({node})")
        } else {
            format!("{op} `{}`", n.name)
        }
    }

    /// The constant inputs of `node` whose axis `axis` the rule sends through to a result
    /// as channels that every linear map commutes with: where regions start.
    pub fn result_heads(&self, node: NodeId) -> Option<channel::ResultHeads> {
        let opset = |d: &str| self.model.opset(d);
        channel::result_heads(self.graph, node, self.shapes, &opset)
    }

    pub fn seeds(&self, node: NodeId) -> Vec<(usize, usize)> {
        let n = self.graph.node(node);
        let mut out = Vec::new();
        for (i, v) in n.inputs().iter().enumerate() {
            let Some(v) = *v else { continue };
            if !self.is_const(v) {
                continue;
            }
            let Some(shape) = self.shapes.shape(v) else {
                continue;
            };
            for (a, d) in shape.iter().enumerate() {
                if !matches!(d, Dim::Known(k) if *k >= 2) {
                    continue;
                }
                if let ChannelFlow::Through { commutes, .. } = self.flow(node, i, a)
                    && commutes.rotation
                {
                    out.push((i, a));
                }
            }
        }
        out
    }
}

impl Trace {
    /// A region grown from constant input `input` of `node`, axis `axis` (a weight's
    /// output axis, an embedding table's columns, a norm's gamma).
    pub fn from_seed(env: &Env<'_>, node: NodeId, input: usize, axis: usize) -> Option<Trace> {
        let weight = env.graph.node(node).input(input)?;
        let n = env.extents(weight, &[axis])?[0];
        let mut t = Trace { ..Trace::default() };
        let ids = t.ids.fresh(n);
        t.seed_ids = ids.clone();
        t.operand(env, node, input, SmallVec::from_slice(&[axis]), ids);
        t.run(env);
        Some(t)
    }

    /// The channels on axis `axis` of result `output` of `node`, traced forward only (to
    /// the weights that read them): where an op's result holds heads that no transform of
    /// its inputs reaches ([`channel::ResultHeads`]), so the trace has no source.
    pub fn from_result(env: &Env<'_>, node: NodeId, output: usize, axis: usize) -> Option<Trace> {
        let v = (*env.graph.node(node).outputs().get(output)?)?;
        let n = env.extents(v, &[axis])?[0];
        let mut t = Trace::default();
        let ids = t.ids.fresh(n);
        t.seed_ids = ids.clone();
        // The producer is where the channels start: not traced back into it.
        t.done_nodes.insert((node, 0), ());
        t.visit(env, v, SmallVec::from_slice(&[axis]), ids);
        t.run(env);
        Some(t)
    }

    pub fn owns(&self, v: ValueId, axes: &[usize]) -> bool {
        self.seen.get(&v).is_some_and(|(a, _)| a.as_slice() == axes)
    }

    /// A barrier at `node` (or at a value), hit by the channels `ids`.
    fn block(&mut self, env: &Env<'_>, node: Option<NodeId>, reason: String, ids: &[u32]) {
        let at = node.map(|n| env.node_label(n));
        match self
            .blockers
            .iter_mut()
            .find(|(b, n, _)| *n == node && b.reason == reason)
        {
            Some((_, _, seen)) => seen.extend_from_slice(ids),
            None => self
                .blockers
                .push((Blocker { at, reason }, node, ids.to_vec())),
        }
    }

    fn commute(&mut self, node: NodeId, c: Commutes, ids: &[u32]) {
        if !c.permutation || !c.rotation {
            self.limits.push(Limit {
                node,
                permutation: c.permutation,
                rotation: c.rotation,
                ids: ids.to_vec(),
            });
        }
    }

    /// Reaches value `v` carrying channels on `axes` with ids `ids`.
    fn visit(&mut self, env: &Env<'_>, v: ValueId, axes: Axes, ids: Vec<u32>) {
        // The port's axes must hold exactly its channels.
        if env
            .extents(v, &axes)
            .is_none_or(|e| e.iter().product::<usize>() != ids.len())
        {
            let name = env.graph.value(v).name.clone();
            return self.block(
                env,
                None,
                format!("value `{name}` carries the channels on axes of unknown or other sizes"),
                &ids,
            );
        }
        if let Some((seen_axes, seen_ids)) = self.seen.get(&v) {
            if *seen_axes != axes {
                let name = env.graph.value(v).name.clone();
                self.block(
                    env,
                    None,
                    format!("value `{name}` carries the channels on two different axes"),
                    &ids,
                );
                return;
            }
            let pairs: Vec<(u32, u32)> = seen_ids.iter().copied().zip(ids).collect();
            for (a, b) in pairs {
                self.ids.union(a, b);
            }
            return;
        }
        self.seen.insert(v, (axes.clone(), ids));
        self.ports.push((v, axes));
        self.queue.push_back(v);
    }

    fn run(&mut self, env: &Env<'_>) {
        while let Some(v) = self.queue.pop_front() {
            let (axes, ids) = self.seen[&v].clone();
            self.backward(env, v, &axes, &ids);
            self.forward(env, v, &axes, &ids);
        }
    }

    /// Every reader of `v` is asked where the channels go.
    fn forward(&mut self, env: &Env<'_>, v: ValueId, axes: &Axes, ids: &[u32]) {
        let value = env.graph.value(v);
        if env.outputs.contains(&v) {
            self.block(
                env,
                None,
                format!("the channels leave the graph as output `{}`", value.name),
                ids,
            );
        }
        let uses: Vec<_> = value.uses().to_vec();
        for u in uses {
            if !env.reads_data[u.node.index()] {
                continue;
            }
            match u.operand {
                perqc_ir::Operand::Input(i) => {
                    self.operand(env, u.node, i as usize, axes.clone(), ids.to_vec())
                }
                perqc_ir::Operand::Capture(_) => self.block(
                    env,
                    Some(u.node),
                    "the channels are read inside a subgraph".into(),
                    ids,
                ),
            }
        }
    }

    /// Where the channels of `v` come from: its producer's operand that carries them.
    fn backward(&mut self, env: &Env<'_>, v: ValueId, axes: &Axes, ids: &[u32]) {
        let value = env.graph.value(v);
        let (node, slot) = match value.def() {
            ValueDef::Node { node, slot } => (node, slot as usize),
            ValueDef::Input => {
                let name = value.name.clone();
                return self.block(
                    env,
                    None,
                    format!("the channels enter the graph as input `{name}`"),
                    ids,
                );
            }
            // A constant reached as a value: the caller recorded it as an endpoint.
            _ => return,
        };
        let n = env.graph.node(node);
        // Reached from one of the producer's operands already: the channels' origin is
        // that operand (a norm's output seen from its gamma does not lead back to x).
        if (0..n.inputs().len()).any(|j| self.done_nodes.contains_key(&(node, j))) {
            return;
        }
        // A reshape-like producer: the same element offsets on the operand.
        if let (Some(inp), Some(outs)) = (n.input(0), env.shapes.shape(v))
            && let Some(ins) = env.shapes.shape(inp)
            && let Some(in_axes) = regroup_axes(outs, axes, ins)
            && {
                let fl: Vec<_> = in_axes.iter().map(|&a| env.flow(node, 0, a)).collect();
                fl.iter().any(|f| matches!(f, ChannelFlow::Regroup))
                    && fl
                        .iter()
                        .all(|f| matches!(f, ChannelFlow::Regroup | ChannelFlow::Through { .. }))
            }
        {
            self.operand(env, node, 0, in_axes.clone(), ids.to_vec());
            return self.visit(env, inp, in_axes, ids.to_vec());
        }
        for (j, inp) in n.inputs().iter().enumerate() {
            let Some(inp) = *inp else { continue };
            if let Some(in_axes) = self.operand_for(env, node, j, inp, slot, axes) {
                // The operand's ids follow from the result's through the same rule.
                if let Some(in_ids) = self.inverse_ids(env, node, j, &in_axes, inp, slot, axes, ids)
                {
                    self.operand(env, node, j, in_axes.clone(), in_ids.clone());
                    if !env.is_const(inp) {
                        self.visit(env, inp, in_axes, in_ids);
                    }
                    return;
                }
            }
        }
        // Say why no operand qualifies, from the first barrier among their axes.
        let why = n
            .inputs()
            .iter()
            .enumerate()
            .filter_map(|(j, v)| Some((j, env.shapes.shape((*v)?)?.len())))
            .flat_map(|(j, r)| (0..r).map(move |a| (j, a)))
            .find_map(|(j, a)| match env.flow(node, j, a) {
                ChannelFlow::Barrier(r) => Some(r),
                _ => None,
            })
            .unwrap_or("no rule passes an operand's axis to them");
        self.block(
            env,
            Some(node),
            format!("the channels are produced here ({why})"),
            ids,
        );
    }

    /// The axes of input `j` of `node` that its rule sends to `axes` of result `slot`.
    fn operand_for(
        &self,
        env: &Env<'_>,
        node: NodeId,
        j: usize,
        inp: ValueId,
        slot: usize,
        axes: &Axes,
    ) -> Option<Axes> {
        let rank = env.shapes.shape(inp)?.len();
        let mut found = Axes::new();
        for &want in axes {
            let mut hit = None;
            for a in 0..rank {
                match env.flow(node, j, a) {
                    ChannelFlow::Through { outputs, .. } if outputs.contains(&(slot, want)) => {
                        hit = Some(a)
                    }
                    ChannelFlow::Heads { outputs, .. }
                        if outputs.iter().any(|(p, _)| *p == (slot, want)) =>
                    {
                        hit = Some(a)
                    }
                    ChannelFlow::Parts { outputs }
                        if outputs.iter().any(|(p, _)| *p == (slot, want)) =>
                    {
                        hit = Some(a)
                    }
                    _ => {}
                }
                if hit.is_some() {
                    break;
                }
            }
            found.push(hit?);
        }
        if found.is_empty() {
            return None;
        }
        Some(found)
    }

    /// Ids of operand `j` (axes `in_axes`) given the result's: the same index for axes
    /// that pass through; for a heads axis the result repeats (each operand head serves
    /// `r` result heads), the operand's head `h` is result heads `h·r..h·r + r` merged; for
    /// an axis the result has a part of, the part's indices take the result's ids and the
    /// others fresh ones.
    #[allow(clippy::too_many_arguments)]
    fn inverse_ids(
        &mut self,
        env: &Env<'_>,
        node: NodeId,
        j: usize,
        in_axes: &Axes,
        inp: ValueId,
        slot: usize,
        out_axes: &Axes,
        out_ids: &[u32],
    ) -> Option<Vec<u32>> {
        let in_ext = env.extents(inp, in_axes)?;
        let out = env.graph.node(node).output(slot)?;
        let out_ext = env.extents(out, out_axes)?;
        let mut ids = out_ids.to_vec();
        let mut ext = out_ext.clone();
        for (pos, &a) in in_axes.iter().enumerate() {
            match env.flow(node, j, a) {
                ChannelFlow::Heads { outputs, .. } => {
                    if let Some((_, Fanout::Repeat(r))) =
                        outputs.iter().find(|(p, _)| *p == (slot, out_axes[pos]))
                    {
                        (ext, ids) =
                            regroup_axis(&mut self.ids, &ext, &ids, pos, Fanout::Group(*r));
                    }
                }
                ChannelFlow::Parts { outputs } => {
                    let (_, part) = outputs.iter().find(|(p, _)| *p == (slot, out_axes[pos]))?;
                    (ext, ids) = scatter_axis(&mut self.ids, &ext, &ids, pos, *part, in_ext[pos])?;
                }
                _ => {}
            }
        }
        (ext == in_ext).then_some(ids)
    }

    /// Operand `input` of `node` carries the channels on `axes` with `ids`: ask the rule.
    fn operand(&mut self, env: &Env<'_>, node: NodeId, input: usize, axes: Axes, ids: Vec<u32>) {
        if self.done_nodes.insert((node, input), ()).is_some() {
            return;
        }
        let n = env.graph.node(node);
        let Some(v) = n.input(input) else { return };
        let is_const = env.is_const(v);
        let flows: Vec<ChannelFlow> = axes.iter().map(|&a| env.flow(node, input, a)).collect();
        if let Some(reason) = flows.iter().find_map(|f| match f {
            ChannelFlow::Barrier(r) => Some(*r),
            _ => None,
        }) {
            return self.block(env, Some(node), reason.to_string(), &ids);
        }
        if !self.nodes.contains(&node) {
            self.nodes.push(node);
        }
        let parts = flows.iter().any(|f| matches!(f, ChannelFlow::Parts { .. }));
        if !parts {
            self.node_ids
                .entry(node)
                .or_default()
                .extend_from_slice(&ids);
        }
        if !flows
            .iter()
            .any(|f| matches!(f, ChannelFlow::Contracted { .. }))
        {
            self.roles
                .entry(node)
                .or_default()
                .push((input, ScaleRole::of(&flows)));
        }
        // A constant operand is an endpoint on the writing side; its other readers are
        // not followed (a weight is not a stream).
        if is_const
            && !flows
                .iter()
                .all(|f| matches!(f, ChannelFlow::Contracted { .. }))
        {
            if axes.len() != 1 {
                return self.block(
                    env,
                    Some(node),
                    "a constant carries the channels on several axes".into(),
                    &ids,
                );
            }
            self.sources.push(RawEndpoint {
                node,
                input,
                weight: v,
                axis: axes[0],
                ids: ids.clone(),
                activation: None,
            });
        }
        if flows.iter().any(|f| matches!(f, ChannelFlow::Regroup)) {
            return self.regroup(env, node, v, &axes, ids);
        }
        if let [
            ChannelFlow::Contracted {
                weight,
                weight_axis,
            },
        ] = flows.as_slice()
        {
            let w = n.input(*weight);
            // A plain sink holds one entry per channel along its axis; a packed weight
            // (4-bit blocks) does not, and cannot take a channel map.
            let whole = w
                .and_then(|w| env.extents(w, &[*weight_axis]))
                .is_some_and(|e| e[0] == ids.len());
            match w {
                Some(w) if env.is_const(w) && !is_const && !whole => self.block(
                    env,
                    Some(node),
                    format!(
                        "reads the channels through `{}`, whose axis {weight_axis} does not hold one entry per channel (packed)",
                        env.graph.value(w).name
                    ),
                    &ids,
                ),
                Some(w) if env.is_const(w) && !is_const => self.sinks.push(RawEndpoint {
                    node,
                    input: *weight,
                    weight: w,
                    axis: *weight_axis,
                    ids,
                    activation: Some((input, v)),
                }),
                _ => self.block(
                    env,
                    Some(node),
                    "the channels are contracted with a computed operand".into(),
                    &ids,
                ),
            }
            return;
        }
        if flows
            .iter()
            .any(|f| matches!(f, ChannelFlow::Contracted { .. }))
        {
            return self.block(
                env,
                Some(node),
                "contracts only some of the channel axes".into(),
                &ids,
            );
        }
        let invariant = flows
            .iter()
            .any(|f| matches!(f, ChannelFlow::Invariant { .. }));
        let ext = match env.extents(v, &axes) {
            Some(e) if e.iter().product::<usize>() == ids.len() => e,
            Some(_) => {
                return self.block(
                    env,
                    Some(node),
                    "an operand's channel axes do not hold the region's channels".into(),
                    &ids,
                );
            }
            None => {
                return self.block(env, Some(node), "channel axis sizes unknown".into(), &ids);
            }
        };
        if invariant && parts {
            return self.block(
                env,
                Some(node),
                "keeps only some of the channel axes".into(),
                &ids,
            );
        }
        // Outputs and joined operands, per port: (index, axes, ids after fanouts).
        let mut outs: Vec<(usize, Axes, Vec<usize>, Vec<u32>)> = Vec::new();
        let mut joins: Vec<(usize, Axes, Vec<usize>, Vec<u32>)> = Vec::new();
        let mut uniform: Vec<(usize, Axes)> = Vec::new();
        let mut heads_pos = Vec::new();
        for (pos, f) in flows.iter().enumerate() {
            // A part of this axis to each result: the ids at the part's indices.
            if let ChannelFlow::Parts { outputs } = f {
                for &((k, a), part) in outputs {
                    let entry = match outs.iter().position(|e| e.0 == k) {
                        Some(i) => &mut outs[i],
                        None => {
                            outs.push((k, Axes::new(), ext.clone(), ids.clone()));
                            outs.last_mut().expect("just pushed")
                        }
                    };
                    entry.1.push(a);
                    match select_axis(&entry.2, &entry.3, pos, part) {
                        Some((e, i)) => (entry.2, entry.3) = (e, i),
                        None => {
                            return self.block(
                                env,
                                Some(node),
                                "selects indices outside the channel axis".into(),
                                &ids,
                            );
                        }
                    }
                }
                continue;
            }
            let (o, w, u): (Fanned, Fanned, _) = match f {
                ChannelFlow::Through {
                    outputs,
                    commutes,
                    with,
                    uniform,
                } => {
                    self.commute(node, *commutes, &ids);
                    if *commutes == channel::LINEAR
                        && with.iter().any(|&(j, _)| {
                            n.input(j).is_some_and(|x| !env.is_const(x)) && !is_const
                        })
                    {
                        self.sums.extend_from_slice(&ids);
                    }
                    (
                        outputs.iter().map(|&p| (p, Fanout::Same)).collect(),
                        with.iter().map(|&p| (p, Fanout::Same)).collect(),
                        uniform.clone(),
                    )
                }
                ChannelFlow::Invariant { commutes, with } => {
                    self.commute(node, *commutes, &ids);
                    self.invariant_ends.extend_from_slice(&ids);
                    (
                        Vec::new(),
                        with.iter().map(|&p| (p, Fanout::Same)).collect(),
                        Vec::new(),
                    )
                }
                ChannelFlow::Heads { outputs, with } => {
                    heads_pos.push(pos);
                    (outputs.clone(), with.clone(), Vec::new())
                }
                _ => unreachable!("barriers, regroups and contractions handled above"),
            };
            if invariant && !o.is_empty() {
                return self.block(
                    env,
                    Some(node),
                    "keeps only some of the channel axes".into(),
                    &ids,
                );
            }
            for (list, ports) in [(&mut outs, o), (&mut joins, w)] {
                for ((k, a), fan) in ports {
                    let entry = match list.iter().position(|e| e.0 == k) {
                        Some(i) => &mut list[i],
                        None => {
                            list.push((k, Axes::new(), ext.clone(), ids.clone()));
                            list.last_mut().expect("just pushed")
                        }
                    };
                    entry.1.push(a);
                    if fan != Fanout::Same {
                        let (e, i) = regroup_axis(&mut self.ids, &entry.2, &entry.3, pos, fan);
                        entry.2 = e;
                        entry.3 = i;
                    }
                }
            }
            for (j, a) in u {
                match uniform.iter_mut().find(|e| e.0 == j) {
                    Some(e) => e.1.push(a),
                    None => uniform.push((j, SmallVec::from_slice(&[a]))),
                }
            }
        }
        // Every port that has the heads axis, before and after its fanout.
        for &pos in &heads_pos {
            self.head_ports.push(HeadPort {
                ids: ids.clone(),
                extents: ext.clone(),
                pos,
            });
            for (_, _, e, i) in outs.iter().chain(&joins) {
                self.head_ports.push(HeadPort {
                    ids: i.clone(),
                    extents: e.clone(),
                    pos,
                });
            }
        }
        if !invariant && outs.iter().any(|o| o.1.len() != axes.len()) {
            return self.block(
                env,
                Some(node),
                "sends the channel axes to different results".into(),
                &ids,
            );
        }
        if parts {
            let handed = self.node_ids.entry(node).or_default();
            for (_, _, _, out_ids) in &outs {
                handed.extend_from_slice(out_ids);
            }
        }
        for (k, out_axes, _, out_ids) in outs {
            if let Some(out) = n.output(k) {
                self.visit(env, out, out_axes, out_ids);
            }
        }
        for (j, j_axes, _, j_ids) in joins {
            if j_axes.len() != axes.len() {
                let name = n
                    .input(j)
                    .map_or(String::new(), |x| env.graph.value(x).name.clone());
                self.block(
                    env,
                    Some(node),
                    format!(
                        "pairs the channels with `{name}`, which carries only some of their axes"
                    ),
                    &j_ids,
                );
                continue;
            }
            self.operand(env, node, j, j_axes.clone(), j_ids.clone());
            if let Some(x) = n.input(j)
                && !env.is_const(x)
            {
                self.visit(env, x, j_axes, j_ids);
            }
        }
        for (j, j_axes) in uniform {
            let Some(p) = n.input(j) else { continue };
            if !env.is_const(p) || j_axes.len() != 1 {
                self.block(
                    env,
                    Some(node),
                    "its per-channel parameters are computed at run time".into(),
                    &ids,
                );
                continue;
            }
            self.params.push(RawEndpoint {
                node,
                input: j,
                weight: p,
                axis: j_axes[0],
                ids: ids.clone(),
                activation: None,
            });
        }
    }

    /// A reshape-like op: the run of channel axes keeps its element offsets.
    fn regroup(&mut self, env: &Env<'_>, node: NodeId, v: ValueId, axes: &Axes, ids: Vec<u32>) {
        let Some(out) = env.graph.node(node).output(0) else {
            return;
        };
        let (Some(ins), Some(outs)) = (env.shapes.shape(v), env.shapes.shape(out)) else {
            return self.block(env, Some(node), "shapes unknown".into(), &ids);
        };
        match regroup_axes(ins, axes, outs) {
            Some(out_axes) => self.visit(env, out, out_axes, ids),
            None => self.block(
                env,
                Some(node),
                "regroups the channel axes with other axes".into(),
                &ids,
            ),
        }
    }
}

/// The result axes holding the same element offsets as the consecutive run `axes` of
/// `ins` (row-major): the run `o1..=o2` of `outs` whose trailing product equals the run's
/// inner stride and whose sizes multiply to the run's. Channel order is kept.
pub(super) fn regroup_axes(ins: &[Dim], axes: &[usize], outs: &[Dim]) -> Option<Axes> {
    let (&first, &last) = (axes.first()?, axes.last()?);
    if axes.windows(2).any(|w| w[1] != w[0] + 1) {
        return None;
    }
    let extent = Mono::product(&ins[first..=last])?;
    let stride = Mono::product(&ins[last + 1..])?;
    for o2 in (0..outs.len()).rev() {
        if Mono::product(&outs[o2 + 1..])? != stride {
            continue;
        }
        for o1 in (0..=o2).rev() {
            let p = Mono::product(&outs[o1..=o2])?;
            if p == extent {
                // Size-1 axes just before the run join it: `[.., D] -> [.., 1, D]` is one
                // key/value head, whose axis attention then repeats over the query heads.
                let mut start = o1;
                while start > 0 && outs[start - 1] == Dim::Known(1) {
                    start -= 1;
                }
                return Some((start..=o2).collect());
            }
            if p.syms.len() > extent.syms.len() || p.coef > extent.coef {
                break;
            }
        }
        return None;
    }
    None
}

/// Applies a heads fanout to position `pos` of a port with `ext` extents and `ids`:
/// `Repeat(r)`: the new port's index `j` is the old `j / r`; `Group(r)`: the new index `j`
/// is old indices `j·r..j·r + r`, whose ids are merged.
pub(super) fn regroup_axis(
    uf: &mut Ids,
    ext: &[usize],
    ids: &[u32],
    pos: usize,
    fan: Fanout,
) -> (Vec<usize>, Vec<u32>) {
    let inner: usize = ext[pos + 1..].iter().product();
    let outer: usize = ext[..pos].iter().product();
    let n = ext[pos];
    let (m, src): (usize, Box<dyn Fn(usize) -> usize>) = match fan {
        Fanout::Same => (n, Box::new(|j| j)),
        Fanout::Repeat(r) => (n * r, Box::new(move |j| j / r)),
        Fanout::Group(r) => {
            let m = n / r.max(1);
            for o in 0..outer {
                for j in 0..m {
                    for k in 1..r {
                        for i in 0..inner {
                            let a = ids[(o * n + j * r) * inner + i];
                            let b = ids[(o * n + j * r + k) * inner + i];
                            uf.union(a, b);
                        }
                    }
                }
            }
            (m, Box::new(move |j| j * r))
        }
    };
    let mut out = Vec::with_capacity(outer * m * inner);
    for o in 0..outer {
        for j in 0..m {
            let s = src(j);
            out.extend_from_slice(&ids[(o * n + s) * inner..(o * n + s + 1) * inner]);
        }
    }
    let mut e = ext.to_vec();
    e[pos] = m;
    (e, out)
}

/// Position `pos` of a port with `ext` extents and `ids` keeps only the indices `part`
/// selects (in the part's order); `None` if the part reaches past the axis.
pub(super) fn select_axis(
    ext: &[usize],
    ids: &[u32],
    pos: usize,
    part: Part,
) -> Option<(Vec<usize>, Vec<u32>)> {
    let inner: usize = ext[pos + 1..].iter().product();
    let outer: usize = ext[..pos].iter().product();
    let n = ext[pos];
    if part.len > 0 && (part.index(0) >= n || part.index(part.len - 1) >= n) {
        return None;
    }
    let mut out = Vec::with_capacity(outer * part.len * inner);
    for o in 0..outer {
        for k in 0..part.len {
            let j = part.index(k);
            out.extend_from_slice(&ids[(o * n + j) * inner..(o * n + j + 1) * inner]);
        }
    }
    let mut e = ext.to_vec();
    e[pos] = part.len;
    Some((e, out))
}

/// The inverse of [`select_axis`]: position `pos` (holding the part's `part.len` indices)
/// widened to the `n` indices of the operand's axis; the part's indices keep their ids,
/// the others get fresh ones.
pub(super) fn scatter_axis(
    uf: &mut Ids,
    ext: &[usize],
    ids: &[u32],
    pos: usize,
    part: Part,
    n: usize,
) -> Option<(Vec<usize>, Vec<u32>)> {
    let inner: usize = ext[pos + 1..].iter().product();
    let outer: usize = ext[..pos].iter().product();
    if ext[pos] != part.len
        || (part.len > 0 && (part.index(0) >= n || part.index(part.len - 1) >= n))
    {
        return None;
    }
    let mut out = uf.fresh(outer * n * inner);
    for o in 0..outer {
        for k in 0..part.len {
            let j = part.index(k);
            out[(o * n + j) * inner..(o * n + j + 1) * inner]
                .copy_from_slice(&ids[(o * part.len + k) * inner..(o * part.len + k + 1) * inner]);
        }
    }
    let mut e = ext.to_vec();
    e[pos] = n;
    Some((e, out))
}

/// Whether `node` is a node any region's trace must not cross as a seed twice.
pub(super) fn is_seed_owned(
    traces: &[Trace],
    env: &Env<'_>,
    node: NodeId,
    input: usize,
    axis: usize,
) -> bool {
    let n = env.graph.node(node);
    match env.flow(node, input, axis) {
        ChannelFlow::Through { outputs, .. } => outputs.iter().any(|&(k, a)| {
            n.output(k)
                .is_some_and(|o| traces.iter().any(|t| t.owns(o, &[a])))
        }),
        _ => false,
    }
}
