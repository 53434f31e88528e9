//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod cli;
pub mod gguf_writer;
pub mod hub_cli;
pub mod mock_hub;
pub mod server;

use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Sampling flags that make generation deterministic: greedy, no repetition penalty.
pub const GREEDY: [&str; 4] = ["--temperature", "0", "--repeat-penalty", "1"];

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("float") as f32)
        .collect()
}

/// A downloaded test asset (see scripts/fetch-test-assets.sh); the test fails with instructions
/// when it is missing.
pub fn asset(rel: &str) -> PathBuf {
    let dir = std::env::var_os("ZAGREUS_TEST_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-assets"));
    let p = dir.join(rel);
    assert!(
        p.exists(),
        "test asset {} is missing: run scripts/fetch-test-assets.sh first (the README's test command does)",
        p.display()
    );
    p
}
