//! The endpoints around completions: health, models, and the tokenizer (in the shapes vLLM
//! uses, which lm-evaluation-harness's `tokenizer_backend=remote` calls; llama.cpp's `content`
//! field is accepted too).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value};

use super::http::{json_body, ApiError};
use super::{App, Ready};
use crate::openai::Input;

pub(super) fn ready(app: &App) -> Result<&Ready, ApiError> {
    app.ready.get().ok_or_else(ApiError::loading)
}

pub async fn health(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    ready(&app)?;
    Ok(Json(json!({"status": "ok"})))
}

pub async fn models(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let r = ready(&app)?;
    let c = r.lm.model.config();
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": r.lm.name,
            "object": "model",
            "created": super::unix_time(),
            "owned_by": "zagreus",
            "max_model_len": r.context,
            "meta": {
                "n_ctx": r.context,
                "n_vocab": r.lm.model.vocab_size(),
                "n_params": c.parameter_count(),
                "precision": r.lm.model.precision(),
            },
        }],
    })))
}

/// `{"prompt": TEXT, "add_special_tokens": true}` or `{"messages": [...]}` (rendered with the
/// chat template) -> `{"count", "max_model_len", "tokens"}`.
pub async fn tokenize(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Result<Json<Value>, ApiError> {
    let body = json_body(&headers, body).await?;
    let r = ready(&app)?;
    let special = match body.get("add_special_tokens") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "add_special_tokens {v} must be true or false"
            )))
        }
    };
    let add_bos = special && !app.config.spec.no_bos;
    let tokens = if body.get("messages").is_some() {
        let job = crate::openai::Job::from_body(crate::openai::Endpoint::Chat, &body).map_err(ApiError::invalid)?;
        let Some(Input::Chat(messages)) = job.inputs.first() else {
            return Err(ApiError::bad_request("`messages` must be a list of messages"));
        };
        r.lm.encode_messages(messages, add_bos, usize::MAX / 2)
            .map_err(ApiError::invalid)?
            .1
    } else {
        let text = match body.get("prompt").or(body.get("content")) {
            Some(Value::String(s)) => s,
            Some(v) => return Err(ApiError::bad_request(format!("prompt {v} must be a string"))),
            None => return Err(ApiError::bad_request("give the text to tokenize as `prompt`")),
        };
        r.lm.encode_text(text, add_bos, usize::MAX / 2)
            .map_err(ApiError::invalid)?
    };
    Ok(Json(
        json!({"count": tokens.len(), "max_model_len": r.context, "tokens": tokens}),
    ))
}

/// `{"tokens": [...]}` -> `{"prompt": TEXT}` (and `content`, as llama.cpp names it).
pub async fn detokenize(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Result<Json<Value>, ApiError> {
    let body = json_body(&headers, body).await?;
    let r = ready(&app)?;
    let Some(Value::Array(list)) = body.get("tokens") else {
        return Err(ApiError::bad_request(
            "give the token ids to detokenize as `tokens`, a list",
        ));
    };
    let ids = list
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| ApiError::bad_request(format!("tokens: {v} is not a token id")))
        })
        .collect::<Result<Vec<u32>, _>>()?;
    r.lm.check_token_ids(&ids).map_err(ApiError::invalid)?;
    let text = r.lm.tokenizer.decode(&ids).map_err(ApiError::invalid)?;
    Ok(Json(json!({"prompt": text, "content": text})))
}

/// The tokenizer's special tokens, context and chat template.
pub async fn tokenizer_info(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let r = ready(&app)?;
    let t = &r.lm.template_tokens;
    // The token generation stops at, by name: the tokenizer config's, else the first stop id's.
    let eos = t
        .eos_token
        .clone()
        .or_else(|| r.lm.stop_ids.iter().next().map(|&id| r.lm.tokenizer.token_text(id)));
    Ok(Json(json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": t.bos_token,
        "eos_token": eos,
        "pad_token": t.pad_token,
        "unk_token": t.unk_token,
        "add_bos_token": r.lm.tokenizer.bos().is_some() && !app.config.spec.no_bos,
        "model_max_length": r.context,
        "vocab_size": r.lm.model.vocab_size(),
        "chat_template": r.lm.template.source(),
    })))
}
