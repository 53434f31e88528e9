//! A model's own files as an attacker (or a broken converter) writes them: chat templates that
//! never end or build huge strings, a tokenizer whose regex backtracks, configurations with
//! numbers nobody checked, NaN weights, lying references. Each is one clear error naming the
//! file or field, quickly and within a memory bound; never a hang, a panic, an abort, or garbage
//! printed with exit code 0.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::cli::{assert_clean_error, copy_model, run, run_measured, Input};
use common::gguf_writer::{write_fixture_gguf_with, Meta, Ty};
use common::model_dir;

/// A copy of fixture `name` in a temporary directory, with `edit` applied to it.
fn model_with(name: &str, edit: impl FnOnce(&Path)) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("model");
    copy_model(&model_dir(name), &m);
    edit(&m);
    (dir, m.display().to_string())
}

/// Rewrites one key of a JSON file.
fn set_json(path: &Path, key: &str, value: serde_json::Value) {
    let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut at = &mut j;
    let parts: Vec<&str> = key.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        at = &mut at[*p];
    }
    at[parts[parts.len() - 1]] = value;
    std::fs::write(path, j.to_string()).unwrap();
}

fn write_template(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("hostile.jinja");
    std::fs::write(&p, text).unwrap();
    p
}

/// Memory a stopped template may cost: the 512 MiB budget, the model, and change.
const TEMPLATE_RSS_MB: f64 = 900.0;

#[test]
fn a_template_that_never_ends_runs_out_of_fuel() {
    let dir = tempfile::tempdir().unwrap();
    let t = write_template(
        dir.path(),
        "{% for a in range(100000) %}{% for b in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
    );
    let m = run_measured(
        &[
            "-m",
            &model_dir("tied-bf16").display().to_string(),
            "--chat-template",
            t.to_str().unwrap(),
            "Ciao",
        ],
        Input::Nothing,
        Duration::from_secs(60),
    );
    assert_clean_error(&m.out, &["hostile.jinja", "steps"]);
}

#[test]
fn a_template_that_doubles_a_string_is_stopped_at_its_memory_budget() {
    // Before: grew to 6 GB and aborted. Fuel cannot stop this: 40 steps, each doubling.
    let dir = tempfile::tempdir().unwrap();
    let t = write_template(
        dir.path(),
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    );
    let m = run_measured(
        &[
            "-m",
            &model_dir("tied-bf16").display().to_string(),
            "--chat-template",
            t.to_str().unwrap(),
            "Ciao",
        ],
        Input::Nothing,
        Duration::from_secs(60),
    );
    assert_clean_error(&m.out, &["hostile.jinja", "memory"]);
    assert!(m.peak_rss_mb < TEMPLATE_RSS_MB, "peak RSS {:.0} MB", m.peak_rss_mb);
}

#[test]
fn a_template_that_asks_for_a_terabyte_at_once_never_gets_it() {
    let dir = tempfile::tempdir().unwrap();
    let t = write_template(dir.path(), "{{ 'a\\nb' | indent(1000000000000) }}");
    let m = run_measured(
        &[
            "-m",
            &model_dir("tied-bf16").display().to_string(),
            "--chat-template",
            t.to_str().unwrap(),
            "Ciao",
        ],
        Input::Nothing,
        Duration::from_secs(60),
    );
    assert_clean_error(&m.out, &["hostile.jinja", "memory"]);
    assert!(m.peak_rss_mb < TEMPLATE_RSS_MB, "peak RSS {:.0} MB", m.peak_rss_mb);
}

#[test]
fn a_gguf_whose_own_template_never_ends_is_refused() {
    // A downloaded file alone can do it: the template travels in the metadata.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("loop.gguf");
    write_fixture_gguf_with(&model_dir("tied-bf16"), &p, Ty::F32, |meta| {
        meta.insert(
            "tokenizer.chat_template".into(),
            Meta::Str("{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}".into()),
        );
    });
    let m = run_measured(
        &["-m", p.to_str().unwrap(), "Ciao"],
        Input::Nothing,
        Duration::from_secs(60),
    );
    assert_clean_error(&m.out, &["loop.gguf", "steps"]);
}

#[test]
fn a_tokenizer_whose_regex_backtracks_is_an_error_not_a_panic() {
    // Catastrophic backtracking: the regex engine gives up (and the tokenizers library panics).
    let (_d, m) = model_with("tied-bf16", |m| {
        let p = m.join("tokenizer.json");
        set_json(
            &p,
            "pre_tokenizer",
            serde_json::json!({
                "type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated", "invert": false
            }),
        );
    });
    let prompt = format!("{}b", "a".repeat(60));
    let out = run(&["-m", &m, "--raw", &prompt], b"");
    assert_clean_error(&out, &["cannot tokenize the prompt"]);
}

#[test]
fn invalid_configurations_are_refused_with_the_field_name() {
    // Each of these ran and printed garbage (or panicked later) with exit code 0.
    let cases: Vec<(&str, &str, serde_json::Value, &str)> = vec![
        ("tied-bf16", "rms_norm_eps", (-1).into(), "rms_norm_eps"),
        ("tied-bf16", "rms_norm_eps", 0.into(), "rms_norm_eps"),
        ("llama3-rope", "rope_scaling.factor", 0.into(), "rope_scaling.factor"),
        (
            "llama3-rope",
            "rope_scaling.high_freq_factor",
            1.into(),
            "rope_scaling.high_freq_factor",
        ),
        ("tied-bf16", "rope_theta", (-5).into(), "rope_theta"),
        ("tied-bf16", "hidden_act", "gelu".into(), "hidden_act"),
        ("tied-bf16", "tie_word_embeddings", false.into(), "tie_word_embeddings"),
        ("tied-bf16", "bos_token_id", 320.into(), "bos_token_id"),
        (
            "tied-bf16",
            "eos_token_id",
            serde_json::json!([301, 100000]),
            "eos_token_id",
        ),
        ("tied-bf16", "hidden_size", 0.into(), "hidden_size"),
        (
            "tied-bf16",
            "num_hidden_layers",
            1_000_000_000.into(),
            "num_hidden_layers",
        ),
        ("tied-bf16", "vocab_size", 1_000_000_000_000u64.into(), "vocab_size"),
        (
            "tied-bf16",
            "max_position_embeddings",
            0.into(),
            "max_position_embeddings",
        ),
    ];
    for (fixture, key, value, needle) in cases {
        let (_d, m) = model_with(fixture, |m| set_json(&m.join("config.json"), key, value.clone()));
        let out = run(&["-m", &m, "-n", "2", "Ciao"], b"");
        assert_clean_error(&out, &["config.json", needle]);
    }
    // generation_config.json's ids too.
    let (_d, m) = model_with("tied-bf16", |m| {
        std::fs::write(m.join("generation_config.json"), r#"{"eos_token_id": [301, 4000]}"#).unwrap()
    });
    assert_clean_error(
        &run(&["-m", &m, "-n", "2", "Ciao"], b""),
        &["generation_config.json", "eos_token_id", "4000"],
    );
}

#[test]
fn invalid_gguf_metadata_is_refused_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Meta, &str)> = vec![
        ("llama.rope.freq_base", Meta::F32(f32::NAN), "llama.rope.freq_base"),
        ("llama.embedding_length", Meta::U32(0), "llama.embedding_length"),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Meta::F32(-1.0),
            "layer_norm_rms_epsilon",
        ),
        (
            "tokenizer.ggml.eos_token_id",
            Meta::U32(70000),
            "tokenizer.ggml.eos_token_id",
        ),
    ];
    for (i, (key, value, needle)) in cases.into_iter().enumerate() {
        let p = dir.path().join(format!("bad{i}.gguf"));
        write_fixture_gguf_with(&model_dir("tied-bf16"), &p, Ty::F32, |meta| {
            meta.insert(key.into(), value);
        });
        let out = run(&["-m", p.to_str().unwrap(), "-n", "2", "Ciao"], b"");
        assert_clean_error(&out, &[&format!("bad{i}.gguf"), needle]);
    }
}

/// Overwrites the first value of tensor `name` in a BF16 safetensors file with NaN.
fn poison(file: &Path, name: &str) {
    let mut bytes = std::fs::read(file).unwrap();
    let offset = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::BF16);
        t.data().as_ptr() as usize - bytes.as_ptr() as usize
    };
    bytes[offset..offset + 2].copy_from_slice(&0x7FC0u16.to_le_bytes());
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn nan_weights_are_refused_not_turned_into_garbage() {
    // In a norm: found at load, named.
    let (_d, m) = model_with("tied-bf16", |m| {
        poison(
            &m.join("model.safetensors"),
            "model.layers.1.post_attention_layernorm.weight",
        )
    });
    assert_clean_error(
        &run(&["-m", &m, "-n", "2", "Ciao"], b""),
        &["model.layers.1.post_attention_layernorm.weight", "NaN"],
    );
    // In a matrix: the first logit computed says so.
    let (_d, m) = model_with("tied-bf16", |m| {
        poison(&m.join("model.safetensors"), "model.layers.0.self_attn.q_proj.weight")
    });
    assert_clean_error(&run(&["-m", &m, "-n", "2", "Ciao"], b""), &["NaN", "weights"]);
}

#[test]
fn check_logits_refuses_references_that_cannot_fail() {
    // Before: an empty or NaN reference passed.
    let dir = tempfile::tempdir().unwrap();
    let m = model_dir("tied-bf16");
    let full: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("reference.json")).unwrap()).unwrap();
    let write = |name: &str, j: &serde_json::Value| {
        let p = dir.path().join(name);
        std::fs::write(&p, j.to_string()).unwrap();
        p.display().to_string()
    };
    let mut empty = full.clone();
    empty["prompt_logits"] = serde_json::json!([]);
    let mut short = full.clone();
    short["step_logits"][0] = serde_json::json!([1.0, 2.0]);
    let mut nan = full.clone();
    nan["step_logits"][3][7] = serde_json::json!("NaN");
    let mut few = full.clone();
    few["greedy_ids"] = serde_json::json!([]);
    for (name, j, needle) in [
        ("empty.json", &empty, "prompt_logits"),
        ("short.json", &short, "step_logits"),
        ("nan.json", &nan, "NaN"),
        ("few.json", &few, "greedy_ids"),
    ] {
        let r = write(name, j);
        let out = run(
            &["check-logits", "-m", &m.display().to_string(), "--reference", &r],
            b"",
        );
        assert_clean_error(&out, &[name, needle]);
    }
    let out = run(
        &[
            "check-logits",
            "-m",
            &m.display().to_string(),
            "--reference",
            &write("ok.json", &full),
            "--tolerance",
            "NaN",
        ],
        b"",
    );
    assert_eq!(out.code, 2, "a NaN tolerance passes everything: {}", out.stderr);
}
