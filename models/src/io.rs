//! The crate's one way to write a file that a reader must never see half-written (adapters,
//! training checkpoints, model artifacts), and its JSON helpers.

use std::io::Write;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Writes `bytes` to `path` through a temporary file in the same directory, flushed to disk
/// and renamed over `path`: a crash leaves the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// `value` as pretty JSON with a trailing newline: the format of every JSON file the crate
/// writes.
pub fn json_text<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    serde_json::to_string_pretty(value).map(|text| text + "\n")
}

/// Why a JSON file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JsonFileError {
    /// The file could not be read.
    #[error("cannot read `{path}`: {source}", path = .path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not the JSON expected.
    #[error("invalid JSON in `{path}`: {source}", path = .path.display())]
    Parse {
        /// The file.
        path: std::path::PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
}

/// Reads and parses the JSON file at `path`.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, JsonFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| JsonFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| JsonFileError::Parse {
        path: path.to_path_buf(),
        source,
    })
}
