//! Problems, samples and results in OpenAI human-eval's JSON Lines formats.
//!
//! * problems: one object per line with `task_id`, `prompt`, `entry_point`, `test`
//!   (other fields such as `canonical_solution` are ignored); plain or gzip-compressed
//!   (detected from the gzip magic bytes, not the file name).
//! * samples: `{"task_id", "completion", ...}`; unknown fields are preserved.
//! * results: each sample plus `passed` (bool) and `result` (`"passed"`,
//!   `"failed: <message>"` or `"timed out"`), like human-eval's `<samples>_results.jsonl`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::json::JsonError;

/// A programming problem graded by executing its `test` against a completion.
///
/// MBPP and other benchmarks are mapped to this shape by their loaders: `prompt` is the
/// code the completion continues, `test` defines `check(candidate)`, and `entry_point`
/// names the function passed to `check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Unique id, e.g. `HumanEval/0`.
    pub task_id: String,
    /// Code (signature + docstring) that the completion continues.
    pub prompt: String,
    /// Test code defining `check(candidate)`.
    pub test: String,
    /// Name of the function under test.
    pub entry_point: String,
}

/// One generated completion for a problem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The problem this completion answers.
    pub task_id: String,
    /// Code appended to the problem's prompt.
    pub completion: String,
    /// Fields other than `task_id`/`completion`, kept so results round-trip them.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Errors reading or writing human-eval style files.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum IoError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    #[diagnostic(help("check that the path exists and is readable"))]
    Read {
        /// File being read.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file could not be written.
    #[error("cannot write {path}: {source}")]
    #[diagnostic(help("check that the directory exists and is writable"))]
    Write {
        /// File being written.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A line is not valid JSON of the expected shape.
    #[error("{path}:{line}: {source}")]
    #[diagnostic(help(
        "each line must be one JSON object; problems need task_id, prompt, test, entry_point \
         and samples need task_id, completion"
    ))]
    Parse {
        /// File being parsed.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Underlying error.
        source: serde_json::Error,
    },
    /// A line is not UTF-8 text.
    #[error("{path}:{line}: not UTF-8 text (invalid byte at column {column})")]
    #[diagnostic(help(
        "samples and problems files are UTF-8 JSON Lines; fix or re-encode that line"
    ))]
    NotUtf8 {
        /// File being parsed.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// 1-based byte column of the first invalid byte.
        column: usize,
    },
    /// Two problems share a task id.
    #[error("{path}: duplicate task_id {task_id:?}")]
    #[diagnostic(help("task ids must be unique within a problems file"))]
    DuplicateTask {
        /// File being parsed.
        path: PathBuf,
        /// The repeated id.
        task_id: String,
    },
}

/// Reads JSON Lines into `T`, skipping blank lines; gzip is decompressed on the fly.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, IoError> {
    crate::json::read_jsonl(path).map_err(|e| match e {
        JsonError::Read { path, source } | JsonError::Write { path, source } => {
            IoError::Read { path, source }
        }
        JsonError::Parse { path, line, source } => IoError::Parse { path, line, source },
        JsonError::NotUtf8 { path, line, column } => IoError::NotUtf8 { path, line, column },
    })
}

/// Reads a problems file (JSONL, optionally gzip), rejecting duplicate task ids.
pub fn read_problems(path: &Path) -> Result<Vec<Problem>, IoError> {
    let problems: Vec<Problem> = read_jsonl(path)?;
    let mut seen = std::collections::HashSet::new();
    for p in &problems {
        if !seen.insert(p.task_id.as_str()) {
            return Err(IoError::DuplicateTask {
                path: path.to_path_buf(),
                task_id: p.task_id.clone(),
            });
        }
    }
    Ok(problems)
}

/// Reads a samples file (JSONL, optionally gzip) in file order.
pub fn read_samples(path: &Path) -> Result<Vec<Sample>, IoError> {
    read_jsonl(path)
}

/// Writes values as JSON Lines (one compact object per line).
pub fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<(), IoError> {
    crate::json::write_jsonl(path, rows).map_err(|e| match e {
        JsonError::Read { path, source } | JsonError::Write { path, source } => {
            IoError::Write { path, source }
        }
        JsonError::Parse { path, source, .. } => IoError::Write {
            path,
            source: std::io::Error::other(source),
        },
        // Writing never decodes text.
        JsonError::NotUtf8 { path, .. } => IoError::Write {
            path,
            source: std::io::Error::other("not UTF-8"),
        },
    })
}
