//! The graph: an arena of nodes and values with typed ids.
//!
//! Invariants (checked by [`crate::verify`]):
//! - every value has a unique name within its graph; `names` maps each live name to its id;
//! - a value's `def` names its single definition (graph input, initializer, node output, or
//!   a capture from the enclosing graph), and `uses` lists exactly the node operands reading
//!   it, inputs and captures alike;
//! - `order` lists every live node once, each after the producers of all it reads.
//!
//! Node operands and results are only changed through `Graph` methods, which keep `uses`
//! and `def` in step.

use crate::{Tensor, Type};
use bytes::Bytes;
use smallvec::SmallVec;
use std::collections::HashMap;
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(u32);

impl NodeId {
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The id with arena index `index` (for walking side tables; see
    /// [`Graph::node_capacity`] and [`Graph::try_node`]).
    pub fn from_index(index: usize) -> NodeId {
        NodeId(index as u32)
    }
}

impl ValueId {
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The id with arena index `index` (see [`Graph::value_capacity`]).
    pub fn from_index(index: usize) -> ValueId {
        ValueId(index as u32)
    }
}

/// How a value comes to exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueDef {
    /// A graph input. If the value also has a tensor, it is an overridable default.
    Input,
    /// A constant initializer; the value's `tensor` holds it.
    Initializer,
    /// Result `slot` of `node`.
    Node { node: NodeId, slot: u32 },
    /// Read by name from an enclosing graph (subgraphs only).
    Outer,
    /// Referenced but not (yet) defined; only transiently valid while building a graph.
    Undefined,
    /// Deleted; its name is free again.
    Removed,
}

/// Which operand of a node reads a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operand {
    /// Input slot `i` of the node.
    Input(u32),
    /// Capture `i`: read inside one of the node's subgraphs.
    Capture(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Use {
    pub node: NodeId,
    pub operand: Operand,
}

/// Per-declaration details kept only so export can reproduce them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InfoExtra {
    pub doc_string: Option<String>,
    pub metadata: Vec<(String, String)>,
}

#[derive(Clone, Debug)]
pub struct Value {
    pub name: String,
    /// Declared or inferred type.
    pub ty: Option<Type>,
    /// Constant data (initializers, and defaults of graph inputs).
    pub tensor: Option<Tensor>,
    pub info: InfoExtra,
    def: ValueDef,
    uses: SmallVec<[Use; 2]>,
}

impl Value {
    pub fn def(&self) -> ValueDef {
        self.def
    }

    pub fn uses(&self) -> &[Use] {
        &self.uses
    }

    /// The node producing this value, with the result slot.
    pub fn producer(&self) -> Option<(NodeId, u32)> {
        match self.def {
            ValueDef::Node { node, slot } => Some((node, slot)),
            _ => None,
        }
    }
}

/// An attribute of a node.
#[derive(Clone, Debug)]
pub struct Attribute {
    pub name: String,
    pub value: AttrValue,
    pub doc_string: Option<String>,
    /// Set in function bodies: the attribute takes the caller's attribute of this name.
    pub ref_attr_name: Option<String>,
}

#[derive(Clone, Debug)]
pub enum AttrValue {
    Float(f32),
    Int(i64),
    String(Bytes),
    Tensor(Tensor),
    Graph(Box<Graph>),
    /// Encoded `SparseTensorProto`.
    SparseTensor(Bytes),
    /// Encoded `TypeProto`.
    TypeProto(Bytes),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    Strings(Vec<Bytes>),
    Tensors(Vec<Tensor>),
    Graphs(Vec<Graph>),
    SparseTensors(Vec<Bytes>),
    TypeProtos(Vec<Bytes>),
    /// An attribute whose type the model left undefined (`ref_attr_name` only).
    Undefined,
}

/// Node fields that no pass interprets, kept for export.
#[derive(Clone, Debug, Default)]
pub struct NodeExtra {
    pub doc_string: Option<String>,
    pub overload: Option<String>,
    pub metadata: Vec<(String, String)>,
    /// Encoded `NodeDeviceConfigurationProto`s.
    pub device_configurations: Vec<Bytes>,
    /// The model spelled the name / domain as an explicit empty string.
    pub empty_name_present: bool,
    pub empty_domain_present: bool,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    /// Operator domain; `""` (or `"ai.onnx"`) is the default ONNX domain.
    pub domain: String,
    pub attrs: Vec<Attribute>,
    pub extra: NodeExtra,
    inputs: SmallVec<[Option<ValueId>; 4]>,
    outputs: SmallVec<[Option<ValueId>; 2]>,
    captures: Vec<ValueId>,
}

impl Node {
    /// Operands; `None` is an omitted optional input (the empty name in ONNX).
    pub fn inputs(&self) -> &[Option<ValueId>] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[Option<ValueId>] {
        &self.outputs
    }

    /// Values of the enclosing graph that the node's subgraphs read by name.
    pub fn captures(&self) -> &[ValueId] {
        &self.captures
    }

    pub fn input(&self, i: usize) -> Option<ValueId> {
        self.inputs.get(i).copied().flatten()
    }

    pub fn output(&self, i: usize) -> Option<ValueId> {
        self.outputs.get(i).copied().flatten()
    }

    pub fn attr(&self, name: &str) -> Option<&AttrValue> {
        self.attrs.iter().find(|a| a.name == name).map(|a| &a.value)
    }

    pub fn attr_int(&self, name: &str) -> Option<i64> {
        match self.attr(name)? {
            AttrValue::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn attr_float(&self, name: &str) -> Option<f32> {
        match self.attr(name)? {
            AttrValue::Float(f) => Some(*f),
            _ => None,
        }
    }

    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        match self.attr(name)? {
            AttrValue::Ints(v) => Some(v),
            _ => None,
        }
    }

    pub fn attr_str(&self, name: &str) -> Option<&[u8]> {
        match self.attr(name)? {
            AttrValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The node's subgraphs (from graph and graphs attributes), in attribute order.
    pub fn subgraphs(&self) -> impl Iterator<Item = &Graph> {
        self.attrs.iter().flat_map(|a| match &a.value {
            AttrValue::Graph(g) => std::slice::from_ref(g.as_ref()),
            AttrValue::Graphs(gs) => gs.as_slice(),
            _ => &[],
        })
    }

    pub fn is_default_domain(&self) -> bool {
        self.domain.is_empty() || self.domain == "ai.onnx"
    }

    /// `Shape` and `Size`: they read their input's shape, never its data (a rewrite that
    /// changes values but not shapes leaves their results as they were).
    pub fn reads_shape_only(&self) -> bool {
        self.is_default_domain() && matches!(self.op_type.as_str(), "Shape" | "Size")
    }

    /// Ops known to be free of side effects: ONNX's, `ai.onnx.ml`'s and perqc's canonical
    /// ops ([`PERQC_DOMAIN`]). Custom domains may have effects nobody can see.
    pub fn is_pure(&self) -> bool {
        self.is_default_domain() || self.domain == "ai.onnx.ml" || self.domain == PERQC_DOMAIN
    }
}

/// A node to add: everything but the wiring, which the graph does.
#[derive(Clone, Debug, Default)]
pub struct NodeSpec {
    pub name: String,
    pub op_type: String,
    pub domain: String,
    pub attrs: Vec<Attribute>,
    pub extra: NodeExtra,
}

impl NodeSpec {
    pub fn new(op_type: &str) -> NodeSpec {
        NodeSpec {
            op_type: op_type.to_string(),
            ..Default::default()
        }
    }

    pub fn named(mut self, name: &str) -> NodeSpec {
        self.name = name.to_string();
        self
    }

    pub fn attr(mut self, name: &str, value: AttrValue) -> NodeSpec {
        self.attrs.push(Attribute {
            name: name.to_string(),
            value,
            doc_string: None,
            ref_attr_name: None,
        });
        self
    }
}

/// The domain of perqc's canonical ops: ONNX ops (same names, attributes and semantics
/// unless the op table's row says otherwise) that exist whatever opset a model declares.
/// Canonicalization writes them; lowering turns them back into the model's own opset.
pub const PERQC_DOMAIN: &str = "ai.perqc";

/// Structural errors raised while building or editing a graph.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum GraphError {
    #[error("value `{name}` is defined twice ({first} and {second})")]
    DuplicateValue {
        name: String,
        first: String,
        second: String,
    },
    #[error("node `{node}` ({op}) reads `{name}`, which nothing defines")]
    UndefinedValue {
        node: String,
        op: String,
        name: String,
    },
    #[error("graph output `{name}` is not defined")]
    UndefinedOutput { name: String },
    #[error("the graph has a cycle through node `{node}` ({op})")]
    Cycle { node: String, op: String },
    #[error("value `{name}` still has {uses} use(s)")]
    StillUsed { name: String, uses: usize },
    #[error("value `{name}` is {what}, not an initializer")]
    NotInitializer { name: String, what: String },
    #[error("initializer `{name}` is {want}; the replacement is {got}")]
    TensorMismatch {
        name: String,
        want: String,
        got: String,
    },
    #[error("initializer `{name}`: {detail}")]
    BadTensor { name: String, detail: String },
    #[error("node {node} is not in the graph")]
    NoNode { node: NodeId },
    #[error("a {what} has an empty name; every {what} needs one")]
    EmptyName { what: String },
    #[error("`{name}` is needed but neither given nor computed in the graph")]
    NotComputed { name: String },
}

/// A computation graph (the main graph or a subgraph of a control-flow node).
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    pub doc_string: Option<String>,
    pub metadata: Vec<(String, String)>,
    /// Graph inputs, in order.
    pub inputs: Vec<ValueId>,
    /// Graph outputs, in order (a value may appear more than once).
    pub outputs: Vec<ValueId>,
    /// Initializers in emission order.
    pub initializers: Vec<ValueId>,
    /// Values listed in the model's `value_info`, in order.
    pub value_info: Vec<ValueId>,
    /// Encoded `SparseTensorProto` initializers (kept, not interpreted).
    pub sparse_initializers: Vec<Bytes>,
    /// Encoded `TensorAnnotation`s (kept, not interpreted).
    pub quantization_annotation: Vec<Bytes>,
    nodes: Vec<Option<Node>>,
    order: Vec<NodeId>,
    values: Vec<Value>,
    names: HashMap<String, ValueId>,
}

impl Graph {
    pub fn new(name: &str) -> Graph {
        Graph {
            name: name.to_string(),
            ..Default::default()
        }
    }

    // ---- reading ----

    pub fn node(&self, id: NodeId) -> &Node {
        self.nodes[id.index()].as_ref().expect("node was removed")
    }

    /// The node, or `None` if it was removed or `id` is out of range.
    pub fn try_node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id.index()).and_then(|n| n.as_ref())
    }

    pub fn value(&self, id: ValueId) -> &Value {
        &self.values[id.index()]
    }

    pub fn value_mut(&mut self, id: ValueId) -> &mut Value {
        &mut self.values[id.index()]
    }

    pub fn find(&self, name: &str) -> Option<ValueId> {
        self.names.get(name).copied()
    }

    /// Live nodes in graph order.
    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.order.iter().map(|&id| (id, self.node(id)))
    }

    pub fn node_order(&self) -> &[NodeId] {
        &self.order
    }

    pub fn node_count(&self) -> usize {
        self.order.len()
    }

    /// Live values (not removed), in creation order.
    pub fn values(&self) -> impl Iterator<Item = (ValueId, &Value)> {
        self.values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.def != ValueDef::Removed)
            .map(|(i, v)| (ValueId(i as u32), v))
    }

    /// Upper bound of value ids, for side tables indexed by `ValueId::index`.
    pub fn value_capacity(&self) -> usize {
        self.values.len()
    }

    pub fn node_capacity(&self) -> usize {
        self.nodes.len()
    }

    /// The constant a value holds: an initializer, or the `value` of a `Constant` node.
    pub fn const_tensor(&self, v: ValueId) -> Option<&Tensor> {
        let val = self.value(v);
        match val.def {
            ValueDef::Initializer => val.tensor.as_ref(),
            ValueDef::Node { node, .. } => {
                let n = self.node(node);
                if n.op_type == "Constant" && n.is_default_domain() {
                    match n.attr("value")? {
                        AttrValue::Tensor(t) => Some(t),
                        _ => None,
                    }
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    // ---- building ----

    fn describe_def(&self, v: &Value) -> String {
        match v.def {
            ValueDef::Input => "graph input".into(),
            ValueDef::Initializer => "initializer".into(),
            ValueDef::Node { node, .. } => {
                let n = self.node(node);
                format!("output of node `{}` ({})", n.name, n.op_type)
            }
            ValueDef::Outer => "outer-scope capture".into(),
            ValueDef::Undefined | ValueDef::Removed => "nothing".into(),
        }
    }

    /// The value called `name`, created `Undefined` if new (a forward reference).
    pub fn value_named(&mut self, name: &str) -> ValueId {
        if let Some(&id) = self.names.get(name) {
            return id;
        }
        self.push_value(name, ValueDef::Undefined)
    }

    fn push_value(&mut self, name: &str, def: ValueDef) -> ValueId {
        let id = ValueId(self.values.len() as u32);
        self.values.push(Value {
            name: name.to_string(),
            ty: None,
            tensor: None,
            info: InfoExtra::default(),
            def,
            uses: SmallVec::new(),
        });
        self.names.insert(name.to_string(), id);
        id
    }

    /// Defines `name` as `def`. Fails if the name is empty (values are known by name) or
    /// something already defines it.
    fn define(&mut self, name: &str, def: ValueDef, what: &str) -> Result<ValueId, GraphError> {
        if name.is_empty() {
            return Err(GraphError::EmptyName {
                what: what.to_string(),
            });
        }
        let id = self.value_named(name);
        let v = &self.values[id.index()];
        if v.def != ValueDef::Undefined {
            return Err(GraphError::DuplicateValue {
                name: name.to_string(),
                first: self.describe_def(v),
                second: what.to_string(),
            });
        }
        self.values[id.index()].def = def;
        Ok(id)
    }

    /// Adds a graph input.
    pub fn add_input(&mut self, name: &str, ty: Option<Type>) -> Result<ValueId, GraphError> {
        let id = self.define(name, ValueDef::Input, "graph input")?;
        self.values[id.index()].ty = ty;
        self.inputs.push(id);
        Ok(id)
    }

    /// Adds an initializer holding `tensor` (its name is set to `name`). If `name` is already
    /// a graph input, the tensor becomes that input's default instead.
    pub fn add_initializer(
        &mut self,
        name: &str,
        mut tensor: Tensor,
    ) -> Result<ValueId, GraphError> {
        tensor.name = name.to_string();
        let id = match self.find(name) {
            Some(id)
                if self.values[id.index()].def == ValueDef::Input
                    && self.values[id.index()].tensor.is_none() =>
            {
                id
            }
            _ => self.define(name, ValueDef::Initializer, "initializer")?,
        };
        self.values[id.index()].tensor = Some(tensor);
        self.initializers.push(id);
        Ok(id)
    }

    /// Declares `name` as read from the enclosing graph.
    pub fn add_outer(&mut self, name: &str) -> Result<ValueId, GraphError> {
        self.define(name, ValueDef::Outer, "outer-scope capture")
    }

    /// A name not used in this graph, `base` or `base_N`.
    pub fn fresh_name(&self, base: &str) -> String {
        if !self.names.contains_key(base) {
            return base.to_string();
        }
        (1..)
            .map(|i| format!("{base}_{i}"))
            .find(|n| !self.names.contains_key(n))
            .unwrap()
    }

    /// Appends a node reading `inputs` and defining new values named `outputs` (an empty
    /// name is an omitted optional result). Inputs may be forward references made with
    /// [`Graph::value_named`]; the verifier rejects them if they stay undefined.
    pub fn add_node(
        &mut self,
        spec: NodeSpec,
        inputs: &[Option<ValueId>],
        outputs: &[&str],
    ) -> Result<NodeId, GraphError> {
        let id = NodeId(self.nodes.len() as u32);
        // A name listed twice among this node's own outputs: `define` cannot describe the
        // first definition (the node is not pushed yet), so it is caught here.
        for (slot, name) in outputs.iter().enumerate() {
            if let Some(first) = outputs[..slot]
                .iter()
                .position(|n| !n.is_empty() && n == name)
            {
                let node = format!("node `{}` ({})", spec.name, spec.op_type);
                return Err(GraphError::DuplicateValue {
                    name: name.to_string(),
                    first: format!("output {first} of {node}"),
                    second: format!("output {slot} of {node}"),
                });
            }
        }
        let mut outs: SmallVec<[Option<ValueId>; 2]> = SmallVec::new();
        for (slot, name) in outputs.iter().enumerate() {
            if name.is_empty() {
                outs.push(None);
                continue;
            }
            let what = format!("output of node `{}` ({})", spec.name, spec.op_type);
            let v = self.define(
                name,
                ValueDef::Node {
                    node: id,
                    slot: slot as u32,
                },
                &what,
            );
            match v {
                Ok(v) => outs.push(Some(v)),
                Err(e) => {
                    // Undo the outputs already defined so the graph stays consistent.
                    for o in outs.iter().flatten() {
                        self.values[o.index()].def = ValueDef::Undefined;
                    }
                    return Err(e);
                }
            }
        }
        for (slot, input) in inputs.iter().enumerate() {
            if let Some(v) = input {
                self.values[v.index()].uses.push(Use {
                    node: id,
                    operand: Operand::Input(slot as u32),
                });
            }
        }
        self.nodes.push(Some(Node {
            name: spec.name,
            op_type: spec.op_type,
            domain: spec.domain,
            attrs: spec.attrs,
            extra: spec.extra,
            inputs: inputs.iter().copied().collect(),
            outputs: outs,
            captures: Vec::new(),
        }));
        self.order.push(id);
        Ok(id)
    }

    /// Records that `node`'s subgraphs read `values` of this graph.
    pub fn set_captures(&mut self, node: NodeId, values: Vec<ValueId>) {
        let old = std::mem::take(&mut self.nodes[node.index()].as_mut().unwrap().captures);
        for v in old {
            self.values[v.index()]
                .uses
                .retain(|u| !(u.node == node && matches!(u.operand, Operand::Capture(_))));
        }
        for (i, &v) in values.iter().enumerate() {
            self.values[v.index()].uses.push(Use {
                node,
                operand: Operand::Capture(i as u32),
            });
        }
        self.nodes[node.index()].as_mut().unwrap().captures = values;
    }

    /// Points input `slot` of `node` at `value`.
    pub fn set_input(&mut self, node: NodeId, slot: usize, value: Option<ValueId>) {
        let n = self.nodes[node.index()].as_mut().expect("node was removed");
        let old = std::mem::replace(&mut n.inputs[slot], value);
        let operand = Operand::Input(slot as u32);
        if let Some(o) = old {
            let uses = &mut self.values[o.index()].uses;
            if let Some(pos) = uses
                .iter()
                .position(|u| u.node == node && u.operand == operand)
            {
                uses.remove(pos);
            }
        }
        if let Some(v) = value {
            self.values[v.index()].uses.push(Use { node, operand });
        }
    }

    /// Makes every reader of `old` (node inputs and graph outputs) read `new` instead.
    /// Captures are by name and are not redirected.
    pub fn replace_all_uses(&mut self, old: ValueId, new: ValueId) {
        let uses: Vec<Use> = self.values[old.index()].uses.to_vec();
        for u in uses {
            if let Operand::Input(slot) = u.operand {
                self.set_input(u.node, slot as usize, Some(new));
            }
        }
        for o in &mut self.outputs {
            if *o == old {
                *o = new;
            }
        }
    }

    /// `StillUsed` if a node input or a graph output reads `v`.
    fn check_unread(&self, v: ValueId) -> Result<(), GraphError> {
        let val = &self.values[v.index()];
        let as_output = self.outputs.contains(&v) as usize;
        if val.uses.is_empty() && as_output == 0 {
            return Ok(());
        }
        Err(GraphError::StillUsed {
            name: val.name.clone(),
            uses: val.uses.len() + as_output,
        })
    }

    /// Removes a node whose results nobody reads.
    pub fn remove_node(&mut self, id: NodeId) -> Result<Node, GraphError> {
        let outs: Vec<ValueId> = self.node(id).outputs.iter().flatten().copied().collect();
        for &o in &outs {
            self.check_unread(o)?;
        }
        let n = self.node(id);
        let ins: Vec<(usize, ValueId)> = n
            .inputs
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (i, v)))
            .collect();
        for (slot, _) in ins {
            self.set_input(id, slot, None);
        }
        self.set_captures(id, Vec::new());
        for o in outs {
            self.remove_value(o);
        }
        self.order.retain(|&n| n != id);
        Ok(self.nodes[id.index()].take().unwrap())
    }

    /// Deletes an unused value and frees its name.
    fn remove_value(&mut self, id: ValueId) {
        let v = &mut self.values[id.index()];
        v.def = ValueDef::Removed;
        v.tensor = None;
        self.names.remove(&v.name);
        self.initializers.retain(|&i| i != id);
        self.value_info.retain(|&i| i != id);
    }

    /// Removes an initializer (or other constant value) that nothing reads.
    pub fn remove_initializer(&mut self, id: ValueId) -> Result<(), GraphError> {
        let v = &self.values[id.index()];
        if !v.uses.is_empty() || self.outputs.contains(&id) {
            return Err(GraphError::StillUsed {
                name: v.name.clone(),
                uses: v.uses.len(),
            });
        }
        self.remove_value(id);
        Ok(())
    }

    // ---- editing (passes that rewrite weights and ops) ----

    /// The subgraphs of `node` (If branches, Loop/Scan bodies), mutably, in attribute order.
    pub fn subgraphs_mut(&mut self, node: NodeId) -> impl Iterator<Item = &mut Graph> {
        self.nodes[node.index()]
            .as_mut()
            .expect("node was removed")
            .attrs
            .iter_mut()
            .flat_map(|a| match &mut a.value {
                AttrValue::Graph(g) => std::slice::from_mut(g.as_mut()),
                AttrValue::Graphs(gs) => gs.as_mut_slice(),
                _ => &mut [],
            })
    }

    /// Calls `f` on every subgraph of every node, depth first (children before the
    /// subgraphs nested in them are not visited by this call: `f` recurses if it wants to).
    pub fn for_each_subgraph_mut<E>(
        &mut self,
        mut f: impl FnMut(&mut Graph) -> Result<(), E>,
    ) -> Result<(), E> {
        for id in self.order.clone() {
            for g in self.subgraphs_mut(id) {
                f(g)?;
            }
        }
        Ok(())
    }

    /// Where `node` stands in node order.
    pub fn order_position(&self, node: NodeId) -> Option<usize> {
        self.order.iter().position(|&n| n == node)
    }

    /// Adds a node like [`Graph::add_node`], placed right before `before` in node order.
    /// When the new node reads only values defined before `before` (its inputs are
    /// ancestors of `before`, or constants), a topological order stays topological.
    pub fn insert_node_before(
        &mut self,
        before: NodeId,
        spec: NodeSpec,
        inputs: &[Option<ValueId>],
        outputs: &[&str],
    ) -> Result<NodeId, GraphError> {
        let pos = self
            .order_position(before)
            .ok_or(GraphError::NoNode { node: before })?;
        let id = self.add_node(spec, inputs, outputs)?;
        self.order.pop();
        self.order.insert(pos, id);
        Ok(id)
    }

    /// Turns `node` into another op in place: op type, domain, attributes (and, if
    /// `spec.name` is not empty, name) come from `spec`, inputs from `inputs`. The node keeps
    /// its results, their names and their readers, and its place in node order, so a chain
    /// ending at `node` can be replaced by one op without renaming anything; the nodes the
    /// chain absorbed become unread and are left to [`Graph::remove_node`] or `dce`.
    pub fn set_op(
        &mut self,
        node: NodeId,
        spec: NodeSpec,
        inputs: &[Option<ValueId>],
    ) -> Result<(), GraphError> {
        self.try_node(node).ok_or(GraphError::NoNode { node })?;
        for slot in 0..self.node(node).inputs.len() {
            self.set_input(node, slot, None);
        }
        let n = self.nodes[node.index()].as_mut().expect("checked above");
        n.inputs = smallvec::smallvec![None; inputs.len()];
        n.op_type = spec.op_type;
        n.domain = spec.domain;
        n.attrs = spec.attrs;
        n.extra.overload = spec.extra.overload;
        if !spec.name.is_empty() {
            n.name = spec.name;
        }
        for (slot, &v) in inputs.iter().enumerate() {
            self.set_input(node, slot, v);
        }
        Ok(())
    }

    /// Sets attribute `name` of `node` to `value` (added if absent). Subgraph attributes are
    /// not set this way: their captures are wired by [`Graph::set_captures`].
    pub fn set_attr(&mut self, node: NodeId, name: &str, value: AttrValue) {
        assert!(
            !matches!(value, AttrValue::Graph(_) | AttrValue::Graphs(_)),
            "set_attr: a subgraph attribute"
        );
        let n = self.nodes[node.index()].as_mut().expect("a live node");
        match n.attrs.iter_mut().find(|a| a.name == name) {
            Some(a) => a.value = value,
            None => n.attrs.push(Attribute {
                name: name.to_string(),
                value,
                doc_string: None,
                ref_attr_name: None,
            }),
        }
    }

    /// Drops the results of `node` from index `keep` on (an op with fewer results after
    /// [`Graph::set_op`]); each must be unread and no graph output.
    pub fn truncate_outputs(&mut self, node: NodeId, keep: usize) -> Result<(), GraphError> {
        let outs: Vec<ValueId> = self
            .try_node(node)
            .ok_or(GraphError::NoNode { node })?
            .outputs
            .iter()
            .skip(keep)
            .flatten()
            .copied()
            .collect();
        for &o in &outs {
            self.check_unread(o)?;
        }
        for o in outs {
            self.remove_value(o);
        }
        let n = self.nodes[node.index()].as_mut().expect("checked above");
        n.outputs.truncate(keep);
        Ok(())
    }

    /// Replaces the tensor of initializer `v` (or of a graph input's default) with
    /// `tensor`, which must have the same element type and dims and a valid payload. The
    /// value keeps its name, type and readers; returns the old tensor. Weights nothing
    /// rewrites stay the zero-copy slices they were loaded as.
    pub fn replace_initializer(
        &mut self,
        v: ValueId,
        mut tensor: Tensor,
    ) -> Result<Tensor, GraphError> {
        let val = self.value(v);
        let name = val.name.clone();
        let old = match (&val.def, &val.tensor) {
            (ValueDef::Initializer | ValueDef::Input, Some(t)) => t,
            _ => {
                return Err(GraphError::NotInitializer {
                    what: self.describe_def(val),
                    name,
                });
            }
        };
        let describe = |t: &Tensor| format!("{}{:?}", t.dtype, t.dims);
        if old.dtype != tensor.dtype || old.dims != tensor.dims {
            return Err(GraphError::TensorMismatch {
                name,
                want: describe(old),
                got: describe(&tensor),
            });
        }
        tensor.validate().map_err(|e| GraphError::BadTensor {
            name: name.clone(),
            detail: e.to_string(),
        })?;
        tensor.name = name;
        Ok(std::mem::replace(
            self.values[v.index()]
                .tensor
                .as_mut()
                .expect("checked above"),
            tensor,
        ))
    }

    /// Replaces the node order. The caller guarantees it is a permutation of the live nodes.
    pub fn set_order(&mut self, order: Vec<NodeId>) {
        debug_assert_eq!(order.len(), self.order.len());
        self.order = order;
    }
}

/// Hooks for tests that need graphs the editing API refuses to build.
#[cfg(test)]
impl Graph {
    pub(crate) fn test_uses_mut(&mut self, v: ValueId) -> &mut SmallVec<[Use; 2]> {
        &mut self.values[v.index()].uses
    }

    pub(crate) fn test_set_def(&mut self, v: ValueId, def: ValueDef) {
        self.values[v.index()].def = def;
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_need_names() {
        // Found by the `load` fuzz target: a graph input without a name loaded, then failed
        // verification.
        let mut g = Graph::new("g");
        let e = g.add_input("", None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a graph input has an empty name; every graph input needs one"
        );
        let e = g
            .add_initializer("", crate::Tensor::from_f32(vec![], &[1.0]))
            .unwrap_err();
        assert!(matches!(e, GraphError::EmptyName { .. }));
        assert!(g.add_outer("").is_err());
        assert_eq!(g.values().count(), 0);
    }

    #[test]
    fn add_node_rejects_an_output_listed_twice() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", None).unwrap();
        let spec = NodeSpec::new("Split").named("s");
        let e = g.add_node(spec, &[Some(x)], &["y", "y"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "value `y` is defined twice (output 0 of node `s` (Split) and output 1 of node `s` (Split))"
        );
        // Nothing was added; the name is still free.
        assert_eq!(g.node_count(), 0);
        assert!(g.value(x).uses.is_empty());
        let n = g
            .add_node(NodeSpec::new("Relu").named("r"), &[Some(x)], &["y"])
            .unwrap();
        assert_eq!(
            g.value(g.find("y").unwrap()).def,
            ValueDef::Node { node: n, slot: 0 }
        );
        // Omitted optional results (empty names) may repeat.
        g.add_node(NodeSpec::new("Split"), &[Some(x)], &["", "z", ""])
            .unwrap();
        // A value defined twice across nodes names both definitions.
        let e = g
            .add_node(NodeSpec::new("Neg").named("n2"), &[Some(x)], &["y"])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "value `y` is defined twice (output of node `r` (Relu) and output of node `n2` (Neg))"
        );
    }
}
