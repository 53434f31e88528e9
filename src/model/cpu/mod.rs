//! The CPU engine and its kernels: what the CPU can do (`isa`), runtime-dispatched SIMD over
//! weight panels (`kernels`), the choice between float and integer kernels (`calibrate`),
//! quantization (`quant`), the threaded products (`qmatrix`, `gemm`), attention and element-wise
//! ops, weight memory (`arena`), and the forward pass (`engine`).

pub mod arena;
pub mod attention;
pub mod calibrate;
pub mod engine;
pub(crate) mod gemm;
pub mod isa;
pub(crate) mod kernels;
pub mod kv;
pub(crate) mod load;
pub mod ops;
pub(crate) mod pool;
pub mod qmatrix;
pub mod quant;
pub mod source;
#[cfg(test)]
mod test_data;
