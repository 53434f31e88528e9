//! GGUF files (llama.cpp's format): a bounds-checked reader of the header, metadata and tensor
//! table over a memory map, row access to tensors in every supported element type, and the
//! mapping of a Llama GGUF to transformers' tensor names and row order.
//!
//! Every count and offset in the file is checked against the file's size before anything is
//! allocated, so a truncated or malicious file is an error, never a huge allocation or a panic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8K, BlockQ8_0,
    GgmlType as _,
};

const MAGIC: &[u8; 4] = b"GGUF";
/// Deepest nesting of metadata arrays accepted.
const MAX_DEPTH: usize = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Tensor element types of GGML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            15 => Self::Q8K,
            30 => Self::Bf16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::Bf16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q2K => (256, 84),
            Self::Q3K => (256, 110),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
            Self::Q8K => (256, 292),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Bf16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q2K => "Q2_K",
            Self::Q3K => "Q3_K",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
            Self::Q8K => "Q8_K",
        }
    }

    /// Bytes of `n` elements (n a multiple of the block size).
    pub fn bytes(self, n: usize) -> Option<usize> {
        let (elems, bytes) = self.block();
        n.is_multiple_of(elems).then(|| n / elems * bytes)
    }
}

/// One tensor of the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute byte offset in the file.
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    /// Rows and columns of a 2-D tensor as transformers sees it (`[rows, cols]`).
    pub fn rows_cols(&self) -> (usize, usize) {
        match self.dims.as_slice() {
            [cols] => (1, *cols),
            [cols, rows, ..] => (*rows, *cols),
            [] => (1, 1),
        }
    }
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    map: memmap2::Mmap,
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
}

/// A cursor over the header that fails instead of reading past the end.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.data.len() => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => bail!(
                "truncated: {what} at byte {} runs past the end of the file ({} bytes)",
                self.pos,
                self.data.len()
            ),
        }
    }

    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into()?))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into()?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into()?))
    }

    /// A count that must be satisfiable by the bytes left, each item taking at least `min` bytes.
    fn count(&mut self, min: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        if n > (self.remaining() / min.max(1)) as u64 {
            bail!(
                "{what} says {n}, more than the {} bytes left in the file can hold",
                self.remaining()
            );
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).with_context(|| format!("{what} is not UTF-8"))
    }

    fn value(&mut self, ty: u32, depth: usize, what: &str) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8(what)?),
            1 => Value::I8(self.u8(what)? as i8),
            2 => Value::U16(self.u16(what)?),
            3 => Value::I16(self.u16(what)? as i16),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => Value::Bool(self.u8(what)? != 0),
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    bail!("{what}: arrays nested too deep");
                }
                let inner = self.u32(what)?;
                let min = match inner {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => bail!("{what}: unknown value type {other}"),
                };
                let n = self.count(min, what)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(inner, depth + 1, what)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            other => bail!("{what}: unknown value type {other}"),
        })
    }
}

impl GgufFile {
    /// Maps and parses a GGUF file; any inconsistency is an error naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::bounded::open_regular(path, "the GGUF file")?;
        // SAFETY: mapped read-only; model files are not modified in place while we run.
        let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        Self::from_map(map, path)
    }

    /// Parses a GGUF file held in memory (`name` for messages): for tests and fuzzing.
    pub fn from_bytes(bytes: &[u8], name: &str) -> Result<Self> {
        if bytes.is_empty() {
            bail!("{name} is not a valid GGUF file: it is empty");
        }
        Self::from_map(crate::model::weights::anonymous_copy(bytes)?, Path::new(name))
    }

    fn from_map(map: memmap2::Mmap, path: &Path) -> Result<Self> {
        let (version, metadata, tensors) =
            Self::parse(&map).with_context(|| format!("{} is not a valid GGUF file", path.display()))?;
        Ok(Self {
            map,
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
        })
    }

    #[allow(clippy::type_complexity)]
    fn parse(data: &[u8]) -> Result<(u32, BTreeMap<String, Value>, BTreeMap<String, TensorInfo>)> {
        let mut c = Cursor { data, pos: 0 };
        if c.take(4, "magic").ok() != Some(MAGIC.as_slice()) {
            bail!("bad magic (not \"GGUF\")");
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            bail!("GGUF version {version} is not supported (2 and 3 are)");
        }
        // A tensor entry takes at least 8 (name length) + 4 + 8 + 4 + 8 bytes.
        let n_tensors = c.count(32, "tensor count")?;
        // A metadata entry takes at least 8 (key length) + 4 + 1 bytes.
        let n_kv = c.count(13, "metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32("metadata type")?;
            let v = c.value(ty, 0, &format!("metadata `{key}`"))?;
            metadata.insert(key, v);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32("tensor dimensions")? as usize;
            if n_dims == 0 || n_dims > 4 {
                bail!("tensor `{name}` has {n_dims} dimensions");
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64("tensor dimension")?);
            }
            // A zero dimension would let any other dimension be absurd while the tensor still
            // "fits" the file (zero bytes), and readers size buffers by dimension.
            if dims.contains(&0) {
                bail!("tensor `{name}` has a zero dimension {dims:?}");
            }
            let ty_id = c.u32("tensor type")?;
            let offset = c.u64("tensor offset")?;
            if offset % 2 != 0 {
                bail!("tensor `{name}` starts at an odd offset {offset}");
            }
            let ty = GgmlType::from_id(ty_id).with_context(|| {
                format!("tensor `{name}` has GGML type {ty_id}, which zagreus does not support (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants are)")
            })?;
            infos.push((name, dims, ty, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 16 => a as usize,
                _ => bail!("general.alignment {v:?} is not a power of two up to 65536"),
            },
        };
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, dims, ty, offset) in infos {
            let n = dims
                .iter()
                .try_fold(1u64, |a, d| a.checked_mul(*d))
                .filter(|n| *n <= u64::MAX >> 8);
            let Some(n) = n.and_then(|n| usize::try_from(n).ok()) else {
                bail!("tensor `{name}` has an absurd shape {dims:?}");
            };
            // Rows are read one by one: each (the first dimension) must be whole blocks, not
            // only the tensor as a whole.
            let row_len = usize::try_from(dims[0]).unwrap_or(usize::MAX);
            let len = ty.bytes(row_len).and(ty.bytes(n)).with_context(|| {
                format!(
                    "tensor `{name}` ({} of shape {dims:?}) does not have rows of whole {}-value blocks",
                    ty.name(),
                    ty.block().0
                )
            })?;
            let start = usize::try_from(offset).ok().and_then(|o| o.checked_add(data_start));
            match start.and_then(|s| s.checked_add(len)) {
                Some(end) if end <= data.len() => {}
                _ => bail!(
                    "tensor `{name}` (offset {offset}, {len} bytes) lies past the end of the file ({} bytes)",
                    data.len()
                ),
            }
            let dims = dims.iter().map(|d| *d as usize).collect();
            tensors.insert(
                name.clone(),
                TensorInfo {
                    name,
                    dims,
                    ty,
                    start: start.unwrap_or(0),
                    len,
                },
            );
        }
        Ok((version, metadata, tensors))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.as_u64())
    }

    pub fn f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(|v| v.as_f64())
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| v.as_str())
    }

    /// A metadata array of strings.
    pub fn strings(&self, key: &str) -> Option<Vec<&str>> {
        match self.get(key)? {
            Value::Array(items) => items.iter().map(|v| v.as_str()).collect(),
            _ => None,
        }
    }

    /// A metadata array of integers.
    pub fn ints(&self, key: &str) -> Option<Vec<i64>> {
        match self.get(key)? {
            Value::Array(items) => items.iter().map(|v| v.as_f64().map(|f| f as i64)).collect(),
            _ => None,
        }
    }

    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.start..t.start + t.len]
    }

    /// Row `r` of a 2-D tensor (`cols` = `dims[0]` elements) decoded into f32.
    pub fn read_row(&self, t: &TensorInfo, r: usize, dst: &mut [f32]) {
        let cols = t.dims[0];
        let row_bytes = t.ty.bytes(cols).unwrap_or(0);
        let raw = &self.bytes(t)[r * row_bytes..(r + 1) * row_bytes];
        decode(t.ty, raw, &mut dst[..cols]);
    }

    /// Drops a tensor's rows `from..to` from this process' memory once copied.
    pub fn release_rows(&self, t: &TensorInfo, from: usize, to: usize) {
        const PAGE: usize = 4096;
        let row_bytes = t.ty.bytes(t.dims[0]).unwrap_or(0);
        let start = (t.start + from * row_bytes).div_ceil(PAGE) * PAGE;
        let end = (t.start + to * row_bytes) / PAGE * PAGE;
        if end > start {
            // SAFETY: DONTNEED on a read-only file mapping only drops our view of the pages; they
            // are re-read from the file if touched again, and nothing borrows them now.
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

/// Reinterprets whole blocks of a quantized row (GGUF data is aligned to at least 2 bytes, the
/// alignment of candle's block structs, whose layout is GGML's).
fn blocks<T>(raw: &[u8]) -> &[T] {
    let n = raw.len() / std::mem::size_of::<T>();
    assert!(
        (raw.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()),
        "misaligned GGUF block data"
    );
    // SAFETY: repr(C) block structs of plain bytes and f16s; length and alignment checked above.
    unsafe { std::slice::from_raw_parts(raw.as_ptr() as *const T, n) }
}

/// Decodes one row of any supported type into f32 (candle's GGML dequantization for blocks).
fn decode(ty: GgmlType, raw: &[u8], dst: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (d, b) in dst.iter_mut().zip(raw.chunks_exact(4)) {
                *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (d, b) in dst.iter_mut().zip(raw.chunks_exact(2)) {
                *d = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        GgmlType::Bf16 => {
            for (d, b) in dst.iter_mut().zip(raw.chunks_exact(2)) {
                *d = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        GgmlType::Q4_0 => BlockQ4_0::to_float(blocks(raw), dst),
        GgmlType::Q4_1 => BlockQ4_1::to_float(blocks(raw), dst),
        GgmlType::Q5_0 => BlockQ5_0::to_float(blocks(raw), dst),
        GgmlType::Q5_1 => BlockQ5_1::to_float(blocks(raw), dst),
        GgmlType::Q8_0 => BlockQ8_0::to_float(blocks(raw), dst),
        GgmlType::Q2K => BlockQ2K::to_float(blocks(raw), dst),
        GgmlType::Q3K => BlockQ3K::to_float(blocks(raw), dst),
        GgmlType::Q4K => BlockQ4K::to_float(blocks(raw), dst),
        GgmlType::Q5K => BlockQ5K::to_float(blocks(raw), dst),
        GgmlType::Q6K => BlockQ6K::to_float(blocks(raw), dst),
        GgmlType::Q8K => BlockQ8K::to_float(blocks(raw), dst),
    }
}

/// A Llama-architecture GGUF seen as a transformers checkpoint: its configuration, and its
/// tensors under transformers' names with llama.cpp's Q/K row permutation undone.
pub struct GgufLlama {
    pub file: GgufFile,
    pub config: LlamaConfig,
}

use crate::model::config::{ConfigSource, LlamaConfig, RopeScaling};

/// A token id from the metadata; one too large for 32 bits becomes `u32::MAX`, which validation
/// then reports as outside the vocabulary (instead of silently wrapping to a small id).
fn id32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}
use crate::model::cpu::qmatrix::Format;
use crate::model::cpu::source::{Rows, Tensors};

impl GgufLlama {
    pub fn open(path: &Path) -> Result<Self> {
        Self::from_file(GgufFile::open(path)?)
    }

    /// A parsed file seen as a Llama checkpoint: its configuration derived and validated.
    pub fn from_file(file: GgufFile) -> Result<Self> {
        let config = Self::config(&file).with_context(|| format!("{}", file.path.display()))?;
        Ok(Self { file, config })
    }

    fn config(f: &GgufFile) -> Result<LlamaConfig> {
        let arch = f
            .str("general.architecture")
            .context("no general.architecture in the metadata")?;
        if arch != "llama" {
            bail!("architecture `{arch}` is not supported: zagreus runs Llama-architecture models");
        }
        let need = |key: &str| -> Result<usize> {
            f.u64(&format!("llama.{key}"))
                .map(|v| v as usize)
                .with_context(|| format!("no llama.{key} in the metadata"))
        };
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let kv_heads = f
            .u64("llama.attention.head_count_kv")
            .map(|v| v as usize)
            .unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || hidden % heads != 0 {
            bail!("inconsistent head counts: {heads} heads, {kv_heads} KV heads, hidden size {hidden}");
        }
        let head_dim = f
            .u64("llama.attention.key_length")
            .map(|v| v as usize)
            .unwrap_or(hidden / heads);
        let embed = f
            .tensors
            .get("token_embd.weight")
            .context("tensor `token_embd.weight` is missing")?;
        let vocab = embed.rows_cols().0;
        let rope_scaling = match f.str("llama.rope.scaling.type") {
            None | Some("none") => RopeScaling::Default,
            Some("linear") => RopeScaling::Linear {
                factor: f.f64("llama.rope.scaling.factor").unwrap_or(1.0),
            },
            Some(other) => bail!("rope scaling `{other}` is not supported (linear is)"),
        };
        let rope_scaling = match f.tensors.get("rope_freqs.weight") {
            // Llama 3.1+ GGUFs bake their frequency scaling into per-dimension factors.
            Some(t) => {
                let mut factors = vec![0f32; t.dims[0]];
                f.read_row(t, 0, &mut factors);
                RopeScaling::Factors(factors)
            }
            None => rope_scaling,
        };
        let eos: Vec<u32> = [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ]
        .iter()
        .filter_map(|k| f.u64(k).map(id32))
        .collect();
        let config = LlamaConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: need("feed_forward_length")?,
            num_hidden_layers: need("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: f.u64("llama.context_length").map(|v| v as usize).unwrap_or(2048),
            rms_norm_eps: f.f64("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: f.f64("llama.rope.freq_base").unwrap_or(10000.0),
            rope_scaling,
            tie_word_embeddings: Some(!f.tensors.contains_key("output.weight")),
            stored_dtype: None,
            bos_token_id: f.u64("tokenizer.ggml.bos_token_id").map(id32),
            eos_token_ids: eos,
        };
        config.validate(ConfigSource::Gguf)?;
        Ok(config)
    }

    /// The GGUF tensor holding transformers tensor `name`, and the heads whose Q/K rows llama.cpp
    /// permuted.
    fn locate(&self, name: &str) -> Option<(&TensorInfo, Option<usize>)> {
        let c = &self.config;
        let (gguf, perm) = match name {
            "model.embed_tokens.weight" => ("token_embd.weight".to_string(), None),
            "lm_head.weight" => ("output.weight".to_string(), None),
            "model.norm.weight" => ("output_norm.weight".to_string(), None),
            _ => {
                let rest = name.strip_prefix("model.layers.")?;
                let (layer, part) = rest.split_once('.')?;
                let (short, perm) = match part {
                    "input_layernorm.weight" => ("attn_norm", None),
                    "post_attention_layernorm.weight" => ("ffn_norm", None),
                    "self_attn.q_proj.weight" => ("attn_q", Some(c.num_attention_heads)),
                    "self_attn.k_proj.weight" => ("attn_k", Some(c.num_key_value_heads)),
                    "self_attn.v_proj.weight" => ("attn_v", None),
                    "self_attn.o_proj.weight" => ("attn_output", None),
                    "mlp.gate_proj.weight" => ("ffn_gate", None),
                    "mlp.up_proj.weight" => ("ffn_up", None),
                    "mlp.down_proj.weight" => ("ffn_down", None),
                    _ => return None,
                };
                (format!("blk.{layer}.{short}.weight"), perm)
            }
        };
        self.file.tensors.get(&gguf).map(|t| (t, perm))
    }
}

struct GgufRows<'a> {
    file: &'a GgufFile,
    t: &'a TensorInfo,
    /// Q/K: (heads, head_dim) of llama.cpp's interleaved RoPE row order to undo.
    perm: Option<(usize, usize)>,
}

impl GgufRows<'_> {
    /// The GGUF row holding transformers row `r`: llama.cpp stores each head's rotary pairs
    /// interleaved (2i, 2i + 1) where transformers keeps halves (i, i + head_dim / 2).
    fn source_row(&self, r: usize) -> usize {
        match self.perm {
            None => r,
            Some((_, hd)) => {
                let (h, within) = (r / hd, r % hd);
                let half = hd / 2;
                let (j, i) = (within / half, within % half);
                h * hd + 2 * i + j
            }
        }
    }
}

impl Rows for GgufRows<'_> {
    fn rows(&self) -> usize {
        self.t.rows_cols().0
    }

    fn read(&self, r: usize, dst: &mut [f32]) {
        self.file.read_row(self.t, self.source_row(r), dst);
    }

    fn raw(&self, r: usize, format: Format) -> Option<&[u8]> {
        let same = matches!(
            (format, self.t.ty),
            (Format::F32, GgmlType::F32) | (Format::F16, GgmlType::F16) | (Format::Bf16, GgmlType::Bf16)
        );
        let row = self.t.ty.bytes(self.t.dims[0])?;
        let r = self.source_row(r);
        same.then(|| &self.file.bytes(self.t)[r * row..(r + 1) * row])
    }

    fn natural(&self) -> Format {
        match self.t.ty {
            GgmlType::F32 => Format::F32,
            GgmlType::F16 => Format::F16,
            GgmlType::Bf16 => Format::Bf16,
            GgmlType::Q4_0 => Format::Q4_0,
            GgmlType::Q4_1 => Format::Q4_1,
            // Q5 and the K-quants have no kernels of their own: 8 bits keep them closely.
            _ => Format::Q8_0,
        }
    }

    fn release(&self, from: usize, to: usize) {
        // Permuted rows stay within their head, and releases come in whole heads.
        self.file.release_rows(self.t, from, to);
    }
}

impl Tensors for GgufLlama {
    fn contains(&self, name: &str) -> bool {
        self.locate(name).is_some()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.locate(name).map(|(t, _)| {
            let (r, c) = t.rows_cols();
            if t.dims.len() == 1 {
                vec![c]
            } else {
                vec![r, c]
            }
        })
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Box<dyn Rows + '_>> {
        let (t, perm) = self
            .locate(name)
            .with_context(|| format!("{}: no tensor for `{name}`", self.file.path.display()))?;
        if t.dims.len() != 2 || t.rows_cols() != (rows, cols) {
            bail!(
                "{}: tensor `{}` has shape {:?}, but the metadata implies [{cols}, {rows}]",
                self.file.path.display(),
                t.name,
                t.dims
            );
        }
        if let Some(heads) = perm {
            if !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
                bail!(
                    "{}: tensor `{}` has {rows} rows for {heads} heads",
                    self.file.path.display(),
                    t.name
                );
            }
        }
        let perm = perm.map(|heads| (heads, rows / heads));
        Ok(Box::new(GgufRows {
            file: &self.file,
            t,
            perm,
        }))
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (t, _) = self
            .locate(name)
            .with_context(|| format!("{}: no tensor for `{name}`", self.file.path.display()))?;
        if t.dims != [len] {
            bail!(
                "{}: tensor `{}` has shape {:?}, expected [{len}]",
                self.file.path.display(),
                t.name,
                t.dims
            );
        }
        let mut v = vec![0f32; len];
        self.file.read_row(t, 0, &mut v);
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF with no metadata and one tensor of type `ty` and `dims` whose data is `data_len`
    /// bytes.
    fn tensor_of(ty: u32, dims: &[u64], data_len: usize) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes()); // tensors
        b.extend(0u64.to_le_bytes()); // metadata
        let name = b"rope_freqs.weight";
        b.extend((name.len() as u64).to_le_bytes());
        b.extend(name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(0u64.to_le_bytes()); // offset
        b.resize(b.len().div_ceil(32) * 32 + data_len, 0);
        b
    }

    fn one_tensor(dims: &[u64], data_len: usize) -> Vec<u8> {
        tensor_of(0, dims, data_len)
    }

    #[test]
    fn quantized_rows_must_be_whole_blocks() {
        // Found by fuzzing: Q8_0 of shape [16, 2] is 32 values, one whole block, but each row
        // is half a block, and decoding a row panicked inside candle's block decoder.
        let err = GgufFile::from_bytes(&tensor_of(8, &[16, 2], 34), "t.gguf")
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("whole 32-value blocks"), "{err:#}");
        assert!(GgufFile::from_bytes(&tensor_of(8, &[32, 2], 68), "t.gguf").is_ok());
    }

    #[test]
    fn a_zero_dimension_cannot_hide_an_absurd_one() {
        // Found by fuzzing: [2^40, 0] holds no bytes, so it "fits" any file, yet a reader sizes
        // its row buffer by the first dimension.
        let err = GgufFile::from_bytes(&one_tensor(&[1 << 40, 0], 0), "t.gguf")
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("zero dimension"), "{err:#}");
        let f = GgufFile::from_bytes(&one_tensor(&[4], 16), "t.gguf").unwrap();
        assert_eq!(f.tensors["rope_freqs.weight"].len, 16);
        assert_eq!(f.tensors["rope_freqs.weight"].dims, [4]);
        let err = GgufFile::from_bytes(&one_tensor(&[1 << 40], 16), "t.gguf")
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("past the end"), "{err:#}");
    }
}
