//! One sequence's key/value cache in the CPU engine's layout: per layer, keys transposed in
//! tiles of positions `[kv_heads][tile][head_dim][KEY_TILE]` (so scores for many keys are one
//! vector FMA chain over one contiguous stream; `attention::key_at`) and values
//! `[kv_heads][cap][head_dim]`, grown by doubling (never past the context size) and truncatable.
//! Nothing else lives here: the per-step buffers belong to the engine, so any number of
//! sequences can share one model.

use anyhow::Result;

use super::attention::{key_at, key_group_len, LayerKv};
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

    /// Positions the cache has room for without growing.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// A new cache holding a copy of the first `n` cached positions (room for them and no more
    /// than growth would give), this one unchanged.
    pub(crate) fn prefix(&self, n: usize) -> Result<Self> {
        let n = n.min(self.len);
        let cap = kv_capacity(0, n, 0, self.max_len)?;
        let (kt, v) = self.laid_out(cap, n);
        Ok(Self {
            kt,
            v,
            cap,
            len: n,
            ..*self
        })
    }

    /// Every layer's keys and values in the layout of a cache of `cap` positions, holding the
    /// first `n` of this one's (keys in whole tiles: a tile's positions past `n` are masked until
    /// written again; the rest is zero).
    fn laid_out(&self, cap: usize, n: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let (g, hd, old) = (self.kv_heads, self.head_dim, self.cap);
        let (glen, old_glen, used) = (key_group_len(hd, cap), key_group_len(hd, old), key_group_len(hd, n));
        let kt = self
            .kt
            .iter()
            .map(|kt| {
                let mut fresh = vec![0f32; g * glen];
                for gi in 0..g {
                    fresh[gi * glen..gi * glen + used].copy_from_slice(&kt[gi * old_glen..gi * old_glen + used]);
                }
                fresh
            })
            .collect();
        let v = self
            .v
            .iter()
            .map(|v| {
                let mut fresh = vec![0f32; g * cap * hd];
                for gi in 0..g {
                    fresh[gi * cap * hd..(gi * cap + n) * hd].copy_from_slice(&v[gi * old * hd..(gi * old + n) * hd]);
                }
                fresh
            })
            .collect();
        (kt, v)
    }

    /// Bytes held by the keys and values.
    pub fn bytes(&self) -> usize {
        self.kt.iter().chain(&self.v).map(|v| v.len() * 4).sum()
    }

    /// Bytes a cache of `positions` positions holds for this model shape (keys in whole tiles).
    pub fn bytes_for(layers: usize, kv_heads: usize, head_dim: usize, positions: usize) -> usize {
        layers * kv_heads * (key_group_len(head_dim, positions) + positions * head_dim) * 4
    }

    /// Makes room for `extra` more positions.
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        let cap = kv_capacity(self.len, extra, self.cap, self.max_len)?;
        if cap == self.cap {
            return Ok(());
        }
        (self.kt, self.v) = self.laid_out(cap, self.len);
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
        let (kt, glen) = (&mut self.kt[layer], key_group_len(hd, cap));
        for gi in 0..g {
            for d in 0..hd {
                kt[gi * glen + key_at(hd, d, p)] = k[gi * hd + d];
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_survive_growth_and_truncation_in_their_tiles() {
        // A context that is not a whole number of tiles, grown twice (256, 512, 700).
        let (layers, g, hd) = (2, 3, 8);
        let mut c = CpuCache::new(layers, g, hd, 700);
        let key = |l: usize, p: usize, i: usize| (l * 100_000 + p * 100 + i) as f32;
        let val = |l: usize, p: usize, i: usize| -key(l, p, i);
        let mut stored = 0;
        for n in [5, 300, 395] {
            c.reserve(n).unwrap();
            for p in stored..stored + n {
                for l in 0..layers {
                    let k: Vec<f32> = (0..g * hd).map(|i| key(l, p, i)).collect();
                    let v: Vec<f32> = (0..g * hd).map(|i| val(l, p, i)).collect();
                    c.store(l, p, &k, &v);
                }
            }
            c.advance(n);
            stored += n;
            if stored == 305 {
                // Dropping the last 10 positions, then storing different ones there.
                c.truncate(295);
                stored = 295;
            }
        }
        assert_eq!((c.len(), c.cap), (690, 700));
        assert!(c.reserve(11).is_err(), "past the context");
        assert_eq!(c.bytes(), CpuCache::bytes_for(layers, g, hd, 700));
        // A copy of a prefix that ends inside a tile: its own room, the same keys and values.
        let copy = c.prefix(299).unwrap();
        assert_eq!((copy.len(), copy.capacity(), copy.max_len()), (299, 299, 700));
        for (cache, len) in [(&c, 690), (&copy, 299)] {
            for l in 0..layers {
                let kv = cache.layer(l);
                let glen = key_group_len(hd, kv.cap);
                for p in 0..len {
                    for gi in 0..g {
                        for d in 0..hd {
                            let i = gi * hd + d;
                            assert_eq!(kv.kt[gi * glen + key_at(hd, d, p)], key(l, p, i), "key {l} {p} {i}");
                            assert_eq!(kv.v[(gi * kv.cap + p) * hd + d], val(l, p, i), "value {l} {p} {i}");
                        }
                    }
                }
            }
        }
        assert_eq!(c.len(), 690, "the copied-from cache is unchanged");
    }
}
