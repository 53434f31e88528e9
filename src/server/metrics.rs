//! `GET /metrics`: the server's counters in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::App;

/// Upper bounds of the time-to-first-token histogram's buckets, in seconds.
const TTFT_BUCKETS: [f64; 11] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

#[derive(Default)]
struct Inner {
    /// Finished requests by status code.
    requests: BTreeMap<u16, u64>,
    prompt_tokens: u64,
    generated_tokens: u64,
    ttft_buckets: [u64; TTFT_BUCKETS.len()],
    ttft_sum: f64,
    ttft_count: u64,
    ready_at: Option<Instant>,
}

#[derive(Default)]
pub struct Metrics(Mutex<Inner>);

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn set_ready(&self, at: Instant) {
        self.with(|m| m.ready_at = Some(at));
    }

    /// A finished completion request.
    pub fn request(&self, status: u16, prompt_tokens: usize, generated: usize) {
        self.with(|m| {
            *m.requests.entry(status).or_default() += 1;
            m.prompt_tokens += prompt_tokens as u64;
            m.generated_tokens += generated as u64;
        });
    }

    pub fn first_token(&self, after: Duration) {
        let s = after.as_secs_f64();
        self.with(|m| {
            for (i, le) in TTFT_BUCKETS.iter().enumerate() {
                if s <= *le {
                    m.ttft_buckets[i] += 1;
                }
            }
            m.ttft_sum += s;
            m.ttft_count += 1;
        });
    }
}

pub async fn render(State(app): State<Arc<App>>) -> impl IntoResponse {
    let mut out = String::new();
    let (queued, counters) = match app.ready.get() {
        Some(r) => (r.sched.queued(), Some(r.sched.counters())),
        None => (0, None),
    };
    let running = counters.as_ref().map_or(0, |c| c.active);
    app.metrics.with(|m| {
        let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, String)>| {
            let _ = writeln!(out, "# HELP zagreus_{name} {help}\n# TYPE zagreus_{name} {kind}");
            for (labels, value) in lines {
                let _ = writeln!(out, "zagreus_{name}{labels} {value}");
            }
        };
        let one = |v: String| vec![(String::new(), v)];
        metric(
            "requests_total",
            "counter",
            "Completion requests answered, by HTTP status.",
            m.requests
                .iter()
                .map(|(s, n)| (format!("{{status=\"{s}\"}}"), n.to_string()))
                .collect(),
        );
        metric(
            "prompt_tokens_total",
            "counter",
            "Prompt tokens of the answered requests.",
            one(m.prompt_tokens.to_string()),
        );
        metric(
            "generated_tokens_total",
            "counter",
            "Tokens generated.",
            one(m.generated_tokens.to_string()),
        );
        if let Some(c) = &counters {
            metric(
                "prompt_tokens_reused_total",
                "counter",
                "Prompt tokens found in a cached prefix instead of being run.",
                one(c.prompt_tokens_reused.to_string()),
            );
            metric(
                "steps_total",
                "counter",
                "Batched steps the model ran.",
                one(c.steps.to_string()),
            );
        }
        metric(
            "queue_length",
            "gauge",
            "Requests waiting for a sequence.",
            one(queued.to_string()),
        );
        metric(
            "sequences_running",
            "gauge",
            "Sequences in flight.",
            one(running.to_string()),
        );
        let mut lines: Vec<(String, String)> = TTFT_BUCKETS
            .iter()
            .zip(m.ttft_buckets)
            .map(|(le, n)| (format!("_bucket{{le=\"{le}\"}}"), n.to_string()))
            .collect();
        lines.push(("_bucket{le=\"+Inf\"}".into(), m.ttft_count.to_string()));
        lines.push(("_sum".into(), format!("{:.6}", m.ttft_sum)));
        lines.push(("_count".into(), m.ttft_count.to_string()));
        metric(
            "time_to_first_token_seconds",
            "histogram",
            "From a request's arrival to its first generated token.",
            lines,
        );
        metric(
            "ready",
            "gauge",
            "1 once the model is loaded.",
            one(u8::from(m.ready_at.is_some()).to_string()),
        );
    });
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
