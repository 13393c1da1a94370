//! Parquet sources through the `parquet` crate's record API (no arrow).

use std::path::Path;

use crate::snippet::LineSource;
use parquet::file::reader::FileReader;
use parquet::file::serialized_reader::SerializedFileReader;
use parquet::record::Field;

use super::{Flow, RawRecord, ReadError};
use crate::records::{Fields, Provenance};

/// Reads every row of a Parquet file; each top-level column becomes a field.
pub(super) fn read_parquet(
    path: &Path,
    emit: &mut dyn FnMut(Result<RawRecord, ReadError>) -> Result<Flow, ReadError>,
) -> Result<(), ReadError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let parquet_err = |e: parquet::errors::ParquetError| ReadError::Parquet {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let reader = SerializedFileReader::new(file).map_err(parquet_err)?;
    let rows = reader.get_row_iter(None).map_err(parquet_err)?;
    for (row_no, row) in rows.enumerate() {
        let prov = Provenance {
            source: name.clone(),
            line: None,
            row: Some(row_no as u64),
        };
        let item = match row {
            // A row that fails to decode means corrupt column data: nothing after it is
            // trustworthy, so this is fatal whatever the policy.
            Err(e) => return Err(parquet_err(e)),
            Ok(row) => {
                let mut fields = Fields::new();
                let mut bad = None;
                for (col, value) in row.get_column_iter() {
                    match field_to_string(value) {
                        Ok(s) => fields.insert(col.clone(), s),
                        Err(off) => {
                            bad = Some((col.clone(), off));
                            break;
                        }
                    }
                }
                match bad {
                    None => Ok(RawRecord {
                        fields,
                        provenance: prov,
                    }),
                    Some((col, off)) => Err(ReadError::NotUtf8 {
                        location: format!("{prov} column `{col}`"),
                        byte_offset: off as u64,
                        src: LineSource::new(name.clone(), String::new(), 1),
                        span: (0, 0).into(),
                    }),
                }
            }
        };
        if let Flow::Stop = emit(item)? {
            break;
        }
    }
    Ok(())
}

/// Strings verbatim, null as empty, binary as UTF-8 (error: the first bad byte offset),
/// anything else in parquet's display form.
fn field_to_string(f: &Field) -> Result<String, usize> {
    match f {
        Field::Str(s) => Ok(s.clone()),
        Field::Null => Ok(String::new()),
        Field::Bytes(b) => std::str::from_utf8(b.data())
            .map(str::to_string)
            .map_err(|e| e.valid_up_to()),
        other => Ok(other.to_string()),
    }
}
