//! The CPU engine: the Llama forward pass on zagreus' own kernels, with weights in one
//! huge-page arena in the format chosen at load (BF16, F16, F32, Q8_0 or Q4), one KV cache per
//! sequence (`kv.rs`), and per-step buffers owned by the engine and reused for every step.
//!
//! A step takes any number of sequences, each with a chunk of tokens: decoding sequences one new
//! token, prompts a chunk of theirs. Their rows go through every product together (each weight
//! panel is read once for all of them), then rotary embeddings, the KV writes and attention run
//! per sequence on its own cache, and logits are computed only for the rows that need them.

use std::sync::Mutex;

use anyhow::{ensure, Result};

use super::arena::{Arena, Placement};
use super::attention::{attention, AttnScratch, AttnSeq};
use super::calibrate;
use super::isa::{Isa, Level};
use super::kv::{CacheElem, CpuCache, KvType};
use super::load::{fill, fill_random};
use super::ops::{add_in_place, rms_norm, rope_heads, silu_mul};
use super::pool::Exec;
use super::qmatrix::{matmul_rows, Format, Precision, QMatrix, Storage, Variant};
use super::source::{common_format, Rows, Tensors};
use crate::model::config::LlamaConfig;
use crate::model::plan::{self, LogitsFor, Product, RowKind};
use crate::model::rope::inv_freq;

/// A product's weights and, when the checkpoint has them, its biases (one per output).
#[derive(Clone)]
struct Linear {
    w: QMatrix,
    bias: Option<Vec<f32>>,
}

struct Layer {
    attn_norm: Vec<f32>,
    /// q, k and v projections fused: one product per layer.
    qkv: Linear,
    o: Linear,
    mlp_norm: Vec<f32>,
    /// gate and up projections fused.
    gate_up: Linear,
    down: Linear,
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
    precision: Precision,
    /// How the caches this model makes hold keys and values.
    kv: KvType,
    /// The step buffers (one step runs at a time).
    scratch: Mutex<Box<Scratch>>,
}

/// How `format` is stored on this CPU in `precision` (integer or float layout, as measured; in
/// the fast precision BF16 dot products for BF16, and one-byte activations for the integer
/// kernels of Q8_0 and Q4, where the CPU has such dot products).
fn storage(format: Format, precision: Precision) -> Storage {
    let level = Level::get();
    if precision == Precision::Fast {
        if format == Format::Bf16 {
            return Storage::new(format, calibrate::choose_fast_bf16(level).variant);
        }
        if let Some(c) = calibrate::choose_fast_quantized(level, format) {
            return Storage::new(format, c.variant).in_precision(Precision::Fast);
        }
    }
    Storage::new(format, calibrate::choose(level, format).variant)
}

/// Whether `format`'s products run in the fast precision on this CPU (BF16 dot products for BF16,
/// one-byte activations for Q8_0 and Q4). Where they do, the KV cache is BF16 too; where the
/// fast precision computes exactly, so does attention.
fn runs_fast(format: Format, precision: Precision) -> bool {
    let level = Level::get();
    match (precision, format) {
        (Precision::Exact, _) => false,
        (Precision::Fast, Format::Bf16) => calibrate::choose_fast_bf16(level).variant == Variant::Bf16Dot,
        (Precision::Fast, f) if f.quantized() => calibrate::choose_fast_quantized(level, f)
            .is_some_and(|c| matches!(c.variant, Variant::Int | Variant::IntFloat)),
        (Precision::Fast, _) => false,
    }
}

/// The KV cache type for a model whose weights are mostly `format`.
fn kv_type(format: Format, precision: Precision) -> KvType {
    if runs_fast(format, precision) {
        KvType::Bf16
    } else {
        KvType::F32
    }
}

/// The format holding most of the layers' weight bytes (what a mixed GGUF mostly is).
fn dominant_format(layers: &[Layer]) -> Format {
    let mut bytes: Vec<(Format, usize)> = Vec::new();
    for m in layers.iter().flat_map(|l| [&l.qkv.w, &l.o.w, &l.gate_up.w, &l.down.w]) {
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

/// A product's biases from the checkpoint: `None` when no part has one, else every part's
/// (zeros for a part without).
fn biases(w: &dyn Tensors, p: &Product) -> Result<Option<Vec<f32>>> {
    if !p.parts.iter().any(|(n, _)| w.contains(&format!("{n}.bias"))) {
        return Ok(None);
    }
    let mut all = Vec::with_capacity(p.rows());
    for (name, rows) in &p.parts {
        let b = format!("{name}.bias");
        if w.contains(&b) {
            all.extend(w.vector(&b, *rows)?);
        } else {
            all.extend(std::iter::repeat_n(0.0, *rows));
        }
    }
    Ok(Some(all))
}

/// One sequence's part of a step.
pub struct Chunk<'a> {
    pub cache: &'a mut CpuCache,
    pub tokens: &'a [u32],
    /// Prompt tokens or a generated token (see `RowKind`).
    pub kind: RowKind,
    pub logits: LogitsFor,
}

impl CpuLlama {
    /// Builds the engine from a checkpoint's tensors, keeping every matrix in `format`, or, when
    /// `format` is `None`, in the format that holds its stored values (a GGUF's quantization).
    pub fn load(
        cfg: &LlamaConfig,
        w: &dyn Tensors,
        format: Option<Format>,
        placement: Placement,
        precision: Precision,
    ) -> Result<Self> {
        let storage = |f| storage(f, precision);
        let h = cfg.hidden_size;
        let vocab = plan::vocab_from_embedding(cfg, w.shape(plan::EMBED))?;
        // Tied or not is decided by what the file holds, not only by the config flag.
        let tied = !w.contains(plan::LM_HEAD);
        // Check every tensor before allocating anything.
        let products: Vec<Product> = (0..cfg.num_hidden_layers)
            .flat_map(|i| plan::layer_products(cfg, i))
            .collect();
        let mut pieces: Vec<Vec<Box<dyn Rows + '_>>> = Vec::with_capacity(products.len());
        let mut bias = Vec::with_capacity(products.len());
        for p in &products {
            let mut v = Vec::new();
            for ((_, rows), weight) in p.parts.iter().zip(p.weight_names()) {
                v.push(w.matrix(&weight, *rows, p.cols)?);
            }
            pieces.push(v);
            bias.push(biases(w, p)?);
        }
        let embed_src = w.matrix(plan::EMBED, vocab, h)?;
        let head_src = if tied {
            None
        } else {
            Some(w.matrix(plan::LM_HEAD, vocab, h)?)
        };
        let choose = |srcs: &[Box<dyn Rows + '_>]| -> Format {
            format.unwrap_or_else(|| common_format(&srcs.iter().map(|s| s.natural()).collect::<Vec<_>>()))
        };
        let embed_format = format.unwrap_or_else(|| embed_src.natural());
        let head_format = head_src.as_ref().map(|s| format.unwrap_or_else(|| s.natural()));
        let mut size =
            storage(embed_format).arena_bytes(vocab, h) + head_format.map_or(0, |f| storage(f).arena_bytes(vocab, h));
        for (p, srcs) in products.iter().zip(&pieces) {
            size += storage(choose(srcs)).arena_bytes(p.rows(), p.cols);
        }
        let mut arena = Arena::new(size, placement)?;
        let mut mats = Vec::with_capacity(products.len());
        // Weights are laid out in the order a forward pass reads them.
        for ((p, srcs), bias) in products.iter().zip(&pieces).zip(bias) {
            let m = QMatrix::alloc(&mut arena, storage(choose(srcs)), p.rows(), p.cols)?;
            fill(&mut arena, &m, srcs);
            mats.push(Linear { w: m, bias });
        }
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let mut mats = mats.into_iter();
        for i in 0..cfg.num_hidden_layers {
            let [attn_norm, mlp_norm] = plan::layer_norms(i);
            let mut next = || mats.next().expect("four products per layer");
            layers.push(Layer {
                attn_norm: w.vector(&attn_norm, h)?,
                qkv: next(),
                o: next(),
                mlp_norm: w.vector(&mlp_norm, h)?,
                gate_up: next(),
                down: next(),
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
            precision,
            kv: kv_type(dominant, precision),
            inv_freq: inv_freq(cfg),
            norm: w.vector(plan::FINAL_NORM, h)?,
            cfg: cfg.clone(),
            arena,
            embed,
            lm_head,
            tied,
            format: dominant,
            layers,
            scratch: Mutex::new(Box::default()),
        })
    }

    /// A model of this shape with random weights (deterministic in `seed`), for benchmarks that
    /// need no download. Scales follow fan-in so activations stay in a realistic range.
    pub fn random(
        cfg: &LlamaConfig,
        format: Format,
        placement: Placement,
        precision: Precision,
        seed: u64,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let products: Vec<Product> = (0..cfg.num_hidden_layers)
            .flat_map(|i| plan::layer_products(cfg, i))
            .collect();
        let st = storage(format, precision);
        let mut size = st.arena_bytes(cfg.vocab_size, h);
        for p in &products {
            size += st.arena_bytes(p.rows(), p.cols);
        }
        let mut arena = Arena::new(size, placement)?;
        let mut mats = Vec::new();
        for (i, p) in products.iter().enumerate() {
            let m = QMatrix::alloc(&mut arena, st, p.rows(), p.cols)?;
            fill_random(
                &mut arena,
                &m,
                seed.wrapping_add(i as u64),
                (1.0 / p.cols as f32).sqrt(),
            );
            mats.push(Linear { w: m, bias: None });
        }
        let embed = QMatrix::alloc(&mut arena, st, cfg.vocab_size, h)?;
        fill_random(&mut arena, &embed, seed ^ 0xE5, (4.0 / h as f32).sqrt());
        let mut mats = mats.into_iter();
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                let mut next = || mats.next().expect("four products per layer");
                Layer {
                    attn_norm: vec![1.0; h],
                    qkv: next(),
                    o: next(),
                    mlp_norm: vec![1.0; h],
                    gate_up: next(),
                    down: next(),
                }
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
            precision,
            kv: kv_type(format, precision),
            scratch: Mutex::new(Box::default()),
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
        let exact = calibrate::choose(level, self.format).describe();
        let kernels = match (self.precision, self.format) {
            (Precision::Exact, _) => exact,
            (Precision::Fast, Format::Bf16) => {
                let c = calibrate::choose_fast_bf16(level);
                match (c.variant, level.bf16_dot()) {
                    (Variant::Bf16Dot, _) => format!("{}, fast precision", c.describe()),
                    (_, true) => format!("{}, exact: BF16 dot products were slower on this CPU", c.describe()),
                    _ => format!("{exact}, exact: no BF16 dot products at this level"),
                }
            }
            (Precision::Fast, f) if f.quantized() => match calibrate::choose_fast_quantized(level, f) {
                Some(c) => match (c.variant, c.reason) {
                    (Variant::Int, _) => format!("{}, fast precision: 8-bit activations", c.describe()),
                    (Variant::IntFloat, _) => format!(
                        "{}, fast precision: 8-bit activations for decoding rows, f32 for prompt rows",
                        c.describe()
                    ),
                    (_, calibrate::Reason::Forced) => format!("{}, exact", c.describe()),
                    _ => format!("{}, exact: the float kernels were faster on this CPU", c.describe()),
                },
                None => format!("{exact}, exact: no byte dot products at this level"),
            },
            (Precision::Fast, _) => format!("{exact}, exact: the fast precision is for BF16 and quantized weights"),
        };
        let kv = if self.kv == KvType::Bf16 { ", BF16 KV cache" } else { "" };
        format!("{}, {kernels}{kv}", level.name())
    }

    /// How the caches this model makes hold keys and values.
    pub fn kv_type(&self) -> KvType {
        self.kv
    }

    pub fn precision(&self) -> Precision {
        self.precision
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
            .map(|l| l.qkv.w.bytes() + l.o.w.bytes() + l.gate_up.w.bytes() + l.down.w.bytes())
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
        CpuCache::new(
            self.cfg.num_hidden_layers,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
            max_len.min(self.max_positions()),
            self.kv,
        )
    }

    /// Bytes of KV cache one position takes (every layer, keys and values).
    pub fn kv_bytes_per_position(&self) -> usize {
        CpuCache::bytes_per_position(
            self.cfg.num_hidden_layers,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
            self.kv,
        )
    }

    /// Runs `tokens` after those in `cache` and puts the logits (`rows x vocab`, one row per
    /// position asked for) into `out`. Several tokens are prompt rows, one is a decoding row
    /// (see `RowKind::of`).
    pub fn forward(&self, tokens: &[u32], cache: &mut CpuCache, which: LogitsFor, out: &mut Vec<f32>) -> Result<()> {
        let mut chunk = [Chunk {
            cache,
            tokens,
            kind: RowKind::of(tokens.len(), which),
            logits: which,
        }];
        self.forward_batch(&mut chunk, out)
    }

    /// One step for several sequences. `out` gets the logits rows in chunk order: one per chunk
    /// asking for `Last`, one per token for `All`.
    pub fn forward_batch(&self, chunks: &mut [Chunk], out: &mut Vec<f32>) -> Result<()> {
        let vocab = self.vocab_size();
        for c in chunks.iter() {
            plan::check_input(c.tokens, c.cache.len(), vocab, self.max_positions())?;
            ensure!(
                c.cache.kv_type() == self.kv,
                "a {:?} KV cache given to a model that makes {:?} ones",
                c.cache.kv_type(),
                self.kv
            );
        }
        for c in chunks.iter_mut() {
            c.cache.reserve(c.tokens.len())?;
        }
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        let isa = Isa::get();
        let cfg = &self.cfg;
        let (h, hd, nh, nkv, inter) = plan::dims(cfg);
        let qkv_dim = (nh + 2 * nkv) * hd;
        let eps = cfg.rms_norm_eps as f32;
        let half = hd / 2;
        // Rows: decoding chunks first, then prompt chunks (each class runs its own kernels).
        let mut order: Vec<usize> = (0..chunks.len()).collect();
        order.sort_by_key(|&i| chunks[i].kind != RowKind::Decode);
        let mut row0 = vec![0usize; chunks.len()];
        let (mut t, mut decode) = (0, 0);
        for &i in &order {
            row0[i] = t;
            t += chunks[i].tokens.len();
            if chunks[i].kind == RowKind::Decode {
                decode = t;
            }
        }
        s.size(t, h, qkv_dim, nh * hd, inter, half);
        for &i in &order {
            let c = &chunks[i];
            let pos = c.cache.len();
            for (j, &tok) in c.tokens.iter().enumerate() {
                let r = row0[i] + j;
                self.embed
                    .row_f32(&self.arena, tok as usize, &mut s.x[r * h..(r + 1) * h]);
                // Rotary angles as transformers computes them (f32).
                let p = (pos + j) as f32;
                for (f, fr) in self.inv_freq.iter().enumerate() {
                    let a = p * fr;
                    s.cos[r * half + f] = a.cos();
                    s.sin[r * half + f] = a.sin();
                }
            }
        }
        let arena = &self.arena;
        let product = |l: &Linear, x: &[f32], out: &mut [f32]| {
            matmul_rows(arena, &l.w, x, decode, t, out);
            if let Some(b) = &l.bias {
                for row in out.chunks_exact_mut(l.w.rows) {
                    add_in_place(isa, row, b);
                }
            }
        };
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(isa, &s.x[..t * h], &layer.attn_norm, eps, &mut s.xn[..t * h]);
            product(&layer.qkv, &s.xn[..t * h], &mut s.qkv[..t * qkv_dim]);
            // Rotary embeddings and KV writes, each sequence in a task of its own.
            let mut seq_rows = by_rows(chunks, &row0, &mut s.qkv[..t * qkv_dim], qkv_dim);
            let (cos, sin) = (&s.cos, &s.sin);
            Exec::Pool.for_each_mut(&mut seq_rows, &|_, sr| {
                let pos = sr.cache.len();
                for (j, row) in sr.rows.chunks_exact_mut(qkv_dim).enumerate() {
                    let r = sr.row0 + j;
                    let (cos, sin) = (&cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half]);
                    rope_heads(&mut row[..(nh + nkv) * hd], nh + nkv, hd, cos, sin);
                    let (k, v) = row[nh * hd..].split_at(nkv * hd);
                    sr.cache.store(l, pos + j, k, v);
                }
            });
            drop(seq_rows);
            let step = AttnStep {
                isa,
                chunks,
                order: &order,
                row0: &row0,
                layer: l,
                q: &s.qkv[..t * qkv_dim],
                q_stride: qkv_dim,
                dims: (nh, nkv, hd),
            };
            match self.kv {
                KvType::F32 => step.run::<f32>(&mut s.att[..t * nh * hd], &mut s.attn),
                KvType::Bf16 => step.run::<half::bf16>(&mut s.att[..t * nh * hd], &mut s.attn),
            }
            product(&layer.o, &s.att[..t * nh * hd], &mut s.proj[..t * h]);
            add_in_place(isa, &mut s.x[..t * h], &s.proj[..t * h]);
            rms_norm(isa, &s.x[..t * h], &layer.mlp_norm, eps, &mut s.xn[..t * h]);
            product(&layer.gate_up, &s.xn[..t * h], &mut s.gu[..t * 2 * inter]);
            let gu = &s.gu[..t * 2 * inter];
            let mut act_rows: Vec<&mut [f32]> = s.act[..t * inter].chunks_exact_mut(inter).collect();
            Exec::Pool.for_each_mut(&mut act_rows, &|r, row| {
                silu_mul(isa, &gu[r * 2 * inter..(r + 1) * 2 * inter], inter, row)
            });
            product(&layer.down, &s.act[..t * inter], &mut s.proj[..t * h]);
            add_in_place(isa, &mut s.x[..t * h], &s.proj[..t * h]);
        }
        for c in chunks.iter_mut() {
            c.cache.advance(c.tokens.len());
        }
        // Logits: `Last` rows as decoding rows (one product streams the LM head once for all),
        // `All` rows as prompt rows.
        let mut last = Vec::new();
        let mut all = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            match c.logits {
                LogitsFor::Last => last.push(row0[i] + c.tokens.len() - 1),
                LogitsFor::All => all.extend(row0[i]..row0[i] + c.tokens.len()),
            }
        }
        let rows = last.len() + all.len();
        s.gather.resize(rows * h, 0.0);
        for (g, &r) in last.iter().chain(&all).enumerate() {
            rms_norm(
                isa,
                &s.x[r * h..(r + 1) * h],
                &self.norm,
                eps,
                &mut s.gather[g * h..(g + 1) * h],
            );
        }
        if all.is_empty() {
            // Only `Last` rows (every decoding step): they are in chunk order already, so the
            // product writes every value of the answer in place (no copy of rows x vocab floats,
            // and no clearing when the caller's buffer has the size already).
            out.resize(rows * vocab, 0.0);
            matmul_rows(arena, &self.lm_head, &s.gather, rows, rows, out);
            return Ok(());
        }
        s.logits.resize(rows * vocab, 0.0);
        matmul_rows(arena, &self.lm_head, &s.gather, last.len(), rows, &mut s.logits);
        // Back in chunk order.
        out.clear();
        out.reserve(rows * vocab);
        let (mut li, mut ai) = (0, last.len());
        for c in chunks.iter() {
            let (from, n) = match c.logits {
                LogitsFor::Last => {
                    li += 1;
                    (li - 1, 1)
                }
                LogitsFor::All => {
                    ai += c.tokens.len();
                    (ai - c.tokens.len(), c.tokens.len())
                }
            };
            out.extend_from_slice(&s.logits[from * vocab..(from + n) * vocab]);
        }
        Ok(())
    }
}

/// A layer's attention for every sequence of a step.
struct AttnStep<'s, 'c> {
    isa: Isa,
    chunks: &'s [Chunk<'c>],
    order: &'s [usize],
    row0: &'s [usize],
    layer: usize,
    q: &'s [f32],
    q_stride: usize,
    /// Heads, KV heads, head size.
    dims: (usize, usize, usize),
}

impl AttnStep<'_, '_> {
    /// Runs it on caches of element type `E` (every cache's type was checked against the
    /// model's at the start of the step).
    fn run<E: CacheElem>(&self, out: &mut [f32], scratch: &mut AttnScratch) {
        let seqs: Vec<AttnSeq<E>> = self
            .order
            .iter()
            .map(|&i| AttnSeq {
                kv: self.chunks[i]
                    .cache
                    .layer(self.layer)
                    .expect("caches were checked to be of the model's type"),
                row0: self.row0[i],
                t: self.chunks[i].tokens.len(),
                pos: self.chunks[i].cache.len(),
            })
            .collect();
        let (nh, nkv, hd) = self.dims;
        attention(self.isa, &seqs, self.q, self.q_stride, nh, nkv, hd, out, scratch);
    }
}

/// One sequence's rows of a step with its cache (see `by_rows`).
struct SeqRows<'a> {
    cache: &'a mut CpuCache,
    /// The sequence's rows of a per-row buffer.
    rows: &'a mut [f32],
    /// Its first row in the step.
    row0: usize,
}

/// Each chunk's cache with its rows of `buf` (`width` values per row; chunk `i`'s rows start at
/// `row0[i]`, and the chunks' rows lie one after the other without gaps).
fn by_rows<'a>(chunks: &'a mut [Chunk], row0: &[usize], buf: &'a mut [f32], width: usize) -> Vec<SeqRows<'a>> {
    let mut refs: Vec<(usize, &mut Chunk)> = chunks.iter_mut().enumerate().collect();
    refs.sort_by_key(|(i, _)| row0[*i]);
    let mut rest = buf;
    let mut out = Vec::with_capacity(refs.len());
    for (i, c) in refs {
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(c.tokens.len() * width);
        rest = tail;
        out.push(SeqRows {
            cache: &mut *c.cache,
            rows: mine,
            row0: row0[i],
        });
    }
    out
}

/// Per-step buffers, sized for the largest step seen and reused.
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
    gather: Vec<f32>,
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
