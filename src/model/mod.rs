//! The model: configuration, weights, and two implementations of the same Llama network behind
//! one interface: zagreus' own CPU engine (`cpu::engine`), and candle tensors for GPUs.

pub mod config;
pub mod cpu;
pub mod gguf;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod plan;
pub mod rope;
pub mod weights;

use anyhow::{Context, Result};
use candle_core::Device;

pub use config::{GenerationConfig, LlamaConfig};
pub use cpu::engine::{Chunk, CpuLlama};
pub use cpu::kv::{CpuCache, KvType};
pub use cpu::qmatrix::{Format, Precision};
pub use kv_cache::KvCache;
pub use llama::Llama;
pub use plan::{LogitsFor, RowKind};

/// A loaded network (one per process, shared by reference: the size difference between the
/// variants does not matter).
#[allow(clippy::large_enum_variant)]
pub enum Model {
    /// The CPU engine (CPU device).
    Cpu(CpuLlama),
    /// candle tensors (CUDA; also runs on the CPU, for cross-checks).
    Candle(Llama),
}

/// A session's key/value cache for the matching network (one per session: the size difference
/// between the variants does not matter).
#[allow(clippy::large_enum_variant)]
pub enum Cache {
    Cpu(CpuCache),
    Candle(KvCache),
}

impl Cache {
    /// Tokens currently cached.
    pub fn len(&self) -> usize {
        match self {
            Cache::Cpu(c) => c.len(),
            Cache::Candle(c) => c.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most tokens it holds (the context size).
    pub fn max_len(&self) -> usize {
        match self {
            Cache::Cpu(c) => c.max_len(),
            Cache::Candle(c) => c.max_len(),
        }
    }

    /// Forgets every token after the first `len`.
    pub fn truncate(&mut self, len: usize) {
        match self {
            Cache::Cpu(c) => c.truncate(len),
            Cache::Candle(c) => c.truncate(len),
        }
    }

    /// Tokens it has room for without growing (what it takes in memory).
    pub fn capacity(&self) -> usize {
        match self {
            Cache::Cpu(c) => c.capacity(),
            Cache::Candle(c) => c.capacity(),
        }
    }

    /// A new cache with a copy of the first `n` tokens, this one unchanged; `None` where the
    /// engine cannot copy one (candle's).
    pub fn prefix(&self, n: usize) -> Option<Result<Cache>> {
        match self {
            Cache::Cpu(c) => Some(c.prefix(n).map(Cache::Cpu)),
            Cache::Candle(_) => None,
        }
    }
}

/// One sequence's part of a batched step: its cache, the tokens to run after those cached, what
/// kind of rows they are, and which positions need logits.
pub struct Step<'a> {
    pub cache: &'a mut Cache,
    pub tokens: &'a [u32],
    pub kind: RowKind,
    pub logits: LogitsFor,
}

impl Model {
    pub fn config(&self) -> &LlamaConfig {
        match self {
            Model::Cpu(m) => m.config(),
            Model::Candle(m) => m.config(),
        }
    }

    /// Bytes of keys and values one position takes in this model's caches.
    pub fn kv_bytes_per_position(&self) -> usize {
        match self {
            Model::Cpu(m) => m.kv_bytes_per_position(),
            Model::Candle(m) => m.kv_bytes_per_position(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Model::Cpu(m) => m.vocab_size(),
            Model::Candle(m) => m.vocab_size(),
        }
    }

    /// The longest sequence the model accepts (`max_position_embeddings`).
    pub fn max_positions(&self) -> usize {
        self.config().max_position_embeddings
    }

    pub fn tied_embeddings(&self) -> bool {
        match self {
            Model::Cpu(m) => m.tied_embeddings(),
            Model::Candle(m) => m.tied_embeddings(),
        }
    }

    /// The weight format (`bf16`, `q8_0`, ...).
    pub fn precision(&self) -> &'static str {
        match self {
            Model::Cpu(m) => m.format().name(),
            Model::Candle(m) => m.dtype().as_str(),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Model::Cpu(_) => Device::Cpu,
            Model::Candle(m) => m.device().clone(),
        }
    }

    /// A cache for at most `max_len` tokens (clamped to the model's positions).
    pub fn new_cache(&self, max_len: usize) -> Cache {
        match self {
            Model::Cpu(m) => Cache::Cpu(m.new_cache(max_len)),
            Model::Candle(m) => Cache::Candle(m.new_cache(max_len)),
        }
    }

    /// Runs `tokens` after those in `cache` and puts the logits (`rows x vocab`, one row per
    /// position asked for) into `out`.
    pub fn forward(&self, tokens: &[u32], cache: &mut Cache, which: LogitsFor, out: &mut Vec<f32>) -> Result<()> {
        match (self, cache) {
            (Model::Cpu(m), Cache::Cpu(c)) => m.forward(tokens, c, which, out)?,
            (Model::Candle(m), Cache::Candle(c)) => {
                *out = m.forward(tokens, c, which)?.flatten_all()?.to_vec1::<f32>()?;
            }
            _ => anyhow::bail!("internal error: a cache of the other engine"),
        }
        Ok(())
    }

    /// Runs several sequences in one step (the CPU engine streams each weight once for all of
    /// their rows; candle decodes the one-token steps together and runs longer ones alone).
    /// `out` gets the logits rows of every step in order. Nothing is run, and no cache changes,
    /// if any step's input is invalid.
    pub fn forward_batch(&self, steps: &mut [Step], out: &mut Vec<f32>) -> Result<()> {
        match self {
            Model::Cpu(m) => {
                let mut chunks = Vec::with_capacity(steps.len());
                for s in steps.iter_mut() {
                    let Cache::Cpu(cache) = &mut *s.cache else {
                        anyhow::bail!("internal error: a cache of the other engine");
                    };
                    chunks.push(Chunk {
                        cache,
                        tokens: s.tokens,
                        kind: s.kind,
                        logits: s.logits,
                    });
                }
                m.forward_batch(&mut chunks, out)
            }
            Model::Candle(m) => {
                let vocab = self.vocab_size();
                for s in steps.iter() {
                    plan::check_input(s.tokens, s.cache.len(), vocab, self.max_positions())?;
                }
                // One-token steps decode together (`Llama::decode`); longer ones run alone.
                let mut rows: Vec<Option<Vec<f32>>> = Vec::with_capacity(steps.len());
                let mut decoding = Vec::new();
                for s in steps.iter_mut() {
                    let Cache::Candle(c) = &mut *s.cache else {
                        anyhow::bail!("internal error: a cache of the other engine");
                    };
                    match s.tokens {
                        [token] => {
                            decoding.push((c, *token));
                            rows.push(None);
                        }
                        tokens => rows.push(Some(m.forward(tokens, c, s.logits)?.flatten_all()?.to_vec1::<f32>()?)),
                    }
                }
                let mut decoded = match decoding.is_empty() {
                    true => Vec::new(),
                    false => m.decode(&mut decoding)?.to_vec2::<f32>()?,
                }
                .into_iter();
                out.clear();
                for row in rows {
                    match row {
                        Some(r) => out.extend(r),
                        None => out.extend(decoded.next().context("internal error: a decoding row is missing")?),
                    }
                }
                Ok(())
            }
        }
    }
}

/// The model is shared by the threads that serve requests.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<Model>();
};
