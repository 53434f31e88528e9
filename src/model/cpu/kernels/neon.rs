//! AArch64 Advanced SIMD kernels (Apple Silicon, Graviton, Ampere...): 32 registers of 4 floats,
//! so a panel's 32 columns are 8 vectors; with the dotprod extension, `sdot` does the integer
//! products (four signed byte products summed per 32-bit lane). Formats without a kernel here
//! (F16, steps-layout Q4) use the portable code.
//!
//! Every function here is `unsafe`: callers (`kernels/mod.rs`) guarantee that the CPU reports the
//! features named in its `target_feature` attribute and that the slices have been checked against
//! the lengths the loops use.

use std::arch::aarch64::*;

use super::{portable, Panel, QRows, PANEL, QBLOCK};

/// Software prefetch distance (as on x86; cheap where the hardware prefetcher already covers it).
const PREFETCH_BYTES: usize = 4096;

#[inline(always)]
unsafe fn prefetch<T>(p: *const T) {
    let p = (p as *const u8).wrapping_add(PREFETCH_BYTES);
    std::arch::asm!("prfm pldl1keep, [{0}]", in(reg) p, options(readonly, nostack, preserves_flags));
}

/// Four f16 scales as f32 (stable Rust has no NEON f16 conversion intrinsics; this runs once
/// per block of 32 steps).
#[inline(always)]
fn f16x4(d: &[half::f16]) -> float32x4_t {
    let v: [f32; 4] = std::array::from_fn(|i| d[i].to_f32());
    // SAFETY: NEON is always present on AArch64; `v` holds four floats.
    unsafe { vld1q_f32(v.as_ptr()) }
}

/// Eight vectors (4 columns each) of step t as f32; Q8_0 without its scale.
#[inline(always)]
unsafe fn load8(p: Panel, t: usize) -> [float32x4_t; 8] {
    let i = t * PANEL;
    match p {
        Panel::F32(w) => std::array::from_fn(|j| vld1q_f32(w.as_ptr().add(i + 4 * j))),
        Panel::Bf16(w) => {
            let wp = w.as_ptr().add(i) as *const u16;
            let mut v = [vdupq_n_f32(0.0); 8];
            for h in 0..4 {
                let u = vld1q_u16(wp.add(8 * h));
                v[2 * h] = vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(u)));
                v[2 * h + 1] = vreinterpretq_f32_u32(vshll_high_n_u16::<16>(u));
            }
            v
        }
        Panel::Q8_0 { q, .. } => {
            let qp = q.as_ptr().add(i);
            let mut v = [vdupq_n_f32(0.0); 8];
            for h in 0..2 {
                let b = vld1q_s8(qp.add(16 * h));
                let (lo, hi) = (vmovl_s8(vget_low_s8(b)), vmovl_high_s8(b));
                v[4 * h] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
                v[4 * h + 1] = vcvtq_f32_s32(vmovl_high_s16(lo));
                v[4 * h + 2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
                v[4 * h + 3] = vcvtq_f32_s32(vmovl_high_s16(hi));
            }
            v
        }
        _ => unreachable!("formats without NEON kernels go to the portable code"),
    }
}

/// # Safety
/// NEON (always present on AArch64); `p` a steps-layout panel checked for input length `k`, `x`
/// holds `rows * k` values (step-major), `1 <= rows <= GEMV_ROWS`, `out` has `rows` rows.
#[target_feature(enable = "neon")]
pub unsafe fn gemv(p: Panel, x: &[f32], rows: usize, k: usize, t0: usize, t1: usize, acc: &mut [[f32; PANEL]]) {
    if !matches!(p, Panel::F32(_) | Panel::Bf16(_) | Panel::Q8_0 { .. }) {
        return portable::gemv(p, x, rows, k, t0, t1, acc);
    }
    let mut r = 0;
    while r < rows {
        let n = if rows - r >= 2 { 2 } else { 1 };
        // Row r's activation at step t is x[t * rows + r] (step-major).
        if n == 1 {
            gemv_rows::<1>(p, &x[r..], rows, t0, t1, &mut acc[r..]);
        } else {
            gemv_rows::<2>(p, &x[r..], rows, t0, t1, &mut acc[r..]);
        }
        r += n;
    }
}

/// Per step, 8 vectors widened once and one FMA per vector and row: one accumulator chain per
/// output whatever the number of rows (a row's result never depends on its neighbours).
#[inline(always)]
unsafe fn gemv_rows<const R: usize>(p: Panel, x: &[f32], xs: usize, t0: usize, t1: usize, acc: &mut [[f32; PANEL]]) {
    let scaled = matches!(p, Panel::Q8_0 { .. });
    let bytes = match p {
        Panel::F32(_) => 128,
        Panel::Bf16(_) => 64,
        _ => 32,
    };
    let base = match p {
        Panel::F32(w) => w.as_ptr() as *const u8,
        Panel::Bf16(w) => w.as_ptr() as *const u8,
        Panel::Q8_0 { q, .. } => q.as_ptr() as *const u8,
        _ => unreachable!(),
    };
    // The running sums (zero at the first step).
    let mut tot: [[float32x4_t; 8]; R] = std::array::from_fn(|r| {
        std::array::from_fn(|j| {
            if t0 == 0 {
                vdupq_n_f32(0.0)
            } else {
                vld1q_f32(acc[r].as_ptr().add(4 * j))
            }
        })
    });
    let mut tb = t0;
    while tb < t1 {
        let te = if scaled { (tb + QBLOCK).min(t1) } else { t1 };
        // Unscaled formats continue the one chain; Q8_0 sums a block, then scales it.
        let mut a = if scaled { [[vdupq_n_f32(0.0); 8]; R] } else { tot };
        for t in tb..te {
            prefetch(base.add(t * bytes));
            let w = load8(p, t);
            for r in 0..R {
                let xv = *x.get_unchecked(t * xs + r);
                for j in 0..8 {
                    a[r][j] = vfmaq_n_f32(a[r][j], w[j], xv);
                }
            }
        }
        for r in 0..R {
            for j in 0..8 {
                tot[r][j] = match p {
                    Panel::Q8_0 { d, .. } => {
                        let ds = f16x4(&d[(tb / QBLOCK) * PANEL + 4 * j..]);
                        vfmaq_f32(tot[r][j], a[r][j], ds)
                    }
                    _ => a[r][j],
                };
            }
        }
        tb = te;
    }
    for r in 0..R {
        for j in 0..8 {
            vst1q_f32(acc[r].as_mut_ptr().add(4 * j), tot[r][j]);
        }
    }
}

/// # Safety
/// As `gemv`, with `dst` holding `k * 32` values.
#[target_feature(enable = "neon")]
pub unsafe fn widen(p: Panel, k: usize, dst: &mut [f32]) {
    match p {
        Panel::F32(w) => dst[..k * PANEL].copy_from_slice(w),
        Panel::Bf16(_) | Panel::Q8_0 { .. } => {
            let o = dst.as_mut_ptr();
            for t in 0..k {
                let w = load8(p, t);
                for (j, v) in w.into_iter().enumerate() {
                    let v = match p {
                        Panel::Q8_0 { d, .. } => vmulq_f32(v, f16x4(&d[(t / QBLOCK) * PANEL + 4 * j..])),
                        _ => v,
                    };
                    vst1q_f32(o.add(t * PANEL + 4 * j), v);
                }
            }
        }
        _ => portable::widen(p, k, dst),
    }
}

/// `acc + Σ a·b` over each lane's four signed bytes (`sdot`).
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    std::arch::asm!(
        "sdot {0:v}.4s, {1:v}.16b, {2:v}.16b",
        inout(vreg) acc,
        in(vreg) a,
        in(vreg) b,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// Four activation bytes of row `r` at step `t` of `x` (value or residual bytes), in every
/// 32-bit lane.
#[inline(always)]
unsafe fn x4(x: &[i8], kp: usize, r: usize, t: usize) -> int8x16_t {
    vreinterpretq_s8_s32(vdupq_n_s32((x.as_ptr().add(r * kp + t) as *const i32).read_unaligned()))
}

/// Before the residual pass: the value-byte sums move up 8 bits.
#[inline(always)]
unsafe fn shift8(acc: &mut [int32x4_t; 8]) {
    for v in acc.iter_mut() {
        *v = vshlq_n_s32::<8>(*v);
    }
}

/// # Safety
/// NEON with dotprod; `p` a quad panel checked for `a.kp`, `a` checked, `out` has
/// `a.rows <= INT_ROWS` rows.
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn gemv_int_dot(p: Panel, a: &QRows, b0: usize, b1: usize, out: &mut [[f32; PANEL]]) {
    let mut r0 = 0;
    while r0 < a.rows {
        let n = (a.rows - r0).min(2);
        let sub = a.sub(r0, n);
        let o = &mut out[r0..];
        match (p, n) {
            (Panel::Q8x4 { .. }, 1) => q8x4::<1>(p, &sub, b0, b1, o),
            (Panel::Q8x4 { .. }, _) => q8x4::<2>(p, &sub, b0, b1, o),
            (_, 1) => q4x8::<1>(p, &sub, b0, b1, o),
            _ => q4x8::<2>(p, &sub, b0, b1, o),
        }
        r0 += n;
    }
}

/// Adds a block's integer sums (8 vectors of 4 columns), scaled, into `out`.
#[inline(always)]
unsafe fn add_block(acc: &[int32x4_t; 8], dx: f32, d: &[f32; PANEL], out: &mut [f32; PANEL]) {
    for j in 0..8 {
        let o = out.as_mut_ptr().add(4 * j);
        let v = vmulq_n_f32(vcvtq_f32_s32(acc[j]), dx);
        vst1q_f32(o, vfmaq_f32(vld1q_f32(o), v, vld1q_f32(d.as_ptr().add(4 * j))));
    }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn q8x4<const R: usize>(p: Panel, a: &QRows, b0: usize, b1: usize, out: &mut [[f32; PANEL]]) {
    let Panel::Q8x4 { q, d } = p else { return };
    let nb = a.kp / QBLOCK;
    let qp = q.as_ptr();
    if b0 == 0 {
        for r in 0..R {
            out[r] = [0.0; PANEL];
        }
    }
    for b in b0..b1 {
        let mut acc = [[vdupq_n_s32(0); 8]; R];
        for (pass, x) in [a.q, a.lo].into_iter().enumerate() {
            if pass == 1 {
                acc.iter_mut().for_each(|v| shift8(v));
                // No residual bytes (8-bit activations): their pass would add zeros.
                if !a.residual {
                    break;
                }
            }
            for g in 0..QBLOCK / 4 {
                let t = b * QBLOCK + g * 4;
                let base = qp.add(t * PANEL);
                if pass == 0 {
                    prefetch(base);
                    prefetch(base.add(64));
                }
                let w: [int8x16_t; 8] = std::array::from_fn(|j| vld1q_s8(base.add(16 * j)));
                for r in 0..R {
                    let xb = x4(x, a.kp, r, t);
                    for j in 0..8 {
                        acc[r][j] = sdot(acc[r][j], w[j], xb);
                    }
                }
            }
        }
        let ds: [f32; PANEL] = std::array::from_fn(|c| d[b * PANEL + c].to_f32());
        for r in 0..R {
            add_block(&acc[r], *a.d.get_unchecked(r * nb + b), &ds, &mut out[r]);
        }
    }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn q4x8<const R: usize>(p: Panel, a: &QRows, b0: usize, b1: usize, out: &mut [[f32; PANEL]]) {
    let Panel::Q4x8 { q, d, m } = p else { return };
    let nb = a.kp / QBLOCK;
    let qp = q.as_ptr();
    let nib = vdupq_n_u8(0xF);
    if b0 == 0 {
        for r in 0..R {
            out[r] = [0.0; PANEL];
        }
    }
    let mut dw = [0f32; PANEL];
    let mut mw = [0f32; PANEL];
    for b in b0..b1 {
        let mut acc = [[vdupq_n_s32(0); 8]; R];
        for (pass, x) in [a.q, a.lo].into_iter().enumerate() {
            if pass == 1 {
                acc.iter_mut().for_each(|v| shift8(v));
                // No residual bytes (8-bit activations): their pass would add zeros.
                if !a.residual {
                    break;
                }
            }
            for o in 0..QBLOCK / 8 {
                let t = b * QBLOCK + o * 8;
                let base = qp.add(t * PANEL / 2);
                if pass == 0 {
                    prefetch(base);
                    prefetch(base.add(64));
                }
                for j in 0..8 {
                    let v = vld1q_u8(base.add(16 * j));
                    let lo = vreinterpretq_s8_u8(vandq_u8(v, nib));
                    let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
                    for r in 0..R {
                        acc[r][j] = sdot(sdot(acc[r][j], lo, x4(x, a.kp, r, t)), hi, x4(x, a.kp, r, t + 4));
                    }
                }
            }
        }
        for c in 0..PANEL {
            dw[c] = d[b * PANEL + c].to_f32();
            mw[c] = m[b * PANEL + c].to_f32();
        }
        for r in 0..R {
            let dx = *a.d.get_unchecked(r * nb + b);
            add_block(&acc[r], dx, &dw, &mut out[r]);
            let xs = dx * *a.s.get_unchecked(r * nb + b) as f32;
            for j in 0..8 {
                let o = out[r].as_mut_ptr().add(4 * j);
                vst1q_f32(o, vfmaq_n_f32(vld1q_f32(o), vld1q_f32(mw.as_ptr().add(4 * j)), xs));
            }
        }
    }
}
