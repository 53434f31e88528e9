//! Loads everything a model is made of: the network on a device, the tokenizer, the chat
//! template, decoding defaults and the set of end-of-generation tokens.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

use crate::device::{DeviceArg, DtypeArg};
use crate::model::cpu::arena::Placement;
use crate::model::cpu::source::Tensors;
use crate::model::gguf::GgufLlama;
use crate::model::weights::Weights;
use crate::model::{CpuLlama, Format, GenerationConfig, Llama, LlamaConfig, Model, Precision};
use crate::source::{ModelFiles, Resolved};
use crate::structured::{AnswerShape, Grammars, Plan, Structure};
use crate::template::{ChatTemplate, Message, TemplateTokens};
use crate::tokenizer::{Tokenizer, TokenizerConfig};
use crate::tools::ToolDef;

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
    /// `--tokenizer FILE`: a tokenizer.json to use instead of the model's.
    pub tokenizer: Option<&'a Path>,
    pub engine: Engine,
    /// How exactly the CPU engine multiplies.
    pub precision: Precision,
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
    /// The constrained-decoding engine, built on first use.
    pub grammars: OnceLock<Arc<Grammars>>,
    /// Why the chat template cannot show tools (`None`: it can), found on first use.
    pub tool_support: OnceLock<Option<String>>,
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

/// Which model to run, where, and how its prompts are built: what a front end asks for
/// (command-line flags or a configuration file fill it the same way).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSpec {
    /// A model directory, GGUF file or hub id.
    pub model: String,
    pub device: DeviceArg,
    pub dtype: DtypeArg,
    /// Quantize the weights at load (CPU engine).
    pub quantize: Option<Format>,
    /// How exactly the CPU engine multiplies (`exact` by default).
    pub precision: Precision,
    /// CPU threads (all cores when `None`).
    pub threads: Option<usize>,
    /// Context size in tokens (the model's own when `None`).
    pub ctx_size: Option<usize>,
    /// A Jinja chat template to use instead of the model's.
    pub chat_template: Option<PathBuf>,
    /// A tokenizer.json to use instead of the model's.
    pub tokenizer: Option<PathBuf>,
    /// Do not put the BOS token in front of prompts.
    pub no_bos: bool,
    /// Use only models already in the cache.
    pub offline: bool,
}

/// Sets the threads, opens the device, resolves the model and loads it: what every front end
/// does first. Returns the model and the number of threads in use.
pub fn load_for(args: &ModelSpec) -> Result<(LoadedModel, usize)> {
    let threads = crate::device::set_threads(args.threads)?;
    let device = args.device.open()?;
    let resolved =
        crate::source::resolve(&args.model, args.offline).with_context(|| format!("model {}", args.model))?;
    let opts = LoadOptions {
        device,
        dtype: args.dtype.to_dtype(),
        quantize: args.quantize,
        chat_template: args.chat_template.as_deref(),
        tokenizer: args.tokenizer.as_deref(),
        engine: Engine::Auto,
        precision: args.precision,
    };
    let loaded = match resolved {
        Resolved::Files(files) => load(&files, &opts)?,
        Resolved::Gguf { path, name } => load_gguf(&path, &name, &opts)?,
    };
    Ok((loaded, threads))
}

/// The context size asked for, at most the model's own (which is used when none is asked for).
pub fn context_size(args: &ModelSpec, model: &Model) -> Result<usize> {
    Ok(match args.ctx_size {
        Some(0) => bail!("context size 0: use at least 1"),
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
            tokenizer: None,
            engine: Engine::Auto,
            precision: Precision::Exact,
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

    /// Renders a conversation with the chat template (ready for the assistant's answer) and
    /// tokenizes it for a context of `context` tokens; text that certainly cannot fit is refused
    /// before it is rendered or tokenized.
    pub fn encode_messages(&self, messages: &[Message], add_bos: bool, context: usize) -> Result<(String, Vec<u32>)> {
        self.encode_chat(messages, &[], add_bos, context)
    }

    /// [`Self::encode_messages`] with tools the template shows the model (none: no `tools`).
    pub fn encode_chat(
        &self,
        messages: &[Message],
        tools: &[ToolDef],
        add_bos: bool,
        context: usize,
    ) -> Result<(String, Vec<u32>)> {
        for m in messages {
            self.tokenizer.check_fits(&m.content, context, "the prompt")?;
        }
        let rendered = self.render(messages, tools)?;
        self.tokenizer
            .check_fits(&rendered, context, "the prompt rendered by the chat template")?;
        let ids = self.tokenizer.encode_chat(&rendered, add_bos)?;
        Ok((rendered, ids))
    }

    /// Tokenizes text sent as is (no template).
    pub fn encode_text(&self, text: &str, add_bos: bool, context: usize) -> Result<Vec<u32>> {
        self.tokenizer.check_fits(text, context, "the prompt")?;
        self.tokenizer.encode_raw(text, add_bos)
    }

    /// Token ids sent as a prompt: each must be in the vocabulary.
    pub fn check_token_ids<'a>(&self, ids: &'a [u32]) -> Result<&'a [u32]> {
        let vocab = self.model.vocab_size();
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            bail!("prompt token {bad} is not in the vocabulary ({vocab} tokens)");
        }
        Ok(ids)
    }

    /// Renders a conversation with the chat template, ready for the assistant's answer; `tools`
    /// are shown to the model (none: no `tools` at all, as transformers without them).
    pub fn render(&self, messages: &[Message], tools: &[ToolDef]) -> Result<String> {
        let defs = crate::tools::template_values(tools);
        let tools = if defs.is_empty() { None } else { Some(defs.as_slice()) };
        self.template.render(messages, tools, true, &self.template_tokens)
    }

    /// Refuses tools when the chat template has no tool syntax (it would drop them silently):
    /// a probe tool must appear in a rendering.
    pub fn check_tool_support(&self) -> Result<()> {
        const PROBE: &str = "zagreus_probe_function";
        // The answer does not change: the probe renders once per model.
        let refusal = self.tool_support.get_or_init(|| {
            let probe = ToolDef {
                name: PROBE.into(),
                parameters: serde_json::json!({"type": "object"}),
                definition: serde_json::json!({"type": "function", "function": {"name": PROBE, "parameters": {"type": "object"}}}),
            };
            match self.render(&[Message::new("user", "x")], &[probe]) {
                Ok(rendered) if rendered.contains(PROBE) => None,
                Ok(_) => Some(format!(
                    "the chat template from {} has no tool syntax (it does not show tools to the model); use a model whose template has it (the Nesso models, Hermes/Qwen2.5 style) or such a chat template",
                    self.template.origin()
                )),
                Err(e) => Some(format!("{e:#}")),
            }
        });
        match refusal {
            Some(why) => bail!("{why}"),
            None => Ok(()),
        }
    }

    /// The constrained-decoding engine for this model (built once, on first use).
    pub fn grammars(&self) -> Result<Arc<Grammars>> {
        if let Some(g) = self.grammars.get() {
            return Ok(g.clone());
        }
        let g = Arc::new(Grammars::new(
            self.tokenizer.inner(),
            self.model.vocab_size(),
            &self.stop_ids,
        )?);
        Ok(self.grammars.get_or_init(|| g).clone())
    }

    /// The constraint a request's answer shape needs, if any: tools need a template that shows
    /// them; a schema or tool calls are compiled (errors name what is wrong).
    pub fn constraint_for(&self, shape: &AnswerShape) -> Result<Option<Arc<Plan>>> {
        if !shape.tools.is_empty() {
            self.check_tool_support()?;
        }
        shape.structure().map(|s| self.plan(&s)).transpose()
    }

    /// Compiles a request for structured output (the error names what is wrong with it).
    pub fn plan(&self, structure: &Structure) -> Result<Arc<Plan>> {
        if let Structure::Tools { tools, .. } = structure {
            if tools.is_empty() {
                bail!("tool_choice asks for a tool call, but no tools are given");
            }
        }
        self.grammars()?.plan(structure)
    }

    /// Whether this looks like a base model without chat formatting (no template, no ChatML tokens).
    pub fn lacks_chat_format(&self) -> bool {
        !self.has_template && self.tokenizer.token_to_id("<|im_start|>").is_none()
    }
}

/// Checks what the configuration alone cannot: that an untied model has its LM head, and that
/// the norm weights (a few thousand numbers, read in microseconds) are finite. NaN or Inf
/// elsewhere shows up as a non-finite logit, which generation refuses.
pub fn check_weights(config: &LlamaConfig, w: &dyn Tensors, origin: &str) -> Result<()> {
    if config.tie_word_embeddings == Some(false) && !w.contains("lm_head.weight") {
        bail!("{origin}: config.json's `tie_word_embeddings` is false, but the weights have no `lm_head.weight`");
    }
    let h = config.hidden_size;
    let mut norms = vec!["model.norm.weight".to_string()];
    for i in 0..config.num_hidden_layers {
        norms.push(format!("model.layers.{i}.input_layernorm.weight"));
        norms.push(format!("model.layers.{i}.post_attention_layernorm.weight"));
    }
    for name in norms {
        let v = w.vector(&name, h)?;
        if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            bail!("{origin}: tensor `{name}` holds {x} at index {i}: the checkpoint is corrupt");
        }
    }
    Ok(())
}

/// The network from the safetensors files, on the engine and in the precision asked for.
fn load_network(config: &LlamaConfig, files: &ModelFiles, opts: &LoadOptions) -> Result<Model> {
    let weights = Weights::open(&files.weights)?;
    check_weights(config, &weights, &files.name)?;
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
            Model::Cpu(CpuLlama::load(
                config,
                &weights,
                Some(format),
                Placement::from_env(),
                opts.precision,
            )?)
        }
        _ => {
            if opts.quantize.is_some() {
                bail!("quantizing at load works on the CPU only (device cpu)");
            }
            if opts.precision != Precision::Exact {
                bail!(
                    "precision {} is a choice of the CPU kernels (device cpu)",
                    opts.precision.name()
                );
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
    let tokenizer_path = opts.tokenizer.unwrap_or(&files.tokenizer);
    // Parsing a large tokenizer.json takes a few hundred milliseconds: overlap it with the weights.
    let (tokenizer, model) = std::thread::scope(|scope| -> Result<(Tokenizer, Model)> {
        let tok = scope.spawn(|| {
            Tokenizer::from_file(tokenizer_path, &tcfg, config.bos_token_id)
                .with_context(|| format!("loading {}", tokenizer_path.display()))
        });
        let model = load_network(&config, files, opts);
        let tokenizer = tok
            .join()
            .map_err(|_| anyhow::anyhow!("internal error: the tokenizer loader panicked"))??;
        Ok((tokenizer, model?))
    })?;
    let origin = files
        .tokenizer_config
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let template = choose_template(
        opts,
        files.chat_template.as_deref(),
        tcfg.chat_template.as_deref(),
        &origin,
    )?;
    assemble(Parts {
        name: files.name.clone(),
        config,
        generation,
        tcfg,
        tokenizer,
        tokenizer_origin: tokenizer_path.display().to_string(),
        template,
        model,
        start,
    })
}

/// Loads a Llama GGUF file: weights kept in their quantization where the engine has kernels for
/// it (Q8_0, Q4_0, Q4_1, F32, F16, BF16; others become Q8_0), the tokenizer and chat template
/// from its metadata (or `--tokenizer` / `--chat-template`).
pub fn load_gguf(path: &Path, name: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    let start = Instant::now();
    if !opts.device.is_cpu() || opts.engine != Engine::Auto {
        bail!("GGUF models run on the CPU engine; use --device cpu");
    }
    let gguf = GgufLlama::open(path)?;
    check_weights(&gguf.config, &gguf, &path.display().to_string())?;
    let (mut tokenizer_raw, tcfg) = crate::tokenizer::from_gguf(&gguf.file)?;
    let mut tokenizer_origin = path.display().to_string();
    if let Some(p) = opts.tokenizer {
        tokenizer_raw = crate::tokenizer::read_tokenizer_json(p)?;
        tokenizer_origin = p.display().to_string();
    }
    let tokenizer = Tokenizer::new(tokenizer_raw, &tcfg, gguf.config.bos_token_id)
        .with_context(|| format!("the tokenizer of {tokenizer_origin}"))?;
    let format = match (opts.quantize, opts.dtype) {
        (Some(q), _) => Some(q),
        (None, Some(DType::BF16)) => Some(Format::Bf16),
        (None, Some(DType::F16)) => Some(Format::F16),
        (None, Some(_)) => Some(Format::F32),
        (None, None) => None,
    };
    let model = Model::Cpu(CpuLlama::load(
        &gguf.config,
        &gguf,
        format,
        Placement::from_env(),
        opts.precision,
    )?);
    let template = choose_template(opts, None, tcfg.chat_template.as_deref(), &path.display().to_string())?;
    assemble(Parts {
        name: name.to_string(),
        config: gguf.config.clone(),
        generation: GenerationConfig::default(),
        tcfg,
        tokenizer,
        tokenizer_origin,
        template,
        model,
        start,
    })
}

/// `--chat-template`, else the model's own (a file, or the template text and where it came
/// from), else the built-in ChatML. Returns the template and whether it is not the fallback.
fn choose_template(
    opts: &LoadOptions,
    file: Option<&Path>,
    text: Option<&str>,
    origin: &str,
) -> Result<(ChatTemplate, bool)> {
    Ok(match (opts.chat_template, file, text) {
        (Some(path), _, _) => (ChatTemplate::from_file(path)?, true),
        (None, Some(path), _) => (ChatTemplate::from_file(path)?, true),
        (None, None, Some(src)) => (ChatTemplate::new(src, origin)?, true),
        (None, None, None) => (ChatTemplate::chatml(), false),
    })
}

/// Everything a loaded model is made of, before the stop set and template tokens are derived.
struct Parts {
    name: String,
    config: LlamaConfig,
    generation: GenerationConfig,
    tcfg: TokenizerConfig,
    tokenizer: Tokenizer,
    tokenizer_origin: String,
    template: (ChatTemplate, bool),
    model: Model,
    start: Instant,
}

fn assemble(p: Parts) -> Result<LoadedModel> {
    let Parts {
        name,
        config,
        generation,
        tcfg,
        tokenizer,
        tokenizer_origin,
        template,
        model,
        start,
    } = p;
    let (template, has_template) = template;
    if tokenizer.vocab_size() > model.vocab_size() {
        bail!(
            "{tokenizer_origin} has {} tokens but the model's embedding has only {} rows",
            tokenizer.vocab_size(),
            model.vocab_size()
        );
    }
    let mut stop_ids: BTreeSet<u32> = config.eos_token_ids.iter().copied().collect();
    for (field, ids) in [
        ("eos_token_id", &generation.eos_token_id),
        ("bos_token_id", &generation.bos_token_id),
    ] {
        if let Some(bad) = ids
            .iter()
            .flat_map(|e| e.to_vec())
            .find(|id| *id as usize >= model.vocab_size())
        {
            bail!(
                "{name}: generation_config.json's `{field}` holds {bad}, outside the vocabulary of {} tokens",
                model.vocab_size()
            );
        }
    }
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
        name,
        model,
        tokenizer,
        template,
        has_template,
        template_tokens,
        generation,
        stop_ids,
        load_time: start.elapsed(),
        grammars: OnceLock::new(),
        tool_support: OnceLock::new(),
    })
}
