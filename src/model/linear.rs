//! A linear layer (`y = x Wᵀ + b`) on candle tensors (the GPU path).

use anyhow::Result;
use candle_core::{DType, Tensor};

/// Weights `(out, in)` in their storage dtype, and an optional bias.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `x (…, in)` to `(…, out)`, in the weights' dtype on accelerators. On the CPU (where this
    /// path only serves to cross-check the CPU engine) it computes in f32, since candle's CPU
    /// matmul has no BF16.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if x.device().is_cpu() && self.weight.dtype() != DType::F32 {
            x.broadcast_matmul(&self.weight.to_dtype(DType::F32)?.t()?)?
        } else {
            x.broadcast_matmul(&self.weight.t()?)?
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}
