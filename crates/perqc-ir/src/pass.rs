//! Passes, the pass registry, pipelines and the pass manager.
//!
//! - A [`Pass`] is a small named type: it states the [`Property`]s it requires and
//!   guarantees and rewrites a [`Model`] in place, reporting a [`PassOutcome`] (whether the
//!   IR changed, plus counters).
//! - A [`PassRegistry`] maps pass names to descriptions and factories that build a pass from
//!   its options; the concrete list lives in `perqc_passes::registry()`.
//! - A pipeline string such as `dce,topo-sort` or `fold(mode=fast,limit=3),dce` is parsed
//!   into [`PassSpec`]s ([`parse_pipeline`]) and built into a [`Pipeline`] by the registry,
//!   which rejects unknown passes and options and checks that every required property is
//!   established by an earlier pass.
//! - The [`PassManager`] runs a pipeline: it times each pass, optionally verifies the IR
//!   after each ([`RunOptions::verify_each`]), dumps the textual IR after selected passes
//!   ([`RunOptions::print_ir_after`]) and enforces a rewrite budget for bisecting a
//!   miscompile ([`RunOptions::rewrite_budget`]). It returns a [`Report`].

use crate::verify::{VerifyError, verify};
use crate::{GraphError, Model};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::str::FromStr;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// Properties, outcomes, errors, context
// ---------------------------------------------------------------------------------------

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

/// What the manager hands each pass besides the model: the rewrite budget and a place for
/// notes that end up in the [`Report`].
#[derive(Debug, Default)]
pub struct PassContext {
    budget: Option<usize>,
    used: usize,
    refused: bool,
    notes: Vec<String>,
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
}

// ---------------------------------------------------------------------------------------
// The Pass trait
// ---------------------------------------------------------------------------------------

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

    /// Runs the pass. On error the model is left as the pass left it; the manager stops.
    fn run(&mut self, model: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError>;
}

// ---------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------

/// The options a pipeline gave one pass, for its factory to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassOptions {
    pass: String,
    options: Vec<(String, String)>,
}

/// A pass option the factory rejects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("pass `{pass}` has no option `{option}` (valid options: {valid})")]
    Unknown {
        pass: String,
        option: String,
        /// The valid names, comma-separated, or `none`.
        valid: String,
    },
    #[error("pass `{pass}` option `{option}`: `{value}` is not {expected}")]
    Invalid {
        pass: String,
        option: String,
        value: String,
        expected: String,
    },
}

impl PassOptions {
    pub fn new(pass: &str, options: Vec<(String, String)>) -> PassOptions {
        PassOptions {
            pass: pass.to_string(),
            options,
        }
    }

    /// No options.
    pub fn none(pass: &str) -> PassOptions {
        PassOptions::new(pass, Vec::new())
    }

    pub fn pass(&self) -> &str {
        &self.pass
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.options.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.options.is_empty()
    }

    /// Fails on the first option whose name is not in `valid`, listing the valid ones.
    /// Every factory calls this first.
    pub fn allow_only(&self, valid: &[&str]) -> Result<(), OptionError> {
        for (k, _) in &self.options {
            if !valid.contains(&k.as_str()) {
                return Err(OptionError::Unknown {
                    pass: self.pass.clone(),
                    option: k.clone(),
                    valid: if valid.is_empty() {
                        "none".to_string()
                    } else {
                        valid.join(", ")
                    },
                });
            }
        }
        Ok(())
    }

    /// The raw value of option `name`, if given (the last one if repeated).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn invalid(&self, name: &str, value: &str, expected: String) -> OptionError {
        OptionError::Invalid {
            pass: self.pass.clone(),
            option: name.to_string(),
            value: value.to_string(),
            expected,
        }
    }

    /// Option `name` parsed as `T` (`what` names the expected form in errors, e.g.
    /// "a non-negative integer"), or `default` if absent.
    pub fn parse_or<T: FromStr>(
        &self,
        name: &str,
        what: &str,
        default: T,
    ) -> Result<T, OptionError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| self.invalid(name, v, what.to_string())),
        }
    }

    /// A boolean option: `true`/`false`, `yes`/`no`, `on`/`off`, `1`/`0`.
    pub fn bool_or(&self, name: &str, default: bool) -> Result<bool, OptionError> {
        match self.get(name) {
            None => Ok(default),
            Some("true" | "yes" | "on" | "1") => Ok(true),
            Some("false" | "no" | "off" | "0") => Ok(false),
            Some(v) => Err(self.invalid(name, v, "a boolean (true or false)".into())),
        }
    }

    /// One of `choices`, or `default` if absent.
    pub fn choice_or<'c>(
        &self,
        name: &str,
        choices: &[&'c str],
        default: &'c str,
    ) -> Result<&'c str, OptionError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => choices
                .iter()
                .copied()
                .find(|c| *c == v)
                .ok_or_else(|| self.invalid(name, v, format!("one of {}", choices.join(", ")))),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Pipeline syntax
// ---------------------------------------------------------------------------------------

/// One pass of a pipeline string: its name, options, and 1-based columns in the string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassSpec {
    pub name: String,
    pub options: Vec<(String, String)>,
    /// Column of the name (0 for specs not parsed from a string).
    pub column: usize,
    /// Column of each option's name, parallel to `options`.
    pub option_columns: Vec<usize>,
}

impl PassSpec {
    pub fn new(name: &str) -> PassSpec {
        PassSpec {
            name: name.to_string(),
            options: Vec::new(),
            column: 0,
            option_columns: Vec::new(),
        }
    }

    /// The column of option `name`, else of the pass name.
    pub fn column_of(&self, option: &str) -> usize {
        self.options
            .iter()
            .zip(&self.option_columns)
            .find(|((k, _), _)| k == option)
            .map_or(self.column, |(_, &c)| c)
    }
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

fn is_value_char(c: char) -> bool {
    !c.is_whitespace() && !matches!(c, ',' | '(' | ')' | '=' | '"')
}

impl fmt::Display for PassSpec {
    /// The canonical spelling, `name` or `name(k=v,...)`, which parses back to the same spec.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if self.options.is_empty() {
            return Ok(());
        }
        f.write_str("(")?;
        for (i, (k, v)) in self.options.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if !v.is_empty() && v.chars().all(is_value_char) {
                write!(f, "{k}={v}")?;
            } else {
                write!(
                    f,
                    "{k}=\"{}\"",
                    v.replace('\\', "\\\\").replace('"', "\\\"")
                )?;
            }
        }
        f.write_str(")")
    }
}

/// Why a pipeline could not be parsed or built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PipelineError {
    #[error("pipeline `{pipeline}`, column {column}: {message}")]
    Syntax {
        pipeline: String,
        column: usize,
        message: String,
    },
    #[error("pipeline `{pipeline}`, column {column}: unknown pass `{name}`{hint}")]
    UnknownPass {
        pipeline: String,
        column: usize,
        name: String,
        /// The closest registered name, if one is close.
        suggestion: Option<String>,
        /// `; did you mean ...?` or `; known passes: ...`.
        hint: String,
    },
    #[error("pipeline `{pipeline}`, column {column}: {source}")]
    Option {
        pipeline: String,
        column: usize,
        source: Box<OptionError>,
    },
    #[error("pass `{pass}` (#{index}) requires `{property}`, {reason}")]
    MissingProperty {
        pass: String,
        index: usize,
        property: Property,
        reason: String,
    },
}

impl PipelineError {
    /// The 1-based column the error points at, if it is about a place in the string.
    pub fn column(&self) -> Option<usize> {
        match self {
            PipelineError::Syntax { column, .. }
            | PipelineError::UnknownPass { column, .. }
            | PipelineError::Option { column, .. } => Some(*column),
            PipelineError::MissingProperty { .. } => None,
        }
    }

    /// Two lines for a terminal: the pipeline and a caret under the column.
    pub fn caret(&self) -> Option<String> {
        let (pipeline, column) = match self {
            PipelineError::Syntax {
                pipeline, column, ..
            }
            | PipelineError::UnknownPass {
                pipeline, column, ..
            }
            | PipelineError::Option {
                pipeline, column, ..
            } => (pipeline, *column),
            PipelineError::MissingProperty { .. } => return None,
        };
        Some(format!(
            "{pipeline}\n{}^",
            " ".repeat(column.saturating_sub(1))
        ))
    }
}

struct Cursor<'s> {
    src: &'s str,
    chars: Vec<char>,
    pos: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn column(&self) -> usize {
        self.pos + 1
    }

    fn error(&self, message: impl Into<String>) -> PipelineError {
        PipelineError::Syntax {
            pipeline: self.src.to_string(),
            column: self.column(),
            message: message.into(),
        }
    }

    fn found(&self) -> String {
        match self.peek() {
            Some(c) => format!("`{c}`"),
            None => "the end".to_string(),
        }
    }

    fn word(&mut self, what: &str) -> Result<String, PipelineError> {
        let start = self.pos;
        while self.peek().is_some_and(is_word_char) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error(format!("expected {what}, found {}", self.found())));
        }
        Ok(self.chars[start..self.pos].iter().collect())
    }

    fn value(&mut self) -> Result<String, PipelineError> {
        if self.peek() == Some('"') {
            let open = self.pos;
            self.pos += 1;
            let mut s = String::new();
            loop {
                match self.peek() {
                    None => {
                        self.pos = open;
                        return Err(self.error("unterminated quoted value"));
                    }
                    Some('"') => {
                        self.pos += 1;
                        return Ok(s);
                    }
                    Some('\\') if matches!(self.chars.get(self.pos + 1), Some('"' | '\\')) => {
                        s.push(self.chars[self.pos + 1]);
                        self.pos += 2;
                    }
                    Some(c) => {
                        s.push(c);
                        self.pos += 1;
                    }
                }
            }
        }
        let start = self.pos;
        while self.peek().is_some_and(is_value_char) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error(format!("expected an option value, found {}", self.found())));
        }
        Ok(self.chars[start..self.pos].iter().collect())
    }
}

/// Parses a pipeline string: `pass,pass(opt=value,flag),...`. Whitespace around tokens is
/// ignored; an empty string or `none` is the empty pipeline; an option without `=value`
/// means `=true`; values with spaces, commas or parentheses are written in double quotes
/// (`\"` and `\\` escape). Errors point at a 1-based column.
pub fn parse_pipeline(src: &str) -> Result<Vec<PassSpec>, PipelineError> {
    if src.trim().is_empty() || src.trim() == "none" {
        return Ok(Vec::new());
    }
    let mut c = Cursor {
        src,
        chars: src.chars().collect(),
        pos: 0,
    };
    let mut specs = Vec::new();
    c.skip_ws();
    loop {
        let column = c.column();
        let name = c.word("a pass name")?;
        if name == "none" {
            c.pos = column - 1;
            return Err(c.error("`none` is the empty pipeline and cannot be combined with passes"));
        }
        c.skip_ws();
        let mut options: Vec<(String, String)> = Vec::new();
        let mut option_columns = Vec::new();
        if c.peek() == Some('(') {
            c.pos += 1;
            c.skip_ws();
            if c.peek() == Some(')') {
                return Err(c.error(format!(
                    "expected an option name (or drop the empty parentheses after `{name}`)"
                )));
            }
            loop {
                c.skip_ws();
                let key_col = c.column();
                let key = c.word("an option name")?;
                if options.iter().any(|(k, _)| *k == key) {
                    c.pos = key_col - 1;
                    return Err(c.error(format!("option `{key}` of `{name}` is given twice")));
                }
                c.skip_ws();
                let value = if c.peek() == Some('=') {
                    c.pos += 1;
                    c.skip_ws();
                    c.value()?
                } else {
                    "true".to_string()
                };
                options.push((key, value));
                option_columns.push(key_col);
                c.skip_ws();
                match c.peek() {
                    Some(',') => c.pos += 1,
                    Some(')') => {
                        c.pos += 1;
                        break;
                    }
                    None => {
                        return Err(c.error(format!(
                            "expected `)` to close the options of `{name}`, found the end"
                        )));
                    }
                    Some(_) => {
                        return Err(c.error(format!(
                            "expected `,` or `)` after option `{}`, found {}",
                            options.last().unwrap().0,
                            c.found()
                        )));
                    }
                }
            }
            c.skip_ws();
        }
        specs.push(PassSpec {
            name,
            options,
            column,
            option_columns,
        });
        match c.peek() {
            None => return Ok(specs),
            Some(',') => {
                c.pos += 1;
                c.skip_ws();
                if c.peek().is_none() {
                    return Err(c.error("expected a pass name after `,`, found the end"));
                }
            }
            Some(_) => {
                return Err(c.error(format!("expected `,` between passes, found {}", c.found())));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Registry and pipelines
// ---------------------------------------------------------------------------------------

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
fn edit_distance(a: &str, b: &str) -> usize {
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

struct Step {
    spec: PassSpec,
    pass: Box<dyn Pass>,
}

/// Passes to run in order, built by [`PassRegistry::build`] or assembled by hand.
#[derive(Default)]
pub struct Pipeline {
    steps: Vec<Step>,
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

// ---------------------------------------------------------------------------------------
// Manager
// ---------------------------------------------------------------------------------------

/// How to run a pipeline.
#[derive(Default)]
pub struct RunOptions<'a> {
    /// Run [`verify`] on the input and after every pass; fail naming the pass that broke
    /// an invariant.
    pub verify_each: bool,
    /// Pass names (or `all`) after which to dump the textual IR.
    pub print_ir_after: Vec<String>,
    /// Where dumps go; `None` is standard error.
    pub print_sink: Option<&'a mut dyn io::Write>,
    /// At most this many rewrites over the whole run (for bisecting a miscompile).
    pub rewrite_budget: Option<usize>,
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the input model is invalid before any pass ran: {0}")]
    InvalidInput(VerifyError),
    #[error("pass `{pass}` (#{index}) failed: {source}")]
    Pass {
        pass: String,
        index: usize,
        source: PassError,
    },
    #[error("pass `{pass}` (#{index}) broke an IR invariant: {source}")]
    Verify {
        pass: String,
        index: usize,
        source: VerifyError,
    },
    #[error("print-ir-after names `{name}`, which is not in the pipeline `{pipeline}`")]
    UnknownPrintPass { name: String, pipeline: String },
    #[error("writing the IR dump failed: {0}")]
    Io(#[from] io::Error),
}

/// What one pass did in a run.
#[derive(Clone, Debug)]
pub struct PassRecord {
    /// 1-based position in the pipeline.
    pub index: usize,
    pub name: &'static str,
    /// The spec it was built from (`name(k=v)`).
    pub spec: String,
    pub elapsed: Duration,
    pub changed: bool,
    pub counters: Vec<(String, u64)>,
    /// Rewrites granted from the budget during this pass.
    pub rewrites: usize,
    pub notes: Vec<String>,
}

/// A pipeline run: per pass, time, change flag and counters. `Display` prints a table.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub passes: Vec<PassRecord>,
    /// Time spent verifying (input and after each pass).
    pub verify_time: Duration,
    /// The first pass that had a rewrite refused by the budget: (index, name).
    pub budget_exhausted_in: Option<(usize, &'static str)>,
}

impl Report {
    /// Whether any pass changed the IR.
    pub fn changed(&self) -> bool {
        self.passes.iter().any(|p| p.changed)
    }

    /// Counter `name` of the first pass called `pass` (0 if absent).
    pub fn counter(&self, pass: &str, name: &str) -> u64 {
        self.passes
            .iter()
            .find(|p| p.name == pass)
            .and_then(|p| p.counters.iter().find(|(k, _)| k == name))
            .map_or(0, |(_, v)| *v)
    }

    pub fn total_time(&self) -> Duration {
        self.passes.iter().map(|p| p.elapsed).sum::<Duration>() + self.verify_time
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<[String; 5]> = self
            .passes
            .iter()
            .map(|p| {
                let counters: Vec<String> =
                    p.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
                [
                    p.index.to_string(),
                    p.spec.clone(),
                    ms(p.elapsed),
                    if p.changed { "yes" } else { "no" }.to_string(),
                    counters.join(" "),
                ]
            })
            .collect();
        let header = ["#", "pass", "time", "changed", "counters"];
        let mut width = header.map(str::len);
        for r in &rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        let row = |f: &mut fmt::Formatter<'_>, cells: [&str; 5]| {
            let line = format!(
                "{:>w0$}  {:<w1$}  {:>w2$}  {:<w3$}  {}",
                cells[0],
                cells[1],
                cells[2],
                cells[3],
                cells[4],
                w0 = width[0],
                w1 = width[1],
                w2 = width[2],
                w3 = width[3],
            );
            writeln!(f, "{}", line.trim_end())
        };
        row(f, header)?;
        for r in &rows {
            row(f, [&r[0], &r[1], &r[2], &r[3], &r[4]])?;
        }
        if !self.verify_time.is_zero() {
            row(f, ["", "(verify)", &ms(self.verify_time), "", ""])?;
        }
        row(f, ["", "total", &ms(self.total_time()), "", ""])?;
        for p in &self.passes {
            for n in &p.notes {
                writeln!(f, "note: {}: {n}", p.name)?;
            }
        }
        if let Some((i, name)) = self.budget_exhausted_in {
            writeln!(f, "note: rewrite budget exhausted in pass `{name}` (#{i})")?;
        }
        Ok(())
    }
}

/// Runs pipelines. (Cached analyses will live here, invalidated when a pass reports a
/// change.)
#[derive(Debug, Default)]
pub struct PassManager {
    _private: (),
}

impl PassManager {
    pub fn new() -> PassManager {
        PassManager::default()
    }

    /// Runs `pipeline` over `model`. With `verify_each`, the input is verified first
    /// ([`RunError::InvalidInput`]) and the IR after every pass ([`RunError::Verify`] names
    /// the pass); IR dumps requested by `print_ir_after` are written before that check, so
    /// a broken IR is visible.
    pub fn run(
        &mut self,
        model: &mut Model,
        pipeline: &mut Pipeline,
        opts: &mut RunOptions<'_>,
    ) -> Result<Report, RunError> {
        let names = pipeline.names();
        for want in &opts.print_ir_after {
            if want != "all" && !names.contains(&want.as_str()) {
                return Err(RunError::UnknownPrintPass {
                    name: want.clone(),
                    pipeline: pipeline.to_string(),
                });
            }
        }
        let mut report = Report::default();
        if opts.verify_each {
            let t = Instant::now();
            verify(model).map_err(RunError::InvalidInput)?;
            report.verify_time += t.elapsed();
        }
        let mut ctx = PassContext::new(opts.rewrite_budget);
        let mut stderr = io::stderr();
        for (i, step) in pipeline.steps.iter_mut().enumerate() {
            let index = i + 1;
            let name = step.pass.name();
            let before = ctx.rewrites();
            ctx.notes.clear();
            let t = Instant::now();
            let outcome = step
                .pass
                .run(model, &mut ctx)
                .map_err(|source| RunError::Pass {
                    pass: name.to_string(),
                    index,
                    source,
                })?;
            let elapsed = t.elapsed();
            if ctx.refused && report.budget_exhausted_in.is_none() {
                report.budget_exhausted_in = Some((index, name));
            }
            report.passes.push(PassRecord {
                index,
                name,
                spec: step.spec.to_string(),
                elapsed,
                changed: outcome.changed,
                counters: outcome.counters,
                rewrites: ctx.rewrites() - before,
                notes: std::mem::take(&mut ctx.notes),
            });
            if opts.print_ir_after.iter().any(|w| w == "all" || w == name) {
                let sink: &mut dyn io::Write = match opts.print_sink.as_mut() {
                    Some(s) => &mut **s,
                    None => &mut stderr,
                };
                writeln!(sink, "// IR after {name} ({index})")?;
                sink.write_all(crate::print::print_model(model).as_bytes())?;
                sink.flush()?;
            }
            if opts.verify_each {
                let t = Instant::now();
                verify(model).map_err(|source| RunError::Verify {
                    pass: name.to_string(),
                    index,
                    source,
                })?;
                report.verify_time += t.elapsed();
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Graph, NodeSpec};
    use crate::{DType, Tensor, Type};

    /// A spec; `opts` are (name, value, column).
    fn spec(name: &str, opts: &[(&str, &str, usize)], column: usize) -> PassSpec {
        PassSpec {
            name: name.into(),
            options: opts
                .iter()
                .map(|(k, v, _)| (k.to_string(), v.to_string()))
                .collect(),
            column,
            option_columns: opts.iter().map(|o| o.2).collect(),
        }
    }

    #[test]
    fn parses_good_pipelines() {
        assert_eq!(parse_pipeline("").unwrap(), vec![]);
        assert_eq!(parse_pipeline("  none ").unwrap(), vec![]);
        assert_eq!(
            parse_pipeline("a,b(opt=1,mode=fast),c").unwrap(),
            vec![
                spec("a", &[], 1),
                spec("b", &[("opt", "1", 5), ("mode", "fast", 11)], 3),
                spec("c", &[], 22),
            ]
        );
        assert_eq!(
            parse_pipeline(" dce , topo-sort ( verbose , path = \"a,b \\\"c\\\"\" ) ").unwrap(),
            vec![
                spec("dce", &[], 2),
                spec(
                    "topo-sort",
                    &[("verbose", "true", 20), ("path", "a,b \"c\"", 30)],
                    8
                ),
            ]
        );
        assert_eq!(
            parse_pipeline("x(scale=-1.5e-3)").unwrap(),
            vec![spec("x", &[("scale", "-1.5e-3", 3)], 1)]
        );
    }

    #[test]
    fn display_round_trips() {
        for s in ["a", "a,b(opt=1,mode=fast),c", "p(path=\"a b,c\",q=\"\")"] {
            let specs = parse_pipeline(s).unwrap();
            let back: Vec<String> = specs.iter().map(|p| p.to_string()).collect();
            assert_eq!(back.join(","), s);
        }
    }

    fn syntax_err(s: &str) -> (usize, String) {
        match parse_pipeline(s).unwrap_err() {
            PipelineError::Syntax {
                column, message, ..
            } => (column, message),
            e => panic!("not a syntax error: {e}"),
        }
    }

    #[test]
    fn rejects_bad_pipelines_with_columns() {
        assert_eq!(
            syntax_err("a,,b"),
            (3, "expected a pass name, found `,`".into())
        );
        assert_eq!(
            syntax_err("a,"),
            (3, "expected a pass name after `,`, found the end".into())
        );
        assert_eq!(
            syntax_err("a,b(opt=1"),
            (
                10,
                "expected `)` to close the options of `b`, found the end".into()
            )
        );
        assert_eq!(
            syntax_err("a b"),
            (3, "expected `,` between passes, found `b`".into())
        );
        assert_eq!(
            syntax_err("b(opt=)"),
            (7, "expected an option value, found `)`".into())
        );
        assert_eq!(
            syntax_err("b(x=1,x=2)"),
            (7, "option `x` of `b` is given twice".into())
        );
        assert_eq!(syntax_err("b(x=\"abc").0, 5);
        assert_eq!(syntax_err("b()").0, 3);
        assert_eq!(syntax_err("b(x=1 y=2)").0, 7);
        assert_eq!(syntax_err("dce,none").0, 5);
        assert_eq!(syntax_err("a;b").0, 2);
        let e = parse_pipeline("a,b(opt=1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "pipeline `a,b(opt=1`, column 10: expected `)` to close the options of `b`, found the end"
        );
        assert_eq!(e.caret().unwrap(), "a,b(opt=1\n         ^");
    }

    // ---- test passes ----

    /// Does nothing; options `level` (integer) and `mode` (fast|slow).
    struct Noop;
    impl Pass for Noop {
        fn name(&self) -> &'static str {
            "noop"
        }
        fn description(&self) -> &'static str {
            "does nothing"
        }
        fn run(&mut self, _: &mut Model, _: &mut PassContext) -> Result<PassOutcome, PassError> {
            Ok(PassOutcome::unchanged())
        }
    }
    fn noop_factory(o: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        o.allow_only(&["level", "mode"])?;
        o.parse_or::<u32>("level", "a non-negative integer", 0)?;
        o.choice_or("mode", &["fast", "slow"], "fast")?;
        Ok(Box::new(Noop))
    }

    /// Test-only: corrupts the graph by making the first node read an undefined value.
    struct Corrupt;
    impl Pass for Corrupt {
        fn name(&self) -> &'static str {
            "corrupt"
        }
        fn description(&self) -> &'static str {
            "breaks an invariant (test only)"
        }
        fn run(&mut self, m: &mut Model, _: &mut PassContext) -> Result<PassOutcome, PassError> {
            let g = &mut m.graph;
            let ghost = g.value_named("ghost");
            let first = g.node_order()[0];
            g.set_input(first, 0, Some(ghost));
            Ok(PassOutcome::changed().with("corruptions", 1))
        }
    }

    /// Establishes / requires / invalidates a test property.
    struct Prop {
        name: &'static str,
        requires: &'static [Property],
        guarantees: &'static [Property],
        invalidates: &'static [Property],
    }
    impl Pass for Prop {
        fn name(&self) -> &'static str {
            self.name
        }
        fn description(&self) -> &'static str {
            "property test pass"
        }
        fn requires(&self) -> &[Property] {
            self.requires
        }
        fn guarantees(&self) -> &[Property] {
            self.guarantees
        }
        fn invalidates(&self) -> &[Property] {
            self.invalidates
        }
        fn run(&mut self, _: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
            let mut n = 0;
            while n < 3 && ctx.rewrite() {
                n += 1;
            }
            Ok(PassOutcome::from_changed(n > 0).with("rewrites", n))
        }
    }
    const FACT: Property = Property("fact");

    fn registry() -> PassRegistry {
        let mut r = PassRegistry::new();
        r.register("noop", "does nothing", noop_factory)
            .register("corrupt", "breaks an invariant", |o| {
                o.allow_only(&[])?;
                Ok(Box::new(Corrupt))
            })
            .register("make-fact", "establishes `fact`", |o| {
                o.allow_only(&[])?;
                Ok(Box::new(Prop {
                    name: "make-fact",
                    requires: &[],
                    guarantees: &[FACT],
                    invalidates: &[],
                }))
            })
            .register("use-fact", "requires `fact`", |o| {
                o.allow_only(&[])?;
                Ok(Box::new(Prop {
                    name: "use-fact",
                    requires: &[FACT],
                    guarantees: &[],
                    invalidates: &[],
                }))
            })
            .register("break-fact", "invalidates `fact`", |o| {
                o.allow_only(&[])?;
                Ok(Box::new(Prop {
                    name: "break-fact",
                    requires: &[],
                    guarantees: &[],
                    invalidates: &[FACT],
                }))
            });
        r
    }

    #[test]
    fn unknown_pass_suggests_the_closest() {
        let r = registry();
        let e = r.build("noop,corupt").unwrap_err();
        assert_eq!(
            e.to_string(),
            "pipeline `noop,corupt`, column 6: unknown pass `corupt`; did you mean `corrupt`?"
        );
        let e = r.build("zzzzzz").unwrap_err();
        assert_eq!(
            e.to_string(),
            "pipeline `zzzzzz`, column 1: unknown pass `zzzzzz`; known passes: noop, corrupt, \
             make-fact, use-fact, break-fact"
        );
    }

    #[test]
    fn unknown_and_invalid_options() {
        let r = registry();
        let e = r.build("noop(levle=2)").unwrap_err();
        assert_eq!(
            e.to_string(),
            "pipeline `noop(levle=2)`, column 6: pass `noop` has no option `levle` (valid \
             options: level, mode)"
        );
        let e = r.build("noop, corrupt(x=1)").unwrap_err();
        assert!(e.to_string().ends_with("(valid options: none)"), "{e}");
        assert_eq!(e.column(), Some(15));
        let e = r.build("noop(mode=medium)").unwrap_err();
        assert!(
            e.to_string()
                .ends_with("pass `noop` option `mode`: `medium` is not one of fast, slow"),
            "{e}"
        );
        let e = r.build("noop(level=-1)").unwrap_err();
        assert!(
            e.to_string().ends_with("is not a non-negative integer"),
            "{e}"
        );
        let p = r.build("noop(level=2,mode=slow),noop").unwrap();
        assert_eq!(p.to_string(), "noop(level=2,mode=slow),noop");
        assert_eq!(r.build("none").unwrap().len(), 0);
    }

    #[test]
    fn properties_are_checked_at_build_time() {
        let r = registry();
        r.build("make-fact,use-fact").unwrap();
        r.build_with("use-fact", &[FACT]).unwrap();
        assert_eq!(
            r.build("use-fact,make-fact").unwrap_err().to_string(),
            "pass `use-fact` (#1) requires `fact`, which only the later pass `make-fact` (#2) \
             establishes; move it before `use-fact`"
        );
        assert_eq!(
            r.build("noop,use-fact").unwrap_err().to_string(),
            "pass `use-fact` (#2) requires `fact`, which no earlier pass establishes; add \
             `make-fact` before it"
        );
        assert_eq!(
            r.build("make-fact,break-fact,use-fact")
                .unwrap_err()
                .to_string(),
            "pass `use-fact` (#3) requires `fact`, which `make-fact` (#1) established but \
             `break-fact` (#2) invalidated"
        );
        r.build("make-fact,break-fact,make-fact,use-fact").unwrap();
    }

    fn model() -> Model {
        let mut g = Graph::new("main");
        let x = g
            .add_input("x", Some(Type::tensor(DType::F32, Some(vec![]))))
            .unwrap();
        let w = g
            .add_initializer("w", Tensor::from_f32(vec![], &[2.0]))
            .unwrap();
        g.add_node(
            NodeSpec::new("Mul").named("mul"),
            &[Some(x), Some(w)],
            &["y"],
        )
        .unwrap();
        g.outputs = vec![g.find("y").unwrap()];
        Model {
            ir_version: Some(10),
            graph: g,
            ..Default::default()
        }
    }

    #[test]
    fn verify_each_names_the_breaking_pass() {
        let r = registry();
        let mut p = r.build("noop,corrupt,noop").unwrap();
        let mut m = model();
        // Without verification the run "succeeds".
        PassManager::new()
            .run(&mut m.clone(), &mut p, &mut RunOptions::default())
            .unwrap();
        let mut opts = RunOptions {
            verify_each: true,
            ..Default::default()
        };
        let e = PassManager::new()
            .run(&mut m, &mut p, &mut opts)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "pass `corrupt` (#2) broke an IR invariant: graph `main`: node `mul` (Mul) input 0 \
             reads `ghost`, which nothing defines (a forward reference never defined)"
        );
        // And a broken input is blamed on the input, not on the first pass.
        let e = PassManager::new()
            .run(&mut m, &mut p, &mut opts)
            .unwrap_err();
        assert!(matches!(e, RunError::InvalidInput(_)), "{e}");
    }

    #[test]
    fn print_ir_after_dumps_numbered_ir() {
        let r = registry();
        let mut p = r.build("noop,make-fact,noop").unwrap();
        let mut m = model();
        let mut buf = Vec::new();
        let report = PassManager::new()
            .run(
                &mut m,
                &mut p,
                &mut RunOptions {
                    verify_each: true,
                    print_ir_after: vec!["noop".into()],
                    print_sink: Some(&mut buf),
                    ..Default::default()
                },
            )
            .unwrap();
        let text = String::from_utf8(buf).unwrap();
        let ir = crate::print::print_model(&m);
        assert_eq!(
            text,
            format!("// IR after noop (1)\n{ir}// IR after noop (3)\n{ir}")
        );
        insta::assert_snapshot!(text);
        assert_eq!(report.passes.len(), 3);
        assert!(report.changed());
        assert_eq!(report.counter("make-fact", "rewrites"), 3);
        let table = report.to_string();
        assert!(table.starts_with("#  pass"), "{table}");
        assert!(table.contains("make-fact"), "{table}");

        let e = PassManager::new()
            .run(
                &mut m,
                &mut p,
                &mut RunOptions {
                    print_ir_after: vec!["dce".into()],
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "print-ir-after names `dce`, which is not in the pipeline `noop,make-fact,noop`"
        );
    }

    #[test]
    fn rewrite_budget_is_shared_across_passes() {
        let r = registry();
        let mut p = r.build("make-fact,make-fact,make-fact").unwrap();
        let report = PassManager::new()
            .run(
                &mut model(),
                &mut p,
                &mut RunOptions {
                    rewrite_budget: Some(4),
                    ..Default::default()
                },
            )
            .unwrap();
        let used: Vec<usize> = report.passes.iter().map(|p| p.rewrites).collect();
        assert_eq!(used, vec![3, 1, 0]);
        assert!(!report.passes[2].changed);
        assert_eq!(report.budget_exhausted_in, Some((2, "make-fact")));
    }

    #[test]
    fn registry_help_lists_passes() {
        let help = registry().help();
        assert!(help.starts_with("noop        does nothing\n"), "{help}");
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("dce", "dce"), 0);
        assert_eq!(edit_distance("dec", "dce"), 2);
        assert_eq!(edit_distance("topo-srot", "topo-sort"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
