//! Models by hub id: downloads into the Hugging Face cache (the layout Python's huggingface_hub
//! uses, so either tool reuses the other's downloads) and resolves fully cached models without
//! touching the network. `HF_HUB_OFFLINE=1` / `--offline` use the cache only.

use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo, RepoType};

use crate::model::weights::{INDEX_FILE, SINGLE_FILE};
use crate::source::ModelFiles;

/// Files a model needs, besides its weights.
const REQUIRED: &[&str] = &["config.json", "tokenizer.json"];
/// Files used when the repo has them.
const OPTIONAL: &[&str] = &["generation_config.json", "tokenizer_config.json", "chat_template.jinja"];
/// Optional files whose absence must be known (present, or recorded as missing) before a cached
/// model counts as complete; `chat_template.jinja` may simply be unknown (older downloaders never
/// asked for it).
const OPTIONAL_KNOWN: &[&str] = &["generation_config.json", "tokenizer_config.json"];

/// Where the hub and its cache are, from the same environment variables as huggingface_hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub endpoint: String,
    pub cache_dir: PathBuf,
    pub token: Option<String>,
    pub offline: bool,
}

fn env_true(name: &str) -> bool {
    std::env::var(name)
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

fn nonempty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl HubConfig {
    /// HF_ENDPOINT, HF_HUB_CACHE, HF_HOME (and XDG_CACHE_HOME), HF_TOKEN, HF_TOKEN_PATH and the
    /// token file, HF_HUB_OFFLINE.
    pub fn from_env(offline: bool) -> Self {
        let home = nonempty_env("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = nonempty_env("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home_dir().join(".cache"));
            cache.join("huggingface")
        });
        let cache_dir = nonempty_env("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join("hub"));
        let token_path = nonempty_env("HF_TOKEN_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join("token"));
        let token = nonempty_env("HF_TOKEN")
            .or_else(|| std::fs::read_to_string(token_path).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        Self {
            endpoint: nonempty_env("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            cache_dir,
            token,
            offline: offline || env_true("HF_HUB_OFFLINE"),
        }
    }
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The cache folder of one model repo (`models--owner--name`).
fn repo_dir(cfg: &HubConfig, repo: &str) -> PathBuf {
    cfg.cache_dir.join(format!("models--{}", repo.replace('/', "--")))
}

fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

/// The commit a revision points to in the cache, if it was resolved before.
fn cached_commit(cfg: &HubConfig, repo: &str, rev: &str) -> Option<String> {
    let dir = repo_dir(cfg, repo);
    if is_commit(rev) && dir.join("snapshots").join(rev).is_dir() {
        return Some(rev.to_string());
    }
    let commit = std::fs::read_to_string(dir.join("refs").join(rev)).ok()?;
    let commit = commit.trim().to_string();
    Some(commit).filter(|c| !c.is_empty())
}

/// What is missing from a cached snapshot for the model to run (empty: complete).
fn missing_in_snapshot(cfg: &HubConfig, repo: &str, commit: &str) -> Vec<String> {
    let dir = repo_dir(cfg, repo);
    let snap = dir.join("snapshots").join(commit);
    let no_exist = dir.join(".no_exist").join(commit);
    let mut missing: Vec<String> = REQUIRED
        .iter()
        .filter(|f| !snap.join(f).is_file())
        .map(|f| f.to_string())
        .collect();
    for f in OPTIONAL_KNOWN {
        if !snap.join(f).is_file() && !no_exist.join(f).exists() {
            missing.push(f.to_string());
        }
    }
    if snap.join(INDEX_FILE).is_file() {
        match crate::model::weights::shard_files(&snap.join(INDEX_FILE)) {
            Ok(_) => {}
            Err(_) => missing.push(format!("shards listed in {INDEX_FILE}")),
        }
    } else if !snap.join(SINGLE_FILE).is_file() {
        missing.push(SINGLE_FILE.to_string());
    }
    missing
}

/// Resolves a hub model to files on disk, downloading what is missing unless offline.
pub fn resolve(repo: &str, revision: Option<&str>, cfg: &HubConfig) -> Result<ModelFiles> {
    let rev = revision.unwrap_or("main");
    let label = if revision.is_some() {
        format!("{repo}@{rev}")
    } else {
        repo.to_string()
    };
    if let Some(commit) = cached_commit(cfg, repo, rev) {
        if missing_in_snapshot(cfg, repo, &commit).is_empty() {
            return snapshot_files(cfg, repo, &commit, &label);
        }
    }
    if cfg.offline {
        let cache = cfg.cache_dir.display();
        return Err(match cached_commit(cfg, repo, rev) {
            None => anyhow!("offline: {label} is not in the cache ({cache}); download it first with `zagreus pull {label}` while online"),
            Some(commit) => anyhow!(
                "offline: {label} is only partly cached ({cache}): missing {}; run `zagreus pull {label}` while online",
                missing_in_snapshot(cfg, repo, &commit).join(", ")
            ),
        });
    }
    download(repo, rev, &label, cfg)
}

fn snapshot_files(cfg: &HubConfig, repo: &str, commit: &str, label: &str) -> Result<ModelFiles> {
    let snap = repo_dir(cfg, repo).join("snapshots").join(commit);
    let mut files = ModelFiles::from_dir(&snap)?;
    files.name = label.to_string();
    Ok(files)
}

fn download(repo: &str, rev: &str, label: &str, cfg: &HubConfig) -> Result<ModelFiles> {
    let api = client(cfg, label)?;
    let api_repo = api.repo(Repo::with_revision(repo.to_string(), RepoType::Model, rev.to_string()));
    let info = api_repo.info().map_err(|e| explain(e, cfg, label, None))?;
    let commit = info.sha.clone();
    let names: BTreeSet<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    for f in REQUIRED {
        if !names.contains(*f) {
            bail!("{label} has no {f}: it is not a transformers model zagreus can run");
        }
    }
    let weights_entry = if names.contains(INDEX_FILE) {
        INDEX_FILE
    } else if names.contains(SINGLE_FILE) {
        SINGLE_FILE
    } else {
        let ggufs = names.iter().filter(|n| n.ends_with(".gguf")).count();
        let hint = if ggufs > 0 {
            format!(" (it has {ggufs} GGUF files, which zagreus does not load yet)")
        } else {
            String::new()
        };
        bail!("{label} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}){hint}");
    };
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    eprintln!("zagreus: downloading {label} into {}", cfg.cache_dir.display());
    let snap = repo_dir(cfg, repo).join("snapshots").join(&commit);
    let fetch = |name: &str| -> Result<()> {
        if snap.join(name).is_file() {
            return Ok(());
        }
        let path = api_repo
            .download_with_progress(name, DownloadProgress::new(tty))
            .map_err(|e| explain(e, cfg, label, Some(name)))?;
        if path.parent() != Some(snap.as_path()) && !path.starts_with(&snap) {
            bail!("{label} changed on the hub while downloading ({name} is from another commit); run again");
        }
        Ok(())
    };
    for f in REQUIRED {
        fetch(f)?;
    }
    let no_exist = repo_dir(cfg, repo).join(".no_exist").join(&commit);
    for f in OPTIONAL {
        if names.contains(*f) {
            fetch(f)?;
        } else {
            // Remember the absence, as huggingface_hub does, so a cached model is known complete.
            std::fs::create_dir_all(&no_exist)
                .with_context(|| format!("cannot write to the cache {}", cfg.cache_dir.display()))?;
            std::fs::File::create(no_exist.join(f))
                .with_context(|| format!("cannot write to the cache {}", cfg.cache_dir.display()))?;
        }
    }
    fetch(weights_entry)?;
    if weights_entry == INDEX_FILE {
        let index = snap.join(INDEX_FILE);
        let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("invalid {INDEX_FILE} in {label}"))?;
        let shards: BTreeSet<String> = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .map(|m| m.values().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default();
        for shard in &shards {
            if !names.contains(shard) || shard.contains('/') {
                bail!("{label}: {INDEX_FILE} lists {shard}, which the repo does not have");
            }
            fetch(shard)?;
        }
    }
    // Remember which commit this revision resolved to, so later runs need no network.
    let refs = repo_dir(cfg, repo).join("refs");
    if !is_commit(rev) {
        let ref_path = refs.join(rev);
        if let Some(parent) = ref_path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot write to the cache {}", cfg.cache_dir.display()))?;
        }
        std::fs::write(&ref_path, &commit).with_context(|| format!("cannot write {}", ref_path.display()))?;
    }
    if tty {
        eprintln!(
            "zagreus: downloaded {label} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    snapshot_files(cfg, repo, &commit, label)
}

/// Resolves a GGUF file of a hub repo by its quantization tag (`owner/name:Q8_0`), from the cache
/// when it is there, else downloading just that file.
pub fn resolve_gguf(repo: &str, revision: Option<&str>, tag: &str, cfg: &HubConfig) -> Result<PathBuf> {
    let rev = revision.unwrap_or("main");
    let label = format!("{repo}{}:{tag}", revision.map(|r| format!("@{r}")).unwrap_or_default());
    if let Some(commit) = cached_commit(cfg, repo, rev) {
        let snap = repo_dir(cfg, repo).join("snapshots").join(&commit);
        let names: Vec<String> = std::fs::read_dir(&snap)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        if let Some(name) = pick_gguf(&names, tag) {
            return Ok(snap.join(name));
        }
    }
    if cfg.offline {
        bail!(
            "offline: {label} is not in the cache ({}); download it first with `zagreus pull {label}` while online",
            cfg.cache_dir.display()
        );
    }
    let api = client(cfg, &label)?;
    let api_repo = api.repo(Repo::with_revision(repo.to_string(), RepoType::Model, rev.to_string()));
    let info = api_repo.info().map_err(|e| explain(e, cfg, &label, None))?;
    let names: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let Some(name) = pick_gguf(&names, tag) else {
        let ggufs: Vec<&str> = names
            .iter()
            .filter(|n| n.ends_with(".gguf"))
            .map(|n| n.as_str())
            .collect();
        if ggufs.is_empty() {
            bail!("{label}: the repo has no GGUF files");
        }
        bail!(
            "{label}: no GGUF file matches `{tag}`; the repo has {}",
            ggufs.join(", ")
        );
    };
    if name.contains("-of-") {
        bail!("{label}: {name} is one part of a split GGUF, which zagreus does not load");
    }
    eprintln!(
        "zagreus: downloading {name} from {repo} into {}",
        cfg.cache_dir.display()
    );
    let path = api_repo
        .download_with_progress(&name, DownloadProgress::new(std::io::stderr().is_terminal()))
        .map_err(|e| explain(e, cfg, &label, Some(&name)))?;
    if !is_commit(rev) {
        let ref_path = repo_dir(cfg, repo).join("refs").join(rev);
        if let Some(parent) = ref_path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot write to the cache {}", cfg.cache_dir.display()))?;
        }
        std::fs::write(&ref_path, &info.sha).with_context(|| format!("cannot write {}", ref_path.display()))?;
    }
    Ok(path)
}

/// The GGUF file whose name carries quantization `tag` (case-insensitive), preferring the
/// shortest name where several match.
fn pick_gguf(names: &[String], tag: &str) -> Option<String> {
    let tag = tag.to_ascii_lowercase();
    names
        .iter()
        .filter(|n| n.ends_with(".gguf") && !n.contains('/'))
        .filter(|n| {
            let lower = n.to_ascii_lowercase();
            let stem = &lower[..lower.len() - 5];
            stem.split(['-', '.', '_'])
                .collect::<Vec<_>>()
                .windows(tag.split('_').count())
                .any(|w| w.join("_") == tag)
        })
        .min_by_key(|n| n.len())
        .cloned()
}

/// One clear sentence for each way a download fails.
/// A hub client on this configuration's cache, endpoint and token (progress is drawn by us).
fn client(cfg: &HubConfig, label: &str) -> Result<hf_hub::api::sync::Api> {
    ApiBuilder::from_cache(Cache::new(cfg.cache_dir.clone()))
        .with_endpoint(cfg.endpoint.clone())
        .with_token(cfg.token.clone())
        .with_progress(false)
        .with_user_agent("zagreus", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| explain(e, cfg, label, None))
}

fn explain(e: ApiError, cfg: &HubConfig, label: &str, file: Option<&str>) -> anyhow::Error {
    let what = match file {
        Some(f) => format!("{label} ({f})"),
        None => label.to_string(),
    };
    let endpoint = &cfg.endpoint;
    match e {
        ApiError::RequestError(err) => match *err {
            ureq::Error::StatusCode(code @ (401 | 403)) => {
                if cfg.token.is_some() {
                    anyhow!("{what}: access denied (HTTP {code}): your Hugging Face token has no access to this repository")
                } else {
                    anyhow!("{what}: access denied (HTTP {code}): the repository is gated or private; set HF_TOKEN (or log in with `huggingface-cli login`) with a token that has access")
                }
            }
            ureq::Error::StatusCode(404) => match file {
                Some(f) => anyhow!("{label}: {f} is not on {endpoint} (HTTP 404)"),
                None => anyhow!("{label}: no such model or revision on {endpoint} (HTTP 404)"),
            },
            ureq::Error::StatusCode(code) => anyhow!("{what}: the hub at {endpoint} answered HTTP {code}"),
            other => anyhow!(
                "{what}: cannot download from {endpoint}: {other}; check the network (a partial download resumes on the next run), or use HF_HUB_OFFLINE=1 with a cached model"
            ),
        },
        ApiError::IoError(io) => anyhow!(
            "{what}: the download failed: {io}; a partial file is kept for resuming, run again"
        ),
        ApiError::MissingHeader(h) => anyhow!("{what}: {endpoint} answered without the `{h}` header: is HF_ENDPOINT a Hugging Face hub?"),
        ApiError::LockAcquisition(p) => anyhow!("{what}: another process is downloading {} right now", p.display()),
        other => anyhow!("{what}: download failed: {other}"),
    }
}

/// A per-file progress line on a terminal (bytes, rate, ETA), redrawn in place; nothing when
/// stderr is not a terminal.
struct DownloadProgress {
    tty: bool,
    name: String,
    total: usize,
    done: usize,
    started: Instant,
    /// Bytes already on disk when a download resumed (not counted in the rate).
    resumed_at: usize,
    /// hf-hub reports a resumed file's existing bytes as the first update after `init`.
    first_update: bool,
    last_draw: Option<Instant>,
}

impl DownloadProgress {
    fn new(tty: bool) -> Self {
        Self {
            tty,
            name: String::new(),
            total: 0,
            done: 0,
            started: Instant::now(),
            resumed_at: 0,
            first_update: false,
            last_draw: None,
        }
    }

    fn draw(&mut self, force: bool) {
        if !self.tty {
            return;
        }
        let now = Instant::now();
        if !force && self.last_draw.is_some_and(|t| now - t < Duration::from_millis(100)) {
            return;
        }
        self.last_draw = Some(now);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = self.done.saturating_sub(self.resumed_at) as f64 / secs;
        let pct = if self.total > 0 {
            self.done as f64 * 100.0 / self.total as f64
        } else {
            100.0
        };
        let eta = if rate > 0.0 {
            format!("{:.0}s", (self.total.saturating_sub(self.done)) as f64 / rate)
        } else {
            "?".into()
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K  {}  {} / {}  {pct:5.1}%  {}/s  ETA {eta}",
            self.name,
            human_bytes(self.done as u64),
            human_bytes(self.total as u64),
            human_bytes(rate as u64)
        );
        let _ = err.flush();
    }
}

impl Progress for DownloadProgress {
    fn init(&mut self, size: usize, filename: &str) {
        self.total = size;
        self.name = filename.to_string();
        self.done = 0;
        self.resumed_at = 0;
        self.first_update = true;
        self.started = Instant::now();
        self.draw(true);
    }

    fn update(&mut self, size: usize) {
        if std::mem::take(&mut self.first_update) {
            self.resumed_at = size;
        }
        self.done += size;
        self.draw(false);
    }

    fn finish(&mut self) {
        if self.tty {
            self.draw(true);
            eprintln!();
        }
    }
}

/// `1.5 GB`, `876.1 MB`, `12.0 KB`.
pub fn human_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} KB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

/// One cached model revision, for `zagreus list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CachedModel {
    pub model: String,
    pub revision: String,
    pub commit: String,
    pub size_bytes: u64,
    pub complete: bool,
    pub path: PathBuf,
}

/// Every model revision in the cache (complete or not), sorted by name.
pub fn list_cached(cfg: &HubConfig) -> Result<Vec<CachedModel>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&cfg.cache_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("cannot read the cache {}", cfg.cache_dir.display())),
    };
    for entry in entries.flatten() {
        let folder = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = folder.strip_prefix("models--") else {
            continue;
        };
        let model = rest.replace("--", "/");
        let dir = entry.path();
        let size = dir_size(&dir.join("blobs"));
        let mut revs: Vec<(String, String)> = Vec::new();
        collect_refs(&dir.join("refs"), "", &mut revs);
        if revs.is_empty() {
            // Snapshots reached by commit only.
            for snap in std::fs::read_dir(dir.join("snapshots")).into_iter().flatten().flatten() {
                let c = snap.file_name().to_string_lossy().to_string();
                revs.push((c.clone(), c));
            }
        }
        for (revision, commit) in revs {
            let complete = missing_in_snapshot(cfg, &model, &commit).is_empty();
            out.push(CachedModel {
                model: model.clone(),
                revision,
                path: dir.join("snapshots").join(&commit),
                commit,
                size_bytes: size,
                complete,
            });
        }
    }
    out.sort_by(|a, b| (&a.model, &a.revision).cmp(&(&b.model, &b.revision)));
    Ok(out)
}

fn collect_refs(dir: &Path, prefix: &str, out: &mut Vec<(String, String)>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = format!("{prefix}{}", e.file_name().to_string_lossy());
        if e.path().is_dir() {
            collect_refs(&e.path(), &format!("{name}/"), out);
        } else if let Ok(commit) = std::fs::read_to_string(e.path()) {
            out.push((name, commit.trim().to_string()));
        }
    }
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}
