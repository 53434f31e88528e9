//! Filling the CPU engine's weight matrices while loading: from checkpoint rows (in parallel, a
//! panel per task, releasing the file's pages as they are copied) or from a deterministic random
//! stream (benchmarks of a model's shape without its weights).

use rayon::prelude::*;

use super::arena::{Arena, ArenaWriter};
use super::kernels::PANEL;
use super::qmatrix::QMatrix;
use super::source::Rows;

/// Fills matrix `m` from row sources stacked on top of each other (q, k, v for a fused
/// projection), one panel of 32 rows per task, dropping the source pages from memory batch by
/// batch: loading never holds much of the file and the arena at the same time.
pub(crate) fn fill(arena: &mut Arena, m: &QMatrix, srcs: &[Box<dyn Rows + '_>]) {
    // Global row -> (source, local row).
    let mut starts = Vec::with_capacity(srcs.len());
    let mut acc = 0;
    for s in srcs {
        starts.push(acc);
        acc += s.rows();
    }
    let locate = |row: usize| {
        let i = starts.partition_point(|s| *s <= row) - 1;
        (srcs[i].as_ref(), row - starts[i])
    };
    let writer = arena.writer();
    const BATCH: usize = 512;
    for first in (0..m.panels()).step_by(BATCH) {
        let last = (first + BATCH).min(m.panels());
        fill_panels(m, &locate, writer, first..last);
        let (r0, r1) = (first * PANEL, (last * PANEL).min(m.rows));
        for (src, s) in srcs.iter().zip(&starts) {
            let (a, b) = (r0.max(*s), r1.min(s + src.rows()));
            if a < b {
                src.release(a - s, b - s);
            }
        }
    }
}

/// Fills panels `range` of `m` in parallel.
fn fill_panels<'a>(
    m: &QMatrix,
    locate: &(dyn Fn(usize) -> (&'a dyn Rows, usize) + Sync),
    writer: ArenaWriter,
    range: std::ops::Range<usize>,
) {
    let k = m.cols;
    let format = m.format();
    range.into_par_iter().for_each_init(
        || vec![0f32; PANEL * k],
        |buf, b| {
            let live = PANEL.min(m.rows - b * PANEL);
            let raw: Option<Vec<&[u8]>> = (0..live)
                .map(|c| {
                    let (src, r) = locate(b * PANEL + c);
                    src.raw(r, format)
                })
                .collect();
            // SAFETY (both writes): each task writes its own panel.
            if let Some(rows) = raw {
                if unsafe { m.write_panel_raw(writer, b, &rows) } {
                    return;
                }
            }
            for c in 0..live {
                let (src, r) = locate(b * PANEL + c);
                src.read(r, &mut buf[c * k..(c + 1) * k]);
            }
            unsafe { m.write_panel(writer, b, buf) };
        },
    );
}

/// Random weights, uniform with variance `scale²` (deterministic in `seed`).
pub(crate) fn fill_random(arena: &mut Arena, m: &QMatrix, seed: u64, scale: f32) {
    let k = m.cols;
    let writer = arena.writer();
    (0..m.panels()).into_par_iter().for_each_init(
        || vec![0f32; PANEL * k],
        |buf, b| {
            for (i, v) in buf.iter_mut().enumerate() {
                // A cheap hash per element: uniform in [-scale·√3, scale·√3] (variance scale²).
                let mut s = (seed ^ ((b * PANEL * k + i) as u64).wrapping_mul(0x9E3779B97F4A7C15))
                    .wrapping_mul(0xD1B54A32D192ED03);
                s ^= s >> 29;
                *v = (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale * 1.732;
            }
            // SAFETY: each task writes its own panel.
            unsafe { m.write_panel(writer, b, buf) };
        },
    );
}
