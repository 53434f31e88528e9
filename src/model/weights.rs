//! Safetensors weights: one `model.safetensors` or the shards named by
//! `model.safetensors.index.json`, memory-mapped and read tensor by tensor.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
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

/// The shard files an index names, each checked to exist.
pub fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("invalid {}", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: no `weight_map` object", index.display()))?;
    let names: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    if names.is_empty() {
        bail!("{}: `weight_map` names no files", index.display());
    }
    let dir = index.parent().unwrap_or(Path::new("."));
    names
        .into_iter()
        .map(|name| {
            if name.contains('/') || name.contains('\\') || name.starts_with('.') {
                bail!(
                    "{}: shard name `{name}` is not a plain file name",
                    index.display()
                );
            }
            let path = dir.join(name);
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

/// Read access to the tensors of a checkpoint, by name.
pub struct Weights {
    st: MmapedSafetensors,
    /// For error messages: the directory or file the tensors come from.
    origin: String,
}

impl Weights {
    /// Maps the safetensors files and parses their headers (a truncated or corrupt file fails here).
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        for f in files {
            let meta =
                std::fs::metadata(f).with_context(|| format!("cannot open {}", f.display()))?;
            if meta.len() < 8 {
                bail!(
                    "{} is not a safetensors file ({} bytes)",
                    f.display(),
                    meta.len()
                );
            }
        }
        // SAFETY: the files are mapped read-only; as with any mmap, a file truncated by another
        // process while we run could fault. Model files are not modified in place in practice.
        let st = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| {
            let name = files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            anyhow::anyhow!(
                "{name} is not a valid safetensors file: {}",
                strip_candle(e)
            )
        })?;
        let origin = match files {
            [one] => one.display().to_string(),
            many => format!(
                "{} shards in {}",
                many.len(),
                many[0].parent().unwrap_or(Path::new(".")).display()
            ),
        };
        Ok(Self { st, origin })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }

    /// The shape of a stored tensor, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.st.get(name).ok().map(|v| v.shape().to_vec())
    }

    /// The stored dtype of a tensor, if present.
    pub fn dtype(&self, name: &str) -> Option<DType> {
        let view = self.st.get(name).ok()?;
        DType::try_from(view.dtype()).ok()
    }

    /// Loads tensor `name`, checks its shape, and converts it to `dtype` on `device`.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let view = self
            .st
            .get(name)
            .map_err(|_| anyhow::anyhow!("{}: tensor `{name}` is missing", self.origin))?;
        if view.shape() != shape {
            bail!(
                "{}: tensor `{name}` has shape {:?}, but config.json implies {:?}",
                self.origin,
                view.shape(),
                shape
            );
        }
        let t = self.st.load(name, &Device::Cpu).map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot read tensor `{name}`: {}",
                self.origin,
                strip_candle(e)
            )
        })?;
        let t = if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        };
        Ok(t.to_device(device)?)
    }
}

/// candle errors carry backtraces and multi-line context; keep one line for the user.
pub fn strip_candle(e: candle_core::Error) -> String {
    let s = e.to_string();
    s.lines().next().unwrap_or("").trim().to_string()
}
