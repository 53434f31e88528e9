//! Loads everything a model is made of: the network on a device, the tokenizer, the chat
//! template, decoding defaults and the set of end-of-generation tokens.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

use crate::model::cpu::arena::Placement;
use crate::model::weights::Weights;
use crate::model::{CpuLlama, Format, GenerationConfig, Llama, LlamaConfig, Model};
use crate::source::ModelFiles;
use crate::template::{ChatTemplate, TemplateTokens};
use crate::tokenizer::{Tokenizer, TokenizerConfig};

/// Markers that end an assistant turn in common chat formats; one is a stop token when the
/// template uses it and the tokenizer has it as a single token.
const END_OF_TURN_MARKERS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_turn|>",
    "<end_of_turn>",
    "<|end|>",
    "<|eom_id|>",
];

/// Which implementation runs the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// zagreus' CPU engine on the CPU, candle elsewhere.
    #[default]
    Auto,
    /// candle tensors on any device (the GPU path; on the CPU, for cross-checks).
    Candle,
}

pub struct LoadOptions<'a> {
    pub device: Device,
    /// `None` picks the default for the device and checkpoint.
    pub dtype: Option<DType>,
    /// `--quantize`: quantize the weights at load (CPU engine).
    pub quantize: Option<Format>,
    /// `--chat-template FILE`.
    pub chat_template: Option<&'a Path>,
    pub engine: Engine,
}

pub struct LoadedModel {
    pub name: String,
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// Whether the template is the model's own (or the user's), not the built-in fallback.
    pub has_template: bool,
    pub template_tokens: TemplateTokens,
    pub generation: GenerationConfig,
    pub stop_ids: BTreeSet<u32>,
    pub load_time: Duration,
}

/// The dtype used when `--dtype` is not given: the checkpoint's own half type on the CPU (its
/// kernels read BF16/F16 directly at full precision), BF16 on accelerators unless the checkpoint
/// is F16.
pub fn default_dtype(stored: Option<DType>, device: &Device) -> DType {
    match (device.is_cpu(), stored) {
        (true, Some(d @ (DType::BF16 | DType::F16 | DType::F32))) => d,
        (true, _) => DType::F32,
        (false, Some(DType::F16)) => DType::F16,
        (false, _) => DType::BF16,
    }
}

/// Sets the threads, opens the device, resolves `--model` and loads it: what every front end
/// does first. Returns the model and the number of threads in use.
pub fn load_for(args: &crate::cli::ModelArgs) -> Result<(LoadedModel, usize)> {
    let threads = crate::device::set_threads(args.threads)?;
    let device = args.device.open()?;
    let files = crate::source::resolve(&args.model, args.offline).context("--model")?;
    let loaded = load(
        &files,
        &LoadOptions {
            device,
            dtype: args.dtype.to_dtype(),
            quantize: args.quantize.map(|q| q.format()),
            chat_template: args.chat_template.as_deref(),
            engine: Engine::Auto,
        },
    )?;
    Ok((loaded, threads))
}

/// The context size for `--ctx-size` (the model's own when not given).
pub fn context_size(args: &crate::cli::ModelArgs, model: &Model) -> Result<usize> {
    Ok(match args.ctx_size {
        Some(0) => bail!("--ctx-size 0: use at least 1"),
        Some(n) => n.min(model.max_positions()),
        None => model.max_positions(),
    })
}

impl LoadOptions<'_> {
    /// Defaults on the CPU: the checkpoint's own precision, the CPU engine.
    pub fn cpu() -> Self {
        Self {
            device: Device::Cpu,
            dtype: None,
            quantize: None,
            chat_template: None,
            engine: Engine::Auto,
        }
    }
}

impl LoadedModel {
    /// One line about the model for `--verbose` and the chat banner.
    pub fn describe(&self, threads: usize) -> String {
        format!(
            "{} ({:.0}M parameters, {}, {}, {threads} threads)",
            self.name,
            self.model.config().parameter_count() as f64 / 1e6,
            self.model.precision(),
            crate::device::device_name(&self.model.device()),
        )
    }

    /// Whether this looks like a base model without chat formatting (no template, no ChatML tokens).
    pub fn lacks_chat_format(&self) -> bool {
        !self.has_template && self.tokenizer.token_to_id("<|im_start|>").is_none()
    }
}

/// The network from the safetensors files, on the engine and in the precision asked for.
fn load_network(config: &LlamaConfig, files: &ModelFiles, opts: &LoadOptions) -> Result<Model> {
    let weights = Weights::open(&files.weights)?;
    let stored = weights.dtype("model.embed_tokens.weight");
    let dtype = opts.dtype.unwrap_or_else(|| default_dtype(stored, &opts.device));
    Ok(match (opts.engine, &opts.device) {
        (Engine::Auto, Device::Cpu) => {
            let format = match (opts.quantize, dtype) {
                (Some(q), _) => q,
                (None, DType::BF16) => Format::Bf16,
                (None, DType::F16) => Format::F16,
                (None, _) => Format::F32,
            };
            Model::Cpu(CpuLlama::load(config, &weights, format, Placement::from_env())?)
        }
        _ => {
            if opts.quantize.is_some() {
                bail!("--quantize works on the CPU only; use --device cpu");
            }
            Model::Candle(Llama::load(config, &weights, dtype, &opts.device)?)
        }
    })
}

pub fn load(files: &ModelFiles, opts: &LoadOptions) -> Result<LoadedModel> {
    let start = Instant::now();
    let config = LlamaConfig::from_file(&files.config)?;
    let generation = match &files.generation_config {
        Some(p) => GenerationConfig::from_file(p)?,
        None => GenerationConfig::default(),
    };
    let tcfg = match &files.tokenizer_config {
        Some(p) => TokenizerConfig::from_file(p)?,
        None => TokenizerConfig::default(),
    };
    // Parsing a large tokenizer.json takes a few hundred milliseconds: overlap it with the weights.
    let (tokenizer, model) = std::thread::scope(|scope| -> Result<(Tokenizer, Model)> {
        let tok = scope.spawn(|| {
            Tokenizer::from_file(&files.tokenizer, &tcfg, config.bos_token_id)
                .with_context(|| format!("loading {}", files.tokenizer.display()))
        });
        let model = load_network(&config, files, opts);
        let tokenizer = tok
            .join()
            .map_err(|_| anyhow::anyhow!("internal error: the tokenizer loader panicked"))??;
        Ok((tokenizer, model?))
    })?;

    let (template, has_template) = match (opts.chat_template, &files.chat_template, &tcfg.chat_template) {
        (Some(path), _, _) => (ChatTemplate::from_file(path)?, true),
        (None, Some(path), _) => (ChatTemplate::from_file(path)?, true),
        (None, None, Some(src)) => {
            let origin = files
                .tokenizer_config
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            (ChatTemplate::new(src.clone(), origin)?, true)
        }
        (None, None, None) => (ChatTemplate::chatml(), false),
    };

    if tokenizer.vocab_size() > model.vocab_size() {
        bail!(
            "{} has {} tokens but the model's embedding has only {} rows",
            files.tokenizer.display(),
            tokenizer.vocab_size(),
            model.vocab_size()
        );
    }

    let mut stop_ids: BTreeSet<u32> = config.eos_token_ids.iter().copied().collect();
    if let Some(e) = &generation.eos_token_id {
        stop_ids.extend(e.to_vec());
    }
    if let Some(id) = tcfg.eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
        stop_ids.insert(id);
    }
    for marker in END_OF_TURN_MARKERS {
        if template.source().contains(marker) {
            if let Some(id) = tokenizer.token_to_id(marker) {
                stop_ids.insert(id);
            }
        }
    }
    stop_ids.retain(|id| (*id as usize) < model.vocab_size());

    let template_tokens = TemplateTokens {
        bos_token: tcfg
            .bos_token
            .clone()
            .or_else(|| tokenizer.bos().map(|(_, t)| t.to_string())),
        eos_token: tcfg.eos_token.clone(),
        pad_token: tcfg.pad_token.clone(),
        unk_token: tcfg.unk_token.clone(),
    };
    Ok(LoadedModel {
        name: files.name.clone(),
        model,
        tokenizer,
        template,
        has_template,
        template_tokens,
        generation,
        stop_ids,
        load_time: start.elapsed(),
    })
}
