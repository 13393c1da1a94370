//! The crate's one JSON writer and reader, and its JSON Lines writer and reader: every artifact
//! file goes through these, so two kinds writing the same value write the same bytes.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Reading or writing a JSON (Lines) file failed.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum JsonError {
    /// The file could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    #[diagnostic(help(
        "the artifact is missing a file; connect the output of the stage kind that writes it, or re-run that stage"
    ))]
    Read {
        /// File being read.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    #[diagnostic(help("check that the directory exists, is writable and the disk is not full"))]
    Write {
        /// File being written.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A line of a JSON Lines file is not UTF-8 text.
    #[error("{}:{line}: not UTF-8 text (invalid byte at column {column})", path.display())]
    #[diagnostic(help("JSON Lines files are UTF-8; re-encode the file or fix that line"))]
    NotUtf8 {
        /// File being read.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// 1-based byte column of the first invalid byte.
        column: usize,
    },
    /// The content is not the JSON expected (`line` is 1-based; 0 for a whole-file JSON).
    #[error("{}{}: {source}", path.display(), if *line > 0 { format!(":{line}") } else { String::new() })]
    #[diagnostic(help(
        "the file is corrupt or from an incompatible version; re-run the stage that produced it"
    ))]
    Parse {
        /// File being parsed.
        path: PathBuf,
        /// 1-based line number (JSON Lines), 0 for a JSON file.
        line: usize,
        /// Underlying error.
        source: serde_json::Error,
    },
}

fn write_err(path: &Path) -> impl Fn(std::io::Error) -> JsonError + '_ {
    move |source| JsonError::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn read_err(path: &Path) -> impl Fn(std::io::Error) -> JsonError + '_ {
    move |source| JsonError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `value` to `path` as pretty JSON with a trailing newline.
pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<(), JsonError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| write_err(path)(std::io::Error::other(e)))?;
    std::fs::write(path, text + "\n").map_err(write_err(path))
}

/// Reads and parses the JSON file at `path`.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, JsonError> {
    let text = std::fs::read_to_string(path).map_err(read_err(path))?;
    serde_json::from_str(&text).map_err(|source| JsonError::Parse {
        path: path.to_path_buf(),
        line: 0,
        source,
    })
}

/// Writes `rows` to `path` as JSON Lines: one compact object per line.
pub fn write_jsonl<T: Serialize>(
    path: &Path,
    rows: impl IntoIterator<Item = T>,
) -> Result<(), JsonError> {
    let file = std::fs::File::create(path).map_err(write_err(path))?;
    let mut w = std::io::BufWriter::new(file);
    for row in rows {
        serde_json::to_writer(&mut w, &row)
            .map_err(|e| write_err(path)(std::io::Error::other(e)))?;
        w.write_all(b"\n").map_err(write_err(path))?;
    }
    w.flush().map_err(write_err(path))
}

/// Reads JSON Lines into `T`, skipping blank lines; a gzip file (detected by its magic bytes)
/// is decompressed on the fly. A malformed line is an error naming it.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, JsonError> {
    let reader = open_maybe_gz(path)?;
    let mut out = Vec::new();
    // Lines as bytes, so that a line that is not UTF-8 is named (`lines()` would only say that
    // the stream is not).
    for (i, bytes) in reader.split(b'\n').enumerate() {
        let mut bytes = bytes.map_err(read_err(path))?;
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        let line = String::from_utf8(bytes).map_err(|e| JsonError::NotUtf8 {
            path: path.to_path_buf(),
            line: i + 1,
            column: e.utf8_error().valid_up_to() + 1,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(&line).map_err(|source| JsonError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            source,
        })?;
        out.push(value);
    }
    Ok(out)
}

/// Opens a file, transparently decompressing gzip (detected by magic bytes).
fn open_maybe_gz(path: &Path) -> Result<Box<dyn BufRead>, JsonError> {
    let mut file = std::fs::File::open(path).map_err(read_err(path))?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic).map_err(read_err(path))?;
    let file = std::fs::File::open(path).map_err(read_err(path))?;
    if n == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(
            file,
        ))))
    } else {
        Ok(Box::new(BufReader::new(file)))
    }
}
