//! `config.json` and `generation_config.json`: the model's shape and its decoding defaults.
//!
//! Both transformers 4 (`rope_theta`, `rope_scaling`, `torch_dtype`) and transformers 5
//! (`rope_parameters`, `dtype`) spellings are accepted, because checkpoints of this family exist in
//! both.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// One id or a list of ids, as `eos_token_id` is written in the wild.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            OneOrMany::One(id) => vec![*id],
            OneOrMany::Many(ids) => ids.clone(),
        }
    }
}

/// How rotary position frequencies are derived from `rope_theta`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: `theta^(-2i/d)`.
    Default,
    /// Llama 3.1/3.2 frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Position interpolation: positions divided by `factor`.
    Linear { factor: f64 },
    /// Per-dimension divisors of the frequencies (GGUF `rope_freqs.weight`, how llama.cpp stores
    /// Llama 3.1+ scaling).
    Factors(Vec<f32>),
}

/// Bounds on a configuration's sizes: far above any model zagreus can run on a machine, low
/// enough that no product of them overflows or asks for an absurd allocation.
pub const MAX_VOCAB: usize = 1 << 24;
pub const MAX_WIDTH: usize = 1 << 16;
pub const MAX_LAYERS: usize = 1024;
pub const MAX_HEADS: usize = 1024;
pub const MAX_HEAD_DIM: usize = 1024;
pub const MAX_POSITIONS: usize = 1 << 24;
/// Bounds on rotary settings (real ones: bases of 1e4 to 1e7, factors of 1 to 64).
pub const MAX_ROPE_THETA: f64 = 1e12;
pub const MIN_ROPE_FACTOR: f64 = 1e-3;
pub const MAX_ROPE_FACTOR: f64 = 1e6;

/// Where a configuration was read from, for naming its fields in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSource {
    ConfigJson,
    Gguf,
}

impl ConfigSource {
    /// The name of `field` (config.json's spelling) in this source.
    pub fn key(self, field: &str) -> String {
        if self == ConfigSource::ConfigJson {
            return field.to_string();
        }
        let key = match field {
            "vocab_size" => "token_embd.weight rows",
            "hidden_size" => "llama.embedding_length",
            "intermediate_size" => "llama.feed_forward_length",
            "num_hidden_layers" => "llama.block_count",
            "num_attention_heads" => "llama.attention.head_count",
            "num_key_value_heads" => "llama.attention.head_count_kv",
            "head_dim" => "llama.attention.key_length",
            "max_position_embeddings" => "llama.context_length",
            "rms_norm_eps" => "llama.attention.layer_norm_rms_epsilon",
            "rope_theta" => "llama.rope.freq_base",
            "rope_scaling.factor" => "llama.rope.scaling.factor",
            "rope_scaling.factors" => "rope_freqs.weight",
            "bos_token_id" => "tokenizer.ggml.bos_token_id",
            "eos_token_id" => "tokenizer.ggml.eos_token_id",
            other => other,
        };
        key.to_string()
    }
}

/// The part of `config.json` the network needs, normalised across transformers versions.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// What the checkpoint says; `None` when it does not say (then the presence of
    /// `lm_head.weight` decides). A GGUF says it by having `output.weight` or not.
    pub tie_word_embeddings: Option<bool>,
    /// The dtype the checkpoint was saved in (`torch_dtype` / `dtype`), when stated.
    pub stored_dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    bos_token_id: Option<OneOrMany>,
    eos_token_id: Option<OneOrMany>,
}

fn required(value: Option<usize>, key: &str) -> Result<usize> {
    match value {
        Some(0) => bail!("`{key}` is 0"),
        Some(v) => Ok(v),
        None => bail!("missing `{key}`"),
    }
}

fn rope_scaling_from(value: &serde_json::Value) -> Result<RopeScaling> {
    let obj = match value {
        serde_json::Value::Null => return Ok(RopeScaling::Default),
        serde_json::Value::Object(obj) => obj,
        other => bail!("`rope_scaling` must be an object or null, found {other}"),
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        obj.get(key)
            .and_then(|v| v.as_f64())
            .with_context(|| format!("rope scaling `{kind}` needs a number `{key}`"))
    };
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        other => {
            bail!("unsupported rope scaling type `{other}` (supported: default, linear, llama3)")
        }
    }
}

impl LlamaConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::bounded::read_text(path, crate::bounded::JSON_CONFIG_LIMIT, "the model configuration")?;
        Self::from_json(&text).with_context(|| format!("invalid {}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text)?;
        let is_llama = raw.model_type.as_deref() == Some("llama")
            || raw
                .architectures
                .as_ref()
                .is_some_and(|a| a.iter().any(|a| a == "LlamaForCausalLM"));
        if !is_llama {
            let what = raw.model_type.as_deref().unwrap_or("(none)");
            bail!(
                "model_type `{what}` is not supported: zagreus runs Llama-architecture models (model_type \"llama\")"
            );
        }
        let hidden_size = required(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = required(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            bail!("num_attention_heads ({num_attention_heads}) is not a multiple of num_key_value_heads ({num_key_value_heads})");
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    bail!("hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_attention_heads}) and `head_dim` is missing");
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            bail!("head_dim must be even and non-zero, found {head_dim}");
        }
        // transformers 5 folds theta and scaling into `rope_parameters`.
        let (rope_theta, rope_scaling) = match &raw.rope_parameters {
            Some(params) if params.is_object() => {
                let theta = params
                    .get("rope_theta")
                    .and_then(|v| v.as_f64())
                    .or(raw.rope_theta)
                    .unwrap_or(10000.0);
                (theta, rope_scaling_from(params)?)
            }
            _ => (
                raw.rope_theta.unwrap_or(10000.0),
                rope_scaling_from(raw.rope_scaling.as_ref().unwrap_or(&serde_json::Value::Null))?,
            ),
        };
        if let Some(act) = raw.hidden_act.as_deref() {
            if !matches!(act, "silu" | "swish") {
                bail!(
                    "`hidden_act` is `{act}`: Llama-architecture models use silu, the only activation zagreus computes"
                );
            }
        }
        let bos_token_id = raw.bos_token_id.and_then(|b| b.to_vec().first().copied());
        let config = Self {
            vocab_size: required(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: required(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: required(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings,
            stored_dtype: raw.dtype.or(raw.torch_dtype),
            bos_token_id,
            eos_token_ids: raw.eos_token_id.map(|e| e.to_vec()).unwrap_or_default(),
        };
        config.validate(ConfigSource::ConfigJson)?;
        Ok(config)
    }

    /// Checks every number the network is computed from, for config.json and GGUF metadata
    /// alike: a value that would compute garbage (a negative epsilon, a zero or NaN rope factor,
    /// an id outside the vocabulary) or allocate absurdly is refused with the field's name in the
    /// source's own spelling.
    pub fn validate(&self, source: ConfigSource) -> Result<()> {
        let name = |field: &str| source.key(field);
        let sizes = [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, MAX_WIDTH * 8),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_key_value_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_HEAD_DIM),
            ("max_position_embeddings", self.max_position_embeddings, MAX_POSITIONS),
        ];
        for (field, value, max) in sizes {
            if value == 0 || value > max {
                bail!("`{}` is {value}: it must be between 1 and {max}", name(field));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            bail!(
                "`{}` ({}) is not a multiple of `{}` ({})",
                name("num_attention_heads"),
                self.num_attention_heads,
                name("num_key_value_heads"),
                self.num_key_value_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!(
                "`{}` is {}: it must be even (rotary pairs)",
                name("head_dim"),
                self.head_dim
            );
        }
        let eps = self.rms_norm_eps;
        if !(eps.is_finite() && eps > 0.0 && eps < 1.0) {
            bail!(
                "`{}` is {eps}: it must be a small positive number (1e-5, 1e-6)",
                name("rms_norm_eps")
            );
        }
        let theta = self.rope_theta;
        if !(theta > 1.0 && theta <= MAX_ROPE_THETA) {
            bail!(
                "`{}` is {theta}: it must be above 1 and at most {MAX_ROPE_THETA:e} (10000, 500000)",
                name("rope_theta")
            );
        }
        // Frequencies are computed in f32 as transformers does: keep every factor where its
        // quotients stay finite there.
        let positive = |field: &str, v: f64| -> Result<()> {
            if !(MIN_ROPE_FACTOR..=MAX_ROPE_FACTOR).contains(&v) {
                bail!(
                    "`{}` is {v}: it must be between {MIN_ROPE_FACTOR} and {MAX_ROPE_FACTOR:e}",
                    name(field)
                );
            }
            Ok(())
        };
        match &self.rope_scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => positive("rope_scaling.factor", *factor)?,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive("rope_scaling.factor", *factor)?;
                positive("rope_scaling.low_freq_factor", *low_freq_factor)?;
                positive("rope_scaling.high_freq_factor", *high_freq_factor)?;
                if high_freq_factor <= low_freq_factor {
                    bail!(
                        "`{}` ({high_freq_factor}) must be larger than `{}` ({low_freq_factor})",
                        name("rope_scaling.high_freq_factor"),
                        name("rope_scaling.low_freq_factor")
                    );
                }
                if *original_max_position_embeddings == 0 || *original_max_position_embeddings > MAX_POSITIONS {
                    bail!(
                        "`{}` is {original_max_position_embeddings}: it must be between 1 and {MAX_POSITIONS}",
                        name("rope_scaling.original_max_position_embeddings")
                    );
                }
            }
            RopeScaling::Factors(f) => {
                if f.len() != self.head_dim / 2 {
                    bail!(
                        "`{}` has {} values, but a head of {} dimensions has {} rotary pairs",
                        name("rope_scaling.factors"),
                        f.len(),
                        self.head_dim,
                        self.head_dim / 2
                    );
                }
                if let Some(bad) = f
                    .iter()
                    .find(|v| !(MIN_ROPE_FACTOR..=MAX_ROPE_FACTOR).contains(&(**v as f64)))
                {
                    bail!(
                        "`{}` holds {bad}: every factor must be between {MIN_ROPE_FACTOR} and {MAX_ROPE_FACTOR:e}",
                        name("rope_scaling.factors")
                    );
                }
            }
        }
        if let Some(bad) = crate::model::rope::inv_freq(self)
            .into_iter()
            .find(|f| !(f.is_finite() && *f > 0.0))
        {
            bail!(
                "`{}` and `{}` give a rotary frequency of {bad}",
                name("rope_theta"),
                name("rope_scaling")
            );
        }
        if let Some(bos) = self.bos_token_id {
            if bos as usize >= self.vocab_size {
                bail!(
                    "`{}` is {bos}, outside the vocabulary of {} tokens",
                    name("bos_token_id"),
                    self.vocab_size
                );
            }
        }
        if let Some(eos) = self.eos_token_ids.iter().find(|e| **e as usize >= self.vocab_size) {
            bail!(
                "`{}` holds {eos}, outside the vocabulary of {} tokens",
                name("eos_token_id"),
                self.vocab_size
            );
        }
        Ok(())
    }

    /// Bytes of one weight set per token, counting the LM head: what decoding reads per step.
    pub fn parameter_count(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let per_layer = h * q * 2 + h * kv * 2 + 3 * h * self.intermediate_size + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings.unwrap_or(false) {
            0
        } else {
            embed
        };
        embed + head + self.num_hidden_layers * per_layer + h
    }
}

/// Decoding defaults a checkpoint ships in `generation_config.json`. Every field is optional.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    pub bos_token_id: Option<OneOrMany>,
    pub eos_token_id: Option<OneOrMany>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    /// Reads `generation_config.json`; a missing file is an empty config.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = crate::bounded::read_text(path, crate::bounded::JSON_CONFIG_LIMIT, "the generation config")?;
        serde_json::from_str(&text).with_context(|| format!("invalid {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str = r#"{"model_type":"llama","vocab_size":128262,"hidden_size":960,
        "intermediate_size":2560,"num_hidden_layers":32,"num_attention_heads":15,
        "num_key_value_heads":5,"max_position_embeddings":4096,"rms_norm_eps":1e-5,
        "rope_theta":10000.0,"rope_scaling":null,"tie_word_embeddings":true,
        "torch_dtype":"bfloat16","bos_token_id":128000,"eos_token_id":[128001,128256]}"#;

    #[test]
    fn transformers4_keys() {
        let c = LlamaConfig::from_json(V4).unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.vocab_size, 128262);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Default);
        assert_eq!(c.eos_token_ids, vec![128001, 128256]);
        assert_eq!(c.stored_dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn transformers5_keys() {
        let text = V4
            .replace(
                r#""rope_theta":10000.0,"rope_scaling":null,"#,
                r#""rope_parameters":{"rope_theta":1000000.0,"rope_type":"default"},"#,
            )
            .replace("torch_dtype", "dtype")
            .replace("[128001,128256]", "128009");
        let c = LlamaConfig::from_json(&text).unwrap();
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.eos_token_ids, vec![128009]);
        assert_eq!(c.stored_dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn llama3_scaling_and_explicit_head_dim() {
        let text = V4.replace(
            r#""rope_scaling":null"#,
            r#""head_dim":48,"rope_scaling":{"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        );
        let c = LlamaConfig::from_json(&text).unwrap();
        assert_eq!(c.head_dim, 48);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0));
    }

    #[test]
    fn rejects_other_architectures_and_bad_shapes() {
        let err = LlamaConfig::from_json(&V4.replace(r#""llama""#, r#""gpt2""#)).unwrap_err();
        assert!(err.to_string().contains("gpt2"), "{err}");
        let err = LlamaConfig::from_json(&V4.replace(r#""num_key_value_heads":5"#, r#""num_key_value_heads":4"#))
            .unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
        let err = LlamaConfig::from_json(&V4.replace(
            r#""rope_scaling":null"#,
            r#""rope_scaling":{"type":"yarn","factor":2.0}"#,
        ))
        .unwrap_err();
        assert!(err.to_string().contains("yarn"), "{err}");
        assert!(LlamaConfig::from_json(&V4.replace(r#""hidden_size":960,"#, "")).is_err());
    }

    #[test]
    fn rotary_settings_must_keep_frequencies_finite_in_f32() {
        // Found by fuzzing the GGUF reader: a subnormal rope_freqs factor is positive, yet its
        // quotient overflows f32.
        let mut c = LlamaConfig::from_json(V4).unwrap();
        c.rope_scaling = RopeScaling::Factors(vec![6.2e-41; c.head_dim / 2]);
        let err = c.validate(ConfigSource::Gguf).unwrap_err().to_string();
        assert!(err.contains("rope_freqs.weight"), "{err}");
        let mut c = LlamaConfig::from_json(V4).unwrap();
        c.rope_theta = 1e300;
        assert!(c
            .validate(ConfigSource::ConfigJson)
            .unwrap_err()
            .to_string()
            .contains("rope_theta"));
        let tiny = V4.replace(
            r#""rope_scaling":null"#,
            r#""rope_scaling":{"rope_type":"linear","factor":1e-300}"#,
        );
        let err = LlamaConfig::from_json(&tiny).unwrap_err().to_string();
        assert!(err.contains("rope_scaling.factor"), "{err}");
    }

    #[test]
    fn zagreus_parameter_count_matches_model_card() {
        let c = LlamaConfig::from_json(&V4.replace("128262", "128256").replace("[128001,128256]", "128001")).unwrap();
        assert_eq!(c.parameter_count(), 437_760_960);
    }
}
