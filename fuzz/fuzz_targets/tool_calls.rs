//! Model answers split into content and tool calls: arbitrary text never panics, nothing is lost
//! (the content and the calls account for the answer), and the answer streamed in arbitrary
//! pieces gives what the whole answer gives.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zagreus::tools::{parse_answer, CallSplitter, Piece};

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let whole = parse_answer(text, "fuzz");
    for c in &whole.calls {
        assert!(c.arguments.is_object() && c.id.starts_with("call_"));
        assert!(text.contains(c.name.as_str()) || text.contains('\\'));
    }
    if whole.calls.is_empty() {
        assert_eq!(whole.content, text.trim());
    }
    let mut s = CallSplitter::new("fuzz");
    let mut pieces = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    for chunk in chars.chunks(usize::from(step % 16) + 1) {
        pieces.extend(s.push(&chunk.iter().collect::<String>()));
    }
    pieces.extend(s.finish());
    let mut content = String::new();
    let mut calls = Vec::new();
    for p in pieces {
        match p {
            Piece::Content(c) => content.push_str(&c),
            Piece::Call(c) => calls.push(c),
        }
    }
    assert_eq!(calls, whole.calls);
    assert_eq!(content, whole.content);
});
