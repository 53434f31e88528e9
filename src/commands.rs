//! Small subcommands: `pull` and `list`.

use std::io::Write;

use anyhow::{bail, Result};

use crate::cli::{ListArgs, PullArgs};
use crate::hub::{self, human_bytes, HubConfig};
use crate::source::ModelSource;

/// `zagreus pull MODEL`: download into the cache; print the local directory on stdout.
pub fn pull(args: &PullArgs) -> Result<()> {
    let (repo, revision) = match ModelSource::parse(&args.model)? {
        ModelSource::Hub { repo, revision } => (repo, revision),
        ModelSource::Dir(d) => bail!(
            "{} is a local directory; `pull` takes a hub id (owner/name[@revision])",
            d.display()
        ),
    };
    let cfg = HubConfig::from_env(false);
    if cfg.offline {
        bail!("`pull` needs the network, but HF_HUB_OFFLINE is set");
    }
    let files = hub::resolve(&repo, revision.as_deref(), &cfg)?;
    let dir = files
        .config
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    writeln!(std::io::stdout(), "{dir}")?;
    Ok(())
}

/// `zagreus list`: the models in the Hugging Face cache.
pub fn list(args: &ListArgs) -> Result<()> {
    let cfg = HubConfig::from_env(false);
    let models = hub::list_cached(&cfg)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &models)?;
        writeln!(out)?;
        return Ok(());
    }
    if models.is_empty() {
        eprintln!("zagreus: no models in {}", cfg.cache_dir.display());
        return Ok(());
    }
    let width = models
        .iter()
        .map(|m| m.model.len())
        .max()
        .unwrap_or(5)
        .max(5);
    writeln!(
        out,
        "{:<width$}  {:<10}  {:>9}  STATUS",
        "MODEL", "REVISION", "SIZE"
    )?;
    for m in &models {
        let rev = if m.revision.len() > 10 {
            &m.revision[..10]
        } else {
            &m.revision
        };
        let status = if m.complete { "ready" } else { "partial" };
        writeln!(
            out,
            "{:<width$}  {:<10}  {:>9}  {status}",
            m.model,
            rev,
            human_bytes(m.size_bytes)
        )?;
    }
    Ok(())
}
