//! `worker serve`: a fine-tuned model behind the API that FauxPilot, the editors and OpenAI
//! clients speak (OpenAI's legacy completions; docs/serving.md). The HTTP front end (axum)
//! validates and tokenizes each request and hands it to the engine thread over a bounded queue
//! (full: 429); the engine batches every request in flight (`batcher.rs`), sharing the batch's
//! rows fairly between them (`fair.rs`).

pub mod api;
mod batcher;
mod fair;
pub mod metrics;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde_json::json;
use tokenizers::Tokenizer;
use tokio::sync::{mpsc, oneshot};

use crate::generate::Loaded;
use api::{completion_json, parse_completion, ApiError, PromptInput, ResponseHead};
use batcher::{Batcher, Job, Reply};
use metrics::Metrics;

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
}

/// What every handler shares.
struct App {
    options: ServeOptions,
    tokenizer: Arc<Tokenizer>,
    eos: Option<u32>,
    n_positions: usize,
    /// Embedding rows: every token id must be below.
    vocab_rows: usize,
    queue: mpsc::Sender<Job>,
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
    let Loaded { model, tokenizer, eos, device, config, .. } = loaded;
    let options = ServeOptions { max_batch: options.max_batch.max(1), max_queue: options.max_queue.max(1), ..options };
    let tokenizer = Arc::new(tokenizer);
    let metrics = Arc::new(Metrics::default());
    let (queue, jobs) = mpsc::channel(options.max_queue);
    let (max_batch, prefix_cache_tokens) = (options.max_batch, options.prefix_cache_tokens);
    let batcher = Batcher { model, device, eos, tokenizer: tokenizer.clone(), max_batch, prefix_cache_tokens, metrics: metrics.clone() };
    let app = Arc::new(App { options, tokenizer, eos, n_positions: config.n_positions, vocab_rows: config.vocab_size, queue, metrics });
    let router = Router::new()
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
        .with_state(app);
    let server = runtime.spawn(async move { axum::serve(listener, router).with_graceful_shutdown(shutdown).await });
    // The router holds the queue's only sender: once the server has stopped, the queue closes and
    // the engine returns after answering its last request.
    batcher.run(jobs);
    runtime.block_on(server).map_err(std::io::Error::other)?
}

/// `POST /v1/completions` and `/v1/engines/{engine}/completions`.
async fn completions(
    State(app): State<Arc<App>>,
    Extension(usage): Extension<Arc<Usage>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        // A body over the size limit (413), or one that broke off.
        Err(rejection) => {
            let status = rejection.status().as_u16();
            return error(&ApiError { status, code: Some("invalid_body"), ..ApiError::invalid("", rejection.body_text()) });
        }
    };
    match start(&app, &usage, &headers, &body).await {
        Ok(response) => response,
        Err(err) => error(&err),
    }
}

async fn start(app: &App, usage: &Usage, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    authorize(app, headers)?;
    let request = parse_completion(body)?;
    check_sequences(request.prompts.len(), request.n, app.options.max_batch)?;
    // Tokenizing a long prompt takes a while: off the threads that serve every connection.
    let tokenizer = app.tokenizer.clone();
    let inputs = request.prompts.clone();
    let tokenized = tokio::task::spawn_blocking(move || -> Result<Vec<(Vec<u32>, String)>, ApiError> {
        inputs
            .into_iter()
            .map(|prompt| match prompt {
                PromptInput::Text(text) => {
                    let encoding = tokenizer
                        .encode(text.as_str(), false)
                        .map_err(|e| ApiError::invalid("prompt", format!("cannot tokenize the prompt: {e}")))?;
                    Ok((encoding.get_ids().to_vec(), text))
                }
                PromptInput::Tokens(ids) => {
                    let text = tokenizer.decode(&ids, false).unwrap_or_default();
                    Ok((ids, text))
                }
            })
            .collect()
    });
    let tokenized = tokenized.await.map_err(|_| server_error("tokenizing the prompt failed"))??;
    let mut prompts = vec![];
    let mut prompt_texts = vec![];
    for (ids, text) in tokenized {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= app.vocab_rows) {
            return Err(ApiError::invalid("prompt", format!("token id {bad} is outside the model's {} embedding rows", app.vocab_rows)));
        }
        let ids = if ids.is_empty() { app.eos.into_iter().collect() } else { ids };
        if ids.is_empty() {
            return Err(ApiError::invalid("prompt", "the prompt is empty and the tokenizer has no <|endoftext|> to start from"));
        }
        let total = ids.len() + request.max_tokens;
        if total > app.n_positions {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "This model's maximum context length is {} tokens, however you requested {total} tokens ({} in your prompt; {} for the completion). Please reduce your prompt; or completion length.",
                    app.n_positions,
                    ids.len(),
                    request.max_tokens
                ),
            ));
        }
        prompts.push(ids);
        prompt_texts.push(text);
    }
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    usage.prompt_tokens.store(prompt_tokens as u64, Ordering::Relaxed);
    let head = ResponseHead { id: completion_id(), created: unix_now(), model: request.model.clone() };
    let stream = request.stream;
    let (reply, whole, streamed) = if stream {
        let (tx, rx) = mpsc::unbounded_channel();
        (Reply::Stream(tx), None, Some(rx))
    } else {
        let (tx, rx) = oneshot::channel();
        (Reply::Whole(tx), Some(rx), None)
    };
    let job = Job { head: head.clone(), request, prompts, prompt_texts, reply, completion_tokens: usage.completion_tokens.clone() };
    // Counted before it is sent: the engine may take it (and count it out) at once. The count, not
    // the channel, bounds the requests waiting: the engine takes each one off the channel as it
    // comes, to share the batch's rows between all of them.
    let waiting = app.metrics.queued.fetch_add(1, Ordering::Relaxed) as usize;
    let sent = if waiting >= app.options.max_queue { Err(mpsc::error::TrySendError::Full(job)) } else { app.queue.try_send(job) };
    if sent.is_err() {
        app.metrics.queued.fetch_sub(1, Ordering::Relaxed);
    }
    match sent {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            return Err(ApiError {
                status: 429,
                kind: "rate_limit_exceeded",
                code: Some("queue_full"),
                param: None,
                message: format!(
                    "the server's queue is full ({} requests wait for a place in the batch); retry shortly",
                    app.options.max_queue
                ),
            })
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            return Err(ApiError {
                status: 503,
                kind: "server_error",
                code: None,
                param: None,
                message: "the server is shutting down".into(),
            })
        }
    };
    if let Some(rx) = streamed {
        let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let body = Body::from_stream(tokio_stream::StreamExt::map(events, Ok::<_, std::convert::Infallible>));
        return Ok(([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], body).into_response());
    }
    let choices =
        whole.expect("not streaming").await.map_err(|_| server_error("the engine failed on this request (see the server's log)"))?;
    let completion_tokens = usage.completion_tokens.load(Ordering::Relaxed) as usize;
    Ok(axum::Json(completion_json(&head, &choices, prompt_tokens, completion_tokens)).into_response())
}

/// One request may hold at most the whole batch: its prompts x n sequences generate together
/// with everyone else's, and a larger request would hold the batch for as long as it runs.
fn check_sequences(prompts: usize, n: usize, max_batch: usize) -> Result<(), ApiError> {
    let sequences = prompts * n;
    if sequences <= max_batch {
        return Ok(());
    }
    let plural = if prompts == 1 { "" } else { "s" };
    let message = format!(
        "this request asks for {sequences} sequences ({prompts} prompt{plural} x n {n}), more than the server's batch of {max_batch} (--max_batch): send at most {max_batch} prompts x n per request, splitting the prompts over several requests"
    );
    Err(ApiError::invalid(if prompts == 1 { "n" } else { "prompt" }, message))
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
    let model = json!({"id": app.options.model_name, "object": "model", "created": unix_now(), "owned_by": "zerotune"});
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
        let tokens = if prompt + completion > 0 { format!(" {prompt}+{completion} tokens") } else { String::new() };
        eprintln!("{} {} {}{tokens} {seconds:.3} s", self.method, self.path, self.status);
    }
}

/// `cmpl-` and 29 letters and digits, as FauxPilot's ids.
fn completion_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = crate::sample::Rng::new(crate::sample::fresh_seed(), 0);
    let id: String = (0..29).map(|_| ALPHABET[(rng.next_u64() % ALPHABET.len() as u64) as usize] as char).collect();
    format!("cmpl-{id}")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
