//! Next-line completion metrics as the code-completion literature computes them: exact match as
//! RepoBench (the lines' whitespace-separated tokens are equal) and edit similarity as rapidfuzz
//! `fuzz.ratio` (100 (1 - indel / (len_a + len_b)) over characters, substitutions costing 2), both
//! 0-100. Whitespace is Python's (`str.split`, `str.strip`), so the numbers equal the Python tools'.

/// Python's `str.isspace` for one character: Unicode White_Space plus the separators U+001C-U+001F.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `pred.split() == target.split()`, as 100 or 0.
pub fn exact_match(pred: &str, target: &str) -> f64 {
    let words = |s: &str| s.split(py_space).filter(|w| !w.is_empty()).map(str::to_string).collect::<Vec<_>>();
    if words(pred) == words(target) {
        100.0
    } else {
        0.0
    }
}

/// rapidfuzz `fuzz.ratio(pred.strip(), target.strip())`: two empty strings score 100.
pub fn edit_similarity(pred: &str, target: &str) -> f64 {
    let a: Vec<char> = pred.trim_matches(py_space).chars().collect();
    let b: Vec<char> = target.trim_matches(py_space).chars().collect();
    let total = a.len() + b.len();
    if total == 0 {
        return 100.0;
    }
    let indel = total - 2 * lcs(&a, &b);
    100.0 * (1.0 - indel as f64 / total as f64)
}

/// Length of the longest common subsequence (the indel distance is len_a + len_b - 2 LCS).
fn lcs(a: &[char], b: &[char]) -> usize {
    let mut row = vec![0usize; b.len() + 1];
    for &x in a {
        let mut diagonal = 0;
        for (j, &y) in b.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if x == y { diagonal + 1 } else { up.max(row[j]) };
            diagonal = up;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_checked_values() {
        assert_eq!(edit_similarity("", ""), 100.0);
        assert_eq!(edit_similarity("abc", ""), 0.0);
        assert_eq!(edit_similarity("  x = 1 ", "x = 1"), 100.0, "stripped first");
        // "kitten" / "sitting": LCS 4 ("ittn"), indel 13 - 8 = 5.
        assert_eq!(edit_similarity("kitten", "sitting"), 100.0 * (1.0 - 5.0 / 13.0));
        assert_eq!(exact_match("return  a +b", "return a +b"), 100.0);
        assert_eq!(exact_match("return a+b", "return a + b"), 0.0);
        assert_eq!(exact_match("", " \t"), 100.0);
        assert_eq!(exact_match("a\u{1f}b", "a b"), 100.0, "U+001F is whitespace to Python");
    }
}
