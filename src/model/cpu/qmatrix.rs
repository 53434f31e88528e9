//! A weight matrix in the CPU engine's arena, stored as panels of 32 output rows (see
//! `kernels/mod.rs`) in one of the formats the kernels compute with directly, and the threaded
//! product `out = x · Wᵀ` for any number of activation rows.
//!
//! Float variants: few rows (decoding) stream every panel once from its stored format; many rows
//! (prefill) widen a panel to f32 once and run the outer-product micro-kernel of `gemm.rs` over
//! all rows. Activations stay f32, so every format computes with exactly its stored weights.
//! Integer variants (Q8_0 and Q4 only, in the quad layout): the activations are quantized to 8
//! bits per block and integer dot products do the work; prefill either runs the same integer
//! kernel over tiles of rows or widens the quads to f32 (whichever `calibrate.rs` measured
//! faster on this CPU).
//! `Bf16Dot` (BF16 in the fast precision): every row, decoding or prompt, has its activations
//! rounded to BF16 and goes through the BF16 dot-product kernel, each panel streamed once for
//! all rows.

// Register-blocked kernels index several arrays with the same counters; explicit loops read
// closer to the math than iterator chains.
#![allow(clippy::needless_range_loop)]

use std::cell::RefCell;

use half::{bf16, f16};

use super::arena::{Arena, ArenaWriter, Region};
use super::gemm::{gemm_panel, gemm_panels, Out};
pub use super::kernels::PANEL;
use super::kernels::{
    bf16_pairs, gemv_bf16_pairs, gemv_bf16_pairs_finish, gemv_finish, gemv_int, gemv_int_blocks, gemv_steps,
    octet_index, padded, panel_value, q4_scale_index, quad_index, Isa, Level, Panel, GEMV_ROWS, INT_ROWS, QBLOCK,
};
use super::pool::Exec;
use super::quant::{quantize_row_q4, quantize_row_q8_0, QuantActs};

/// Storage format of a weight matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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

    /// Whether integer kernels exist for this format.
    pub fn quantized(self) -> bool {
        matches!(self, Format::Q8_0 | Format::Q4_0 | Format::Q4_1)
    }

    /// Bytes a `rows x cols` matrix occupies (rows padded to whole panels).
    pub fn bytes(self, rows: usize, cols: usize) -> usize {
        let rows = rows.div_ceil(PANEL) * PANEL;
        match self {
            Format::F32 => rows * cols * 4,
            Format::Bf16 | Format::F16 => rows * cols * 2,
            Format::Q8_0 => rows * cols + rows * cols.div_ceil(QBLOCK) * 2,
            Format::Q4_0 | Format::Q4_1 => rows * cols / 2 + rows * cols.div_ceil(QBLOCK) * 4,
        }
    }
}

/// How exactly the CPU kernels multiply, chosen at load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Activations stay f32: BF16, F16 and F32 models compute exactly what transformers
    /// computes in f32, and the integer kernels of Q8_0 and Q4 take 16-bit activations.
    #[default]
    Exact,
    /// Activations rounded to what the CPU multiplies fastest, as llama.cpp does: BF16 models
    /// round them to BF16 and use BF16 dot products (on CPUs with AVX-512 BF16; elsewhere they
    /// compute exactly); Q8_0 and Q4 models quantize them to 8 bits per block of 32 for the
    /// integer kernels (one pass of byte dot products instead of two, on CPUs with VNNI or
    /// dotprod; elsewhere they keep 16 bits). About twice the
    /// multiply-adds per instruction, for batches and prompts.
    Fast,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Exact => "exact",
            Precision::Fast => "fast",
        }
    }
}

/// Which kernels a quantized matrix is laid out for (see the module notes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// Steps layout, f32 arithmetic on widened weights.
    Float,
    /// Quad layout, integer dot products for decoding and prefill.
    Int,
    /// Quad layout, integer dot products for decoding, widened weights for prefill.
    IntFloat,
    /// BF16 only (the fast precision): steps layout, activations rounded to BF16 and BF16 dot
    /// products (`vdpbf16ps`) for every row, decoding and prefill alike.
    Bf16Dot,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Float => "float",
            Variant::Int => "int8",
            Variant::IntFloat => "int8+float",
            Variant::Bf16Dot => "bf16-dot",
        }
    }

    pub fn from_name(s: &str) -> Option<Variant> {
        [Variant::Float, Variant::Int, Variant::IntFloat, Variant::Bf16Dot]
            .into_iter()
            .find(|v| v.name() == s.trim())
    }

    fn quads(self) -> bool {
        matches!(self, Variant::Int | Variant::IntFloat)
    }
}

/// How a matrix is stored: its format and, for quantized formats, the kernels it is laid out for
/// and the precision they multiply in (the integer kernels take 8-bit activations in the fast
/// precision, 16-bit in the exact one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Storage {
    pub format: Format,
    pub variant: Variant,
    pub precision: Precision,
}

impl Storage {
    /// `variant` applies to quantized formats (integer or float kernels) and to BF16 (`Bf16Dot`
    /// or not); anything else is `Float`.
    pub fn new(format: Format, variant: Variant) -> Self {
        let variant = match (format, variant) {
            (Format::Bf16, Variant::Bf16Dot) => Variant::Bf16Dot,
            (_, Variant::Bf16Dot) => Variant::Float,
            (f, v) if f.quantized() => v,
            _ => Variant::Float,
        };
        Self {
            format,
            variant,
            precision: Precision::Exact,
        }
    }

    /// This storage computing in `precision`.
    pub fn in_precision(self, precision: Precision) -> Self {
        Self { precision, ..self }
    }

    pub fn float(format: Format) -> Self {
        Self::new(format, Variant::Float)
    }

    /// Steps per panel row as stored (quads pad to whole blocks).
    fn steps(self, cols: usize) -> usize {
        if self.variant.quads() {
            padded(cols)
        } else {
            cols
        }
    }

    /// Arena bytes of a `rows x cols` matrix, alignment padding included.
    pub fn arena_bytes(self, rows: usize, cols: usize) -> usize {
        let rows = rows.div_ceil(PANEL) * PANEL;
        let n = rows * self.steps(cols);
        let scales = rows * cols.div_ceil(QBLOCK);
        match self.format {
            Format::F32 => Arena::size_of::<f32>(n),
            Format::Bf16 | Format::F16 => Arena::size_of::<u16>(n),
            Format::Q8_0 => Arena::size_of::<i8>(n) + Arena::size_of::<f16>(scales),
            Format::Q4_0 | Format::Q4_1 => Arena::size_of::<u8>(n / 2) + 2 * Arena::size_of::<f16>(scales),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum MatData {
    F32(Region<f32>),
    Bf16(Region<bf16>),
    F16(Region<f16>),
    /// Bytes and scales; `quads` for the integer kernels' layout.
    Q8_0 {
        q: Region<i8>,
        d: Region<f16>,
        quads: bool,
    },
    /// Nibbles, scales and offsets (see `kernels::Panel::Q4` and `Q4x8`); `q4_0` tells the two
    /// flavours apart.
    Q4 {
        q: Region<u8>,
        d: Region<f16>,
        m: Region<f16>,
        q4_0: bool,
        quads: bool,
    },
}

/// A `rows x cols` weight matrix (output features x input features) in panels of 32 rows.
#[derive(Debug, Clone, Copy)]
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: MatData,
    variant: Variant,
    precision: Precision,
}

impl QMatrix {
    /// Whether its rows get the same bits from the decode and the prefill kernels of `isa` (the
    /// float formats: one chain of FMAs per output in both; NEON's F16 decode kernel differs),
    /// so that the product may choose by the number of rows alone.
    pub fn class_free(&self, isa: Isa) -> bool {
        match self.data {
            MatData::F32(_) | MatData::Bf16(_) => true,
            MatData::F16(_) => isa != Isa::Neon,
            _ => false,
        }
    }

    /// Reserves a zeroed matrix in `arena`.
    pub fn alloc(arena: &mut Arena, storage: Storage, rows: usize, cols: usize) -> anyhow::Result<Self> {
        let prows = rows.div_ceil(PANEL) * PANEL;
        let n = prows * storage.steps(cols);
        let scales = prows * cols.div_ceil(QBLOCK);
        let quads = storage.variant.quads();
        let data = match storage.format {
            Format::F32 => MatData::F32(arena.alloc(n)?),
            Format::Bf16 => MatData::Bf16(arena.alloc(n)?),
            Format::F16 => MatData::F16(arena.alloc(n)?),
            Format::Q8_0 => MatData::Q8_0 {
                q: arena.alloc(n)?,
                d: arena.alloc(scales)?,
                quads,
            },
            Format::Q4_0 | Format::Q4_1 => MatData::Q4 {
                q: arena.alloc(n / 2)?,
                d: arena.alloc(scales)?,
                m: arena.alloc(scales)?,
                q4_0: storage.format == Format::Q4_0,
                quads,
            },
        };
        Ok(Self {
            rows,
            cols,
            data,
            variant: storage.variant,
            precision: storage.precision,
        })
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

    pub fn storage(&self) -> Storage {
        Storage::new(self.format(), self.variant).in_precision(self.precision)
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
        let len = self.storage().steps(self.cols) * PANEL;
        let dl = self.cols.div_ceil(QBLOCK) * PANEL;
        match self.data {
            MatData::F32(r) => Panel::F32(&arena.get(r)[b * len..(b + 1) * len]),
            MatData::Bf16(r) => Panel::Bf16(&arena.get(r)[b * len..(b + 1) * len]),
            MatData::F16(r) => Panel::F16(&arena.get(r)[b * len..(b + 1) * len]),
            MatData::Q8_0 { q, d, quads } => {
                let (q, d) = (
                    &arena.get(q)[b * len..(b + 1) * len],
                    &arena.get(d)[b * dl..(b + 1) * dl],
                );
                if quads {
                    Panel::Q8x4 { q, d }
                } else {
                    Panel::Q8_0 { q, d }
                }
            }
            MatData::Q4 { q, d, m, quads, .. } => {
                let q = &arena.get(q)[b * len / 2..(b + 1) * len / 2];
                let (d, m) = (&arena.get(d)[b * dl..(b + 1) * dl], &arena.get(m)[b * dl..(b + 1) * dl]);
                if quads {
                    Panel::Q4x8 { q, d, m }
                } else {
                    Panel::Q4 { q, d, m }
                }
            }
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
        assert!(
            b < self.panels() && rows.len() >= PANEL * k,
            "write_panel: panel {b} out of range"
        );
        let (lo, hi) = (b * k * PANEL, (b + 1) * k * PANEL);
        let live = PANEL.min(self.rows - b * PANEL);
        let nb = k.div_ceil(QBLOCK);
        match self.data {
            MatData::F32(r) => transpose_into(w.range_mut(r, lo, hi), rows, k, live, |v| v),
            MatData::Bf16(r) => transpose_into(w.range_mut(r, lo, hi), rows, k, live, bf16::from_f32),
            MatData::F16(r) => transpose_into(w.range_mut(r, lo, hi), rows, k, live, f16::from_f32),
            MatData::Q8_0 { q, d, quads } => {
                let len = self.storage().steps(k) * PANEL;
                let qs = w.range_mut(q, b * len, (b + 1) * len);
                let ds = w.range_mut(d, b * nb * PANEL, (b + 1) * nb * PANEL);
                let mut qrow = vec![0i8; k];
                let mut drow = vec![0f32; nb];
                for c in 0..live {
                    quantize_row_q8_0(&rows[c * k..(c + 1) * k], &mut qrow, &mut drow);
                    for t in 0..k {
                        qs[if quads { quad_index(t, c) } else { t * PANEL + c }] = qrow[t];
                    }
                    for (tb, dv) in drow.iter().enumerate() {
                        // Exact: the quantizer rounded the scale to f16 already.
                        ds[tb * PANEL + c] = f16::from_f32(*dv);
                    }
                }
            }
            MatData::Q4 {
                q, d, m, q4_0, quads, ..
            } => {
                let len = self.storage().steps(k) * PANEL / 2;
                let qs = w.range_mut(q, b * len, (b + 1) * len);
                let ds = w.range_mut(d, b * nb * PANEL, (b + 1) * nb * PANEL);
                let ms = w.range_mut(m, b * nb * PANEL, (b + 1) * nb * PANEL);
                let mut nib = vec![0u8; k];
                let mut drow = vec![(0f32, 0f32); nb];
                for c in 0..live {
                    quantize_row_q4(&rows[c * k..(c + 1) * k], q4_0, &mut nib, &mut drow);
                    for t in 0..k {
                        let (i, high) = if quads {
                            octet_index(t, c)
                        } else {
                            (t * (PANEL / 2) + c / 2, c % 2 == 1)
                        };
                        let shift = if high { 4 } else { 0 };
                        qs[i] = (qs[i] & !(0xF << shift)) | ((nib[t] & 0xF) << shift);
                    }
                    let at = if quads { c } else { q4_scale_index(c) };
                    for (tb, (dv, mv)) in drow.iter().enumerate() {
                        ds[tb * PANEL + at] = f16::from_f32(*dv);
                        ms[tb * PANEL + at] = f16::from_f32(*mv);
                    }
                }
            }
        }
    }

    /// Writes panel `b` straight from stored little-endian rows of its own element type (no
    /// conversion, just the transpose): the fast path of loading a BF16 checkpoint as BF16.
    /// Returns false when the format has no raw path (the quantized ones).
    ///
    /// # Safety
    /// As `write_panel`.
    pub unsafe fn write_panel_raw(&self, w: ArenaWriter, b: usize, rows: &[&[u8]]) -> bool {
        let k = self.cols;
        assert!(b < self.panels(), "write_panel_raw: panel {b} out of range");
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

    /// Fills a quantized matrix with a fixed pattern of valid weights without quantizing
    /// anything (for timing kernels, whose speed does not depend on the values).
    pub(crate) fn fill_pattern(&self, arena: &mut Arena) {
        match self.data {
            MatData::Q8_0 { q, d, .. } => {
                let (qs, ds) = arena.get_pair_mut(q, d);
                for (i, v) in qs.iter_mut().enumerate() {
                    *v = ((i * 37) % 255) as i8 - 127;
                }
                ds.fill(f16::from_f32(0.01));
            }
            MatData::Q4 { q, d, m, .. } => {
                for (i, v) in arena.get_mut(q).iter_mut().enumerate() {
                    *v = (i * 37) as u8;
                }
                arena.get_mut(d).fill(f16::from_f32(0.01));
                arena.get_mut(m).fill(f16::from_f32(-0.08));
            }
            _ => {}
        }
    }

    /// Row `r` as f32 (embedding lookups).
    pub fn row_f32(&self, arena: &Arena, r: usize, dst: &mut [f32]) {
        let p = self.panel(arena, r / PANEL);
        for (t, v) in dst.iter_mut().enumerate().take(self.cols) {
            *v = panel_value(p, t, r % PANEL);
        }
    }
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

thread_local! {
    /// The calling thread's quantized activations (reused: no allocation per product).
    static ACTS: RefCell<QuantActs> = RefCell::new(QuantActs::default());
    /// The calling thread's step-major activations for the float decode kernels.
    static STEP_MAJOR: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The calling thread's activations rounded to BF16 pairs for the BF16 dot kernels.
    static BF16_PAIRS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// `m` rows of `k` values, in groups of `group` rows, each group step-major: group `g` starts at
/// `g * group * k` and holds row `r`'s value of step `t` at `t * rows_in_group + r`.
fn step_major(x: &[f32], m: usize, k: usize, group: usize, out: &mut Vec<f32>) {
    out.resize(m * k, 0.0);
    for r0 in (0..m).step_by(group) {
        let rows = group.min(m - r0);
        let dst = &mut out[r0 * k..(r0 + rows) * k];
        for r in 0..rows {
            for (t, v) in x[(r0 + r) * k..(r0 + r + 1) * k].iter().enumerate() {
                dst[t * rows + r] = *v;
            }
        }
    }
}

/// How a product treats its activation rows. Decoding rows stream every weight panel once for
/// all of them (the decode kernels, in groups of up to 8 rows); prompt rows are many and widen
/// each panel once (the prefill kernels). A row's result depends only on its class, never on how
/// many rows are computed with it, which is what makes a batched step bit-identical to the same
/// sequences run alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowClass {
    Decode,
    Prompt,
}

/// `out[i * rows + j] = Σ_t x[i * cols + t] · W[j][t]` for `m` activation rows: up to 8 rows as
/// decoding rows, more as prompt rows.
pub fn matmul(arena: &Arena, w: &QMatrix, x: &[f32], m: usize, out: &mut [f32]) {
    matmul_with(Level::get(), arena, w, x, m, out)
}

/// As `matmul`, with an explicit instruction level (tests of every path).
pub fn matmul_with(level: Level, arena: &Arena, w: &QMatrix, x: &[f32], m: usize, out: &mut [f32]) {
    let class = if m <= GEMV_ROWS {
        RowClass::Decode
    } else {
        RowClass::Prompt
    };
    product(Exec::Pool, level, class, arena, w, x, m, out)
}

/// Rows up to which a class-free product uses the decode kernel (measured on AVX-512: 16 rows
/// decode at 100-120 t/s in it against 87 in the prefill kernel).
const CLASS_FREE_GEMV_ROWS: usize = 32;

/// The first `decode` rows of `x` as decoding rows, the rest as prompt rows.
pub fn matmul_rows(arena: &Arena, w: &QMatrix, x: &[f32], decode: usize, m: usize, out: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    assert!(
        decode <= m && x.len() == m * k && out.len() == m * n,
        "matmul_rows: shapes"
    );
    let level = Level::get();
    if w.class_free(level.isa) {
        // Either kernel gives a row the same bits: the decode kernel while there are few rows
        // (it reads the weights as stored, groups of rows taking each piece from L1), the
        // prefill kernel beyond (it widens each panel once, then reuses every weight for 12
        // rows from registers: worth it from a few dozen rows on).
        let class = if m <= CLASS_FREE_GEMV_ROWS {
            RowClass::Decode
        } else {
            RowClass::Prompt
        };
        product(Exec::Pool, level, class, arena, w, x, m, out);
        return;
    }
    let (xd, xp) = x.split_at(decode * k);
    let (od, op) = out.split_at_mut(decode * n);
    if decode == 0 || decode == m || w.variant.quads() {
        product(Exec::Pool, level, RowClass::Decode, arena, w, xd, decode, od);
        product(Exec::Pool, level, RowClass::Prompt, arena, w, xp, m - decode, op);
        return;
    }
    // Both classes: each panel is read from memory once, the decoding rows take it first and
    // the prompt rows then find it in cache (the same bits as two separate products).
    let isa = level.isa;
    let (mp, op_ptr) = (m - decode, Out(op.as_mut_ptr()));
    float_decode(Exec::Pool, isa, arena, w, xd, decode, od, |b| {
        gemm_panel(isa, xp, mp, k, n, op_ptr, b, w.panel(arena, b))
    });
}

/// As `matmul_with`, on the calling thread only (measurements of one core's speed).
pub(crate) fn matmul_serial(level: Level, arena: &Arena, w: &QMatrix, x: &[f32], m: usize, out: &mut [f32]) {
    let class = if m <= GEMV_ROWS {
        RowClass::Decode
    } else {
        RowClass::Prompt
    };
    product(Exec::Serial, level, class, arena, w, x, m, out)
}

#[allow(clippy::too_many_arguments)]
fn product(
    exec: Exec,
    level: Level,
    class: RowClass,
    arena: &Arena,
    w: &QMatrix,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "activations have the wrong length");
    assert_eq!(out.len(), m * n, "output has the wrong length");
    if m == 0 || n == 0 {
        return;
    }
    let isa = level.isa;
    if w.variant == Variant::Bf16Dot {
        bf16_dot(exec, level, arena, w, x, m, out);
        return;
    }
    if !w.variant.quads() {
        if class == RowClass::Prompt {
            gemm_panels(exec, isa, x, m, k, n, out, &|b| w.panel(arena, b));
        } else {
            float_decode(exec, isa, arena, w, x, m, out, |_| {});
        }
        return;
    }
    if class == RowClass::Prompt && w.variant == Variant::IntFloat {
        gemm_panels(exec, isa, x, m, k, n, out, &|b| w.panel(arena, b));
        return;
    }
    ACTS.with(|acts| {
        let mut acts = acts.borrow_mut();
        acts.quantize_on(exec, x, m, k, w.precision == Precision::Exact);
        let acts = &*acts;
        if class == RowClass::Decode {
            stream_panels(
                exec,
                w,
                out,
                m,
                if matches!(w.data, MatData::Q8_0 { .. }) {
                    Q8_DECODE_GROUP
                } else {
                    INT_ROWS
                },
                |p, r0, rows, steps, acc| {
                    let blocks = steps.start / QBLOCK..steps.end.div_ceil(QBLOCK);
                    gemv_int_blocks(level, w.panel(arena, p), &acts.rows(r0, rows), blocks, acc)
                },
                |_, _, _| {},
                |_| {},
            );
        } else {
            // Prefill: each task takes a panel and runs every tile of rows over it (from cache).
            let out_ptr = Out(out.as_mut_ptr());
            exec.run(w.panels(), &|b| {
                let p = w.panel(arena, b);
                let mut acc = [[0f32; PANEL]; INT_ROWS];
                let (j0, live) = (b * PANEL, PANEL.min(n - b * PANEL));
                for i0 in (0..m).step_by(INT_ROWS) {
                    let rows = INT_ROWS.min(m - i0);
                    gemv_int(level, p, &acts.rows(i0, rows), &mut acc);
                    for (i, row) in acc.iter().enumerate().take(rows) {
                        // SAFETY: columns of this panel belong to this task alone.
                        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out_ptr.at((i0 + i) * n + j0), live) };
                    }
                }
            });
        }
    });
}

/// The decode kernels over every panel for `m` rows of a float-layout matrix; `then(b)` runs
/// right after panel `b`, on the same thread (see `stream_panels`).
#[allow(clippy::too_many_arguments)]
fn float_decode(
    exec: Exec,
    isa: Isa,
    arena: &Arena,
    w: &QMatrix,
    x: &[f32],
    m: usize,
    out: &mut [f32],
    then: impl Fn(usize) + Sync,
) {
    let k = w.cols;
    STEP_MAJOR.with(|xt| {
        let mut xt = xt.borrow_mut();
        // One row is its own step-major form.
        let xs: &[f32] = if m == 1 {
            x
        } else {
            step_major(x, m, k, GEMV_ROWS, &mut xt);
            &xt
        };
        stream_panels(
            exec,
            w,
            out,
            m,
            GEMV_ROWS,
            |p, r0, rows, steps, acc| {
                gemv_steps(
                    isa,
                    w.panel(arena, p),
                    &xs[r0 * k..(r0 + rows) * k],
                    rows,
                    k,
                    steps,
                    acc,
                )
            },
            |p, rows, acc| gemv_finish(isa, w.panel(arena, p), rows, acc),
            then,
        );
    });
}

/// Every row of a `Bf16Dot` matrix, decoding or prompt: the activations rounded to BF16 once,
/// then every panel streamed once for all rows in groups of `GEMV_ROWS` (each group after the
/// first takes a piece of the panel from cache). One kernel for every row, so a row's bits never
/// depend on how many rows are computed with it or on their class.
fn bf16_dot(exec: Exec, level: Level, arena: &Arena, w: &QMatrix, x: &[f32], m: usize, out: &mut [f32]) {
    let k = w.cols;
    let kh = k.div_ceil(2);
    BF16_PAIRS.with(|xp| {
        let mut xp = xp.borrow_mut();
        bf16_pairs(x, m, k, &mut xp);
        let xp = &*xp;
        stream_panels(
            exec,
            w,
            out,
            m,
            GEMV_ROWS,
            |p, r0, rows, steps, acc| {
                let Panel::Bf16(wp) = w.panel(arena, p) else {
                    unreachable!("Bf16Dot matrices hold BF16 panels")
                };
                gemv_bf16_pairs(level, wp, &xp[r0 * kh..(r0 + rows) * kh], rows, k, steps, acc)
            },
            |_, rows, acc| gemv_bf16_pairs_finish(level, rows, acc),
            |_| {},
        );
    });
}

/// Decoding rows per integer kernel call for Q8_0. The kernel runs its rows four at a time over
/// the steps it is given; given a whole Q8_0 panel (30-80 KiB in the Zagreus shape), the second
/// four would read it back from L2. In groups of 4, 5-16 rows take it a `PIECE` at a time from
/// L1 instead (8 sequences: a median of 240 decode t/s against 216 in the model, nine alternating
/// runs on a noisy host, 2026-12-04; the bits are the same). Q4_0 panels are half the size and mostly stay in L1: there
/// groups of 4 were 5-7% slower at 8 rows (the pieces' extra passes), so they keep `INT_ROWS`.
const Q8_DECODE_GROUP: usize = 4;

/// Steps of a panel taken at a time when more than one group of decoding rows shares it: 256
/// steps of BF16 are 16 KiB, so every group after the first finds them in L1 while the memory
/// streams the next piece (the groups' compute overlaps the panel's reading instead of
/// following it).
const PIECE: usize = 256;

/// Streams every panel once for `m` rows (decoding), in parallel chunks of panels, the rows in
/// groups of up to `group`. `kernel(b, r0, rows, steps, acc)` adds steps `steps` of panel `b`
/// for rows `r0..r0 + rows` to `acc` (from zero at step 0); `finish(b, rows, acc)` completes a
/// group's outputs. With several groups the panel is taken `PIECE` steps at a time, every group
/// in turn. `then(b)` runs on the same thread right after panel `b` is done (while it is in cache).
#[allow(clippy::too_many_arguments)]
fn stream_panels(
    exec: Exec,
    w: &QMatrix,
    out: &mut [f32],
    m: usize,
    group: usize,
    kernel: impl Fn(usize, usize, usize, std::ops::Range<usize>, &mut [[f32; PANEL]]) + Sync,
    finish: impl Fn(usize, usize, &mut [[f32; PANEL]]) + Sync,
    then: impl Fn(usize) + Sync,
) {
    let (n, k) = (w.rows, w.cols);
    let out_ptr = Out(out.as_mut_ptr());
    let panels = w.panels();
    let groups = m.div_ceil(group);
    let piece = if groups > 1 { PIECE } else { k.max(1) };
    // A few chunks per thread balances uneven cores without tiny tasks.
    let chunk = panels.div_ceil(exec.threads() * 4).max(1);
    exec.run(panels.div_ceil(chunk), &|c| {
        let mut acc = vec![[0f32; PANEL]; groups * group];
        for b in c * chunk..((c + 1) * chunk).min(panels) {
            let j0 = b * PANEL;
            let live = PANEL.min(n - j0);
            for t0 in (0..k).step_by(piece) {
                for g in 0..groups {
                    let r0 = g * group;
                    let rows = group.min(m - r0);
                    kernel(b, r0, rows, t0..(t0 + piece).min(k), &mut acc[r0..r0 + group]);
                }
            }
            for g in 0..groups {
                let r0 = g * group;
                let rows = group.min(m - r0);
                finish(b, rows, &mut acc[r0..r0 + group]);
            }
            for (i, row) in acc.iter().enumerate().take(m) {
                // SAFETY: columns of this panel belong to this task alone.
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out_ptr.at(i * n + j0), live) };
            }
            then(b);
        }
    });
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::cpu::arena::Placement;
    use crate::model::cpu::test_data::rand_vec;

    /// A matrix filled from row-major f32 values.
    pub(crate) fn build(storage: Storage, wf: &[f32], n: usize, k: usize) -> (Arena, QMatrix) {
        let mut arena = Arena::new(storage.arena_bytes(n, k) + 256, Placement::Normal).unwrap();
        let w = QMatrix::alloc(&mut arena, storage, n, k).unwrap();
        for b in 0..w.panels() {
            let mut rows = vec![0f32; PANEL * k];
            let live = PANEL.min(n - b * PANEL);
            rows[..live * k].copy_from_slice(&wf[b * PANEL * k..(b * PANEL + live) * k]);
            w.set_panel(&mut arena, b, &rows);
        }
        (arena, w)
    }

    /// `out` (`m × n`) within `1e-4 · √k` of the f64 products of rows of `x` and of `w` (`n × k`,
    /// the stored values), both row-major.
    fn assert_reference(out: &[f32], x: &[f32], w: &[f32], (m, k, n): (usize, usize, usize), what: &str) {
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
                let got = out[i * n + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-4 * (k as f64).sqrt(),
                    "{what} m={m} k={k} n={n} [{i},{j}]: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn every_format_variant_and_path_matches_a_plain_reference() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 33, 17),
            (2, 64, 5),
            (3, 100, 37),
            (4, 16, 16),
            (5, 31, 19),
            // Past one piece of steps: Q8_0 decodes 6 rows in two groups taking it in turn.
            (6, 300, 40),
            (9, 97, 33),
            (70, 40, 21),
            (130, 64, 65),
        ] {
            let wf = rand_vec(n * k, 1);
            let x = rand_vec(m * k, 2);
            // The activations the integer kernels multiply: 16-bit in the exact precision, 8-bit in
            // the fast one.
            let quantized = |residual| {
                let mut acts = QuantActs::default();
                acts.quantize(&x, m, k, residual);
                acts.dequantized(m, k)
            };
            let (xq16, xq8) = (quantized(true), quantized(false));
            for format in [
                Format::F32,
                Format::Bf16,
                Format::F16,
                Format::Q8_0,
                Format::Q4_0,
                Format::Q4_1,
            ] {
                for (variant, precision) in [Variant::Float, Variant::Int, Variant::IntFloat]
                    .into_iter()
                    .flat_map(|v| [(v, Precision::Exact), (v, Precision::Fast)])
                {
                    let storage = Storage::new(format, variant).in_precision(precision);
                    if storage.variant != variant {
                        continue;
                    }
                    let (arena, w) = build(storage, &wf, n, k);
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
                    // Integer kernels multiply the quantized activations.
                    let int = variant == Variant::Int || (variant == Variant::IntFloat && m <= INT_ROWS);
                    let xr = match (int, precision) {
                        (false, _) => &x,
                        (true, Precision::Exact) => &xq16,
                        (true, Precision::Fast) => &xq8,
                    };
                    for level in Level::supported() {
                        let mut out = vec![f32::NAN; m * n];
                        matmul_with(level, &arena, &w, &x, m, &mut out);
                        let what = format!("{format:?} {variant:?} {precision:?} {}", level.name());
                        assert_reference(&out, xr, &deq, (m, k, n), &what);
                    }
                }
            }
        }
    }

    #[test]
    fn the_bf16_dot_variant_matches_a_reference_on_rounded_activations_and_keeps_each_rows_bits() {
        // Shapes past one piece of steps (256) with several groups of rows (more than 8), odd
        // input lengths and partial panels.
        for &(m, k, n) in &[(1, 1, 1), (2, 3, 5), (9, 300, 45), (16, 257, 64), (17, 513, 33)] {
            let wf = rand_vec(n * k, 11);
            let x = rand_vec(m * k, 12);
            let (arena, w) = build(Storage::new(Format::Bf16, Variant::Bf16Dot), &wf, n, k);
            let mut deq = vec![0f32; n * k];
            for r in 0..n {
                w.row_f32(&arena, r, &mut deq[r * k..(r + 1) * k]);
            }
            let xr: Vec<f32> = x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
            for level in Level::supported() {
                let mut out = vec![f32::NAN; m * n];
                matmul_with(level, &arena, &w, &x, m, &mut out);
                assert_reference(&out, &xr, &deq, (m, k, n), level.name());
                for i in 0..m {
                    // Alone, the row gets the same bits as among the others.
                    let mut alone = vec![f32::NAN; n];
                    matmul_with(level, &arena, &w, &x[i * k..(i + 1) * k], 1, &mut alone);
                    assert!(
                        alone
                            .iter()
                            .zip(&out[i * n..(i + 1) * n])
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{} m={m} k={k} n={n}: row {i} alone differs",
                        level.name()
                    );
                }
            }
        }
    }

    #[test]
    fn integer_kernels_stay_close_to_the_exact_product() {
        // What activation quantization costs: the int8 path against f32 activations.
        let (m, k, n) = (3, 960, 64);
        let wf = rand_vec(n * k, 4);
        let x = rand_vec(m * k, 6);
        let (arena, w) = build(Storage::new(Format::Q8_0, Variant::Int), &wf, n, k);
        let mut deq = vec![0f32; n * k];
        for r in 0..n {
            w.row_f32(&arena, r, &mut deq[r * k..(r + 1) * k]);
        }
        let mut out = vec![0f32; m * n];
        matmul_with(Level::get(), &arena, &w, &x, m, &mut out);
        let (mut err, mut norm) = (0f64, 0f64);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|t| x[i * k + t] as f64 * deq[j * k + t] as f64).sum();
                err += (out[i * n + j] as f64 - want).powi(2);
                norm += want * want;
            }
        }
        let rel = (err / norm).sqrt();
        assert!(rel < 0.01, "relative RMS error {rel}");
    }
}

#[cfg(test)]
mod classes {
    use super::tests::build;
    use super::*;
    use crate::model::cpu::test_data::rand_vec;

    /// For the float formats both row classes compute each output in one chain of FMAs in step
    /// order, so a row gets the same bits from the decode and the prefill kernels: the product
    /// may pick either by the number of rows without a sequence's logits depending on its
    /// neighbours. (Where `class_free` says no, each class keeps its own kernels.)
    #[test]
    fn float_formats_give_the_same_bits_in_both_row_classes() {
        for &(m, k, n) in &[(1, 64, 33), (8, 960, 96), (13, 100, 40)] {
            let wf = rand_vec(n * k, 1);
            let x = rand_vec(m * k, 2);
            for format in [Format::Bf16, Format::F32, Format::F16] {
                let (arena, w) = build(Storage::new(format, Variant::Float), &wf, n, k);
                for level in Level::supported().into_iter().filter(|l| w.class_free(l.isa)) {
                    let mut a = vec![0f32; m * n];
                    let mut b = vec![0f32; m * n];
                    product(Exec::Serial, level, RowClass::Decode, &arena, &w, &x, m, &mut a);
                    product(Exec::Serial, level, RowClass::Prompt, &arena, &w, &x, m, &mut b);
                    let same = a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits());
                    assert!(same, "{format:?} {} m={m}", level.name());
                }
            }
        }
    }
}
