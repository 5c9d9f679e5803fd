//! perqc-quant: the numerics of weight quantization, free of any IR.
//!
//! - [`QuantSpec`] says what to quantize to: [`Format`] (uniform `Int`, `Fp4` E2M1 with an
//!   f32 scale, OCP `MxFp4` and `MxInt8` with shared power-of-two scales per block of 32),
//!   [`Granularity`] (which elements share a scale) and [`ScaleSearch`] (range or MSE).
//! - [`quantize_rtn`] rounds each element to the nearest code; [`gptq()`] quantizes column by
//!   column with error compensation from the calibration Hessian `X^T X`. Both return a
//!   [`QWeight`]: codes, scales, zero points, whose values ([`QWeight::value`]) are what an
//!   exported ONNX `DequantizeLinear` computes, bit for bit.
//! - [`sqnr_db`] measures the result.
//!
//! The scale rules and the search are in [`params`], the element grids in `grid`, the
//! GPTQ algorithm in [`gptq`](mod@gptq). Work is parallel over rows on the current rayon
//! pool, and results do not depend on the number of threads.

mod error;
pub mod factors;
pub mod gptq;
mod grid;
pub mod input_error;
mod linalg;
mod metrics;
pub mod params;
mod qweight;
mod rtn;
mod simd;
pub mod spd;
mod spec;

pub use error::QuantError;
pub use gptq::{GptqFactor, GptqOptions, gptq, gptq_with};
pub use grid::FP4_E2M1_VALUES;
pub use input_error::InputErrorFit;
pub use metrics::sqnr_db;
pub use qweight::QWeight;
pub use rtn::quantize_rtn;
pub use spec::{Format, Granularity, QuantSpec, ScaleSearch, SpecError};
