//! `permute`: calibrated channel permutations folded into the weights (PeRQ's first step).
//!
//! Identity: a permutation `P` commutes with every elementwise op, so on a region that
//! allows permutations it folds into the sources (`P W`) and sinks (`W Pᵀ`) through the
//! one channel-transform mechanism; no permutation op remains in the graph.
//!
//! The permutation is chosen per region from the channel statistics of what the region's
//! sinks read (a `Calibration` resource, [`crate::calibration`]), by
//! [`crate::permutation::PermuteMethod`]: MassDiff (the default) spreads the mean |x| evenly
//! over blocks of `block` channels, the blocks a later online Hadamard rotates. Regions:
//! `mlp=true` (the down_proj inputs, the paper's case), `residual=true` (one permutation
//! for the whole stream, from all its readers' inputs), `heads=true` (within each
//! key/value head of the value/output regions, the same for the query heads that share it).
//!
//! A region's statistics are those of the values its rotation's blocks will hold: where a
//! sink reads an RMS norm's output, the norm's γ is divided out (`fold-norms` moves it into
//! the sinks, leaving `x / rms(x)` on the stream). A calibrated method leaves the residual
//! stream as it is, with a note, where the block does not split it into two or more blocks
//! (R1 is a full rotation there, which no permutation changes).
//!
//! A region that refuses permutations gets a note with its reason, and so does a layer
//! whose output channels formed no region at all ([`Regions::unformed`]: the barrier that
//! stopped them).
//!
//! Counters: `regions-permuted`, `weights-rewritten`.

use crate::calibration::Calibration;
use crate::permutation::{PermuteMethod, check_block, permutation_from, permutation_from_profiles};
use crate::regions::{Region, RegionKind, Regions};
use crate::transform::{self, ChannelOp, Placement};
use perqc_ir::{Graph, Model, OptionError, Pass, PassContext, PassError, PassOptions, PassOutcome};
use perqc_ops::stats::ChannelStats;
use rayon::prelude::*;
use std::borrow::Cow;

#[derive(Debug)]
pub struct Permute {
    method: PermuteMethod,
    block: usize,
    kinds: Vec<RegionKind>,
}

impl Permute {
    pub const NAME: &'static str = "permute";
    pub const DESCRIPTION: &'static str = "fold calibrated channel permutations into the weights (exact); options method=massdiff|tokenmax|zigzag|absmax|random|identity, seed=N, block=B, mlp=true, residual=false, heads=false";

    pub fn from_options(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        opts.allow_only(&["method", "seed", "block", "mlp", "residual", "heads"])?;
        let name = opts.choice_or(
            "method",
            &[
                "massdiff", "tokenmax", "zigzag", "absmax", "random", "identity",
            ],
            "massdiff",
        )?;
        let method = match name {
            "random" => PermuteMethod::Random {
                seed: opts.parse_or("seed", "a seed (non-negative integer)", 0u64)?,
            },
            other => other.parse().expect("one of the listed names"),
        };
        let block = opts.parse_or("block", "a block size (positive integer)", 32usize)?;
        let mut kinds = Vec::new();
        for (opt, kind, default) in [
            ("mlp", RegionKind::Mlp, true),
            ("residual", RegionKind::Residual, false),
            ("heads", RegionKind::AttentionVo, false),
        ] {
            if opts.bool_or(opt, default)? {
                kinds.push(kind);
            }
        }
        Ok(Box::new(Permute {
            method,
            block,
            kinds,
        }))
    }
}

/// The value names whose statistics `permute` reads for regions of `kinds`: what their
/// sinks read. Calibrate these before the pipeline.
pub fn calibration_values(regions: &Regions, kinds: &[RegionKind]) -> Vec<String> {
    let mut out = Vec::new();
    for r in regions.regions.iter().filter(|r| kinds.contains(&r.kind)) {
        for name in sink_activations(r) {
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

/// The activations one region's sinks read (whose statistics choose its permutation).
pub fn sink_activations(region: &Region) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in &region.sinks {
        if let Some((_, v)) = e.activation {
            let name = region.activation_name(v).to_string();
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

/// One activation a region's sinks read: the region channel of each index, its statistics,
/// its name.
pub(crate) type SinkStats<'a> = (&'a [u32], &'a ChannelStats, &'a str);

/// Each distinct activation the region's sinks read: the region channel of each of its
/// indices, its statistics and its name. An error names an activation without statistics
/// or with another channel count.
pub(crate) fn sink_stats<'a>(
    region: &'a Region,
    calib: &'a Calibration,
) -> Result<Vec<SinkStats<'a>>, String> {
    let mut out: Vec<SinkStats<'a>> = Vec::new();
    for e in &region.sinks {
        let Some((_, v)) = e.activation else { continue };
        let name = region.activation_name(v);
        if out.iter().any(|o| o.2 == name) {
            continue;
        }
        let stats = calib.get(name).ok_or_else(|| {
            format!("no calibration statistics for `{name}` (calibrate with --calib-text or --calib-ids)")
        })?;
        if stats.channels() != e.channels.len() {
            return Err(format!(
                "statistics of `{name}` have {} channels, the region reads {}",
                stats.channels(),
                e.channels.len()
            ));
        }
        out.push((&e.channels, stats, name));
    }
    Ok(out)
}

/// Per region channel: the summed mean |x| and the largest |x| over what the sinks read.
pub(crate) fn masses(region: &Region, calib: &Calibration) -> Result<(Vec<f64>, Vec<f32>), String> {
    let mut mean = vec![0f64; region.dim];
    let mut max = vec![0f32; region.dim];
    for (channels, stats, _) in sink_stats(region, calib)? {
        for ((&c, m), &x) in channels.iter().zip(stats.mean_abs()).zip(stats.max_abs()) {
            mean[c as usize] += m;
            max[c as usize] = max[c as usize].max(x);
        }
    }
    Ok((mean, max))
}

/// The sampled row profiles of every activation the region's sinks read, stacked, in
/// region channel order: `[Σ rows, dim]`. An error names an activation without profiles.
pub(crate) fn sink_profiles(
    region: &Region,
    calib: &Calibration,
) -> Result<ndarray::Array2<u8>, String> {
    let sinks = sink_stats(region, calib)?;
    let total: usize = sinks.iter().map(|(_, s, _)| s.profiles().nrows()).sum();
    let mut out = ndarray::Array2::<u8>::zeros((total, region.dim));
    let mut at = 0;
    for (channels, stats, name) in sinks {
        let profiles = stats.profiles();
        if profiles.nrows() == 0 {
            return Err(format!(
                "no sampled row profiles of `{name}` (the statistics were gathered without profile_every)"
            ));
        }
        for (r, profile) in profiles.outer_iter().enumerate() {
            let mut row = out.row_mut(at + r);
            for (&c, &q) in channels.iter().zip(profile) {
                row[c as usize] = q;
            }
        }
        at += profiles.nrows();
    }
    Ok(out)
}

/// The statistics of `region`'s sink activations with the γ of the norm producing each
/// divided out, as `fold-norms` leaves them (`stats_c / |γ_c|`); the given statistics where
/// no sink reads a norm with a non-uniform γ. A γ with a zero is left in (`fold-norms`
/// leaves that norm as well).
fn without_gammas<'a>(
    graph: &Graph,
    region: &Region,
    calib: &'a Calibration,
) -> Result<Cow<'a, Calibration>, String> {
    // |γ| per region channel, by the node of each norm whose γ is not uniform.
    let mut gammas: Vec<(perqc_ir::NodeId, Vec<f64>)> = Vec::new();
    for p in &region.params {
        let Some(Ok(gamma)) = graph.const_tensor(p.weight).map(|t| t.to_f32()) else {
            continue;
        };
        let uniform = gamma.iter().all(|&g| g == gamma[0]);
        if uniform || gamma.len() != p.channels.len() || gamma.iter().any(|&g| !g.is_normal()) {
            continue;
        }
        let mut by_channel = vec![1f64; region.dim];
        for (&c, &g) in p.channels.iter().zip(&gamma) {
            by_channel[c as usize] = f64::from(g.abs());
        }
        gammas.push((p.node, by_channel));
    }
    if gammas.is_empty() {
        return Ok(Cow::Borrowed(calib));
    }
    let mut out = Calibration::new(calib.source().clone());
    for e in &region.sinks {
        let Some((_, v)) = e.activation else { continue };
        let name = region.activation_name(v);
        if out.contains(name) {
            continue;
        }
        let Some(stats) = calib.get(name) else {
            continue;
        };
        let mut stats = stats.clone();
        let producer = graph.value(v).producer().map(|(n, _)| n);
        if let Some((_, g)) = gammas.iter().find(|(n, _)| Some(*n) == producer) {
            let divisor: Vec<f64> = e.channels.iter().map(|&c| g[c as usize]).collect();
            stats.divide_channels(&divisor).map_err(|e| e.to_string())?;
        }
        out.insert(name, stats);
    }
    Ok(Cow::Owned(out))
}

/// The largest block's share of the mass over the mean block's: `max_k Σ_{c∈B_k} m_c` /
/// `(Σ_c m_c / blocks)` for consecutive blocks of `b` channels (1 when perfectly even).
fn block_spread(mass: &[f64], b: usize) -> f64 {
    let b = b.clamp(1, mass.len().max(1));
    let sums: Vec<f64> = mass.chunks(b).map(|c| c.iter().sum()).collect();
    let mean = sums.iter().sum::<f64>() / sums.len().max(1) as f64;
    let max = sums.iter().fold(0f64, |m, &v| m.max(v));
    if mean > 0.0 { max / mean } else { 1.0 }
}

/// With the environment variable `PERQC_DUMP_PERMUTATIONS` set to a file, appends one JSON
/// line per calibrated region: its first sink activation, the block, each channel's mass
/// and the permutation chosen (`scripts/bench/permute_seqs.py` reads them). A diagnostic:
/// a file that cannot be written is reported on stderr and otherwise ignored.
fn dump_permutation(region: &Region, mass: &[f64], perm: &[usize], block: usize) {
    let Some(path) = std::env::var_os("PERQC_DUMP_PERMUTATIONS") else {
        return;
    };
    let activation = region.sinks.iter().find_map(|e| {
        e.activation
            .map(|(_, v)| region.activation_name(v).to_string())
    });
    let line = serde_json::json!({
        "activation": activation,
        "block": block,
        "mass": mass,
        "perm": perm,
    });
    let written = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()));
    if let Err(e) = written {
        eprintln!("PERQC_DUMP_PERMUTATIONS: {}: {e}", path.to_string_lossy());
    }
}

impl Permute {
    /// Permutations of the mlp regions by `method`, in blocks of `block`.
    pub fn mlp(method: PermuteMethod, block: usize) -> Permute {
        Permute {
            method,
            block,
            kinds: vec![RegionKind::Mlp],
        }
    }

    /// The method choosing the permutations.
    pub fn method(&self) -> PermuteMethod {
        self.method
    }

    /// What `run` does with `region`: `Ok(true)` permutes it, `Ok(false)` passes over a
    /// region of another kind (or one that takes online rotations only) in silence,
    /// `Err(why)` skips it with a note.
    fn selects(&self, region: &Region) -> Result<bool, String> {
        if !self.kinds.contains(&region.kind) || region.online_only.is_some() {
            return Ok(false);
        }
        if let Some(why) = region.why_not(crate::regions::TransformKind::Permutation) {
            return Err(format!("no permutation: {why}"));
        }
        let b = self.block;
        let splits = b < region.dim && region.dim.is_multiple_of(b);
        if region.kind == RegionKind::Residual && self.method.uses_statistics() && !splits {
            return Err(format!(
                "no permutation: a block of {b} does not split it (its rotation is full)"
            ));
        }
        Ok(true)
    }

    /// The channels one permutation covers (a head's within value/output regions, else the
    /// region's) and the block within them.
    fn group_and_block(&self, region: &Region) -> (usize, usize) {
        let group = region.heads.map_or(region.dim, |h| h.head_dim);
        (group, self.block.min(group))
    }

    /// The permutation of one region: per group (key/value head) if it has heads.
    fn choose(&self, region: &Region, calib: Option<&Calibration>) -> Result<ChannelOp, String> {
        let calib = match self.method.uses_statistics() {
            true => Some(calib.ok_or(
                "method needs calibration statistics (--calib-text or --calib-ids); \
                 random and identity do not",
            )?),
            false => None,
        };
        let (mean, max) = match calib {
            Some(calib) => masses(region, calib)?,
            None => (vec![0.0; region.dim], vec![0.0; region.dim]),
        };
        let (group, block) = self.group_and_block(region);
        let profiles = match self.method.uses_profiles() {
            true => Some(sink_profiles(
                region,
                calib.expect("profiles are statistics"),
            )?),
            false => None,
        };
        let mut perm = Vec::with_capacity(region.dim);
        for g in 0..region.dim / group {
            let r = g * group..(g + 1) * group;
            let p = match &profiles {
                Some(profiles) => permutation_from_profiles(
                    self.method,
                    profiles.slice(ndarray::s![.., r.clone()]),
                    block,
                ),
                None => permutation_from(self.method, &mean[r.clone()], &max[r], block),
            }
            .map_err(|e| e.to_string())?;
            perm.extend(p.into_iter().map(|i| i + g * group));
        }
        Ok(ChannelOp::Permutation(perm))
    }

    /// Chooses one region's permutation and folds it into the region's weights (the region
    /// must admit permutations: [`Region::why_not`]). Returns what the mechanism did and,
    /// for a calibrated method on a region without heads, the block mass spread (max /
    /// mean block mass) before and after.
    pub fn apply_region(
        &self,
        graph: &mut Graph,
        region: &Region,
        calib: Option<&Calibration>,
    ) -> Result<(transform::Applied, Option<(f64, f64)>), String> {
        let calib = match calib {
            Some(c) => Some(without_gammas(graph, region, c)?),
            None => None,
        };
        let calib = calib.as_deref();
        let (op, spread) = self.plan_region(region, calib)?;
        self.dump(region, calib, &op);
        let a = transform::apply(graph, region, &op, Placement::Fold)?;
        Ok((a, spread))
    }

    /// [`dump_permutation`] of a calibrated region's permutation, in the order the regions
    /// are folded.
    fn dump(&self, region: &Region, calib: Option<&Calibration>, op: &ChannelOp) {
        if let (Some(c), ChannelOp::Permutation(perm)) = (calib, op)
            && self.method.uses_statistics()
            && region.heads.is_none()
            && std::env::var_os("PERQC_DUMP_PERMUTATIONS").is_some()
            && let Ok((mean, _)) = masses(region, c)
        {
            dump_permutation(region, &mean, perm, self.block);
        }
    }

    /// One region's permutation and its block mass spread before and after (see
    /// [`Permute::apply_region`]); reads the graph not at all, so regions plan in parallel.
    fn plan_region(
        &self,
        region: &Region,
        calib: Option<&Calibration>,
    ) -> Result<(ChannelOp, Option<(f64, f64)>), String> {
        let op = self.choose(region, calib)?;
        let mut spread = None;
        if let (Some(c), ChannelOp::Permutation(perm)) = (calib, &op)
            && self.method.uses_statistics()
            && region.heads.is_none()
            && let Ok((mean, _)) = masses(region, c)
        {
            let after: Vec<f64> = perm.iter().map(|&i| mean[i]).collect();
            spread = Some((
                block_spread(&mean, self.block),
                block_spread(&after, self.block),
            ));
        }
        Ok((op, spread))
    }

    /// The note on the block mass spread over the regions permuted (`None` if none).
    pub fn spread_note(&self, spread: &[(f64, f64)]) -> Option<String> {
        if spread.is_empty() {
            return None;
        }
        let n = spread.len() as f64;
        let (b, a) = spread
            .iter()
            .fold((0.0, 0.0), |(x, y), (p, q)| (x + p, y + q));
        Some(format!(
            "{}: max / mean mass of a block of {}: {:.2} before, {:.2} after (mean over {} regions)",
            self.method,
            self.block,
            b / n,
            a / n,
            spread.len()
        ))
    }
}

/// How notes and errors name region `i`.
fn describe(i: usize, region: &Region) -> String {
    format!("region #{i} ({}, d = {})", region.kind.as_str(), region.dim)
}

impl Pass for Permute {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn description(&self) -> &'static str {
        Self::DESCRIPTION
    }

    fn check(&self, model: &Model, ctx: &mut PassContext) -> Result<(), PassError> {
        let regions = ctx.analysis::<Regions>(model)?;
        for (i, region) in regions.regions.iter().enumerate() {
            if self.selects(region) == Ok(true) {
                let (group, block) = self.group_and_block(region);
                check_block(block, group).map_err(|e| {
                    PassError::msg(format!("permute: {}: {e}", describe(i, region)))
                })?;
            }
        }
        Ok(())
    }

    fn run(&mut self, model: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        if transform::already_applied(model, ctx, Self::NAME) {
            return Ok(PassOutcome::from_changed(false));
        }
        let regions = ctx.analysis::<Regions>(model)?;
        if self.kinds.contains(&RegionKind::Mlp) || self.kinds.contains(&RegionKind::AttentionVo) {
            for why in regions.unformed_notes() {
                ctx.note(format!("{why}: no permutation there"));
            }
        }
        let (mut permuted, mut total) = (0u64, transform::Applied::default());
        // Max block mass over mean block mass, before and after, per permuted region.
        let mut spread: Vec<(f64, f64)> = Vec::new();
        // The regions to permute, then their permutations (in parallel: a calibrated
        // choice can take a while per region), then the folds, in region order.
        let mut chosen: Vec<(String, &Region)> = Vec::new();
        for (i, region) in regions.regions.iter().enumerate() {
            let what = describe(i, region);
            match self.selects(region) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(why) => {
                    ctx.note(format!("{what}: {why}"));
                    continue;
                }
            }
            if !ctx.rewrite() {
                break;
            }
            chosen.push((what, region));
        }
        // Borrowed, not copied (sampled rows can be large), but where a norm's γ is divided
        // out of a region's statistics.
        let calib = ctx.resource::<Calibration>();
        let calibs = chosen
            .iter()
            .map(|(what, region)| match calib {
                Some(c) if self.method.uses_statistics() => without_gammas(&model.graph, region, c)
                    .map(Some)
                    .map_err(|e| PassError::msg(format!("permute: {what}: {e}"))),
                _ => Ok(calib.map(Cow::Borrowed)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let plans: Vec<_> = chosen
            .par_iter()
            .zip(&calibs)
            .map(|((_, region), calib)| self.plan_region(region, calib.as_deref()))
            .collect();
        for (((what, region), plan), calib) in chosen.iter().zip(plans).zip(&calibs) {
            let fail = |e: String| PassError::msg(format!("permute: {what}: {e}"));
            let (op, s) = plan.map_err(fail)?;
            self.dump(region, calib.as_deref(), &op);
            let a =
                transform::apply(&mut model.graph, region, &op, Placement::Fold).map_err(fail)?;
            spread.extend(s);
            if a != transform::Applied::default() {
                permuted += 1;
                total += a;
            }
        }
        if permuted > 0 {
            transform::record_applied(model, Self::NAME);
        }
        if let Some(note) = self.spread_note(&spread) {
            ctx.note(note);
        }
        Ok(PassOutcome::from_changed(permuted > 0)
            .with("regions-permuted", permuted)
            .with("weights-rewritten", (total.rewritten + total.untied) as u64))
    }
}
