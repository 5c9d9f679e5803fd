//! `online-hadamard`: a block Hadamard rotation computed in the graph on the input of each
//! mlp region's sink (PeRQ's R3, before down_proj), with its transpose folded into the sink.
//!
//! Identity: `H_b` is orthogonal, so `W x = (W diag(H_b, ..)ᵀ)(diag(H_b, ..) x)`. The
//! rotation cannot fold into the sources (SiLU and the gate product do not commute with
//! it), so it is the online part of a channel transform ([`crate::transform::apply`] with
//! [`Placement::Online`]): an `ai.perqc::Hadamard(x, H_b)` node before the sink, which the
//! native runtime runs as a fast Walsh-Hadamard transform and export lowers to
//! Reshape -> MatMul -> Reshape. A permutation folded earlier (`permute`) lands in front of
//! it in the sources.
//!
//! Options: `block=B` (default 32; must divide the region's width: the error lists the sizes
//! that do; `full`: one Hadamard of the whole width, a dense product unless it is a power of
//! two), `signs=SEED` (randomized `H · diag(s)`). Counters: `regions-rotated`,
//! `nodes-inserted`. A layer whose output channels formed no region at all
//! ([`Regions::unformed`]) gets a note naming the barrier that stopped them.

use crate::regions::{Region, RegionKind, Regions};
use crate::transform::{self, ChannelOp, Placement};
use perqc_ir::{Graph, Model, OptionError, Pass, PassContext, PassError, PassOptions, PassOutcome};

#[derive(Debug)]
pub struct OnlineHadamard {
    /// `None`: the region's whole width.
    block: Option<usize>,
    signs: Option<u64>,
}

impl OnlineHadamard {
    pub const NAME: &'static str = "online-hadamard";
    pub const DESCRIPTION: &'static str = "rotate each mlp region's sink input by a block Hadamard computed in the graph, its transpose folded into the sink (exact); options block=B|full, signs=SEED";

    pub fn from_options(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        opts.allow_only(&["block", "signs"])?;
        let signs = transform::seed_option(opts, "signs")?;
        let block = match opts.get("block") {
            Some("full") => None,
            _ => {
                Some(opts.parse_or("block", "a block size (positive integer) or full", 32usize)?)
            }
        };
        Ok(Box::new(OnlineHadamard { block, signs }))
    }

    /// That the block fits mlp region `i` (an error naming the region otherwise).
    fn fits(&self, i: usize, region: &Region) -> Result<(), PassError> {
        ChannelOp::hadamard_fits(region.dim, self.block.unwrap_or(region.dim)).map_err(|e| {
            PassError::msg(format!(
                "online-hadamard: region #{i} (mlp, d = {}): {e}",
                region.dim
            ))
        })
    }
}

/// Puts the block Hadamard of `block` channels (`None`: the whole width) in front of one
/// region's sinks, its transpose folded into them.
pub fn rotate_region(
    graph: &mut Graph,
    region: &Region,
    block: Option<usize>,
    signs: Option<u64>,
) -> Result<transform::Applied, String> {
    let op = ChannelOp::hadamard(region.dim, block.unwrap_or(region.dim), signs)
        .map_err(|e| e.to_string())?;
    transform::apply(graph, region, &op, Placement::Online)
}

impl Pass for OnlineHadamard {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn description(&self) -> &'static str {
        Self::DESCRIPTION
    }

    fn check(&self, model: &Model, ctx: &mut PassContext) -> Result<(), PassError> {
        let regions = ctx.analysis::<Regions>(model)?;
        for (i, region) in regions.regions.iter().enumerate() {
            if region.kind == RegionKind::Mlp {
                self.fits(i, region)?;
            }
        }
        Ok(())
    }

    fn run(&mut self, model: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        if transform::already_applied(model, ctx, Self::NAME) {
            return Ok(PassOutcome::from_changed(false));
        }
        let regions = ctx.analysis::<Regions>(model)?;
        for why in regions.unformed_notes() {
            ctx.note(format!("{why}: no online Hadamard there"));
        }
        let (mut rotated, mut nodes) = (0u64, 0u64);
        for (i, region) in regions.regions.iter().enumerate() {
            if region.kind != RegionKind::Mlp {
                continue;
            }
            let what = format!("region #{i} (mlp, d = {})", region.dim);
            // A block that does not fit is an error; a region that refuses is a note.
            self.fits(i, region)?;
            if !ctx.rewrite() {
                break;
            }
            match rotate_region(&mut model.graph, region, self.block, self.signs) {
                Ok(a) => {
                    rotated += 1;
                    nodes += a.online_nodes as u64;
                }
                Err(why) => ctx.note(format!("{what}: {why}")),
            }
        }
        if rotated > 0 {
            transform::record_applied(model, Self::NAME);
        }
        Ok(PassOutcome::from_changed(rotated > 0)
            .with("regions-rotated", rotated)
            .with("nodes-inserted", nodes))
    }
}
