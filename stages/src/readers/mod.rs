//! Dataset readers: JSON arrays, JSON Lines, gzip of either, Parquet, and directories of
//! source files, all producing [`Record`]s.
//!
//! Entry point: [`read_source`] with [`ReadOptions`] (which doubles as a manifest
//! parameter struct). Output fields can be renamed and selected with a mapping
//! (`fields = { text = "content" }`: output field `text` <- source field `content`).
//! Non-string JSON values become strings (`null` -> empty, numbers and lists -> compact
//! JSON), so every dataset fits the one [`Record`] type.

// Errors carry the offending source line for miette's snippet rendering; they are built
// only on the cold error path, so their size does not matter.
#![allow(clippy::result_large_err)]

mod dir;
pub mod glob;
mod json;
mod parquet;

use std::path::{Path, PathBuf};

use miette::{Diagnostic, SourceSpan};

use crate::snippet::LineSource;
use serde::{Deserialize, Serialize};

use crate::records::{Fields, Provenance, Record, RecordsError};

/// Which reader to use.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// A directory is read as source files; a `.parquet` file as Parquet; any other file
    /// (gzip or not) as a JSON array if its first non-blank character is `[`, else JSON Lines.
    #[default]
    Auto,
    /// A JSON array of objects.
    Json,
    /// One JSON object per line.
    Jsonl,
    /// Apache Parquet.
    Parquet,
    /// A directory of files, one record per file.
    Dir,
}

/// What to do with a record that cannot be read (malformed JSON, not an object, not UTF-8,
/// lacking a mapped field).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ErrorPolicy {
    /// Stop with an error naming the file and line/row.
    #[default]
    Fail,
    /// Skip it and count it in [`ReadStats::skipped`].
    Skip,
}

/// Options for [`read_source`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReadOptions {
    /// Which reader to use (default: detect).
    pub format: Format,
    /// Output field <- source field. Empty keeps every source field as is; otherwise only
    /// the mapped fields are kept, in mapping order.
    pub fields: Fields,
    /// Keep only the first N records (after skipping bad ones).
    pub limit: Option<u64>,
    /// What to do with bad records.
    pub on_error: ErrorPolicy,
    /// Directory sources: glob patterns relative to the directory (`**/*.py`); empty = all.
    pub include: Vec<String>,
    /// Directory sources: file extensions to keep (`py` or `.py`); empty = all.
    pub extensions: Vec<String>,
    /// Directory sources: the field holding the file's text.
    pub text_field: String,
    /// Directory sources: the field holding the file's path relative to the directory.
    pub path_field: String,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            format: Format::Auto,
            fields: Fields::new(),
            limit: None,
            on_error: ErrorPolicy::Fail,
            include: Vec::new(),
            extensions: Vec::new(),
            text_field: "content".into(),
            path_field: "path".into(),
        }
    }
}

/// Counts from one read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadStats {
    /// The format actually used.
    pub format: Option<Format>,
    /// Files read (1 unless the source is a directory).
    pub files: u64,
    /// Records returned.
    pub records: u64,
    /// Bad records skipped under [`ErrorPolicy::Skip`].
    pub skipped: u64,
    /// The first few skip reasons (location: message), for the run report.
    pub skipped_examples: Vec<String>,
    /// Whether reading stopped early because `limit` was reached.
    pub limit_reached: bool,
}

/// How many skip reasons [`ReadStats::skipped_examples`] keeps.
const MAX_SKIP_EXAMPLES: usize = 10;

/// Errors from [`read_source`].
#[derive(Debug, thiserror::Error, Diagnostic)]
pub enum ReadError {
    /// The input could not be opened or read.
    #[error("cannot read {path}")]
    #[diagnostic(
        code(pipeline::read::io),
        help("check that the path exists and is readable")
    )]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// One record (line, element or row) is malformed.
    #[error("{location}: malformed record: {message}")]
    #[diagnostic(
        code(pipeline::read::malformed),
        help("fix the input, or set `on_error = \"skip\"` to skip and count bad records")
    )]
    Malformed {
        /// `file:line` or `file row N`.
        location: String,
        /// What is wrong.
        message: String,
        /// The offending line.
        #[source_code]
        src: LineSource,
        /// Where on it.
        #[label("here")]
        span: SourceSpan,
    },
    /// A JSON array file is not valid JSON (the whole file is unusable).
    #[error("{location}: invalid JSON: {message}")]
    #[diagnostic(
        code(pipeline::read::json),
        help("a JSON array source must be one valid JSON document; for one object per line use format = \"jsonl\"")
    )]
    Json {
        /// `file:line:column`.
        location: String,
        /// What serde said.
        message: String,
        /// The offending line.
        #[source_code]
        src: LineSource,
        /// Where on it.
        #[label("here")]
        span: SourceSpan,
    },
    /// Text that is not valid UTF-8.
    #[error("{location}: not valid UTF-8 (first bad byte at offset {byte_offset})")]
    #[diagnostic(
        code(pipeline::read::not_utf8),
        help("convert the input to UTF-8 (e.g. `iconv -t UTF-8`), or set `on_error = \"skip\"`")
    )]
    NotUtf8 {
        /// Where.
        location: String,
        /// Byte offset of the first invalid byte within the line / file / value.
        byte_offset: u64,
        /// The offending line, lossily decoded.
        #[source_code]
        src: LineSource,
        /// The bad byte.
        #[label("invalid UTF-8")]
        span: SourceSpan,
    },
    /// A mapped source field does not exist in a record.
    #[error("{location}: no field `{field}` (mapped to `{output}`)")]
    #[diagnostic(
        code(pipeline::read::missing_field),
        help("the record has these fields: [{available}]; fix the `fields` mapping")
    )]
    MissingField {
        /// Where.
        location: String,
        /// The source field asked for.
        field: String,
        /// The output field it was mapped to.
        output: String,
        /// Comma-separated fields that do exist.
        available: String,
    },
    /// The Parquet file is invalid or uses an unsupported feature.
    #[error("cannot read Parquet file {path}: {message}")]
    #[diagnostic(
        code(pipeline::read::parquet),
        help(
            "only uncompressed and snappy-compressed Parquet are supported; re-encode other codecs"
        )
    )]
    Parquet {
        /// The file.
        path: PathBuf,
        /// What the parquet crate said.
        message: String,
    },
    /// The format cannot be used with this path.
    #[error("{path}: {message}")]
    #[diagnostic(code(pipeline::read::format))]
    Format {
        /// The input.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An `include` pattern is not a valid glob.
    #[error(transparent)]
    #[diagnostic(transparent)]
    Glob(#[from] glob::InvalidGlob),
    /// Writing the records artifact failed.
    #[error(transparent)]
    #[diagnostic(transparent)]
    Records(#[from] RecordsError),
    /// Nothing was read.
    #[error("no records read from {path}")]
    #[diagnostic(code(pipeline::read::empty), help("{hint}"))]
    Empty {
        /// The input.
        path: PathBuf,
        /// What probably went wrong.
        hint: String,
    },
}

/// A record as read, before field mapping.
pub(crate) struct RawRecord {
    pub(crate) fields: Fields,
    pub(crate) provenance: Provenance,
}

/// Whether a reader should keep going.
pub(crate) enum Flow {
    Continue,
    Stop,
}

/// Every regular file under `root`, as (relative `/`-separated path, full path), sorted.
pub fn walk_files(root: &Path) -> Result<Vec<(String, PathBuf)>, ReadError> {
    dir::walk(root)
}

fn detect_format(path: &Path) -> Result<Format, ReadError> {
    if path.is_dir() {
        return Ok(Format::Dir);
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if name.ends_with(".parquet") {
        return Ok(Format::Parquet);
    }
    let mut input = json::open_maybe_gzip(path)?;
    let mut buf = [0u8; 1];
    loop {
        use std::io::Read;
        match input.read(&mut buf) {
            Ok(0) => return Ok(Format::Jsonl),
            Ok(_)
                if buf[0].is_ascii_whitespace()
                    || buf[0] == 0xEF
                    || buf[0] == 0xBB
                    || buf[0] == 0xBF => {}
            Ok(_) => {
                return Ok(if buf[0] == b'[' {
                    Format::Json
                } else {
                    Format::Jsonl
                })
            }
            Err(source) => {
                return Err(ReadError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Reads the dataset at `path` (a file or a directory) into records.
pub fn read_source(path: &Path, opts: &ReadOptions) -> Result<(Vec<Record>, ReadStats), ReadError> {
    let format = match opts.format {
        Format::Auto => detect_format(path)?,
        f => f,
    };
    if format == Format::Dir && !path.is_dir() {
        return Err(ReadError::Format {
            path: path.to_path_buf(),
            message: "format \"dir\" needs a directory".into(),
        });
    }
    if format != Format::Dir && path.is_dir() {
        return Err(ReadError::Format {
            path: path.to_path_buf(),
            message: format!("is a directory, but format is {format:?}; use format = \"dir\""),
        });
    }
    let mut stats = ReadStats {
        format: Some(format),
        files: 1,
        ..Default::default()
    };
    let mut out = Vec::new();
    let limit = opts.limit;
    let mut emit = |item: Result<RawRecord, ReadError>| -> Result<Flow, ReadError> {
        if limit.is_some_and(|l| out.len() as u64 >= l) {
            stats.limit_reached = true;
            return Ok(Flow::Stop);
        }
        match item.and_then(|raw| map_fields(raw, &opts.fields)) {
            Ok(rec) => out.push(rec),
            Err(e) if opts.on_error == ErrorPolicy::Skip => {
                stats.skipped += 1;
                if stats.skipped_examples.len() < MAX_SKIP_EXAMPLES {
                    stats.skipped_examples.push(e.to_string());
                }
                tracing::debug!("skipped bad record: {e}");
            }
            Err(e) => return Err(e),
        }
        Ok(Flow::Continue)
    };
    match format {
        Format::Jsonl => json::read_jsonl(path, json::open_maybe_gzip(path)?, &mut emit)?,
        Format::Json => json::read_json_array(path, json::open_maybe_gzip(path)?, &mut emit)?,
        Format::Parquet => parquet::read_parquet(path, &mut emit)?,
        Format::Dir => stats.files = dir::read_dir(path, opts, &mut emit)?,
        Format::Auto => {
            return Err(ReadError::Format {
                path: path.to_path_buf(),
                message: "could not detect the format; set `format`".into(),
            })
        }
    }
    if out.is_empty() {
        let hint = if stats.skipped > 0 {
            format!(
                "all {} records were skipped; first reason: {}",
                stats.skipped,
                stats.skipped_examples.first().map_or("", String::as_str)
            )
        } else if format == Format::Dir {
            "no file matched; check `include` and `extensions`".to_string()
        } else if limit == Some(0) {
            "`limit` is 0".to_string()
        } else {
            "the input is empty".to_string()
        };
        return Err(ReadError::Empty {
            path: path.to_path_buf(),
            hint,
        });
    }
    stats.records = out.len() as u64;
    Ok((out, stats))
}

/// Reads the dataset at `input` and writes it as a `records.jsonl` artifact at `out`.
pub fn read_to_jsonl(input: &Path, opts: &ReadOptions, out: &Path) -> Result<ReadStats, ReadError> {
    let (records, stats) = read_source(input, opts)?;
    crate::records::write_records(out, &records)?;
    Ok(stats)
}

fn map_fields(raw: RawRecord, mapping: &Fields) -> Result<Record, ReadError> {
    if mapping.is_empty() {
        return Ok(Record::new(raw.fields, raw.provenance));
    }
    let mut fields = Fields::new();
    for (output, source) in mapping.iter() {
        match raw.fields.get(source) {
            Some(v) => fields.insert(output, v),
            None => {
                return Err(ReadError::MissingField {
                    location: raw.provenance.to_string(),
                    field: source.to_string(),
                    output: output.to_string(),
                    available: raw.fields.names().collect::<Vec<_>>().join(", "),
                })
            }
        }
    }
    Ok(Record::new(fields, raw.provenance))
}
