//! The GGUF reader on arbitrary bytes: header, metadata and tensor table, the Llama
//! configuration and its validation, the tokenizer and chat template the metadata carries, and
//! every tensor read row by row as the CPU engine reads them (Q/K rows un-permuted, blocks
//! decoded). Anything but an `Err` for a bad file is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zagreus::budget::Limits;
use zagreus::model::cpu::source::Tensors;
use zagreus::model::gguf::{GgufFile, GgufLlama};
use zagreus::template::{ChatTemplate, Message, TemplateTokens};

const LIMITS: Limits = Limits {
    memory: 16 << 20,
    time: std::time::Duration::from_secs(5),
};

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data, "fuzz.gguf") else {
        return;
    };
    if let Ok((tok, tcfg)) = zagreus::tokenizer::from_gguf(&file) {
        if let Ok(t) = zagreus::tokenizer::Tokenizer::new(tok, &tcfg, None) {
            if let Ok(ids) = t.encode_raw("Ciao! Come stai? 😀", true) {
                let _ = t.decode(&ids);
            }
        }
        if let Some(src) = tcfg.chat_template {
            if let Ok(tmpl) = ChatTemplate::with_fuel(src, "fuzz.gguf", 100_000) {
                let messages = [Message::new("user", "Ciao")];
                let _ = tmpl.render_within(&messages, None, true, &TemplateTokens::default(), LIMITS);
            }
        }
    }
    let Ok(llama) = GgufLlama::from_file(file) else {
        return;
    };
    let cfg = llama.config.clone();
    assert!(zagreus::model::rope::inv_freq(&cfg).iter().all(|f| f.is_finite()));
    let _ = zagreus::loader::check_weights(&cfg, &llama, "fuzz.gguf");
    let mut names = vec![
        "model.embed_tokens.weight".to_string(),
        "lm_head.weight".to_string(),
        "model.norm.weight".to_string(),
    ];
    for i in 0..cfg.num_hidden_layers.min(4) {
        for part in [
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            names.push(format!("model.layers.{i}.{part}.weight"));
        }
    }
    for name in names {
        match llama.shape(&name).as_deref() {
            Some([len]) => {
                let _ = llama.vector(&name, *len);
            }
            Some([rows, cols]) => {
                if let Ok(m) = llama.matrix(&name, *rows, *cols) {
                    let mut row = vec![0f32; *cols];
                    for r in 0..m.rows() {
                        m.read(r, &mut row);
                    }
                    m.release(0, m.rows());
                }
            }
            _ => {}
        }
    }
});
