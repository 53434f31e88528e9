//! The CPU engine: the Llama forward pass on zagreus' own kernels, with weights in one
//! huge-page arena in the format chosen at load (BF16, F16, F32 or Q8_0), a KV cache laid out for
//! the attention kernel, and every buffer allocated once per session and reused for each token.

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::arena::{Arena, ArenaWriter, Placement};
use super::attention::{attention, AttnScratch, LayerKv};
use super::calibrate;
use super::isa::{Isa, Level};
use super::kernels::PANEL;
use super::ops::{add_in_place, rms_norm, rope_heads, silu_mul};
use super::qmatrix::{matmul, Format, QMatrix, Storage};
use super::source::{common_format, Rows, Tensors};
use crate::model::config::LlamaConfig;
use crate::model::llama::LogitsFor;
use crate::model::rope::inv_freq;

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

/// How `format` is stored on this CPU (integer or float layout, as measured).
fn storage(format: Format) -> Storage {
    Storage::new(format, calibrate::choose(Level::get(), format).variant)
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

/// The format holding most of the layers' weight bytes (what a mixed GGUF mostly is).
fn dominant_format(layers: &[Layer]) -> Format {
    let mut bytes: Vec<(Format, usize)> = Vec::new();
    for m in layers.iter().flat_map(|l| [l.qkv, l.o, l.gate_up, l.down]) {
        match bytes.iter_mut().find(|(f, _)| *f == m.format()) {
            Some((_, b)) => *b += m.bytes(),
            None => bytes.push((m.format(), m.bytes())),
        }
    }
    bytes
        .into_iter()
        .max_by_key(|(_, b)| *b)
        .map_or(Format::F32, |(f, _)| f)
}

/// Fills matrix `m` from row sources stacked on top of each other (q, k, v for a fused
/// projection), one panel of 32 rows per task, dropping the source pages from memory batch by
/// batch: loading never holds much of the file and the arena at the same time.
fn fill(arena: &mut Arena, m: &QMatrix, srcs: &[Box<dyn Rows + '_>]) {
    // Global row -> (source, local row).
    let mut starts = Vec::with_capacity(srcs.len());
    let mut acc = 0;
    for s in srcs {
        starts.push(acc);
        acc += s.rows();
    }
    let locate = |row: usize| {
        let i = starts.partition_point(|s| *s <= row) - 1;
        (srcs[i].as_ref(), row - starts[i])
    };
    let writer = arena.writer();
    const BATCH: usize = 512;
    for first in (0..m.panels()).step_by(BATCH) {
        let last = (first + BATCH).min(m.panels());
        fill_panels(m, &locate, writer, first..last);
        let (r0, r1) = (first * PANEL, (last * PANEL).min(m.rows));
        for (src, s) in srcs.iter().zip(&starts) {
            let (a, b) = (r0.max(*s), r1.min(s + src.rows()));
            if a < b {
                src.release(a - s, b - s);
            }
        }
    }
}

/// Fills panels `range` of `m` in parallel.
fn fill_panels<'a>(
    m: &QMatrix,
    locate: &(dyn Fn(usize) -> (&'a dyn Rows, usize) + Sync),
    writer: ArenaWriter,
    range: std::ops::Range<usize>,
) {
    let k = m.cols;
    let format = m.format();
    range.into_par_iter().for_each_init(
        || vec![0f32; PANEL * k],
        |buf, b| {
            let live = PANEL.min(m.rows - b * PANEL);
            let raw: Option<Vec<&[u8]>> = (0..live)
                .map(|c| {
                    let (src, r) = locate(b * PANEL + c);
                    src.raw(r, format)
                })
                .collect();
            // SAFETY (both writes): each task writes its own panel.
            if let Some(rows) = raw {
                if unsafe { m.write_panel_raw(writer, b, &rows) } {
                    return;
                }
            }
            for c in 0..live {
                let (src, r) = locate(b * PANEL + c);
                src.read(r, &mut buf[c * k..(c + 1) * k]);
            }
            unsafe { m.write_panel(writer, b, buf) };
        },
    );
}

impl CpuLlama {
    /// Builds the engine from a checkpoint's tensors, keeping every matrix in `format`, or, when
    /// `format` is `None`, in the format that holds its stored values (a GGUF's quantization).
    pub fn load(cfg: &LlamaConfig, w: &dyn Tensors, format: Option<Format>, placement: Placement) -> Result<Self> {
        let h = cfg.hidden_size;
        let embed_name = "model.embed_tokens.weight";
        let vocab = match w.shape(embed_name) {
            Some(s) if s.len() == 2 && s[1] == h => s[0],
            Some(s) => bail!("tensor `{embed_name}` has shape {s:?}, but hidden_size is {h}"),
            None => bail!("tensor `{embed_name}` is missing"),
        };
        if vocab != cfg.vocab_size {
            bail!(
                "tensor `{embed_name}` has {vocab} rows, but the configuration says vocab_size {}",
                cfg.vocab_size
            );
        }
        let tied = !w.contains("lm_head.weight");
        // Check every tensor before allocating anything.
        let plan = plan(cfg);
        let mut pieces: Vec<Vec<Box<dyn Rows + '_>>> = Vec::with_capacity(plan.len());
        for (_, parts, cols) in &plan {
            let mut v = Vec::new();
            for (name, rows) in parts {
                v.push(w.matrix(name, *rows, *cols)?);
            }
            pieces.push(v);
        }
        let embed_src = w.matrix(embed_name, vocab, h)?;
        let head_src = if tied {
            None
        } else {
            Some(w.matrix("lm_head.weight", vocab, h)?)
        };
        let choose = |srcs: &[Box<dyn Rows + '_>]| -> Format {
            format.unwrap_or_else(|| common_format(&srcs.iter().map(|s| s.natural()).collect::<Vec<_>>()))
        };
        let embed_format = format.unwrap_or_else(|| embed_src.natural());
        let head_format = head_src.as_ref().map(|s| format.unwrap_or_else(|| s.natural()));
        let mut size =
            storage(embed_format).arena_bytes(vocab, h) + head_format.map_or(0, |f| storage(f).arena_bytes(vocab, h));
        for ((_, parts, cols), srcs) in plan.iter().zip(&pieces) {
            size += storage(choose(srcs)).arena_bytes(parts.iter().map(|p| p.1).sum(), *cols);
        }
        let mut arena = Arena::new(size, placement)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let mut mats = Vec::with_capacity(plan.len());
        // Weights are laid out in the order a forward pass reads them.
        for ((_, parts, cols), srcs) in plan.iter().zip(&pieces) {
            let rows: usize = parts.iter().map(|p| p.1).sum();
            let m = QMatrix::alloc(&mut arena, storage(choose(srcs)), rows, *cols)?;
            fill(&mut arena, &m, srcs);
            mats.push(m);
        }
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                attn_norm: w.vector(&format!("{p}.input_layernorm.weight"), h)?,
                qkv: mats[4 * i],
                o: mats[4 * i + 1],
                mlp_norm: w.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                gate_up: mats[4 * i + 2],
                down: mats[4 * i + 3],
            });
        }
        let embed = QMatrix::alloc(&mut arena, storage(embed_format), vocab, h)?;
        fill(&mut arena, &embed, std::slice::from_ref(&embed_src));
        let lm_head = match (head_src, head_format) {
            (Some(src), Some(f)) => {
                let m = QMatrix::alloc(&mut arena, storage(f), vocab, h)?;
                fill(&mut arena, &m, std::slice::from_ref(&src));
                m
            }
            _ => embed,
        };
        let dominant = format.unwrap_or_else(|| dominant_format(&layers));
        Ok(Self {
            inv_freq: inv_freq(cfg),
            norm: w.vector("model.norm.weight", h)?,
            cfg: cfg.clone(),
            arena,
            embed,
            lm_head,
            tied,
            format: dominant,
            layers,
        })
    }

    /// A model of this shape with random weights (deterministic in `seed`), for benchmarks that
    /// need no download. Scales follow fan-in so activations stay in a realistic range.
    pub fn random(cfg: &LlamaConfig, format: Format, placement: Placement, seed: u64) -> Result<Self> {
        let h = cfg.hidden_size;
        let plan = plan(cfg);
        let st = storage(format);
        let mut size = st.arena_bytes(cfg.vocab_size, h);
        for (_, parts, cols) in &plan {
            size += st.arena_bytes(parts.iter().map(|p| p.1).sum(), *cols);
        }
        let mut arena = Arena::new(size, placement)?;
        let mut mats = Vec::new();
        for (i, (_, parts, cols)) in plan.iter().enumerate() {
            let rows: usize = parts.iter().map(|p| p.1).sum();
            let m = QMatrix::alloc(&mut arena, st, rows, *cols)?;
            fill_random(&mut arena, &m, seed.wrapping_add(i as u64), (1.0 / *cols as f32).sqrt());
            mats.push(m);
        }
        let embed = QMatrix::alloc(&mut arena, st, cfg.vocab_size, h)?;
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

    /// The instruction level and the kernels the dominant format runs with, for reports:
    /// `avx512-vnni, int8 (measured on this CPU)`.
    pub fn kernels(&self) -> String {
        let level = Level::get();
        format!("{}, {}", level.name(), calibrate::choose(level, self.format).describe())
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
