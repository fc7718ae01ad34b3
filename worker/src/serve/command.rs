//! `worker serve` itself: its flags, then the log, the model on its device, the runtime and the
//! listener, the startup line (the address scripts wait for), the server until SIGTERM or SIGINT,
//! and the line that says it stopped.

use std::path::{Path, PathBuf};
use zerotune_data::fim::{FimEncoder, FimFormat};

use tch::Device;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use zerotune_hf::manifest::NonFinite;

use super::log::{self, LogFormat, LIFECYCLE};
use super::{run, ServeOptions};
use crate::error::{Result, WorkerError};
use crate::generate::{Loaded, Precision};
use crate::precision::DtypeArgs;

/// `worker serve`'s flags.
#[derive(clap::Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct ServeArgs {
    /// A zerotune output dir, a checkpoint-<step>/ or an HF model dir (CodeGen, Llama, Qwen2, StarCoder2).
    #[arg(long)]
    pub model: PathBuf,
    /// The address to listen on (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port.
    #[arg(long, default_value_t = 5000)]
    pub port: u16,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[command(flatten)]
    pub dtype: DtypeArgs,
    /// Require `Authorization: Bearer KEY` (also read from ZEROTUNE_API_KEY).
    #[arg(long, env = "ZEROTUNE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Sequences generating together.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Requests waiting for room in the batch before new ones get 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// CPU threads for the model (default: torch's choice).
    #[arg(long)]
    pub threads: Option<i32>,
    /// The name `GET /v1/models` lists (default: the model directory's name).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Tokens of recent prompts whose keys and values are kept, so that a prompt beginning like
    /// one of them (an editor's next request) prefills only the rest; 0 keeps none, and gives
    /// every prompt a lone run's exact logits.
    #[arg(long, default_value_t = 4096)]
    pub prefix_cache_tokens: usize,
    /// How the log on stderr reads: text (each line as a person reads it) or json (one object
    /// per line, with its fields). RUST_LOG filters it (default info).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// The fill-in-the-middle format prompts with a `suffix` are rendered in: qwen, starcoder,
    /// deepseek, codellama or codegen2. Default: the one the tokenizer's special tokens hold;
    /// a model with none is served prefix-only.
    #[arg(long, value_parser = FimFormat::from_name)]
    pub fim_format: Option<FimFormat>,
}

/// `worker serve`: serves the model until SIGTERM or SIGINT, then finishes the requests in
/// flight and returns. `nonfinite` says whether weights holding NaN or infinity load.
pub fn main(args: ServeArgs, nonfinite: NonFinite) -> Result<()> {
    log::init(args.log_format);
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads);
    }
    let device = crate::device::parse(&args.device)?;
    let (loaded, precision) = open_model(&args, device, nonfinite)?;
    let fim_format = FimEncoder::new(&loaded.tokenizer, args.fim_format)?.map(|e| e.format);
    let options = ServeOptions {
        fim_format,
        api_key: args.api_key.clone(),
        max_batch: args.max_batch,
        max_queue: args.max_queue,
        model_name: args.model_name.clone().unwrap_or_else(|| model_name(&args.model)),
        prefix_cache_tokens: args.prefix_cache_tokens,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(WorkerError::Os)?;
    let listener = bind(&runtime, &args.host, args.port)?;
    announce(&loaded, precision, device, &listener, &options)?;
    run(&runtime, listener, loaded, options, shutdown_signal()).map_err(|source| WorkerError::Server { source })?;
    tracing::info!(target: LIFECYCLE, "worker: stopped");
    Ok(())
}

/// The model at the precision `--dtype` means on `device` (a note on why, when the GPU's age
/// decided it, goes to the log), verified or scanned for non-finite weights.
fn open_model(args: &ServeArgs, device: Device, nonfinite: NonFinite) -> Result<(Loaded, Precision)> {
    let (precision, note) = args.dtype.resolve(device)?;
    match note {
        Some(note) if note.is_warning() => tracing::warn!("{note}"),
        Some(note) => tracing::info!("{note}"),
        None => {}
    }
    Ok((Loaded::open(&args.model, device, precision, nonfinite)?, precision))
}

/// The name `GET /v1/models` lists by default: the model directory's.
fn model_name(model: &Path) -> String {
    let dir = model.canonicalize().unwrap_or(model.to_path_buf());
    dir.file_name().map_or("codegen".into(), |n| n.to_string_lossy().into_owned())
}

/// Listens on `host:port` (`--port 0`: a free port).
fn bind(runtime: &Runtime, host: &str, port: u16) -> Result<TcpListener> {
    runtime.block_on(TcpListener::bind((host, port))).map_err(|source| WorkerError::Listen { addr: format!("{host}:{port}"), source })
}

/// The startup line: what is served, how, and where (`... at http://ADDR/v1 ...`, which scripts
/// and tests read the address from).
fn announce(loaded: &Loaded, precision: Precision, device: Device, listener: &TcpListener, options: &ServeOptions) -> Result<()> {
    let addr = listener.local_addr().map_err(WorkerError::Os)?;
    let (parameters, context) = (loaded.config.num_parameters(), loaded.config.context());
    let (max_batch, max_queue) = (options.max_batch, options.max_queue);
    // The prefix cache holds keys and values of the model's key/value heads only.
    let value_bytes = crate::dtype::precision_kind(precision).elt_size_in_bytes();
    let prefix_cache_mib = loaded.config.kv_values_per_token() * value_bytes * options.prefix_cache_tokens / (1 << 20);
    let prefix_cache_tokens = options.prefix_cache_tokens;
    tracing::info!(
        target: LIFECYCLE,
        model = %loaded.dir.display(),
        parameters,
        precision = ?precision,
        device = ?device,
        context,
        %addr,
        max_batch,
        max_queue,
        prefix_cache_tokens,
        prefix_cache_mib,
        "serving {} ({parameters} parameters, {precision:?} on {device:?}, context {context}) at http://{addr}/v1 (max batch {max_batch}, queue {max_queue}, prefix cache {prefix_cache_tokens} tokens = {prefix_cache_mib} MiB)",
        loaded.dir.display(),
    );
    match options.fim_format {
        Some(format) => {
            tracing::info!(target: LIFECYCLE, fim_format = %format, "infilling: a prompt with a suffix, or rendered in any family's FIM format, is rendered in the {format} format ({})", format.spec().models)
        }
        None => {
            tracing::info!(target: LIFECYCLE, "prefix-only: the tokenizer has no fill-in-the-middle tokens, so a request's suffix is not used")
        }
    }
    Ok(())
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
    tracing::info!(target: LIFECYCLE, signal = name, "worker: {name}: no new requests; finishing the ones in flight");
}
