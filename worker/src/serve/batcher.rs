//! The engine thread: takes every request from the bounded queue as it comes, hands the batch's
//! free rows out between the waiting requests a fair share each (`fair.rs`: sequence by
//! sequence, so no client waits behind another's whole request), admits those sequences
//! (continuous batching: they join at the next step), steps the batch, turns each choice's tokens
//! into text (stop strings, logprobs, echo) and answers its request, whole or as server-sent
//! events. A request whose client went away is cancelled and frees its rows.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokenizers::Tokenizer;
use tokio::sync::{mpsc, oneshot};

use super::api::{chunk_json, Choice, ChoiceLogprobs, CompletionRequest, FinishReason, ResponseHead};
use super::fair::{share, Want};
use super::metrics::Metrics;
use crate::engine::{Emitted, Engine, Finish, Logprob, Prompt};
use crate::model::CodeGen;
use crate::sample::{fresh_seed, Rng, Sampler, SamplingParams};
use crate::test_hook::Hold;
use crate::text::TextState;

/// A validated request with its prompts tokenized, and where its answer goes.
pub struct Job {
    pub head: ResponseHead,
    pub request: CompletionRequest,
    /// Token ids of each prompt (never empty: an empty prompt is EOS, as OpenAI's).
    pub prompts: Vec<Vec<u32>>,
    /// Each prompt's text, for `echo`.
    pub prompt_texts: Vec<String>,
    pub reply: Reply,
    /// Tokens generated for this request, for its log line.
    pub completion_tokens: Arc<AtomicU64>,
}

/// Where a request's answer goes.
pub enum Reply {
    /// Every choice at the end.
    Whole(oneshot::Sender<Vec<Choice>>),
    /// Server-sent events (`data: ...\n\n`) as text is released, then `data: [DONE]`.
    Stream(mpsc::UnboundedSender<String>),
}

impl Reply {
    fn is_closed(&self) -> bool {
        match self {
            Self::Whole(tx) => tx.is_closed(),
            Self::Stream(tx) => tx.is_closed(),
        }
    }
}

/// What the engine thread needs besides its queue.
pub struct Batcher {
    pub model: CodeGen,
    pub device: tch::Device,
    pub eos: Option<u32>,
    pub tokenizer: Arc<Tokenizer>,
    pub max_batch: usize,
    /// Tokens of recent prompts whose keys and values later prompts may start from (0: none;
    /// `Engine::with_prefix_cache`).
    pub prefix_cache_tokens: usize,
    pub metrics: Arc<Metrics>,
}

/// A choice while it generates.
struct ChoiceState {
    text: TextState,
    /// The prompt's text when echoed.
    echo: String,
    logprobs: Option<ChoiceLogprobs>,
    /// Logprob entries already sent in stream chunks.
    sent_logprobs: usize,
    finish: Option<FinishReason>,
}

/// A request being answered. Choice c is prompt c / n's choice c % n; choices join the batch in
/// that order, a prompt's possibly in parts (each prefilled, the later ones mostly from the
/// prefix cache).
struct Live {
    job: Job,
    choices: Vec<ChoiceState>,
    /// Choices admitted so far (0..admitted): the next to admit.
    admitted: usize,
    unfinished: usize,
}

impl Live {
    /// Whether some of its choices wait for a row.
    fn waiting(&self) -> bool {
        self.admitted < self.choices.len()
    }

    /// What the fair share weighs: rows held now (admitted, not finished), choices left to admit.
    fn want(&self) -> Want {
        let total = self.choices.len();
        Want { held: self.admitted + self.unfinished - total, left: total - self.admitted }
    }
}

/// An engine row's owner: (request id, choice index).
type Key = (u64, usize);

impl Batcher {
    /// Serves jobs from `queue` until it is closed and every request is answered.
    pub fn run(self, mut queue: mpsc::Receiver<Job>) {
        let mut engine = self.engine();
        let mut live: HashMap<u64, Live> = HashMap::new();
        // Requests with choices not yet admitted, oldest first. It holds every request taken from
        // the queue: the front end bounds them (`zerotune_queue_depth` against --max_queue).
        let mut waiting: VecDeque<u64> = VecDeque::new();
        let mut next_id = 0u64;
        let hold = Hold::from_env();
        loop {
            if engine.is_empty() && waiting.is_empty() {
                let Some(job) = queue.blocking_recv() else { return };
                next_id += 1;
                self.accept(next_id, job, &mut live, &mut waiting);
            }
            while let Ok(job) = queue.try_recv() {
                next_id += 1;
                self.accept(next_id, job, &mut live, &mut waiting);
            }
            self.drop_gone_clients(&mut engine, &mut live, &mut waiting);
            self.admit_waiting(&mut engine, &mut live, &mut waiting);
            if hold.holding() {
                continue; // admitting and dropping departed clients, but taking no step
            }
            match catch_unwind(AssertUnwindSafe(|| engine.step())) {
                Ok(next) => self.settle(&mut engine, next, &mut live),
                Err(_) => self.fail_all(&mut engine, &mut live, &mut waiting),
            }
        }
    }

    /// Hands the batch's free rows to the waiting requests, a fair share each (`fair.rs`), and
    /// admits those choices. Choices that end at once (EOS first, `max_tokens` 1) free their row
    /// again, so it shares until the batch is full or no one waits.
    fn admit_waiting<'m>(&'m self, engine: &mut Engine<'m, Key>, live: &mut HashMap<u64, Live>, waiting: &mut VecDeque<u64>) {
        while !waiting.is_empty() && engine.len() < self.max_batch {
            let wants: Vec<Want> = waiting.iter().map(|id| live[id].want()).collect();
            let rows = share(self.max_batch - engine.len(), &wants);
            let grants: Vec<(u64, usize)> = waiting.iter().copied().zip(rows).filter(|&(_, k)| k > 0).collect();
            for (id, rows) in grants {
                let end = live[&id].admitted + rows;
                // One prompt's choices at a time; the last settle may answer (and remove) the request.
                while let Some(l) = live.get_mut(&id).filter(|l| l.admitted < end) {
                    match catch_unwind(AssertUnwindSafe(|| self.admit(engine, id, end, l))) {
                        Ok(first) => self.settle(engine, first, live),
                        Err(_) => return self.fail_all(engine, live, waiting),
                    }
                }
            }
            waiting.retain(|id| live.get(id).is_some_and(Live::waiting));
        }
    }

    /// After libtorch failed mid-step (out of memory, say; its message is in the log above): the
    /// requests in flight get a 500 (a stream an error event), the batch starts afresh, and the
    /// server goes on with the requests still queued.
    fn fail_all<'m>(&'m self, engine: &mut Engine<'m, Key>, live: &mut HashMap<u64, Live>, waiting: &mut VecDeque<u64>) {
        eprintln!("worker: the engine failed; answering {} request(s) in flight with an error and going on", live.len());
        for (_, l) in live.drain() {
            if l.waiting() {
                self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            }
            if let Reply::Stream(tx) = &l.job.reply {
                let error = serde_json::json!({"error": {"message": "the engine failed on this request (see the server's log)", "type": "server_error", "param": null, "code": null}});
                let _ = tx.send(sse(&error));
            }
        }
        waiting.clear();
        *engine = self.engine();
        self.metrics.active_sequences.store(0, Ordering::Relaxed);
    }

    fn engine(&self) -> Engine<'_, Key> {
        Engine::new(&self.model, self.device, self.eos).with_prefix_cache(self.prefix_cache_tokens)
    }

    /// Delivers what the engine emitted, drops the choices a stop string ended, updates the gauge.
    fn settle(&self, engine: &mut Engine<Key>, emitted: Vec<Emitted<Key>>, live: &mut HashMap<u64, Live>) {
        let mut stopped = vec![];
        for e in emitted {
            self.deliver(e, live, &mut stopped);
        }
        if !stopped.is_empty() {
            engine.cancel(|key| stopped.contains(key));
        }
        self.metrics.active_sequences.store(engine.len() as u64, Ordering::Relaxed);
    }

    fn accept(&self, id: u64, job: Job, live: &mut HashMap<u64, Live>, waiting: &mut VecDeque<u64>) {
        let total = job.prompts.len() * job.request.n;
        let choices = (0..total)
            .map(|i| ChoiceState {
                text: TextState::new(job.request.stop.clone()),
                echo: if job.request.echo { job.prompt_texts[i / job.request.n].clone() } else { String::new() },
                logprobs: job.request.logprobs.map(|_| ChoiceLogprobs::default()),
                sent_logprobs: 0,
                finish: None,
            })
            .collect();
        waiting.push_back(id);
        live.insert(id, Live { job, unfinished: total, choices, admitted: 0 });
    }

    /// Cancels the requests whose client disconnected.
    fn drop_gone_clients(&self, engine: &mut Engine<Key>, live: &mut HashMap<u64, Live>, waiting: &mut VecDeque<u64>) {
        let gone: Vec<u64> = live.iter().filter(|(_, l)| l.job.reply.is_closed()).map(|(&id, _)| id).collect();
        for id in &gone {
            let l = live.remove(id).expect("listed");
            if l.waiting() {
                self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            }
            self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        if !gone.is_empty() {
            engine.cancel(|(id, _)| gone.contains(id));
            waiting.retain(|id| !gone.contains(id));
            self.metrics.active_sequences.store(engine.len() as u64, Ordering::Relaxed);
        }
    }

    /// Admits request `id`'s next choices up to `end`, as far as they share a prompt (prefilled
    /// once for them); returns their first tokens. A prompt counts in the token metrics once, with
    /// its first choice.
    fn admit(&self, engine: &mut Engine<Key>, id: u64, end: usize, l: &mut Live) -> Vec<Emitted<Key>> {
        let r = &l.job.request;
        let p = l.admitted / r.n;
        let part = l.admitted..end.min((p + 1) * r.n);
        let first_part = part.start == p * r.n;
        let ids = l.job.prompts[p].clone();
        let prompt = Prompt { ids, max_new_tokens: r.max_tokens, logprobs: r.logprobs, prompt_logprobs: r.echo && r.logprobs.is_some() };
        let params = SamplingParams {
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k,
            presence_penalty: r.presence_penalty,
            frequency_penalty: r.frequency_penalty,
        };
        let seed = r.seed.unwrap_or_else(fresh_seed);
        let choices = part.clone().map(|c| ((id, c), Sampler::new(params.clone(), Rng::new(seed, c as u64)))).collect();
        let reused = engine.reused_tokens();
        let (prompt_logprobs, emitted) = engine.admit(&prompt, choices);
        if first_part {
            self.metrics.prompt_tokens.fetch_add(prompt.ids.len() as u64, Ordering::Relaxed);
            self.metrics.prompt_tokens_reused.fetch_add(engine.reused_tokens() - reused, Ordering::Relaxed);
        }
        l.admitted = part.end;
        if !l.waiting() {
            self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
        }
        for c in part {
            let choice = &mut l.choices[c];
            if let Some(lp) = choice.logprobs.as_mut().filter(|_| !prompt_logprobs.is_empty()) {
                self.prompt_entries(lp, &prompt.ids, &prompt_logprobs);
            }
            let echoed = !choice.echo.is_empty() || choice.logprobs.as_ref().is_some_and(|lp| !lp.tokens.is_empty());
            if let (Reply::Stream(tx), true) = (&l.job.reply, echoed) {
                let logprobs = choice.logprobs.as_ref().map(|lp| lp.tail(0));
                choice.sent_logprobs = logprobs.as_ref().map_or(0, |lp| lp.tokens.len());
                let _ = tx.send(sse(&chunk_json(&l.job.head, c, &choice.echo, logprobs.as_ref(), None)));
            }
        }
        emitted
    }

    /// The echoed prompt's logprob entries (the first token has none).
    fn prompt_entries(&self, lp: &mut ChoiceLogprobs, ids: &[u32], logprobs: &[Option<Logprob>]) {
        // Offsets as the prompt decodes incrementally, so a character split across tokens counts once.
        let mut text = TextState::new(vec![]);
        for (&id, logprob) in ids.iter().zip(logprobs) {
            lp.text_offset.push(text.push(&self.tokenizer, id).offset);
            lp.tokens.push(self.token_text(id));
            lp.token_logprobs.push(logprob.as_ref().map(|l| l.value));
            lp.top_logprobs.push(logprob.as_ref().map(|l| self.alternatives(l)));
        }
    }

    /// Hands one token (or end) to its choice. A choice ended by a stop string is added to
    /// `stopped`, for the engine to drop.
    fn deliver(&self, e: Emitted<Key>, live: &mut HashMap<u64, Live>, stopped: &mut Vec<Key>) {
        let (id, c) = e.key;
        let Some(l) = live.get_mut(&id) else { return };
        let choice = &mut l.choices[c];
        if choice.finish.is_some() {
            return; // a stop string already ended it
        }
        let mut text = String::new();
        if let Some(token) = e.token {
            self.metrics.completion_tokens.fetch_add(1, Ordering::Relaxed);
            l.job.completion_tokens.fetch_add(1, Ordering::Relaxed);
            let delta = choice.text.push(&self.tokenizer, token.id);
            text = delta.text;
            if let Some(lp) = choice.logprobs.as_mut().filter(|_| !delta.stopped || delta.offset < choice.text.text().len()) {
                let logprob = token.logprob.expect("logprobs were asked for");
                lp.text_offset.push(choice.echo.len() + delta.offset);
                lp.tokens.push(self.token_text(token.id));
                lp.token_logprobs.push(Some(logprob.value));
                lp.top_logprobs.push(Some(self.alternatives(&logprob)));
            }
            if delta.stopped {
                choice.finish = Some(FinishReason::Stop);
                stopped.push(e.key);
            }
        }
        if let Some(finish) = e.finish.filter(|_| choice.finish.is_none()) {
            text.push_str(&choice.text.finish(&self.tokenizer));
            let stop = finish == Finish::Eos || choice.text.stopped();
            choice.finish = Some(if stop { FinishReason::Stop } else { FinishReason::Length });
        }
        if let Reply::Stream(tx) = &l.job.reply {
            if !text.is_empty() || choice.finish.is_some() {
                let logprobs = choice.logprobs.as_ref().map(|lp| lp.tail(choice.sent_logprobs));
                choice.sent_logprobs = choice.logprobs.as_ref().map_or(0, |lp| lp.tokens.len());
                let _ = tx.send(sse(&chunk_json(&l.job.head, c, &text, logprobs.as_ref(), choice.finish)));
            }
        }
        if choice.finish.is_some() {
            l.unfinished -= 1;
            if l.unfinished == 0 {
                let l = live.remove(&id).expect("live");
                self.answer(l);
            }
        }
    }

    /// Sends a finished request's answer.
    fn answer(&self, l: Live) {
        match l.job.reply {
            Reply::Whole(tx) => {
                let choices = l
                    .choices
                    .into_iter()
                    .enumerate()
                    .map(|(index, c)| Choice {
                        index,
                        text: c.echo + c.text.text(),
                        finish_reason: c.finish.expect("finished"),
                        logprobs: c.logprobs,
                    })
                    .collect();
                let _ = tx.send(choices);
            }
            Reply::Stream(tx) => {
                let _ = tx.send("data: [DONE]\n\n".into());
            }
        }
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    fn alternatives(&self, logprob: &Logprob) -> Vec<(String, f32)> {
        logprob.top.iter().map(|&(id, lp)| (self.token_text(id), lp)).collect()
    }
}

/// One server-sent event.
fn sse(value: &serde_json::Value) -> String {
    format!("data: {value}\n\n")
}
