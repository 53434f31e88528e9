//! Multi-threaded `x · Wᵀ` for the CPU: the product behind every linear layer.
//!
//! candle's CPU matmul refuses BF16 and runs `m = 1` (decoding) on one thread, so linear layers on
//! the CPU call this instead, through a candle custom op. Activations are f32; weights are read in
//! their stored type (f32, bf16 or f16).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape};
use half::{bf16, f16};
use rayon::prelude::*;

use super::kernels::{dot_4x4, Isa, WeightElem};

/// Rows of `x` processed against one widened block of weights (keeps the block in L2).
const X_TILE: usize = 64;
/// Weight rows widened to f32 at a time in the prefill path.
const W_BLOCK: usize = 16;

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of indices (see the callers).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method, so closures capture the whole (Send) wrapper, not the raw field.
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// `out[i * n + j] = Σ_k x[i * k + t] * w[j * k + t]` for `x: m × k`, `w: n × k`, `out: m × n`.
pub fn matmul_t<W: WeightElem>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * k, "x has the wrong length");
    assert_eq!(w.len(), n * k, "w has the wrong length");
    assert_eq!(out.len(), m * n, "out has the wrong length");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let isa = Isa::get();
    if m < 4 {
        gemv_rows(isa, x, m, k, w, n, out);
    } else {
        gemm_blocked(isa, x, m, k, w, n, out);
    }
}

/// Few activation rows: stream each weight row once, straight from its stored format.
fn gemv_rows<W: WeightElem>(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    n: usize,
    out: &mut [f32],
) {
    let threads = rayon::current_num_threads().max(1);
    // A few chunks per thread balances uneven cores without tiny tasks.
    let chunk = n.div_ceil(threads * 4).max(16);
    let ptr = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let j0 = c * chunk;
        let j1 = (j0 + chunk).min(n);
        for j in j0..j1 {
            let wr = &w[j * k..(j + 1) * k];
            for i in 0..m {
                let v = W::dot(isa, &x[i * k..(i + 1) * k], wr);
                // SAFETY: column j belongs to this task alone; i * n + j < m * n.
                unsafe { *ptr.at(i * n + j) = v };
            }
        }
    });
}

/// Many activation rows: widen a block of weight rows once, then register-blocked 4x4 dots.
fn gemm_blocked<W: WeightElem>(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    n: usize,
    out: &mut [f32],
) {
    let ptr = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(W_BLOCK)).into_par_iter().for_each_init(
        || vec![0f32; W_BLOCK * k],
        |buf, b| {
            let j0 = b * W_BLOCK;
            let rows = W_BLOCK.min(n - j0);
            for r in 0..rows {
                W::widen(
                    isa,
                    &w[(j0 + r) * k..(j0 + r + 1) * k],
                    &mut buf[r * k..(r + 1) * k],
                );
            }
            let wrow = |r: usize| &buf[r * k..(r + 1) * k];
            let xrow = |i: usize| &x[i * k..(i + 1) * k];
            // SAFETY (all writes below): columns j0..j0+rows belong to this task alone.
            let put = |i: usize, j: usize, v: f32| unsafe { *ptr.at(i * n + j) = v };
            for i0 in (0..m).step_by(X_TILE) {
                let i1 = (i0 + X_TILE).min(m);
                let full_i = i0 + (i1 - i0) / 4 * 4;
                let full_r = rows / 4 * 4;
                for i in (i0..full_i).step_by(4) {
                    for r in (0..full_r).step_by(4) {
                        let t = dot_4x4(
                            isa,
                            [xrow(i), xrow(i + 1), xrow(i + 2), xrow(i + 3)],
                            [wrow(r), wrow(r + 1), wrow(r + 2), wrow(r + 3)],
                        );
                        for (a, row) in t.iter().enumerate() {
                            for (c, v) in row.iter().enumerate() {
                                put(i + a, j0 + r + c, *v);
                            }
                        }
                    }
                    for r in full_r..rows {
                        for a in 0..4 {
                            put(i + a, j0 + r, f32::dot(isa, xrow(i + a), wrow(r)));
                        }
                    }
                }
                for i in full_i..i1 {
                    for r in 0..rows {
                        put(i, j0 + r, f32::dot(isa, xrow(i), wrow(r)));
                    }
                }
            }
        },
    );
}

/// candle custom op: `x (…, k) f32` times `w (n, k)` transposed, giving `(…, n) f32`.
pub struct MatmulT;

fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

impl CustomOp2 for MatmulT {
    fn name(&self) -> &'static str {
        "zagreus-matmul-t"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = match s1 {
            CpuStorage::F32(v) => contiguous(v, l1, "activations")?,
            other => candle_core::bail!("activations must be f32, got {:?}", other.dtype()),
        };
        let (xd, wd) = (l1.dims(), l2.dims());
        let (Some(&k), [n, wk]) = (xd.last(), wd) else {
            candle_core::bail!("matmul shapes {xd:?} x {wd:?}ᵀ are not (…, k) x (n, k)");
        };
        if k != *wk {
            candle_core::bail!("matmul shapes {xd:?} x {wd:?}ᵀ do not agree on k");
        }
        let n = *n;
        let m = x.len() / k.max(1);
        let mut out = vec![0f32; m * n];
        match s2 {
            CpuStorage::F32(w) => matmul_t(x, m, k, contiguous(w, l2, "weights")?, n, &mut out),
            CpuStorage::BF16(w) => {
                matmul_t::<bf16>(x, m, k, contiguous(w, l2, "weights")?, n, &mut out)
            }
            CpuStorage::F16(w) => {
                matmul_t::<f16>(x, m, k, contiguous(w, l2, "weights")?, n, &mut out)
            }
            other => candle_core::bail!("weights of dtype {:?} are not supported", other.dtype()),
        }
        let mut dims = xd.to_vec();
        *dims.last_mut().expect("x has a last dim") = n;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn all_paths_match_reference_on_odd_shapes() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 33, 17),
            (2, 64, 5),
            (3, 100, 37),
            (4, 16, 16),
            (5, 31, 19),
            (9, 97, 33),
            (70, 40, 21),
        ] {
            let x = rand_vec(m * k, 3);
            let w = rand_vec(n * k, 4);
            let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
            let wh: Vec<f16> = w.iter().map(|v| f16::from_f32(*v)).collect();
            let tol = 1e-4 * (k as f32).sqrt();
            let check = |got: &[f32], wref: &[f32], what: &str| {
                let want = reference(&x, m, k, wref, n);
                for (g, e) in got.iter().zip(&want) {
                    assert!((g - e).abs() < tol, "{what} m={m} k={k} n={n}: {g} vs {e}");
                }
            };
            let mut out = vec![0f32; m * n];
            matmul_t(&x, m, k, &w, n, &mut out);
            check(&out, &w, "f32");
            matmul_t(&x, m, k, &wb, n, &mut out);
            check(
                &out,
                &wb.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
                "bf16",
            );
            matmul_t(&x, m, k, &wh, n, &mut out);
            check(
                &out,
                &wh.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
                "f16",
            );
        }
    }
}
