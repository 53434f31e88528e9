//! Small subcommands: `pull` and `list`.

use std::io::Write;

use anyhow::{bail, Result};

use crate::cli::{CheckLogitsArgs, ListArgs, PullArgs};
use crate::hub::{self, human_bytes, HubConfig};
use crate::model::LogitsFor;
use crate::source::ModelSource;

/// `zagreus pull MODEL`: download into the cache; print the local directory on stdout.
pub fn pull(args: &PullArgs) -> Result<()> {
    let (repo, revision) = match ModelSource::parse(&args.model)? {
        ModelSource::Hub {
            repo,
            revision,
            gguf: Some(tag),
        } => {
            let path = hub::resolve_gguf(&repo, revision.as_deref(), &tag, &HubConfig::from_env(false))?;
            writeln!(std::io::stdout(), "{}", path.display())?;
            return Ok(());
        }
        ModelSource::Hub {
            repo,
            revision,
            gguf: None,
        } => (repo, revision),
        ModelSource::Dir(d) | ModelSource::Gguf(d) => {
            bail!(
                "{} is a local path; `pull` takes a hub id (owner/name[@revision][:QUANT])",
                d.display()
            )
        }
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
    let width = models.iter().map(|m| m.model.len()).max().unwrap_or(5).max(5);
    writeln!(out, "{:<width$}  {:<10}  {:>9}  STATUS", "MODEL", "REVISION", "SIZE")?;
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

/// `zagreus check-logits`: the largest logit difference from a transformers reference, over the
/// prompt (one forward pass) and every KV-cached greedy step; fails above the tolerance.
pub fn check_logits(args: &CheckLogitsArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.reference)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.reference.display()))?;
    let r: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("invalid {}: {e}", args.reference.display()))?;
    let ids = |key: &str| -> Result<Vec<u32>> {
        r[key]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("{}: no `{key}`", args.reference.display()))?
            .iter()
            .map(|v| {
                v.as_u64()
                    .map(|x| x as u32)
                    .ok_or_else(|| anyhow::anyhow!("bad id in `{key}`"))
            })
            .collect()
    };
    let rows = |key: &str| -> Result<Vec<Vec<f32>>> {
        let a = r[key]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("{}: no `{key}`", args.reference.display()))?;
        Ok(a.iter()
            .map(|row| {
                row.as_array()
                    .map(|v| v.iter().map(|x| x.as_f64().unwrap_or(f64::NAN) as f32).collect())
                    .unwrap_or_default()
            })
            .collect())
    };
    let (prompt, greedy) = (ids("prompt_ids")?, ids("greedy_ids")?);
    let (want_prompt, want_steps) = (rows("prompt_logits")?, rows("step_logits")?);
    let (loaded, _) = crate::loader::load_for(&args.model)?;
    let model = &loaded.model;
    let vocab = model.vocab_size();
    let mut cache = model.new_cache(model.max_positions());
    let mut logits = Vec::new();
    model.forward(&prompt, &mut cache, LogitsFor::All, &mut logits)?;
    let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let worst_prompt = logits
        .chunks(vocab)
        .zip(&want_prompt)
        .map(|(a, b)| diff(a, b))
        .fold(0f32, f32::max);
    let mut last = logits[logits.len() - vocab..].to_vec();
    let (mut worst_steps, mut agree) = (0f32, 0);
    for (tok, want) in greedy.iter().zip(&want_steps) {
        if crate::sampling::argmax(&last) == *tok {
            agree += 1;
        }
        model.forward(&[*tok], &mut cache, LogitsFor::Last, &mut last)?;
        worst_steps = worst_steps.max(diff(&last, want));
    }
    let device = crate::device::device_name(&model.device());
    println!(
        "{} on {device} ({}): max |Δlogit| prompt {worst_prompt:.3e}, cached steps {worst_steps:.3e}; greedy tokens {agree}/{} agree",
        loaded.name,
        model.precision(),
        greedy.len()
    );
    if worst_prompt.max(worst_steps) > args.tolerance {
        bail!("logits differ from the reference by more than {}", args.tolerance);
    }
    Ok(())
}
