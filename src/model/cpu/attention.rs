//! Attention against the KV cache, without materialising repeated K/V: the query heads of one
//! KV group are processed together against that group's keys and values. Keys are stored
//! transposed in tiles of 16 positions (`[tile][head_dim][16]`, see `KEY_TILE`) so that scores
//! for 16 keys at a time are one vector FMA chain and a run of keys is one contiguous stream;
//! values are stored by position (`[capacity][head_dim]`). Work is split over KV groups,
//! query blocks and, for long contexts, key blocks merged with the online-softmax rule, so two
//! cores stay busy in decoding as well as in prefill.

// Register-blocked kernels index several arrays with the same counters; explicit loops read
// closer to the math than iterator chains.
#![allow(clippy::needless_range_loop)]

use std::cell::RefCell;

use super::kernels::Isa;
use super::ops::exp_approx;
use super::pool::Pool;

/// Keys per work unit when one query row is split over several units (decoding long contexts).
const KEY_BLOCK: usize = 512;
/// Query rows per work unit in prefill.
const QUERY_BLOCK: usize = 8;

/// Positions per tile of the key cache. Keys are stored `[kv_heads][tile][head_dim][KEY_TILE]`:
/// one vector load takes a dimension of 16 neighbouring keys, and the keys of a run of
/// positions are one contiguous stream, which the hardware prefetchers follow (with the plain
/// transposed layout, `[head_dim][cap]`, a run was `head_dim` short streams `cap` apart; one
/// query against 2048 positions went from 64 to 44 µs with the tiles).
pub const KEY_TILE: usize = 16;

/// Floats of one KV group's keys in a cache of `cap` positions (whole tiles).
pub fn key_group_len(head_dim: usize, cap: usize) -> usize {
    cap.div_ceil(KEY_TILE) * KEY_TILE * head_dim
}

/// Where dimension `d` of position `p` is within one KV group's keys.
#[inline(always)]
pub fn key_at(head_dim: usize, d: usize, p: usize) -> usize {
    (p / KEY_TILE) * head_dim * KEY_TILE + d * KEY_TILE + p % KEY_TILE
}

/// One layer's cache for all KV groups, in f32 or BF16 (`KvElem`).
pub struct LayerKv<'a, E> {
    /// `[kv_heads][tile][head_dim][KEY_TILE]` (`key_at`), `key_group_len` per group
    pub kt: &'a [E],
    /// `[kv_heads][cap][head_dim]`
    pub v: &'a [E],
    pub cap: usize,
}

/// An element type of the KV cache: stored from f32, read back as f32 (the kernels widen BF16
/// as they load it, so attention computes in f32 either way).
pub trait KvElem: Copy + Default + Send + Sync + 'static {
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    /// 16 values from `p` as f32 (AVX-512).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL; `p` points at 16 readable values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// The values of `p` where `m` has a bit, zeros elsewhere (AVX-512).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL; `p` points at the values `m` selects.
    #[cfg(target_arch = "x86_64")]
    unsafe fn maskz_load16(m: u16, p: *const Self) -> std::arch::x86_64::__m512;
    /// 8 values from `p` as f32 (AVX2).
    ///
    /// # Safety
    /// AVX2; `p` points at 8 readable values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn maskz_load16(m: u16, p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_maskz_loadu_ps(m, p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

/// BF16 keys and values: rounded to nearest (even) when stored; widening back is exact (the
/// 16 bits become the top of an f32).
impl KvElem for half::bf16 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const half::bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
            p as *const __m256i,
        ))))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn maskz_load16(m: u16, p: *const half::bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
            _mm256_maskz_loadu_epi16(m, p as *const i16),
        )))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const half::bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(
            p as *const __m128i,
        ))))
    }
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A piece of work: query rows `i0..i0 + rows` of sequence `s`, KV group `g`, against keys
/// `k0..k1`.
#[derive(Clone, Copy)]
struct Unit {
    s: usize,
    g: usize,
    i0: usize,
    rows: usize,
    k0: usize,
    k1: usize,
    /// Where this unit's partial results start in `AttnScratch::parts`.
    at: usize,
}

/// Buffers reused across calls (one per session), so attention allocates nothing per token.
#[derive(Default)]
pub struct AttnScratch {
    units: Vec<Unit>,
    /// Per unit, row and head: `[max, sum, acc(head_dim)]`.
    parts: Vec<f32>,
    best: Vec<f32>,
    sums: Vec<f32>,
}

/// Shared pointer for units writing disjoint ranges of `parts`.
#[derive(Clone, Copy)]
struct Parts(*mut f32);
// SAFETY: every unit writes only its own range (`Unit::at` .. + its length).
unsafe impl Send for Parts {}
unsafe impl Sync for Parts {}
impl Parts {
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// One sequence's part of a batched attention: its cache, and its `t` query rows (rows
/// `row0..row0 + t` of the batch) at positions `pos..pos + t`.
pub struct AttnSeq<'a, E> {
    pub kv: LayerKv<'a, E>,
    pub row0: usize,
    pub t: usize,
    pub pos: usize,
}

/// Attention output for every sequence's query rows. `q` holds each row's query heads
/// (`heads * head_dim`, row stride `q_stride`); `out` gets `heads * head_dim` per row.
///
/// Work is split into units of up to `QUERY_BLOCK` rows of one KV group against one block of
/// `KEY_BLOCK` keys, and each row's partial results are merged over the key blocks in order with
/// the online-softmax rule. The blocks are fixed by absolute position, so a row's result is the
/// same bits whether it is decoded alone, in a batch, or as part of a prompt.
#[allow(clippy::too_many_arguments)]
pub fn attention<E: KvElem>(
    isa: Isa,
    seqs: &[AttnSeq<E>],
    q: &[f32],
    q_stride: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    out: &mut [f32],
    sc: &mut AttnScratch,
) {
    let row_out = heads * head_dim;
    // Checked here once, so that the kernels below (some of them `unsafe`) only see
    // consistent shapes.
    assert!(
        kv_heads > 0 && head_dim > 0 && heads.is_multiple_of(kv_heads),
        "attention: {heads} heads do not divide into {kv_heads} KV groups"
    );
    assert!(q_stride >= row_out, "attention: query rows are shorter than the heads");
    for sq in seqs {
        let kv = &sq.kv;
        assert!(
            sq.pos + sq.t <= kv.cap
                && kv.kt.len() >= kv_heads * key_group_len(head_dim, kv.cap)
                && kv.v.len() >= kv_heads * kv.cap * head_dim,
            "attention: the KV cache does not hold positions up to {}",
            sq.pos + sq.t
        );
        let end = sq.row0 + sq.t;
        assert!(
            sq.t == 0 || (q.len() >= (end - 1) * q_stride + row_out && out.len() >= end * row_out),
            "attention: the queries or the output are shorter than row {end}"
        );
    }
    let rep = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let part_len = rep * (head_dim + 2);
    sc.units.clear();
    let mut at = 0;
    for (si, sq) in seqs.iter().enumerate() {
        for g in 0..kv_heads {
            for i0 in (0..sq.t).step_by(QUERY_BLOCK) {
                let rows = QUERY_BLOCK.min(sq.t - i0);
                let keys = sq.pos + i0 + rows;
                for b in 0..keys.div_ceil(KEY_BLOCK) {
                    sc.units.push(Unit {
                        s: si,
                        g,
                        i0,
                        rows,
                        k0: b * KEY_BLOCK,
                        k1: ((b + 1) * KEY_BLOCK).min(keys),
                        at,
                    });
                    at += rows * part_len;
                }
            }
        }
    }
    sc.parts.resize(at, 0.0);
    let parts = Parts(sc.parts.as_mut_ptr());
    let units = &sc.units;
    Pool::global().run(units.len(), &|ui| {
        let u = &units[ui];
        let sq = &seqs[u.s];
        // SAFETY: this unit's range of `parts` belongs to it alone.
        let res = unsafe { std::slice::from_raw_parts_mut(parts.at(u.at), u.rows * part_len) };
        SCORES.with(|s| {
            let mut scores = s.borrow_mut();
            scores.resize(rep * (u.k1 - u.k0), 0.0);
            for a in 0..u.rows {
                let i = u.i0 + a;
                let limit = (sq.pos + i + 1).min(u.k1);
                let res = &mut res[a * part_len..(a + 1) * part_len];
                if limit <= u.k0 {
                    // No visible keys in this block.
                    for r in 0..rep {
                        res[r * (head_dim + 2)] = f32::NEG_INFINITY;
                    }
                    continue;
                }
                let row = sq.row0 + i;
                let qrow = &q[row * q_stride + u.g * rep * head_dim..row * q_stride + (u.g + 1) * rep * head_dim];
                attend(
                    isa,
                    &sq.kv,
                    u.g,
                    qrow,
                    scale,
                    rep,
                    head_dim,
                    u.k0,
                    limit,
                    &mut scores,
                    res,
                );
            }
        });
    });
    // Merge the partials of each (row, head) with the online-softmax rule, in key-block order,
    // then normalise.
    let rows_total = seqs.iter().map(|s| s.row0 + s.t).max().unwrap_or(0);
    sc.best.clear();
    sc.best.resize(rows_total * heads, f32::NEG_INFINITY);
    sc.sums.clear();
    sc.sums.resize(rows_total * heads, 0.0);
    for sq in seqs {
        out[sq.row0 * row_out..(sq.row0 + sq.t) * row_out].fill(0.0);
    }
    let part = |u: &Unit, a: usize, r: usize| u.at + a * part_len + r * (head_dim + 2);
    for u in &sc.units {
        let row0 = seqs[u.s].row0;
        for a in 0..u.rows {
            for r in 0..rep {
                let h = (row0 + u.i0 + a) * heads + u.g * rep + r;
                sc.best[h] = sc.best[h].max(sc.parts[part(u, a, r)]);
            }
        }
    }
    for u in &sc.units {
        let row0 = seqs[u.s].row0;
        for a in 0..u.rows {
            let i = row0 + u.i0 + a;
            for r in 0..rep {
                let h = u.g * rep + r;
                let p = part(u, a, r);
                let m = sc.parts[p];
                if m == f32::NEG_INFINITY {
                    continue;
                }
                let w = (m - sc.best[i * heads + h]).exp();
                sc.sums[i * heads + h] += sc.parts[p + 1] * w;
                let o = &mut out[i * row_out + h * head_dim..i * row_out + (h + 1) * head_dim];
                for (od, ad) in o.iter_mut().zip(&sc.parts[p + 2..p + 2 + head_dim]) {
                    *od += ad * w;
                }
            }
        }
    }
    for sq in seqs {
        for i in sq.row0..sq.row0 + sq.t {
            for h in 0..heads {
                let inv = 1.0 / sc.sums[i * heads + h];
                for v in &mut out[i * row_out + h * head_dim..i * row_out + (h + 1) * head_dim] {
                    *v *= inv;
                }
            }
        }
    }
}

/// Scores, softmax numerator and weighted values of `rep` query heads over keys `k0..k1` of
/// group `g`. Writes `[max, sum, acc(head_dim)]` per head into `res`.
#[allow(clippy::too_many_arguments)]
fn attend<E: KvElem>(
    isa: Isa,
    kv: &LayerKv<E>,
    g: usize,
    q: &[f32],
    scale: f32,
    rep: usize,
    head_dim: usize,
    k0: usize,
    k1: usize,
    scores: &mut [f32],
    res: &mut [f32],
) {
    let n = k1 - k0;
    let glen = key_group_len(head_dim, kv.cap);
    let kt = &kv.kt[g * glen..(g + 1) * glen];
    let v = &kv.v[g * kv.cap * head_dim..(g + 1) * kv.cap * head_dim];
    let scores = &mut scores[..rep * n];
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && head_dim == 64 && rep <= 4 {
        // SAFETY: AVX-512 is available (Isa), and all slices cover the ranges used (checked in
        // `attention`).
        unsafe {
            x86::scores_hd64(kt, q, scale, rep, k0, n, scores);
            x86::softmax_rows(scores, rep, n, head_dim, res);
            x86::values_hd64(v, scores, rep, k0, n, res);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 && head_dim == 64 && rep <= 4 {
        // SAFETY: AVX2 and FMA are available (Isa), and the slices are as above.
        unsafe {
            x86_avx2::scores_hd64(kt, q, scale, rep, k0, n, scores);
            x86_avx2::softmax_rows(scores, rep, n, head_dim, res);
            x86_avx2::values_hd64(v, scores, rep, k0, n, res);
        }
        return;
    }
    raw_scores(isa, kt, q, scale, rep, head_dim, k0, n, scores);
    softmax_rows(isa, scores, rep, n, head_dim, res);
    weighted_values(isa, v, scores, rep, head_dim, k0, n, res);
}

super::ops::multiversion! {
    /// `scores[r][j] = scale · q_r · k_{k0+j}`, a tile of 16 keys at a time in a register-sized
    /// block (`k0` a multiple of `KEY_TILE`).
    #[allow(clippy::too_many_arguments)]
    pub fn raw_scores<E: KvElem>(kt: &[E], q: &[f32], scale: f32, rep: usize, head_dim: usize, k0: usize, n: usize, scores: &mut [f32]) {
        for r in 0..rep {
            let qr = &q[r * head_dim..(r + 1) * head_dim];
            let s = &mut scores[r * n..(r + 1) * n];
            for j0 in (0..n).step_by(16) {
                let w = 16.min(n - j0);
                let mut acc = [0f32; 16];
                for (d, qd) in qr.iter().enumerate() {
                    let at = key_at(head_dim, d, k0 + j0);
                    let krow = &kt[at..at + w];
                    for (a, kj) in acc.iter_mut().zip(krow) {
                        *a += qd * kj.to_f32();
                    }
                }
                for (sj, a) in s[j0..j0 + w].iter_mut().zip(acc) {
                    *sj = a * scale;
                }
            }
        }
    }
}

super::ops::multiversion! {
    /// Each row of scores becomes `exp(s − max)`; max and sum go into `res` (`[max, sum, ..]`
    /// per head, stride `head_dim + 2`).
    pub fn softmax_rows(scores: &mut [f32], rep: usize, n: usize, head_dim: usize, res: &mut [f32]) {
        for r in 0..rep {
            let s = &mut scores[r * n..(r + 1) * n];
            let m = s.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
            let mut sum = 0f32;
            for sj in s.iter_mut() {
                *sj = exp_approx(*sj - m);
                sum += *sj;
            }
            res[r * (head_dim + 2)] = m;
            res[r * (head_dim + 2) + 1] = sum;
        }
    }
}

super::ops::multiversion! {
    /// `acc_r = Σ_j scores[r][j] · v_{k0+j}` into `res`.
    #[allow(clippy::too_many_arguments)]
    pub fn weighted_values<E: KvElem>(v: &[E], scores: &[f32], rep: usize, head_dim: usize, k0: usize, n: usize, res: &mut [f32]) {
        for r in 0..rep {
            let acc = &mut res[r * (head_dim + 2) + 2..(r + 1) * (head_dim + 2)];
            acc.fill(0.0);
            let s = &scores[r * n..(r + 1) * n];
            for (j, p) in s.iter().enumerate() {
                let vrow = &v[(k0 + j) * head_dim..(k0 + j + 1) * head_dim];
                for (a, vd) in acc.iter_mut().zip(vrow) {
                    *a += p * vd.to_f32();
                }
            }
        }
    }
}

/// Register-blocked AVX-512 kernels for the common head size 64 (4 vectors) and up to 4 query
/// heads per KV head: keys are loaded once for all heads of the group.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{KvElem, KEY_TILE};

    /// # Safety
    /// AVX-512F; `kt` one group's tiled keys covering positions `k0..k0 + n` (`k0` a multiple of
    /// `KEY_TILE`), `q` `rep * 64`, `scores` `rep * n`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn scores_hd64<E: KvElem>(
        kt: &[E],
        q: &[f32],
        scale: f32,
        rep: usize,
        k0: usize,
        n: usize,
        scores: &mut [f32],
    ) {
        match rep {
            1 => scores_r::<1, E>(kt, q, scale, k0, n, scores),
            2 => scores_r::<2, E>(kt, q, scale, k0, n, scores),
            3 => scores_r::<3, E>(kt, q, scale, k0, n, scores),
            _ => scores_r::<4, E>(kt, q, scale, k0, n, scores),
        }
    }

    #[inline(always)]
    unsafe fn scores_r<const R: usize, E: KvElem>(
        kt: &[E],
        q: &[f32],
        scale: f32,
        k0: usize,
        n: usize,
        scores: &mut [f32],
    ) {
        const HD: usize = 64;
        const TILE: usize = HD * KEY_TILE;
        let (kp, qp, sp) = (kt.as_ptr(), q.as_ptr(), scores.as_mut_ptr());
        let sv = _mm512_set1_ps(scale);
        let mut j = 0;
        // 48 keys per block (three tiles): 3 vectors x R heads accumulators.
        while j + 48 <= n {
            let mut acc = [[_mm512_setzero_ps(); 3]; R];
            let tile = kp.add((k0 + j) / KEY_TILE * TILE);
            for d in 0..HD {
                let row = tile.add(d * KEY_TILE);
                let k = [E::load16(row), E::load16(row.add(TILE)), E::load16(row.add(2 * TILE))];
                for r in 0..R {
                    let qd = _mm512_set1_ps(*qp.add(r * HD + d));
                    for b in 0..3 {
                        acc[r][b] = _mm512_fmadd_ps(qd, k[b], acc[r][b]);
                    }
                }
            }
            for r in 0..R {
                for b in 0..3 {
                    _mm512_storeu_ps(sp.add(r * n + j + 16 * b), _mm512_mul_ps(acc[r][b], sv));
                }
            }
            j += 48;
        }
        while j < n {
            let w = 16.min(n - j);
            let m = ((1u32 << w) - 1) as u16;
            let mut acc = [_mm512_setzero_ps(); R];
            let tile = kp.add((k0 + j) / KEY_TILE * TILE);
            for d in 0..HD {
                let k = E::maskz_load16(m, tile.add(d * KEY_TILE));
                for r in 0..R {
                    acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(*qp.add(r * HD + d)), k, acc[r]);
                }
            }
            for r in 0..R {
                _mm512_mask_storeu_ps(sp.add(r * n + j), m, _mm512_mul_ps(acc[r], sv));
            }
            j += w;
        }
    }

    /// `exp` of 16 lanes: range reduction to `2^n · e^r` and a degree-6 polynomial, as
    /// `ops::exp_approx` (relative error below 2e-7).
    #[inline(always)]
    unsafe fn exp16(x: __m512) -> __m512 {
        let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0)), _mm512_set1_ps(88.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(
            n,
            _mm512_set1_ps(1.428_606_8e-6),
            _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x),
        );
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// Each row becomes `exp(s − max)`; max and sum go into `res` (stride `head_dim + 2`).
    ///
    /// # Safety
    /// AVX-512F; `scores` covers `rep * n`, `res` `rep * (head_dim + 2)`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax_rows(scores: &mut [f32], rep: usize, n: usize, head_dim: usize, res: &mut [f32]) {
        for r in 0..rep {
            let s = scores.as_mut_ptr().add(r * n);
            let mut mv = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut j = 0;
            while j < n {
                let m = ((1u32 << 16.min(n - j)) - 1) as u16;
                mv = _mm512_mask_max_ps(mv, m, mv, _mm512_maskz_loadu_ps(m, s.add(j)));
                j += 16;
            }
            let max = _mm512_reduce_max_ps(mv);
            let (mb, mut sum) = (_mm512_set1_ps(max), _mm512_setzero_ps());
            j = 0;
            while j < n {
                let m = ((1u32 << 16.min(n - j)) - 1) as u16;
                let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s.add(j)), mb));
                _mm512_mask_storeu_ps(s.add(j), m, e);
                sum = _mm512_mask_add_ps(sum, m, sum, e);
                j += 16;
            }
            res[r * (head_dim + 2)] = max;
            res[r * (head_dim + 2) + 1] = _mm512_reduce_add_ps(sum);
        }
    }

    /// # Safety
    /// AVX-512F; `v` covers rows `k0..k0 + n` of 64, `scores` `rep * n`, `res` `rep * 66`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn values_hd64<E: KvElem>(v: &[E], scores: &[f32], rep: usize, k0: usize, n: usize, res: &mut [f32]) {
        match rep {
            1 => values_r::<1, E>(v, scores, k0, n, res),
            2 => values_r::<2, E>(v, scores, k0, n, res),
            3 => values_r::<3, E>(v, scores, k0, n, res),
            _ => values_r::<4, E>(v, scores, k0, n, res),
        }
    }

    #[inline(always)]
    unsafe fn values_r<const R: usize, E: KvElem>(v: &[E], scores: &[f32], k0: usize, n: usize, res: &mut [f32]) {
        const HD: usize = 64;
        let (vp, sp) = (v.as_ptr(), scores.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for j in 0..n {
            let row = vp.add((k0 + j) * HD);
            let vv = [
                E::load16(row),
                E::load16(row.add(16)),
                E::load16(row.add(32)),
                E::load16(row.add(48)),
            ];
            for r in 0..R {
                let p = _mm512_set1_ps(*sp.add(r * n + j));
                for b in 0..4 {
                    acc[r][b] = _mm512_fmadd_ps(p, vv[b], acc[r][b]);
                }
            }
        }
        for r in 0..R {
            for b in 0..4 {
                _mm512_storeu_ps(res.as_mut_ptr().add(r * (HD + 2) + 2 + 16 * b), acc[r][b]);
            }
        }
    }
}

/// The same kernels for AVX2 (16 registers of 8 floats): 24 keys per block for up to 3 heads,
/// 16 for 4; values half a head (32 dimensions) at a time.
#[cfg(target_arch = "x86_64")]
mod x86_avx2 {
    use std::arch::x86_64::*;

    use super::{key_at, KvElem};

    const HD: usize = 64;

    /// # Safety
    /// AVX2 and FMA; `kt` one group's tiled keys covering positions `k0..k0 + n` (`k0` a multiple
    /// of `KEY_TILE`), `q` `rep * 64`, `scores` `rep * n`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores_hd64<E: KvElem>(
        kt: &[E],
        q: &[f32],
        scale: f32,
        rep: usize,
        k0: usize,
        n: usize,
        scores: &mut [f32],
    ) {
        match rep {
            1 => scores_r::<1, 3, E>(kt, q, scale, k0, n, scores),
            2 => scores_r::<2, 3, E>(kt, q, scale, k0, n, scores),
            3 => scores_r::<3, 3, E>(kt, q, scale, k0, n, scores),
            _ => scores_r::<4, 2, E>(kt, q, scale, k0, n, scores),
        }
    }

    /// R heads by B vectors of 8 keys.
    #[inline(always)]
    unsafe fn scores_r<const R: usize, const B: usize, E: KvElem>(
        kt: &[E],
        q: &[f32],
        scale: f32,
        k0: usize,
        n: usize,
        scores: &mut [f32],
    ) {
        let (kp, qp, sp) = (kt.as_ptr(), q.as_ptr(), scores.as_mut_ptr());
        let sv = _mm256_set1_ps(scale);
        let mut j = 0;
        while j + 8 * B <= n {
            let mut acc = [[_mm256_setzero_ps(); B]; R];
            for d in 0..HD {
                // Vectors of 8 keys at multiples of 8 lie within one tile. A plain loop: a
                // closure (`array::from_fn`) would not inherit the target features.
                let mut k = [_mm256_setzero_ps(); B];
                for b in 0..B {
                    k[b] = E::load8(kp.add(key_at(HD, d, k0 + j + 8 * b)));
                }
                for r in 0..R {
                    let qd = _mm256_broadcast_ss(&*qp.add(r * HD + d));
                    for b in 0..B {
                        acc[r][b] = _mm256_fmadd_ps(qd, k[b], acc[r][b]);
                    }
                }
            }
            for r in 0..R {
                for b in 0..B {
                    _mm256_storeu_ps(sp.add(r * n + j + 8 * b), _mm256_mul_ps(acc[r][b], sv));
                }
            }
            j += 8 * B;
        }
        // The last keys, fewer than a block, one at a time.
        for jj in j..n {
            for r in 0..R {
                let mut a = 0f32;
                for d in 0..HD {
                    a += *qp.add(r * HD + d) * (*kp.add(key_at(HD, d, k0 + jj))).to_f32();
                }
                *sp.add(r * n + jj) = a * scale;
            }
        }
    }

    /// `exp` of 8 lanes as `ops::exp_approx`: range reduction to `2^n · e^r`, a degree-6
    /// polynomial, and `2^n` built in the exponent bits.
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(
            n,
            _mm256_set1_ps(1.428_606_8e-6),
            _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x),
        );
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        _mm256_mul_ps(p, _mm256_castsi256_ps(pow2))
    }

    /// Each row becomes `exp(s − max)`; max and sum go into `res` (stride `head_dim + 2`).
    ///
    /// # Safety
    /// AVX2 and FMA; `scores` covers `rep * n`, `res` `rep * (head_dim + 2)`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax_rows(scores: &mut [f32], rep: usize, n: usize, head_dim: usize, res: &mut [f32]) {
        for r in 0..rep {
            let s = &mut scores[r * n..(r + 1) * n];
            let full = n / 8 * 8;
            let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
            for j in (0..full).step_by(8) {
                mv = _mm256_max_ps(mv, _mm256_loadu_ps(s.as_ptr().add(j)));
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), mv);
            let max = lanes.iter().chain(&s[full..]).fold(f32::NEG_INFINITY, |a, b| a.max(*b));
            let (mb, mut sum) = (_mm256_set1_ps(max), _mm256_setzero_ps());
            for j in (0..full).step_by(8) {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s.as_ptr().add(j)), mb));
                _mm256_storeu_ps(s.as_mut_ptr().add(j), e);
                sum = _mm256_add_ps(sum, e);
            }
            _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
            let mut total: f32 = lanes.iter().sum();
            for v in &mut s[full..] {
                *v = super::exp_approx(*v - max);
                total += *v;
            }
            res[r * (head_dim + 2)] = max;
            res[r * (head_dim + 2) + 1] = total;
        }
    }

    /// # Safety
    /// AVX2 and FMA; `v` covers rows `k0..k0 + n` of 64, `scores` `rep * n`, `res` `rep * 66`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn values_hd64<E: KvElem>(v: &[E], scores: &[f32], rep: usize, k0: usize, n: usize, res: &mut [f32]) {
        for half in 0..2 {
            match rep {
                1 => values_r::<1, E>(v, scores, k0, n, res, half),
                2 => values_r::<2, E>(v, scores, k0, n, res, half),
                3 => values_r::<3, E>(v, scores, k0, n, res, half),
                _ => values_r::<4, E>(v, scores, k0, n, res, half),
            }
        }
    }

    /// Dimensions `32 · half ..` of the weighted values: 4 vectors per head.
    #[inline(always)]
    unsafe fn values_r<const R: usize, E: KvElem>(
        v: &[E],
        scores: &[f32],
        k0: usize,
        n: usize,
        res: &mut [f32],
        half: usize,
    ) {
        let (vp, sp) = (v.as_ptr().add(32 * half), scores.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        for j in 0..n {
            let row = vp.add((k0 + j) * HD);
            // A plain array, not `array::from_fn` (its closure would not inherit the features).
            let vv = [
                E::load8(row),
                E::load8(row.add(8)),
                E::load8(row.add(16)),
                E::load8(row.add(24)),
            ];
            for r in 0..R {
                let p = _mm256_broadcast_ss(&*sp.add(r * n + j));
                for b in 0..4 {
                    acc[r][b] = _mm256_fmadd_ps(p, vv[b], acc[r][b]);
                }
            }
        }
        for r in 0..R {
            for b in 0..4 {
                _mm256_storeu_ps(res.as_mut_ptr().add(r * (HD + 2) + 2 + 32 * half + 8 * b), acc[r][b]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu::test_data::rand_vec;

    /// Plain causal GQA attention over K/V in [pos][kv][hd] order.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
        pos: usize,
        heads: usize,
        kvh: usize,
        hd: usize,
    ) -> Vec<f32> {
        let rep = heads / kvh;
        let mut out = vec![0f32; t * heads * hd];
        for i in 0..t {
            for h in 0..heads {
                let g = h / rep;
                let qv = &q[i * heads * hd + h * hd..i * heads * hd + (h + 1) * hd];
                let len = pos + i + 1;
                let s: Vec<f64> = (0..len)
                    .map(|j| {
                        (0..hd)
                            .map(|d| qv[d] as f64 * k[(j * kvh + g) * hd + d] as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    out[i * heads * hd + h * hd + d] =
                        ((0..len).map(|j| e[j] * v[(j * kvh + g) * hd + d] as f64).sum::<f64>() / z) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_reference_for_decode_prefill_and_long_contexts() {
        matches_reference::<f32>();
    }

    #[test]
    fn bf16_caches_match_the_reference_on_their_rounded_keys_and_values() {
        matches_reference::<half::bf16>();
    }

    #[test]
    fn a_rows_result_is_the_same_in_a_prompt_chunk_alone_or_batched() {
        same_alone_or_batched::<f32>();
        same_alone_or_batched::<half::bf16>();
    }

    /// Every level's kernels against the plain reference, computed on the keys and values as the
    /// cache holds them (rounded to `E`).
    fn matches_reference<E: KvElem>() {
        for &(t, pos, heads, kvh, hd) in &[
            (1, 0, 6, 2, 16),
            (1, 700, 6, 2, 16),
            (5, 0, 3, 3, 8),
            (13, 4, 6, 2, 16),
            (1, 1100, 15, 5, 64),
            (20, 30, 4, 1, 10),
            (9, 70, 8, 2, 64),
            (3, 5, 2, 2, 64),
            (50, 0, 6, 3, 64),
        ] {
            let len = pos + t;
            let cap = len + 3;
            let held = |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(|x| E::from_f32(x).to_f32()).collect() };
            let k = held(rand_vec(len * kvh * hd, 1));
            let v = held(rand_vec(len * kvh * hd, 2));
            let q = rand_vec(t * heads * hd, 3);
            let glen = key_group_len(hd, cap);
            let mut kt = vec![E::default(); kvh * glen];
            let mut vv = vec![E::default(); kvh * cap * hd];
            for j in 0..len {
                for g in 0..kvh {
                    for d in 0..hd {
                        kt[g * glen + key_at(hd, d, j)] = E::from_f32(k[(j * kvh + g) * hd + d]);
                        vv[(g * cap + j) * hd + d] = E::from_f32(v[(j * kvh + g) * hd + d]);
                    }
                }
            }
            let want = reference(&q, &k, &v, t, pos, heads, kvh, hd);
            for isa in Isa::supported() {
                let mut out = vec![0f32; t * heads * hd];
                let seq = AttnSeq {
                    kv: LayerKv { kt: &kt, v: &vv, cap },
                    row0: 0,
                    t,
                    pos,
                };
                attention(
                    isa,
                    &[seq],
                    &q,
                    heads * hd,
                    heads,
                    kvh,
                    hd,
                    &mut out,
                    &mut AttnScratch::default(),
                );
                for (a, b) in out.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "{isa:?} t={t} pos={pos}: {a} vs {b}");
                }
            }
        }
    }

    fn same_alone_or_batched<E: KvElem>() {
        // Rows past one key block (512) too: the blocks are fixed by position.
        let (heads, kvh, hd) = (15, 5, 64);
        let len = 1100;
        let cap = len;
        let held = |x: Vec<f32>| -> Vec<E> { x.into_iter().map(E::from_f32).collect() };
        let kt = held(rand_vec(kvh * key_group_len(hd, cap), 4));
        let vv = held(rand_vec(kvh * cap * hd, 5));
        let q = rand_vec(len * heads * hd, 6);
        let row = heads * hd;
        for isa in Isa::supported() {
            let kv = || LayerKv { kt: &kt, v: &vv, cap };
            // Rows 1000..1100 as one prompt chunk.
            let mut chunk = vec![0f32; 100 * row];
            let seq = AttnSeq {
                kv: kv(),
                row0: 0,
                t: 100,
                pos: 1000,
            };
            attention(
                isa,
                &[seq],
                &q[1000 * row..],
                row,
                heads,
                kvh,
                hd,
                &mut chunk,
                &mut AttnScratch::default(),
            );
            for i in [1000usize, 1011, 1099] {
                // The same row decoded alone, and beside another sequence's rows.
                let mut one = vec![0f32; row];
                let seq = AttnSeq {
                    kv: kv(),
                    row0: 0,
                    t: 1,
                    pos: i,
                };
                attention(
                    isa,
                    &[seq],
                    &q[i * row..],
                    row,
                    heads,
                    kvh,
                    hd,
                    &mut one,
                    &mut AttnScratch::default(),
                );
                assert!(
                    one[..] == chunk[(i - 1000) * row..(i - 999) * row],
                    "{isa:?} row {i} alone"
                );
                let mut two = vec![0f32; 4 * row];
                let mut qq = q[..3 * row].to_vec();
                qq.extend_from_slice(&q[i * row..(i + 1) * row]);
                let seqs = [
                    AttnSeq {
                        kv: kv(),
                        row0: 0,
                        t: 3,
                        pos: 0,
                    },
                    AttnSeq {
                        kv: kv(),
                        row0: 3,
                        t: 1,
                        pos: i,
                    },
                ];
                attention(
                    isa,
                    &seqs,
                    &qq,
                    row,
                    heads,
                    kvh,
                    hd,
                    &mut two,
                    &mut AttnScratch::default(),
                );
                assert!(
                    two[3 * row..] == chunk[(i - 1000) * row..(i - 999) * row],
                    "{isa:?} row {i} batched"
                );
            }
        }
    }
}
