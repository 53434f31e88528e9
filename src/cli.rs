//! Command-line flags (clap), shared by every front end.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};

use crate::device::{DeviceArg, DtypeArg};
use crate::loader::ModelSpec;
use crate::model::{Format, Precision};
use crate::settings::SamplingRequest;
use crate::structured::AnswerShape;
use crate::tools::{parse_tools, ToolChoice, ToolDef};

/// `--quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantizeArg {
    /// 8-bit blocks of 32 with a scale each (llama.cpp's Q8_0)
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit blocks of 32 with a scale each (llama.cpp's Q4_0): half the bytes of q8_0, less accurate
    #[value(name = "q4_0")]
    Q4_0,
}

/// `--precision`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionArg {
    /// f32 activations: BF16 models compute what transformers computes in f32
    #[default]
    Exact,
    /// activations rounded to BF16 for BF16 dot products (CPUs with AVX-512 BF16) and to 8 bits
    /// for Q8_0/Q4, as llama.cpp does: faster batches and prompts, logits further from
    /// transformers'
    Fast,
}

impl QuantizeArg {
    pub fn format(self) -> Format {
        match self {
            QuantizeArg::Q8_0 => Format::Q8_0,
            QuantizeArg::Q4_0 => Format::Q4_0,
        }
    }
}
use crate::source::DEFAULT_MODEL;

/// Most threads `--threads` accepts (more than any machine zagreus runs on has cores).
pub const MAX_THREADS: usize = 1024;
/// Most tokens any length flag accepts (`--ctx-size`, `-n`, bench's `-p/-n/-d`): the largest
/// context a configuration may state.
pub const MAX_TOKENS: usize = crate::model::config::MAX_POSITIONS;
/// Most alternatives `--logprobs` reports per token.
pub const MAX_LOGPROBS: usize = 100;
/// Most repetitions of a bench test.
pub const MAX_REPETITIONS: usize = 1000;
/// Most sequences `bench --batch` runs at once.
pub const MAX_BATCH: usize = 1024;

/// A whole number in `MIN..=MAX` (clap names the flag and the value in its error).
fn count<const MIN: usize, const MAX: usize>(s: &str) -> Result<usize, String> {
    let n: usize = s.trim().parse().map_err(|_| format!("`{s}` is not a whole number"))?;
    if !(MIN..=MAX).contains(&n) {
        return Err(format!("{n} is out of range: use {MIN} to {MAX}"));
    }
    Ok(n)
}

/// A finite number (clap's f64 parser accepts `NaN` and `inf`).
fn finite(s: &str) -> Result<f64, String> {
    let x: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !x.is_finite() {
        return Err(format!("{s} is not a finite number"));
    }
    Ok(x)
}

fn finite_f32(s: &str) -> Result<f32, String> {
    finite(s).map(|x| x as f32)
}

const AFTER_HELP: &str = "\
Examples:
  zagreus -m ./open-zagreus-0.4B \"Raccontami qualcosa di interessante sull'Italia.\"
  zagreus -m ./open-zagreus-0.4B -s \"Sei un assistente utile.\" --temperature 0 -n 64 \"Ciao!\"
  cat articolo.txt | zagreus -m ./open-zagreus-0.4B \"Riassumi il testo.\"
  zagreus -m ./zagreus-0.4B-ita --raw \"La capitale d'Italia è\"
  zagreus -m ./open-zagreus-0.4B --json \"Ciao\"

  zagreus \"Ciao!\"                                  (the default model, downloaded once)
  zagreus pull mii-llm/zagreus-0.4B-ita
  HF_HUB_OFFLINE=1 zagreus -m mii-llm/open-zagreus-0.4B \"Ciao!\"

A hub model is downloaded once into the Hugging Face cache (HF_HOME, HF_HUB_CACHE; HF_ENDPOINT
and HF_TOKEN are honoured) and reused from there, online or not.

Sampling defaults come from the model's generation_config.json when it sets them, else from
the values shown; flags override both. To send a prompt that starts with a subcommand's name,
put `--` before it: zagreus -- list the regions of Italy";

#[derive(Parser, Debug)]
#[command(
    name = "zagreus",
    version,
    about = "Run the Zagreus family of small Italian/English language models",
    long_about = "Run the Zagreus family of small Italian/English language models (and other \
                  Llama-architecture models) on the CPU or a CUDA GPU.\n\n\
                  The answer goes to stdout; logs and statistics go to stderr. When stdin is not a \
                  terminal, its text is read and put before the prompt, separated by a blank line.",
    after_help = AFTER_HELP,
    args_override_self = true,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Chat with the model in the terminal (the default when no prompt is given on a terminal)
    Chat(Box<ChatArgs>),
    /// Download a model from the Hugging Face hub into the cache without running it; prints
    /// its local directory
    Pull(PullArgs),
    /// List the models in the Hugging Face cache, with their sizes
    List(ListArgs),
    /// Measure prompt processing and generation speed (llama-bench style)
    Bench(Box<BenchArgs>),
    /// Run many requests at once: JSONL in (OpenAI batch lines, or {"messages": [...]} /
    /// {"prompt": "..."}), one JSONL result per request out
    Batch(Box<BatchArgs>),
    /// Serve the model over HTTP with an OpenAI-compatible API (chat, completions, tokenize,
    /// metrics) for apps, agents and lm-evaluation-harness
    Serve(Box<ServeArgs>),
    /// Measure the model's perplexity on a text (llama.cpp's windows or a sliding window), and
    /// how far a quantized model is from a saved base (KL divergence, top-1 agreement)
    Perplexity(Box<PerplexityArgs>),
    /// Print a shell completion script (bash, zsh, fish, powershell, elvish) to stdout
    Completions(CompletionsArgs),
    /// Print the manual page (roff) to stdout: `zagreus man | man -l -`
    Man,
    /// Compare the model's logits with a recorded transformers reference (for checking a device
    /// or build; see scripts/gpu-check.sh)
    #[command(hide = true)]
    CheckLogits(Box<CheckLogitsArgs>),
}

#[derive(Args, Debug)]
pub struct CheckLogitsArgs {
    /// reference.json written by scripts/make_fixtures.py (prompt_ids, prompt_logits, greedy_ids,
    /// step_logits)
    #[arg(long, value_name = "FILE")]
    pub reference: PathBuf,

    /// Largest allowed |Δlogit|
    #[arg(long, value_name = "X", default_value_t = 1e-3, value_parser = finite_f32)]
    pub tolerance: f32,

    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Random weights of a named shape instead of --model: zagreus-0.4b, smollm2-135m
    #[arg(long, value_name = "SHAPE")]
    pub random: Option<String>,

    /// Prompt lengths to measure (pp); repeatable or comma-separated
    #[arg(
        short = 'p',
        long = "prompt",
        value_name = "N",
        value_delimiter = ',',
        default_value = "128",
        value_parser = count::<0, MAX_TOKENS>
    )]
    pub prompt: Vec<usize>,

    /// Tokens to generate (tg); repeatable or comma-separated
    #[arg(
        short = 'n',
        long = "gen",
        value_name = "N",
        value_delimiter = ',',
        default_value = "64",
        value_parser = count::<0, MAX_TOKENS>
    )]
    pub gen: Vec<usize>,

    /// Context depth before generating (tokens already in the cache); comma-separated
    #[arg(
        short = 'd',
        long = "depth",
        value_name = "N",
        value_delimiter = ',',
        default_value = "0",
        value_parser = count::<0, MAX_TOKENS>
    )]
    pub depth: Vec<usize>,

    /// Repetitions of each test (after one warm-up run)
    #[arg(short = 'r', long, value_name = "N", default_value_t = 5, value_parser = count::<1, MAX_REPETITIONS>)]
    pub repetitions: usize,

    /// Batched decoding instead (llama-batched-bench's figures): for each number of sequences,
    /// their prompts (-p) prefilled together, then -n tokens each generated in steps of all of
    /// them; comma-separated, e.g. 1,2,4,8,16
    #[arg(long, value_name = "N", value_delimiter = ',', value_parser = count::<1, MAX_BATCH>)]
    pub batch: Vec<usize>,

    /// Weight memory for --random: huge (2 MiB pages) or normal (4 KiB pages)
    #[arg(long, value_name = "KIND")]
    pub placement: Option<String>,

    /// Also measure generation constrained to this JSON schema (a file; `tgN+schema`): the
    /// token mask computed, applied and followed at every step
    #[arg(long, value_name = "FILE", conflicts_with = "batch")]
    pub json_schema: Option<PathBuf>,

    /// The tokenizer.json the constrained test uses with --random (a model brings its own)
    #[arg(long, value_name = "FILE", requires = "json_schema")]
    pub tokenizer: Option<PathBuf>,

    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub model: ModelArgs,
}

/// Most sequences `zagreus batch --parallel` runs at once.
pub const MAX_PARALLEL: usize = 256;

/// `zagreus batch`.
#[derive(Args, Debug)]
#[command(after_help = "\
Input lines (blank lines are skipped):
  {\"custom_id\": \"q1\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\",
   \"body\": {\"messages\": [{\"role\": \"user\", \"content\": \"Ciao!\"}], \"max_tokens\": 64}}
  {\"custom_id\": \"q2\", \"url\": \"/v1/completions\", \"body\": {\"prompt\": \"La capitale d'Italia è\"}}
  {\"messages\": [{\"role\": \"user\", \"content\": \"Ciao!\"}], \"temperature\": 0}
  {\"prompt\": \"C'era una volta\"}
A line without custom_id gets \"line-N\" (its line number). Each result line is OpenAI's batch
output record: {\"id\", \"custom_id\", \"response\": {\"status_code\": 200, \"body\": {...}}, \"error\"};
a line that cannot run gets an error record, and the rest go on. Sampling flags are defaults
that a request's own fields override.

On stdout the results come in input order. With -o FILE they are appended as they finish;
running the same command again after an interruption skips the ids already in FILE.")]
pub struct BatchArgs {
    /// JSONL file of requests, or - for stdin
    #[arg(value_name = "FILE", default_value = "-")]
    pub input: String,

    /// Append results to FILE as they finish (resumable) instead of writing them to stdout
    #[arg(short, long, value_name = "FILE", help_heading = "Output")]
    pub output: Option<PathBuf>,

    /// Requests generated at the same time
    #[arg(short = 'P', long, value_name = "N", default_value_t = 8, value_parser = count::<1, MAX_PARALLEL>)]
    pub parallel: usize,

    /// Print a summary (requests, tokens, speed) on stderr at the end
    #[arg(short, long, help_heading = "Output")]
    pub verbose: bool,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// `zagreus completions`.
#[derive(Args, Debug)]
#[command(after_help = "\
Install, e.g.:
  zagreus completions bash > ~/.local/share/bash-completion/completions/zagreus
  zagreus completions zsh > ~/.zfunc/_zagreus        (with fpath+=~/.zfunc in ~/.zshrc)
  zagreus completions fish > ~/.config/fish/completions/zagreus.fish")]
pub struct CompletionsArgs {
    /// The shell
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `zagreus perplexity`.
#[derive(Args, Debug)]
#[command(after_help = "\
The text is tokenized once (with BOS when the model uses one). Without --stride it is cut as
llama-perplexity does (windows of --ctx-size tokens, default 512, only each window's second half
scored); with --stride S as the transformers perplexity guide does (windows every S tokens, each
token scored once). Save a base with the full-precision model (--save-logits), then score a
quantized one against it (--kl-base) for the KL divergence, top-1 agreement and Δ PPL.")]
pub struct PerplexityArgs {
    /// The text to score (UTF-8)
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,

    /// Sliding windows every N tokens (the transformers guide's method) instead of llama.cpp's
    #[arg(long, value_name = "N", value_parser = count::<1, MAX_TOKENS>)]
    pub stride: Option<usize>,

    /// Windows run together in one batched step
    #[arg(short = 'P', long, value_name = "N", default_value_t = 4, value_parser = count::<1, 64>)]
    pub parallel: usize,

    /// Save this model's top-32 next-token distributions to FILE (a base for --kl-base)
    #[arg(long, value_name = "FILE")]
    pub save_logits: Option<PathBuf>,

    /// Compare with a base saved by --save-logits on the same text and windows
    #[arg(long, value_name = "FILE")]
    pub kl_base: Option<PathBuf>,

    /// Print a JSON record instead of text
    #[arg(long, help_heading = "Output")]
    pub json: bool,

    #[command(flatten)]
    pub model: ModelArgs,
}

/// `zagreus serve`.
#[derive(Args, Debug)]
#[command(after_help = "\
A chat page for the browser is at / (unless --no-webui).
Endpoints: POST /v1/chat/completions, POST /v1/completions (streamed with \"stream\": true),
GET /v1/models, POST /tokenize, POST /detokenize, GET /tokenizer_info, GET /health (503 while
the model loads), GET /metrics (Prometheus). Sampling flags are defaults that a request's own
fields override. SIGTERM or Ctrl+C: no new requests, running ones get --grace seconds to finish.")]
pub struct ServeArgs {
    /// Address to listen on (0.0.0.0 for every interface)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1", help_heading = "Server")]
    pub host: String,

    /// Port to listen on (0: any free port; the address is printed on stderr)
    #[arg(long, value_name = "N", default_value_t = 8080, help_heading = "Server")]
    pub port: u16,

    /// Requests generated at the same time
    #[arg(short = 'P', long, value_name = "N", default_value_t = 4, value_parser = count::<1, MAX_PARALLEL>, help_heading = "Server")]
    pub parallel: usize,

    /// Requests waiting for a free sequence before the server answers 503
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = count::<0, 65536>, help_heading = "Server")]
    pub queue: usize,

    /// Require this key (`Authorization: Bearer KEY`) on every endpoint but /health
    #[arg(
        long,
        value_name = "KEY",
        env = "ZAGREUS_API_KEY",
        hide_env_values = true,
        help_heading = "Server"
    )]
    pub api_key: Option<String>,

    /// Let pages from ORIGIN call the API from a browser (CORS); repeatable, * for any
    #[arg(long = "cors-origin", value_name = "ORIGIN", help_heading = "Server")]
    pub cors_origins: Vec<String>,

    /// Seconds a request may take at most (0: no limit)
    #[arg(long, value_name = "SECS", default_value_t = 600, help_heading = "Server")]
    pub timeout: u64,

    /// Seconds running requests get to finish after SIGTERM or Ctrl+C
    #[arg(long, value_name = "SECS", default_value_t = 30, help_heading = "Server")]
    pub grace: u64,

    /// Do not serve the chat page at /
    #[arg(long, help_heading = "Server")]
    pub no_webui: bool,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub sampling: SamplingArgs,
}

impl ServeArgs {
    pub fn config(&self) -> crate::server::ServerConfig {
        let secs = |s: u64| (s > 0).then(|| std::time::Duration::from_secs(s));
        crate::server::ServerConfig {
            spec: self.model.spec(),
            host: self.host.clone(),
            port: self.port,
            parallel: self.parallel,
            queue: self.queue,
            api_key: self.api_key.clone().filter(|k| !k.is_empty()),
            cors_origins: self.cors_origins.clone(),
            timeout: secs(self.timeout),
            grace: std::time::Duration::from_secs(self.grace),
            defaults: self.sampling.request(),
            webui: !self.no_webui,
        }
    }
}

/// The interactive chat.
#[derive(Args, Debug, Clone)]
pub struct ChatArgs {
    /// System prompt
    #[arg(short, long, value_name = "TEXT", help_heading = "Prompt")]
    pub system: Option<String>,

    /// Print statistics after each answer (toggle with /verbose)
    #[arg(short, long, help_heading = "Output")]
    pub verbose: bool,

    /// Do not read or write the input history file (also ZAGREUS_NO_HISTORY=1)
    #[arg(long, help_heading = "Output")]
    pub no_history: bool,

    /// Tools the model may call from the start (a JSON file; /tools FILE loads others)
    #[arg(long, value_name = "FILE", help_heading = "Tools and structured output")]
    pub tools: Option<PathBuf>,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// Hub id, owner/name[@revision]
    #[arg(value_name = "MODEL")]
    pub model: String,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

/// A one-shot request: prompt in, answer out.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The prompt (several words are joined with spaces)
    #[arg(value_name = "PROMPT")]
    pub prompt: Vec<String>,

    /// System prompt (chat models)
    #[arg(short, long, value_name = "TEXT", help_heading = "Prompt")]
    pub system: Option<String>,

    /// Send the prompt as is, without the chat template (base models)
    #[arg(long, help_heading = "Prompt")]
    pub raw: bool,

    /// Print one JSON object (text, token ids, finish reason, seed, settings, timings) instead of text
    #[arg(long, help_heading = "Output")]
    pub json: bool,

    /// With --json: the log-probability of each generated token and its N most likely alternatives
    #[arg(long, value_name = "N", requires = "json", help_heading = "Output", value_parser = count::<0, MAX_LOGPROBS>)]
    pub logprobs: Option<usize>,

    /// Print load time, token counts, speeds and the seed on stderr
    #[arg(short, long, help_heading = "Output")]
    pub verbose: bool,

    /// Print the rendered prompt and its token ids on stderr before generating
    #[arg(long, help_heading = "Output")]
    pub verbose_prompt: bool,

    #[command(flatten)]
    pub shape: ShapeArgs,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Tool calls and structured answers.
#[derive(Args, Debug, Clone, Default)]
pub struct ShapeArgs {
    /// Tools the model may call: a JSON file with a list of OpenAI-style function definitions.
    /// Calls are printed as one JSON object per line ({"id", "name", "arguments"}), or under
    /// "tool_calls" with --json
    #[arg(long, value_name = "FILE", help_heading = "Tools and structured output")]
    pub tools: Option<PathBuf>,

    /// With --tools: auto (the model decides; a call it opens follows the tool's schema), required
    /// (at least one call), none (no calls), or a function's name (that call)
    #[arg(
        long,
        value_name = "CHOICE",
        requires = "tools",
        help_heading = "Tools and structured output"
    )]
    pub tool_choice: Option<String>,

    /// With --tools: at most one call per answer
    #[arg(long, requires = "tools", help_heading = "Tools and structured output")]
    pub no_parallel_tool_calls: bool,

    /// The answer is JSON valid against this JSON schema (a file); decoding is constrained so it
    /// always parses
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "format",
        help_heading = "Tools and structured output"
    )]
    pub json_schema: Option<PathBuf>,

    /// json: the answer is a JSON object
    #[arg(
        long,
        value_enum,
        value_name = "FORMAT",
        help_heading = "Tools and structured output"
    )]
    pub format: Option<FormatArg>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    Json,
}

impl ShapeArgs {
    /// The flags as the library's answer shape (the files read and checked).
    pub fn shape(&self) -> Result<AnswerShape> {
        let tools = match &self.tools {
            Some(path) => read_tools(path)?,
            None => Vec::new(),
        };
        let schema = match (&self.json_schema, self.format) {
            (Some(path), _) => {
                let text = crate::bounded::read_text(path, crate::bounded::JSON_CONFIG_LIMIT, "the JSON schema")?;
                let v: serde_json::Value =
                    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
                if !v.is_object() {
                    anyhow::bail!("{} is not a JSON schema (a JSON object)", path.display());
                }
                Some(v)
            }
            (None, Some(FormatArg::Json)) => Some(serde_json::json!({"type": "object"})),
            (None, None) => None,
        };
        let choice = self.tool_choice.as_deref().map(ToolChoice::from_name);
        AnswerShape::new(tools, choice, !self.no_parallel_tool_calls, schema)
    }
}

/// Reads a tools file (`--tools`, the chat's `/tools`).
pub fn read_tools(path: &Path) -> Result<Vec<ToolDef>> {
    let text = crate::bounded::read_text(path, crate::bounded::JSON_CONFIG_LIMIT, "the tools file")?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    parse_tools(&v).with_context(|| format!("{}", path.display()))
}

/// Which model, where it runs, and how its prompt is built.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory (config.json, tokenizer.json, *.safetensors), GGUF file, or hub id
    /// (owner/name[@revision], or owner/name:QUANT for a GGUF file in the repo)
    #[arg(short, long, value_name = "MODEL", env = "ZAGREUS_MODEL", default_value = DEFAULT_MODEL, help_heading = "Model")]
    pub model: String,

    /// Device: cpu, cuda, cuda:N, or auto (CUDA when built with it and a GPU is present)
    #[arg(long, value_name = "DEVICE", default_value = "auto", help_heading = "Model")]
    pub device: DeviceArg,

    /// Weight precision: the checkpoint's own type on the CPU, bf16 on a GPU (auto), or f32, f16, bf16
    #[arg(long, value_name = "TYPE", default_value = "auto", help_heading = "Model",
          value_parser = PossibleValuesParser::new(DtypeArg::NAMES).map(|s| s.parse::<DtypeArg>().unwrap_or_default()))]
    pub dtype: DtypeArg,

    /// Quantize the weights at load (CPU): q8_0 reads about half the bytes of bf16 per token
    #[arg(long, value_enum, value_name = "TYPE", help_heading = "Model")]
    pub quantize: Option<QuantizeArg>,

    /// How exactly the CPU multiplies: exact keeps activations in f32 (16-bit for Q8_0/Q4); fast
    /// rounds them to BF16 for BF16 dot products (AVX-512 BF16 CPUs) and to 8 bits for Q8_0/Q4,
    /// as llama.cpp does
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        default_value = "exact",
        help_heading = "Model"
    )]
    pub precision: PrecisionArg,

    /// CPU threads [default: all cores]
    #[arg(short, long, value_name = "N", help_heading = "Model", value_parser = count::<1, MAX_THREADS>)]
    pub threads: Option<usize>,

    /// Context size in tokens [default: the model's max_position_embeddings]
    #[arg(short = 'c', long, value_name = "N", help_heading = "Model", value_parser = count::<1, MAX_TOKENS>)]
    pub ctx_size: Option<usize>,

    /// Use this Jinja chat template instead of the model's
    #[arg(long, value_name = "FILE", help_heading = "Model")]
    pub chat_template: Option<PathBuf>,

    /// Use this tokenizer.json instead of the model's (or the GGUF's own)
    #[arg(long, value_name = "FILE", help_heading = "Model")]
    pub tokenizer: Option<PathBuf>,

    /// Do not put the BOS token in front of the prompt
    #[arg(long, help_heading = "Model")]
    pub no_bos: bool,

    /// Use only models already in the Hugging Face cache; never touch the network (also
    /// HF_HUB_OFFLINE=1)
    #[arg(long, help_heading = "Model")]
    pub offline: bool,
}

impl ModelArgs {
    /// The flags as the library's model specification.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            model: self.model.clone(),
            device: self.device,
            dtype: self.dtype,
            quantize: self.quantize.map(QuantizeArg::format),
            precision: match self.precision {
                PrecisionArg::Exact => Precision::Exact,
                PrecisionArg::Fast => Precision::Fast,
            },
            threads: self.threads,
            ctx_size: self.ctx_size,
            chat_template: self.chat_template.clone(),
            tokenizer: self.tokenizer.clone(),
            no_bos: self.no_bos,
            offline: self.offline,
        }
    }
}

/// How tokens are chosen and when generation stops. `None` means "the default".
#[derive(Args, Debug, Clone, Default)]
pub struct SamplingArgs {
    /// Randomness; 0 always picks the most likely token [default: 0.7]
    #[arg(long, value_name = "T", allow_negative_numbers = true, help_heading = "Sampling", value_parser = finite)]
    pub temperature: Option<f64>,

    /// Sample from the K most likely tokens only; 0 = off [default: 40]
    #[arg(long, value_name = "K", help_heading = "Sampling")]
    pub top_k: Option<usize>,

    /// Sample from the smallest set of tokens whose probability reaches P; 1 = off [default: 0.9]
    #[arg(long, value_name = "P", help_heading = "Sampling", value_parser = finite)]
    pub top_p: Option<f64>,

    /// Drop tokens less likely than P times the most likely one; 0 = off [default: 0.05]
    #[arg(long, value_name = "P", help_heading = "Sampling", value_parser = finite)]
    pub min_p: Option<f64>,

    /// Penalise tokens seen in the last --repeat-last-n tokens (transformers' repetition_penalty);
    /// 1 = off [default: 1.1]
    #[arg(long, value_name = "X", help_heading = "Sampling", value_parser = finite)]
    pub repeat_penalty: Option<f64>,

    /// How many recent tokens (prompt included) the penalties look at; -1 = the whole context
    /// [default: 64]
    #[arg(long, value_name = "N", allow_negative_numbers = true, help_heading = "Sampling")]
    pub repeat_last_n: Option<i64>,

    /// Subtract X from the logit of every token already seen [default: 0]
    #[arg(long, value_name = "X", allow_negative_numbers = true, help_heading = "Sampling", value_parser = finite)]
    pub presence_penalty: Option<f64>,

    /// Subtract X times its count from the logit of every token already seen [default: 0]
    #[arg(long, value_name = "X", allow_negative_numbers = true, help_heading = "Sampling", value_parser = finite)]
    pub frequency_penalty: Option<f64>,

    /// Random seed; the same seed and settings give the same answer [default: random]
    #[arg(long, value_name = "N", help_heading = "Sampling")]
    pub seed: Option<u64>,

    /// Stop after N generated tokens [default: 256]
    #[arg(short = 'n', long, value_name = "N", help_heading = "Sampling", value_parser = count::<0, MAX_TOKENS>)]
    pub max_tokens: Option<usize>,

    /// Stop when this text appears (not printed); repeatable
    #[arg(long, value_name = "TEXT", help_heading = "Sampling")]
    pub stop: Vec<String>,

    /// Keep going past end-of-generation tokens (for benchmarks)
    #[arg(long, help_heading = "Sampling")]
    pub ignore_eos: bool,
}

impl SamplingArgs {
    /// The flags as the library's request.
    pub fn request(&self) -> SamplingRequest {
        SamplingRequest {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
        }
    }
}
