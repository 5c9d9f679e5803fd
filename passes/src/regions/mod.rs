//! Permutation-equivariant regions: where a channel transform can be applied to a model
//! without changing what it computes.
//!
//! A region is a set of channels written by some weights (its *sources*: `W ← T W` on
//! the axis they write), carried through ops that commute with the transform, and read by
//! other weights (its *sinks*: `W ← W T⁻¹` on the axis they read). The analysis is the
//! dataflow of [`trace`] over the op table's channel column, on a canonicalized graph.
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

mod scale;
mod trace;

use perqc_ir::{Analysis, Model, NodeId, PassError, ValueId};
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

/// Every region of a model's main graph, in the order their first source appears.
#[derive(Clone, Debug, Default)]
pub struct Regions {
    pub regions: Vec<Region>,
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
        let regions = traces
            .into_iter()
            .filter_map(|t| classify(&env, t, None))
            .collect();
        Regions { regions }
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
            let legal = if legal.is_empty() {
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
        s
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

/// Resolves a trace's channel ids and decides its kind; `None` for traces that are no
/// transform opportunity (no sink and no query-key product: logits, graph outputs).
fn classify(env: &Env<'_>, mut t: Trace, force: Option<RegionKind>) -> Option<Region> {
    // Channel classes in the order of the first source's channels.
    let mut index: HashMap<u32, u32> = HashMap::new();
    let mut order: Vec<u32> = Vec::new();
    let seed = t.seed_ids.clone();
    let all_ids = seed
        .iter()
        .chain(t.sources.iter().flat_map(|e| e.ids.iter()))
        .chain(t.sinks.iter().flat_map(|e| e.ids.iter()))
        .copied()
        .collect::<Vec<_>>();
    for id in all_ids {
        let root = t.ids.find(id);
        if let std::collections::hash_map::Entry::Vacant(v) = index.entry(root) {
            v.insert(order.len() as u32);
            order.push(root);
        }
    }
    let dim = order.len();
    let mut resolve = |ids: &[u32], t: &mut Trace| -> Vec<u32> {
        ids.iter()
            .map(|&i| {
                let r = t.ids.find(i);
                *index.entry(r).or_insert_with(|| {
                    order.push(r);
                    order.len() as u32 - 1
                })
            })
            .collect()
    };
    let mut endpoints = |list: Vec<trace::RawEndpoint>, t: &mut Trace| -> Vec<Endpoint> {
        list.into_iter()
            .map(|e| Endpoint {
                node: e.node,
                input: e.input,
                weight: e.weight,
                axis: e.axis,
                channels: resolve(&e.ids, t),
                activation: e.activation,
            })
            .collect()
    };
    let sources = endpoints(std::mem::take(&mut t.sources), &mut t);
    let sinks = endpoints(std::mem::take(&mut t.sinks), &mut t);
    let params = endpoints(std::mem::take(&mut t.params), &mut t);

    // Heads: channels are in one group iff they sit at the same head index of every port
    // that has a heads axis (the smallest index, where query heads share a key head).
    let mut groups = vec![0u32; dim];
    let mut heads = None;
    if !t.head_ports.is_empty() {
        let mut sig: Vec<Vec<usize>> = vec![Vec::new(); dim];
        let mut max_heads = 0;
        for hp in &t.head_ports {
            let inner: usize = hp.extents[hp.pos + 1..].iter().product();
            let n = hp.extents[hp.pos];
            max_heads = max_heads.max(n);
            let mut first: HashMap<usize, usize> = HashMap::new();
            for (local, &id) in hp.ids.iter().enumerate() {
                let root = t.ids.find(id);
                let Some(&c) = index.get(&root) else { continue };
                let h = (local / inner) % n;
                let e = first.entry(c as usize).or_insert(h);
                *e = (*e).min(h);
            }
            for (c, h) in first {
                sig[c].push(h);
            }
        }
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
    let kind = match (heads.is_some(), sinks.is_empty()) {
        _ if force.is_some() => force?,
        (true, false) => RegionKind::AttentionVo,
        (true, true) if t.invariant_ends => RegionKind::AttentionQk,
        (false, _) if t.sums_streams && !sinks.is_empty() => RegionKind::Residual,
        (false, false) => RegionKind::Mlp,
        _ => return None,
    };
    let uniform_params = params.iter().map(|p| is_uniform(env, p.weight)).collect();
    let mut kinds = std::mem::take(&mut t.kinds);
    let positive = scale::scaled_sources(env, &t.roles, &sources, &sinks, false);
    let signed = scale::scaled_sources(env, &t.roles, &sources, &sinks, true);
    kinds.scale = positive.as_ref().err().cloned();
    kinds.signed_scale = signed.as_ref().err().cloned();
    let mut names = Names::default();
    for &n in t
        .nodes
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
    Some(Region {
        kind,
        dim,
        sources,
        sinks,
        params,
        nodes: std::mem::take(&mut t.nodes),
        values: std::mem::take(&mut t.ports),
        heads,
        groups,
        barriers: std::mem::take(&mut t.blockers),
        kinds,
        uniform_params,
        scale_sources: positive.ok(),
        signed_scale_sources: signed.ok(),
        names,
    })
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
