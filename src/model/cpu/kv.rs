//! One sequence's key/value cache in the CPU engine's layout: per layer, keys transposed
//! `[kv_heads][head_dim][cap]` (so scores for many keys are one vector FMA chain) and values
//! `[kv_heads][cap][head_dim]`, grown by doubling (never past the context size) and truncatable.
//! Nothing else lives here: the per-step buffers belong to the engine, so any number of
//! sequences can share one model.

use anyhow::Result;

use super::attention::LayerKv;
use crate::model::plan::kv_capacity;

pub struct CpuCache {
    kt: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    kv_heads: usize,
    head_dim: usize,
    cap: usize,
    len: usize,
    max_len: usize,
}

impl CpuCache {
    pub(crate) fn new(layers: usize, kv_heads: usize, head_dim: usize, max_len: usize) -> Self {
        Self {
            kt: vec![Vec::new(); layers],
            v: vec![Vec::new(); layers],
            kv_heads,
            head_dim,
            cap: 0,
            len: 0,
            max_len,
        }
    }

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

    /// Bytes a cache of `positions` positions holds for this model shape.
    pub fn bytes_for(layers: usize, kv_heads: usize, head_dim: usize, positions: usize) -> usize {
        2 * layers * kv_heads * head_dim * positions * 4
    }

    /// Makes room for `extra` more positions.
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        let cap = kv_capacity(self.len, extra, self.cap, self.max_len)?;
        if cap == self.cap {
            return Ok(());
        }
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

    /// Stores position `p`'s keys and values (`kv_heads * head_dim` each) of `layer`.
    pub(crate) fn store(&mut self, layer: usize, p: usize, k: &[f32], v: &[f32]) {
        let (g, hd, cap) = (self.kv_heads, self.head_dim, self.cap);
        assert!(
            p < cap && k.len() == g * hd && v.len() == g * hd,
            "kv: position {p} outside the cache"
        );
        let kt = &mut self.kt[layer];
        for (i, kd) in k.iter().enumerate() {
            kt[i * cap + p] = *kd;
        }
        for gi in 0..g {
            self.v[layer][(gi * cap + p) * hd..(gi * cap + p + 1) * hd].copy_from_slice(&v[gi * hd..(gi + 1) * hd]);
        }
    }

    /// Marks `n` more positions as cached (after a forward pass stored them).
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    pub(crate) fn layer(&self, layer: usize) -> LayerKv<'_> {
        LayerKv {
            kt: &self.kt[layer],
            v: &self.v[layer],
            cap: self.cap,
        }
    }
}
