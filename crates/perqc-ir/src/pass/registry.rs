//! The registry of passes by name, and pipelines built from it.

use super::*;
use std::collections::HashMap;
use std::fmt;

/// Builds a pass from its options. Factories call [`PassOptions::allow_only`] first.
pub type PassFactory = fn(&PassOptions) -> Result<Box<dyn Pass>, OptionError>;

/// A registered pass.
#[derive(Clone, Copy)]
pub struct PassInfo {
    pub name: &'static str,
    pub description: &'static str,
    pub factory: PassFactory,
}

impl fmt::Debug for PassInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PassInfo")
            .field("name", &self.name)
            .field("description", &self.description)
            .finish()
    }
}

/// Pass names to factories, in registration order.
#[derive(Clone, Debug, Default)]
pub struct PassRegistry {
    passes: Vec<PassInfo>,
}

/// Levenshtein distance over chars.
pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + (ca != cb) as usize)
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

impl PassRegistry {
    pub fn new() -> PassRegistry {
        PassRegistry::default()
    }

    /// Registers a pass. Panics if `name` is already registered (a programming error in the
    /// static registry list, caught by its tests).
    pub fn register(
        &mut self,
        name: &'static str,
        description: &'static str,
        factory: PassFactory,
    ) -> &mut PassRegistry {
        assert!(
            self.get(name).is_none(),
            "pass `{name}` is registered twice"
        );
        self.passes.push(PassInfo {
            name,
            description,
            factory,
        });
        self
    }

    /// The registered passes, in registration order.
    pub fn list(&self) -> &[PassInfo] {
        &self.passes
    }

    pub fn get(&self, name: &str) -> Option<&PassInfo> {
        self.passes.iter().find(|p| p.name == name)
    }

    /// The registered name closest to `name`, if it is plausibly a typo of it.
    pub fn closest(&self, name: &str) -> Option<&'static str> {
        let limit = (name.chars().count() / 3).max(2);
        self.passes
            .iter()
            .map(|p| (edit_distance(name, p.name), p.name))
            .filter(|&(d, _)| d <= limit)
            .min()
            .map(|(_, n)| n)
    }

    /// A table of names and descriptions, for `--list-passes`.
    pub fn help(&self) -> String {
        let width = self.passes.iter().map(|p| p.name.len()).max().unwrap_or(0);
        let mut s = String::new();
        for p in &self.passes {
            s.push_str(&format!("{:width$}  {}\n", p.name, p.description));
        }
        s
    }

    /// Parses and builds a pipeline, assuming no property holds at its start.
    pub fn build(&self, pipeline: &str) -> Result<Pipeline, PipelineError> {
        self.build_with(pipeline, &[])
    }

    /// Parses and builds a pipeline for a model on which `initial` already hold.
    pub fn build_with(
        &self,
        pipeline: &str,
        initial: &[Property],
    ) -> Result<Pipeline, PipelineError> {
        let specs = parse_pipeline(pipeline)?;
        let mut out = Pipeline::new();
        for spec in specs {
            let Some(info) = self.get(&spec.name) else {
                let suggestion = self.closest(&spec.name).map(str::to_string);
                let hint = match &suggestion {
                    Some(s) => format!("; did you mean `{s}`?"),
                    None => {
                        let names: Vec<&str> = self.passes.iter().map(|p| p.name).collect();
                        format!("; known passes: {}", names.join(", "))
                    }
                };
                return Err(PipelineError::UnknownPass {
                    pipeline: pipeline.to_string(),
                    column: spec.column,
                    name: spec.name,
                    suggestion,
                    hint,
                });
            };
            let opts = PassOptions::new(info.name, spec.options.clone());
            let pass = (info.factory)(&opts).map_err(|source| {
                let option = match &source {
                    OptionError::Unknown { option, .. } | OptionError::Invalid { option, .. } => {
                        option.as_str()
                    }
                };
                PipelineError::Option {
                    pipeline: pipeline.to_string(),
                    column: spec.column_of(option),
                    source: Box::new(source),
                }
            })?;
            debug_assert_eq!(pass.name(), info.name, "pass registered under another name");
            out.steps.push(Step { spec, pass });
        }
        out.check_properties(initial)
            .map_err(|e| self.with_providers(e))
    }

    /// Adds to a "no earlier pass establishes it" error the registered passes that do.
    fn with_providers(&self, e: PipelineError) -> PipelineError {
        let PipelineError::MissingProperty {
            pass,
            index,
            property,
            reason,
        } = e
        else {
            return e;
        };
        if !reason.starts_with("which no earlier pass") {
            return PipelineError::MissingProperty {
                pass,
                index,
                property,
                reason,
            };
        }
        let providers: Vec<String> = self
            .passes
            .iter()
            .filter_map(|p| (p.factory)(&PassOptions::none(p.name)).ok())
            .filter(|p| p.guarantees().contains(&property))
            .map(|p| format!("`{}`", p.name()))
            .collect();
        let reason = if providers.is_empty() {
            format!("{reason}, and no registered pass does")
        } else {
            format!("{reason}; add {} before it", providers.join(" or "))
        };
        PipelineError::MissingProperty {
            pass,
            index,
            property,
            reason,
        }
    }
}

pub(super) struct Step {
    pub(super) spec: PassSpec,
    pub(super) pass: Box<dyn Pass>,
}

/// Passes to run in order, built by [`PassRegistry::build`] or assembled by hand.
#[derive(Default)]
pub struct Pipeline {
    pub(super) steps: Vec<Step>,
}

impl Pipeline {
    pub fn new() -> Pipeline {
        Pipeline::default()
    }

    /// Appends a pass (no options recorded). Hand-built pipelines are not property-checked
    /// unless [`Pipeline::check_properties`] is called.
    pub fn push(&mut self, pass: Box<dyn Pass>) -> &mut Pipeline {
        let spec = PassSpec::new(pass.name());
        self.steps.push(Step { spec, pass });
        self
    }

    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The pass names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.steps.iter().map(|s| s.pass.name()).collect()
    }

    /// The specs the passes were built from, in order.
    pub fn specs(&self) -> impl Iterator<Item = &PassSpec> {
        self.steps.iter().map(|s| &s.spec)
    }

    /// Runs every step's [`Pass::check`] on `model` (the input of the pipeline); the error
    /// names the step.
    pub fn check(&self, model: &crate::Model) -> Result<(), RunError> {
        let mut ctx = PassContext::new(None);
        for (i, step) in self.steps.iter().enumerate() {
            step.pass
                .check(model, &mut ctx)
                .map_err(|source| RunError::Check {
                    pass: step.pass.name().to_string(),
                    index: i + 1,
                    source,
                })?;
        }
        Ok(())
    }

    /// Checks that each pass's required properties hold when it runs, given `initial`.
    pub fn check_properties(self, initial: &[Property]) -> Result<Pipeline, PipelineError> {
        // Property -> who established it (None: held initially).
        let mut held: HashMap<Property, Option<usize>> =
            initial.iter().map(|&p| (p, None)).collect();
        let mut lost: HashMap<Property, (usize, usize)> = HashMap::new();
        for (i, step) in self.steps.iter().enumerate() {
            let p = &step.pass;
            for &req in p.requires() {
                if held.contains_key(&req) {
                    continue;
                }
                let reason = if let Some(&(by, killer)) = lost.get(&req) {
                    format!(
                        "which `{}` (#{}) established but `{}` (#{}) invalidated",
                        self.steps[by].pass.name(),
                        by + 1,
                        self.steps[killer].pass.name(),
                        killer + 1
                    )
                } else if let Some(j) = (i + 1..self.steps.len())
                    .find(|&j| self.steps[j].pass.guarantees().contains(&req))
                {
                    format!(
                        "which only the later pass `{}` (#{}) establishes; move it before `{}`",
                        self.steps[j].pass.name(),
                        j + 1,
                        p.name()
                    )
                } else {
                    "which no earlier pass establishes".to_string()
                };
                return Err(PipelineError::MissingProperty {
                    pass: p.name().to_string(),
                    index: i + 1,
                    property: req,
                    reason,
                });
            }
            for &inv in p.invalidates() {
                // Properties held initially have no establishing pass to name.
                if let Some(Some(by)) = held.remove(&inv) {
                    lost.insert(inv, (by, i));
                }
            }
            for &g in p.guarantees() {
                held.insert(g, Some(i));
                lost.remove(&g);
            }
        }
        Ok(self)
    }
}

impl fmt::Display for Pipeline {
    /// The canonical pipeline string (`none` when empty).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.steps.is_empty() {
            return f.write_str("none");
        }
        for (i, s) in self.steps.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}", s.spec)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pipeline({self})")
    }
}
