//! `rotate`: fold orthogonal Hadamard rotations into the weights of the residual stream
//! (R1) and of each attention value/output pair per head (R2).
//!
//! Identity: for a region whose ops commute with orthogonal maps (after `fold-norms`, RMS
//! norms do: `rms(Q x) = rms(x)`), the transform `Q` takes every source to `Q W` and every
//! sink to `W Qᵀ` (`Q⁻ᵀ = Q`); the stream between carries `Q x` and the sinks compute what
//! they did. Through the one channel-transform mechanism ([`crate::transform::apply`]).
//!
//! - R1 (`residual=full`): `Q = H_d` on the model dimension (Hadamard orders from
//!   `perqc_ops::hadamard`, Kronecker products included: 576 = 36 · 16); `residual=block`
//!   uses `diag(H_b, ..)` with `block=b`, or the full rotation, with a note, where b does
//!   not divide d into two or more blocks; `none` skips it.
//! - R2 (`heads=full`): `Q = diag(H_dh, ..)`, one head-dim Hadamard per key/value head; the
//!   query heads that read a key/value head's values get the same block on the output
//!   projection's input (grouped-query attention). `heads=block`: blocks of `b` within each
//!   head where b divides the head dimension into two or more, else the whole head.
//! - `signs=SEED`: randomized Hadamards `H · diag(s)` with seeded random signs.
//! - `core=M`: R1's full Hadamard built as `H_M ⊗ Sylvester(d / M)` from core order `M`
//!   (`perqc_ops::hadamard::cores` lists them; 576 has 36, 72, 144, 288 and 576): equally
//!   exact, but they spread outliers differently (docs/results.md measures them). A width
//!   without that core gets the default construction, with a note.
//!
//! - R2 online: where the value heads cannot take a folded rotation (GroupQueryAttention:
//!   packed heads; values that leave the graph as the key/value cache, packed or not;
//!   any other barrier on the value channels), the region analysis reports the
//!   linears reading the attention output as an online-only region
//!   ([`Region::online_only`](crate::regions::Region)); R2 is then the same per-head
//!   Hadamard computed on their input (`ai.perqc::Hadamard`, block = head dim, or `b`
//!   with `heads=block`) with its transpose folded into their weights
//!   ([`Placement::Online`]): exact, and v_proj and the cache are untouched. One grouped
//!   note says where and why.
//!
//! A region that does not allow rotations is skipped with a note giving the region's
//! reason (a LayerNorm mean, an unfolded gamma, the stream entering as a graph input); a
//! layer whose output channels formed no region at all (a barrier before any weight read
//! them: [`Regions::unformed`]) gets a note naming the barrier.
//! Counters: `residual-rotated`, `heads-rotated`, `heads-rotated-online`,
//! `weights-rewritten`, `weights-untied`.

use crate::regions::{RegionKind, Regions};
use crate::transform::{self, ChannelOp, Placement};
use perqc_ir::{Model, OptionError, Pass, PassContext, PassError, PassOptions, PassOutcome};

#[derive(Debug)]
pub struct Rotate {
    /// `None`: no R1; `Some(None)`: full; `Some(Some(b))`: blocks of b.
    residual: Option<Option<usize>>,
    /// `None`: no R2; `Some(None)`: one Hadamard per head; `Some(Some(b))`: blocks of b.
    heads: Option<Option<usize>>,
    signs: Option<u64>,
    /// Core order of R1's Hadamard; `None`: the default construction.
    core: Option<usize>,
}

impl Rotate {
    pub const NAME: &'static str = "rotate";
    pub const DESCRIPTION: &'static str = "fold Hadamard rotations into the residual stream (R1) and per-head value/output weights (R2) (exact); options residual=full|block|none, block=B, heads=full|block|none, signs=SEED, core=M";

    pub fn from_options(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        opts.allow_only(&["residual", "block", "heads", "signs", "core"])?;
        let block = opts.parse_or("block", "a block size", 32usize)?;
        let kind = |name: &str| -> Result<Option<Option<usize>>, OptionError> {
            Ok(
                match opts.choice_or(name, &["full", "block", "none"], "full")? {
                    "none" => None,
                    "full" => Some(None),
                    _ => Some(Some(block)),
                },
            )
        };
        let residual = kind("residual")?;
        let heads = kind("heads")?;
        let signs = transform::seed_option(opts, "signs")?;
        let core = match opts.get("core") {
            None => None,
            Some(v) => {
                let m = opts.parse_or("core", "a Hadamard core order", 0usize)?;
                // No width has a core of an order with no Hadamard matrix.
                if !perqc_ops::hadamard::constructible(m) {
                    return Err(OptionError::Invalid {
                        pass: Self::NAME.into(),
                        option: "core".into(),
                        value: v.into(),
                        expected:
                            "the order of a Hadamard matrix perqc builds (1, 2 or a multiple of 4)"
                                .into(),
                    });
                }
                Some(m)
            }
        };
        Ok(Box::new(Rotate {
            residual,
            heads,
            signs,
            core,
        }))
    }
}

/// Whether blocks of `b` split `dim` channels into two or more.
fn splits(dim: usize, b: usize) -> bool {
    b > 0 && b < dim && dim.is_multiple_of(b)
}

impl Pass for Rotate {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn description(&self) -> &'static str {
        Self::DESCRIPTION
    }

    fn run(&mut self, model: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        if transform::already_applied(model, ctx, Self::NAME) {
            return Ok(PassOutcome::from_changed(false));
        }
        let regions = ctx.analysis::<Regions>(model)?;
        if self.heads.is_some() {
            // Channels stopped at an op whose result takes R2 online are said below.
            let online_at: Vec<&str> = regions
                .online_only()
                .filter_map(|r| r.online_only.as_ref()?.at.as_deref())
                .collect();
            let stopped = Regions {
                regions: Vec::new(),
                unformed: regions
                    .unformed
                    .iter()
                    .filter(|u| {
                        !u.blockers
                            .iter()
                            .any(|b| b.at.as_deref().is_some_and(|a| online_at.contains(&a)))
                    })
                    .cloned()
                    .collect(),
            };
            for why in stopped.unformed_notes() {
                ctx.note(format!("{why}: no value/output head rotation there"));
            }
        }
        let online_sinks: std::collections::HashSet<perqc_ir::NodeId> = regions
            .online_only()
            .flat_map(|r| r.sinks.iter().map(|e| e.node))
            .collect();
        let (mut residual, mut heads, mut online) = (0u64, 0u64, 0u64);
        // R2 applied online, grouped for the notes by cause.
        let mut online_notes: Vec<(Option<String>, String)> = Vec::new();
        let mut total = transform::Applied::default();
        for (i, region) in regions.regions.iter().enumerate() {
            let op = match (region.kind, self.residual, region.heads) {
                (RegionKind::Residual, Some(block), _) => {
                    let block = block.and_then(|b| {
                        let fits = splits(region.dim, b);
                        if !fits {
                            ctx.note(format!(
                                "R1: a block of {b} does not split {} channels into blocks; the full rotation is used",
                                region.dim
                            ));
                        }
                        fits.then_some(b)
                    });
                    // A core the width does not have falls back to the default, with a
                    // note (a preferred core from the CLI fits some widths only).
                    let core = self.core.filter(|&m| {
                        let fits = perqc_ops::hadamard::cores(region.dim).contains(&m);
                        let choice = !perqc_ops::hadamard::cores(region.dim).is_empty();
                        if !fits && block.is_none() && choice {
                            ctx.note(format!(
                                "R1: {m} is not a Hadamard core of order {}; the default construction is used",
                                region.dim
                            ));
                        }
                        fits
                    });
                    ChannelOp::hadamard_with_core(
                        region.dim,
                        block.unwrap_or(region.dim),
                        if block.is_none() { core } else { None },
                        self.signs,
                    )
                }
                (RegionKind::AttentionVo, _, Some(h))
                    if self.heads.is_some() && region.online_only.is_some() =>
                {
                    let block = self
                        .heads
                        .flatten()
                        .filter(|&b| splits(h.head_dim, b))
                        .unwrap_or(h.head_dim);
                    let what = format!(
                        "region #{i} ({}, d = {}, online only)",
                        region.kind.as_str(),
                        region.dim
                    );
                    if let Some(b) = region.barriers.first() {
                        ctx.note(format!(
                            "{what}: no online value/output head rotation: {}",
                            b.at.as_ref()
                                .map_or(b.reason.clone(), |at| format!("{at}: {}", b.reason))
                        ));
                        continue;
                    }
                    let op = ChannelOp::hadamard(region.dim, block, self.signs)
                        .map_err(|e| PassError::msg(format!("rotate: {what}: {e}")))?;
                    if !ctx.rewrite() {
                        break;
                    }
                    match transform::apply(&mut model.graph, region, &op, Placement::Online) {
                        Ok(a) => {
                            total += a;
                            online += 1;
                            let cause = region.online_only.as_ref().expect("matched");
                            let at = cause.at.as_deref().unwrap_or("?");
                            let key = format!(
                                "{}|{}|{}|{block}",
                                crate::regions::op_of(at),
                                cause.reason,
                                region.dim
                            );
                            let sink = region
                                .sinks
                                .first()
                                .map_or("?", |e| region.node_name(e.node));
                            let line = format!(
                                "R2 online: a Hadamard of {block} channels per head computed on the input of {sink}, its transpose folded into the weight: the heads of {at} cannot take a folded rotation ({})",
                                cause.reason
                            );
                            online_notes.push((Some(key), line));
                        }
                        Err(why) => ctx.note(format!("{what}: {why}")),
                    }
                    continue;
                }
                // Blocked heads whose linears take R2 online (below): said there.
                (RegionKind::AttentionVo, _, Some(_))
                    if self.heads.is_some()
                        && !region.barriers.is_empty()
                        && region.sinks.iter().all(|e| online_sinks.contains(&e.node)) =>
                {
                    continue;
                }
                (RegionKind::AttentionVo, _, Some(h)) if self.heads.is_some() => {
                    let block = self
                        .heads
                        .flatten()
                        .filter(|&b| splits(h.head_dim, b))
                        .unwrap_or(h.head_dim);
                    ChannelOp::hadamard(region.dim, block, self.signs)
                }
                _ => continue,
            };
            let what = format!("region #{i} ({}, d = {})", region.kind.as_str(), region.dim);
            let op = op.map_err(|e| PassError::msg(format!("rotate: {what}: {e}")))?;
            if !ctx.rewrite() {
                break;
            }
            match transform::apply(&mut model.graph, region, &op, Placement::Fold) {
                Ok(a) => {
                    total += a;
                    match region.kind {
                        RegionKind::Residual => residual += 1,
                        _ => heads += 1,
                    }
                }
                Err(why) => ctx.note(format!("{what}: {why}")),
            }
        }
        for line in crate::regions::grouped_notes(online_notes) {
            ctx.note(line);
        }
        if residual + heads + online > 0 {
            transform::record_applied(model, Self::NAME);
        }
        Ok(PassOutcome::from_changed(residual + heads + online > 0)
            .with("residual-rotated", residual)
            .with("heads-rotated", heads)
            .with("heads-rotated-online", online)
            .with("weights-rewritten", total.rewritten as u64)
            .with("weights-untied", total.untied as u64))
    }
}
