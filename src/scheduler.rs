//! Continuous batching: many requests share the model, one batched step at a time.
//!
//! Up to `max_sequences` sequences are in flight; more requests wait in a bounded queue. Each
//! step runs one token of every decoding sequence and at most `prefill_chunk` prompt tokens (so
//! sequences already decoding keep streaming while a long prompt is prefilled). A request is
//! admitted when the keys and values it may need fit the memory budget beside those of the
//! sequences in flight; one that could never fit is refused at submission. A request whose
//! receiver is dropped (or whose handle is cancelled) frees its sequence at the next step.
//! Finished sequences leave their caches behind for prefix reuse: a new prompt that starts
//! like one of them (the same system prompt, the same conversation) runs only the rest.
//!
//! Every sequence gets the same logits and, with the same seed, the same tokens whatever else
//! runs beside it: the CPU engine's rows do not depend on their neighbours, and each sequence
//! has its own sampler.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{bail, Result};

use crate::generation::{Completion, Event, FinishReason, GenerateOptions, Generation, Stats};
use crate::loader::LoadedModel;
use crate::model::{Cache, LogitsFor, RowKind, Step};
use crate::sampling::Sampler;
use crate::settings::Settings;
use crate::structured::Plan;

/// How the scheduler shares the model.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences in flight at most.
    pub max_sequences: usize,
    /// Requests waiting for a sequence at most, beyond those that free sequences are about to
    /// take (beyond them, `submit` refuses; 0: a request runs at once or is refused). Requests
    /// cancelled while waiting do not count.
    pub max_queue: usize,
    /// Prompt tokens run per step at most, over all sequences.
    pub prefill_chunk: usize,
    /// Tokens of one sequence at most (prompt and answer).
    pub context: usize,
    /// Bytes the keys and values of all sequences, cached prefixes included, may take.
    pub kv_bytes: usize,
}

impl SchedulerConfig {
    /// `max_sequences` at once on a model whose context is `context` tokens: the queue holds a
    /// thousand requests, and the memory budget holds every sequence at its full context.
    pub fn new(lm: &LoadedModel, max_sequences: usize, context: usize) -> Self {
        let context = context.min(lm.model.max_positions()).max(1);
        Self {
            max_sequences: max_sequences.max(1),
            max_queue: 1024,
            prefill_chunk: crate::session::PREFILL_CHUNK,
            context,
            kv_bytes: kv_bytes_per_token(lm)
                .saturating_mul(context)
                .saturating_mul(max_sequences.max(1)),
        }
    }
}

/// Bytes of keys and values one token takes in the model's caches.
pub fn kv_bytes_per_token(lm: &LoadedModel) -> usize {
    lm.model.kv_bytes_per_position()
}

/// One request: prompt tokens and how to generate after them.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub settings: Settings,
    /// Report log-probabilities with this many alternatives per token.
    pub logprobs: Option<usize>,
    /// Score the prompt too: the log-probability of each prompt token after the ones before it,
    /// with this many alternatives (the whole prompt runs, no cached prefix is reused, and it
    /// runs even when no token is to be generated).
    pub prompt_logprobs: Option<usize>,
    /// The shape the answer must have (structured output, tool calls).
    pub constraint: Option<Arc<Plan>>,
}

/// Why a request was refused at submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The queue is full: try again later.
    QueueFull { waiting: usize },
    /// The prompt leaves no room for an answer in the context.
    PromptTooLong { prompt: usize, context: usize },
    /// The request's keys and values could never fit the memory budget.
    TooBig {
        need_mib: usize,
        tokens: usize,
        budget_mib: usize,
    },
    /// The prompt is empty.
    EmptyPrompt,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::QueueFull { waiting } => {
                write!(f, "the queue is full ({waiting} requests waiting); try again later")
            }
            Refusal::PromptTooLong { prompt, context } => write!(
                f,
                "the prompt is {prompt} tokens; the context of {context} tokens leaves no room for an answer"
            ),
            Refusal::TooBig {
                need_mib,
                tokens,
                budget_mib,
            } => write!(
                f,
                "the request needs {need_mib} MiB of keys and values ({tokens} tokens), more than the {budget_mib} MiB all sequences may take"
            ),
            Refusal::EmptyPrompt => write!(f, "the prompt is empty"),
        }
    }
}

impl std::error::Error for Refusal {}

/// What a request's receiver gets: the events of its generation, then its end.
#[derive(Debug)]
pub enum Update {
    Event(Event),
    /// The finished generation (the last update).
    Done(Completion),
    /// The request failed (the last update).
    Failed(String),
}

/// Where a request's updates go; `false` means nobody listens any more (the request is then
/// dropped at the next step).
pub type Sink = Box<dyn FnMut(Update) -> bool + Send>;

/// A submitted request: its updates, and a way to cancel it. Dropping the handle cancels it.
pub struct Handle {
    pub updates: Receiver<Update>,
    cancel: Arc<AtomicBool>,
}

impl Handle {
    /// Stops the request at the next step (its `Done` says `cancelled`).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Waits for the end, ignoring the events on the way.
    pub fn wait(self) -> Result<Completion> {
        for u in self.updates.iter() {
            match u {
                Update::Event(_) => {}
                Update::Done(c) => return Ok(c),
                Update::Failed(e) => bail!("{e}"),
            }
        }
        bail!("the scheduler stopped before the request ended")
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// What the scheduler has done so far (for tests and statistics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub steps: usize,
    pub prompt_tokens_run: usize,
    pub prompt_tokens_reused: usize,
    pub finished: usize,
    pub cancelled: usize,
    /// Sequences in flight now.
    pub active: usize,
    /// Most sequences ever in one step.
    pub widest_step: usize,
}

struct Queued {
    req: Request,
    sink: Sink,
    cancel: Arc<AtomicBool>,
    at: Instant,
}

#[derive(Default)]
struct Shared {
    queue: VecDeque<Queued>,
    stop: bool,
    counters: Counters,
}

/// The scheduler: a thread that owns the sequences and runs the steps.
pub struct Scheduler {
    shared: Arc<(Mutex<Shared>, Condvar)>,
    config: SchedulerConfig,
    kv_per_token: usize,
    worker: Option<JoinHandle<()>>,
}

impl Scheduler {
    pub fn start(lm: Arc<LoadedModel>, config: SchedulerConfig) -> Self {
        let shared = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        let kv_per_token = kv_bytes_per_token(&lm);
        let worker = {
            let (shared, config) = (shared.clone(), config.clone());
            std::thread::Builder::new()
                .name("zagreus-scheduler".into())
                .spawn(move || Worker::new(&lm, config, shared).run())
                .expect("spawning the scheduler thread")
        };
        Self {
            shared,
            config,
            kv_per_token,
            worker: Some(worker),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Queues a request. Refused at once when it could never run (a prompt longer than the
    /// context, more keys and values than the whole budget) or when the queue is full.
    pub fn submit(&self, req: Request) -> Result<Handle> {
        let (tx, updates) = channel();
        let cancel = self.submit_to(req, Box::new(move |u| tx.send(u).is_ok()))?;
        Ok(Handle { updates, cancel })
    }

    /// As `submit`, with the updates going to `sink` (which says whether anyone still listens).
    /// Returns the request's cancel flag.
    pub fn submit_to(&self, req: Request, sink: Sink) -> Result<Arc<AtomicBool>, Refusal> {
        let c = &self.config;
        if req.prompt.is_empty() {
            return Err(Refusal::EmptyPrompt);
        }
        if req.prompt.len() >= c.context {
            return Err(Refusal::PromptTooLong {
                prompt: req.prompt.len(),
                context: c.context,
            });
        }
        let need = positions(&req, c.context).saturating_mul(self.kv_per_token);
        if need > c.kv_bytes {
            return Err(Refusal::TooBig {
                need_mib: need >> 20,
                tokens: positions(&req, c.context),
                budget_mib: c.kv_bytes >> 20,
            });
        }
        let (lock, wake) = &*self.shared;
        let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
        // Queued requests that free sequences will take at the next step do not wait.
        let (free, waiting) = (c.max_sequences.saturating_sub(s.counters.active), live(&s.queue));
        if waiting >= c.max_queue.saturating_add(free) {
            return Err(Refusal::QueueFull { waiting });
        }
        let cancel = Arc::new(AtomicBool::new(false));
        s.queue.push_back(Queued {
            req,
            sink,
            cancel: cancel.clone(),
            at: Instant::now(),
        });
        wake.notify_all();
        Ok(cancel)
    }

    /// Requests waiting for a sequence (not those cancelled while waiting).
    pub fn queued(&self) -> usize {
        live(&self.shared.0.lock().unwrap_or_else(|e| e.into_inner()).queue)
    }

    pub fn counters(&self) -> Counters {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner()).counters.clone()
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        {
            let (lock, wake) = &*self.shared;
            lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
            wake.notify_all();
        }
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Queued requests not cancelled.
fn live(queue: &VecDeque<Queued>) -> usize {
    queue.iter().filter(|q| !q.cancel.load(Ordering::Relaxed)).count()
}

/// Positions a request may fill: its prompt and answer, within the context (`max_tokens` comes
/// from a request body unbounded: `usize::MAX` means "until the context is full").
fn positions(req: &Request, context: usize) -> usize {
    req.prompt.len().saturating_add(req.settings.max_tokens).min(context)
}

/// A sequence in flight.
struct Sequence<'t> {
    cache: Cache,
    /// Tokens whose keys and values are in `cache`.
    cached: Vec<u32>,
    prompt: Vec<u32>,
    /// The token to run next once the prompt is in (the last sampled one).
    next: Option<u32>,
    gen: Generation<'t>,
    sink: Sink,
    cancel: Arc<AtomicBool>,
    /// Bytes of keys and values reserved for it.
    reserved: usize,
    /// Prompt tokens found in a cached prefix (not run again).
    reused: usize,
    /// Scoring the prompt, with this many alternatives per token.
    score: Option<usize>,
    /// It failed (its `Failed` update is sent): it ends without a `Done`.
    failed: bool,
}

impl Sequence<'_> {
    fn prefilling(&self) -> bool {
        self.cached.len() < self.prompt.len()
    }

    /// Whether the prompt still has to run: for its answer, or for its scores.
    fn needs_prompt(&self) -> bool {
        self.prefilling() && (!self.gen.is_finished() || self.scoring())
    }

    fn scoring(&self) -> bool {
        self.score.is_some() && !self.cancel.load(Ordering::Relaxed)
    }

    /// Nothing more to run.
    fn done(&self) -> bool {
        self.gen.is_finished() && !(self.scoring() && self.prefilling())
    }
}

/// A finished sequence's cache, kept for prefix reuse.
struct Idle {
    cache: Cache,
    tokens: Vec<u32>,
}

struct Worker<'m> {
    lm: &'m LoadedModel,
    config: SchedulerConfig,
    shared: Arc<(Mutex<Shared>, Condvar)>,
    kv_per_token: usize,
    active: Vec<Sequence<'m>>,
    /// Most recently used last.
    idle: Vec<Idle>,
    logits: Vec<f32>,
    /// How many prompt tokens may run beside decoding ones.
    share: PromptShare,
}

/// While sequences are decoding, prompt work beside them may take at most this share of the
/// time decoding takes: decoding keeps at least 1 / (1 + share) of its speed, on average.
const BUSY_SHARE: f64 = 0.5;
/// Prompt tokens per step beside decoding ones before anything is measured.
const BUSY_START: usize = 8;
/// Most decoding steps' worth of prompt time saved up for one step: bounds how much longer than
/// usual a decoding sequence waits for a token.
const BUSY_SAVED_STEPS: f64 = 4.0;

fn average(old: Option<f64>, new: f64) -> Option<f64> {
    Some(old.map_or(new, |o| 0.8 * o + 0.2 * new))
}

/// The prompt tokens a step may run beside decoding sequences, from measured step times.
///
/// Every step earns the prompts `BUSY_SHARE` of a decoding step's time, saved up to a cap; a step
/// with prompt tokens spends what it took beyond a decoding step. A step's prompt cost is fitted
/// as a fixed part plus a part per token (a quantized model widens every weight panel once for
/// any number of prompt rows, whatever their count): prompts run once the credit pays the fixed
/// part at most a quarter of the spend, or once it reaches the cap, as many tokens as the rest
/// pays for. With no fixed cost prompt tokens run beside every few decoding steps; with one,
/// prompt steps are rarer and larger instead of paying it for a token or two, and decoding keeps
/// its share on average either way. The cap is `BUSY_SAVED_STEPS` decoding steps, or the fixed
/// cost and `BUSY_START` tokens if that is more, so a prompt beside decoding always advances.
#[derive(Debug, Default)]
struct PromptShare {
    /// Seconds a step of decoding tokens only takes (a moving average).
    decode_step: Option<f64>,
    /// What prompt tokens add to a step.
    cost: CostFit,
    /// Seconds of prompt work the decoding sequences can still grant.
    credit: f64,
}

/// A line `extra = fixed + per · tokens` fitted to recent steps (least squares, older steps
/// weighing less).
#[derive(Debug, Default)]
struct CostFit {
    w: f64,
    n: f64,
    y: f64,
    nn: f64,
    ny: f64,
}

impl CostFit {
    fn add(&mut self, tokens: usize, extra: f64) {
        const KEEP: f64 = 0.9;
        let n = tokens as f64;
        self.w = KEEP * self.w + 1.0;
        self.n = KEEP * self.n + n;
        self.y = KEEP * self.y + extra;
        self.nn = KEEP * self.nn + n * n;
        self.ny = KEEP * self.ny + n * extra;
    }

    /// `(fixed, per token)`, both non-negative and the second positive; `None` before any step.
    fn line(&self) -> Option<(f64, f64)> {
        if self.w == 0.0 || self.n <= 0.0 {
            return None;
        }
        let (mn, my) = (self.n / self.w, self.y / self.w);
        let var = self.nn / self.w - mn * mn;
        let through_zero = (0.0, (my / mn).max(1e-9));
        // All steps of (nearly) one size say nothing about a fixed part.
        if var <= 1e-9 * mn * mn {
            return Some(through_zero);
        }
        let per = (self.ny / self.w - mn * my) / var;
        let fixed = my - per * mn;
        if per <= 0.0 || fixed < 0.0 {
            return Some(through_zero);
        }
        Some((fixed, per))
    }
}

impl PromptShare {
    /// Prompt tokens for the next step beside `decoders` decoding sequences (`chunk` when none).
    fn budget(&mut self, decoders: usize, chunk: usize) -> usize {
        let chunk = chunk.max(1);
        if decoders == 0 {
            self.credit = 0.0;
            return chunk;
        }
        // A step of decoding alone measures what the budget is a share of.
        let Some(d) = self.decode_step else { return 0 };
        let d = d.max(1e-6);
        let (fixed, per) = self.cost.line().unwrap_or((0.0, d * BUSY_SHARE / BUSY_START as f64));
        let cap = (d * BUSY_SAVED_STEPS).max(fixed + per * BUSY_START as f64);
        self.credit = (self.credit + d * BUSY_SHARE).min(cap);
        let affords = ((self.credit - fixed) / per).floor();
        let worth = self.credit >= 4.0 * fixed && affords >= 1.0;
        if !(worth || self.credit >= cap) {
            return 0;
        }
        (affords.max(1.0) as usize).min(chunk)
    }

    /// Records a step of `secs` that ran `prompt` prompt tokens beside `decoders` decoding ones.
    fn record(&mut self, secs: f64, prompt: usize, decoders: usize) {
        if prompt == 0 {
            self.decode_step = average(self.decode_step, secs);
            return;
        }
        let decode = if decoders > 0 {
            self.decode_step.unwrap_or(0.0)
        } else {
            0.0
        };
        let extra = (secs - decode).max(0.0);
        self.cost.add(prompt, extra);
        if decoders > 0 {
            self.credit -= extra;
        }
    }
}

impl<'m> Worker<'m> {
    fn new(lm: &'m LoadedModel, config: SchedulerConfig, shared: Arc<(Mutex<Shared>, Condvar)>) -> Self {
        Self {
            kv_per_token: kv_bytes_per_token(lm),
            lm,
            config,
            shared,
            active: Vec::new(),
            idle: Vec::new(),
            logits: Vec::new(),
            share: PromptShare::default(),
        }
    }

    fn run(mut self) {
        loop {
            let admitted = {
                let shared = self.shared.clone();
                let (lock, wake) = &*shared;
                let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
                while !s.stop && self.active.is_empty() && s.queue.is_empty() {
                    s = wake.wait(s).unwrap_or_else(|e| e.into_inner());
                }
                if s.stop {
                    return;
                }
                let admitted = self.take_admissible(&mut s.queue);
                // Counted as running from now on, so that `submit` sees the sequences taken.
                s.counters.active = self.active.len() + admitted.len();
                admitted
            };
            for q in admitted {
                self.admit(q);
            }
            self.drop_cancelled();
            if self.active.is_empty() {
                continue;
            }
            let width = self.active.len();
            let (ran, reused) = match self.step() {
                Ok(r) => r,
                Err(e) => {
                    // The step's input was checked before anything ran: fail every sequence
                    // in it (an engine error is not one request's fault, but nothing can go on).
                    let msg = format!("{e:#}");
                    for seq in self.active.drain(..) {
                        let mut seq = seq;
                        (seq.sink)(Update::Failed(msg.clone()));
                    }
                    (0, 0)
                }
            };
            let finished = self.retire();
            let mut s = self.shared.0.lock().unwrap_or_else(|e| e.into_inner());
            let c = &mut s.counters;
            c.steps += 1;
            c.prompt_tokens_run += ran;
            c.prompt_tokens_reused += reused;
            c.finished += finished.0;
            c.cancelled += finished.1;
            c.active = self.active.len();
            c.widest_step = c.widest_step.max(width);
        }
    }

    /// What the sequences in flight count against the memory budget: what each reserved, or
    /// the room its cache has grown to if that is more.
    fn reserved(&self) -> usize {
        self.active.iter().map(|s| s.reserved.max(self.charge(&s.cache))).sum()
    }

    /// Takes the requests at the front of the queue that fit beside those in flight.
    fn take_admissible(&self, queue: &mut VecDeque<Queued>) -> Vec<Queued> {
        // Requests cancelled while waiting end before they began, wherever they are in the
        // queue (not only at its front, when a sequence is free).
        let mut i = 0;
        while i < queue.len() {
            if !queue[i].cancel.load(Ordering::Relaxed) {
                i += 1;
                continue;
            }
            let mut q = queue.remove(i).expect("an index below the length");
            (q.sink)(Update::Done(Completion {
                text: String::new(),
                tokens: Vec::new(),
                finish: FinishReason::Cancelled,
                stop_token: None,
                logprobs: Vec::new(),
                prompt_logprobs: Vec::new(),
                stats: Stats {
                    prompt_tokens: q.req.prompt.len(),
                    ..Stats::default()
                },
            }));
        }
        let mut out = Vec::new();
        let mut reserved = self.reserved();
        while self.active.len() + out.len() < self.config.max_sequences {
            let Some(q) = queue.front() else { break };
            let need = positions(&q.req, self.config.context) * self.kv_per_token;
            if reserved + need > self.config.kv_bytes {
                break;
            }
            reserved += need;
            out.extend(queue.pop_front());
        }
        out
    }

    /// What a cache counts against the memory budget: the positions it has room for.
    fn charge(&self, cache: &Cache) -> usize {
        cache.capacity() * self.kv_per_token
    }

    /// Idle caches go, least recently used first, until `extra` more bytes fit the budget.
    fn evict_idle(&mut self, extra: usize) {
        let idle_bytes = |w: &Self| w.idle.iter().map(|i| w.charge(&i.cache)).sum::<usize>();
        while !self.idle.is_empty() && self.reserved() + extra + idle_bytes(self) > self.config.kv_bytes {
            self.idle.remove(0);
        }
    }

    /// The cache a prompt starts from: the idle cache sharing the longest prefix with it, taken
    /// when that prefix is most of it (the same conversation going on), or a copy of the prefix
    /// when it is a small part (a shared system prompt: the idle conversation stays for its own
    /// next turn); a new cache when nothing is shared. A prompt being scored runs whole (every
    /// position's logits are needed).
    fn start_cache(&mut self, prompt: &[u32], scored: bool) -> (Cache, Vec<u32>) {
        let best = self
            .idle
            .iter()
            .enumerate()
            .map(|(i, idle)| (i, common_prefix(&idle.tokens, prompt)))
            .filter(|&(_, n)| n > 0 && !scored)
            .max_by_key(|&(i, n)| (n, i));
        // At least the last prompt token runs, for its logits.
        if let Some((i, keep)) = best.map(|(i, n)| (i, n.min(prompt.len() - 1))).filter(|&(_, k)| k > 0) {
            let idle = &self.idle[i];
            if 2 * keep < idle.tokens.len() {
                if let Some(Ok(copy)) = idle.cache.prefix(keep) {
                    let tokens = idle.tokens[..keep].to_vec();
                    // The copied-from cache is the most recently used now.
                    let idle = self.idle.remove(i);
                    self.idle.push(idle);
                    return (copy, tokens);
                }
            }
            let mut idle = self.idle.remove(i);
            idle.cache.truncate(keep);
            idle.tokens.truncate(keep);
            return (idle.cache, idle.tokens);
        }
        (self.lm.model.new_cache(self.config.context), Vec::new())
    }

    fn admit(&mut self, q: Queued) {
        let (cache, cached) = self.start_cache(&q.req.prompt, q.req.prompt_logprobs.is_some());
        // A cache taken from an idle one may hold more room than the request needs.
        let need = (positions(&q.req, self.config.context) * self.kv_per_token).max(self.charge(&cache));
        let prompt = q.req.prompt;
        self.evict_idle(need);
        let cached_len = cached.len();
        let s = &q.req.settings;
        let opts = GenerateOptions {
            max_tokens: s.max_tokens,
            stop_ids: self.lm.stop_ids.clone(),
            stop_strings: s.stop.clone(),
            ignore_eos: s.ignore_eos,
            logprobs: q.req.logprobs,
            constraint: q.req.constraint.clone(),
        };
        let mut gen = Generation::new(
            &self.lm.tokenizer,
            Sampler::new(s.sampling.clone()),
            &prompt,
            opts,
            q.at,
        );
        let mut sink = q.sink;
        let _ = gen.begin(&mut |e| send(&mut sink, Update::Event(e)));
        self.active.push(Sequence {
            cache,
            cached,
            prompt,
            next: None,
            gen,
            sink,
            cancel: q.cancel,
            reserved: need,
            reused: cached_len,
            score: q.req.prompt_logprobs,
            failed: false,
        });
    }

    fn drop_cancelled(&mut self) {
        for seq in self.active.iter_mut() {
            if seq.cancel.load(Ordering::Relaxed) && !seq.gen.is_finished() {
                let sink = &mut seq.sink;
                let _ = seq.gen.cancel(&mut |e| send(sink, Update::Event(e)));
            }
        }
    }

    /// One batched step. Returns (prompt tokens run, prompt tokens reused from idle caches).
    fn step(&mut self) -> Result<(usize, usize)> {
        let decoders = self
            .active
            .iter()
            .filter(|s| !s.gen.is_finished() && !s.prefilling() && s.next.is_some())
            .count();
        let budget = self.share.budget(decoders, self.config.prefill_chunk);
        // The prompt budget shared out evenly among the sequences still prefilling (in the order
        // they came): a short prompt is not stuck behind a long one, and none waits for ever.
        let prefilling: Vec<(usize, usize)> = self
            .active
            .iter()
            .enumerate()
            .filter(|(_, s)| s.needs_prompt())
            .map(|(i, s)| (i, s.prompt.len() - s.cached.len()))
            .collect();
        let mut give = vec![0usize; prefilling.len()];
        let mut left = budget;
        loop {
            let open: Vec<usize> = (0..prefilling.len()).filter(|&j| give[j] < prefilling[j].1).collect();
            if open.is_empty() || left == 0 {
                break;
            }
            let share = (left / open.len()).max(1);
            for j in open {
                let g = share.min(prefilling[j].1 - give[j]).min(left);
                give[j] += g;
                left -= g;
            }
        }
        // What each sequence runs: decoding ones their token, prefilling ones a prompt piece
        // (with logits for every position when the prompt is scored).
        let mut plan: Vec<Planned> = Vec::new();
        for (&(i, remaining), &n) in prefilling.iter().zip(&give) {
            if n > 0 {
                let seq = &self.active[i];
                let from = seq.cached.len();
                plan.push(Planned {
                    seq: i,
                    tokens: seq.prompt[from..from + n].to_vec(),
                    kind: RowKind::Prompt,
                    last: n == remaining,
                    logits: if seq.scoring() { LogitsFor::All } else { LogitsFor::Last },
                });
            }
        }
        for (i, seq) in self.active.iter().enumerate() {
            if let (false, false, Some(t)) = (seq.gen.is_finished(), seq.prefilling(), seq.next) {
                plan.push(Planned {
                    seq: i,
                    tokens: vec![t],
                    kind: RowKind::Decode,
                    last: true,
                    logits: LogitsFor::Last,
                });
            }
        }
        if plan.is_empty() {
            return Ok((0, 0));
        }
        let (mut ran, mut reused) = (0, 0);
        {
            let mut chosen: Vec<Option<&mut Sequence>> = self.active.iter_mut().map(Some).collect();
            let mut steps = Vec::with_capacity(plan.len());
            for p in &plan {
                let seq = chosen[p.seq].take().expect("one step per sequence");
                if p.kind == RowKind::Prompt {
                    ran += p.tokens.len();
                    if seq.cached.len() == seq.reused {
                        reused += seq.reused;
                    }
                }
                steps.push(Step {
                    cache: &mut seq.cache,
                    tokens: &p.tokens,
                    kind: p.kind,
                    logits: p.logits,
                });
            }
            let t = Instant::now();
            self.lm.model.forward_batch(&mut steps, &mut self.logits)?;
            let secs = t.elapsed().as_secs_f64();
            self.share.record(secs, ran, decoders);
        }
        let vocab = self.lm.model.vocab_size();
        let context = self.config.context;
        let mut row = 0;
        for p in plan {
            let seq = &mut self.active[p.seq];
            let rows = match p.logits {
                LogitsFor::All => p.tokens.len(),
                LogitsFor::Last => 1,
            };
            let first_row = row;
            row += rows;
            if let (LogitsFor::All, Some(alternatives)) = (p.logits, seq.score) {
                // Row j holds the logits after prompt position `from + j`: they score the token
                // at the next position.
                let from = seq.cached.len();
                for j in 0..p.tokens.len() {
                    if let Some(&next) = seq.prompt.get(from + j + 1) {
                        let r = first_row + j;
                        seq.gen
                            .score_prompt_token(&self.logits[r * vocab..(r + 1) * vocab], next, alternatives);
                    }
                }
            }
            seq.cached.extend_from_slice(&p.tokens);
            if !p.last {
                continue;
            }
            let row = first_row + rows - 1;
            if seq.next.is_none() && seq.gen.tokens().is_empty() {
                seq.gen.prefilled(seq.prompt.len() - seq.reused);
            }
            let logits = &mut self.logits[row * vocab..(row + 1) * vocab];
            let room = seq.cached.len() < context;
            let sink = &mut seq.sink;
            match seq.gen.push(logits, room, &mut |e| send(sink, Update::Event(e))) {
                Ok(next) => seq.next = next,
                Err(e) => {
                    (seq.sink)(Update::Failed(format!("{e:#}")));
                    seq.failed = true;
                    seq.next = None;
                }
            }
        }
        Ok((ran, reused))
    }

    /// Removes finished sequences: their completions are sent, their caches kept for reuse.
    /// Returns (finished, cancelled).
    fn retire(&mut self) -> (usize, usize) {
        let (mut finished, mut cancelled) = (0, 0);
        let mut i = 0;
        while i < self.active.len() {
            let seq = &self.active[i];
            // A request cancelled since this step began is not done yet: the next step ends
            // it (and sends its `Done`).
            let failed = seq.failed;
            if !seq.done() && !failed {
                i += 1;
                continue;
            }
            let seq = self.active.swap_remove(i);
            // Its sequence is free before its client hears it is done (and may send the next).
            self.shared.0.lock().unwrap_or_else(|e| e.into_inner()).counters.active = self.active.len();
            if seq.gen.finish_reason() == Some(FinishReason::Cancelled) || failed {
                cancelled += 1;
            } else {
                finished += 1;
            }
            let used = seq.cached.len();
            if !failed {
                let mut sink = seq.sink;
                sink(Update::Done(seq.gen.into_completion(used)));
            }
            if !seq.cached.is_empty() {
                self.idle.push(Idle {
                    cache: seq.cache,
                    tokens: seq.cached,
                });
            }
        }
        // An idle cache may take more room than its sequence reserved (capacity grows by
        // doubling): the budget holds for what is kept.
        self.evict_idle(0);
        (finished, cancelled)
    }
}

/// What one sequence runs in a step.
struct Planned {
    seq: usize,
    tokens: Vec<u32>,
    kind: RowKind,
    /// The prompt's last piece (or a decoding token): its last row's logits pick the next token.
    last: bool,
    logits: LogitsFor,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Sends an update; a receiver that is gone is how a request is dropped (the next step frees
/// its sequence).
fn send(sink: &mut Sink, u: Update) -> Result<()> {
    if !sink(u) {
        bail!("the request was dropped");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `steps` steps of one decoding sequence beside a long prompt, on a model whose decoding
    /// step takes `d` seconds and whose prompt tokens add `fixed` (once per step with any) plus
    /// `per` each. Returns the share of its speed decoding keeps and the prompt tokens run.
    fn beside_a_prompt(d: f64, fixed: f64, per: f64, steps: usize) -> (f64, usize) {
        let mut share = PromptShare::default();
        // Decoding alone first (what the share is measured against).
        share.record(d, 0, 1);
        let (mut total, mut ran) = (0.0, 0);
        for _ in 0..steps {
            let n = share.budget(1, 512);
            let secs = d + if n > 0 { fixed + n as f64 * per } else { 0.0 };
            share.record(secs, n, 1);
            total += secs;
            ran += n;
        }
        (steps as f64 * d / total, ran)
    }

    #[test]
    fn decoding_keeps_its_share_and_the_prompt_still_advances() {
        // Linear costs, a fixed cost under one step's share, one of several steps, and one far
        // beyond what a step may save up; the prompt tokens each should reach (80-90% of what the
        // share pays for, the fixed cost paid once per step that runs prompt tokens: 10000,
        // 2000 steps of 0.015 s in steps of 10 tokens at 0.04 s, of 60 at 0.12 s, of 8 at 0.508 s).
        for (fixed, per, least) in [
            (0.0, 0.003, 9000),
            (0.01, 0.003, 6700),
            (0.06, 0.001, 13500),
            (0.5, 0.001, 380),
        ] {
            let (kept, ran) = beside_a_prompt(0.03, fixed, per, 2000);
            assert!(
                kept > 0.6,
                "fixed {fixed}, per token {per}: decoding kept {kept:.2} of its speed"
            );
            assert!(ran >= least, "fixed {fixed}, per token {per}: {ran} prompt tokens");
        }
    }

    #[test]
    fn a_fitted_cost_separates_the_fixed_part() {
        let mut fit = CostFit::default();
        assert_eq!(fit.line(), None);
        for n in [4, 40, 9, 100, 1] {
            fit.add(n, 0.05 + 0.002 * n as f64);
        }
        let (fixed, per) = fit.line().unwrap();
        assert!(
            (fixed - 0.05).abs() < 1e-9 && (per - 0.002).abs() < 1e-9,
            "{fixed} {per}"
        );
        // One size only: all of it per token.
        let mut fit = CostFit::default();
        fit.add(8, 0.08);
        fit.add(8, 0.08);
        let (fixed, per) = fit.line().unwrap();
        assert!(fixed == 0.0 && (per - 0.01).abs() < 1e-12, "{fixed} {per}");
    }

    #[test]
    fn without_decoding_a_prompt_takes_whole_chunks_and_nothing_runs_before_a_measure() {
        let mut share = PromptShare::default();
        assert_eq!(share.budget(0, 256), 256);
        // Decoding sequences but no decoding step measured yet: decode alone first.
        assert_eq!(share.budget(3, 256), 0);
        share.record(0.02, 0, 3);
        assert!(share.budget(3, 256) > 0);
    }
}
