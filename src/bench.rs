//! `zagreus bench`: llama-bench-shaped measurements of prompt processing (pp) and generation
//! (tg) speed, on any model or on random weights of a named shape (no download needed), with mean
//! and standard deviation over repetitions, and the weight bandwidth each decode figure implies.

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::cli::BenchArgs;
use crate::model::cpu::arena::Placement;
use crate::model::{CpuLlama, Format, LlamaConfig, LogitsFor, Model};

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

pub fn run(args: &BenchArgs) -> Result<()> {
    let threads = crate::device::set_threads(args.model.threads)?;
    let (model, name) = match &args.random {
        Some(shape) => {
            let cfg = named_shape(shape)?;
            check_lengths(args, cfg.max_position_embeddings)?;
            let device = args.model.device.open()?;
            if !device.is_cpu() {
                if args.model.quantize.is_some() {
                    bail!("--quantize works on the CPU only");
                }
                let dtype = args.model.dtype.to_dtype().unwrap_or(candle_core::DType::BF16);
                let model = Model::Candle(crate::model::Llama::random(&cfg, dtype, &device)?);
                return measure(args, model, format!("{shape} (random)"), threads);
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
                Model::Cpu(CpuLlama::random(&cfg, format, placement, 42)?),
                format!("{shape} (random)"),
            )
        }
        None => {
            let (loaded, _) = crate::loader::load_for(&args.model)?;
            let name = loaded.name.clone();
            (loaded.model, name)
        }
    };
    measure(args, model, name, threads)
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
fn measure(args: &BenchArgs, model: Model, name: String, threads: usize) -> Result<()> {
    check_lengths(args, model.max_positions())?;
    let bytes_per_token = match &model {
        Model::Cpu(m) => Some(m.bytes_per_token()),
        Model::Candle(_) => None,
    };
    let format = model.precision().to_string();
    let device = crate::device::device_name(&model.device());
    let mut results = Vec::new();
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
                tests.push((label, Box::new(move || decode_speed(m, n, d))));
            }
        }
    }
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(out, "| model | format | device | threads | test | t/s | weights GB/s |")?;
        writeln!(out, "| --- | --- | --- | ---: | ---: | ---: | ---: |")?;
    }
    for (label, f) in &tests {
        f()?; // warm-up, as llama-bench does
        let samples: Vec<f64> = (0..args.repetitions).map(|_| f()).collect::<Result<_>>()?;
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
                "| {} | {} | {} | {} | {} | {:.2} ± {:.2} | {g} |",
                m.model, m.format, m.device, threads, m.test, mean, sd
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
