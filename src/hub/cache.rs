//! One repository's folder in the Hugging Face cache, in the layout Python's huggingface_hub
//! writes: `refs/<revision>` holding a commit sha, `snapshots/<commit>/<file>` linking to
//! `blobs/<hash>`, and `.no_exist/<commit>/<file>` for files known to be absent.
//!
//! Every path built here comes from validated names ([`super::names`]), and every path followed
//! (a snapshot's symlink, a ref) is checked, after resolving links, to stay inside the
//! repository's folder: a tampered cache cannot make zagreus read or write elsewhere.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::names::{self, Digest};

pub struct RepoCache {
    /// `<cache>/models--owner--name`.
    dir: PathBuf,
}

impl RepoCache {
    /// The folder of `repo` (a validated `owner/name`) under `cache_dir`.
    pub fn new(cache_dir: &Path, repo: &str) -> Result<Self> {
        if !crate::source::is_hub_id(repo) {
            bail!("`{repo}` is not a hub id of the form owner/name");
        }
        Ok(Self {
            dir: cache_dir.join(format!("models--{}", repo.replace('/', "--"))),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn snapshot(&self, commit: &str) -> Result<PathBuf> {
        Ok(self.dir.join("snapshots").join(names::commit(commit, "the commit")?))
    }

    pub fn blob(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join(digest.name())
    }

    /// Where a blob is written until it is complete and verified (the name huggingface_hub uses,
    /// so either tool resumes the other's downloads).
    pub fn incomplete(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join(format!("{}.incomplete", digest.name()))
    }

    pub fn lock(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join(format!("{}.lock", digest.name()))
    }

    /// `path` with every link resolved, if it stays inside the repository's folder; an error
    /// naming it otherwise.
    pub fn inside(&self, path: &Path) -> Result<PathBuf> {
        let root = std::fs::canonicalize(&self.dir)
            .with_context(|| format!("cannot read the cache folder {}", self.dir.display()))?;
        let real = std::fs::canonicalize(path).with_context(|| format!("cannot read {}", path.display()))?;
        if !real.starts_with(&root) {
            bail!(
                "{} leads to {}, outside the cache folder {}; the cache was tampered with: delete {} and download again",
                path.display(),
                real.display(),
                root.display(),
                self.dir.display()
            );
        }
        Ok(real)
    }

    /// The commit `refs/<revision>` names, if the cache has that ref. A ref that holds anything
    /// but a commit sha (a path, a FIFO, a huge file) is an error naming it.
    pub fn read_ref(&self, revision: &str) -> Result<Option<String>> {
        let path = self.dir.join("refs").join(names::revision(revision)?);
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
            Ok(m) if m.is_dir() => return Ok(None),
            Ok(_) => {}
        }
        self.inside(&path)?;
        let text = crate::bounded::read_text(&path, crate::bounded::REF_LIMIT, "the cached ref")?;
        let commit = names::commit(text.trim(), &format!("the cached ref {}", path.display()))
            .with_context(|| format!("delete {} and download again", path.display()))?;
        Ok(Some(commit))
    }

    /// Records that `revision` resolved to `commit` (atomically: a crash leaves the old ref).
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        let path = self.dir.join("refs").join(names::revision(revision)?);
        let commit = names::commit(commit, "the commit")?;
        let parent = path.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(parent).with_context(|| format!("cannot write to the cache {}", parent.display()))?;
        self.inside(parent)?;
        let tmp = parent.join(format!(
            ".{}.zagreus-tmp",
            path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
        ));
        std::fs::write(&tmp, &commit).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
    }

    /// The snapshot's file `name`, resolved and checked to be inside the cache, if present.
    pub fn file(&self, commit: &str, name: &str) -> Result<Option<PathBuf>> {
        let path = self.snapshot(commit)?.join(names::file_name(name, "the file")?);
        if std::fs::symlink_metadata(&path).is_err() {
            return Ok(None);
        }
        if !path.exists() {
            // A dangling link (its blob was deleted): absent.
            return Ok(None);
        }
        let real = self.inside(&path)?;
        if !real.is_file() {
            bail!(
                "{} in the cache is not a regular file; delete {} and download again",
                path.display(),
                self.dir.display()
            );
        }
        Ok(Some(path))
    }

    /// Links the snapshot's `name` to a blob (a relative link, as huggingface_hub makes).
    pub fn link(&self, commit: &str, name: &str, digest: &Digest) -> Result<PathBuf> {
        let snap = self.snapshot(commit)?;
        let name = names::file_name(name, "the file")?;
        std::fs::create_dir_all(&snap).with_context(|| format!("cannot write to the cache {}", snap.display()))?;
        self.inside(&snap)?;
        let path = snap.join(name);
        if std::fs::symlink_metadata(&path).is_ok() {
            std::fs::remove_file(&path).with_context(|| format!("cannot replace {}", path.display()))?;
        }
        let target = Path::new("../../blobs").join(digest.name());
        make_link(&target, &path, &self.blob(digest)).with_context(|| format!("cannot write {}", path.display()))?;
        self.inside(&path)?;
        Ok(path)
    }

    /// Removes the snapshot's link `name` (not its blob).
    pub fn unlink(&self, commit: &str, name: &str) -> Result<()> {
        let path = self.snapshot(commit)?.join(names::file_name(name, "the file")?);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    /// Remembers that the repository has no file `name` at `commit`.
    pub fn mark_missing(&self, commit: &str, name: &str) -> Result<()> {
        let dir = self.dir.join(".no_exist").join(names::commit(commit, "the commit")?);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot write to the cache {}", dir.display()))?;
        self.inside(&dir)?;
        let path = dir.join(names::file_name(name, "the file")?);
        std::fs::File::create(&path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    pub fn known_missing(&self, commit: &str, name: &str) -> bool {
        names::is_commit(commit)
            && names::file_name(name, "").is_ok()
            && std::fs::symlink_metadata(self.dir.join(".no_exist").join(commit).join(name)).is_ok()
    }

    /// The names in the snapshot folder (no checks on what they point to).
    pub fn snapshot_names(&self, commit: &str) -> Vec<String> {
        let Ok(snap) = self.snapshot(commit) else {
            return Vec::new();
        };
        std::fs::read_dir(snap)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect()
    }
}

#[cfg(unix)]
fn make_link(target: &Path, link: &Path, _blob: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn make_link(_target: &Path, link: &Path, blob: &Path) -> std::io::Result<()> {
    // Without symlinks, as huggingface_hub does on Windows: a copy.
    std::fs::copy(blob, link).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> (tempfile::TempDir, RepoCache) {
        let dir = tempfile::tempdir().unwrap();
        let c = RepoCache::new(dir.path(), "org/model").unwrap();
        std::fs::create_dir_all(c.dir().join("refs")).unwrap();
        (dir, c)
    }

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn refs_must_hold_a_commit() {
        let (_d, c) = cache();
        assert_eq!(c.read_ref("main").unwrap(), None);
        c.write_ref("main", SHA).unwrap();
        assert_eq!(c.read_ref("main").unwrap().as_deref(), Some(SHA));
        std::fs::write(c.dir().join("refs/main"), "../../somewhere").unwrap();
        let err = c.read_ref("main").unwrap_err();
        assert!(format!("{err:#}").contains("not a commit sha"), "{err:#}");
        std::fs::write(c.dir().join("refs/main"), "/etc").unwrap();
        assert!(c.read_ref("main").is_err());
        assert!(c.read_ref("../../x").is_err());
        assert!(c.write_ref("main", "../../x").is_err());
    }

    #[cfg(unix)]
    #[test]
    fn links_out_of_the_cache_are_refused() {
        let (d, c) = cache();
        let outside = d.path().join("secret.json");
        std::fs::write(&outside, "{}").unwrap();
        let snap = c.snapshot(SHA).unwrap();
        std::fs::create_dir_all(&snap).unwrap();
        std::os::unix::fs::symlink(&outside, snap.join("config.json")).unwrap();
        let err = c.file(SHA, "config.json").unwrap_err().to_string();
        assert!(err.contains("outside the cache"), "{err}");
        // A link made here to a blob that is inside is fine.
        let digest = Digest::GitSha1("a".repeat(40));
        std::fs::create_dir_all(c.dir().join("blobs")).unwrap();
        std::fs::write(c.blob(&digest), "{}").unwrap();
        c.link(SHA, "config.json", &digest).unwrap();
        assert!(c.file(SHA, "config.json").unwrap().is_some());
        assert!(c.file(SHA, "../config.json").is_err());
    }
}
