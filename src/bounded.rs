//! Bounded reads: every file and stream zagreus reads into memory goes through here, so that a
//! huge file, an endless device (`/dev/zero`) or a FIFO nobody writes to is a one-line error
//! naming the file and the limit, never a hang or an allocation that grows until the process dies.
//!
//! Files that are only memory-mapped (weights) are opened with [`open_regular`], which refuses
//! anything but a regular file without ever blocking on it.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// `config.json`, `generation_config.json`, a safetensors index: a few KB in practice.
pub const JSON_CONFIG_LIMIT: u64 = 16 * MIB;
/// `tokenizer_config.json`: some embed long added-token tables and several templates.
pub const TOKENIZER_CONFIG_LIMIT: u64 = 64 * MIB;
/// `tokenizer.json`: 9 MB for Llama 3, about 33 MB for the largest vocabularies in use.
pub const TOKENIZER_LIMIT: u64 = 256 * MIB;
/// A chat template file; real ones are under 20 KB.
pub const TEMPLATE_LIMIT: u64 = MIB;
/// A `refs/<revision>` file in the hub cache (one commit sha).
pub const REF_LIMIT: u64 = KIB;
/// A Hugging Face token file.
pub const TOKEN_FILE_LIMIT: u64 = 64 * KIB;
/// A conversation saved by the chat's `/save`.
pub const CONVERSATION_LIMIT: u64 = 64 * MIB;
/// A `check-logits` reference (every prompt position's logits).
pub const REFERENCE_LIMIT: u64 = 512 * MIB;
/// Piped stdin, before the model is known: more text than any context in use holds (the exact
/// bound, from the model's context and vocabulary, is checked once the model is loaded).
pub const STDIN_LIMIT: u64 = 32 * MIB;

/// `1.5 MiB`, `512 KiB`, `12 bytes`: for limits in messages.
pub fn size_name(n: u64) -> String {
    if n >= MIB && n.is_multiple_of(MIB) {
        format!("{} MiB", n / MIB)
    } else if n >= KIB && n.is_multiple_of(KIB) {
        format!("{} KiB", n / KIB)
    } else {
        format!("{n} bytes")
    }
}

/// Opens `path` for reading if it is a regular file (following symlinks), without ever blocking:
/// a FIFO, socket or device is refused before it is opened, and the open itself is non-blocking
/// so that a file swapped for a FIFO in between cannot hang either. `what` names the file's role
/// in messages (`"the chat template"`).
pub fn open_regular(path: &Path, what: &str) -> Result<File> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    refuse_special(&meta, path, what)?;
    let file = open_nonblocking(path).with_context(|| format!("cannot open {what} {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    refuse_special(&meta, path, what)?;
    Ok(file)
}

fn refuse_special(meta: &std::fs::Metadata, path: &Path, what: &str) -> Result<()> {
    if meta.is_dir() {
        bail!("{what} {} is a directory, not a file", path.display());
    }
    if !meta.is_file() {
        bail!(
            "{what} {} is not a regular file (a FIFO, socket or device); zagreus reads only regular files",
            path.display()
        );
    }
    Ok(())
}

#[cfg(unix)]
fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

#[cfg(not(unix))]
fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    File::open(path)
}

/// Reads a whole regular file of at most `limit` bytes.
pub fn read_file(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let file = open_regular(path, what)?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > limit {
        bail!(
            "{what} {} is {} bytes, more than the {} zagreus reads for it",
            path.display(),
            len,
            size_name(limit)
        );
    }
    read_limited(file, limit, &format!("{what} {}", path.display()))
}

/// Reads a whole regular UTF-8 text file of at most `limit` bytes.
pub fn read_text(path: &Path, limit: u64, what: &str) -> Result<String> {
    let bytes = read_file(path, limit, what)?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{what} {} is not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// Reads `reader` to its end, refusing more than `limit` bytes (a file that grows while read,
/// a pipe, a device) with an error naming `what`.
pub fn read_limited(reader: impl Read, limit: u64, what: &str) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut buf)
        .with_context(|| format!("cannot read {what}"))?;
    if buf.len() as u64 > limit {
        bail!(
            "{what} is more than {}, the most zagreus reads from it",
            size_name(limit)
        );
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_enforced_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, vec![b'x'; 2000]).unwrap();
        assert_eq!(read_file(&p, 2000, "config").unwrap().len(), 2000);
        let err = read_file(&p, 1999, "config").unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("2000 bytes"), "{err}");
        let err = read_limited(&b"abcdef"[..], 4, "stdin").unwrap_err().to_string();
        assert!(err.contains("stdin") && err.contains("4 bytes"), "{err}");
        let err = read_file(dir.path(), 10, "config").unwrap_err().to_string();
        assert!(err.contains("directory"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn fifos_and_devices_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = read_file(&fifo, 10, "the chat template").unwrap_err().to_string();
        assert!(err.contains("not a regular file") && err.contains("fifo"), "{err}");
        let err = read_file(Path::new("/dev/zero"), 10, "the tokenizer")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/dev/zero"), "{err}");
    }

    #[test]
    fn invalid_utf8_is_named_with_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jinja");
        std::fs::write(&p, [b'o', b'k', 0xff]).unwrap();
        let err = read_text(&p, 10, "the chat template").unwrap_err().to_string();
        assert!(err.contains("t.jinja") && err.contains("offset 2"), "{err}");
    }
}
