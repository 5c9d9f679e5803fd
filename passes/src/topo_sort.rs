//! `topo-sort`: stable topological sort of every graph.
//!
//! Assumes: each graph is acyclic (fails naming a node on a cycle otherwise); uses and
//! definitions are consistent. Operands may appear in any order, e.g. after an import or a
//! rewrite that appended nodes before their producers.
//!
//! Guarantees: [`Property::TOPOLOGICAL`]: in every graph and subgraph each node follows
//! the producers of its inputs and captures. Stable: among ready nodes the earliest in the
//! current order goes first, so an already sorted graph is left exactly as it was.
//!
//! Identity: evaluation order of a pure dataflow graph does not change its outputs.

use perqc_ir::{
    Graph, GraphError, Model, OptionError, Pass, PassContext, PassError, PassOptions, PassOutcome,
    Property,
};

#[derive(Debug, Default)]
pub struct TopoSort;

impl TopoSort {
    pub const NAME: &'static str = "topo-sort";
    pub const DESCRIPTION: &'static str = "order every graph's nodes topologically (stable)";

    pub fn from_options(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        opts.allow_only(&[])?;
        Ok(Box::new(TopoSort))
    }
}

/// Sorts `g` and its subgraphs; returns how many graphs were reordered.
fn sort_graph(g: &mut Graph, ctx: &mut PassContext) -> Result<u64, GraphError> {
    let mut reordered = 0;
    g.for_each_subgraph_mut(|sg| {
        reordered += sort_graph(sg, ctx)?;
        Ok::<(), GraphError>(())
    })?;
    let order = g.topological_order()?;
    if order != g.node_order() && ctx.rewrite() {
        g.set_order(order);
        reordered += 1;
    }
    Ok(reordered)
}

impl Pass for TopoSort {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn description(&self) -> &'static str {
        Self::DESCRIPTION
    }

    fn guarantees(&self) -> &[Property] {
        &[Property::TOPOLOGICAL]
    }

    fn run(&mut self, model: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        let n = sort_graph(&mut model.graph, ctx)?;
        Ok(PassOutcome::from_changed(n > 0).with("graphs-reordered", n))
    }
}
