//! The hub's HTTP protocol, as huggingface_hub speaks it: the repo-info API
//! (`/api/models/{repo}/revision/{rev}`), a `HEAD` of `/{repo}/resolve/{rev}/{file}` for a
//! file's commit, hash and size (`X-Repo-Commit`, `X-Linked-Etag`/`ETag`,
//! `X-Linked-Size`/`Content-Length`), and ranged `GET`s of the same URL for its bytes.
//!
//! Everything the server says is validated before use: commit shas and ETags as names
//! ([`super::names`]), sizes as numbers, JSON bodies with a size limit.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use super::names::{self, Digest};
use super::HubConfig;

/// Largest repo-info answer read (a repository listing tens of thousands of files).
const INFO_LIMIT: u64 = 32 << 20;

pub struct HubClient {
    endpoint: String,
    token: Option<String>,
    /// Follows redirects (downloads go to a CDN); the token is dropped on the way.
    agent: ureq::Agent,
    /// Follows none: a file's metadata is in the hub's own answer, not the CDN's.
    head_agent: ureq::Agent,
}

/// What the repo-info API says about a revision.
pub struct RepoInfo {
    /// The commit the revision resolves to (validated).
    pub sha: String,
    /// The repository's file names.
    pub files: BTreeSet<String>,
}

/// What the hub says about one file.
#[derive(Debug, Clone)]
pub struct FileMeta {
    pub commit: String,
    pub digest: Digest,
    pub size: u64,
    pub url: String,
}

/// A failed request: an HTTP status, a transport error, or an answer that breaks the protocol
/// (a value that fails validation).
pub enum Failure {
    Status(u16),
    Transport(String),
    Invalid(String),
}

impl HubClient {
    pub fn new(cfg: &HubConfig) -> Self {
        let build = |redirects: u32| -> ureq::Agent {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(redirects)
                .max_redirects_will_error(false)
                .timeout_connect(Some(Duration::from_secs(30)))
                .timeout_recv_response(Some(Duration::from_secs(60)))
                // A server that stops sending mid-file is a failed (resumable) download, not a hang.
                .timeout_per_read(Some(Duration::from_secs(60)))
                .user_agent(format!("zagreus/{}", env!("CARGO_PKG_VERSION")))
                .build()
                .into()
        };
        Self {
            endpoint: cfg.endpoint.clone(),
            token: cfg.token.clone(),
            agent: build(10),
            head_agent: build(0),
        }
    }

    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => req.header("Authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    /// The repo-info API for `repo` at `revision`.
    pub fn info(&self, repo: &str, revision: &str) -> Result<RepoInfo, Failure> {
        let url = format!(
            "{}/api/models/{repo}/revision/{}",
            self.endpoint,
            names::url_segment(revision)
        );
        let resp = self
            .auth(self.agent.get(&url))
            .call()
            .map_err(|e| Failure::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(Failure::Status(status));
        }
        let body = resp
            .into_body()
            .with_config()
            .limit(INFO_LIMIT)
            .read_to_vec()
            .map_err(|e| Failure::Transport(format!("reading the repo info: {e}")))?;
        let json: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| Failure::Invalid(format!("the repo info is not JSON: {e}")))?;
        let sha = json
            .get("sha")
            .and_then(|s| s.as_str())
            .ok_or_else(|| Failure::Invalid("the repo info has no `sha`".into()))?;
        let sha = names::commit(sha, "the repo info's `sha`").map_err(|e| Failure::Invalid(e.to_string()))?;
        let files = json
            .get("siblings")
            .and_then(|s| s.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.get("rfilename").and_then(|n| n.as_str()).map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        Ok(RepoInfo { sha, files })
    }

    /// The resolve URL of `name` at `commit`.
    pub fn file_url(&self, repo: &str, commit: &str, name: &str) -> String {
        format!("{}/{repo}/resolve/{commit}/{}", self.endpoint, names::url_segment(name))
    }

    /// The commit, hash and size of `name` at `commit`, from a `HEAD` request.
    pub fn meta(&self, repo: &str, commit: &str, name: &str) -> Result<FileMeta, Failure> {
        let mut target = self.file_url(repo, commit, name);
        let mut hops = 0;
        let resp = loop {
            let resp = self
                .auth(self.head_agent.head(&target))
                .call()
                .map_err(|e| Failure::Transport(e.to_string()))?;
            let status = resp.status().as_u16();
            if !(200..400).contains(&status) {
                return Err(Failure::Status(status));
            }
            // A renamed repository answers with a redirect on the hub itself (a relative one,
            // without the file's headers), which huggingface_hub follows; a redirect to the CDN
            // carries the headers already.
            let relative = resp
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .filter(|l| l.starts_with('/') && !l.starts_with("//"))
                .map(String::from);
            match relative {
                Some(loc) if resp.headers().get("x-repo-commit").is_none() && hops < 5 => {
                    hops += 1;
                    target = format!("{}{loc}", self.endpoint);
                }
                _ => break resp,
            }
        };
        let status = resp.status().as_u16();
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        let invalid = |e: anyhow::Error| Failure::Invalid(e.to_string());
        let commit = names::commit(
            header("x-repo-commit").ok_or_else(|| Failure::Invalid("no X-Repo-Commit header".into()))?,
            "the X-Repo-Commit header",
        )
        .map_err(invalid)?;
        let etag = header("x-linked-etag")
            .or_else(|| header("etag"))
            .ok_or_else(|| Failure::Invalid("no ETag header".into()))?;
        let digest = names::etag(etag).map_err(invalid)?;
        // A redirect's Content-Length is the redirect's own: only X-Linked-Size counts then.
        let size = match (header("x-linked-size"), status) {
            (Some(s), _) => Some(s),
            (None, 200) => header("content-length"),
            _ => None,
        }
        .ok_or_else(|| Failure::Invalid("no size (X-Linked-Size or Content-Length)".into()))?;
        let size: u64 = size
            .parse()
            .map_err(|_| Failure::Invalid(format!("the size `{size}` is not a number")))?;
        Ok(FileMeta {
            commit,
            digest,
            size,
            url: target,
        })
    }

    /// `GET` of `url` from byte `from` on (a resumed download asks for the rest only).
    pub fn get_from(&self, url: &str, from: u64) -> Result<ureq::http::Response<ureq::Body>, Failure> {
        let mut req = self.auth(self.agent.get(url));
        if from > 0 {
            req = req.header("Range", format!("bytes={from}-"));
        }
        let resp = req.call().map_err(|e| Failure::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        if status != 200 && status != 206 {
            return Err(Failure::Status(status));
        }
        Ok(resp)
    }
}

/// The first byte of a `206` answer's `Content-Range: bytes A-B/N`.
pub fn range_start(resp: &ureq::http::Response<ureq::Body>) -> Result<u64> {
    let v = resp
        .headers()
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .context("a partial answer without Content-Range")?;
    let start = v
        .trim()
        .strip_prefix("bytes ")
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.trim().parse().ok());
    start.ok_or_else(|| anyhow!("an invalid Content-Range `{v}`"))
}

/// One clear sentence for each way a request fails.
pub fn explain(f: Failure, cfg: &HubConfig, label: &str, file: Option<&str>) -> anyhow::Error {
    let what = match file {
        Some(f) => format!("{label} ({f})"),
        None => label.to_string(),
    };
    let endpoint = &cfg.endpoint;
    match f {
        Failure::Status(code @ (401 | 403)) => {
            if cfg.token.is_some() {
                anyhow!("{what}: access denied (HTTP {code}): your Hugging Face token has no access to this repository")
            } else {
                anyhow!("{what}: access denied (HTTP {code}): the repository is gated or private; set HF_TOKEN (or log in with `huggingface-cli login`) with a token that has access")
            }
        }
        Failure::Status(404) => match file {
            Some(f) => anyhow!("{label}: {f} is not on {endpoint} (HTTP 404)"),
            None => anyhow!("{label}: no such model or revision on {endpoint} (HTTP 404)"),
        },
        Failure::Status(code) => anyhow!("{what}: the hub at {endpoint} answered HTTP {code}"),
        Failure::Transport(msg) => anyhow!(
            "{what}: cannot download from {endpoint}: {msg}; check the network (a partial download resumes on the next run), or use HF_HUB_OFFLINE=1 with a cached model"
        ),
        Failure::Invalid(msg) => protocol(cfg, &what, msg),
    }
}

/// A `bail!` for a response that breaks the protocol.
pub fn protocol(cfg: &HubConfig, what: &str, msg: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{what}: the hub at {} answered wrongly: {msg}", cfg.endpoint)
}

/// Refuses a size no file of a model has (a lying header must not make us reserve terabytes).
pub fn check_size(cfg: &HubConfig, what: &str, size: u64) -> Result<()> {
    const MAX_FILE: u64 = 1 << 40;
    if size > MAX_FILE {
        return Err(protocol(cfg, what, format!("a size of {size} bytes")));
    }
    Ok(())
}
