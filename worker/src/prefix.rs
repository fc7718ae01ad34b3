//! The server's prefix cache: recent prompts' keys and values by their token ids, within a budget
//! of tokens, the least recently used leaving first. A prompt starts from the entry sharing its
//! longest start (an editor's next request repeats the file above the cursor), so several
//! editors' requests, interleaved, each find their own.

use std::collections::VecDeque;

use crate::model::KvCache;

pub struct PrefixCache {
    /// Most recently used first.
    entries: VecDeque<(Vec<u32>, KvCache)>,
    /// Tokens the entries may hold together.
    budget: usize,
}

impl PrefixCache {
    pub fn new(budget: usize) -> Self {
        Self { entries: VecDeque::new(), budget }
    }

    /// Tokens held.
    pub fn tokens(&self) -> usize {
        self.entries.iter().map(|(ids, _)| ids.len()).sum()
    }

    /// The keys and values of `prompt`'s longest start that an entry holds, short of its last
    /// token (whose logits a prefill must give); none when no entry shares its first token. The
    /// entry becomes the most recently used.
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<(usize, KvCache)> {
        let common = |ids: &[u32]| ids.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(prompt.len().saturating_sub(1));
        let (best, len) =
            self.entries.iter().enumerate().map(|(i, (ids, _))| (i, common(ids))).max_by_key(|&(i, len)| (len, usize::MAX - i))?;
        if len == 0 {
            return None;
        }
        let entry = self.entries.remove(best).expect("an index of entries");
        let view = entry.1.prefix(len as i64);
        self.entries.push_front(entry);
        Some((len, view))
    }

    /// Keeps `cache`, the keys and values of all of `ids`, as the most recently used entry; an
    /// entry it extends (or repeats) goes, and the least recently used go while over the budget.
    /// A prompt longer than the budget is not kept.
    pub fn insert(&mut self, ids: &[u32], cache: KvCache) {
        if ids.len() > self.budget {
            return;
        }
        self.entries.retain(|(held, _)| !ids.starts_with(held));
        self.entries.push_front((ids.to_vec(), cache));
        while self.tokens() > self.budget {
            self.entries.pop_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    /// A one-layer cache whose keys are the token ids (1, 1, T, 1), so a view shows what it holds.
    fn cache_of(ids: &[u32]) -> KvCache {
        let keys = Tensor::from_slice(&ids.iter().map(|&i| i as f32).collect::<Vec<_>>()).view([1, 1, -1, 1]);
        KvCache { layers: vec![(keys.copy(), keys)] }
    }

    fn held(cache: &KvCache) -> Vec<u32> {
        Vec::<f32>::try_from(cache.layers[0].0.reshape([-1])).unwrap().into_iter().map(|x| x as u32).collect()
    }

    #[test]
    fn a_prompt_starts_from_the_entry_sharing_its_longest_start_short_of_its_last_token() {
        let mut cache = PrefixCache::new(100);
        cache.insert(&[1, 2, 3, 4], cache_of(&[1, 2, 3, 4]));
        cache.insert(&[1, 2, 9], cache_of(&[1, 2, 9]));
        cache.insert(&[7, 8], cache_of(&[7, 8]));
        let (len, view) = cache.lookup(&[1, 2, 3, 5, 6]).unwrap();
        assert_eq!((len, held(&view)), (3, vec![1, 2, 3]));
        // The whole prompt held: all but its last token.
        let (len, view) = cache.lookup(&[1, 2, 3, 4]).unwrap();
        assert_eq!((len, held(&view)), (3, vec![1, 2, 3]));
        assert!(cache.lookup(&[5, 1, 2]).is_none(), "nothing shares the first token");
        assert!(cache.lookup(&[1]).is_none(), "a one-token prompt has nothing to reuse");
    }

    #[test]
    fn extended_entries_go_and_the_least_recently_used_leave_over_the_budget() {
        let mut cache = PrefixCache::new(10);
        cache.insert(&[1, 2, 3], cache_of(&[1, 2, 3]));
        cache.insert(&[5, 6, 7], cache_of(&[5, 6, 7]));
        cache.insert(&[1, 2, 3, 4], cache_of(&[1, 2, 3, 4])); // extends the first: it goes
        assert_eq!(cache.tokens(), 7);
        assert!(cache.lookup(&[5, 6, 7, 8]).is_some(), "used: now the most recent");
        cache.insert(&[9, 9, 9, 9], cache_of(&[9, 9, 9, 9])); // 11 tokens: the least recent leaves
        assert_eq!(cache.tokens(), 7);
        assert!(cache.lookup(&[1, 2, 3, 4, 5]).is_none(), "[1, 2, 3, 4] was the least recently used");
        assert_eq!(cache.lookup(&[5, 6, 7, 0]).map(|(len, _)| len), Some(3));
        cache.insert(&[0; 11], cache_of(&[0; 11]));
        assert_eq!(cache.tokens(), 7, "a prompt over the budget is not kept");
    }
}
