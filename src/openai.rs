//! The OpenAI API's request and response bodies, as `zagreus batch` (and the HTTP server) take
//! and give them: `/v1/chat/completions` and `/v1/completions`. A body becomes a [`Job`] (the
//! input and a [`SamplingRequest`]); a [`Completion`] becomes a response body.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::generation::{Completion, FinishReason, TokenLogprob};
use crate::settings::SamplingRequest;
use crate::template::Message;

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
}

/// One request, ready for the scheduler once its input is tokenized.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub endpoint: Endpoint,
    pub input: Input,
    pub sampling: SamplingRequest,
    /// Log-probabilities with this many alternatives per token.
    pub logprobs: Option<usize>,
    /// The `model` the request named (echoed back).
    pub model: Option<String>,
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
}

/// Most alternatives per token a request may ask for (as OpenAI: 20).
pub const MAX_TOP_LOGPROBS: usize = 20;

impl Job {
    /// A request body for `endpoint`.
    pub fn from_body(endpoint: Endpoint, body: &Value) -> Result<Self> {
        if !body.is_object() {
            bail!("the request body must be a JSON object");
        }
        let b: Body = serde_json::from_value(body.clone()).context("the request body")?;
        if b.n.is_some_and(|n| n != 1) {
            bail!("n {}: only one choice per request is supported", b.n.unwrap_or(0));
        }
        let input = match endpoint {
            Endpoint::Chat => {
                let Some(messages) = b.messages else {
                    bail!("a chat completion needs `messages`");
                };
                if messages.is_empty() {
                    bail!("`messages` is empty");
                }
                Input::Chat(messages.iter().map(message).collect::<Result<_>>()?)
            }
            Endpoint::Completions => match b.prompt {
                Some(Value::String(p)) => Input::Text(p),
                Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                    Input::Text(a[0].as_str().unwrap_or_default().to_string())
                }
                Some(_) => bail!("`prompt` must be a string (one prompt per request)"),
                None => bail!("a completion needs `prompt`"),
            },
        };
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
        Ok(Job {
            endpoint,
            input,
            sampling,
            logprobs,
            model: b.model,
        })
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

/// The response body for a finished job.
pub fn response_body(job: &Job, id: &str, created: u64, model: &str, c: &Completion) -> Value {
    let usage = json!({
        "prompt_tokens": c.stats.prompt_tokens,
        "completion_tokens": c.tokens.len(),
        "total_tokens": c.stats.prompt_tokens + c.tokens.len(),
    });
    let model = job.model.as_deref().unwrap_or(model);
    let reason = finish_reason(c.finish);
    let st = &c.stats;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    // llama.cpp's server reports the same figures under the same names.
    let timings = json!({
        "prompt_n": st.prompt_processed,
        "prompt_cached": st.prompt_tokens - st.prompt_processed,
        "prompt_ms": ms(st.prompt_time),
        "time_to_first_token_ms": ms(st.time_to_first_token),
        "predicted_n": c.tokens.len(),
        "predicted_ms": ms(st.decode_time),
        "predicted_per_second": st.decode_tps(),
    });
    match job.endpoint {
        Endpoint::Chat => {
            let logprobs = job
                .logprobs
                .map(|_| json!({ "content": c.logprobs.iter().map(chat_logprob).collect::<Vec<_>>() }));
            json!({
                "id": format!("chatcmpl-{id}"),
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs,
                    "finish_reason": reason,
                }],
                "usage": usage,
                "timings": timings,
            })
        }
        Endpoint::Completions => {
            let logprobs = job.logprobs.map(|_| {
                json!({
                    "tokens": c.logprobs.iter().map(|t| t.token.clone()).collect::<Vec<_>>(),
                    "token_logprobs": c.logprobs.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                    "top_logprobs": c.logprobs.iter().map(|t| {
                        t.top_logprobs.iter().map(|a| (a.token.clone(), json!(a.logprob))).collect::<Map<_, _>>()
                    }).collect::<Vec<_>>(),
                })
            });
            json!({
                "id": format!("cmpl-{id}"),
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "text": c.text, "logprobs": logprobs, "finish_reason": reason}],
                "usage": usage,
                "timings": timings,
            })
        }
    }
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
            job.input,
            Input::Chat(vec![Message::new("system", "S"), Message::new("user", "ab")])
        );
        assert_eq!(job.sampling.max_tokens, Some(5));
        assert_eq!(job.sampling.temperature, Some(0.0));
        assert_eq!(job.sampling.stop, ["END"]);
        assert_eq!(job.logprobs, Some(2));
        let job = Job::from_body(
            Endpoint::Completions,
            &json!({"prompt": "p", "logprobs": 1, "stop": ["a", "b"]}),
        )
        .unwrap();
        assert_eq!(job.input, Input::Text("p".into()));
        assert_eq!((job.logprobs, job.sampling.stop.len()), (Some(1), 2));
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
                json!({"messages": [{"role": "user", "content": "x"}], "n": 3}),
                "n 3",
            ),
            (Endpoint::Completions, json!({"messages": []}), "prompt"),
            (
                Endpoint::Completions,
                json!({"prompt": "x", "temperature": "hot"}),
                "body",
            ),
            (
                Endpoint::Completions,
                json!({"prompt": "x", "logprobs": 50}),
                "top_logprobs 50",
            ),
            (Endpoint::Completions, json!([1]), "object"),
        ] {
            let e = format!("{:#}", Job::from_body(endpoint, &body).unwrap_err());
            assert!(e.contains(needle), "{body}: {e}");
        }
        assert!(Endpoint::from_url("/v1/embeddings").is_err());
        assert_eq!(Endpoint::from_url("/v1/chat/completions").unwrap(), Endpoint::Chat);
    }
}
