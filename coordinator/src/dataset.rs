//! Training data like `run_clm.py` (the documents come from zerotune-data): a validation split by
//! whole documents; parallel tokenisation, documents joined with
//! EOS and cut into `block_size` blocks; a token cache on disk keyed by a hash of everything that
//! determines its content, so a rerun or a resume does not tokenise again.

use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use tokenizers::Tokenizer;

use zerotune_data::Document;

use crate::error::{io_err, CoordinatorError, Result};

/// Splits documents into (train, validation): a seeded shuffle, then `percent`% of whole
/// documents (rounded, at least one when there are two or more) go to validation.
pub fn split_by_documents(docs: Vec<Document>, percent: u32, seed: u64) -> (Vec<Document>, Vec<Document>) {
    let n = docs.len();
    let mut n_val = ((n as f64) * percent as f64 / 100.0).round() as usize;
    if percent > 0 && n >= 2 {
        n_val = n_val.clamp(1, n - 1);
    }
    let mut order: Vec<usize> = (0..n).collect();
    crate::sampler::shuffle(&mut order, seed);
    let is_val: Vec<bool> = {
        let mut v = vec![false; n];
        order[..n_val].iter().for_each(|&i| v[i] = true);
        v
    };
    let (mut train, mut val) = (vec![], vec![]);
    for (doc, val_doc) in docs.into_iter().zip(is_val) {
        if val_doc {
            val.push(doc)
        } else {
            train.push(doc)
        }
    }
    (train, val)
}

/// Token ids of all documents, each followed by EOS, cut into full blocks (the ragged tail dropped).
pub fn tokenize_blocks(docs: &[Document], tokenizer: &Tokenizer, eos: u32, block_size: usize) -> Result<Vec<u32>> {
    let mut ids: Vec<u32> = vec![];
    for chunk in docs.chunks(16384) {
        let texts: Vec<&str> = chunk.iter().map(|d| d.text.as_str()).collect();
        let encodings =
            tokenizer.encode_batch_fast(texts, false).map_err(|e| CoordinatorError::Flag(format!("tokenization failed: {e}")))?;
        for encoding in encodings {
            ids.extend_from_slice(encoding.get_ids());
            ids.push(eos);
        }
    }
    ids.truncate(ids.len() / block_size * block_size);
    Ok(ids)
}

/// What the token cache's content depends on.
pub struct CacheKey<'a> {
    pub train: &'a [Document],
    pub validation: &'a [Document],
    pub tokenizer_json: &'a str,
    pub block_size: usize,
    pub eos: u32,
}

impl CacheKey<'_> {
    pub fn hash(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"zerotune token cache v1");
        for (tag, docs) in [(b"T", self.train), (b"V", self.validation)] {
            h.update(tag);
            h.update(&(docs.len() as u64).to_le_bytes());
            for d in docs {
                h.update(&(d.text.len() as u64).to_le_bytes());
                h.update(d.text.as_bytes());
            }
        }
        h.update(self.tokenizer_json.as_bytes());
        h.update(&(self.block_size as u64).to_le_bytes());
        h.update(&self.eos.to_le_bytes());
        h.finalize().to_hex()[..32].to_string()
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

impl TokenCache {
    /// Writes `train` and `validation` tokens (whole blocks) to `path` atomically.
    pub fn write(path: &Path, block_size: usize, vocab: usize, train: &[u32], validation: &[u32]) -> Result<Self> {
        let width = if vocab <= 1 << 16 { 2 } else { 4 };
        let tmp = path.with_extension("tmp");
        {
            let file = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
            let mut w = std::io::BufWriter::new(file);
            let io = |e| CoordinatorError::Io { path: tmp.clone(), source: e };
            w.write_all(MAGIC).map_err(io)?;
            w.write_all(&(block_size as u32).to_le_bytes()).map_err(io)?;
            w.write_all(&(width as u32).to_le_bytes()).map_err(io)?;
            w.write_all(&((train.len() / block_size) as u64).to_le_bytes()).map_err(io)?;
            w.write_all(&((validation.len() / block_size) as u64).to_le_bytes()).map_err(io)?;
            for &t in train.iter().chain(validation) {
                let r = if width == 2 { w.write_all(&(t as u16).to_le_bytes()) } else { w.write_all(&t.to_le_bytes()) };
                r.map_err(io)?;
            }
            w.into_inner()
                .map_err(|e| CoordinatorError::Io { path: tmp.clone(), source: e.into_error() })?
                .sync_all()
                .map_err(io_err(&tmp))?;
        }
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        Self::open(path)
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

    fn docs(n: usize) -> Vec<Document> {
        (0..n).map(|i| Document { text: format!("doc {i}"), url: None }).collect()
    }

    #[test]
    fn split_keeps_documents_whole_and_is_seeded() {
        let (train, val) = split_by_documents(docs(40), 5, 7);
        assert_eq!((train.len(), val.len()), (38, 2));
        for d in &val {
            assert!(!train.contains(d), "{d:?} in both splits");
        }
        assert_eq!(split_by_documents(docs(40), 5, 7).1, val, "same seed, same split");
        assert_eq!(split_by_documents(docs(3), 5, 7).1.len(), 1, "at least one validation document");
        assert_eq!(split_by_documents(docs(3), 0, 7).1.len(), 0);
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
