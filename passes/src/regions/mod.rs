//! Permutation-equivariant regions: where a channel transform can be applied to a model
//! without changing what it computes.
//!
//! A region is a set of channels written by some weights (its *sources*: `W ← T W` on
//! the axis they write), carried through ops that commute with the transform, and read by
//! other weights (its *sinks*: `W ← W T⁻¹` on the axis they read). The analysis is the
//! dataflow of [`trace`] over the op table's channel column, on a canonicalized graph. A
//! trace from one weight is cut into several regions where its channels travel through
//! different values (a fused q/k/v projection split into parts): [`classify`] gives each
//! region the barriers, limits and endpoints its own channels met, and an endpoint says
//! which indices of its weight it covers ([`Endpoint::part`]).
//!
//! Kinds, from the structure found (not from names):
//! - `residual`: two channel streams are added (a residual connection);
//! - `mlp`: the other regions with flat channels (a linear layer's output read by the next);
//! - `attention_vo`: channels in heads (a value projection read by the output projection);
//! - `attention_qk`: heads that end in a query-key product (no sink).
//!
//! Each region says which transform kinds are legal and, where one is not, why: a barrier
//! where the channels escape (then nothing is legal), an op between that commutes only
//! with some kinds, or per-channel parameters (a norm's gamma) that are not uniform.
//!
//! Online-only regions (`Region::online_only`) have no sources: the linears reading an
//! attention output whose value heads nothing may transform, either because the op table
//! says so of the op that produced it (GroupQueryAttention's packed heads) or because an
//! `attention_vo` region met a barrier (values that are the graph's KV cache). A transform
//! computed before those linears is still exact there. A node whose results only reach
//! `Shape`/`Size` reads none of the channels' data; the trace passes it by.

mod scale;
mod trace;

use crate::canonicalize::is_online_hadamard;
use perqc_ir::{Analysis, Model, NodeId, PassError, ValueId};
use perqc_ops::channel::ChannelFlow;
use std::collections::HashMap;
use std::fmt::Write as _;
use trace::{Env, Trace};

pub use trace::Axes;

/// What a region's channels are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegionKind {
    Residual,
    Mlp,
    AttentionVo,
    AttentionQk,
    /// What one constant's channels reach, traced on request ([`Regions::trace_from`]: the
    /// readers of a norm's output from its gamma); never listed by [`Regions::find`].
    Segment,
}

impl RegionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RegionKind::Residual => "residual",
            RegionKind::Mlp => "mlp",
            RegionKind::AttentionVo => "attention_vo",
            RegionKind::AttentionQk => "attention_qk",
            RegionKind::Segment => "segment",
        }
    }
}

/// A weight on a region's boundary: input `input` of `node` is the constant `weight`,
/// whose axis `axis` carries the region's channels; `channels[i]` is the region channel at
/// index `i` along it (several indices may share a channel: query heads of one key/value
/// head).
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub node: NodeId,
    pub input: usize,
    pub weight: ValueId,
    pub axis: usize,
    pub channels: Vec<u32>,
    /// The indices along `axis` that carry this region's channels (`channels[k]` is the
    /// channel at index `part[k]`), where the weight writes other regions' channels too (a
    /// fused q/k/v projection: the value region's part of its columns); the others are
    /// left as they are. `None`: every index.
    pub part: Option<Vec<usize>>,
    /// For sinks: the operand slot and value that carries the channels into `node`.
    pub activation: Option<(usize, ValueId)>,
}

/// Why a transform is illegal somewhere in a region.
#[derive(Clone, Debug, PartialEq)]
pub struct Blocker {
    /// The node, as `Op \`name\``, when the reason is at a node.
    pub at: Option<String>,
    pub reason: String,
}

/// Per transform kind: `None` if it commutes with everything in the region, else why not.
#[derive(Clone, Debug, Default)]
pub struct Kinds {
    pub permutation: Option<String>,
    pub rotation: Option<String>,
    pub scale: Option<String>,
    pub signed_scale: Option<String>,
}

/// The kinds of channel transform, for [`Region::why_not`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransformKind {
    Permutation,
    /// Any orthogonal matrix (Hadamards).
    Rotation,
    /// Positive diagonal scales.
    Scale,
    /// Diagonal scales with negative entries.
    SignedScale,
}

impl TransformKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransformKind::Permutation => "permutation",
            TransformKind::Rotation => "rotation",
            TransformKind::Scale => "scale",
            TransformKind::SignedScale => "signed scale",
        }
    }
}

/// Heads structure: `kv_heads` groups of `head_dim` channels, read by `heads` heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

#[derive(Clone, Debug)]
pub struct Region {
    pub kind: RegionKind,
    pub dim: usize,
    pub sources: Vec<Endpoint>,
    pub sinks: Vec<Endpoint>,
    /// Per-channel parameters applied between sources and sinks that must be uniform for
    /// rotations and scales (an RMS norm's gamma); permutations permute them.
    pub params: Vec<Endpoint>,
    /// The ops between sources and sinks, in discovery order.
    pub nodes: Vec<NodeId>,
    /// The values carrying the channels, with their channel axes.
    pub values: Vec<(ValueId, Axes)>,
    pub heads: Option<Heads>,
    /// Channels a transform may mix share a group (all zero without heads).
    pub groups: Vec<u32>,
    /// Where the channels escape: no transform is legal.
    pub barriers: Vec<Blocker>,
    /// An online-only region (see the module comment): the op whose result the channels
    /// are and why nothing reaches them there. No transform folds; an online one before
    /// the sinks may apply.
    pub online_only: Option<Blocker>,
    kinds: Kinds,
    /// Whether each param tensor is uniform along its axis, by `params` index.
    uniform_params: Vec<bool>,
    /// The sources a positive diagonal scale folds into (`None`: not legal, `kinds.scale`
    /// says why), by `sources` index: all of them, or fewer where the scale passes one
    /// factor of a product ([`scale`]).
    scale_sources: Option<Vec<usize>>,
    /// Likewise for diagonals with negative entries.
    signed_scale_sources: Option<Vec<usize>>,
    pub(crate) names: Names,
}

/// Labels for printing, resolved once.
#[derive(Clone, Debug, Default)]
pub(crate) struct Names {
    nodes: HashMap<NodeId, String>,
    values: HashMap<ValueId, String>,
}

impl Region {
    /// `None` if a transform of `kind` may be folded into this region's weights, else the
    /// reason it may not.
    pub fn why_not(&self, kind: TransformKind) -> Option<String> {
        if let Some(b) = self.barriers.first() {
            return Some(describe(b));
        }
        if let Some(b) = &self.online_only {
            return Some(format!("{} (online only)", describe(b)));
        }
        let k = match kind {
            TransformKind::Permutation => &self.kinds.permutation,
            TransformKind::Rotation => &self.kinds.rotation,
            TransformKind::Scale => &self.kinds.scale,
            TransformKind::SignedScale => &self.kinds.signed_scale,
        };
        if let Some(r) = k {
            return Some(r.clone());
        }
        if kind != TransformKind::Permutation
            && let Some(i) = self.uniform_params.iter().position(|u| !u)
        {
            let p = &self.params[i];
            return Some(format!(
                "the per-channel parameter `{}` of {} is not uniform (fold-norms folds a pre-norm's gamma into its readers)",
                self.names.values[&p.weight], self.names.nodes[&p.node]
            ));
        }
        None
    }

    /// The sources a diagonal scale of `kind` (`Scale` or `SignedScale`) folds into when
    /// it is legal; every source for the other kinds.
    pub fn sources_for(&self, kind: TransformKind) -> Vec<&Endpoint> {
        let picked = match kind {
            TransformKind::Scale => self.scale_sources.as_deref(),
            TransformKind::SignedScale => self.signed_scale_sources.as_deref(),
            _ => None,
        };
        match picked {
            Some(idx) => idx.iter().map(|&i| &self.sources[i]).collect(),
            None => self.sources.iter().collect(),
        }
    }

    /// Every reason a transform kind is illegal, for reports.
    pub fn blocked_by(&self) -> Vec<(Vec<TransformKind>, String)> {
        use TransformKind::*;
        let mut out: Vec<(Vec<TransformKind>, String)> = self
            .barriers
            .iter()
            .map(|b| (vec![Permutation, Rotation, Scale], describe(b)))
            .collect();
        if self.barriers.is_empty() {
            let mut soft: Vec<(Vec<TransformKind>, String)> = Vec::new();
            for kind in [Permutation, Rotation, Scale] {
                if let Some(r) = self.why_not(kind) {
                    match soft.iter_mut().find(|s| s.1 == r) {
                        Some(s) => s.0.push(kind),
                        None => soft.push((vec![kind], r)),
                    }
                }
            }
            out.extend(soft);
        }
        out
    }

    pub fn node_name(&self, id: NodeId) -> &str {
        self.names.nodes.get(&id).map_or("?", String::as_str)
    }

    /// The name of a sink's activation value.
    pub fn activation_name(&self, id: ValueId) -> &str {
        self.names.values.get(&id).map_or("?", String::as_str)
    }

    pub fn value_name(&self, id: ValueId) -> &str {
        self.names.values.get(&id).map_or("?", String::as_str)
    }
}

fn describe(b: &Blocker) -> String {
    match &b.at {
        Some(at) => format!("{at}: {}", b.reason),
        None => b.reason.clone(),
    }
}

/// The op type of a place written `` Op `name` ``.
pub fn op_of(at: &str) -> &str {
    at.split(" `").next().unwrap_or(at)
}

/// Notes with the same key (`None`: never grouped) as one line: the first one's, followed
/// by how many more there were, so that a cause shared by every layer of a model is said
/// once.
pub fn grouped_notes(notes: impl IntoIterator<Item = (Option<String>, String)>) -> Vec<String> {
    let mut groups: Vec<(Option<String>, String, usize)> = Vec::new();
    for (key, line) in notes {
        match groups.iter_mut().find(|g| key.is_some() && g.0 == key) {
            Some(g) => g.2 += 1,
            None => groups.push((key, line, 1)),
        }
    }
    groups
        .into_iter()
        .map(|(_, line, n)| match n {
            1 => line,
            n => format!("{line} (and the same for {} more linears)", n - 1),
        })
        .collect()
}

/// Every region of a model's main graph, in the order their first source appears.
#[derive(Clone, Debug, Default)]
pub struct Regions {
    pub regions: Vec<Region>,
    /// Channels a barrier stopped before any weight read them, so that they formed no
    /// region (a pass that finds no region for a layer says why with these).
    pub unformed: Vec<Unformed>,
}

impl Analysis for Regions {
    fn compute(model: &Model) -> Result<Regions, PassError> {
        let shapes = perqc_ops::infer_model(model)
            .map_err(|e| PassError::msg(format!("shape inference: {e}")))?;
        Ok(Regions::find(model, &shapes))
    }
}

impl Regions {
    pub fn find(model: &Model, shapes: &perqc_ops::ShapeMap) -> Regions {
        let env = Env::new(model, shapes);
        let mut traces: Vec<Trace> = Vec::new();
        for &node in model.graph.node_order() {
            for (input, axis) in env.seeds(node) {
                if trace::is_seed_owned(&traces, &env, node, input, axis) {
                    continue;
                }
                if let Some(t) = Trace::from_seed(&env, node, input, axis) {
                    traces.push(t);
                }
            }
        }
        let mut out = Regions::default();
        for t in traces {
            let (regions, unformed) = classify(&env, t, None);
            out.regions.extend(regions);
            out.unformed.extend(unformed);
        }
        // Online-only regions after the others (the others keep their indices).
        for &node in model.graph.node_order() {
            if let Some(r) = online_region(&env, node) {
                out.regions.push(r);
            }
        }
        // Value/output heads a barrier keeps from a folded rotation (values that leave the
        // graph as the key/value cache) take it online at the linears that read the
        // attention output.
        let blocked: Vec<Region> = out
            .regions
            .iter()
            .filter(|r| {
                r.kind == RegionKind::AttentionVo
                    && r.online_only.is_none()
                    && !r.barriers.is_empty()
            })
            .flat_map(|r| online_at_sinks(&env, r))
            .collect();
        for r in blocked {
            let taken = out.online_only().any(|o| {
                o.sinks
                    .iter()
                    .any(|e| r.sinks.iter().any(|f| f.node == e.node))
            });
            if !taken {
                out.regions.push(r);
            }
        }
        out
    }

    /// The online-only regions (see the module comment).
    pub fn online_only(&self) -> impl Iterator<Item = &Region> {
        self.regions.iter().filter(|r| r.online_only.is_some())
    }

    /// The channels that axis `axis` of constant input `input` of `node` writes, traced
    /// the way regions are (a norm's gamma: the norm's readers), as a [`RegionKind::Segment`]
    /// whose first source is that constant.
    pub fn trace_from(
        model: &Model,
        shapes: &perqc_ops::ShapeMap,
        node: NodeId,
        input: usize,
        axis: usize,
    ) -> Option<Region> {
        let env = Env::new(model, shapes);
        let t = Trace::from_seed(&env, node, input, axis)?;
        classify(&env, t, Some(RegionKind::Segment))
            .0
            .into_iter()
            .next()
    }

    pub fn of_kind(&self, kind: RegionKind) -> impl Iterator<Item = &Region> {
        self.regions.iter().filter(move |r| r.kind == kind)
    }

    /// One line per region: index, kind, dim, heads, sources, sinks, legal transforms.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:>4}  {:<13} {:>6}  {:<14} {:>7} {:>5}  legal",
            "#", "kind", "dim", "heads", "sources", "sinks"
        );
        for (i, r) in self.regions.iter().enumerate() {
            let heads = r.heads.map_or("-".to_string(), |h| {
                format!("{}/{} x {}", h.heads, h.kv_heads, h.head_dim)
            });
            let legal: Vec<String> = [
                TransformKind::Permutation,
                TransformKind::Rotation,
                TransformKind::Scale,
            ]
            .into_iter()
            .filter(|&k| r.why_not(k).is_none())
            .map(|k| match k {
                TransformKind::Scale if r.sources_for(k).len() < r.sources.len() => format!(
                    "scale (into {} of {} sources)",
                    r.sources_for(k).len(),
                    r.sources.len()
                ),
                k => k.as_str().to_string(),
            })
            .collect();
            let legal = if r.online_only.is_some() && r.barriers.is_empty() {
                "online only".to_string()
            } else if legal.is_empty() {
                "none".to_string()
            } else {
                legal.join(", ")
            };
            let _ = writeln!(
                s,
                "{i:>4}  {:<13} {:>6}  {:<14} {:>7} {:>5}  {legal}",
                r.kind.as_str(),
                r.dim,
                heads,
                r.sources.len(),
                r.sinks.len()
            );
            // The first few reasons; --json lists them all.
            const SHOWN: usize = 3;
            let blocked = r.blocked_by();
            for (kinds, why) in blocked.iter().take(SHOWN) {
                let k: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
                let _ = writeln!(s, "      no {}: {why}", k.join("/"));
            }
            if blocked.len() > SHOWN {
                let _ = writeln!(
                    s,
                    "      ... and {} more reasons (--json lists them)",
                    blocked.len() - SHOWN
                );
            }
        }
        let mut counts: Vec<(RegionKind, usize)> = Vec::new();
        for r in &self.regions {
            match counts.iter_mut().find(|c| c.0 == r.kind) {
                Some(c) => c.1 += 1,
                None => counts.push((r.kind, 1)),
            }
        }
        let c: Vec<String> = counts
            .iter()
            .map(|(k, n)| format!("{n} {}", k.as_str()))
            .collect();
        let _ = writeln!(s, "{} regions: {}", self.regions.len(), c.join(", "));
        for u in &self.unformed {
            let _ = writeln!(s, "no region: {}", u.describe());
        }
        s
    }

    /// Notes for a pass that looks for regions of some kind, saying which channels formed
    /// no region and at which node they stopped: one per [`Unformed`], except that those
    /// stopped for the same reason at the same op type with the same width (the same
    /// projection of every layer, as a rule) share one note naming the first, so that a
    /// 30-layer model gets one line where it has one cause.
    pub fn unformed_notes(&self) -> Vec<String> {
        grouped_notes(self.unformed.iter().map(|u| {
            let key = u.blockers.first().map(|b| {
                let at = b.at.as_deref().map(op_of);
                format!("{}|{}|{}", u.dim, at.unwrap_or(""), b.reason)
            });
            (key, u.describe())
        }))
    }

    /// `{"regions": [{"kind", "dim", "sources", "sinks", "params", "heads", "head_dim",
    /// "kv_heads", "ops", "legal", "blocked_by"}]}`.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let endpoint = |r: &Region, e: &Endpoint| {
            json!({
                "weight": r.value_name(e.weight),
                "axis": e.axis,
                "node": r.node_name(e.node),
            })
        };
        let regions: Vec<serde_json::Value> = self
            .regions
            .iter()
            .map(|r| {
                let blocked: Vec<serde_json::Value> = r
                    .blocked_by()
                    .into_iter()
                    .map(|(kinds, why)| {
                        let k: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
                        json!({"transforms": k, "reason": why})
                    })
                    .collect();
                let legal = |k| r.why_not(k).is_none();
                json!({
                    "kind": r.kind.as_str(),
                    "dim": r.dim,
                    "sources": r.sources.iter().map(|e| endpoint(r, e)).collect::<Vec<_>>(),
                    "sinks": r.sinks.iter().map(|e| endpoint(r, e)).collect::<Vec<_>>(),
                    "params": r.params.iter().map(|e| endpoint(r, e)).collect::<Vec<_>>(),
                    "heads": r.heads.map(|h| h.heads),
                    "head_dim": r.heads.map(|h| h.head_dim),
                    "kv_heads": r.heads.map(|h| h.kv_heads),
                    "ops": r.nodes.iter().map(|&n| r.node_name(n)).collect::<Vec<_>>(),
                    "legal": {
                        "permutation": legal(TransformKind::Permutation),
                        "rotation": legal(TransformKind::Rotation),
                        "scale": legal(TransformKind::Scale),
                    },
                    "scale_sources": legal(TransformKind::Scale).then(|| {
                        r.sources_for(TransformKind::Scale)
                            .into_iter()
                            .map(|e| endpoint(r, e))
                            .collect::<Vec<_>>()
                    }),
                    "blocked_by": blocked,
                })
            })
            .collect();
        json!({ "regions": regions })
    }

    /// Graphviz: one box per region, its source weights pointing in and sink weights out.
    pub fn to_dot(&self) -> String {
        let q = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let mut s = String::from("digraph regions {\n  rankdir=LR;\n  node [fontsize=10];\n");
        for (i, r) in self.regions.iter().enumerate() {
            let heads = r.heads.map_or(String::new(), |h| {
                format!("\\n{} heads / {} kv x {}", h.heads, h.kv_heads, h.head_dim)
            });
            let color = if r.barriers.is_empty() {
                "black"
            } else {
                "red"
            };
            let _ = writeln!(
                s,
                "  r{i} [shape=box, color={color}, label=\"#{i} {} d={}{heads}\"];",
                r.kind.as_str(),
                r.dim
            );
            for e in &r.sources {
                let _ = writeln!(s, "  {} -> r{i};", q(r.value_name(e.weight)));
            }
            for e in &r.sinks {
                let _ = writeln!(s, "  r{i} -> {};", q(r.value_name(e.weight)));
            }
        }
        s.push_str("}\n");
        s
    }
}

/// A trace's channels that formed no region although something inside the graph stopped
/// them (a barrier at a node), before any weight read them: what a pass looking for a
/// layer's attention or mlp region would otherwise skip without a word.
#[derive(Clone, Debug)]
pub struct Unformed {
    /// The weight that writes the channels, as `` `name` (Op `node`) ``.
    pub source: String,
    /// How many channels.
    pub dim: usize,
    /// The barriers at nodes that the channels hit.
    pub blockers: Vec<Blocker>,
}

impl Unformed {
    /// One line: the source, its width and the first barrier (with how many more).
    pub fn describe(&self) -> String {
        let first = self.blockers.first().map_or(String::new(), describe);
        let more = match self.blockers.len() {
            0 | 1 => String::new(),
            n => format!(" (and {} more barriers)", n - 1),
        };
        format!(
            "the {} channels written by {} form no region: {first}{more}",
            self.dim, self.source
        )
    }
}

/// Where the channels of one trace go: a class per union-find root, numbered in the order
/// of the first source's channels, then the other endpoints', then the ports'.
struct Classes {
    index: HashMap<u32, u32>,
    /// The part each class belongs to.
    part: Vec<u32>,
    parts: usize,
}

impl Classes {
    /// Classes, cut into parts: two classes are in one part iff every value of the trace
    /// that carries one carries the other (partition refinement over the ports). Without
    /// `cut`, one part.
    fn new(t: &mut Trace, cut: bool) -> Classes {
        let mut index: HashMap<u32, u32> = HashMap::new();
        let add = |ids: &[u32], t: &mut Trace, index: &mut HashMap<u32, u32>| {
            for &id in ids {
                let root = t.ids.find(id);
                let n = index.len() as u32;
                index.entry(root).or_insert(n);
            }
        };
        let seed = t.seed_ids.clone();
        add(&seed, t, &mut index);
        let endpoint_ids: Vec<Vec<u32>> = t
            .sources
            .iter()
            .chain(&t.sinks)
            .chain(&t.params)
            .map(|e| e.ids.clone())
            .collect();
        for ids in &endpoint_ids {
            add(ids, t, &mut index);
        }
        let ports: Vec<ValueId> = t.ports.iter().map(|(v, _)| *v).collect();
        for v in &ports {
            let ids = t.seen[v].1.clone();
            add(&ids, t, &mut index);
        }
        let n = index.len();
        let mut part = vec![0u32; n];
        let mut parts = 1;
        if cut {
            let mut stamp = vec![usize::MAX; n];
            for (k, v) in ports.iter().enumerate() {
                let mut distinct = 0;
                for i in 0..t.seen[v].1.len() {
                    let id = t.seen[v].1[i];
                    let c = index[&t.ids.find(id)] as usize;
                    if stamp[c] != k {
                        stamp[c] = k;
                        distinct += 1;
                    }
                }
                if distinct == n {
                    continue;
                }
                // Refine: (old part, carried here) -> new part, numbered by first class.
                let mut relabel: HashMap<(u32, bool), u32> = HashMap::new();
                for c in 0..n {
                    let key = (part[c], stamp[c] == k);
                    let next = relabel.len() as u32;
                    part[c] = *relabel.entry(key).or_insert(next);
                }
                parts = relabel.len();
            }
        }
        Classes { index, part, parts }
    }

    /// The class of an id, if it has one.
    fn of(&self, t: &mut Trace, id: u32) -> Option<u32> {
        self.index.get(&t.ids.find(id)).copied()
    }
}

/// Resolves a trace's channel ids, cuts them into regions by the values they travel
/// through and decides each one's kind. Parts that are no transform opportunity (no sink
/// and no query-key product: logits, graph outputs) are left out; those a barrier at a
/// node stopped come back as [`Unformed`]. `force` (a segment) keeps the trace whole.
fn classify(
    env: &Env<'_>,
    mut t: Trace,
    force: Option<RegionKind>,
) -> (Vec<Region>, Vec<Unformed>) {
    let classes = Classes::new(&mut t, force.is_none());
    let mut regions = Vec::new();
    let mut stopped: Vec<Unformed> = Vec::new();
    for p in 0..classes.parts as u32 {
        match classify_part(env, &mut t, &classes, p, force) {
            Ok(r) => regions.push(r),
            Err(Some(u)) => stopped.push(u),
            Err(None) => {}
        }
    }
    // Reported when nothing formed from a layer's output (a weight contracted with an
    // activation: a linear layer, not a constant scaling one).
    let layer = t.sources.first().is_some_and(|e| {
        let n = env.graph.node(e.node);
        (0..n.inputs().len()).filter(|&j| j != e.input).any(|j| {
            let rank = n
                .input(j)
                .and_then(|v| env.shapes.shape(v))
                .map_or(0, <[_]>::len);
            (0..rank).any(|a| matches!(env.flow(e.node, j, a), ChannelFlow::Contracted { .. }))
        })
    });
    let mut unformed = Vec::new();
    if regions.is_empty()
        && layer
        && let Some(first) = stopped.first()
    {
        let mut u = Unformed {
            source: first.source.clone(),
            dim: 0,
            blockers: Vec::new(),
        };
        for s in stopped {
            u.dim += s.dim;
            for b in s.blockers {
                if !u.blockers.contains(&b) {
                    u.blockers.push(b);
                }
            }
        }
        unformed.push(u);
    }
    (regions, unformed)
}

/// The region of part `p` of a trace (see [`classify`]).
fn classify_part(
    env: &Env<'_>,
    t: &mut Trace,
    classes: &Classes,
    p: u32,
    force: Option<RegionKind>,
) -> Result<Region, Option<Unformed>> {
    // The part's classes, numbered in class order: the region's channels.
    let mut local: HashMap<u32, u32> = HashMap::new();
    let mut by_class: Vec<(u32, u32)> = classes
        .index
        .iter()
        .filter(|(_, c)| classes.part[**c as usize] == p)
        .map(|(&root, &c)| (c, root))
        .collect();
    by_class.sort_unstable();
    for (i, (_, root)) in by_class.iter().enumerate() {
        local.insert(*root, i as u32);
    }
    let dim = local.len();
    // The region channel of an id, if it is in this part.
    let chan = |t: &mut Trace, id: u32| local.get(&t.ids.find(id)).copied();
    // Whether ids reach this part (ids without a class: conservatively yes).
    let touches = |t: &mut Trace, ids: &[u32]| {
        ids.is_empty()
            || ids.iter().any(|&id| {
                classes
                    .of(t, id)
                    .is_none_or(|c| classes.part[c as usize] == p)
            })
    };
    let mut barriers: Vec<Blocker> = Vec::new();
    let endpoints = |list: &[trace::RawEndpoint],
                     t: &mut Trace,
                     whole: bool,
                     barriers: &mut Vec<Blocker>|
     -> Vec<Endpoint> {
        let mut out = Vec::new();
        for e in list {
            let mut positions = Vec::new();
            let mut channels = Vec::new();
            for (i, &id) in e.ids.iter().enumerate() {
                if let Some(c) = chan(t, id) {
                    positions.push(i);
                    channels.push(c);
                }
            }
            if channels.is_empty() {
                continue;
            }
            let part = (positions.len() < e.ids.len()).then_some(positions);
            if whole && part.is_some() {
                barriers.push(Blocker {
                    at: Some(env.node_label(e.node)),
                    reason: format!(
                        "reads `{}` together with channels of another region",
                        env.graph.value(e.weight).name
                    ),
                });
            }
            out.push(Endpoint {
                node: e.node,
                input: e.input,
                weight: e.weight,
                axis: e.axis,
                channels,
                part,
                activation: e.activation,
            });
        }
        out
    };
    let raw = std::mem::take(&mut t.sources);
    let sources = endpoints(&raw, t, false, &mut barriers);
    t.sources = raw;
    let raw = std::mem::take(&mut t.sinks);
    let sinks = endpoints(&raw, t, true, &mut barriers);
    t.sinks = raw;
    let raw = std::mem::take(&mut t.params);
    let params = endpoints(&raw, t, true, &mut barriers);
    t.params = raw;

    // Heads: channels are in one group iff they sit at the same head index of every port
    // that has a heads axis (the smallest index, where query heads share a key head).
    let mut groups = vec![0u32; dim];
    let mut heads = None;
    let head_ports = std::mem::take(&mut t.head_ports);
    let mut sig: Vec<Vec<usize>> = vec![Vec::new(); dim];
    let mut max_heads = 0;
    let mut any_heads = false;
    for hp in &head_ports {
        let inner: usize = hp.extents[hp.pos + 1..].iter().product();
        let n = hp.extents[hp.pos];
        let mut first: HashMap<usize, usize> = HashMap::new();
        for (at, &id) in hp.ids.iter().enumerate() {
            let Some(c) = chan(t, id) else { continue };
            let h = (at / inner) % n;
            let e = first.entry(c as usize).or_insert(h);
            *e = (*e).min(h);
        }
        if first.is_empty() {
            continue;
        }
        any_heads = true;
        max_heads = max_heads.max(n);
        for (c, h) in first {
            sig[c].push(h);
        }
    }
    t.head_ports = head_ports;
    if any_heads {
        let mut ids: HashMap<Vec<usize>, u32> = HashMap::new();
        for (c, s) in sig.into_iter().enumerate() {
            let n = ids.len() as u32;
            groups[c] = *ids.entry(s).or_insert(n);
        }
        let kv = ids.len();
        if max_heads > 1 && dim.is_multiple_of(kv) {
            heads = Some(Heads {
                heads: max_heads,
                kv_heads: kv,
                head_dim: dim / kv,
            });
        }
    }
    let sums = std::mem::take(&mut t.sums);
    let sums_streams = sums.iter().any(|&id| chan(t, id).is_some());
    t.sums = sums;
    let ends = std::mem::take(&mut t.invariant_ends);
    let invariant_ends = ends.iter().any(|&id| chan(t, id).is_some());
    t.invariant_ends = ends;

    // Channels stopped at an online Hadamard were transformed where they stopped (R2 online
    // on an output projection's input), not skipped: such a stop is no reason to report.
    let mut online_stops: Vec<Blocker> = Vec::new();
    let blockers = std::mem::take(&mut t.blockers);
    for (b, node, ids) in &blockers {
        if touches(t, ids) {
            barriers.push(b.clone());
            if node.is_some_and(|n| is_online_hadamard(env.graph.node(n))) {
                online_stops.push(b.clone());
            }
        }
    }
    t.blockers = blockers;

    let kind = match (heads.is_some(), sinks.is_empty()) {
        _ if force.is_some() => force.expect("checked"),
        (true, false) => RegionKind::AttentionVo,
        (true, true) if invariant_ends => RegionKind::AttentionQk,
        (false, _) if sums_streams && !sinks.is_empty() => RegionKind::Residual,
        (false, false) => RegionKind::Mlp,
        _ => {
            let at_nodes: Vec<Blocker> = barriers
                .into_iter()
                .filter(|b| b.at.is_some() && !online_stops.contains(b))
                .collect();
            if at_nodes.is_empty() {
                return Err(None);
            }
            let source = sources
                .first()
                .map(|e| {
                    format!(
                        "`{}` ({})",
                        env.graph.value(e.weight).name,
                        env.node_label(e.node)
                    )
                })
                .unwrap_or_else(|| "?".into());
            return Err(Some(Unformed {
                source,
                dim,
                blockers: at_nodes,
            }));
        }
    };

    // What limits the kinds: the first op seen by this part's channels.
    let mut kinds = Kinds::default();
    let limits = std::mem::take(&mut t.limits);
    for l in &limits {
        if (kinds.permutation.is_some() || l.permutation)
            && (kinds.rotation.is_some() || l.rotation)
        {
            continue;
        }
        if !l.ids.iter().any(|&id| chan(t, id).is_some()) {
            continue;
        }
        let label = env.node_label(l.node);
        if !l.permutation && kinds.permutation.is_none() {
            kinds.permutation = Some(format!("{label} does not commute with permutations"));
        }
        if !l.rotation && kinds.rotation.is_none() {
            kinds.rotation = Some(format!("{label} does not commute with rotations"));
        }
    }
    t.limits = limits;

    // The values and nodes this part's channels pass through.
    let mut values = Vec::new();
    for (v, axes) in &t.ports.clone() {
        let ids = t.seen[v].1.clone();
        if ids.iter().any(|&id| chan(t, id).is_some()) {
            values.push((*v, axes.clone()));
        }
    }
    let mut nodes = Vec::new();
    for &n in &t.nodes.clone() {
        let ids = t.node_ids.get(&n).cloned().unwrap_or_default();
        if touches(t, &ids) {
            nodes.push(n);
        }
    }
    let scope = scale::Scope {
        values: values.iter().map(|(v, _)| *v).collect(),
        nodes: nodes.iter().copied().collect(),
    };
    let uniform_params = params.iter().map(|p| is_uniform(env, p.weight)).collect();
    let positive = scale::scaled_sources(env, &t.roles, &sources, &sinks, false, &scope);
    let signed = scale::scaled_sources(env, &t.roles, &sources, &sinks, true, &scope);
    kinds.scale = positive.as_ref().err().cloned();
    kinds.signed_scale = signed.as_ref().err().cloned();
    let mut names = Names::default();
    for &n in nodes
        .iter()
        .chain(sources.iter().chain(&sinks).chain(&params).map(|e| &e.node))
    {
        names.nodes.insert(n, env.node_label(n));
    }
    for e in sources.iter().chain(&sinks).chain(&params) {
        names
            .values
            .insert(e.weight, env.graph.value(e.weight).name.clone());
        if let Some((_, v)) = e.activation {
            names.values.insert(v, env.graph.value(v).name.clone());
        }
    }
    Ok(Region {
        kind,
        dim,
        sources,
        sinks,
        params,
        nodes,
        values,
        heads,
        groups,
        barriers,
        online_only: None,
        kinds,
        uniform_params,
        scale_sources: positive.ok(),
        signed_scale_sources: signed.ok(),
        names,
    })
}

/// The online-only region of `node`'s result, if the op table says it holds heads that no
/// transform of its inputs reaches and linears read it.
fn online_region(env: &Env<'_>, node: NodeId) -> Option<Region> {
    let rh = env.result_heads(node)?;
    let cause = Blocker {
        at: Some(env.node_label(node)),
        reason: rh.reason.to_string(),
    };
    online_from(env, node, rh.output, rh.axis, rh.head_dim, cause)
}

/// The online-only regions at the sinks of a value/output region `blocked` that a barrier
/// keeps from a folded rotation: one per activation its linears read, traced from that
/// activation's producer, where the activation's last axis holds whole heads in blocks of
/// the head dim (what the per-head Hadamard mixes). `x Wₒ = (x Q)(Qᵀ Wₒ)` holds for any
/// orthogonal `Q`, so this is exact whatever stops the values.
fn online_at_sinks(env: &Env<'_>, blocked: &Region) -> Vec<Region> {
    let Some(h) = blocked.heads else {
        return Vec::new();
    };
    let hd = h.head_dim;
    // The sinks' weights index the activation's channels along their reading axis; each
    // run of `hd` indices must lie in one head.
    let aligned = |e: &Endpoint| {
        e.part.is_none()
            && e.channels.len().is_multiple_of(hd)
            && e.channels.chunks(hd).all(|run| {
                let g = blocked.groups[run[0] as usize];
                run.iter().all(|&c| blocked.groups[c as usize] == g)
            })
    };
    // Named by the value projection (a matrix, not its bias); barriers at no node are the
    // graph's inputs and outputs: the past and present values of a cache.
    let cause = {
        let matrix = |e: &&Endpoint| env.shapes.shape(e.weight).is_some_and(|s| s.len() >= 2);
        let source = blocked
            .sources
            .iter()
            .find(matrix)
            .or(blocked.sources.first());
        let boundary = blocked.barriers.iter().all(|b| b.at.is_none());
        Blocker {
            at: source.map(|e| blocked.names.nodes[&e.node].clone()),
            reason: if boundary {
                "its values are graph inputs and outputs: a key/value cache".to_string()
            } else {
                describe(&blocked.barriers[0])
            },
        }
    };
    let mut out: Vec<Region> = Vec::new();
    for e in &blocked.sinks {
        let Some((_, x)) = e.activation else { continue };
        if !aligned(e) || out.iter().any(|r| r.values.iter().any(|(v, _)| *v == x)) {
            continue;
        }
        let Some((node, slot)) = env.graph.value(x).producer() else {
            continue;
        };
        let Some(rank) = env.shapes.shape(x).map(<[_]>::len) else {
            continue;
        };
        if rank == 0 || e.channels.len() != env.extents(x, &[rank - 1]).map_or(0, |d| d[0]) {
            continue;
        }
        if let Some(r) = online_from(env, node, slot as usize, rank - 1, hd, cause.clone()) {
            out.push(r);
        }
    }
    out
}

/// The channels on axis `axis` of result `output` of `node`, traced to the linears that
/// read them, as an online-only region of heads of `head_dim` (blocks of consecutive
/// channels) stopped by `cause`.
fn online_from(
    env: &Env<'_>,
    node: NodeId,
    output: usize,
    axis: usize,
    head_dim: usize,
    cause: Blocker,
) -> Option<Region> {
    let t = Trace::from_result(env, node, output, axis)?;
    let (mut regions, _) = classify(env, t, Some(RegionKind::AttentionVo));
    let mut r = regions.pop()?;
    if r.sinks.is_empty() || head_dim == 0 || !r.dim.is_multiple_of(head_dim) {
        return None;
    }
    let heads = r.dim / head_dim;
    r.heads = Some(Heads {
        heads,
        kv_heads: heads,
        head_dim,
    });
    r.groups = (0..r.dim).map(|c| (c / head_dim) as u32).collect();
    r.online_only = Some(cause);
    r.names.nodes.insert(node, env.node_label(node));
    Some(r)
}

/// Whether a constant has one value throughout (then any orthogonal map commutes with
/// multiplying by it).
fn is_uniform(env: &Env<'_>, v: ValueId) -> bool {
    let Some(t) = env.graph.const_tensor(v) else {
        return false;
    };
    match t.to_f32() {
        Ok(x) => x.windows(2).all(|w| w[0] == w[1]),
        Err(_) => false,
    }
}
