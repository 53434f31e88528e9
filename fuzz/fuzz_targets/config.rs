//! config.json, generation_config.json and tokenizer_config.json on arbitrary text. A
//! configuration that passes validation must be one the network can be computed from: finite
//! rotary frequencies, and sizes whose products do not overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zagreus::model::config::{ConfigSource, GenerationConfig, LlamaConfig};
use zagreus::tokenizer::TokenizerConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = serde_json::from_str::<GenerationConfig>(text);
    let _ = TokenizerConfig::from_json(text);
    if let Ok(cfg) = LlamaConfig::from_json(text) {
        cfg.validate(ConfigSource::Gguf)
            .expect("validation is the same for both sources");
        assert!(zagreus::model::rope::inv_freq(&cfg).iter().all(|f| f.is_finite()));
        let _ = cfg.parameter_count();
        assert!(cfg.rms_norm_eps > 0.0 && cfg.head_dim % 2 == 0);
    }
});
