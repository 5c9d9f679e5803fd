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
//! already uniform. A tied embedding/lm_head is untied by the mechanism only here, where the
//! final norm's γ changes the lm_head side alone. LayerNorm's mean subtraction is not
//! rotation-invariant; its regions stay blocked for rotations (the region says so).
//!
//! Counters: `norms-folded`, `weights-rewritten`, `weights-untied`.

use crate::regions::{RegionKind, Regions};
use crate::transform::{self, ChannelOp, Placement};
use perqc_ir::{Model, OptionError, Pass, PassContext, PassError, PassOptions, PassOutcome};
use perqc_ops::ShapeMap;

#[derive(Debug, Default)]
pub struct FoldNorms;

impl FoldNorms {
    pub const NAME: &'static str = "fold-norms";
    pub const DESCRIPTION: &'static str =
        "fold RMS norm gammas into the linear layers that read the norms (exact)";

    pub fn from_options(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        opts.allow_only(&[])?;
        Ok(Box::new(FoldNorms))
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
        for region in &regions.regions {
            if region.kind == RegionKind::AttentionQk {
                continue;
            }
            for p in &region.params {
                let label = region.node_name(p.node).to_string();
                let gamma = match model.graph.const_tensor(p.weight).map(|t| t.to_f32()) {
                    Some(Ok(g)) => g,
                    _ => continue,
                };
                if gamma.iter().all(|&g| g == 1.0) {
                    continue;
                }
                if let Some(i) = gamma.iter().position(|&g| g == 0.0 || !g.is_finite()) {
                    ctx.note(format!(
                        "{label}: not folded: gamma[{i}] = {}; its reciprocal does not exist",
                        gamma[i]
                    ));
                    continue;
                }
                let Some(seg) = Regions::trace_from(model, &shapes, p.node, p.input, p.axis) else {
                    continue;
                };
                if let Some(b) = seg.barriers.first() {
                    let at = b.at.as_deref().map_or(String::new(), |a| format!("{a}: "));
                    ctx.note(format!("{label}: not folded: {at}{}", b.reason));
                    continue;
                }
                if seg.sources.len() != 1 || seg.sinks.is_empty() {
                    ctx.note(format!(
                        "{label}: not folded: its output is not read by linear layers alone (a post-norm residual?)"
                    ));
                    continue;
                }
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
