//! SIMD kernels over weight panels, chosen at run time.
//!
//! The binary is built for baseline x86-64 (or any other target), and the instruction set is picked
//! once per process from what the CPU reports: AVX-512 (F, BW, VL), AVX2 with FMA and F16C, or
//! portable Rust. Weights stay in their stored format and are widened to f32 in registers, so a
//! BF16 model is read at 2 bytes per weight and no f32 copy of it ever exists.
//!
//! A panel holds 32 output rows of a matrix transposed: `P[t][c]` is weight (row c, input t), so
//! one step over `t` reads 32 consecutive weights that feed 32 outputs at once. Products need no
//! horizontal sums, and each panel is one contiguous stream.

// Register-blocked kernels index several arrays with the same counters; explicit loops read
// closer to the math than iterator chains.
#![allow(clippy::needless_range_loop)]

use std::sync::OnceLock;

use half::{bf16, f16};

/// Output rows per panel.
pub const PANEL: usize = 32;
/// Q8_0 block length along the input dimension.
pub const QBLOCK: usize = 32;

/// The instruction set the kernels use on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// Detected once; `ZAGREUS_ISA=portable|avx2` forces a lower level (for tests and benchmarks
    /// of the fallbacks). A forced level the CPU lacks is ignored.
    pub fn get() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Self::best_supported();
            let wanted = match std::env::var("ZAGREUS_ISA").ok().as_deref() {
                Some("portable") => Isa::Portable,
                Some("avx2") => Isa::Avx2,
                _ => best,
            };
            best.min_with(wanted)
        })
    }

    /// Every level this CPU supports, best first (for tests of each code path).
    pub fn supported() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2, Isa::Portable]
            .into_iter()
            .filter(|&i| Self::best_supported().min_with(i) == i)
            .collect()
    }

    fn rank(self) -> u8 {
        match self {
            Isa::Avx512 => 2,
            Isa::Avx2 => 1,
            Isa::Portable => 0,
        }
    }

    fn min_with(self, other: Isa) -> Isa {
        if other.rank() < self.rank() {
            other
        } else {
            self
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn best_supported() -> Isa {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
        {
            Isa::Avx512
        } else if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            Isa::Avx2
        } else {
            Isa::Portable
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn best_supported() -> Isa {
        Isa::Portable
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }
}

/// One panel's weights in any supported format: `k` steps of 32 values (Q8_0: 32 signed bytes per
/// step and 32 scales per block of 32 steps).
#[derive(Clone, Copy)]
pub enum Panel<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
    Q8_0 {
        q: &'a [i8],
        d: &'a [f32],
    },
    /// 4-bit: per step 16 bytes, byte j holding column 2j (low nibble) and 2j + 1 (high
    /// nibble); per block of 32 steps, 32 scales `d` and 32 offsets `m` (value = q · d + m), each
    /// stored even columns first, then odd columns. Q4_0 is the case m = -8 d.
    Q4 {
        q: &'a [u8],
        d: &'a [half::f16],
        m: &'a [half::f16],
    },
}

/// Index of column `c`'s scale within a Q4 block's 32 (even columns first, then odd).
#[inline]
pub fn q4_scale_index(c: usize) -> usize {
    if c.is_multiple_of(2) {
        c / 2
    } else {
        16 + c / 2
    }
}

/// `out[r][c] = Σ_t x[r][t] · P[t][c]` for `rows ≤ 3` activation rows of length `k`.
pub fn panel_gemv(isa: Isa, p: Panel, x: &[f32], rows: usize, k: usize, out: &mut [[f32; PANEL]; 3]) {
    debug_assert!((1..=3).contains(&rows));
    if let Panel::Q4 { .. } = p {
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 {
            // SAFETY: as below.
            return unsafe { x86::q4_gemv_avx512(p, x, rows, k, out) };
        }
        return panel_gemv_portable(p, x, rows, k, out);
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa` levels are only produced for CPUs that report the features; slice
        // lengths are checked by the callers' panel construction (k steps of 32).
        Isa::Avx512 => unsafe { x86::panel_gemv_avx512(p, x, rows, k, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::panel_gemv_avx2(p, x, rows, k, out) },
        _ => panel_gemv_portable(p, x, rows, k, out),
    }
}

/// The panel as f32 in `dst` (`k * 32` values, same layout), for the prefill product.
pub fn widen_panel(isa: Isa, p: Panel, k: usize, dst: &mut [f32]) {
    match (isa, p) {
        (_, Panel::F32(w)) => dst.copy_from_slice(&w[..k * PANEL]),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `panel_gemv`.
        (Isa::Avx512, Panel::Q4 { .. }) => unsafe { x86::q4_widen_avx512(p, k, dst) },
        (_, Panel::Q4 { .. }) => widen_portable(p, k, dst),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `panel_gemv`.
        (Isa::Avx512, _) => unsafe { x86::widen_avx512(p, k, dst) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, _) => unsafe { x86::widen_avx2(p, k, dst) },
        _ => widen_portable(p, k, dst),
    }
}

#[inline]
pub fn bf16_to_f32(v: bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

/// One weight of a panel as f32.
#[inline]
pub fn panel_value(p: Panel, t: usize, c: usize) -> f32 {
    let i = t * PANEL + c;
    match p {
        Panel::F32(w) => w[i],
        Panel::Bf16(w) => bf16_to_f32(w[i]),
        Panel::F16(w) => w[i].to_f32(),
        Panel::Q8_0 { q, d } => q[i] as f32 * d[(t / QBLOCK) * PANEL + c],
        Panel::Q4 { q, d, m } => {
            let byte = q[t * (PANEL / 2) + c / 2];
            let nib = if c.is_multiple_of(2) { byte & 0xF } else { byte >> 4 };
            let s = (t / QBLOCK) * PANEL + q4_scale_index(c);
            nib as f32 * d[s].to_f32() + m[s].to_f32()
        }
    }
}

fn widen_portable(p: Panel, k: usize, dst: &mut [f32]) {
    for t in 0..k {
        for c in 0..PANEL {
            dst[t * PANEL + c] = panel_value(p, t, c);
        }
    }
}

fn panel_gemv_portable(p: Panel, x: &[f32], rows: usize, k: usize, out: &mut [[f32; PANEL]; 3]) {
    let mut w = [0f32; PANEL];
    let mut blk = [[0f32; PANEL]; 3];
    for o in out.iter_mut().take(rows) {
        *o = [0.0; PANEL];
    }
    for t in 0..k {
        for (c, wc) in w.iter_mut().enumerate() {
            // Q8_0 scales are applied per block below.
            *wc = match p {
                Panel::Q8_0 { q, .. } => q[t * PANEL + c] as f32,
                // Q4 values carry their scale and offset already.
                _ => panel_value(p, t, c),
            };
        }
        for r in 0..rows {
            let xv = x[r * k + t];
            for c in 0..PANEL {
                blk[r][c] += xv * w[c];
            }
        }
        let block_end = (t + 1) % QBLOCK == 0 || t + 1 == k;
        if block_end {
            for r in 0..rows {
                for c in 0..PANEL {
                    let s = match p {
                        Panel::Q8_0 { d, .. } => d[(t / QBLOCK) * PANEL + c],
                        _ => 1.0,
                    };
                    out[r][c] += blk[r][c] * s;
                    blk[r][c] = 0.0;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Panel, PANEL, QBLOCK};

    /// How far ahead of the loads a panel stream is prefetched. The hardware prefetchers stop at
    /// 4 KiB boundaries; measured on two cores, the BF16 LM head went from 20 to 30 GB/s with it.
    const PREFETCH_BYTES: usize = 8192;

    #[inline(always)]
    unsafe fn prefetch<T>(p: *const T) {
        _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(PREFETCH_BYTES));
    }

    /// Two vectors (columns 0..16, 16..32) of step t as f32; Q8_0 without its scale.
    #[inline(always)]
    unsafe fn load512(p: Panel, t: usize) -> (__m512, __m512) {
        let i = t * PANEL;
        match p {
            Panel::F32(w) => (
                _mm512_loadu_ps(w.as_ptr().add(i)),
                _mm512_loadu_ps(w.as_ptr().add(i + 16)),
            ),
            Panel::Bf16(w) => {
                let q = w.as_ptr().add(i) as *const __m256i;
                let lo = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(q)), 16);
                let hi = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(q.add(1))), 16);
                (_mm512_castsi512_ps(lo), _mm512_castsi512_ps(hi))
            }
            Panel::F16(w) => {
                let q = w.as_ptr().add(i) as *const __m256i;
                (
                    _mm512_cvtph_ps(_mm256_loadu_si256(q)),
                    _mm512_cvtph_ps(_mm256_loadu_si256(q.add(1))),
                )
            }
            Panel::Q8_0 { q, .. } => {
                let b = q.as_ptr().add(i) as *const __m128i;
                (
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b))),
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(1)))),
                )
            }
            Panel::Q4 { .. } => unreachable!("Q4 panels have their own kernels"),
        }
    }

    #[inline(always)]
    unsafe fn stream_ptr(p: Panel, t: usize) -> *const u8 {
        let i = t * PANEL;
        match p {
            Panel::F32(w) => w.as_ptr().add(i) as *const u8,
            Panel::Bf16(w) => w.as_ptr().add(i) as *const u8,
            Panel::F16(w) => w.as_ptr().add(i) as *const u8,
            Panel::Q8_0 { q, .. } => q.as_ptr().add(i) as *const u8,
            Panel::Q4 { q, .. } => q.as_ptr().add(i / 2),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub unsafe fn panel_gemv_avx512(p: Panel, x: &[f32], rows: usize, k: usize, out: &mut [[f32; PANEL]; 3]) {
        if let Panel::Bf16(w) = p {
            return match rows {
                1 => gemv_bf16_512::<1>(w, x, k, out),
                2 => gemv_bf16_512::<2>(w, x, k, out),
                _ => gemv_bf16_512::<3>(w, x, k, out),
            };
        }
        match rows {
            1 => gemv512::<1>(p, x, k, out),
            2 => gemv512::<2>(p, x, k, out),
            _ => gemv512::<3>(p, x, k, out),
        }
    }

    /// Per step: 32 weights widened once, FMA'd with the broadcast activation of each row. Two
    /// interleaved accumulator sets hide the FMA latency; Q8_0 scales apply once per block.
    #[inline(always)]
    unsafe fn gemv512<const R: usize>(p: Panel, x: &[f32], k: usize, out: &mut [[f32; PANEL]; 3]) {
        let scaled = matches!(p, Panel::Q8_0 { .. });
        let mut tot = [[_mm512_setzero_ps(); 2]; R];
        let mut t0 = 0;
        while t0 < k {
            let t1 = if scaled { (t0 + QBLOCK).min(k) } else { k };
            let mut a = [[_mm512_setzero_ps(); 2]; R];
            let mut b = [[_mm512_setzero_ps(); 2]; R];
            let mut t = t0;
            while t + 2 <= t1 {
                // One prefetch per 64-byte line of the two steps.
                let (s0, s1) = (stream_ptr(p, t), stream_ptr(p, t + 2));
                let mut line = s0;
                while line < s1 {
                    prefetch(line);
                    line = line.add(64);
                }
                let (w0, w1) = load512(p, t);
                let (v0, v1) = load512(p, t + 1);
                for r in 0..R {
                    let xa = _mm512_set1_ps(*x.get_unchecked(r * k + t));
                    let xb = _mm512_set1_ps(*x.get_unchecked(r * k + t + 1));
                    a[r][0] = _mm512_fmadd_ps(xa, w0, a[r][0]);
                    a[r][1] = _mm512_fmadd_ps(xa, w1, a[r][1]);
                    b[r][0] = _mm512_fmadd_ps(xb, v0, b[r][0]);
                    b[r][1] = _mm512_fmadd_ps(xb, v1, b[r][1]);
                }
                t += 2;
            }
            if t < t1 {
                let (w0, w1) = load512(p, t);
                for r in 0..R {
                    let xa = _mm512_set1_ps(*x.get_unchecked(r * k + t));
                    a[r][0] = _mm512_fmadd_ps(xa, w0, a[r][0]);
                    a[r][1] = _mm512_fmadd_ps(xa, w1, a[r][1]);
                }
            }
            match p {
                Panel::Q8_0 { d, .. } => {
                    let ds = d.as_ptr().add((t0 / QBLOCK) * PANEL);
                    let (d0, d1) = (_mm512_loadu_ps(ds), _mm512_loadu_ps(ds.add(16)));
                    for r in 0..R {
                        tot[r][0] = _mm512_fmadd_ps(_mm512_add_ps(a[r][0], b[r][0]), d0, tot[r][0]);
                        tot[r][1] = _mm512_fmadd_ps(_mm512_add_ps(a[r][1], b[r][1]), d1, tot[r][1]);
                    }
                }
                _ => {
                    for r in 0..R {
                        tot[r][0] = _mm512_add_ps(a[r][0], b[r][0]);
                        tot[r][1] = _mm512_add_ps(a[r][1], b[r][1]);
                    }
                }
            }
            t0 = t1;
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), tot[r][0]);
            _mm512_storeu_ps(out[r].as_mut_ptr().add(16), tot[r][1]);
        }
    }

    /// BF16: one 64-byte load per step gives the even columns (shift left) and the odd ones
    /// (mask the high halves) as f32 with two cheap integer ops and no shuffles; the columns are
    /// put back in order once at the end.
    #[inline(always)]
    unsafe fn gemv_bf16_512<const R: usize>(w: &[half::bf16], x: &[f32], k: usize, out: &mut [[f32; PANEL]; 3]) {
        let hi = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        let wp = w.as_ptr();
        let mut a = [[_mm512_setzero_ps(); 2]; R];
        let mut b = [[_mm512_setzero_ps(); 2]; R];
        let mut t = 0;
        while t + 2 <= k {
            prefetch(wp.add(t * PANEL));
            prefetch(wp.add((t + 1) * PANEL));
            let v = _mm512_loadu_si512(wp.add(t * PANEL) as *const __m512i);
            let u = _mm512_loadu_si512(wp.add((t + 1) * PANEL) as *const __m512i);
            let (ve, vo) = (
                _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
                _mm512_castsi512_ps(_mm512_and_si512(v, hi)),
            );
            let (ue, uo) = (
                _mm512_castsi512_ps(_mm512_slli_epi32(u, 16)),
                _mm512_castsi512_ps(_mm512_and_si512(u, hi)),
            );
            for r in 0..R {
                let xa = _mm512_set1_ps(*x.get_unchecked(r * k + t));
                let xb = _mm512_set1_ps(*x.get_unchecked(r * k + t + 1));
                a[r][0] = _mm512_fmadd_ps(xa, ve, a[r][0]);
                a[r][1] = _mm512_fmadd_ps(xa, vo, a[r][1]);
                b[r][0] = _mm512_fmadd_ps(xb, ue, b[r][0]);
                b[r][1] = _mm512_fmadd_ps(xb, uo, b[r][1]);
            }
            t += 2;
        }
        if t < k {
            let v = _mm512_loadu_si512(wp.add(t * PANEL) as *const __m512i);
            let (ve, vo) = (
                _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
                _mm512_castsi512_ps(_mm512_and_si512(v, hi)),
            );
            for r in 0..R {
                let xa = _mm512_set1_ps(*x.get_unchecked(r * k + t));
                a[r][0] = _mm512_fmadd_ps(xa, ve, a[r][0]);
                a[r][1] = _mm512_fmadd_ps(xa, vo, a[r][1]);
            }
        }
        // Even lanes hold columns 0, 2, .., 30 and odd lanes 1, 3, .., 31: interleave back.
        let lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        for r in 0..R {
            let e = _mm512_add_ps(a[r][0], b[r][0]);
            let o = _mm512_add_ps(a[r][1], b[r][1]);
            _mm512_storeu_ps(out[r].as_mut_ptr(), _mm512_permutex2var_ps(e, lo_idx, o));
            _mm512_storeu_ps(out[r].as_mut_ptr().add(16), _mm512_permutex2var_ps(e, hi_idx, o));
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub unsafe fn widen_avx512(p: Panel, k: usize, dst: &mut [f32]) {
        let o = dst.as_mut_ptr();
        for t in 0..k {
            let (mut w0, mut w1) = load512(p, t);
            if let Panel::Q8_0 { d, .. } = p {
                let ds = d.as_ptr().add((t / QBLOCK) * PANEL);
                w0 = _mm512_mul_ps(w0, _mm512_loadu_ps(ds));
                w1 = _mm512_mul_ps(w1, _mm512_loadu_ps(ds.add(16)));
            }
            _mm512_storeu_ps(o.add(t * PANEL), w0);
            _mm512_storeu_ps(o.add(t * PANEL + 16), w1);
        }
    }

    /// Q4 panel: per step, 16 bytes widen to 16 lanes whose low nibbles are the even columns and
    /// high nibbles the odd ones. Per block of 32 steps the integer sums are scaled by `d` and the
    /// block's activation sum is added times `m`; columns are interleaved back at the end.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub unsafe fn q4_gemv_avx512(p: Panel, x: &[f32], rows: usize, k: usize, out: &mut [[f32; PANEL]; 3]) {
        match rows {
            1 => q4_gemv::<1>(p, x, k, out),
            2 => q4_gemv::<2>(p, x, k, out),
            _ => q4_gemv::<3>(p, x, k, out),
        }
    }

    #[inline(always)]
    unsafe fn q4_gemv<const R: usize>(p: Panel, x: &[f32], k: usize, out: &mut [[f32; PANEL]; 3]) {
        let Panel::Q4 { q, d, m } = p else { return };
        let (qp, dp, mp) = (q.as_ptr(), d.as_ptr() as *const __m256i, m.as_ptr() as *const __m256i);
        let low = _mm512_set1_epi32(0xF);
        let mut tot = [[_mm512_setzero_ps(); 2]; R];
        let mut t0 = 0;
        while t0 < k {
            let t1 = (t0 + QBLOCK).min(k);
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            let mut xsum = [_mm512_setzero_ps(); R];
            for t in t0..t1 {
                if t % 4 == 0 {
                    prefetch(qp.add(t * 16));
                }
                let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(qp.add(t * 16) as *const __m128i));
                let e = _mm512_cvtepi32_ps(_mm512_and_si512(v, low));
                let o = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
                for r in 0..R {
                    let xv = _mm512_set1_ps(*x.get_unchecked(r * k + t));
                    acc[r][0] = _mm512_fmadd_ps(xv, e, acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(xv, o, acc[r][1]);
                    xsum[r] = _mm512_add_ps(xsum[r], xv);
                }
            }
            let b = (t0 / QBLOCK) * 2;
            let (de, dodd) = (
                _mm512_cvtph_ps(_mm256_loadu_si256(dp.add(b))),
                _mm512_cvtph_ps(_mm256_loadu_si256(dp.add(b + 1))),
            );
            let (me, modd) = (
                _mm512_cvtph_ps(_mm256_loadu_si256(mp.add(b))),
                _mm512_cvtph_ps(_mm256_loadu_si256(mp.add(b + 1))),
            );
            for r in 0..R {
                tot[r][0] = _mm512_fmadd_ps(acc[r][0], de, _mm512_fmadd_ps(xsum[r], me, tot[r][0]));
                tot[r][1] = _mm512_fmadd_ps(acc[r][1], dodd, _mm512_fmadd_ps(xsum[r], modd, tot[r][1]));
            }
            t0 = t1;
        }
        let lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        for r in 0..R {
            _mm512_storeu_ps(
                out[r].as_mut_ptr(),
                _mm512_permutex2var_ps(tot[r][0], lo_idx, tot[r][1]),
            );
            _mm512_storeu_ps(
                out[r].as_mut_ptr().add(16),
                _mm512_permutex2var_ps(tot[r][0], hi_idx, tot[r][1]),
            );
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub unsafe fn q4_widen_avx512(p: Panel, k: usize, dst: &mut [f32]) {
        let Panel::Q4 { q, d, m } = p else { return };
        let (qp, dp, mp) = (q.as_ptr(), d.as_ptr() as *const __m256i, m.as_ptr() as *const __m256i);
        let low = _mm512_set1_epi32(0xF);
        let o = dst.as_mut_ptr();
        for t in 0..k {
            let b = (t / QBLOCK) * 2;
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(qp.add(t * 16) as *const __m128i));
            let e = _mm512_cvtepi32_ps(_mm512_and_si512(v, low));
            let od = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
            let ve = _mm512_fmadd_ps(
                e,
                _mm512_cvtph_ps(_mm256_loadu_si256(dp.add(b))),
                _mm512_cvtph_ps(_mm256_loadu_si256(mp.add(b))),
            );
            let vo = _mm512_fmadd_ps(
                od,
                _mm512_cvtph_ps(_mm256_loadu_si256(dp.add(b + 1))),
                _mm512_cvtph_ps(_mm256_loadu_si256(mp.add(b + 1))),
            );
            let lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            let hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            _mm512_storeu_ps(o.add(t * PANEL), _mm512_permutex2var_ps(ve, lo_idx, vo));
            _mm512_storeu_ps(o.add(t * PANEL + 16), _mm512_permutex2var_ps(ve, hi_idx, vo));
        }
    }

    /// Four vectors (8 columns each) of step t as f32; Q8_0 without its scale.
    #[inline(always)]
    unsafe fn load256(p: Panel, t: usize) -> [__m256; 4] {
        let i = t * PANEL;
        match p {
            Panel::F32(w) => std::array::from_fn(|j| _mm256_loadu_ps(w.as_ptr().add(i + 8 * j))),
            Panel::Bf16(w) => std::array::from_fn(|j| {
                let v = _mm_loadu_si128(w.as_ptr().add(i + 8 * j) as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16))
            }),
            Panel::F16(w) => {
                std::array::from_fn(|j| _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i + 8 * j) as *const __m128i)))
            }
            Panel::Q8_0 { q, .. } => std::array::from_fn(|j| {
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                    q.as_ptr().add(i + 8 * j) as *const __m128i
                )))
            }),
            Panel::Q4 { .. } => unreachable!("Q4 panels have their own kernels"),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn panel_gemv_avx2(p: Panel, x: &[f32], rows: usize, k: usize, out: &mut [[f32; PANEL]; 3]) {
        // One activation row at a time: 4 accumulators + 4 weight vectors fit the 16 registers.
        for r in 0..rows {
            let mut tot = [_mm256_setzero_ps(); 4];
            let mut t0 = 0;
            while t0 < k {
                let t1 = if matches!(p, Panel::Q8_0 { .. }) {
                    (t0 + QBLOCK).min(k)
                } else {
                    k
                };
                let mut a = [_mm256_setzero_ps(); 4];
                for t in t0..t1 {
                    let (s0, s1) = (stream_ptr(p, t), stream_ptr(p, t + 1));
                    let mut line = s0;
                    while line < s1 {
                        prefetch(line);
                        line = line.add(64);
                    }
                    let w = load256(p, t);
                    let xv = _mm256_set1_ps(*x.get_unchecked(r * k + t));
                    for j in 0..4 {
                        a[j] = _mm256_fmadd_ps(xv, w[j], a[j]);
                    }
                }
                match p {
                    Panel::Q8_0 { d, .. } => {
                        let ds = d.as_ptr().add((t0 / QBLOCK) * PANEL);
                        for j in 0..4 {
                            tot[j] = _mm256_fmadd_ps(a[j], _mm256_loadu_ps(ds.add(8 * j)), tot[j]);
                        }
                    }
                    _ => tot = a,
                }
                t0 = t1;
            }
            for j in 0..4 {
                _mm256_storeu_ps(out[r].as_mut_ptr().add(8 * j), tot[j]);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn widen_avx2(p: Panel, k: usize, dst: &mut [f32]) {
        let o = dst.as_mut_ptr();
        for t in 0..k {
            let w = load256(p, t);
            for (j, mut v) in w.into_iter().enumerate() {
                if let Panel::Q8_0 { d, .. } = p {
                    v = _mm256_mul_ps(v, _mm256_loadu_ps(d.as_ptr().add((t / QBLOCK) * PANEL + 8 * j)));
                }
                _mm256_storeu_ps(o.add(t * PANEL + 8 * j), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu::test_data::rand_vec;

    #[test]
    fn panel_kernels_match_reference_for_every_format_isa_and_length() {
        for k in [1, 2, 3, 31, 32, 33, 64, 95, 960] {
            let wf = rand_vec(k * PANEL, 3);
            let bf: Vec<bf16> = wf.iter().map(|v| bf16::from_f32(*v)).collect();
            let hf: Vec<f16> = wf.iter().map(|v| f16::from_f32(*v)).collect();
            let q: Vec<i8> = wf.iter().map(|v| (v * 127.0).round() as i8).collect();
            let d: Vec<f32> = (0..k.div_ceil(QBLOCK) * PANEL)
                .map(|i| 0.01 + (i % 7) as f32 * 0.001)
                .collect();
            let q4: Vec<u8> = (0..k * PANEL / 2).map(|i| ((i * 37 + 11) % 256) as u8).collect();
            let d4: Vec<half::f16> = (0..k.div_ceil(QBLOCK) * PANEL)
                .map(|i| half::f16::from_f32(0.02 + (i % 5) as f32 * 0.003))
                .collect();
            let m4: Vec<half::f16> = (0..k.div_ceil(QBLOCK) * PANEL)
                .map(|i| half::f16::from_f32(-0.1 + (i % 3) as f32 * 0.05))
                .collect();
            let panels = [
                Panel::Q4 { q: &q4, d: &d4, m: &m4 },
                Panel::F32(&wf),
                Panel::Bf16(&bf),
                Panel::F16(&hf),
                Panel::Q8_0 { q: &q, d: &d },
            ];
            for p in panels {
                for rows in 1..=3 {
                    let x = rand_vec(rows * k, 9);
                    for isa in Isa::supported() {
                        let mut out = [[0f32; PANEL]; 3];
                        panel_gemv(isa, p, &x, rows, k, &mut out);
                        let mut wide = vec![0f32; k * PANEL];
                        widen_panel(isa, p, k, &mut wide);
                        for c in 0..PANEL {
                            for t in 0..k {
                                assert_eq!(wide[t * PANEL + c], panel_value(p, t, c), "{isa:?} widen");
                            }
                            for r in 0..rows {
                                let want: f64 = (0..k).map(|t| x[r * k + t] as f64 * panel_value(p, t, c) as f64).sum();
                                let got = out[r][c] as f64;
                                assert!(
                                    (got - want).abs() < 1e-4 * (k as f64).sqrt(),
                                    "{isa:?} k={k} rows={rows} c={c}: {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
