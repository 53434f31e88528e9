//! AVX2 kernels (with FMA and F16C; AVX-VNNI where the CPU has it), written for 16 YMM
//! registers: the 32 columns of a panel are 4 vectors, so a kernel keeps at most 8 to 12
//! accumulators, and the integer kernels work on half a panel (16 columns) at a time.
//!
//! Every function here is `unsafe`: callers (`kernels/mod.rs`) guarantee that the CPU reports the
//! features named in its `target_feature` attribute and that the slices have been checked against
//! the lengths the loops use.

use std::arch::x86_64::*;

use super::{act_scale, Panel, QRowMut, QRows, PANEL, QBLOCK};

/// `[e(0), e(1), e(2), e(3)]` written out. Closures (`array::from_fn`) do not inherit the
/// caller's target features, so the intrinsics inside them would become calls.
macro_rules! four {
    (|$j:ident| $e:expr) => {
        [
            {
                let $j = 0usize;
                $e
            },
            {
                let $j = 1usize;
                $e
            },
            {
                let $j = 2usize;
                $e
            },
            {
                let $j = 3usize;
                $e
            },
        ]
    };
}

/// See `avx512.rs`: software prefetch across 4 KiB pages.
const PREFETCH_BYTES: usize = 8192;

#[inline(always)]
unsafe fn prefetch<T>(p: *const T) {
    _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(PREFETCH_BYTES));
}

/// Eight f16 scales as f32.
#[inline(always)]
unsafe fn h8(p: *const half::f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// Columns back in order from even lanes (columns 0, 2, .., 14 of a half) and odd lanes.
#[inline(always)]
unsafe fn store_interleaved(e: __m256, o: __m256, out: *mut f32) {
    let lo = _mm256_unpacklo_ps(e, o);
    let hi = _mm256_unpackhi_ps(e, o);
    _mm256_storeu_ps(out, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(out.add(8), _mm256_permute2f128_ps(lo, hi, 0x31));
}

/// # Safety
/// AVX2, FMA and F16C; `p` a steps-layout panel checked for input length `k`, `x` holds
/// `rows * k` values (step-major), `1 <= rows <= GEMV_ROWS`, `acc` has `rows` rows,
/// `t0 <= t1 <= k` with `t0` a multiple of `QBLOCK`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemv(p: Panel, x: &[f32], rows: usize, k: usize, t0: usize, t1: usize, acc: &mut [[f32; PANEL]]) {
    // Two rows at a time fill the registers (8 accumulators and 4 weight vectors); every output
    // is one accumulator chain whatever the number of rows, so a row's result never depends on
    // which rows it was computed with.
    let _ = k;
    let mut r = 0;
    while r < rows {
        let n = if rows - r >= 2 { 2 } else { 1 };
        // Row r's activation at step t is x[t * rows + r] (step-major).
        let (xr, ar) = (&x[r..], &mut acc[r..]);
        match (p, n) {
            (Panel::Bf16(w), 1) => gemv_bf16::<1>(w, xr, rows, t0, t1, ar),
            (Panel::Bf16(w), _) => gemv_bf16::<2>(w, xr, rows, t0, t1, ar),
            (Panel::Q4 { .. }, 1) => gemv_q4::<1>(p, xr, rows, t0, t1, ar),
            (Panel::Q4 { .. }, _) => gemv_q4::<2>(p, xr, rows, t0, t1, ar),
            (_, 1) => gemv_wide::<1>(p, xr, rows, t0, t1, ar),
            _ => gemv_wide::<2>(p, xr, rows, t0, t1, ar),
        }
        r += n;
    }
}

/// Puts accumulators in column order after the last steps (BF16 and Q4 panels keep, per half,
/// the even columns then the odd ones).
///
/// # Safety
/// As `gemv`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemv_finish(p: Panel, rows: usize, acc: &mut [[f32; PANEL]]) {
    if matches!(p, Panel::Bf16(_) | Panel::Q4 { .. }) {
        for a in acc.iter_mut().take(rows) {
            let v: [__m256; 4] = four!(|j| _mm256_loadu_ps(a.as_ptr().add(8 * j)));
            store_interleaved(v[0], v[1], a.as_mut_ptr());
            store_interleaved(v[2], v[3], a.as_mut_ptr().add(16));
        }
    }
}

/// The running sums of `acc` (zero at the first step).
#[inline(always)]
unsafe fn carried<const R: usize>(t0: usize, acc: &[[f32; PANEL]]) -> [[__m256; 4]; R] {
    let mut tot = [[_mm256_setzero_ps(); 4]; R];
    if t0 != 0 {
        for r in 0..R {
            tot[r] = four!(|j| _mm256_loadu_ps(acc[r].as_ptr().add(8 * j)));
        }
    }
    tot
}

#[inline(always)]
unsafe fn keep<const R: usize>(tot: &[[__m256; 4]; R], acc: &mut [[f32; PANEL]]) {
    for r in 0..R {
        for j in 0..4 {
            _mm256_storeu_ps(acc[r].as_mut_ptr().add(8 * j), tot[r][j]);
        }
    }
}

/// Four vectors (8 columns each) of step t as f32; Q8_0 without its scale.
#[inline(always)]
unsafe fn load256(p: Panel, t: usize) -> [__m256; 4] {
    let i = t * PANEL;
    match p {
        Panel::F32(w) => four!(|j| _mm256_loadu_ps(w.as_ptr().add(i + 8 * j))),
        Panel::Bf16(w) => four!(|j| {
            let v = _mm_loadu_si128(w.as_ptr().add(i + 8 * j) as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16))
        }),
        Panel::F16(w) => {
            four!(|j| _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i + 8 * j) as *const __m128i)))
        }
        Panel::Q8_0 { q, .. } => four!(|j| {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                q.as_ptr().add(i + 8 * j) as *const __m128i
            )))
        }),
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

#[inline(always)]
unsafe fn prefetch_steps(p: Panel, t0: usize, t1: usize) {
    let (s0, s1) = (stream_ptr(p, t0), stream_ptr(p, t1));
    let mut line = s0;
    while line < s1 {
        prefetch(line);
        line = line.add(64);
    }
}

/// F32, F16, Q8_0: per step 4 vectors widened once, one FMA per vector and row.
#[inline(always)]
unsafe fn gemv_wide<const R: usize>(p: Panel, x: &[f32], xs: usize, t0: usize, t1: usize, acc: &mut [[f32; PANEL]]) {
    let scaled = matches!(p, Panel::Q8_0 { .. });
    let mut tot = carried::<R>(t0, acc);
    let mut tb = t0;
    while tb < t1 {
        let te = if scaled { (tb + QBLOCK).min(t1) } else { t1 };
        // Unscaled formats continue the one chain; Q8_0 sums a block, then scales it.
        let mut a = if scaled { [[_mm256_setzero_ps(); 4]; R] } else { tot };
        for t in tb..te {
            prefetch_steps(p, t, t + 1);
            let w = load256(p, t);
            for r in 0..R {
                let xv = _mm256_set1_ps(*x.get_unchecked(t * xs + r));
                for j in 0..4 {
                    a[r][j] = _mm256_fmadd_ps(xv, w[j], a[r][j]);
                }
            }
        }
        match p {
            Panel::Q8_0 { d, .. } => {
                for r in 0..R {
                    for j in 0..4 {
                        let ds = d.as_ptr().add((tb / QBLOCK) * PANEL + 8 * j);
                        tot[r][j] = _mm256_fmadd_ps(a[r][j], h8(ds), tot[r][j]);
                    }
                }
            }
            _ => tot = a,
        }
        tb = te;
    }
    keep(&tot, acc);
}

/// BF16 without shuffles: a 32-byte load holds 16 columns; shifting each 32-bit lane left gives
/// the even columns as f32, masking its low half gives the odd ones (`gemv_finish` puts them
/// back in order).
#[inline(always)]
unsafe fn gemv_bf16<const R: usize>(
    w: &[half::bf16],
    x: &[f32],
    xs: usize,
    t0: usize,
    t1: usize,
    acc: &mut [[f32; PANEL]],
) {
    let hi = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let wp = w.as_ptr();
    let mut a = carried::<R>(t0, acc);
    for t in t0..t1 {
        prefetch(wp.add(t * PANEL));
        let v0 = _mm256_loadu_si256(wp.add(t * PANEL) as *const __m256i);
        let v1 = _mm256_loadu_si256(wp.add(t * PANEL + 16) as *const __m256i);
        let v = [
            _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(v0, hi)),
            _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(v1, hi)),
        ];
        for r in 0..R {
            let xv = _mm256_set1_ps(*x.get_unchecked(t * xs + r));
            for j in 0..4 {
                a[r][j] = _mm256_fmadd_ps(xv, v[j], a[r][j]);
            }
        }
    }
    keep(&a, acc);
}

/// Q4 steps panel: 16 bytes per step widen to two vectors of 8 bytes each; low nibbles are even
/// columns, high nibbles odd ones (scales are stored in that order: even columns first).
#[inline(always)]
unsafe fn gemv_q4<const R: usize>(p: Panel, x: &[f32], xs: usize, t0: usize, t1: usize, acc: &mut [[f32; PANEL]]) {
    let Panel::Q4 { q, d, m } = p else { return };
    let (qp, dp, mp) = (q.as_ptr(), d.as_ptr(), m.as_ptr());
    let low = _mm256_set1_epi32(0xF);
    let mut tot = carried::<R>(t0, acc);
    let mut tb = t0;
    while tb < t1 {
        let te = (tb + QBLOCK).min(t1);
        // Accumulators: even 0..16, odd 0..16, even 16..32, odd 16..32.
        let mut a = [[_mm256_setzero_ps(); 4]; R];
        let mut xsum = [_mm256_setzero_ps(); R];
        for t in tb..te {
            if t % 4 == 0 {
                prefetch(qp.add(t * 16));
            }
            let v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qp.add(t * 16) as *const __m128i));
            let v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qp.add(t * 16 + 8) as *const __m128i));
            let w = [
                _mm256_cvtepi32_ps(_mm256_and_si256(v0, low)),
                _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)),
                _mm256_cvtepi32_ps(_mm256_and_si256(v1, low)),
                _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)),
            ];
            for r in 0..R {
                let xv = _mm256_set1_ps(*x.get_unchecked(t * xs + r));
                for j in 0..4 {
                    a[r][j] = _mm256_fmadd_ps(xv, w[j], a[r][j]);
                }
                xsum[r] = _mm256_add_ps(xsum[r], xv);
            }
        }
        // Scale index of each accumulator's first column (even columns first).
        let s = (tb / QBLOCK) * PANEL;
        let at = [0, 16, 8, 24];
        for j in 0..4 {
            let dj = _mm256_cvtph_ps(_mm_loadu_si128(dp.add(s + at[j]) as *const __m128i));
            let mj = _mm256_cvtph_ps(_mm_loadu_si128(mp.add(s + at[j]) as *const __m128i));
            for r in 0..R {
                tot[r][j] = _mm256_fmadd_ps(a[r][j], dj, _mm256_fmadd_ps(xsum[r], mj, tot[r][j]));
            }
        }
        tb = te;
    }
    keep(&tot, acc);
}

/// # Safety
/// As `gemv`, with `dst` holding `k * 32` values (any layout).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn widen(p: Panel, k: usize, dst: &mut [f32]) {
    let o = dst.as_mut_ptr();
    match p {
        Panel::F32(w) => dst[..k * PANEL].copy_from_slice(w),
        Panel::Q4 { q, d, m } => {
            let low = _mm256_set1_epi32(0xF);
            let at = [0, 16, 8, 24];
            for t in 0..k {
                let s = (t / QBLOCK) * PANEL;
                let v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q.as_ptr().add(t * 16) as *const __m128i));
                let v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q.as_ptr().add(t * 16 + 8) as *const __m128i));
                let n = [
                    _mm256_and_si256(v0, low),
                    _mm256_srli_epi32(v0, 4),
                    _mm256_and_si256(v1, low),
                    _mm256_srli_epi32(v1, 4),
                ];
                let v: [__m256; 4] = four!(|j| {
                    let dj = _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr().add(s + at[j]) as *const __m128i));
                    let mj = _mm256_cvtph_ps(_mm_loadu_si128(m.as_ptr().add(s + at[j]) as *const __m128i));
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(n[j]), dj, mj)
                });
                store_interleaved(v[0], v[1], o.add(t * PANEL));
                store_interleaved(v[2], v[3], o.add(t * PANEL + 16));
            }
        }
        Panel::Q8x4 { q, d } => {
            for t0 in (0..k).step_by(4) {
                let s = (t0 / QBLOCK) * PANEL;
                let base = q.as_ptr().add(t0 * PANEL) as *const __m256i;
                let v: [__m256i; 4] = four!(|i| _mm256_loadu_si256(base.add(i)));
                for j in 0..4.min(k - t0) {
                    let sh = _mm_cvtsi32_si128(24 - 8 * j as i32);
                    for i in 0..4 {
                        let e = _mm256_sra_epi32(_mm256_sll_epi32(v[i], sh), _mm_cvtsi32_si128(24));
                        let di = h8(d.as_ptr().add(s + 8 * i));
                        _mm256_storeu_ps(
                            o.add((t0 + j) * PANEL + 8 * i),
                            _mm256_mul_ps(_mm256_cvtepi32_ps(e), di),
                        );
                    }
                }
            }
        }
        Panel::Q4x8 { q, d, m } => {
            let nib = _mm256_set1_epi32(0xF);
            for t0 in (0..k).step_by(8) {
                let s = (t0 / QBLOCK) * PANEL;
                let base = q.as_ptr().add(t0 * PANEL / 2) as *const __m256i;
                let v: [__m256i; 4] = four!(|i| _mm256_loadu_si256(base.add(i)));
                let dm: [(__m256, __m256); 4] = four!(|i| {
                    (
                        _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr().add(s + 8 * i) as *const __m128i)),
                        _mm256_cvtph_ps(_mm_loadu_si128(m.as_ptr().add(s + 8 * i) as *const __m128i)),
                    )
                });
                for j in 0..8.min(k - t0) {
                    let sh = _mm_cvtsi32_si128(8 * (j as i32 % 4) + 4 * (j as i32 / 4));
                    for i in 0..4 {
                        let e = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(v[i], sh), nib));
                        _mm256_storeu_ps(o.add((t0 + j) * PANEL + 8 * i), _mm256_fmadd_ps(e, dm[i].0, dm[i].1));
                    }
                }
            }
        }
        _ => {
            for t in 0..k {
                let w = load256(p, t);
                for (j, mut v) in w.into_iter().enumerate() {
                    if let Panel::Q8_0 { d, .. } = p {
                        v = _mm256_mul_ps(v, h8(d.as_ptr().add((t / QBLOCK) * PANEL + 8 * j)));
                    }
                    _mm256_storeu_ps(o.add(t * PANEL + 8 * j), v);
                }
            }
        }
    }
}

/// # Safety
/// AVX2, FMA, F16C and AVX-VNNI; `p` a quad panel checked for `a.kp`, `a` checked, `out` has
/// `a.rows <= INT_ROWS` rows.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub unsafe fn gemv_int_vnni(p: Panel, a: &QRows, b0: usize, b1: usize, out: &mut [[f32; PANEL]]) {
    int_rows::<true>(p, a, b0, b1, out)
}

/// # Safety
/// As `gemv_int_vnni`, without AVX-VNNI.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemv_int(p: Panel, a: &QRows, b0: usize, b1: usize, out: &mut [[f32; PANEL]]) {
    int_rows::<false>(p, a, b0, b1, out)
}

/// Rows in groups of at most 4 (8 accumulators for a half panel; 2 rows for `q8x4_madd`).
#[inline(always)]
unsafe fn int_rows<const VNNI: bool>(p: Panel, a: &QRows, b0: usize, b1: usize, out: &mut [[f32; PANEL]]) {
    let madd = !VNNI && matches!(p, Panel::Q8x4 { .. });
    let mut r0 = 0;
    while r0 < a.rows {
        let n = (a.rows - r0).min(if madd { 2 } else { 4 });
        if madd {
            let (sub, o) = (a.sub(r0, n), &mut out[r0..]);
            if n == 1 {
                q8x4_madd::<1>(p, &sub, b0, b1, o);
            } else {
                q8x4_madd::<2>(p, &sub, b0, b1, o);
            }
            r0 += n;
            continue;
        }
        let sub = a.sub(r0, n);
        let o = &mut out[r0..];
        macro_rules! go {
            ($f:ident) => {
                match n {
                    1 => $f::<1, VNNI>(p, &sub, b0, b1, o),
                    2 => $f::<2, VNNI>(p, &sub, b0, b1, o),
                    3 => $f::<3, VNNI>(p, &sub, b0, b1, o),
                    _ => $f::<4, VNNI>(p, &sub, b0, b1, o),
                }
            };
        }
        match (p, n) {
            (Panel::Q8x4 { .. }, 1) => q8x4_vnni::<1>(p, &sub, b0, b1, o),
            (Panel::Q8x4 { .. }, 2) => q8x4_vnni::<2>(p, &sub, b0, b1, o),
            (Panel::Q8x4 { .. }, 3) => q8x4_vnni::<3>(p, &sub, b0, b1, o),
            (Panel::Q8x4 { .. }, _) => q8x4_vnni::<4>(p, &sub, b0, b1, o),
            _ => go!(q4x8),
        }
        r0 += n;
    }
}

/// Four activation bytes of row `r` at step `t` of `x` (value or residual bytes), in every
/// 32-bit lane.
#[inline(always)]
unsafe fn x4(x: &[i8], kp: usize, r: usize, t: usize) -> __m256i {
    _mm256_set1_epi32((x.as_ptr().add(r * kp + t) as *const i32).read_unaligned())
}

/// `acc + Σ u·s` over each lane's four bytes (unsigned `u`, signed `s`): with AVX-VNNI one
/// `vpdpbusd`, otherwise `vpmaddubsw` (pair sums, exact while |u·s| pairs stay below 2^15) and
/// `vpmaddwd` by ones.
#[inline(always)]
unsafe fn dot<const VNNI: bool>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    if VNNI {
        _mm256_dpbusd_avx_epi32(acc, u, s)
    } else {
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
    }
}

/// Q8x4 with AVX-VNNI, 16 columns (two vectors) at a time: the weights' top bit is flipped
/// (w + 128, unsigned) and `128 · Σx` taken off per block. Each block is summed over the value
/// bytes, shifted 8 bits, then summed over the residual bytes (from L1).
#[inline(always)]
unsafe fn q8x4_vnni<const R: usize>(p: Panel, a: &QRows, b0: usize, b1: usize, out: &mut [[f32; PANEL]]) {
    let Panel::Q8x4 { q, d } = p else { return };
    let nb = a.kp / QBLOCK;
    let qp = q.as_ptr();
    let flip = _mm256_set1_epi8(-128);
    if b0 == 0 {
        for r in 0..R {
            out[r] = [0.0; PANEL];
        }
    }
    for b in b0..b1 {
        for h in 0..2 {
            let mut acc = [[_mm256_setzero_si256(); 2]; R];
            for (pass, x) in [a.q, a.lo].into_iter().enumerate() {
                if pass == 1 {
                    for r in 0..R {
                        acc[r] = [_mm256_slli_epi32(acc[r][0], 8), _mm256_slli_epi32(acc[r][1], 8)];
                    }
                    // No residual bytes (8-bit activations): their pass would add zeros.
                    if !a.residual {
                        break;
                    }
                }
                for g in 0..QBLOCK / 4 {
                    let t = b * QBLOCK + g * 4;
                    let base = qp.add(t * PANEL + 64 * h);
                    if h == 0 && pass == 0 {
                        prefetch(base);
                        prefetch(base.add(64));
                    }
                    let w0 = _mm256_xor_si256(_mm256_loadu_si256(base as *const __m256i), flip);
                    let w1 = _mm256_xor_si256(_mm256_loadu_si256(base.add(32) as *const __m256i), flip);
                    for r in 0..R {
                        let xb = x4(x, a.kp, r, t);
                        acc[r][0] = dot::<true>(acc[r][0], w0, xb);
                        acc[r][1] = dot::<true>(acc[r][1], w1, xb);
                    }
                }
            }
            let ds = d.as_ptr().add(b * PANEL + 16 * h);
            let (d0, d1) = (h8(ds), h8(ds.add(8)));
            for r in 0..R {
                let dx = _mm256_set1_ps(*a.d.get_unchecked(r * nb + b));
                let corr = _mm256_set1_epi32(128 * *a.s.get_unchecked(r * nb + b));
                let (i0, i1) = (_mm256_sub_epi32(acc[r][0], corr), _mm256_sub_epi32(acc[r][1], corr));
                let o = out[r].as_mut_ptr().add(16 * h);
                let f0 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(i0), dx), d0, _mm256_loadu_ps(o));
                let f1 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(i1), dx), d1, _mm256_loadu_ps(o.add(8)));
                _mm256_storeu_ps(o, f0);
                _mm256_storeu_ps(o.add(8), f1);
            }
        }
    }
}

/// Q8x4 without VNNI: the weights widen to 16 bits (one `vpmovsxbw` per 16, shared by the rows)
/// and `vpmaddwd` multiplies them with the 16-bit activations `256 · q + lo` directly: one pass,
/// two instructions per 16 weights and row, where the byte kernels would need two passes of four.
/// Each 32-bit lane sums two steps of a column; neighbouring lanes are added per block.
#[inline(always)]
unsafe fn q8x4_madd<const R: usize>(p: Panel, a: &QRows, b0: usize, b1: usize, out: &mut [[f32; PANEL]]) {
    let Panel::Q8x4 { q, d } = p else { return };
    let nb = a.kp / QBLOCK;
    let qp = q.as_ptr();
    if b0 == 0 {
        for r in 0..R {
            out[r] = [0.0; PANEL];
        }
    }
    for b in b0..b1 {
        for h in 0..2 {
            // Per row, 4 vectors of (4 columns x 2 half-sums).
            let mut acc = [[_mm256_setzero_si256(); 4]; R];
            for g in 0..QBLOCK / 4 {
                let t = b * QBLOCK + g * 4;
                let base = qp.add(t * PANEL + 64 * h);
                if h == 0 {
                    prefetch(base);
                    prefetch(base.add(64));
                }
                let w: [__m256i; 4] =
                    four!(|i| _mm256_cvtepi8_epi16(_mm_loadu_si128(base.add(16 * i) as *const __m128i)));
                for r in 0..R {
                    let xv = _mm256_set1_epi64x((a.x16.as_ptr().add(r * a.kp + t) as *const i64).read_unaligned());
                    for i in 0..4 {
                        acc[r][i] = _mm256_add_epi32(acc[r][i], _mm256_madd_epi16(w[i], xv));
                    }
                }
            }
            let ds = d.as_ptr().add(b * PANEL + 16 * h);
            let (d0, d1) = (h8(ds), h8(ds.add(8)));
            for r in 0..R {
                // hadd gives columns 0 1 4 5 | 2 3 6 7; the permute puts them in order.
                let s0 = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[r][0], acc[r][1]), 0xD8);
                let s1 = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[r][2], acc[r][3]), 0xD8);
                let dx = _mm256_set1_ps(*a.d.get_unchecked(r * nb + b));
                let o = out[r].as_mut_ptr().add(16 * h);
                let f0 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s0), dx), d0, _mm256_loadu_ps(o));
                let f1 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s1), dx), d1, _mm256_loadu_ps(o.add(8)));
                _mm256_storeu_ps(o, f0);
                _mm256_storeu_ps(o.add(8), f1);
            }
        }
    }
}

/// Q4x8, 16 columns at a time: nibbles are unsigned already; value bytes then residual bytes, as
/// in `q8x4`.
#[inline(always)]
unsafe fn q4x8<const R: usize, const VNNI: bool>(p: Panel, a: &QRows, b0: usize, b1: usize, out: &mut [[f32; PANEL]]) {
    let Panel::Q4x8 { q, d, m } = p else { return };
    let nb = a.kp / QBLOCK;
    let qp = q.as_ptr();
    let nib = _mm256_set1_epi8(0xF);
    if b0 == 0 {
        for r in 0..R {
            out[r] = [0.0; PANEL];
        }
    }
    for b in b0..b1 {
        for h in 0..2 {
            let mut acc = [[_mm256_setzero_si256(); 2]; R];
            for (pass, x) in [a.q, a.lo].into_iter().enumerate() {
                if pass == 1 {
                    for r in 0..R {
                        acc[r] = [_mm256_slli_epi32(acc[r][0], 8), _mm256_slli_epi32(acc[r][1], 8)];
                    }
                    // No residual bytes (8-bit activations): their pass would add zeros.
                    if !a.residual {
                        break;
                    }
                }
                for o in 0..QBLOCK / 8 {
                    let t = b * QBLOCK + o * 8;
                    let base = qp.add(t * PANEL / 2 + 64 * h);
                    if h == 0 && pass == 0 {
                        prefetch(base);
                        prefetch(base.add(64));
                    }
                    let v0 = _mm256_loadu_si256(base as *const __m256i);
                    let v1 = _mm256_loadu_si256(base.add(32) as *const __m256i);
                    let n = [
                        _mm256_and_si256(v0, nib),
                        _mm256_and_si256(_mm256_srli_epi16(v0, 4), nib),
                        _mm256_and_si256(v1, nib),
                        _mm256_and_si256(_mm256_srli_epi16(v1, 4), nib),
                    ];
                    for r in 0..R {
                        let (xa, xb) = (x4(x, a.kp, r, t), x4(x, a.kp, r, t + 4));
                        acc[r][0] = dot::<VNNI>(dot::<VNNI>(acc[r][0], n[0], xa), n[1], xb);
                        acc[r][1] = dot::<VNNI>(dot::<VNNI>(acc[r][1], n[2], xa), n[3], xb);
                    }
                }
            }
            let s = b * PANEL + 16 * h;
            let (d0, d1) = (
                _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr().add(s) as *const __m128i)),
                _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr().add(s + 8) as *const __m128i)),
            );
            let (m0, m1) = (
                _mm256_cvtph_ps(_mm_loadu_si128(m.as_ptr().add(s) as *const __m128i)),
                _mm256_cvtph_ps(_mm_loadu_si128(m.as_ptr().add(s + 8) as *const __m128i)),
            );
            for r in 0..R {
                let dxs = *a.d.get_unchecked(r * nb + b);
                let dx = _mm256_set1_ps(dxs);
                let xs = _mm256_set1_ps(dxs * *a.s.get_unchecked(r * nb + b) as f32);
                let o = out[r].as_mut_ptr().add(16 * h);
                let f0 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][0]), dx), d0, _mm256_loadu_ps(o));
                let f1 = _mm256_fmadd_ps(
                    _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][1]), dx),
                    d1,
                    _mm256_loadu_ps(o.add(8)),
                );
                _mm256_storeu_ps(o, _mm256_fmadd_ps(xs, m0, f0));
                _mm256_storeu_ps(o.add(8), _mm256_fmadd_ps(xs, m1, f1));
            }
        }
    }
}

/// # Safety
/// AVX2, FMA and F16C; `dst` holds whole blocks for `x.len()` values (checked by the caller).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_row(x: &[f32], dst: QRowMut) {
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let k = x.len();
    let (lim_lo, lim_hi, f256) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0), _mm256_set1_ps(256.0));
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    // Dwords of two `packs` rounds back in input order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut tail = [0f32; QBLOCK];
    for b in 0..k.div_ceil(QBLOCK) {
        let t0 = b * QBLOCK;
        let src = if k - t0 >= QBLOCK {
            x.as_ptr().add(t0)
        } else {
            // Only the last block is short: the rest of `tail` stays zero.
            tail[..k - t0].copy_from_slice(&x[t0..]);
            tail.as_ptr()
        };
        let v = four!(|j| _mm256_loadu_ps(src.add(8 * j)));
        let m = _mm256_max_ps(
            _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)),
            _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
        let (d, inv) = act_scale(_mm_cvtss_f32(m));
        let inv = _mm256_set1_ps(inv);
        let mut hi = [_mm256_setzero_si256(); 4];
        let mut rest = [_mm256_setzero_si256(); 4];
        for j in 0..4 {
            let y = _mm256_mul_ps(v[j], inv);
            let h = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps::<NEAREST>(y), lim_lo), lim_hi);
            let r = _mm256_round_ps::<NEAREST>(_mm256_mul_ps(_mm256_sub_ps(y, h), f256));
            let r = _mm256_min_ps(_mm256_max_ps(r, lim_lo), lim_hi);
            hi[j] = _mm256_cvttps_epi32(h);
            if dst.residual {
                rest[j] = _mm256_cvttps_epi32(r);
            }
        }
        let wide = four!(|j| _mm256_add_epi32(_mm256_slli_epi32(hi[j], 8), rest[j]));
        macro_rules! bytes {
            ($v:expr) => {
                _mm256_permutevar8x32_epi32(
                    _mm256_packs_epi16(_mm256_packs_epi32($v[0], $v[1]), _mm256_packs_epi32($v[2], $v[3])),
                    order,
                )
            };
        }
        _mm256_storeu_si256(dst.q.as_mut_ptr().add(t0) as *mut __m256i, bytes!(hi));
        _mm256_storeu_si256(dst.lo.as_mut_ptr().add(t0) as *mut __m256i, bytes!(rest));
        let x16 = dst.x16.as_mut_ptr().add(t0) as *mut __m256i;
        _mm256_storeu_si256(
            x16,
            _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi32(wide[0], wide[1])),
        );
        _mm256_storeu_si256(
            x16.add(1),
            _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi32(wide[2], wide[3])),
        );
        let s = _mm256_add_epi32(_mm256_add_epi32(wide[0], wide[1]), _mm256_add_epi32(wide[2], wide[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        dst.d[b] = d / 256.0;
        dst.s[b] = _mm_cvtsi128_si32(s);
    }
}
