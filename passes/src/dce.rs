//! `dce`: dead-code elimination.
//!
//! Assumes: valid IR (verifier-clean); node order need not be topological.
//!
//! Guarantees: no pure node (default ONNX domain, `ai.onnx.ml`, `ai.perqc`) has all its results
//! unread and none of them a graph output; with `initializers=true` (the default) no
//! initializer is unread; in subgraphs, no outer-scope value is unread and the owning
//! node's captures list exactly what its subgraphs still read. Nodes of other domains are
//! kept even when dead (custom ops may have effects we cannot see). Graph inputs, outputs
//! and input defaults are never touched. Recurses into subgraphs.
//!
//! Identity: ONNX ops are pure, so an op whose results nobody reads contributes nothing:
//! `outputs(G) == outputs(G \ {n})` for such a node `n`; removing it may make its producers
//! dead in turn, so the sweep repeats until nothing changes.
//!
//! Each removal asks the rewrite budget once. Counters: `nodes-removed`,
//! `initializers-removed`, `captures-removed` (outer-scope values dropped from subgraphs).

use perqc_ir::{
    Graph, GraphError, Model, OptionError, Pass, PassContext, PassError, PassOptions, PassOutcome,
    ValueDef, ValueId,
};
use std::collections::HashSet;

#[derive(Debug)]
pub struct Dce {
    /// Also remove unread initializers.
    pub initializers: bool,
}

impl Default for Dce {
    fn default() -> Dce {
        Dce { initializers: true }
    }
}

impl Dce {
    pub const NAME: &'static str = "dce";
    pub const DESCRIPTION: &'static str =
        "remove nodes and initializers whose results nothing reads";

    pub fn from_options(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        opts.allow_only(&["initializers"])?;
        Ok(Box::new(Dce {
            initializers: opts.bool_or("initializers", true)?,
        }))
    }
}

#[derive(Default)]
struct Stats {
    nodes: u64,
    initializers: u64,
    captures: u64,
}

fn unread(g: &Graph, v: ValueId) -> bool {
    g.value(v).uses().is_empty() && !g.outputs.contains(&v)
}

struct Sweeper<'a> {
    ctx: &'a mut PassContext,
    stats: Stats,
    initializers: bool,
    /// The budget refused a rewrite: stop looking for more.
    stopped: bool,
}

impl Sweeper<'_> {
    fn allow(&mut self) -> bool {
        if !self.stopped && !self.ctx.rewrite() {
            self.stopped = true;
        }
        !self.stopped
    }

    /// Removes dead pure nodes of `g` (not recursing) until none is left.
    fn sweep_nodes(&mut self, g: &mut Graph) -> Result<(), GraphError> {
        loop {
            let mut removed = false;
            for id in g.node_order().to_vec().into_iter().rev() {
                let n = g.node(id);
                let dead = n.is_pure() && n.outputs().iter().flatten().all(|&v| unread(g, v));
                if dead && self.allow() {
                    g.remove_node(id)?;
                    self.stats.nodes += 1;
                    removed = true;
                }
            }
            if !removed || self.stopped {
                return Ok(());
            }
        }
    }

    fn graph(&mut self, g: &mut Graph) -> Result<(), GraphError> {
        self.sweep_nodes(g)?;

        // Subgraphs of the surviving nodes, then shrink their captures to what is read.
        let mut shrank = false;
        for id in g.node_order().to_vec() {
            if g.node(id).subgraphs().next().is_none() {
                continue;
            }
            for sg in g.subgraphs_mut(id) {
                self.graph(sg)?;
            }
            let n = g.node(id);
            let read: HashSet<&str> = n
                .subgraphs()
                .flat_map(|sg| sg.values())
                .filter(|(_, v)| v.def() == ValueDef::Outer)
                .map(|(_, v)| v.name.as_str())
                .collect();
            let kept: Vec<ValueId> = n
                .captures()
                .iter()
                .copied()
                .filter(|&c| read.contains(g.value(c).name.as_str()))
                .collect();
            if kept.len() != n.captures().len() {
                g.set_captures(id, kept);
                shrank = true;
            }
        }
        if shrank {
            self.sweep_nodes(g)?;
        }

        // Unread initializers and outer-scope values.
        let candidates: Vec<ValueId> = g
            .values()
            .filter(|(_, v)| match v.def() {
                ValueDef::Initializer => self.initializers,
                ValueDef::Outer => true,
                _ => false,
            })
            .map(|(id, _)| id)
            .collect();
        for v in candidates {
            if unread(g, v) && self.allow() {
                let outer = g.value(v).def() == ValueDef::Outer;
                g.remove_initializer(v)?;
                if outer {
                    self.stats.captures += 1;
                } else {
                    self.stats.initializers += 1;
                }
            }
        }
        Ok(())
    }
}

impl Pass for Dce {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn description(&self) -> &'static str {
        Self::DESCRIPTION
    }

    fn run(&mut self, model: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        let mut s = Sweeper {
            ctx,
            stats: Stats::default(),
            initializers: self.initializers,
            stopped: false,
        };
        s.graph(&mut model.graph)?;
        let Stats {
            nodes,
            initializers,
            captures,
        } = s.stats;
        Ok(
            PassOutcome::from_changed(nodes + initializers + captures > 0)
                .with("nodes-removed", nodes)
                .with("initializers-removed", initializers)
                .with("captures-removed", captures),
        )
    }
}
