//! GGUF models: a real one (SmolLM2-135M-Instruct Q4_1, fetched by scripts/fetch-test-assets.sh)
//! against transformers' reading of the same file, GGUFs written from the fixture models against
//! the transformers references, every front end on a GGUF, and malformed files.

mod common;

use std::path::{Path, PathBuf};

use common::cli::{assert_clean_error, run};
use common::gguf_writer::{write_fixture_gguf, Ty};
use common::{asset, fixtures, floats, ids, model_dir, read_json, GREEDY};
use zagreus::loader::{load_gguf, LoadOptions, LoadedModel};
use zagreus::model::LogitsFor;

fn smollm2() -> PathBuf {
    asset("SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn load(path: &Path) -> LoadedModel {
    load_gguf(path, &path.display().to_string(), &LoadOptions::cpu()).unwrap()
}

const QUESTION: &str = "What is the capital of France? Answer in one sentence.";

#[test]
fn smollm2_answers_paris_and_stops_at_im_end() {
    let m = smollm2();
    let out = run(&["-m", m.to_str().unwrap(), "--temperature", "0", QUESTION], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "The capital of France is Paris.\n");
    let out = run(
        &["-m", m.to_str().unwrap(), "--temperature", "0", "--json", QUESTION],
        b"",
    );
    let j: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let r = read_json(&fixtures().join("smollm2_reference.json"));
    assert_eq!(
        ids(&j["prompt_token_ids"]),
        ids(&r["prompt_ids"]),
        "prompt ids equal transformers' (GGUF tokenizer)"
    );
    assert_eq!(
        ids(&j["generated_token_ids"]),
        ids(&r["greedy_ids"]),
        "greedy tokens equal transformers'"
    );
    assert_eq!(j["finish_reason"], "stop_token");
    assert_eq!(j["stop_token_id"], 2, "<|im_end|>");
    assert!(!j["text"].as_str().unwrap().contains("<|im_end|>"));
}

#[test]
fn smollm2_logits_match_transformers_dequantized_reading() {
    // transformers dequantizes the Q4_1 file to f32; zagreus keeps Q4_1 (and the Q8_0 embedding)
    // and computes with exactly those values, so the logits agree closely.
    let r = read_json(&fixtures().join("smollm2_reference.json"));
    let m = load(&smollm2());
    let vocab = m.model.vocab_size();
    assert_eq!(vocab, 49152);
    let mut cache = m.model.new_cache(256);
    let mut logits = Vec::new();
    let mut seq = ids(&r["prompt_ids"]);
    m.model.forward(&seq, &mut cache, LogitsFor::Last, &mut logits).unwrap();
    let greedy = ids(&r["greedy_ids"]);
    let mut worst = 0f32;
    for (i, step) in r["steps"].as_array().unwrap().iter().enumerate() {
        let top = ids(&step["top_ids"]);
        let want = floats(&step["top_logits"]);
        for (id, w) in top.iter().zip(&want) {
            worst = worst.max((logits[*id as usize] - w).abs());
        }
        assert_eq!(zagreus::sampling::argmax(&logits), top[0], "step {i}");
        if i < greedy.len() {
            seq.push(greedy[i]);
            m.model
                .forward(&[greedy[i]], &mut cache, LogitsFor::Last, &mut logits)
                .unwrap();
        }
    }
    eprintln!("SmolLM2 Q4_1: max |Δlogit| over the top-20 of each step: {worst:e}");
    assert!(worst < 2e-2, "max |Δlogit| {worst}");
    // The tokenizer with its own special-token rules (raw text).
    assert_eq!(
        m.tokenizer.encode_raw(r["raw_text"].as_str().unwrap(), true).unwrap(),
        ids(&r["raw_ids"])
    );
}

#[test]
fn every_front_end_runs_a_gguf() {
    let m = smollm2();
    let ms = m.to_str().unwrap();
    // Pipe: stdin first, then the prompt.
    let out = run(
        &[
            "-m",
            ms,
            "--temperature",
            "0",
            "-n",
            "24",
            "Answer in one sentence: what city is it the capital of?",
        ],
        b"Paris is the capital of France.",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("France"), "{}", out.stdout);
    // Bench.
    let out = run(&["bench", "-m", ms, "-p", "16", "-n", "4", "-r", "1", "--json"], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let j: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(j[0]["format"], "q4_1");
    // Chat with piped input answers once.
    let out = run(&["chat", "-m", ms, "--temperature", "0"], QUESTION.as_bytes());
    assert_eq!(out.stdout, "The capital of France is Paris.\n", "{}", out.stderr);
    // Re-quantized at load, still right.
    let out = run(&["-m", ms, "--temperature", "0", "--quantize", "q8_0", QUESTION], b"");
    assert!(out.stdout.contains("Paris"), "{}", out.stdout);
}

fn written(ty: Ty, name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.gguf"));
    write_fixture_gguf(&model_dir(name), &path, ty);
    (dir, path)
}

/// How far a model's logits are from a transformers reference, over every prompt position and
/// every KV-cached greedy step.
struct Distance {
    /// Largest |Δlogit|.
    max: f32,
    /// RMS of the differences over RMS of the reference logits.
    relative_rms: f32,
}

fn distance(m: &LoadedModel, reference: &serde_json::Value) -> Distance {
    let vocab = m.model.vocab_size();
    let prompt = ids(&reference["prompt_ids"]);
    let greedy = ids(&reference["greedy_ids"]);
    let (prompt_rows, step_rows) = (
        reference["prompt_logits"].as_array().unwrap(),
        reference["step_logits"].as_array().unwrap(),
    );
    assert!(!prompt.is_empty() && !greedy.is_empty());
    assert_eq!(prompt_rows.len(), prompt.len(), "a row per prompt position");
    assert_eq!(step_rows.len(), greedy.len(), "a row per greedy step");
    let mut cache = m.model.new_cache(64);
    let mut logits = Vec::new();
    m.model
        .forward(&prompt, &mut cache, LogitsFor::All, &mut logits)
        .unwrap();
    let (mut max, mut err2, mut ref2) = (0f32, 0f64, 0f64);
    let mut acc = |got: &[f32], want: &[f32]| {
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(want) {
            assert!(a.is_finite());
            max = max.max((a - b).abs());
            err2 += ((a - b) as f64).powi(2);
            ref2 += (*b as f64).powi(2);
        }
    };
    for (got, want) in logits.chunks(vocab).zip(prompt_rows) {
        acc(got, &floats(want));
    }
    for (&tok, want) in greedy.iter().zip(step_rows) {
        m.model
            .forward(&[tok], &mut cache, LogitsFor::Last, &mut logits)
            .unwrap();
        acc(&logits, &floats(want));
    }
    Distance {
        max,
        relative_rms: (err2 / ref2).sqrt() as f32,
    }
}

#[test]
fn written_ggufs_match_the_transformers_references() {
    for name in ["tied-bf16", "llama3-rope"] {
        let r = read_json(&model_dir(name).join("reference.json"));
        // F32: the permuted Q/K rows are put back exactly: f32 tolerance.
        let (_d, p) = written(Ty::F32, name);
        let d = distance(&load(&p), &r).max;
        assert!(d <= 1e-3, "{name} F32 GGUF: {d}");
        // F16: the rounding of the weights, as for an f16 safetensors checkpoint.
        let (_d, p) = written(Ty::F16, name);
        let d = distance(&load(&p), &r).max;
        assert!(d <= 0.02, "{name} F16 GGUF: {d}");
        // Q8_0 and Q4_0 from the file, within the tolerances the README states for those
        // formats (the same as quantizing the safetensors checkpoint at load).
        let (_d, p) = written(Ty::Q8_0, name);
        let d = distance(&load(&p), &r);
        assert!(d.max <= 0.3, "{name} Q8_0 GGUF: {}", d.max);
        assert!(
            d.relative_rms <= 0.04,
            "{name} Q8_0 GGUF: relative RMS {}",
            d.relative_rms
        );
        let (_d, p) = written(Ty::Q4_0, name);
        let m4 = load(&p);
        assert!(m4.model.precision().contains("q4_0"), "{}", m4.model.precision());
        let d = distance(&m4, &r);
        assert!(
            d.relative_rms <= 0.45,
            "{name} Q4_0 GGUF: relative RMS {}",
            d.relative_rms
        );
    }
}

#[test]
fn a_written_gguf_keeps_the_tokenizer_and_template() {
    let (_d, p) = written(Ty::F32, "tied-bf16");
    let r = read_json(&model_dir("tied-bf16").join("reference.json"));
    let mut args = vec!["-m", p.to_str().unwrap(), "--json", "-n", "12"];
    args.extend_from_slice(&GREEDY);
    args.extend_from_slice(&["-s", "Sei un assistente utile.", "Ciao! Come stai? 😀"]);
    let out = run(&args, b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let j: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        ids(&j["prompt_token_ids"]),
        ids(&r["prompt_ids"]),
        "template, BOS and tokenizer from the GGUF metadata"
    );
    assert_eq!(ids(&j["generated_token_ids"]), ids(&r["greedy_ids"]));
    // --tokenizer overrides the GGUF's own: with two ordinary tokens' ids exchanged in its
    // vocabulary, the prompt's ids come out with those two exchanged, and nothing else changed.
    let prompt = ids(&j["prompt_token_ids"]);
    let dir = tempfile::tempdir().unwrap();
    let mut tok: serde_json::Value = read_json(&model_dir("tied-bf16").join("tokenizer.json"));
    let special: Vec<u32> = ids(&serde_json::Value::Array(
        tok["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].clone())
            .collect(),
    ));
    let ordinary: Vec<u32> = prompt.iter().copied().filter(|i| !special.contains(i)).collect();
    let a = ordinary[0];
    let b = *ordinary.iter().find(|&&i| i != a).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let name_of = |id: u32, v: &serde_json::Map<String, serde_json::Value>| {
        v.iter().find(|(_, i)| i.as_u64() == Some(id as u64)).unwrap().0.clone()
    };
    let (ta, tb) = (name_of(a, vocab), name_of(b, vocab));
    vocab.insert(ta, b.into());
    vocab.insert(tb, a.into());
    let swapped_path = dir.path().join("tokenizer.json");
    std::fs::write(&swapped_path, tok.to_string()).unwrap();
    let mut args = vec![
        "-m",
        p.to_str().unwrap(),
        "--tokenizer",
        swapped_path.to_str().unwrap(),
        "--json",
        "-n",
        "1",
    ];
    args.extend_from_slice(&GREEDY);
    args.extend_from_slice(&["-s", "Sei un assistente utile.", "Ciao! Come stai? 😀"]);
    let out = run(&args, b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let j: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let want: Vec<u32> = prompt
        .iter()
        .map(|&i| {
            if i == a {
                b
            } else if i == b {
                a
            } else {
                i
            }
        })
        .collect();
    assert_ne!(want, prompt);
    assert_eq!(
        ids(&j["prompt_token_ids"]),
        want,
        "the --tokenizer file encoded the prompt"
    );
}

#[test]
fn malformed_ggufs_fail_cleanly() {
    let (dir, good) = written(Ty::Q8_0, "tied-bf16");
    let bytes = std::fs::read(&good).unwrap();
    let write = |name: &str, data: &[u8]| -> String {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        p.display().to_string()
    };
    let try_file = |p: &str, needles: &[&str]| assert_clean_error(&run(&["-m", p, "Ciao"], b""), needles);
    // Truncated at many points: header, metadata, tensor table, data.
    for cut in [3usize, 10, 30, 200, 5_000, bytes.len() / 2, bytes.len() - 1] {
        try_file(
            &write(&format!("cut{cut}.gguf"), &bytes[..cut]),
            &["not a valid GGUF file"],
        );
    }
    let mut bad = bytes.clone();
    bad[..4].copy_from_slice(b"GGUX");
    try_file(&write("magic.gguf", &bad), &["bad magic"]);
    // Lying counts: a tensor count and a metadata count far beyond what the file can hold.
    let mut bad = bytes.clone();
    bad[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    try_file(&write("tensors.gguf", &bad), &["tensor count"]);
    let mut bad = bytes.clone();
    bad[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    try_file(&write("kv.gguf", &bad), &["metadata count"]);
    // The first key's length made absurd.
    let mut bad = bytes.clone();
    bad[24..32].copy_from_slice(&(1u64 << 50).to_le_bytes());
    try_file(&write("keylen.gguf", &bad), &["more than"]);
    // An unsupported architecture, and an unsupported tensor type, named.
    let arch_at = bytes.windows(5).position(|w| w == b"llama").unwrap();
    let mut bad = bytes.clone();
    bad[arch_at..arch_at + 5].copy_from_slice(b"mamba");
    try_file(&write("arch.gguf", &bad), &["mamba"]);
    let name_at = bytes.windows(17).position(|w| w == b"token_embd.weight").unwrap();
    let ty_at = name_at + 17 + 4 + 16;
    let mut bad = bytes.clone();
    bad[ty_at..ty_at + 4].copy_from_slice(&99u32.to_le_bytes());
    try_file(&write("type.gguf", &bad), &["token_embd.weight", "99"]);
    // A tensor offset pointing past the end of the file.
    let mut bad = bytes.clone();
    bad[ty_at + 4..ty_at + 12].copy_from_slice(&(1u64 << 40).to_le_bytes());
    try_file(&write("offset.gguf", &bad), &["past the end"]);
    // And the untouched file works.
    assert_eq!(run(&["-m", good.to_str().unwrap(), "-n", "2", "Ciao"], b"").code, 0);
}
