//! Generation settings resolved in three layers: zagreus' defaults for these models, then the
//! model's generation_config.json, then what the request asks for (command-line flags, a JSON
//! request line or an HTTP request body fill the same [`SamplingRequest`]).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::model::GenerationConfig;
use crate::sampling::SamplingParams;

/// zagreus' own defaults, chosen for the Zagreus models (see MODEL.md's decoding advice): mild
/// sampling as in the authors' demo (temperature 0.7, top-p 0.9), a light repetition penalty
/// against the loops these small models fall into, and the authors' cap of 256 new tokens.
pub const DEFAULT_TEMPERATURE: f64 = 0.7;
pub const DEFAULT_TOP_K: usize = 40;
pub const DEFAULT_TOP_P: f64 = 0.9;
pub const DEFAULT_MIN_P: f64 = 0.05;
pub const DEFAULT_REPEAT_PENALTY: f64 = 1.1;
pub const DEFAULT_REPEAT_LAST_N: i64 = 64;
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// What one request asks for; `None` (or absent in JSON) means "the default".
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct SamplingRequest {
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repeat_penalty: Option<f64>,
    pub repeat_last_n: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<u64>,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

impl SamplingRequest {
    /// This request's own values, and `defaults`' where it has none (a request's fields over a
    /// front end's flags).
    pub fn over(&self, defaults: &SamplingRequest) -> SamplingRequest {
        SamplingRequest {
            temperature: self.temperature.or(defaults.temperature),
            top_k: self.top_k.or(defaults.top_k),
            top_p: self.top_p.or(defaults.top_p),
            min_p: self.min_p.or(defaults.min_p),
            repeat_penalty: self.repeat_penalty.or(defaults.repeat_penalty),
            repeat_last_n: self.repeat_last_n.or(defaults.repeat_last_n),
            presence_penalty: self.presence_penalty.or(defaults.presence_penalty),
            frequency_penalty: self.frequency_penalty.or(defaults.frequency_penalty),
            seed: self.seed.or(defaults.seed),
            max_tokens: self.max_tokens.or(defaults.max_tokens),
            stop: if self.stop.is_empty() {
                defaults.stop.clone()
            } else {
                self.stop.clone()
            },
            ignore_eos: self.ignore_eos || defaults.ignore_eos,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    #[serde(flatten)]
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

impl Settings {
    pub fn resolve(args: &SamplingRequest, gen: &GenerationConfig) -> Result<Self> {
        // generation_config's do_sample=false means greedy, whatever its temperature says.
        let gen_temperature = match gen.do_sample {
            Some(false) => Some(0.0),
            _ => gen.temperature,
        };
        let sampling = SamplingParams {
            temperature: args.temperature.or(gen_temperature).unwrap_or(DEFAULT_TEMPERATURE),
            top_k: args.top_k.or(gen.top_k).unwrap_or(DEFAULT_TOP_K),
            top_p: args.top_p.or(gen.top_p).unwrap_or(DEFAULT_TOP_P),
            min_p: args.min_p.or(gen.min_p).unwrap_or(DEFAULT_MIN_P),
            repeat_penalty: args
                .repeat_penalty
                .or(gen.repetition_penalty)
                .unwrap_or(DEFAULT_REPEAT_PENALTY),
            repeat_last_n: args.repeat_last_n.unwrap_or(DEFAULT_REPEAT_LAST_N),
            presence_penalty: args.presence_penalty.unwrap_or(0.0),
            frequency_penalty: args.frequency_penalty.unwrap_or(0.0),
            seed: args.seed.unwrap_or_else(rand::random),
        };
        sampling.validate()?;
        let max_tokens = args.max_tokens.or(gen.max_new_tokens).unwrap_or(DEFAULT_MAX_TOKENS);
        if args.stop.iter().any(|s| s.is_empty()) {
            bail!("stop: an empty string would stop at once; give non-empty text");
        }
        Ok(Self {
            sampling,
            max_tokens,
            stop: args.stop.clone(),
            ignore_eos: args.ignore_eos,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_generation_config_which_overrides_defaults() {
        let gen: GenerationConfig =
            serde_json::from_str(r#"{"temperature":0.3,"top_p":0.5,"max_new_tokens":99}"#).unwrap();
        let args = SamplingRequest {
            top_p: Some(0.8),
            seed: Some(5),
            ..Default::default()
        };
        let s = Settings::resolve(&args, &gen).unwrap();
        assert_eq!(s.sampling.temperature, 0.3);
        assert_eq!(s.sampling.top_p, 0.8);
        assert_eq!(s.sampling.top_k, DEFAULT_TOP_K);
        assert_eq!(s.max_tokens, 99);
        assert_eq!(s.sampling.seed, 5);
        let greedy: GenerationConfig = serde_json::from_str(r#"{"do_sample":false,"temperature":0.9}"#).unwrap();
        assert_eq!(
            Settings::resolve(&SamplingRequest::default(), &greedy)
                .unwrap()
                .sampling
                .temperature,
            0.0
        );
    }

    #[test]
    fn a_request_overrides_the_front_ends_defaults() {
        let flags = SamplingRequest {
            temperature: Some(0.5),
            max_tokens: Some(9),
            stop: vec!["x".into()],
            ..Default::default()
        };
        let job = SamplingRequest {
            temperature: Some(0.0),
            ..Default::default()
        };
        let m = job.over(&flags);
        assert_eq!(
            (m.temperature, m.max_tokens, m.stop),
            (Some(0.0), Some(9), vec!["x".to_string()])
        );
    }

    #[test]
    fn bad_values_name_the_setting_and_value() {
        let args = SamplingRequest {
            top_p: Some(1.5),
            ..Default::default()
        };
        let err = Settings::resolve(&args, &GenerationConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("top_p 1.5"), "{err}");
        // A JSON request fills the same settings as the flags.
        let json: SamplingRequest =
            serde_json::from_str(r#"{"temperature":0,"max_tokens":7,"stop":["x"],"seed":3}"#).unwrap();
        let s = Settings::resolve(&json, &GenerationConfig::default()).unwrap();
        assert_eq!((s.sampling.temperature, s.max_tokens, s.sampling.seed), (0.0, 7, 3));
        assert_eq!(s.stop, ["x"]);
    }
}
