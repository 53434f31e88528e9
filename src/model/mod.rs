//! The model: configuration, weights, the network, its KV cache and CPU kernels.

pub mod config;
pub mod cpu;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod rope;
pub mod weights;

pub use config::{GenerationConfig, LlamaConfig};
pub use kv_cache::KvCache;
pub use llama::{Llama, LogitsFor};
