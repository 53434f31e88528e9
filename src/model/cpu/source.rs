//! Where the CPU engine reads weights from while loading: any checkpoint format that can name
//! its tensors as transformers does and hand out their rows (safetensors, GGUF).

use anyhow::Result;

use super::qmatrix::Format;
use crate::model::weights::{StoredDtype, TensorEntry, Weights};

/// The rows of one checkpoint matrix (transformers' orientation: output features x inputs).
pub trait Rows: Sync {
    fn rows(&self) -> usize;
    /// Row `r` decoded into f32 (`dst.len()` is the number of columns).
    fn read(&self, r: usize, dst: &mut [f32]);
    /// Row `r`'s stored little-endian bytes, when its element type is exactly `format`'s
    /// (f32, f16, bf16): the copy-only fast path.
    fn raw(&self, r: usize, format: Format) -> Option<&[u8]>;
    /// The engine format that holds these values as stored (or most closely).
    fn natural(&self) -> Format;
    /// Drops rows `from..to` from memory once they have been copied.
    fn release(&self, from: usize, to: usize);
}

/// A checkpoint's tensors, by transformers name.
pub trait Tensors: Sync {
    fn contains(&self, name: &str) -> bool;
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Matrix `name`, checked to be `rows x cols`.
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Box<dyn Rows + '_>>;
    /// Vector `name` (norm weights), checked to have `len` values.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>>;
}

struct StRows<'a> {
    w: &'a Weights,
    t: &'a TensorEntry,
    cols: usize,
}

impl Rows for StRows<'_> {
    fn rows(&self) -> usize {
        self.t.shape[0]
    }

    fn read(&self, r: usize, dst: &mut [f32]) {
        self.w.read_f32(self.t, r * self.cols, dst);
    }

    fn raw(&self, r: usize, format: Format) -> Option<&[u8]> {
        let same = matches!(
            (format, self.t.dtype),
            (Format::Bf16, StoredDtype::Bf16) | (Format::F16, StoredDtype::F16) | (Format::F32, StoredDtype::F32)
        );
        let row = self.cols * self.t.dtype.size();
        same.then(|| &self.w.bytes(self.t)[r * row..(r + 1) * row])
    }

    fn natural(&self) -> Format {
        match self.t.dtype {
            StoredDtype::Bf16 => Format::Bf16,
            StoredDtype::F16 => Format::F16,
            StoredDtype::F32 => Format::F32,
        }
    }

    fn release(&self, from: usize, to: usize) {
        let row = self.cols * self.t.dtype.size();
        self.w.release_range(self.t, from * row, to * row);
    }
}

impl Tensors for Weights {
    fn contains(&self, name: &str) -> bool {
        Weights::contains(self, name)
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        Weights::shape(self, name)
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Box<dyn Rows + '_>> {
        let t = self.entry(name, &[rows, cols])?;
        Ok(Box::new(StRows { w: self, t, cols }))
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.entry(name, &[len])?;
        let mut v = vec![0f32; len];
        self.read_f32(t, 0, &mut v);
        Ok(v)
    }
}

/// The one format a fused matrix (q/k/v, gate/up) is kept in when its parts differ.
pub fn common_format(parts: &[Format]) -> Format {
    match parts {
        [first, rest @ ..] if rest.iter().all(|f| f == first) => *first,
        _ if parts
            .iter()
            .all(|f| matches!(f, Format::F32 | Format::F16 | Format::Bf16)) =>
        {
            Format::F32
        }
        _ => Format::Q8_0,
    }
}
