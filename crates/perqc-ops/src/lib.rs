//! The op-semantics table: one entry per (domain, op type, opset range).
//!
//! Every per-op fact a pass needs lives in an [`OpDef`] row of the single static table in
//! [`table`]; passes look rows up with [`lookup`] instead of matching on `op_type`
//! themselves. A row holds the shape/type rule, the channel-flow rule ([`channel`]: how an
//! axis carrying channels passes through the op, for the region analysis) and the native
//! f32 kernel ([`kernels`]).
//!
//! - [`infer_graph`] runs the rules over a graph (symbolic shapes, element types, and the
//!   values of small integer tensors such as shape vectors), and [`apply`] writes the result
//!   into `Value::ty`.
//! - See `docs/op-semantics.md` for how to add an op.

pub mod channel;
mod constprop;
pub mod facts;
pub mod fold;
pub mod hadamard;
pub mod infer;
pub mod kernel;
pub mod kernels;
pub mod pool;
pub mod quant;
pub mod rules;
pub mod stats;
mod table;

pub use channel::{ChannelCtx, ChannelFlow, ChannelFn, Commutes, Fanout};
pub use facts::{Facts, MAX_VALUE_ELEMS};
pub use infer::{
    ApplyStats, InferCtx, InferError, ShapeError, ShapeMap, UnknownOp, apply, compatible,
    infer_graph, infer_model, lookup_node,
};
pub use kernel::{KernelCtx, KernelError, KernelFn, RtTensor, SubgraphRunner};
pub use quant::{TokenQuant, fake_quantize_rows};
pub use table::OPS;

use std::collections::HashMap;
use std::sync::OnceLock;

/// A shape/type rule: the facts of a node's outputs from those of its inputs.
pub type InferFn = fn(&InferCtx<'_>) -> Result<Vec<Facts>, ShapeError>;

/// One row of the op table: an op's semantics over a range of opset versions.
#[derive(Clone, Copy, Debug)]
pub struct OpDef {
    /// `""` for the default ONNX domain (`"ai.onnx"` in a model means the same).
    pub domain: &'static str,
    pub op_type: &'static str,
    /// First opset version the row covers.
    pub since_version: i64,
    /// First version it no longer covers (exclusive); `None` = still current.
    pub until: Option<i64>,
    /// Shape and type inference.
    pub infer: InferFn,
    /// Native f32 kernel for calibration and the runtime (`None`: not executable natively).
    pub kernel: Option<KernelFn>,
    /// How a channel axis flows through the op (see [`channel`]); a barrier by default.
    pub channel: ChannelFn,
    /// Where the op's result carries attention heads that no channel transform of its
    /// inputs reaches (see [`channel::ResultHeads`]); `None` for most ops.
    pub result_heads: Option<channel::ResultHeadsFn>,
}

impl OpDef {
    /// A default-domain op from `since_version` on.
    pub const fn onnx(op_type: &'static str, since_version: i64, infer: InferFn) -> OpDef {
        OpDef::custom("", op_type, since_version, infer)
    }

    /// An op of another domain (`com.microsoft`, ...).
    pub const fn custom(
        domain: &'static str,
        op_type: &'static str,
        since_version: i64,
        infer: InferFn,
    ) -> OpDef {
        OpDef {
            domain,
            op_type,
            since_version,
            until: None,
            infer,
            kernel: None,
            channel: channel::undeclared,
            result_heads: None,
        }
    }

    /// Ends the row's range before `version`.
    pub const fn until(mut self, version: i64) -> OpDef {
        self.until = Some(version);
        self
    }

    /// Sets the native kernel.
    pub const fn kernel(mut self, kernel: KernelFn) -> OpDef {
        self.kernel = Some(kernel);
        self
    }

    /// Sets the channel rule.
    pub const fn channel(mut self, rule: ChannelFn) -> OpDef {
        self.channel = rule;
        self
    }

    /// Sets the result-heads rule.
    pub const fn result_heads(mut self, rule: channel::ResultHeadsFn) -> OpDef {
        self.result_heads = Some(rule);
        self
    }

    /// Whether the row covers opset `version`.
    pub fn covers(&self, version: i64) -> bool {
        self.since_version <= version && self.until.is_none_or(|u| version < u)
    }
}

pub use perqc_ir::PERQC_DOMAIN;

/// The canonical spelling of a domain (`"ai.onnx"` -> `""`).
pub fn canonical_domain(domain: &str) -> &str {
    if domain == "ai.onnx" { "" } else { domain }
}

/// Rows by op type (domains are few; they are filtered on lookup).
type Index = HashMap<&'static str, Vec<&'static OpDef>>;

fn index() -> &'static Index {
    static INDEX: OnceLock<Index> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut m: Index = HashMap::new();
        for def in OPS {
            m.entry(def.op_type).or_default().push(def);
        }
        m
    })
}

/// All rows for an op in a domain, in table order (for diagnostics such as "known, but
/// not at this opset").
pub fn versions<'a>(domain: &'a str, op_type: &str) -> impl Iterator<Item = &'static OpDef> + 'a {
    let domain = canonical_domain(domain);
    index()
        .get(op_type)
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .copied()
        .filter(move |d| d.domain == domain)
}

/// The row for `op_type` in `domain` whose range contains `opset_version`.
pub fn lookup(domain: &str, op_type: &str, opset_version: i64) -> Option<&'static OpDef> {
    versions(domain, op_type).find(|d| d.covers(opset_version))
}

#[cfg(test)]
mod tests;
