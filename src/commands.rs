//! Small subcommands: `pull`, `list`, `perplexity`, `completions`, `man` and `check-logits`.

use std::io::Write;

use anyhow::{bail, Result};

use crate::cli::{CheckLogitsArgs, ListArgs, PerplexityArgs, PullArgs};
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

/// Most bytes of text `perplexity` reads.
const PERPLEXITY_TEXT_LIMIT: u64 = 256 << 20;
/// Most bytes of a base file `--kl-base` reads.
const PERPLEXITY_BASE_LIMIT: u64 = 4 << 30;
/// Window size when `--ctx-size` is not given (as llama-perplexity is usually run).
const PERPLEXITY_DEFAULT_CTX: usize = 512;

/// `zagreus perplexity -f FILE`: the perplexity on stdout (or a JSON record), progress on stderr.
pub fn perplexity(args: &PerplexityArgs) -> Result<()> {
    use crate::perplexity::{self as ppl, BaseLogits, Method};

    let path = &args.file;
    let bytes = crate::bounded::read_file(path, PERPLEXITY_TEXT_LIMIT, "text file")?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid UTF-8 (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.trim().is_empty() {
        bail!("{} is empty: there is nothing to score", path.display());
    }
    let base: Option<BaseLogits> = match &args.kl_base {
        Some(p) => {
            let raw = crate::bounded::read_file(p, PERPLEXITY_BASE_LIMIT, "base file")?;
            Some(
                serde_json::from_slice(&raw)
                    .map_err(|e| anyhow::anyhow!("{} is not a base saved by --save-logits: {e}", p.display()))?,
            )
        }
        None => None,
    };
    let spec = args.model.spec();
    let (lm, threads) = crate::loader::load_for(&spec)?;
    let ctx = spec.ctx_size.unwrap_or(PERPLEXITY_DEFAULT_CTX);
    if ctx > lm.model.max_positions() {
        bail!(
            "a window of {ctx} tokens is longer than the model's {} positions",
            lm.model.max_positions()
        );
    }
    let method = match args.stride {
        Some(stride) => Method::Sliding { stride },
        None => Method::LlamaCpp,
    };
    // The whole text as the model sees it: no length limit here, windows cut it.
    let tokens = lm.tokenizer.encode_raw(&text, !spec.no_bos)?;
    crate::note!(
        "zagreus: {}: {} tokens with {}, {}",
        path.display(),
        tokens.len(),
        lm.describe(threads),
        method.describe(ctx)
    );
    let bar = crate::output::progress_bar(0, " tokens scored");
    let mut draw = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let (report, saved) = ppl::measure(
        &lm,
        &tokens,
        ctx,
        method,
        ppl::Options {
            parallel: args.parallel,
            save_top_k: args.save_logits.as_ref().map(|_| ppl::BASE_TOP_K),
            base: base.as_ref(),
            progress: Some(&mut draw),
        },
    )?;
    bar.finish();
    if let (Some(p), Some(saved)) = (&args.save_logits, saved) {
        // Written whole to a temporary file, then renamed: no partial base is left behind.
        let tmp = p.with_extension("partial");
        let data = serde_json::to_vec(&saved)?;
        std::fs::write(&tmp, data).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, p).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", p.display()))?;
        crate::note!(
            "zagreus: saved the top-{} distributions of {} positions to {}",
            ppl::BASE_TOP_K,
            report.scored,
            p.display()
        );
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["model"] = serde_json::json!(lm.name);
        v["file"] = serde_json::json!(path.display().to_string());
        writeln!(out, "{v}")?;
    } else {
        writeln!(
            out,
            "PPL = {:.4} +/- {:.4}  ({} tokens scored in {} windows; {}; {:.1} tokens/s)",
            report.ppl, report.ppl_stderr, report.scored, report.windows, report.method_name, report.tokens_per_second
        )?;
        if let Some(k) = &report.kl {
            writeln!(
                out,
                "KL divergence from {} = {:.6} +/- {:.6}; top-1 agreement = {:.2} +/- {:.2} %; base PPL = {:.4}; delta PPL = {:.4} +/- {:.4}",
                k.base_model,
                k.kl_divergence.mean,
                k.kl_divergence.stderr,
                100.0 * k.top1_agreement.mean,
                100.0 * k.top1_agreement.stderr,
                k.base_ppl,
                k.delta_ppl,
                k.delta_ppl_stderr
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

/// `zagreus completions SHELL`: the completion script, generated from the flags' definitions.
pub fn completions(args: &crate::cli::CompletionsArgs) -> Result<()> {
    use clap::CommandFactory;
    let mut cmd = crate::cli::Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "zagreus", &mut out);
    std::io::stdout().lock().write_all(&out)?;
    Ok(())
}

/// `zagreus man`: the manual page, generated from the flags' definitions, with a section per
/// subcommand.
pub fn man() -> Result<()> {
    use clap::CommandFactory;
    let cmd = crate::cli::Cli::command();
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        // Each subcommand: a section with its synopsis, description and options.
        let name = sub.get_name().to_string();
        let sub = sub.clone().bin_name(format!("zagreus {name}"));
        writeln!(out, ".SH \"ZAGREUS {}\"", name.to_uppercase())?;
        let man = clap_mangen::Man::new(sub);
        man.render_synopsis_section(&mut out)?;
        man.render_description_section(&mut out)?;
        man.render_options_section(&mut out)?;
    }
    std::io::stdout().lock().write_all(&out)?;
    Ok(())
}
