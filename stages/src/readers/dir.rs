//! A directory of source files: one record per file, its text as a field.

use std::path::{Path, PathBuf};

use crate::snippet::LineSource;

use super::glob::PathGlobs;
use super::{Flow, RawRecord, ReadError, ReadOptions};
use crate::records::{Fields, Provenance};

/// Every regular file under `root` (symlinks to directories are not followed, so a link
/// cycle cannot loop), as paths relative to `root` with `/` separators, sorted so that
/// record order is reproducible across file systems.
pub(crate) fn walk(root: &Path) -> Result<Vec<(String, PathBuf)>, ReadError> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|source| ReadError::Io {
            path: dir.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| ReadError::Io {
                path: dir.clone(),
                source,
            })?;
            let path = entry.path();
            let ty = entry.file_type().map_err(|source| ReadError::Io {
                path: path.clone(),
                source,
            })?;
            if ty.is_dir() {
                stack.push(path);
            } else if ty.is_file() || (ty.is_symlink() && path.is_file()) {
                let rel = path
                    .strip_prefix(root)
                    .unwrap_or(&path)
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push((rel, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Whether a relative path passes the `include` globs and `extensions` filter.
fn selected(rel: &str, include: &PathGlobs, opts: &ReadOptions) -> bool {
    let glob_ok = include.is_match(rel);
    let ext_ok = opts.extensions.is_empty()
        || opts.extensions.iter().any(|e| {
            let e = e.trim_start_matches('.');
            rel.rsplit_once('.').is_some_and(|(_, x)| x == e)
        });
    glob_ok && ext_ok
}

/// Reads the selected files under `root`, fields `path_field` (relative path) and
/// `text_field` (the file's text).
pub(super) fn read_dir(
    root: &Path,
    opts: &ReadOptions,
    emit: &mut dyn FnMut(Result<RawRecord, ReadError>) -> Result<Flow, ReadError>,
) -> Result<u64, ReadError> {
    let include = PathGlobs::new(&opts.include)?;
    let mut files = 0;
    for (row, (rel, path)) in walk(root)?
        .into_iter()
        .filter(|(rel, _)| selected(rel, &include, opts))
        .enumerate()
    {
        files += 1;
        let bytes = std::fs::read(&path).map_err(|source| ReadError::Io {
            path: path.clone(),
            source,
        })?;
        let prov = Provenance {
            source: path.display().to_string(),
            line: None,
            row: Some(row as u64),
        };
        let item = match String::from_utf8(bytes) {
            Ok(text) => {
                let mut fields = Fields::new();
                fields.insert(opts.path_field.clone(), rel);
                fields.insert(opts.text_field.clone(), text);
                Ok(RawRecord {
                    fields,
                    provenance: prov,
                })
            }
            Err(e) => {
                let off = e.utf8_error().valid_up_to();
                let bytes = e.into_bytes();
                let line = bytes[..off].iter().filter(|b| **b == b'\n').count() + 1;
                let start = bytes[..off]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |p| p + 1);
                let end = bytes[off..]
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(bytes.len(), |p| off + p);
                Err(ReadError::NotUtf8 {
                    location: format!("{}:{line}", path.display()),
                    byte_offset: off as u64,
                    src: LineSource::new(
                        path.display().to_string(),
                        String::from_utf8_lossy(&bytes[start..end]).into_owned(),
                        line as u64,
                    ),
                    span: (off - start, 1).into(),
                })
            }
        };
        if let Flow::Stop = emit(item)? {
            break;
        }
    }
    Ok(files)
}
