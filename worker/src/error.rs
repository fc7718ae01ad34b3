//! The worker's errors, each a sentence that tells the user what went wrong and what to do. Each
//! variant carries the data its sentence names, so that callers and tests match the cause, not
//! the text.

use std::path::PathBuf;

use zerotune_proto::state::LAYOUT_FILE;

use crate::comm::CollectiveError;
use crate::precision::DtypeChoice;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Model(#[from] zerotune_hf::Error),
    /// Input documents that cannot be read (`worker eval`); the message names the file and line.
    #[error(transparent)]
    Input(#[from] zerotune_data::DataError),
    /// `--fim_format` names a format whose sentinels the tokenizer lacks.
    #[error(transparent)]
    Fim(#[from] zerotune_data::fim::MissingSentinel),
    #[error("the loss became {loss} at step {step}; stopped without saving (the last completed checkpoint is intact). Lower the learning rate or use --bf16")]
    NonFiniteLoss { step: u64, loss: f64 },
    #[error("the gradients became non-finite (norm {norm}) at step {step}; stopped without saving (the last completed checkpoint is intact). Lower the learning rate or use --bf16")]
    NonFiniteGradients { step: u64, norm: f64 },
    #[error(transparent)]
    LossScale(#[from] crate::optim::loss_scale::AtMinimum),
    #[error("--device {0}")]
    BadDevice(#[from] zerotune_proto::device::BadDevice),
    #[error("device {0:?} is not available: {1}")]
    Device(String, String),
    #[error(transparent)]
    Io(#[from] zerotune_hf::PathIo),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A collective failed because another rank went away.
    #[error("collective failed: {0}")]
    Peer(String),
    /// A collective called with tensors it cannot take (a bug in the caller, not a lost rank).
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    /// A flag's value out of its range: the flag, the value given and what it must be.
    #[error("{flag} {value}: {rule}")]
    Flag { flag: &'static str, value: String, rule: &'static str },
    /// `--dtype` asks for 16-bit compute on the CPU.
    #[error("--dtype {}: on the CPU models compute in fp32 (drop --dtype, or pick a GPU with --device)", .dtype.name())]
    DtypeOnCpu { dtype: DtypeChoice },
    /// `--dtype bf16` on a GPU below compute capability 7.0 (`capability`: major, minor).
    #[error("--dtype bf16: a GPU of compute capability {}.{} has no bf16; use fp32 (the default there) or fp16", .capability.0, .capability.1)]
    NoBf16 { capability: (u32, u32) },
    /// The model config the coordinator sent for a model trained from scratch; `reason` is the
    /// config reader's.
    #[error("invalid model config from the coordinator: {reason}")]
    ModelConfig { reason: String },
    /// An optimizer checkpoint's layout file that is not the layout's JSON.
    #[error("{path}: {source}")]
    OptimizerLayout { path: PathBuf, source: serde_json::Error },
    /// An optimizer checkpoint of another model: `saved` parameters in its layout, `model` here.
    #[error("{path}: holds {saved} parameters, the model has {model} (another model size?)")]
    OptimizerSize { path: PathBuf, saved: usize, model: usize },
    /// An optimizer slice file without one of the state tensors.
    #[error("{path}: no tensor {tensor}")]
    MissingTensor { path: PathBuf, tensor: &'static str },
    /// An optimizer slice whose tensor is not the length the layout gives its rank.
    #[error("{path}: {tensor} has {bytes} bytes, {LAYOUT_FILE} implies {expected}")]
    SliceSize { path: PathBuf, tensor: &'static str, bytes: usize, expected: usize },
    /// A batch from the coordinator whose token count is not its rows x cols.
    #[error("a batch has {tokens} tokens, expected {rows} x {cols}")]
    BatchShape { tokens: usize, rows: u32, cols: u32 },
    /// The tokenizer failed on a prompt.
    #[error("cannot tokenize the prompt: {source}")]
    Tokenize { source: tokenizers::Error },
    /// The tokenizer failed to turn generated ids back into text.
    #[error("cannot decode tokens: {source}")]
    Detokenize { source: tokenizers::Error },
    /// `worker generate` with a prompt that has no tokens.
    #[error("the prompt is empty after tokenization")]
    EmptyPrompt,
    /// `worker generate` with a prompt of `tokens`, the whole context (`n_positions`) or more.
    #[error("the prompt has {tokens} tokens; the model's context is {n_positions} (n_positions)")]
    PromptTooLong { tokens: usize, n_positions: usize },
    /// `worker serve` cannot bind `addr` (`--host`, `--port`); `source` is the OS's reason.
    #[error("cannot listen on {addr} (--host, --port)")]
    Listen { addr: String, source: std::io::Error },
    /// `worker serve`'s HTTP server stopped with an error of the OS (`source`).
    #[error("the HTTP server failed")]
    Server { source: std::io::Error },
    /// Another OS call `worker serve` makes (its async runtime, the listener's address) failed;
    /// the message is the OS's.
    #[error(transparent)]
    Os(std::io::Error),
    /// `worker eval`'s held-out file gives it nothing to evaluate.
    #[error("--validation_file {}: {}", file.display(), match .reason {
        EmptyEval::NoDocuments => "holds no documents: there is nothing to evaluate on",
        EmptyEval::NoLines => "has no line to predict (a non-blank line after a document's first)",
    })]
    NothingToEvaluate { file: PathBuf, reason: EmptyEval },
    /// `worker eval --base` of another tokenizer than `--model`'s.
    #[error("--base {} and --model {} have different tokenizers: their completions would not be comparable", base.display(), model.display())]
    TokenizersDiffer { base: PathBuf, model: PathBuf },
    #[error("--max_new_tokens {max_new_tokens} leaves no room for a prompt in the context of {context} tokens")]
    NoRoomForPrompt { max_new_tokens: usize, context: usize },
    #[error("--block_size {block} is above the model's context of {context} tokens (n_positions); lower it")]
    BlockAboveContext { block: usize, context: usize },
    #[error("the held-out documents are too short to measure a loss (fewer than 2 tokens)")]
    TooShortForLoss,
}

pub type Result<T> = std::result::Result<T, WorkerError>;

/// Why a held-out file leaves `worker eval` nothing to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmptyEval {
    NoDocuments,
    NoLines,
}

pub(crate) use zerotune_hf::io_err;
