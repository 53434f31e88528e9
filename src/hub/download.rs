//! Downloading one blob into the cache so that only complete, verified bytes ever become part of
//! a snapshot: the file grows as `blobs/<hash>.incomplete` (resumed with a range request after an
//! interruption), its size must be exactly what the hub announced, its bytes must hash to the
//! name the hub gave it (sha256 for LFS files, git's blob sha1 for the others), and only then is
//! it renamed to `blobs/<hash>`. A short or corrupt download is never loaded; a lock file keeps
//! two processes from writing the same blob and is removed afterwards.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha1::Digest as _;

use super::cache::RepoCache;
use super::http::{self, FileMeta, HubClient};
use super::names::Digest;
use super::progress::DownloadProgress;
use super::HubConfig;

/// A running hash of the kind a blob's name promises.
enum Hasher {
    Sha256(sha2::Sha256),
    GitSha1(sha1::Sha1),
}

impl Hasher {
    fn new(digest: &Digest, size: u64) -> Self {
        match digest {
            Digest::Sha256(_) => Hasher::Sha256(sha2::Sha256::new()),
            Digest::GitSha1(_) => {
                // git hashes "blob <size>\0" followed by the content.
                let mut h = sha1::Sha1::new();
                h.update(format!("blob {size}\0").as_bytes());
                Hasher::GitSha1(h)
            }
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::GitSha1(h) => h.update(bytes),
        }
    }

    fn hex(self) -> String {
        let bytes: Vec<u8> = match self {
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::GitSha1(h) => h.finalize().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Hashes a whole file the way its blob name promises.
pub fn hash_file(path: &Path, digest: &Digest, size: u64) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Hasher::new(digest, size);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.hex())
}

/// An exclusive lock on `blobs/<hash>.lock`, removed when released.
struct BlobLock {
    file: File,
    path: PathBuf,
}

impl BlobLock {
    /// Takes the lock, or says that another process holds it.
    fn take(path: &Path, what: &str) -> Result<Self> {
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .with_context(|| format!("cannot write the lock {}", path.display()))?;
            if !try_lock(&file) {
                bail!(
                    "{what}: another process is downloading it right now (it holds {}); wait for it to finish and run again",
                    path.display()
                );
            }
            // The previous holder removes the file before unlocking: make sure ours is the one
            // still at the path, or take the new one.
            if same_file(&file, path) {
                return Ok(Self {
                    file,
                    path: path.to_path_buf(),
                });
            }
        }
    }
}

impl Drop for BlobLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        unlock(&self.file);
    }
}

#[cfg(unix)]
fn try_lock(f: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[cfg(unix)]
fn unlock(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: as above.
    unsafe {
        libc::flock(f.as_raw_fd(), libc::LOCK_UN);
    }
}

#[cfg(unix)]
fn same_file(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn try_lock(_f: &File) -> bool {
    true
}

#[cfg(not(unix))]
fn unlock(_f: &File) {}

#[cfg(not(unix))]
fn same_file(_f: &File, _path: &Path) -> bool {
    true
}

/// Whether the blob `meta` names is in the cache with the announced size (`verify`: and hashes to
/// its name). A blob that fails is removed.
pub fn blob_ok(cache: &RepoCache, meta: &FileMeta, verify: bool) -> Result<bool> {
    let blob = cache.blob(&meta.digest);
    let Ok(m) = std::fs::symlink_metadata(&blob) else {
        return Ok(false);
    };
    let good = m.is_file()
        && m.len() == meta.size
        && (!verify || hash_file(&blob, &meta.digest, meta.size)? == meta.digest.name());
    if !good {
        std::fs::remove_file(&blob).with_context(|| format!("cannot remove the bad blob {}", blob.display()))?;
    }
    Ok(good)
}

/// Downloads the blob `meta` names into the cache (resuming a partial one), verified.
pub fn fetch_blob(
    client: &HubClient,
    cfg: &HubConfig,
    cache: &RepoCache,
    meta: &FileMeta,
    name: &str,
    label: &str,
    tty: bool,
) -> Result<()> {
    let what = format!("{label} ({name})");
    http::check_size(cfg, &what, meta.size)?;
    if blob_ok(cache, meta, false)? {
        return Ok(());
    }
    let blobs = cache.dir().join("blobs");
    std::fs::create_dir_all(&blobs).with_context(|| format!("cannot write to the cache {}", blobs.display()))?;
    cache.inside(&blobs)?;
    let _lock = BlobLock::take(&cache.lock(&meta.digest), &what)?;
    if blob_ok(cache, meta, false)? {
        return Ok(()); // another process finished it meanwhile
    }
    let part = cache.incomplete(&meta.digest);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&part)
        .with_context(|| format!("cannot write {}", part.display()))?;
    let mut have = file.metadata().map(|m| m.len()).unwrap_or(0);
    if have > meta.size {
        have = 0;
    }
    // Hash what an earlier run left, then fetch the rest.
    let mut hasher = Hasher::new(&meta.digest, meta.size);
    if have > 0 {
        let mut left = have;
        let mut buf = vec![0u8; 1 << 20];
        file.seek(SeekFrom::Start(0))?;
        while left > 0 {
            let n = file.read(&mut buf[..left.min(1 << 20) as usize])?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        have -= left;
    }
    file.set_len(have)?;
    file.seek(SeekFrom::Start(have))?;
    if have < meta.size {
        let resp = client
            .get_from(&meta.url, have)
            .map_err(|f| http::explain(f, cfg, label, Some(name)))?;
        if resp.status().as_u16() == 206 {
            let start = http::range_start(&resp).map_err(|e| http::protocol(cfg, &what, e))?;
            if start != have {
                return Err(http::protocol(
                    cfg,
                    &what,
                    format!("asked for bytes from {have} on, it sent them from {start} on"),
                ));
            }
        } else if have > 0 {
            // The whole file again: start over.
            have = 0;
            hasher = Hasher::new(&meta.digest, meta.size);
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
        }
        let mut progress = DownloadProgress::new(tty, name, meta.size, have);
        let mut body = resp.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 16];
        let read_error = loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break Some(e),
            };
            if have + n as u64 > meta.size {
                drop(file);
                let _ = std::fs::remove_file(&part);
                return Err(http::protocol(
                    cfg,
                    &what,
                    format!("it sent more than the {} bytes it announced", meta.size),
                ));
            }
            file.write_all(&buf[..n])
                .with_context(|| format!("cannot write {}", part.display()))?;
            hasher.update(&buf[..n]);
            have += n as u64;
            progress.update(n as u64);
        };
        progress.finish();
        file.flush()?;
        if have < meta.size {
            let why = read_error.map(|e| format!(" ({e})")).unwrap_or_default();
            bail!(
                "{what}: the download stopped after {have} of {} bytes{why}; the partial file is kept and the next run resumes it",
                meta.size
            );
        }
    }
    let got = hasher.hex();
    if got != meta.digest.name() {
        drop(file);
        let _ = std::fs::remove_file(&part);
        bail!(
            "{what}: the downloaded bytes do not match the hash the hub announced ({} expected, {got} received); the download was discarded",
            meta.digest.name()
        );
    }
    file.sync_all()
        .with_context(|| format!("cannot write {}", part.display()))?;
    drop(file);
    let blob = cache.blob(&meta.digest);
    std::fs::rename(&part, &blob).with_context(|| format!("cannot write {}", blob.display()))?;
    Ok(())
}
