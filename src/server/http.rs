//! The HTTP side of the server: errors in OpenAI's JSON shape, request bodies read within a
//! bound, the access log, API keys and CORS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::App;

/// Largest request body accepted (413 beyond).
pub const MAX_BODY_BYTES: usize = 32 << 20;

/// An error answer: `{"error": {"message", "type", "code"}}` with its status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Seconds to wait before trying again (503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// An error of the request's own making (400), from a library error (its whole chain).
    pub fn invalid(e: anyhow::Error) -> Self {
        Self::bad_request(one_line(&format!("{e:#}")))
    }

    pub fn loading() -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "Loading model")
        }
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable_error",
            StatusCode::GATEWAY_TIMEOUT => "timeout_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON of the error (also what a stream sends when it fails midway).
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind(), "code": self.status.as_u16()}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Reads a JSON object body of at most [`MAX_BODY_BYTES`].
pub async fn json_body(headers: &HeaderMap, body: Body) -> Result<Value, ApiError> {
    let too_big = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {} MiB", MAX_BODY_BYTES >> 20),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_big());
    }
    let bytes: Bytes = axum::body::to_bytes(body, MAX_BODY_BYTES).await.map_err(|e| {
        if format!("{e:#}").contains("length limit") {
            too_big()
        } else {
            ApiError::bad_request(format!("cannot read the request body: {e}"))
        }
    })?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request("the request body must be a JSON object"));
    }
    Ok(v)
}

pub async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("{method} {}: no such endpoint", uri.path()),
    )
}

pub async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method} requests", uri.path()),
    )
}

/// Tokens a response carried (prompt, generated), for the access log.
#[derive(Clone, Copy)]
pub struct Tokens(pub usize, pub usize);

/// A streamed response: its stream writes its own access-log line when it ends.
#[derive(Clone, Copy)]
pub struct LoggedByStream;

/// What the access log needs to know of a request, kept by a stream until it ends.
#[derive(Clone)]
pub struct LogLine {
    pub peer: String,
    pub method: Method,
    pub path: String,
    pub start: Instant,
}

impl LogLine {
    pub fn write(&self, status: u16, tokens: Option<Tokens>, note: &str) {
        let tokens = tokens.map_or(String::new(), |Tokens(p, g)| format!(" {p}+{g} tokens"));
        crate::note!(
            "{} \"{} {}\" {status}{tokens} {:.3} s{note}",
            self.peer,
            self.method,
            self.path,
            self.start.elapsed().as_secs_f64()
        );
    }
}

/// One line on stderr per request: client, method, path, status, tokens, duration.
pub async fn access_log(mut req: Request, next: Next) -> Response {
    let line = LogLine {
        peer: req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or("-".into(), |c| c.0.to_string()),
        method: req.method().clone(),
        path: req.uri().path().to_string(),
        start: Instant::now(),
    };
    req.extensions_mut().insert(line.clone());
    let resp = next.run(req).await;
    if resp.extensions().get::<LoggedByStream>().is_none() {
        line.write(resp.status().as_u16(), resp.extensions().get::<Tokens>().copied(), "");
    }
    resp
}

/// With `--api-key`, every endpoint but the health check needs `Authorization: Bearer KEY`.
pub async fn authorize(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let Some(key) = &app.config.api_key else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    let public =
        matches!(path, "/health" | "/v1/health") || super::webui::is_page(path) || req.method() == Method::OPTIONS;
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    if public || given.is_some_and(|g| same(g.as_bytes(), key.as_bytes())) {
        return next.run(req).await;
    }
    let message = if given.is_some() {
        "invalid API key"
    } else {
        "an API key is required: send `Authorization: Bearer KEY`"
    };
    ApiError::new(StatusCode::UNAUTHORIZED, message).into_response()
}

/// Compares without stopping at the first difference (the time taken does not say how much of
/// a key was right).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// CORS for the origins `--cors-origin` allows: preflights answered, responses marked.
pub async fn cors(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let origins = &app.config.cors_origins;
    let origin = req.headers().get(header::ORIGIN).cloned();
    let allowed = origin.as_ref().and_then(|o| {
        let o = o.to_str().ok()?;
        if origins.iter().any(|a| a == "*") {
            Some(HeaderValue::from_static("*"))
        } else if origins.iter().any(|a| a.trim_end_matches('/') == o) {
            HeaderValue::from_str(o).ok()
        } else {
            None
        }
    });
    let preflight =
        req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if let (true, Some(allow)) = (preflight, &allowed) {
        let headers = req
            .headers()
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned()
            .unwrap_or(HeaderValue::from_static("authorization, content-type"));
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow.clone());
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, headers);
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        return r;
    }
    let mut r = next.run(req).await;
    if let Some(allow) = allowed {
        r.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        r.headers_mut().insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    r
}
