//! The tokenizer and the streaming detokenizer on the fixture's byte-level BPE vocabulary:
//! arbitrary text encoded (raw and as a chat prompt), arbitrary ids decoded token by token. The
//! streamed pieces must always add up to what decoding all ids at once gives.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use zagreus::tokenizer::{parse_tokenizer_json, Tokenizer, TokenizerConfig};

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let json = include_bytes!("../../tests/fixtures/models/tied-bf16/tokenizer.json");
        let cfg = TokenizerConfig {
            bos_token: Some("<|begin_of_text|>".into()),
            has_bos_key: true,
            ..TokenizerConfig::default()
        };
        Tokenizer::new(parse_tokenizer_json(json).expect("the fixture tokenizer"), &cfg, None).expect("its BOS")
    })
}

/// Streams `ids` and checks the pieces against decoding them all at once.
fn stream_matches_decode(t: &Tokenizer, ids: &[u32]) {
    let Ok(all) = t.decode(ids) else {
        return;
    };
    let mut s = t.stream();
    let mut out = String::new();
    for &id in ids {
        match s.step(id) {
            Ok(Some(piece)) => out.push_str(&piece),
            Ok(None) => {}
            Err(_) => return,
        }
    }
    if let Ok(Some(rest)) = s.finish() {
        out.push_str(&rest);
    }
    assert_eq!(out, all, "ids {ids:?}");
}

fuzz_target!(|data: &[u8]| {
    let t = tokenizer();
    // (Streaming decodes a window per token: keep sequences short for a fast fuzzer.)
    let (head, tail) = data.split_at(data.len().min(32));
    // The head as token ids (some past the vocabulary), streamed.
    let vocab = t.vocab_size() as u32 + 8;
    let ids: Vec<u32> = head
        .chunks(2)
        .map(|c| c.iter().fold(0u32, |a, b| a * 256 + *b as u32) % vocab)
        .collect();
    stream_matches_decode(t, &ids);
    // The tail as text, encoded both ways, and its ids streamed back.
    let text = String::from_utf8_lossy(tail);
    if let Ok(ids) = t.encode_raw(&text, true) {
        stream_matches_decode(t, &ids[..ids.len().min(48)]);
    }
    if let Ok(ids) = t.encode_chat(&text, false) {
        assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
    }
    let _ = t.check_fits(&text, 16, "fuzz");
});
