//! `coordinator`: `train` runs a fine-tuning job (after its memory plan, which `estimate` prints alone); `files2jsonl` turns a source tree into JSON Lines.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use zerotune_coordinator::config::{DataArgs, Device, Purpose, TrainArgs, TrainPlan};
use zerotune_coordinator::{gpu, job, prepare};
use zerotune_data::files2jsonl::{self, Filter};
use zerotune_proto::plan::Precision;

#[derive(Parser)]
#[command(
    version,
    about = "zerotune coordinator: fine-tune a code model (CodeGen, Qwen2.5-Coder, DeepSeek-Coder, CodeLlama, StarCoder2) on your code"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune (or train from scratch) with run_clm.py / HF Trainer flags.
    Train(Box<TrainArgs>),
    /// The memory plan of a `train` command line (the same flags): bytes per GPU and per host,
    /// term by term, whether it fits, and if not what would. From any machine: --gpu_model MODEL
    /// or --gpu_memory SIZE plans for another one, --num_gpus / --num_nodes its ranks; no
    /// --train_file, --output_dir, tokenizer, GPU or hostfile is needed.
    #[command(mut_arg("train_file", |a| a.required(false)), mut_arg("output_dir", |a| a.required(false)))]
    Estimate(Box<TrainArgs>),
    /// Prepare the token cache a `train` run with the same data flags would use, and stop.
    Tokenize(TokenizeArgs),
    /// Write OUTPUT_DIR/report.html for a run directory (finished, stopped, running or resumed).
    Report {
        /// The run's --output_dir.
        output_dir: PathBuf,
    },
    /// Turn a source directory into JSON Lines of {"text", "url"}.
    #[command(rename_all = "snake_case")]
    Files2jsonl {
        /// Root of the source tree.
        source: PathBuf,
        /// Output .jsonl file.
        output: PathBuf,
        /// Keep only these extensions (comma separated, e.g. rs,py).
        #[arg(long, value_delimiter = ',')]
        extensions: Vec<String>,
        /// Skip paths matching this glob (repeatable).
        #[arg(long)]
        exclude: Vec<String>,
        /// Skip files larger than this many bytes.
        #[arg(long, default_value_t = 1_000_000)]
        max_file_bytes: u64,
        #[command(flatten)]
        hygiene: zerotune_data::HygieneArgs,
    },
}

fn main() {
    zerotune_log::init(zerotune_log::LogFormat::Text, &[]);
    let result = match Cli::parse().command {
        Command::Train(args) => train(*args),
        Command::Estimate(args) => estimate(*args),
        Command::Tokenize(args) => tokenize(&args),
        Command::Report { output_dir } => {
            zerotune_coordinator::report::write(&output_dir).map(|path| println!("{}", path.display())).map_err(Into::into)
        }
        Command::Files2jsonl { source, output, extensions, exclude, max_file_bytes, hygiene } => {
            files2jsonl(&source, &output, Filter::new(max_file_bytes, &extensions, &exclude), &hygiene)
        }
    };
    if let Err(err) = result {
        eprintln!("coordinator: error: {}", zerotune_hf::os::error_report(err.as_ref()));
        std::process::exit(1);
    }
}

/// The validated plan with the GPU's precision rule applied and its memory plan checked (printed
/// to stderr): a job that cannot fit is refused here, before any worker starts.
fn checked_plan(args: &TrainArgs, purpose: Purpose) -> anyhow::Result<(TrainPlan, String)> {
    let mut plan = TrainPlan::resolve_for(args, purpose)?;
    let gpus = if plan.launch.device == Device::Cpu { vec![] } else { gpu::query() };
    let t = &args.training;
    let explicit = t.fp16 == Some(true) || t.bf16 == Some(true) || (t.deepspeed.is_some() && plan.training.precision != Precision::Fp32);
    for note in gpu::adapt_precision(&mut plan, &gpus, if explicit { gpu::Chosen::Explicit } else { gpu::Chosen::Default })? {
        eprintln!("{note}");
    }
    let table = gpu::check_memory(&plan, &gpus)?;
    Ok((plan, table))
}

fn estimate(mut args: TrainArgs) -> anyhow::Result<()> {
    args.training.do_train = true;
    let (_, table) = checked_plan(&args, Purpose::Estimate)?;
    print!("{table}");
    Ok(())
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    let (plan, table) = checked_plan(&args, Purpose::Train)?;
    eprint!("{table}");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let outcome = runtime.block_on(job::run(plan))?;
    if let Some(signal) = outcome.stopped_on {
        eprintln!(
            "stopped on {signal} after checkpoint-{} in {}; continue with --resume_from_checkpoint latest",
            outcome.steps,
            outcome.output_dir.display()
        );
        std::process::exit(128 + signal.number()); // as if killed by it
    }
    match (outcome.eval_loss, outcome.perplexity) {
        (Some(loss), Some(ppl)) => {
            println!("done: {} steps, eval loss {loss:.4}, perplexity {ppl:.2}; model in {}", outcome.steps, outcome.output_dir.display())
        }
        _ => println!("done: {} steps; model in {}", outcome.steps, outcome.output_dir.display()),
    }
    Ok(())
}

/// `coordinator tokenize`: the data flags of `train` (the same names, the same source filters).
#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
struct TokenizeArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Directory holding tokenizer.json or vocab.json + merges.txt.
    #[arg(long)]
    tokenizer_name: PathBuf,
    /// The seed of the validation split (train's --seed).
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn tokenize(args: &TokenizeArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let data = args.data.plan()?;
    let Some(block_size) = data.block_size else {
        anyhow::bail!("--block_size is required: train's default, min(1024, n_positions), needs the model's config");
    };
    let tokenizer_dir = &args.tokenizer_name;
    let tok = zerotune_hf::tokenizer::load(tokenizer_dir)?;
    let eos = zerotune_hf::tokenizer::eos_for(&tok, None, &zerotune_hf::tokenizer::file_in(tokenizer_dir))?;
    let mut prepared = prepare::run_pipeline(&data, args.seed)?;
    prepare::check_enough(&data.train_file, &prepared.train, block_size)?;
    let (cache, _) = prepare::tokenize_cached(&mut prepared, &tok, eos, block_size, tok.get_vocab_size(true), &data.cache_dir)?;
    let report_path = cache.path.with_extension("data_report.json");
    prepared.report.write(&report_path)?;
    let bytes: usize = prepared.train.iter().chain(&prepared.validation).map(|d| d.text.len()).sum();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}: {} bytes -> {} train / {} validation blocks of {block_size} in {secs:.2}s ({:.1} MB/s) -> {} (report {})",
        data.train_file.display(),
        bytes,
        cache.train_blocks,
        cache.validation_blocks,
        bytes as f64 / secs / 1e6,
        cache.path.display(),
        report_path.display()
    );
    Ok(())
}

fn files2jsonl(
    source: &std::path::Path,
    output: &std::path::Path,
    filter: zerotune_data::Result<Filter>,
    hygiene: &zerotune_data::HygieneArgs,
) -> anyhow::Result<()> {
    let (docs, report) = zerotune_data::pipeline::run_tree(source, &filter?, &hygiene.hygiene()?)?;
    let files: Vec<files2jsonl::SourceFile> =
        docs.into_iter().map(|d| files2jsonl::SourceFile { text: d.text, url: d.url.unwrap_or_default() }).collect();
    files2jsonl::write_jsonl(&files, output)?;
    println!("{}\n{}: {} documents -> {}", report.summary(), source.display(), files.len(), output.display());
    Ok(())
}
