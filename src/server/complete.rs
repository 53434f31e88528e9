//! `POST /v1/chat/completions` and `POST /v1/completions`: a body becomes one scheduler request
//! per choice (`n` for each prompt); the answer comes back whole, or streamed as server-sent
//! events.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::http::{json_body, one_line, ApiError, LogLine, LoggedByStream, Tokens};
use super::info::ready;
use super::App;
use crate::generation::{Completion, Event, TokenLogprob};
use crate::openai::{self, Endpoint, Input, Job, LegacyLogprobs, Prompt, TextOffsets};
use crate::scheduler::{Refusal, Request, Update};
use crate::settings::Settings;
use crate::tools::{CallSplitter, Piece};

pub async fn chat(
    State(app): State<Arc<App>>,
    Extension(log): Extension<LogLine>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(app, Endpoint::Chat, log, headers, body).await
}

pub async fn completions(
    State(app): State<Arc<App>>,
    Extension(log): Extension<LogLine>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(app, Endpoint::Completions, log, headers, body).await
}

async fn handle(app: Arc<App>, endpoint: Endpoint, log: LogLine, headers: HeaderMap, body: Body) -> Response {
    let run = match start(app.clone(), endpoint, log, headers, body).await {
        Ok(run) => run,
        Err(e) => {
            app.metrics.request(e.status.as_u16(), 0, 0);
            return e.into_response();
        }
    };
    if run.job.stream {
        stream(run)
    } else {
        whole(run).await
    }
}

/// A request whose choices are in the scheduler. Dropping it (the client went away) cancels
/// them.
struct Run {
    app: Arc<App>,
    job: Job,
    prompts: Vec<Prompt>,
    id: String,
    created: u64,
    model: String,
    updates: UnboundedReceiver<(usize, Update)>,
    cancels: Vec<Arc<AtomicBool>>,
    deadline: Option<tokio::time::Instant>,
    log: LogLine,
    /// The answer (or its stream) took over the access log.
    answered: bool,
}

impl Drop for Run {
    fn drop(&mut self) {
        for c in &self.cancels {
            c.store(true, Ordering::Relaxed);
        }
        if !self.answered {
            // The client went away while waiting for the whole answer.
            let p = self.prompts.iter().map(|p| p.ids.len()).sum();
            self.app.metrics.request(499, p, 0);
            self.log.write(499, Some(Tokens(p, 0)), " (the client went away)");
        }
    }
}

impl Run {
    /// The next update, or an error at the deadline or if the scheduler is gone.
    async fn next(&mut self) -> Result<(usize, Update), ApiError> {
        let got = match self.deadline {
            Some(d) => match tokio::time::timeout_at(d, self.updates.recv()).await {
                Ok(got) => got,
                Err(_) => {
                    return Err(ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "the request took longer than the server's limit of {} s (--timeout)",
                            self.app.config.timeout.map_or(0, |t| t.as_secs())
                        ),
                    ))
                }
            },
            None => self.updates.recv().await,
        };
        got.ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the scheduler stopped"))
    }

    fn prompt_of(&self, choice: usize) -> &Prompt {
        &self.prompts[choice / self.job.n.max(1)]
    }

    fn usage(&self, done: &[Option<Completion>]) -> Tokens {
        let p = self.prompts.iter().map(|p| p.ids.len()).sum();
        let g = done.iter().flatten().map(|c| c.tokens.len()).sum();
        Tokens(p, g)
    }
}

/// Reads and checks the request, tokenizes its prompts and submits its choices.
async fn start(
    app: Arc<App>,
    endpoint: Endpoint,
    log: LogLine,
    headers: HeaderMap,
    body: Body,
) -> Result<Run, ApiError> {
    let body = json_body(&headers, body).await?;
    let job = Job::from_body(endpoint, &body).map_err(ApiError::invalid)?;
    let r = ready(&app)?;
    let lm = &r.lm;
    let add_bos = !app.config.spec.no_bos;
    let scoring = job.scores_prompt();
    // Compiling a schema takes milliseconds (the first one builds the vocabulary's trie).
    let constraint = tokio::task::block_in_place(|| lm.constraint_for(&job.shape)).map_err(ApiError::invalid)?;
    let mut prompts = Vec::with_capacity(job.inputs.len());
    for input in &job.inputs {
        let (text, ids) = match input {
            Input::Chat(messages) => lm.encode_chat(messages, &job.shape.tools, add_bos, r.context),
            Input::Text(t) => lm.encode_text(t, add_bos, r.context).map(|ids| (t.clone(), ids)),
            Input::Tokens(ids) => lm.check_token_ids(ids).and_then(|ids| {
                let text = if job.echo {
                    lm.tokenizer.decode(ids)?
                } else {
                    String::new()
                };
                Ok((text, ids.to_vec()))
            }),
        }
        .map_err(ApiError::invalid)?;
        if ids.is_empty() {
            return Err(ApiError::bad_request(Refusal::EmptyPrompt.to_string()));
        }
        if ids.len() >= r.context {
            return Err(ApiError::bad_request(
                Refusal::PromptTooLong {
                    prompt: ids.len(),
                    context: r.context,
                }
                .to_string(),
            ));
        }
        let token_texts = if scoring {
            ids.iter().map(|&id| lm.tokenizer.token_text(id)).collect()
        } else {
            Vec::new()
        };
        prompts.push(Prompt { ids, text, token_texts });
    }
    let settings =
        Settings::resolve(&job.sampling.over(&app.config.defaults), &lm.generation).map_err(ApiError::invalid)?;
    let (tx, updates) = unbounded_channel();
    let mut run = Run {
        app: app.clone(),
        id: app.id(),
        created: super::unix_time(),
        model: lm.name.clone(),
        updates,
        cancels: Vec::new(),
        deadline: app.config.timeout.map(|t| tokio::time::Instant::now() + t),
        log,
        prompts: Vec::new(),
        job,
        // Nothing to log here if it fails before the end of this function.
        answered: true,
    };
    for (p, prompt) in prompts.iter().enumerate() {
        for i in 0..run.job.n {
            let k = p * run.job.n + i;
            let mut settings = settings.clone();
            // Each choice samples with its own seed (the same request gives the same choices).
            settings.sampling.seed = settings.sampling.seed.wrapping_add(i as u64);
            let req = Request {
                prompt: prompt.ids.clone(),
                settings,
                logprobs: run.job.logprobs,
                prompt_logprobs: scoring.then(|| run.job.logprobs.unwrap_or(0)),
                constraint: constraint.clone(),
            };
            let tx = tx.clone();
            match r.sched.submit_to(req, Box::new(move |u| tx.send((k, u)).is_ok())) {
                Ok(cancel) => run.cancels.push(cancel),
                Err(Refusal::QueueFull { waiting }) => {
                    return Err(ApiError {
                        retry_after: Some(2),
                        ..ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("the server is busy ({waiting} requests waiting); try again later"),
                        )
                    })
                }
                Err(e) => return Err(ApiError::bad_request(e.to_string())),
            }
        }
    }
    run.prompts = prompts;
    run.answered = false;
    Ok(run)
}

/// The whole answer at once.
async fn whole(mut run: Run) -> Response {
    let response = whole_answer(&mut run).await;
    run.answered = true;
    response
}

async fn whole_answer(run: &mut Run) -> Response {
    let choices = run.job.choices();
    let mut done: Vec<Option<Completion>> = vec![None; choices];
    let mut left = choices;
    while left > 0 {
        match run.next().await {
            Ok((k, Update::Done(c))) => {
                if c.tokens.len() + usize::from(c.stop_token.is_some()) > 0 {
                    run.app.metrics.first_token(c.stats.time_to_first_token);
                }
                done[k] = Some(c);
                left -= 1;
            }
            Ok((_, Update::Event(_))) => {}
            Ok((_, Update::Failed(e))) => {
                return fail(run, ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, one_line(&e)))
            }
            Err(e) => return fail(run, e),
        }
    }
    let tokens = run.usage(&done);
    let done: Vec<Completion> = done.into_iter().flatten().collect();
    run.app.metrics.request(200, tokens.0, tokens.1);
    let body = openai::response_body(&run.job, &run.id, run.created, &run.model, &run.prompts, &done);
    let mut r = Json(body).into_response();
    r.extensions_mut().insert(tokens);
    r
}

fn fail(run: &Run, e: ApiError) -> Response {
    run.app.metrics.request(e.status.as_u16(), 0, 0);
    e.into_response()
}

/// The answer as server-sent events: OpenAI's chunks, then `data: [DONE]`.
fn stream(mut run: Run) -> Response {
    run.answered = true;
    let choices = run.job.choices();
    let mut s = Streamer {
        queue: VecDeque::new(),
        pending: vec![Vec::new(); choices],
        offsets: (0..choices).map(|k| TextOffsets::after(run.prompt_of(k))).collect(),
        splitters: (0..choices)
            .map(|k| {
                run.job
                    .shape
                    .parses_calls()
                    .then(|| CallSplitter::new(&format!("{}-{k}", run.id)))
            })
            .collect(),
        calls: vec![0; choices],
        done: vec![None; choices],
        ended: false,
        status: 200,
        run,
    };
    s.opening();
    let events = futures_util::stream::unfold(s, |mut s| async move {
        let data = s.next().await?;
        Some((Ok::<_, Infallible>(SseEvent::default().data(data)), s))
    });
    let mut r = Sse::new(events).keep_alive(KeepAlive::default()).into_response();
    r.extensions_mut().insert(LoggedByStream);
    r
}

struct Streamer {
    run: Run,
    /// `data:` payloads ready to go.
    queue: VecDeque<String>,
    /// Each choice's token log-probabilities not yet sent (they go with the next text).
    pending: Vec<Vec<TokenLogprob>>,
    offsets: Vec<TextOffsets>,
    /// With tools: each choice's answer split into content and calls as it streams.
    splitters: Vec<Option<CallSplitter>>,
    /// Calls sent per choice.
    calls: Vec<usize>,
    done: Vec<Option<Completion>>,
    ended: bool,
    status: u16,
}

impl Streamer {
    fn push(&mut self, choice: Value) {
        let r = &self.run;
        let chunk = openai::chunk(&r.job, &r.id, r.created, &r.model, choice);
        self.queue.push_back(chunk.to_string());
    }

    /// The first chunks: the assistant's role (chat), the prompt (completions with `echo`).
    fn opening(&mut self) {
        for k in 0..self.run.job.choices() {
            match self.run.job.endpoint {
                Endpoint::Chat => self.push(json!({
                    "index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null,
                })),
                // A scored prompt comes with its log-probabilities at the end.
                Endpoint::Completions if self.run.job.echo && !self.run.job.scores_prompt() => {
                    let text = self.run.prompt_of(k).text.clone();
                    self.push(json!({"index": k, "text": text, "logprobs": null, "finish_reason": null}));
                }
                Endpoint::Completions => {}
            }
        }
    }

    /// A chunk of text for choice `k`, with the log-probabilities of its tokens.
    fn text(&mut self, k: usize, text: &str, finish: Option<&str>) {
        let lps = std::mem::take(&mut self.pending[k]);
        let job = &self.run.job;
        let logprobs = match (job.logprobs, job.endpoint) {
            (None, _) => Value::Null,
            (Some(_), Endpoint::Chat) => openai::chat_logprobs(&lps),
            (Some(_), Endpoint::Completions) => {
                let mut l = LegacyLogprobs::default();
                l.push_tokens(&lps, &mut self.offsets[k]);
                l.to_json()
            }
        };
        let choice = match job.endpoint {
            Endpoint::Chat => {
                let delta = if text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": k, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Endpoint::Completions => json!({"index": k, "text": text, "logprobs": logprobs, "finish_reason": finish}),
        };
        self.push(choice);
    }

    /// Text of choice `k`, through its call splitter when there are tools.
    fn answer_text(&mut self, k: usize, text: &str, end: bool) {
        let Some(splitter) = &mut self.splitters[k] else {
            if !text.is_empty() {
                self.text(k, text, None);
            }
            return;
        };
        let mut pieces = splitter.push(text);
        if end {
            pieces.extend(splitter.finish());
        }
        for p in pieces {
            match p {
                Piece::Content(c) => self.text(k, &c, None),
                Piece::Call(call) => {
                    // OpenAI's shape: the call's index, id, type and name first, then the
                    // arguments (here in one fragment, the call being complete).
                    let index = self.calls[k];
                    self.calls[k] += 1;
                    for delta in [
                        json!({"tool_calls": [{"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}]}),
                        json!({"tool_calls": [{"index": index, "function": {"arguments": call.arguments.to_string()}}]}),
                    ] {
                        self.push(json!({"index": k, "delta": delta, "logprobs": null, "finish_reason": null}));
                    }
                }
            }
        }
    }

    fn update(&mut self, k: usize, u: Update) {
        let scored = self.run.job.scores_prompt();
        match u {
            Update::Event(Event::Token { logprob: Some(lp), .. }) if !scored => self.pending[k].push(lp),
            Update::Event(Event::Text(t)) if !scored => self.answer_text(k, &t, false),
            Update::Event(_) => {}
            Update::Done(c) => {
                if scored {
                    // The prompt with its scores, then the answer, in one chunk.
                    let prompt = self.run.prompt_of(k);
                    let mut l = LegacyLogprobs::default();
                    let mut offsets = TextOffsets::new(&self.run.job, prompt);
                    l.push_prompt(prompt, &c, &mut offsets);
                    l.push_tokens(&c.logprobs, &mut offsets);
                    let text = format!("{}{}", prompt.text, c.text);
                    let choice = json!({
                        "index": k, "text": text, "logprobs": l.to_json(),
                        "finish_reason": openai::finish_reason(c.finish),
                    });
                    self.push(choice);
                } else {
                    self.answer_text(k, "", true);
                    let finish = match openai::finish_reason(c.finish) {
                        "stop" if self.calls[k] > 0 => "tool_calls",
                        f => f,
                    };
                    self.text(k, "", Some(finish));
                }
                if !c.tokens.is_empty() || c.stop_token.is_some() {
                    self.run.app.metrics.first_token(c.stats.time_to_first_token);
                }
                self.done[k] = Some(c);
                if self.done.iter().all(Option::is_some) {
                    if self.run.job.include_usage {
                        let done: Vec<Completion> = self.done.iter().flatten().cloned().collect();
                        let r = &self.run;
                        let usage = openai::usage(&r.prompts, &done);
                        let chunk = openai::usage_chunk(&r.job, &r.id, r.created, &r.model, usage);
                        self.queue.push_back(chunk.to_string());
                    }
                    self.finish(None);
                }
            }
            Update::Failed(e) => self.finish(Some(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, one_line(&e)))),
        }
    }

    /// The end of the stream: an error event if it failed, then `[DONE]`.
    fn finish(&mut self, error: Option<ApiError>) {
        if let Some(e) = error {
            self.status = e.status.as_u16();
            self.queue.push_back(e.body().to_string());
        }
        self.queue.push_back("[DONE]".into());
        self.ended = true;
        let tokens = self.run.usage(&self.done);
        let status = self.status;
        self.run.app.metrics.request(status, tokens.0, tokens.1);
        self.run.log.write(status, Some(tokens), "");
    }

    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(d) = self.queue.pop_front() {
                return Some(d);
            }
            if self.ended {
                return None;
            }
            match self.run.next().await {
                Ok((k, u)) => self.update(k, u),
                Err(e) => self.finish(Some(e)),
            }
        }
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        if !self.ended {
            // The client went away before the end: its sequences stop at the next step.
            let tokens = self.run.usage(&self.done);
            self.run.app.metrics.request(499, tokens.0, tokens.1);
            self.run.log.write(499, Some(tokens), " (the client went away)");
        }
    }
}
