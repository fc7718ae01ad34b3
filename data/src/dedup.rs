//! Duplicate detection: exact copies by a blake3 hash of the text with `\r\n` read as `\n`, and
//! near copies by MinHash over word 5-shingles with LSH banding (Broder 1997; Leskovec, Rajaraman
//! & Ullman, "Mining of Massive Datasets" ch. 3), every candidate pair then checked by its exact
//! Jaccard similarity. A shingle is 5 consecutive whitespace-separated words joined by one space
//! (a text of fewer words is one shingle); tests/fixtures/hygiene.py computes the same in Python.
//! Of each group of copies one is kept, deterministically: the shortest name, then lexical order,
//! then input order. The result does not depend on the thread count.

use std::collections::HashMap;

use rayon::prelude::*;

/// Words per shingle.
pub const SHINGLE_WORDS: usize = 5;
/// MinHash functions per document (bands x rows).
const HASHES: usize = 128;
/// Buckets up to this size are checked pair by pair; larger ones against their first member.
const ALL_PAIRS_UP_TO: usize = 16;

/// Which copies count as duplicates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DedupMode {
    None,
    Exact,
    Near,
}

/// A document as dedup sees it: a name (path or url) for the keep rule, and its text.
#[derive(Clone, Copy, Debug)]
pub struct Item<'a> {
    pub name: &'a str,
    pub text: &'a str,
}

/// Why a document is a copy, and of which kept document (an index into the same list).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dup {
    Exact { of: usize },
    Near { of: usize },
}

/// The exact-duplicate key: blake3 of the text with `\r\n` as `\n`.
pub fn exact_key(text: &str) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for (i, part) in text.split("\r\n").enumerate() {
        if i > 0 {
            h.update(b"\n");
        }
        h.update(part.as_bytes());
    }
    *h.finalize().as_bytes()
}

/// The sorted, distinct 64-bit hashes of the word 5-shingles of `text` (FNV-1a of the words
/// joined by one space).
pub fn shingles(text: &str) -> Vec<u64> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let width = SHINGLE_WORDS.min(words.len());
    let mut out: Vec<u64> = if width == 0 { vec![] } else { words.windows(width).map(fnv_words).collect() };
    out.sort_unstable();
    out.dedup();
    out
}

fn fnv_words(words: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, w) in words.iter().enumerate() {
        for &b in (if i > 0 { " " } else { "" }).as_bytes().iter().chain(w.as_bytes()) {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// |a ∩ b| / |a ∪ b| of two sorted distinct sets (1 for two empty sets).
pub fn jaccard(a: &[u64], b: &[u64]) -> f64 {
    let (mut i, mut j, mut common) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => (common, i, j) = (common + 1, i + 1, j + 1),
        }
    }
    let union = a.len() + b.len() - common;
    if union == 0 {
        1.0
    } else {
        common as f64 / union as f64
    }
}

/// The seeded multipliers and offsets of the MinHash functions h_k(x) = (a_k x + b_k) >> 32.
fn hash_params() -> Vec<(u64, u64)> {
    let mut rng = crate::rng::SplitMix64::new(0x5eed_d0c5);
    (0..HASHES).map(|_| (rng.next_u64() | 1, rng.next_u64())).collect()
}

/// The MinHash signature of a shingle set (empty for an empty set).
fn signature(shingles: &[u64], params: &[(u64, u64)]) -> Vec<u32> {
    if shingles.is_empty() {
        return vec![];
    }
    let mut sig = vec![u32::MAX; HASHES];
    for &s in shingles {
        for (m, &(a, b)) in sig.iter_mut().zip(params) {
            *m = (*m).min((a.wrapping_mul(s).wrapping_add(b) >> 32) as u32);
        }
    }
    sig
}

/// LSH bands x rows for a threshold: the banding's 50% point, (1/b)^(1/r), sits below it.
fn banding(threshold: f64) -> (usize, usize) {
    if threshold >= 0.75 {
        (16, 8)
    } else if threshold >= 0.45 {
        (32, 4)
    } else {
        (64, 2)
    }
}

/// Band keys of a signature: (band, hash of its rows).
fn band_keys(sig: &[u32], bands: usize, rows: usize) -> impl Iterator<Item = (u32, u64)> + '_ {
    (0..if sig.is_empty() { 0 } else { bands }).map(move |b| {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ b as u64;
        for &v in &sig[b * rows..(b + 1) * rows] {
            h = (h ^ v as u64).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
        }
        (b as u32, h)
    })
}

/// The keep order: shortest name, then lexical, then input order.
fn keep_key<'a>(items: &[Item<'a>], i: usize) -> (usize, &'a str, usize) {
    (items[i].name.len(), items[i].name, i)
}

/// The MinHash signature of each item for `Near` mode (computed once, used by both
/// `find_copies` and `find_leaks`); empty ones for the other modes.
pub fn signatures(items: &[Item], mode: DedupMode) -> Vec<Vec<u32>> {
    if mode != DedupMode::Near {
        return vec![vec![]; items.len()];
    }
    let params = hash_params();
    items.par_iter().map(|it| signature(&shingles(it.text), &params)).collect()
}

/// For each item, `None` when it is kept, or what it duplicates. `threshold` is the Jaccard
/// similarity at or above which two documents are near copies (`Near` mode); `sigs` come from
/// `signatures(items, mode)`.
pub fn find_copies(items: &[Item], sigs: &[Vec<u32>], mode: DedupMode, threshold: f64) -> Vec<Option<Dup>> {
    let mut verdict: Vec<Option<Dup>> = vec![None; items.len()];
    if mode == DedupMode::None {
        return verdict;
    }
    let keys: Vec<[u8; 32]> = items.par_iter().map(|it| exact_key(it.text)).collect();
    let mut first: HashMap<[u8; 32], usize> = HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        let kept = first.entry(*key).or_insert(i);
        if keep_key(items, i) < keep_key(items, *kept) {
            *kept = i;
        }
    }
    for i in 0..items.len() {
        let kept = first[&keys[i]];
        if kept != i {
            verdict[i] = Some(Dup::Exact { of: kept });
        }
    }
    if mode == DedupMode::Exact {
        return verdict;
    }
    assert_eq!(sigs.len(), items.len(), "one signature per item");
    let live: Vec<usize> = (0..items.len()).filter(|&i| verdict[i].is_none()).collect();
    let (bands, rows) = banding(threshold);
    let mut buckets: HashMap<(u32, u64), Vec<usize>> = HashMap::new();
    for (slot, sig) in live.iter().map(|&i| &sigs[i]).enumerate() {
        for key in band_keys(sig, bands, rows) {
            buckets.entry(key).or_default().push(slot);
        }
    }
    // Candidate pairs in a fixed order, each checked by its exact Jaccard; the groups are the
    // connected components of the pairs that pass, whatever the order they are found in.
    // A large bucket (many copies of one file) pairs each member with its first only, so the work
    // stays linear in the bucket; the copies still join one group through that member.
    let mut pairs: Vec<(usize, usize)> = vec![];
    for bucket in buckets.values().filter(|b| b.len() > 1) {
        if bucket.len() <= ALL_PAIRS_UP_TO {
            for (k, &x) in bucket.iter().enumerate() {
                pairs.extend(bucket[k + 1..].iter().map(|&y| (x, y)));
            }
        } else {
            pairs.extend(bucket[1..].iter().map(|&y| (bucket[0], y)));
        }
    }
    pairs.sort_unstable();
    pairs.dedup();
    let similar: Vec<bool> =
        pairs.par_iter().map(|&(x, y)| jaccard(&shingles(items[live[x]].text), &shingles(items[live[y]].text)) >= threshold).collect();
    let mut groups = UnionFind::new(live.len());
    for (&(x, y), _) in pairs.iter().zip(&similar).filter(|(_, &s)| s) {
        groups.union(x, y);
    }
    let mut best: HashMap<usize, usize> = HashMap::new();
    for (slot, &i) in live.iter().enumerate() {
        let kept = best.entry(groups.find(slot)).or_insert(i);
        if keep_key(items, i) < keep_key(items, *kept) {
            *kept = i;
        }
    }
    for (slot, &i) in live.iter().enumerate() {
        let kept = best[&groups.find(slot)];
        if kept != i {
            verdict[i] = Some(Dup::Near { of: kept });
        }
    }
    verdict
}

/// For each validation item, `None`, or the training item it copies (exact, or near at
/// `threshold` in `Near` mode); `train_sigs` come from `signatures(train, mode)`.
pub fn find_leaks(train: &[Item], train_sigs: &[Vec<u32>], validation: &[Item], mode: DedupMode, threshold: f64) -> Vec<Option<Dup>> {
    if mode == DedupMode::None || validation.is_empty() {
        return vec![None; validation.len()];
    }
    let exact: HashMap<[u8; 32], usize> =
        train.par_iter().map(|it| exact_key(it.text)).collect::<Vec<_>>().into_iter().enumerate().rev().map(|(i, k)| (k, i)).collect();
    let params = hash_params();
    let (bands, rows) = banding(threshold);
    let mut buckets: HashMap<(u32, u64), Vec<usize>> = HashMap::new();
    if mode == DedupMode::Near {
        assert_eq!(train_sigs.len(), train.len(), "one signature per training item");
        for (i, sig) in train_sigs.iter().enumerate() {
            for key in band_keys(sig, bands, rows) {
                buckets.entry(key).or_default().push(i);
            }
        }
    }
    validation
        .par_iter()
        .map(|v| {
            if let Some(&of) = exact.get(&exact_key(v.text)) {
                return Some(Dup::Exact { of });
            }
            if mode != DedupMode::Near {
                return None;
            }
            let sh = shingles(v.text);
            let mut candidates: Vec<usize> =
                band_keys(&signature(&sh, &params), bands, rows).filter_map(|k| buckets.get(&k)).flatten().copied().collect();
            candidates.sort_unstable();
            candidates.dedup();
            candidates.into_iter().find(|&t| jaccard(&sh, &shingles(train[t].text)) >= threshold).map(|of| Dup::Near { of })
        })
        .collect()
}

/// Disjoint sets with path halving.
struct UnionFind(Vec<usize>);

impl UnionFind {
    fn new(n: usize) -> Self {
        Self((0..n).collect())
    }
    fn find(&mut self, mut x: usize) -> usize {
        while self.0[x] != x {
            self.0[x] = self.0[self.0[x]];
            x = self.0[x];
        }
        x
    }
    fn union(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        self.0[a.max(b)] = a.min(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copies(items: &[Item], mode: DedupMode) -> Vec<Option<Dup>> {
        find_copies(items, &signatures(items, mode), mode, 0.85)
    }

    fn items<'a>(docs: &'a [(&'a str, String)]) -> Vec<Item<'a>> {
        docs.iter().map(|(name, text)| Item { name, text }).collect()
    }

    /// `n` distinct words, `changed` of them (spread out) replaced.
    fn text(n: usize, changed: usize, seed: usize) -> String {
        (0..n)
            .map(|i| if changed > 0 && i % (n / changed) == n / changed / 2 { format!("other{seed}_{i}") } else { format!("w{i}") })
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn shingles_and_jaccard_follow_the_definition() {
        assert_eq!(shingles("a b c d e f").len(), 2);
        assert_eq!(shingles("a  b\tc\nd e"), shingles("a b c d e"), "any whitespace separates words");
        assert_eq!(shingles("a b").len(), 1, "a short text is one shingle");
        assert!(shingles(" \n").is_empty());
        let (a, b) = (shingles(&text(100, 0, 0)), shingles(&text(100, 1, 1)));
        // 96 shingles, one word changed spoils 5 of them: 91 / 101.
        assert!((jaccard(&a, &b) - 91.0 / 101.0).abs() < 1e-12, "{}", jaccard(&a, &b));
        assert_eq!(jaccard(&[], &[]), 1.0);
    }

    #[test]
    fn exact_copies_ignore_line_endings_and_keep_the_shortest_then_lexical_name() {
        let docs = [
            ("src/b/long_name.py", "x = 1\ny = 2\n".to_string()),
            ("src/a.py", "x = 1\r\ny = 2\r\n".to_string()),
            ("src/c.py", "x = 1\ny = 2\n".to_string()),
            ("other.py", "z = 3\n".to_string()),
        ];
        let got = copies(&items(&docs), DedupMode::Exact);
        assert_eq!(got, [Some(Dup::Exact { of: 1 }), None, Some(Dup::Exact { of: 1 }), None]);
        assert_eq!(copies(&items(&docs), DedupMode::None), [None; 4]);
    }

    #[test]
    fn near_copies_above_the_threshold_are_found_and_well_below_are_not() {
        let docs = [
            ("a/orig.py", text(200, 0, 0)),
            ("b/copy.py", text(200, 2, 1)), // J = 186/214 ~ 0.87
            ("c/far.py", text(200, 12, 2)), // J ~ 0.54
            ("d/unrelated.py", (0..200).map(|i| format!("u{i}")).collect::<Vec<_>>().join(" ")),
        ];
        let j = |a: &str, b: &str| jaccard(&shingles(a), &shingles(b));
        assert!(j(&docs[0].1, &docs[1].1) >= 0.85 && j(&docs[0].1, &docs[2].1) < 0.6);
        let got = copies(&items(&docs), DedupMode::Near);
        assert_eq!(got, [None, Some(Dup::Near { of: 0 }), None, None]);
        assert_eq!(copies(&items(&docs), DedupMode::Exact), [None; 4]);
    }

    #[test]
    fn the_result_is_the_same_on_one_thread_and_on_four() {
        let docs: Vec<(String, String)> = (0..60).map(|i| (format!("f{}.py", 59 - i), text(120, i % 4, i / 4))).collect();
        let its: Vec<Item> = docs.iter().map(|(n, t)| Item { name: n, text: t }).collect();
        let run = |threads| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| copies(&its, DedupMode::Near));
        let one = run(1);
        assert_eq!(one, run(4));
        assert!(one.iter().filter(|v| v.is_some()).count() > 0);
    }

    #[test]
    fn many_copies_of_one_file_form_one_group_in_linear_work() {
        let docs: Vec<(String, String)> = (0..200).map(|i| (format!("copy{i:03}.py"), format!("{} tail{i}", text(300, 0, 0)))).collect();
        let its: Vec<Item> = docs.iter().map(|(n, t)| Item { name: n, text: t }).collect();
        let got = copies(&its, DedupMode::Near);
        assert_eq!(got[0], None);
        assert!(got[1..].iter().all(|v| *v == Some(Dup::Near { of: 0 })));
    }

    #[test]
    fn leaks_are_validation_copies_of_training_documents() {
        let train = [("t/a.py", text(150, 0, 0)), ("t/b.py", text(150, 0, 7).replace('w', "v"))];
        let val = [("v/a.py", text(150, 1, 3)), ("v/b.py", train[1].1.clone()), ("v/c.py", "fresh code here".to_string())];
        let leaks = |mode| find_leaks(&items(&train), &signatures(&items(&train), mode), &items(&val), mode, 0.85);
        let got = leaks(DedupMode::Near);
        assert_eq!(got, [Some(Dup::Near { of: 0 }), Some(Dup::Exact { of: 1 }), None]);
        let exact = leaks(DedupMode::Exact);
        assert_eq!(exact, [None, Some(Dup::Exact { of: 1 }), None]);
    }
}
