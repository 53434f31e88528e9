//! `zagreus serve`: an OpenAI-compatible HTTP server on the scheduler.
//!
//! The listener opens first (so `/health` answers 503 while the model loads), the model loads on
//! its own thread, and every completion request becomes one scheduler request per choice. A
//! client that goes away drops its receivers, and the scheduler frees its sequences at the next
//! step. SIGTERM or Ctrl+C stops accepting; running requests get a grace period to finish.
//!
//! - [`http`]: errors in OpenAI's shape, bodies, the access log, API keys and CORS;
//! - [`complete`]: `/v1/chat/completions` and `/v1/completions`, whole or streamed;
//! - [`info`]: models, health, tokenize/detokenize/tokenizer_info;
//! - [`metrics`]: the Prometheus counters;
//! - [`webui`]: the chat page at `/`.

mod complete;
mod http;
mod info;
mod metrics;
mod webui;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::routing::{get, post};
use axum::Router;

use crate::loader::{self, LoadedModel, ModelSpec};
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::settings::SamplingRequest;

pub use http::MAX_BODY_BYTES;

/// What the server is asked to do (the command line fills it).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub spec: ModelSpec,
    pub host: String,
    pub port: u16,
    /// Sequences generated at once.
    pub parallel: usize,
    /// Requests waiting beyond them before 503.
    pub queue: usize,
    pub api_key: Option<String>,
    /// Origins allowed to call from a browser (`*`: any).
    pub cors_origins: Vec<String>,
    /// Longest a request may take.
    pub timeout: Option<Duration>,
    /// How long running requests may take to finish at shutdown.
    pub grace: Duration,
    /// Sampling defaults under each request's own fields.
    pub defaults: SamplingRequest,
    /// Serve the chat page at `/`.
    pub webui: bool,
}

/// The loaded model and its scheduler.
struct Ready {
    lm: Arc<LoadedModel>,
    sched: Scheduler,
    context: usize,
}

/// What every handler shares.
struct App {
    config: ServerConfig,
    ready: OnceLock<Ready>,
    metrics: metrics::Metrics,
    /// Request ids.
    next_id: AtomicU64,
}

impl App {
    fn id(&self) -> String {
        format!("{:x}{:08x}", unix_time(), self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn router(app: Arc<App>) -> Router {
    let mut r = Router::new();
    if app.config.webui {
        r = r
            .route("/", get(webui::index))
            .route("/webui/app.js", get(webui::app_js))
            .route("/webui/style.css", get(webui::style_css));
    }
    r.route("/health", get(info::health))
        .route("/v1/health", get(info::health))
        .route("/v1/models", get(info::models))
        .route("/v1/chat/completions", post(complete::chat))
        .route("/v1/completions", post(complete::completions))
        .route("/tokenize", post(info::tokenize))
        .route("/detokenize", post(info::detokenize))
        .route("/tokenizer_info", get(info::tokenizer_info))
        .route("/metrics", get(metrics::render))
        .fallback(http::not_found)
        .method_not_allowed_fallback(http::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(app.clone(), http::authorize))
        .layer(axum::middleware::from_fn_with_state(app.clone(), http::cors))
        .layer(axum::middleware::from_fn(http::access_log))
        .with_state(app)
}

/// Runs the server until SIGTERM or Ctrl+C.
pub fn run(config: ServerConfig) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("zagreus-http")
        .enable_all()
        .build()
        .context("cannot start the server's runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: ServerConfig) -> Result<()> {
    let addr = format!("{}:{}", config.host, config.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr().context("the listening address")?;
    let app = Arc::new(App {
        config,
        ready: OnceLock::new(),
        metrics: metrics::Metrics::default(),
        next_id: AtomicU64::new(1),
    });
    crate::note!(
        "zagreus: listening on http://{local} (loading {})",
        app.config.spec.model
    );
    // The model loads beside the listener; a failure ends the server.
    let (failed_tx, mut failed) = tokio::sync::oneshot::channel::<anyhow::Error>();
    {
        let app = app.clone();
        std::thread::Builder::new()
            .name("zagreus-load".into())
            .spawn(move || {
                if let Err(e) = load(&app) {
                    let _ = failed_tx.send(e);
                }
            })
            .context("cannot start the loading thread")?;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = {
        let mut stop_rx = stop_rx.clone();
        let service = router(app.clone()).into_make_service_with_connect_info::<SocketAddr>();
        tokio::spawn(async move {
            axum::serve(listener, service)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                })
                .await
        })
    };
    tokio::select! {
        e = &mut failed => {
            if let Ok(e) = e {
                return Err(e);
            }
            // The loader finished without error: wait for a signal.
            signal().await;
        }
        _ = signal() => {}
    }
    let grace = app.config.grace;
    crate::note!(
        "zagreus: shutting down: no new requests; running ones have {} s to finish",
        grace.as_secs()
    );
    let _ = stop_tx.send(true);
    tokio::select! {
        r = server => {
            r.context("the server task")?.context("the server")?;
        }
        _ = tokio::time::sleep(grace) => {
            crate::note!("zagreus: the grace period is over; stopping the requests still running");
        }
        _ = signal() => {
            crate::note!("zagreus: second signal; stopping now");
        }
    }
    // Requests still running are cancelled when the runtime drops their tasks.
    drop(stop_rx);
    Ok(())
}

/// SIGINT (Ctrl+C) or SIGTERM.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn load(app: &App) -> Result<()> {
    let spec = &app.config.spec;
    let (lm, threads) = loader::load_for(spec)?;
    let lm = Arc::new(lm);
    let context = loader::context_size(spec, &lm.model)?;
    let mut sched = SchedulerConfig::new(&lm, app.config.parallel, context);
    sched.max_queue = app.config.queue;
    let sched = Scheduler::start(lm.clone(), sched);
    crate::note!(
        "zagreus: ready: {} in {:.2} s; {} sequences at once, a context of {context} tokens each",
        lm.describe(threads),
        lm.load_time.as_secs_f64(),
        app.config.parallel
    );
    let started = Instant::now();
    let _ = app.ready.set(Ready { lm, sched, context });
    app.metrics.set_ready(started);
    Ok(())
}
