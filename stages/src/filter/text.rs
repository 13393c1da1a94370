//! Text normalisation shared by dedup and decontamination.
//!
//! Both need a view of a text that ignores formatting noise (CRLF, trailing spaces,
//! indentation width, case) so that copies differing only in layout still match.

/// Normalises a text for exact-duplicate hashing: CRLF/CR become LF, trailing whitespace
/// on each line is dropped, and leading/trailing blank lines are removed.
///
/// Indentation and case are kept, because in Python they change meaning.
pub fn normalize_for_hash(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split('\n') {
        let line = line.trim_end_matches(['\r', ' ', '\t', '\x0c']);
        out.push_str(line);
        out.push('\n');
    }
    out.trim_matches('\n').to_string()
}

/// Splits a text into lower-cased word tokens: maximal runs of alphanumerics or `_`.
///
/// Punctuation and whitespace are separators, as in phi-1's / NeMo Curator's n-gram
/// decontamination, so formatting and operator spacing never hide an overlap.
pub fn word_tokens(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut cur = String::new();
    for ch in text.chars() {
        if ch.is_alphanumeric() || ch == '_' {
            cur.extend(ch.to_lowercase());
        } else if !cur.is_empty() {
            tokens.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        tokens.push(cur);
    }
    tokens
}

/// 64-bit hashes of all contiguous `n`-grams of `tokens` (none when there are fewer than `n`).
///
/// blake3 keyed on nothing; tokens are joined with a separator byte that cannot occur in a
/// token so `["ab","c"]` and `["a","bc"]` differ.
pub fn ngram_hashes(tokens: &[String], n: usize) -> Vec<u64> {
    if n == 0 || tokens.len() < n {
        return Vec::new();
    }
    tokens
        .windows(n)
        .map(|w| {
            let mut h = blake3::Hasher::new();
            for t in w {
                h.update(t.as_bytes());
                h.update(&[0x1f]);
            }
            let bytes = h.finalize();
            let mut first = [0u8; 8];
            first.copy_from_slice(&bytes.as_bytes()[..8]);
            u64::from_le_bytes(first)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_normalisation_ignores_line_endings_and_trailing_space() {
        assert_eq!(
            normalize_for_hash("\n\na = 1  \r\nb = 2\t\r\n\n"),
            normalize_for_hash("a = 1\nb = 2")
        );
        assert_ne!(
            normalize_for_hash("if x:\n  y"),
            normalize_for_hash("if x:\ny")
        );
    }

    #[test]
    fn word_tokens_split_on_punctuation_and_lowercase() {
        assert_eq!(
            word_tokens("def Foo(x_1):\n    return x_1+2"),
            vec!["def", "foo", "x_1", "return", "x_1", "2"]
        );
    }

    #[test]
    fn ngram_hashes_are_positional_and_separator_safe() {
        let a: Vec<String> = ["ab", "c"].iter().map(|s| s.to_string()).collect();
        let b: Vec<String> = ["a", "bc"].iter().map(|s| s.to_string()).collect();
        assert_ne!(ngram_hashes(&a, 2), ngram_hashes(&b, 2));
        assert_eq!(ngram_hashes(&a, 3).len(), 0);
        let c: Vec<String> = ["x", "y", "z"].iter().map(|s| s.to_string()).collect();
        assert_eq!(ngram_hashes(&c, 2).len(), 2);
    }
}
