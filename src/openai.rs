//! The OpenAI API's request and response bodies, as `zagreus batch` and `zagreus serve` take and
//! give them: `/v1/chat/completions` and `/v1/completions`. A body becomes a [`Job`] (its
//! prompts and a [`SamplingRequest`]); finished [`Completion`]s become a response body, or,
//! streamed, the chunks of one.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::generation::{Completion, FinishReason, TokenLogprob};
use crate::settings::SamplingRequest;
use crate::structured::AnswerShape;
use crate::template::Message;
use crate::tools::{parse_answer, parse_tools, ToolChoice};

/// Which endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    /// From a URL path (`/v1/chat/completions`, `/v1/completions`; `/v1` optional).
    pub fn from_url(url: &str) -> Result<Self> {
        match url.trim_end_matches('/').trim_start_matches("/v1") {
            "/chat/completions" => Ok(Endpoint::Chat),
            "/completions" => Ok(Endpoint::Completions),
            _ => bail!("url {url:?}: use /v1/chat/completions or /v1/completions"),
        }
    }

    pub fn url(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<Message>),
    /// Text sent as is.
    Text(String),
    /// Token ids sent as is (no BOS added).
    Tokens(Vec<u32>),
}

/// One request, ready for the scheduler once its prompts are tokenized.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub endpoint: Endpoint,
    /// One conversation (chat), or one or more prompts (completions).
    pub inputs: Vec<Input>,
    /// Choices per prompt.
    pub n: usize,
    /// Completions: the prompt comes back before the answer (with its log-probabilities when
    /// `logprobs` is set, which is how a prompt is scored).
    pub echo: bool,
    pub stream: bool,
    /// Streaming: a last chunk with the token usage.
    pub include_usage: bool,
    pub sampling: SamplingRequest,
    /// Log-probabilities with this many alternatives per token.
    pub logprobs: Option<usize>,
    /// The `model` the request named (echoed back).
    pub model: Option<String>,
    /// Chat: `tools`, `tool_choice`, `parallel_tool_calls`; `response_format`'s schema.
    pub shape: AnswerShape,
}

impl Job {
    /// Choices in the response: `n` for each prompt.
    pub fn choices(&self) -> usize {
        self.inputs.len() * self.n
    }

    /// Whether the prompts are scored (their log-probabilities returned).
    pub fn scores_prompt(&self) -> bool {
        self.echo && self.logprobs.is_some() && self.endpoint == Endpoint::Completions
    }
}

/// One prompt of a job as the model sees it.
#[derive(Debug, Clone, Default)]
pub struct Prompt {
    pub ids: Vec<u32>,
    /// Its text (what `echo` sends back).
    pub text: String,
    /// Each token's text, when the prompt is scored.
    pub token_texts: Vec<String>,
}

/// `stop`: a string or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The fields zagreus reads from a body; the others are ignored, as OpenAI-compatible servers do.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Body {
    model: Option<String>,
    messages: Option<Vec<Value>>,
    prompt: Option<Value>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    min_p: Option<f64>,
    repeat_penalty: Option<f64>,
    repetition_penalty: Option<f64>,
    repeat_last_n: Option<i64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    seed: Option<u64>,
    stop: Option<Stop>,
    n: Option<usize>,
    /// Chat: `true` with `top_logprobs`; completions: the number of alternatives.
    logprobs: Option<Value>,
    top_logprobs: Option<usize>,
    ignore_eos: Option<bool>,
    echo: Option<bool>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    response_format: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// Most alternatives per token a request may ask for (as OpenAI: 20).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most choices (prompts times `n`) one request may ask for.
pub const MAX_CHOICES: usize = 128;

impl Job {
    /// A request body for `endpoint`.
    pub fn from_body(endpoint: Endpoint, body: &Value) -> Result<Self> {
        if !body.is_object() {
            bail!("the request body must be a JSON object");
        }
        // A bad value is named by its field (`temperature: invalid type: string "hot"...`).
        let b: Body = serde_path_to_error::deserialize(body.clone()).map_err(|e| match e.path().to_string() {
            p if p == "." => anyhow::anyhow!("the request body: {}", e.inner()),
            p => anyhow::anyhow!("{p}: {}", e.inner()),
        })?;
        let n = b.n.unwrap_or(1);
        if n == 0 {
            bail!("n 0: ask for at least one choice");
        }
        let inputs = match endpoint {
            Endpoint::Chat => {
                let Some(messages) = b.messages else {
                    bail!("a chat completion needs `messages`");
                };
                if messages.is_empty() {
                    bail!("`messages` is empty");
                }
                vec![Input::Chat(messages.iter().map(message).collect::<Result<_>>()?)]
            }
            Endpoint::Completions => match b.prompt {
                Some(p) => prompts(p)?,
                None => bail!("a completion needs `prompt`"),
            },
        };
        if inputs.len().saturating_mul(n) > MAX_CHOICES {
            bail!(
                "n {n} with {} prompts asks for {} choices: at most {MAX_CHOICES} per request",
                inputs.len(),
                inputs.len().saturating_mul(n)
            );
        }
        let logprobs = match (endpoint, &b.logprobs) {
            (_, None | Some(Value::Null) | Some(Value::Bool(false))) => None,
            (Endpoint::Chat, Some(Value::Bool(true))) => Some(b.top_logprobs.unwrap_or(0)),
            (Endpoint::Completions, Some(Value::Number(n))) => {
                Some(n.as_u64().context("`logprobs` must be a whole number")? as usize)
            }
            (_, Some(v)) => bail!("logprobs {v}: use true with top_logprobs (chat) or a number (completions)"),
        };
        if let Some(n) = logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
            bail!("top_logprobs {n}: at most {MAX_TOP_LOGPROBS}");
        }
        let stop = match b.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        let sampling = SamplingRequest {
            temperature: b.temperature,
            top_k: b.top_k,
            top_p: b.top_p,
            min_p: b.min_p,
            repeat_penalty: b.repeat_penalty.or(b.repetition_penalty),
            repeat_last_n: b.repeat_last_n,
            presence_penalty: b.presence_penalty,
            frequency_penalty: b.frequency_penalty,
            seed: b.seed,
            max_tokens: b.max_completion_tokens.or(b.max_tokens),
            stop,
            ignore_eos: b.ignore_eos.unwrap_or(false),
        };
        let tools = match b.tools {
            None | Some(Value::Null) => Vec::new(),
            Some(_) if endpoint == Endpoint::Completions => {
                bail!("tools: tool calls are made through /v1/chat/completions")
            }
            Some(t) => parse_tools(&t)?,
        };
        let tool_choice = match &b.tool_choice {
            None | Some(Value::Null) => None,
            Some(v) => Some(ToolChoice::from_json(v)?),
        };
        let json_schema = match &b.response_format {
            None | Some(Value::Null) => None,
            Some(f) => response_format(f)?,
        };
        Ok(Job {
            endpoint,
            inputs,
            shape: AnswerShape::new(tools, tool_choice, b.parallel_tool_calls.unwrap_or(true), json_schema)?,
            n,
            echo: b.echo.unwrap_or(false),
            stream: b.stream.unwrap_or(false),
            include_usage: b.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
            sampling,
            logprobs,
            model: b.model,
        })
    }
}

/// `response_format`: `{"type": "text"}`, `{"type": "json_object"}` (any JSON object) or
/// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
fn response_format(f: &Value) -> Result<Option<Value>> {
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "object"}))),
        Some("json_schema") => {
            let schema = f
                .get("json_schema")
                .and_then(|s| s.get("schema"))
                .context("response_format: `json_schema` needs a `schema`")?;
            if !schema.is_object() {
                bail!("response_format: the schema must be a JSON object");
            }
            Ok(Some(schema.clone()))
        }
        _ => bail!("response_format {f}: use type \"text\", \"json_object\" or \"json_schema\""),
    }
}

/// The assistant's message of a chat choice, and its finish reason: with tools, the answer is
/// split into `content` (null when empty) and `tool_calls` (finish reason `tool_calls`).
pub fn chat_message(job: &Job, c: &Completion, salt: &str) -> (Value, &'static str) {
    let finish = finish_reason(c.finish);
    if !job.shape.parses_calls() {
        return (json!({"role": "assistant", "content": c.text}), finish);
    }
    let parsed = parse_answer(&c.text, salt);
    if parsed.calls.is_empty() {
        return (json!({"role": "assistant", "content": parsed.content}), finish);
    }
    let content = if parsed.content.is_empty() {
        Value::Null
    } else {
        json!(parsed.content)
    };
    let calls: Vec<Value> = parsed.calls.iter().map(|t| t.to_openai()).collect();
    let finish = if finish == "stop" { "tool_calls" } else { finish };
    (
        json!({"role": "assistant", "content": content, "tool_calls": calls}),
        finish,
    )
}

/// A completion's `prompt`: a string, a list of token ids, or a list of either.
fn prompts(p: Value) -> Result<Vec<Input>> {
    const SHAPE: &str = "`prompt` must be a string, a list of token ids, or a list of strings or of token-id lists";
    let ids = |a: &[Value]| -> Result<Vec<u32>> {
        a.iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .with_context(|| format!("prompt token {v} is not a token id"))
            })
            .collect()
    };
    match p {
        Value::String(s) => Ok(vec![Input::Text(s)]),
        Value::Array(a) if a.is_empty() => bail!("`prompt` is an empty list"),
        Value::Array(a) if a[0].is_number() => Ok(vec![Input::Tokens(ids(&a)?)]),
        Value::Array(a) => a
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(Input::Text(s)),
                Value::Array(t) if !t.is_empty() => Ok(Input::Tokens(ids(&t)?)),
                Value::Array(_) => bail!("`prompt` holds an empty list of token ids"),
                _ => bail!("{SHAPE}"),
            })
            .collect(),
        _ => bail!("{SHAPE}"),
    }
}

/// One message of a chat request: `content` a string, a list of text parts, or absent (an
/// assistant's tool call); every other field is kept for the template.
fn message(v: &Value) -> Result<Message> {
    let Some(obj) = v.as_object() else {
        bail!("each message must be an object with `role` and `content`");
    };
    let role = obj
        .get("role")
        .and_then(Value::as_str)
        .context("a message without a `role`")?;
    let content = match obj.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (kind, _) => bail!(
                        "a message part of type {:?}: only text parts are supported",
                        kind.unwrap_or("?")
                    ),
                }
            }
            text
        }
        Some(_) => bail!("a message's `content` must be a string or a list of text parts"),
    };
    let mut m = Message::new(role, content);
    m.extra = obj
        .iter()
        .filter(|(k, _)| *k != "role" && *k != "content")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect::<Map<_, _>>();
    Ok(m)
}

/// OpenAI's name for why generation ended.
pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::StopToken | FinishReason::StopString => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
    }
}

/// Token usage of a job: each prompt counted once, every choice's tokens.
pub fn usage(prompts: &[Prompt], choices: &[Completion]) -> Value {
    let prompt: usize = prompts.iter().map(|p| p.ids.len()).sum();
    let completion: usize = choices.iter().map(|c| c.tokens.len()).sum();
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// llama.cpp's server reports these figures under these names.
fn timings(c: &Completion) -> Value {
    let st = &c.stats;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    json!({
        "prompt_n": st.prompt_processed,
        "prompt_cached": st.prompt_tokens - st.prompt_processed,
        "prompt_ms": ms(st.prompt_time),
        "time_to_first_token_ms": ms(st.time_to_first_token),
        "predicted_n": c.tokens.len(),
        "predicted_ms": ms(st.decode_time),
        "predicted_per_second": st.decode_tps(),
    })
}

/// The response body of a finished job: `choices[k]` answers `prompts[k / job.n]`.
pub fn response_body(
    job: &Job,
    id: &str,
    created: u64,
    model: &str,
    prompts: &[Prompt],
    choices: &[Completion],
) -> Value {
    let model = job.model.as_deref().unwrap_or(model);
    let mut body = match job.endpoint {
        Endpoint::Chat => json!({
            "id": format!("chatcmpl-{id}"),
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices.iter().enumerate().map(|(k, c)| {
                let (message, finish) = chat_message(job, c, &format!("{id}-{k}"));
                json!({
                    "index": k,
                    "message": message,
                    "logprobs": job.logprobs.map(|_| chat_logprobs(&c.logprobs)),
                    "finish_reason": finish,
                })
            }).collect::<Vec<_>>(),
        }),
        Endpoint::Completions => json!({
            "id": format!("cmpl-{id}"),
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices.iter().enumerate().map(|(k, c)| {
                let prompt = &prompts[k / job.n.max(1)];
                let mut offsets = TextOffsets::new(job, prompt);
                let mut logprobs = job.logprobs.map(|_| LegacyLogprobs::default());
                if let (Some(lp), true) = (&mut logprobs, job.echo) {
                    lp.push_prompt(prompt, c, &mut offsets);
                }
                if let Some(lp) = &mut logprobs {
                    lp.push_tokens(&c.logprobs, &mut offsets);
                }
                let text = if job.echo { format!("{}{}", prompt.text, c.text) } else { c.text.clone() };
                json!({
                    "index": k,
                    "text": text,
                    "logprobs": logprobs.map(|l| l.to_json()),
                    "finish_reason": finish_reason(c.finish),
                })
            }).collect::<Vec<_>>(),
        }),
    };
    body["usage"] = usage(prompts, choices);
    if let [c] = choices {
        body["timings"] = timings(c);
    }
    body
}

/// `text_offset` in the legacy logprobs: where each token starts in the prompt and answer, in
/// characters.
pub struct TextOffsets(usize);

impl TextOffsets {
    /// Offsets of a choice's tokens: from the prompt's start when echoed, else after the prompt.
    pub fn new(job: &Job, prompt: &Prompt) -> Self {
        if job.echo {
            TextOffsets(0)
        } else {
            Self::after(prompt)
        }
    }

    /// Offsets of the tokens after the prompt.
    pub fn after(prompt: &Prompt) -> Self {
        TextOffsets(prompt.text.chars().count())
    }

    fn next(&mut self, token: &str) -> usize {
        let at = self.0;
        self.0 += token.chars().count();
        at
    }
}

/// The completions endpoint's logprobs: parallel lists.
#[derive(Default)]
pub struct LegacyLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top_logprobs: Vec<Option<Map<String, Value>>>,
    text_offset: Vec<usize>,
}

impl LegacyLogprobs {
    /// The prompt's tokens: the first without a log-probability (nothing comes before it).
    pub fn push_prompt(&mut self, prompt: &Prompt, c: &Completion, offsets: &mut TextOffsets) {
        for (i, text) in prompt.token_texts.iter().enumerate() {
            self.text_offset.push(offsets.next(text));
            self.tokens.push(text.clone());
            let lp = i.checked_sub(1).and_then(|j| c.prompt_logprobs.get(j));
            self.token_logprobs.push(lp.map(|t| t.logprob));
            self.top_logprobs.push(lp.map(top_map));
        }
    }

    pub fn push_tokens(&mut self, lps: &[TokenLogprob], offsets: &mut TextOffsets) {
        for t in lps {
            self.text_offset.push(offsets.next(&t.token));
            self.tokens.push(t.token.clone());
            self.token_logprobs.push(Some(t.logprob));
            self.top_logprobs.push(Some(top_map(t)));
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

/// `{token: logprob}` of a token's alternatives, the token itself included (as OpenAI does).
fn top_map(t: &TokenLogprob) -> Map<String, Value> {
    let mut m: Map<String, Value> = t
        .top_logprobs
        .iter()
        .map(|a| (a.token.clone(), json!(a.logprob)))
        .collect();
    m.entry(t.token.clone()).or_insert(json!(t.logprob));
    m
}

/// The chat endpoint's logprobs for some tokens.
pub fn chat_logprobs(lps: &[TokenLogprob]) -> Value {
    json!({ "content": lps.iter().map(chat_logprob).collect::<Vec<_>>() })
}

/// One chunk of a streamed response: `choice` is the choice's fields (`delta` or `text`,
/// `logprobs`, `finish_reason`); with `include_usage` every chunk has `usage: null` until the
/// last.
pub fn chunk(job: &Job, id: &str, created: u64, model: &str, choice: Value) -> Value {
    let model = job.model.as_deref().unwrap_or(model);
    let (prefix, object) = match job.endpoint {
        Endpoint::Chat => ("chatcmpl", "chat.completion.chunk"),
        Endpoint::Completions => ("cmpl", "text_completion"),
    };
    let mut v = json!({
        "id": format!("{prefix}-{id}"),
        "object": object,
        "created": created,
        "model": model,
        "choices": [choice],
    });
    if job.include_usage {
        v["usage"] = Value::Null;
    }
    v
}

/// The last chunk of a stream with `include_usage`: no choices, the usage.
pub fn usage_chunk(job: &Job, id: &str, created: u64, model: &str, usage: Value) -> Value {
    let mut v = chunk(job, id, created, model, Value::Null);
    v["choices"] = json!([]);
    v["usage"] = usage;
    v
}

fn chat_logprob(t: &TokenLogprob) -> Value {
    json!({
        "token": t.token,
        "logprob": t.logprob,
        "bytes": t.token.as_bytes(),
        "top_logprobs": t.top_logprobs.iter().map(|a| json!({
            "token": a.token, "logprob": a.logprob, "bytes": a.token.as_bytes(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_bodies_fill_the_same_settings_as_flags() {
        let body = json!({
            "model": "x", "messages": [{"role": "system", "content": "S"},
                                       {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "max_completion_tokens": 5, "temperature": 0, "stop": "END", "seed": 3, "stream": false,
            "logprobs": true, "top_logprobs": 2
        });
        let job = Job::from_body(Endpoint::Chat, &body).unwrap();
        assert_eq!(
            job.inputs,
            [Input::Chat(vec![
                Message::new("system", "S"),
                Message::new("user", "ab")
            ])]
        );
        assert!(!job.stream && !job.echo && job.n == 1);
        assert_eq!(job.sampling.max_tokens, Some(5));
        assert_eq!(job.sampling.temperature, Some(0.0));
        assert_eq!(job.sampling.stop, ["END"]);
        assert_eq!(job.logprobs, Some(2));
        let job = Job::from_body(
            Endpoint::Completions,
            &json!({"prompt": "p", "logprobs": 1, "stop": ["a", "b"]}),
        )
        .unwrap();
        assert_eq!(job.inputs, [Input::Text("p".into())]);
        assert_eq!((job.logprobs, job.sampling.stop.len()), (Some(1), 2));
    }

    #[test]
    fn prompts_come_as_text_token_ids_or_lists_of_either() {
        let inputs = |p: Value| Job::from_body(Endpoint::Completions, &json!({"prompt": p})).map(|j| j.inputs);
        assert_eq!(inputs(json!("a")).unwrap(), [Input::Text("a".into())]);
        assert_eq!(inputs(json!([1, 2])).unwrap(), [Input::Tokens(vec![1, 2])]);
        assert_eq!(
            inputs(json!(["a", "b"])).unwrap(),
            [Input::Text("a".into()), Input::Text("b".into())]
        );
        assert_eq!(
            inputs(json!([[1], [2, 3]])).unwrap(),
            [Input::Tokens(vec![1]), Input::Tokens(vec![2, 3])]
        );
        for (bad, needle) in [
            (json!([]), "empty list"),
            (json!([1, -2]), "prompt token -2"),
            (json!([[1], []]), "empty list of token ids"),
            (json!([1.5]), "prompt token 1.5"),
            (json!({"a": 1}), "must be a string"),
        ] {
            let e = format!("{:#}", inputs(bad.clone()).unwrap_err());
            assert!(e.contains(needle), "{bad}: {e}");
        }
        let j = Job::from_body(
            Endpoint::Completions,
            &json!({"prompt": [[1, 2]], "echo": true, "logprobs": 1, "max_tokens": 1, "n": 2,
                    "stream": true, "stream_options": {"include_usage": true}}),
        )
        .unwrap();
        assert!(j.scores_prompt() && j.stream && j.include_usage);
        assert_eq!(j.choices(), 2);
    }

    #[test]
    fn echoed_prompts_come_back_scored_with_character_offsets() {
        use crate::generation::{Alternative, FinishReason, Stats};
        let lp = |token: &str, logprob: f32| TokenLogprob {
            id: 0,
            token: token.into(),
            logprob,
            top_logprobs: vec![Alternative {
                id: 1,
                token: "x".into(),
                logprob: -0.5,
            }],
        };
        let job = Job::from_body(
            Endpoint::Completions,
            &json!({"prompt": "è a", "echo": true, "logprobs": 1, "max_tokens": 1}),
        )
        .unwrap();
        let prompt = Prompt {
            ids: vec![5, 6],
            text: "è a".into(),
            token_texts: vec!["è".into(), " a".into()],
        };
        let c = Completion {
            text: "!".into(),
            tokens: vec![7],
            finish: FinishReason::Length,
            stop_token: None,
            logprobs: vec![lp("!", -2.0)],
            prompt_logprobs: vec![lp(" a", -1.0)],
            stats: Stats::default(),
        };
        let body = response_body(&job, "1", 0, "m", &[prompt], &[c]);
        let choice = &body["choices"][0];
        assert_eq!(choice["text"], "è a!");
        let l = &choice["logprobs"];
        assert_eq!(l["tokens"], json!(["è", " a", "!"]));
        assert_eq!(l["token_logprobs"], json!([null, -1.0, -2.0]));
        assert_eq!(l["top_logprobs"][0], Value::Null);
        assert_eq!(l["top_logprobs"][1], json!({"x": -0.5, " a": -1.0}));
        // Characters, not bytes: "è" is two bytes.
        assert_eq!(l["text_offset"], json!([0, 1, 3]));
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3})
        );
    }

    #[test]
    fn bad_bodies_say_what_is_wrong() {
        for (endpoint, body, needle) in [
            (Endpoint::Chat, json!({"prompt": "x"}), "messages"),
            (Endpoint::Chat, json!({"messages": []}), "empty"),
            (Endpoint::Chat, json!({"messages": [{"content": "x"}]}), "role"),
            (
                Endpoint::Chat,
                json!({"messages": [{"role": "user", "content": 5}]}),
                "content",
            ),
            (
                Endpoint::Chat,
                json!({"messages": [{"role": "user", "content": "x"}], "n": 0}),
                "n 0",
            ),
            (Endpoint::Completions, json!({"messages": []}), "prompt"),
            (
                Endpoint::Completions,
                json!({"prompt": "x", "temperature": "hot"}),
                "temperature: invalid type",
            ),
            (
                Endpoint::Completions,
                json!({"prompt": "x", "logprobs": 50}),
                "top_logprobs 50",
            ),
            (Endpoint::Completions, json!([1]), "object"),
            (
                Endpoint::Completions,
                json!({"prompt": ["a", "b"], "n": 100}),
                "200 choices",
            ),
        ] {
            let e = format!("{:#}", Job::from_body(endpoint, &body).unwrap_err());
            assert!(e.contains(needle), "{body}: {e}");
        }
        assert!(Endpoint::from_url("/v1/embeddings").is_err());
        assert_eq!(Endpoint::from_url("/v1/chat/completions").unwrap(), Endpoint::Chat);
    }
}
