//! `POST /v1/completions` (and `/v1/engines/{engine}/completions`): authorize, read the body,
//! hold it to the server's limits (the batch per request, the context per prompt, the queue),
//! tokenize off the async threads, hand the request to the engine thread and answer: the whole
//! completion, or the engine's server-sent events as they come.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use zerotune_data::fim::{self, FimEncoder, Infill, Order};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use tokenizers::Tokenizer;
use tokio::sync::{mpsc, oneshot};

use super::api::{completion_json, parse_completion, ApiError, Choice, PromptInput, ResponseHead};
use super::requests::{PendingRequest, Reply};
use super::{authorize, error, server_error, unix_now, App, Usage};

/// `POST /v1/completions` and `/v1/engines/{engine}/completions`.
pub(super) async fn completions(
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

/// One request from its body to its response (or the error it gets).
async fn start(app: &App, usage: &Usage, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    authorize(app, headers)?;
    let body = parse_completion(body)?;
    check_sequences(body.prompts.len(), body.n, app.options.max_batch)?;
    let tokenized = tokenize(app.tokenizer.clone(), app.fim.clone(), body.prompts.clone(), body.suffix.clone()).await?;
    let (prompts, prompt_texts) = app.limits.check_prompts(tokenized, body.max_tokens)?;
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    usage.prompt_tokens.store(prompt_tokens as u64, Ordering::Relaxed);
    let head = ResponseHead { id: completion_id(), created: unix_now(), model: body.model.clone() };
    let (reply, answer) = if body.stream {
        let (tx, rx) = mpsc::unbounded_channel();
        (Reply::Stream(tx), Answer::Stream(rx))
    } else {
        let (tx, rx) = oneshot::channel();
        (Reply::Whole(tx), Answer::Whole(rx))
    };
    let completion_tokens = usage.completion_tokens.clone();
    let request = PendingRequest { head: head.clone(), body, prompts, prompt_texts, reply, completion_tokens };
    enqueue(&app.queue, &app.metrics.queued, app.options.max_queue, request)?;
    match answer {
        Answer::Stream(rx) => Ok(event_stream(rx)),
        Answer::Whole(rx) => {
            let choices = rx.await.map_err(|_| server_error("the engine failed on this request (see the server's log)"))?;
            let completion_tokens = usage.completion_tokens.load(Ordering::Relaxed) as usize;
            Ok(axum::Json(completion_json(&head, &choices, prompt_tokens, completion_tokens)).into_response())
        }
    }
}

/// Where the front end waits for the engine's answer: the receiving half of `Reply`.
enum Answer {
    Whole(oneshot::Receiver<Vec<Choice>>),
    Stream(mpsc::UnboundedReceiver<String>),
}

/// A streamed response: the engine's server-sent events as they come.
fn event_stream(rx: mpsc::UnboundedReceiver<String>) -> Response {
    let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
    let body = Body::from_stream(tokio_stream::StreamExt::map(events, Ok::<_, std::convert::Infallible>));
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// One request may hold at most the whole batch: its prompts x n sequences generate together
/// with everyone else's, and a larger request would hold the batch for as long as it runs.
pub(super) fn check_sequences(prompts: usize, n: usize, max_batch: usize) -> Result<(), ApiError> {
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

/// Each prompt's token ids and text, tokenized on a blocking thread: a long prompt takes a
/// while, and the async threads serve every connection.
async fn tokenize(
    tokenizer: Arc<Tokenizer>,
    fim: Option<Arc<FimEncoder>>,
    prompts: Vec<PromptInput>,
    suffix: Option<String>,
) -> Result<Vec<(Vec<u32>, String)>, ApiError> {
    let tokenized = tokio::task::spawn_blocking(move || -> Result<Vec<(Vec<u32>, String)>, ApiError> {
        prompts
            .into_iter()
            .map(|prompt| match prompt {
                PromptInput::Text(text) => Ok((prompt_ids(&tokenizer, fim.as_deref(), &text, suffix.as_deref())?, text)),
                PromptInput::Tokens(ids) => {
                    let text = tokenizer.decode(&ids, false).unwrap_or_default();
                    Ok((ids, text))
                }
            })
            .collect()
    });
    tokenized.await.map_err(|_| server_error("tokenizing the prompt failed"))?
}

/// A text prompt's ids. An infill (a `suffix` given, or a prompt the client rendered in any
/// family's FIM format) is rendered in the served model's format; a model without one gets the
/// prefix only. Anything else is encoded as HF's `tokenizer(prompt)` does, a BOS included where
/// the model's tokenizer adds one.
fn prompt_ids(tokenizer: &Tokenizer, fim: Option<&FimEncoder>, text: &str, suffix: Option<&str>) -> Result<Vec<u32>, ApiError> {
    let cannot = |e: tokenizers::Error| ApiError::invalid("prompt", format!("cannot tokenize the prompt: {e}"));
    let infill = match fim::parse(text) {
        Some((_, _, infill)) => Some(infill),
        None => suffix.map(|suffix| Infill { prefix: text.to_string(), suffix: suffix.to_string(), ..Default::default() }),
    };
    match (infill, fim) {
        (Some(infill), Some(fim)) => fim.encode(&fim::render(fim.format, Order::Psm, &infill)).map_err(cannot),
        (Some(infill), None) => Ok(tokenizer.encode(infill.prefix.as_str(), true).map_err(cannot)?.get_ids().to_vec()),
        (None, _) => Ok(tokenizer.encode(text, true).map_err(cannot)?.get_ids().to_vec()),
    }
}

/// What the model takes of a prompt, from its config and tokenizer.
#[derive(Clone, Copy, Debug)]
pub(super) struct PromptLimits {
    /// The context: prompt and completion tokens together (n_positions).
    pub n_positions: usize,
    /// Embedding rows: every token id must be below.
    pub vocab_rows: usize,
    /// What an empty prompt starts from (`<|endoftext|>`), as OpenAI's.
    pub eos: Option<u32>,
}

impl PromptLimits {
    /// The tokenized prompts as the engine takes them (an empty one becomes EOS) with their
    /// texts, or the 400 that names the first prompt the model cannot take with `max_tokens`.
    pub fn check_prompts(&self, tokenized: Vec<(Vec<u32>, String)>, max_tokens: usize) -> Result<(Vec<Vec<u32>>, Vec<String>), ApiError> {
        let mut prompts = vec![];
        let mut texts = vec![];
        for (ids, text) in tokenized {
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_rows) {
                return Err(ApiError::invalid(
                    "prompt",
                    format!("token id {bad} is outside the model's {} embedding rows", self.vocab_rows),
                ));
            }
            let ids = if ids.is_empty() { self.eos.into_iter().collect() } else { ids };
            if ids.is_empty() {
                return Err(ApiError::invalid("prompt", "the prompt is empty and the tokenizer has no <|endoftext|> to start from"));
            }
            let total = ids.len() + max_tokens;
            if total > self.n_positions {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!(
                        "This model's maximum context length is {} tokens, however you requested {total} tokens ({} in your prompt; {max_tokens} for the completion). Please reduce your prompt; or completion length.",
                        self.n_positions,
                        ids.len(),
                    ),
                ));
            }
            prompts.push(ids);
            texts.push(text);
        }
        Ok((prompts, texts))
    }
}

/// Hands `request` to the engine thread's queue, counting it in the queue depth (`queued`), or
/// refuses it: 429 while `max_queue` requests already wait for rows, 503 once the engine has
/// stopped. The count, not the channel, bounds the requests waiting: the engine takes each one off
/// the channel as it comes, to share the batch's rows between all of them.
pub(super) fn enqueue(
    queue: &mpsc::Sender<PendingRequest>,
    queued: &AtomicU64,
    max_queue: usize,
    request: PendingRequest,
) -> Result<(), ApiError> {
    // Counted before it is sent: the engine may take it (and count it out) at once.
    let waiting = queued.fetch_add(1, Ordering::Relaxed) as usize;
    let sent = if waiting >= max_queue { Err(mpsc::error::TrySendError::Full(request)) } else { queue.try_send(request) };
    match sent {
        Ok(()) => Ok(()),
        Err(refused) => {
            queued.fetch_sub(1, Ordering::Relaxed);
            Err(match refused {
                mpsc::error::TrySendError::Full(_) => ApiError {
                    status: 429,
                    kind: "rate_limit_exceeded",
                    code: Some("queue_full"),
                    param: None,
                    message: format!("the server's queue is full ({max_queue} requests wait for a place in the batch); retry shortly"),
                },
                mpsc::error::TrySendError::Closed(_) => {
                    ApiError { status: 503, kind: "server_error", code: None, param: None, message: "the server is shutting down".into() }
                }
            })
        }
    }
}

/// `cmpl-` and 29 letters and digits, as FauxPilot's ids.
fn completion_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = crate::sample::Rng::new(crate::sample::fresh_seed(), 0);
    let id: String = (0..29).map(|_| ALPHABET[(rng.next_u64() % ALPHABET.len() as u64) as usize] as char).collect();
    format!("cmpl-{id}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::requests::tests::pending;

    #[test]
    fn a_request_may_hold_the_whole_batch_but_no_more() {
        assert!(check_sequences(1, 8, 8).is_ok());
        assert!(check_sequences(2, 4, 8).is_ok(), "prompts x n counts, not either alone");
        let err = check_sequences(1, 9, 8).unwrap_err();
        assert_eq!((err.status, err.param), (400, Some("n")), "one prompt: n is what to lower");
        assert!(
            err.message.starts_with("this request asks for 9 sequences (1 prompt x n 9), more than the server's batch of 8"),
            "{}",
            err.message
        );
        let err = check_sequences(100, 8, 8).unwrap_err();
        assert_eq!((err.status, err.param), (400, Some("prompt")), "several prompts: split them");
        assert!(
            err.message.contains("800 sequences (100 prompts x n 8)") && err.message.contains("batch of 8 (--max_batch)"),
            "{}",
            err.message
        );
    }

    #[test]
    fn the_queue_depth_decides_429_and_a_stopped_engine_503() {
        let (queue, mut engine) = mpsc::channel(8);
        let queued = AtomicU64::new(0);
        assert!(enqueue(&queue, &queued, 2, pending(1, 1).0).is_ok());
        assert!(enqueue(&queue, &queued, 2, pending(1, 1).0).is_ok());
        assert_eq!(queued.load(Ordering::Relaxed), 2, "each request counted as it goes in");
        let err = enqueue(&queue, &queued, 2, pending(1, 1).0).unwrap_err();
        assert_eq!((err.status, err.code, err.kind), (429, Some("queue_full"), "rate_limit_exceeded"));
        assert!(err.message.contains("queue is full (2 requests wait"), "{}", err.message);
        assert_eq!(queued.load(Ordering::Relaxed), 2, "a refused request is not counted");
        // The engine took one and admitted it wholly (counting it out): there is room again,
        // though the channel still holds the other.
        assert!(engine.try_recv().is_ok());
        queued.fetch_sub(1, Ordering::Relaxed);
        assert!(enqueue(&queue, &queued, 2, pending(1, 1).0).is_ok());
        drop(engine);
        queued.store(0, Ordering::Relaxed);
        let err = enqueue(&queue, &queued, 2, pending(1, 1).0).unwrap_err();
        assert_eq!((err.status, err.message.as_str()), (503, "the server is shutting down"));
        assert_eq!(queued.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn prompts_are_held_to_the_vocabulary_and_the_context() {
        let limits = PromptLimits { n_positions: 8, vocab_rows: 100, eos: Some(50) };
        let (prompts, texts) = limits.check_prompts(vec![(vec![1, 2, 3], "abc".into()), (vec![], String::new())], 4).unwrap();
        assert_eq!(prompts, [vec![1, 2, 3], vec![50]], "an empty prompt starts from EOS");
        assert_eq!(texts, ["abc", ""]);
        let err = limits.check_prompts(vec![(vec![1, 100], "x".into())], 1).unwrap_err();
        assert_eq!(err.param, Some("prompt"));
        assert_eq!(err.message, "token id 100 is outside the model's 100 embedding rows");
        let err = limits.check_prompts(vec![(vec![1; 5], "x".into())], 4).unwrap_err();
        assert_eq!((err.status, err.param), (400, Some("max_tokens")));
        assert!(
            err.message.starts_with(
                "This model's maximum context length is 8 tokens, however you requested 9 tokens (5 in your prompt; 4 for the completion)"
            ),
            "{}",
            err.message
        );
        assert!(limits.check_prompts(vec![(vec![1; 5], "x".into())], 3).is_ok(), "exactly the context");
        let no_eos = PromptLimits { eos: None, ..limits };
        assert_eq!(no_eos.check_prompts(vec![(vec![], String::new())], 1).unwrap_err().param, Some("prompt"));
    }
}
