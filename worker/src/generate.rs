//! A saved model loaded for inference (a zerotune output dir, a `checkpoint-<step>/` or any HF
//! CodeGen dir), and `worker generate`: one prompt completed through the same engine the
//! server batches with (HF `generate` semantics: greedy by default, or sampling).

use std::path::{Path, PathBuf};

use tch::Device;
use tokenizers::Tokenizer;
use zerotune_hf::manifest::NonFinite;
use zerotune_hf::ModelConfig;
use zerotune_proto::plan::ModelSource;

use crate::checkpoint::load_params;
use crate::engine::{Engine, Finish, Prompt};
use crate::error::{Result, WorkerError};
use crate::model::Model;
use crate::sample::{Rng, SamplingParams, TokenSampler};

/// The compute precision of a loaded model (`precision.rs` says which for `--dtype`).
pub use zerotune_proto::plan::Precision;

/// A model ready to generate.
pub struct Loaded {
    /// The HF model directory the weights came from.
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub eos: Option<u32>,
    pub device: Device,
}

impl Loaded {
    /// Loads `dir` (a `checkpoint-<step>/` through its `model/`) onto `device`, once verified
    /// against its manifest or scanned for non-finite weights (refused unless `nonfinite` allows).
    pub fn open(dir: &Path, device: Device, precision: Precision, nonfinite: NonFinite) -> Result<Self> {
        zerotune_hf::manifest::verify_model_dir(dir, nonfinite)?;
        let dir = zerotune_hf::model_dir(dir);
        let tokenizer = zerotune_hf::tokenizer::load(&dir)?;
        let source = ModelSource::Pretrained { dir: dir.to_string_lossy().into_owned() };
        let (config, params) = load_params(&source, crate::dtype::precision_kind(precision), device, false, 0)?;
        let model = Model::new(&config, &params);
        // The id training ended documents with (the config's eos where the tokenizer holds it,
        // else `<|endoftext|>`); none when it has neither.
        let config_eos = config.eos_token_id().and_then(|id| u32::try_from(id).ok());
        let file = zerotune_hf::tokenizer::file_in(&dir);
        let eos = zerotune_hf::tokenizer::eos_for(&tokenizer, config_eos, &file).ok();
        Ok(Self { dir, config, model, tokenizer, eos, device })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // As HF's `tokenizer(text)`: with the special tokens its post-processor adds (a BOS).
        let encoding = self.tokenizer.encode(text, true).map_err(|source| WorkerError::Tokenize { source })?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|source| WorkerError::Detokenize { source })
    }
}

/// One completion: the prompt's ids, the new ids (EOS not included), their text and why it ended.
#[derive(Debug)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub new_ids: Vec<u32>,
    pub text: String,
    pub finish: Finish,
}

impl Generation {
    /// How it ended, as HF and the completions API name it: `stop` (EOS) or `length`.
    pub fn finish_reason(&self) -> &'static str {
        match self.finish {
            Finish::Eos => "stop",
            Finish::Length | Finish::Context => "length",
        }
    }
}

/// `worker generate`: what to complete with which model.
pub struct GenerateArgs {
    /// A zerotune output dir, a checkpoint-<step>/ or an HF model dir (CodeGen, Llama, Qwen2, StarCoder2).
    pub model: PathBuf,
    pub prompt: String,
    pub max_new_tokens: usize,
    pub params: SamplingParams,
    pub seed: u64,
    pub device: Device,
    pub precision: Precision,
    /// Print {"prompt_ids", "new_ids", "completion", "finish_reason"} as JSON instead of the text.
    pub json: bool,
    pub nonfinite: NonFinite,
}

/// `worker generate`: loads the model (at `args.precision`), completes the prompt and prints
/// the prompt with its completion, or the JSON reply, on stdout; a completion cut short by the
/// context gets a note on stderr.
pub fn run(args: GenerateArgs) -> Result<()> {
    args.params.check()?;
    let loaded = Loaded::open(&args.model, args.device, args.precision, args.nonfinite)?;
    let out = generate(&loaded, &args.prompt, args.max_new_tokens, args.params, args.seed)?;
    if out.finish == Finish::Context {
        tracing::info!("note: the completion stopped at the model's context of {} tokens", loaded.config.context());
    }
    if args.json {
        let reply = serde_json::json!({
            "prompt_ids": out.prompt_ids,
            "new_ids": out.new_ids,
            "completion": out.text,
            "finish_reason": out.finish_reason(),
        });
        println!("{reply}");
    } else {
        println!("{}{}", args.prompt, out.text);
    }
    Ok(())
}

/// Completes `prompt` with up to `max_new_tokens` tokens.
pub fn generate(loaded: &Loaded, prompt: &str, max_new_tokens: usize, params: SamplingParams, seed: u64) -> Result<Generation> {
    let prompt_ids = loaded.encode(prompt)?;
    if prompt_ids.is_empty() {
        return Err(WorkerError::EmptyPrompt);
    }
    let n_positions = loaded.config.context();
    if prompt_ids.len() >= n_positions {
        return Err(WorkerError::PromptTooLong { tokens: prompt_ids.len(), n_positions });
    }
    let mut engine = Engine::new(&loaded.model, loaded.device, loaded.eos);
    let request = Prompt { ids: prompt_ids.clone(), max_new_tokens, logprobs: None, prompt_logprobs: false };
    let (_, mut emitted) = engine.admit(&request, vec![((), TokenSampler::new(params, Rng::new(seed, 0)))]);
    let mut new_ids = vec![];
    loop {
        let out = emitted.pop().expect("one sequence");
        new_ids.extend(out.token.map(|t| t.id));
        if let Some(finish) = out.finish {
            let text = loaded.decode(&new_ids)?;
            return Ok(Generation { prompt_ids, new_ids, text, finish });
        }
        emitted = engine.step();
    }
}
