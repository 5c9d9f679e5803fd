//! Topological order of a graph's nodes.

use crate::graph::{Graph, GraphError, NodeId, ValueDef};
use petgraph::graph::DiGraph;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

impl Graph {
    /// Node ids in an order where every node follows the producers of its inputs and
    /// captures, as close to the current order as possible: among ready nodes the one
    /// earliest in the current order goes first, so an already sorted graph is unchanged.
    pub fn topological_order(&self) -> Result<Vec<NodeId>, GraphError> {
        let order = self.node_order();
        let mut position = vec![usize::MAX; self.node_capacity()];
        for (i, id) in order.iter().enumerate() {
            position[id.index()] = i;
        }
        let preds = |id: NodeId| {
            let n = self.node(id);
            n.inputs()
                .iter()
                .flatten()
                .chain(n.captures())
                .filter_map(|&v| match self.value(v).def() {
                    ValueDef::Node { node, .. } => Some(node),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        let mut indegree = vec![0usize; self.node_capacity()];
        let mut succs: Vec<Vec<NodeId>> = vec![Vec::new(); self.node_capacity()];
        for &id in order {
            for p in preds(id) {
                indegree[id.index()] += 1;
                succs[p.index()].push(id);
            }
        }
        let mut ready: BinaryHeap<Reverse<usize>> = order
            .iter()
            .filter(|id| indegree[id.index()] == 0)
            .map(|id| Reverse(position[id.index()]))
            .collect();
        let mut sorted = Vec::with_capacity(order.len());
        while let Some(Reverse(pos)) = ready.pop() {
            let id = order[pos];
            sorted.push(id);
            for &s in &succs[id.index()] {
                indegree[s.index()] -= 1;
                if indegree[s.index()] == 0 {
                    ready.push(Reverse(position[s.index()]));
                }
            }
        }
        if sorted.len() == order.len() {
            return Ok(sorted);
        }
        // Some nodes never became ready: report one that lies on a cycle.
        let mut dg = DiGraph::<NodeId, ()>::new();
        let idx: Vec<_> = order.iter().map(|&id| dg.add_node(id)).collect();
        for &id in order {
            for p in preds(id) {
                dg.add_edge(idx[position[p.index()]], idx[position[id.index()]], ());
            }
        }
        let culprit = petgraph::algo::kosaraju_scc(&dg)
            .into_iter()
            .filter(|scc| scc.len() > 1 || dg.contains_edge(scc[0], scc[0]))
            .flat_map(|scc| scc.into_iter().map(|i| dg[i]))
            .min_by_key(|id| position[id.index()])
            .expect("Kahn's algorithm stalls only on a cycle");
        let n = self.node(culprit);
        Err(GraphError::Cycle {
            node: n.name.clone(),
            op: n.op_type.clone(),
        })
    }

    /// Reorders the nodes topologically (stable, see [`Graph::topological_order`]).
    pub fn sort_topologically(&mut self) -> Result<(), GraphError> {
        let order = self.topological_order()?;
        self.set_order(order);
        Ok(())
    }
}
