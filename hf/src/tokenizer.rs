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

/// The ids the tokenizer's post-processor puts before a text when HF's `tokenizer(text)` adds
/// special tokens: DeepSeek-Coder's and CodeLlama's BOS; nothing for CodeGen's, Qwen2's or
/// StarCoder2's. Training puts them at each document's start, as run_clm.py's tokenization does.
pub fn document_prefix(tokenizer: &Tokenizer) -> Vec<u32> {
    let ids = |special: bool| tokenizer.encode("a", special).map(|e| e.get_ids().to_vec()).unwrap_or_default();
    let (with, without) = (ids(true), ids(false));
    match with.len().checked_sub(without.len()) {
        Some(extra) if with[extra..] == without[..] => with[..extra].to_vec(),
        _ => vec![],
    }
}

/// The files HF's `AutoTokenizer` reads beside a tokenizer.json we trained, so that it loads with
/// the same special tokens: `<|endoftext|>` as bos and eos (`tokenizer_config.json`,
/// `special_tokens_map.json`), as `PreTrainedTokenizerFast`.
pub fn trained_tokenizer_files() -> Vec<(String, Vec<u8>)> {
    let specials = serde_json::json!({"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN});
    let mut config = specials.clone();
    config["tokenizer_class"] = "PreTrainedTokenizerFast".into();
    config["add_bos_token"] = false.into();
    config["clean_up_tokenization_spaces"] = false.into();
    let text = |value: &serde_json::Value| serde_json::to_string_pretty(value).expect("JSON values serialise").into_bytes();
    vec![("tokenizer_config.json".into(), text(&config)), ("special_tokens_map.json".into(), text(&specials))]
}

/// The file a tokenizer in `dir` is loaded from (for messages).
pub fn file_in(dir: &Path) -> PathBuf {
    let json = dir.join("tokenizer.json");
    if json.is_file() {
        json
    } else {
        dir.join("vocab.json")
    }
}

/// The id that ends each document: `config_eos` (the model config's eos_token_id, where
/// generation stops) when the tokenizer holds it as a special token other than an unknown token,
/// else `<|endoftext|>`. Anything else is refused naming `file`: training with EOS id 0 (`[UNK]`)
/// teaches nothing.
pub fn eos_for(tokenizer: &Tokenizer, config_eos: Option<u32>, file: &Path) -> Result<u32> {
    if let Some(id) = config_eos {
        let special =
            tokenizer.get_added_tokens_decoder().get(&id).is_some_and(|t| t.special && !t.content.to_ascii_lowercase().contains("unk"));
        if special {
            return Ok(id);
        }
    }
    if let Some(id) = eos_id(tokenizer) {
        return Ok(id);
    }
    let config = match config_eos {
        Some(id) => format!(" nor the config's eos_token_id {id} as a special token"),
        None => String::new(),
    };
    Err(invalid(
        file,
        format!("the tokenizer has no {EOS_TOKEN} token{config}, so documents cannot be separated; use the model's own tokenizer, or train one with --train_tokenizer"),
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_is_endoftext_or_the_configs_special_token_and_otherwise_refused() {
        let texts = ["def f(): pass", "x = 1"];
        let tok = train(texts.iter().copied(), 300).unwrap();
        let file = Path::new("dir/tokenizer.json");
        assert_eq!(eos_for(&tok, Some(7), file).unwrap(), eos_id(&tok).unwrap());
        // A WordPiece-like tokenizer: [UNK] at 0, [SEP] special at 1, no <|endoftext|>.
        let added = |id, content| {
            format!(
                r#"{{"id":{id},"content":"{content}","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}}"#
            )
        };
        let json = format!(
            r###"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{},{}],"normalizer":null,"pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,"decoder":null,"model":{{"type":"WordPiece","unk_token":"[UNK]","continuing_subword_prefix":"##","max_input_chars_per_word":100,"vocab":{{"[UNK]":0,"[SEP]":1,"a":2}}}}}}"###,
            added(0, "[UNK]"),
            added(1, "[SEP]")
        );
        let wp: Tokenizer = json.parse().unwrap();
        assert_eq!(eos_for(&wp, Some(1), file).unwrap(), 1);
        for config in [Some(0), Some(2), None] {
            let err = eos_for(&wp, config, file).unwrap_err().to_string();
            assert!(err.contains("dir/tokenizer.json") && err.contains("no <|endoftext|>"), "{err}");
        }
    }
}
