//! `zagreus list`: the model revisions in the cache. The walk never follows a symbolic link
//! (a `refs` loop cannot trap it), never opens anything but a regular file (a FIFO cannot block
//! it), and reports a ref that does not hold a commit sha instead of following it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::cache::RepoCache;
use super::names;
use super::{missing_in_snapshot, HubConfig};

/// How deep `refs/` is walked (`refs/pr/1` is two levels).
const MAX_REF_DEPTH: usize = 8;

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

/// Every model revision in the cache (complete or not), sorted by name. Refs that do not name a
/// commit are left out with a warning on stderr.
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
        let model = rest.replacen("--", "/", 1);
        let real_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !real_dir || !crate::source::is_hub_id(&model) {
            continue;
        }
        let cache = RepoCache::new(&cfg.cache_dir, &model)?;
        let dir = entry.path();
        let size = dir_size(&dir.join("blobs"));
        let mut refs = Vec::new();
        collect_refs(&dir.join("refs"), "", 0, &mut refs);
        let mut revs: Vec<(String, String)> = Vec::new();
        for name in refs {
            match cache.read_ref(&name) {
                Ok(Some(commit)) => revs.push((name, commit)),
                Ok(None) => {}
                Err(e) => crate::note!("zagreus: warning: {model}@{name} is left out: {e:#}"),
            }
        }
        if revs.is_empty() {
            // Snapshots reached by commit only.
            for snap in std::fs::read_dir(dir.join("snapshots")).into_iter().flatten().flatten() {
                let c = snap.file_name().to_string_lossy().to_string();
                if names::is_commit(&c) && snap.file_type().is_ok_and(|t| t.is_dir()) {
                    revs.push((c.clone(), c));
                }
            }
        }
        for (revision, commit) in revs {
            let complete = missing_in_snapshot(&cache, &commit).is_ok_and(|m| m.is_empty());
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

/// The names of the ref files under `dir` (regular files only, links never followed).
fn collect_refs(dir: &Path, prefix: &str, depth: usize, out: &mut Vec<String>) {
    if depth > MAX_REF_DEPTH {
        return;
    }
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = format!("{prefix}{}", e.file_name().to_string_lossy());
        let Ok(kind) = e.file_type() else { continue };
        if kind.is_dir() {
            collect_refs(&e.path(), &format!("{name}/"), depth + 1, out);
        } else if kind.is_file() {
            out.push(name);
        } else {
            crate::note!(
                "zagreus: warning: {} is not a regular file; left out",
                e.path().display()
            );
        }
    }
}

/// Bytes of the regular files directly in `dir`.
fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_type().ok().filter(|t| t.is_file()).and(e.metadata().ok()))
        .map(|m| m.len())
        .sum()
}
