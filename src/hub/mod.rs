//! Models by hub id: downloads into the Hugging Face cache (the layout Python's huggingface_hub
//! uses, so either tool reuses the other's downloads) and resolves fully cached models without
//! touching the network. `HF_HUB_OFFLINE=1` / `--offline` use the cache only.
//!
//! The hub is not trusted: zagreus speaks its protocol itself (on `ureq`) rather than through
//! the hf-hub crate, because hf-hub (0.5, and 1.0 alike) joins the ETag and commit sha the server
//! sends straight into cache paths and keeps a short download as complete. Here every value that
//! becomes a path is validated ([`names`]), every path followed stays inside the repository's
//! cache folder ([`cache`]), and every file is checked against the size and hash the hub
//! announced before it joins a snapshot ([`download`]).

mod cache;
mod download;
mod http;
mod list;
pub mod names;
mod progress;

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};

use crate::model::weights::{INDEX_FILE, SINGLE_FILE};
use crate::source::ModelFiles;
use cache::RepoCache;
use http::HubClient;
pub use list::{list_cached, CachedModel};

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
            .or_else(|| crate::bounded::read_text(&token_path, crate::bounded::TOKEN_FILE_LIMIT, "the token file").ok())
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

/// The commit `rev` points to in the cache, if it was resolved before.
fn cached_commit(cache: &RepoCache, rev: &str) -> Result<Option<String>> {
    if names::is_commit(rev) && cache.snapshot(rev)?.is_dir() {
        return Ok(Some(rev.to_string()));
    }
    cache.read_ref(rev)
}

/// What is missing from a cached snapshot for the model to run (empty: complete). A file that
/// leads outside the cache is an error.
fn missing_in_snapshot(cache: &RepoCache, commit: &str) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for f in REQUIRED {
        if cache.file(commit, f)?.is_none() {
            missing.push(f.to_string());
        }
    }
    for f in OPTIONAL_KNOWN {
        if cache.file(commit, f)?.is_none() && !cache.known_missing(commit, f) {
            missing.push(f.to_string());
        }
    }
    match cache.file(commit, INDEX_FILE)? {
        Some(index) => match shard_names(&index) {
            Ok(shards) => {
                for s in shards {
                    if cache.file(commit, &s)?.is_none() {
                        missing.push(s);
                    }
                }
            }
            Err(_) => missing.push(format!("shards listed in {INDEX_FILE}")),
        },
        None => {
            if cache.file(commit, SINGLE_FILE)?.is_none() {
                missing.push(SINGLE_FILE.to_string());
            }
        }
    }
    Ok(missing)
}

/// The shard names a safetensors index lists, each a plain file name.
fn shard_names(index: &std::path::Path) -> Result<BTreeSet<String>> {
    let text = crate::bounded::read_text(index, crate::bounded::JSON_CONFIG_LIMIT, "the safetensors index")?;
    crate::model::weights::parse_index(&text).map_err(|e| anyhow!("invalid {}: {e:#}", index.display()))
}

/// Resolves a hub model to files on disk, downloading what is missing unless offline.
pub fn resolve(repo: &str, revision: Option<&str>, cfg: &HubConfig) -> Result<ModelFiles> {
    let rev = names::revision(revision.unwrap_or("main"))?;
    let label = label(repo, revision);
    let cache = RepoCache::new(&cfg.cache_dir, repo)?;
    if let Some(commit) = cached_commit(&cache, rev)? {
        if missing_in_snapshot(&cache, &commit)?.is_empty() {
            return snapshot_files(&cache, &commit, &label);
        }
    }
    if cfg.offline {
        let dir = cfg.cache_dir.display();
        return Err(match cached_commit(&cache, rev)? {
            None => anyhow!("offline: {label} is not in the cache ({dir}); download it first with `zagreus pull {label}` while online"),
            Some(commit) => anyhow!(
                "offline: {label} is only partly cached ({dir}): missing {}; run `zagreus pull {label}` while online",
                missing_in_snapshot(&cache, &commit)?.join(", ")
            ),
        });
    }
    download(repo, rev, &label, cfg, false)
}

/// `zagreus pull`: downloads what is missing and checks what is cached against the hub (sizes
/// and hashes), replacing any file that does not match; a cache damaged by an interrupted or
/// lying download is repaired here.
pub fn pull(repo: &str, revision: Option<&str>, cfg: &HubConfig) -> Result<ModelFiles> {
    let rev = names::revision(revision.unwrap_or("main"))?;
    download(repo, rev, &label(repo, revision), cfg, true)
}

fn label(repo: &str, revision: Option<&str>) -> String {
    match revision {
        Some(r) => format!("{repo}@{r}"),
        None => repo.to_string(),
    }
}

/// The model files of a cached snapshot, each checked to lie inside the cache.
fn snapshot_files(cache: &RepoCache, commit: &str, label: &str) -> Result<ModelFiles> {
    let mut files = ModelFiles::from_dir(&cache.snapshot(commit)?)?;
    let mut all = vec![&files.config, &files.tokenizer];
    all.extend(files.weights.iter());
    all.extend(
        [&files.generation_config, &files.tokenizer_config, &files.chat_template]
            .into_iter()
            .flatten(),
    );
    for p in all {
        cache.inside(p)?;
    }
    files.name = label.to_string();
    Ok(files)
}

/// One download session: the client, the cache, and the commit every file must come from.
struct Fetcher<'a> {
    client: HubClient,
    cfg: &'a HubConfig,
    cache: RepoCache,
    repo: &'a str,
    commit: String,
    label: &'a str,
    tty: bool,
    /// Check cached files against the hub's hashes too (`pull`).
    verify: bool,
}

impl Fetcher<'_> {
    /// Makes `name` part of the snapshot: a verified blob and a link to it.
    fn fetch(&self, name: &str) -> Result<PathBuf> {
        let name = names::file_name(name, "the file")?;
        if !self.verify {
            if let Some(p) = self.cache.file(&self.commit, name)? {
                return Ok(p);
            }
        }
        let meta = self
            .client
            .meta(self.repo, &self.commit, name)
            .map_err(|f| http::explain(f, self.cfg, self.label, Some(name)))?;
        if meta.commit != self.commit {
            bail!(
                "{} changed on the hub while downloading ({name} is from commit {}, not {}); run again",
                self.label,
                meta.commit,
                self.commit
            );
        }
        if self.verify {
            let linked = self.cache.file(&self.commit, name)?;
            let points_to_blob = linked
                .as_ref()
                .and_then(|p| std::fs::canonicalize(p).ok())
                .is_some_and(|real| real.file_name().is_some_and(|n| n == meta.digest.name()));
            if points_to_blob && download::blob_ok(&self.cache, &meta, true)? {
                return self.cache.link(&self.commit, name, &meta.digest);
            }
            if linked.is_some() {
                crate::note!(
                    "zagreus: {} ({name}) in the cache does not match the hub: downloading it again",
                    self.label
                );
            }
            self.cache.unlink(&self.commit, name)?;
            download::blob_ok(&self.cache, &meta, true)?;
        }
        download::fetch_blob(&self.client, self.cfg, &self.cache, &meta, name, self.label, self.tty)?;
        self.cache.link(&self.commit, name, &meta.digest)
    }
}

fn download(repo: &str, rev: &str, label: &str, cfg: &HubConfig, verify: bool) -> Result<ModelFiles> {
    let client = HubClient::new(cfg);
    let info = client.info(repo, rev).map_err(|f| http::explain(f, cfg, label, None))?;
    let names = &info.files;
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
            format!(" (it has {ggufs} GGUF files: pick one with {label}:QUANT, e.g. :Q8_0)")
        } else {
            String::new()
        };
        bail!("{label} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}){hint}");
    };
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let fetcher = Fetcher {
        client,
        cfg,
        cache: RepoCache::new(&cfg.cache_dir, repo)?,
        repo,
        commit: info.sha.clone(),
        label,
        tty,
        verify,
    };
    crate::note!("zagreus: downloading {label} into {}", cfg.cache_dir.display());
    // Remember which commit this revision resolved to (as huggingface_hub does before the files):
    // later runs need no network, and an interrupted download is known as partial.
    if !names::is_commit(rev) {
        fetcher.cache.write_ref(rev, &fetcher.commit)?;
    }
    for f in REQUIRED {
        fetcher.fetch(f)?;
    }
    for f in OPTIONAL {
        if names.contains(*f) {
            fetcher.fetch(f)?;
        } else {
            // Remember the absence, as huggingface_hub does, so a cached model is known complete.
            fetcher.cache.mark_missing(&fetcher.commit, f)?;
        }
    }
    let entry = fetcher.fetch(weights_entry)?;
    if weights_entry == INDEX_FILE {
        for shard in shard_names(&entry)? {
            if !names.contains(&shard) {
                bail!("{label}: {INDEX_FILE} lists {shard}, which the repo does not have");
            }
            fetcher.fetch(&shard)?;
        }
    }
    if tty {
        crate::note!(
            "zagreus: downloaded {label} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    snapshot_files(&fetcher.cache, &fetcher.commit, label)
}

/// Resolves a GGUF file of a hub repo by its quantization tag (`owner/name:Q8_0`), from the cache
/// when it is there, else downloading just that file (`verify`: `pull`, which also checks a
/// cached file against the hub).
pub fn resolve_gguf(repo: &str, revision: Option<&str>, tag: &str, cfg: &HubConfig, verify: bool) -> Result<PathBuf> {
    let rev = names::revision(revision.unwrap_or("main"))?;
    let label = format!("{}:{tag}", label(repo, revision));
    let cache = RepoCache::new(&cfg.cache_dir, repo)?;
    if !verify {
        if let Some(commit) = cached_commit(&cache, rev)? {
            if let Some(name) = pick_gguf(&cache.snapshot_names(&commit), tag) {
                if let Some(path) = cache.file(&commit, &name)? {
                    return Ok(path);
                }
            }
        }
    }
    if cfg.offline {
        bail!(
            "offline: {label} is not in the cache ({}); download it first with `zagreus pull {label}` while online",
            cfg.cache_dir.display()
        );
    }
    let client = HubClient::new(cfg);
    let info = client
        .info(repo, rev)
        .map_err(|f| http::explain(f, cfg, &label, None))?;
    let names: Vec<String> = info.files.iter().cloned().collect();
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
    crate::note!(
        "zagreus: downloading {name} from {repo} into {}",
        cfg.cache_dir.display()
    );
    let fetcher = Fetcher {
        client,
        cfg,
        cache,
        repo,
        commit: info.sha.clone(),
        label: &label,
        tty: std::io::stderr().is_terminal(),
        verify,
    };
    let path = fetcher.fetch(&name)?;
    if !names::is_commit(rev) {
        fetcher.cache.write_ref(rev, &fetcher.commit)?;
    }
    Ok(path)
}

/// The GGUF file whose name carries quantization `tag` (case-insensitive), preferring the
/// shortest name where several match.
fn pick_gguf(names: &[String], tag: &str) -> Option<String> {
    let tag = tag.to_ascii_lowercase();
    names
        .iter()
        .filter(|n| n.ends_with(".gguf") && names::file_name(n, "").is_ok())
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
