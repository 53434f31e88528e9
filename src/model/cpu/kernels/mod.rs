//! SIMD kernels over weight panels, chosen at run time (see `isa.rs`).
//!
//! A panel holds 32 output rows of a matrix. Two layouts exist:
//!
//! - **Steps** (`F32`, `Bf16`, `F16`, `Q8_0`, `Q4`): transposed, `P[t][c]` is weight (row c,
//!   input t), so one step over `t` reads 32 consecutive weights that feed 32 outputs. The float
//!   kernels widen them to f32 in registers and multiply with f32 activations: no horizontal sums,
//!   and BF16 models compute exactly what transformers computes in f32. In the fast precision
//!   BF16 panels are instead read two steps at a time, interleaved per column in registers, and
//!   multiplied with BF16-rounded activations by `vdpbf16ps` (`gemv_bf16_pairs`).
//! - **Quads** (`Q8x4`, `Q4x8`): for integer dot products, which sum four adjacent byte products
//!   into one 32-bit lane, each column's weights for 4 consecutive steps are adjacent:
//!   byte `(t / 4) · 128 + c · 4 + t % 4`. Q4 packs two such groups per byte (steps 0-3 of each
//!   group of 8 in the low nibbles, 4-7 in the high ones), so one AND and one shift unpack them.
//!   The activations are quantized per block of 32 to 16 bits held as two bytes, a value byte and
//!   a residual byte (`QRows`): each block is summed twice over the same weights (the second time
//!   from L1), the first sum shifted by 8 bits, so the products are exact to 1/65000 of the
//!   block's largest activation while every instruction works on bytes. In the fast precision
//!   the residual bytes are zero (8-bit activations, llama.cpp's numerics) and their pass is
//!   skipped: half the integer work. Per block the integer sums are scaled by both scales in
//!   f32. Input lengths are padded to whole blocks of 32.
//!
//! Every entry point checks the lengths of what it is given before any `unsafe` code runs, so a
//! wrong call is a panic with a message, never an out-of-bounds read.

// Register-blocked kernels index several arrays with the same counters; explicit loops read
// closer to the math than iterator chains.
#![allow(clippy::needless_range_loop)]

use half::{bf16, f16};

pub use super::isa::{Dot, Isa, Level};

mod portable;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

/// Output rows per panel.
pub const PANEL: usize = 32;
/// Quantization block length along the input dimension (Q8_0, Q4 and the activations).
pub const QBLOCK: usize = 32;
/// Most activation rows one streaming float product handles (decoding); more rows are done in
/// groups of this many, each group streaming the panel again (from cache). Every output is one
/// accumulator chain over the steps whatever the number of rows, so a row's result does not
/// depend on the rows it is computed with.
pub const GEMV_ROWS: usize = 8;
/// Most activation rows one integer kernel call handles.
pub const INT_ROWS: usize = 8;

/// One panel's weights in any supported format and layout (see the module notes). `k` is the
/// input length; quad layouts are padded to `k.div_ceil(32) * 32` steps.
#[derive(Clone, Copy)]
pub enum Panel<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
    /// `k` steps of 32 signed bytes, and 32 scales per block of 32 steps (f16, as in GGUF files:
    /// the quantizer rounds scales to f16, so nothing is lost, and decoding reads 34 bytes per 32
    /// weights instead of 36).
    Q8_0 {
        q: &'a [i8],
        d: &'a [f16],
    },
    /// 4-bit steps layout: per step 16 bytes, byte j holding column 2j (low nibble) and 2j + 1
    /// (high nibble); per block of 32 steps, 32 scales `d` and 32 offsets `m` (value = q · d + m),
    /// each stored even columns first, then odd columns. Q4_0 is the case m = -8 d.
    Q4 {
        q: &'a [u8],
        d: &'a [f16],
        m: &'a [f16],
    },
    /// Q8_0 in quads: 128 bytes per 4 steps; 32 scales per block in column order.
    Q8x4 {
        q: &'a [i8],
        d: &'a [f16],
    },
    /// 4-bit in quads: 128 bytes per 8 steps (low nibbles steps 0-3, high nibbles 4-7); 32
    /// scales and 32 offsets per block in column order.
    Q4x8 {
        q: &'a [u8],
        d: &'a [f16],
        m: &'a [f16],
    },
}

impl Panel<'_> {
    /// Whether this panel is in the quad layout of the integer kernels.
    pub fn is_quads(&self) -> bool {
        matches!(self, Panel::Q8x4 { .. } | Panel::Q4x8 { .. })
    }

    /// Panics unless the arrays hold exactly a panel of input length `k`.
    fn check(&self, k: usize) {
        let kp = padded(k);
        let scales = k.div_ceil(QBLOCK) * PANEL;
        let ok = match *self {
            Panel::F32(w) => w.len() == k * PANEL,
            Panel::Bf16(w) => w.len() == k * PANEL,
            Panel::F16(w) => w.len() == k * PANEL,
            Panel::Q8_0 { q, d } => q.len() == k * PANEL && d.len() == scales,
            Panel::Q4 { q, d, m } => q.len() == k * PANEL / 2 && d.len() == scales && m.len() == scales,
            Panel::Q8x4 { q, d } => q.len() == kp * PANEL && d.len() == scales,
            Panel::Q4x8 { q, d, m } => q.len() == kp * PANEL / 2 && d.len() == scales && m.len() == scales,
        };
        assert!(ok, "kernels: a panel's arrays do not match its input length {k}");
    }
}

/// Input length of a quad-layout panel: whole blocks of 32.
pub fn padded(k: usize) -> usize {
    k.div_ceil(QBLOCK) * QBLOCK
}

/// Index of column `c`'s scale within a steps-layout Q4 block's 32 (even columns first).
#[inline]
pub fn q4_scale_index(c: usize) -> usize {
    if c.is_multiple_of(2) {
        c / 2
    } else {
        16 + c / 2
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
    let s = (t / QBLOCK) * PANEL;
    match p {
        Panel::F32(w) => w[i],
        Panel::Bf16(w) => bf16_to_f32(w[i]),
        Panel::F16(w) => w[i].to_f32(),
        Panel::Q8_0 { q, d } => q[i] as f32 * d[s + c].to_f32(),
        Panel::Q4 { q, d, m } => {
            let byte = q[t * (PANEL / 2) + c / 2];
            let nib = if c.is_multiple_of(2) { byte & 0xF } else { byte >> 4 };
            let s = s + q4_scale_index(c);
            nib as f32 * d[s].to_f32() + m[s].to_f32()
        }
        Panel::Q8x4 { q, d } => q[quad_index(t, c)] as f32 * d[s + c].to_f32(),
        Panel::Q4x8 { q, d, m } => q4x8_nibble(q, t, c) as f32 * d[s + c].to_f32() + m[s + c].to_f32(),
    }
}

/// Byte of weight (t, c) in a Q8x4 panel.
#[inline]
pub fn quad_index(t: usize, c: usize) -> usize {
    (t / 4) * (4 * PANEL) + c * 4 + t % 4
}

/// Byte holding weight (t, c) in a Q4x8 panel, and whether it is the high nibble.
#[inline]
pub fn octet_index(t: usize, c: usize) -> (usize, bool) {
    let j = t % 8;
    ((t / 8) * (4 * PANEL) + c * 4 + j % 4, j >= 4)
}

#[inline]
fn q4x8_nibble(q: &[u8], t: usize, c: usize) -> u8 {
    let (i, high) = octet_index(t, c);
    if high {
        q[i] >> 4
    } else {
        q[i] & 0xF
    }
}

/// `out[r][c] = Σ_t x[r][t] · P[t][c]` for `rows ≤ GEMV_ROWS` activation rows of length `k`,
/// given step-major (`x[t * rows + r]`: the rows' values for one step are together, so however
/// many rows there are, a step reads one cache line of activations), for the steps layouts.
/// The engine takes panels a piece at a time (`gemv_steps`); this whole-panel form is the
/// reference the tests hold the pieces to.
#[cfg(test)]
pub fn gemv(isa: Isa, p: Panel, x: &[f32], rows: usize, k: usize, out: &mut [[f32; PANEL]]) {
    gemv_steps(isa, p, x, rows, k, 0..k, out);
    gemv_finish(isa, p, rows, out);
}

/// Steps `steps` of `gemv` into `acc`, starting from zero at step 0 and from `acc`'s running sums
/// otherwise (`steps.start` a multiple of `QBLOCK`): a panel can be taken a piece at a time, with
/// other rows' pieces in between, while it is in L1. The sums are kept in the kernel's own
/// column order until `gemv_finish`; the result is the same bits as one call over all steps.
pub fn gemv_steps(
    isa: Isa,
    p: Panel,
    x: &[f32],
    rows: usize,
    k: usize,
    steps: std::ops::Range<usize>,
    acc: &mut [[f32; PANEL]],
) {
    p.check(k);
    assert!(
        !p.is_quads(),
        "kernels: quad panels take quantized activations (gemv_int)"
    );
    assert!((1..=GEMV_ROWS).contains(&rows) && acc.len() >= rows && x.len() >= rows * k);
    assert!(
        steps.start.is_multiple_of(QBLOCK) && steps.start <= steps.end && steps.end <= k,
        "kernels: steps {steps:?} of {k}"
    );
    let (t0, t1) = (steps.start, steps.end);
    match isa {
        // SAFETY: `Isa` levels are only produced for CPUs that report their features (isa.rs),
        // and every length the kernels rely on was checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::gemv(p, x, rows, k, t0, t1, acc) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::gemv(p, x, rows, k, t0, t1, acc) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::gemv(p, x, rows, k, t0, t1, acc) },
        _ => portable::gemv(p, x, rows, k, t0, t1, acc),
    }
}

/// Puts `gemv_steps`' sums in column order, after the last steps.
pub fn gemv_finish(isa: Isa, p: Panel, rows: usize, acc: &mut [[f32; PANEL]]) {
    assert!(rows <= acc.len());
    match isa {
        // SAFETY: as in `gemv_steps`; only `rows` rows of `acc` are touched.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::gemv_finish(p, rows, acc) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::gemv_finish(p, rows, acc) },
        // NEON and portable sums are in column order already.
        _ => {
            let _ = (p, acc);
        }
    }
}

/// The panel as f32 in `dst` (`k * 32` values in the steps layout), for the prefill product.
pub fn widen(isa: Isa, p: Panel, k: usize, dst: &mut [f32]) {
    p.check(k);
    assert!(dst.len() >= k * PANEL, "kernels: widen destination too short");
    match isa {
        // SAFETY: as in `gemv`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::widen(p, k, dst) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::widen(p, k, dst) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::widen(p, k, dst) },
        _ => portable::widen(p, k, dst),
    }
}

/// `v` rounded to BF16 bits, to nearest with ties to even (as `bf16::from_f32`, written without
/// branches so that the loops over rows vectorise).
#[inline(always)]
fn bf16_bits(v: f32) -> u32 {
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    // NaN stays NaN (quiet) instead of rounding into infinity.
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        (b >> 16) | 0x40
    } else {
        rounded
    }
}

/// `m` rows of `k` activations rounded to BF16 for `gemv_bf16_pairs`: row `r` holds its values
/// of steps `2h` (low half) and `2h + 1` (high half, zero past `k`) in word `r * k.div_ceil(2) +
/// h`, which is the row's BF16 values in order.
pub fn bf16_pairs(x: &[f32], m: usize, k: usize, out: &mut Vec<u32>) {
    let kh = k.div_ceil(2);
    assert!(x.len() >= m * k, "kernels: activations shorter than {m} rows of {k}");
    out.resize(m * kh, 0);
    if k == 0 {
        return;
    }
    for (src, dst) in x[..m * k].chunks_exact(k).zip(out.chunks_exact_mut(kh)) {
        let (pairs, tail) = src.split_at(k / 2 * 2);
        for (d, p) in dst.iter_mut().zip(pairs.chunks_exact(2)) {
            *d = bf16_bits(p[0]) | bf16_bits(p[1]) << 16;
        }
        if let Some(v) = tail.first() {
            dst[kh - 1] = bf16_bits(*v);
        }
    }
}

/// `out[r][c] = Σ_t x[r][t] · P[t][c]` over steps `steps` for a BF16 panel and `rows ≤
/// GEMV_ROWS` rows of BF16 activation pairs (`bf16_pairs`, row `r` at `r * k.div_ceil(2)`), added to `acc` as `gemv_steps`
/// does (from zero at step 0; `steps.start` a multiple of `QBLOCK`), in the kernel's own column
/// order until `gemv_bf16_pairs_finish`. With AVX-512 BF16 (`Level::bf16_dot`) one `vdpbf16ps`
/// does two steps of 16 columns; elsewhere plain code computes the same sums. Each output is one
/// chain over the pairs whatever the number of rows.
pub fn gemv_bf16_pairs(
    level: Level,
    w: &[bf16],
    xp: &[u32],
    rows: usize,
    k: usize,
    steps: std::ops::Range<usize>,
    acc: &mut [[f32; PANEL]],
) {
    Panel::Bf16(w).check(k);
    assert!((1..=GEMV_ROWS).contains(&rows) && acc.len() >= rows && xp.len() >= rows * k.div_ceil(2));
    assert!(
        steps.start.is_multiple_of(QBLOCK) && steps.start <= steps.end && steps.end <= k,
        "kernels: steps {steps:?} of {k}"
    );
    let (t0, t1) = (steps.start, steps.end);
    // A piece ends on a pair boundary unless it ends the panel.
    assert!(t1 == k || t1.is_multiple_of(2), "kernels: steps {steps:?} split a pair");
    if level.bf16_dot() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `bf16_dot` holds only for AVX-512 CPUs reporting BF16; lengths checked above.
        unsafe {
            return avx512::gemv_bf16_pairs(w, xp, rows, k.div_ceil(2), t0, t1, acc);
        }
    }
    portable::gemv_bf16_pairs(w, xp, rows, k.div_ceil(2), t0, t1, acc)
}

/// Puts `gemv_bf16_pairs`' sums in column order, after the last steps.
pub fn gemv_bf16_pairs_finish(level: Level, rows: usize, acc: &mut [[f32; PANEL]]) {
    assert!(rows <= acc.len());
    if level.bf16_dot() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `gemv_bf16_pairs`; only `rows` rows of `acc` are touched.
        unsafe {
            avx512::gemv_bf16_pairs_finish(rows, acc)
        }
    }
}

/// Activation rows quantized per block of 32 for the integer kernels: `q` holds `rows` rows of
/// `kp` signed value bytes (zero-padded) and `lo` the residual bytes, so that an activation is
/// `d · (256 · q + lo)`; `s` is that integer's sum per row and block, `d` the unit per row and
/// block.
pub struct QRows<'a> {
    pub q: &'a [i8],
    pub lo: &'a [i8],
    /// Whether `lo` holds residual bytes. Without them (8-bit activations, the fast precision)
    /// `lo` is all zeros and the kernels skip its pass, which gives the same bits.
    pub residual: bool,
    /// `256 · q + lo` as one 16-bit integer (for `vpmaddwd`).
    pub x16: &'a [i16],
    pub d: &'a [f32],
    pub s: &'a [i32],
    pub rows: usize,
    pub kp: usize,
    /// Whether these are the first rows of their product: only they prefetch the weights (the
    /// others find them in cache).
    pub first: bool,
}

impl<'a> QRows<'a> {
    /// Rows `r0..r0 + n` of these.
    pub fn sub(&self, r0: usize, n: usize) -> QRows<'a> {
        let nb = self.kp / QBLOCK;
        QRows {
            q: &self.q[r0 * self.kp..],
            lo: &self.lo[r0 * self.kp..],
            residual: self.residual,
            x16: &self.x16[r0 * self.kp..],
            d: &self.d[r0 * nb..],
            s: &self.s[r0 * nb..],
            rows: n,
            kp: self.kp,
            first: self.first && r0 == 0,
        }
    }

    fn check(&self) {
        let nb = self.kp / QBLOCK;
        assert!(
            self.kp.is_multiple_of(QBLOCK)
                && self.q.len() >= self.rows * self.kp
                && self.lo.len() >= self.rows * self.kp
                && self.x16.len() >= self.rows * self.kp
                && self.d.len() >= self.rows * nb
                && self.s.len() >= self.rows * nb,
            "kernels: quantized activations do not match their shape"
        );
    }
}

/// One activation row's destination for `quantize_row` (see `quant::QuantActs`): `padded(k)`
/// value bytes, residual bytes and 16-bit values, and one unit and one sum per block.
pub struct QRowMut<'a> {
    pub q: &'a mut [i8],
    pub lo: &'a mut [i8],
    pub x16: &'a mut [i16],
    pub d: &'a mut [f32],
    pub s: &'a mut [i32],
    /// Whether to keep residual bytes; without them `lo` is written as zeros (8-bit
    /// activations: `x16 = 256 · q`).
    pub residual: bool,
}

/// A block's scale from its largest magnitude, and its inverse: 0 for an all-zero block, and for
/// a block so small (below ~4e-37) that the inverse would overflow, which then quantizes to zeros
/// (an error below `d`, as for any block) instead of clamping every value, padding included.
#[inline(always)]
fn act_scale(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    // 1/0 and an overflowing inverse are both infinite.
    let inv = 1.0 / d;
    (d, if inv.is_finite() { inv } else { 0.0 })
}

/// Quantizes one row of `k` activations for the integer kernels: per block of 32, value bytes
/// `q = round(x / d)` and residual bytes `lo = round((x / d - q) · 256)` (both clamped to ±127,
/// rounding half to even; `lo = 0` without `dst.residual`), `x16 = 256 · q + lo`, the unit
/// `d / 256` and the sum of `x16`.
/// Positions past `k` are written as zeros. Every level gives the same bits for finite inputs.
pub fn quantize_row(isa: Isa, x: &[f32], dst: QRowMut) {
    let kp = padded(x.len());
    let nb = kp / QBLOCK;
    assert!(
        dst.q.len() >= kp && dst.lo.len() >= kp && dst.x16.len() >= kp && dst.d.len() >= nb && dst.s.len() >= nb,
        "kernels: quantized row buffers too short for {} values",
        x.len()
    );
    match isa {
        // SAFETY: as in `gemv_steps`; the buffers hold whole blocks (checked above).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::quantize_row(x, dst) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::quantize_row(x, dst) },
        _ => portable::quantize_row(x, dst),
    }
}

/// `out[r][c] = Σ_t x[r][t] · P[t][c]` for a quad panel and `rows ≤ INT_ROWS` quantized
/// activation rows.
pub fn gemv_int(level: Level, p: Panel, a: &QRows, out: &mut [[f32; PANEL]]) {
    gemv_int_blocks(level, p, a, 0..a.kp / QBLOCK, out)
}

/// Blocks `blocks` of `gemv_int` added to `out` (from zero at block 0), as `gemv_steps`: the
/// result is the same bits as one call over all blocks.
pub fn gemv_int_blocks(level: Level, p: Panel, a: &QRows, blocks: std::ops::Range<usize>, out: &mut [[f32; PANEL]]) {
    a.check();
    p.check(a.kp);
    assert!(p.is_quads(), "kernels: gemv_int takes quad panels");
    assert!((1..=INT_ROWS).contains(&a.rows) && out.len() >= a.rows);
    assert!(
        blocks.start <= blocks.end && blocks.end <= a.kp / QBLOCK,
        "kernels: blocks {blocks:?}"
    );
    let (b0, b1) = (blocks.start, blocks.end);
    match (level.isa, level.dot) {
        // SAFETY: as in `gemv_steps`.
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, Dot::Vnni) => unsafe { avx512::gemv_int_vnni(p, a, b0, b1, out) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, _) => unsafe { avx512::gemv_int(p, a, b0, b1, out) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, Dot::Vnni) => unsafe { avx2::gemv_int_vnni(p, a, b0, b1, out) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, _) => unsafe { avx2::gemv_int(p, a, b0, b1, out) },
        #[cfg(target_arch = "aarch64")]
        (Isa::Neon, Dot::Dotprod) => unsafe { neon::gemv_int_dot(p, a, b0, b1, out) },
        _ => portable::gemv_int(p, a, b0, b1, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu::quant::QuantActs;
    use crate::model::cpu::test_data::rand_vec;

    struct Formats {
        wf: Vec<f32>,
        bf: Vec<bf16>,
        hf: Vec<f16>,
        q: Vec<i8>,
        d: Vec<f16>,
        q4: Vec<u8>,
        d4: Vec<f16>,
        m4: Vec<f16>,
        q8x4: Vec<i8>,
        q4x8: Vec<u8>,
        d4n: Vec<f16>,
        m4n: Vec<f16>,
    }

    impl Formats {
        /// The integer kernels' panels (Q8x4 and Q4x8).
        fn quads(&self) -> [Panel<'_>; 2] {
            [
                Panel::Q8x4 {
                    q: &self.q8x4,
                    d: &self.d,
                },
                Panel::Q4x8 {
                    q: &self.q4x8,
                    d: &self.d4n,
                    m: &self.m4n,
                },
            ]
        }
    }

    /// The same pseudo-random panel in every format.
    fn formats(k: usize) -> Formats {
        let wf = rand_vec(k * PANEL, 3);
        let nb = k.div_ceil(QBLOCK);
        let q: Vec<i8> = (0..k * PANEL)
            .map(|i| (((i * 89 + 7) % 255) as i32 - 127) as i8)
            .collect();
        let d: Vec<f16> = (0..nb * PANEL)
            .map(|i| f16::from_f32(0.01 + (i % 7) as f32 * 0.001))
            .collect();
        let q4: Vec<u8> = (0..k * PANEL / 2).map(|i| ((i * 37 + 11) % 256) as u8).collect();
        let d4: Vec<f16> = (0..nb * PANEL)
            .map(|i| f16::from_f32(0.02 + (i % 5) as f32 * 0.003))
            .collect();
        let m4: Vec<f16> = (0..nb * PANEL)
            .map(|i| f16::from_f32(-0.1 + (i % 3) as f32 * 0.05))
            .collect();
        // The quad layouts hold the same values as the steps ones.
        let (q8x4, q4x8, d4n, m4n) = pack_quads(k, &q, &q4, &d4, &m4);
        Formats {
            bf: wf.iter().map(|v| bf16::from_f32(*v)).collect(),
            hf: wf.iter().map(|v| f16::from_f32(*v)).collect(),
            wf,
            q,
            d,
            q4,
            d4,
            m4,
            q8x4,
            q4x8,
            d4n,
            m4n,
        }
    }

    /// Steps-layout Q8_0 and Q4 panels repacked as quads (scales in column order).
    #[allow(clippy::type_complexity)]
    fn pack_quads(k: usize, q: &[i8], q4: &[u8], d4: &[f16], m4: &[f16]) -> (Vec<i8>, Vec<u8>, Vec<f16>, Vec<f16>) {
        let kp = padded(k);
        let mut q8x4 = vec![0i8; kp * PANEL];
        let mut q4x8 = vec![0u8; kp * PANEL / 2];
        let (mut dn, mut mn) = (d4.to_vec(), m4.to_vec());
        for t in 0..k {
            for c in 0..PANEL {
                q8x4[quad_index(t, c)] = q[t * PANEL + c];
                let byte = q4[t * (PANEL / 2) + c / 2];
                let nib = if c % 2 == 0 { byte & 0xF } else { byte >> 4 };
                let (i, high) = octet_index(t, c);
                q4x8[i] |= if high { nib << 4 } else { nib };
            }
        }
        for b in 0..k.div_ceil(QBLOCK) {
            for c in 0..PANEL {
                dn[b * PANEL + c] = d4[b * PANEL + q4_scale_index(c)];
                mn[b * PANEL + c] = m4[b * PANEL + q4_scale_index(c)];
            }
        }
        (q8x4, q4x8, dn, mn)
    }

    /// Row-major activation rows as the float decode kernels take them.
    fn step_major(x: &[f32], rows: usize, k: usize) -> Vec<f32> {
        let mut t = vec![0f32; rows * k];
        for r in 0..rows {
            for s in 0..k {
                t[s * rows + r] = x[r * k + s];
            }
        }
        t
    }

    fn reference(p: Panel, x: &[f32], k: usize, r: usize, c: usize) -> f64 {
        (0..k).map(|t| x[r * k + t] as f64 * panel_value(p, t, c) as f64).sum()
    }

    #[test]
    fn float_kernels_match_reference_for_every_format_isa_and_length() {
        for k in [1, 2, 3, 31, 32, 33, 64, 95, 960] {
            let f = formats(k);
            let panels = [
                Panel::Q4 {
                    q: &f.q4,
                    d: &f.d4,
                    m: &f.m4,
                },
                Panel::F32(&f.wf),
                Panel::Bf16(&f.bf),
                Panel::F16(&f.hf),
                Panel::Q8_0 { q: &f.q, d: &f.d },
            ];
            for p in panels {
                for rows in 1..=GEMV_ROWS {
                    let x = rand_vec(rows * k, 9);
                    let xt = step_major(&x, rows, k);
                    for isa in Isa::supported() {
                        let mut out = [[0f32; PANEL]; GEMV_ROWS];
                        gemv(isa, p, &xt, rows, k, &mut out);
                        for c in 0..PANEL {
                            for r in 0..rows {
                                let want = reference(p, &x, k, r, c);
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

    #[test]
    fn a_rows_result_does_not_depend_on_the_rows_beside_it() {
        // Bit for bit: what lets a batched step give each sequence exactly what it gets alone.
        let k = 95;
        let f = formats(k);
        let float = [
            Panel::Q4 {
                q: &f.q4,
                d: &f.d4,
                m: &f.m4,
            },
            Panel::F32(&f.wf),
            Panel::Bf16(&f.bf),
            Panel::F16(&f.hf),
            Panel::Q8_0 { q: &f.q, d: &f.d },
        ];
        let x = rand_vec(GEMV_ROWS.max(INT_ROWS) * k, 11);
        for isa in Isa::supported() {
            for p in float {
                let mut all = [[0f32; PANEL]; GEMV_ROWS];
                gemv(isa, p, &step_major(&x, GEMV_ROWS, k), GEMV_ROWS, k, &mut all);
                for rows in 1..GEMV_ROWS {
                    let mut some = [[0f32; PANEL]; GEMV_ROWS];
                    gemv(isa, p, &step_major(&x, rows, k), rows, k, &mut some);
                    assert_eq!(some[..rows], all[..rows], "{isa:?} rows={rows}");
                }
            }
        }
        let quads = f.quads();
        for residual in [true, false] {
            let mut acts = QuantActs::default();
            acts.quantize(&x, INT_ROWS, k, residual);
            for level in Level::supported() {
                for p in quads {
                    let mut all = [[0f32; PANEL]; INT_ROWS];
                    gemv_int(level, p, &acts.rows(0, INT_ROWS), &mut all);
                    for r0 in 0..INT_ROWS {
                        for rows in 1..=INT_ROWS - r0 {
                            let mut some = [[0f32; PANEL]; INT_ROWS];
                            gemv_int(level, p, &acts.rows(r0, rows), &mut some);
                            assert_eq!(
                                some[..rows],
                                all[r0..r0 + rows],
                                "{} residual={residual} r0={r0} rows={rows}",
                                level.name()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn skipping_the_residual_pass_of_8_bit_activations_gives_the_same_bits() {
        let k = 960;
        let f = formats(k);
        let x = rand_vec(INT_ROWS * k, 16);
        let mut acts = QuantActs::default();
        acts.quantize(&x, INT_ROWS, k, false);
        let skipped = acts.rows(0, INT_ROWS);
        assert!(!skipped.residual && skipped.lo.iter().all(|b| *b == 0));
        // The same rows with the (zero) residual pass run.
        let run = QRows {
            residual: true,
            ..acts.rows(0, INT_ROWS)
        };
        for level in Level::supported() {
            for p in f.quads() {
                let (mut a, mut b) = ([[0f32; PANEL]; INT_ROWS], [[0f32; PANEL]; INT_ROWS]);
                gemv_int(level, p, &skipped, &mut a);
                gemv_int(level, p, &run, &mut b);
                assert_eq!(a, b, "{}", level.name());
            }
        }
    }

    #[test]
    fn a_panel_taken_a_piece_at_a_time_gives_the_same_bits() {
        let k = 160;
        let f = formats(k);
        let float = [
            Panel::Q4 {
                q: &f.q4,
                d: &f.d4,
                m: &f.m4,
            },
            Panel::F32(&f.wf),
            Panel::Bf16(&f.bf),
            Panel::Q8_0 { q: &f.q, d: &f.d },
        ];
        let rows = 3;
        let x = step_major(&rand_vec(rows * k, 12), rows, k);
        for isa in Isa::supported() {
            for p in float {
                let mut whole = [[0f32; PANEL]; GEMV_ROWS];
                gemv(isa, p, &x, rows, k, &mut whole);
                let mut pieces = [[f32::NAN; PANEL]; GEMV_ROWS];
                for steps in [0..64, 64..96, 96..160] {
                    gemv_steps(isa, p, &x, rows, k, steps, &mut pieces);
                }
                gemv_finish(isa, p, rows, &mut pieces);
                assert_eq!(pieces[..rows], whole[..rows], "{isa:?}");
            }
        }
        for residual in [true, false] {
            let mut acts = QuantActs::default();
            acts.quantize(&rand_vec(rows * k, 13), rows, k, residual);
            for level in Level::supported() {
                for p in f.quads() {
                    let mut whole = [[0f32; PANEL]; INT_ROWS];
                    gemv_int(level, p, &acts.rows(0, rows), &mut whole);
                    let mut pieces = [[f32::NAN; PANEL]; INT_ROWS];
                    for blocks in [0..2, 2..3, 3..5] {
                        gemv_int_blocks(level, p, &acts.rows(0, rows), blocks, &mut pieces);
                    }
                    assert_eq!(pieces[..rows], whole[..rows], "{} residual={residual}", level.name());
                }
            }
        }
    }

    /// `gemv_bf16_pairs` over the pieces between `bounds` then finished, for `rows` rows of `x`
    /// (row-major).
    fn bf16_dot(level: Level, w: &[bf16], x: &[f32], rows: usize, k: usize, bounds: &[usize]) -> Vec<[f32; PANEL]> {
        let mut xp = Vec::new();
        bf16_pairs(x, rows, k, &mut xp);
        let mut acc = vec![[f32::NAN; PANEL]; rows];
        for b in bounds.windows(2) {
            gemv_bf16_pairs(level, w, &xp, rows, k, b[0]..b[1], &mut acc);
        }
        gemv_bf16_pairs_finish(level, rows, &mut acc);
        acc
    }

    #[test]
    fn bf16_dot_kernels_multiply_bf16_rounded_activations_at_every_level() {
        let levels = Level::supported();
        eprintln!(
            "BF16 dot products here: {:?}",
            levels
                .iter()
                .filter(|l| l.bf16_dot())
                .map(|l| l.name())
                .collect::<Vec<_>>()
        );
        for k in [1, 2, 3, 31, 32, 33, 64, 95, 960] {
            let f = formats(k);
            let p = Panel::Bf16(&f.bf);
            for rows in 1..=GEMV_ROWS {
                let x = rand_vec(rows * k, 9);
                let rounded: Vec<f32> = x.iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
                for &level in &levels {
                    let got = bf16_dot(level, &f.bf, &x, rows, k, &[0, k]);
                    for r in 0..rows {
                        for c in 0..PANEL {
                            let want = reference(p, &rounded, k, r, c);
                            assert!(
                                (got[r][c] as f64 - want).abs() < 1e-4 * (k as f64).sqrt(),
                                "{} k={k} rows={rows} r={r} c={c}: {} vs {want}",
                                level.name(),
                                got[r][c]
                            );
                        }
                    }
                    // Not the exact product: the activations were rounded.
                    if k == 960 && rows == 1 {
                        let exact = reference(p, &x, k, 0, 0);
                        assert!((got[0][0] as f64 - exact).abs() > 1e-6, "{}", level.name());
                    }
                }
            }
        }
    }

    #[test]
    fn activations_round_to_bf16_as_the_half_crate_does() {
        // Ties both ways, the largest finite values, infinities, subnormals and odd lengths.
        let mut x: Vec<f32> = [
            1.0f32 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            -1.0 - 2f32.powi(-8),
            f32::MAX,
        ]
        .into_iter()
        .chain([f32::MIN, f32::INFINITY, f32::NEG_INFINITY, 1e-40, -3e-39, 0.0, -0.0])
        .collect();
        x.extend(rand_vec(40, 17).iter().map(|v| v * 1e3));
        for k in [x.len(), x.len() - 1] {
            let mut xp = Vec::new();
            bf16_pairs(&x[..k], 1, k, &mut xp);
            assert_eq!(xp.len(), k.div_ceil(2));
            for t in 0..k {
                let got = (xp[t / 2] >> (16 * (t % 2))) as u16;
                assert_eq!(got, bf16::from_f32(x[t]).to_bits(), "{} at {t}", x[t]);
            }
            if k % 2 == 1 {
                assert_eq!(xp[k / 2] >> 16, 0, "the pad is zero");
            }
        }
        let mut xp = Vec::new();
        bf16_pairs(&[f32::NAN, -f32::NAN], 1, 2, &mut xp);
        assert!(bf16::from_bits(xp[0] as u16).is_nan() && bf16::from_bits((xp[0] >> 16) as u16).is_nan());
        // Rows of no values are no pairs (not a panic).
        bf16_pairs(&[], 3, 0, &mut xp);
        assert!(xp.is_empty());
    }

    #[test]
    fn bf16_dot_rows_and_pieces_do_not_change_a_rows_bits() {
        let k = 160;
        let f = formats(k);
        let x = rand_vec(GEMV_ROWS * k, 14);
        for level in Level::supported() {
            let all = bf16_dot(level, &f.bf, &x, GEMV_ROWS, k, &[0, k]);
            for rows in 1..GEMV_ROWS {
                assert_eq!(
                    bf16_dot(level, &f.bf, &x, rows, k, &[0, k]),
                    all[..rows],
                    "{} rows={rows}",
                    level.name()
                );
            }
            let pieces = bf16_dot(level, &f.bf, &x, 3, k, &[0, 64, 96, 160]);
            assert_eq!(pieces, all[..3], "{}", level.name());
        }
    }

    #[test]
    fn widening_gives_every_stored_value_exactly() {
        for k in [1, 3, 31, 32, 33, 64, 95, 960] {
            let f = formats(k);
            let panels = [
                Panel::Q4 {
                    q: &f.q4,
                    d: &f.d4,
                    m: &f.m4,
                },
                Panel::F32(&f.wf),
                Panel::Bf16(&f.bf),
                Panel::F16(&f.hf),
                Panel::Q8_0 { q: &f.q, d: &f.d },
                Panel::Q8x4 { q: &f.q8x4, d: &f.d },
                Panel::Q4x8 {
                    q: &f.q4x8,
                    d: &f.d4n,
                    m: &f.m4n,
                },
            ];
            for p in panels {
                for isa in Isa::supported() {
                    let mut wide = vec![f32::NAN; k * PANEL];
                    widen(isa, p, k, &mut wide);
                    for t in 0..k {
                        for c in 0..PANEL {
                            assert_eq!(wide[t * PANEL + c], panel_value(p, t, c), "{isa:?} k={k} t={t} c={c}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn quad_layouts_hold_the_same_weights_as_the_steps_layouts() {
        let k = 95;
        let f = formats(k);
        for t in 0..k {
            for c in 0..PANEL {
                let q8 = Panel::Q8_0 { q: &f.q, d: &f.d };
                let q8x4 = Panel::Q8x4 { q: &f.q8x4, d: &f.d };
                assert_eq!(panel_value(q8, t, c), panel_value(q8x4, t, c));
                let q4 = Panel::Q4 {
                    q: &f.q4,
                    d: &f.d4,
                    m: &f.m4,
                };
                let q4x8 = Panel::Q4x8 {
                    q: &f.q4x8,
                    d: &f.d4n,
                    m: &f.m4n,
                };
                assert_eq!(panel_value(q4, t, c), panel_value(q4x8, t, c));
            }
        }
    }

    #[test]
    fn every_level_quantizes_activations_to_the_same_bits() {
        for k in [1, 5, 31, 32, 33, 64, 95, 960] {
            let mut x = rand_vec(k, 21);
            // An all-zero block and values far apart in one block.
            if k >= 64 {
                x[32..64].fill(0.0);
                x[1] = 1e4;
            }
            // A block too small to invert its scale, and one with unit scale (largest 127) that
            // holds exact rounding ties: 2.5 for the value byte, 1.5/256 for the residual.
            if k >= 128 {
                x[64..96].fill(1e-38);
                x[65] = 0.0;
                x[66] = -1e-38;
                x[96] = 127.0;
                x[97] = 2.5;
                x[98] = -3.0 - 1.5 / 256.0;
                x[99] = 0.5 / 256.0;
            }
            let kp = padded(k);
            let nb = kp / QBLOCK;
            let run = |isa: Isa, residual: bool| {
                let (mut q, mut lo, mut x16) = (vec![9i8; kp], vec![9i8; kp], vec![9i16; kp]);
                let (mut d, mut s) = (vec![f32::NAN; nb], vec![7i32; nb]);
                let dst = QRowMut {
                    q: &mut q,
                    lo: &mut lo,
                    x16: &mut x16,
                    d: &mut d,
                    s: &mut s,
                    residual,
                };
                quantize_row(isa, &x, dst);
                (q, lo, x16, d, s)
            };
            // Without residual bytes: the same value bytes, units and bits at every level, `lo`
            // all zeros and everything else following from `q`.
            let (q8, lo8, x8, d8, s8) = run(Isa::Portable, false);
            for isa in Isa::supported() {
                assert!(
                    run(isa, false) == (q8.clone(), lo8.clone(), x8.clone(), d8.clone(), s8.clone()),
                    "{isa:?} k={k}"
                );
            }
            let want = run(Isa::Portable, true);
            assert!(lo8.iter().all(|v| *v == 0) && q8 == want.0 && d8 == want.3, "k={k}");
            for b in 0..nb {
                let at = b * QBLOCK..(b + 1) * QBLOCK;
                assert!(x8[at.clone()]
                    .iter()
                    .zip(&q8[at.clone()])
                    .all(|(w, v)| *w == 256 * *v as i16));
                assert_eq!(s8[b], 256 * q8[at].iter().map(|v| *v as i32).sum::<i32>());
            }
            for isa in Isa::supported() {
                assert!(run(isa, true) == want, "{isa:?} k={k}");
            }
            let (q, lo, x16, d, s) = want;
            assert!(q[k..].iter().chain(&lo[k..]).all(|v| *v == 0) && x16[k..].iter().all(|v| *v == 0));
            for t in 0..k {
                assert_eq!(x16[t] as i32, 256 * q[t] as i32 + lo[t] as i32);
                let back = x16[t] as f32 * d[t / QBLOCK];
                assert!(
                    (back - x[t]).abs() <= d[t / QBLOCK] + 1e-6,
                    "k={k} t={t}: {back} vs {}",
                    x[t]
                );
            }
            for b in 0..nb {
                assert_eq!(
                    s[b],
                    x16[b * QBLOCK..(b + 1) * QBLOCK].iter().map(|v| *v as i32).sum::<i32>()
                );
            }
        }
    }

    #[test]
    fn integer_kernels_match_reference_on_quantized_activations() {
        for k in [1, 31, 32, 33, 64, 95, 960, 2560] {
            let f = formats(k);
            let panels = f.quads();
            for (p, residual) in panels.into_iter().flat_map(|p| [(p, true), (p, false)]) {
                for rows in 1..=INT_ROWS {
                    let x = rand_vec(rows * k, 5);
                    let mut acts = QuantActs::default();
                    acts.quantize(&x, rows, k, residual);
                    // The reference multiplies the dequantized activations in f64.
                    let xq = acts.dequantized(rows, k);
                    for level in Level::supported() {
                        let mut out = [[f32::NAN; PANEL]; INT_ROWS];
                        gemv_int(level, p, &acts.rows(0, rows), &mut out);
                        for r in 0..rows {
                            for c in 0..PANEL {
                                let want = reference(p, &xq, k, r, c);
                                let got = out[r][c] as f64;
                                assert!(
                                    (got - want).abs() < 2e-5 * (k as f64).sqrt() * (1.0 + want.abs()),
                                    "{} k={k} residual={residual} rows={rows} r={r} c={c}: {got} vs {want}",
                                    level.name()
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
