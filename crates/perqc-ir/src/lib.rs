//! perqc's intermediate representation.
//!
//! One IR for every pass: a [`Model`] owns a [`Graph`], an arena of [`Node`]s and
//! [`Value`]s with typed ids. Values are first-class (producer, consumers, type, constant
//! data); node order and names are kept so output is deterministic. Tensor payloads stay in
//! the memory map they were read from until a pass rewrites them.

pub mod cut;
pub mod dtype;
pub mod graph;
pub mod model;
pub mod parse;
pub mod pass;
pub mod print;
pub mod rewrite;
pub mod tensor;
mod topo;
pub mod types;
pub mod verify;

pub use cut::cut;
pub use dtype::DType;
pub use graph::{
    AttrValue, Attribute, Graph, GraphError, InfoExtra, Node, NodeExtra, NodeId, NodeSpec, Operand,
    PERQC_DOMAIN, Use, Value, ValueDef, ValueId,
};
pub use model::{Model, OpsetImport};
pub use parse::{ParseError, parse_graph, parse_model};
pub use pass::{
    Analysis, OptionError, Pass, PassContext, PassError, PassFactory, PassInfo, PassManager,
    PassOptions, PassOutcome, PassRecord, PassRegistry, PassSpec, Pipeline, PipelineError,
    Property, Report, RunError, RunOptions, parse_pipeline,
};
pub use print::{PrintOptions, print_graph, print_model, print_model_with};
pub use rewrite::{Applied, Matcher, NoFacts, Patch, PatchValue, ValueFacts};
pub use tensor::{Element, Tensor, TensorData, TensorError, TypedData};
pub use types::{DeclaredDim, Dim, Shape, Type};
pub use verify::{VerifyError, VerifyErrorKind, verify, verify_graph};
