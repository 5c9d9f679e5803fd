//! `fold-norms`: fold each RMS norm's gamma into the weights that read the norm, so the
//! norm becomes `x / rms(x)`, which commutes with every rotation of the residual stream.
//!
//! Identity: for a norm `y = n(x) ⊙ γ` read only by linear layers `z = V y`, the channel
//! transform `T = diag(1/γ)` on the norm's output segment takes γ to `T γ = 1` (its source
//! side) and each reader to `V T⁻¹ = V diag(γ)` (its sink side); `z` is unchanged. It goes
//! through the one channel-transform mechanism ([`crate::transform::apply`]) on the segment
//! [`Regions::trace_from`] finds from γ.
//!
//! A norm is left as it is, with a note saying why, when its output also feeds something
//! other than linear readers (a post-norm residual), when γ has a zero, or when it is
//! already uniform. With `rotatable-only=true` (the recipe's) a region's norms fold only
//! when all of them do: one γ left keeps rotations off the region, and folding the others
//! without a rotation only moves their outliers into the weights' input columns (W4A4 on
//! the Gemma-like fixture: q/k/v output SQNR 15 -> 4 dB). A tied embedding/lm_head is untied by the mechanism only here, where the
//! final norm's γ changes the lm_head side alone. LayerNorm's mean subtraction is not
//! rotation-invariant; its regions stay blocked for rotations (the region says so) unless
//! `center-stream` (before this pass in the recipe) made a residual stream's LayerNorms RMS
//! norms.
//!
//! Counters: `norms-folded`, `weights-rewritten`, `weights-untied`.

use crate::regions::{RegionKind, Regions};
use crate::transform::{self, ChannelOp, Placement};
use perqc_ir::{Model, OptionError, Pass, PassContext, PassError, PassOptions, PassOutcome};
use perqc_ops::ShapeMap;

#[derive(Debug, Default)]
pub struct FoldNorms {
    /// Fold a region's gammas only when every one of them folds (so a rotation can follow).
    rotatable_only: bool,
}

impl FoldNorms {
    pub const NAME: &'static str = "fold-norms";
    pub const DESCRIPTION: &'static str = "fold RMS norm gammas into the linear layers that read the norms (exact); rotatable-only=true folds a region's gammas only when all of them fold, so that a rotation can follow";

    pub fn from_options(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        opts.allow_only(&["rotatable-only"])?;
        Ok(Box::new(FoldNorms {
            rotatable_only: opts.bool_or("rotatable-only", false)?,
        }))
    }
}

impl Pass for FoldNorms {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn description(&self) -> &'static str {
        Self::DESCRIPTION
    }

    fn run(&mut self, model: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        let regions = ctx.analysis::<Regions>(model)?;
        let mut shapes = ctx.analysis::<ShapeMap>(model)?;
        let (mut folded, mut total) = (0usize, transform::Applied::default());
        for (i, region) in regions.regions.iter().enumerate() {
            if region.kind == RegionKind::AttentionQk {
                continue;
            }
            if self.rotatable_only
                && let Some(why) =
                    region
                        .params
                        .iter()
                        .find_map(|p| match plan(model, &shapes, region, p) {
                            Plan::Blocked(why) => Some(why),
                            _ => None,
                        })
            {
                ctx.note(format!(
                    "region #{i} ({}, d = {}): no norm folded: {why}; with that gamma in place no rotation follows, and folding the others would only move their outliers into the weights",
                    region.kind.as_str(),
                    region.dim
                ));
                continue;
            }
            for p in &region.params {
                let (label, seg, gamma) = match plan(model, &shapes, region, p) {
                    Plan::Uniform => continue,
                    Plan::Blocked(why) => {
                        ctx.note(why);
                        continue;
                    }
                    Plan::Fold { label, seg, gamma } => (label, seg, gamma),
                };
                if !ctx.rewrite() {
                    break;
                }
                let op = ChannelOp::Diagonal(gamma.iter().map(|&g| 1.0 / f64::from(g)).collect());
                let applied = transform::apply(&mut model.graph, &seg, &op, Placement::Fold)
                    .map_err(|e| PassError::msg(format!("fold-norms: {label}: {e}")))?;
                if applied.untied > 0 {
                    // New initializers: shapes must know them before the next trace.
                    shapes = std::sync::Arc::new(
                        perqc_ops::infer_model(model)
                            .map_err(|e| PassError::msg(format!("shape inference: {e}")))?,
                    );
                }
                folded += 1;
                total += applied;
            }
        }
        Ok(PassOutcome::from_changed(folded > 0)
            .with("norms-folded", folded as u64)
            .with("weights-rewritten", total.rewritten as u64)
            .with("weights-untied", total.untied as u64))
    }
}

/// What folding one norm's γ would do.
enum Plan {
    /// γ is all ones (or not a constant): nothing to fold.
    Uniform,
    /// It cannot fold; the note says why.
    Blocked(String),
    /// The segment from γ and γ itself.
    Fold {
        label: String,
        seg: Box<crate::regions::Region>,
        gamma: Vec<f32>,
    },
}

/// Whether the γ of param `p` of `region` folds, traced on the model as it is now.
fn plan(
    model: &Model,
    shapes: &ShapeMap,
    region: &crate::regions::Region,
    p: &crate::regions::Endpoint,
) -> Plan {
    let label = region.node_name(p.node).to_string();
    let gamma = match model.graph.const_tensor(p.weight).map(|t| t.to_f32()) {
        Some(Ok(g)) => g,
        _ => return Plan::Uniform,
    };
    if gamma.iter().all(|&g| g == 1.0) {
        return Plan::Uniform;
    }
    if let Some(i) = gamma.iter().position(|&g| g == 0.0 || !g.is_finite()) {
        return Plan::Blocked(format!(
            "{label}: not folded: gamma[{i}] = {}; its reciprocal does not exist",
            gamma[i]
        ));
    }
    let Some(seg) = Regions::trace_from(model, shapes, p.node, p.input, p.axis) else {
        return Plan::Uniform;
    };
    if let Some(b) = seg.barriers.first() {
        let at = b.at.as_deref().map_or(String::new(), |a| format!("{a}: "));
        return Plan::Blocked(format!("{label}: not folded: {at}{}", b.reason));
    }
    if seg.sources.len() != 1 || seg.sinks.is_empty() {
        return Plan::Blocked(format!(
            "{label}: not folded: its output is not read by linear layers alone (a post-norm residual?)"
        ));
    }
    Plan::Fold {
        label,
        seg: Box::new(seg),
        gamma,
    }
}
