//! Local files and directories as pipeline inputs: referenced in place or copied, and
//! content-hashed so that the engine's cache key changes exactly when the content does.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{blake3_file, io_err, DownloadError};
use crate::readers::ReadError;

/// How a local input becomes an artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LocalMode {
    /// Use the files where they are (read-only inputs such as shared data).
    #[default]
    Reference,
    /// Copy them into the output directory (inputs that may change later).
    Copy,
}

/// Options for [`local_fetch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalOptions {
    /// A file or directory.
    pub path: PathBuf,
    /// Reference or copy.
    #[serde(default)]
    pub mode: LocalMode,
}

/// One hashed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalFile {
    /// Path relative to the input (empty when the input is a single file).
    pub rel: String,
    /// Size in bytes.
    pub size: u64,
    /// blake3, hex.
    pub blake3: String,
}

/// What [`local_fetch`] produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalFetch {
    /// The input as given.
    pub source: PathBuf,
    /// Where later stages should read it: the source itself, or the copy.
    pub path: PathBuf,
    /// Hash over every file's relative path and content.
    pub content_hash: String,
    /// The files, sorted by relative path.
    pub files: Vec<LocalFile>,
}

/// Hashes a file or every file under a directory (sorted, relative paths included, so
/// renames change the hash but the location of the directory does not).
pub fn content_hash(path: &Path) -> Result<(String, Vec<LocalFile>), DownloadError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    let entries: Vec<(String, PathBuf)> = if meta.is_dir() {
        crate::readers::walk_files(path).map_err(|e| match e {
            ReadError::Io { path, source } => DownloadError::Io { path, source },
            other => DownloadError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other(other.to_string()),
            },
        })?
    } else {
        vec![(String::new(), path.to_path_buf())]
    };
    let mut files = Vec::with_capacity(entries.len());
    let mut total = blake3::Hasher::new();
    for (rel, p) in entries {
        let (hash, size) = blake3_file(&p)?;
        total.update(format!("{rel}\0{size}\0{hash}\n").as_bytes());
        files.push(LocalFile {
            rel,
            size,
            blake3: hash,
        });
    }
    Ok((total.finalize().to_hex().to_string(), files))
}

/// References or copies `opts.path` (into `out_dir`, keeping the file or directory name)
/// and hashes its content.
pub fn local_fetch(opts: &LocalOptions, out_dir: &Path) -> Result<LocalFetch, DownloadError> {
    let (hash, files) = content_hash(&opts.path)?;
    let path = match opts.mode {
        LocalMode::Reference => opts.path.clone(),
        LocalMode::Copy => {
            let name = opts
                .path
                .file_name()
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("input"));
            let dest = out_dir.join(name);
            if opts.path.is_dir() {
                for f in &files {
                    let to = dest.join(&f.rel);
                    if let Some(parent) = to.parent() {
                        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
                    }
                    std::fs::copy(opts.path.join(&f.rel), &to).map_err(io_err(&to))?;
                }
            } else {
                std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
                std::fs::copy(&opts.path, &dest).map_err(io_err(&dest))?;
            }
            dest
        }
    };
    Ok(LocalFetch {
        source: opts.path.clone(),
        path,
        content_hash: hash,
        files,
    })
}
