//! Running the binary against a mock hub with a fresh home: only PATH, HOME, HF_HOME and
//! HF_ENDPOINT (plus what a test adds) in its environment.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use assert_cmd::cargo::cargo_bin;

use super::cli::Out;
use super::{ids, model_dir, read_json, GREEDY};

/// `zagreus args` with `home` as HOME (the cache under `home/hf`) and `endpoint` as the hub.
pub fn zagreus(home: &Path, endpoint: &str, envs: &[(&str, &str)], args: &[&str]) -> Out {
    let mut c = Command::new(cargo_bin("zagreus"));
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("HF_HOME", home.join("hf"))
        .env("HF_ENDPOINT", endpoint)
        .args(args)
        .stdin(Stdio::null());
    for (k, v) in envs {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A greedy `--json` request to `model` whose answer the tied-bf16 reference records.
pub fn greedy(model: &str) -> Vec<&str> {
    let mut v = vec!["-m", model];
    v.extend_from_slice(&GREEDY);
    v.extend_from_slice(&[
        "-n",
        "12",
        "--json",
        "-s",
        "Sei un assistente utile.",
        "Ciao! Come stai? 😀",
    ]);
    v
}

/// transformers' greedy tokens for [`greedy`]'s request on the tied-bf16 fixture.
pub fn reference_ids() -> Vec<u32> {
    ids(&read_json(&model_dir("tied-bf16").join("reference.json"))["greedy_ids"])
}

/// The generated ids of a successful `--json` run.
pub fn answer_ids(out: &Out) -> Vec<u32> {
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    ids(&serde_json::from_str::<serde_json::Value>(&out.stdout).unwrap()["generated_token_ids"])
}

/// The cache folder of `repo` under `home`.
pub fn repo_dir(home: &Path, repo: &str) -> PathBuf {
    home.join("hf/hub").join(format!("models--{}", repo.replace('/', "--")))
}
