//! The Llama network (the architecture of every Zagreus model), shape-driven from `config.json`.
//!
//! Matches transformers' `LlamaForCausalLM`: RMSNorm, rotate-half RoPE, grouped-query attention
//! (each KV head serves `heads / kv_heads` query heads, without copying K/V), a SiLU-gated MLP,
//! and an LM head that is `lm_head.weight` when the file has one, else the token embedding.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::ops::{rms_norm, softmax_last_dim};
use candle_nn::rotary_emb::rope;

use super::config::LlamaConfig;
use super::kv_cache::KvCache;
use super::linear::Linear;
use super::plan;
use super::rope::Rope;
use super::weights::Weights;

pub use super::plan::LogitsFor;

/// Decoding tokens of a batched step ([`Llama::decode`]) go through the network in passes of
/// exactly this many rows (unused rows are padding), so that a token meets the same matrix
/// kernels, whose reduction order depends on the number of rows, whether it decodes alone or
/// beside others: its logits are the same bits either way. Up to this many sequences share each
/// weight read. ([`Llama::forward`] keeps one row, the fastest for a lone sequence: one-row
/// products take cuBLAS' matrix-vector kernels.)
pub const DECODE_ROWS: usize = 16;

struct Block {
    attn_norm: Tensor,
    /// q, k and v projections fused into one product.
    qkv: Linear,
    o: Linear,
    mlp_norm: Tensor,
    /// gate and up projections fused into one product.
    gate_up: Linear,
    down: Linear,
}

pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
    rope: Rope,
    device: Device,
    /// Weight storage dtype.
    dtype: DType,
    /// Activation dtype: f32 on the CPU, the weight dtype on accelerators.
    act_dtype: DType,
    vocab_size: usize,
    tied: bool,
}

/// Activations are f32 on the CPU (its kernels widen half-precision weights in registers) and the
/// weight dtype on accelerators, where candle's kernels run natively in it.
pub fn activation_dtype(dtype: DType, device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        dtype
    }
}

fn load_linear_fused(
    w: &Weights,
    names: &[String],
    shapes: &[Vec<usize>],
    dtype: DType,
    dev: &Device,
) -> Result<Linear> {
    let mut ws = Vec::with_capacity(names.len());
    for (name, shape) in names.iter().zip(shapes) {
        ws.push(w.load(&format!("{name}.weight"), shape, dtype, &Device::Cpu)?);
    }
    let weight = if ws.len() == 1 {
        ws.remove(0)
    } else {
        Tensor::cat(&ws, 0)?
    };
    let has_bias = names.iter().any(|n| w.contains(&format!("{n}.bias")));
    let bias = if has_bias {
        let mut bs = Vec::with_capacity(names.len());
        for (name, shape) in names.iter().zip(shapes) {
            let bname = format!("{name}.bias");
            bs.push(if w.contains(&bname) {
                w.load(&bname, &shape[..1], DType::F32, &Device::Cpu)?
            } else {
                Tensor::zeros(shape[0], DType::F32, &Device::Cpu)?
            });
        }
        Some(
            Tensor::cat(&bs, 0)?
                .to_dtype(activation_dtype(dtype, dev))?
                .to_device(dev)?,
        )
    } else {
        None
    };
    Ok(Linear::new(weight.to_device(dev)?, bias))
}

impl Llama {
    /// Builds the network from checkpoint tensors, converting weights to `dtype` on `device`.
    pub fn load(cfg: &LlamaConfig, w: &Weights, dtype: DType, device: &Device) -> Result<Self> {
        let h = cfg.hidden_size;
        let act = activation_dtype(dtype, device);
        let vocab_size = plan::vocab_from_embedding(cfg, w.shape(plan::EMBED))?;
        let embed = w.load(plan::EMBED, &[vocab_size, h], dtype, device)?;
        let norm_w = |name: &str| w.load(name, &[h], act, device);
        let product = |p: &plan::Product| {
            let names: Vec<String> = p.parts.iter().map(|(n, _)| n.clone()).collect();
            let shapes: Vec<Vec<usize>> = p.parts.iter().map(|(_, rows)| vec![*rows, p.cols]).collect();
            load_linear_fused(w, &names, &shapes, dtype, device)
        };
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let [qkv, o, gate_up, down] = plan::layer_products(cfg, i);
            let [attn_norm, mlp_norm] = plan::layer_norms(i);
            blocks.push(Block {
                attn_norm: norm_w(&attn_norm)?,
                qkv: product(&qkv)?,
                o: product(&o)?,
                mlp_norm: norm_w(&mlp_norm)?,
                gate_up: product(&gate_up)?,
                down: product(&down)?,
            });
        }
        let norm = norm_w(plan::FINAL_NORM)?;
        // Tied or not is decided by what the file holds, not only by the config flag.
        let tied = !w.contains(plan::LM_HEAD);
        let lm_head = if tied {
            Linear::new(embed.clone(), None)
        } else {
            Linear::new(w.load(plan::LM_HEAD, &[vocab_size, h], dtype, device)?, None)
        };
        let rope = Rope::new(cfg, cfg.max_position_embeddings, act, device)?;
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            rope,
            device: device.clone(),
            dtype,
            act_dtype: act,
            vocab_size,
            tied,
        })
    }

    /// A network of this shape with random weights (normal, std 1/sqrt(fan-in); norms 1), for
    /// benchmarks on devices the CPU engine does not cover. Tied embeddings.
    pub fn random(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let h = cfg.hidden_size;
        let (hd, nh, nkv, inter) = (
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
        );
        let act = activation_dtype(dtype, device);
        let mat = |rows: usize, cols: usize| -> Result<Linear> {
            let w = Tensor::randn(0f32, (1.0 / cols as f64).sqrt() as f32, (rows, cols), device)?.to_dtype(dtype)?;
            Ok(Linear::new(w, None))
        };
        let ones = || -> Result<Tensor> { Ok(Tensor::ones(h, act, device)?) };
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            blocks.push(Block {
                attn_norm: ones()?,
                qkv: mat((nh + 2 * nkv) * hd, h)?,
                o: mat(h, nh * hd)?,
                mlp_norm: ones()?,
                gate_up: mat(2 * inter, h)?,
                down: mat(h, inter)?,
            });
        }
        let embed =
            Tensor::randn(0f32, (4.0 / h as f64).sqrt() as f32, (cfg.vocab_size, h), device)?.to_dtype(dtype)?;
        Ok(Self {
            cfg: cfg.clone(),
            lm_head: Linear::new(embed.clone(), None),
            embed,
            blocks,
            norm: ones()?,
            rope: Rope::new(cfg, cfg.max_position_embeddings, act, device)?,
            device: device.clone(),
            dtype,
            act_dtype: act,
            vocab_size: cfg.vocab_size,
            tied: true,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes of keys and values one position takes in this network's caches (the activation
    /// dtype: f32 on the CPU, the weights' dtype on accelerators).
    pub fn kv_bytes_per_position(&self) -> usize {
        let c = &self.cfg;
        c.num_hidden_layers * c.num_key_value_heads * 2 * c.head_dim * self.act_dtype.size_in_bytes()
    }

    pub fn tied_embeddings(&self) -> bool {
        self.tied
    }

    /// The longest sequence the model accepts (`max_position_embeddings`).
    pub fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    /// A cache sized for at most `max_len` tokens (clamped to the model's positions).
    pub fn new_cache(&self, max_len: usize) -> KvCache {
        KvCache::new(
            self.cfg.num_hidden_layers,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
            max_len.min(self.max_positions()),
            self.act_dtype,
            &self.device,
        )
    }

    /// Runs `tokens` after the ones already in `cache` and returns f32 logits `(rows, vocab)`,
    /// one row per position asked for.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, which: LogitsFor) -> Result<Tensor> {
        let t = tokens.len();
        let pos = cache.len();
        plan::check_input(tokens, pos, self.vocab_size, self.max_positions())?;
        cache.reserve(t)?;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self
            .embed
            .index_select(&ids, 0)?
            .to_dtype(self.act_dtype)?
            .unsqueeze(0)?;
        let rep = self.cfg.num_attention_heads / self.cfg.num_key_value_heads;
        let mask = if t > 1 {
            Some(self.causal_mask(t, pos, rep)?)
        } else {
            None
        };
        let eps = self.cfg.rms_norm_eps as f32;
        for (i, b) in self.blocks.iter().enumerate() {
            let hn = rms_norm(&x, &b.attn_norm, eps)?;
            let a = self
                .attention(&hn, b, i, pos, cache, mask.as_ref())
                .with_context(|| format!("attention of layer {i}"))?;
            x = (x + a)?;
            let hn = rms_norm(&x, &b.mlp_norm, eps)?;
            x = (&x + self.mlp(&hn, b)?)?;
        }
        cache.advance(t);
        let x = match which {
            LogitsFor::Last => x.narrow(1, t - 1, 1)?,
            LogitsFor::All => x,
        };
        let x = rms_norm(&x.contiguous()?, &self.norm, eps)?;
        Ok(self.lm_head.forward(&x)?.squeeze(0)?.to_dtype(DType::F32)?)
    }

    /// Runs one token after each sequence's cache and returns f32 logits `(sequences, vocab)`:
    /// the products, norms and LM head run once for up to [`DECODE_ROWS`] sequences, attention
    /// per sequence on its own cache. Nothing runs, and no cache changes, if any input is invalid.
    pub fn decode(&self, seqs: &mut [(&mut KvCache, u32)]) -> Result<Tensor> {
        for (cache, token) in seqs.iter() {
            plan::check_input(&[*token], cache.len(), self.vocab_size, self.max_positions())?;
        }
        for (cache, _) in seqs.iter_mut() {
            cache.reserve(1)?;
        }
        let mut parts = Vec::with_capacity(seqs.len().div_ceil(DECODE_ROWS));
        for group in seqs.chunks_mut(DECODE_ROWS) {
            parts.push(self.decode_rows(group)?);
        }
        Ok(match parts.len() {
            1 => parts.remove(0),
            _ => Tensor::cat(&parts, 0)?,
        })
    }

    /// One padded pass of [`DECODE_ROWS`] rows for at most that many sequences (caches reserved).
    fn decode_rows(&self, seqs: &mut [(&mut KvCache, u32)]) -> Result<Tensor> {
        let n = seqs.len();
        let (mut tokens, mut positions) = ([0u32; DECODE_ROWS], [0u32; DECODE_ROWS]);
        for (i, (cache, token)) in seqs.iter().enumerate() {
            tokens[i] = *token;
            positions[i] = u32::try_from(cache.len())?;
        }
        let ids = Tensor::new(&tokens, &self.device)?;
        let mut x = self
            .embed
            .index_select(&ids, 0)?
            .to_dtype(self.act_dtype)?
            .unsqueeze(0)?;
        // Each row's own position: cos and sin `(rows, 1, head_dim / 2)`.
        let pos = Tensor::new(&positions, &self.device)?;
        let cos = self.rope.cos.index_select(&pos, 0)?.unsqueeze(1)?;
        let sin = self.rope.sin.index_select(&pos, 0)?.unsqueeze(1)?;
        let width = self.cfg.num_attention_heads * self.cfg.head_dim;
        let pad = match DECODE_ROWS - n {
            0 => None,
            rows => Some(Tensor::zeros((rows, width), self.act_dtype, &self.device)?),
        };
        let eps = self.cfg.rms_norm_eps as f32;
        for (i, b) in self.blocks.iter().enumerate() {
            let hn = rms_norm(&x, &b.attn_norm, eps)?;
            let a = self
                .decode_attention(&hn, b, i, seqs, (&cos, &sin), pad.as_ref())
                .with_context(|| format!("attention of layer {i}"))?;
            x = (x + a)?;
            let hn = rms_norm(&x, &b.mlp_norm, eps)?;
            x = (&x + self.mlp(&hn, b)?)?;
        }
        for (cache, _) in seqs.iter_mut() {
            cache.advance(1);
        }
        let x = rms_norm(&x, &self.norm, eps)?;
        Ok(self
            .lm_head
            .forward(&x)?
            .squeeze(0)?
            .narrow(0, 0, n)?
            .to_dtype(DType::F32)?)
    }

    /// Attention of a decoding pass `x (1, rows, hidden)`: q, k and v for all rows in one product
    /// and one rotation, then each sequence's row against its cache; padding rows give zeros.
    fn decode_attention(
        &self,
        x: &Tensor,
        b: &Block,
        layer: usize,
        seqs: &mut [(&mut KvCache, u32)],
        (cos, sin): (&Tensor, &Tensor),
        pad: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (hd, nh, nkv) = (
            self.cfg.head_dim,
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
        );
        let rep = nh / nkv;
        let qkv = b.qkv.forward(x)?.squeeze(0)?;
        let heads = |start: usize, count: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(D::Minus1, start * hd, count * hd)?
                .contiguous()?
                .reshape((DECODE_ROWS, count, 1, hd))?)
        };
        let q = rope(&heads(0, nh)?, cos, sin)?;
        let k = rope(&heads(nh, nkv)?, cos, sin)?;
        let v = heads(nh + nkv, nkv)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut ys = Vec::with_capacity(seqs.len() + 1);
        for (i, (cache, _)) in seqs.iter_mut().enumerate() {
            let (k_all, v_all) = cache.append(layer, &k.narrow(0, i, 1)?, &v.narrow(0, i, 1)?)?;
            // As in `attention`: the query heads of KV head g are rows g * rep .. of one product.
            let q = q.narrow(0, i, 1)?.reshape((nkv, rep, hd))?;
            let scores = (q.matmul(&k_all.squeeze(0)?.t()?)? * scale)?;
            let probs = softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(self.act_dtype)?;
            ys.push(probs.matmul(&v_all.squeeze(0)?)?.reshape((1, nh * hd))?);
        }
        ys.extend(pad.cloned());
        b.o.forward(&Tensor::cat(&ys, 0)?.unsqueeze(0)?)
    }

    /// Additive mask `(rep * t, pos + t)`: row `r * t + i` (query i of any head in a KV group)
    /// sees keys up to absolute position `pos + i`.
    fn causal_mask(&self, t: usize, pos: usize, rep: usize) -> Result<Tensor> {
        let len = pos + t;
        let mut m = Vec::with_capacity(rep * t * len);
        for _ in 0..rep {
            for i in 0..t {
                m.extend((0..len).map(|j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }));
            }
        }
        Ok(Tensor::from_vec(m, (rep * t, len), &self.device)?.to_dtype(self.act_dtype)?)
    }

    fn attention(
        &self,
        x: &Tensor,
        b: &Block,
        layer: usize,
        pos: usize,
        cache: &mut KvCache,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        let (hd, nh, nkv) = (
            self.cfg.head_dim,
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
        );
        let rep = nh / nkv;
        let qkv = b.qkv.forward(x)?;
        let heads = |start: usize, n: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(D::Minus1, start * hd, n * hd)?
                .reshape((1, t, n, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = self.rope.apply(&heads(0, nh)?, pos)?;
        let k = self.rope.apply(&heads(nh, nkv)?, pos)?;
        let v = heads(nh + nkv, nkv)?;
        let (k_all, v_all) = cache.append(layer, &k, &v)?;
        let len = k_all.dim(2)?;
        // Query heads h = g * rep + r share KV head g: view q as (kv_heads, rep * t, hd), so one
        // batched product per KV head covers its whole group without repeating K or V.
        let q = q.reshape((nkv, rep * t, hd))?;
        let k_all = k_all.squeeze(0)?;
        let v_all = v_all.squeeze(0)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k_all.t()?)? * scale)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(self.act_dtype)?;
        let y = probs.matmul(&v_all)?; // (kv_heads, rep * t, hd)
        debug_assert_eq!(y.dims(), &[nkv, rep * t, hd]);
        let _ = len;
        let y = y.reshape((1, nh, t, hd))?.transpose(1, 2)?.reshape((1, t, nh * hd))?;
        b.o.forward(&y)
    }

    fn mlp(&self, x: &Tensor, b: &Block) -> Result<Tensor> {
        let inter = self.cfg.intermediate_size;
        let gu = b.gate_up.forward(x)?;
        let gate = gu.narrow(D::Minus1, 0, inter)?;
        let up = gu.narrow(D::Minus1, inter, inter)?;
        b.down.forward(&(candle_nn::ops::silu(&gate)? * up)?)
    }
}
