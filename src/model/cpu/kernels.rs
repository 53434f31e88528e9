//! SIMD building blocks for the CPU matrix products, chosen at run time.
//!
//! The binary is built for baseline x86-64 (or any other target), and the instruction set is picked
//! once per process from what the CPU reports: AVX-512F, AVX2 with FMA and F16C, or portable Rust.
//! Weights stay in their stored half-precision format and are widened to f32 in registers, so a
//! BF16 model is read at 2 bytes per weight and no f32 copy of it ever exists.

use std::sync::OnceLock;

use half::{bf16, f16};

/// The instruction set the kernels use on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// Detected once; `ZAGREUS_ISA=portable|avx2|avx512` forces a lower level (for tests and
    /// benchmarks of the fallbacks). A forced level the CPU lacks is ignored.
    pub fn get() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Self::best_supported();
            match std::env::var("ZAGREUS_ISA").ok().as_deref() {
                Some("portable") => Isa::Portable,
                Some("avx2") if best != Isa::Portable => Isa::Avx2,
                _ => best,
            }
        })
    }

    #[cfg(target_arch = "x86_64")]
    fn best_supported() -> Isa {
        if is_x86_feature_detected!("avx512f") {
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

/// A weight element type the kernels can read directly.
pub trait WeightElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// Dot product of an f32 activation row with a weight row of the same length.
    fn dot(isa: Isa, x: &[f32], w: &[Self]) -> f32;
    /// Widens a weight row into `dst` (same length).
    fn widen(isa: Isa, w: &[Self], dst: &mut [f32]);
}

fn dot_portable<W: WeightElem>(x: &[f32], w: &[W]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.len() / 8;
    for c in 0..chunks {
        for j in 0..8 {
            acc[j] += x[c * 8 + j] * w[c * 8 + j].to_f32();
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * 8..x.len() {
        sum += x[i] * w[i].to_f32();
    }
    sum
}

impl WeightElem for f32 {
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    fn dot(isa: Isa, x: &[f32], w: &[f32]) -> f32 {
        debug_assert_eq!(x.len(), w.len());
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::get` only returns Avx512/Avx2 when the CPU reports those features.
            Isa::Avx512 => unsafe { x86::dot_f32_avx512(x, w) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::dot_f32_avx2(x, w) },
            _ => dot_portable(x, w),
        }
    }
    fn widen(_: Isa, w: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(w);
    }
}

impl WeightElem for bf16 {
    #[inline]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    fn dot(isa: Isa, x: &[f32], w: &[bf16]) -> f32 {
        debug_assert_eq!(x.len(), w.len());
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: see `f32::dot`.
            Isa::Avx512 => unsafe { x86::dot_bf16_avx512(x, w) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::dot_bf16_avx2(x, w) },
            _ => dot_portable(x, w),
        }
    }
    fn widen(_: Isa, w: &[bf16], dst: &mut [f32]) {
        // Plain shifts: the compiler vectorises this at any target level.
        for (d, s) in dst.iter_mut().zip(w) {
            *d = s.to_f32();
        }
    }
}

impl WeightElem for f16 {
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn dot(isa: Isa, x: &[f32], w: &[f16]) -> f32 {
        debug_assert_eq!(x.len(), w.len());
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: see `f32::dot`.
            Isa::Avx512 => unsafe { x86::dot_f16_avx512(x, w) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::dot_f16_avx2(x, w) },
            _ => dot_portable(x, w),
        }
    }
    fn widen(_: Isa, w: &[f16], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        w.convert_to_f32_slice(dst);
    }
}

/// 4x4 block of dot products between four activation rows and four (already widened) weight rows,
/// all of length `k`: the register-blocked core of the prefill product.
pub fn dot_4x4(isa: Isa, x: [&[f32]; 4], w: [&[f32]; 4]) -> [[f32; 4]; 4] {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `f32::dot`.
        Isa::Avx512 => unsafe { x86::dot_4x4_avx512(x, w) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::dot_4x4_avx2(x, w) },
        _ => {
            let mut out = [[0f32; 4]; 4];
            for i in 0..4 {
                for j in 0..4 {
                    out[i][j] = dot_portable(x[i], w[j]);
                }
            }
            out
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    use super::dot_portable;

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn hsum512(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum256(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_bf16_512(p: *const bf16) -> __m512 {
        let raw = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_bf16_256(p: *const bf16) -> __m256 {
        let raw = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
    }

    macro_rules! dot512 {
        ($name:ident, $t:ty, $load:expr) => {
            #[target_feature(enable = "avx512f")]
            pub unsafe fn $name(x: &[f32], w: &[$t]) -> f32 {
                let n = x.len().min(w.len());
                let (xp, wp) = (x.as_ptr(), w.as_ptr());
                let mut a0 = _mm512_setzero_ps();
                let mut a1 = _mm512_setzero_ps();
                let mut i = 0;
                while i + 32 <= n {
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(i)), $load(wp.add(i)), a0);
                    a1 =
                        _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(i + 16)), $load(wp.add(i + 16)), a1);
                    i += 32;
                }
                if i + 16 <= n {
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(i)), $load(wp.add(i)), a0);
                    i += 16;
                }
                hsum512(_mm512_add_ps(a0, a1)) + dot_portable(&x[i..n], &w[i..n])
            }
        };
    }

    macro_rules! dot256 {
        ($name:ident, $t:ty, $load:expr) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(x: &[f32], w: &[$t]) -> f32 {
                let n = x.len().min(w.len());
                let (xp, wp) = (x.as_ptr(), w.as_ptr());
                let mut a0 = _mm256_setzero_ps();
                let mut a1 = _mm256_setzero_ps();
                let mut i = 0;
                while i + 16 <= n {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), $load(wp.add(i)), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i + 8)), $load(wp.add(i + 8)), a1);
                    i += 16;
                }
                if i + 8 <= n {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), $load(wp.add(i)), a0);
                    i += 8;
                }
                hsum256(_mm256_add_ps(a0, a1)) + dot_portable(&x[i..n], &w[i..n])
            }
        };
    }

    dot512!(dot_f32_avx512, f32, |p: *const f32| _mm512_loadu_ps(p));
    dot512!(dot_bf16_avx512, bf16, |p: *const bf16| load_bf16_512(p));
    dot512!(dot_f16_avx512, f16, |p: *const f16| _mm512_cvtph_ps(
        _mm256_loadu_si256(p as *const __m256i)
    ));
    dot256!(dot_f32_avx2, f32, |p: *const f32| _mm256_loadu_ps(p));
    dot256!(dot_bf16_avx2, bf16, |p: *const bf16| load_bf16_256(p));
    dot256!(dot_f16_avx2, f16, |p: *const f16| _mm256_cvtph_ps(
        _mm_loadu_si128(p as *const __m128i)
    ));

    macro_rules! tile4x4 {
        ($name:ident, $feat:literal, $vec:ty, $lanes:expr, $zero:ident, $load:ident, $fma:ident, $hsum:ident) => {
            #[target_feature(enable = $feat)]
            pub unsafe fn $name(x: [&[f32]; 4], w: [&[f32]; 4]) -> [[f32; 4]; 4] {
                let k = x.iter().chain(w.iter()).map(|r| r.len()).min().unwrap_or(0);
                let mut acc: [[$vec; 4]; 4] = [[$zero(); 4]; 4];
                let mut i = 0;
                while i + $lanes <= k {
                    let wv = [
                        $load(w[0].as_ptr().add(i)),
                        $load(w[1].as_ptr().add(i)),
                        $load(w[2].as_ptr().add(i)),
                        $load(w[3].as_ptr().add(i)),
                    ];
                    for r in 0..4 {
                        let xv = $load(x[r].as_ptr().add(i));
                        for c in 0..4 {
                            acc[r][c] = $fma(xv, wv[c], acc[r][c]);
                        }
                    }
                    i += $lanes;
                }
                let mut out = [[0f32; 4]; 4];
                for r in 0..4 {
                    for c in 0..4 {
                        out[r][c] = $hsum(acc[r][c]) + dot_portable(&x[r][i..k], &w[c][i..k]);
                    }
                }
                out
            }
        };
    }

    tile4x4!(
        dot_4x4_avx512,
        "avx512f",
        __m512,
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        hsum512
    );
    tile4x4!(
        dot_4x4_avx2,
        "avx2,fma",
        __m256,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        hsum256
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn reference(x: &[f32], w: &[f32]) -> f32 {
        x.iter()
            .zip(w)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum::<f64>() as f32
    }

    fn isas() -> Vec<Isa> {
        let best = Isa::best_supported();
        let mut v = vec![Isa::Portable];
        if best != Isa::Portable {
            v.push(Isa::Avx2);
        }
        if best == Isa::Avx512 {
            v.push(Isa::Avx512);
        }
        v
    }

    #[test]
    fn dots_match_reference_on_odd_lengths() {
        for isa in isas() {
            for n in [0, 1, 7, 8, 15, 16, 17, 31, 33, 64, 95, 960, 1001] {
                let x = rand_vec(n, 1);
                let wf = rand_vec(n, 2);
                let wb: Vec<bf16> = wf.iter().map(|v| bf16::from_f32(*v)).collect();
                let wh: Vec<f16> = wf.iter().map(|v| f16::from_f32(*v)).collect();
                let wb32: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
                let wh32: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
                let tol = 1e-4 * (n as f32).sqrt().max(1.0);
                assert!(
                    (f32::dot(isa, &x, &wf) - reference(&x, &wf)).abs() < tol,
                    "{isa:?} f32 n={n}"
                );
                assert!(
                    (bf16::dot(isa, &x, &wb) - reference(&x, &wb32)).abs() < tol,
                    "{isa:?} bf16 n={n}"
                );
                assert!(
                    (f16::dot(isa, &x, &wh) - reference(&x, &wh32)).abs() < tol,
                    "{isa:?} f16 n={n}"
                );
            }
        }
    }

    #[test]
    fn tile_matches_reference() {
        for isa in isas() {
            for k in [1, 9, 16, 40, 257] {
                let xs: Vec<Vec<f32>> = (0..4).map(|i| rand_vec(k, 10 + i)).collect();
                let ws: Vec<Vec<f32>> = (0..4).map(|i| rand_vec(k, 20 + i)).collect();
                let out = dot_4x4(
                    isa,
                    [&xs[0], &xs[1], &xs[2], &xs[3]],
                    [&ws[0], &ws[1], &ws[2], &ws[3]],
                );
                for r in 0..4 {
                    for c in 0..4 {
                        assert!(
                            (out[r][c] - reference(&xs[r], &ws[c])).abs()
                                < 1e-4 * (k as f32).sqrt(),
                            "{isa:?} k={k}"
                        );
                    }
                }
            }
        }
    }
}
