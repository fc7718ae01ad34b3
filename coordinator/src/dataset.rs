//! Token blocks like `run_clm.py` (the documents come from zerotune-data's pipeline): documents
//! joined with EOS and cut into `block_size` blocks, tokenized in parallel a bounded batch at a
//! time (a long document in line-aligned pieces, so memory follows the batch, not the document),
//! streamed into a token cache on disk keyed by a hash of everything that determines its content,
//! so a rerun or a resume does not tokenize again.

use std::io::{Seek, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use tokenizers::Tokenizer;

use zerotune_data::Document;

use crate::error::{io_err, CoordinatorError, Result};

/// The longest piece of one document handed to the tokenizer at once.
const PIECE_BYTES: usize = 64 * 1024;
/// Text per parallel tokenizer call; peak memory follows this, not the corpus or a document.
const BATCH_BYTES: usize = 4 << 20;

/// `text` in pieces of about `max` bytes, cut only before a `\n` that follows a non-space
/// character: there a byte-level (GPT-2) or whitespace pre-tokenizer splits anyway, so the
/// pieces tokenize to the same ids as the whole. A text without such a place stays whole.
pub fn pieces(text: &str, max: usize) -> Vec<&str> {
    let mut out = vec![];
    let mut start = 0;
    while text.len() - start > max {
        let mut end = start + max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let window = &text.as_bytes()[start..end];
        let cut = (1..window.len()).rev().find(|&i| window[i] == b'\n' && !window[i - 1].is_ascii_whitespace());
        let cut = match cut {
            Some(i) => start + i,
            // No place in reach: the next one after it (or the end).
            None => match text.as_bytes()[end..].windows(2).position(|w| w[1] == b'\n' && !w[0].is_ascii_whitespace()) {
                Some(i) => end + i + 1,
                None => text.len(),
            },
        };
        out.push(&text[start..cut]);
        start = cut;
    }
    if start < text.len() || out.is_empty() {
        out.push(&text[start..]);
    }
    out
}

/// Token ids of `docs`, each document led by what the tokenizer puts before a text (a BOS, for
/// DeepSeek-Coder's and CodeLlama's: `tokenizer::document_prefix`) and followed by EOS, handed to
/// `sink` one batch at a time.
pub fn tokenize_into(docs: &[Document], tokenizer: &Tokenizer, eos: u32, sink: &mut dyn FnMut(&[u32]) -> Result<()>) -> Result<()> {
    let prefix = zerotune_hf::tokenizer::document_prefix(tokenizer);
    let mut batch: Vec<&str> = vec![];
    let mut starts: Vec<bool> = vec![]; // whether a piece starts its document
    let mut ends: Vec<bool> = vec![]; // whether a piece ends its document
    let mut bytes = 0;
    let mut ids: Vec<u32> = vec![];
    let mut flush = |batch: &mut Vec<&str>, starts: &mut Vec<bool>, ends: &mut Vec<bool>| -> Result<()> {
        let encodings = tokenizer
            .encode_batch_fast(std::mem::take(batch), false)
            .map_err(|e| CoordinatorError::Tokenizer { what: "tokenization failed", message: e.to_string() })?;
        ids.clear();
        for ((encoding, start), end) in encodings.iter().zip(starts.drain(..)).zip(ends.drain(..)) {
            if start {
                ids.extend_from_slice(&prefix);
            }
            ids.extend_from_slice(encoding.get_ids());
            if end {
                ids.push(eos);
            }
        }
        sink(&ids)
    };
    for doc in docs {
        let parts = pieces(&doc.text, PIECE_BYTES);
        let n = parts.len();
        for (k, part) in parts.into_iter().enumerate() {
            bytes += part.len();
            batch.push(part);
            starts.push(k == 0);
            ends.push(k + 1 == n);
            if bytes >= BATCH_BYTES {
                flush(&mut batch, &mut starts, &mut ends)?;
                bytes = 0;
            }
        }
    }
    if !batch.is_empty() {
        flush(&mut batch, &mut starts, &mut ends)?;
    }
    Ok(())
}

/// Token ids of all documents, each followed by EOS, cut into full blocks (the ragged tail dropped).
pub fn tokenize_blocks(docs: &[Document], tokenizer: &Tokenizer, eos: u32, block_size: usize) -> Result<Vec<u32>> {
    let mut ids: Vec<u32> = vec![];
    tokenize_into(docs, tokenizer, eos, &mut |batch| {
        ids.extend_from_slice(batch);
        Ok(())
    })?;
    ids.truncate(ids.len() / block_size * block_size);
    Ok(ids)
}

/// What the token cache's content depends on.
pub struct CacheKey<'a> {
    /// The data pipeline's settings (secrets, dedup, threshold, max document bytes), also
    /// reflected in the documents, named so that a change of settings always re-tokenizes.
    pub hygiene: &'a str,
    pub train: &'a [Document],
    pub validation: &'a [Document],
    pub tokenizer_json: &'a str,
    pub block_size: usize,
    pub eos: u32,
}

impl CacheKey<'_> {
    pub fn hash(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"zerotune token cache v3"); // v3: documents led by the tokenizer's prefix
        self.hash_documents(&mut h);
        h.update(self.tokenizer_json.as_bytes());
        h.update(&(self.block_size as u64).to_le_bytes());
        h.update(&self.eos.to_le_bytes());
        h.finalize().to_hex()[..32].to_string()
    }

    /// The hygiene settings and the documents of both splits alone: what a resume checks is the
    /// data it trained on, whatever the tokenizer or block size.
    pub fn documents_hash(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"zerotune documents v1");
        self.hash_documents(&mut h);
        h.finalize().to_hex()[..32].to_string()
    }

    fn hash_documents(&self, h: &mut blake3::Hasher) {
        h.update(&(self.hygiene.len() as u64).to_le_bytes());
        h.update(self.hygiene.as_bytes());
        for (tag, docs) in [(b"T", self.train), (b"V", self.validation)] {
            h.update(tag);
            h.update(&(docs.len() as u64).to_le_bytes());
            for d in docs {
                h.update(&(d.text.len() as u64).to_le_bytes());
                h.update(d.text.as_bytes());
            }
        }
    }
}

const MAGIC: &[u8; 8] = b"ZTTOKv1\0";
const HEADER: usize = 8 + 4 + 4 + 8 + 8;

/// Token blocks on disk: header, then train blocks, then validation blocks, u16 or u32 LE.
pub struct TokenCache {
    pub path: PathBuf,
    map: Mmap,
    pub block_size: usize,
    width: usize,
    pub train_blocks: usize,
    pub validation_blocks: usize,
}

/// Streams token ids into a cache file: whole blocks of the training split, then of the
/// validation split (each split's ragged tail dropped); the header's counts are written last and
/// the file appears under its name only when complete.
pub struct CacheWriter {
    path: PathBuf,
    tmp: PathBuf,
    w: std::io::BufWriter<std::fs::File>,
    block_size: usize,
    width: usize,
    /// Ids not yet making a whole block.
    pending: Vec<u32>,
    /// Blocks written per split (train, validation) and the split being written.
    blocks: [u64; 2],
    split: usize,
}

impl CacheWriter {
    pub fn create(path: &Path, block_size: usize, vocab: usize) -> Result<Self> {
        let tmp = path.with_extension("tmp");
        let file = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        let mut writer = Self {
            path: path.into(),
            w: std::io::BufWriter::new(file),
            tmp,
            block_size,
            width: if vocab <= 1 << 16 { 2 } else { 4 },
            pending: vec![],
            blocks: [0, 0],
            split: 0,
        };
        writer.write_header()?;
        Ok(writer)
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> CoordinatorError {
        let path = self.tmp.clone();
        move |source| zerotune_hf::io_err(path)(source).into()
    }

    fn write_header(&mut self) -> Result<()> {
        let mut header = Vec::with_capacity(HEADER);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&(self.block_size as u32).to_le_bytes());
        header.extend_from_slice(&(self.width as u32).to_le_bytes());
        header.extend_from_slice(&self.blocks[0].to_le_bytes());
        header.extend_from_slice(&self.blocks[1].to_le_bytes());
        let io = self.io();
        self.w.write_all(&header).map_err(io)
    }

    /// Appends ids to the current split, writing every whole block.
    pub fn push(&mut self, ids: &[u32]) -> Result<()> {
        self.pending.extend_from_slice(ids);
        let whole = self.pending.len() / self.block_size * self.block_size;
        let mut bytes = Vec::with_capacity(whole * self.width);
        for &t in &self.pending[..whole] {
            if self.width == 2 {
                bytes.extend_from_slice(&(t as u16).to_le_bytes())
            } else {
                bytes.extend_from_slice(&t.to_le_bytes())
            }
        }
        let io = self.io();
        self.w.write_all(&bytes).map_err(io)?;
        self.blocks[self.split] += (whole / self.block_size) as u64;
        self.pending.drain(..whole);
        Ok(())
    }

    /// Ends the training split: its ragged tail is dropped, what follows is validation.
    pub fn end_train(&mut self) {
        self.pending.clear();
        self.split = 1;
    }

    /// Writes the header's counts, syncs, and renames the file into place.
    pub fn finish(mut self) -> Result<TokenCache> {
        let io = self.io();
        self.w.flush().map_err(io)?;
        let io = self.io();
        self.w.rewind().map_err(io)?;
        self.write_header()?;
        let io = self.io();
        let file = self.w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io_err(&self.tmp))?;
        std::fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))?;
        TokenCache::open(&self.path)
    }
}

impl TokenCache {
    /// Writes `train` and `validation` tokens (whole blocks) to `path` atomically.
    pub fn write(path: &Path, block_size: usize, vocab: usize, train: &[u32], validation: &[u32]) -> Result<Self> {
        let mut w = CacheWriter::create(path, block_size, vocab)?;
        w.push(train)?;
        w.end_train();
        w.push(validation)?;
        w.finish()
    }

    /// Maps an existing cache file, checking its header and length.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        // SAFETY: cache files are written once (atomic rename) and never modified.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
        let bad = || CoordinatorError::Data { path: path.into(), message: "corrupt token cache; delete it to rebuild".into() };
        if map.len() < HEADER || &map[..8] != MAGIC {
            return Err(bad());
        }
        let u32_at = |o: usize| u32::from_le_bytes(map[o..o + 4].try_into().unwrap()) as usize;
        let u64_at = |o: usize| u64::from_le_bytes(map[o..o + 8].try_into().unwrap()) as usize;
        let (block_size, width, train_blocks, validation_blocks) = (u32_at(8), u32_at(12), u64_at(16), u64_at(24));
        if HEADER + (train_blocks + validation_blocks) * block_size * width != map.len() || !(width == 2 || width == 4) {
            return Err(bad());
        }
        Ok(Self { path: path.into(), map, block_size, width, train_blocks, validation_blocks })
    }

    /// Tokens of training block `i`.
    pub fn train_block(&self, i: usize) -> Vec<u32> {
        self.block(i)
    }

    /// Tokens of validation block `i`.
    pub fn validation_block(&self, i: usize) -> Vec<u32> {
        self.block(self.train_blocks + i)
    }

    fn block(&self, i: usize) -> Vec<u32> {
        let bytes = self.block_size * self.width;
        let start = HEADER + i * bytes;
        let raw = &self.map[start..start + bytes];
        if self.width == 2 {
            raw.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32).collect()
        } else {
            raw.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_tokenize_like_the_whole_document() {
        let line = |i: usize| format!("def f{i}(x):\n    return x * {i}  \n\n\tpass\n");
        let text: String = (0..400).map(line).collect();
        let tok = zerotune_hf::tokenizer::train([text.as_str()].into_iter(), 400).unwrap();
        let parts = pieces(&text, 1000);
        assert!(parts.len() > 5 && parts.iter().all(|p| p.len() <= 1000));
        assert_eq!(parts.concat(), text);
        let whole = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        let joined: Vec<u32> = parts.iter().flat_map(|p| tok.encode(*p, false).unwrap().get_ids().to_vec()).collect();
        assert_eq!(joined, whole);
        // No place to cut within reach: the next one, else the whole text.
        assert_eq!(pieces(&"x".repeat(50), 10), ["x".repeat(50)]);
        assert_eq!(pieces(&format!("{}\nyy", "x".repeat(50)), 10), ["x".repeat(50), "\nyy".to_string()]);
    }

    #[test]
    fn documents_join_with_eos_and_the_ragged_tail_is_dropped() {
        let texts = ["fn a() {}", "fn bb() { return; }", "let c = 1;"];
        let tok = zerotune_hf::tokenizer::train(texts.iter().copied(), 300).unwrap();
        let eos = zerotune_hf::tokenizer::eos_id(&tok).unwrap();
        let docs: Vec<Document> = texts.iter().map(|t| Document { text: t.to_string(), url: None }).collect();
        let mut joined = vec![];
        for t in texts {
            joined.extend_from_slice(tok.encode(t, false).unwrap().get_ids());
            joined.push(eos);
        }
        let blocks = tokenize_blocks(&docs, &tok, eos, 4).unwrap();
        assert_eq!(blocks.len(), joined.len() / 4 * 4);
        assert_eq!(blocks[..], joined[..blocks.len()]);
        assert_eq!(blocks.iter().filter(|&&t| t == eos).count(), joined[..blocks.len()].iter().filter(|&&t| t == eos).count());
    }

    #[test]
    fn a_tokenizer_that_adds_bos_leads_each_document_with_it_once() {
        use tokenizers::processors::template::TemplateProcessing;
        let texts = ["fn a() {}", "fn bb() { return; }"];
        let mut tok = zerotune_hf::tokenizer::train(texts.iter().copied(), 300).unwrap();
        assert!(zerotune_hf::tokenizer::document_prefix(&tok).is_empty(), "a byte-level BPE adds nothing");
        let eos = zerotune_hf::tokenizer::eos_id(&tok).unwrap();
        // DeepSeek-Coder's post-processor: BOS before every text (here <|endoftext|> stands in).
        let bos = TemplateProcessing::builder()
            .try_single("<|endoftext|> $A")
            .unwrap()
            .special_tokens(vec![("<|endoftext|>", eos)])
            .build()
            .unwrap();
        tok.with_post_processor(Some(bos));
        assert_eq!(zerotune_hf::tokenizer::document_prefix(&tok), [eos]);
        // A document longer than a piece still gets one BOS, at its start.
        let long: String = (0..6000).map(|i| format!("fn f{i}() {{}}\n")).collect();
        assert!(pieces(&long, PIECE_BYTES).len() > 1);
        let docs: Vec<Document> = [texts[0].to_string(), long.clone()].into_iter().map(|text| Document { text, url: None }).collect();
        let mut want = vec![eos];
        want.extend_from_slice(tok.encode(texts[0], false).unwrap().get_ids());
        want.extend([eos, eos]);
        want.extend_from_slice(tok.encode(long.as_str(), false).unwrap().get_ids());
        want.push(eos);
        let blocks = tokenize_blocks(&docs, &tok, eos, 1).unwrap();
        assert_eq!(blocks, want);
    }

    #[test]
    fn cache_round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.tokens");
        let cache = TokenCache::write(&path, 3, 1000, &[1, 2, 3, 4, 5, 6], &[7, 8, 9]).unwrap();
        assert_eq!((cache.train_blocks, cache.validation_blocks), (2, 1));
        assert_eq!(cache.train_block(1), [4, 5, 6]);
        assert_eq!(cache.validation_block(0), [7, 8, 9]);
        let wide = TokenCache::write(&dir.path().join("w.tokens"), 2, 70_000, &[65_999, 1], &[]).unwrap();
        assert_eq!(wide.train_block(0), [65_999, 1]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(TokenCache::open(&path).err().unwrap().to_string().contains("corrupt token cache"));
    }
}
