//! Quantization: weights to Q8_0 (blocks of 32 along the input dimension as signed bytes with one
//! scale each, llama.cpp's format) and Q4_0/Q4_1, and activations to 8 bits per block of 32 for
//! the integer kernels (`QuantActs`). The float kernels multiply f32 activations with widened
//! weights and need no activation quantization.

// Register-blocked kernels index several arrays with the same counters; explicit loops read
// closer to the math than iterator chains.
#![allow(clippy::needless_range_loop)]

use super::kernels::{quantize_row, QRowMut};
use super::pool::Exec;

pub const BLOCK: usize = 32;

/// Quantizes one row: `q` gets `src.len()` bytes, `d` one scale per started block.
pub fn quantize_row_q8_0(src: &[f32], q: &mut [i8], d: &mut [f32]) {
    for (b, chunk) in src.chunks(BLOCK).enumerate() {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        // The scale is rounded to f16 as in llama.cpp, so GGUF files and our own quantization
        // give the same numbers.
        let scale = half::f16::from_f32(amax / 127.0).to_f32();
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        d[b] = scale;
        for (i, v) in chunk.iter().enumerate() {
            q[b * BLOCK + i] = (v * inv).round().clamp(-127.0, 127.0) as i8;
        }
    }
}

/// Quantizes one row to 4 bits per weight: `nib` gets one value 0..=15 per weight and
/// `dm` a (scale, offset) per block, so that weight = nib · scale + offset. `q4_0` follows
/// llama.cpp's Q4_0 (a signed scale from the largest magnitude, offset -8 · scale); otherwise Q4_1
/// (the block's range split in 15 steps from its minimum).
pub fn quantize_row_q4(src: &[f32], q4_0: bool, nib: &mut [u8], dm: &mut [(f32, f32)]) {
    for (b, chunk) in src.chunks(BLOCK).enumerate() {
        let (d, m) = if q4_0 {
            let max = chunk.iter().fold(0f32, |a, v| if v.abs() > a.abs() { *v } else { a });
            let d = half::f16::from_f32(max / -8.0).to_f32();
            (d, -8.0 * d)
        } else {
            let (lo, hi) = chunk
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), v| (l.min(*v), h.max(*v)));
            (
                half::f16::from_f32((hi - lo) / 15.0).to_f32(),
                half::f16::from_f32(lo).to_f32(),
            )
        };
        let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
        dm[b] = (d, m);
        for (i, v) in chunk.iter().enumerate() {
            nib[b * BLOCK + i] = ((v - m) * inv).round().clamp(0.0, 15.0) as u8;
        }
    }
}

/// `dst[i] = q[i] · d[i / 32]`.
pub fn dequantize_row_q8_0(q: &[i8], d: &[f32], dst: &mut [f32]) {
    for (i, (o, v)) in dst.iter_mut().zip(q).enumerate() {
        *o = *v as f32 * d[i / BLOCK];
    }
}

/// Activation rows quantized for the integer kernels: per row and block of 32, a scale
/// `d = max|x| / 127`, value bytes `q = round(x / d)`, residual bytes
/// `lo = round((x - d·q) · 256 / d)` (so x ≈ d/256 · (256·q + lo), within d/512), and the sum of
/// those integers (the kernels' offset terms need it). Without the residual (the fast
/// precision) the activations are the value bytes alone, `x ≈ d · q` within d/2, as llama.cpp
/// quantizes them: `lo` is zero and the kernels skip its pass. Rows are zero-padded to whole
/// blocks. Buffers are kept and reused from call to call.
#[derive(Default)]
pub struct QuantActs {
    q: Vec<i8>,
    lo: Vec<i8>,
    x16: Vec<i16>,
    d: Vec<f32>,
    s: Vec<i32>,
    kp: usize,
    residual: bool,
}

impl QuantActs {
    /// Quantizes `rows` rows of `k` values (row stride `k`), with residual bytes (16-bit
    /// activations) or without (8-bit).
    pub fn quantize(&mut self, x: &[f32], rows: usize, k: usize, residual: bool) {
        self.quantize_on(Exec::Serial, x, rows, k, residual)
    }

    /// As `quantize`, the rows spread over `exec`'s threads (each row is quantized on its own, so
    /// the bits do not depend on where).
    pub fn quantize_on(&mut self, exec: Exec, x: &[f32], rows: usize, k: usize, residual: bool) {
        let kp = super::kernels::padded(k);
        let nb = kp / BLOCK;
        self.kp = kp;
        // Every entry is written below (padding included), so old contents need no clearing.
        self.q.resize(rows * kp, 0);
        self.lo.resize(rows * kp, 0);
        self.x16.resize(rows * kp, 0);
        self.d.resize(rows * nb, 0.0);
        self.s.resize(rows * nb, 0);
        if kp == 0 {
            return;
        }
        let isa = super::isa::Isa::get();
        self.residual = residual;
        let mut dst: Vec<Option<QRowMut>> = self
            .q
            .chunks_mut(kp)
            .zip(self.lo.chunks_mut(kp))
            .zip(self.x16.chunks_mut(kp))
            .zip(self.d.chunks_mut(nb))
            .zip(self.s.chunks_mut(nb))
            .take(rows)
            .map(|((((q, lo), x16), d), s)| {
                Some(QRowMut {
                    q,
                    lo,
                    x16,
                    d,
                    s,
                    residual,
                })
            })
            .collect();
        // One row is quick (about half a microsecond per thousand values): not worth a loop.
        let exec = if rows > 1 { exec } else { Exec::Serial };
        exec.for_each_mut(&mut dst, &|r, row| {
            if let Some(row) = row.take() {
                quantize_row(isa, &x[r * k..(r + 1) * k], row);
            }
        });
    }

    /// Rows `r0..r0 + n` as the kernels take them.
    pub fn rows(&self, r0: usize, n: usize) -> super::kernels::QRows<'_> {
        let nb = self.kp / BLOCK;
        super::kernels::QRows {
            q: &self.q[r0 * self.kp..(r0 + n) * self.kp],
            lo: &self.lo[r0 * self.kp..(r0 + n) * self.kp],
            residual: self.residual,
            x16: &self.x16[r0 * self.kp..(r0 + n) * self.kp],
            d: &self.d[r0 * nb..(r0 + n) * nb],
            s: &self.s[r0 * nb..(r0 + n) * nb],
            rows: n,
            kp: self.kp,
            first: r0 == 0,
        }
    }

    /// The values the kernels multiply with, as f32 (tests compare against them).
    #[cfg(test)]
    pub fn dequantized(&self, rows: usize, k: usize) -> Vec<f32> {
        let nb = self.kp / BLOCK;
        let mut v = vec![0f32; rows * k];
        for r in 0..rows {
            for t in 0..k {
                let i = r * self.kp + t;
                let units = 256 * self.q[i] as i32 + self.lo[i] as i32;
                v[r * k + t] = units as f32 * self.d[r * nb + t / BLOCK];
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu::test_data::rand_vec;

    #[test]
    fn quantization_error_is_within_half_a_step() {
        let v = rand_vec(100, 3);
        let mut q = vec![0i8; 100];
        let mut d = vec![0f32; 4];
        quantize_row_q8_0(&v, &mut q, &mut d);
        let mut back = vec![0f32; 100];
        dequantize_row_q8_0(&q, &d, &mut back);
        for (i, (a, b)) in v.iter().zip(&back).enumerate() {
            assert!((a - b).abs() <= d[i / BLOCK] * 0.5 + 1e-6, "{i}: {a} vs {b}");
        }
        // An all-zero block has scale 0 and stays 0.
        let mut q = vec![1i8; 32];
        let mut d = vec![1f32; 1];
        quantize_row_q8_0(&[0.0; 32], &mut q, &mut d);
        assert!(q.iter().all(|x| *x == 0) && d[0] == 0.0);
    }

    #[test]
    fn rows_quantized_in_parallel_are_the_same_bits() {
        for (rows, k) in [(1, 100), (2, 64), (16, 960), (5, 33)] {
            let x = rand_vec(rows * k, 11);
            for residual in [true, false] {
                let (mut serial, mut pooled) = (QuantActs::default(), QuantActs::default());
                serial.quantize(&x, rows, k, residual);
                // Stale contents from a bigger call must not show through.
                pooled.quantize_on(Exec::Pool, &rand_vec(20 * 999, 3), 20, 999, !residual);
                pooled.quantize_on(Exec::Pool, &x, rows, k, residual);
                let (a, b) = (serial.rows(0, rows), pooled.rows(0, rows));
                assert_eq!((a.q, a.lo, a.x16), (b.q, b.lo, b.x16), "rows={rows} k={k}");
                assert_eq!((a.s, a.residual), (b.s, b.residual));
                assert_eq!(
                    a.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    b.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn activations_are_within_half_a_step_of_16_or_8_bits() {
        let (rows, k) = (3, 100);
        let x = rand_vec(rows * k, 7);
        for (residual, steps) in [(true, 127.0 * 256.0), (false, 127.0)] {
            let mut acts = QuantActs::default();
            acts.quantize(&x, rows, k, residual);
            let back = acts.dequantized(rows, k);
            for r in 0..rows {
                for b in 0..k.div_ceil(BLOCK) {
                    let at = r * k + b * BLOCK..r * k + ((b + 1) * BLOCK).min(k);
                    let amax = x[at.clone()].iter().fold(0f32, |m, v| m.max(v.abs()));
                    // Half a step, plus the residual byte's own rounding in 16 bits.
                    let tol = amax / steps * if residual { 1.0 } else { 0.5 } + 1e-7;
                    for i in at {
                        assert!(
                            (x[i] - back[i]).abs() <= tol,
                            "residual={residual} {i}: {} vs {}",
                            x[i],
                            back[i]
                        );
                    }
                }
            }
            // 8-bit activations have no residual, and their sums are what the kernels subtract.
            let rows_ = acts.rows(0, rows);
            assert_eq!(rows_.residual, residual);
            if !residual {
                assert!(rows_.lo.iter().all(|v| *v == 0));
                let kp = rows_.kp;
                for r in 0..rows {
                    for b in 0..kp / BLOCK {
                        let sum: i32 = rows_.q[r * kp + b * BLOCK..r * kp + (b + 1) * BLOCK]
                            .iter()
                            .map(|v| *v as i32)
                            .sum();
                        assert_eq!(rows_.s[r * (kp / BLOCK) + b], 256 * sum);
                        assert_eq!(rows_.x16[r * kp + b * BLOCK], 256 * rows_.q[r * kp + b * BLOCK] as i16);
                    }
                }
            }
        }
    }
}
