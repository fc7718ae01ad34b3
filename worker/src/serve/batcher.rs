//! The engine thread: takes every request from the bounded queue as it comes, hands the batch's
//! free rows out between the waiting requests a fair share each (`fair.rs`: sequence by
//! sequence, so no client waits behind another's whole request), admits those sequences
//! (continuous batching: they join at the next step), steps the batch, turns each choice's tokens
//! into text (stop strings, logprobs, echo) and answers its request, whole or as server-sent
//! events. A request whose client went away is cancelled and frees its rows.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use super::api::{chunk_json, ChoiceLogprobs, FinishReason};
use super::metrics::Metrics;
use super::requests::{InFlight, Live, Part, PendingRequest, Reply};
use crate::engine::{Emitted, Engine, Finish, Logprob, Prompt};
use crate::model::Model;
use crate::sample::{fresh_seed, Rng, SamplingParams, TokenSampler};
use crate::test_hook::Hold;
use crate::text::TextState;

/// What the engine thread needs besides its queue.
pub struct Batcher {
    pub model: Model,
    pub device: tch::Device,
    pub eos: Option<u32>,
    /// The ids that end a fill-in-the-middle completion, besides `eos`.
    pub fim_end: Vec<u32>,
    pub tokenizer: Arc<Tokenizer>,
    /// Sequences generating together (--max_batch).
    pub max_batch: usize,
    /// Tokens of recent prompts whose keys and values later prompts may start from (0: none;
    /// `Engine::with_prefix_cache`).
    pub prefix_cache_tokens: usize,
    pub metrics: Arc<Metrics>,
}

/// An engine row's owner: (request id, choice index).
type Key = (u64, usize);

impl Batcher {
    /// Serves requests from `queue` until it is closed and every request is answered.
    pub fn run(self, mut queue: mpsc::Receiver<PendingRequest>) {
        let mut engine = self.engine();
        let mut inflight = InFlight::new(self.metrics.clone());
        let hold = Hold::from_env();
        loop {
            if engine.is_empty() && !inflight.has_waiting() {
                let Some(request) = queue.blocking_recv() else { return };
                inflight.accept(request);
            }
            while let Ok(request) = queue.try_recv() {
                inflight.accept(request);
            }
            self.drop_gone_clients(&mut engine, &mut inflight);
            self.admit_waiting(&mut engine, &mut inflight);
            if hold.holding() {
                continue; // admitting and dropping departed clients, but taking no step
            }
            match catch_unwind(AssertUnwindSafe(|| engine.step())) {
                Ok(next) => self.settle(&mut engine, next, &mut inflight),
                Err(_) => self.fail_all(&mut engine, &mut inflight),
            }
        }
    }

    /// Hands the batch's free rows to the waiting requests, a fair share each (`fair.rs`), and
    /// admits those choices. Choices that end at once (EOS first, `max_tokens` 1) free their row
    /// again, so it shares until the batch is full or no one waits.
    fn admit_waiting<'m>(&'m self, engine: &mut Engine<'m, Key>, inflight: &mut InFlight) {
        while inflight.has_waiting() && engine.len() < self.max_batch {
            for grant in inflight.grants(self.max_batch - engine.len()) {
                // One prompt's choices at a time; the last settle may answer (and remove) the request.
                while let Some(part) = inflight.next_part(grant) {
                    let l = inflight.live_mut(part.id).expect("a part of a live request");
                    match catch_unwind(AssertUnwindSafe(|| self.admit(engine, &part, l))) {
                        Ok(first) => {
                            inflight.mark_admitted(&part);
                            self.settle(engine, first, inflight);
                        }
                        Err(_) => return self.fail_all(engine, inflight),
                    }
                }
            }
            inflight.retain_waiting();
        }
    }

    /// After libtorch failed mid-step (out of memory, say; its message is in the log above): the
    /// requests in flight get a 500 (a stream an error event), the batch starts afresh, and the
    /// server goes on with the requests still queued.
    fn fail_all<'m>(&'m self, engine: &mut Engine<'m, Key>, inflight: &mut InFlight) {
        let failed = inflight.drain();
        tracing::error!(
            requests = failed.len(),
            "the engine failed; answering {} request(s) in flight with an error and going on",
            failed.len()
        );
        for l in failed {
            if let Reply::Stream(tx) = &l.request.reply {
                let error = serde_json::json!({"error": {"message": "the engine failed on this request (see the server's log)", "type": "server_error", "param": null, "code": null}});
                let _ = tx.send(sse(&error));
            }
        }
        *engine = self.engine();
        self.metrics.active_sequences.store(0, Ordering::Relaxed);
    }

    fn engine(&self) -> Engine<'_, Key> {
        Engine::new(&self.model, self.device, self.eos).with_end_ids(&self.fim_end).with_prefix_cache(self.prefix_cache_tokens)
    }

    /// Delivers what the engine emitted, drops the choices a stop string ended, updates the gauge.
    fn settle(&self, engine: &mut Engine<Key>, emitted: Vec<Emitted<Key>>, inflight: &mut InFlight) {
        let mut stopped = vec![];
        for e in emitted {
            self.deliver(e, inflight, &mut stopped);
        }
        if !stopped.is_empty() {
            engine.cancel(|key| stopped.contains(key));
        }
        self.metrics.active_sequences.store(engine.len() as u64, Ordering::Relaxed);
    }

    /// Cancels the requests whose client disconnected, freeing their rows.
    fn drop_gone_clients(&self, engine: &mut Engine<Key>, inflight: &mut InFlight) {
        let gone = inflight.remove_gone();
        if !gone.is_empty() {
            tracing::debug!(requests = gone.len(), "cancelled {} request(s) whose client went away", gone.len());
            engine.cancel(|(id, _)| gone.contains(id));
            self.metrics.active_sequences.store(engine.len() as u64, Ordering::Relaxed);
        }
    }

    /// Admits `part` of request `l` (its choices of one prompt, prefilled once for them); returns
    /// their first tokens. A prompt counts in the token metrics once, with its first part.
    fn admit(&self, engine: &mut Engine<Key>, part: &Part, l: &mut Live) -> Vec<Emitted<Key>> {
        let r = &l.request.body;
        let ids = l.request.prompts[part.prompt].clone();
        let prompt = Prompt { ids, max_new_tokens: r.max_tokens, logprobs: r.logprobs, prompt_logprobs: r.echo && r.logprobs.is_some() };
        let params = SamplingParams {
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k,
            presence_penalty: r.presence_penalty,
            frequency_penalty: r.frequency_penalty,
        };
        let seed = r.seed.unwrap_or_else(fresh_seed);
        let samplers = part.choices.clone().map(|c| ((part.id, c), TokenSampler::new(params.clone(), Rng::new(seed, c as u64))));
        let reused = engine.reused_tokens();
        let (prompt_logprobs, emitted) = engine.admit(&prompt, samplers.collect());
        if part.first {
            self.metrics.prompt_tokens.fetch_add(prompt.ids.len() as u64, Ordering::Relaxed);
            self.metrics.prompt_tokens_reused.fetch_add(engine.reused_tokens() - reused, Ordering::Relaxed);
        }
        for c in part.choices.clone() {
            self.echo(l, c, &prompt.ids, &prompt_logprobs);
        }
        emitted
    }

    /// Choice `c`'s echoed prompt: its logprob entries (when asked), and for a stream the chunk
    /// holding them and the prompt's text.
    fn echo(&self, l: &mut Live, c: usize, ids: &[u32], prompt_logprobs: &[Option<Logprob>]) {
        let choice = &mut l.choices[c];
        if let Some(lp) = choice.logprobs.as_mut().filter(|_| !prompt_logprobs.is_empty()) {
            self.prompt_entries(lp, ids, prompt_logprobs);
        }
        let echoed = !choice.echo.is_empty() || choice.logprobs.as_ref().is_some_and(|lp| !lp.tokens.is_empty());
        if let (Reply::Stream(tx), true) = (&l.request.reply, echoed) {
            let logprobs = choice.logprobs.as_ref().map(|lp| lp.tail(0));
            choice.sent_logprobs = logprobs.as_ref().map_or(0, |lp| lp.tokens.len());
            let _ = tx.send(sse(&chunk_json(&l.request.head, c, &choice.echo, logprobs.as_ref(), None)));
        }
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

    /// Hands one token (or end) to its choice and streams the text it releases. A choice ended by
    /// a stop string is added to `stopped`, for the engine to drop; a request's last choice to
    /// end sends its answer.
    fn deliver(&self, e: Emitted<Key>, inflight: &mut InFlight, stopped: &mut Vec<Key>) {
        let (id, c) = e.key;
        let Some(l) = inflight.live_mut(id) else { return };
        if l.choices[c].finish.is_some() {
            return; // a stop string already ended it
        }
        let text = self.take_token(&e, l, stopped);
        let choice = &mut l.choices[c];
        if let Some(finish) = e.finish.filter(|_| choice.finish.is_none()) {
            let stop = finish == Finish::Eos || choice.text.stopped();
            choice.finish = Some(if stop { FinishReason::Stop } else { FinishReason::Length });
        }
        if let Reply::Stream(tx) = &l.request.reply {
            if !text.is_empty() || choice.finish.is_some() {
                let logprobs = choice.logprobs.as_ref().map(|lp| lp.tail(choice.sent_logprobs));
                choice.sent_logprobs = choice.logprobs.as_ref().map_or(0, |lp| lp.tokens.len());
                let _ = tx.send(sse(&chunk_json(&l.request.head, c, &text, logprobs.as_ref(), choice.finish)));
            }
        }
        if choice.finish.is_some() {
            if let Some(done) = inflight.choice_finished(id) {
                done.answer();
            }
        }
    }

    /// Adds `e`'s token to its choice (text, logprobs, the token counts) and returns the text it
    /// releases, with the held-back rest when `e` ends the choice. A stop string in it ends the
    /// choice (`Stop`) and goes to `stopped`.
    fn take_token(&self, e: &Emitted<Key>, l: &mut Live, stopped: &mut Vec<Key>) -> String {
        let choice = &mut l.choices[e.key.1];
        let mut text = String::new();
        if let Some(token) = &e.token {
            self.metrics.completion_tokens.fetch_add(1, Ordering::Relaxed);
            l.request.completion_tokens.fetch_add(1, Ordering::Relaxed);
            let delta = choice.text.push(&self.tokenizer, token.id);
            text = delta.text;
            if let Some(lp) = choice.logprobs.as_mut().filter(|_| !delta.stopped || delta.offset < choice.text.text().len()) {
                let logprob = token.logprob.as_ref().expect("logprobs were asked for");
                lp.text_offset.push(choice.echo.len() + delta.offset);
                lp.tokens.push(self.token_text(token.id));
                lp.token_logprobs.push(Some(logprob.value));
                lp.top_logprobs.push(Some(self.alternatives(logprob)));
            }
            if delta.stopped {
                choice.finish = Some(FinishReason::Stop);
                stopped.push(e.key);
            }
        }
        if e.finish.is_some() && choice.finish.is_none() {
            text.push_str(&choice.text.finish(&self.tokenizer));
        }
        text
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
