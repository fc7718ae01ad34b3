//! A choice's text as its tokens arrive: decoded incrementally (a token that ends inside a UTF-8
//! character waits for the rest), cut at the first stop string, and released only once it can
//! no longer turn out to be the start of one, so a stream never sends text it must take back.

use tokenizers::Tokenizer;

/// The decoded text of one choice and how much of it was released.
pub struct TextState {
    ids: Vec<u32>,
    /// Tokens before `prefix` are decoded into `text`; `prefix..read` is the context that the
    /// next tokens are decoded with (a decoder may treat a token differently at the start).
    prefix: usize,
    read: usize,
    text: String,
    /// Bytes of `text` released so far.
    released: usize,
    stops: Vec<String>,
    /// Where a stop string cut the text, once one did.
    stopped_at: Option<usize>,
}

/// What one token added.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    /// Text released now.
    pub text: String,
    /// Byte offset in the choice's text where this token's text starts.
    pub offset: usize,
    /// A stop string ended the choice.
    pub stopped: bool,
}

impl TextState {
    pub fn new(stops: Vec<String>) -> Self {
        Self { ids: vec![], prefix: 0, read: 0, text: String::new(), released: 0, stops, stopped_at: None }
    }

    /// Adds token `id`; returns the text it releases.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Delta {
        let offset = self.text.len();
        if self.stopped_at.is_some() {
            return Delta { offset, stopped: true, ..Default::default() };
        }
        self.ids.push(id);
        let decode = |ids: &[u32]| tokenizer.decode(ids, true).unwrap_or_default();
        let before = decode(&self.ids[self.prefix..self.read]);
        let after = decode(&self.ids[self.prefix..]);
        // A trailing U+FFFD is a character whose bytes have not all arrived yet.
        let new = after.get(before.len()..).filter(|new| !new.is_empty() && !after.ends_with('\u{FFFD}'));
        if let Some(new) = new {
            let searched_from = self.text.len().saturating_sub(self.longest_stop());
            self.text.push_str(new);
            self.prefix = self.read;
            self.read = self.ids.len();
            if let Some(at) = find_stop(&self.text, searched_from, &self.stops) {
                self.stopped_at = Some(at);
                self.text.truncate(at);
                return Delta { text: self.release(self.text.len()), offset, stopped: true };
            }
        }
        let safe = self.text.len() - held_back(&self.text, &self.stops);
        Delta { text: self.release(safe), offset, stopped: false }
    }

    /// The rest of the text, at the end of the choice.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> String {
        if self.stopped_at.is_none() && self.read < self.ids.len() {
            // Bytes that never completed a character: decoded as they are, like a full decode.
            let before = tokenizer.decode(&self.ids[self.prefix..self.read], true).unwrap_or_default();
            let after = tokenizer.decode(&self.ids[self.prefix..], true).unwrap_or_default();
            self.text.push_str(after.get(before.len()..).unwrap_or_default());
            if let Some(at) = find_stop(&self.text, 0, &self.stops) {
                self.stopped_at = Some(at);
                self.text.truncate(at);
            }
        }
        self.release(self.text.len())
    }

    /// All the text so far (stop string cut).
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn stopped(&self) -> bool {
        self.stopped_at.is_some()
    }

    fn release(&mut self, upto: usize) -> String {
        if upto <= self.released {
            return String::new();
        }
        let out = self.text[self.released..upto].to_string();
        self.released = upto;
        out
    }

    fn longest_stop(&self) -> usize {
        self.stops.iter().map(String::len).max().unwrap_or(0)
    }
}

/// The byte offset of the first stop string in `text` that starts at or after `from` (the
/// caller starts `from` a longest stop string before the new text, so none is missed).
pub fn find_stop(text: &str, from: usize, stops: &[String]) -> Option<usize> {
    let from = floor_char_boundary(text, from);
    stops.iter().filter_map(|stop| text[from..].find(stop.as_str()).map(|i| from + i)).min()
}

/// How many trailing bytes of `text` could be the start of a stop string (the longest such
/// suffix that is a proper prefix of one), so must wait for more text.
pub fn held_back(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|stop| (1..stop.len()).filter(|&n| stop.is_char_boundary(n)).map(move |n| &stop[..n]))
        .filter(|prefix| text.ends_with(prefix))
        .map(str::len)
        .max()
        .unwrap_or(0)
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn stop_strings_are_found_from_where_new_text_could_complete_them() {
        let s = stops(&["\n\n", "END"]);
        assert_eq!(find_stop("a\n\nb", 0, &s), Some(1));
        assert_eq!(find_stop("abcEN", 0, &s), None);
        assert_eq!(find_stop("abcEND", 4, &s), None, "only stops that reach past `from` count");
        assert_eq!(find_stop("abcEND", 3, &s), Some(3));
        assert_eq!(find_stop("xENDy\n\n", 0, &s), Some(1), "the first one wins");
        assert_eq!(find_stop("é\n\n", 1, &s), Some(2), "from is moved to a character boundary");
        assert_eq!(find_stop("abc", 0, &[]), None);
    }

    #[test]
    fn a_possible_start_of_a_stop_string_is_held_back() {
        let s = stops(&["\n\n", "</code>"]);
        assert_eq!(held_back("x = 1\n", &s), 1);
        assert_eq!(held_back("x </co", &s), 4);
        assert_eq!(held_back("x </cx", &s), 0);
        assert_eq!(held_back("done", &s), 0);
        assert_eq!(held_back("a<", &stops(&["<é>"])), 1);
        assert_eq!(held_back("anything", &[]), 0);
    }
}
