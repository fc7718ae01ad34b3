//! `worker serve`: a fine-tuned model behind the API that FauxPilot, the editors and OpenAI
//! clients speak (OpenAI's legacy completions; docs/serving.md). The HTTP front end (axum)
//! validates and tokenizes each request and hands it to the engine thread over a bounded queue
//! (full: 429); the engine batches every request in flight (`batcher.rs`), sharing the batch's
//! rows fairly between them (`fair.rs`), and keeps the books of each request (`requests.rs`).
//! `command.rs` is `worker serve` itself: its flags, the log, the model, the listener.

pub mod api;
mod batcher;
mod command;
mod completions;
mod fair;
pub mod log;
pub mod metrics;
mod requests;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;
use tokenizers::Tokenizer;
use tokio::sync::mpsc;
use zerotune_data::fim::FimEncoder;

use crate::generate::Loaded;
use api::ApiError;
use batcher::Batcher;
pub use command::{main, ServeArgs};
use completions::{completions, PromptLimits};
pub use log::LogFormat;
use metrics::Metrics;
use requests::PendingRequest;

/// How the server behaves, from `worker serve`'s flags.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Clients must send `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
    /// Sequences generating together; also the most one request may ask for (prompts x n).
    pub max_batch: usize,
    /// Requests waiting for room in the batch before new ones get 429.
    pub max_queue: usize,
    /// The name `GET /v1/models` lists.
    pub model_name: String,
    /// Tokens of recent prompts kept, so that a prompt beginning like one of them prefills only
    /// the rest (0: none; `Engine::with_prefix_cache`).
    pub prefix_cache_tokens: usize,
    /// The format infilling prompts are rendered in (checked against the tokenizer); None:
    /// prefix-only.
    pub fim_format: Option<zerotune_data::fim::FimFormat>,
}

/// What every handler shares.
struct App {
    options: ServeOptions,
    tokenizer: Arc<Tokenizer>,
    /// How infilling prompts become ids; None: the model is served prefix-only.
    fim: Option<Arc<FimEncoder>>,
    /// What the model takes of a prompt (context, vocabulary, EOS).
    limits: PromptLimits,
    /// The engine thread's queue.
    queue: mpsc::Sender<PendingRequest>,
    metrics: Arc<Metrics>,
}

/// Serves `loaded` on `listener` until `shutdown` resolves; then takes no new requests, finishes
/// the ones in flight and returns. The HTTP front end runs on `runtime`; the engine runs on this
/// thread, the one that loaded the model, so that libtorch keeps a single OpenMP team: with a
/// second team on the same cores, libgomp stops spinning between parallel regions and every
/// region waits for its threads to wake (codegen-350M, 2 cores: 30 -> 40 ms per token).
/// Call it outside the runtime (the engine blocks on its queue). A panic the engine does not
/// catch (one outside a step or an admission) ends the process rather than leaving a server
/// without an engine.
pub fn run(
    runtime: &tokio::runtime::Runtime,
    listener: tokio::net::TcpListener,
    loaded: Loaded,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let options = ServeOptions { max_batch: options.max_batch.max(1), max_queue: options.max_queue.max(1), ..options };
    let (batcher, app, requests) = engine_and_app(loaded, options);
    let router = router(app);
    let server = runtime.spawn(async move { axum::serve(listener, router).with_graceful_shutdown(shutdown).await });
    // The router holds the queue's only sender: once the server has stopped, the queue closes and
    // the engine returns after answering its last request.
    batcher.run(requests);
    runtime.block_on(server).map_err(std::io::Error::other)?
}

/// The engine thread's part (the model, its queue's receiving end) and the handlers' (the
/// tokenizer, the limits, the sending end), sharing the metrics.
fn engine_and_app(loaded: Loaded, options: ServeOptions) -> (Batcher, Arc<App>, mpsc::Receiver<PendingRequest>) {
    let Loaded { model, tokenizer, eos, device, config, .. } = loaded;
    // Checked by `worker serve` against this tokenizer: a format it lacks was refused there.
    let fim = options.fim_format.and_then(|format| FimEncoder::new(&tokenizer, Some(format)).ok().flatten()).map(Arc::new);
    let fim_end = fim.as_ref().map(|f| f.end_ids()).unwrap_or_default();
    let tokenizer = Arc::new(tokenizer);
    let metrics = Arc::new(Metrics::default());
    let (queue, requests) = mpsc::channel(options.max_queue);
    let (max_batch, prefix_cache_tokens) = (options.max_batch, options.prefix_cache_tokens);
    let batcher =
        Batcher { model, device, eos, fim_end, tokenizer: tokenizer.clone(), max_batch, prefix_cache_tokens, metrics: metrics.clone() };
    let limits = PromptLimits { n_positions: config.context(), vocab_rows: config.vocab_size(), eos };
    (batcher, Arc::new(App { options, tokenizer, fim, limits, queue, metrics }), requests)
}

/// The routes (docs/serving.md), OpenAI-shaped 404 and 405 answers, the body limit and the
/// per-request log line.
fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/engines/{engine}/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/copilot_internal/v2/token", get(copilot_token))
        .route("/health", get(|| async { axum::Json(json!({"status": "ok"})) }))
        .route("/metrics", get(render_metrics))
        .fallback(|| async { error(&ApiError { status: 404, code: Some("not_found"), ..ApiError::invalid("", "no such route") }) })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            error(&ApiError {
                status: 405,
                code: Some("method_not_allowed"),
                ..ApiError::invalid("", format!("{method} is not allowed on this route"))
            })
        })
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .layer(axum::middleware::from_fn_with_state(app.clone(), log_request))
        .with_state(app)
}

/// The server's own failure: 500, which clients may retry.
fn server_error(message: &str) -> ApiError {
    ApiError { status: 500, kind: "server_error", code: None, param: None, message: message.into() }
}

fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &app.options.api_key else { return Ok(()) };
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given.map(str::trim) == Some(key.as_str()) {
        return Ok(());
    }
    Err(ApiError {
        status: 401,
        kind: "invalid_request_error",
        code: Some("invalid_api_key"),
        param: None,
        message: if given.is_some() { "Incorrect API key provided" } else { "Missing API key: send Authorization: Bearer <key>" }.into(),
    })
}

/// `GET /v1/models`.
async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(err) = authorize(&app, &headers) {
        return error(&err);
    }
    // Beyond OpenAI's fields: whether a `suffix` is used, and the FIM format prompts take.
    let fim_format = app.fim.as_ref().map(|f| f.format.to_string());
    let model = json!({"id": app.options.model_name, "object": "model", "created": unix_now(), "owned_by": "zerotune",
        "infill": fim_format.is_some(), "fim_format": fim_format});
    axum::Json(json!({"object": "list", "data": [model]})).into_response()
}

/// `GET /copilot_internal/v2/token`: the token copilot.vim asks for first (FauxPilot's stub).
async fn copilot_token() -> Response {
    axum::Json(json!({"token": "1", "expires_at": 2_600_000_000u64, "refresh_in": 900})).into_response()
}

async fn render_metrics(State(app): State<Arc<App>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

fn error(err: &ApiError) -> Response {
    let status = StatusCode::from_u16(err.status).unwrap_or(StatusCode::BAD_REQUEST);
    (status, axum::Json(err.body())).into_response()
}

/// Token counts of one request, for its log line.
#[derive(Default)]
struct Usage {
    prompt_tokens: AtomicU64,
    completion_tokens: Arc<AtomicU64>,
}

/// Logs one line per request once its response is over (a stream's too), and counts it in the
/// metrics. The line has the route, status, tokens and time, never a prompt's text.
async fn log_request(State(app): State<Arc<App>>, mut request: Request, next: Next) -> Response {
    let start = Instant::now();
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let usage = Arc::new(Usage::default());
    request.extensions_mut().insert(usage.clone());
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let line = LogLine { app: app.clone(), method, path, status, start, usage };
    let (parts, body) = response.into_parts();
    let body = tokio_stream::StreamExt::map(body.into_data_stream(), move |chunk| {
        let _ = &line; // dropped, and so logged, with the body
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

struct LogLine {
    app: Arc<App>,
    method: axum::http::Method,
    path: String,
    status: u16,
    start: Instant,
    usage: Arc<Usage>,
}

impl Drop for LogLine {
    fn drop(&mut self) {
        let seconds = self.start.elapsed().as_secs_f64();
        self.app.metrics.request(self.status, seconds);
        let (prompt, completion) = (self.usage.prompt_tokens.load(Ordering::Relaxed), self.usage.completion_tokens.load(Ordering::Relaxed));
        log::request(self.method.as_str(), &self.path, self.status, prompt, completion, seconds);
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
