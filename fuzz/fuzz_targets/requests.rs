//! Request lines as `zagreus batch` reads them (OpenAI batch lines and bare bodies) and the
//! request bodies the server will read: arbitrary text never panics, every line gets an id, and
//! the ids of the lines that can run are unique.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use zagreus::openai::{Endpoint, Job};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = zagreus::batch::parse_lines(text);
    assert_eq!(lines.len(), text.lines().filter(|l| !l.trim().is_empty()).count());
    let mut ids = HashSet::new();
    for line in &lines {
        assert!(!line.custom_id.is_empty());
        if line.job.is_ok() {
            assert!(ids.insert(line.custom_id.clone()), "{} twice", line.custom_id);
        }
    }
    if let Ok(body) = serde_json::from_str::<serde_json::Value>(text) {
        for endpoint in [Endpoint::Chat, Endpoint::Completions] {
            let _ = Job::from_body(endpoint, &body);
        }
    }
    let _ = Endpoint::from_url(text);
});
