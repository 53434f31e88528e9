//! CPU kernels: runtime-dispatched SIMD and the threaded products built on them.

pub mod kernels;
pub mod matmul;

pub use matmul::{matmul_t, MatmulT};
