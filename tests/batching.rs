//! Batched steps of the CPU engine: several sequences in one forward pass, mixing prompt chunks
//! and decoding tokens, give every sequence exactly the logits (bit for bit) it gets alone, and
//! those logits match transformers' references. The same for the candle engine's batched steps
//! (its padded decoding passes), run here on the CPU.

mod common;

use common::{floats, ids, model_dir, read_json};
use zagreus::loader::{load, Engine, LoadOptions, LoadedModel};
use zagreus::model::llama::DECODE_ROWS;
use zagreus::model::{Cache, Chunk, CpuLlama, Format, LogitsFor, Model, Precision, RowKind, Step};
use zagreus::source::ModelFiles;

fn load_model(name: &str, quantize: Option<Format>) -> LoadedModel {
    load_with(
        name,
        LoadOptions {
            quantize,
            ..LoadOptions::cpu()
        },
    )
}

fn load_with(name: &str, opts: LoadOptions) -> LoadedModel {
    let files = ModelFiles::from_dir(&model_dir(name)).unwrap();
    load(&files, &opts).unwrap()
}

/// A fixture model on the candle engine, on the CPU.
fn candle_model(name: &str) -> Model {
    load_with(
        name,
        LoadOptions {
            engine: Engine::Candle,
            ..LoadOptions::cpu()
        },
    )
    .model
}

fn engine(m: &LoadedModel) -> &CpuLlama {
    match &m.model {
        Model::Cpu(e) => e,
        _ => panic!("the CPU engine was expected"),
    }
}

/// A sequence: its prompt and the tokens it will be fed afterwards (one per decoding step).
struct Seq {
    prompt: Vec<u32>,
    then: Vec<u32>,
}

/// Every logits row a sequence produces: the prompt's last position (the whole prompt in one
/// step), then one per fed token; alone, that is a batch of one.
fn alone(m: &Model, s: &Seq) -> Vec<Vec<f32>> {
    batched(m, std::slice::from_ref(s), &[0], &[s.prompt.len()]).remove(0)
}

/// All sequences together: sequence i starts `start[i]` steps late and feeds its prompt in
/// chunks of `chunk[i]` tokens (prompt rows), then its tokens one per step (decoding rows).
fn batched(m: &Model, seqs: &[Seq], start: &[usize], chunk: &[usize]) -> Vec<Vec<Vec<f32>>> {
    let vocab = m.vocab_size();
    let mut caches: Vec<Cache> = seqs.iter().map(|_| m.new_cache(m.max_positions())).collect();
    let mut fed = vec![0usize; seqs.len()];
    let mut rows: Vec<Vec<Vec<f32>>> = seqs.iter().map(|_| Vec::new()).collect();
    let mut out = Vec::new();
    for step in 0.. {
        let mut steps = Vec::new();
        let mut who = Vec::new();
        for (i, (s, cache)) in seqs.iter().zip(caches.iter_mut()).enumerate() {
            let total = s.prompt.len() + s.then.len();
            if step < start[i] || fed[i] == total {
                continue;
            }
            let (tokens, kind) = if fed[i] < s.prompt.len() {
                let end = (fed[i] + chunk[i]).min(s.prompt.len());
                (&s.prompt[fed[i]..end], RowKind::Prompt)
            } else {
                let j = fed[i] - s.prompt.len();
                (&s.then[j..j + 1], RowKind::Decode)
            };
            let done = fed[i] + tokens.len();
            // Logits when the prompt is complete, and for every decoding step.
            let wants = done >= s.prompt.len();
            who.push((i, wants));
            fed[i] = done;
            steps.push(Step {
                cache,
                tokens,
                kind,
                logits: LogitsFor::Last,
            });
        }
        if steps.is_empty() {
            break;
        }
        m.forward_batch(&mut steps, &mut out).unwrap();
        assert_eq!(out.len(), steps.len() * vocab);
        for (k, (i, wants)) in who.into_iter().enumerate() {
            if wants {
                rows[i].push(out[k * vocab..(k + 1) * vocab].to_vec());
            }
        }
    }
    rows
}

fn sequences(r: &serde_json::Value) -> Vec<Seq> {
    let prompt = ids(&r["prompt_ids"]);
    let greedy = ids(&r["greedy_ids"]);
    vec![
        Seq {
            prompt: prompt.clone(),
            then: greedy.clone(),
        },
        Seq {
            prompt: prompt[..prompt.len() / 2].to_vec(),
            then: vec![3, 1, 4, 1, 5, 9, 2, 6],
        },
        Seq {
            prompt: prompt.iter().rev().copied().collect(),
            then: greedy.iter().rev().copied().collect(),
        },
        Seq {
            prompt: vec![prompt[0]],
            then: vec![7; 5],
        },
    ]
}

/// Every sequence of the model's reference, alone and in batches of staggered starts and
/// different prompt chunkings (down to one token per step: decoding rows of some sequences beside
/// prompt rows of others), must get the same bits.
fn check_batches_match_alone(m: &LoadedModel, name: &str, label: &str) {
    let e = &m.model;
    let r = read_json(&model_dir(name).join("reference.json"));
    let seqs = sequences(&r);
    let want: Vec<_> = seqs.iter().map(|s| alone(e, s)).collect();
    for (start, chunk) in [
        (vec![0, 0, 0, 0], vec![64, 64, 64, 64]),
        (vec![0, 2, 5, 1], vec![3, 1, 7, 2]),
        (vec![3, 0, 0, 9], vec![1, 5, 64, 1]),
    ] {
        let got = batched(e, &seqs, &start, &chunk);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.len(), w.len(), "{name} {label} sequence {i}");
            for (step, (a, b)) in g.iter().zip(w).enumerate() {
                assert!(
                    a == b,
                    "{name} {label} sequence {i} step {step} (starts {start:?}, chunks {chunk:?}): \
                     logits differ from the sequence alone"
                );
            }
        }
    }
}

#[test]
fn a_batch_gives_each_sequence_the_same_bits_as_running_alone() {
    for name in ["tied-bf16", "untied-f32-sharded", "llama3-rope"] {
        for quantize in [None, Some(Format::Q8_0), Some(Format::Q4_0)] {
            let m = load_model(name, quantize);
            check_batches_match_alone(&m, name, &format!("{quantize:?}"));
        }
    }
}

#[test]
fn the_fast_precision_gives_each_sequence_the_same_bits_alone_or_batched() {
    // BF16 weights in the fast precision: activations rounded to BF16, BF16 dot products where
    // the CPU has them (one kernel for decoding and prompt rows alike).
    for name in ["tied-bf16", "untied-f32-sharded"] {
        let m = load_with(
            name,
            LoadOptions {
                dtype: Some(candle_core::DType::BF16),
                precision: Precision::Fast,
                ..LoadOptions::cpu()
            },
        );
        eprintln!("{name}: kernels {}", engine(&m).kernels());
        check_batches_match_alone(&m, name, "bf16 fast");
    }
    // Q8_0 and Q4_0 in the fast precision: 8-bit activations, quantized per row.
    for quantize in [Format::Q8_0, Format::Q4_0] {
        let m = load_with(
            "tied-bf16",
            LoadOptions {
                quantize: Some(quantize),
                precision: Precision::Fast,
                ..LoadOptions::cpu()
            },
        );
        eprintln!("{quantize:?}: kernels {}", engine(&m).kernels());
        check_batches_match_alone(&m, "tied-bf16", &format!("{quantize:?} fast"));
    }
}

#[test]
fn batched_logits_match_transformers() {
    for name in ["tied-bf16", "untied-f32-sharded", "llama3-rope"] {
        let m = load_model(name, None);
        let e = &m.model;
        let r = read_json(&model_dir(name).join("reference.json"));
        let seqs = sequences(&r);
        let got = batched(e, &seqs, &[1, 0, 0, 2], &[5, 64, 2, 1]);
        // Sequence 0 is the reference's own prompt and greedy continuation.
        let vocab = e.vocab_size();
        let prompt_rows = r["prompt_logits"].as_array().unwrap();
        let last_prompt = floats(&prompt_rows[prompt_rows.len() - 1]);
        let mut worst = 0f32;
        let steps = r["step_logits"].as_array().unwrap();
        for (row, want) in got[0]
            .iter()
            .zip(std::iter::once(last_prompt).chain(steps.iter().map(floats)))
        {
            assert_eq!(row.len(), vocab);
            for (a, b) in row.iter().zip(&want) {
                worst = worst.max((a - b).abs());
            }
        }
        eprintln!("{name}: batched max |Δlogit| against transformers {worst:e}");
        assert!(worst < 1e-3, "{name}: {worst}");
    }
}

#[test]
fn all_logits_of_a_prompt_in_a_batch_match_the_prompt_alone() {
    let m = load_model("tied-bf16", None);
    let e = engine(&m);
    let r = read_json(&model_dir("tied-bf16").join("reference.json"));
    let prompt = ids(&r["prompt_ids"]);
    let mut alone_cache = e.new_cache(64);
    let mut want = Vec::new();
    e.forward(&prompt, &mut alone_cache, LogitsFor::All, &mut want).unwrap();
    let (mut a, mut b) = (e.new_cache(64), e.new_cache(64));
    let other = [5u32, 6, 7];
    let mut chunks = vec![
        Chunk {
            cache: &mut b,
            tokens: &other,
            kind: RowKind::Prompt,
            logits: LogitsFor::Last,
        },
        Chunk {
            cache: &mut a,
            tokens: &prompt,
            kind: RowKind::Prompt,
            logits: LogitsFor::All,
        },
    ];
    let mut out = Vec::new();
    e.forward_batch(&mut chunks, &mut out).unwrap();
    let vocab = e.vocab_size();
    assert_eq!(out.len(), (1 + prompt.len()) * vocab);
    assert!(out[vocab..] == want[..], "the prompt's rows differ when batched");
    // A bad token in one sequence fails the step before any cache moves.
    let bad = [u32::MAX];
    let mut chunks = vec![
        Chunk {
            cache: &mut a,
            tokens: &[1],
            kind: RowKind::Decode,
            logits: LogitsFor::Last,
        },
        Chunk {
            cache: &mut b,
            tokens: &bad,
            kind: RowKind::Decode,
            logits: LogitsFor::Last,
        },
    ];
    let e2 = e.forward_batch(&mut chunks, &mut out).unwrap_err().to_string();
    assert!(e2.contains("outside the model's vocabulary"), "{e2}");
    assert_eq!((a.len(), b.len()), (prompt.len(), 3));
}

#[test]
fn the_candle_engine_decodes_a_batch_with_the_same_bits_as_alone() {
    for name in ["tied-bf16", "untied-f32-sharded", "llama3-rope"] {
        let m = candle_model(name);
        assert!(matches!(m, Model::Candle(_)));
        let r = read_json(&model_dir(name).join("reference.json"));
        // 20 sequences: more than one padded decoding pass (DECODE_ROWS) in the busiest steps.
        let mut seqs = Vec::new();
        for copy in 0..5u32 {
            for s in sequences(&r) {
                let then = s.then.iter().map(|t| (t + 11 * copy) % m.vocab_size() as u32).collect();
                seqs.push(Seq { prompt: s.prompt, then });
            }
        }
        assert!(seqs.len() > DECODE_ROWS);
        let want: Vec<_> = seqs.iter().map(|s| alone(&m, s)).collect();
        for start in [vec![0; seqs.len()], (0..seqs.len()).map(|i| i % 7).collect()] {
            let whole: Vec<usize> = seqs.iter().map(|s| s.prompt.len()).collect();
            let got = batched(&m, &seqs, &start, &whole);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.len(), w.len(), "{name} sequence {i}");
                for (step, (a, b)) in g.iter().zip(w).enumerate() {
                    assert!(
                        a == b,
                        "{name} sequence {i} step {step} (starts {start:?}): logits differ from alone"
                    );
                }
            }
            // Sequence 0 is the reference's prompt and greedy continuation.
            let prompt_rows = r["prompt_logits"].as_array().unwrap();
            let steps = r["step_logits"].as_array().unwrap();
            let mut worst = 0f32;
            for (row, want) in got[0]
                .iter()
                .zip(std::iter::once(floats(&prompt_rows[prompt_rows.len() - 1])).chain(steps.iter().map(floats)))
            {
                for (a, b) in row.iter().zip(&want) {
                    worst = worst.max((a - b).abs());
                }
            }
            assert!(worst < 1e-3, "{name}: batched candle logits {worst} from transformers'");
        }
    }
    // A bad token in one decoding sequence fails the step before any cache moves.
    let m = candle_model("tied-bf16");
    let (mut a, mut b) = (m.new_cache(64), m.new_cache(64));
    let mut out = Vec::new();
    m.forward(&[1, 2, 3], &mut a, LogitsFor::Last, &mut out).unwrap();
    m.forward(&[4, 5], &mut b, LogitsFor::Last, &mut out).unwrap();
    let bad = [u32::MAX];
    let mut steps = vec![
        Step {
            cache: &mut a,
            tokens: &[1],
            kind: RowKind::Decode,
            logits: LogitsFor::Last,
        },
        Step {
            cache: &mut b,
            tokens: &bad,
            kind: RowKind::Decode,
            logits: LogitsFor::Last,
        },
    ];
    let err = m.forward_batch(&mut steps, &mut out).unwrap_err().to_string();
    assert!(err.contains("outside the model's vocabulary"), "{err}");
    assert_eq!((a.len(), b.len()), (3, 2));
}

#[test]
fn both_engines_count_the_bytes_their_caches_take_per_position() {
    let cpu = load_model("tied-bf16", None).model;
    let candle = candle_model("tied-bf16");
    let c = cpu.config();
    // Keys and values, f32 (the exact precision; candle's activations on the CPU).
    let f32_bytes = c.num_hidden_layers * c.num_key_value_heads * 2 * c.head_dim * 4;
    assert_eq!(cpu.kv_bytes_per_position(), f32_bytes);
    assert_eq!(candle.kv_bytes_per_position(), f32_bytes);
    // A CPU cache grown to whole tiles of keys holds exactly that per position.
    let m = load_model("tied-bf16", None);
    let e = engine(&m);
    let mut cache = e.new_cache(64);
    let mut out = Vec::new();
    e.forward(&[1; 32], &mut cache, LogitsFor::Last, &mut out).unwrap();
    assert_eq!(cache.capacity() % 16, 0, "capacity {}", cache.capacity());
    assert_eq!(cache.bytes(), cache.capacity() * f32_bytes);
}
