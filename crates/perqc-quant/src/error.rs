//! Errors of the quantizers. Bad specs, shapes, options and data are errors, never panics.

use crate::spec::SpecError;

/// Why a quantizer could not produce a [`crate::QWeight`].
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum QuantError {
    /// The spec is invalid (for weights).
    #[error("invalid quantization spec: {0}")]
    Spec(#[from] SpecError),
    /// Operand shapes do not fit (the message names them).
    #[error("shape: {0}")]
    Shape(String),
    /// A weight is NaN or infinite.
    #[error("weight[{row}, {col}] = {value} is not finite")]
    NonFiniteWeight { row: usize, col: usize, value: f32 },
    /// A Hessian entry is NaN or infinite.
    #[error("hessian[{row}, {col}] = {value} is not finite")]
    NonFiniteHessian { row: usize, col: usize, value: f64 },
    /// A group's scale overflows f32 (its range exceeds f32::MAX).
    #[error("the scale of row {row}, group {group} is not finite (range beyond f32)")]
    ScaleOverflow { row: usize, group: usize },
    /// A GPTQ option is out of range.
    #[error("gptq option {0}")]
    Options(String),
    /// The damped Hessian is not positive definite even after raising the damping.
    #[error(
        "gptq: the damped hessian is not positive definite (cholesky pivot {pivot} not > 0) with relative damping {tried:?}; raise GptqOptions::damp or calibrate on more rows"
    )]
    NotPositiveDefinite { pivot: usize, tried: Vec<f64> },
    /// A matrix that must be positive definite is not (the message says which).
    #[error("{0}")]
    Singular(String),
    /// A combination this crate does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
}
