//! The network against transformers: logits of random reference models (written by
//! scripts/make_fixtures.py with transformers' LlamaForCausalLM, f32) for every prompt position and
//! every KV-cached decode step, and the greedy tokens exactly.

mod common;

use candle_core::{DType, Device};
use common::{floats, ids, model_dir, read_json};
use zagreus::loader::{load, LoadOptions, LoadedModel};
use zagreus::model::LogitsFor;
use zagreus::source::ModelFiles;

const MODELS: &[&str] = &["tied-bf16", "untied-f32-sharded", "llama3-rope"];

fn load_model(name: &str, dtype: Option<DType>) -> LoadedModel {
    let files = ModelFiles::from_dir(&model_dir(name)).unwrap();
    load(
        &files,
        &LoadOptions {
            device: Device::Cpu,
            dtype,
            chat_template: None,
        },
    )
    .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit rows differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs the prompt (all positions) and then the greedy tokens one by one through the KV cache,
/// returning the worst logit difference against the reference, and checks greedy agreement.
fn worst_diff(name: &str, dtype: Option<DType>) -> f32 {
    let m = load_model(name, dtype);
    let r = read_json(&model_dir(name).join("reference.json"));
    let prompt = ids(&r["prompt_ids"]);
    let greedy = ids(&r["greedy_ids"]);
    let mut cache = m.model.new_cache(m.model.max_positions());
    let logits = m
        .model
        .forward(&prompt, &mut cache, LogitsFor::All)
        .unwrap();
    let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    let want_rows = r["prompt_logits"].as_array().unwrap();
    assert_eq!(rows.len(), want_rows.len());
    let mut worst = 0f32;
    for (got, want) in rows.iter().zip(want_rows) {
        worst = worst.max(max_abs_diff(got, &floats(want)));
    }
    let mut last = rows.last().unwrap().clone();
    for (i, (&tok, want)) in greedy
        .iter()
        .zip(r["step_logits"].as_array().unwrap())
        .enumerate()
    {
        assert_eq!(
            zagreus::sampling::argmax(&last),
            tok,
            "{name} {dtype:?}: greedy token {i} differs"
        );
        last = m
            .model
            .forward(&[tok], &mut cache, LogitsFor::Last)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        worst = worst.max(max_abs_diff(&last, &floats(want)));
    }
    eprintln!("{name} {dtype:?}: max |Δlogit| = {worst:e}");
    worst
}

#[test]
fn f32_logits_match_transformers_for_prompt_and_every_cached_step() {
    for name in MODELS {
        let d = worst_diff(name, Some(DType::F32));
        assert!(d <= 1e-3, "{name}: max |Δlogit| {d} > 1e-3");
    }
}

#[test]
fn bf16_weights_of_a_bf16_checkpoint_are_exact() {
    // A BF16 checkpoint kept in BF16 (the CPU default) computes with exactly the same weights as
    // transformers' f32 upcast, with f32 activations: the same 1e-3 tolerance holds.
    let d = worst_diff("tied-bf16", Some(DType::BF16));
    assert!(d <= 1e-3, "max |Δlogit| {d} > 1e-3");
    let d = worst_diff("tied-bf16", None);
    assert!(d <= 1e-3, "default dtype: max |Δlogit| {d} > 1e-3");
}

#[test]
fn rounded_weights_stay_within_stated_tolerance() {
    // An f32 checkpoint rounded to 16-bit weights: f16 keeps 11 significant bits, bf16 8.
    for (dtype, tol) in [(DType::F16, 0.02), (DType::BF16, 0.15)] {
        for name in ["untied-f32-sharded", "llama3-rope"] {
            let d = worst_diff(name, Some(dtype));
            assert!(d <= tol, "{name} {dtype:?}: max |Δlogit| {d} > {tol}");
        }
    }
}

#[test]
fn truncating_the_cache_and_refeeding_gives_the_same_logits() {
    let m = load_model("tied-bf16", None);
    let r = read_json(&model_dir("tied-bf16").join("reference.json"));
    let prompt = ids(&r["prompt_ids"]);
    let mut cache = m.model.new_cache(64);
    let full: Vec<f32> = m
        .model
        .forward(&prompt, &mut cache, LogitsFor::Last)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for keep in [0, 1, 20, prompt.len() - 1] {
        cache.truncate(keep);
        let again: Vec<f32> = m
            .model
            .forward(&prompt[keep..], &mut cache, LogitsFor::Last)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(max_abs_diff(&full, &again) < 1e-4, "keep={keep}");
        assert_eq!(cache.len(), prompt.len());
    }
}

#[test]
fn positions_past_the_model_context_are_an_error_not_a_panic() {
    let m = load_model("llama3-rope", None);
    let mut cache = m.model.new_cache(1000);
    assert_eq!(
        cache.max_len(),
        64,
        "the cache is clamped to max_position_embeddings"
    );
    let err = m
        .model
        .forward(&[1u32; 65], &mut cache, LogitsFor::Last)
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_position_embeddings"), "{err}");
    m.model
        .forward(&[1u32; 64], &mut cache, LogitsFor::Last)
        .unwrap();
    let err = m
        .model
        .forward(&[1], &mut cache, LogitsFor::Last)
        .unwrap_err()
        .to_string();
    assert!(err.contains("65") && err.contains("64"), "{err}");
}

#[test]
fn vocabulary_comes_from_the_checkpoint_and_lm_head_from_tensor_presence() {
    let tied = load_model("tied-bf16", None);
    assert_eq!(tied.model.vocab_size(), 320);
    assert!(tied.model.tied_embeddings());
    let untied = load_model("untied-f32-sharded", None);
    assert!(!untied.model.tied_embeddings());
    assert_eq!(untied.model.config().head_dim, 24);
    assert_eq!(untied.model.config().rope_theta, 500000.0);
}
