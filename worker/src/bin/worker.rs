//! `worker`: a training rank launched by the coordinator (`worker run`), text generation from a
//! saved model (`worker generate`), its evaluation on held-out code (`worker eval`), or a
//! completions server on it (`worker serve`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use zerotune_hf::manifest::NonFinite;
use zerotune_worker::agent::{self, AgentArgs};
use zerotune_worker::device;
use zerotune_worker::eval::{self, EvalOptions};
use zerotune_worker::generate::{self, GenerateArgs, Precision};
use zerotune_worker::precision::DtypeArgs;
use zerotune_worker::sample::SamplingParams;
use zerotune_worker::serve::{self, ServeArgs};

#[derive(Parser)]
#[command(version, about = "zerotune worker: one training rank, text generation, or a completions server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// generate, eval, serve: load weights holding NaN or infinite values (refused by default,
    /// naming the tensor).
    #[arg(long = "allow_nonfinite", alias = "allow-nonfinite", global = true)]
    allow_nonfinite: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Join a job: register with the coordinator and execute its commands.
    #[command(rename_all = "snake_case")]
    Run {
        /// Coordinator address, e.g. http://127.0.0.1:50051.
        #[arg(long)]
        coordinator: String,
        /// This worker's global rank (RANK from the launcher).
        #[arg(long, env = "RANK", default_value_t = 0)]
        rank: u32,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Complete a prompt with a saved model (greedy unless --temperature > 0).
    #[command(rename_all = "snake_case")]
    Generate {
        /// A zerotune output dir, a checkpoint-<step>/ or an HF model dir (CodeGen, Llama, Qwen2, StarCoder2).
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        temperature: f64,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// cpu, cuda, cuda:N or auto.
        #[arg(long, default_value = "cpu")]
        device: String,
        #[command(flatten)]
        dtype: DtypeArgs,
        /// Print {"prompt_ids", "new_ids", "completion", "finish_reason"} as JSON instead of the text.
        #[arg(long)]
        json: bool,
    },
    /// Next-line completion on held-out code, the fine-tuned model against its base.
    Eval(Box<EvalArgs>),
    /// Serve completions over HTTP: the FauxPilot / OpenAI API, continuously batched.
    Serve(Box<ServeArgs>),
}

/// `worker eval`'s flags.
#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
struct EvalArgs {
    /// The model to evaluate: a zerotune output dir, a checkpoint-<step>/ or an HF model dir (CodeGen, Llama, Qwen2, StarCoder2).
    #[arg(long)]
    model: PathBuf,
    /// The model it started from, evaluated on the same positions (its tokenizer must be the same).
    #[arg(long)]
    base: Option<PathBuf>,
    /// Held-out data, read like training data (.jsonl/.json/.csv/.txt or a source dir; - reads JSON Lines from stdin).
    #[arg(long)]
    validation_file: PathBuf,
    #[command(flatten)]
    source: zerotune_data::SourceArgs,
    /// Where completion_eval.json and predictions.jsonl go.
    #[arg(long)]
    output_dir: PathBuf,
    /// Lines to predict, drawn round-robin across documents.
    #[arg(long, default_value_t = 200)]
    num_positions: usize,
    /// Prompt tokens before each line, at most (and at most n_positions - max_new_tokens).
    #[arg(long, default_value_t = 1024)]
    context_tokens: usize,
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    /// Tokens per block of the held-out loss (default: min(1024, n_positions)).
    #[arg(long)]
    block_size: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Positions decoding together.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    #[command(flatten)]
    dtype: DtypeArgs,
}

/// The precision `dtype` means on `device`; a note on why, when the GPU's age decided it, goes to
/// the log.
fn precision_on(dtype: &DtypeArgs, device: tch::Device) -> anyhow::Result<Precision> {
    let (precision, note) = dtype.resolve(device)?;
    match note {
        // The library's target: shown as our own lines, whatever the binary's crate is called.
        Some(note) if note.is_warning() => tracing::warn!(target: "zerotune_worker", "{note}"),
        Some(note) => tracing::info!(target: "zerotune_worker", "{note}"),
        None => {}
    }
    Ok(precision)
}

fn main() {
    if let Err(err) = run(Cli::parse()) {
        eprintln!("worker: error: {}", zerotune_hf::os::error_report(err.as_ref()));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if !matches!(cli.command, Command::Serve(_)) {
        zerotune_log::init(zerotune_log::LogFormat::Text, &[]); // serve's own flags say how its log reads
    }
    let nonfinite = if cli.allow_nonfinite { NonFinite::Allow } else { NonFinite::Refuse };
    match cli.command {
        Command::Run { coordinator, rank, device: spec } => {
            let secret = std::env::var(zerotune_proto::SECRET_ENV)
                .with_context(|| format!("{} is not set: workers are started by `coordinator train`", zerotune_proto::SECRET_ENV))?;
            let device = device::parse(&spec)?;
            agent::run(AgentArgs { coordinator, secret, rank, device, device_name: spec })
        }
        Command::Generate { model, prompt, max_new_tokens, temperature, top_k, top_p, seed, device: spec, dtype, json } => {
            let device = device::parse(&spec)?;
            let precision = precision_on(&dtype, device)?;
            let params = SamplingParams { temperature, top_k, top_p, ..Default::default() };
            Ok(generate::run(GenerateArgs { model, prompt, max_new_tokens, params, seed, device, precision, json, nonfinite })?)
        }
        Command::Eval(args) => run_eval(*args, nonfinite),
        Command::Serve(args) => Ok(serve::main(*args, nonfinite)?),
    }
}

/// `worker eval`: the table on stdout, where the files went on stderr.
fn run_eval(args: EvalArgs, nonfinite: NonFinite) -> anyhow::Result<()> {
    let device = device::parse(&args.device)?;
    let options = EvalOptions {
        model: args.model,
        base: args.base,
        validation: args.validation_file,
        text_column: args.source.text_column_name.clone(),
        filter: args.source.filter()?,
        output_dir: args.output_dir,
        num_positions: args.num_positions,
        context_tokens: args.context_tokens,
        max_new_tokens: args.max_new_tokens,
        block_size: args.block_size,
        seed: args.seed,
        batch: args.max_batch,
        device,
        precision: precision_on(&args.dtype, device)?,
        nonfinite,
    };
    let report = eval::run(&options)?;
    println!("{}", report.table());
    eprintln!("wrote completion_eval.json and predictions.jsonl to {}", options.output_dir.display());
    Ok(())
}
