//! The pass manager: runs a pipeline, times, verifies and dumps, and reports.

use super::context::AnyMapBox;
use super::*;
use crate::Model;
use crate::verify::{VerifyError, verify};
use std::fmt;
use std::io;
use std::time::{Duration, Instant};

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
    /// [`Pipeline::check`]: the pass's options do not fit the model; nothing ran.
    #[error("pass `{pass}` (#{index}) cannot run on this model: {source}")]
    Check {
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

/// Runs pipelines. Caches analyses between the passes of a run (dropped whenever a pass
/// reports a change) and keeps the resources callers provide for passes (see
/// [`PassContext::provide`]) across runs.
#[derive(Default)]
pub struct PassManager {
    resources: AnyMapBox,
}

impl fmt::Debug for PassManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PassManager").finish_non_exhaustive()
    }
}

impl PassManager {
    pub fn new() -> PassManager {
        PassManager::default()
    }

    /// Hands every pass of later runs a value of type `T` ([`PassContext::resource`]),
    /// e.g. calibration statistics.
    pub fn provide<T: std::any::Any + Send + Sync>(&mut self, value: T) -> &mut PassManager {
        self.resources.insert(value);
        self
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
        // Analyses describe one model: a run starts with none cached.
        let mut ctx = PassContext::new(opts.rewrite_budget)
            .with_resources(std::mem::take(&mut self.resources));
        let result = self.run_passes(model, pipeline, opts, &mut ctx, report);
        self.resources = ctx.take_resources();
        result
    }

    fn run_passes(
        &mut self,
        model: &mut Model,
        pipeline: &mut Pipeline,
        opts: &mut RunOptions<'_>,
        ctx: &mut PassContext,
        mut report: Report,
    ) -> Result<Report, RunError> {
        let mut stderr = io::stderr();
        for (i, step) in pipeline.steps.iter_mut().enumerate() {
            let index = i + 1;
            let name = step.pass.name();
            let before = ctx.rewrites();
            ctx.notes.clear();
            let t = Instant::now();
            let outcome = step.pass.run(model, ctx).map_err(|source| RunError::Pass {
                pass: name.to_string(),
                index,
                source,
            })?;
            let elapsed = t.elapsed();
            if outcome.changed {
                ctx.invalidate_analyses();
            }
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
