//! A linear layer (`y = x Wᵀ + b`) that picks the right product for the device and weight type.

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::cpu::MatmulT;

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

    /// `x (…, in)` to `(…, out)`. On the CPU, `x` is f32 and the weights are read in their stored
    /// type by zagreus' own kernels; elsewhere candle's matmul runs in the weights' dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match x.device() {
            Device::Cpu => x.contiguous()?.apply_op2_no_bwd(&self.weight, &MatmulT)?,
            _ => x.broadcast_matmul(&self.weight.t()?)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}
