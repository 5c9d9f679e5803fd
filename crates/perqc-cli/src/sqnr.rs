//! `perqc inspect --sqnr`: the quantized SQNR of every linear layer the recipe quantizes,
//! with its concentration and alignment factors ([`perqc_quant::factors`]), measured on
//! the model as it is before the recipe and after each of its transforms.
//!
//! Each stage is measured on the model itself: its calibration windows run through it
//! (one forward pass, cut into pieces whose statistics fit a memory budget: [`Staged`],
//! which keeps per window only the values a later piece reads),
//! and each linear's sampled input rows `x` and its weight `W` as the stage left them give
//! the measured SQNR (`‖x W‖² / ‖x W − Q_a(x) Q_w(W)‖²`, by [`Probe::error`]) and the
//! factors. The alignment bound `A*` is invariant under the exact transforms (each maps
//! `x ↦ x T`, `W ↦ T⁻¹ W`), so it is computed once, from the original model's input Gram
//! matrices.

use crate::calib::CalibArgs;
use crate::staged::Staged;
use anyhow::{Context, Result};
use perqc_ir::Model;
use perqc_ops::quant::TokenQuant;
use perqc_passes::probe::Probe;
use perqc_passes::quantize::{QuantConfig, activations, sites::Site, weights::float_weight};
use perqc_quant::factors::{self, AlignmentBound};
use perqc_quant::{Format, Granularity};
use perqc_runtime::StatsOptions;
use rayon::prelude::*;
use serde_json::json;

/// Bytes of statistics one calibration piece may hold (sampled rows, Gram matrices).
const PIECE_BUDGET: usize = 256 << 20;

/// One linear at one stage.
#[derive(Clone, Debug)]
pub struct Measure {
    pub sqnr_db: f64,
    /// What the white-noise model predicts from the factors (integer formats with
    /// per-channel weight scales only).
    pub predicted_db: Option<f64>,
    pub c_x: f64,
    pub c_w: f64,
    pub alignment: f64,
}

/// One linear layer through the stages.
#[derive(Clone, Debug)]
pub struct Linear {
    pub name: String,
    pub k: usize,
    pub n: usize,
    pub bound: Option<AlignmentBound>,
    /// Per stage (`None`: not measured there, e.g. the layer was not found).
    pub stages: Vec<Option<Measure>>,
}

/// The table being built: stages as they are measured, linears by name.
pub struct Table {
    pub stages: Vec<String>,
    pub linears: Vec<Linear>,
    pub rows: usize,
    pub probe: Probe,
    /// Whether the first stage also computes each linear's alignment bound (from its input
    /// Gram matrix: the costliest part of a stage).
    bounds: bool,
    /// Activation groups per calibration piece at most: each piece's session holds a copy
    /// of its weights.
    piece_groups: usize,
}

impl Table {
    pub fn new(probe: Probe) -> Table {
        Table {
            stages: Vec::new(),
            linears: Vec::new(),
            rows: 0,
            probe,
            bounds: true,
            piece_groups: usize::MAX,
        }
    }

    /// A table whose stages measure the SQNR and factors only, without the alignment bound,
    /// in pieces of at most `piece_groups` activation groups (a piece's session copies its
    /// weights: fewer groups, less memory at once).
    pub fn without_bounds(probe: Probe, piece_groups: usize) -> Table {
        Table {
            bounds: false,
            piece_groups: piece_groups.max(1),
            ..Table::new(probe)
        }
    }

    /// The SQNR of linear `name` at stage `stage`, if measured there.
    pub fn sqnr_db(&self, stage: usize, name: &str) -> Option<f64> {
        let l = self.linears.iter().find(|l| l.name == name)?;
        l.stages.get(stage)?.as_ref().map(|m| m.sqnr_db)
    }

    /// Per layer kind (see [`Table::kinds`]): its layer count and its mean SQNR per stage.
    pub fn kind_means(&self) -> Vec<(String, usize, Vec<f64>)> {
        self.kinds()
            .into_iter()
            .map(|(kind, of)| {
                let means = (0..self.stages.len())
                    .map(|st| self.mean(&of, st, |_, m| m.sqnr_db))
                    .collect();
                (kind, of.len(), means)
            })
            .collect()
    }

    /// Measures `model` as stage `label`: the layers `config` quantizes, on about `rows`
    /// sampled rows of `calib`'s windows; the first stage also computes the bounds.
    pub fn measure(
        &mut self,
        label: &str,
        model: &Model,
        config: &QuantConfig,
        calib: &CalibArgs,
        rows: usize,
        release: &dyn Fn(&perqc_ir::Tensor),
    ) -> Result<()> {
        let first = self.stages.is_empty() && self.bounds;
        let stage = self.stages.len();
        self.stages.push(label.to_string());
        let sites = config
            .select(model)
            .map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
        let every = (calib.calib_seqs * calib.calib_len / rows.max(1)).max(1);
        let kept = (calib.calib_seqs * calib.calib_len).div_ceil(every);
        let opts = StatsOptions {
            gram: first,
            sample_every: every,
            ..StatsOptions::default()
        };
        let g = &model.graph;
        let groups = activations::groups(&sites);
        // Pieces of consecutive groups whose statistics fit the budget.
        let mut pieces: Vec<Vec<&Vec<usize>>> = vec![Vec::new()];
        let mut bytes = 0usize;
        for group in &groups {
            let k = sites[group[0]].k;
            let cost = kept * k * 4 + if first { k * k * 8 } else { 0 };
            let current = pieces.last().expect("one");
            let full = bytes + cost > PIECE_BUDGET || current.len() >= self.piece_groups;
            if full && !current.is_empty() {
                pieces.push(Vec::new());
                bytes = 0;
            }
            bytes += cost;
            pieces.last_mut().expect("one").push(group);
        }
        let mut staged = Staged::new(model, calib)?.reading_only();
        for piece in pieces.iter().filter(|p| !p.is_empty()) {
            let watch: Vec<(String, StatsOptions)> = piece
                .iter()
                .map(|grp| (g.value(sites[grp[0]].x).name.clone(), opts.clone()))
                .collect();
            let c = staged
                .run(model, &watch, &[], release)
                .with_context(|| format!("{label}: calibrating"))?;
            let measured: Vec<(usize, Measure, Option<AlignmentBound>)> = piece
                .iter()
                .flat_map(|grp| grp.iter().copied())
                .collect::<Vec<usize>>()
                .par_iter()
                .map(|&i| {
                    let site = &sites[i];
                    let stats = c
                        .get(&g.value(site.x).name)
                        .context("a watched value has no statistics")?;
                    let (m, b) = self
                        .measure_one(model, site, stats, first)
                        .with_context(|| format!("{label}: {}", site.name))?;
                    Ok((i, m, b))
                })
                .collect::<Result<_>>()?;
            for (i, m, b) in measured {
                self.rows = self.rows.max(
                    c.get(&g.value(sites[i].x).name)
                        .map_or(0, |s| s.samples().nrows()),
                );
                let site = &sites[i];
                let at = match self.linears.iter().position(|l| l.name == site.name) {
                    Some(at) => at,
                    None => {
                        self.linears.push(Linear {
                            name: site.name.clone(),
                            k: site.k,
                            n: site.n,
                            bound: None,
                            stages: Vec::new(),
                        });
                        self.linears.len() - 1
                    }
                };
                let l = &mut self.linears[at];
                if b.is_some() {
                    l.bound = b;
                }
                l.stages.resize(stage + 1, None);
                l.stages[stage] = Some(m);
            }
            drop(c);
            perqc_runtime::trim_allocator();
        }
        for l in &mut self.linears {
            l.stages.resize(stage + 1, None);
        }
        Ok(())
    }

    fn measure_one(
        &self,
        model: &Model,
        site: &Site,
        stats: &perqc_ops::stats::ChannelStats,
        bound: bool,
    ) -> Result<(Measure, Option<AlignmentBound>)> {
        let x = stats.samples();
        let w = float_weight(&model.graph, site).map_err(anyhow::Error::msg)?;
        let wkn = w.t().as_standard_layout().into_owned();
        let e = self
            .probe
            .error(x, wkn.view(), &[], None)
            .map_err(anyhow::Error::msg)?;
        let sq = |v: &f32| f64::from(*v) * f64::from(*v);
        let alignment =
            factors::alignment(e.signal, w.iter().map(sq).sum(), x.iter().map(sq).sum());
        let (c_x, c_w) = (
            factors::row_concentration(x),
            factors::row_concentration(w.view()),
        );
        let spec = &self.probe.weights;
        let modelled = spec.format == Format::Int && spec.granularity == Granularity::Channel;
        let predicted_db = modelled.then(|| {
            factors::predicted_sqnr_db(
                site.k,
                alignment,
                self.probe
                    .act
                    .map(|a| (c_x, factors::relative_step(a.bits, a.symmetric))),
                (c_w, factors::relative_step(spec.bits, spec.symmetric)),
            )
        });
        let b = if bound {
            let gram = stats
                .gram()
                .context("the first stage's statistics have no Gram matrix")?;
            let gram = gram.as_standard_layout();
            Some(
                factors::alignment_bound(gram.as_slice().expect("standard"), w.view())
                    .map_err(|e| anyhow::anyhow!("the alignment bound: {e}"))?,
            )
        } else {
            None
        };
        Ok((
            Measure {
                sqnr_db: e.sqnr_db(),
                predicted_db,
                c_x,
                c_w,
                alignment,
            },
            b,
        ))
    }

    /// Layers by kind: the name with every run of digits replaced by `#`
    /// (`layers.#.mlp.down_proj`), in order of first appearance.
    fn kinds(&self) -> Vec<(String, Vec<usize>)> {
        let mut out: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, l) in self.linears.iter().enumerate() {
            let mut kind = String::new();
            let mut digits = false;
            for ch in l.name.chars() {
                if ch.is_ascii_digit() {
                    if !digits {
                        kind.push('#');
                    }
                    digits = true;
                } else {
                    kind.push(ch);
                    digits = false;
                }
            }
            match out.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, v)) => v.push(i),
                None => out.push((kind, vec![i])),
            }
        }
        out
    }

    /// Mean of `f` over the layers `of` measured at `stage`.
    fn mean(&self, of: &[usize], stage: usize, f: impl Fn(&Linear, &Measure) -> f64) -> f64 {
        let v: Vec<f64> = of
            .iter()
            .filter_map(|&i| {
                let l = &self.linears[i];
                l.stages[stage].as_ref().map(|m| f(l, m))
            })
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    }

    /// The text report: the summary by kind and stage, then every layer.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let act = match self.probe.act {
            Some(a) => format!(
                "A{} {} per token",
                a.bits,
                if a.symmetric { "sym" } else { "asym" }
            ),
            None => "float activations".into(),
        };
        let w = &self.probe.weights;
        let _ = writeln!(
            s,
            "SQNR of {} linear layers: W{} {:?} {:?} ({:?} scales, rounded to nearest), {act}, on {} sampled calibration rows each",
            self.linears.len(),
            w.bits,
            w.format,
            w.granularity,
            w.scale,
            self.rows
        );
        let _ = writeln!(s, "stages:");
        for (i, st) in self.stages.iter().enumerate() {
            let _ = writeln!(s, "  {i}  {st}");
        }
        let _ = writeln!(
            s,
            "\nmean by layer kind, per stage: SQNR dB, model dB, C(x), C(W), A / A*"
        );
        for (kind, of) in self.kinds() {
            let bound = self.mean(&of, 0, |l, _| l.bound.map_or(0.0, |b| b.bound));
            let _ = writeln!(s, "{kind}  ({} layers, A* {bound:.4})", of.len());
            for st in 0..self.stages.len() {
                let db = self.mean(&of, st, |_, m| m.sqnr_db);
                let pred = self.mean(&of, st, |_, m| m.predicted_db.unwrap_or(f64::NAN));
                let cx = self.mean(&of, st, |_, m| m.c_x);
                let cw = self.mean(&of, st, |_, m| m.c_w);
                let ratio = self.mean(&of, st, |l, m| {
                    l.bound
                        .map_or(f64::NAN, |b| m.alignment / b.bound.max(f64::MIN_POSITIVE))
                });
                let _ = writeln!(
                    s,
                    "  {st}  {db:7.2}  {pred:7.2}  {cx:.4}  {cw:.4}  {ratio:.3}"
                );
            }
        }
        let _ = writeln!(
            s,
            "\nper layer: stage, SQNR dB, model dB, C(x), C(W), A (A / A*)"
        );
        for l in &self.linears {
            let bound = l.bound.map_or("-".into(), |b| format!("{:.4}", b.bound));
            let _ = writeln!(s, "{}  [{} -> {}]  A* {bound}", l.name, l.k, l.n);
            for (st, m) in l.stages.iter().enumerate() {
                let Some(m) = m else {
                    let _ = writeln!(s, "  {st}  (not found)");
                    continue;
                };
                let pred = m.predicted_db.map_or("-".into(), |p| format!("{p:.2}"));
                let ratio = l
                    .bound
                    .map_or("-".into(), |b| format!("{:.3}", m.alignment / b.bound));
                let _ = writeln!(
                    s,
                    "  {st}  {:7.2}  {pred:>7}  {:.4}  {:.4}  {:.4} ({ratio})",
                    m.sqnr_db, m.c_x, m.c_w, m.alignment
                );
            }
        }
        s
    }

    /// The same as JSON.
    pub fn json(&self) -> serde_json::Value {
        let w = &self.probe.weights;
        json!({
            "quantizers": {
                "weights": {
                    "bits": w.bits,
                    "format": format!("{:?}", w.format),
                    "granularity": format!("{:?}", w.granularity),
                    "scale": format!("{:?}", w.scale),
                    "symmetric": w.symmetric,
                },
                "activations": self.probe.act.map(|a| json!({
                    "bits": a.bits,
                    "symmetric": a.symmetric,
                    "clip": a.clip,
                })),
            },
            "rows": self.rows,
            "stages": self.stages,
            "linears": self.linears.iter().map(|l| json!({
                "name": l.name,
                "k": l.k,
                "n": l.n,
                "alignment_bound": l.bound.map(|b| b.bound),
                "stages": l.stages.iter().map(|m| m.as_ref().map(|m| json!({
                    "sqnr_db": finite(m.sqnr_db),
                    "predicted_db": m.predicted_db.and_then(finite),
                    "c_x": m.c_x,
                    "c_w": m.c_w,
                    "alignment": m.alignment,
                }))).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}

/// JSON has no infinities (an exact layer's SQNR): `null`.
fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// The probe for `config`: its weight quantizer and its activation quantizer at clip 1
/// (the clip search and GPTQ are the quantizers' own refinements, not measured here).
pub fn probe(config: &QuantConfig) -> Probe {
    Probe {
        weights: config.weights,
        act: config.act.map(|a| TokenQuant { clip: 1.0, ..a }),
    }
}
