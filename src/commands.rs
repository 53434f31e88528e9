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
            let cfg = HubConfig::from_env(false);
            if cfg.offline {
                bail!("`pull` needs the network, but HF_HUB_OFFLINE is set");
            }
            let path = hub::resolve_gguf(&repo, revision.as_deref(), &tag, &cfg, true)?;
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
    let files = hub::pull(&repo, revision.as_deref(), &cfg)?;
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
        let text = serde_json::to_string_pretty(&models)?;
        writeln!(out, "{text}")?;
        return Ok(());
    }
    if models.is_empty() {
        crate::note!("zagreus: no models in {}", cfg.cache_dir.display());
        return Ok(());
    }
    let width = models.iter().map(|m| m.model.len()).max().unwrap_or(5).max(5);
    writeln!(out, "{:<width$}  {:<10}  {:>9}  STATUS", "MODEL", "REVISION", "SIZE")?;
    for m in &models {
        // Branch names may be any UTF-8: cut by characters, not bytes.
        let rev: String = m.revision.chars().take(10).collect();
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
/// prompt (one forward pass) and every KV-cached greedy step; fails above the tolerance. A
/// reference that could not fail (empty, short rows, NaN values) is refused.
pub fn check_logits(args: &CheckLogitsArgs) -> Result<()> {
    let path = &args.reference;
    let text = crate::bounded::read_text(path, crate::bounded::REFERENCE_LIMIT, "the reference")?;
    let r: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("invalid {}: {e}", path.display()))?;
    let field = |key: &str| -> Result<&Vec<serde_json::Value>> {
        r[key]
            .as_array()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| anyhow::anyhow!("{}: `{key}` is missing or empty", path.display()))
    };
    let ids = |key: &str| -> Result<Vec<u32>> {
        field(key)?
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(|| anyhow::anyhow!("{}: `{key}` holds {v}, not a token id", path.display()))
            })
            .collect()
    };
    let rows = |key: &str| -> Result<Vec<Vec<f32>>> {
        field(key)?
            .iter()
            .enumerate()
            .map(|(i, row)| {
                row.as_array()
                    .ok_or_else(|| anyhow::anyhow!("{}: `{key}` row {i} is not a list", path.display()))?
                    .iter()
                    .map(|x| {
                        x.as_f64().map(|x| x as f32).filter(|x| x.is_finite()).ok_or_else(|| {
                            anyhow::anyhow!("{}: `{key}` row {i} holds {x}, not a finite number", path.display())
                        })
                    })
                    .collect()
            })
            .collect()
    };
    let (prompt, greedy) = (ids("prompt_ids")?, ids("greedy_ids")?);
    let (want_prompt, want_steps) = (rows("prompt_logits")?, rows("step_logits")?);
    let (loaded, _) = crate::loader::load_for(&args.model.spec())?;
    let model = &loaded.model;
    let vocab = model.vocab_size();
    if let Some(bad) = prompt.iter().chain(&greedy).find(|id| **id as usize >= vocab) {
        bail!(
            "{}: token id {bad} is outside the model's vocabulary of {vocab}",
            path.display()
        );
    }
    for (key, want, n) in [
        ("prompt_logits", &want_prompt, prompt.len()),
        ("step_logits", &want_steps, greedy.len()),
    ] {
        if want.len() != n {
            bail!("{}: `{key}` has {} rows for {n} tokens", path.display(), want.len());
        }
        if let Some((i, row)) = want.iter().enumerate().find(|(_, row)| row.len() != vocab) {
            bail!(
                "{}: `{key}` row {i} has {} logits, but the model's vocabulary has {vocab}",
                path.display(),
                row.len()
            );
        }
    }
    if prompt.len() + greedy.len() > model.max_positions() {
        bail!(
            "{}: the prompt and greedy tokens are longer than the model's context",
            path.display()
        );
    }
    let mut cache = model.new_cache(model.max_positions());
    let mut logits = Vec::new();
    model.forward(&prompt, &mut cache, LogitsFor::All, &mut logits)?;
    // NaN compares as "no difference" under max: count it as infinitely far instead.
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| if x.is_finite() { (x - y).abs() } else { f32::INFINITY })
            .fold(0f32, f32::max)
    };
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
    writeln!(
        std::io::stdout(),
        "{} on {device} ({}): max |Δlogit| prompt {worst_prompt:.3e}, cached steps {worst_steps:.3e}; greedy tokens {agree}/{} agree",
        loaded.name,
        model.precision(),
        greedy.len()
    )?;
    if worst_prompt.max(worst_steps) > args.tolerance {
        bail!("logits differ from the reference by more than {}", args.tolerance);
    }
    Ok(())
}
