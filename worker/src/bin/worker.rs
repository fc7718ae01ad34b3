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
use zerotune_worker::generate::{self, GenerateArgs, Loaded, Precision};
use zerotune_worker::precision::{self, Dtype};
use zerotune_worker::sample::SamplingParams;
use zerotune_worker::serve::{self, ServeOptions};

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
        /// A zerotune output dir, a checkpoint-<step>/ or an HF CodeGen dir.
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
    #[command(rename_all = "snake_case")]
    Serve {
        /// A zerotune output dir, a checkpoint-<step>/ or an HF CodeGen dir.
        #[arg(long)]
        model: PathBuf,
        /// The address to listen on (loopback unless told otherwise).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// 0 picks a free port.
        #[arg(long, default_value_t = 5000)]
        port: u16,
        /// cpu, cuda, cuda:N or auto.
        #[arg(long, default_value = "auto")]
        device: String,
        #[command(flatten)]
        dtype: DtypeArgs,
        /// Require `Authorization: Bearer KEY` (also read from ZEROTUNE_API_KEY).
        #[arg(long, env = "ZEROTUNE_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Sequences generating together.
        #[arg(long, default_value_t = 8)]
        max_batch: usize,
        /// Requests waiting for room in the batch before new ones get 429.
        #[arg(long, default_value_t = 64)]
        max_queue: usize,
        /// CPU threads for the model (default: torch's choice).
        #[arg(long)]
        threads: Option<i32>,
        /// The name `GET /v1/models` lists (default: the model directory's name).
        #[arg(long)]
        model_name: Option<String>,
        /// Tokens of recent prompts whose keys and values are kept, so that a prompt beginning like
        /// one of them (an editor's next request) prefills only the rest; 0 keeps none, and gives
        /// every prompt a lone run's exact logits.
        #[arg(long, default_value_t = 4096)]
        prefix_cache_tokens: usize,
    },
}

/// `worker eval`'s flags.
#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
struct EvalArgs {
    /// The model to evaluate: a zerotune output dir, a checkpoint-<step>/ or an HF CodeGen dir.
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

/// `--dtype` and its shorthand `--fp16` (generate, eval, serve).
#[derive(clap::Args)]
struct DtypeArgs {
    /// What the model computes in: auto (fp32 on the CPU and on GPUs below compute capability 7.0
    /// such as the P40, fp16 on 7.x such as the V100 and T4, bf16 from 8.0), fp32, bf16 or fp16.
    #[arg(long, value_enum, default_value = "auto")]
    dtype: Dtype,
    /// Shorthand for --dtype fp16.
    #[arg(long, conflicts_with = "dtype")]
    fp16: bool,
}

impl DtypeArgs {
    /// The precision on `device`; a note on why, when the GPU's age decided it, goes to stderr.
    fn resolve(&self, device: tch::Device) -> anyhow::Result<Precision> {
        let dtype = if self.fp16 { Dtype::Fp16 } else { self.dtype };
        let capability = match device {
            tch::Device::Cuda(index) => device::compute_capability(index),
            _ => None,
        };
        let (precision, note) = precision::resolve(dtype, device, capability).map_err(anyhow::Error::msg)?;
        if let Some(note) = note {
            eprintln!("worker: {note}");
        }
        Ok(precision)
    }
}

fn main() {
    if let Err(err) = run(Cli::parse()) {
        eprintln!("worker: error: {}", zerotune_hf::os::error_report(err.as_ref()));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
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
            let precision = dtype.resolve(device)?;
            let params = SamplingParams { temperature, top_k, top_p, ..Default::default() };
            Ok(generate::run(GenerateArgs { model, prompt, max_new_tokens, params, seed, device, precision, json, nonfinite })?)
        }
        Command::Eval(args) => {
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
                precision: args.dtype.resolve(device)?,
                nonfinite,
            };
            let report = eval::run(&options)?;
            println!("{}", report.table());
            eprintln!("wrote completion_eval.json and predictions.jsonl to {}", options.output_dir.display());
            Ok(())
        }
        Command::Serve {
            model,
            host,
            port,
            device: spec,
            dtype,
            api_key,
            max_batch,
            max_queue,
            threads,
            model_name,
            prefix_cache_tokens,
        } => {
            if let Some(threads) = threads {
                tch::set_num_threads(threads);
            }
            let device = device::parse(&spec)?;
            let precision = dtype.resolve(device)?;
            let loaded = Loaded::open(&model, device, precision, nonfinite)?;
            let model_name = model_name.unwrap_or_else(|| {
                let dir = model.canonicalize().unwrap_or(model.clone());
                dir.file_name().map_or("codegen".into(), |n| n.to_string_lossy().into_owned())
            });
            let options = ServeOptions { api_key, max_batch, max_queue, model_name, prefix_cache_tokens };
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            let listener = runtime
                .block_on(tokio::net::TcpListener::bind((host.as_str(), port)))
                .with_context(|| format!("cannot listen on {host}:{port} (--host, --port)"))?;
            eprintln!(
                "serving {} ({} parameters, {precision:?} on {device:?}, context {}) at http://{}/v1 (max batch {max_batch}, queue {max_queue})",
                loaded.dir.display(),
                loaded.config.num_parameters(),
                loaded.config.n_positions,
                listener.local_addr()?,
            );
            serve::run(&runtime, listener, loaded, options, shutdown_signal()).context("the HTTP server failed")?;
            eprintln!("worker: stopped");
            Ok(())
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT: the server then finishes what is in flight.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    eprintln!("worker: {name}: no new requests; finishing the ones in flight");
}
