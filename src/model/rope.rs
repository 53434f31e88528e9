//! Rotary position embeddings: cos/sin tables computed the way transformers computes them.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::config::{LlamaConfig, RopeScaling};

/// Inverse frequencies per rotary pair, in f32 arithmetic like transformers' `rope_init_fn`s.
pub fn inv_freq(cfg: &LlamaConfig) -> Vec<f32> {
    let dim = cfg.head_dim;
    let base = cfg.rope_theta as f32;
    let plain: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
        .collect();
    match cfg.rope_scaling {
        RopeScaling::Default => plain,
        RopeScaling::Linear { factor } => plain.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Factors(ref divisors) => plain
            .iter()
            .zip(divisors.iter().chain(std::iter::repeat(&1.0)))
            .map(|(f, d)| f / d)
            .collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, low, high) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32);
            let old = original_max_position_embeddings as f32;
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            plain
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

/// cos and sin tables of shape `(positions, head_dim / 2)`.
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    pub fn new(cfg: &LlamaConfig, positions: usize, dtype: DType, device: &Device) -> Result<Self> {
        let inv = inv_freq(cfg);
        let half = inv.len();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in &inv {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (positions, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (positions, half), device)?.to_dtype(dtype)?;
        Ok(Self { cos, sin })
    }

    /// Rotates `x (1, heads, t, head_dim)` for positions `pos..pos + t` (rotate-half pairing).
    pub fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?)
    }
}
