//! What a pass runs with besides the model: the rewrite budget, notes for the report,
//! cached analyses, and resources its caller provided (calibration statistics).
//!
//! Invariant: a cached analysis describes the model as it is. The manager drops every
//! cached analysis after a pass that reports a change; a pass that edits the model and
//! then asks for an analysis again calls [`PassContext::invalidate_analyses`] first.

use super::PassError;
use crate::Model;
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;

/// A fact computed from the whole model (inferred shapes, later equivariant regions),
/// cached by type in the [`PassContext`] until a pass changes the IR.
pub trait Analysis: Any + Send + Sync + Sized {
    fn compute(model: &Model) -> Result<Self, PassError>;
}

type AnyMap = HashMap<TypeId, Arc<dyn Any + Send + Sync>>;

/// What the manager hands each pass besides the model.
#[derive(Default)]
pub struct PassContext {
    budget: Option<usize>,
    used: usize,
    pub(super) refused: bool,
    pub(super) notes: Vec<String>,
    analyses: AnyMap,
    resources: AnyMap,
}

impl std::fmt::Debug for PassContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassContext")
            .field("budget", &self.budget)
            .field("used", &self.used)
            .field("notes", &self.notes)
            .field("analyses", &self.analyses.len())
            .field("resources", &self.resources.len())
            .finish()
    }
}

impl PassContext {
    /// A context allowing at most `budget` rewrites (`None`: unlimited).
    pub fn new(budget: Option<usize>) -> PassContext {
        PassContext {
            budget,
            ..Default::default()
        }
    }

    /// Asks permission for one rewrite. Returns `false` once the budget is spent; the pass
    /// must then skip that rewrite (and may stop looking for more). Every pass that changes
    /// the IR in separable steps asks once per step, so `--rewrite-budget N` bisects a
    /// miscompile down to a single rewrite.
    pub fn rewrite(&mut self) -> bool {
        if self.budget.is_some_and(|b| self.used >= b) {
            self.refused = true;
            return false;
        }
        self.used += 1;
        true
    }

    /// Whether the budget is spent (further [`PassContext::rewrite`] calls return `false`).
    pub fn budget_exhausted(&self) -> bool {
        self.budget.is_some_and(|b| self.used >= b)
    }

    /// Rewrites granted so far in this run.
    pub fn rewrites(&self) -> usize {
        self.used
    }

    /// Records a note for the report (a warning or a remark worth a user's attention).
    pub fn note(&mut self, message: impl Into<String>) {
        self.notes.push(message.into());
    }

    /// Analysis `A` of `model`: the cached one, or computed now and cached.
    pub fn analysis<A: Analysis>(&mut self, model: &Model) -> Result<Arc<A>, PassError> {
        if let Some(a) = self.analyses.get(&TypeId::of::<A>()) {
            return Ok(Arc::clone(a).downcast::<A>().expect("keyed by its type"));
        }
        let a = Arc::new(A::compute(model)?);
        self.analyses.insert(TypeId::of::<A>(), a.clone());
        Ok(a)
    }

    /// Whether analysis `A` is cached (for tests of invalidation).
    pub fn has_analysis<A: Analysis>(&self) -> bool {
        self.analyses.contains_key(&TypeId::of::<A>())
    }

    /// Drops every cached analysis (the model changed).
    pub fn invalidate_analyses(&mut self) {
        self.analyses.clear();
    }

    /// Hands passes a value of type `T` (one per type; a second call replaces it), such as
    /// calibration statistics from whoever ran calibration. Never invalidated.
    pub fn provide<T: Any + Send + Sync>(&mut self, value: T) {
        self.resources.insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// The value of type `T` the caller provided, if any.
    pub fn resource<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.resources.get(&TypeId::of::<T>())?.downcast_ref()
    }

    /// Takes the value of type `T` out of the context, to change it and
    /// [`provide`](PassContext::provide) it again without a copy (a copy when something
    /// else still shares it).
    pub fn take_resource<T: Any + Send + Sync + Clone>(&mut self) -> Option<T> {
        let arc = self.resources.remove(&TypeId::of::<T>())?;
        let arc = arc.downcast::<T>().ok()?;
        Some(Arc::try_unwrap(arc).unwrap_or_else(|shared| (*shared).clone()))
    }

    /// Moves the resources out (the manager keeps them between runs).
    pub(super) fn take_resources(&mut self) -> AnyMapBox {
        AnyMapBox(std::mem::take(&mut self.resources))
    }

    pub(super) fn with_resources(mut self, resources: AnyMapBox) -> Self {
        self.resources = resources.0;
        self
    }
}

/// Resources kept by the manager between runs.
#[derive(Default)]
pub(super) struct AnyMapBox(AnyMap);

impl AnyMapBox {
    pub(super) fn insert<T: Any + Send + Sync>(&mut self, value: T) {
        self.0.insert(TypeId::of::<T>(), Arc::new(value));
    }
}
