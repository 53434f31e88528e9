//! One sequence's key/value cache in the CPU engine's layout: per layer, keys transposed in
//! tiles of positions `[kv_heads][tile][head_dim][KEY_TILE]` (so scores for many keys are one
//! vector FMA chain over one contiguous stream; `attention::key_at`) and values
//! `[kv_heads][cap][head_dim]`, grown by doubling (never past the context size) and truncatable.
//! Nothing else lives here: the per-step buffers belong to the engine, so any number of
//! sequences can share one model.

use anyhow::Result;
use half::bf16;

use super::attention::{key_at, key_group_len, KvElem, LayerKv};
use crate::model::plan::kv_capacity;

/// How a cache holds keys and values: f32 (what transformers computes in f32), or BF16 (half the
/// memory and half the bytes attention reads; what the model computes with in BF16 inference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvType {
    F32,
    Bf16,
}

impl KvType {
    pub fn bytes(self) -> usize {
        match self {
            KvType::F32 => 4,
            KvType::Bf16 => 2,
        }
    }
}

/// Every layer's keys (tiled) and values, in one element type.
#[derive(Clone)]
pub(crate) struct Planes<E> {
    kt: Vec<Vec<E>>,
    v: Vec<Vec<E>>,
}

#[derive(Clone)]
enum Store {
    F32(Planes<f32>),
    Bf16(Planes<bf16>),
}

/// The element types a cache holds, and how to find their planes in one.
pub(crate) trait CacheElem: KvElem {
    fn planes(c: &CpuCache) -> Option<&Planes<Self>>;
}

impl CacheElem for f32 {
    fn planes(c: &CpuCache) -> Option<&Planes<f32>> {
        match &c.store {
            Store::F32(p) => Some(p),
            Store::Bf16(_) => None,
        }
    }
}

impl CacheElem for bf16 {
    fn planes(c: &CpuCache) -> Option<&Planes<bf16>> {
        match &c.store {
            Store::Bf16(p) => Some(p),
            Store::F32(_) => None,
        }
    }
}

pub struct CpuCache {
    store: Store,
    kv_heads: usize,
    head_dim: usize,
    cap: usize,
    len: usize,
    max_len: usize,
}

impl CpuCache {
    pub(crate) fn new(layers: usize, kv_heads: usize, head_dim: usize, max_len: usize, kind: KvType) -> Self {
        let store = match kind {
            KvType::F32 => Store::F32(Planes {
                kt: vec![Vec::new(); layers],
                v: vec![Vec::new(); layers],
            }),
            KvType::Bf16 => Store::Bf16(Planes {
                kt: vec![Vec::new(); layers],
                v: vec![Vec::new(); layers],
            }),
        };
        Self {
            store,
            kv_heads,
            head_dim,
            cap: 0,
            len: 0,
            max_len,
        }
    }

    pub fn kv_type(&self) -> KvType {
        match self.store {
            Store::F32(_) => KvType::F32,
            Store::Bf16(_) => KvType::Bf16,
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
        Ok(Self {
            store: self.laid_out(cap, n),
            cap,
            len: n,
            ..*self
        })
    }

    /// Every layer's keys and values in the layout of a cache of `cap` positions, holding the
    /// first `n` of this one's (keys in whole tiles: a tile's positions past `n` are masked until
    /// written again; the rest is zero).
    fn laid_out(&self, cap: usize, n: usize) -> Store {
        let (g, hd, old) = (self.kv_heads, self.head_dim, self.cap);
        let (glen, old_glen, used) = (key_group_len(hd, cap), key_group_len(hd, old), key_group_len(hd, n));
        fn copy<E: Copy + Default>(
            p: &Planes<E>,
            (g, hd, old, cap, n): (usize, usize, usize, usize, usize),
            (glen, old_glen, used): (usize, usize, usize),
        ) -> Planes<E> {
            let kt = p
                .kt
                .iter()
                .map(|kt| {
                    let mut fresh = vec![E::default(); g * glen];
                    for gi in 0..g {
                        fresh[gi * glen..gi * glen + used].copy_from_slice(&kt[gi * old_glen..gi * old_glen + used]);
                    }
                    fresh
                })
                .collect();
            let v =
                p.v.iter()
                    .map(|v| {
                        let mut fresh = vec![E::default(); g * cap * hd];
                        for gi in 0..g {
                            fresh[gi * cap * hd..(gi * cap + n) * hd]
                                .copy_from_slice(&v[gi * old * hd..(gi * old + n) * hd]);
                        }
                        fresh
                    })
                    .collect();
            Planes { kt, v }
        }
        let shape = (g, hd, old, cap, n);
        let lens = (glen, old_glen, used);
        match &self.store {
            Store::F32(p) => Store::F32(copy(p, shape, lens)),
            Store::Bf16(p) => Store::Bf16(copy(p, shape, lens)),
        }
    }

    /// Bytes held by the keys and values.
    pub fn bytes(&self) -> usize {
        fn held<E>(p: &Planes<E>) -> usize {
            p.kt.iter()
                .chain(&p.v)
                .map(|v| v.len() * std::mem::size_of::<E>())
                .sum()
        }
        match &self.store {
            Store::F32(p) => held(p),
            Store::Bf16(p) => held(p),
        }
    }

    /// Bytes a cache of `positions` positions holds for this model shape (keys in whole tiles).
    pub fn bytes_for(layers: usize, kv_heads: usize, head_dim: usize, positions: usize, kind: KvType) -> usize {
        layers * kv_heads * (key_group_len(head_dim, positions) + positions * head_dim) * kind.bytes()
    }

    /// Bytes one more position takes, averaged over a tile of keys: what `bytes_for` grows by
    /// per position (`bytes_for(.., 1, ..)` would count a whole tile of keys for one position).
    pub fn bytes_per_position(layers: usize, kv_heads: usize, head_dim: usize, kind: KvType) -> usize {
        layers * kv_heads * 2 * head_dim * kind.bytes()
    }

    /// Makes room for `extra` more positions.
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        let cap = kv_capacity(self.len, extra, self.cap, self.max_len)?;
        if cap == self.cap {
            return Ok(());
        }
        self.store = self.laid_out(cap, self.len);
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
        let glen = key_group_len(hd, cap);
        fn put<E: KvElem>(
            planes: &mut Planes<E>,
            layer: usize,
            p: usize,
            k: &[f32],
            v: &[f32],
            (g, hd, cap, glen): (usize, usize, usize, usize),
        ) {
            let kt = &mut planes.kt[layer];
            for gi in 0..g {
                for d in 0..hd {
                    kt[gi * glen + key_at(hd, d, p)] = E::from_f32(k[gi * hd + d]);
                }
            }
            let vs = &mut planes.v[layer];
            for gi in 0..g {
                for (dst, x) in vs[(gi * cap + p) * hd..(gi * cap + p + 1) * hd]
                    .iter_mut()
                    .zip(&v[gi * hd..(gi + 1) * hd])
                {
                    *dst = E::from_f32(*x);
                }
            }
        }
        match &mut self.store {
            Store::F32(pl) => put(pl, layer, p, k, v, (g, hd, cap, glen)),
            Store::Bf16(pl) => put(pl, layer, p, k, v, (g, hd, cap, glen)),
        }
    }

    /// Marks `n` more positions as cached (after a forward pass stored them).
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// One layer's keys and values, or `None` if the cache holds another element type.
    pub(crate) fn layer<E: CacheElem>(&self, layer: usize) -> Option<LayerKv<'_, E>> {
        E::planes(self).map(|p| LayerKv {
            kt: &p.kt[layer],
            v: &p.v[layer],
            cap: self.cap,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_survive_growth_and_truncation_in_their_tiles() {
        keep_through_growth::<f32>(KvType::F32);
        keep_through_growth::<bf16>(KvType::Bf16);
    }

    #[test]
    fn bytes_per_position_is_what_a_cache_grows_by_per_position() {
        for kind in [KvType::F32, KvType::Bf16] {
            let per = CpuCache::bytes_per_position(32, 5, 64, kind);
            assert_eq!(per, 32 * 5 * 2 * 64 * kind.bytes());
            for positions in [16, 1024, 4096] {
                assert_eq!(CpuCache::bytes_for(32, 5, 64, positions, kind), positions * per);
            }
            // A partial tile of keys counts whole; never less than the positions' own bytes.
            assert!(CpuCache::bytes_for(32, 5, 64, 1000, kind) >= 1000 * per);
        }
    }

    #[test]
    fn a_bf16_cache_holds_half_the_bytes_rounded_to_nearest() {
        let (f, b) = (
            CpuCache::bytes_for(32, 5, 64, 1000, KvType::F32),
            CpuCache::bytes_for(32, 5, 64, 1000, KvType::Bf16),
        );
        assert_eq!(f, 2 * b);
        let mut c = CpuCache::new(1, 1, 2, 16, KvType::Bf16);
        c.reserve(1).unwrap();
        // 1 + 2^-8 is halfway between two BF16 values: ties go to the even one (1.0); 1 + 3·2^-9
        // rounds up to 1 + 2^-7.
        c.store(0, 0, &[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 512.0], &[-2.5, 1e-3]);
        let kv = c.layer::<bf16>(0).unwrap();
        let glen = key_group_len(2, kv.cap);
        assert_eq!(kv.kt[key_at(2, 0, 0)].to_f32(), 1.0);
        assert_eq!(kv.kt[key_at(2, 1, 0)].to_f32(), 1.0 + 1.0 / 128.0);
        assert!(glen >= 2);
        assert_eq!(kv.v[0].to_f32(), -2.5);
        assert!((kv.v[1].to_f32() - 1e-3).abs() <= 1e-3 / 256.0);
        assert!(c.layer::<f32>(0).is_none(), "a BF16 cache is not read as f32");
    }

    fn keep_through_growth<E: CacheElem + PartialEq + std::fmt::Debug>(kind: KvType) {
        // A context that is not a whole number of tiles, grown twice (256, 512, 700).
        let (layers, g, hd) = (2, 3, 8);
        let mut c = CpuCache::new(layers, g, hd, 700, kind);
        assert_eq!(c.kv_type(), kind);
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
        assert_eq!(c.bytes(), CpuCache::bytes_for(layers, g, hd, 700, kind));
        // A copy of a prefix that ends inside a tile: its own room, the same keys and values.
        let copy = c.prefix(299).unwrap();
        assert_eq!((copy.len(), copy.capacity(), copy.max_len()), (299, 299, 700));
        assert_eq!(copy.kv_type(), kind);
        for (cache, len) in [(&c, 690), (&copy, 299)] {
            for l in 0..layers {
                let kv = cache.layer::<E>(l).unwrap();
                let glen = key_group_len(hd, kv.cap);
                for p in 0..len {
                    for gi in 0..g {
                        for d in 0..hd {
                            let i = gi * hd + d;
                            let (k, v) = (E::from_f32(key(l, p, i)), E::from_f32(val(l, p, i)));
                            assert_eq!(kv.kt[gi * glen + key_at(hd, d, p)], k, "key {l} {p} {i}");
                            assert_eq!(kv.v[(gi * kv.cap + p) * hd + d], v, "value {l} {p} {i}");
                        }
                    }
                }
            }
        }
        assert_eq!(c.len(), 690, "the copied-from cache is unchanged");
    }
}
