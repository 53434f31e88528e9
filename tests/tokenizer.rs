//! Tokenizer behaviour: ids as transformers produces them, BOS exactly once, and UTF-8-safe
//! streaming. Uses the fixture tokenizer and Meta's real Llama-3.2 tokenizer (fetched by
//! scripts/fetch-test-assets.sh).

mod common;

use common::{asset, fixtures, ids, model_dir, read_json};
use zagreus::tokenizer::{Tokenizer, TokenizerConfig};

fn tokenizer(path: &std::path::Path, bos: &str) -> Tokenizer {
    let cfg = TokenizerConfig {
        bos_token: Some(bos.to_string()),
        has_bos_key: true,
        ..Default::default()
    };
    Tokenizer::from_file(path, &cfg, None).unwrap()
}

fn stream_all(t: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut s = t.stream();
    let mut pieces: Vec<String> = ids.iter().filter_map(|&id| s.step(id).unwrap()).collect();
    pieces.extend(s.finish().unwrap());
    pieces
}

#[test]
fn fixture_tokenizer_matches_transformers_cases() {
    let cases = read_json(&fixtures().join("tokenizer_cases.json"));
    let t = tokenizer(&model_dir("tied-bf16").join("tokenizer.json"), "<|begin_of_text|>");
    // The fixture's BOS, as its config.json states it (scripts/make_fixtures.py).
    let bos = read_json(&model_dir("tied-bf16").join("config.json"))["bos_token_id"]
        .as_u64()
        .unwrap() as u32;
    assert_eq!(t.token_to_id("<|begin_of_text|>"), Some(bos));
    for case in cases["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let plain = ids(&case["ids_no_special"]);
        let mut want = ids(&case["ids_with_special"]);
        // transformers adds a second BOS to a text that spells one out; zagreus never doubles it.
        if want.starts_with(&[bos, bos]) {
            want.remove(0);
        }
        assert_eq!(t.encode_raw(text, true).unwrap(), want, "{text:?}");
        // --no-bos drops the BOS the tokenizer adds, never one the text spells out.
        assert_eq!(t.encode_raw(text, false).unwrap(), plain, "{text:?}");
        assert_eq!(
            t.decode(&plain).unwrap(),
            case["decoded_no_special_skip"].as_str().unwrap(),
            "{text:?}"
        );
        // Streaming gives the same text as decoding all at once.
        assert_eq!(stream_all(&t, &plain).concat(), t.decode(&plain).unwrap(), "{text:?}");
    }
}

fn llama_text() -> Tokenizer {
    tokenizer(&asset("llama32-text/tokenizer.json"), "<|begin_of_text|>")
}

fn open_zagreus() -> Tokenizer {
    tokenizer(&asset("open-zagreus-tokenizer/tokenizer.json"), "<|begin_of_text|>")
}

/// The ids of the Open-Zagreus-like tokenizer's special tokens: Llama 3's BOS, and the two
/// tokens scripts/fetch-test-assets.sh adds after Llama 3's 128256 (as the SFT models do).
const BOS: u32 = 128000;
const IM_END: u32 = 128256;
const IM_START: u32 = 128257;

#[test]
fn real_llama32_tokenizer_gives_the_reference_ids() {
    let t = llama_text();
    // transformers' ids for this text with Meta's tokenizer (recorded in ../shared/TESTING.md §3:
    // `AutoTokenizer(...)("Ciao! Come posso imparare l'italiano?").input_ids`).
    assert_eq!(
        t.encode_raw("Ciao! Come posso imparare l'italiano?", true).unwrap(),
        [128000, 34, 23332, 0, 15936, 1153, 708, 737, 1768, 548, 326, 6, 2223, 13389, 30]
    );
    assert_eq!(t.bos(), Some((128000, "<|begin_of_text|>")));
    assert_eq!(t.vocab_size(), 128256);
}

#[test]
fn chat_prompts_get_exactly_one_bos() {
    let t = open_zagreus();
    assert_eq!(t.vocab_size(), 128258);
    assert_eq!(t.token_to_id("<|im_start|>"), Some(IM_START));
    assert_eq!(t.token_to_id("<|im_end|>"), Some(IM_END));
    let rendered = "<|im_start|>user\nCiao<|im_end|>\n<|im_start|>assistant\n";
    let ids = t.encode_chat(rendered, true).unwrap();
    assert_eq!(ids[..2], [BOS, IM_START], "BOS, then <|im_start|> as one token");
    assert_eq!(ids.iter().filter(|&&i| i == BOS).count(), 1);
    assert!(ids.contains(&IM_END));
    // A template that already starts with BOS (Llama-3 style) does not get a second one.
    let with_bos = format!("<|begin_of_text|>{rendered}");
    let ids2 = t.encode_chat(&with_bos, true).unwrap();
    assert_eq!(ids2.iter().filter(|&&i| i == BOS).count(), 1);
    assert_eq!(ids2, ids);
    // --no-bos
    assert_eq!(t.encode_chat(rendered, false).unwrap()[0], IM_START);
}

#[test]
fn a_model_whose_bos_starts_the_template_gets_none_added() {
    // SmolLM2's BOS is <|im_start|>: a ChatML prompt already begins with it.
    let t = tokenizer(&asset("open-zagreus-tokenizer/tokenizer.json"), "<|im_start|>");
    let ids = t.encode_chat("<|im_start|>user\nCiao<|im_end|>\n", true).unwrap();
    assert_eq!(ids[0], IM_START);
    assert_eq!(ids.iter().filter(|&&i| i == IM_START).count(), 1);
}

#[test]
fn streaming_is_utf8_safe_and_does_not_hold_back_punctuation() {
    let t = llama_text();
    let text = "Perché no? Un caffè 🇮🇹😀, grazie! Così è.";
    let ids = t.encode_raw(text, false).unwrap();
    let mut s = t.stream();
    let mut out = String::new();
    let mut held = 0;
    for (i, &id) in ids.iter().enumerate() {
        match s.step(id).unwrap() {
            Some(piece) => {
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "piece {i} {piece:?} has a replacement character"
                );
                out.push_str(&piece);
                held = 0;
            }
            None => held += 1,
        }
        // Whatever decodes completely so far has been emitted: nothing valid is held back.
        let so_far = t.decode(&ids[..=i]).unwrap();
        if !so_far.ends_with('\u{FFFD}') {
            assert_eq!(out, so_far, "after token {i}");
        }
    }
    assert_eq!(held, 0);
    assert_eq!(s.finish().unwrap(), None);
    assert_eq!(out, text);
    // The flag emoji spans several byte tokens: at least one step must have been held.
    let flag = t.encode_raw("🇮🇹", false).unwrap();
    assert!(flag.len() > 1);
    let mut s = t.stream();
    assert_eq!(s.step(flag[0]).unwrap(), None);
}

#[test]
fn special_tokens_are_never_printed() {
    let t = open_zagreus();
    let ids = t.encode_chat("<|im_start|>assistant\nSì<|im_end|>", false).unwrap();
    assert_eq!(stream_all(&t, &ids).concat(), "assistant\nSì");
    assert_eq!(t.token_text(IM_END), "<|im_end|>");
}
