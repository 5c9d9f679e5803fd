//! perqc's native float32 executor.
//!
//! [`Session::new`] checks that every node has a kernel in the op table for the model's
//! opset (reporting the unsupported ones, grouped by op type, before anything runs), folds
//! constant subgraphs once, and plans memory: each intermediate is dropped right after its
//! last consumer. [`Session::run`] feeds the graph inputs and returns the graph outputs in
//! order. If/Loop/Scan bodies run as nested plans.
//!
//! The session plans the graph it is given and matches no patterns: exported models run
//! fastest after `perqc_passes::canonicalize` (one canonical op per attention, norm,
//! activation and linear chain).

mod npy;
pub mod observe;
mod session;

pub use npy::{NpyError, read_npy, write_npy};
pub use observe::{ChannelObserver, ChannelStats, StatsError, StatsOptions};
pub use perqc_ops::RtTensor;
pub use session::{
    Observer, Profile, RuntimeError, Session, SessionOptions, Unsupported, recycle, share_arenas,
    trim_allocator, tune_allocator, untune_allocator,
};
