//! Step-wise generation of one sequence: a [`Generation`] takes the logits after each step and
//! yields events (text, tokens with log-probabilities, the finish), holding the sequence's own
//! sampler and RNG, stop rules, streaming detokenizer and statistics. Whoever runs the network
//! (a [`crate::session::Session`] for one sequence, the scheduler for many) feeds it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use std::sync::Arc;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::sampling::{log_softmax, Sampler};
use crate::structured::{Constraint, Plan};
use crate::tokenizer::{TextStream, Tokenizer};

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

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub stop_ids: BTreeSet<u32>,
    pub stop_strings: Vec<String>,
    pub ignore_eos: bool,
    /// Report log-probabilities with this many alternatives per token.
    pub logprobs: Option<usize>,
    /// The shape the answer must have (a JSON schema, tool calls), as a token mask.
    pub constraint: Option<Arc<Plan>>,
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

#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    /// The end-of-generation token that stopped it, if any (not part of `tokens`).
    pub stop_token: Option<u32>,
    pub logprobs: Vec<TokenLogprob>,
    /// With prompt scoring: the log-probability of each prompt token after the ones before it
    /// (the first token has none, so this holds one fewer than the prompt).
    pub prompt_logprobs: Vec<TokenLogprob>,
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

/// What a step of generation produced, in order.
#[derive(Debug, Clone)]
pub enum Event {
    /// A token was sampled (an end-of-generation token included), with its log-probabilities
    /// when they were asked for.
    Token { id: u32, logprob: Option<TokenLogprob> },
    /// New text, safe to show (never part of a stop string, never half a character).
    Text(String),
    /// Generation ended; no event follows.
    Finish(FinishReason),
}

/// One sequence being generated.
pub struct Generation<'t> {
    tokenizer: &'t Tokenizer,
    sampler: Sampler,
    opts: GenerateOptions,
    /// Prompt and generated tokens: what the penalties look at.
    history: Vec<u32>,
    tokens: Vec<u32>,
    text: String,
    stream: TextStream<'t>,
    stops: StopMatcher,
    logprobs: Vec<TokenLogprob>,
    prompt_logprobs: Vec<TokenLogprob>,
    stats: Stats,
    start: Instant,
    first_token_at: Option<Instant>,
    stop_token: Option<u32>,
    finish: Option<FinishReason>,
    constraint: Option<Constraint>,
}

impl<'t> Generation<'t> {
    /// A generation after `prompt`, started (for the statistics) at `start`.
    pub fn new(
        tokenizer: &'t Tokenizer,
        sampler: Sampler,
        prompt: &[u32],
        opts: GenerateOptions,
        start: Instant,
    ) -> Self {
        let stops = StopMatcher::new(&opts.stop_strings);
        let constraint = opts.constraint.as_ref().map(|p| p.start());
        Self {
            constraint,
            tokenizer,
            sampler,
            opts,
            history: prompt.to_vec(),
            tokens: Vec::new(),
            text: String::new(),
            stream: tokenizer.stream(),
            stops,
            logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
            stats: Stats {
                prompt_tokens: prompt.len(),
                ..Stats::default()
            },
            start,
            first_token_at: None,
            stop_token: None,
            finish: None,
        }
    }

    /// Records that the prompt is in the cache, `processed` of its tokens run through the network.
    pub fn prefilled(&mut self, processed: usize) {
        self.stats.prompt_processed = processed;
        self.stats.prompt_time = self.start.elapsed();
    }

    /// Records how likely prompt token `token` was after the logits of the position before it,
    /// with `alternatives` of the likeliest tokens there.
    pub fn score_prompt_token(&mut self, logits: &[f32], token: u32, alternatives: usize) {
        self.prompt_logprobs
            .push(token_logprob(self.tokenizer, logits, token, alternatives));
    }

    /// Call once before the first `push`: a request for no tokens at all ends here.
    pub fn begin(&mut self, on_event: &mut dyn FnMut(Event) -> Result<()>) -> Result<()> {
        if self.opts.max_tokens == 0 {
            self.end(FinishReason::Length, on_event)?;
        }
        Ok(())
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// The sampler, with its RNG where this generation left it.
    pub fn sampler(&self) -> &Sampler {
        &self.sampler
    }

    /// Tokens generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Takes the logits after the last token run (penalties modify them in place) and samples
    /// the next token. Returns the token to run next, or `None` when generation has ended.
    /// `room`: whether the context can take another token.
    pub fn push(
        &mut self,
        logits: &mut [f32],
        room: bool,
        on_event: &mut dyn FnMut(Event) -> Result<()>,
    ) -> Result<Option<u32>> {
        if self.finish.is_some() {
            return Ok(None);
        }
        if let Some(bad) = logits.iter().find(|x| !x.is_finite()) {
            bail!(
                "the model computed a logit of {bad} after {} tokens: its weights hold NaN or overflowing values (a corrupt checkpoint?)",
                self.history.len()
            );
        }
        let raw = self.opts.logprobs.map(|_| logits.to_vec());
        if let Some(c) = &mut self.constraint {
            c.mask(logits)?;
        }
        let token = self.sampler.sample(logits, &self.history);
        if self.first_token_at.is_none() {
            self.first_token_at = Some(Instant::now());
            self.stats.time_to_first_token = self.start.elapsed();
        }
        let logprob = match (self.opts.logprobs, raw) {
            (Some(n), Some(raw)) => Some(token_logprob(self.tokenizer, &raw, token, n)),
            _ => None,
        };
        if let Some(lp) = &logprob {
            self.logprobs.push(lp.clone());
        }
        on_event(Event::Token { id: token, logprob })?;
        // Under a grammar an end token is sampled only where the grammar allows one: it ends
        // the answer even with `ignore_eos`.
        let bound = self.constraint.as_ref().is_some_and(|c| c.binds());
        if (!self.opts.ignore_eos || bound) && self.opts.stop_ids.contains(&token) {
            self.stop_token = Some(token);
            self.end(FinishReason::StopToken, on_event)?;
            return Ok(None);
        }
        if let Some(c) = &mut self.constraint {
            c.accept(token)?;
        }
        self.tokens.push(token);
        self.history.push(token);
        if let Some(piece) = self.stream.step(token)? {
            let (out, hit) = self.stops.push(&piece);
            self.emit(out, on_event)?;
            if hit {
                self.finish_now(FinishReason::StopString, on_event)?;
                return Ok(None);
            }
        }
        if self.tokens.len() >= self.opts.max_tokens {
            self.end(FinishReason::Length, on_event)?;
            return Ok(None);
        }
        if !room {
            self.stats.context_full = true;
            self.end(FinishReason::Length, on_event)?;
            return Ok(None);
        }
        Ok(Some(token))
    }

    /// Ends generation as cancelled (the text so far is kept).
    pub fn cancel(&mut self, on_event: &mut dyn FnMut(Event) -> Result<()>) -> Result<()> {
        if self.finish.is_none() {
            self.end(FinishReason::Cancelled, on_event)?;
        }
        Ok(())
    }

    fn emit(&mut self, piece: String, on_event: &mut dyn FnMut(Event) -> Result<()>) -> Result<()> {
        if !piece.is_empty() {
            self.text.push_str(&piece);
            on_event(Event::Text(piece))?;
        }
        Ok(())
    }

    /// Ends generation: the text held back by the detokenizer and the stop matcher comes out
    /// (unless it completes a stop string).
    fn end(&mut self, reason: FinishReason, on_event: &mut dyn FnMut(Event) -> Result<()>) -> Result<()> {
        let mut reason = reason;
        if let Some(piece) = self.stream.finish()? {
            let (out, hit) = self.stops.push(&piece);
            self.emit(out, on_event)?;
            if hit {
                reason = FinishReason::StopString;
                self.stop_token = None;
            }
        }
        if reason != FinishReason::StopString {
            let rest = self.stops.flush();
            self.emit(rest, on_event)?;
        }
        self.finish_now(reason, on_event)
    }

    fn finish_now(&mut self, reason: FinishReason, on_event: &mut dyn FnMut(Event) -> Result<()>) -> Result<()> {
        self.finish = Some(reason);
        self.stats.generated = self.tokens.len();
        self.stats.decode_time = self.first_token_at.map(|t| t.elapsed()).unwrap_or_default();
        on_event(Event::Finish(reason))
    }

    /// The finished generation; `context_used`: tokens in the context at the end.
    pub fn into_completion(self, context_used: usize) -> Completion {
        let mut stats = self.stats;
        stats.context_used = context_used;
        Completion {
            text: self.text,
            tokens: self.tokens,
            finish: self.finish.unwrap_or(FinishReason::Cancelled),
            stop_token: self.stop_token,
            logprobs: self.logprobs,
            prompt_logprobs: self.prompt_logprobs,
            stats,
        }
    }
}

pub(crate) fn token_logprob(tokenizer: &Tokenizer, logits: &[f32], token: u32, n: usize) -> TokenLogprob {
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
