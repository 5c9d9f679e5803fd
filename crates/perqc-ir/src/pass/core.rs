//! Properties, outcomes, errors and the Pass trait.

use super::*;
use crate::{GraphError, Model};
use std::fmt;

/// A fact about the IR that some passes establish and others rely on, such as
/// "every value has an inferred type". Properties are open: any crate may define its own
/// constant `Property("my-fact")`. Names are kebab-case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Property(pub &'static str);

impl Property {
    /// Every graph's node order is topological. (The verifier demands this of valid IR too;
    /// the property records that a pass re-sorted after building nodes out of order.)
    pub const TOPOLOGICAL: Property = Property("topological");
    /// Every value has an inferred type (element type and, where determinable, shape).
    pub const SHAPES_INFERRED: Property = Property("shapes-inferred");
}

impl fmt::Display for Property {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// What a pass did: whether the IR changed (so cached analyses can be invalidated) and
/// named counters (`nodes-removed = 3`), kept in the order first recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassOutcome {
    pub changed: bool,
    pub counters: Vec<(String, u64)>,
}

impl PassOutcome {
    pub fn unchanged() -> PassOutcome {
        PassOutcome::default()
    }

    pub fn changed() -> PassOutcome {
        PassOutcome {
            changed: true,
            counters: Vec::new(),
        }
    }

    pub fn from_changed(changed: bool) -> PassOutcome {
        PassOutcome {
            changed,
            counters: Vec::new(),
        }
    }

    /// Adds `n` to counter `name` (creating it).
    pub fn count(&mut self, name: &str, n: u64) {
        match self.counters.iter_mut().find(|(k, _)| k == name) {
            Some((_, v)) => *v += n,
            None => self.counters.push((name.to_string(), n)),
        }
    }

    /// Builder form of [`PassOutcome::count`].
    pub fn with(mut self, name: &str, n: u64) -> PassOutcome {
        self.count(name, n);
        self
    }

    /// The value of counter `name` (0 if never recorded).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters
            .iter()
            .find(|(k, _)| k == name)
            .map_or(0, |(_, v)| *v)
    }
}

/// Why a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    /// Anything else, stated as what went wrong, where, and what to do.
    #[error("{0}")]
    Failed(String),
}

impl PassError {
    pub fn msg(message: impl Into<String>) -> PassError {
        PassError::Failed(message.into())
    }
}

/// A transformation or analysis over the whole model.
///
/// Convention (see docs/writing-a-pass.md): one type per pass, one file per pass, a doc
/// comment stating what it assumes, what it guarantees and the identity it preserves.
pub trait Pass {
    /// The registry name, kebab-case (`dce`, `topo-sort`).
    fn name(&self) -> &'static str;

    /// One line for `--list-passes`.
    fn description(&self) -> &'static str;

    /// Properties that must hold before the pass runs.
    fn requires(&self) -> &[Property] {
        &[]
    }

    /// Properties that hold after the pass ran.
    fn guarantees(&self) -> &[Property] {
        &[]
    }

    /// Properties an earlier pass established that this pass may destroy. Everything not
    /// listed is assumed preserved.
    fn invalidates(&self) -> &[Property] {
        &[]
    }

    /// Checks the pass's options against `model` as the pipeline receives it, before any
    /// pass runs and before the caller's own work (calibration): what cannot work on this
    /// model is an error here rather than minutes later. Read-only, so it may reject only
    /// what no earlier pass changes (a region's width, not its weights). Default: nothing
    /// to check.
    fn check(&self, model: &Model, ctx: &mut PassContext) -> Result<(), PassError> {
        let _ = (model, ctx);
        Ok(())
    }

    /// Runs the pass. On error the model is left as the pass left it; the manager stops.
    fn run(&mut self, model: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError>;
}
