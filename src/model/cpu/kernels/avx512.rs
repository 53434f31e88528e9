//! AVX-512 kernels (F, BW, VL with FMA and F16C; VNNI where the CPU has it).
//!
//! Every function here is `unsafe`: callers (`kernels/mod.rs`) guarantee that the CPU reports the
//! features named in its `target_feature` attribute and that the panel and activation slices
//! have been checked against the lengths the loops use.

use std::arch::x86_64::*;

use super::{act_scale, Panel, QRowMut, QRows, PANEL, QBLOCK};

/// How far ahead of the loads a panel stream is prefetched. The hardware prefetchers stop at
/// 4 KiB boundaries; measured on two cores, the BF16 LM head went from 20 to 30 GB/s with it.
const PREFETCH_BYTES: usize = 8192;

/// Prefetches the line `PREFETCH_BYTES` past `p`: into L1, or with `PIECE` into L2 only. A call
/// over a piece of a panel (not all of it) is one of several row groups taking the panel in
/// turn, the later ones reading the piece from L1; lines prefetched into L1 for the next piece
/// would evict it. Measured on two Zen 4 cores, 16 rows of BF16 dot products ran 18-31% faster
/// with L2 prefetches, Q8_0 9-14%; one row (the whole panel in one call) 3-7% slower.
/// `PIECE` is a constant so that the loops carry no branch for it.
#[inline(always)]
unsafe fn prefetch<const PIECE: bool, T>(p: *const T) {
    let line = (p as *const i8).wrapping_add(PREFETCH_BYTES);
    if PIECE {
        _mm_prefetch::<_MM_HINT_T1>(line);
    } else {
        _mm_prefetch::<_MM_HINT_T0>(line);
    }
}

/// `$f::<R, PIECE>(args)` for `R = rows` (1 to 8) and `PIECE = piece`.
macro_rules! by_rows {
    ($rows:expr, $piece:expr, $f:ident, $($a:expr),*) => {
        if $piece {
            by_rows!(@ $rows, true, $f, $($a),*)
        } else {
            by_rows!(@ $rows, false, $f, $($a),*)
        }
    };
    (@ $rows:expr, $p:literal, $f:ident, $($a:expr),*) => {
        match $rows {
            1 => $f::<1, $p>($($a),*),
            2 => $f::<2, $p>($($a),*),
            3 => $f::<3, $p>($($a),*),
            4 => $f::<4, $p>($($a),*),
            5 => $f::<5, $p>($($a),*),
            6 => $f::<6, $p>($($a),*),
            7 => $f::<7, $p>($($a),*),
            _ => $f::<8, $p>($($a),*),
        }
    };
}

/// Sixteen f16 scales as f32.
#[inline(always)]
unsafe fn h16(p: *const half::f16) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
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
        _ => unreachable!("Q4 and quad panels have their own kernels"),
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
        _ => unreachable!("Q4 and quad panels have their own kernels"),
    }
}

/// Puts columns back in order when even lanes held columns 0, 2, .., 30 and odd ones 1, .., 31.
#[inline(always)]
unsafe fn store_interleaved(e: __m512, o: __m512, out: &mut [f32; PANEL]) {
    let lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    _mm512_storeu_ps(out.as_mut_ptr(), _mm512_permutex2var_ps(e, lo_idx, o));
    _mm512_storeu_ps(out.as_mut_ptr().add(16), _mm512_permutex2var_ps(e, hi_idx, o));
}

/// # Safety
/// AVX-512 F/BW/VL, FMA and F16C; `p` a steps-layout panel checked for input length `k`, `x`
/// holds `rows * k` values (step-major), `1 <= rows <= GEMV_ROWS`, `acc` has `rows` rows,
/// `t0 <= t1 <= k` with `t0` a multiple of `QBLOCK`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
pub unsafe fn gemv(p: Panel, x: &[f32], rows: usize, k: usize, t0: usize, t1: usize, acc: &mut [[f32; PANEL]]) {
    let piece = t0 > 0 || t1 < k;
    match p {
        Panel::Bf16(w) => by_rows!(rows, piece, gemv_bf16, w, x, t0, t1, acc),
        Panel::Q4 { .. } => by_rows!(rows, piece, gemv_q4, p, x, t0, t1, acc),
        _ => by_rows!(rows, piece, gemv_wide, p, x, t0, t1, acc),
    }
}

/// Puts accumulators in column order after the last steps (BF16 and Q4 panels accumulate even
/// columns in the first 16 values and odd ones in the last 16).
///
/// # Safety
/// As `gemv`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
pub unsafe fn gemv_finish(p: Panel, rows: usize, acc: &mut [[f32; PANEL]]) {
    if matches!(p, Panel::Bf16(_) | Panel::Q4 { .. }) {
        for a in acc.iter_mut().take(rows) {
            let (e, o) = (_mm512_loadu_ps(a.as_ptr()), _mm512_loadu_ps(a.as_ptr().add(16)));
            store_interleaved(e, o, a);
        }
    }
}

/// The running sums of `acc` (zero at the first step).
#[inline(always)]
unsafe fn carried<const R: usize>(t0: usize, acc: &[[f32; PANEL]]) -> [[__m512; 2]; R] {
    // Plain loops: a closure (`array::from_fn`) would not inherit the caller's target features,
    // and its intrinsics would become calls.
    let mut tot = [[_mm512_setzero_ps(); 2]; R];
    if t0 != 0 {
        for r in 0..R {
            tot[r] = [
                _mm512_loadu_ps(acc[r].as_ptr()),
                _mm512_loadu_ps(acc[r].as_ptr().add(16)),
            ];
        }
    }
    tot
}

#[inline(always)]
unsafe fn keep<const R: usize>(tot: &[[__m512; 2]; R], acc: &mut [[f32; PANEL]]) {
    for r in 0..R {
        _mm512_storeu_ps(acc[r].as_mut_ptr(), tot[r][0]);
        _mm512_storeu_ps(acc[r].as_mut_ptr().add(16), tot[r][1]);
    }
}

/// Per step: 32 weights widened once, FMA'd with the broadcast activation of each row, one
/// accumulator chain per output whatever the number of rows (so a row's result never depends on
/// which rows it was computed with); Q8_0 scales apply once per block.
#[inline(always)]
unsafe fn gemv_wide<const R: usize, const PIECE: bool>(
    p: Panel,
    x: &[f32],
    t0: usize,
    t1: usize,
    acc: &mut [[f32; PANEL]],
) {
    let scaled = matches!(p, Panel::Q8_0 { .. });
    let mut tot = carried::<R>(t0, acc);
    let mut tb = t0;
    while tb < t1 {
        let te = if scaled { (tb + QBLOCK).min(t1) } else { t1 };
        // Unscaled formats continue the one chain; Q8_0 sums a block, then scales it.
        let mut a = if scaled { [[_mm512_setzero_ps(); 2]; R] } else { tot };
        for t in tb..te {
            // One prefetch per 64-byte line.
            let (s0, s1) = (stream_ptr(p, t), stream_ptr(p, t + 1));
            let mut line = s0;
            while line < s1 {
                prefetch::<PIECE, _>(line);
                line = line.add(64);
            }
            let (w0, w1) = load512(p, t);
            for r in 0..R {
                let xa = _mm512_set1_ps(*x.get_unchecked(t * R + r));
                a[r][0] = _mm512_fmadd_ps(xa, w0, a[r][0]);
                a[r][1] = _mm512_fmadd_ps(xa, w1, a[r][1]);
            }
        }
        match p {
            Panel::Q8_0 { d, .. } => {
                let ds = d.as_ptr().add((tb / QBLOCK) * PANEL);
                let (d0, d1) = (h16(ds), h16(ds.add(16)));
                for r in 0..R {
                    tot[r][0] = _mm512_fmadd_ps(a[r][0], d0, tot[r][0]);
                    tot[r][1] = _mm512_fmadd_ps(a[r][1], d1, tot[r][1]);
                }
            }
            _ => tot = a,
        }
        tb = te;
    }
    keep(&tot, acc);
}

/// BF16: one 64-byte load per step gives the even columns (shift left) and the odd ones
/// (mask the high halves) as f32 with two cheap integer ops and no shuffles; `gemv_finish`
/// puts the columns back in order. One accumulator chain per output, as in `gemv_wide`.
#[inline(always)]
unsafe fn gemv_bf16<const R: usize, const PIECE: bool>(
    w: &[half::bf16],
    x: &[f32],
    t0: usize,
    t1: usize,
    acc: &mut [[f32; PANEL]],
) {
    let hi = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let wp = w.as_ptr();
    let mut a = carried::<R>(t0, acc);
    for t in t0..t1 {
        prefetch::<PIECE, _>(wp.add(t * PANEL));
        let v = _mm512_loadu_si512(wp.add(t * PANEL) as *const __m512i);
        let (ve, vo) = (
            _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
            _mm512_castsi512_ps(_mm512_and_si512(v, hi)),
        );
        for r in 0..R {
            let xa = _mm512_set1_ps(*x.get_unchecked(t * R + r));
            a[r][0] = _mm512_fmadd_ps(xa, ve, a[r][0]);
            a[r][1] = _mm512_fmadd_ps(xa, vo, a[r][1]);
        }
    }
    keep(&a, acc);
}

/// # Safety
/// AVX-512 F/BW/VL and BF16; `w` a BF16 steps panel checked for input length `k`, `xp` holds
/// `rows * kh` pairs (`kh = k.div_ceil(2)`, row `r` at `r * kh`), `1 <= rows <= GEMV_ROWS`, `acc` has `rows` rows, `t0 <= t1 <= k`
/// with `t0` a multiple of `QBLOCK`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma,f16c")]
pub unsafe fn gemv_bf16_pairs(
    w: &[half::bf16],
    xp: &[u32],
    rows: usize,
    kh: usize,
    t0: usize,
    t1: usize,
    acc: &mut [[f32; PANEL]],
) {
    let piece = t0 > 0 || t1.div_ceil(2) < kh;
    by_rows!(rows, piece, bf16_pairs, w, xp, kh, t0, t1, acc)
}

/// Two steps of a BF16 panel interleaved per column (`vpunpck[lh]wd` of the two 64-byte steps):
/// each 32-bit lane holds one column's weights for steps t and t + 1, which `vdpbf16ps`
/// multiplies with the row's two activations broadcast to every lane. Lane `4i + j` of the first
/// vector is column `8i + j`, of the second `8i + 4 + j`; `gemv_bf16_pairs_finish` reorders.
#[inline(always)]
unsafe fn bf16_pairs<const R: usize, const PIECE: bool>(
    w: &[half::bf16],
    xp: &[u32],
    kh: usize,
    t0: usize,
    t1: usize,
    acc: &mut [[f32; PANEL]],
) {
    let wp = w.as_ptr();
    let mut a = carried::<R>(t0, acc);
    let mut rows = [xp.as_ptr(); R];
    for r in 0..R {
        rows[r] = xp.as_ptr().add(r * kh + t0 / 2);
    }
    #[inline(always)]
    unsafe fn pair<const R: usize>(
        a: &mut [[__m512; 2]; R],
        v0: __m512i,
        v1: __m512i,
        rows: &[*const u32; R],
        h: usize,
    ) {
        let lo: __m512bh = std::mem::transmute(_mm512_unpacklo_epi16(v0, v1));
        let hi: __m512bh = std::mem::transmute(_mm512_unpackhi_epi16(v0, v1));
        for r in 0..R {
            let xb: __m512bh = std::mem::transmute(_mm512_set1_epi32(*rows[r].add(h) as i32));
            a[r][0] = _mm512_dpbf16_ps(a[r][0], lo, xb);
            a[r][1] = _mm512_dpbf16_ps(a[r][1], hi, xb);
        }
    }
    let full = t0 + (t1 - t0) / 2 * 2;
    let mut t = t0;
    while t < full {
        let s = wp.add(t * PANEL);
        // One prefetch per 64-byte step.
        prefetch::<PIECE, _>(s);
        prefetch::<PIECE, _>(s.add(PANEL));
        let v0 = _mm512_loadu_si512(s as *const __m512i);
        let v1 = _mm512_loadu_si512(s.add(PANEL) as *const __m512i);
        pair(&mut a, v0, v1, &rows, (t - t0) / 2);
        t += 2;
    }
    if full < t1 {
        // The panel's last step when `k` is odd; its pair's high half is zero.
        let v0 = _mm512_loadu_si512(wp.add(full * PANEL) as *const __m512i);
        pair(&mut a, v0, _mm512_setzero_si512(), &rows, (full - t0) / 2);
    }
    keep(&a, acc);
}

/// Puts `gemv_bf16_pairs`' sums in column order.
///
/// # Safety
/// AVX-512 F; `acc` has `rows` rows.
#[target_feature(enable = "avx512f")]
pub unsafe fn gemv_bf16_pairs_finish(rows: usize, acc: &mut [[f32; PANEL]]) {
    // Column c = 8i + j comes from lane 4i + j of the first vector (j < 4) or 4i + j - 4 of the
    // second (index + 16).
    let first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    let second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for a in acc.iter_mut().take(rows) {
        let (e, o) = (_mm512_loadu_ps(a.as_ptr()), _mm512_loadu_ps(a.as_ptr().add(16)));
        _mm512_storeu_ps(a.as_mut_ptr(), _mm512_permutex2var_ps(e, first, o));
        _mm512_storeu_ps(a.as_mut_ptr().add(16), _mm512_permutex2var_ps(e, second, o));
    }
}

/// Q4 steps panel: per step, 16 bytes widen to 16 lanes whose low nibbles are the even columns
/// and high nibbles the odd ones. Per block of 32 steps the sums are scaled by `d` and the
/// block's activation sum is added times `m`; `gemv_finish` interleaves the columns back.
#[inline(always)]
unsafe fn gemv_q4<const R: usize, const PIECE: bool>(
    p: Panel,
    x: &[f32],
    t0: usize,
    t1: usize,
    acc: &mut [[f32; PANEL]],
) {
    let Panel::Q4 { q, d, m } = p else { return };
    let (qp, dp, mp) = (q.as_ptr(), d.as_ptr() as *const __m256i, m.as_ptr() as *const __m256i);
    let low = _mm512_set1_epi32(0xF);
    let mut tot = carried::<R>(t0, acc);
    let mut tb = t0;
    while tb < t1 {
        let te = (tb + QBLOCK).min(t1);
        let mut a = [[_mm512_setzero_ps(); 2]; R];
        let mut xsum = [_mm512_setzero_ps(); R];
        for t in tb..te {
            if t % 4 == 0 {
                prefetch::<PIECE, _>(qp.add(t * 16));
            }
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(qp.add(t * 16) as *const __m128i));
            let e = _mm512_cvtepi32_ps(_mm512_and_si512(v, low));
            let o = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
            for r in 0..R {
                let xv = _mm512_set1_ps(*x.get_unchecked(t * R + r));
                a[r][0] = _mm512_fmadd_ps(xv, e, a[r][0]);
                a[r][1] = _mm512_fmadd_ps(xv, o, a[r][1]);
                xsum[r] = _mm512_add_ps(xsum[r], xv);
            }
        }
        let b = (tb / QBLOCK) * 2;
        let (de, dodd) = (
            _mm512_cvtph_ps(_mm256_loadu_si256(dp.add(b))),
            _mm512_cvtph_ps(_mm256_loadu_si256(dp.add(b + 1))),
        );
        let (me, modd) = (
            _mm512_cvtph_ps(_mm256_loadu_si256(mp.add(b))),
            _mm512_cvtph_ps(_mm256_loadu_si256(mp.add(b + 1))),
        );
        for r in 0..R {
            tot[r][0] = _mm512_fmadd_ps(a[r][0], de, _mm512_fmadd_ps(xsum[r], me, tot[r][0]));
            tot[r][1] = _mm512_fmadd_ps(a[r][1], dodd, _mm512_fmadd_ps(xsum[r], modd, tot[r][1]));
        }
        tb = te;
    }
    keep(&tot, acc);
}

/// # Safety
/// As `gemv`, with `dst` holding `k * 32` values (any layout).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
pub unsafe fn widen(p: Panel, k: usize, dst: &mut [f32]) {
    let o = dst.as_mut_ptr();
    match p {
        Panel::F32(w) => dst[..k * PANEL].copy_from_slice(w),
        Panel::Q4 { q, d, m } => {
            let (qp, dp, mp) = (q.as_ptr(), d.as_ptr() as *const __m256i, m.as_ptr() as *const __m256i);
            let low = _mm512_set1_epi32(0xF);
            let lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            let hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
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
                _mm512_storeu_ps(o.add(t * PANEL), _mm512_permutex2var_ps(ve, lo_idx, vo));
                _mm512_storeu_ps(o.add(t * PANEL + 16), _mm512_permutex2var_ps(ve, hi_idx, vo));
            }
        }
        Panel::Q8x4 { q, d } => {
            // Step j of a quad is byte j of every 32-bit lane: shift it to the top, then back
            // down with the sign.
            for t0 in (0..k).step_by(4) {
                let s = (t0 / QBLOCK) * PANEL;
                let (d0, d1) = (h16(d.as_ptr().add(s)), h16(d.as_ptr().add(s + 16)));
                let base = q.as_ptr().add(t0 * PANEL) as *const __m512i;
                let (v0, v1) = (_mm512_loadu_si512(base), _mm512_loadu_si512(base.add(1)));
                for j in 0..4.min(k - t0) {
                    let sh = _mm_cvtsi32_si128(24 - 8 * j as i32);
                    let e0 = _mm512_sra_epi32(_mm512_sll_epi32(v0, sh), _mm_cvtsi32_si128(24));
                    let e1 = _mm512_sra_epi32(_mm512_sll_epi32(v1, sh), _mm_cvtsi32_si128(24));
                    _mm512_storeu_ps(o.add((t0 + j) * PANEL), _mm512_mul_ps(_mm512_cvtepi32_ps(e0), d0));
                    _mm512_storeu_ps(o.add((t0 + j) * PANEL + 16), _mm512_mul_ps(_mm512_cvtepi32_ps(e1), d1));
                }
            }
        }
        Panel::Q4x8 { q, d, m } => {
            let nib = _mm512_set1_epi32(0xF);
            for t0 in (0..k).step_by(8) {
                let s = (t0 / QBLOCK) * PANEL;
                let dh = d.as_ptr().add(s) as *const __m256i;
                let mh = m.as_ptr().add(s) as *const __m256i;
                let (d0, d1) = (
                    _mm512_cvtph_ps(_mm256_loadu_si256(dh)),
                    _mm512_cvtph_ps(_mm256_loadu_si256(dh.add(1))),
                );
                let (m0, m1) = (
                    _mm512_cvtph_ps(_mm256_loadu_si256(mh)),
                    _mm512_cvtph_ps(_mm256_loadu_si256(mh.add(1))),
                );
                let base = q.as_ptr().add(t0 * PANEL / 2) as *const __m512i;
                let (v0, v1) = (_mm512_loadu_si512(base), _mm512_loadu_si512(base.add(1)));
                for j in 0..8.min(k - t0) {
                    let sh = _mm_cvtsi32_si128(8 * (j as i32 % 4) + 4 * (j as i32 / 4));
                    let e0 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srl_epi32(v0, sh), nib));
                    let e1 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srl_epi32(v1, sh), nib));
                    _mm512_storeu_ps(o.add((t0 + j) * PANEL), _mm512_fmadd_ps(e0, d0, m0));
                    _mm512_storeu_ps(o.add((t0 + j) * PANEL + 16), _mm512_fmadd_ps(e1, d1, m1));
                }
            }
        }
        _ => {
            for t in 0..k {
                let (mut w0, mut w1) = load512(p, t);
                if let Panel::Q8_0 { d, .. } = p {
                    let ds = d.as_ptr().add((t / QBLOCK) * PANEL);
                    w0 = _mm512_mul_ps(w0, h16(ds));
                    w1 = _mm512_mul_ps(w1, h16(ds.add(16)));
                }
                _mm512_storeu_ps(o.add(t * PANEL), w0);
                _mm512_storeu_ps(o.add(t * PANEL + 16), w1);
            }
        }
    }
}

/// # Safety
/// AVX-512 F/BW/VL/VNNI, FMA and F16C; `p` a quad panel checked for `a.kp`, `a` checked, `out`
/// has `a.rows <= INT_ROWS` rows, `b0 <= b1 <= a.kp / QBLOCK`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub unsafe fn gemv_int_vnni(p: Panel, a: &QRows, b0: usize, b1: usize, out: &mut [[f32; PANEL]]) {
    if b0 > 0 || b1 < a.kp / QBLOCK {
        int_rows::<true, true>(p, a, b0, b1, out)
    } else {
        int_rows::<true, false>(p, a, b0, b1, out)
    }
}

/// # Safety
/// As `gemv_int_vnni`, without VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
pub unsafe fn gemv_int(p: Panel, a: &QRows, b0: usize, b1: usize, out: &mut [[f32; PANEL]]) {
    if b0 > 0 || b1 < a.kp / QBLOCK {
        int_rows::<false, true>(p, a, b0, b1, out)
    } else {
        int_rows::<false, false>(p, a, b0, b1, out)
    }
}

/// Rows in groups of at most 4 (16 integer accumulators and 8 float totals), blocks `b0..b1`
/// added to what `out` holds (from zero when `b0` is 0).
#[inline(always)]
unsafe fn int_rows<const VNNI: bool, const PIECE: bool>(
    p: Panel,
    a: &QRows,
    b0: usize,
    b1: usize,
    out: &mut [[f32; PANEL]],
) {
    let mut r0 = 0;
    while r0 < a.rows {
        let n = (a.rows - r0).min(4);
        let sub = a.sub(r0, n);
        let o = &mut out[r0..];
        macro_rules! go {
            ($f:ident) => {
                match n {
                    1 => $f::<1, VNNI, PIECE>(p, &sub, b0, b1, o),
                    2 => $f::<2, VNNI, PIECE>(p, &sub, b0, b1, o),
                    3 => $f::<3, VNNI, PIECE>(p, &sub, b0, b1, o),
                    _ => $f::<4, VNNI, PIECE>(p, &sub, b0, b1, o),
                }
            };
        }
        match p {
            Panel::Q8x4 { .. } if !VNNI => match n {
                1 => q8x4_madd::<1, PIECE>(p, &sub, b0, b1, o),
                2 => q8x4_madd::<2, PIECE>(p, &sub, b0, b1, o),
                3 => q8x4_madd::<3, PIECE>(p, &sub, b0, b1, o),
                _ => q8x4_madd::<4, PIECE>(p, &sub, b0, b1, o),
            },
            Panel::Q8x4 { .. } => match n {
                1 => q8x4_vnni::<1, PIECE>(p, &sub, b0, b1, o),
                2 => q8x4_vnni::<2, PIECE>(p, &sub, b0, b1, o),
                3 => q8x4_vnni::<3, PIECE>(p, &sub, b0, b1, o),
                _ => q8x4_vnni::<4, PIECE>(p, &sub, b0, b1, o),
            },
            _ => go!(q4x8),
        }
        r0 += n;
    }
}

/// Q8x4 without VNNI: the weights widen to 16 bits (one `vpmovsxbw` per 32, shared by the rows)
/// and `vpmaddwd` multiplies them with the 16-bit activations `256 · q + lo` in one pass. Each
/// 32-bit lane sums two steps of a column; neighbouring lanes are added per block.
#[inline(always)]
unsafe fn q8x4_madd<const R: usize, const PIECE: bool>(
    p: Panel,
    a: &QRows,
    b0: usize,
    b1: usize,
    out: &mut [[f32; PANEL]],
) {
    let Panel::Q8x4 { q, d } = p else { return };
    let nb = a.kp / QBLOCK;
    let qp = q.as_ptr();
    // Even lanes of two vectors, in order.
    let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let mut tot = carried::<R>(b0, out);
    for b in b0..b1 {
        // Per row, 4 vectors of (8 columns x 2 half-sums).
        let mut acc = [[_mm512_setzero_si512(); 4]; R];
        for g in 0..QBLOCK / 4 {
            let t = b * QBLOCK + g * 4;
            let base = qp.add(t * PANEL);
            prefetch::<PIECE, _>(base);
            prefetch::<PIECE, _>(base.add(64));
            macro_rules! wide {
                ($i:expr) => {
                    _mm512_cvtepi8_epi16(_mm256_loadu_si256(base.add(32 * $i) as *const __m256i))
                };
            }
            let w = [wide!(0), wide!(1), wide!(2), wide!(3)];
            for r in 0..R {
                let xv = _mm512_set1_epi64((a.x16.as_ptr().add(r * a.kp + t) as *const i64).read_unaligned());
                for i in 0..4 {
                    acc[r][i] = _mm512_add_epi32(acc[r][i], _mm512_madd_epi16(w[i], xv));
                }
            }
        }
        let ds = d.as_ptr().add(b * PANEL);
        let (d0, d1) = (h16(ds), h16(ds.add(16)));
        for r in 0..R {
            macro_rules! pair {
                ($v:expr) => {
                    _mm512_add_epi32($v, _mm512_srli_epi64($v, 32))
                };
            }
            let s0 = _mm512_permutex2var_epi32(pair!(acc[r][0]), evens, pair!(acc[r][1]));
            let s1 = _mm512_permutex2var_epi32(pair!(acc[r][2]), evens, pair!(acc[r][3]));
            let dx = _mm512_set1_ps(*a.d.get_unchecked(r * nb + b));
            tot[r][0] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s0), dx), d0, tot[r][0]);
            tot[r][1] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s1), dx), d1, tot[r][1]);
        }
    }
    keep(&tot, out);
}

/// Four activation bytes of row `r` at step `t` of `x` (value or residual bytes), in every
/// 32-bit lane.
#[inline(always)]
unsafe fn x4(x: &[i8], kp: usize, r: usize, t: usize) -> __m512i {
    _mm512_set1_epi32((x.as_ptr().add(r * kp + t) as *const i32).read_unaligned())
}

/// `Σ u·x` per lane for unsigned `u` (nibbles, below 16) and signed `x` without VNNI.
#[inline(always)]
unsafe fn dot_unsigned(acc: __m512i, u: __m512i, x: __m512i) -> __m512i {
    _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, x), _mm512_set1_epi16(1)))
}

/// Q8x4 with VNNI: the weights become unsigned by flipping their top bit (w + 128), so one
/// `vpdpbusd` per 16 columns and row does four steps; `128 · Σx` is taken off per block. Each
/// block is summed over the value bytes, shifted 8 bits, then summed over the residual bytes.
#[inline(always)]
unsafe fn q8x4_vnni<const R: usize, const PIECE: bool>(
    p: Panel,
    a: &QRows,
    b0: usize,
    b1: usize,
    out: &mut [[f32; PANEL]],
) {
    let Panel::Q8x4 { q, d } = p else { return };
    let nb = a.kp / QBLOCK;
    let qp = q.as_ptr();
    let flip = _mm512_set1_epi8(-128);
    let mut tot = carried::<R>(b0, out);
    for b in b0..b1 {
        let mut acc = [[_mm512_setzero_si512(); 2]; R];
        for (pass, x) in [a.q, a.lo].into_iter().enumerate() {
            if pass == 1 {
                for r in 0..R {
                    acc[r] = [_mm512_slli_epi32(acc[r][0], 8), _mm512_slli_epi32(acc[r][1], 8)];
                }
                // No residual bytes (8-bit activations): their pass would add zeros.
                if !a.residual {
                    break;
                }
            }
            for g in 0..QBLOCK / 4 {
                let t = b * QBLOCK + g * 4;
                let base = qp.add(t * PANEL);
                if pass == 0 && a.first {
                    prefetch::<PIECE, _>(base);
                    prefetch::<PIECE, _>(base.add(64));
                }
                let w0 = _mm512_xor_si512(_mm512_loadu_si512(base as *const __m512i), flip);
                let w1 = _mm512_xor_si512(_mm512_loadu_si512(base.add(64) as *const __m512i), flip);
                for r in 0..R {
                    let xb = x4(x, a.kp, r, t);
                    acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], w0, xb);
                    acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], w1, xb);
                }
            }
        }
        let ds = d.as_ptr().add(b * PANEL);
        let (d0, d1) = (h16(ds), h16(ds.add(16)));
        for r in 0..R {
            let dx = _mm512_set1_ps(*a.d.get_unchecked(r * nb + b));
            let corr = _mm512_set1_epi32(128 * *a.s.get_unchecked(r * nb + b));
            let (i0, i1) = (_mm512_sub_epi32(acc[r][0], corr), _mm512_sub_epi32(acc[r][1], corr));
            tot[r][0] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(i0), dx), d0, tot[r][0]);
            tot[r][1] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(i1), dx), d1, tot[r][1]);
        }
    }
    keep(&tot, out);
}

/// Q4x8: nibbles are unsigned already; value bytes then residual bytes, as in `q8x4`.
#[inline(always)]
unsafe fn q4x8<const R: usize, const VNNI: bool, const PIECE: bool>(
    p: Panel,
    a: &QRows,
    b0: usize,
    b1: usize,
    out: &mut [[f32; PANEL]],
) {
    let Panel::Q4x8 { q, d, m } = p else { return };
    let nb = a.kp / QBLOCK;
    let qp = q.as_ptr();
    let nib = _mm512_set1_epi8(0xF);
    let mut tot = carried::<R>(b0, out);
    for b in b0..b1 {
        let mut acc = [[_mm512_setzero_si512(); 2]; R];
        for (pass, x) in [a.q, a.lo].into_iter().enumerate() {
            if pass == 1 {
                for r in 0..R {
                    acc[r] = [_mm512_slli_epi32(acc[r][0], 8), _mm512_slli_epi32(acc[r][1], 8)];
                }
                // No residual bytes (8-bit activations): their pass would add zeros.
                if !a.residual {
                    break;
                }
            }
            for o in 0..QBLOCK / 8 {
                let t = b * QBLOCK + o * 8;
                let base = qp.add(t * PANEL / 2);
                if pass == 0 && a.first {
                    prefetch::<PIECE, _>(base);
                    prefetch::<PIECE, _>(base.add(64));
                }
                let v0 = _mm512_loadu_si512(base as *const __m512i);
                let v1 = _mm512_loadu_si512(base.add(64) as *const __m512i);
                let n = [
                    _mm512_and_si512(v0, nib),
                    _mm512_and_si512(_mm512_srli_epi16(v0, 4), nib),
                    _mm512_and_si512(v1, nib),
                    _mm512_and_si512(_mm512_srli_epi16(v1, 4), nib),
                ];
                for r in 0..R {
                    let (xa, xb) = (x4(x, a.kp, r, t), x4(x, a.kp, r, t + 4));
                    if VNNI {
                        acc[r][0] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r][0], n[0], xa), n[1], xb);
                        acc[r][1] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r][1], n[2], xa), n[3], xb);
                    } else {
                        acc[r][0] = dot_unsigned(dot_unsigned(acc[r][0], n[0], xa), n[1], xb);
                        acc[r][1] = dot_unsigned(dot_unsigned(acc[r][1], n[2], xa), n[3], xb);
                    }
                }
            }
        }
        let s = b * PANEL;
        let dh = d.as_ptr().add(s) as *const __m256i;
        let mh = m.as_ptr().add(s) as *const __m256i;
        let (d0, d1) = (
            _mm512_cvtph_ps(_mm256_loadu_si256(dh)),
            _mm512_cvtph_ps(_mm256_loadu_si256(dh.add(1))),
        );
        let (m0, m1) = (
            _mm512_cvtph_ps(_mm256_loadu_si256(mh)),
            _mm512_cvtph_ps(_mm256_loadu_si256(mh.add(1))),
        );
        for r in 0..R {
            let dxs = *a.d.get_unchecked(r * nb + b);
            let dx = _mm512_set1_ps(dxs);
            let xs = _mm512_set1_ps(dxs * *a.s.get_unchecked(r * nb + b) as f32);
            let f0 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][0]), dx), d0, tot[r][0]);
            let f1 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][1]), dx), d1, tot[r][1]);
            tot[r][0] = _mm512_fmadd_ps(xs, m0, f0);
            tot[r][1] = _mm512_fmadd_ps(xs, m1, f1);
        }
    }
    keep(&tot, out);
}

/// # Safety
/// AVX-512 F/BW/VL; `dst` holds whole blocks for `x.len()` values (checked by the caller).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn quantize_row(x: &[f32], dst: QRowMut) {
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let k = x.len();
    let (lim_lo, lim_hi, f256) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0), _mm512_set1_ps(256.0));
    for b in 0..k.div_ceil(QBLOCK) {
        let t0 = b * QBLOCK;
        let n = (k - t0).min(QBLOCK);
        let mask = |from: usize| -> __mmask16 {
            let live = n.saturating_sub(from).min(16);
            ((1u32 << live) - 1) as __mmask16
        };
        let v = [
            _mm512_maskz_loadu_ps(mask(0), x.as_ptr().add(t0)),
            // The second half may lie past the end: masked off, but the address must not be formed
            // with `add`.
            _mm512_maskz_loadu_ps(mask(16), x.as_ptr().wrapping_add(t0 + 16)),
        ];
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        let (d, inv) = act_scale(amax);
        let inv = _mm512_set1_ps(inv);
        let mut sum = _mm512_setzero_si512();
        for h in 0..2 {
            let y = _mm512_mul_ps(v[h], inv);
            let hi = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps::<NEAREST>(y), lim_lo), lim_hi);
            let rest = _mm512_roundscale_ps::<NEAREST>(_mm512_mul_ps(_mm512_sub_ps(y, hi), f256));
            let rest = _mm512_min_ps(_mm512_max_ps(rest, lim_lo), lim_hi);
            let (hi, rest) = (_mm512_cvttps_epi32(hi), _mm512_cvttps_epi32(rest));
            let rest = if dst.residual { rest } else { _mm512_setzero_si512() };
            let wide = _mm512_add_epi32(_mm512_slli_epi32(hi, 8), rest);
            let at = t0 + 16 * h;
            _mm_storeu_si128(dst.q.as_mut_ptr().add(at) as *mut __m128i, _mm512_cvtepi32_epi8(hi));
            _mm_storeu_si128(dst.lo.as_mut_ptr().add(at) as *mut __m128i, _mm512_cvtepi32_epi8(rest));
            _mm256_storeu_si256(
                dst.x16.as_mut_ptr().add(at) as *mut __m256i,
                _mm512_cvtepi32_epi16(wide),
            );
            sum = _mm512_add_epi32(sum, wide);
        }
        dst.d[b] = d / 256.0;
        dst.s[b] = _mm512_reduce_add_epi32(sum);
    }
}
