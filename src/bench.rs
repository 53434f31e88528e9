//! `zagreus bench`: llama-bench-shaped measurements of prompt processing (pp) and generation
//! (tg) speed, on any model or on random weights of a named shape (no download needed), with mean
//! and standard deviation over repetitions, and the weight bandwidth each decode figure implies.

use std::io::Write;
use std::time::Instant;

use std::collections::BTreeSet;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::cli::BenchArgs;
use crate::model::cpu::arena::Placement;
use crate::model::{Cache, CpuLlama, Format, LlamaConfig, LogitsFor, Model, RowKind, Step};
use crate::structured::{Grammars, Plan, Structure};

/// Shapes `--random` knows.
pub fn named_shape(name: &str) -> Result<LlamaConfig> {
    let json = match name {
        "zagreus-0.4b" => {
            r#"{"model_type":"llama","vocab_size":128256,"hidden_size":960,"intermediate_size":2560,
            "num_hidden_layers":32,"num_attention_heads":15,"num_key_value_heads":5,
            "max_position_embeddings":4096,"rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":true}"#
        }
        "smollm2-135m" => {
            r#"{"model_type":"llama","vocab_size":49152,"hidden_size":576,"intermediate_size":1536,
            "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,
            "max_position_embeddings":8192,"rms_norm_eps":1e-5,"rope_theta":100000.0,"tie_word_embeddings":true}"#
        }
        other => bail!("--random {other}: unknown shape (known: zagreus-0.4b, smollm2-135m)"),
    };
    LlamaConfig::from_json(json)
}

#[derive(Serialize, Clone)]
pub struct Measurement {
    pub model: String,
    pub format: String,
    pub device: String,
    /// The instruction level and kernels that ran (`avx512-vnni, int8 (measured on this CPU)`).
    pub kernels: String,
    pub threads: usize,
    /// `pp128`, `tg64`, `tg64@d2048`.
    pub test: String,
    pub tokens_per_s: f64,
    pub stddev: f64,
    pub samples: Vec<f64>,
    /// Weight bytes read per second while decoding (decode tests only).
    pub weight_gb_per_s: Option<f64>,
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Pseudo-random token ids below `vocab` (what llama-bench feeds too).
fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

fn prompt_speed(model: &Model, p: usize) -> Result<f64> {
    let mut cache = model.new_cache(p + 1);
    let ids = tokens(p, model.vocab_size(), p as u64);
    let mut out = Vec::new();
    let t = Instant::now();
    for chunk in ids.chunks(crate::session::PREFILL_CHUNK) {
        model.forward(chunk, &mut cache, LogitsFor::Last, &mut out)?;
    }
    Ok(p as f64 / t.elapsed().as_secs_f64())
}

fn decode_speed(model: &Model, n: usize, depth: usize) -> Result<f64> {
    let mut cache = model.new_cache(depth + n + 1);
    let mut out = Vec::new();
    if depth > 0 {
        for chunk in tokens(depth, model.vocab_size(), 7).chunks(crate::session::PREFILL_CHUNK) {
            model.forward(chunk, &mut cache, LogitsFor::Last, &mut out)?;
        }
    }
    let ids = tokens(n, model.vocab_size(), 11);
    let t = Instant::now();
    for &id in &ids {
        model.forward(&[id], &mut cache, LogitsFor::Last, &mut out)?;
        std::hint::black_box(crate::sampling::argmax(&out));
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Tokens per second of `n` tokens generated greedily under `plan` after
/// `depth` tokens: every step's logits masked, the token followed; a finished answer starts
/// the next one.
fn constrained_speed(
    model: &Model,
    n: usize,
    depth: usize,
    plan: &Arc<Plan>,
    stops: &[u32],
    spent: &GrammarTime,
) -> Result<f64> {
    let mut cache = model.new_cache(depth + n + 1);
    let mut out = Vec::new();
    if depth > 0 {
        for chunk in tokens(depth, model.vocab_size(), 7).chunks(crate::session::PREFILL_CHUNK) {
            model.forward(chunk, &mut cache, LogitsFor::Last, &mut out)?;
        }
    }
    let mut constraint = plan.start();
    let mut next = tokens(1, model.vocab_size(), 11)[0];
    let mut grammar = std::time::Duration::ZERO;
    let t = Instant::now();
    for _ in 0..n {
        model.forward(&[next], &mut cache, LogitsFor::Last, &mut out)?;
        let g = Instant::now();
        constraint.mask(&mut out)?;
        next = crate::sampling::argmax(&out);
        if stops.contains(&next) || constraint.is_done() {
            constraint = plan.start();
        } else {
            constraint.accept(next)?;
        }
        grammar += g.elapsed();
    }
    let total = t.elapsed();
    spent.add(grammar, total, n);
    Ok(n as f64 / total.as_secs_f64())
}

/// The time the grammar took in the constrained tests (mask, choice among allowed tokens,
/// update), against their whole time.
#[derive(Default)]
struct GrammarTime(std::cell::Cell<(std::time::Duration, std::time::Duration, usize)>);

impl GrammarTime {
    fn add(&self, grammar: std::time::Duration, total: std::time::Duration, tokens: usize) {
        let (g, t, n) = self.0.get();
        self.0.set((g + grammar, t + total, n + tokens));
    }

    /// (microseconds per token, share of the decode time), then starts over.
    fn take(&self) -> Option<(f64, f64)> {
        let (g, t, n) = self.0.take();
        (n > 0).then(|| (g.as_secs_f64() * 1e6 / n as f64, g.as_secs_f64() / t.as_secs_f64()))
    }
}

/// The constrained test's plan: the schema over the tokenizer (end tokens: the usual names).
fn schema_plan(
    args: &BenchArgs,
    tokenizer: Option<&crate::tokenizer::Tokenizer>,
    vocab: usize,
) -> Result<Option<(Arc<Plan>, Vec<u32>)>> {
    let Some(path) = &args.json_schema else {
        return Ok(None);
    };
    let text = crate::bounded::read_text(path, crate::bounded::JSON_CONFIG_LIMIT, "the JSON schema")?;
    let schema: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let inner = match (&args.tokenizer, tokenizer) {
        (Some(p), _) => std::sync::Arc::new(crate::tokenizer::read_tokenizer_json(p)?),
        (None, Some(t)) => t.inner(),
        (None, None) => bail!("--json-schema with --random needs --tokenizer FILE"),
    };
    let stops: BTreeSet<u32> = ["<|end_of_text|>", "<|im_end|>", "<|eot_id|>", "</s>", "<|endoftext|>"]
        .iter()
        .filter_map(|t| inner.token_to_id(t))
        .filter(|&id| (id as usize) < vocab)
        .collect();
    let grammars = Arc::new(Grammars::new(inner, vocab, &stops)?);
    let plan = grammars.plan(&Structure::Json(schema))?;
    Ok(Some((plan, stops.into_iter().collect())))
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let threads = crate::device::set_threads(args.model.threads)?;
    let (model, name, plan) = match &args.random {
        Some(shape) => {
            let cfg = named_shape(shape)?;
            check_lengths(args, cfg.max_position_embeddings)?;
            let device = args.model.device.open()?;
            if !device.is_cpu() {
                if args.model.quantize.is_some() {
                    bail!("--quantize works on the CPU only");
                }
                if args.model.spec().precision != crate::model::Precision::Exact {
                    bail!("--precision fast works on the CPU only");
                }
                let dtype = args.model.dtype.to_dtype().unwrap_or(candle_core::DType::BF16);
                let model = Model::Candle(crate::model::Llama::random(&cfg, dtype, &device)?);
                let plan = schema_plan(args, None, cfg.vocab_size)?;
                return measure(args, model, format!("{shape} (random)"), threads, plan);
            }
            let format = match (args.model.quantize, args.model.dtype.to_dtype()) {
                (Some(q), _) => q.format(),
                (None, Some(candle_core::DType::F32)) => Format::F32,
                (None, Some(candle_core::DType::F16)) => Format::F16,
                _ => Format::Bf16,
            };
            let placement = match args.placement.as_deref() {
                None | Some("huge") => Placement::Huge,
                Some("normal") => Placement::Normal,
                Some(other) => bail!("--placement {other}: use huge or normal"),
            };
            (
                Model::Cpu(CpuLlama::random(
                    &cfg,
                    format,
                    placement,
                    args.model.spec().precision,
                    42,
                )?),
                format!("{shape} (random)"),
                schema_plan(args, None, cfg.vocab_size)?,
            )
        }
        None => {
            let (loaded, _) = crate::loader::load_for(&args.model.spec())?;
            let name = loaded.name.clone();
            let plan = schema_plan(args, Some(&loaded.tokenizer), loaded.model.vocab_size())?;
            (loaded.model, name, plan)
        }
    };
    measure(args, model, name, threads, plan)
}

/// One batched measurement: `batch` sequences, `prompt` tokens each prefilled, then `gen` tokens
/// each decoded in steps of all of them.
#[derive(Serialize, Clone)]
pub struct BatchMeasurement {
    pub model: String,
    pub format: String,
    pub device: String,
    pub kernels: String,
    pub threads: usize,
    pub prompt: usize,
    pub gen: usize,
    pub batch: usize,
    /// Prompt tokens of all sequences per second.
    pub prefill_tokens_per_s: f64,
    /// Generated tokens of all sequences per second.
    pub decode_tokens_per_s: f64,
    /// Generated tokens per second of one sequence.
    pub decode_per_sequence: f64,
    pub samples: Vec<(f64, f64)>,
}

/// Keys and values all the sequences of one batched test may hold.
const MAX_BATCH_KV_BYTES: usize = 16 << 30;

/// Every (prompt, gen, batch) combination asked for.
fn iproduct<'a>(
    p: &'a [usize],
    n: &'a [usize],
    b: &'a [usize],
) -> impl Iterator<Item = (&'a usize, &'a usize, &'a usize)> {
    p.iter()
        .flat_map(move |p| n.iter().flat_map(move |n| b.iter().map(move |b| (p, n, b))))
}

/// Prompt rows per step at most when prefilling a batch.
const BATCH_PREFILL_ROWS: usize = 2048;

/// (prefill t/s, aggregate decode t/s) of `batch` sequences.
fn batched_speed(model: &Model, batch: usize, prompt: usize, gen: usize) -> Result<(f64, f64)> {
    let vocab = model.vocab_size();
    let mut caches: Vec<Cache> = (0..batch).map(|_| model.new_cache(prompt + gen + 1)).collect();
    let prompts: Vec<Vec<u32>> = (0..batch).map(|b| tokens(prompt, vocab, 1 + b as u64)).collect();
    let mut out = Vec::new();
    let t = Instant::now();
    // Whole prompts, as many per step as fit in BATCH_PREFILL_ROWS (at least one).
    if let Some(per_step) = BATCH_PREFILL_ROWS.checked_div(prompt) {
        let per_step = per_step.max(1);
        for (cs, ps) in caches.chunks_mut(per_step).zip(prompts.chunks(per_step)) {
            let mut steps: Vec<Step> = cs
                .iter_mut()
                .zip(ps)
                .map(|(cache, p)| Step {
                    cache,
                    tokens: p,
                    kind: RowKind::Prompt,
                    logits: LogitsFor::Last,
                })
                .collect();
            model.forward_batch(&mut steps, &mut out)?;
        }
    }
    let prefill = (batch * prompt) as f64 / t.elapsed().as_secs_f64();
    let mut next: Vec<u32> = (0..batch).map(|b| (b * 7919 % vocab) as u32).collect();
    let t = Instant::now();
    for _ in 0..gen {
        let toks: Vec<[u32; 1]> = next.iter().map(|&x| [x]).collect();
        let mut steps: Vec<Step> = caches
            .iter_mut()
            .zip(&toks)
            .map(|(cache, tok)| Step {
                cache,
                tokens: tok,
                kind: RowKind::Decode,
                logits: LogitsFor::Last,
            })
            .collect();
        model.forward_batch(&mut steps, &mut out)?;
        for (b, row) in out.chunks(vocab).enumerate() {
            next[b] = crate::sampling::argmax(row);
        }
    }
    let decode = (batch * gen) as f64 / t.elapsed().as_secs_f64();
    Ok((prefill, decode))
}

/// `--batch`: llama-batched-bench-shaped figures for every batch size, prompt and length asked.
fn measure_batches(args: &BenchArgs, model: &Model, name: &str, threads: usize) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let device = crate::device::device_name(&model.device());
    let kernels = kernels_of(model);
    for (&p, &n, &b) in iproduct(&args.prompt, &args.gen, &args.batch) {
        let bytes = model.kv_bytes_per_position().saturating_mul(p + n + 1);
        if bytes.saturating_mul(b) > MAX_BATCH_KV_BYTES {
            bail!(
                "{b} sequences of {} tokens need {} GiB of keys and values, more than the {} GiB a benchmark may take",
                p + n,
                bytes.saturating_mul(b) >> 30,
                MAX_BATCH_KV_BYTES >> 30
            );
        }
    }
    if !args.json {
        writeln!(
            out,
            "| model | format | device | kernels | threads | prompt | gen | batch | prefill t/s | decode t/s | per sequence t/s |"
        )?;
        writeln!(
            out,
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        )?;
    }
    let mut results = Vec::new();
    for &p in &args.prompt {
        for &n in &args.gen {
            for &b in &args.batch {
                batched_speed(model, b, p, n.min(4))?; // warm-up
                let samples: Vec<(f64, f64)> = (0..args.repetitions)
                    .map(|_| batched_speed(model, b, p, n))
                    .collect::<Result<_>>()?;
                let (pp, _) = mean_sd(&samples.iter().map(|s| s.0).collect::<Vec<_>>());
                let (tg, _) = mean_sd(&samples.iter().map(|s| s.1).collect::<Vec<_>>());
                let m = BatchMeasurement {
                    model: name.to_string(),
                    format: model.precision().to_string(),
                    device: device.clone(),
                    kernels: kernels.clone(),
                    threads,
                    prompt: p,
                    gen: n,
                    batch: b,
                    prefill_tokens_per_s: pp,
                    decode_tokens_per_s: tg,
                    decode_per_sequence: tg / b as f64,
                    samples,
                };
                if !args.json {
                    writeln!(
                        out,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} |",
                        m.model, m.format, m.device, m.kernels, threads, p, n, b, pp, tg, m.decode_per_sequence
                    )?;
                    out.flush()?;
                }
                results.push(m);
            }
        }
    }
    if args.json {
        serde_json::to_writer_pretty(&mut out, &results)?;
        writeln!(out)?;
    }
    Ok(())
}

/// The kernels column: the CPU engine's instruction set and kernel choice, or candle's.
fn kernels_of(model: &Model) -> String {
    match model {
        Model::Cpu(m) => m.kernels(),
        Model::Candle(_) => "candle".to_string(),
    }
}

/// Refuses tests longer than the model's context before any cache is allocated for them.
fn check_lengths(args: &BenchArgs, context: usize) -> Result<()> {
    if let Some(p) = args.prompt.iter().find(|p| **p > context) {
        bail!("-p {p}: more tokens than the model's context of {context}");
    }
    for &n in &args.gen {
        if let Some(d) = args.depth.iter().find(|d| n + **d > context) {
            bail!(
                "-n {n} with -d {d}: {} tokens, more than the model's context of {context}",
                n + d
            );
        }
    }
    Ok(())
}

/// Runs the requested tests on a loaded network and prints the table or JSON.
fn measure(
    args: &BenchArgs,
    model: Model,
    name: String,
    threads: usize,
    plan: Option<(Arc<Plan>, Vec<u32>)>,
) -> Result<()> {
    check_lengths(args, model.max_positions())?;
    if !args.batch.is_empty() {
        return measure_batches(args, &model, &name, threads);
    }
    let bytes_per_token = match &model {
        Model::Cpu(m) => Some(m.bytes_per_token()),
        Model::Candle(_) => None,
    };
    let format = model.precision().to_string();
    let device = crate::device::device_name(&model.device());
    let kernels = kernels_of(&model);
    let mut results = Vec::new();
    let spent = GrammarTime::default();
    type Test<'a> = (String, Box<dyn Fn() -> Result<f64> + 'a>);
    let mut tests: Vec<Test> = Vec::new();
    for &p in &args.prompt {
        if p > 0 {
            let m = &model;
            tests.push((format!("pp{p}"), Box::new(move || prompt_speed(m, p))));
        }
    }
    for &n in &args.gen {
        for &d in &args.depth {
            if n > 0 {
                let m = &model;
                let label = if d > 0 { format!("tg{n}@d{d}") } else { format!("tg{n}") };
                tests.push((label.clone(), Box::new(move || decode_speed(m, n, d))));
                if let Some((plan, stops)) = &plan {
                    let spent = &spent;
                    tests.push((
                        format!("{label}+schema"),
                        Box::new(move || constrained_speed(m, n, d, plan, stops, spent)),
                    ));
                }
            }
        }
    }
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "| model | format | device | kernels | threads | test | t/s | weights GB/s |"
        )?;
        writeln!(out, "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")?;
    }
    for (label, f) in &tests {
        f()?; // warm-up, as llama-bench does
        spent.take();
        let samples: Vec<f64> = (0..args.repetitions).map(|_| f()).collect::<Result<_>>()?;
        if let Some((us, share)) = spent.take() {
            crate::note!(
                "zagreus: {label}: the grammar took {us:.0} µs per token ({:.1}% of the decode time)",
                share * 100.0
            );
        }
        let (mean, sd) = mean_sd(&samples);
        let gbs = if label.starts_with("tg") {
            bytes_per_token.map(|b| b as f64 * mean / 1e9)
        } else {
            None
        };
        let m = Measurement {
            model: name.clone(),
            format: format.clone(),
            device: device.clone(),
            kernels: kernels.clone(),
            threads,
            test: label.clone(),
            tokens_per_s: mean,
            stddev: sd,
            samples,
            weight_gb_per_s: gbs,
        };
        if !args.json {
            let g = gbs.map(|g| format!("{g:.1}")).unwrap_or_default();
            writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {:.2} ± {:.2} | {g} |",
                m.model, m.format, m.device, m.kernels, threads, m.test, mean, sd
            )?;
            out.flush()?;
        }
        results.push(m);
    }
    if args.json {
        let text = serde_json::to_string_pretty(&results)?;
        writeln!(out, "{text}")?;
    }
    Ok(())
}
