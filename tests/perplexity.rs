//! `zagreus perplexity` against transformers' perplexity of the same text with the same windows
//! (tests/fixtures/perplexity/reference.json, made by scripts/make_perplexity_reference.py), the
//! comparison with a saved base, and bad input.

mod common;

use common::cli::{assert_clean_error, assert_failed, run};
use common::{asset, fixtures, model_dir, read_json};
use serde_json::Value;

fn sample() -> String {
    fixtures().join("perplexity/sample.txt").to_str().unwrap().to_string()
}

/// The JSON record of a successful run.
fn record(args: &[&str]) -> Value {
    let mut all = vec!["perplexity", "--json"];
    all.extend_from_slice(args);
    let out = run(&all, b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

#[test]
fn perplexity_matches_transformers_on_the_same_windows() {
    let reference = read_json(&fixtures().join("perplexity/reference.json"));
    for m in reference["models"].as_array().unwrap() {
        let name = m["model"].as_str().unwrap();
        let model = if name == "smollm2" {
            asset("SmolLM2-135M-Instruct.Q4_1.gguf")
        } else {
            model_dir(name)
        };
        for r in m["runs"].as_array().unwrap() {
            let ctx = r["ctx"].to_string();
            let text = sample();
            let mut args = vec!["-m", model.to_str().unwrap(), "-f", &text, "--ctx-size", &ctx];
            let stride = r["stride"].to_string();
            if r["method"] == "sliding" {
                args.extend(["--stride", &stride]);
            }
            let got = record(&args);
            assert_eq!(got["tokens"], m["tokens"], "{name}: the text tokenizes differently");
            assert_eq!(got["scored"], r["scored"], "{name} {args:?}");
            assert_eq!(got["method"]["name"], r["method"]);
            let (ours, theirs) = (got["ppl"].as_f64().unwrap(), r["ppl"].as_f64().unwrap());
            let rel = (ours - theirs).abs() / theirs;
            assert!(
                rel < 1e-3,
                "{name} {}: zagreus {ours}, transformers {theirs}",
                r["method"]
            );
            assert!(got["ppl_stderr"].as_f64().unwrap() > 0.0);
        }
    }
}

#[test]
fn kl_against_a_base_is_zero_for_itself_and_grows_with_quantization() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.json");
    let model = model_dir("untied-f32-sharded");
    let m = model.to_str().unwrap();
    let text = sample();
    let common = ["-m", m, "-f", &text, "--ctx-size", "64"];
    let mut args = common.to_vec();
    args.extend(["--save-logits", base.to_str().unwrap()]);
    let full = record(&args);
    assert!(base.exists() && !dir.path().join("base.partial").exists());
    let kl = |extra: &[&str]| {
        let mut args = common.to_vec();
        args.extend(["--kl-base", base.to_str().unwrap()]);
        args.extend_from_slice(extra);
        record(&args)
    };
    let same = kl(&["--parallel", "1"]);
    assert_eq!(same["ppl"], full["ppl"]);
    assert!(
        same["kl"]["kl_divergence"]["mean"].as_f64().unwrap().abs() < 1e-9,
        "{same}"
    );
    assert_eq!(same["kl"]["top1_agreement"]["mean"], 1.0);
    let q8 = kl(&["--quantize", "q8_0"]);
    let q4 = kl(&["--quantize", "q4_0"]);
    let (k8, k4) = (
        q8["kl"]["kl_divergence"]["mean"].as_f64().unwrap(),
        q4["kl"]["kl_divergence"]["mean"].as_f64().unwrap(),
    );
    assert!(0.0 < k8 && k8 < k4, "KL q8_0 {k8}, q4_0 {k4}");
    let (a8, a4) = (
        q8["kl"]["top1_agreement"]["mean"].as_f64().unwrap(),
        q4["kl"]["top1_agreement"]["mean"].as_f64().unwrap(),
    );
    assert!(a8 >= a4 && a8 < 1.0 + 1e-12, "top-1 q8_0 {a8}, q4_0 {a4}");
    // The base's perplexity comes back, and the difference is this run's minus it.
    let b = q4["kl"]["base_ppl"].as_f64().unwrap();
    assert!((b - full["ppl"].as_f64().unwrap()).abs() / b < 1e-9);
    let d = q4["kl"]["delta_ppl"].as_f64().unwrap();
    assert!((q4["ppl"].as_f64().unwrap() - b - d).abs() < 1e-6);
    // Text output names the method and the figures.
    let out = run(
        &[
            "perplexity",
            "-m",
            m,
            "-f",
            &sample(),
            "--ctx-size",
            "64",
            "--stride",
            "32",
        ],
        b"",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.starts_with("PPL = ") && out.stdout.contains("sliding window"),
        "{}",
        out.stdout
    );
}

#[test]
fn bad_input_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = model_dir("tied-bf16");
    let m = m.to_str().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_string()
    };
    let empty = write("empty.txt", b"  \n");
    assert_clean_error(
        &run(&["perplexity", "-m", m, "-f", &empty], b""),
        &["empty.txt", "empty"],
    );
    let bad = write("bad.txt", b"ciao \xff\xfe mondo");
    assert_clean_error(
        &run(&["perplexity", "-m", m, "-f", &bad], b""),
        &["bad.txt", "UTF-8", "offset 5"],
    );
    let short = write("short.txt", b"Ciao a tutti.");
    let out = run(&["perplexity", "-m", m, "-f", &short, "--ctx-size", "64"], b"");
    assert_failed(&out, &["shorter than one window of 64 tokens"]);
    let out = run(
        &[
            "perplexity",
            "-m",
            m,
            "-f",
            &sample(),
            "--ctx-size",
            "64",
            "--stride",
            "65",
        ],
        b"",
    );
    assert_failed(&out, &["stride 65"]);
    let missing = dir.path().join("nope.txt");
    assert_clean_error(
        &run(&["perplexity", "-m", m, "-f", missing.to_str().unwrap()], b""),
        &["nope.txt"],
    );
    // A base from another model and tokenizer.
    let base = dir.path().join("smol.json");
    let out = run(
        &[
            "perplexity",
            "-m",
            asset("SmolLM2-135M-Instruct.Q4_1.gguf").to_str().unwrap(),
            "-f",
            &sample(),
            "--ctx-size",
            "256",
            "--save-logits",
            base.to_str().unwrap(),
        ],
        b"",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = run(
        &[
            "perplexity",
            "-m",
            m,
            "-f",
            &sample(),
            "--ctx-size",
            "64",
            "--kl-base",
            base.to_str().unwrap(),
        ],
        b"",
    );
    assert_failed(&out, &["another text or tokenizer"]);
    let not_base = write("not-base.json", b"{\"x\": 1}");
    assert_clean_error(
        &run(&["perplexity", "-m", m, "-f", &sample(), "--kl-base", &not_base], b""),
        &["not-base.json", "not a base"],
    );
}
