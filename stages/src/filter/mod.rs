//! Data-quality filtering in the spirit of phi-1 ("Textbooks Are All You Need"): score code
//! for "educational value", keep the best, remove duplicates and eval-set contamination.
//!
//! Everything here is library logic with option structs (serde `Deserialize`,
//! `deny_unknown_fields`, every field defaulted so they double as manifest parameters) and
//! result/report structs (`Serialize`). The engine's stage wrappers live elsewhere.
//!
//! Records are seen through the small [`TextRecord`] trait (an id and a text), so the
//! pipeline's own record type only needs a two-line impl to use these filters.
//!
//! Submodules, in pipeline order:
//! - [`heuristic`]: a parser-based (tree-sitter) scorer of Python code, score in `[0, 1]`.
//! - [`embed`] + [`classifier`] + [`learned`]: phi-1's learned scorer, MiniLM embeddings +
//!   logistic regression.
//! - [`select`]: keep by threshold or top-k, deterministic seeded sampling.
//! - [`dedup`]: exact (blake3 of normalised text) and near-duplicate (MinHash + LSH) removal.
//! - [`decontam`]: 13-gram overlap (and optional embedding similarity) against eval sets.
//! - [`report`]: the common JSON report every filter returns.
//! - [`chain`]: dedup → decontamination → heuristic → sample in one call.

pub mod chain;
pub mod classifier;
pub mod decontam;
pub mod dedup;
pub mod embed;
pub mod heuristic;
pub mod learned;
pub mod report;
pub mod select;
pub mod text;

use std::path::PathBuf;

/// The minimal view of a record the filters need: a stable id and the text to judge.
pub trait TextRecord {
    /// Stable identifier used in reports (e.g. `repo/path` or a row number).
    fn id(&self) -> &str;
    /// The text (code, or instruction + answer) that is scored, hashed or matched.
    fn text(&self) -> &str;
}

impl TextRecord for (String, String) {
    fn id(&self) -> &str {
        &self.0
    }
    fn text(&self) -> &str {
        &self.1
    }
}

impl TextRecord for (&str, &str) {
    fn id(&self) -> &str {
        self.0
    }
    fn text(&self) -> &str {
        self.1
    }
}

impl<T: TextRecord + ?Sized> TextRecord for &T {
    fn id(&self) -> &str {
        (**self).id()
    }
    fn text(&self) -> &str {
        (**self).text()
    }
}

/// Errors from the filter stages. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// A file could not be read or written.
    #[error("cannot access {path}: {source}; check the path exists and is readable")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (classifier, eval set, config) is malformed.
    #[error("cannot parse JSON in {path}: {source}; is it the right file and not truncated?")]
    Json {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// Options are inconsistent (e.g. bands x rows != permutations).
    #[error("invalid filter options: {0}")]
    InvalidOptions(String),
    /// Training data cannot produce a classifier (e.g. only one class).
    #[error("cannot train classifier: {0}")]
    Training(String),
    /// The embedding model files are missing or unusable.
    #[error("embedding model error: {0}")]
    Model(String),
    /// The Python grammar cannot load (a build problem).
    #[error(transparent)]
    Grammar(#[from] crate::python::GrammarMismatch),
    /// A tensor operation in candle failed.
    #[error("tensor error in embedding model: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result type of the filter stages.
pub type Result<T> = std::result::Result<T, FilterError>;

/// Where the shared read-only data lives: `$PIPELINE_SHARED_DATA`, else
/// `<repo root>/../shared/data` (the CI layout), found from this crate's manifest dir.
///
/// Returns `None` when neither exists, so tests and callers can skip with a message.
pub fn shared_data_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PIPELINE_SHARED_DATA") {
        let dir = PathBuf::from(dir);
        if dir.is_dir() {
            return Some(dir);
        }
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    dir.is_dir().then_some(dir)
}
