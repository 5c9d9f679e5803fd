//! `infer-shapes`: symbolic shape and element-type inference from the op table.
//!
//! Assumes: the graph is topological. Ops the table does not know get unknown result
//! types (listed in a note), not an error.
//!
//! Guarantees: [`Property::SHAPES_INFERRED`]: every node result of the main graph has a
//! type where the rules can derive one (`[batch, seq, 64]`-style symbolic dims, values of
//! shape vectors propagated), and declared types agree with the inference (a conflict is an
//! error naming the value, with nothing written).
//!
//! Identity: only types change; the computation does not.

use perqc_ir::{
    Model, OptionError, Pass, PassContext, PassError, PassOptions, PassOutcome, Property,
};
use perqc_ops::{self as ops, InferError};

#[derive(Debug, Default)]
pub struct InferShapes;

impl InferShapes {
    pub const NAME: &'static str = "infer-shapes";
    pub const DESCRIPTION: &'static str =
        "infer symbolic shapes and element types of every value from the op table";

    pub fn from_options(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        opts.allow_only(&[])?;
        Ok(Box::new(InferShapes))
    }
}

impl Pass for InferShapes {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn description(&self) -> &'static str {
        Self::DESCRIPTION
    }

    fn guarantees(&self) -> &[Property] {
        &[Property::SHAPES_INFERRED]
    }

    fn run(&mut self, model: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        let fail = |e: InferError| PassError::msg(e.to_string());
        let map = ops::infer_model(model).map_err(fail)?;
        for u in &map.unknown_ops {
            let domain = if u.domain.is_empty() {
                "ai.onnx"
            } else {
                &u.domain
            };
            ctx.note(format!(
                "{} node(s) of unknown op {domain}::{} (first: `{}`) keep unknown types",
                u.count, u.op_type, u.first
            ));
        }
        let stats = ops::apply(&mut model.graph, &map).map_err(fail)?;
        Ok(PassOutcome::from_changed(stats.set + stats.refined > 0)
            .with("types-set", stats.set as u64)
            .with("types-refined", stats.refined as u64))
    }
}
