//! Values a hub hands out that become parts of paths in the cache: commit shas, ETags (the names
//! of blobs), revisions and refs, file names. A hub or a mirror (`HF_ENDPOINT`) is not trusted,
//! nor is a cache someone else wrote to: each value is checked here before it touches a path, so
//! that `../`, an absolute path, a NUL or a backslash never reaches the file system.

use anyhow::{bail, Result};

/// Longest revision, ref or file name accepted (a path component on most file systems).
const MAX_NAME: usize = 255;

/// A git commit sha: 40 lowercase hex digits.
pub fn commit(s: &str, what: &str) -> Result<String> {
    if s.len() == 40 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Ok(s.to_string());
    }
    bail!("{what} `{}` is not a commit sha (40 hex digits)", printable(s))
}

/// Whether `s` is a commit sha.
pub fn is_commit(s: &str) -> bool {
    commit(s, "").is_ok()
}

/// What a blob's name promises about its bytes: the hub names LFS files by their sha256 and
/// other files by their git blob sha1, and so does the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Digest {
    Sha256(String),
    GitSha1(String),
}

impl Digest {
    /// The blob's file name in the cache.
    pub fn name(&self) -> &str {
        match self {
            Digest::Sha256(h) | Digest::GitSha1(h) => h,
        }
    }
}

/// The blob an ETag names: `"<hex>"` or `W/"<hex>"`, 64 hex digits (sha256) or 40 (git sha1).
pub fn etag(raw: &str) -> Result<Digest> {
    let t = raw.trim();
    let t = t.strip_prefix("W/").unwrap_or(t).trim_matches('"').to_ascii_lowercase();
    let hex = t.bytes().all(|b| b.is_ascii_hexdigit());
    match t.len() {
        64 if hex => Ok(Digest::Sha256(t)),
        40 if hex => Ok(Digest::GitSha1(t)),
        _ => bail!("the ETag `{}` is not a file hash (64 or 40 hex digits)", printable(raw)),
    }
}

/// A revision (`main`, `v1.0`, `refs/pr/1`, a commit sha) by git's rules for ref names
/// (`git check-ref-format --allow-onelevel`), which also keep it inside `refs/` as a path.
pub fn revision(s: &str) -> Result<&str> {
    let bad = |why: &str| -> Result<&str> { bail!("revision `{}` is not a valid git ref name: {why}", printable(s)) };
    if s.is_empty() || s.len() > MAX_NAME {
        return bad("it must have 1 to 255 bytes");
    }
    if s == "@" || s.contains("@{") {
        return bad("`@` alone and `@{` are not allowed");
    }
    if s.contains("..") {
        return bad("it contains `..`");
    }
    if let Some(c) = s.chars().find(|c| c.is_ascii_control() || " ~^:?*[\\".contains(*c)) {
        return bad(&format!("it contains {c:?}"));
    }
    if s.starts_with('/') || s.ends_with('/') || s.contains("//") {
        return bad("it starts or ends with `/`, or has an empty part");
    }
    if s.ends_with('.') {
        return bad("it ends with `.`");
    }
    for part in s.split('/') {
        if part.starts_with('.') || part.ends_with(".lock") {
            return bad("a part starts with `.` or ends with `.lock`");
        }
    }
    Ok(s)
}

/// A file name of the repository's top level, used as one path component of a snapshot.
pub fn file_name<'a>(s: &'a str, what: &str) -> Result<&'a str> {
    let ok = !s.is_empty()
        && s.len() <= MAX_NAME
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == '\\' || c.is_control());
    if !ok {
        bail!("{what} `{}` is not a plain file name", printable(s));
    }
    Ok(s)
}

/// `s` for an error message: control characters escaped, at most 80 characters.
fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(80).flat_map(|c| c.escape_debug()).collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    out
}

/// Percent-encodes `s` as one URL path segment (every byte but unreserved ones).
pub fn url_segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_are_40_lowercase_hex_digits() {
        assert!(is_commit("0123456789abcdef0123456789abcdef01234567"));
        for bad in [
            "../../x",
            "/etc",
            "0123456789abcdef0123456789abcdef0123456",
            "0123456789ABCDEF0123456789abcdef01234567",
            "0123456789abcdef0123456789abcdef0123456g",
            "",
        ] {
            assert!(!is_commit(bad), "{bad}");
        }
    }

    #[test]
    fn etags_name_blobs_only_when_they_are_hashes() {
        let sha256 = "a".repeat(64);
        assert_eq!(etag(&format!("\"{sha256}\"")).unwrap(), Digest::Sha256(sha256.clone()));
        assert_eq!(
            etag(&format!("W/\"{}\"", "B".repeat(40))).unwrap(),
            Digest::GitSha1("b".repeat(40))
        );
        for bad in [
            "../../../../x/pwned",
            "/tmp/pwned",
            "\"abc\"",
            "",
            &format!("{sha256}/.."),
            "a\0b",
        ] {
            assert!(etag(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn revisions_follow_git_ref_rules() {
        for good in [
            "main",
            "v1.0",
            "refs/pr/1",
            "release-2024_01",
            "0123456789abcdef0123456789abcdef01234567",
        ] {
            assert_eq!(revision(good).unwrap(), good);
        }
        for bad in [
            "../../x", "/abs", "a/../b", "..", ".hidden", "a/.b", "x.lock", "a//b", "a/", "a.", "a b", "a\\b", "a\0b",
            "a:b", "@", "a@{1}", "",
        ] {
            assert!(revision(bad).is_err(), "{bad:?}");
        }
        assert!(revision(&"x".repeat(256)).is_err());
    }

    #[test]
    fn file_names_are_one_plain_component() {
        assert!(file_name("model-00001-of-00002.safetensors", "shard").is_ok());
        for bad in ["", ".", "..", "a/b", "../x", "/x", "a\\b", "a\nb"] {
            assert!(file_name(bad, "shard").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn url_segments_escape_slashes_and_spaces() {
        assert_eq!(url_segment("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(url_segment("a b.gguf"), "a%20b.gguf");
    }
}
