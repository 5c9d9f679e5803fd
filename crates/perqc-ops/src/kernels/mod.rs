//! Native f32 kernels, grouped like the shape rules in `../rules`. Each is a
//! [`KernelFn`](super::kernel::KernelFn) referenced from a row of the op table.

pub mod attention;
mod attn_gemm;
pub mod control;
pub mod elementwise;
pub mod hadamard;
pub mod igemm;
pub mod index;
pub(crate) mod layout;
pub mod linalg;
pub mod misc;
pub mod movement;
pub mod norm;
pub mod reduce;
pub mod rotary;
pub(crate) mod vmath;

pub use vmath::log_sum_exp;
