//! JSON array and JSON Lines sources (optionally gzip-compressed, detected by magic bytes).

use std::io::{BufRead, Read};
use std::path::Path;

use crate::snippet::LineSource;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{Flow, RawRecord, ReadError};
use crate::records::{column_offset, Fields, Provenance};

/// One top-level element of a JSON source: an object with its keys in source order, or
/// something else (which is a malformed record).
pub(super) enum Element {
    Object(Vec<(String, serde_json::Value)>),
    Other(&'static str),
}

impl<'de> serde::Deserialize<'de> for Element {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Element;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Element, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    out.push((k, v));
                }
                Ok(Element::Object(out))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Element, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Element::Other("an array"))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Element, E> {
                Ok(Element::Other("a boolean"))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Element, E> {
                Ok(Element::Other("a number"))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Element, E> {
                Ok(Element::Other("a number"))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Element, E> {
                Ok(Element::Other("a number"))
            }
            fn visit_str<E>(self, _: &str) -> Result<Element, E> {
                Ok(Element::Other("a string"))
            }
            fn visit_unit<E>(self) -> Result<Element, E> {
                Ok(Element::Other("null"))
            }
        }
        d.deserialize_any(V)
    }
}

/// Renders a JSON value as a field string: strings verbatim, `null` as empty, anything
/// else (numbers, lists such as MBPP's `test_list`) as compact JSON.
pub(super) fn value_to_string(v: serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s,
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn to_fields(obj: Vec<(String, serde_json::Value)>) -> Fields {
    obj.into_iter()
        .map(|(k, v)| (k, value_to_string(v)))
        .collect()
}

/// Opens `path`, transparently decompressing gzip.
pub(super) fn open_maybe_gzip(path: &Path) -> Result<Box<dyn BufRead>, ReadError> {
    let io = |source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
    let head = file.fill_buf().map_err(io)?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(std::io::BufReader::new(
            flate2::bufread::MultiGzDecoder::new(file),
        )))
    } else {
        Ok(Box::new(file))
    }
}

/// Reads a JSON Lines source, one record per non-blank line.
pub(super) fn read_jsonl(
    path: &Path,
    mut input: Box<dyn BufRead>,
    emit: &mut dyn FnMut(Result<RawRecord, ReadError>) -> Result<Flow, ReadError>,
) -> Result<(), ReadError> {
    let name = path.display().to_string();
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        let n = input
            .read_until(b'\n', &mut buf)
            .map_err(|source| ReadError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if n == 0 {
            return Ok(());
        }
        line_no += 1;
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        // Editors on Windows often prepend a UTF-8 byte-order mark; it is not JSON.
        if line_no == 1 && buf.starts_with(b"\xEF\xBB\xBF") {
            buf.drain(..3);
        }
        let prov = Provenance {
            source: name.clone(),
            line: Some(line_no),
            row: None,
        };
        let item = match std::str::from_utf8(&buf) {
            Err(e) => Err(ReadError::NotUtf8 {
                location: prov.to_string(),
                byte_offset: e.valid_up_to() as u64,
                src: LineSource::new(
                    name.clone(),
                    String::from_utf8_lossy(&buf).into_owned(),
                    line_no,
                ),
                span: (e.valid_up_to(), 1).into(),
            }),
            Ok(line) if line.trim().is_empty() => continue,
            Ok(line) => match serde_json::from_str::<Element>(line) {
                Ok(Element::Object(obj)) => Ok(RawRecord {
                    fields: to_fields(obj),
                    provenance: prov,
                }),
                Ok(Element::Other(kind)) => Err(ReadError::Malformed {
                    location: prov.to_string(),
                    message: format!("expected a JSON object, found {kind}"),
                    src: LineSource::new(name.clone(), line, line_no),
                    span: (0, line.len()).into(),
                }),
                Err(e) => Err(ReadError::Malformed {
                    location: prov.to_string(),
                    message: e.to_string(),
                    src: LineSource::new(name.clone(), line, line_no),
                    span: (column_offset(line, e.column()), 0).into(),
                }),
            },
        };
        if let Flow::Stop = emit(item)? {
            return Ok(());
        }
    }
}

/// Reads a JSON array of objects; a syntax error anywhere fails the whole file (the array
/// cannot be resynchronised), a non-object element is a malformed record.
pub(super) fn read_json_array(
    path: &Path,
    mut input: Box<dyn BufRead>,
    emit: &mut dyn FnMut(Result<RawRecord, ReadError>) -> Result<Flow, ReadError>,
) -> Result<(), ReadError> {
    let name = path.display().to_string();
    let mut bytes = Vec::new();
    input
        .read_to_end(&mut bytes)
        .map_err(|source| ReadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let bytes = e.into_bytes();
            let off = std::str::from_utf8(&bytes)
                .err()
                .map_or(0, |e| e.valid_up_to());
            let line = bytes[..off].iter().filter(|b| **b == b'\n').count() as u64 + 1;
            let start = bytes[..off]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |p| p + 1);
            let end = bytes[off..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(bytes.len(), |p| off + p);
            let snippet = &bytes[start..end];
            return Err(ReadError::NotUtf8 {
                location: format!("{name}:{line}"),
                byte_offset: off as u64,
                src: LineSource::new(name, String::from_utf8_lossy(snippet).into_owned(), line),
                span: (off - start, 1).into(),
            });
        }
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let elements: Vec<Element> = serde_json::from_str(text).map_err(|e| {
        let line_text = text.lines().nth(e.line().saturating_sub(1)).unwrap_or("");
        ReadError::Json {
            location: format!("{name}:{}:{}", e.line(), e.column()),
            message: e.to_string(),
            src: LineSource::new(name.clone(), line_text, e.line() as u64),
            span: (column_offset(line_text, e.column()), 0).into(),
        }
    })?;
    for (row, el) in elements.into_iter().enumerate() {
        let prov = Provenance {
            source: name.clone(),
            line: None,
            row: Some(row as u64),
        };
        let item = match el {
            Element::Object(obj) => Ok(RawRecord {
                fields: to_fields(obj),
                provenance: prov,
            }),
            Element::Other(kind) => Err(ReadError::Malformed {
                location: prov.to_string(),
                message: format!("expected a JSON object, found {kind}"),
                src: LineSource::new(name.clone(), String::new(), 1),
                span: (0, 0).into(),
            }),
        };
        if let Flow::Stop = emit(item)? {
            break;
        }
    }
    Ok(())
}
