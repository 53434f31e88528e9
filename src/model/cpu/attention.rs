//! Attention against the KV cache, without materialising repeated K/V: the query heads of one
//! KV group are processed together against that group's keys and values. Keys are stored
//! transposed (`[head_dim][capacity]`) so that scores for 16 keys at a time are one vector FMA
//! chain; values are stored by position (`[capacity][head_dim]`). Work is split over KV groups,
//! query blocks and, for long contexts, key blocks merged with the online-softmax rule, so two
//! cores stay busy in decoding as well as in prefill.

// Register-blocked kernels index several arrays with the same counters; explicit loops read
// closer to the math than iterator chains.
#![allow(clippy::needless_range_loop)]

use std::cell::RefCell;

use rayon::prelude::*;

use super::kernels::Isa;
use super::ops::exp_approx;

/// Keys per work unit when one query row is split over several units (decoding long contexts).
const KEY_BLOCK: usize = 512;
/// Query rows per work unit in prefill.
const QUERY_BLOCK: usize = 8;

/// One layer's cache for all KV groups.
pub struct LayerKv<'a> {
    /// `[kv_heads][head_dim][cap]`
    pub kt: &'a [f32],
    /// `[kv_heads][cap][head_dim]`
    pub v: &'a [f32],
    pub cap: usize,
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A piece of work: query rows `i0..i0 + rows` of KV group `g` against keys `k0..k1`.
#[derive(Clone, Copy)]
struct Unit {
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

/// Attention output for `t` query rows at positions `pos..pos + t`. `q` holds each row's query
/// heads (`heads * head_dim`, row stride `q_stride`); `out` gets `heads * head_dim` per row.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    isa: Isa,
    kv: &LayerKv,
    q: &[f32],
    q_stride: usize,
    t: usize,
    pos: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    out: &mut [f32],
    sc: &mut AttnScratch,
) {
    let rep = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let row_out = heads * head_dim;
    let part_len = rep * (head_dim + 2);
    sc.units.clear();
    let mut at = 0;
    for g in 0..kv_heads {
        if t == 1 {
            // Decoding: split long contexts over key blocks so both cores work on every group.
            let len = pos + 1;
            for p in 0..len.div_ceil(KEY_BLOCK) {
                sc.units.push(Unit { g, i0: 0, rows: 1, k0: p * KEY_BLOCK, k1: ((p + 1) * KEY_BLOCK).min(len), at });
                at += part_len;
            }
        } else {
            for i0 in (0..t).step_by(QUERY_BLOCK) {
                let rows = QUERY_BLOCK.min(t - i0);
                sc.units.push(Unit { g, i0, rows, k0: 0, k1: pos + i0 + rows, at });
                at += rows * part_len;
            }
        }
    }
    sc.parts.resize(at, 0.0);
    let parts = Parts(sc.parts.as_mut_ptr());
    sc.units.par_iter().for_each(|u| {
        // SAFETY: this unit's range of `parts` belongs to it alone.
        let res = unsafe { std::slice::from_raw_parts_mut(parts.at(u.at), u.rows * part_len) };
        SCORES.with(|s| {
            let mut scores = s.borrow_mut();
            scores.resize(rep * (u.k1 - u.k0), 0.0);
            for a in 0..u.rows {
                let i = u.i0 + a;
                let limit = (pos + i + 1).min(u.k1);
                let res = &mut res[a * part_len..(a + 1) * part_len];
                if limit <= u.k0 {
                    // No visible keys in this block.
                    for r in 0..rep {
                        res[r * (head_dim + 2)] = f32::NEG_INFINITY;
                    }
                    continue;
                }
                let qrow = &q[i * q_stride + u.g * rep * head_dim..i * q_stride + (u.g + 1) * rep * head_dim];
                attend(isa, kv, u.g, qrow, scale, rep, head_dim, u.k0, limit, &mut scores, res);
            }
        });
    });
    // Merge the partials of each (row, head) with the online-softmax rule, then normalise.
    out[..t * row_out].fill(0.0);
    sc.best.clear();
    sc.best.resize(t * heads, f32::NEG_INFINITY);
    sc.sums.clear();
    sc.sums.resize(t * heads, 0.0);
    let part = |u: &Unit, a: usize, r: usize| u.at + a * part_len + r * (head_dim + 2);
    for u in &sc.units {
        for a in 0..u.rows {
            for r in 0..rep {
                let h = (u.i0 + a) * heads + u.g * rep + r;
                sc.best[h] = sc.best[h].max(sc.parts[part(u, a, r)]);
            }
        }
    }
    for u in &sc.units {
        for a in 0..u.rows {
            let i = u.i0 + a;
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
    for i in 0..t {
        for h in 0..heads {
            let inv = 1.0 / sc.sums[i * heads + h];
            for v in &mut out[i * row_out + h * head_dim..i * row_out + (h + 1) * head_dim] {
                *v *= inv;
            }
        }
    }
}

/// Scores, softmax numerator and weighted values of `rep` query heads over keys `k0..k1` of
/// group `g`. Writes `[max, sum, acc(head_dim)]` per head into `res`.
#[allow(clippy::too_many_arguments)]
fn attend(
    isa: Isa,
    kv: &LayerKv,
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
    let kt = &kv.kt[g * head_dim * kv.cap..(g + 1) * head_dim * kv.cap];
    let v = &kv.v[g * kv.cap * head_dim..(g + 1) * kv.cap * head_dim];
    scores_and_softmax(
        isa,
        kt,
        kv.cap,
        q,
        scale,
        rep,
        head_dim,
        k0,
        n,
        &mut scores[..rep * n],
        res,
    );
    weighted_values(isa, v, &scores[..rep * n], rep, head_dim, k0, n, res);
}

super::ops::multiversion! {
    /// `scores[r][j] = exp(scale · q_r · k_{k0+j} − max_r)`; writes max and sum into `res`.
    #[allow(clippy::too_many_arguments)]
    pub fn scores_and_softmax(kt: &[f32], cap: usize, q: &[f32], scale: f32, rep: usize, head_dim: usize, k0: usize, n: usize, scores: &mut [f32], res: &mut [f32]) {
        for r in 0..rep {
            let s = &mut scores[r * n..(r + 1) * n];
            s.fill(0.0);
            let qr = &q[r * head_dim..(r + 1) * head_dim];
            for (d, qd) in qr.iter().enumerate() {
                let qd = qd * scale;
                let krow = &kt[d * cap + k0..d * cap + k0 + n];
                for (sj, kj) in s.iter_mut().zip(krow) {
                    *sj += qd * kj;
                }
            }
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
    pub fn weighted_values(v: &[f32], scores: &[f32], rep: usize, head_dim: usize, k0: usize, n: usize, res: &mut [f32]) {
        for r in 0..rep {
            let acc = &mut res[r * (head_dim + 2) + 2..(r + 1) * (head_dim + 2)];
            acc.fill(0.0);
            let s = &scores[r * n..(r + 1) * n];
            for (j, p) in s.iter().enumerate() {
                let vrow = &v[(k0 + j) * head_dim..(k0 + j + 1) * head_dim];
                for (a, vd) in acc.iter_mut().zip(vrow) {
                    *a += p * vd;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

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
                    out[i * heads * hd + h * hd + d] = ((0..len)
                        .map(|j| e[j] * v[(j * kvh + g) * hd + d] as f64)
                        .sum::<f64>()
                        / z) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_reference_for_decode_prefill_and_long_contexts() {
        for &(t, pos, heads, kvh, hd) in &[
            (1, 0, 6, 2, 16),
            (1, 700, 6, 2, 16),
            (5, 0, 3, 3, 8),
            (13, 4, 6, 2, 16),
            (1, 1100, 15, 5, 64),
            (20, 30, 4, 1, 10),
        ] {
            let len = pos + t;
            let cap = len + 3;
            let k = rand_vec(len * kvh * hd, 1);
            let v = rand_vec(len * kvh * hd, 2);
            let q = rand_vec(t * heads * hd, 3);
            let mut kt = vec![0f32; kvh * hd * cap];
            let mut vv = vec![0f32; kvh * cap * hd];
            for j in 0..len {
                for g in 0..kvh {
                    for d in 0..hd {
                        kt[(g * hd + d) * cap + j] = k[(j * kvh + g) * hd + d];
                        vv[(g * cap + j) * hd + d] = v[(j * kvh + g) * hd + d];
                    }
                }
            }
            let want = reference(&q, &k, &v, t, pos, heads, kvh, hd);
            for isa in Isa::supported() {
                let mut out = vec![0f32; t * heads * hd];
                attention(
                    isa,
                    &LayerKv {
                        kt: &kt,
                        v: &vv,
                        cap,
                    },
                    &q,
                    heads * hd,
                    t,
                    pos,
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
}
