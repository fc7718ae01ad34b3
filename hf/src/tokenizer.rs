//! CodeGen tokenizers: `tokenizer.json`, or the Salesforce layout `vocab.json` + `merges.txt`
//! (+ `added_tokens.json` with the whitespace tokens), both GPT-2 byte-level BPE; and training a
//! fresh byte-level BPE for from-scratch runs.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::{invalid, io_err, Result};

/// The end-of-text token CodeGen (and GPT-2) put between documents.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// Tokenizer files a model directory may hold; all that exist are copied with the model.
pub const TOKENIZER_FILES: [&str; 6] =
    ["tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"];

/// Loads the tokenizer in `dir`, preferring `tokenizer.json`.
pub fn load(dir: &Path) -> Result<Tokenizer> {
    let json = dir.join("tokenizer.json");
    if json.is_file() {
        return Tokenizer::from_file(&json).map_err(|e| invalid(&json, format!("cannot load tokenizer: {e}")));
    }
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    if !vocab.is_file() || !merges.is_file() {
        return Err(invalid(
            dir,
            "no tokenizer: expected tokenizer.json, or vocab.json + merges.txt (pass --tokenizer_name DIR, or train one with --train_tokenizer)",
        ));
    }
    let bpe = BPE::from_file(&path_str(&vocab)?, &path_str(&merges)?)
        .build()
        .map_err(|e| invalid(&vocab, format!("cannot load BPE vocab/merges: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let added = dir.join("added_tokens.json");
    if added.is_file() {
        let text = std::fs::read_to_string(&added).map_err(io_err(&added))?;
        let map: std::collections::BTreeMap<String, u32> =
            serde_json::from_str(&text).map_err(|e| invalid(&added, format!("expected {{token: id}}: {e}")))?;
        let mut by_id: Vec<(u32, String)> = map.into_iter().map(|(t, id)| (id, t)).collect();
        by_id.sort();
        let tokens: Vec<AddedToken> = by_id.into_iter().map(|(_, t)| AddedToken::from(t, false)).collect();
        tokenizer.add_tokens(&tokens);
    }
    if tokenizer.token_to_id(EOS_TOKEN).is_some() {
        tokenizer.add_special_tokens(&[AddedToken::from(EOS_TOKEN, true)]);
    }
    Ok(tokenizer)
}

/// Trains a byte-level BPE of `vocab_size` tokens (EOS included) on `documents`.
pub fn train<'a>(documents: impl Iterator<Item = &'a str> + Send, vocab_size: usize) -> std::result::Result<Tokenizer, String> {
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let mut trainer: tokenizers::models::TrainerWrapper = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(EOS_TOKEN, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tokenizer.train(&mut trainer, documents).map_err(|e| format!("tokenizer training failed: {e}"))?;
    Ok(tokenizer)
}

/// The id of the end-of-text token, if the tokenizer has one.
pub fn eos_id(tokenizer: &Tokenizer) -> Option<u32> {
    tokenizer.token_to_id(EOS_TOKEN)
}

/// The tokenizer files present in `dir`, as (name, bytes), to write next to a saved model.
pub fn read_files(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = vec![];
    for name in TOKENIZER_FILES {
        let path = dir.join(name);
        if path.is_file() {
            files.push((name.to_string(), std::fs::read(&path).map_err(io_err(&path))?));
        }
    }
    Ok(files)
}

/// Writes (name, bytes) files into `dir`.
pub fn write_files(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    for (name, bytes) in files {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(io_err(&path))?;
    }
    Ok(())
}

fn path_str(path: &Path) -> Result<String> {
    path.to_str().map(str::to_string).ok_or_else(|| invalid(PathBuf::from(path), "path is not UTF-8"))
}
