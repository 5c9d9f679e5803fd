//! A piece of a model: the nodes that compute some values from others given from outside.
//!
//! `cut(model, given, outputs)` is the model whose graph inputs are the `given` values its
//! nodes read (same names and types), whose outputs are `outputs`, and whose nodes are
//! exactly the ancestors of `outputs` not behind a given value, in the original order,
//! with the initializers they read. Running it on the given values computes `outputs` as
//! the whole model would: what runs a model in stages (calibration layer by layer) uses it.

use crate::{Graph, GraphError, Model, NodeId, NodeSpec, ValueDef, ValueId};
use std::collections::HashMap;

/// The piece of `model` computing `outputs` from the values for which `given` holds (see
/// the module doc), and the nodes it took (ids of `model`'s graph, in order). Errors name
/// a value the piece would need that is neither given, computed nor constant (a graph
/// input not given, an outer-scope value).
pub fn cut(
    model: &Model,
    given: &dyn Fn(ValueId) -> bool,
    outputs: &[ValueId],
) -> Result<(Model, Vec<NodeId>), GraphError> {
    let g = &model.graph;
    let mut take = vec![false; g.node_capacity()];
    let mut seen = vec![false; g.value_capacity()];
    let mut inputs: Vec<ValueId> = Vec::new();
    let mut constants: Vec<ValueId> = Vec::new();
    let mut stack: Vec<ValueId> = outputs.to_vec();
    while let Some(v) = stack.pop() {
        if std::mem::replace(&mut seen[v.index()], true) {
            continue;
        }
        if given(v) {
            inputs.push(v);
            continue;
        }
        let value = g.value(v);
        match value.def() {
            ValueDef::Node { node, .. } => {
                if !std::mem::replace(&mut take[node.index()], true) {
                    let n = g.node(node);
                    stack.extend(n.inputs().iter().flatten().chain(n.captures()));
                }
            }
            ValueDef::Initializer => constants.push(v),
            ValueDef::Input if value.tensor.is_some() => constants.push(v),
            _ => {
                return Err(GraphError::NotComputed {
                    name: value.name.clone(),
                });
            }
        }
    }
    let nodes: Vec<NodeId> = g
        .node_order()
        .iter()
        .copied()
        .filter(|n| take[n.index()])
        .collect();

    let mut piece = Graph::new(&g.name);
    let mut map: HashMap<ValueId, ValueId> = HashMap::new();
    // Inputs in the order of the original values, so the piece is deterministic.
    inputs.sort();
    constants.sort();
    for v in inputs {
        let val = g.value(v);
        map.insert(v, piece.add_input(&val.name, val.ty.clone())?);
    }
    for v in constants {
        let val = g.value(v);
        let t = val.tensor.clone().expect("constant");
        map.insert(v, piece.add_initializer(&val.name, t)?);
    }
    for &id in &nodes {
        let n = g.node(id);
        let spec = NodeSpec {
            name: n.name.clone(),
            op_type: n.op_type.clone(),
            domain: n.domain.clone(),
            attrs: n.attrs.clone(),
            extra: n.extra.clone(),
        };
        let ins: Vec<Option<ValueId>> = n.inputs().iter().map(|i| i.map(|v| map[&v])).collect();
        let names: Vec<String> = n
            .outputs()
            .iter()
            .map(|o| o.map_or(String::new(), |v| g.value(v).name.clone()))
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let new = piece.add_node(spec, &ins, &refs)?;
        if !n.captures().is_empty() {
            piece.set_captures(new, n.captures().iter().map(|v| map[v]).collect());
        }
        for (o, p) in n.outputs().iter().zip(piece.node(new).outputs().to_vec()) {
            if let (Some(o), Some(p)) = (o, p) {
                piece.value_mut(p).ty = g.value(*o).ty.clone();
                map.insert(*o, p);
            }
        }
    }
    piece.outputs = outputs.iter().map(|v| map[v]).collect();
    let m = Model {
        ir_version: model.ir_version,
        opset_imports: model.opset_imports.clone(),
        producer_name: model.producer_name.clone(),
        producer_version: None,
        domain: None,
        model_version: None,
        doc_string: None,
        metadata: Vec::new(),
        graph: piece,
        training_info: Vec::new(),
        functions: model.functions.clone(),
        configuration: Vec::new(),
    };
    Ok((m, nodes))
}
