//! The conversation engine behind the REPL: KV-cache reuse across turns (only new tokens are run,
//! with the same logits as a fresh run), context overflow, regen/undo/clear/system, save/load.

mod common;

use std::sync::atomic::AtomicBool;

use common::model_dir;
use zagreus::chat::Chat;
use zagreus::loader::{load, LoadOptions, LoadedModel};
use zagreus::sampling::Sampler;
use zagreus::session::{generate, GenerateOptions, Session};
use zagreus::settings::SamplingRequest;
use zagreus::settings::Settings;
use zagreus::source::ModelFiles;
use zagreus::template::Message;

fn model() -> LoadedModel {
    let files = ModelFiles::from_dir(&model_dir("tied-bf16")).unwrap();
    // f32: the cached-versus-fresh comparison below is exact, whatever the prefill precision.
    let opts = LoadOptions {
        dtype: Some(candle_core::DType::F32),
        ..LoadOptions::cpu()
    };
    load(&files, &opts).unwrap()
}

fn greedy(max_tokens: usize) -> Settings {
    let args = SamplingRequest {
        temperature: Some(0.0),
        repeat_penalty: Some(1.0),
        max_tokens: Some(max_tokens),
        seed: Some(1),
        ..Default::default()
    };
    Settings::resolve(&args, &Default::default()).unwrap()
}

fn ids_for(lm: &LoadedModel, messages: &[Message]) -> Vec<u32> {
    let rendered = lm.template.render(messages, None, true, &lm.template_tokens).unwrap();
    lm.tokenizer.encode_chat(&rendered, true).unwrap()
}

fn lcp(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[test]
fn the_second_turn_runs_only_new_tokens_with_the_same_logits_as_a_fresh_run() {
    let lm = model();
    let no = AtomicBool::new(false);
    let mut session = Session::new(&lm.model, 64);
    let mut sampler = Sampler::new(greedy(4).sampling);
    let opts = GenerateOptions {
        max_tokens: 4,
        stop_ids: lm.stop_ids.clone(),
        stop_strings: vec![],
        ignore_eos: false,
        logprobs: None,
        constraint: None,
    };
    let mut conv = vec![Message::new("user", "Ciao!")];
    let ids1 = ids_for(&lm, &conv);
    let first = generate(
        &mut session,
        &lm.tokenizer,
        &mut sampler,
        &ids1,
        &opts,
        &no,
        &mut |_| Ok(()),
    )
    .unwrap();
    assert_eq!(first.stats.prompt_processed, ids1.len());
    conv.push(Message::new("assistant", first.text.clone()));
    conv.push(Message::new("user", "E poi?"));
    let ids2 = ids_for(&lm, &conv);
    let cached = session.tokens().to_vec();
    let reuse = lcp(&cached, &ids2);
    assert!(
        reuse >= ids1.len(),
        "the whole first prompt stays cached ({reuse} < {})",
        ids1.len()
    );
    let second = session.prefill(&ids2).unwrap();
    assert_eq!(
        second.processed,
        ids2.len() - reuse,
        "only the tokens after the common prefix are run"
    );
    let mut fresh = Session::new(&lm.model, 64);
    let full = fresh.prefill(&ids2).unwrap();
    assert_eq!(full.processed, ids2.len());
    let diff = session
        .logits()
        .iter()
        .zip(fresh.logits())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "cached and fresh logits differ by {diff}");
}

#[test]
fn chat_turns_reuse_the_cache_and_overflow_drops_the_oldest_exchange() {
    let lm = model();
    let mut chat = Chat::new(&lm, 64, None, greedy(4), true);
    let t1 = chat.send("Ciao!", &mut |_| Ok(())).unwrap();
    assert_eq!(t1.dropped, 0);
    assert_eq!(t1.completion.stats.prompt_processed, t1.completion.stats.prompt_tokens);
    let t2 = chat.send("Come va?", &mut |_| Ok(())).unwrap();
    assert!(
        t2.completion.stats.prompt_processed < t2.completion.stats.prompt_tokens,
        "turn 2 reuses the cache"
    );
    // Keep talking until the 64-token context cannot hold the conversation.
    let mut dropped = 0;
    for i in 0..10 {
        let t = chat
            .send(&format!("Messaggio numero {i}, abbastanza lungo."), &mut |_| Ok(()))
            .unwrap();
        if t.dropped > 0 {
            dropped = t.dropped;
            break;
        }
    }
    assert!(dropped >= 1, "the oldest exchange was dropped");
    let msgs = chat.messages();
    assert_ne!(msgs[0].content, "Ciao!", "the first exchange is gone");
    assert_eq!(msgs[msgs.len() - 1].role, "assistant");
    assert!(chat.prompt_ids().unwrap().len() <= 64);
}

#[test]
fn a_single_message_too_long_for_the_context_is_refused() {
    let lm = model();
    let mut chat = Chat::new(&lm, 64, Some("Sei utile.".into()), greedy(4), true);
    let err = chat
        .send(&"parola ".repeat(80), &mut |_| Ok(()))
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("too long") && err.contains("64"), "{err}");
    assert_eq!(chat.messages().len(), 1, "the refused message is not kept");
}

#[test]
fn system_regen_undo_clear_and_load() {
    let lm = model();
    let mut chat = Chat::new(&lm, 64, None, greedy(3), true);
    let a = chat.send("Ciao!", &mut |_| Ok(())).unwrap().completion.text;
    let b = chat.regen(&mut |_| Ok(())).unwrap().completion.text;
    assert_eq!(a, b, "greedy regeneration gives the same answer");
    assert_eq!(chat.messages().len(), 2);
    chat.set_system(Some("Sei un pirata.".into()));
    assert_eq!(chat.messages()[0], Message::new("system", "Sei un pirata."));
    assert!(chat.undo());
    assert_eq!(chat.messages().len(), 1, "only the system prompt remains");
    assert!(!chat.undo());
    chat.send("Ciao!", &mut |_| Ok(())).unwrap();
    let saved = serde_json::to_string(&chat.messages()).unwrap();
    chat.clear();
    assert_eq!(chat.messages().len(), 1);
    let loaded: Vec<Message> = serde_json::from_str(&saved).unwrap();
    chat.load(loaded).unwrap();
    assert_eq!(serde_json::to_string(&chat.messages()).unwrap(), saved);
    assert!(chat
        .load(vec![Message::new("user", "a"), Message::new("system", "b")])
        .is_err());
    assert!(chat.load(vec![Message::new("robot", "a")]).is_err());
}
