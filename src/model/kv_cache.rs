//! The key/value cache: preallocated per layer, appended in place, truncatable to any prefix.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use super::plan::kv_capacity;

/// Keys and values of every layer for the tokens seen so far, `(1, kv_heads, capacity, head_dim)`
/// each. Capacity grows by doubling (copying once per doubling) up to `max_len`, so a short prompt
/// does not pay for the whole context up front.
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    layers: usize,
    len: usize,
    capacity: usize,
    max_len: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
}

impl KvCache {
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, max_len: usize, dtype: DType, device: &Device) -> Self {
        Self {
            k: Vec::new(),
            v: Vec::new(),
            layers,
            len: 0,
            capacity: 0,
            max_len,
            kv_heads,
            head_dim,
            dtype,
            device: device.clone(),
        }
    }

    /// Tokens currently cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most tokens this cache can hold.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Tokens the cache has room for without growing.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every token after the first `len` (for prefix reuse and regeneration).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Makes room for `extra` more tokens.
    pub fn reserve(&mut self, extra: usize) -> Result<()> {
        let capacity = kv_capacity(self.len, extra, self.capacity, self.max_len)?;
        if capacity == self.capacity {
            return Ok(());
        }
        let shape = (1, self.kv_heads, capacity, self.head_dim);
        for cache in [&mut self.k, &mut self.v] {
            let mut grown = Vec::with_capacity(self.layers);
            for layer in 0..self.layers {
                let fresh = Tensor::zeros(shape, self.dtype, &self.device)?;
                if let Some(old) = cache.get(layer).filter(|_| self.len > 0) {
                    fresh.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                grown.push(fresh);
            }
            *cache = grown;
        }
        self.capacity = capacity;
        Ok(())
    }

    /// Writes `k`, `v` `(1, kv_heads, t, head_dim)` of `layer` at the current end and returns the
    /// views over all cached positions including them. Call `reserve(t)` first and `advance(t)`
    /// after every layer has appended.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let end = self.len + t;
        if end > self.capacity {
            bail!("internal error: KV cache append past its reserved capacity");
        }
        self.k[layer].slice_set(&k.contiguous()?, 2, self.len)?;
        self.v[layer].slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((self.k[layer].narrow(2, 0, end)?, self.v[layer].narrow(2, 0, end)?))
    }

    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
