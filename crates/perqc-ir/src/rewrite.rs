//! The one rewrite mechanism: every graph rewrite is written as pattern -> check -> patch.
//!
//! - **Pattern**: walk from an anchor node up through its operands with a [`Matcher`]:
//!   which op produced a value ([`Matcher::sole_op`] also requires that the anchor's chain
//!   is the value's only reader), constants through constant subgraphs
//!   ([`Matcher::scalar`], [`Matcher::ints`]), and shape facts ([`Matcher::shape`]).
//! - **Check**: whatever makes the identity hold (ranks, axes, dtypes), on the same view.
//! - **Patch**: a [`Patch`] is a value listing edits (turn a node into another op, insert a
//!   node, redirect readers, replace a weight); [`Patch::apply`] performs them in one step
//!   and then removes the pure nodes the edits left unread, so a pattern never lists the
//!   nodes it absorbed.
//!
//! The matcher never sees tensor names: patterns match by structure. Shape and constant
//! facts come from a [`ValueFacts`] provider (the op-semantics crate implements it over
//! inferred shapes and its kernels), so this crate stays free of numeric code.

use crate::graph::{Graph, GraphError, Node, NodeId, NodeSpec, Operand, ValueDef, ValueId};
use crate::{DType, Dim, Tensor};
use std::borrow::Cow;

/// What a matcher may know about a value beyond the graph's wiring.
pub trait ValueFacts {
    /// The value's (symbolic) shape, if inferred.
    fn shape(&self, v: ValueId) -> Option<&[Dim]>;
    /// The value's element type, if inferred.
    fn dtype(&self, v: ValueId) -> Option<DType>;
    /// The elements of a small integer tensor when all are known (shape arithmetic such as
    /// `Concat(Shape(x)[0], 4)` on a static dim).
    fn ints(&self, v: ValueId) -> Option<Vec<i64>>;
    /// The elements of a small integer tensor as dims, symbols included (a shape computed
    /// from `Shape` of a value with symbolic dims).
    fn dims(&self, v: ValueId) -> Option<Vec<Dim>>;
    /// The value of `v` when it follows from constants alone (initializers, `Constant`
    /// nodes, and ops over them), for small tensors.
    fn constant(&self, graph: &Graph, v: ValueId) -> Option<Tensor>;
    /// The model's default-domain opset (some spellings mean different things by opset).
    fn default_opset(&self) -> Option<i64>;
}

/// No facts: patterns that need shapes or folded constants do not match.
pub struct NoFacts;

impl ValueFacts for NoFacts {
    fn shape(&self, _: ValueId) -> Option<&[Dim]> {
        None
    }
    fn dtype(&self, _: ValueId) -> Option<DType> {
        None
    }
    fn ints(&self, _: ValueId) -> Option<Vec<i64>> {
        None
    }
    fn dims(&self, _: ValueId) -> Option<Vec<Dim>> {
        None
    }
    fn constant(&self, _: &Graph, _: ValueId) -> Option<Tensor> {
        None
    }
    fn default_opset(&self) -> Option<i64> {
        None
    }
}

/// A read-only view of a graph for matching patterns.
#[derive(Clone, Copy)]
pub struct Matcher<'a> {
    pub graph: &'a Graph,
    facts: &'a dyn ValueFacts,
}

impl<'a> Matcher<'a> {
    pub fn new(graph: &'a Graph, facts: &'a dyn ValueFacts) -> Matcher<'a> {
        Matcher { graph, facts }
    }

    pub fn node(&self, id: NodeId) -> &'a Node {
        self.graph.node(id)
    }

    /// Node `id` is the default-domain op `op`.
    pub fn is_op(&self, id: NodeId, op: &str) -> bool {
        let n = self.graph.node(id);
        n.op_type == op && n.is_default_domain()
    }

    /// Input `i` of node `id`, if present.
    pub fn input(&self, id: NodeId, i: usize) -> Option<ValueId> {
        self.graph.node(id).input(i)
    }

    /// Both inputs of a node with exactly two.
    pub fn two(&self, id: NodeId) -> Option<(ValueId, ValueId)> {
        let n = self.graph.node(id);
        (n.inputs().len() == 2).then_some((n.input(0)?, n.input(1)?))
    }

    /// The node computing `v`.
    pub fn producer(&self, v: ValueId) -> Option<NodeId> {
        self.graph.value(v).producer().map(|(n, _)| n)
    }

    /// The node computing `v`, when it is the default-domain op `op` (however many
    /// readers `v` has).
    pub fn def_op(&self, v: ValueId, op: &str) -> Option<NodeId> {
        self.producer(v).filter(|&n| self.is_op(n, op))
    }

    /// `v` has exactly one reader, a node input, and is no graph output.
    pub fn single_reader(&self, v: ValueId) -> bool {
        let val = self.graph.value(v);
        val.uses().len() == 1
            && matches!(val.uses()[0].operand, Operand::Input(_))
            && !self.graph.outputs.contains(&v)
    }

    /// The node reading `v`, when `v` has a single reader (see [`Matcher::single_reader`]).
    pub fn only_reader(&self, v: ValueId) -> Option<NodeId> {
        self.single_reader(v)
            .then(|| self.graph.value(v).uses()[0].node)
    }

    /// Results of node `id` from index `from` on that something reads (a graph output
    /// counts as read).
    pub fn results_read_from(&self, id: NodeId, from: usize) -> bool {
        self.graph
            .node(id)
            .outputs()
            .iter()
            .skip(from)
            .flatten()
            .any(|&o| !self.graph.value(o).uses().is_empty() || self.graph.outputs.contains(&o))
    }

    /// The producer of `v` when a pattern may absorb it: `v` is its only result and has a
    /// single reader (the pattern's node) and is no graph output.
    pub fn sole(&self, v: ValueId) -> Option<NodeId> {
        let n = self.producer(v)?;
        (self.single_reader(v) && self.graph.node(n).outputs().len() == 1).then_some(n)
    }

    /// [`Matcher::sole`] when that node is the default-domain op `op`.
    pub fn sole_op(&self, v: ValueId, op: &str) -> Option<NodeId> {
        self.sole(v).filter(|&n| self.is_op(n, op))
    }

    /// The constant value of `v` (initializer, `Constant`, or folded from constants).
    pub fn constant(&self, v: ValueId) -> Option<Cow<'a, Tensor>> {
        if let Some(t) = self.graph.const_tensor(v) {
            return Some(Cow::Borrowed(t));
        }
        self.facts.constant(self.graph, v).map(Cow::Owned)
    }

    /// The one element of a constant float tensor with a single element, as f32.
    pub fn scalar(&self, v: ValueId) -> Option<f32> {
        let t = self.constant(v)?;
        if !t.dtype.is_float() || t.numel() != Some(1) {
            return None;
        }
        t.to_f32().ok()?.first().copied()
    }

    /// The elements of a constant or shape-derived integer tensor.
    pub fn ints(&self, v: ValueId) -> Option<Vec<i64>> {
        if let Some(t) = self.graph.const_tensor(v)
            && t.dtype.is_integer()
        {
            return t.to_i64().ok();
        }
        self.facts.ints(v)
    }

    /// An integer list given as attribute `name` (older opsets) or as input `i`.
    pub fn attr_or_input_ints(&self, id: NodeId, name: &str, i: usize) -> Option<Vec<i64>> {
        match self.graph.node(id).attr_ints(name) {
            Some(a) => Some(a.to_vec()),
            None => self.ints(self.input(id, i)?),
        }
    }

    /// The model's default-domain opset, if the facts know it.
    pub fn opset(&self) -> Option<i64> {
        self.facts.default_opset()
    }

    pub fn shape(&self, v: ValueId) -> Option<&'a [Dim]> {
        // The facts provider outlives the matcher's borrow of it.
        self.facts.shape(v)
    }

    pub fn rank(&self, v: ValueId) -> Option<usize> {
        self.shape(v).map(<[_]>::len)
    }

    /// The declared or inferred element type.
    pub fn dtype(&self, v: ValueId) -> Option<DType> {
        self.facts
            .dtype(v)
            .or_else(|| self.graph.value(v).ty.as_ref().and_then(|t| t.elem()))
    }

    /// The elements of a small integer tensor as dims (see [`ValueFacts::dims`]).
    pub fn dims_value(&self, v: ValueId) -> Option<Vec<Dim>> {
        self.facts.dims(v)
    }

    pub fn is_f32(&self, v: ValueId) -> bool {
        self.dtype(v) == Some(DType::F32)
    }

    /// Tries `f` on `(a, b)`, then on `(b, a)`: matches a commutative op's operands in
    /// either order. Returns `f`'s result for the first order that matched.
    pub fn either<T>(
        &self,
        a: ValueId,
        b: ValueId,
        f: impl Fn(ValueId, ValueId) -> Option<T>,
    ) -> Option<T> {
        f(a, b).or_else(|| f(b, a))
    }

    /// Walks up from `v` over single-reader `Cast`s that keep the element type (no-op
    /// casts, as exporters write them around norms and softmax); returns where they start.
    pub fn skip_noop_casts(&self, mut v: ValueId) -> ValueId {
        while let Some(c) = self.sole_op(v, "Cast") {
            let Some(x) = self.input(c, 0) else { break };
            let to = self.graph.node(c).attr_int("to");
            match (to.and_then(|t| DType::from_code(t as i32)), self.dtype(x)) {
                (Some(t), Some(d)) if t == d => v = x,
                _ => break,
            }
        }
        v
    }
}

/// A value a patch refers to: one already in the graph, or the `k`-th result a patch's
/// inserted nodes define (in insertion order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchValue {
    Old(ValueId),
    New(usize),
}

impl From<ValueId> for PatchValue {
    fn from(v: ValueId) -> PatchValue {
        PatchValue::Old(v)
    }
}

#[derive(Debug)]
enum Edit {
    SetOp {
        node: NodeId,
        spec: NodeSpec,
        inputs: Vec<Option<PatchValue>>,
    },
    Insert {
        before: NodeId,
        spec: NodeSpec,
        inputs: Vec<Option<PatchValue>>,
        outputs: Vec<String>,
    },
    AddInitializer {
        name: String,
        tensor: Tensor,
    },
    Replace {
        old: ValueId,
        new: PatchValue,
    },
    SetInitializer {
        value: ValueId,
        tensor: Tensor,
    },
    TruncateOutputs {
        node: NodeId,
        keep: usize,
    },
}

/// A rewrite as a value: edits applied in order by [`Patch::apply`].
#[derive(Debug, Default)]
pub struct Patch {
    edits: Vec<Edit>,
    new_values: usize,
}

/// What applying a patch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Pure nodes removed because the edits left them unread.
    pub nodes_removed: usize,
}

impl Patch {
    pub fn new() -> Patch {
        Patch::default()
    }

    pub fn is_empty(&self) -> bool {
        self.edits.is_empty()
    }

    /// Turns `node` into `spec` reading `inputs`, keeping its results (see
    /// [`Graph::set_op`]).
    pub fn set_op(
        &mut self,
        node: NodeId,
        spec: NodeSpec,
        inputs: impl IntoIterator<Item = Option<PatchValue>>,
    ) -> &mut Patch {
        self.edits.push(Edit::SetOp {
            node,
            spec,
            inputs: inputs.into_iter().collect(),
        });
        self
    }

    /// Inserts `spec` before `before`, defining one fresh value per name in `outputs`
    /// (made unique in the graph); returns those values.
    pub fn insert(
        &mut self,
        before: NodeId,
        spec: NodeSpec,
        inputs: impl IntoIterator<Item = Option<PatchValue>>,
        outputs: &[&str],
    ) -> Vec<PatchValue> {
        let first = self.new_values;
        self.new_values += outputs.len();
        self.edits.push(Edit::Insert {
            before,
            spec,
            inputs: inputs.into_iter().collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
        });
        (first..self.new_values).map(PatchValue::New).collect()
    }

    /// Adds an initializer named `name` (made unique); returns its value.
    pub fn add_initializer(&mut self, name: &str, tensor: Tensor) -> PatchValue {
        self.edits.push(Edit::AddInitializer {
            name: name.to_string(),
            tensor,
        });
        self.new_values += 1;
        PatchValue::New(self.new_values - 1)
    }

    /// Makes every reader of `old` (and the graph outputs) read `new` instead.
    pub fn replace(&mut self, old: ValueId, new: PatchValue) -> &mut Patch {
        self.edits.push(Edit::Replace { old, new });
        self
    }

    /// Replaces the tensor of initializer `value` (same dtype and dims; see
    /// [`Graph::replace_initializer`]).
    pub fn set_initializer(&mut self, value: ValueId, tensor: Tensor) -> &mut Patch {
        self.edits.push(Edit::SetInitializer { value, tensor });
        self
    }

    /// Drops the (unread) results of `node` from index `keep` on, as an op with fewer
    /// results needs (see [`Graph::truncate_outputs`]).
    pub fn truncate_outputs(&mut self, node: NodeId, keep: usize) -> &mut Patch {
        self.edits.push(Edit::TruncateOutputs { node, keep });
        self
    }

    /// Applies the edits in order, then removes the pure nodes ([`Node::is_pure`]) that
    /// they left with every result unread, walking up from the values that lost readers.
    ///
    /// Errors leave the graph partly edited; they mean the pattern built an inconsistent
    /// patch (a removed node, a name clash), not bad user input.
    pub fn apply(self, g: &mut Graph) -> Result<Applied, GraphError> {
        let mut made: Vec<ValueId> = Vec::with_capacity(self.new_values);
        let mut orphans: Vec<ValueId> = Vec::new();
        let resolve = |made: &[ValueId], v: PatchValue| match v {
            PatchValue::Old(v) => v,
            PatchValue::New(k) => made[k],
        };
        for edit in self.edits {
            match edit {
                Edit::SetOp { node, spec, inputs } => {
                    let n = g.try_node(node).ok_or(GraphError::NoNode { node })?;
                    orphans.extend(n.inputs().iter().flatten());
                    let inputs: Vec<_> = inputs
                        .into_iter()
                        .map(|v| v.map(|v| resolve(&made, v)))
                        .collect();
                    g.set_op(node, spec, &inputs)?;
                }
                Edit::Insert {
                    before,
                    spec,
                    inputs,
                    outputs,
                } => {
                    let inputs: Vec<_> = inputs
                        .into_iter()
                        .map(|v| v.map(|v| resolve(&made, v)))
                        .collect();
                    let names: Vec<String> = outputs.iter().map(|o| g.fresh_name(o)).collect();
                    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                    let id = g.insert_node_before(before, spec, &inputs, &refs)?;
                    made.extend(g.node(id).outputs().iter().flatten());
                }
                Edit::AddInitializer { name, tensor } => {
                    let name = g.fresh_name(&name);
                    made.push(g.add_initializer(&name, tensor)?);
                }
                Edit::Replace { old, new } => {
                    g.replace_all_uses(old, resolve(&made, new));
                    orphans.push(old);
                }
                Edit::SetInitializer { value, tensor } => {
                    g.replace_initializer(value, tensor)?;
                }
                Edit::TruncateOutputs { node, keep } => g.truncate_outputs(node, keep)?,
            }
        }
        Ok(Applied {
            nodes_removed: remove_unread_producers(g, orphans)?,
        })
    }
}

/// Removes the pure producers of `values` whose results are all unread, and then theirs,
/// transitively. Returns how many nodes went.
pub fn remove_unread_producers(
    g: &mut Graph,
    mut values: Vec<ValueId>,
) -> Result<usize, GraphError> {
    let mut removed = 0;
    while let Some(v) = values.pop() {
        if g.value(v).def() == ValueDef::Removed {
            continue;
        }
        let Some((node, _)) = g.value(v).producer() else {
            continue;
        };
        let n = g.node(node);
        let unread = |o: &ValueId| g.value(*o).uses().is_empty() && !g.outputs.contains(o);
        if !n.is_pure() || !n.outputs().iter().flatten().all(unread) {
            continue;
        }
        values.extend(n.inputs().iter().flatten());
        values.extend(n.captures());
        g.remove_node(node)?;
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::AttrValue;
    use crate::{GraphError, verify_graph};

    /// x -> Neg -> a -> Neg -> b (output); w an initializer read by Add(b, w) -> y (output).
    fn chain() -> (Graph, [NodeId; 3]) {
        let mut g = Graph::new("g");
        let x = g.add_input("x", None).unwrap();
        let w = g
            .add_initializer("w", Tensor::from_f32(vec![2], &[1.0, 2.0]))
            .unwrap();
        let n1 = g
            .add_node(NodeSpec::new("Neg").named("n1"), &[Some(x)], &["a"])
            .unwrap();
        let a = g.find("a").unwrap();
        let n2 = g
            .add_node(NodeSpec::new("Neg").named("n2"), &[Some(a)], &["b"])
            .unwrap();
        let b = g.find("b").unwrap();
        let n3 = g
            .add_node(
                NodeSpec::new("Add").named("n3"),
                &[Some(b), Some(w)],
                &["y"],
            )
            .unwrap();
        g.outputs = vec![g.find("y").unwrap()];
        (g, [n1, n2, n3])
    }

    fn ops(g: &Graph) -> Vec<&str> {
        g.node_order()
            .iter()
            .map(|&n| g.node(n).op_type.as_str())
            .collect()
    }

    #[test]
    fn set_op_absorbs_the_chain_and_removes_what_it_left_unread() {
        // -(-x) == x: the second Neg becomes Identity(x); the first is left unread.
        let (mut g, [n1, n2, _]) = chain();
        let m = Matcher::new(&g, &NoFacts);
        let a = m.input(n2, 0).unwrap();
        assert_eq!(m.sole_op(a, "Neg"), Some(n1));
        let x = m.input(n1, 0).unwrap();
        let mut p = Patch::new();
        p.set_op(n2, NodeSpec::new("Identity"), [Some(x.into())]);
        assert_eq!(p.apply(&mut g).unwrap().nodes_removed, 1);
        assert_eq!(ops(&g), ["Identity", "Add"]);
        assert_eq!(g.node(n2).name, "n2");
        verify_graph(&g).unwrap();
    }

    #[test]
    fn sole_refuses_values_with_other_readers_or_outputs() {
        let (mut g, [_, n2, _]) = chain();
        let a = g.find("a").unwrap();
        g.outputs.push(a);
        let m = Matcher::new(&g, &NoFacts);
        assert_eq!(m.sole(a), None);
        assert_eq!(m.def_op(a, "Neg"), m.producer(a));
        assert!(m.is_op(n2, "Neg") && !m.is_op(n2, "Add"));
    }

    #[test]
    fn inserted_nodes_keep_topological_order() {
        // b + w == Add(b, w) computed by an inserted node the old Add's readers now read.
        let (mut g, [_, n2, n3]) = chain();
        let (b, w, y) = (
            g.find("b").unwrap(),
            g.find("w").unwrap(),
            g.find("y").unwrap(),
        );
        let mut p = Patch::new();
        let s = p.insert(
            n3,
            NodeSpec::new("Sum"),
            [Some(b.into()), Some(w.into())],
            &["s"],
        );
        let two = p.add_initializer("two", Tensor::from_f32(vec![], &[2.0]));
        let t = p.insert(n3, NodeSpec::new("Mul"), [Some(s[0]), Some(two)], &["s"]);
        p.replace(y, t[0]);
        p.apply(&mut g).unwrap();
        assert_eq!(ops(&g), ["Neg", "Neg", "Sum", "Mul"]);
        assert_eq!(g.value(g.outputs[0]).name, "s_1");
        assert_eq!(g.order_position(n2), Some(1));
        verify_graph(&g).unwrap();
        assert_eq!(g.topological_order().unwrap(), g.node_order());
    }

    #[test]
    fn replace_initializer_checks_type_and_dims() {
        let (mut g, _) = chain();
        let w = g.find("w").unwrap();
        let old = g
            .replace_initializer(w, Tensor::from_f32(vec![2], &[3.0, 4.0]))
            .unwrap();
        assert_eq!(old.to_f32().unwrap(), vec![1.0, 2.0]);
        assert_eq!(g.value(w).tensor.as_ref().unwrap().name, "w");
        let e = g
            .replace_initializer(w, Tensor::from_f32(vec![1, 2], &[3.0, 4.0]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "initializer `w` is f32[2]; the replacement is f32[1, 2]"
        );
        let e = g
            .replace_initializer(w, Tensor::from_i64(vec![2], &[3, 4]))
            .unwrap_err();
        assert!(matches!(e, GraphError::TensorMismatch { .. }));
        let x = g.find("x").unwrap();
        let e = g.replace_initializer(x, Tensor::from_f32(vec![2], &[3.0, 4.0]));
        assert!(matches!(e, Err(GraphError::NotInitializer { .. })));
    }

    #[test]
    fn constants_and_attribute_or_input_ints() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", None).unwrap();
        let c = g
            .add_node(
                NodeSpec::new("Constant")
                    .attr("value", AttrValue::Tensor(Tensor::from_f32(vec![], &[0.5]))),
                &[],
                &["c"],
            )
            .unwrap();
        let c = g.node(c).output(0).unwrap();
        let axes = g
            .add_initializer("axes", Tensor::from_i64(vec![1], &[-1]))
            .unwrap();
        let r = g
            .add_node(NodeSpec::new("ReduceMean"), &[Some(x), Some(axes)], &["r"])
            .unwrap();
        let r_old = g
            .add_node(
                NodeSpec::new("ReduceMean").attr("axes", AttrValue::Ints(vec![2])),
                &[Some(x)],
                &["r2"],
            )
            .unwrap();
        let m = Matcher::new(&g, &NoFacts);
        assert_eq!(m.scalar(c), Some(0.5));
        assert_eq!(m.scalar(x), None);
        assert_eq!(m.attr_or_input_ints(r, "axes", 1), Some(vec![-1]));
        assert_eq!(m.attr_or_input_ints(r_old, "axes", 1), Some(vec![2]));
    }
}
