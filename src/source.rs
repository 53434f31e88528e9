//! Where a model comes from (`--model`): a local directory, a GGUF file, or a hub id (a
//! transformers repo, or a GGUF file in a repo with `:QUANT`). Resolving a source yields the paths
//! of the files a model needs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::model::weights;

/// The model the CLI runs when `--model` is not given.
pub const DEFAULT_MODEL: &str = "mii-llm/open-zagreus-0.4B";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory holding config.json, tokenizer.json and safetensors weights.
    Dir(PathBuf),
    /// A GGUF file.
    Gguf(PathBuf),
    /// A Hugging Face hub repository, `owner/name[@revision][:QUANT]`; with a quantization tag,
    /// the repo's GGUF file of that quantization.
    Hub {
        repo: String,
        revision: Option<String>,
        gguf: Option<String>,
    },
}

/// A resolved model: safetensors files, or one GGUF file.
#[derive(Debug, Clone)]
pub enum Resolved {
    Files(ModelFiles),
    Gguf { path: PathBuf, name: String },
}

/// Whether a file is a GGUF (by its magic bytes). Never blocks: a FIFO or device is no GGUF.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    crate::bounded::open_regular(path, "the model file")
        .ok()
        .is_some_and(|mut f| f.read_exact(&mut magic).is_ok())
        && &magic == b"GGUF"
}

impl ModelSource {
    /// Decides by what exists: an existing path is a directory (or a file); anything else must be
    /// a hub id.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.is_dir() {
                return Ok(Self::Dir(path.to_path_buf()));
            }
            if !meta.is_file() {
                bail!("{spec} is not a regular file or a directory (a FIFO, socket or device?)");
            }
            if spec.ends_with(".gguf") || is_gguf(path) {
                return Ok(Self::Gguf(path.to_path_buf()));
            }
            bail!("{spec} is a file, but neither a GGUF file nor a model directory (config.json, tokenizer.json, *.safetensors)");
        }
        let (rest, gguf) = match spec.rsplit_once(':') {
            Some((r, tag)) if !tag.is_empty() && !tag.contains('/') => (r, Some(tag.to_string())),
            _ => (spec, None),
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((r, rev)) => (r, Some(rev.to_string())),
            None => (rest, None),
        };
        if !is_hub_id(repo) || revision.as_deref() == Some("") {
            let looks_like_path = spec.starts_with('.')
                || spec.starts_with('/')
                || spec.starts_with('~')
                || spec.matches('/').count() > 1;
            if looks_like_path {
                bail!("{spec}: no such directory");
            }
            bail!("{spec}: not a directory or file, and not a hub id of the form owner/name[@revision][:QUANT]");
        }
        Ok(Self::Hub {
            repo: repo.to_string(),
            revision,
            gguf,
        })
    }
}

/// `owner/name` with the characters the hub allows.
pub fn is_hub_id(s: &str) -> bool {
    let ok = |part: &str| {
        !part.is_empty()
            && part.len() <= 96
            && !part.starts_with(['.', '-'])
            && !part.contains("..")
            && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!(s.split_once('/'), Some((owner, name)) if ok(owner) && ok(name))
}

/// Paths of the files one model is made of.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// A short name for messages and `--json` (the directory or hub id).
    pub name: String,
    pub config: PathBuf,
    pub generation_config: Option<PathBuf>,
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub chat_template: Option<PathBuf>,
    pub weights: Vec<PathBuf>,
}

impl ModelFiles {
    /// The files of a local model directory; missing required files are named in the error.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let required = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if !p.is_file() {
                bail!("{} has no {name}", dir.display());
            }
            Ok(p)
        };
        let optional = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        Ok(Self {
            name: dir.display().to_string(),
            config: required("config.json")?,
            generation_config: optional("generation_config.json"),
            tokenizer: required("tokenizer.json")?,
            tokenizer_config: optional("tokenizer_config.json"),
            chat_template: optional("chat_template.jinja"),
            weights: weights::safetensors_files(dir)?,
        })
    }
}

/// Resolves `--model` to files on disk: a directory or GGUF file as is, a hub id through the
/// cache (downloading what is missing unless `offline`).
pub fn resolve(spec: &str, offline: bool) -> Result<Resolved> {
    Ok(match ModelSource::parse(spec)? {
        ModelSource::Dir(dir) => Resolved::Files(ModelFiles::from_dir(&dir)?),
        ModelSource::Gguf(path) => Resolved::Gguf {
            name: path.display().to_string(),
            path,
        },
        ModelSource::Hub {
            repo,
            revision,
            gguf: None,
        } => Resolved::Files(crate::hub::resolve(
            &repo,
            revision.as_deref(),
            &crate::hub::HubConfig::from_env(offline),
        )?),
        ModelSource::Hub {
            repo,
            revision,
            gguf: Some(tag),
        } => {
            let cfg = crate::hub::HubConfig::from_env(offline);
            let path = crate::hub::resolve_gguf(&repo, revision.as_deref(), &tag, &cfg, false)?;
            Resolved::Gguf {
                path,
                name: format!("{repo}:{tag}"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hub_ids_and_rejects_malformed_ones() {
        assert_eq!(
            ModelSource::parse("mii-llm/open-zagreus-0.4B@main").unwrap(),
            ModelSource::Hub {
                repo: "mii-llm/open-zagreus-0.4B".into(),
                revision: Some("main".into()),
                gguf: None
            }
        );
        assert_eq!(
            ModelSource::parse("some-org/some-repo:Q8_0").unwrap(),
            ModelSource::Hub {
                repo: "some-org/some-repo".into(),
                revision: None,
                gguf: Some("Q8_0".into())
            }
        );
        assert!(matches!(
            ModelSource::parse("giux78/Open-Zagreus-0.4B"),
            Ok(ModelSource::Hub { revision: None, .. })
        ));
        for bad in [
            "just-a-name",
            "a/b/c/d",
            "./missing/dir",
            "owner/",
            "/abs/missing",
            "own er/x",
            "a/b@",
        ] {
            assert!(ModelSource::parse(bad).is_err(), "{bad}");
        }
        assert!(matches!(ModelSource::parse("."), Ok(ModelSource::Dir(_))));
    }
}
