//! The `zagreus` binary as a user runs it: one-shot, pipe, JSON, raw, stop conditions, seeds,
//! and every kind of bad input (one clear line on stderr, non-zero exit, no panic).

mod common;

use std::io::Read;
use std::path::Path;
use std::process::Stdio;

use common::cli::{assert_clean_error, run, zagreus, Out};
use common::{ids, model_dir, read_json, GREEDY};

const SYSTEM: &str = "Sei un assistente utile.";
const USER: &str = "Ciao! Come stai? 😀";

fn greedy_args<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["-m", model];
    v.extend_from_slice(&GREEDY);
    v.extend_from_slice(&["-n", "12"]);
    v.extend_from_slice(extra);
    v
}

fn json(out: &Out) -> serde_json::Value {
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert_eq!(
        out.stdout.lines().count(),
        1,
        "--json prints exactly one line: {}",
        out.stdout
    );
    serde_json::from_str(&out.stdout).unwrap()
}

fn tied() -> String {
    model_dir("tied-bf16").display().to_string()
}

fn reference(name: &str) -> serde_json::Value {
    read_json(&model_dir(name).join("reference.json"))
}

fn copy_model(name: &str, to: &Path) {
    common::cli::copy_model(&model_dir(name), to);
}

#[test]
fn one_shot_answer_is_transformers_greedy_and_only_the_answer_is_on_stdout() {
    let m = tied();
    let r = reference("tied-bf16");
    let j = json(&run(&greedy_args(&m, &["--json", "-s", SYSTEM, USER]), b""));
    assert_eq!(
        ids(&j["prompt_token_ids"]),
        ids(&r["prompt_ids"]),
        "template + BOS + tokenizer"
    );
    assert_eq!(ids(&j["generated_token_ids"]), ids(&r["greedy_ids"]));
    let text = j["text"].as_str().unwrap();

    let out = run(&greedy_args(&m, &["-s", SYSTEM, USER]), b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, format!("{text}\n"), "stdout is the answer and a newline");
    assert!(
        out.stderr.is_empty(),
        "nothing on stderr without --verbose: {}",
        out.stderr
    );
}

#[test]
fn json_record_has_the_documented_fields() {
    let out = run(
        &[
            "-m",
            &tied(),
            "--json",
            "--seed",
            "7",
            "-n",
            "5",
            "--logprobs",
            "3",
            "Ciao",
        ],
        b"",
    );
    let j = json(&out);
    for key in [
        "model",
        "text",
        "finish_reason",
        "prompt_token_ids",
        "generated_token_ids",
        "seed",
        "settings",
        "usage",
        "timings",
        "logprobs",
    ] {
        assert!(j.get(key).is_some(), "missing {key}: {j}");
    }
    assert_eq!(j["seed"], 7);
    assert_eq!(j["settings"]["seed"], 7);
    assert_eq!(j["settings"]["temperature"], 0.7);
    assert_eq!(j["settings"]["max_tokens"], 5);
    assert_eq!(j["finish_reason"], "length");
    assert_eq!(j["usage"]["completion_tokens"], 5);
    for key in [
        "load_ms",
        "prompt_ms",
        "prompt_tokens_per_s",
        "time_to_first_token_ms",
        "decode_ms",
        "decode_tokens_per_s",
    ] {
        assert!(j["timings"][key].is_number(), "timings.{key}: {j}");
    }
    let lp = j["logprobs"].as_array().unwrap();
    assert_eq!(lp.len(), 5);
    let gen = ids(&j["generated_token_ids"]);
    for (entry, id) in lp.iter().zip(gen) {
        assert_eq!(entry["id"], id);
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let (best, third) = (top[0]["logprob"].as_f64().unwrap(), top[2]["logprob"].as_f64().unwrap());
        assert!(best >= third, "alternatives are sorted: {best} < {third}");
    }
    // Greedy picks the most likely token, which is then first among the alternatives.
    let j = json(&run(&greedy_args(&tied(), &["--json", "--logprobs", "2", "Ciao"]), b""));
    for entry in j["logprobs"].as_array().unwrap() {
        let id = entry["id"].as_u64().expect("every entry has its token id");
        assert_eq!(entry["top_logprobs"][0]["id"].as_u64(), Some(id));
    }
}

#[test]
fn stdin_comes_before_the_prompt_argument() {
    let out = run(
        &greedy_args(&tied(), &["--verbose-prompt", "-n", "1", "Riassumi il testo."]),
        "Un articolo è qui.\n".as_bytes(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("<|im_start|>user\nUn articolo è qui.\n\nRiassumi il testo.<|im_end|>"),
        "{}",
        out.stderr
    );
    // stdin alone is the whole prompt
    let out = run(&greedy_args(&tied(), &["--verbose-prompt", "-n", "1"]), b"Solo stdin");
    assert!(
        out.stderr.contains("<|im_start|>user\nSolo stdin<|im_end|>"),
        "{}",
        out.stderr
    );
    // The same request through the pipe or as an argument gives the same answer.
    let a = run(&greedy_args(&tied(), &["--json", "Ciao"]), b"");
    let b = run(&greedy_args(&tied(), &["--json"]), b"Ciao");
    assert_eq!(json(&a)["generated_token_ids"], json(&b)["generated_token_ids"]);
}

#[test]
fn raw_mode_sends_the_prompt_as_is() {
    let m = model_dir("llama3-rope").display().to_string();
    let r = reference("llama3-rope");
    let j = json(&run(
        &greedy_args(&m, &["--raw", "--json", "La capitale d'Italia è"]),
        b"",
    ));
    assert_eq!(ids(&j["prompt_token_ids"]), ids(&r["prompt_ids"]));
    assert_eq!(ids(&j["generated_token_ids"]), ids(&r["greedy_ids"]));
    let j = json(&run(
        &greedy_args(&m, &["--raw", "--no-bos", "--json", "La capitale d'Italia è"]),
        b"",
    ));
    assert_eq!(ids(&j["prompt_token_ids"]), ids(&r["prompt_ids"])[1..]);
}

#[test]
fn stop_strings_end_the_answer_and_are_not_printed() {
    let m = tied();
    let full = json(&run(&greedy_args(&m, &["--json", USER]), b""));
    let text = full["text"].as_str().unwrap().to_string();
    // Pick a stop string from the middle of the greedy answer.
    let chars: Vec<char> = text.chars().collect();
    let mid = chars.len() / 2;
    let stop: String = chars[mid..mid + 2].iter().collect();
    let prefix: String = chars[..text
        .chars()
        .collect::<String>()
        .find(&stop)
        .map(|b| text[..b].chars().count())
        .unwrap()]
        .iter()
        .collect();
    let j = json(&run(&greedy_args(&m, &["--json", "--stop", &stop, USER]), b""));
    assert_eq!(j["finish_reason"], "stop_string");
    assert_eq!(j["text"].as_str().unwrap(), prefix);
    let out = run(&greedy_args(&m, &["--stop", &stop, USER]), b"");
    assert!(!out.stdout.contains(&stop));
    assert!(out.stdout.starts_with(&prefix));
}

#[test]
fn end_of_generation_tokens_stop_and_ignore_eos_continues() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    copy_model("tied-bf16", &m);
    let greedy = ids(&reference("tied-bf16")["greedy_ids"]);
    // Make the 5th greedy token an end-of-generation token via generation_config.json.
    let stop = greedy[4];
    std::fs::write(
        m.join("generation_config.json"),
        format!(r#"{{"eos_token_id": [{stop}]}}"#),
    )
    .unwrap();
    let ms = m.display().to_string();
    let j = json(&run(&greedy_args(&ms, &["--json", "-s", SYSTEM, USER]), b""));
    assert_eq!(j["finish_reason"], "stop_token");
    assert_eq!(j["stop_token_id"], stop);
    assert_eq!(ids(&j["generated_token_ids"]), greedy[..4]);
    let j = json(&run(
        &greedy_args(&ms, &["--json", "--ignore-eos", "-s", SYSTEM, USER]),
        b"",
    ));
    assert_eq!(ids(&j["generated_token_ids"]), greedy);
}

#[test]
fn the_same_seed_gives_the_same_answer() {
    let m = tied();
    let sample = |seed: &str| {
        let j = json(&run(
            &[
                "-m",
                &m,
                "--json",
                "--temperature",
                "1.5",
                "--top-k",
                "0",
                "--top-p",
                "1",
                "--min-p",
                "0",
                "-n",
                "12",
                "--seed",
                seed,
                "Ciao",
            ],
            b"",
        ));
        ids(&j["generated_token_ids"])
    };
    assert_eq!(sample("42"), sample("42"));
    assert_ne!(sample("42"), sample("43"));
    // Without --seed a random one is used and reported.
    let a = json(&run(&["-m", &m, "--json", "-n", "1", "Ciao"], b""));
    let b = json(&run(&["-m", &m, "--json", "-n", "1", "Ciao"], b""));
    assert_ne!(a["seed"], b["seed"]);
}

#[test]
fn verbose_reports_statistics_on_stderr_only() {
    let out = run(&greedy_args(&tied(), &["--verbose", "--seed", "3", "Ciao"]), b"");
    assert_eq!(out.code, 0);
    for needle in [
        "loaded",
        "prompt:",
        "generated:",
        "t/s",
        "time to first token",
        "seed: 3",
    ] {
        assert!(out.stderr.contains(needle), "{needle}: {}", out.stderr);
    }
    assert!(!out.stdout.contains("t/s"));
}

#[test]
fn a_closed_stdout_ends_the_program_quietly() {
    let mut child = zagreus()
        .args(greedy_args(&tied(), &["Ciao"]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away before the first byte
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit {status:?}, stderr {err}");
    assert!(err.is_empty(), "{err}");
}

#[test]
fn missing_and_corrupt_model_files_are_named() {
    let out = run(&["-m", "/no/such/model", "Ciao"], b"");
    assert_clean_error(&out, &["/no/such/model"]);
    let out = run(&["-m", "not a valid id", "Ciao"], b"");
    assert_clean_error(&out, &["owner/name"]);

    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    type Breaker = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Breaker, Vec<&str>)> = vec![
        (
            "noconfig",
            Box::new(|m: &Path| std::fs::remove_file(m.join("config.json")).unwrap()),
            vec!["config.json"],
        ),
        (
            "badconfig",
            Box::new(|m: &Path| std::fs::write(m.join("config.json"), "{ not json").unwrap()),
            vec!["config.json"],
        ),
        (
            "notok",
            Box::new(|m: &Path| std::fs::remove_file(m.join("tokenizer.json")).unwrap()),
            vec!["tokenizer.json"],
        ),
        (
            "badtok",
            Box::new(|m: &Path| std::fs::write(m.join("tokenizer.json"), "[]").unwrap()),
            vec!["tokenizer.json"],
        ),
        (
            "noweights",
            Box::new(|m: &Path| std::fs::remove_file(m.join("model.safetensors")).unwrap()),
            vec!["model.safetensors"],
        ),
        (
            "truncated",
            Box::new(|m: &Path| {
                let p = m.join("model.safetensors");
                let data = std::fs::read(&p).unwrap();
                std::fs::write(&p, &data[..data.len() / 2]).unwrap();
            }),
            vec!["model.safetensors"],
        ),
        (
            "garbage",
            Box::new(|m: &Path| {
                std::fs::write(
                    m.join("model.safetensors"),
                    b"version https://git-lfs.github.com/spec/v1\n",
                )
                .unwrap()
            }),
            vec!["model.safetensors"],
        ),
        (
            "shape",
            Box::new(|m: &Path| {
                let c = std::fs::read_to_string(m.join("config.json")).unwrap();
                std::fs::write(
                    m.join("config.json"),
                    c.replace("\"intermediate_size\": 160", "\"intermediate_size\": 128"),
                )
                .unwrap();
            }),
            vec!["shape", "gate_proj"],
        ),
        (
            "template",
            Box::new(|m: &Path| {
                let c = std::fs::read_to_string(m.join("tokenizer_config.json")).unwrap();
                let mut j: serde_json::Value = serde_json::from_str(&c).unwrap();
                j["chat_template"] = "{% for m in messages %}{{ m.content".into();
                std::fs::write(m.join("tokenizer_config.json"), j.to_string()).unwrap();
            }),
            vec!["chat template", "tokenizer_config.json"],
        ),
    ];
    for (name, breakit, needles) in cases {
        let m = base.join(name);
        copy_model("tied-bf16", &m);
        breakit(&m);
        let out = run(&["-m", m.to_str().unwrap(), "Ciao"], b"");
        assert_clean_error(&out, &needles);
    }
    // A missing shard of a sharded checkpoint is named.
    let m = base.join("shard");
    copy_model("untied-f32-sharded", &m);
    std::fs::remove_file(m.join("model-00002-of-00002.safetensors")).unwrap();
    assert_clean_error(
        &run(&["-m", m.to_str().unwrap(), "Ciao"], b""),
        &["model-00002-of-00002.safetensors"],
    );
}

#[test]
fn bad_flags_and_values_are_named() {
    let m = tied();
    for (args, needle) in [
        // The library names the setting and the value (a JSON request gets the same words).
        (vec!["--temperature", "-1"], "temperature -1"),
        (vec!["--top-p", "2"], "top_p 2"),
        (vec!["--min-p", "1.5"], "min_p 1.5"),
        (vec!["--repeat-penalty", "0"], "repeat_penalty 0"),
        (vec!["--stop", ""], "stop: an empty string"),
        (vec!["--raw", "-s", "x"], "--system"),
    ] {
        let mut a = vec!["-m", m.as_str()];
        a.extend(args);
        a.push("Ciao");
        assert_clean_error(&run(&a, b""), &[needle]);
    }
    // Flags clap rejects: usage errors, exit code 2, naming the flag.
    for (args, needle) in [
        (vec!["--device", "tpu"], "--device"),
        (vec!["--dtype", "f8"], "--dtype"),
        (vec!["--bogus"], "--bogus"),
        (vec!["-n", "many"], "--max-tokens"),
        (vec!["--threads", "0"], "--threads"),
        (vec!["--ctx-size", "0"], "--ctx-size"),
    ] {
        let mut a = vec!["-m", m.as_str()];
        a.extend(args);
        a.push("Ciao");
        let out = run(&a, b"");
        assert_eq!(out.code, 2, "{}", out.stderr);
        assert!(out.stderr.contains(needle), "{}", out.stderr);
        assert!(out.stdout.is_empty());
    }
    let out = run(&["-m", &m, "--logprobs", "2", "Ciao"], b"");
    assert_eq!(out.code, 2, "--logprobs needs --json: {}", out.stderr);
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_in_a_cpu_build_is_a_clear_error() {
    assert_clean_error(
        &run(&["-m", &tied(), "--device", "cuda", "Ciao"], b""),
        &["--features cuda"],
    );
}

#[test]
fn prompts_longer_than_the_context_are_refused() {
    let long = "parola ".repeat(100);
    assert_clean_error(&run(&["-m", &tied(), &long], b""), &["context", "64"]);
    assert_clean_error(
        &run(&["-m", &tied(), "--ctx-size", "10", "Ciao, come stai oggi?"], b""),
        &["--ctx-size"],
    );
    // A prompt that fits but leaves little room: the answer stops at the context and says so.
    let out = run(
        &[
            "-m",
            &tied(),
            "--ignore-eos",
            "--temperature",
            "0",
            "-n",
            "1000",
            "Ciao",
        ],
        b"",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("context"), "{}", out.stderr);
}

#[test]
fn invalid_input_text_is_refused() {
    assert_clean_error(&run(&["-m", &tied()], b"ok \xff\xfe"), &["stdin", "UTF-8"]);
    assert_clean_error(&run(&["-m", &tied()], b""), &["no prompt"]);
}

#[test]
fn bench_reports_prompt_and_generation_speed() {
    let out = run(
        &[
            "bench",
            "-m",
            &tied(),
            "-p",
            "8",
            "-n",
            "4",
            "-d",
            "0,16",
            "-r",
            "2",
            "--json",
        ],
        b"",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let j: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let tests: Vec<&str> = j
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["test"].as_str().unwrap())
        .collect();
    assert_eq!(tests, ["pp8", "tg4", "tg4@d16"]);
    for m in j.as_array().unwrap() {
        assert!(m["tokens_per_s"].as_f64().unwrap() > 0.0);
        assert_eq!(m["samples"].as_array().unwrap().len(), 2);
        assert_eq!(m["format"], "bf16");
        assert_eq!(
            m["weight_gb_per_s"].is_number(),
            m["test"].as_str().unwrap().starts_with("tg")
        );
    }
    // The table, and random weights of a named shape (no download).
    let out = run(
        &[
            "bench",
            "--random",
            "smollm2-135m",
            "--quantize",
            "q8_0",
            "-p",
            "4",
            "-n",
            "2",
            "-r",
            "1",
        ],
        b"",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("| smollm2-135m (random) | q8_0 | cpu |"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("| pp4 |") && out.stdout.contains("| tg2 |"),
        "{}",
        out.stdout
    );
    assert_clean_error(&run(&["bench", "--random", "gpt-5"], b""), &["gpt-5", "zagreus-0.4b"]);
    let out = run(&["bench", "-m", &tied(), "-r", "0"], b"");
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("--repetitions"), "{}", out.stderr);
}

#[test]
fn bench_batch_measures_many_sequences_decoding_together() {
    let out = run(
        &[
            "bench",
            "-m",
            &tied(),
            "-p",
            "8",
            "-n",
            "4",
            "-r",
            "2",
            "--batch",
            "1,3",
            "--json",
        ],
        b"",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let j: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let rows = j.as_array().unwrap();
    let batches: Vec<u64> = rows.iter().map(|m| m["batch"].as_u64().unwrap()).collect();
    assert_eq!(batches, [1, 3]);
    for m in rows {
        let (agg, per) = (
            m["decode_tokens_per_s"].as_f64().unwrap(),
            m["decode_per_sequence"].as_f64().unwrap(),
        );
        assert!(agg > 0.0 && m["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!((agg / m["batch"].as_f64().unwrap() - per).abs() < 1e-6 * agg);
        assert_eq!(m["samples"].as_array().unwrap().len(), 2);
        assert_eq!(m["device"], "cpu");
    }
    let out = run(
        &["bench", "-m", &tied(), "-p", "4", "-n", "2", "-r", "1", "--batch", "2"],
        b"",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("| batch |") && out.stdout.contains("| cpu |") && out.stdout.contains("| 4 | 2 | 2 |"),
        "{}",
        out.stdout
    );
}

#[test]
fn check_logits_compares_with_a_transformers_reference() {
    let m = tied();
    let reference = model_dir("tied-bf16").join("reference.json");
    let r = reference.to_str().unwrap();
    let out = run(&["check-logits", "-m", &m, "--reference", r], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("greedy tokens 12/12 agree"), "{}", out.stdout);
    // Q8_0 weights are further from the f32 reference than 1e-3: the check fails, clearly.
    let out = run(&["check-logits", "-m", &m, "--reference", r, "--quantize", "q8_0"], b"");
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("more than 0.001"), "{}", out.stderr);
    assert_clean_error(
        &run(&["check-logits", "-m", &m, "--reference", "/no/such.json"], b""),
        &["/no/such.json"],
    );
}

#[cfg(feature = "cuda")]
#[test]
fn a_cuda_build_without_a_usable_gpu_says_so_and_auto_uses_the_cpu() {
    assert_clean_error(
        &run(&["-m", &tied(), "--device", "cuda", "Ciao"], b""),
        &["device cuda:0", "GPU"],
    );
    let out = run(&["-m", &tied(), "--device", "auto", "-n", "2", "--json", "Ciao"], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
}

#[test]
fn completions_and_the_man_page_come_from_the_flags() {
    for (shell, needle) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef zagreus"),
        ("fish", "complete -c zagreus"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let out = run(&["completions", shell], b"");
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert!(
            out.stdout.contains(needle),
            "{shell}: {}",
            &out.stdout[..out.stdout.len().min(300)]
        );
        // Subcommands and their flags are completed.
        assert!(
            out.stdout.contains("perplexity") && out.stdout.contains("--kl-base"),
            "{shell}"
        );
    }
    let bad = run(&["completions", "tcsh"], b"");
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr.contains("'tcsh'") && bad.stderr.contains("possible values"),
        "{}",
        bad.stderr
    );
    let man = run(&["man"], b"");
    assert_eq!(man.code, 0, "{}", man.stderr);
    assert!(
        man.stdout.starts_with(".ie") || man.stdout.contains(".TH zagreus"),
        "{}",
        &man.stdout[..200]
    );
    for section in [
        "ZAGREUS SERVE",
        "ZAGREUS BATCH",
        "ZAGREUS PERPLEXITY",
        "\\-\\-temperature",
    ] {
        assert!(man.stdout.contains(section), "no {section} in the man page");
    }
    assert!(
        !man.stdout.contains("CHECK-LOGITS"),
        "hidden commands stay out of the man page"
    );
}
