//! Where a next-line evaluation asks for completions: the non-blank lines after the first of each
//! held-out document, drawn with a seeded generator round-robin across documents (in a shuffled
//! order), and the prompt for each: the document up to that line, cut to its last tokens.

use zerotune_data::rng::shuffle;

use crate::sample::Rng;

/// One line to predict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    /// The document's index in the evaluation set.
    pub doc: usize,
    /// 1-based line number.
    pub line: usize,
    /// Byte offset where the line starts: the prompt is the text before it.
    pub start: usize,
    /// The line, without its newline.
    pub target: String,
}

/// The candidate lines of one document: every non-blank line after the first.
pub fn candidates(doc: usize, text: &str) -> Vec<Position> {
    let mut out = vec![];
    let mut start = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let target = line.strip_suffix('\n').unwrap_or(line);
        if i > 0 && !target.trim().is_empty() {
            out.push(Position { doc, line: i + 1, start, target: target.to_string() });
        }
        start += line.len();
    }
    out
}

/// Up to `n` positions: each document's candidates shuffled, the documents visited in a shuffled
/// order, one position from each in turn. Sorted by (document, line). The same seed draws the
/// same positions.
pub fn draw(per_doc: Vec<Vec<Position>>, n: usize, seed: u64) -> Vec<Position> {
    let mut rng = Rng::new(seed, 0);
    let mut order: Vec<usize> = (0..per_doc.len()).collect();
    shuffle(&mut order, rng.inner());
    let mut queues: Vec<Vec<Position>> = per_doc;
    for queue in &mut queues {
        shuffle(queue, rng.inner());
    }
    let mut drawn = vec![];
    while drawn.len() < n {
        let before = drawn.len();
        for &d in &order {
            if drawn.len() == n {
                break;
            }
            if let Some(p) = queues[d].pop() {
                drawn.push(p);
            }
        }
        if drawn.len() == before {
            break; // every candidate is taken
        }
    }
    drawn.sort_by_key(|p| (p.doc, p.line));
    drawn
}

/// The last `limit` of `ids`.
pub fn cut_left(ids: &[u32], limit: usize) -> &[u32] {
    &ids[ids.len().saturating_sub(limit)..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_skip_the_first_and_blank_lines() {
        let text = "import os\n\nx = 1\n   \ny = 2";
        let got = candidates(3, text);
        assert_eq!(got.iter().map(|p| (p.line, p.target.as_str())).collect::<Vec<_>>(), [(3, "x = 1"), (5, "y = 2")]);
        assert_eq!(&text[..got[0].start], "import os\n\n");
        assert!(candidates(0, "only one line\n").is_empty());
    }

    #[test]
    fn draws_are_seeded_spread_and_bounded() {
        let docs: Vec<Vec<Position>> = (0..4).map(|d| candidates(d, &"line\n".repeat(10))).collect();
        let a = draw(docs.clone(), 8, 1);
        assert_eq!(a, draw(docs.clone(), 8, 1), "the same seed draws the same positions");
        assert_ne!(a, draw(docs.clone(), 8, 2));
        for d in 0..4 {
            assert_eq!(a.iter().filter(|p| p.doc == d).count(), 2, "round-robin over documents");
        }
        assert_eq!(draw(docs.clone(), 100, 1).len(), 36, "all candidates when fewer than asked");
        assert_eq!(cut_left(&[1, 2, 3], 2), [2, 3]);
        assert_eq!(cut_left(&[1], 5), [1]);
    }
}
