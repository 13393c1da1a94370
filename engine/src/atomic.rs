//! Writing a file so that a reader never sees half of it, and (when asked) so that it survives
//! a power cut: the store's records, the stat cache, a stage's resumable state.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// `error` with `path` in front of its message, keeping its kind: the OS's "No space left on
/// device" or "Read-only file system" does not say where.
pub fn with_path(path: &Path) -> impl Fn(io::Error) -> io::Error + '_ {
    move |error| io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

/// Writes `bytes` to `path` atomically: temp file in the same directory, then rename.
/// With `durable`, the file and its directory are fsynced. An error names `path`.
pub fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    write_atomic_inner(path, bytes, durable).map_err(with_path(path))
}

fn write_atomic_inner(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("path has no parent directory"))?;
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    if durable {
        tmp.as_file().sync_all()?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    if durable {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}
