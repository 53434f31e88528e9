//! A weight matrix in the CPU engine's arena, stored as panels of 32 output rows (see
//! `kernels.rs`) in one of the formats the kernels compute with directly, and the threaded product
//! `out = x · Wᵀ` for any number of activation rows.
//!
//! Few rows (decoding) stream every panel once from its stored format. Many rows (prefill) widen
//! a panel to f32 once and run the outer-product micro-kernel of `gemm.rs` over all rows.
//! Activations are always f32, so every format computes with exactly its stored weights.

// Register-blocked kernels index several arrays with the same counters; explicit loops read
// closer to the math than iterator chains.
#![allow(clippy::needless_range_loop)]

use half::{bf16, f16};
use rayon::prelude::*;

use super::arena::{Arena, ArenaWriter, Region};
use super::gemm::{gemm_panels, Out};
use super::kernels::{panel_gemv, panel_value, q4_scale_index, Isa, Panel, PANEL, QBLOCK};
use super::quant::{quantize_row_q4, quantize_row_q8_0};

/// Storage format of a weight matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    F32,
    Bf16,
    F16,
    Q8_0,
    /// 4-bit blocks of 32 with a scale (llama.cpp's Q4_0: values (q - 8) · d).
    Q4_0,
    /// 4-bit blocks of 32 with a scale and an offset (llama.cpp's Q4_1: q · d + m).
    Q4_1,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::F32 => "f32",
            Format::Bf16 => "bf16",
            Format::F16 => "f16",
            Format::Q8_0 => "q8_0",
            Format::Q4_0 => "q4_0",
            Format::Q4_1 => "q4_1",
        }
    }

    /// Bytes a `rows x cols` matrix occupies (rows padded to whole panels).
    pub fn bytes(self, rows: usize, cols: usize) -> usize {
        let rows = rows.div_ceil(PANEL) * PANEL;
        match self {
            Format::F32 => rows * cols * 4,
            Format::Bf16 | Format::F16 => rows * cols * 2,
            Format::Q8_0 => rows * cols + rows * cols.div_ceil(QBLOCK) * 4,
            Format::Q4_0 | Format::Q4_1 => rows * cols / 2 + rows * cols.div_ceil(QBLOCK) * 4,
        }
    }

    /// Arena bytes, alignment padding included.
    pub fn arena_bytes(self, rows: usize, cols: usize) -> usize {
        let n = rows.div_ceil(PANEL) * PANEL * cols;
        match self {
            Format::F32 => Arena::size_of::<f32>(n),
            Format::Bf16 | Format::F16 => Arena::size_of::<u16>(n),
            Format::Q8_0 => {
                Arena::size_of::<i8>(n) + Arena::size_of::<f32>(rows.div_ceil(PANEL) * PANEL * cols.div_ceil(QBLOCK))
            }
            Format::Q4_0 | Format::Q4_1 => {
                let scales = rows.div_ceil(PANEL) * PANEL * cols.div_ceil(QBLOCK);
                Arena::size_of::<u8>(n / 2) + 2 * Arena::size_of::<f16>(scales)
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum MatData {
    F32(Region<f32>),
    Bf16(Region<bf16>),
    F16(Region<f16>),
    Q8_0 {
        q: Region<i8>,
        d: Region<f32>,
    },
    /// Nibbles, scales and offsets (see `kernels::Panel::Q4`); `q4_0` tells the two flavours apart.
    Q4 {
        q: Region<u8>,
        d: Region<f16>,
        m: Region<f16>,
        q4_0: bool,
    },
}

/// A `rows x cols` weight matrix (output features x input features) in panels of 32 rows.
#[derive(Debug, Clone, Copy)]
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: MatData,
}

impl QMatrix {
    /// Reserves a zeroed matrix in `arena`.
    pub fn alloc(arena: &mut Arena, format: Format, rows: usize, cols: usize) -> anyhow::Result<Self> {
        let n = rows.div_ceil(PANEL) * PANEL * cols;
        let data = match format {
            Format::F32 => MatData::F32(arena.alloc(n)?),
            Format::Bf16 => MatData::Bf16(arena.alloc(n)?),
            Format::F16 => MatData::F16(arena.alloc(n)?),
            Format::Q8_0 => MatData::Q8_0 {
                q: arena.alloc(n)?,
                d: arena.alloc(rows.div_ceil(PANEL) * PANEL * cols.div_ceil(QBLOCK))?,
            },
            Format::Q4_0 | Format::Q4_1 => {
                let scales = rows.div_ceil(PANEL) * PANEL * cols.div_ceil(QBLOCK);
                MatData::Q4 {
                    q: arena.alloc(n / 2)?,
                    d: arena.alloc(scales)?,
                    m: arena.alloc(scales)?,
                    q4_0: format == Format::Q4_0,
                }
            }
        };
        Ok(Self { rows, cols, data })
    }

    pub fn format(&self) -> Format {
        match self.data {
            MatData::F32(_) => Format::F32,
            MatData::Bf16(_) => Format::Bf16,
            MatData::F16(_) => Format::F16,
            MatData::Q8_0 { .. } => Format::Q8_0,
            MatData::Q4 { q4_0: true, .. } => Format::Q4_0,
            MatData::Q4 { .. } => Format::Q4_1,
        }
    }

    /// Bytes one product reads (the weight traffic of one decode step).
    pub fn bytes(&self) -> usize {
        self.format().bytes(self.rows, self.cols)
    }

    pub fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL)
    }

    /// Panel `b` borrowed from the arena.
    pub fn panel<'a>(&self, arena: &'a Arena, b: usize) -> Panel<'a> {
        let (k, len) = (self.cols, self.cols * PANEL);
        let dl = self.cols.div_ceil(QBLOCK) * PANEL;
        match self.data {
            MatData::F32(r) => Panel::F32(&arena.get(r)[b * len..(b + 1) * len]),
            MatData::Bf16(r) => Panel::Bf16(&arena.get(r)[b * len..(b + 1) * len]),
            MatData::F16(r) => Panel::F16(&arena.get(r)[b * len..(b + 1) * len]),
            MatData::Q8_0 { q, d } => {
                let _ = k;
                Panel::Q8_0 {
                    q: &arena.get(q)[b * len..(b + 1) * len],
                    d: &arena.get(d)[b * dl..(b + 1) * dl],
                }
            }
            MatData::Q4 { q, d, m, .. } => Panel::Q4 {
                q: &arena.get(q)[b * len / 2..(b + 1) * len / 2],
                d: &arena.get(d)[b * dl..(b + 1) * dl],
                m: &arena.get(m)[b * dl..(b + 1) * dl],
            },
        }
    }

    /// Writes the 32 rows of panel `b` from row-major f32 values (`rows.len() = 32 * cols`; rows
    /// past the matrix end are ignored), converting or quantizing to the matrix's format.
    pub fn set_panel(&self, arena: &mut Arena, b: usize, rows: &[f32]) {
        let w = arena.writer();
        // SAFETY: the only writer, for one panel.
        unsafe { self.write_panel(w, b, rows) }
    }

    /// `set_panel` through a shared writer, for filling panels in parallel.
    ///
    /// # Safety
    /// No other thread may write panel `b` of this matrix at the same time.
    pub unsafe fn write_panel(&self, w: ArenaWriter, b: usize, rows: &[f32]) {
        let k = self.cols;
        let (lo, hi) = (b * k * PANEL, (b + 1) * k * PANEL);
        let live = PANEL.min(self.rows - b * PANEL);
        match self.data {
            MatData::F32(r) => transpose_into(w.range_mut(r, lo, hi), rows, k, live, |v| v),
            MatData::Bf16(r) => transpose_into(w.range_mut(r, lo, hi), rows, k, live, bf16::from_f32),
            MatData::F16(r) => transpose_into(w.range_mut(r, lo, hi), rows, k, live, f16::from_f32),
            MatData::Q8_0 { q, d } => {
                let nb = k.div_ceil(QBLOCK);
                let qs = w.range_mut(q, lo, hi);
                let ds = w.range_mut(d, b * nb * PANEL, (b + 1) * nb * PANEL);
                let mut qrow = vec![0i8; k];
                let mut drow = vec![0f32; nb];
                for c in 0..live {
                    quantize_row_q8_0(&rows[c * k..(c + 1) * k], &mut qrow, &mut drow);
                    for t in 0..k {
                        qs[t * PANEL + c] = qrow[t];
                    }
                    for (tb, dv) in drow.iter().enumerate() {
                        ds[tb * PANEL + c] = *dv;
                    }
                }
            }
            MatData::Q4 { q, d, m, q4_0 } => {
                let nb = k.div_ceil(QBLOCK);
                let mut nib = vec![0u8; k];
                let mut drow = vec![(0f32, 0f32); nb];
                let columns: Vec<Q4Column> = (0..live)
                    .map(|c| {
                        quantize_row_q4(&rows[c * k..(c + 1) * k], q4_0, &mut nib, &mut drow);
                        Q4Column {
                            nibbles: nib.clone(),
                            scales: drow
                                .iter()
                                .map(|(dv, mv)| (f16::from_f32(*dv), f16::from_f32(*mv)))
                                .collect(),
                        }
                    })
                    .collect();
                self.write_q4_columns(w, b, q, d, m, &columns);
            }
        }
    }

    /// Writes Q4 columns (one per live row of panel `b`) into the panel layout.
    ///
    /// # Safety
    /// As `write_panel`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn write_q4_columns(
        &self,
        w: ArenaWriter,
        b: usize,
        q: Region<u8>,
        d: Region<f16>,
        m: Region<f16>,
        columns: &[Q4Column],
    ) {
        let k = self.cols;
        let nb = k.div_ceil(QBLOCK);
        let qs = w.range_mut(q, b * k * PANEL / 2, (b + 1) * k * PANEL / 2);
        let ds = w.range_mut(d, b * nb * PANEL, (b + 1) * nb * PANEL);
        let ms = w.range_mut(m, b * nb * PANEL, (b + 1) * nb * PANEL);
        for (c, col) in columns.iter().enumerate() {
            let shift = if c % 2 == 0 { 0 } else { 4 };
            for t in 0..k {
                let byte = &mut qs[t * (PANEL / 2) + c / 2];
                *byte = (*byte & !(0xF << shift)) | ((col.nibbles[t] & 0xF) << shift);
            }
            for (tb, (dv, mv)) in col.scales.iter().enumerate() {
                ds[tb * PANEL + q4_scale_index(c)] = *dv;
                ms[tb * PANEL + q4_scale_index(c)] = *mv;
            }
        }
    }

    /// Writes panel `b` straight from stored little-endian rows of its own element type (no
    /// conversion, just the transpose): the fast path of loading a BF16 checkpoint as BF16.
    /// Returns false when the format has no raw path (Q8_0).
    ///
    /// # Safety
    /// As `write_panel`.
    pub unsafe fn write_panel_raw(&self, w: ArenaWriter, b: usize, rows: &[&[u8]]) -> bool {
        let k = self.cols;
        let (lo, hi) = (b * k * PANEL, (b + 1) * k * PANEL);
        match self.data {
            MatData::Bf16(r) => transpose_bytes(w.range_mut(r, lo, hi), rows, k, |v: [u8; 2]| {
                bf16::from_bits(u16::from_le_bytes(v))
            }),
            MatData::F16(r) => transpose_bytes(w.range_mut(r, lo, hi), rows, k, |v: [u8; 2]| {
                f16::from_bits(u16::from_le_bytes(v))
            }),
            MatData::F32(r) => transpose_bytes(w.range_mut(r, lo, hi), rows, k, f32::from_le_bytes),
            MatData::Q8_0 { .. } | MatData::Q4 { .. } => return false,
        }
        true
    }

    /// Row `r` as f32 (embedding lookups).
    pub fn row_f32(&self, arena: &Arena, r: usize, dst: &mut [f32]) {
        let p = self.panel(arena, r / PANEL);
        for (t, v) in dst.iter_mut().enumerate().take(self.cols) {
            *v = panel_value(p, t, r % PANEL);
        }
    }
}

/// One row of a matrix in Q4 form: a nibble per weight and (scale, offset) per block of 32.
pub struct Q4Column {
    pub nibbles: Vec<u8>,
    pub scales: Vec<(f16, f16)>,
}

/// `dst[t * 32 + c] = conv(src[c * k + t])` for the first `live` columns.
fn transpose_into<T: Copy>(dst: &mut [T], src: &[f32], k: usize, live: usize, conv: impl Fn(f32) -> T) {
    const TB: usize = 32;
    for t0 in (0..k).step_by(TB) {
        for c in 0..live {
            for t in t0..(t0 + TB).min(k) {
                dst[t * PANEL + c] = conv(src[c * k + t]);
            }
        }
    }
}

/// `dst[t * 32 + c] = conv(rows[c][t])` for stored elements of `S` bytes.
/// Blocked by 32 input steps so that the rows read and the panel lines written stay in L1.
fn transpose_bytes<T: Copy, const S: usize>(dst: &mut [T], rows: &[&[u8]], k: usize, conv: impl Fn([u8; S]) -> T) {
    const TB: usize = 32;
    for t0 in (0..k).step_by(TB) {
        let t1 = (t0 + TB).min(k);
        for (c, row) in rows.iter().enumerate() {
            for (t, chunk) in row[t0 * S..t1 * S].chunks_exact(S).enumerate() {
                let mut v = [0u8; S];
                v.copy_from_slice(chunk);
                dst[(t0 + t) * PANEL + c] = conv(v);
            }
        }
    }
}

/// Rows of activations up to which the product streams weights panel by panel (decoding).
const GEMV_MAX_ROWS: usize = 3;

/// `out[i * rows + j] = Σ_t x[i * cols + t] · W[j][t]` for `m` activation rows.
pub fn matmul(arena: &Arena, w: &QMatrix, x: &[f32], m: usize, out: &mut [f32]) {
    matmul_with(Isa::get(), arena, w, x, m, out)
}

/// As `matmul`, with an explicit instruction set (tests of every path).
pub fn matmul_with(isa: Isa, arena: &Arena, w: &QMatrix, x: &[f32], m: usize, out: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "activations have the wrong length");
    assert_eq!(out.len(), m * n, "output has the wrong length");
    if m == 0 || n == 0 {
        return;
    }
    if m > GEMV_MAX_ROWS {
        gemm_panels(isa, x, m, k, n, out, &|b| w.panel(arena, b));
        return;
    }
    let out_ptr = Out(out.as_mut_ptr());
    let panels = w.panels();
    let threads = rayon::current_num_threads().max(1);
    // A few chunks per thread balances uneven cores without tiny tasks.
    let chunk = panels.div_ceil(threads * 4).max(1);
    (0..panels.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let mut acc = [[0f32; PANEL]; 3];
        for b in c * chunk..((c + 1) * chunk).min(panels) {
            panel_gemv(isa, w.panel(arena, b), x, m, k, &mut acc);
            let j0 = b * PANEL;
            let live = PANEL.min(n - j0);
            for (i, row) in acc.iter().enumerate().take(m) {
                // SAFETY: columns of this panel belong to this task alone.
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out_ptr.at(i * n + j0), live) };
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu::arena::Placement;
    use crate::model::cpu::test_data::rand_vec;

    /// A matrix filled from row-major f32 values.
    pub(crate) fn build(format: Format, wf: &[f32], n: usize, k: usize) -> (Arena, QMatrix) {
        let mut arena = Arena::new(format.arena_bytes(n, k) + 256, Placement::Normal).unwrap();
        let w = QMatrix::alloc(&mut arena, format, n, k).unwrap();
        for b in 0..w.panels() {
            let mut rows = vec![0f32; PANEL * k];
            let live = PANEL.min(n - b * PANEL);
            rows[..live * k].copy_from_slice(&wf[b * PANEL * k..(b * PANEL + live) * k]);
            w.set_panel(&mut arena, b, &rows);
        }
        (arena, w)
    }

    #[test]
    fn every_format_and_path_matches_a_plain_reference() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 33, 17),
            (2, 64, 5),
            (3, 100, 37),
            (4, 16, 16),
            (5, 31, 19),
            (9, 97, 33),
            (70, 40, 21),
            (130, 64, 65),
        ] {
            let wf = rand_vec(n * k, 1);
            let x = rand_vec(m * k, 2);
            for format in [
                Format::F32,
                Format::Bf16,
                Format::F16,
                Format::Q8_0,
                Format::Q4_0,
                Format::Q4_1,
            ] {
                let (arena, w) = build(format, &wf, n, k);
                // The reference uses the stored (rounded) weights.
                let mut deq = vec![0f32; n * k];
                for r in 0..n {
                    w.row_f32(&arena, r, &mut deq[r * k..(r + 1) * k]);
                    for t in 0..k {
                        let tol = match format {
                            Format::F32 => 0.0,
                            Format::F16 => 1e-3,
                            Format::Bf16 => 1e-2,
                            Format::Q8_0 => 1e-2,
                            Format::Q4_0 | Format::Q4_1 => 0.15,
                        };
                        assert!((deq[r * k + t] - wf[r * k + t]).abs() <= tol, "{format:?} stored value");
                    }
                }
                for isa in Isa::supported() {
                    let mut out = vec![f32::NAN; m * n];
                    matmul_with(isa, &arena, &w, &x, m, &mut out);
                    for i in 0..m {
                        for j in 0..n {
                            let want: f64 = (0..k).map(|t| x[i * k + t] as f64 * deq[j * k + t] as f64).sum();
                            let got = out[i * n + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-4 * (k as f64).sqrt(),
                                "{format:?} {isa:?} m={m} k={k} n={n} [{i},{j}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
