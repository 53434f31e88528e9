//! Plain-Rust kernels: the reference the SIMD ones are tested against, and what CPUs without a
//! supported vector level run (the compiler vectorises them for the baseline target).

use super::{act_scale, panel_value, q4x8_nibble, quad_index, Panel, QRowMut, QRows, PANEL, QBLOCK};

pub fn widen(p: Panel, k: usize, dst: &mut [f32]) {
    for t in 0..k {
        for c in 0..PANEL {
            dst[t * PANEL + c] = panel_value(p, t, c);
        }
    }
}

/// Steps `t0..t1` added to `out` (from zero when `t0` is 0); the block partial sums restart at
/// every block, whose starts `t0` falls on.
pub fn gemv(p: Panel, x: &[f32], rows: usize, k: usize, t0: usize, t1: usize, out: &mut [[f32; PANEL]]) {
    let mut w = [0f32; PANEL];
    let mut blk = [[0f32; PANEL]; super::GEMV_ROWS];
    if t0 == 0 {
        for o in out.iter_mut().take(rows) {
            *o = [0.0; PANEL];
        }
    }
    for t in t0..t1 {
        for (c, wc) in w.iter_mut().enumerate() {
            // Q8_0 scales are applied per block below.
            *wc = match p {
                Panel::Q8_0 { q, .. } => q[t * PANEL + c] as f32,
                // Q4 values carry their scale and offset already.
                _ => panel_value(p, t, c),
            };
        }
        if !matches!(p, Panel::Q8_0 { .. }) {
            // One chain per output, as the prefill kernel's: the same bits whichever runs a row.
            for r in 0..rows {
                let xv = x[t * rows + r];
                for c in 0..PANEL {
                    out[r][c] += xv * w[c];
                }
            }
            continue;
        }
        for r in 0..rows {
            let xv = x[t * rows + r];
            for c in 0..PANEL {
                blk[r][c] += xv * w[c];
            }
        }
        let block_end = (t + 1) % QBLOCK == 0 || t + 1 == k || t + 1 == t1;
        if block_end {
            for r in 0..rows {
                for c in 0..PANEL {
                    let s = match p {
                        Panel::Q8_0 { d, .. } => d[(t / QBLOCK) * PANEL + c].to_f32(),
                        _ => 1.0,
                    };
                    out[r][c] += blk[r][c] * s;
                    blk[r][c] = 0.0;
                }
            }
        }
    }
}

/// Integer sums per block, then both scales in f32 (the order the SIMD kernels use).
pub fn gemv_int(p: Panel, a: &QRows, b0: usize, b1: usize, out: &mut [[f32; PANEL]]) {
    let nb = a.kp / QBLOCK;
    if b0 == 0 {
        for o in out.iter_mut().take(a.rows) {
            *o = [0.0; PANEL];
        }
    }
    for b in b0..b1 {
        for r in 0..a.rows {
            let at = r * a.kp + b * QBLOCK..r * a.kp + (b + 1) * QBLOCK;
            let xq: Vec<i32> = a.q[at.clone()]
                .iter()
                .zip(&a.lo[at])
                .map(|(h, l)| 256 * *h as i32 + *l as i32)
                .collect();
            let (dx, sx) = (a.d[r * nb + b], a.s[r * nb + b]);
            for c in 0..PANEL {
                let s = b * PANEL + c;
                out[r][c] += match p {
                    Panel::Q8x4 { q, d } => {
                        let sum: i32 = (0..QBLOCK)
                            .map(|j| q[quad_index(b * QBLOCK + j, c)] as i32 * xq[j])
                            .sum();
                        d[s].to_f32() * (sum as f32 * dx)
                    }
                    Panel::Q4x8 { q, d, m } => {
                        let sum: i32 = (0..QBLOCK)
                            .map(|j| q4x8_nibble(q, b * QBLOCK + j, c) as i32 * xq[j])
                            .sum();
                        d[s].to_f32() * (sum as f32 * dx) + m[s].to_f32() * (sx as f32 * dx)
                    }
                    _ => unreachable!("gemv_int takes quad panels"),
                };
            }
        }
    }
}

/// Rounds to the nearest integer (ties to even) for |x| < 2^22 with two additions that
/// vectorise, where `f32::round` is a library call on baseline x86-64.
#[inline(always)]
fn round_near(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    (x + MAGIC) - MAGIC
}

pub fn quantize_row(x: &[f32], dst: QRowMut) {
    for (b, chunk) in x.chunks(QBLOCK).enumerate() {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (d, inv) = act_scale(amax);
        let at = b * QBLOCK..(b + 1) * QBLOCK;
        let (q, lo, x16) = (&mut dst.q[at.clone()], &mut dst.lo[at.clone()], &mut dst.x16[at]);
        let mut sum = 0i32;
        for i in 0..QBLOCK {
            let (hi, rest) = match chunk.get(i) {
                Some(v) => {
                    // NaN becomes 0 here (the SIMD levels clamp it); a NaN activation is a broken model.
                    let y = v * inv;
                    let hi = round_near(y).clamp(-127.0, 127.0);
                    let rest = if dst.residual {
                        round_near((y - hi) * 256.0).clamp(-127.0, 127.0)
                    } else {
                        0.0
                    };
                    (hi, rest)
                }
                None => (0.0, 0.0),
            };
            q[i] = hi as i8;
            lo[i] = rest as i8;
            x16[i] = (256.0 * hi + rest) as i16;
            sum += 256 * hi as i32 + rest as i32;
        }
        dst.d[b] = d / 256.0;
        dst.s[b] = sum;
    }
}

/// BF16 weights times BF16-rounded activations in pairs of steps, in `vdpbf16ps`'s order (the
/// products are exact in f32; the odd step's is added first): what CPUs without BF16 dot
/// products compute for `gemv_bf16_pairs`, in column order. Unlike the instruction, subnormal
/// inputs and results are kept, not flushed to zero, so the two agree except where values are
/// that small.
pub fn gemv_bf16_pairs(
    w: &[half::bf16],
    xp: &[u32],
    rows: usize,
    kh: usize,
    t0: usize,
    t1: usize,
    out: &mut [[f32; PANEL]],
) {
    for r in 0..rows {
        let mut a = if t0 == 0 { [0f32; PANEL] } else { out[r] };
        for t in (t0..t1).step_by(2) {
            let x = xp[r * kh + t / 2];
            let (x0, x1) = (f32::from_bits(x << 16), f32::from_bits(x & 0xFFFF_0000));
            for (c, ac) in a.iter_mut().enumerate() {
                let w0 = super::bf16_to_f32(w[t * PANEL + c]);
                let w1 = if t + 1 < t1 {
                    super::bf16_to_f32(w[(t + 1) * PANEL + c])
                } else {
                    0.0
                };
                *ac = (*ac + x1 * w1) + x0 * w0;
            }
        }
        out[r] = a;
    }
}
