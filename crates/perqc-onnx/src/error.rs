//! Load and save errors. Every message is one line naming the file and the place in it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: empty file (0 bytes), not an ONNX model")]
    Empty { path: PathBuf },
    #[error("{path}: not a valid ONNX model: {detail}")]
    Decode { path: PathBuf, detail: String },
    #[error("{path}: {place}: {detail}")]
    Invalid {
        path: PathBuf,
        /// Where in the model: `graph main_graph, node /x/MatMul (MatMul)`, `initializer w`...
        place: String,
        detail: String,
    },
    #[error("{path}: {place}: external data {data_path}: {detail}")]
    ExternalData {
        path: PathBuf,
        place: String,
        data_path: PathBuf,
        detail: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("{path}: cannot write: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
}
