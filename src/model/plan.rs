//! The Llama network as both engines build and run it: which checkpoint tensors make up each
//! product (q, k and v fused into one, gate and up into another), the norms, the checks every
//! forward pass makes on its input, and how KV caches grow. The CPU engine (`cpu::engine`) and the
//! candle network (`llama.rs`) both read this, so they cannot drift apart.

use anyhow::{bail, Result};

use super::config::LlamaConfig;

/// Which positions of a forward pass need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last position: all generation needs.
    Last,
    /// Every position (reference tests, scoring).
    All,
}

/// What a sequence's tokens in a step are: prompt tokens (processed many at a time, with the
/// prefill kernels) or the one token just generated (with the decode kernels). A row's result
/// depends only on its kind, so a sequence gets the same logits alone or batched with others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    Prompt,
    Decode,
}

impl RowKind {
    /// The kind callers that do not say get: a single token asking for the last logits is a
    /// decoding step, anything else a prompt.
    pub fn of(tokens: usize, which: LogitsFor) -> RowKind {
        if tokens == 1 && which == LogitsFor::Last {
            RowKind::Decode
        } else {
            RowKind::Prompt
        }
    }
}

/// The token embedding (also the LM head when the file has no `lm_head.weight`).
pub const EMBED: &str = "model.embed_tokens.weight";
/// The LM head, when the checkpoint has its own.
pub const LM_HEAD: &str = "lm_head.weight";
/// The final norm.
pub const FINAL_NORM: &str = "model.norm.weight";

/// What a product computes, per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// q, k and v projections, stacked: `(heads + 2 · kv_heads) · head_dim` outputs.
    Qkv,
    /// The attention output projection.
    O,
    /// gate and up projections, stacked: `2 · intermediate` outputs.
    GateUp,
    /// The MLP's down projection.
    Down,
}

/// One product of a layer: the checkpoint matrices stacked into it (name without `.weight`,
/// rows), and its input size. A part may have a bias (`<name>.bias`, one value per row): both
/// engines add it when the checkpoint has it.
#[derive(Debug, Clone)]
pub struct Product {
    pub role: Role,
    pub parts: Vec<(String, usize)>,
    pub cols: usize,
}

impl Product {
    pub fn rows(&self) -> usize {
        self.parts.iter().map(|p| p.1).sum()
    }

    pub fn weight_names(&self) -> impl Iterator<Item = String> + '_ {
        self.parts.iter().map(|(n, _)| format!("{n}.weight"))
    }
}

/// The four products of layer `i`, in the order a forward pass reads them.
pub fn layer_products(cfg: &LlamaConfig, i: usize) -> [Product; 4] {
    let (h, hd, nh, nkv, inter) = dims(cfg);
    let p = format!("model.layers.{i}");
    let part = |n: &str, rows: usize| (format!("{p}.{n}"), rows);
    [
        Product {
            role: Role::Qkv,
            parts: vec![
                part("self_attn.q_proj", nh * hd),
                part("self_attn.k_proj", nkv * hd),
                part("self_attn.v_proj", nkv * hd),
            ],
            cols: h,
        },
        Product {
            role: Role::O,
            parts: vec![part("self_attn.o_proj", h)],
            cols: nh * hd,
        },
        Product {
            role: Role::GateUp,
            parts: vec![part("mlp.gate_proj", inter), part("mlp.up_proj", inter)],
            cols: h,
        },
        Product {
            role: Role::Down,
            parts: vec![part("mlp.down_proj", h)],
            cols: inter,
        },
    ]
}

/// The norm weights of layer `i`: before attention, before the MLP.
pub fn layer_norms(i: usize) -> [String; 2] {
    [
        format!("model.layers.{i}.input_layernorm.weight"),
        format!("model.layers.{i}.post_attention_layernorm.weight"),
    ]
}

/// (hidden, head_dim, heads, kv_heads, intermediate).
pub fn dims(cfg: &LlamaConfig) -> (usize, usize, usize, usize, usize) {
    (
        cfg.hidden_size,
        cfg.head_dim,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
    )
}

/// The vocabulary size, from the embedding's shape checked against the configuration.
pub fn vocab_from_embedding(cfg: &LlamaConfig, shape: Option<Vec<usize>>) -> Result<usize> {
    let h = cfg.hidden_size;
    let vocab = match shape {
        Some(s) if s.len() == 2 && s[1] == h => s[0],
        Some(s) => bail!("tensor `{EMBED}` has shape {s:?}, but hidden_size is {h}"),
        None => bail!("tensor `{EMBED}` is missing"),
    };
    if vocab != cfg.vocab_size {
        bail!(
            "tensor `{EMBED}` has {vocab} rows, but the configuration says vocab_size {}",
            cfg.vocab_size
        );
    }
    Ok(vocab)
}

/// The checks every forward pass makes on a sequence's new tokens: some tokens, inside the
/// vocabulary, and within the model's positions after the `cached` ones.
pub fn check_input(tokens: &[u32], cached: usize, vocab: usize, max_positions: usize) -> Result<()> {
    if tokens.is_empty() {
        bail!("internal error: forward called with no tokens");
    }
    if cached + tokens.len() > max_positions {
        bail!(
            "position {} is past the model's context of {max_positions} tokens (max_position_embeddings)",
            cached + tokens.len()
        );
    }
    if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= vocab) {
        bail!("token id {bad} is outside the model's vocabulary of {vocab}");
    }
    Ok(())
}

/// The smallest a KV cache is allocated (positions).
pub const MIN_KV_CAPACITY: usize = 256;

/// The capacity a KV cache of `capacity` positions holding `len` grows to for `extra` more, or an
/// error when that passes `max_len` (the context size). Capacity doubles, so a long prompt pays for
/// the copy only a few times and a short one does not pay for the whole context up front.
pub fn kv_capacity(len: usize, extra: usize, capacity: usize, max_len: usize) -> Result<usize> {
    let needed = len + extra;
    if needed > max_len {
        bail!("the context is full: {len} tokens cached + {extra} new > {max_len} (the context size)");
    }
    if needed <= capacity {
        return Ok(capacity);
    }
    Ok(needed.max(capacity * 2).max(MIN_KV_CAPACITY).min(max_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_capacity_doubles_up_to_the_context_and_refuses_past_it() {
        assert_eq!(kv_capacity(0, 10, 0, 4096).unwrap(), 256);
        assert_eq!(kv_capacity(250, 10, 256, 4096).unwrap(), 512);
        assert_eq!(kv_capacity(250, 1000, 256, 4096).unwrap(), 1250);
        assert_eq!(kv_capacity(4000, 96, 4000, 4096).unwrap(), 4096);
        assert_eq!(kv_capacity(10, 5, 256, 4096).unwrap(), 256);
        let e = kv_capacity(4090, 10, 4096, 4096).unwrap_err().to_string();
        assert!(e.contains("4090") && e.contains("4096"), "{e}");
    }

    #[test]
    fn input_checks_name_the_problem() {
        assert!(check_input(&[1, 2], 0, 10, 8).is_ok());
        assert!(check_input(&[], 0, 10, 8).is_err());
        assert!(check_input(&[1], 8, 10, 8)
            .unwrap_err()
            .to_string()
            .contains("context of 8"));
        assert!(check_input(&[10], 0, 10, 8)
            .unwrap_err()
            .to_string()
            .contains("token id 10"));
    }
}
