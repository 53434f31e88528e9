//! A session holds one sequence's tokens in the KV cache and generates from them: prefill that
//! reuses the cached common prefix, then a [`Generation`] fed with each step's logits. The
//! one-shot, pipe and chat front ends generate through here; the scheduler drives the same
//! [`Generation`] for many sequences at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Result};

pub use crate::generation::{
    Alternative, Completion, Event, FinishReason, GenerateOptions, Generation, Stats, StopMatcher, TokenLogprob,
};
use crate::model::{Cache, LogitsFor, Model, RowKind, Step};
use crate::sampling::Sampler;
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
            self.run(chunk, RowKind::Prompt)?;
        }
        Ok(Prefill {
            processed: prompt.len() - keep,
        })
    }

    /// Feeds one token; its logits are then in `logits()`.
    pub fn step(&mut self, token: u32) -> Result<()> {
        self.run(&[token], RowKind::Decode)
    }

    /// Logits after the last token run (penalties may modify them in place).
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    pub fn logits_mut(&mut self) -> &mut [f32] {
        &mut self.logits
    }

    fn run(&mut self, tokens: &[u32], kind: RowKind) -> Result<()> {
        let mut step = [Step {
            cache: &mut self.cache,
            tokens,
            kind,
            logits: LogitsFor::Last,
        }];
        self.model.forward_batch(&mut step, &mut self.logits)?;
        self.tokens.extend_from_slice(tokens);
        Ok(())
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
    let mut gen = Generation::new(tokenizer, sampler.clone(), prompt, opts.clone(), start);
    gen.prefilled(prefill.processed);
    let mut on_event = |e: Event| match e {
        Event::Text(piece) => on_text(&piece),
        _ => Ok(()),
    };
    gen.begin(&mut on_event)?;
    while !gen.is_finished() {
        if cancel.load(Ordering::Relaxed) {
            gen.cancel(&mut on_event)?;
            break;
        }
        let room = session.tokens().len() < session.context_size();
        match gen.push(session.logits_mut(), room, &mut on_event)? {
            Some(token) => session.step(token)?,
            None => break,
        }
    }
    // The caller's sampler goes on from where this generation left its RNG (the chat's turns).
    *sampler = gen.sampler().clone();
    Ok(gen.into_completion(session.tokens().len()))
}

#[cfg(test)]
mod tests {
    use crate::generation::StopMatcher;

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
