//! The CPU engine: the Llama forward pass on zagreus' own kernels, with weights in one
//! huge-page arena in the format chosen at load (BF16, F16, F32 or Q8_0), a KV cache laid out for
//! the attention kernel, and every buffer allocated once per session and reused for each token.

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::arena::{Arena, ArenaWriter, Placement};
use super::attention::{attention, AttnScratch, LayerKv};
use super::kernels::Isa;
use super::kernels::PANEL;
use super::ops::{add_in_place, rms_norm, rope_heads, silu_mul};
use super::qmatrix::{matmul, Format, QMatrix};
use crate::model::config::LlamaConfig;
use crate::model::llama::LogitsFor;
use crate::model::rope::inv_freq;
use crate::model::weights::{StoredDtype, TensorEntry, Weights};

struct Layer {
    attn_norm: Vec<f32>,
    /// q, k and v projections fused: one product per layer.
    qkv: QMatrix,
    o: QMatrix,
    mlp_norm: Vec<f32>,
    /// gate and up projections fused.
    gate_up: QMatrix,
    down: QMatrix,
}

pub struct CpuLlama {
    cfg: LlamaConfig,
    arena: Arena,
    embed: QMatrix,
    lm_head: QMatrix,
    tied: bool,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    inv_freq: Vec<f32>,
    format: Format,
}

/// A matrix of the engine: its name, the (tensor, rows) it stacks, and its input size.
type Planned = (String, Vec<(String, usize)>, usize);

/// The matrices of a Llama of this shape, with the tensors each is made of.
fn plan(cfg: &LlamaConfig) -> Vec<Planned> {
    let (h, hd, nh, nkv, inter) = (
        cfg.hidden_size,
        cfg.head_dim,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
    );
    let mut v = Vec::new();
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        v.push((
            format!("{p}.qkv"),
            vec![
                (format!("{p}.self_attn.q_proj.weight"), nh * hd),
                (format!("{p}.self_attn.k_proj.weight"), nkv * hd),
                (format!("{p}.self_attn.v_proj.weight"), nkv * hd),
            ],
            h,
        ));
        v.push((
            format!("{p}.o"),
            vec![(format!("{p}.self_attn.o_proj.weight"), h)],
            nh * hd,
        ));
        v.push((
            format!("{p}.gate_up"),
            vec![
                (format!("{p}.mlp.gate_proj.weight"), inter),
                (format!("{p}.mlp.up_proj.weight"), inter),
            ],
            h,
        ));
        v.push((
            format!("{p}.down"),
            vec![(format!("{p}.mlp.down_proj.weight"), h)],
            inter,
        ));
    }
    v
}

/// Fills matrix `m` from the row-major tensors `srcs` stacked on top of each other (q, k, v for a
/// fused projection), one panel of 32 rows per task, then drops the source pages from memory.
fn fill(arena: &mut Arena, m: &QMatrix, w: &Weights, srcs: &[&TensorEntry]) {
    let k = m.cols;
    // Global row -> (tensor, local row).
    let mut starts = Vec::with_capacity(srcs.len());
    let mut acc = 0;
    for t in srcs {
        starts.push(acc);
        acc += t.shape[0];
    }
    let locate = |row: usize| {
        let i = starts.partition_point(|s| *s <= row) - 1;
        (srcs[i], row - starts[i])
    };
    let same_type = srcs.iter().all(|t| {
        matches!(
            (m.format(), t.dtype),
            (Format::Bf16, StoredDtype::Bf16) | (Format::F16, StoredDtype::F16) | (Format::F32, StoredDtype::F32)
        )
    });
    let writer = arena.writer();
    // In batches, releasing each batch's source pages right after: loading never holds much of
    // the file and the arena at the same time (peak memory stays close to the weights' size).
    const BATCH: usize = 512;
    for first in (0..m.panels()).step_by(BATCH) {
        let last = (first + BATCH).min(m.panels());
        fill_panels(m, w, &locate, same_type, writer, first..last);
        let (r0, r1) = (first * PANEL, (last * PANEL).min(m.rows));
        for (t, s) in srcs.iter().zip(&starts) {
            let size = t.dtype.size() * k;
            let (a, b) = (r0.max(*s), r1.min(s + t.shape[0]));
            if a < b {
                w.release_range(t, (a - s) * size, (b - s) * size);
            }
        }
    }
}

/// Fills panels `range` of `m` in parallel.
fn fill_panels<'a>(
    m: &QMatrix,
    w: &Weights,
    locate: &(dyn Fn(usize) -> (&'a TensorEntry, usize) + Sync),
    same_type: bool,
    writer: ArenaWriter,
    range: std::ops::Range<usize>,
) {
    let k = m.cols;
    range.into_par_iter().for_each_init(
        || vec![0f32; PANEL * k],
        |buf, b| {
            let live = PANEL.min(m.rows - b * PANEL);
            if same_type {
                let rows: Vec<&[u8]> = (0..live)
                    .map(|c| {
                        let (t, r) = locate(b * PANEL + c);
                        let size = t.dtype.size();
                        &w.bytes(t)[r * k * size..(r + 1) * k * size]
                    })
                    .collect();
                // SAFETY: each task writes its own panel.
                if unsafe { m.write_panel_raw(writer, b, &rows) } {
                    return;
                }
            }
            for c in 0..live {
                let (t, r) = locate(b * PANEL + c);
                w.read_f32(t, r * k, &mut buf[c * k..(c + 1) * k]);
            }
            // SAFETY: each task writes its own panel.
            unsafe { m.write_panel(writer, b, buf) };
        },
    );
}

impl CpuLlama {
    /// Builds the engine from checkpoint tensors, converting weights to `format`.
    pub fn load(cfg: &LlamaConfig, w: &Weights, format: Format, placement: Placement) -> Result<Self> {
        let h = cfg.hidden_size;
        let embed_name = "model.embed_tokens.weight";
        let vocab = match w.shape(embed_name) {
            Some(s) if s.len() == 2 && s[1] == h => s[0],
            Some(s) => bail!("tensor `{embed_name}` has shape {s:?}, but hidden_size is {h}"),
            None => bail!("tensor `{embed_name}` is missing"),
        };
        if vocab != cfg.vocab_size {
            bail!(
                "tensor `{embed_name}` has {vocab} rows, but config.json says vocab_size {}",
                cfg.vocab_size
            );
        }
        let tied = !w.contains("lm_head.weight");
        // Check every tensor before allocating anything.
        let plan = plan(cfg);
        let mut pieces: Vec<Vec<&TensorEntry>> = Vec::with_capacity(plan.len());
        for (_, parts, cols) in &plan {
            let mut v = Vec::new();
            for (name, rows) in parts {
                v.push(w.entry(name, &[*rows, *cols])?);
            }
            pieces.push(v);
        }
        let embed_entry = w.entry(embed_name, &[vocab, h])?;
        let head_entry = if tied {
            None
        } else {
            Some(w.entry("lm_head.weight", &[vocab, h])?)
        };
        let mut size = format.arena_bytes(vocab, h) * if tied { 1 } else { 2 };
        for (_, parts, cols) in &plan {
            size += format.arena_bytes(parts.iter().map(|p| p.1).sum(), *cols);
        }
        let mut arena = Arena::new(size, placement)?;
        let norm_of = |name: &str| -> Result<Vec<f32>> {
            let t = w.entry(name, &[h])?;
            let mut v = vec![0f32; h];
            w.read_f32(t, 0, &mut v);
            Ok(v)
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let mut mats = Vec::with_capacity(plan.len());
        // Weights are laid out in the order a forward pass reads them.
        for ((_, parts, cols), srcs) in plan.iter().zip(&pieces) {
            let rows: usize = parts.iter().map(|p| p.1).sum();
            let m = QMatrix::alloc(&mut arena, format, rows, *cols)?;
            fill(&mut arena, &m, w, srcs);
            mats.push(m);
        }
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                attn_norm: norm_of(&format!("{p}.input_layernorm.weight"))?,
                qkv: mats[4 * i],
                o: mats[4 * i + 1],
                mlp_norm: norm_of(&format!("{p}.post_attention_layernorm.weight"))?,
                gate_up: mats[4 * i + 2],
                down: mats[4 * i + 3],
            });
        }
        let embed = QMatrix::alloc(&mut arena, format, vocab, h)?;
        fill(&mut arena, &embed, w, &[embed_entry]);
        let lm_head = match head_entry {
            None => embed,
            Some(t) => {
                let m = QMatrix::alloc(&mut arena, format, vocab, h)?;
                fill(&mut arena, &m, w, &[t]);
                m
            }
        };
        Ok(Self {
            inv_freq: inv_freq(cfg),
            norm: norm_of("model.norm.weight")?,
            cfg: cfg.clone(),
            arena,
            embed,
            lm_head,
            tied,
            layers,
            format,
        })
    }

    /// A model of this shape with random weights (deterministic in `seed`), for benchmarks that
    /// need no download. Scales follow fan-in so activations stay in a realistic range.
    pub fn random(cfg: &LlamaConfig, format: Format, placement: Placement, seed: u64) -> Result<Self> {
        let h = cfg.hidden_size;
        let plan = plan(cfg);
        let mut size = format.arena_bytes(cfg.vocab_size, h);
        for (_, parts, cols) in &plan {
            size += format.arena_bytes(parts.iter().map(|p| p.1).sum(), *cols);
        }
        let mut arena = Arena::new(size, placement)?;
        let mut mats = Vec::new();
        for (i, (_, parts, cols)) in plan.iter().enumerate() {
            let rows: usize = parts.iter().map(|p| p.1).sum();
            let m = QMatrix::alloc(&mut arena, format, rows, *cols)?;
            fill_random(&mut arena, &m, seed.wrapping_add(i as u64), (1.0 / *cols as f32).sqrt());
            mats.push(m);
        }
        let embed = QMatrix::alloc(&mut arena, format, cfg.vocab_size, h)?;
        fill_random(&mut arena, &embed, seed ^ 0xE5, (4.0 / h as f32).sqrt());
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer {
                attn_norm: vec![1.0; h],
                qkv: mats[4 * i],
                o: mats[4 * i + 1],
                mlp_norm: vec![1.0; h],
                gate_up: mats[4 * i + 2],
                down: mats[4 * i + 3],
            })
            .collect();
        Ok(Self {
            inv_freq: inv_freq(cfg),
            norm: vec![1.0; h],
            cfg: cfg.clone(),
            arena,
            embed,
            lm_head: embed,
            tied: true,
            layers,
            format,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn vocab_size(&self) -> usize {
        self.embed.rows
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn tied_embeddings(&self) -> bool {
        self.tied
    }

    pub fn placement(&self) -> Placement {
        self.arena.placement()
    }

    /// Weight bytes one decode step reads (every matrix once, the LM head included).
    pub fn bytes_per_token(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.qkv.bytes() + l.o.bytes() + l.gate_up.bytes() + l.down.bytes())
            .sum();
        layers + self.lm_head.bytes()
    }

    /// Bytes of weight memory held.
    pub fn weight_bytes(&self) -> usize {
        self.arena.used()
    }

    pub fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    pub fn new_cache(&self, max_len: usize) -> CpuCache {
        CpuCache {
            kt: vec![Vec::new(); self.cfg.num_hidden_layers],
            v: vec![Vec::new(); self.cfg.num_hidden_layers],
            kv_heads: self.cfg.num_key_value_heads,
            head_dim: self.cfg.head_dim,
            cap: 0,
            len: 0,
            max_len: max_len.min(self.max_positions()),
            scratch: Scratch::default(),
        }
    }

    /// Runs `tokens` after those in `cache`; returns logits `(rows, vocab)` flattened, one row per
    /// position asked for, borrowed from the cache's scratch space.
    pub fn forward<'c>(&self, tokens: &[u32], cache: &'c mut CpuCache, which: LogitsFor) -> Result<&'c [f32]> {
        let isa = Isa::get();
        let t = tokens.len();
        if t == 0 {
            bail!("internal error: forward called with no tokens");
        }
        let pos = cache.len;
        if pos + t > self.max_positions() {
            bail!(
                "position {} is past the model's context of {} tokens (max_position_embeddings)",
                pos + t,
                self.max_positions()
            );
        }
        let vocab = self.vocab_size();
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= vocab) {
            bail!("token id {bad} is outside the model's vocabulary of {vocab}");
        }
        cache.reserve(t)?;
        let cfg = &self.cfg;
        let (h, hd, nh, nkv, inter) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
        );
        let qkv_dim = (nh + 2 * nkv) * hd;
        let eps = cfg.rms_norm_eps as f32;
        let CpuCache {
            kt, v, cap, scratch: s, ..
        } = cache;
        let cap = *cap;
        s.size(t, h, qkv_dim, nh * hd, inter, hd / 2);
        for (i, &tok) in tokens.iter().enumerate() {
            self.embed
                .row_f32(&self.arena, tok as usize, &mut s.x[i * h..(i + 1) * h]);
        }
        // Rotary angles for this chunk's positions, as transformers computes them (f32).
        let half = hd / 2;
        for i in 0..t {
            let p = (pos + i) as f32;
            for (j, f) in self.inv_freq.iter().enumerate() {
                let a = p * f;
                s.cos[i * half + j] = a.cos();
                s.sin[i * half + j] = a.sin();
            }
        }
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(isa, &s.x[..t * h], &layer.attn_norm, eps, &mut s.xn[..t * h]);
            matmul(&self.arena, &layer.qkv, &s.xn[..t * h], t, &mut s.qkv[..t * qkv_dim]);
            for i in 0..t {
                let row = &mut s.qkv[i * qkv_dim..(i + 1) * qkv_dim];
                let (cos, sin) = (&s.cos[i * half..(i + 1) * half], &s.sin[i * half..(i + 1) * half]);
                rope_heads(&mut row[..(nh + nkv) * hd], nh + nkv, hd, cos, sin);
                // Store this position's keys (transposed) and values.
                let p = pos + i;
                let (kl, vl) = (&mut kt[l], &mut v[l]);
                for g in 0..nkv {
                    let k = &row[(nh + g) * hd..(nh + g + 1) * hd];
                    for (d, kd) in k.iter().enumerate() {
                        kl[(g * hd + d) * cap + p] = *kd;
                    }
                    let vv = &row[(nh + nkv + g) * hd..(nh + nkv + g + 1) * hd];
                    vl[(g * cap + p) * hd..(g * cap + p + 1) * hd].copy_from_slice(vv);
                }
            }
            attention(
                isa,
                &LayerKv {
                    kt: &kt[l],
                    v: &v[l],
                    cap,
                },
                &s.qkv[..t * qkv_dim],
                qkv_dim,
                t,
                pos,
                nh,
                nkv,
                hd,
                &mut s.att[..t * nh * hd],
                &mut s.attn,
            );
            matmul(&self.arena, &layer.o, &s.att[..t * nh * hd], t, &mut s.proj[..t * h]);
            add_in_place(isa, &mut s.x[..t * h], &s.proj[..t * h]);
            rms_norm(isa, &s.x[..t * h], &layer.mlp_norm, eps, &mut s.xn[..t * h]);
            matmul(
                &self.arena,
                &layer.gate_up,
                &s.xn[..t * h],
                t,
                &mut s.gu[..t * 2 * inter],
            );
            silu_mul(isa, &s.gu[..t * 2 * inter], inter, &mut s.act[..t * inter]);
            matmul(&self.arena, &layer.down, &s.act[..t * inter], t, &mut s.proj[..t * h]);
            add_in_place(isa, &mut s.x[..t * h], &s.proj[..t * h]);
        }
        cache.len += t;
        let s = &mut cache.scratch;
        let (first, rows) = match which {
            LogitsFor::Last => (t - 1, 1),
            LogitsFor::All => (0, t),
        };
        rms_norm(
            isa,
            &s.x[first * h..(first + rows) * h],
            &self.norm,
            eps,
            &mut s.xn[..rows * h],
        );
        s.logits.resize(rows * vocab, 0.0);
        matmul(&self.arena, &self.lm_head, &s.xn[..rows * h], rows, &mut s.logits);
        Ok(&cache.scratch.logits)
    }
}

fn fill_random(arena: &mut Arena, m: &QMatrix, seed: u64, scale: f32) {
    let k = m.cols;
    let writer = arena.writer();
    (0..m.panels()).into_par_iter().for_each_init(
        || vec![0f32; PANEL * k],
        |buf, b| {
            for (i, v) in buf.iter_mut().enumerate() {
                // A cheap hash per element: uniform in [-scale·√3, scale·√3] (variance scale²).
                let mut s = (seed ^ ((b * PANEL * k + i) as u64).wrapping_mul(0x9E3779B97F4A7C15))
                    .wrapping_mul(0xD1B54A32D192ED03);
                s ^= s >> 29;
                *v = (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale * 1.732;
            }
            // SAFETY: each task writes its own panel.
            unsafe { m.write_panel(writer, b, buf) };
        },
    );
}

/// Per-session buffers, sized for the largest chunk seen and reused for every step.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    gu: Vec<f32>,
    act: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    logits: Vec<f32>,
    attn: AttnScratch,
}

impl Scratch {
    fn size(&mut self, t: usize, h: usize, qkv: usize, att: usize, inter: usize, half: usize) {
        let grow = |v: &mut Vec<f32>, n: usize| {
            if v.len() < n {
                v.resize(n, 0.0);
            }
        };
        grow(&mut self.x, t * h);
        grow(&mut self.xn, t * h);
        grow(&mut self.qkv, t * qkv);
        grow(&mut self.att, t * att);
        grow(&mut self.proj, t * h);
        grow(&mut self.gu, t * 2 * inter);
        grow(&mut self.act, t * inter);
        grow(&mut self.cos, t * half);
        grow(&mut self.sin, t * half);
    }
}

/// The CPU engine's KV cache: per layer, keys transposed `[kv_heads][head_dim][cap]` and values
/// `[kv_heads][cap][head_dim]`, grown by doubling (never past the context size) and truncatable.
pub struct CpuCache {
    kt: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    kv_heads: usize,
    head_dim: usize,
    cap: usize,
    len: usize,
    max_len: usize,
    scratch: Scratch,
}

impl CpuCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes held by the keys and values.
    pub fn bytes(&self) -> usize {
        self.kt.iter().chain(&self.v).map(|v| v.len() * 4).sum()
    }

    fn reserve(&mut self, extra: usize) -> Result<()> {
        let needed = self.len + extra;
        if needed > self.max_len {
            bail!(
                "the context is full: {} tokens cached + {extra} new > {} (the context size)",
                self.len,
                self.max_len
            );
        }
        if needed <= self.cap {
            return Ok(());
        }
        let cap = needed.max(self.cap * 2).max(256).min(self.max_len);
        let (g, hd, old, len) = (self.kv_heads, self.head_dim, self.cap, self.len);
        for kt in &mut self.kt {
            let mut fresh = vec![0f32; g * hd * cap];
            for row in 0..g * hd {
                fresh[row * cap..row * cap + len].copy_from_slice(&kt[row * old..row * old + len]);
            }
            *kt = fresh;
        }
        for v in &mut self.v {
            let mut fresh = vec![0f32; g * cap * hd];
            for gi in 0..g {
                fresh[gi * cap * hd..(gi * cap + len) * hd].copy_from_slice(&v[gi * old * hd..(gi * old + len) * hd]);
            }
            *v = fresh;
        }
        self.cap = cap;
        Ok(())
    }
}
