//! Element-wise pieces of the CPU forward pass: RMSNorm, rotary embeddings, SiLU gating,
//! residual adds, and a vectorisable `exp`. Each is written once as plain loops and compiled
//! three times (AVX-512, AVX2/FMA, baseline) so the loops vectorise for the CPU at hand.

// Register-blocked kernels index several arrays with the same counters; explicit loops read
// closer to the math than iterator chains.
#![allow(clippy::needless_range_loop)]

use super::kernels::Isa;

/// `exp(x)` for f32 by range reduction to `2^n · e^r`, |r| ≤ ln2/2, and a degree-6 polynomial:
/// relative error below 2e-7, and plain arithmetic so loops of it vectorise.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest via the 1.5·2^23 trick (vectorises, unlike f32::round).
    const MAGIC: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

macro_rules! multiversion {
    // With one type parameter.
    ($(#[$m:meta])* pub fn $name:ident<$g:ident: $bound:path>($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$m])*
        pub fn $name<$g: $bound>(isa: Isa, $($arg: $ty),*) {
            #[inline(always)]
            fn imp<$g: $bound>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            unsafe fn avx512<$g: $bound>($($arg: $ty),*) { imp::<$g>($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<$g: $bound>($($arg: $ty),*) { imp::<$g>($($arg),*) }
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Isa` levels are only produced for CPUs that report the features.
                Isa::Avx512 => unsafe { avx512::<$g>($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { avx2::<$g>($($arg),*) },
                _ => imp::<$g>($($arg),*),
            }
        }
    };
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$m])*
        pub fn $name(isa: Isa, $($arg: $ty),*) {
            #[inline(always)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            unsafe fn avx512($($arg: $ty),*) { imp($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) { imp($($arg),*) }
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Isa` levels are only produced for CPUs that report the features.
                Isa::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { avx2($($arg),*) },
                _ => imp($($arg),*),
            }
        }
    };
}
pub(crate) use multiversion;

multiversion! {
    /// `out = x / sqrt(mean(x²) + eps) · weight`, row by row (transformers' LlamaRMSNorm in f32).
    pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        let h = weight.len();
        for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
            let mut acc = [0f32; 16];
            let mut chunks = xr.chunks_exact(16);
            for c in &mut chunks {
                for j in 0..16 {
                    acc[j] += c[j] * c[j];
                }
            }
            let mut ss: f32 = acc.iter().sum();
            for v in chunks.remainder() {
                ss += v * v;
            }
            let inv = 1.0 / (ss / h as f32 + eps).sqrt();
            for ((o, v), w) in or.iter_mut().zip(xr).zip(weight) {
                *o = w * (v * inv);
            }
        }
    }
}

multiversion! {
    /// `out[i] = silu(gate[i]) · up[i]` where each row of `gu` is `[gate | up]`.
    pub fn silu_mul(gu: &[f32], inter: usize, out: &mut [f32]) {
        for (row, or) in gu.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)) {
            let (g, u) = row.split_at(inter);
            for ((o, gv), uv) in or.iter_mut().zip(g).zip(u) {
                *o = gv / (1.0 + exp_approx(-gv)) * uv;
            }
        }
    }
}

multiversion! {
    /// `x += y`.
    pub fn add_in_place(x: &mut [f32], y: &[f32]) {
        for (a, b) in x.iter_mut().zip(y) {
            *a += b;
        }
    }
}

/// Rotates `heads` consecutive head vectors of `v` by the angles `cos`/`sin` (rotate-half
/// pairing: dimension i with i + head_dim/2, as transformers' Llama does).
pub fn rope_heads(v: &mut [f32], heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for h in 0..heads {
        let hv = &mut v[h * head_dim..(h + 1) * head_dim];
        let (a, b) = hv.split_at_mut(half);
        for i in 0..half {
            let (x0, x1) = (a[i], b[i]);
            a[i] = x0 * cos[i] - x1 * sin[i];
            b[i] = x1 * cos[i] + x0 * sin[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_softmax_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_approx(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_approx(-1000.0), exp_approx(-87.0));
        assert!(exp_approx(0.0) == 1.0);
    }

    #[test]
    fn norm_and_gating_match_reference_on_every_isa() {
        let x: Vec<f32> = (0..2 * 37).map(|i| ((i * 7919) % 113) as f32 / 50.0 - 1.0).collect();
        let w: Vec<f32> = (0..37).map(|i| 0.5 + i as f32 / 37.0).collect();
        for isa in Isa::supported() {
            let mut out = vec![0f32; 74];
            rms_norm(isa, &x, &w, 1e-5, &mut out);
            for r in 0..2 {
                let row = &x[r * 37..(r + 1) * 37];
                let ms: f64 = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 37.0;
                for i in 0..37 {
                    let want = w[i] as f64 * row[i] as f64 / (ms + 1e-5).sqrt();
                    assert!((out[r * 37 + i] as f64 - want).abs() < 1e-5, "{isa:?}");
                }
            }
            let mut act = vec![0f32; 37];
            silu_mul(isa, &x, 37, &mut act);
            for i in 0..37 {
                let g = x[i] as f64;
                let want = g / (1.0 + (-g).exp()) * x[37 + i] as f64;
                assert!((act[i] as f64 - want).abs() < 1e-6, "{isa:?}");
            }
        }
    }
}
