//! The one record type shared by every dataset, and its on-disk artifact format.
//!
//! Stages hand data to each other as `records.jsonl`: one JSON object per line,
//! `{"fields": {...}, "source": "...", "line": N}` (or `"row": N`). Field order is
//! preserved end to end so that a record read back prints exactly like the source.

// The parse error carries the offending line for miette's snippet rendering; it is built
// only on the cold error path, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use miette::{Diagnostic, SourceSpan};

use crate::snippet::LineSource;
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where a record came from, so that later stages can point users back at the input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Provenance {
    /// The file the record was read from (as given to the reader).
    pub source: String,
    /// 1-based line number, for line-oriented sources (JSON Lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// 0-based row / element index, for sources without meaningful lines
    /// (JSON arrays, Parquet, one file per record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row: Option<u64>,
}

impl std::fmt::Display for Provenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, self.row) {
            (Some(line), _) => write!(f, "{}:{line}", self.source),
            (None, Some(row)) => write!(f, "{} row {row}", self.source),
            (None, None) => write!(f, "{}", self.source),
        }
    }
}

/// An insertion-ordered map of field name to string value.
///
/// A `Vec` rather than a hash map: records have a handful of fields, and order matters
/// for reproducible output and for readable diffs of artifacts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fields(Vec<(String, String)>);

impl Fields {
    /// An empty field map.
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// The value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets `name` to `value`, replacing an existing value in place (keeping its position).
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        match self.0.iter_mut().find(|(k, _)| *k == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }

    /// Removes `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let pos = self.0.iter().position(|(k, _)| k == name)?;
        Some(self.0.remove(pos).1)
    }

    /// The field names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }

    /// `(name, value)` pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no fields.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Fields {
    fn from_iter<T: IntoIterator<Item = (K, V)>>(iter: T) -> Self {
        let mut f = Fields::new();
        for (k, v) in iter {
            f.insert(k, v);
        }
        f
    }
}

impl Serialize for Fields {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl schemars::JsonSchema for Fields {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Fields".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "additionalProperties": { "type": "string" }
        })
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of string fields")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut fields = Fields::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    fields.insert(k, v);
                }
                Ok(fields)
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// One example of any dataset: named string fields plus where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Record {
    /// The record's fields, in source order (or mapping order when a field mapping was used).
    pub fields: Fields,
    /// Where the record was read from.
    #[serde(flatten)]
    pub provenance: Provenance,
}

impl Record {
    /// A record with the given fields and provenance.
    pub fn new(fields: Fields, provenance: Provenance) -> Self {
        Self { fields, provenance }
    }

    /// The value of field `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields.get(name)
    }

    /// The value of field `name`, or an error naming the fields that do exist.
    pub fn require(&self, name: &str) -> Result<&str, MissingFieldError> {
        self.get(name).ok_or_else(|| MissingFieldError {
            field: name.to_string(),
            location: self.provenance.to_string(),
            available: self.fields.names().collect::<Vec<_>>().join(", "),
        })
    }
}

/// A record lacks a field that a stage needs.
#[derive(Debug, thiserror::Error, Diagnostic)]
#[error("{location}: record has no field `{field}`")]
#[diagnostic(
    code(pipeline::records::missing_field),
    help("the record has these fields: [{available}]; fix the field name or add a field mapping")
)]
pub struct MissingFieldError {
    /// The field that was asked for.
    pub field: String,
    /// Where the record came from.
    pub location: String,
    /// Comma-separated names of the fields the record has.
    pub available: String,
}

/// Errors reading or writing `records.jsonl`.
#[derive(Debug, thiserror::Error, Diagnostic)]
pub enum RecordsError {
    /// The file could not be opened, read or written.
    #[error("cannot access records file {path}")]
    #[diagnostic(
        code(pipeline::records::io),
        help("check that the path exists and is readable/writable")
    )]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A line is not a valid serialized record.
    #[error("{path}:{line}: not a valid record: {message}")]
    #[diagnostic(
        code(pipeline::records::parse),
        help("records.jsonl is written by pipeline stages; regenerate it rather than editing it by hand")
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What serde said.
        message: String,
        /// The offending line.
        #[source_code]
        src: LineSource,
        /// Where on the line.
        #[label("here")]
        span: SourceSpan,
    },
}

/// Streams records into a `records.jsonl` file.
pub struct RecordWriter {
    path: PathBuf,
    out: BufWriter<File>,
    count: u64,
}

impl RecordWriter {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> Result<Self, RecordsError> {
        let io = |source| RecordsError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let file = File::create(path).map_err(io)?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            count: 0,
        })
    }

    /// Appends one record.
    pub fn write(&mut self, record: &Record) -> Result<(), RecordsError> {
        let line = serde_json::to_string(record).map_err(|e| RecordsError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        self.out
            .write_all(line.as_bytes())
            .and_then(|_| self.out.write_all(b"\n"))
            .map_err(|source| RecordsError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.count += 1;
        Ok(())
    }

    /// Flushes and closes the file, returning the number of records written.
    pub fn finish(mut self) -> Result<u64, RecordsError> {
        self.out.flush().map_err(|source| RecordsError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(self.count)
    }
}

/// Writes all `records` to `path` as JSON Lines; returns how many were written.
pub fn write_records<'a>(
    path: &Path,
    records: impl IntoIterator<Item = &'a Record>,
) -> Result<u64, RecordsError> {
    let mut w = RecordWriter::create(path)?;
    for r in records {
        w.write(r)?;
    }
    w.finish()
}

/// Iterates the records of a `records.jsonl` file (blank lines are ignored).
pub struct RecordReader {
    path: PathBuf,
    lines: std::io::Lines<BufReader<File>>,
    line_no: u64,
}

impl RecordReader {
    /// Opens `path` for reading.
    pub fn open(path: &Path) -> Result<Self, RecordsError> {
        let file = File::open(path).map_err(|source| RecordsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            lines: BufReader::new(file).lines(),
            line_no: 0,
        })
    }
}

impl Iterator for RecordReader {
    type Item = Result<Record, RecordsError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let line = self.lines.next()?;
            self.line_no += 1;
            let line = match line {
                Ok(l) => l,
                Err(source) => {
                    return Some(Err(RecordsError::Io {
                        path: self.path.clone(),
                        source,
                    }))
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            return Some(serde_json::from_str::<Record>(&line).map_err(|e| {
                let offset = column_offset(&line, e.column());
                RecordsError::Parse {
                    path: self.path.clone(),
                    line: self.line_no,
                    message: e.to_string(),
                    src: LineSource::new(
                        self.path.display().to_string(),
                        line.clone(),
                        self.line_no,
                    ),
                    span: (offset, 0).into(),
                }
            }));
        }
    }
}

/// Reads every record of a `records.jsonl` file.
pub fn read_records(path: &Path) -> Result<Vec<Record>, RecordsError> {
    RecordReader::open(path)?.collect()
}

/// Byte offset of serde_json's 1-based column (which counts bytes) within `line`,
/// clamped to the line so that a diagnostic label never points outside its source.
pub(crate) fn column_offset(line: &str, column: usize) -> usize {
    let mut off = column.saturating_sub(1).min(line.len());
    while off > 0 && !line.is_char_boundary(off) {
        off -= 1;
    }
    off
}

/// One field name or several (joined with newlines).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum FieldSelection {
    /// A single field.
    One(String),
    /// Several fields, joined with `\n` in this order.
    Many(Vec<String>),
}

impl Default for FieldSelection {
    fn default() -> Self {
        FieldSelection::One("content".into())
    }
}

impl FieldSelection {
    /// The field names, in order.
    pub fn names(&self) -> Vec<&str> {
        match self {
            FieldSelection::One(f) => vec![f.as_str()],
            FieldSelection::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }

    /// The selected text of `r`; errors name the fields the record does have.
    pub fn text(&self, r: &Record) -> miette::Result<String> {
        let mut parts = Vec::new();
        for name in self.names() {
            let v = r.require(name).map_err(|e| {
                miette::miette!(
                    help = "set `text_field` to the field holding the text",
                    "{}: no field `{}` (it has: {})",
                    e.location,
                    e.field,
                    e.available
                )
            })?;
            parts.push(v);
        }
        Ok(parts.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_preserves_order_and_provenance() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.jsonl");
        let recs = vec![
            Record::new(
                [("z", "last"), ("a", "first\nline")].into_iter().collect(),
                Provenance {
                    source: "x.jsonl".into(),
                    line: Some(3),
                    row: None,
                },
            ),
            Record::new(
                [("text", "ünïcode ✓")].into_iter().collect(),
                Provenance {
                    source: "y.json".into(),
                    line: None,
                    row: Some(0),
                },
            ),
        ];
        assert_eq!(write_records(&path, &recs).unwrap(), 2);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(
            r#"{"fields":{"z":"last","a":"first\nline"},"source":"x.jsonl","line":3}"#
        ));
        let back = read_records(&path).unwrap();
        assert_eq!(back, recs);
        assert_eq!(back[0].fields.names().collect::<Vec<_>>(), ["z", "a"]);
    }

    #[test]
    fn parse_error_names_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.jsonl");
        std::fs::write(
            &path,
            "{\"fields\":{},\"source\":\"a\"}\n\n{\"fields\": 3}\n",
        )
        .unwrap();
        let err = read_records(&path).unwrap_err();
        match err {
            RecordsError::Parse { line, .. } => assert_eq!(line, 3),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn require_lists_available_fields() {
        let r = Record::new(
            [("instruction", "x"), ("output", "y")]
                .into_iter()
                .collect(),
            Provenance::default(),
        );
        let e = r.require("input").unwrap_err();
        assert_eq!(e.available, "instruction, output");
        assert_eq!(r.require("output").unwrap(), "y");
    }
}
