//! The requests the engine thread answers, and their bookkeeping apart from the model: every
//! request taken from the queue, which of them still wait for rows (oldest first), the fair share
//! of the free rows between those (`fair.rs`), the part of a request admitted next (one prompt's
//! choices at a time, so that they share its prefill), a choice's end and its request's answer,
//! and the requests whose client went away. The queue-depth gauge (`Metrics::queued`, which the
//! front end holds against --max_queue) is counted down here, where a request stops waiting.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::api::{Choice, ChoiceLogprobs, CompletionRequest, FinishReason, ResponseHead};
use super::fair::{share, Want};
use super::metrics::Metrics;
use crate::text::TextState;

/// A validated request with its prompts tokenized, on its way to the engine thread, and where its
/// answer goes.
pub struct PendingRequest {
    /// What identifies its response and each stream chunk.
    pub head: ResponseHead,
    /// The request body as read (sampling settings, n, stop strings, stream, echo, logprobs).
    pub body: CompletionRequest,
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
    /// Whether the client went away (its receiving half is gone).
    fn is_closed(&self) -> bool {
        match self {
            Self::Whole(tx) => tx.is_closed(),
            Self::Stream(tx) => tx.is_closed(),
        }
    }
}

/// A choice while it generates.
pub(super) struct ChoiceState {
    pub text: TextState,
    /// The prompt's text when echoed.
    pub echo: String,
    pub logprobs: Option<ChoiceLogprobs>,
    /// Logprob entries already sent in stream chunks.
    pub sent_logprobs: usize,
    pub finish: Option<FinishReason>,
}

/// A request being answered. Choice c is prompt c / n's choice c % n; choices join the batch in
/// that order, a prompt's possibly in parts (each prefilled, the later ones mostly from the
/// prefix cache).
pub(super) struct Live {
    pub request: PendingRequest,
    pub choices: Vec<ChoiceState>,
    /// Choices admitted so far (0..admitted): the next to admit.
    admitted: usize,
    /// Choices not yet finished; the request is answered when none is left.
    unfinished: usize,
}

impl Live {
    fn new(request: PendingRequest) -> Self {
        let body = &request.body;
        let total = request.prompts.len() * body.n;
        let choices = (0..total)
            .map(|i| ChoiceState {
                text: TextState::new(body.stop.clone()),
                echo: if body.echo { request.prompt_texts[i / body.n].clone() } else { String::new() },
                logprobs: body.logprobs.map(|_| ChoiceLogprobs::default()),
                sent_logprobs: 0,
                finish: None,
            })
            .collect();
        Self { request, choices, admitted: 0, unfinished: total }
    }

    /// Whether some of its choices wait for a row.
    pub fn waiting(&self) -> bool {
        self.admitted < self.choices.len()
    }

    /// What the fair share weighs: rows held now (admitted, not finished), choices left to admit.
    fn want(&self) -> Want {
        let total = self.choices.len();
        Want { held: self.admitted + self.unfinished - total, left: total - self.admitted }
    }

    /// Sends the answer of a request whose choices have all finished: every choice (echo and
    /// text) at once, or a stream's `[DONE]`.
    pub fn answer(self) {
        match self.request.reply {
            Reply::Whole(tx) => {
                let choices = self
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
}

/// A waiting request's share of the free rows: admit its choices up to `end` (exclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Grant {
    pub id: u64,
    pub end: usize,
}

/// Choices of one request to admit together: some of one prompt's, prefilled once for them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Part {
    pub id: u64,
    /// The prompt's index in the request.
    pub prompt: usize,
    /// The request's choice indices.
    pub choices: Range<usize>,
    /// Whether these are the prompt's first choices (the prompt then counts in the token metrics).
    pub first: bool,
}

/// Every request the engine thread has taken from the queue and not yet answered.
pub(super) struct InFlight {
    live: HashMap<u64, Live>,
    /// Requests with choices not yet admitted, oldest first. It holds every request taken from
    /// the queue: the front end bounds them (`zerotune_queue_depth` against --max_queue).
    waiting: VecDeque<u64>,
    /// The id of the last request accepted (ids start at 1).
    last_id: u64,
    metrics: Arc<Metrics>,
}

impl InFlight {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { live: HashMap::new(), waiting: VecDeque::new(), last_id: 0, metrics }
    }

    /// Whether some request waits for rows.
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Takes a request from the queue: all its choices wait for rows, behind the older requests'.
    /// Returns its id.
    pub fn accept(&mut self, request: PendingRequest) -> u64 {
        self.last_id += 1;
        self.live.insert(self.last_id, Live::new(request));
        self.waiting.push_back(self.last_id);
        self.last_id
    }

    pub fn live_mut(&mut self, id: u64) -> Option<&mut Live> {
        self.live.get_mut(&id)
    }

    /// How `free` rows go to the waiting requests (`fair.rs`: one at a time to the one holding
    /// the fewest, the oldest first), oldest first; requests that get none are left out.
    pub fn grants(&self, free: usize) -> Vec<Grant> {
        let waiting: Vec<(u64, &Live)> = self.waiting.iter().filter_map(|&id| Some((id, self.live.get(&id)?))).collect();
        let wants: Vec<Want> = waiting.iter().map(|(_, l)| l.want()).collect();
        let rows = share(free, &wants);
        waiting.iter().zip(rows).filter(|&(_, k)| k > 0).map(|(&(id, l), k)| Grant { id, end: l.admitted + k }).collect()
    }

    /// The next choices of `grant`'s request to admit: from its first not admitted, up to the
    /// grant's end or its prompt's last choice. None once the grant is used up (or the request
    /// answered).
    pub fn next_part(&self, grant: Grant) -> Option<Part> {
        let l = self.live.get(&grant.id).filter(|l| l.admitted < grant.end)?;
        let n = l.request.body.n;
        let prompt = l.admitted / n;
        let choices = l.admitted..grant.end.min((prompt + 1) * n);
        Some(Part { id: grant.id, prompt, first: choices.start == prompt * n, choices })
    }

    /// Records `part` admitted; a request none of whose choices waits any more leaves the queue
    /// depth.
    pub fn mark_admitted(&mut self, part: &Part) {
        let Some(l) = self.live.get_mut(&part.id) else { return };
        let was_waiting = l.waiting();
        l.admitted = l.admitted.max(part.choices.end);
        if was_waiting && !l.waiting() {
            self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Drops the requests wholly admitted, or answered, from the waiting list.
    pub fn retain_waiting(&mut self) {
        let live = &self.live;
        self.waiting.retain(|id| live.get(id).is_some_and(Live::waiting));
    }

    /// Records one of request `id`'s choices finished (the caller set its `finish`); returns the
    /// request, removed, when that was its last, for its answer.
    pub fn choice_finished(&mut self, id: u64) -> Option<Live> {
        let l = self.live.get_mut(&id)?;
        l.unfinished -= 1;
        if l.unfinished > 0 {
            return None;
        }
        self.live.remove(&id)
    }

    /// Removes the requests whose client went away and counts them cancelled (and out of the
    /// queue depth when they still waited); returns their ids, whose rows the engine must drop.
    pub fn remove_gone(&mut self) -> Vec<u64> {
        let gone: Vec<u64> = self.live.iter().filter(|(_, l)| l.request.reply.is_closed()).map(|(&id, _)| id).collect();
        for id in &gone {
            let l = self.live.remove(id).expect("listed");
            if l.waiting() {
                self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            }
            self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        self.waiting.retain(|id| !gone.contains(id));
        gone
    }

    /// Removes every request (the engine failed), each out of the queue depth where it waited;
    /// returns them, for their error.
    pub fn drain(&mut self) -> Vec<Live> {
        self.waiting.clear();
        let all: Vec<Live> = self.live.drain().map(|(_, l)| l).collect();
        let waited = all.iter().filter(|l| l.waiting()).count() as u64;
        self.metrics.queued.fetch_sub(waited, Ordering::Relaxed);
        all
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::serve::api::parse_completion;

    /// A request of `prompts` prompts x `n` choices answered whole, as the front end makes it,
    /// and the receiving end of its answer.
    pub fn pending(prompts: usize, n: usize) -> (PendingRequest, oneshot::Receiver<Vec<Choice>>) {
        let body = parse_completion(format!(r#"{{"prompt": {:?}, "n": {n}}}"#, vec!["p"; prompts]).as_bytes()).unwrap();
        let (tx, rx) = oneshot::channel();
        let request = PendingRequest {
            head: ResponseHead { id: "cmpl-test".into(), created: 0, model: "m".into() },
            body,
            prompts: vec![vec![1, 2]; prompts],
            prompt_texts: vec!["p".into(); prompts],
            reply: Reply::Whole(tx),
            completion_tokens: Arc::default(),
        };
        (request, rx)
    }

    /// `InFlight` with `queued` requests counted in the queue depth by the front end.
    fn in_flight(queued: u64) -> (InFlight, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        metrics.queued.store(queued, Ordering::Relaxed);
        (InFlight::new(metrics.clone()), metrics)
    }

    /// Admits every part of `grant`, as the engine thread does; returns them.
    fn admit(inflight: &mut InFlight, grant: Grant) -> Vec<Part> {
        let mut parts = vec![];
        while let Some(part) = inflight.next_part(grant) {
            inflight.mark_admitted(&part);
            parts.push(part);
        }
        parts
    }

    fn queued(metrics: &Metrics) -> u64 {
        metrics.queued.load(Ordering::Relaxed)
    }

    #[test]
    fn free_rows_are_shared_and_a_prompts_choices_join_in_parts() {
        let (mut inflight, metrics) = in_flight(2);
        let big = inflight.accept(pending(2, 2).0); // 4 choices: prompt 0's 0..2, prompt 1's 2..4
        let short = inflight.accept(pending(1, 1).0);
        assert_eq!((big, short), (1, 2), "ids in arrival order");
        // 3 free rows: one to the big (older), one to the short, the third to the big again.
        let grants = inflight.grants(3);
        assert_eq!(grants, [Grant { id: big, end: 2 }, Grant { id: short, end: 1 }]);
        assert_eq!(admit(&mut inflight, grants[0]), [Part { id: big, prompt: 0, choices: 0..2, first: true }]);
        assert_eq!(admit(&mut inflight, grants[1]), [Part { id: short, prompt: 0, choices: 0..1, first: true }]);
        assert_eq!(queued(&metrics), 1, "the short request is wholly admitted, the big one still waits");
        inflight.retain_waiting();
        assert_eq!(inflight.grants(4), [Grant { id: big, end: 4 }], "only the big request still waits");
        // Prompt 1 joins in two parts; only the first counts the prompt's tokens.
        assert_eq!(admit(&mut inflight, Grant { id: big, end: 3 }), [Part { id: big, prompt: 1, choices: 2..3, first: true }]);
        assert_eq!(queued(&metrics), 1);
        assert_eq!(admit(&mut inflight, Grant { id: big, end: 4 }), [Part { id: big, prompt: 1, choices: 3..4, first: false }]);
        assert_eq!(queued(&metrics), 0);
        inflight.retain_waiting();
        assert!(!inflight.has_waiting() && inflight.grants(8).is_empty());
    }

    #[test]
    fn a_grant_over_several_prompts_admits_them_one_at_a_time() {
        let (mut inflight, metrics) = in_flight(1);
        let id = inflight.accept(pending(3, 2).0);
        let grants = inflight.grants(5);
        assert_eq!(grants, [Grant { id, end: 5 }], "one row short of the request's 6 choices");
        let prompts: Vec<(usize, Range<usize>)> = admit(&mut inflight, grants[0]).into_iter().map(|p| (p.prompt, p.choices)).collect();
        assert_eq!(prompts, [(0, 0..2), (1, 2..4), (2, 4..5)]);
        assert_eq!(queued(&metrics), 1, "its last choice still waits");
    }

    #[test]
    fn a_request_holding_rows_yields_the_next_free_row_to_a_newcomer() {
        let (mut inflight, _) = in_flight(2);
        let big = inflight.accept(pending(1, 8).0);
        admit(&mut inflight, Grant { id: big, end: 1 });
        let newcomer = inflight.accept(pending(1, 1).0);
        assert_eq!(inflight.grants(1), [Grant { id: newcomer, end: 1 }]);
    }

    #[test]
    fn a_request_is_answered_when_its_last_choice_finishes() {
        let (mut inflight, _) = in_flight(1);
        let (request, mut answer) = pending(1, 2);
        let id = inflight.accept(request);
        admit(&mut inflight, Grant { id, end: 2 });
        for (c, reason) in [FinishReason::Length, FinishReason::Stop].into_iter().enumerate() {
            inflight.live_mut(id).unwrap().choices[c].finish = Some(reason);
        }
        assert!(inflight.choice_finished(id).is_none(), "one choice still generates");
        assert!(answer.try_recv().is_err(), "no answer yet");
        let done = inflight.choice_finished(id).expect("the last choice ends the request");
        assert!(inflight.live_mut(id).is_none() && inflight.choice_finished(id).is_none(), "removed once");
        done.answer();
        let choices = answer.try_recv().unwrap();
        let got: Vec<(usize, FinishReason)> = choices.iter().map(|c| (c.index, c.finish_reason)).collect();
        assert_eq!(got, [(0, FinishReason::Length), (1, FinishReason::Stop)]);
    }

    #[test]
    fn a_departed_client_is_cancelled_and_leaves_the_queue_depth_once() {
        let (mut inflight, metrics) = in_flight(3);
        let (admitted, gone_admitted) = pending(1, 1);
        let (waiting, gone_waiting) = pending(1, 2);
        let (stays, _answer) = pending(1, 1);
        let (a, w, s) = (inflight.accept(admitted), inflight.accept(waiting), inflight.accept(stays));
        admit(&mut inflight, Grant { id: a, end: 1 });
        assert_eq!(queued(&metrics), 2);
        drop((gone_admitted, gone_waiting));
        let mut gone = inflight.remove_gone();
        gone.sort();
        assert_eq!(gone, [a, w]);
        assert_eq!(metrics.cancelled.load(Ordering::Relaxed), 2);
        assert_eq!(queued(&metrics), 1, "only the one still waiting left the queue depth here");
        assert_eq!(inflight.grants(8), [Grant { id: s, end: 1 }], "the departed get no rows");
        assert!(inflight.remove_gone().is_empty(), "counted once");
        assert_eq!(metrics.cancelled.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn after_an_engine_failure_nothing_is_left_waiting_or_counted() {
        let (mut inflight, metrics) = in_flight(2);
        let a = inflight.accept(pending(1, 1).0);
        inflight.accept(pending(2, 1).0);
        admit(&mut inflight, Grant { id: a, end: 1 });
        assert_eq!(inflight.drain().len(), 2);
        assert_eq!(queued(&metrics), 0);
        assert!(!inflight.has_waiting() && inflight.remove_gone().is_empty());
    }
}
