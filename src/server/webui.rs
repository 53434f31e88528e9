//! The chat page at `/`: plain HTML, CSS and JavaScript embedded in the binary, talking to the
//! server's own `/v1/chat/completions` (see `webui/app.js`).

use axum::http::header;
use axum::response::IntoResponse;

const INDEX: &str = include_str!("webui/index.html");
const APP: &str = include_str!("webui/app.js");
const STYLE: &str = include_str!("webui/style.css");

/// The page's scripts and styles come from this server only, and nothing is framed.
const CSP: &str = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

pub async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX)
}

pub async fn app_js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", APP)
}

pub async fn style_css() -> impl IntoResponse {
    asset("text/css; charset=utf-8", STYLE)
}

/// Paths of the page (public even with `--api-key`: the page holds no secret and asks for the
/// key itself).
pub fn is_page(path: &str) -> bool {
    path == "/" || path.starts_with("/webui/")
}
