//! The prefill product (many activation rows): each weight panel (32 output rows, stored
//! transposed) is widened to f32 once, then an outer-product micro-kernel keeps an R x 32 block of
//! outputs in registers: per input step, the panel's 32 weights are loaded once and multiplied
//! with R broadcast activations. No horizontal sums, no repacking.

// Register-blocked kernels index several arrays with the same counters; explicit loops read
// closer to the math than iterator chains.
#![allow(clippy::needless_range_loop)]

use std::cell::RefCell;

use super::kernels::{widen, Isa, Panel, PANEL};
use super::pool::Exec;

/// Output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
pub(crate) struct Out(pub *mut f32);
// SAFETY: every task writes a disjoint set of output columns.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}
impl Out {
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

thread_local! {
    /// Per-thread widened panel (reused: no allocation per call).
    static WIDE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Activation rows per micro-kernel call.
fn rows_per_call(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 12,
        Isa::Avx2 | Isa::Neon => 6,
        Isa::Portable => 4,
    }
}

/// `out[i * n + j] = Σ_t x[i * k + t] · W[j][t]` with `panel(b)` giving W's panels. Parallel over
/// panels.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_panels<'a>(
    exec: Exec,
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
    panel: &(dyn Fn(usize) -> Panel<'a> + Sync),
) {
    assert!(
        x.len() >= m * k && out.len() >= m * n,
        "gemm: slices shorter than the shapes"
    );
    let out_ptr = Out(out.as_mut_ptr());
    exec.run(n.div_ceil(PANEL), &|b| {
        gemm_panel(isa, x, m, k, n, out_ptr, b, panel(b))
    });
}

/// `gemm_panels` for panel `b` alone (outputs `j` in `32b..32b + 32` of every row): the same
/// bits whichever task runs it, and whatever else that task does around it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_panel(isa: Isa, x: &[f32], m: usize, k: usize, n: usize, out_ptr: Out, b: usize, p: Panel) {
    assert!(
        x.len() >= m * k && b * PANEL < n,
        "gemm: slices shorter than the shapes"
    );
    let mr = rows_per_call(isa);
    let j0 = b * PANEL;
    let cols = PANEL.min(n - j0);
    WIDE.with(|w| {
        let mut wide = w.borrow_mut();
        let packed: &[f32] = match p {
            Panel::F32(v) => v,
            _ => {
                wide.resize(k * PANEL, 0.0);
                widen(isa, p, k, &mut wide);
                &wide
            }
        };
        let mut i0 = 0;
        while i0 < m {
            let rows = mr.min(m - i0);
            // SAFETY: x rows i0..i0+rows exist; outputs (i0.., j0..j0+cols) belong to this task
            // (callers give each panel to one task, and `out_ptr` holds m rows of n).
            unsafe {
                micro(
                    isa,
                    rows,
                    x.as_ptr().add(i0 * k),
                    k,
                    packed.as_ptr(),
                    out_ptr.at(i0 * n + j0),
                    n,
                    cols,
                )
            };
            i0 += rows;
        }
    });
}

/// One block: `rows` activation rows times a widened panel.
///
/// # Safety
/// `x` points at `rows` rows of `k` floats, `b` at `k * 32` floats, `out` at `rows` rows of
/// stride `ldo` with `cols` writable floats each.
#[allow(clippy::too_many_arguments)]
unsafe fn micro(isa: Isa, rows: usize, x: *const f32, k: usize, b: *const f32, out: *mut f32, ldo: usize, cols: usize) {
    macro_rules! by_rows {
        ($f:ident, $($r:literal)*) => {
            match rows {
                $($r => $f::<$r>(x, k, b, out, ldo, cols),)*
                _ => unreachable!("rows out of range"),
            }
        };
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => by_rows!(micro_avx512, 1 2 3 4 5 6 7 8 9 10 11 12),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => by_rows!(micro_avx2, 1 2 3 4 5 6),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => by_rows!(micro_neon, 1 2 3 4 5 6),
        _ => micro_portable(rows, x, k, b, out, ldo, cols),
    }
}

unsafe fn micro_portable(rows: usize, x: *const f32, k: usize, b: *const f32, out: *mut f32, ldo: usize, cols: usize) {
    let mut acc = [[0f32; PANEL]; 4];
    for t in 0..k {
        let bt = std::slice::from_raw_parts(b.add(t * PANEL), PANEL);
        for (i, row) in acc.iter_mut().enumerate().take(rows) {
            let a = *x.add(i * k + t);
            for c in 0..PANEL {
                row[c] += a * bt[c];
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(rows) {
        std::ptr::copy_nonoverlapping(row.as_ptr(), out.add(i * ldo), cols);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn micro_avx512<const R: usize>(x: *const f32, k: usize, b: *const f32, out: *mut f32, ldo: usize, cols: usize) {
    use std::arch::x86_64::*;
    let mut c0 = [_mm512_setzero_ps(); R];
    let mut c1 = [_mm512_setzero_ps(); R];
    for t in 0..k {
        let b0 = _mm512_loadu_ps(b.add(t * PANEL));
        let b1 = _mm512_loadu_ps(b.add(t * PANEL + 16));
        for i in 0..R {
            let a = _mm512_set1_ps(*x.add(i * k + t));
            c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
            c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
        }
    }
    let m0 = if cols >= 16 {
        0xFFFF
    } else {
        ((1u32 << cols) - 1) as u16
    };
    let m1 = if cols >= 32 {
        0xFFFF
    } else if cols > 16 {
        ((1u32 << (cols - 16)) - 1) as u16
    } else {
        0
    };
    for i in 0..R {
        _mm512_mask_storeu_ps(out.add(i * ldo), m0, c0[i]);
        _mm512_mask_storeu_ps(out.add(i * ldo + 16), m1, c1[i]);
    }
}

/// Six rows by 16 columns (12 accumulators, 2 weight vectors and a broadcast: 15 of the 16
/// registers), once per half of the panel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro_avx2<const R: usize>(x: *const f32, k: usize, b: *const f32, out: *mut f32, ldo: usize, cols: usize) {
    use std::arch::x86_64::*;
    for h in 0..2 {
        if cols <= 16 * h {
            break;
        }
        let mut c = [[_mm256_setzero_ps(); 2]; R];
        let bh = b.add(16 * h);
        for t in 0..k {
            let b0 = _mm256_loadu_ps(bh.add(t * PANEL));
            let b1 = _mm256_loadu_ps(bh.add(t * PANEL + 8));
            for i in 0..R {
                let a = _mm256_broadcast_ss(&*x.add(i * k + t));
                c[i][0] = _mm256_fmadd_ps(a, b0, c[i][0]);
                c[i][1] = _mm256_fmadd_ps(a, b1, c[i][1]);
            }
        }
        let live = (cols - 16 * h).min(16);
        for i in 0..R {
            let o = out.add(i * ldo + 16 * h);
            if live == 16 {
                _mm256_storeu_ps(o, c[i][0]);
                _mm256_storeu_ps(o.add(8), c[i][1]);
            } else {
                let mut tmp = [0f32; 16];
                _mm256_storeu_ps(tmp.as_mut_ptr(), c[i][0]);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), c[i][1]);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), o, live);
            }
        }
    }
}

/// Six rows by 16 columns (24 of the 32 registers accumulate), once per half of the panel.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn micro_neon<const R: usize>(x: *const f32, k: usize, b: *const f32, out: *mut f32, ldo: usize, cols: usize) {
    use std::arch::aarch64::*;
    for h in 0..2 {
        if cols <= 16 * h {
            break;
        }
        let mut c = [[vdupq_n_f32(0.0); 4]; R];
        let bh = b.add(16 * h);
        for t in 0..k {
            let bv: [float32x4_t; 4] = std::array::from_fn(|j| vld1q_f32(bh.add(t * PANEL + 4 * j)));
            for i in 0..R {
                let a = *x.add(i * k + t);
                for j in 0..4 {
                    c[i][j] = vfmaq_n_f32(c[i][j], bv[j], a);
                }
            }
        }
        let live = (cols - 16 * h).min(16);
        for i in 0..R {
            let mut tmp = [0f32; 16];
            for j in 0..4 {
                vst1q_f32(tmp.as_mut_ptr().add(4 * j), c[i][j]);
            }
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), out.add(i * ldo + 16 * h), live);
        }
    }
}
