//! Micro-benchmarks of the CPU engine's hot kernels at the Zagreus shape (`cargo bench`).
//! Decode products are memory-bound: compare their bytes/s with the machine's read bandwidth.

use divan::counter::BytesCount;
use divan::Bencher;
use zagreus::model::cpu::arena::{Arena, Placement};
use zagreus::model::cpu::attention::{attention, key_group_len, AttnScratch, AttnSeq, KvElem, LayerKv};
use zagreus::model::cpu::isa::Isa;
use zagreus::model::cpu::qmatrix::{matmul, Format, Precision, QMatrix, Storage, Variant, PANEL};

fn main() {
    divan::main();
}

/// A `rows x cols` matrix of the given storage with pseudo-random weights.
fn matrix(storage: Storage, rows: usize, cols: usize) -> (Arena, QMatrix) {
    let mut arena = Arena::new(storage.arena_bytes(rows, cols) + 4096, Placement::from_env()).unwrap();
    let m = QMatrix::alloc(&mut arena, storage, rows, cols).unwrap();
    let mut panel = vec![0f32; PANEL * cols];
    for b in 0..m.panels() {
        for (i, v) in panel.iter_mut().enumerate() {
            *v = (((b * 31 + i * 17) % 97) as f32 - 48.0) / 500.0;
        }
        m.set_panel(&mut arena, b, &panel);
    }
    (arena, m)
}

/// BF16, F32, and Q8_0 and Q4_0 with float and integer kernels.
const FORMATS: &[Storage] = &[
    Storage {
        format: Format::Bf16,
        variant: Variant::Float,
        precision: Precision::Exact,
    },
    Storage {
        format: Format::F32,
        variant: Variant::Float,
        precision: Precision::Exact,
    },
    Storage {
        format: Format::Q8_0,
        variant: Variant::Float,
        precision: Precision::Exact,
    },
    Storage {
        format: Format::Q8_0,
        variant: Variant::Int,
        precision: Precision::Exact,
    },
    Storage {
        format: Format::Q8_0,
        variant: Variant::Int,
        precision: Precision::Fast,
    },
    Storage {
        format: Format::Q4_0,
        variant: Variant::Float,
        precision: Precision::Exact,
    },
    Storage {
        format: Format::Q4_0,
        variant: Variant::Int,
        precision: Precision::Exact,
    },
];

/// One decode step's largest product: the tied LM head, 128256 x 960.
#[divan::bench(args = FORMATS, sample_count = 20)]
fn gemv_lm_head(bencher: Bencher, format: Storage) {
    let (arena, m) = matrix(format, 128_256, 960);
    let x: Vec<f32> = (0..960).map(|i| (i % 13) as f32 / 13.0).collect();
    let mut out = vec![0f32; 128_256];
    bencher
        .counter(BytesCount::new(m.bytes()))
        .bench_local(|| matmul(&arena, &m, &x, 1, &mut out));
}

/// The read ceiling the decode products are measured against: the pool's number of threads
/// (`RAYON_NUM_THREADS`) each sum their share of 246 MB (the BF16 LM head's bytes) from an arena
/// placed as the weights are (`ZAGREUS_HUGEPAGES`), a 64-byte line at a time with a prefetch
/// `READ_AHEAD` bytes ahead as the kernels do. One sequence's decoding can go no faster than
/// this many bytes per second (`gemv_lm_head` above, `weights GB/s` in `zagreus bench`); on a
/// shared host both move together, so compare them within one run.
#[divan::bench(sample_count = 20)]
fn read_bandwidth(bencher: Bencher) {
    let words = 128_256 * 960 / 2;
    let mut arena = Arena::new(words * 4 + 4096, Placement::from_env()).unwrap();
    let region = arena.alloc::<f32>(words).unwrap();
    for (i, w) in arena.get_mut(region).iter_mut().enumerate() {
        *w = (i % 7) as f32;
    }
    let data = arena.get(region);
    let threads = rayon::current_num_threads().max(1);
    bencher.counter(BytesCount::new(words * 4)).bench_local(|| {
        std::thread::scope(|s| {
            for part in data.chunks(words.div_ceil(threads)) {
                s.spawn(move || divan::black_box(sum_lines(part)));
            }
        })
    });
}

/// How far ahead `sum_lines` prefetches: the kernels' distance (the hardware prefetchers stop
/// at 4 KiB boundaries).
const READ_AHEAD: usize = 8192;

/// Sums of `w`'s lines, one per position in a line.
fn sum_lines(w: &[f32]) -> [f32; 16] {
    let mut acc = [0f32; 16];
    for line in w.chunks_exact(16) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let ahead = line.as_ptr().wrapping_byte_add(READ_AHEAD) as *const i8;
            // SAFETY: a prefetch does not fault, whatever the address.
            #[allow(unused_unsafe)]
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(ahead)
            };
        }
        for (a, v) in acc.iter_mut().zip(line) {
            *a += v;
        }
    }
    acc
}

/// Prefill of 128 tokens through the fused gate/up projection (5120 x 960).
#[divan::bench(args = FORMATS, sample_count = 10)]
fn gemm_pp128_gate_up(bencher: Bencher, format: Storage) {
    let (arena, m) = matrix(format, 5120, 960);
    let x: Vec<f32> = (0..128 * 960).map(|i| (i % 13) as f32 / 13.0).collect();
    let mut out = vec![0f32; 128 * 5120];
    let flops: usize = 2 * 128 * 5120 * 960;
    bencher
        .counter(divan::counter::ItemsCount::new(flops))
        .bench_local(|| matmul(&arena, &m, &x, 128, &mut out));
}

/// Attention of one query (15 heads, 5 KV heads, head_dim 64) against 2048 cached positions,
/// keys and values in f32 (the exact precision) or BF16 (the fast one).
#[divan::bench(types = [f32, half::bf16], sample_count = 50)]
fn attention_decode_ctx2048<E: KvElem>(bencher: Bencher) {
    let (heads, kvh, hd, len) = (15, 5, 64, 2048);
    let cap = len;
    let kt: Vec<E> = (0..kvh * key_group_len(hd, cap))
        .map(|i| E::from_f32((i % 7) as f32 / 7.0))
        .collect();
    let v: Vec<E> = (0..kvh * cap * hd).map(|i| E::from_f32((i % 7) as f32 / 7.0)).collect();
    let q: Vec<f32> = (0..heads * hd).map(|i| (i % 5) as f32 / 5.0).collect();
    let mut out = vec![0f32; heads * hd];
    let mut sc = AttnScratch::default();
    bencher.bench_local(|| {
        let seq = AttnSeq {
            kv: LayerKv { kt: &kt, v: &v, cap },
            row0: 0,
            t: 1,
            pos: len - 1,
        };
        attention(Isa::get(), &[seq], &q, heads * hd, heads, kvh, hd, &mut out, &mut sc)
    });
}

/// One decoding step's attention in one layer for 16 sequences of 1024 cached positions each,
/// every sequence its own cache (42 MB of f32 keys and values, more than the last-level cache
/// here: memory-bound, as in a batched step where each layer's caches were last read a step ago).
#[divan::bench(types = [f32, half::bf16], sample_count = 30)]
fn attention_decode_16x1024<E: KvElem>(bencher: Bencher) {
    let (heads, kvh, hd, len, seqs) = (15, 5, 64, 1024, 16);
    let cap = len;
    let caches: Vec<(Vec<E>, Vec<E>)> = (0..seqs)
        .map(|s| {
            let kt = (0..kvh * key_group_len(hd, cap))
                .map(|i| E::from_f32(((i + s) % 7) as f32 / 7.0))
                .collect();
            let v = (0..kvh * cap * hd)
                .map(|i| E::from_f32(((i + s) % 5) as f32 / 5.0))
                .collect();
            (kt, v)
        })
        .collect();
    let q: Vec<f32> = (0..seqs * heads * hd).map(|i| (i % 5) as f32 / 5.0).collect();
    let mut out = vec![0f32; seqs * heads * hd];
    let mut sc = AttnScratch::default();
    bencher.bench_local(|| {
        let batch: Vec<AttnSeq<E>> = caches
            .iter()
            .enumerate()
            .map(|(s, (kt, v))| AttnSeq {
                kv: LayerKv { kt, v, cap },
                row0: s,
                t: 1,
                pos: len - 1,
            })
            .collect();
        attention(Isa::get(), &batch, &q, heads * hd, heads, kvh, hd, &mut out, &mut sc)
    });
}

/// A product whose weights stay in L2 (768 x 960 bf16 = 1.4 MB): the kernels' compute rate.
#[divan::bench(args = FORMATS, sample_count = 50)]
fn gemv_in_cache(bencher: Bencher, format: Storage) {
    let (arena, m) = matrix(format, 768, 960);
    let x: Vec<f32> = (0..960).map(|i| (i % 13) as f32 / 13.0).collect();
    let mut out = vec![0f32; 768];
    bencher
        .counter(BytesCount::new(m.bytes()))
        .bench_local(|| matmul(&arena, &m, &x, 1, &mut out));
}

/// Decoding 1, 4, 8 and 16 sequences at once through a product whose weights stay in L2
/// (768 x 960): the small-M kernels' compute rate.
#[divan::bench(args = [1, 4, 8, 16], sample_count = 50)]
fn gemv_rows_bf16_in_cache(bencher: Bencher, rows: usize) {
    let (arena, m) = matrix(FORMATS[0], 768, 960);
    let x: Vec<f32> = (0..rows * 960).map(|i| (i % 13) as f32 / 13.0).collect();
    let mut out = vec![0f32; rows * 768];
    let flops: usize = 2 * rows * 768 * 960;
    bencher
        .counter(divan::counter::ItemsCount::new(flops))
        .bench_local(|| zagreus::model::cpu::qmatrix::matmul_rows(&arena, &m, &x, rows, rows, &mut out));
}

/// The same with the fast precision's BF16 dot products (activations rounded to BF16).
#[divan::bench(args = [1, 4, 8, 16], sample_count = 50)]
fn gemv_rows_bf16_dot_in_cache(bencher: Bencher, rows: usize) {
    let storage = Storage::new(Format::Bf16, Variant::Bf16Dot);
    let (arena, m) = matrix(storage, 768, 960);
    let x: Vec<f32> = (0..rows * 960).map(|i| (i % 13) as f32 / 13.0).collect();
    let mut out = vec![0f32; rows * 768];
    let flops: usize = 2 * rows * 768 * 960;
    bencher
        .counter(divan::counter::ItemsCount::new(flops))
        .bench_local(|| zagreus::model::cpu::qmatrix::matmul_rows(&arena, &m, &x, rows, rows, &mut out));
}

/// The same rows as prompt rows (widened panel, micro-kernel), for comparison.
#[divan::bench(args = [1, 4, 8, 16], sample_count = 50)]
fn gemm_rows_bf16_in_cache(bencher: Bencher, rows: usize) {
    let (arena, m) = matrix(FORMATS[0], 768, 960);
    let x: Vec<f32> = (0..rows * 960).map(|i| (i % 13) as f32 / 13.0).collect();
    let mut out = vec![0f32; rows * 768];
    let flops: usize = 2 * rows * 768 * 960;
    bencher
        .counter(divan::counter::ItemsCount::new(flops))
        .bench_local(|| zagreus::model::cpu::qmatrix::matmul_rows(&arena, &m, &x, 0, rows, &mut out));
}

/// Decoding 1, 4, 8 and 16 sequences at once with Q8_0 weights and the integer kernels (weights
/// in L2): the integer small-M kernels' compute rate.
#[divan::bench(args = [1, 4, 8, 16], sample_count = 50)]
fn gemv_rows_q8_in_cache(bencher: Bencher, rows: usize) {
    let (arena, m) = matrix(FORMATS[3], 768, 960);
    let x: Vec<f32> = (0..rows * 960).map(|i| (i % 13) as f32 / 13.0).collect();
    let mut out = vec![0f32; rows * 768];
    let flops: usize = 2 * rows * 768 * 960;
    bencher
        .counter(divan::counter::ItemsCount::new(flops))
        .bench_local(|| zagreus::model::cpu::qmatrix::matmul_rows(&arena, &m, &x, rows, rows, &mut out));
}

/// Quantizing 1, 4, 8 and 16 rows of 960 activations for the integer kernels (part of every
/// integer product, on the calling thread).
#[divan::bench(args = [1, 4, 8, 16], sample_count = 50)]
fn quantize_rows_960(bencher: Bencher, rows: usize) {
    let x: Vec<f32> = (0..rows * 960).map(|i| (i % 13) as f32 / 13.0 - 0.4).collect();
    let mut acts = zagreus::model::cpu::quant::QuantActs::default();
    bencher
        .counter(divan::counter::ItemsCount::new(rows * 960))
        .bench_local(|| acts.quantize(&x, rows, 960, true));
}

/// The four products of a decoding layer at the Zagreus shape (q/k/v 1600 x 960, o 960 x 960,
/// gate/up 5120 x 960, down 960 x 2560) for 1 and 16 sequences (BF16, Q8_0, and Q8_0 in the
/// fast precision), over 8 layers' worth of weights so that they come from memory as in the
/// model (the products alone, without the rest of a step: what a change to how panels are
/// shared between threads or streamed would move).
#[divan::bench(args = [(0, 1), (0, 16), (3, 1), (3, 16), (4, 1), (4, 16)], sample_count = 20)]
fn decode_layers(bencher: Bencher, (format, rows): (usize, usize)) {
    let shapes = [(1600, 960), (960, 960), (5120, 960), (960, 2560)];
    let layers: Vec<Vec<(Arena, QMatrix)>> = (0..8)
        .map(|_| shapes.iter().map(|&(n, k)| matrix(FORMATS[format], n, k)).collect())
        .collect();
    let x: Vec<f32> = (0..rows * 5120).map(|i| (i % 13) as f32 / 13.0 - 0.4).collect();
    let mut out = vec![0f32; rows * 5120];
    bencher.bench_local(|| {
        for layer in &layers {
            for (arena, m) in layer {
                let (n, k) = (m.rows, m.cols);
                zagreus::model::cpu::qmatrix::matmul_rows(arena, m, &x[..rows * k], rows, rows, &mut out[..rows * n]);
            }
        }
    });
}
