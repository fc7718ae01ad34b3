//! Continuous batching over one model. A prompt joins with its own prefill (run alone, so its
//! logits are those of a lone run; to rounding when it starts from the prefix cache, below), then
//! its choices' cache rows join the batch; every step
//! decodes one token for every active sequence at once, so the weights are read once for all of
//! them; a sequence leaves at EOS, at its token limit, or when its caller cancels it.
//! With a prefix cache (`prefix.rs`, the server's), a prompt that begins like a recent one
//! prefills only what differs: an editor's next request repeats the file above the cursor.

use tch::{Device, Kind, Tensor};

use crate::model::{BatchCache, Model};
use crate::prefix::PrefixCache;
use crate::sample::{logprobs, TokenSampler};

/// What a prompt asks of the engine; its choices come with their own keys and samplers.
#[derive(Clone, Debug)]
pub struct Prompt {
    pub ids: Vec<u32>,
    /// At most this many new tokens per choice (the engine also stops at the context).
    pub max_new_tokens: usize,
    /// Each new token's log-probability, with this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// Also the log-probabilities of the prompt's own tokens (the first has none).
    pub prompt_logprobs: bool,
}

/// The model's log-probability of a token, and the most likely alternatives with theirs.
#[derive(Clone, Debug, PartialEq)]
pub struct Logprob {
    pub value: f32,
    pub top: Vec<(u32, f32)>,
}

/// A token the engine produced for one sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    pub id: u32,
    pub logprob: Option<Logprob>,
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// The model produced EOS (not part of the output).
    Eos,
    /// `max_new_tokens` were produced.
    Length,
    /// The context (n_positions) is full before `max_new_tokens`.
    Context,
}

/// What one sequence got from an admission or a step: a token (none for EOS or a limit of 0),
/// and its end, if this was the last.
#[derive(Clone, Debug)]
pub struct Emitted<K> {
    pub key: K,
    pub token: Option<Token>,
    pub finish: Option<Finish>,
}

/// One sequence in the batch; its position in `seqs` is its row in the cache.
struct Active<K> {
    key: K,
    last: u32,
    generated: usize,
    limit: usize,
    max_new_tokens: usize,
    logprobs: Option<usize>,
    sampler: TokenSampler,
}

pub struct Engine<'m, K> {
    model: &'m Model,
    device: Device,
    /// Ids that end a sequence: EOS, and the end tokens of the served FIM format.
    ends: Vec<u32>,
    cache: BatchCache,
    seqs: Vec<Active<K>>,
    /// Recent prompts' keys and values, when prompts may start from them.
    prefix: Option<PrefixCache>,
    /// Prompt tokens whose keys and values came from the prefix cache, so far.
    reused_tokens: u64,
}

impl<'m, K: Clone> Engine<'m, K> {
    pub fn new(model: &'m Model, device: Device, eos: Option<u32>) -> Self {
        let cache = BatchCache::new(model.config.context() as i64);
        Self { model, device, ends: eos.into_iter().collect(), cache, seqs: vec![], prefix: None, reused_tokens: 0 }
    }

    /// Also ends a sequence at each of `ids` (a FIM format's end-of-middle tokens), as at EOS.
    pub fn with_end_ids(mut self, ids: &[u32]) -> Self {
        for &id in ids {
            if !self.ends.contains(&id) {
                self.ends.push(id);
            }
        }
        self
    }

    /// Keeps recent prompts' keys and values, up to `budget` tokens, so that a prompt beginning
    /// with the same tokens as one of them prefills only the rest (its logits then match a lone
    /// run's to rounding, not to the bit). A budget of 0 keeps none.
    pub fn with_prefix_cache(mut self, budget: usize) -> Self {
        self.prefix = (budget > 0).then(|| PrefixCache::new(budget));
        self
    }

    /// Prompt tokens not computed again thanks to the prefix cache, since the engine began.
    pub fn reused_tokens(&self) -> u64 {
        self.reused_tokens
    }

    /// Sequences decoding now.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Prefills `prompt` and gives each choice its first token; the choices that go on join the
    /// batch. Returns the prompt's logprobs (when asked) and what each choice got.
    pub fn admit(&mut self, prompt: &Prompt, choices: Vec<(K, TokenSampler)>) -> (Vec<Option<Logprob>>, Vec<Emitted<K>>) {
        let _guard = tch::no_grad_guard();
        let n_positions = self.model.config.context();
        assert!(!prompt.ids.is_empty() && prompt.ids.len() <= n_positions, "the caller checks the prompt against the context");
        // The prompt's own logprobs need every position's logits: a whole prefill.
        let found = self.prefix.as_mut().filter(|_| !prompt.prompt_logprobs).and_then(|p| p.lookup(&prompt.ids));
        let (reuse, mut single) = found.unwrap_or_default();
        self.reused_tokens += reuse as u64;
        let ids: Vec<i64> = prompt.ids[reuse..].iter().map(|&i| i as i64).collect();
        let input = Tensor::from_slice(&ids).view([1, -1]).to_device(self.device);
        let logits = self.model.prefill(&input, &mut single, prompt.prompt_logprobs).squeeze_dim(0); // (1 or T, V)
        let rows = host_rows(&logits);
        let prompt_logprobs = if prompt.prompt_logprobs {
            let top = prompt.logprobs.unwrap_or(0);
            let mut all = vec![None];
            all.extend(prompt.ids[1..].iter().zip(&rows).map(|(&id, row)| Some(logprob(row, id, top))));
            all
        } else {
            vec![]
        };
        let last = rows.last().expect("a prompt has a last position");
        let limit = prompt.max_new_tokens.min(n_positions - prompt.ids.len());
        let mut emitted = vec![];
        let mut joining = 0;
        for (key, sampler) in choices {
            let mut seq =
                Active { key, last: 0, generated: 0, limit, max_new_tokens: prompt.max_new_tokens, logprobs: prompt.logprobs, sampler };
            let out = if limit == 0 { self.end(&seq) } else { self.advance(&mut seq, last.clone()) };
            if out.finish.is_none() {
                self.seqs.push(seq);
                joining += 1;
            }
            emitted.push(out);
        }
        match joining {
            0 => {}
            1 => self.cache.push(&single),
            n => self.cache.push(&single.repeat(n)),
        }
        if let Some(prefix) = &mut self.prefix {
            prefix.insert(&prompt.ids, single);
        }
        (prompt_logprobs, emitted)
    }

    /// One token for every active sequence; the finished ones leave the batch.
    pub fn step(&mut self) -> Vec<Emitted<K>> {
        if self.seqs.is_empty() {
            return vec![];
        }
        let _guard = tch::no_grad_guard();
        let last: Vec<i64> = self.seqs.iter().map(|s| s.last as i64).collect();
        let input = Tensor::from_slice(&last).view([-1, 1]).to_device(self.device);
        let rows = host_rows(&self.model.decode(&input, &mut self.cache));
        let mut seqs = std::mem::take(&mut self.seqs);
        let emitted: Vec<Emitted<K>> = seqs.iter_mut().zip(rows).map(|(seq, row)| self.advance(seq, row)).collect();
        let keep: Vec<bool> = emitted.iter().map(|e| e.finish.is_none()).collect();
        self.cache.retain(&keep);
        self.seqs = seqs.into_iter().zip(&keep).filter_map(|(s, &k)| k.then_some(s)).collect();
        emitted
    }

    /// Removes the sequences `cancelled` picks (their callers are gone, or a stop string ended them).
    pub fn cancel(&mut self, cancelled: impl Fn(&K) -> bool) {
        let keep: Vec<bool> = self.seqs.iter().map(|s| !cancelled(&s.key)).collect();
        if keep.iter().all(|&k| k) {
            return;
        }
        self.cache.retain(&keep);
        let seqs = std::mem::take(&mut self.seqs);
        self.seqs = seqs.into_iter().zip(keep).filter_map(|(s, k)| k.then_some(s)).collect();
    }

    /// Picks `seq`'s next token from its logits row.
    fn advance(&self, seq: &mut Active<K>, mut row: Vec<f32>) -> Emitted<K> {
        let raw = seq.logprobs.map(|_| row.clone());
        let id = seq.sampler.pick(&mut row);
        if self.ends.contains(&id) {
            return Emitted { key: seq.key.clone(), token: None, finish: Some(Finish::Eos) };
        }
        seq.last = id;
        seq.generated += 1;
        let logprob = raw.map(|raw| logprob(&raw, id, seq.logprobs.unwrap_or(0)));
        let finish = (seq.generated == seq.limit).then(|| seq.limit_reached());
        Emitted { key: seq.key.clone(), token: Some(Token { id, logprob }), finish }
    }

    /// The end of a sequence with nothing to generate.
    fn end(&self, seq: &Active<K>) -> Emitted<K> {
        Emitted { key: seq.key.clone(), token: None, finish: Some(seq.limit_reached()) }
    }
}

impl<K> Active<K> {
    /// Why a sequence that reached its limit ends: its own max_new_tokens, or the context.
    fn limit_reached(&self) -> Finish {
        if self.limit < self.max_new_tokens {
            Finish::Context
        } else {
            Finish::Length
        }
    }
}

fn logprob(row: &[f32], id: u32, top: usize) -> Logprob {
    let (value, top) = logprobs(row, id, top);
    Logprob { value, top }
}

/// The rows of a (R, V) f32 tensor on the host.
fn host_rows(logits: &Tensor) -> Vec<Vec<f32>> {
    let (r, v) = logits.size2().expect("(rows, vocab)");
    let flat = Vec::<f32>::try_from(logits.to_kind(Kind::Float).to_device(Device::Cpu).contiguous().view(-1)).expect("f32 logits");
    flat.chunks(v as usize).take(r as usize).map(<[f32]>::to_vec).collect()
}
