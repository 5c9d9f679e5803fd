//! Calibration in stages: the calibration windows go through the model one piece at a
//! time, and what a piece computes that later pieces read is kept (per window) instead of
//! being computed again from the token ids.
//!
//! Each [`Staged::run`] watches some values: it runs only the nodes between what is already
//! computed and those values ([`perqc_ir::cut`]), so a run of the whole model costs one
//! forward pass however many stages it is cut into. Between runs the caller may rewrite
//! the nodes downstream of everything computed so far (quantize the linears that read the
//! watched values): later stages then see the rewritten prefix, which is what layer-by-layer
//! GPTQ needs. A value whose producer changed (a quantizer's clip ratio) is dropped with
//! [`Staged::forget`] and computed again by the next stage that needs it.
//!
//! The quantized linears a stage runs go through `fuse-int-linear` first (unless
//! `--calib-float`, or the CPU has no SIMD level of the integer kernels): the stages then
//! compute what `perqc eval` computes on the quantized model, at its speed, up to the f32
//! round-off the two plans differ by. Weight-only linears stay float (their integer plan
//! quantizes the activation to 8 bits, which the graph does not say).
//!
//! Memory: the values crossing a stage boundary, per window (for a decoder, the residual
//! stream and the position tables: a few MB per window), and one stage's statistics.

use crate::calib::{self, CalibArgs};
use crate::corpus::WindowFeeds;
use anyhow::{Context, Result, bail};
use perqc_ir::{Model, NodeId, Pass, PassContext, ValueId};
use perqc_passes::FuseIntLinear;
use perqc_passes::calibration::{Calibration, CalibrationSource};
use perqc_runtime::{ChannelObserver, RtTensor, Session, SessionOptions, StatsOptions};
use std::collections::{HashMap, HashSet};

pub struct Staged {
    /// Per window: the values computed so far that some node not yet run may read.
    windows: Vec<HashMap<String, RtTensor>>,
    /// Nodes (of the model's graph) already run.
    done: HashSet<NodeId>,
    source: CalibrationSource,
    file: std::path::PathBuf,
    opts: SessionOptions,
    /// The most bytes the kept values have held (logical sizes).
    pub peak_bytes: usize,
    /// Whether watched values are kept even when no node outside their stage reads them
    /// (the quantizing driver inserts readers later, and reruns them after `forget`).
    keep_watched: bool,
    /// Whether stages run quantized linears on the integer kernels.
    integer: bool,
    /// Quantized linears the stages ran on the integer kernels.
    pub int_linears: u64,
}

impl Staged {
    /// The windows `args` describe, fed to `model`'s inputs.
    pub fn new(model: &Model, args: &CalibArgs) -> Result<Staged> {
        let data = calib::windows(args)?;
        let feeds = WindowFeeds::for_graph(&model.graph, args.calib_len)?;
        let windows = data
            .windows
            .iter()
            .map(|w| {
                feeds
                    .feeds(w)
                    .into_iter()
                    .map(|(n, t)| (n.to_string(), t))
                    .collect()
            })
            .collect();
        Ok(Staged {
            windows,
            done: HashSet::new(),
            source: CalibrationSource {
                description: data.description,
                sequences: data.windows.len(),
                tokens: (data.windows.len() * args.calib_len) as u64,
            },
            file: data.source,
            opts: SessionOptions {
                threads: args
                    .calib_threads
                    .unwrap_or(SessionOptions::default().threads),
            },
            peak_bytes: 0,
            keep_watched: true,
            integer: !args.calib_float
                && perqc_ops::kernels::igemm::Level::detect()
                    != perqc_ops::kernels::igemm::Level::Scalar,
            int_linears: 0,
        })
    }

    /// Keeps a watched value only when a node outside its stage reads it, like any other
    /// computed value: for callers that only read statistics (the model does not change
    /// between stages), so a stage watching many values does not hold them all per window.
    pub fn reading_only(mut self) -> Staged {
        self.keep_watched = false;
        self
    }

    /// Drops computed values by name: the next stage that reads one computes it again, and
    /// so do the nodes between it and the kept values it is computed from (they no longer
    /// count as run, so what they read is not evicted).
    pub fn forget(&mut self, model: &Model, names: &[String]) {
        let g = &model.graph;
        for w in &mut self.windows {
            for n in names {
                w.remove(n);
            }
        }
        let mut stack: Vec<NodeId> = names
            .iter()
            .filter_map(|n| g.find(n).and_then(|v| g.value(v).producer()).map(|p| p.0))
            .collect();
        while let Some(node) = stack.pop() {
            if !self.done.remove(&node) {
                continue;
            }
            for v in g.node(node).inputs().iter().flatten() {
                if !self.windows[0].contains_key(&g.value(*v).name)
                    && let Some((p, _)) = g.value(*v).producer()
                {
                    stack.push(p);
                }
            }
        }
    }

    /// Runs the stage that computes the watched values from what is computed so far, on
    /// every window, and returns their statistics (each with its own options). Watched
    /// values named in `transient` are not kept (the caller is about to change what
    /// computes them).
    pub fn run(
        &mut self,
        model: &Model,
        watch: &[(String, StatsOptions)],
        transient: &[String],
        release: &dyn Fn(&perqc_ir::Tensor),
    ) -> Result<Calibration> {
        let g = &model.graph;
        self.evict(model);
        let targets: Vec<ValueId> = watch
            .iter()
            .map(|(n, _)| {
                g.find(n)
                    .with_context(|| format!("calibration: the graph has no value `{n}`"))
            })
            .collect::<Result<_>>()?;
        let available: HashSet<&str> = self.windows[0].keys().map(String::as_str).collect();
        let given = |v: ValueId| available.contains(g.value(v).name.as_str());
        let (mut piece, nodes) = perqc_ir::cut(model, &given, &targets)
            .context("calibration: cutting the next stage")?;
        // The watched values, and everything the stage computes that a node outside it
        // reads, are kept (a watched value may be the input of a node run again after
        // `forget`).
        let taken: HashSet<NodeId> = nodes.iter().copied().collect();
        let mut keep: Vec<String> = watch
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| self.keep_watched && !transient.contains(n))
            .collect();
        for &n in &nodes {
            for o in g.node(n).outputs().iter().flatten() {
                let read_later = g.value(*o).uses().iter().any(|u| !taken.contains(&u.node));
                let name = &g.value(*o).name;
                if read_later && !keep.contains(name) && !transient.contains(name) {
                    keep.push(name.clone());
                }
            }
        }
        for name in &keep {
            let v = piece.graph.find(name).expect("computed by the piece");
            if !piece.graph.outputs.contains(&v) {
                piece.graph.outputs.push(v);
            }
        }
        if self.integer {
            // Outputs of the piece (the watched and kept values) are never fused away.
            self.int_linears += FuseIntLinear { weight_only: false }
                .run(&mut piece, &mut PassContext::new(None))
                .context("calibration: fuse-int-linear on a stage")?
                .counter("fused");
        }
        let session = Session::with_release(&piece, &self.opts, release)
            .context("calibration: planning a stage")?;
        let inputs: Vec<String> = session.input_names().map(str::to_string).collect();
        let mut observer = ChannelObserver::with_options(watch.to_vec());
        let count = self.windows.len();
        for (i, w) in self.windows.iter_mut().enumerate() {
            let feeds: Vec<(&str, RtTensor)> = inputs
                .iter()
                .map(|n| match w.get(n) {
                    Some(t) => Ok((n.as_str(), t.clone())),
                    None => bail!("calibration: stage input `{n}` was not computed"),
                })
                .collect::<Result<_>>()?;
            let outs = session
                .run_observed(&feeds, &mut observer)
                .with_context(|| {
                    format!(
                        "calibration window {} of {} from {}",
                        i + 1,
                        count,
                        self.file.display()
                    )
                })?;
            for (name, t) in outs {
                if keep.contains(&name) {
                    w.insert(name, t);
                }
            }
        }
        self.done.extend(nodes);
        let bytes: usize = self
            .windows
            .iter()
            .flat_map(|w| w.values())
            .map(|t| t.len() * t.dtype().bits().unwrap_or(8).div_ceil(8))
            .sum();
        self.peak_bytes = self.peak_bytes.max(bytes);
        let mut calib = Calibration::new(self.source.clone());
        for (name, stats) in observer.into_stats() {
            match stats {
                Some(s) => {
                    calib.insert(name, s);
                }
                None => bail!("calibration: no run produced `{name}`"),
            }
        }
        Ok(calib)
    }

    /// The statistics of `watch` (in node order), `per_stage` values per stage, the model
    /// unchanged between stages: each stage's session copies only the weights of its own
    /// piece of the model, so a model whose weights are owned (rewritten by passes, not
    /// mapped from the file) is not held twice.
    pub fn calibrate_in_pieces(
        self,
        model: &Model,
        watch: &[(String, StatsOptions)],
        per_stage: usize,
        release: &dyn Fn(&perqc_ir::Tensor),
    ) -> Result<Calibration> {
        let mut this = self.reading_only();
        let mut all = Calibration::new(this.source.clone());
        for piece in watch.chunks(per_stage.max(1)) {
            let c = this.run(model, piece, &[], release)?;
            for (name, stats) in c.iter() {
                all.insert(name, stats.clone());
            }
            drop(c);
            perqc_runtime::trim_allocator();
        }
        Ok(all)
    }

    /// Drops kept values every reader of which has run.
    fn evict(&mut self, model: &Model) {
        let g = &model.graph;
        let dead: Vec<String> = self.windows[0]
            .keys()
            .filter(|n| {
                g.find(n).is_none_or(|v| {
                    let uses = g.value(v).uses();
                    !uses.is_empty() && uses.iter().all(|u| self.done.contains(&u.node))
                })
            })
            .cloned()
            .collect();
        for w in &mut self.windows {
            for n in &dead {
                w.remove(n);
            }
        }
    }
}
