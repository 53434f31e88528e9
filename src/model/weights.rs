//! Safetensors weights: one `model.safetensors` or the shards named by
//! `model.safetensors.index.json`, memory-mapped and read tensor by tensor.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The safetensors files of a model directory, in load order.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        return shard_files(&index);
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    bail!(
        "no {SINGLE_FILE} or {INDEX_FILE} in {} (zagreus loads safetensors weights)",
        dir.display()
    )
}

/// The shard file names a `model.safetensors.index.json` lists (its `weight_map` values), each
/// a plain file name of the same directory.
pub fn parse_index(text: &str) -> Result<BTreeSet<String>> {
    let json: serde_json::Value = serde_json::from_str(text)?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .context("no `weight_map` object")?;
    let mut names = BTreeSet::new();
    for (tensor, v) in map {
        let Some(name) = v.as_str() else {
            bail!("`weight_map` gives tensor `{tensor}` the file {v}, not a file name");
        };
        let plain = !name.is_empty()
            && name.len() <= 255
            && !name.starts_with('.')
            && !name.chars().any(|c| c == '/' || c == '\\' || c.is_control());
        if !plain {
            bail!("shard name `{}` is not a plain file name", name.escape_debug());
        }
        names.insert(name.to_string());
    }
    if names.is_empty() {
        bail!("`weight_map` names no files");
    }
    Ok(names)
}

/// The shard files an index names, each checked to exist.
pub fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = crate::bounded::read_text(index, crate::bounded::JSON_CONFIG_LIMIT, "the safetensors index")?;
    let names = parse_index(&text).with_context(|| format!("invalid {}", index.display()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    names
        .into_iter()
        .map(|name| {
            let path = dir.join(&name);
            if !path.is_file() {
                bail!(
                    "{} lists {name}, which is missing from {}",
                    index.display(),
                    dir.display()
                );
            }
            Ok(path)
        })
        .collect()
}

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    F16,
    Bf16,
}

impl StoredDtype {
    pub fn size(self) -> usize {
        match self {
            StoredDtype::F32 => 4,
            StoredDtype::F16 | StoredDtype::Bf16 => 2,
        }
    }

    pub fn to_candle(self) -> DType {
        match self {
            StoredDtype::F32 => DType::F32,
            StoredDtype::F16 => DType::F16,
            StoredDtype::Bf16 => DType::BF16,
        }
    }
}

/// Where one tensor's bytes are.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    file: usize,
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// Read access to the tensors of a checkpoint, by name, straight from memory-mapped files.
pub struct Weights {
    maps: Vec<memmap2::Mmap>,
    tensors: HashMap<String, TensorEntry>,
    /// For error messages: the file or directory the tensors come from.
    origin: String,
}

impl Weights {
    /// Maps the safetensors files and parses their headers (a truncated or corrupt file fails here).
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let mut w = Self {
            maps: Vec::with_capacity(files.len()),
            tensors: HashMap::new(),
            origin: String::new(),
        };
        for f in files {
            let file = crate::bounded::open_regular(f, "the weights file")?;
            let len = file
                .metadata()
                .with_context(|| format!("cannot read {}", f.display()))?
                .len();
            if len < 8 {
                bail!("{} is not a safetensors file ({len} bytes)", f.display());
            }
            // SAFETY: mapped read-only; as with any mmap, a file truncated by another process
            // while we run could fault. Model files are not modified in place in practice.
            let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", f.display()))?;
            w.add(map, &f.display().to_string())?;
        }
        w.origin = match files {
            [one] => one.display().to_string(),
            many => format!(
                "{} shards in {}",
                many.len(),
                many[0].parent().unwrap_or(Path::new(".")).display()
            ),
        };
        Ok(w)
    }

    /// Parses a safetensors file held in memory (`name` for messages): for tests and fuzzing.
    pub fn from_bytes(bytes: &[u8], name: &str) -> Result<Self> {
        let mut w = Self {
            maps: Vec::new(),
            tensors: HashMap::new(),
            origin: name.to_string(),
        };
        if bytes.len() < 8 {
            bail!("{name} is not a safetensors file ({} bytes)", bytes.len());
        }
        w.add(anonymous_copy(bytes)?, name)?;
        Ok(w)
    }

    /// Parses the header of one mapped file and records its tensors.
    fn add(&mut self, map: memmap2::Mmap, name: &str) -> Result<()> {
        let i = self.maps.len();
        let st = safetensors::SafeTensors::deserialize(&map)
            .map_err(|e| anyhow::anyhow!("{name} is not a valid safetensors file: {e}"))?;
        let base = map.as_ptr() as usize;
        for (tensor, view) in st.tensors() {
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => StoredDtype::F32,
                safetensors::Dtype::F16 => StoredDtype::F16,
                safetensors::Dtype::BF16 => StoredDtype::Bf16,
                other => bail!("{name}: tensor `{tensor}` has dtype {other:?}; zagreus reads F32, F16 and BF16"),
            };
            let data = view.data();
            let start = data.as_ptr() as usize - base;
            self.tensors.insert(
                tensor.clone(),
                TensorEntry {
                    name: tensor,
                    file: i,
                    dtype,
                    shape: view.shape().to_vec(),
                    start,
                    end: start + data.len(),
                },
            );
        }
        self.maps.push(map);
        Ok(())
    }

    /// The names of every tensor.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(|k| k.as_str()).collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The shape of a stored tensor, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.shape.clone())
    }

    /// The stored dtype of a tensor, if present.
    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.tensors.get(name).map(|t| t.dtype.to_candle())
    }

    /// The entry of tensor `name`, checked to have `shape`.
    pub fn entry(&self, name: &str, shape: &[usize]) -> Result<&TensorEntry> {
        let t = self
            .tensors
            .get(name)
            .with_context(|| format!("{}: tensor `{name}` is missing", self.origin))?;
        if t.shape != shape {
            bail!(
                "{}: tensor `{name}` has shape {:?}, but config.json implies {:?}",
                self.origin,
                t.shape,
                shape
            );
        }
        Ok(t)
    }

    /// The raw little-endian bytes of a tensor.
    pub fn bytes(&self, t: &TensorEntry) -> &[u8] {
        &self.maps[t.file][t.start..t.end]
    }

    /// Decodes `dst.len()` elements starting at element `from` into f32.
    pub fn read_f32(&self, t: &TensorEntry, from: usize, dst: &mut [f32]) {
        let size = t.dtype.size();
        let bytes = &self.bytes(t)[from * size..(from + dst.len()) * size];
        match t.dtype {
            StoredDtype::F32 => {
                for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                    *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            StoredDtype::Bf16 => {
                for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                    *d = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
                }
            }
            StoredDtype::F16 => {
                for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                    *d = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
        }
    }

    /// Drops a tensor's pages from this process' memory once it has been copied, so loading never
    /// holds the file and the copy at the same time (the page cache keeps the file for next time).
    pub fn release(&self, t: &TensorEntry) {
        self.release_range(t, 0, t.end - t.start);
    }

    /// As `release`, for bytes `from..to` of the tensor only (pages wholly inside).
    pub fn release_range(&self, t: &TensorEntry, from: usize, to: usize) {
        const PAGE: usize = 4096;
        let start = (t.start + from).div_ceil(PAGE) * PAGE;
        let end = (t.start + to.min(t.end - t.start)) / PAGE * PAGE;
        if end > start {
            // SAFETY: DONTNEED on a read-only file mapping only drops our view of the pages; the
            // data is re-read from the file if touched again, and nothing borrows it now.
            let _ = unsafe {
                self.maps[t.file].unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }

    /// Loads tensor `name` as a candle tensor, checks its shape, and converts it to `dtype` on
    /// `device`.
    pub fn load(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.entry(name, shape)?;
        let tensor = Tensor::from_raw_buffer(self.bytes(t), t.dtype.to_candle(), shape, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: cannot read tensor `{name}`: {}", self.origin, strip_candle(e)))?;
        let tensor = if tensor.dtype() == dtype {
            tensor
        } else {
            tensor.to_dtype(dtype)?
        };
        Ok(tensor.to_device(device)?)
    }
}

/// A read-only anonymous mapping holding a copy of `bytes` (exactly as long), so that data held
/// in memory is read through the same code as a mapped file.
pub fn anonymous_copy(bytes: &[u8]) -> Result<memmap2::Mmap> {
    let mut m = memmap2::MmapOptions::new()
        .len(bytes.len().max(1))
        .map_anon()
        .context("cannot allocate memory for the file")?;
    m[..bytes.len()].copy_from_slice(bytes);
    let m = m.make_read_only().context("cannot protect the copy")?;
    if m.len() != bytes.len() {
        bail!("an empty file");
    }
    Ok(m)
}

/// candle errors carry backtraces and multi-line context; keep one line for the user.
pub fn strip_candle(e: candle_core::Error) -> String {
    let s = e.to_string();
    s.lines().next().unwrap_or("").trim().to_string()
}
