//! The IR verifier: checks the invariants documented at the top of [`crate::graph`].
//!
//! [`verify`] is cheap (linear in the graph size, no tensor decoding beyond length checks),
//! so the pass manager can run it after every pass (`verify_each`). Errors are one line and
//! name the graph (a path such as `main/loop.body` for subgraphs), the node and the value.
//!
//! Checks, per graph and recursively per subgraph:
//! - value names are non-empty, unique, and the name index maps each to its value;
//! - the input and initializer lists match the values' definitions, without repeats;
//!   initializer tensors pass [`Tensor::validate`](crate::Tensor::validate);
//! - `node_order()` lists every live node exactly once;
//! - each node operand (input or capture) reads a defined value, defined before the node
//!   in `node_order()` (graph inputs, initializers and outer captures count as defined up
//!   front), and the value's `uses` record that operand exactly once; conversely every use
//!   names a live node operand that reads the value;
//! - each node result's `def` points back to that node and slot, and every value defined
//!   by a node is among that node's results;
//! - graph outputs are defined;
//! - a subgraph's `Outer` values are exactly the names it reads but does not define, each
//!   listed among the owning node's captures, and each capture is read by a subgraph; the
//!   main graph has no `Outer` values.

use crate::graph::{AttrValue, Graph, NodeId, Operand, ValueDef, ValueId};
use crate::{Model, TensorError};
use std::collections::{HashMap, HashSet};

/// An invariant violation: where (the graph path) and what.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("graph `{graph}`: {kind}")]
pub struct VerifyError {
    /// The graph, as a path: the main graph's name, then `/node.attribute` per nesting level.
    pub graph: String,
    /// Boxed to keep `Result<(), VerifyError>` small.
    pub kind: Box<VerifyErrorKind>,
}

/// What is wrong. Node descriptions read `` `name` (Op) `` (or `n7 (Op)` for unnamed nodes).
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum VerifyErrorKind {
    #[error("value #{index} has an empty name")]
    EmptyName { index: usize },
    #[error("value name `{name}` is used twice: by the {first} and by the {second}")]
    DuplicateName {
        name: String,
        first: String,
        second: String,
    },
    #[error("value `{name}` is not what the graph's name index resolves `{name}` to")]
    StaleNameIndex { name: String },
    #[error("graph input `{value}` is {problem}")]
    BadInput { value: String, problem: String },
    #[error("initializer `{value}` is {problem}")]
    BadInitializer { value: String, problem: String },
    #[error("constant `{value}` has an invalid tensor: {error}")]
    BadTensor { value: String, error: TensorError },
    #[error("value `{value}` ({def}) carries a tensor; only initializers and input defaults may")]
    StrayTensor { value: String, def: String },
    #[error("node order {problem}")]
    BadOrder { problem: String },
    #[error("node {node} {operand} reads `{value}`, which nothing defines ({state})")]
    UndefinedOperand {
        node: String,
        operand: String,
        value: String,
        state: &'static str,
    },
    #[error("node {node} {operand} reads `{value}` before its producer {producer} runs")]
    UseBeforeDef {
        node: String,
        operand: String,
        value: String,
        producer: String,
    },
    #[error(
        "node {node} {operand} reads `{value}`, but `{value}`'s uses record that {count} times"
    )]
    MissingUse {
        node: String,
        operand: String,
        value: String,
        count: usize,
    },
    #[error("value `{value}` lists a use by {node} {operand}, {problem}")]
    StaleUse {
        value: String,
        node: String,
        operand: String,
        problem: String,
    },
    #[error("node {node} result {slot} is `{value}`, whose definition is {def}")]
    BadResultDef {
        node: String,
        slot: usize,
        value: String,
        def: String,
    },
    #[error("value `{value}` claims to be result {slot} of {node}, {problem}")]
    StaleDef {
        value: String,
        node: String,
        slot: u32,
        problem: String,
    },
    #[error("graph output #{index} `{value}` is not defined ({state})")]
    UndefinedOutput {
        index: usize,
        value: String,
        state: &'static str,
    },
    #[error("value_info entry `{value}` was removed")]
    StaleValueInfo { value: String },
    #[error("value `{value}` is an outer-scope capture, but the main graph has no enclosing scope")]
    OuterInMainGraph { value: String },
    #[error("outer-scope value `{value}` is not among the captures of the owning node {node}")]
    OuterNotCaptured { value: String, node: String },
    #[error("outer-scope value `{value}` is declared but never read")]
    OuterUnused { value: String },
    #[error("node {node} captures `{value}`, but none of its subgraphs reads it")]
    CaptureUnused { node: String, value: String },
    #[error("node {node} captures `{value}` twice")]
    DuplicateCapture { node: String, value: String },
}

/// Checks every invariant of the model's graph and all nested subgraphs.
pub fn verify(model: &Model) -> Result<(), VerifyError> {
    verify_graph(&model.graph)
}

/// Checks a top-level graph (one without an enclosing scope) and its subgraphs.
pub fn verify_graph(graph: &Graph) -> Result<(), VerifyError> {
    let path = if graph.name.is_empty() {
        "<main>".to_string()
    } else {
        graph.name.clone()
    };
    check_graph(graph, &path, None)
}

/// The enclosing scope of a subgraph: the owning node and the names it captures.
struct Scope<'a> {
    node: String,
    captures: &'a HashSet<&'a str>,
}

/// `` `name` (Op) ``, `` `name` (domain::Op) ``, or `n7 (Op)` for unnamed nodes.
pub(crate) fn node_desc(g: &Graph, id: NodeId) -> String {
    let Some(n) = g.try_node(id) else {
        return format!("{id} (removed)");
    };
    let op = if n.domain.is_empty() {
        n.op_type.clone()
    } else {
        format!("{}::{}", n.domain, n.op_type)
    };
    if n.name.is_empty() {
        format!("{id} ({op})")
    } else {
        format!("`{}` ({op})", n.name)
    }
}

fn def_desc(g: &Graph, v: ValueId) -> String {
    match g.value(v).def() {
        ValueDef::Input => "graph input".into(),
        ValueDef::Initializer => "initializer".into(),
        ValueDef::Node { node, slot } => format!("result {slot} of node {}", node_desc(g, node)),
        ValueDef::Outer => "outer-scope capture".into(),
        ValueDef::Undefined => "undefined".into(),
        ValueDef::Removed => "removed".into(),
    }
}

fn operand_desc(op: Operand) -> String {
    match op {
        Operand::Input(i) => format!("input {i}"),
        Operand::Capture(i) => format!("capture {i}"),
    }
}

fn undefined_state(def: ValueDef) -> Option<&'static str> {
    match def {
        ValueDef::Undefined => Some("a forward reference never defined"),
        ValueDef::Removed => Some("it was removed"),
        _ => None,
    }
}

fn check_graph(g: &Graph, path: &str, scope: Option<&Scope>) -> Result<(), VerifyError> {
    let err = |kind| VerifyError {
        graph: path.to_string(),
        kind: Box::new(kind),
    };

    // Names: non-empty, unique, indexed.
    let mut by_name: HashMap<&str, ValueId> = HashMap::new();
    for (id, v) in g.values() {
        if v.name.is_empty() {
            return Err(err(VerifyErrorKind::EmptyName { index: id.index() }));
        }
        if let Some(&first) = by_name.get(v.name.as_str()) {
            return Err(err(VerifyErrorKind::DuplicateName {
                name: v.name.clone(),
                first: def_desc(g, first),
                second: def_desc(g, id),
            }));
        }
        by_name.insert(&v.name, id);
        if g.find(&v.name) != Some(id) {
            return Err(err(VerifyErrorKind::StaleNameIndex {
                name: v.name.clone(),
            }));
        }
    }

    // Inputs and initializers agree with the definitions.
    let mut listed = HashSet::new();
    for &id in &g.inputs {
        let v = g.value(id);
        let problem = if v.def() != ValueDef::Input {
            Some(format!("defined as {}", def_desc(g, id)))
        } else if !listed.insert(id) {
            Some("listed twice".to_string())
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(err(VerifyErrorKind::BadInput {
                value: v.name.clone(),
                problem,
            }));
        }
    }
    let mut inits = HashSet::new();
    for &id in &g.initializers {
        let v = g.value(id);
        let problem = match v.def() {
            ValueDef::Initializer | ValueDef::Input if v.tensor.is_none() => {
                Some("missing its tensor".to_string())
            }
            ValueDef::Initializer | ValueDef::Input => None,
            _ => Some(format!("defined as {}", def_desc(g, id))),
        };
        let problem = problem.or_else(|| (!inits.insert(id)).then(|| "listed twice".to_string()));
        if let Some(problem) = problem {
            return Err(err(VerifyErrorKind::BadInitializer {
                value: v.name.clone(),
                problem,
            }));
        }
    }
    for (id, v) in g.values() {
        match v.def() {
            ValueDef::Input if !listed.contains(&id) => {
                return Err(err(VerifyErrorKind::BadInput {
                    value: v.name.clone(),
                    problem: "defined as a graph input but missing from the input list".into(),
                }));
            }
            ValueDef::Initializer if !inits.contains(&id) => {
                return Err(err(VerifyErrorKind::BadInitializer {
                    value: v.name.clone(),
                    problem: "defined as an initializer but missing from the initializer list"
                        .into(),
                }));
            }
            _ => {}
        }
        if let Some(t) = &v.tensor {
            if !matches!(v.def(), ValueDef::Initializer | ValueDef::Input) {
                return Err(err(VerifyErrorKind::StrayTensor {
                    value: v.name.clone(),
                    def: def_desc(g, id),
                }));
            }
            if let Err(error) = t.validate() {
                return Err(err(VerifyErrorKind::BadTensor {
                    value: v.name.clone(),
                    error,
                }));
            }
        }
    }

    // Outer values: only in subgraphs, captured by the owning node, and read.
    for (id, v) in g.values() {
        if v.def() != ValueDef::Outer {
            continue;
        }
        let Some(scope) = scope else {
            return Err(err(VerifyErrorKind::OuterInMainGraph {
                value: v.name.clone(),
            }));
        };
        if !scope.captures.contains(v.name.as_str()) {
            return Err(err(VerifyErrorKind::OuterNotCaptured {
                value: v.name.clone(),
                node: scope.node.clone(),
            }));
        }
        if v.uses().is_empty() && !g.outputs.contains(&id) {
            return Err(err(VerifyErrorKind::OuterUnused {
                value: v.name.clone(),
            }));
        }
    }

    // Node order: a permutation of the live nodes.
    let mut position = vec![usize::MAX; g.node_capacity()];
    for (i, &id) in g.node_order().iter().enumerate() {
        if g.try_node(id).is_none() {
            return Err(err(VerifyErrorKind::BadOrder {
                problem: format!("lists {id}, which was removed"),
            }));
        }
        if position[id.index()] != usize::MAX {
            return Err(err(VerifyErrorKind::BadOrder {
                problem: format!("lists node {} twice", node_desc(g, id)),
            }));
        }
        position[id.index()] = i;
    }
    for (i, &p) in position.iter().enumerate() {
        let id = NodeId::from_index(i);
        if p == usize::MAX && g.try_node(id).is_some() {
            return Err(err(VerifyErrorKind::BadOrder {
                problem: format!("omits node {}", node_desc(g, id)),
            }));
        }
    }

    // Per node: results, operands, subgraphs.
    for (pos, &id) in g.node_order().iter().enumerate() {
        let n = g.node(id);
        for (slot, out) in n.outputs().iter().enumerate() {
            let Some(v) = *out else { continue };
            let want = ValueDef::Node {
                node: id,
                slot: slot as u32,
            };
            if g.value(v).def() != want {
                return Err(err(VerifyErrorKind::BadResultDef {
                    node: node_desc(g, id),
                    slot,
                    value: g.value(v).name.clone(),
                    def: def_desc(g, v),
                }));
            }
        }
        let operands = n
            .inputs()
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (Operand::Input(i as u32), v)))
            .chain(
                n.captures()
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| (Operand::Capture(i as u32), v)),
            );
        for (operand, v) in operands {
            let val = g.value(v);
            if let Some(state) = undefined_state(val.def()) {
                return Err(err(VerifyErrorKind::UndefinedOperand {
                    node: node_desc(g, id),
                    operand: operand_desc(operand),
                    value: val.name.clone(),
                    state,
                }));
            }
            if let ValueDef::Node { node: p, .. } = val.def() {
                // A producer that is not live is reported below (StaleDef) unless it is
                // also ordered after this node; either way this read is wrong.
                let ppos = position.get(p.index()).copied().unwrap_or(usize::MAX);
                if ppos >= pos {
                    return Err(err(VerifyErrorKind::UseBeforeDef {
                        node: node_desc(g, id),
                        operand: operand_desc(operand),
                        value: val.name.clone(),
                        producer: node_desc(g, p),
                    }));
                }
            }
            let count = val
                .uses()
                .iter()
                .filter(|u| u.node == id && u.operand == operand)
                .count();
            if count != 1 {
                return Err(err(VerifyErrorKind::MissingUse {
                    node: node_desc(g, id),
                    operand: operand_desc(operand),
                    value: val.name.clone(),
                    count,
                }));
            }
        }

        // Captures and subgraphs.
        let mut capture_names: HashSet<&str> = HashSet::new();
        for &c in n.captures() {
            if !capture_names.insert(g.value(c).name.as_str()) {
                return Err(err(VerifyErrorKind::DuplicateCapture {
                    node: node_desc(g, id),
                    value: g.value(c).name.clone(),
                }));
            }
        }
        let scope = Scope {
            node: node_desc(g, id),
            captures: &capture_names,
        };
        let label = if n.name.is_empty() {
            id.to_string()
        } else {
            n.name.clone()
        };
        let mut read_outer: HashSet<&str> = HashSet::new();
        for a in &n.attrs {
            let subs: Vec<(String, &Graph)> = match &a.value {
                AttrValue::Graph(sg) => vec![(format!("{path}/{label}.{}", a.name), sg.as_ref())],
                AttrValue::Graphs(gs) => gs
                    .iter()
                    .enumerate()
                    .map(|(i, sg)| (format!("{path}/{label}.{}[{i}]", a.name), sg))
                    .collect(),
                _ => continue,
            };
            for (sub_path, sg) in subs {
                check_graph(sg, &sub_path, Some(&scope))?;
                for (_, v) in sg.values() {
                    if v.def() == ValueDef::Outer {
                        read_outer.insert(v.name.as_str());
                    }
                }
            }
        }
        for &c in n.captures() {
            let name = g.value(c).name.as_str();
            if !read_outer.contains(name) {
                return Err(err(VerifyErrorKind::CaptureUnused {
                    node: node_desc(g, id),
                    value: name.to_string(),
                }));
            }
        }
    }

    // Every recorded use and every node definition points at a live operand / result.
    for (v, val) in g.values() {
        for (k, u) in val.uses().iter().enumerate() {
            let stale = |problem: &str| {
                err(VerifyErrorKind::StaleUse {
                    value: val.name.clone(),
                    node: node_desc(g, u.node),
                    operand: operand_desc(u.operand),
                    problem: problem.to_string(),
                })
            };
            let Some(n) = g.try_node(u.node) else {
                return Err(stale("but that node was removed"));
            };
            let reads = match u.operand {
                Operand::Input(i) => n.input(i as usize),
                Operand::Capture(i) => n.captures().get(i as usize).copied(),
            };
            if reads != Some(v) {
                return Err(stale("but that operand reads something else"));
            }
            if val.uses()[..k].contains(u) {
                return Err(stale("twice"));
            }
        }
        if let ValueDef::Node { node, slot } = val.def() {
            let stale = |problem: &str| {
                err(VerifyErrorKind::StaleDef {
                    value: val.name.clone(),
                    node: node_desc(g, node),
                    slot,
                    problem: problem.to_string(),
                })
            };
            let Some(n) = g.try_node(node) else {
                return Err(stale("but that node was removed"));
            };
            if n.output(slot as usize) != Some(v) {
                return Err(stale("but that node's result there is something else"));
            }
        }
    }

    for (index, &o) in g.outputs.iter().enumerate() {
        let val = g.value(o);
        if let Some(state) = undefined_state(val.def()) {
            return Err(err(VerifyErrorKind::UndefinedOutput {
                index,
                value: val.name.clone(),
                state,
            }));
        }
    }
    for &vi in &g.value_info {
        if g.value(vi).def() == ValueDef::Removed {
            return Err(err(VerifyErrorKind::StaleValueInfo {
                value: g.value(vi).name.clone(),
            }));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{NodeSpec, Use};
    use crate::{DType, Tensor, Type};
    use bytes::Bytes;

    fn f32s(n: i64) -> Option<Type> {
        Some(Type::tensor(DType::F32, Some(vec![crate::Dim::Known(n)])))
    }

    /// x -> Relu -> a -> Neg -> b (output); w initializer feeds Add(a, w) -> c (output).
    fn small() -> Graph {
        let mut g = Graph::new("main");
        let x = g.add_input("x", f32s(2)).unwrap();
        let w = g
            .add_initializer("w", Tensor::from_f32(vec![2], &[1.0, 2.0]))
            .unwrap();
        let r = g
            .add_node(NodeSpec::new("Relu").named("relu"), &[Some(x)], &["a"])
            .unwrap();
        let a = g.node(r).output(0).unwrap();
        let n = g
            .add_node(NodeSpec::new("Neg").named("neg"), &[Some(a)], &["b"])
            .unwrap();
        let add = g
            .add_node(
                NodeSpec::new("Add").named("add"),
                &[Some(a), Some(w)],
                &["c"],
            )
            .unwrap();
        g.outputs = vec![g.node(n).output(0).unwrap(), g.node(add).output(0).unwrap()];
        g
    }

    fn kind(g: &Graph) -> VerifyErrorKind {
        *verify_graph(g).expect_err("graph should be rejected").kind
    }

    #[test]
    fn well_formed_graph_passes() {
        verify_graph(&small()).unwrap();
    }

    #[test]
    fn duplicate_names() {
        let mut g = small();
        let b = g.find("b").unwrap();
        g.value_mut(b).name = "a".into();
        let e = verify_graph(&g).unwrap_err();
        assert!(matches!(*e.kind, VerifyErrorKind::DuplicateName { ref name, .. } if name == "a"));
        assert_eq!(
            e.to_string(),
            "graph `main`: value name `a` is used twice: by the result 0 of node `relu` (Relu) \
             and by the result 0 of node `neg` (Neg)"
        );
    }

    #[test]
    fn renamed_value_is_a_stale_index() {
        let mut g = small();
        let b = g.find("b").unwrap();
        g.value_mut(b).name = "b2".into();
        assert_eq!(
            kind(&g),
            VerifyErrorKind::StaleNameIndex { name: "b2".into() }
        );
    }

    #[test]
    fn forward_reference_left_undefined() {
        let mut g = small();
        let ghost = g.value_named("ghost");
        let neg = g.node_order()[1];
        g.set_input(neg, 0, Some(ghost));
        let e = verify_graph(&g).unwrap_err();
        assert_eq!(
            e.to_string(),
            "graph `main`: node `neg` (Neg) input 0 reads `ghost`, which nothing defines \
             (a forward reference never defined)"
        );
    }

    #[test]
    fn misordered_nodes() {
        let mut g = small();
        let mut order = g.node_order().to_vec();
        order.swap(0, 1);
        g.set_order(order);
        let e = verify_graph(&g).unwrap_err();
        assert_eq!(
            e.to_string(),
            "graph `main`: node `neg` (Neg) input 0 reads `a` before its producer `relu` (Relu) runs"
        );
        g.sort_topologically().unwrap();
        verify_graph(&g).unwrap();
    }

    #[test]
    fn order_with_a_repeat() {
        let mut g = small();
        let order = g.node_order()[..2].to_vec();
        // set_order debug-asserts the length; build the broken order without it.
        let mut full = order.clone();
        full.push(order[0]);
        g.set_order(full);
        assert!(
            matches!(kind(&g), VerifyErrorKind::BadOrder { problem } if problem.contains("twice"))
        );
    }

    #[test]
    fn use_list_missing_an_operand() {
        let mut g = small();
        let a = g.find("a").unwrap();
        g.test_uses_mut(a).remove(0);
        let e = verify_graph(&g).unwrap_err();
        assert_eq!(
            e.to_string(),
            "graph `main`: node `neg` (Neg) input 0 reads `a`, but `a`'s uses record that 0 times"
        );
    }

    #[test]
    fn use_list_with_a_stale_entry() {
        let mut g = small();
        let x = g.find("x").unwrap();
        let neg = g.node_order()[1];
        g.test_uses_mut(x).push(Use {
            node: neg,
            operand: Operand::Input(0),
        });
        let e = verify_graph(&g).unwrap_err();
        assert!(matches!(*e.kind, VerifyErrorKind::StaleUse { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "graph `main`: value `x` lists a use by `neg` (Neg) input 0, but that operand reads \
             something else"
        );
    }

    #[test]
    fn result_def_not_pointing_back() {
        let mut g = small();
        let b = g.find("b").unwrap();
        let relu = g.node_order()[0];
        g.test_set_def(
            b,
            ValueDef::Node {
                node: relu,
                slot: 0,
            },
        );
        let e = verify_graph(&g).unwrap_err();
        assert_eq!(
            e.to_string(),
            "graph `main`: node `neg` (Neg) result 0 is `b`, whose definition is result 0 of \
             node `relu` (Relu)"
        );
    }

    #[test]
    fn undefined_graph_output() {
        let mut g = small();
        let ghost = g.value_named("ghost");
        g.outputs.push(ghost);
        assert!(matches!(
            kind(&g),
            VerifyErrorKind::UndefinedOutput { index: 2, .. }
        ));
    }

    #[test]
    fn bad_initializer_tensor() {
        let mut g = small();
        let w = g.find("w").unwrap();
        g.value_mut(w).tensor = Some(Tensor::from_raw(
            DType::F32,
            vec![2],
            Bytes::from_static(&[0; 7]),
        ));
        let e = verify_graph(&g).unwrap_err();
        assert_eq!(
            e.to_string(),
            "graph `main`: constant `w` has an invalid tensor: payload has 7 bytes, f32[2] needs 8"
        );
        g.value_mut(w).tensor = None;
        assert!(matches!(kind(&g), VerifyErrorKind::BadInitializer { .. }));
    }

    #[test]
    fn stray_tensor_on_a_node_result() {
        let mut g = small();
        let a = g.find("a").unwrap();
        g.value_mut(a).tensor = Some(Tensor::from_f32(vec![1], &[0.0]));
        assert!(matches!(kind(&g), VerifyErrorKind::StrayTensor { .. }));
    }

    /// main: x, y inputs; If(cond) whose then-branch reads x from the outer scope.
    fn with_subgraph(capture: bool, outer_in_sub: &[&str]) -> Graph {
        let mut then_g = Graph::new("then");
        for name in outer_in_sub {
            then_g.add_outer(name).unwrap();
        }
        let xo = then_g.value_named("x");
        then_g
            .add_node(NodeSpec::new("Identity").named("id"), &[Some(xo)], &["t"])
            .unwrap();
        then_g.outputs = vec![then_g.find("t").unwrap()];
        let mut g = Graph::new("main");
        let x = g.add_input("x", f32s(2)).unwrap();
        g.add_input("y", f32s(2)).unwrap();
        let c = g
            .add_input("cond", Some(Type::tensor(DType::Bool, Some(vec![]))))
            .unwrap();
        let node = g
            .add_node(
                NodeSpec::new("If")
                    .named("if")
                    .attr("then_branch", AttrValue::Graph(Box::new(then_g))),
                &[Some(c)],
                &["out"],
            )
            .unwrap();
        if capture {
            g.set_captures(node, vec![x]);
        }
        g.outputs = vec![g.find("out").unwrap()];
        g
    }

    #[test]
    fn subgraph_captures_checked() {
        verify_graph(&with_subgraph(true, &["x"])).unwrap();

        let e = verify_graph(&with_subgraph(false, &["x"])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "graph `main/if.then_branch`: outer-scope value `x` is not among the captures of \
             the owning node `if` (If)"
        );

        // The subgraph reads `x` but never declares it Outer.
        let e = verify_graph(&with_subgraph(true, &[])).unwrap_err();
        assert!(
            matches!(*e.kind, VerifyErrorKind::UndefinedOperand { .. }),
            "{e}"
        );
        assert_eq!(e.graph, "main/if.then_branch");

        // Declared Outer but never read.
        let mut g = with_subgraph(true, &["x", "y"]);
        let if_node = g.node_order()[0];
        let y = g.find("y").unwrap();
        let x = g.find("x").unwrap();
        g.set_captures(if_node, vec![x, y]);
        assert_eq!(
            *verify_graph(&g).unwrap_err().kind,
            VerifyErrorKind::OuterUnused { value: "y".into() }
        );
    }

    #[test]
    fn capture_nobody_reads() {
        let mut g = with_subgraph(true, &["x"]);
        let if_node = g.node_order()[0];
        let x = g.find("x").unwrap();
        let y = g.find("y").unwrap();
        g.set_captures(if_node, vec![x, y]);
        assert_eq!(
            verify_graph(&g).unwrap_err().to_string(),
            "graph `main`: node `if` (If) captures `y`, but none of its subgraphs reads it"
        );
    }

    #[test]
    fn outer_in_main_graph() {
        let mut g = small();
        g.add_outer("z").unwrap();
        assert_eq!(
            kind(&g),
            VerifyErrorKind::OuterInMainGraph { value: "z".into() }
        );
    }

    #[test]
    fn removed_value_in_use() {
        let mut g = small();
        // Remove `neg`, then make `add` read the removed result through a stale id.
        let neg = g.node_order()[1];
        let b = g.find("b").unwrap();
        g.outputs.retain(|&o| o != b);
        g.remove_node(neg).unwrap();
        let add = g.node_order()[1];
        g.set_input(add, 1, Some(b));
        let e = verify_graph(&g).unwrap_err();
        assert!(e.to_string().contains("(it was removed)"), "{e}");
    }
}
