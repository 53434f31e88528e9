//! A tiny Hugging Face hub on 127.0.0.1 for tests: the repo-info API, `HEAD` and ranged `GET` of
//! `resolve` URLs with the headers the real hub sends (ETag as the git blob sha1, or for LFS
//! files X-Linked-Etag as the sha256 and X-Linked-Size; X-Repo-Commit; Content-Range), gated
//! repos, 404s, connections cut mid-file, and a hub that lies ([`Lies`]).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

#[derive(Clone)]
pub struct MockRepo {
    pub id: String,
    pub sha: String,
    pub files: BTreeMap<String, Vec<u8>>,
    /// When set, requests need `Authorization: Bearer <token>`.
    pub token: Option<String>,
    pub lies: Lies,
    /// Former ids of the repo: the hub redirects them here (as after a rename).
    pub renamed_from: Vec<String>,
}

/// Ways the hub lies about a repo (a hostile hub or mirror).
#[derive(Clone, Default)]
pub struct Lies {
    /// The ETag of every file.
    pub etag: Option<String>,
    /// The commit sha in the repo info and in X-Repo-Commit.
    pub commit: Option<String>,
    /// This file's body is cut in half (with a matching Content-Length), while HEAD announces
    /// its full size.
    pub short_body: Option<String>,
    /// This file's bytes are altered (same size), while HEAD announces the true hash.
    pub wrong_bytes: Option<String>,
}

impl MockRepo {
    /// A repo holding every file of a local directory.
    pub fn from_dir(id: &str, dir: &Path) -> Self {
        let mut files = BTreeMap::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if e.file_name() == "reference.json" {
                continue;
            }
            files.insert(
                e.file_name().to_string_lossy().to_string(),
                std::fs::read(e.path()).unwrap(),
            );
        }
        let sha = format!("{:040x}", fnv(id.as_bytes()) as u128 * 0x1000_0000_0000_0001);
        Self {
            id: id.to_string(),
            sha: sha[..40].to_string(),
            files,
            token: None,
            lies: Lies::default(),
            renamed_from: Vec::new(),
        }
    }
}

/// Files the real hub stores in LFS (and names by sha256).
fn is_lfs(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".gguf")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 of `data`.
pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(data))
}

/// git's blob sha1 of `data`.
pub fn git_sha1(data: &[u8]) -> String {
    use sha1::Digest;
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", data.len()).as_bytes());
    h.update(data);
    hex(&h.finalize())
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Cut the body of `file` after `after` bytes, for the next `times` full downloads of it.
#[derive(Clone)]
pub struct Cut {
    pub file: String,
    pub after: usize,
    pub times: usize,
}

pub struct MockHub {
    pub url: String,
    pub requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
    thread: Option<JoinHandle<()>>,
}

struct State {
    repos: Vec<MockRepo>,
    cut: Mutex<Option<Cut>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl MockHub {
    pub fn start(repos: Vec<MockRepo>, cut: Option<Cut>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(State {
            repos,
            cut: Mutex::new(cut),
            requests: requests.clone(),
        });
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let state = state.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, &state);
                });
            }
        });
        Self {
            url: format!("http://{addr}"),
            requests,
            stop,
            addr,
            thread: Some(thread),
        }
    }

    pub fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// Stops listening: later connections are refused.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wake the accept loop
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MockHub {
    fn drop(&mut self) {
        self.stop();
    }
}

fn respond(conn: &mut TcpStream, code: u16, headers: &[(String, String)], body: &[u8]) -> std::io::Result<()> {
    respond_as(conn, code, headers, body, body.len(), true)
}

/// An answer with a Content-Length of `len`, with or without its body (HEAD).
fn respond_as(
    conn: &mut TcpStream,
    code: u16,
    headers: &[(String, String)],
    body: &[u8],
    len: usize,
    with_body: bool,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        206 => "Partial Content",
        307 => "Temporary Redirect",
        401 => "Unauthorized",
        403 => "Forbidden",
        _ => "Not Found",
    };
    let mut head = format!("HTTP/1.1 {code} {reason}\r\nContent-Length: {len}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    if with_body {
        conn.write_all(body)?;
    }
    conn.flush()
}

fn handle(mut conn: TcpStream, state: &State) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let method = line.split_whitespace().next().unwrap_or("").to_string();
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    state.requests.lock().unwrap().push(format!("{method} {path}"));
    let head = method == "HEAD";
    let not_found =
        |conn: &mut TcpStream, code: &str| respond(conn, 404, &[("X-Error-Code".into(), code.into())], b"not found");
    let (repo, rest) = if let Some(p) = path.strip_prefix("/api/models/") {
        (
            p.splitn(3, '/').take(2).collect::<Vec<_>>().join("/"),
            ("api", p.to_string()),
        )
    } else {
        let p = path.trim_start_matches('/');
        (
            p.splitn(3, '/').take(2).collect::<Vec<_>>().join("/"),
            ("file", p.to_string()),
        )
    };
    if let Some(r) = state.repos.iter().find(|r| r.renamed_from.contains(&repo)) {
        // A relative redirect on the hub itself, without the file's headers.
        let location = path.replacen(&repo, &r.id, 1);
        return respond(&mut conn, 307, &[("Location".into(), location)], b"");
    }
    let Some(r) = state.repos.iter().find(|r| r.id == repo) else {
        return not_found(&mut conn, "RepoNotFound");
    };
    if let Some(tok) = &r.token {
        match headers.get("authorization") {
            None => return respond(&mut conn, 401, &[], b"unauthorized"),
            Some(v) if *v != format!("Bearer {tok}") => return respond(&mut conn, 403, &[], b"forbidden"),
            _ => {}
        }
    }
    let sha = r.lies.commit.clone().unwrap_or_else(|| r.sha.clone());
    if rest.0 == "api" {
        let rev = rest.1.splitn(4, '/').nth(3).unwrap_or("");
        if rev != "main" && rev != r.sha && rev != sha {
            return not_found(&mut conn, "RevisionNotFound");
        }
        let siblings: Vec<_> = r.files.keys().map(|f| serde_json::json!({ "rfilename": f })).collect();
        let body = serde_json::json!({ "id": r.id, "sha": sha, "siblings": siblings }).to_string();
        return respond(
            &mut conn,
            200,
            &[("Content-Type".into(), "application/json".into())],
            body.as_bytes(),
        );
    }
    // {owner}/{name}/resolve/{rev}/{file}
    let parts: Vec<&str> = rest.1.splitn(5, '/').collect();
    if parts.len() != 5 || parts[2] != "resolve" {
        return not_found(&mut conn, "EntryNotFound");
    }
    if parts[3] != "main" && parts[3] != r.sha && parts[3] != sha {
        return not_found(&mut conn, "RevisionNotFound");
    }
    let name = parts[4];
    let Some(true_data) = r.files.get(name) else {
        return not_found(&mut conn, "EntryNotFound");
    };
    let full_size = true_data.len();
    let mut h = vec![
        ("X-Repo-Commit".to_string(), sha.clone()),
        ("Accept-Ranges".to_string(), "bytes".to_string()),
    ];
    let etag = match &r.lies.etag {
        Some(lie) => lie.clone(),
        None if is_lfs(name) => sha256(true_data),
        None => git_sha1(true_data),
    };
    if is_lfs(name) {
        h.push(("X-Linked-Etag".into(), format!("\"{etag}\"")));
        h.push(("X-Linked-Size".into(), full_size.to_string()));
        h.push(("ETag".into(), format!("\"{}\"", git_sha1(etag.as_bytes()))));
    } else {
        h.push(("ETag".into(), format!("\"{etag}\"")));
    }
    if head {
        return respond_as(&mut conn, 200, &h, b"", full_size, false);
    }
    let mut data = true_data.clone();
    if r.lies.short_body.as_deref() == Some(name) {
        data.truncate(full_size / 2);
    }
    if r.lies.wrong_bytes.as_deref() == Some(name) {
        let mid = data.len() / 2;
        data[mid] ^= 0x55;
    }
    let data = &data;
    let size = data.len();
    let (start, end) = match headers.get("range").and_then(|v| v.strip_prefix("bytes=")) {
        Some(spec) => {
            let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = if b.is_empty() {
                size.saturating_sub(1)
            } else {
                b.parse().unwrap_or(size - 1)
            };
            (a.min(size), (b + 1).min(size))
        }
        None => (0, size),
    };
    let ranged = headers.contains_key("range");
    if ranged {
        h.push((
            "Content-Range".into(),
            format!("bytes {start}-{}/{size}", end.saturating_sub(1)),
        ));
    }
    let body = &data[start..end];
    let mut cut = state.cut.lock().unwrap();
    if let Some(c) = cut.as_mut() {
        if c.file == parts[4] && c.times > 0 && body.len() > 1 {
            c.times -= 1;
            // Promise the whole body, send part of it, and drop the connection.
            let mut head = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (k, v) in &h {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            conn.write_all(head.as_bytes())?;
            conn.write_all(&body[..c.after.min(body.len() - 1)])?;
            conn.flush()?;
            let _ = conn.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
    drop(cut);
    respond(&mut conn, if ranged { 206 } else { 200 }, &h, body)
}
