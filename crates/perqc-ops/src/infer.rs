//! The inference walker: seeds facts from graph inputs and constants, runs each node's
//! rule from the op table in graph order, and writes results back into `Value::ty`.

use crate::facts::{Facts, fmt_opt_shape};
use crate::{OpDef, lookup};
use perqc_ir::graph::{Graph, Node, NodeId, ValueDef, ValueId};
use perqc_ir::types::{DeclaredDim, Dim};
use perqc_ir::{DType, Model, Type};

/// Why a rule rejects a node. Rendered after "node `name` (Op): ".
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ShapeError {
    #[error("input {index} is required but missing")]
    MissingInput { index: usize },
    #[error("attribute `{name}` is required but missing")]
    MissingAttr { name: &'static str },
    #[error("attribute `{name}`: {reason}")]
    BadAttr { name: &'static str, reason: String },
    #[error("axis {axis} is out of range for rank {rank}")]
    Axis { axis: i64, rank: usize },
    #[error("{what} has rank {got}, expected {expected}")]
    Rank {
        what: &'static str,
        expected: String,
        got: usize,
    },
    #[error("shapes {a} and {b} do not broadcast")]
    Broadcast { a: String, b: String },
    #[error("inner dimensions differ: {a} vs {b} (shapes {sa} and {sb})")]
    InnerDims {
        a: Dim,
        b: Dim,
        sa: String,
        sb: String,
    },
    #[error("dimension {axis} differs between inputs: {a} vs {b}")]
    DimMismatch { axis: usize, a: Dim, b: Dim },
    #[error("cannot reshape {from} ({from_numel} elements) to {to} ({to_numel} elements)")]
    ElementCount {
        from: String,
        to: String,
        from_numel: String,
        to_numel: String,
    },
    #[error("element types differ: {a} vs {b}")]
    DTypeMismatch { a: DType, b: DType },
    #[error("in subgraph `{graph}`: {error}")]
    Subgraph {
        graph: String,
        error: Box<InferError>,
    },
    #[error("{0}")]
    Invalid(String),
}

/// An inference failure, naming where it happened.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum InferError {
    #[error("node `{node}` ({op}): {error}")]
    Node {
        node: String,
        op: String,
        #[source]
        error: Box<ShapeError>,
    },
    #[error(
        "value `{value}`: declared type {declared} conflicts with inferred {inferred}; \
         fix or drop the declaration (value_info) or the producing node"
    )]
    Conflict {
        value: String,
        declared: String,
        inferred: String,
    },
}

/// An op with no entry in the table (its outputs are left unknown).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownOp {
    pub domain: String,
    pub op_type: String,
    /// The opset the model imports for the domain, if any.
    pub opset: Option<i64>,
    /// How many nodes use it; `first` names one of them.
    pub count: usize,
    pub first: String,
}

/// What a rule sees of the node it infers.
pub struct InferCtx<'a> {
    pub graph: &'a Graph,
    pub node: &'a Node,
    /// The opset version selected for the node's domain.
    pub opset: i64,
    inputs: Vec<Option<&'a Facts>>,
    /// What is known so far in the node's graph (for subgraph captures).
    scope: &'a ShapeMap,
    opsets: &'a dyn Fn(&str) -> Option<i64>,
}

static UNKNOWN: Facts = Facts {
    dtype: None,
    shape: None,
    value: None,
};

impl<'a> InferCtx<'a> {
    /// Facts of input `i`; `None` if the operand is omitted.
    pub fn input(&self, i: usize) -> Option<&'a Facts> {
        self.inputs.get(i).copied().flatten()
    }

    /// Facts of a required input.
    pub fn req(&self, i: usize) -> Result<&'a Facts, ShapeError> {
        self.input(i).ok_or(ShapeError::MissingInput { index: i })
    }

    /// The facts of all present inputs, in order.
    pub fn present_inputs(&self) -> Vec<&'a Facts> {
        self.inputs.iter().flatten().copied().collect()
    }

    pub fn num_inputs(&self) -> usize {
        self.inputs.len()
    }

    pub fn num_outputs(&self) -> usize {
        self.node.outputs().len()
    }

    pub fn attr_int(&self, name: &str, default: i64) -> i64 {
        self.node.attr_int(name).unwrap_or(default)
    }

    /// The fully known integer values of input `i` (absent input: `None`).
    pub fn input_ints(&self, i: usize) -> Option<Vec<i64>> {
        self.input(i)?.known_ints()
    }

    /// Infers a subgraph of the node (a branch or loop body) and returns the facts of its
    /// outputs. `inputs` refine the body's declared graph inputs, in order; values the body
    /// reads from this graph get their facts from the scope inferred so far.
    pub fn infer_subgraph(&self, body: &Graph, inputs: &[Facts]) -> Result<Vec<Facts>, ShapeError> {
        let outer = |name: &str| {
            self.graph
                .find(name)
                .and_then(|v| self.scope.get(v).cloned())
        };
        let map =
            infer_scope(body, self.opsets, &outer, inputs).map_err(|e| ShapeError::Subgraph {
                graph: body.name.clone(),
                error: Box::new(e),
            })?;
        Ok(body
            .outputs
            .iter()
            .map(|&o| map.get(o).cloned().unwrap_or_default())
            .collect())
    }
}

/// The inferred facts of every value of a graph, plus the ops the table does not know.
#[derive(Clone, Debug, Default)]
pub struct ShapeMap {
    facts: Vec<Option<Facts>>,
    pub unknown_ops: Vec<UnknownOp>,
    /// The default-domain opset the graph was inferred at (for folding constants).
    pub(crate) default_opset: Option<i64>,
}

impl ShapeMap {
    pub fn get(&self, v: ValueId) -> Option<&Facts> {
        self.facts.get(v.index()).and_then(Option::as_ref)
    }

    /// The inferred type of `v`, if anything is known.
    pub fn ty(&self, v: ValueId) -> Option<Type> {
        self.get(v).and_then(Facts::to_type)
    }

    pub fn shape(&self, v: ValueId) -> Option<&[Dim]> {
        self.get(v)?.shape.as_deref()
    }

    pub fn dtype(&self, v: ValueId) -> Option<DType> {
        self.get(v)?.dtype
    }

    fn set(&mut self, v: ValueId, f: Facts) {
        if self.facts.len() <= v.index() {
            self.facts.resize(v.index() + 1, None);
        }
        self.facts[v.index()] = Some(f);
    }
}

fn node_label(id: NodeId, n: &Node) -> String {
    if n.name.is_empty() {
        id.to_string()
    } else {
        n.name.clone()
    }
}

/// The table entry for a node, given the model's opsets. A domain the model does not
/// import selects the newest entry.
pub fn lookup_node(node: &Node, opset: &dyn Fn(&str) -> Option<i64>) -> Option<&'static OpDef> {
    let version = opset(&node.domain).unwrap_or(i64::MAX - 1);
    lookup(&node.domain, &node.op_type, version)
}

/// Infers dtype, shape and small values for every value of `graph`.
///
/// Seeds: graph inputs from their declared types, initializers from their tensors. Nodes
/// are visited in graph order; a node's outputs get its rule's result, refined with the
/// output's declared type where the rule leaves something unknown. Ops without a table
/// entry get unknown outputs (or their declared types) and are listed in `unknown_ops`.
/// Subgraphs are not entered.
pub fn infer_graph(
    graph: &Graph,
    opset: &dyn Fn(&str) -> Option<i64>,
) -> Result<ShapeMap, InferError> {
    infer_scope(graph, opset, &|_| None, &[])
}

/// [`infer_graph`] for a graph nested in another: `outer` gives the facts of captured
/// values by name, `inputs` refine the graph inputs' declared types, in order.
fn infer_scope(
    graph: &Graph,
    opset: &dyn Fn(&str) -> Option<i64>,
    outer: &dyn Fn(&str) -> Option<Facts>,
    inputs: &[Facts],
) -> Result<ShapeMap, InferError> {
    let mut map = ShapeMap {
        facts: vec![None; graph.value_capacity()],
        unknown_ops: Vec::new(),
        default_opset: opset(""),
    };
    for (id, v) in graph.values() {
        let f = match v.def() {
            ValueDef::Initializer => v.tensor.as_ref().map(Facts::of_tensor),
            ValueDef::Outer => outer(&v.name).or_else(|| v.ty.as_ref().map(Facts::of_type)),
            ValueDef::Input => match (&v.ty, &v.tensor) {
                (Some(ty), _) => Some(Facts::of_type(ty)),
                (None, Some(t)) => Some(Facts::new(
                    Some(t.dtype),
                    Some(t.dims.iter().map(|&d| Dim::Known(d)).collect()),
                )),
                (None, None) => None,
            },
            _ => None,
        };
        if let Some(f) = f {
            map.set(id, f);
        }
    }
    for (&v, given) in graph.inputs.iter().zip(inputs) {
        let mut f = map.get(v).cloned().unwrap_or_default();
        f.refine_with(given);
        map.set(v, f);
    }
    for (id, node) in graph.nodes() {
        let outs = match lookup_node(node, opset) {
            Some(def) => {
                let inputs: Vec<Option<&Facts>> = node
                    .inputs()
                    .iter()
                    .map(|i| i.map(|v| map.get(v).unwrap_or(&UNKNOWN)))
                    .collect();
                let ctx = InferCtx {
                    graph,
                    node,
                    opset: opset(&node.domain).unwrap_or(def.since_version),
                    inputs,
                    scope: &map,
                    opsets: opset,
                };
                (def.infer)(&ctx).map_err(|error| InferError::Node {
                    node: node_label(id, node),
                    op: node.op_type.clone(),
                    error: Box::new(error),
                })?
            }
            None => {
                note_unknown(&mut map.unknown_ops, id, node, opset(&node.domain));
                Vec::new()
            }
        };
        for (slot, out) in node.outputs().iter().enumerate() {
            let Some(v) = out else { continue };
            let mut f = outs.get(slot).cloned().unwrap_or_default();
            if let Some(ty) = &graph.value(*v).ty {
                f.refine_with(&Facts::of_type(ty));
            }
            map.set(*v, f);
        }
    }
    Ok(map)
}

/// [`infer_graph`] on a model's main graph with the model's opset imports.
pub fn infer_model(model: &Model) -> Result<ShapeMap, InferError> {
    infer_graph(&model.graph, &|d| model.opset(d))
}

fn note_unknown(list: &mut Vec<UnknownOp>, id: NodeId, n: &Node, opset: Option<i64>) {
    let domain = if n.is_default_domain() { "" } else { &n.domain };
    if let Some(u) = list
        .iter_mut()
        .find(|u| u.domain == domain && u.op_type == n.op_type)
    {
        u.count += 1;
        return;
    }
    list.push(UnknownOp {
        domain: domain.to_string(),
        op_type: n.op_type.clone(),
        opset,
        count: 1,
        first: node_label(id, n),
    });
}

/// What [`apply`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Values that had no type and got one.
    pub set: usize,
    /// Declared types whose unknown element type or dims were filled in.
    pub refined: usize,
}

/// Writes inferred types into the node outputs of `graph`: sets `ty` where it is `None`
/// and fills unknown element types / dims of declared types (denotations kept).
///
/// Every declared type is first checked against the inference; on a conflict (different
/// element type, rank, or known dims) nothing is written and the error names the value.
pub fn apply(graph: &mut Graph, map: &ShapeMap) -> Result<ApplyStats, InferError> {
    let mut edits: Vec<(ValueId, Type, bool)> = Vec::new();
    for (id, v) in graph.values() {
        if !matches!(v.def(), ValueDef::Node { .. }) {
            continue;
        }
        let Some(f) = map.get(id) else { continue };
        match &v.ty {
            None => {
                if let Some(t) = f.to_type() {
                    edits.push((id, t, false));
                }
            }
            Some(declared @ Type::Tensor { .. }) => {
                if !compatible(declared, f) {
                    return Err(InferError::Conflict {
                        value: v.name.clone(),
                        declared: declared.to_string(),
                        inferred: describe(f),
                    });
                }
                if let Some(t) = refine(declared, f) {
                    edits.push((id, t, true));
                }
            }
            Some(Type::Other(_)) => {}
        }
    }
    let mut stats = ApplyStats::default();
    for (id, t, refined) in edits {
        graph.value_mut(id).ty = Some(t);
        if refined {
            stats.refined += 1;
        } else {
            stats.set += 1;
        }
    }
    Ok(stats)
}

fn describe(f: &Facts) -> String {
    let e = f.dtype.map_or("?".to_string(), |d| d.to_string());
    format!("{e}{}", fmt_opt_shape(f.shape.as_deref()))
}

/// Whether a declared type admits the inferred facts. Different symbols are compatible:
/// exporters name the same size differently.
pub fn compatible(declared: &Type, f: &Facts) -> bool {
    if let (Some(a), Some(b)) = (declared.elem(), f.dtype)
        && a != b
    {
        return false;
    }
    match (declared.shape(), &f.shape) {
        (Some(a), Some(b)) => {
            a.len() == b.len()
                && a.iter().zip(b).all(|(x, y)| match (x, y) {
                    (Dim::Known(p), Dim::Known(q)) => p == q,
                    _ => true,
                })
        }
        _ => true,
    }
}

/// The declared type with unknowns filled from `f`; `None` if nothing changes.
fn refine(declared: &Type, f: &Facts) -> Option<Type> {
    let Type::Tensor {
        elem,
        shape,
        denotation,
    } = declared
    else {
        return None;
    };
    let mut changed = false;
    let new_elem = match (elem, f.dtype) {
        (None, Some(d)) => {
            changed = true;
            Some(d)
        }
        (e, _) => *e,
    };
    let new_shape = match (shape, &f.shape) {
        (None, Some(s)) => {
            changed = true;
            Some(
                s.iter()
                    .map(|d| DeclaredDim {
                        dim: d.clone(),
                        denotation: None,
                    })
                    .collect(),
            )
        }
        (Some(dims), Some(s)) => Some(
            dims.iter()
                .zip(s)
                .map(|(d, inf)| {
                    if d.dim == Dim::Unknown && *inf != Dim::Unknown {
                        changed = true;
                        DeclaredDim {
                            dim: inf.clone(),
                            denotation: d.denotation.clone(),
                        }
                    } else {
                        d.clone()
                    }
                })
                .collect(),
        ),
        (s, None) => s.clone(),
    };
    changed.then(|| Type::Tensor {
        elem: new_elem,
        shape: new_shape,
        denotation: denotation.clone(),
    })
}
