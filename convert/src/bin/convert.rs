//! `convert`: a CodeGen checkpoint -> HF GPT-J (FasterTransformer and Triton outputs: issue 3).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use zerotune_convert::source::{parse_dtype, Source};
use zerotune_convert::{gptj, ConvertError};

#[derive(Parser)]
#[command(version, about = "zerotune convert: CodeGen -> GPT-J for FauxPilot")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
        /// Write into an existing output directory.
        #[arg(long)]
        force: bool,
    },
}

fn main() {
    if let Err(err) = run(Cli::parse()) {
        eprintln!("convert: error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Gptj { input, output, dtype, force } => {
            let source = Source::open(&input)?;
            let dtype = match dtype {
                Some(name) => parse_dtype(&name)?,
                None => source.dtype(),
            };
            prepare_output(&output, force)?;
            gptj::convert(&source, &output, dtype)?;
            println!("{} -> {} (GPT-J, {})", input.display(), output.display(), dtype.torch_name());
            Ok(())
        }
    }
}

fn prepare_output(dir: &std::path::Path, force: bool) -> anyhow::Result<()> {
    if dir.exists() && !force {
        return Err(ConvertError::Invalid(format!("{} already exists; pass --force to write into it", dir.display())).into());
    }
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    Ok(())
}
