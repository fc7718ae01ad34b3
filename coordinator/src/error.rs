//! The coordinator's errors: each names the flag, file or line at fault and says what to do.

use std::path::PathBuf;

use crate::events::Signal;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A flag's value breaks its rule: `{flag} {value}: {reason}` (no value when it has none).
    #[error("{flag}{}: {reason}", spaced(value))]
    Flag { flag: &'static str, value: String, reason: String },
    /// The file a flag names cannot be read.
    #[error("{flag} {}: {source}", path.display())]
    FlagFile { flag: &'static str, path: PathBuf, source: std::io::Error },
    /// A flag this job needs is not given.
    #[error("{flag} is required: {what}")]
    Missing { flag: &'static str, what: &'static str },
    /// Flags that do not go together, or one that needs another; the sentence names them all.
    #[error("{message}")]
    Flags { flags: &'static [&'static str], message: String },
    /// A value of the DeepSpeed config (`--deepspeed`).
    #[error("--deepspeed {}: {reason}", path.display())]
    DsConfig { path: PathBuf, reason: String },
    /// The Slurm allocation's variables (`var`, as `NAME=value`), alone or against a flag.
    #[error("{message}")]
    Slurm { var: String, message: String },
    #[error("{path}: {message}")]
    Data { path: PathBuf, message: String },
    #[error("{path}:{line}: {message}")]
    Line { path: PathBuf, line: usize, message: String },
    #[error(transparent)]
    Io(#[from] zerotune_hf::PathIo),
    /// The operating system refused something that is no user's file.
    #[error("{what}: {source}")]
    Os { what: &'static str, source: std::io::Error },
    #[error("cannot start {program}: {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("cannot listen on {addr} (--master_port): {source}")]
    Listen { addr: String, source: std::io::Error },
    /// The tokenizers library failed at `what`.
    #[error("{what}: {message}")]
    Tokenizer { what: &'static str, message: String },
    #[error("{name} not found next to {}; build it (cargo build) or pass --worker_bin", exe.display())]
    MissingBinary { name: String, exe: PathBuf },
    #[error("--output_dir {} exists and is not empty; pass --overwrite_output_dir to train into it anyway", dir.display())]
    OutputNotEmpty { dir: PathBuf },
    #[error("--output_dir {}: another job is using it ({holder}, lock {}); wait for it to end, or choose another --output_dir", dir.display(), lock.display())]
    OutputLocked { dir: PathBuf, holder: String, lock: PathBuf },
    /// Fewer training blocks than one optimizer step takes.
    #[error(
        "{blocks} training blocks are fewer than one optimizer step needs: world {world} x micro {micro} x accumulation {accumulation} = {}; \
         lower --per_device_train_batch_size, --gradient_accumulation_steps or --block_size",
        world * micro * accumulation
    )]
    TooFewBlocks { blocks: usize, world: usize, micro: usize, accumulation: usize },
    /// The tokenizer has more ids than the model's embedding has rows.
    #[error("the tokenizer has {ids} ids but {from} gives the embedding only {rows} rows (vocab_size); use the model's own tokenizer")]
    VocabTooSmall { ids: usize, from: String, rows: usize },
    /// Every rank was on the hosts that stopped answering.
    #[error("no rank is left once the hosts that stopped answering ({lost}) are dropped")]
    NoRankLeft { lost: String },
    /// The ranks left cannot keep the global batch.
    #[error(
        "without {lost}, {world} rank(s) are left and cannot keep the global batch of {global} (micro {micro} x accumulation {accumulation} x world {old_world}): \
         it is not a multiple of micro {micro} x {world} ranks; continue by hand with --resume_from_checkpoint latest and a batch that fits"
    )]
    BatchDoesNotFit { lost: String, world: usize, global: usize, micro: usize, accumulation: usize, old_world: usize },
    /// A rank failed and the job cannot go on with the hosts left.
    #[error("{failure}; cannot restart: {source}")]
    NoRestart { failure: Box<CoordinatorError>, source: Box<CoordinatorError> },
    #[error("aborted on a second {signal}; the last complete checkpoint (`latest`) is kept")]
    Aborted { signal: Signal },
    /// A rank failed while the job was stopping as the user asked.
    #[error("{source} (while stopping on {signal})")]
    WhileStopping { signal: Signal, source: Box<CoordinatorError> },
    #[error("all workers disconnected before the run finished")]
    Disconnected,
    #[error(transparent)]
    Model(#[from] zerotune_hf::Error),
    /// Input documents that cannot be read; the message names the file and line.
    #[error(transparent)]
    Input(#[from] zerotune_data::DataError),
    /// `--resume_from_checkpoint latest` with no `latest` pointer to read.
    #[error("--resume_from_checkpoint latest: cannot read {}: {source} (no complete checkpoint yet?)", pointer.display())]
    NoLatest { pointer: PathBuf, source: std::io::Error },
    /// The checkpoint to resume from cannot be read or fails its manifest.
    #[error("--resume_from_checkpoint {}: {source}", dir.display())]
    BadCheckpoint { dir: PathBuf, source: Box<CoordinatorError> },
    /// A resume that would go backwards or change the data order.
    #[error("--resume_from_checkpoint {}: {reason}", dir.display())]
    Resume { dir: PathBuf, reason: crate::job::ResumeConflict },
    #[error("worker rank {rank} ({host}) failed: {message}")]
    Worker { rank: u32, host: String, message: String },
    /// srun, the one process that runs every rank, ended before the run did.
    #[error("srun (every rank) exited ({status}) before the run finished")]
    SrunExited { status: crate::events::ExitStatus },
    /// The completion evaluation at the end of --do_eval could not start, or failed.
    #[error("the completion evaluation ({} eval) {failure}; the trained model in {} is complete", worker.display(), output_dir.display())]
    CompletionEval { worker: PathBuf, output_dir: PathBuf, failure: EvalFailure },
    /// The GPU's precision rule refuses the asked precision.
    #[error("{gpu}: --bf16: {refusal}; train in fp32 (drop --bf16) or --fp16")]
    Precision { gpu: String, refusal: zerotune_proto::precision::NoBf16 },
    /// The memory planner finds the job too large: its table, why, and what to pass instead.
    #[error("{table}memory planner: {refusal} ({hint})")]
    Memory { table: String, refusal: Box<crate::estimate::Refusal>, hint: &'static str },
}

pub type Result<T> = std::result::Result<T, CoordinatorError>;

impl CoordinatorError {
    /// `flag value: reason`.
    pub(crate) fn flag(flag: &'static str, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Self::Flag { flag, value: value.to_string(), reason: reason.into() }
    }

    /// Flags that do not go together (or one that needs another), said in `message`.
    pub(crate) fn flags(flags: &'static [&'static str], message: impl Into<String>) -> Self {
        Self::Flags { flags, message: message.into() }
    }
}

/// A value shown after its flag: " value", or nothing.
fn spaced(value: &str) -> String {
    if value.is_empty() {
        String::new()
    } else {
        format!(" {value}")
    }
}

pub(crate) use zerotune_hf::io_err;

/// The file `flag` names could not be read.
pub(crate) fn flag_file_err(flag: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CoordinatorError {
    let path = path.into();
    move |source| CoordinatorError::FlagFile { flag, path, source }
}

/// What the OS refused, when it is not a user's file.
pub(crate) fn os_err(what: &'static str) -> impl FnOnce(std::io::Error) -> CoordinatorError {
    move |source| CoordinatorError::Os { what, source }
}

/// How the completion evaluation's worker process failed.
#[derive(Debug, thiserror::Error)]
pub enum EvalFailure {
    #[error("cannot start: {0}")]
    Start(#[source] std::io::Error),
    #[error("could not be waited for: {0}")]
    Wait(#[source] std::io::Error),
    #[error("failed ({0})")]
    Exited(std::process::ExitStatus),
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;
    use crate::events::ExitStatus;

    #[test]
    fn launcher_and_evaluation_failures_say_what_ended_and_what_is_safe() {
        let srun = CoordinatorError::SrunExited { status: ExitStatus::Code(1) };
        assert_eq!(srun.to_string(), "srun (every rank) exited (exit status 1) before the run finished");
        let (worker, output_dir) = (PathBuf::from("/opt/worker"), PathBuf::from("out"));
        let failed =
            CoordinatorError::CompletionEval { worker, output_dir, failure: EvalFailure::Exited(std::process::ExitStatus::from_raw(256)) };
        assert_eq!(
            failed.to_string(),
            "the completion evaluation (/opt/worker eval) failed (exit status: 1); the trained model in out is complete"
        );
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        let unstarted =
            CoordinatorError::CompletionEval { worker: "w".into(), output_dir: "o".into(), failure: EvalFailure::Start(missing) };
        assert!(
            matches!(&unstarted, CoordinatorError::CompletionEval { failure: EvalFailure::Start(e), .. } if e.kind() == std::io::ErrorKind::NotFound)
        );
        assert!(unstarted.to_string().starts_with("the completion evaluation (w eval) cannot start: "), "{unstarted}");
    }
}
