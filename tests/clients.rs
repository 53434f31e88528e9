//! Real clients against `zagreus serve`: the official `openai` Python package,
//! lm-evaluation-harness scoring a multiple-choice task through `/v1/completions` (the way the
//! model card evaluates these models), and the chat page in headless Chromium driven by
//! Playwright. They come from PyPI (and Debian) into target/py (scripts/python-clients.sh, which
//! the README's test command runs).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use common::asset;
use common::server::Server;
use serde_json::Value;

fn smollm2() -> String {
    asset("SmolLM2-135M-Instruct.Q4_1.gguf").to_str().unwrap().to_string()
}

/// The virtual environment with the clients; the test fails with instructions when it is missing.
fn venv_bin(name: &str) -> PathBuf {
    let venv = std::env::var_os("ZAGREUS_PY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/py"));
    let p = venv.join("bin").join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/python-clients.sh first (the README's test command does)",
        p.display()
    );
    p
}

fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

#[test]
fn the_openai_package_talks_to_the_server() {
    let s = Server::start(&["-m", &smollm2(), "--api-key", "test-key"]);
    let mut cmd = Command::new(venv_bin("python"));
    cmd.arg(clients_dir().join("openai_client.py"))
        .args([format!("http://{}/v1", s.addr), "test-key".into()]);
    passes(cmd, &s);
}

#[test]
fn the_openai_package_calls_tools_and_gets_json() {
    let template = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/templates/nesso-agentic.jinja");
    let s = Server::start(&["-m", &smollm2(), "--chat-template", template.to_str().unwrap()]);
    let mut cmd = Command::new(venv_bin("python"));
    cmd.arg(clients_dir().join("openai_tools.py"))
        .arg(format!("http://{}/v1", s.addr));
    passes(cmd, &s);
}

/// Runs a client script; it must exit 0 and say that all its checks passed.
fn passes(mut cmd: Command, s: &Server) {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\nserver:\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.stderr()
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

/// The log-likelihood of `continuation` after `context`, computed by the library directly, with
/// the tokens lm-eval uses (the whole text tokenized, the context's tokens split off).
fn direct_loglikelihood(lm: &zagreus::loader::LoadedModel, context: &str, continuation: &str) -> f64 {
    let whole = lm
        .tokenizer
        .encode_raw(&format!("{context}{continuation}"), false)
        .unwrap();
    let ctx = lm.tokenizer.encode_raw(context, false).unwrap();
    let mut cache = lm.model.new_cache(whole.len());
    let mut logits = Vec::new();
    lm.model
        .forward(&whole, &mut cache, zagreus::model::LogitsFor::All, &mut logits)
        .unwrap();
    let vocab = lm.model.vocab_size();
    (ctx.len()..whole.len())
        .map(|i| zagreus::sampling::log_softmax(&logits[(i - 1) * vocab..i * vocab])[whole[i] as usize] as f64)
        .sum()
}

#[test]
fn lm_eval_scores_a_multiple_choice_task_as_zagreus_does() {
    let s = Server::start(&["-m", &smollm2(), "--parallel", "4"]);
    let dir = tempfile::tempdir().unwrap();
    let data = clients_dir().join("lm_eval/capitals.jsonl");
    let task = std::fs::read_to_string(clients_dir().join("lm_eval/task.yaml.in"))
        .unwrap()
        .replace("@DATA@", data.to_str().unwrap());
    std::fs::write(dir.path().join("zagreus_mc.yaml"), task).unwrap();
    let out_dir = dir.path().join("out");
    let out = Command::new(venv_bin("lm_eval"))
        .current_dir(dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HOME", dir.path().join("hf"))
        .args(["--model", "local-completions", "--model_args"])
        .arg(format!(
            "base_url=http://{}/v1/completions,tokenizer_backend=remote,tokenized_requests=True,num_concurrent=4,max_retries=1",
            s.addr
        ))
        .args(["--tasks", "zagreus_mc", "--include_path"])
        .arg(dir.path())
        .args(["--batch_size", "2", "--log_samples", "--output_path"])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lm_eval failed:\n{}\n{}\nserver:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s.stderr()
    );
    // lm-eval writes results_*.json and samples_zagreus_mc_*.jsonl under a folder per model.
    let files: Vec<PathBuf> = walk(&out_dir);
    let find = |prefix: &str| {
        files
            .iter()
            .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix}* in {files:?}"))
            .clone()
    };
    let results: Value = serde_json::from_str(&std::fs::read_to_string(find("results_")).unwrap()).unwrap();
    let acc = results["results"]["zagreus_mc"]["acc,none"].as_f64().unwrap();

    // Every log-likelihood lm-eval got through the server equals the one computed directly.
    let spec = zagreus::loader::ModelSpec {
        model: smollm2(),
        ..Default::default()
    };
    let (lm, _) = zagreus::loader::load_for(&spec).unwrap();
    let samples = std::fs::read_to_string(find("samples_zagreus_mc")).unwrap();
    let (mut compared, mut worst) = (0, 0f64);
    let mut correct = BTreeMap::new();
    for line in samples.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let args = v["arguments"].as_object().unwrap();
        let mut best = (f64::MIN, 0);
        for (i, resp) in v["filtered_resps"].as_array().unwrap().iter().enumerate() {
            let a = &args[&format!("gen_args_{i}")];
            let served: f64 = match &resp[0] {
                Value::String(s) => s.parse().unwrap(),
                x => x.as_f64().unwrap(),
            };
            let direct = direct_loglikelihood(&lm, a["arg_0"].as_str().unwrap(), a["arg_1"].as_str().unwrap());
            worst = worst.max((served - direct).abs());
            compared += 1;
            if served > best.0 {
                best = (served, i);
            }
        }
        let target: usize = v["target"]
            .as_str()
            .map_or_else(|| v["target"].as_u64().unwrap() as usize, |t| t.parse().unwrap());
        correct.insert(v["doc_id"].as_u64().unwrap(), best.1 == target);
    }
    let mut err = std::io::stderr();
    let _ = writeln!(
        err,
        "lm-eval through zagreus serve: zagreus_mc acc {acc:.3} ({} items); {compared} log-likelihoods, largest difference from zagreus' own {worst:.2e}",
        correct.len()
    );
    assert_eq!(compared, 48);
    assert!(
        worst < 1e-4,
        "a served log-likelihood differs from the direct one by {worst}"
    );
    let ours = correct.values().filter(|c| **c).count() as f64 / correct.len() as f64;
    assert!(
        (ours - acc).abs() < 1e-9,
        "lm-eval's accuracy {acc}, from its log-likelihoods {ours}"
    );
    // SmolLM2 knows most of these (chance is 0.25).
    assert!(acc >= 0.5, "accuracy {acc}");
}

/// Runs tests/clients/webui_test.py against a server; screenshots go to target/webui-screenshots.
fn browser_checks(server_args: &[&str], key: Option<&str>) {
    let chromium = std::env::var("ZAGREUS_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: run scripts/python-clients.sh first (the README's test command does)"
    );
    let s = Server::start(server_args);
    let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/webui-screenshots")
        .join(if key.is_some() { "with-key" } else { "open" });
    std::fs::create_dir_all(&shots).unwrap();
    let mut cmd = Command::new(venv_bin("python"));
    cmd.arg(clients_dir().join("webui_test.py"))
        .arg(format!("http://{}", s.addr))
        .arg(&shots)
        .env("ZAGREUS_CHROMIUM", &chromium);
    cmd.args(key);
    passes(cmd, &s);
    assert!(shots.join("webui-desktop.png").exists() && shots.join("webui-phone.png").exists());
}

#[test]
fn the_chat_page_works_in_a_real_browser() {
    browser_checks(&["-m", &smollm2(), "--ctx-size", "1024"], None);
}

#[test]
fn the_chat_page_asks_for_the_api_key_once() {
    browser_checks(
        &["-m", &smollm2(), "--ctx-size", "1024", "--api-key", "page-key"],
        Some("page-key"),
    );
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
