//! Lossless ONNX import and export for the perqc IR.
//!
//! [`load`] memory-maps a model (and its external data) and builds the IR without copying
//! weights; [`save`] streams the IR back out, inline or with external data, through a
//! temporary file renamed into place. `load` then `save` reproduces the model: every field
//! the IR does not interpret is carried through verbatim.

pub mod error;
pub mod export;
pub mod import;
#[allow(clippy::all, missing_docs)]
pub mod proto;
mod stream;
mod wire;

pub use error::{LoadError, SaveError};
pub use export::{ExternalPolicy, SaveOptions, Saved, save, to_bytes};
pub use import::{FileMaps, Loaded, MappedRange, load, load_bytes};
