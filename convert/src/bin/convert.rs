//! `convert`: a CodeGen checkpoint -> HF GPT-J, FasterTransformer GPT-J, or a FauxPilot model dir.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use zerotune_convert::ft;
use zerotune_convert::output::Staged;
use zerotune_convert::source::{parse_dtype, Source};
use zerotune_convert::{gptj, triton};
use zerotune_hf::manifest::NonFinite;

#[derive(Parser)]
#[command(version, about = "zerotune convert: CodeGen -> GPT-J, FasterTransformer and Triton/FauxPilot")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Convert weights holding NaN or infinite values (refused by default, naming the tensor).
    #[arg(long = "allow_nonfinite", alias = "allow-nonfinite", global = true)]
    allow_nonfinite: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Write an HF GPT-J checkpoint that GPTJForCausalLM loads.
    Gptj {
        /// CodeGen directory (HF layout, or a zerotune checkpoint-<step>/).
        input: PathBuf,
        /// Output directory (must not exist, or pass --force).
        output: PathBuf,
        /// fp32, fp16 or bf16 (default: the source's precision).
        #[arg(long)]
        dtype: Option<String>,
        /// Replace an existing output directory.
        #[arg(long)]
        force: bool,
    },
    /// Write FasterTransformer GPT-J weights into OUTPUT/<N>-gpu/.
    Fastertransformer {
        /// CodeGen directory (HF layout, or a zerotune checkpoint-<step>/).
        input: PathBuf,
        /// The directory that gets <N>-gpu/.
        output: PathBuf,
        /// Tensor-parallel degree N (1, 2, 4 or 8).
        #[arg(long, default_value_t = 1)]
        tp: usize,
        /// fp32 (FauxPilot's FT reads only fp32) or fp16.
        #[arg(long, default_value = "fp32")]
        dtype: String,
        /// Replace an existing <N>-gpu/ directory.
        #[arg(long)]
        force: bool,
    },
    /// Write the complete FauxPilot model dir <store>/<name>-<N>gpu/ and its .env lines.
    #[command(rename_all = "snake_case")]
    Triton {
        /// CodeGen directory (HF layout, or a zerotune checkpoint-<step>/).
        #[arg(required_unless_present = "hf_model_dir", conflicts_with = "hf_model_dir")]
        input: Option<PathBuf>,
        /// The same as INPUT, under the name FauxPilot's triton_config_gen.py gives it.
        #[arg(long, alias = "hf-model-dir")]
        hf_model_dir: Option<PathBuf>,
        /// FauxPilot's models directory.
        #[arg(long, alias = "model-store")]
        model_store: PathBuf,
        /// Tensor-parallel degree N = number of GPUs (1, 2, 4 or 8).
        #[arg(long, default_value_t = 1)]
        tp: usize,
        /// Model name (default: the input directory's name).
        #[arg(long)]
        name: Option<String>,
        /// Where the model dir is mounted in the Triton container, e.g. /model.
        #[arg(long)]
        rebase: Option<String>,
        /// fp32 (FauxPilot's FT reads only fp32) or fp16.
        #[arg(long, default_value = "fp32")]
        dtype: String,
        /// Replace an existing <name>-<N>gpu/ directory.
        #[arg(long)]
        force: bool,
    },
}

fn main() {
    zerotune_log::init(zerotune_log::LogFormat::Text, &[]);
    if let Err(err) = run(Cli::parse()) {
        eprintln!("convert: error: {}", zerotune_hf::os::error_report(err.as_ref()));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let nonfinite = if cli.allow_nonfinite { NonFinite::Allow } else { NonFinite::Refuse };
    match cli.command {
        Command::Gptj { input, output, dtype, force } => {
            let source = Source::open(&input, nonfinite)?;
            let dtype = match dtype {
                Some(name) => parse_dtype(&name)?,
                None => source.dtype(),
            };
            let staged = Staged::new(&output, force, &input)?;
            gptj::convert(&source, staged.path(), dtype)?;
            staged.commit()?;
            println!("{} -> {} (GPT-J, {})", input.display(), output.display(), dtype.torch_name());
        }
        Command::Fastertransformer { input, output, tp, dtype, force } => {
            let (source, model) = ft::open_planned(&input, nonfinite, tp, parse_dtype(&dtype)?)?;
            let target = output.join(format!("{tp}-gpu"));
            let staged = Staged::new(&target, force, &input)?;
            ft::write(&source, &model, staged.path(), &target)?;
            staged.commit()?;
            println!("{} -> {} (FasterTransformer GPT-J, tp {tp}, {})", input.display(), target.display(), model.weight_data_type());
        }
        Command::Triton { input, hf_model_dir, model_store, tp, name, rebase, dtype, force } => {
            let input = input.or(hf_model_dir).expect("clap requires one of INPUT and --hf_model_dir");
            let (source, model) = ft::open_planned(&input, nonfinite, tp, parse_dtype(&dtype)?)?;
            let name = name.unwrap_or_else(|| triton::default_name(&input));
            let written = triton::write_model_dir(&source, &model, &model_store, &name, rebase.as_deref(), force)?;
            println!(
                "{} -> {} (FauxPilot model '{name}', {tp} GPU(s), {} weights)",
                input.display(),
                written.model_dir.display(),
                model.weight_data_type()
            );
            println!("FauxPilot .env (also written to {}):\n{}", written.env_path.display(), written.env);
        }
    }
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
