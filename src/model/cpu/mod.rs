//! The CPU engine and its kernels: runtime-dispatched SIMD over weight panels (`kernels`), Q8_0
//! quantization (`quant`), the threaded products (`qmatrix`, `gemm`), attention and element-wise
//! ops, weight memory (`arena`), and the forward pass (`engine`).

pub mod arena;
pub mod attention;
pub mod engine;
pub mod gemm;
pub mod kernels;
pub mod ops;
pub mod qmatrix;
pub mod quant;
pub mod source;
#[cfg(test)]
mod test_data;
