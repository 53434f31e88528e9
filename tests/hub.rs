//! Models by hub id against a mock hub on 127.0.0.1: download into the Hugging Face cache, reuse
//! without the network, offline mode, 404, gated repos and tokens, interrupted downloads, pull
//! and list.

mod common;

use std::path::PathBuf;

use common::cli::assert_failed;
use common::hub_cli::{answer_ids, greedy, reference_ids, repo_dir, zagreus};
use common::mock_hub::{Cut, MockHub, MockRepo};
use common::{ids, model_dir, read_json};

const REPO: &str = "test-org/tiny-zagreus";

#[test]
fn first_run_downloads_and_later_runs_need_no_network() {
    let home = tempfile::tempdir().unwrap();
    let repo = MockRepo::from_dir(REPO, &model_dir("tied-bf16"));
    let sha = repo.sha.clone();
    let mut hub = MockHub::start(vec![repo], None);
    let first = zagreus(home.path(), &hub.url, &[], &greedy(REPO));
    assert_eq!(answer_ids(&first), reference_ids());
    assert!(first.stderr.contains("downloading"), "{}", first.stderr);
    // The layout huggingface_hub uses: refs, snapshots linking into blobs.
    let dir = repo_dir(home.path(), REPO);
    assert_eq!(std::fs::read_to_string(dir.join("refs/main")).unwrap(), sha);
    let snap = dir.join("snapshots").join(&sha);
    assert!(std::fs::symlink_metadata(snap.join("model.safetensors"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(snap.join("config.json").is_file());
    // Absent optional files are remembered, as huggingface_hub does.
    assert!(dir.join(".no_exist").join(&sha).join("chat_template.jinja").exists());

    // Fully cached: a second run makes no request at all, even online.
    let before = hub.request_count();
    let second = zagreus(home.path(), &hub.url, &[], &greedy(REPO));
    assert_eq!(answer_ids(&second), reference_ids());
    assert_eq!(hub.request_count(), before, "a cached model must not touch the network");
    assert!(second.stderr.is_empty(), "{}", second.stderr);
    // And with the server gone.
    hub.stop();
    assert_eq!(
        answer_ids(&zagreus(home.path(), &hub.url, &[], &greedy(REPO))),
        reference_ids()
    );
    assert_eq!(
        answer_ids(&zagreus(
            home.path(),
            &hub.url,
            &[("HF_HUB_OFFLINE", "1")],
            &greedy(REPO)
        )),
        reference_ids()
    );
}

#[test]
fn offline_with_an_empty_cache_fails_at_once_and_says_how_to_fix_it() {
    let home = tempfile::tempdir().unwrap();
    let hub = MockHub::start(vec![MockRepo::from_dir(REPO, &model_dir("tied-bf16"))], None);
    let out = zagreus(home.path(), &hub.url, &[("HF_HUB_OFFLINE", "1")], &greedy(REPO));
    assert_failed(&out, &["offline", "not in the cache", "zagreus pull"]);
    let out = zagreus(
        home.path(),
        &hub.url,
        &[],
        &[&["--offline"][..], &greedy(REPO)].concat(),
    );
    assert_failed(&out, &["offline"]);
    assert_eq!(hub.request_count(), 0, "offline must never touch the network");
}

#[test]
fn unknown_repos_and_missing_weights_are_clear_errors() {
    let home = tempfile::tempdir().unwrap();
    let mut no_weights = MockRepo::from_dir("test-org/no-weights", &model_dir("tied-bf16"));
    no_weights.files.remove("model.safetensors");
    let mut gguf_only = no_weights.clone();
    gguf_only.id = "test-org/gguf-only".into();
    gguf_only.files.insert("model-Q8_0.gguf".into(), b"GGUF".to_vec());
    let hub = MockHub::start(vec![no_weights, gguf_only], None);
    assert_failed(
        &zagreus(home.path(), &hub.url, &[], &greedy("test-org/missing")),
        &["test-org/missing", "404"],
    );
    assert_failed(
        &zagreus(home.path(), &hub.url, &[], &greedy("test-org/no-weights@nope")),
        &["404"],
    );
    assert_failed(
        &zagreus(home.path(), &hub.url, &[], &greedy("test-org/no-weights")),
        &["no safetensors weights"],
    );
    assert_failed(
        &zagreus(home.path(), &hub.url, &[], &greedy("test-org/gguf-only")),
        &["GGUF"],
    );
    // Network down (nothing listens on the endpoint).
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    assert_failed(
        &zagreus(home.path(), &closed, &[], &greedy(REPO)),
        &["cannot download", "HF_HUB_OFFLINE"],
    );
}

#[test]
fn gated_repos_need_a_token() {
    let home = tempfile::tempdir().unwrap();
    let mut gated = MockRepo::from_dir("test-org/gated", &model_dir("tied-bf16"));
    gated.token = Some("hf_secret".into());
    let hub = MockHub::start(vec![gated], None);
    assert_failed(
        &zagreus(home.path(), &hub.url, &[], &greedy("test-org/gated")),
        &["401", "HF_TOKEN"],
    );
    assert_failed(
        &zagreus(
            home.path(),
            &hub.url,
            &[("HF_TOKEN", "hf_wrong")],
            &greedy("test-org/gated"),
        ),
        &["403", "no access"],
    );
    let ok = zagreus(
        home.path(),
        &hub.url,
        &[("HF_TOKEN", "hf_secret")],
        &greedy("test-org/gated"),
    );
    assert_eq!(answer_ids(&ok), reference_ids());
    // The token file under HF_HOME works too (a fresh cache forces a download).
    let home2 = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home2.path().join("hf")).unwrap();
    std::fs::write(home2.path().join("hf/token"), "hf_secret\n").unwrap();
    assert_eq!(
        answer_ids(&zagreus(home2.path(), &hub.url, &[], &greedy("test-org/gated"))),
        reference_ids()
    );
}

#[test]
fn a_cut_download_leaves_nothing_loadable_and_the_next_run_completes_it() {
    let home = tempfile::tempdir().unwrap();
    let repo = MockRepo::from_dir(REPO, &model_dir("tied-bf16"));
    let sha = repo.sha.clone();
    let hub = MockHub::start(
        vec![repo],
        Some(Cut {
            file: "model.safetensors".into(),
            after: 100_000,
            times: 1,
        }),
    );
    let out = zagreus(home.path(), &hub.url, &[], &greedy(REPO));
    assert_failed(&out, &["model.safetensors"]);
    let snap = repo_dir(home.path(), REPO).join("snapshots").join(&sha);
    assert!(
        !snap.join("model.safetensors").exists(),
        "an incomplete file must not be in the snapshot"
    );
    // Offline, the partial model is refused rather than loaded.
    assert_failed(
        &zagreus(home.path(), &hub.url, &[("HF_HUB_OFFLINE", "1")], &greedy(REPO)),
        &["partly cached", "model.safetensors"],
    );
    // The next run resumes and completes the download.
    let again = zagreus(home.path(), &hub.url, &[], &greedy(REPO));
    assert_eq!(answer_ids(&again), reference_ids());
    assert_eq!(
        std::fs::read(snap.join("model.safetensors")).unwrap(),
        std::fs::read(model_dir("tied-bf16").join("model.safetensors")).unwrap()
    );
}

#[test]
fn sharded_checkpoints_download_every_shard() {
    let home = tempfile::tempdir().unwrap();
    let hub = MockHub::start(
        vec![MockRepo::from_dir("test-org/sharded", &model_dir("untied-f32-sharded"))],
        None,
    );
    let out = zagreus(home.path(), &hub.url, &[], &greedy("test-org/sharded"));
    let want = ids(&read_json(&model_dir("untied-f32-sharded").join("reference.json"))["greedy_ids"]);
    assert_eq!(answer_ids(&out), want);
}

#[test]
fn pull_downloads_without_running_and_list_shows_the_cache() {
    let home = tempfile::tempdir().unwrap();
    let repo = MockRepo::from_dir(REPO, &model_dir("tied-bf16"));
    let sha = repo.sha.clone();
    let hub = MockHub::start(vec![repo], None);
    let empty = zagreus(home.path(), &hub.url, &[], &["list"]);
    assert_eq!(empty.code, 0);
    assert!(empty.stdout.is_empty());
    let pulled = zagreus(home.path(), &hub.url, &[], &["pull", REPO]);
    assert_eq!(pulled.code, 0, "{}", pulled.stderr);
    let path = PathBuf::from(pulled.stdout.trim());
    assert!(path.ends_with(format!("snapshots/{sha}")), "{}", pulled.stdout);
    assert!(path.join("model.safetensors").is_file());
    let listed = zagreus(home.path(), &hub.url, &[], &["list"]);
    assert_eq!(listed.code, 0);
    let line = listed
        .stdout
        .lines()
        .find(|l| l.starts_with(REPO))
        .unwrap_or_else(|| panic!("{}", listed.stdout));
    assert!(
        line.contains("main") && line.contains("KB") && line.contains("ready"),
        "{line}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&zagreus(home.path(), &hub.url, &[], &["list", "--json"]).stdout).unwrap();
    assert_eq!(json[0]["model"], REPO);
    assert_eq!(json[0]["complete"], true);
    assert!(json[0]["size_bytes"].as_u64().unwrap() > 300_000);
    // pull of something that is not a hub id
    assert_failed(
        &zagreus(home.path(), &hub.url, &[], &["pull", "not-an-id"]),
        &["owner/name"],
    );
}

#[test]
fn a_cache_written_by_huggingface_hub_is_used_as_is() {
    // The layout Python writes: blobs named by hash, relative symlinks in snapshots, refs/main.
    let home = tempfile::tempdir().unwrap();
    let dir = repo_dir(home.path(), "mii-llm/open-zagreus-0.4B");
    let sha = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    std::fs::create_dir_all(dir.join("refs")).unwrap();
    let snap = dir.join("snapshots").join(sha);
    std::fs::create_dir_all(&snap).unwrap();
    for (i, e) in std::fs::read_dir(model_dir("tied-bf16")).unwrap().enumerate() {
        let e = e.unwrap();
        let blob = format!("blob{i:02}");
        std::fs::copy(e.path(), dir.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(e.file_name())).unwrap();
    }
    std::fs::write(dir.join("refs/main"), sha).unwrap();
    // No endpoint at all: the default model comes from the cache.
    let out = zagreus(
        home.path(),
        "http://127.0.0.1:9",
        &[],
        &greedy("mii-llm/open-zagreus-0.4B"),
    );
    assert_eq!(answer_ids(&out), reference_ids());
    let mut args = greedy("x/y");
    args.drain(..2); // no -m: the default model
    assert_eq!(
        answer_ids(&zagreus(home.path(), "http://127.0.0.1:9", &[], &args)),
        reference_ids()
    );
}

#[test]
fn a_gguf_file_in_a_hub_repo_by_its_quantization() {
    let home = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    common::gguf_writer::write_fixture_gguf(
        &model_dir("tied-bf16"),
        &files.path().join("tiny-Q8_0.gguf"),
        common::gguf_writer::Ty::Q8_0,
    );
    common::gguf_writer::write_fixture_gguf(
        &model_dir("tied-bf16"),
        &files.path().join("tiny-F32.gguf"),
        common::gguf_writer::Ty::F32,
    );
    std::fs::write(files.path().join("README.md"), "GGUF builds of a tiny model").unwrap();
    let repo = MockRepo::from_dir("test-org/tiny-gguf", files.path());
    let mut hub = MockHub::start(vec![repo], None);
    let out = zagreus(home.path(), &hub.url, &[], &greedy("test-org/tiny-gguf:F32"));
    assert_eq!(
        answer_ids(&out),
        reference_ids(),
        "the F32 GGUF computes transformers' greedy tokens"
    );
    let dir = repo_dir(home.path(), "test-org/tiny-gguf");
    let downloaded: Vec<String> = std::fs::read_dir(dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert_eq!(
        downloaded.len(),
        1,
        "only the requested file is fetched: {downloaded:?}"
    );
    assert_failed(
        &zagreus(home.path(), &hub.url, &[], &greedy("test-org/tiny-gguf:Q5_K_M")),
        &["Q5_K_M", "tiny-Q8_0.gguf"],
    );
    let pulled = zagreus(home.path(), &hub.url, &[], &["pull", "test-org/tiny-gguf:q8_0"]);
    assert_eq!(pulled.code, 0, "{}", pulled.stderr);
    assert!(pulled.stdout.trim().ends_with("tiny-Q8_0.gguf"), "{}", pulled.stdout);
    hub.stop();
    // Cached: works offline.
    let out = zagreus(
        home.path(),
        &hub.url,
        &[("HF_HUB_OFFLINE", "1")],
        &["-m", "test-org/tiny-gguf:Q8_0", "-n", "2", "--json", "Ciao"],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
}

#[test]
fn a_renamed_repository_is_followed() {
    // The hub answers an old id with a relative redirect, as huggingface_hub follows.
    let home = tempfile::tempdir().unwrap();
    let mut repo = MockRepo::from_dir(REPO, &model_dir("tied-bf16"));
    repo.renamed_from = vec!["old-org/old-name".into()];
    let hub = MockHub::start(vec![repo], None);
    let out = zagreus(home.path(), &hub.url, &[], &greedy("old-org/old-name"));
    assert_eq!(answer_ids(&out), reference_ids());
    let requests = hub.requests.lock().unwrap();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("HEAD /old-org/old-name/resolve/")),
        "{requests:?}"
    );
}
