//! A hub (or mirror, `HF_ENDPOINT`) that lies, and a cache that was tampered with: commit shas,
//! ETags, revisions and refs that are paths; downloads cut short or altered; symlinks out of the
//! cache; loops and FIFOs in `refs/`. Nothing may be written or read outside the cache, nothing
//! incomplete or unverified may be loaded, and every failure is one clear line.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cli::assert_failed;
use common::hub_cli::{answer_ids, greedy, reference_ids, zagreus};
use common::mock_hub::{Lies, MockHub, MockRepo};
use common::model_dir;

const REPO: &str = "test-org/tiny-zagreus";

fn repo_dir(home: &Path) -> PathBuf {
    common::hub_cli::repo_dir(home, REPO)
}

fn lying(lies: Lies) -> MockRepo {
    let mut r = MockRepo::from_dir(REPO, &model_dir("tied-bf16"));
    r.lies = lies;
    r
}

/// Every file under `dir`, relative to it (links not followed).
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
        }
    }
    out.sort();
    out
}

/// Nothing exists under `home` but the cache (`hf/hub/...`), and nothing named `pwned` anywhere.
fn assert_nothing_outside_the_cache(home: &Path) {
    for p in tree(home) {
        assert!(
            p == "hf" || p == "hf/hub" || p.starts_with("hf/hub/models--"),
            "written outside the cache: {p}"
        );
        assert!(!p.contains("pwned"), "{p}");
    }
}

#[test]
fn etags_that_are_paths_never_become_paths() {
    // Before: `pull` wrote the file's contents to the path the ETag named, and exited 0.
    for etag in ["../../../../x/pwned", "/tmp/zagreus-pwned-by-etag", "..", "abc"] {
        let home = tempfile::tempdir().unwrap();
        let hub = MockHub::start(
            vec![lying(Lies {
                etag: Some(etag.into()),
                ..Lies::default()
            })],
            None,
        );
        let out = zagreus(home.path(), &hub.url, &[], &["pull", REPO]);
        assert_failed(&out, &["ETag", "not a file hash"]);
        assert_nothing_outside_the_cache(home.path());
        assert!(!Path::new("/tmp/zagreus-pwned-by-etag").exists());
    }
}

#[test]
fn commit_shas_that_are_paths_never_become_paths() {
    // Before: wrote outside the cache, then panicked inside hf-hub.
    for sha in ["../../x", "/tmp/zagreus-pwned-by-commit", "0123"] {
        let home = tempfile::tempdir().unwrap();
        let hub = MockHub::start(
            vec![lying(Lies {
                commit: Some(sha.into()),
                ..Lies::default()
            })],
            None,
        );
        let out = zagreus(home.path(), &hub.url, &[], &["pull", REPO]);
        assert_failed(&out, &["not a commit sha"]);
        assert_nothing_outside_the_cache(home.path());
        assert!(!Path::new("/tmp/zagreus-pwned-by-commit").exists());
    }
}

#[test]
fn revisions_that_are_paths_are_refused_before_any_request() {
    // Before: `pull owner/model@../../x` wrote outside the cache.
    let home = tempfile::tempdir().unwrap();
    let hub = MockHub::start(vec![lying(Lies::default())], None);
    for rev in ["../../x", "..", "a/../../b", "/abs", "x\\y"] {
        let spec = format!("{REPO}@{rev}");
        let out = zagreus(home.path(), &hub.url, &[], &["pull", &spec]);
        assert_failed(&out, &["not a valid git ref name"]);
        let out = zagreus(home.path(), &hub.url, &[], &greedy(&spec));
        assert_failed(&out, &["not a valid git ref name"]);
    }
    assert_eq!(hub.request_count(), 0, "{:?}", hub.requests.lock().unwrap());
    assert_nothing_outside_the_cache(home.path());
}

#[test]
fn a_short_download_is_never_kept_and_the_next_pull_completes_it() {
    // Before: half of model.safetensors was kept as complete, and pulling again never repaired it.
    let home = tempfile::tempdir().unwrap();
    let short = MockHub::start(
        vec![lying(Lies {
            short_body: Some("model.safetensors".into()),
            ..Lies::default()
        })],
        None,
    );
    let out = zagreus(home.path(), &short.url, &[], &["pull", REPO]);
    assert_failed(&out, &["model.safetensors", "stopped after"]);
    let sha = MockRepo::from_dir(REPO, &model_dir("tied-bf16")).sha;
    let snap = repo_dir(home.path()).join("snapshots").join(&sha);
    assert!(
        !snap.join("model.safetensors").exists(),
        "a short file joined the snapshot"
    );
    // Offline, it is known as partial and never loaded.
    let out = zagreus(home.path(), &short.url, &[("HF_HUB_OFFLINE", "1")], &greedy(REPO));
    assert_failed(&out, &["partly cached", "model.safetensors"]);
    // An honest server: the partial file is resumed, verified, and the model answers.
    let honest = MockHub::start(vec![lying(Lies::default())], None);
    let out = zagreus(home.path(), &honest.url, &[], &["pull", REPO]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        honest
            .requests
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.contains("model.safetensors")),
        "resumed from the honest server"
    );
    assert_eq!(
        std::fs::read(snap.join("model.safetensors")).unwrap(),
        std::fs::read(model_dir("tied-bf16").join("model.safetensors")).unwrap()
    );
    assert_eq!(
        answer_ids(&zagreus(home.path(), &honest.url, &[], &greedy(REPO))),
        reference_ids()
    );
    // Nothing but verified blobs is left: no .lock, no .incomplete.
    let blobs: Vec<String> = tree(&repo_dir(home.path()).join("blobs"));
    assert!(
        blobs.iter().all(|b| b.len() == 40 || b.len() == 64),
        "only blobs named by their hash: {blobs:?}"
    );
}

#[test]
fn altered_bytes_fail_their_hash_and_are_discarded() {
    let home = tempfile::tempdir().unwrap();
    let hub = MockHub::start(
        vec![lying(Lies {
            wrong_bytes: Some("config.json".into()),
            ..Lies::default()
        })],
        None,
    );
    let out = zagreus(home.path(), &hub.url, &[], &greedy(REPO));
    assert_failed(&out, &["config.json", "do not match the hash"]);
    let blobs = tree(&repo_dir(home.path()).join("blobs"));
    assert!(blobs.iter().all(|b| !b.ends_with(".incomplete")), "{blobs:?}");
    // An LFS file (sha256) likewise.
    let home = tempfile::tempdir().unwrap();
    let hub = MockHub::start(
        vec![lying(Lies {
            wrong_bytes: Some("model.safetensors".into()),
            ..Lies::default()
        })],
        None,
    );
    let out = zagreus(home.path(), &hub.url, &[], &["pull", REPO]);
    assert_failed(&out, &["model.safetensors", "do not match the hash"]);
}

#[test]
fn pull_repairs_a_cache_an_older_version_left_damaged() {
    let home = tempfile::tempdir().unwrap();
    let hub = MockHub::start(vec![lying(Lies::default())], None);
    assert_eq!(zagreus(home.path(), &hub.url, &[], &["pull", REPO]).code, 0);
    // Truncate the weights' blob behind the snapshot's back, as a short download once did.
    let sha = MockRepo::from_dir(REPO, &model_dir("tied-bf16")).sha;
    let link = repo_dir(home.path())
        .join("snapshots")
        .join(&sha)
        .join("model.safetensors");
    let blob = std::fs::canonicalize(&link).unwrap();
    let len = std::fs::metadata(&blob).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&blob)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    // Loading it is a clean error, never garbage.
    let out = zagreus(home.path(), &hub.url, &[("HF_HUB_OFFLINE", "1")], &greedy(REPO));
    assert_failed(&out, &["model.safetensors"]);
    // `pull` notices and downloads it again.
    let out = zagreus(home.path(), &hub.url, &[], &["pull", REPO]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("does not match the hub"), "{}", out.stderr);
    assert_eq!(
        answer_ids(&zagreus(home.path(), &hub.url, &[], &greedy(REPO))),
        reference_ids()
    );
}

/// A complete model placed somewhere outside the cache, as an attacker would.
fn decoy(home: &Path) -> PathBuf {
    let d = home.join("somewhere");
    common::cli::copy_model(&model_dir("tied-bf16"), &d);
    d
}

#[test]
fn refs_that_are_paths_are_never_followed() {
    // Before: `-m owner/name --offline` loaded the model at the path refs/main named, and `list`
    // showed it.
    let home = tempfile::tempdir().unwrap();
    let hub = MockHub::start(vec![lying(Lies::default())], None);
    assert_eq!(zagreus(home.path(), &hub.url, &[], &["pull", REPO]).code, 0);
    let d = decoy(home.path());
    let refs = repo_dir(home.path()).join("refs/main");
    for target in ["../../../../somewhere".to_string(), d.display().to_string()] {
        std::fs::write(&refs, &target).unwrap();
        let out = zagreus(home.path(), &hub.url, &[("HF_HUB_OFFLINE", "1")], &greedy(REPO));
        assert_failed(&out, &["refs/main", "not a commit sha"]);
        // `list` leaves the ref out (saying so) and shows only what is inside the cache.
        let list = zagreus(home.path(), &hub.url, &[], &["list", "--json"]);
        assert_eq!(list.code, 0, "{}", list.stderr);
        assert!(list.stderr.contains("main is left out"), "{}", list.stderr);
        let models: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
        for m in models.as_array().unwrap() {
            assert_ne!(m["revision"], "main", "{m}");
            let path = m["path"].as_str().unwrap();
            assert!(Path::new(path).starts_with(repo_dir(home.path())), "{path}");
        }
    }
}

#[test]
fn snapshot_links_out_of_the_cache_are_refused() {
    let home = tempfile::tempdir().unwrap();
    let hub = MockHub::start(vec![lying(Lies::default())], None);
    assert_eq!(zagreus(home.path(), &hub.url, &[], &["pull", REPO]).code, 0);
    let d = decoy(home.path());
    let sha = MockRepo::from_dir(REPO, &model_dir("tied-bf16")).sha;
    let link = repo_dir(home.path()).join("snapshots").join(&sha).join("config.json");
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(d.join("config.json"), &link).unwrap();
    let out = zagreus(home.path(), &hub.url, &[("HF_HUB_OFFLINE", "1")], &greedy(REPO));
    assert_failed(&out, &["config.json", "outside the cache"]);
}

#[test]
fn list_survives_ref_loops_fifos_and_odd_branch_names() {
    // Before: hung on a refs symlink loop or a FIFO, and panicked slicing a non-ASCII branch name.
    let home = tempfile::tempdir().unwrap();
    let hub = MockHub::start(vec![lying(Lies::default())], None);
    assert_eq!(zagreus(home.path(), &hub.url, &[], &["pull", REPO]).code, 0);
    let refs = repo_dir(home.path()).join("refs");
    std::os::unix::fs::symlink(&refs, refs.join("loop")).unwrap();
    let fifo = std::ffi::CString::new(refs.join("fifo").to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let sha = std::fs::read_to_string(refs.join("main")).unwrap();
    std::fs::write(refs.join("ramo-è-più-lungo-di-dieci"), &sha).unwrap();
    let start = Instant::now();
    let out = zagreus(home.path(), &hub.url, &[], &["list"]);
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("ramo-è-più"), "{}", out.stdout);
    assert!(
        out.stdout.lines().filter(|l| l.starts_with(REPO)).count() == 2,
        "{}",
        out.stdout
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}
