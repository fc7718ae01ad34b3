//! `coordinator`: `train` runs a fine-tuning job; `files2jsonl` turns a source tree into JSON Lines.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use zerotune_coordinator::config::{TrainArgs, TrainPlan};
use zerotune_coordinator::files2jsonl::{self, Filter};
use zerotune_coordinator::job;

#[derive(Parser)]
#[command(version, about = "zerotune coordinator: fine-tune CodeGen on your code")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune (or train from scratch) with run_clm.py / HF Trainer flags.
    Train(Box<TrainArgs>),
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
    },
}

fn main() {
    let result = match Cli::parse().command {
        Command::Train(args) => train(*args),
        Command::Files2jsonl { source, output, extensions, exclude, max_file_bytes } => {
            files2jsonl(&source, &output, Filter::new(max_file_bytes, &extensions, &exclude))
        }
    };
    if let Err(err) = result {
        eprintln!("coordinator: error: {err:#}");
        std::process::exit(1);
    }
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    let plan = TrainPlan::resolve(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let outcome = runtime.block_on(job::run(plan))?;
    match (outcome.eval_loss, outcome.perplexity) {
        (Some(loss), Some(ppl)) => println!("done: {} steps, eval loss {loss:.4}, perplexity {ppl:.2}; model in {}", outcome.steps, outcome.output_dir.display()),
        _ => println!("done: {} steps; model in {}", outcome.steps, outcome.output_dir.display()),
    }
    Ok(())
}

fn files2jsonl(source: &std::path::Path, output: &std::path::Path, filter: zerotune_coordinator::Result<Filter>) -> anyhow::Result<()> {
    let collected = files2jsonl::collect(source, &filter?)?;
    files2jsonl::write_jsonl(&collected.files, output)?;
    println!("{}: {} -> {}", source.display(), collected.summary(), output.display());
    Ok(())
}
