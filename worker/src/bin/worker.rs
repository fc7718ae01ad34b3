//! `worker`: a training rank launched by the coordinator (`worker run`), or text generation from a
//! saved model (`worker generate`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use zerotune_proto::plan::ModelSource;
use zerotune_worker::agent::{self, AgentArgs};
use zerotune_worker::generate::{generate, Sampling};
use zerotune_worker::model::CodeGen;
use zerotune_worker::{device, train};

#[derive(Parser)]
#[command(version, about = "zerotune worker: one training rank, or text generation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
        /// HF-layout model directory (config.json, weights, tokenizer files).
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 0)]
        top_k: i64,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Print {"prompt_ids", "new_ids", "completion"} as JSON instead of the text.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    if let Err(err) = run(Cli::parse()) {
        eprintln!("worker: error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { coordinator, rank, device: spec } => {
            let secret = std::env::var(zerotune_proto::SECRET_ENV)
                .with_context(|| format!("{} is not set: workers are started by `coordinator train`", zerotune_proto::SECRET_ENV))?;
            let device = device::parse(&spec)?;
            agent::run(AgentArgs { coordinator, secret, rank, device, device_name: spec })
        }
        Command::Generate { model, prompt, max_new_tokens, temperature, top_k, top_p, seed, device: spec, json } => {
            let device = device::parse(&spec)?;
            let kind = if device == tch::Device::Cpu { tch::Kind::Float } else { tch::Kind::BFloat16 };
            let tokenizer = zerotune_hf::tokenizer::load(&model)?;
            let source = ModelSource::Pretrained { dir: model.to_string_lossy().into_owned() };
            let (config, params) = train::load_params(&source, kind, device, false, seed)?;
            let net = CodeGen::new(&config, &params);
            let encoding = tokenizer.encode(prompt.as_str(), false).map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?;
            let prompt_ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i as i64).collect();
            anyhow::ensure!(!prompt_ids.is_empty(), "the prompt is empty after tokenization");
            anyhow::ensure!(
                prompt_ids.len() < config.n_positions,
                "the prompt has {} tokens; the model's context is {} (n_positions)",
                prompt_ids.len(),
                config.n_positions
            );
            let eos_id = zerotune_hf::tokenizer::eos_id(&tokenizer).map(i64::from).or(Some(config.eos_token_id));
            let sampling = Sampling { max_new_tokens, temperature, top_k, top_p, seed, eos_id };
            let new_ids = generate(&net, &prompt_ids, &sampling, device);
            let ids: Vec<u32> = new_ids.iter().filter(|&&i| Some(i) != eos_id).map(|&i| i as u32).collect();
            let completion = tokenizer.decode(&ids, true).map_err(|e| anyhow::anyhow!("cannot decode: {e}"))?;
            if json {
                println!("{}", serde_json::json!({"prompt_ids": prompt_ids, "new_ids": new_ids, "completion": completion}));
            } else {
                println!("{prompt}{completion}");
            }
            Ok(())
        }
    }
}
