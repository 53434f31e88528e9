//! A session holds the tokens in the KV cache and generates from them: prefill that reuses the
//! cached common prefix, the sampling loop, stop tokens and strings, streaming and statistics.
//! Every front end (one-shot, pipe, chat, bench) drives generation through here.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::model::{Cache, LogitsFor, Model};
use crate::sampling::{log_softmax, Sampler};
use crate::tokenizer::Tokenizer;

/// Tokens fed to the network at once during prefill: bounds the attention scratch memory.
pub const PREFILL_CHUNK: usize = 256;

pub struct Session<'m> {
    model: &'m Model,
    cache: Cache,
    tokens: Vec<u32>,
    logits: Vec<f32>,
}

/// What a prefill did.
pub struct Prefill {
    /// Prompt tokens actually run through the network (the rest came from the cache).
    pub processed: usize,
}

impl<'m> Session<'m> {
    /// A session whose context holds at most `context_size` tokens (clamped to the model's).
    pub fn new(model: &'m Model, context_size: usize) -> Self {
        Self {
            model,
            cache: model.new_cache(context_size),
            tokens: Vec::new(),
            logits: Vec::new(),
        }
    }

    pub fn model(&self) -> &'m Model {
        self.model
    }

    pub fn context_size(&self) -> usize {
        self.cache.max_len()
    }

    /// The tokens whose keys and values are cached.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Forgets every cached token after the first `len`.
    pub fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
        self.cache.truncate(len);
    }

    /// Makes the cache hold exactly `prompt`: keeps the longest common prefix with what is
    /// cached, runs the rest, and returns the logits after the last prompt token.
    pub fn prefill(&mut self, prompt: &[u32]) -> Result<Prefill> {
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        if prompt.len() > self.context_size() {
            bail!(
                "the prompt is {} tokens, more than the context of {} tokens",
                prompt.len(),
                self.context_size()
            );
        }
        let common = self.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        // At least the last prompt token is run, to get its logits.
        let keep = common.min(prompt.len() - 1);
        self.truncate(keep);
        for chunk in prompt[keep..].chunks(PREFILL_CHUNK) {
            self.run(chunk)?;
        }
        Ok(Prefill {
            processed: prompt.len() - keep,
        })
    }

    /// Feeds one token; its logits are then in `logits()`.
    pub fn step(&mut self, token: u32) -> Result<()> {
        self.run(&[token])
    }

    /// Logits after the last token run (penalties may modify them in place).
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    pub fn logits_mut(&mut self) -> &mut [f32] {
        &mut self.logits
    }

    fn run(&mut self, tokens: &[u32]) -> Result<()> {
        self.model
            .forward(tokens, &mut self.cache, LogitsFor::Last, &mut self.logits)?;
        self.tokens.extend_from_slice(tokens);
        Ok(())
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token was sampled.
    StopToken,
    /// A `--stop` string appeared.
    StopString,
    /// `--max-tokens` was reached, or the context filled up.
    Length,
    /// Interrupted (Ctrl+C).
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::StopToken => "stop_token",
            FinishReason::StopString => "stop_string",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

pub struct GenerateOptions {
    pub max_tokens: usize,
    pub stop_ids: BTreeSet<u32>,
    pub stop_strings: Vec<String>,
    pub ignore_eos: bool,
    /// Report log-probabilities with this many alternatives per token.
    pub logprobs: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Alternative {
    pub id: u32,
    pub token: String,
    pub logprob: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub token: String,
    pub logprob: f32,
    pub top_logprobs: Vec<Alternative>,
}

#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub prompt_tokens: usize,
    /// Prompt tokens run through the network (the others were reused from the cache).
    pub prompt_processed: usize,
    pub prompt_time: Duration,
    /// From the start of the request to the first sampled token.
    pub time_to_first_token: Duration,
    pub generated: usize,
    /// Time spent producing the tokens after the first one.
    pub decode_time: Duration,
    /// Tokens in the context when generation ended.
    pub context_used: usize,
    pub context_full: bool,
}

impl Stats {
    pub fn prompt_tps(&self) -> f64 {
        rate(self.prompt_processed, self.prompt_time)
    }

    /// Decode speed, counting the steps after the first token.
    pub fn decode_tps(&self) -> f64 {
        rate(self.generated.saturating_sub(1), self.decode_time)
    }
}

fn rate(n: usize, t: Duration) -> f64 {
    if n == 0 || t.is_zero() {
        0.0
    } else {
        n as f64 / t.as_secs_f64()
    }
}

pub struct Completion {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    /// The end-of-generation token that stopped it, if any (not part of `tokens`).
    pub stop_token: Option<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub stats: Stats,
}

/// Holds back text that could be the start of a stop string, so a stop string is never printed.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Adds text; returns what is safe to emit and whether a stop string was found (then the
    /// text up to it is returned and the rest dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        let hit = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = hit {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest tail that is a prefix of some stop string.
        let mut keep_from = self.held.len();
        for (i, _) in self.held.char_indices().rev() {
            let tail = &self.held[i..];
            if self.stops.iter().any(|s| s.starts_with(tail)) {
                keep_from = i;
            }
            if self.held.len() - i >= self.stops.iter().map(|s| s.len()).max().unwrap_or(0) {
                break;
            }
        }
        let out = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        (out, false)
    }

    /// Text still held back at the end of generation.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Generates a continuation of `prompt`, calling `on_text` with each new piece of text.
/// `cancel` stops generation between tokens.
pub fn generate(
    session: &mut Session,
    tokenizer: &Tokenizer,
    sampler: &mut Sampler,
    prompt: &[u32],
    opts: &GenerateOptions,
    cancel: &AtomicBool,
    on_text: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<Completion> {
    let start = Instant::now();
    let prefill = session.prefill(prompt)?;
    let mut stats = Stats {
        prompt_tokens: prompt.len(),
        prompt_processed: prefill.processed,
        prompt_time: start.elapsed(),
        ..Stats::default()
    };
    let mut history: Vec<u32> = prompt.to_vec();
    let mut tokens = Vec::new();
    let mut logprobs = Vec::new();
    let mut text = String::new();
    let mut stream = tokenizer.stream();
    let mut stops = StopMatcher::new(&opts.stop_strings);
    let mut first_token_at = None;
    let mut stop_token = None;
    let mut emit = |piece: &str, text: &mut String| -> Result<()> {
        if !piece.is_empty() {
            text.push_str(piece);
            on_text(piece)?;
        }
        Ok(())
    };
    let finish = loop {
        if tokens.len() >= opts.max_tokens {
            break FinishReason::Length;
        }
        if cancel.load(Ordering::Relaxed) {
            break FinishReason::Cancelled;
        }
        if let Some(bad) = session.logits().iter().find(|x| !x.is_finite()) {
            bail!(
                "the model computed a logit of {bad} after {} tokens: its weights hold NaN or overflowing values (a corrupt checkpoint?)",
                history.len()
            );
        }
        let raw = opts.logprobs.map(|_| session.logits().to_vec());
        let token = sampler.sample(session.logits_mut(), &history);
        if first_token_at.is_none() {
            first_token_at = Some(Instant::now());
            stats.time_to_first_token = start.elapsed();
        }
        if let (Some(n), Some(raw)) = (opts.logprobs, raw) {
            logprobs.push(token_logprob(tokenizer, &raw, token, n));
        }
        if !opts.ignore_eos && opts.stop_ids.contains(&token) {
            stop_token = Some(token);
            break FinishReason::StopToken;
        }
        tokens.push(token);
        history.push(token);
        if let Some(piece) = stream.step(token)? {
            let (out, hit) = stops.push(&piece);
            emit(&out, &mut text)?;
            if hit {
                break FinishReason::StopString;
            }
        }
        if tokens.len() >= opts.max_tokens {
            break FinishReason::Length;
        }
        if session.tokens().len() + 1 > session.context_size() {
            stats.context_full = true;
            break FinishReason::Length;
        }
        session.step(token)?;
    };
    if finish != FinishReason::StopString {
        if let Some(piece) = stream.finish()? {
            let (out, hit) = stops.push(&piece);
            emit(&out, &mut text)?;
            if hit {
                return Ok(done(
                    text,
                    tokens,
                    FinishReason::StopString,
                    None,
                    logprobs,
                    stats,
                    first_token_at,
                    session,
                ));
            }
        }
        let rest = stops.flush();
        emit(&rest, &mut text)?;
    }
    Ok(done(
        text,
        tokens,
        finish,
        stop_token,
        logprobs,
        stats,
        first_token_at,
        session,
    ))
}

#[allow(clippy::too_many_arguments)]
fn done(
    text: String,
    tokens: Vec<u32>,
    finish: FinishReason,
    stop_token: Option<u32>,
    logprobs: Vec<TokenLogprob>,
    mut stats: Stats,
    first_token_at: Option<Instant>,
    session: &Session,
) -> Completion {
    stats.generated = tokens.len();
    stats.decode_time = first_token_at.map(|t| t.elapsed()).unwrap_or_default();
    stats.context_used = session.tokens().len();
    Completion {
        text,
        tokens,
        finish,
        stop_token,
        logprobs,
        stats,
    }
}

fn token_logprob(tokenizer: &Tokenizer, logits: &[f32], token: u32, n: usize) -> TokenLogprob {
    let lp = log_softmax(logits);
    let mut order: Vec<u32> = (0..lp.len() as u32).collect();
    let n = n.min(order.len());
    if n > 0 && n < order.len() {
        order.select_nth_unstable_by(n - 1, |a, b| lp[*b as usize].total_cmp(&lp[*a as usize]));
    }
    order.truncate(n);
    order.sort_by(|a, b| lp[*b as usize].total_cmp(&lp[*a as usize]));
    TokenLogprob {
        id: token,
        token: tokenizer.token_text(token),
        logprob: lp[token as usize],
        top_logprobs: order
            .into_iter()
            .map(|id| Alternative {
                id,
                token: tokenizer.token_text(id),
                logprob: lp[id as usize],
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let mut out = String::new();
        for p in pieces {
            let (o, hit) = m.push(p);
            out.push_str(&o);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_strings_across_pieces_are_never_printed() {
        assert_eq!(run(&["END"], &["hello E", "N", "D more"]), ("hello ".into(), true));
        assert_eq!(run(&["END"], &["hello EN", "x"]), ("hello ENx".into(), false));
        assert_eq!(
            run(&["\n\n", "Utente:"], &["ciao\n", "\nUtente"]),
            ("ciao".into(), true)
        );
        assert_eq!(run(&["è!"], &["caff", "è", "!"]), ("caff".into(), true));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn text_without_stop_prefixes_is_not_held() {
        let mut m = StopMatcher::new(&["STOP".to_string()]);
        assert_eq!(m.push("Ciao, come va?"), ("Ciao, come va?".to_string(), false));
        assert_eq!(m.push("xS"), ("x".to_string(), false));
    }
}
