//! Everything decided before a worker starts: the documents through zerotune-data's pipeline
//! (collect -> scrub -> cut -> dedup -> split -> leakage), the tokenizer (loaded or trained on the
//! training split), the model config checked against it, the block size, then the pipeline's last
//! stages here, tokenize -> cache, and the step arithmetic.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;
use zerotune_hf::{tokenizer, ModelConfig, WeightFiles};
use zerotune_proto::state::DataIdentity;

use crate::config::{DataPlan, ModelChoice, TokenizerChoice, TrainPlan};
use zerotune_data::pipeline::{self, Inputs};
use zerotune_data::report::TokenCounts;
use zerotune_data::{DataReport, Document};

use crate::dataset::{self, CacheKey, CacheWriter, TokenCache};
use crate::error::{io_err, CoordinatorError, Result};
use crate::sampler::Sampler;

/// The data and model facts a run needs, all checked.
pub struct PreparedRun {
    pub config: ModelConfig,
    /// Tokenizer files (name, bytes) to copy next to every saved model.
    pub tokenizer_files: Vec<(String, Vec<u8>)>,
    pub cache: TokenCache,
    pub block_size: usize,
    pub sampler: Sampler,
    pub total_steps: u64,
    pub warmup_steps: u64,
    /// The held-out documents, for the completion evaluation at the end.
    pub validation_docs: Vec<Document>,
    /// What the data pipeline did, for `output_dir/data_report.json`.
    pub data_report: DataReport,
    /// The documents and blocks trained on, recorded in every checkpoint.
    pub data: DataIdentity,
}

/// `keep_tokenizer`: a resumed checkpoint's model dir, whose tokenizer the run keeps instead of
/// training one (--train_tokenizer): the weights were trained with its ids.
pub fn prepare(plan: &TrainPlan, keep_tokenizer: Option<&Path>) -> Result<PreparedRun> {
    let mut data = run_pipeline(&plan.data, plan.training.seed)?;
    if let Some(block_size) = plan.data.block_size {
        check_enough(&plan.data.train_file, &data.train, block_size)?; // before training a tokenizer
    }
    let (tok, tokenizer_files, tokenizer_file) = tokenizer_for(plan, &data.train, keep_tokenizer)?;
    let config = model_config(plan, &tok)?;
    let config_eos = config.eos_token_id().and_then(|id| u32::try_from(id).ok());
    let eos = tokenizer::eos_for(&tok, config_eos, &tokenizer_file)?;

    let block_size = plan.data.block_size.unwrap_or(config.default_block_size());
    if block_size > config.context() {
        let (context, key) = (config.context(), config.context_key());
        let message = format!("--block_size {block_size} is above the model's context of {context} tokens ({key}); lower it");
        return Err(CoordinatorError::flags(&["--block_size"], message));
    }
    check_enough(&plan.data.train_file, &data.train, block_size)?;
    let (cache, documents_hash) = tokenize_cached(&mut data, &tok, eos, block_size, config.vocab_size(), &plan.data.cache_dir)?;
    let data_identity = DataIdentity {
        documents_hash,
        train_documents: data.train.len(),
        validation_documents: data.validation.len(),
        train_blocks: cache.train_blocks,
        validation_blocks: cache.validation_blocks,
    };
    if cache.train_blocks == 0 {
        return Err(CoordinatorError::Data {
            path: plan.data.train_file.clone(),
            message: format!("its training split makes no complete block of {block_size} tokens; add data or lower --block_size"),
        });
    }
    if plan.output.do_eval && cache.validation_blocks == 0 {
        tracing::warn!("the validation split makes no complete block of {block_size} tokens; evaluation is skipped");
    }

    let (sampler, total_steps) = schedule(plan, cache.train_blocks)?;
    let warmup_steps = plan.warmup_steps(total_steps);
    Ok(PreparedRun {
        config,
        tokenizer_files,
        cache,
        block_size,
        sampler,
        total_steps,
        warmup_steps,
        validation_docs: data.validation,
        data_report: data.report,
        data: data_identity,
    })
}

/// The run's tokenizer, its files to save beside every model, and the name its errors use: a
/// resumed checkpoint's (`kept`) when it would otherwise train one, else the tokenizer dir, or one
/// trained on the training split (--train_tokenizer).
fn tokenizer_for(plan: &TrainPlan, train: &[Document], kept: Option<&Path>) -> Result<(Tokenizer, Vec<(String, Vec<u8>)>, PathBuf)> {
    let kept = kept.filter(|_| matches!(plan.tokenizer, TokenizerChoice::Train { .. }));
    if let Some(dir) = kept {
        tracing::info!("resuming: keeping the checkpoint's tokenizer ({}) instead of training one (--train_tokenizer)", dir.display());
    }
    match (&plan.tokenizer, kept) {
        (_, Some(dir)) => Ok((tokenizer::load(dir)?, tokenizer::read_files(dir)?, tokenizer::file_in(dir))),
        (TokenizerChoice::Dir(dir), None) => Ok((tokenizer::load(dir)?, tokenizer::read_files(dir)?, tokenizer::file_in(dir))),
        (TokenizerChoice::Train { vocab_size }, None) => {
            let tok = tokenizer::train(train.iter().map(|d| d.text.as_str()), *vocab_size)
                .map_err(|message| CoordinatorError::Tokenizer { what: "--train_tokenizer", message })?;
            let json = tok
                .to_string(true)
                .map_err(|e| CoordinatorError::Tokenizer { what: "cannot serialise the trained tokenizer", message: e.to_string() })?;
            tracing::info!("trained a byte-level BPE tokenizer of {} tokens", tok.get_vocab_size(true));
            let mut files = vec![("tokenizer.json".to_string(), json.into_bytes())];
            files.extend(tokenizer::trained_tokenizer_files());
            Ok((tok, files, "--train_tokenizer".into()))
        }
    }
}

/// The sampler over `blocks` training blocks and the run's length in optimizer steps (a
/// ds_config's total_num_steps must agree with it).
fn schedule(plan: &TrainPlan, blocks: usize) -> Result<(Sampler, u64)> {
    let (world, micro, accumulation) = (plan.world_size(), plan.batch.micro, plan.batch.accumulation);
    let sampler = Sampler { blocks, world, micro_batch: micro, accumulation, seed: plan.training.seed };
    let per_epoch = sampler.steps_per_epoch() as u64;
    if per_epoch == 0 {
        return Err(CoordinatorError::TooFewBlocks { blocks, world, micro, accumulation });
    }
    let total_steps = plan.training.max_steps.unwrap_or_else(|| (plan.training.epochs * per_epoch as f64).ceil().max(1.0) as u64);
    if let Some(ds_total) = plan.training.ds_total_steps {
        if ds_total != total_steps {
            let message =
                format!("ds_config scheduler.params.total_num_steps {ds_total} vs the run's {total_steps} steps; set it to \"auto\"");
            return Err(CoordinatorError::flags(&["--deepspeed", "--max_steps", "--num_train_epochs"], message));
        }
    }
    Ok((sampler, total_steps))
}

/// The pipeline's stages up to the leakage check, with the summary printed.
pub fn run_pipeline(data: &DataPlan, seed: u64) -> Result<pipeline::SplitDocuments> {
    let inputs = Inputs {
        train: data.train_file.clone(),
        validation: data.validation_file.clone(),
        text_column: data.text_column.clone(),
        filter: data.filter.clone(),
        validation_split_percentage: data.validation_split_percentage,
        seed,
    };
    let prepared = pipeline::run(&inputs, &data.hygiene)?;
    tracing::info!("{}", prepared.report.summary());
    Ok(prepared)
}

/// Refuses, before tokenizing, a training split too small for one block: no tokenizer makes
/// more tokens than bytes (+ one EOS per document).
pub fn check_enough(train_file: &Path, train: &[Document], block_size: usize) -> Result<()> {
    let most: usize = train.iter().map(|d| d.text.len() + 1).sum();
    if most < block_size {
        return Err(CoordinatorError::Data {
            path: train_file.into(),
            message: format!(
                "its training split ({} documents, {} bytes) cannot make one block of {block_size} tokens; add data, lower --block_size or --validation_split_percentage",
                train.len(),
                most - train.len()
            ),
        });
    }
    Ok(())
}

/// Stages tokenize and cache: the token blocks of both splits, from the cache when this exact
/// data (and these pipeline settings) was tokenized before. Fills in the report's token counts.
/// Also returns the hash of the documents alone (`CacheKey::documents_hash`).
pub fn tokenize_cached(
    data: &mut pipeline::SplitDocuments,
    tok: &Tokenizer,
    eos: u32,
    block_size: usize,
    vocab: usize,
    cache_dir: &Path,
) -> Result<(TokenCache, String)> {
    if block_size < 2 {
        return Err(CoordinatorError::flag("--block_size", block_size, "a block needs at least 2 tokens"));
    }
    let tokenizer_json =
        tok.to_string(false).map_err(|e| CoordinatorError::Tokenizer { what: "cannot serialise the tokenizer", message: e.to_string() })?;
    let hygiene = data.report.settings.key();
    let (train, val) = (&data.train, &data.validation);
    let key = CacheKey { hygiene: &hygiene, train, validation: val, tokenizer_json: &tokenizer_json, block_size, eos };
    std::fs::create_dir_all(cache_dir).map_err(io_err(cache_dir))?;
    let path = cache_dir.join(format!("{}.tokens", key.hash()));
    let documents_hash = key.documents_hash();
    let started = std::time::Instant::now();
    let hit = path.is_file();
    let cache = if hit {
        TokenCache::open(&path)?
    } else {
        let mut writer = CacheWriter::create(&path, block_size, vocab)?;
        dataset::tokenize_into(train, tok, eos, &mut |ids| writer.push(ids))?;
        writer.end_train();
        dataset::tokenize_into(val, tok, eos, &mut |ids| writer.push(ids))?;
        writer.finish()?
    };
    let seconds = started.elapsed().as_secs_f64();
    data.report.seconds.insert("tokenize".into(), seconds);
    data.report.tokens = Some(TokenCounts {
        block_size,
        train_blocks: cache.train_blocks,
        validation_blocks: cache.validation_blocks,
        cache: path.display().to_string(),
        cache_hit: hit,
    });
    match hit {
        true => {
            tracing::info!(
                "token cache hit: {} ({} train / {} validation blocks)",
                path.display(),
                cache.train_blocks,
                cache.validation_blocks
            )
        }
        false => tracing::info!(
            "tokenized {} train / {} validation documents into {} / {} blocks of {block_size} in {seconds:.2}s ({})",
            train.len(),
            val.len(),
            cache.train_blocks,
            cache.validation_blocks,
            path.display()
        ),
    }
    Ok((cache, documents_hash))
}

/// The model config, with its vocabulary checked against the tokenizer.
fn model_config(plan: &TrainPlan, tok: &Tokenizer) -> Result<ModelConfig> {
    let ids = tok.get_vocab_size(true);
    let (config, source) = match &plan.model {
        ModelChoice::Pretrained(dir) => {
            let config = ModelConfig::from_dir(dir)?;
            WeightFiles::open(dir)?; // fail before launching anything
            (config, dir.join("config.json").display().to_string())
        }
        ModelChoice::Scratch(config) => {
            let mut config = (**config).clone();
            if matches!(plan.tokenizer, TokenizerChoice::Train { .. }) {
                // A fresh tokenizer: size the embedding to it (rounded up to a multiple of 64).
                config.set_vocab_size(ids.div_ceil(64) * 64);
                let eos = tokenizer::eos_id(tok).unwrap_or(0) as i64;
                config.set_token_ids(eos, eos);
            }
            (config, "--config_name".to_string())
        }
    };
    if ids > config.vocab_size() {
        return Err(CoordinatorError::VocabTooSmall { ids, from: source, rows: config.vocab_size() });
    }
    Ok(config)
}
