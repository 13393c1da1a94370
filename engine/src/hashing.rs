//! Content hashing (blake3) and the stat cache that avoids rehashing unchanged files.
//!
//! Like git's index, the stat cache remembers `(size, mtime, ctime, inode)` of every external
//! file it hashed; while those match, the recorded hash is reused, so a no-op run over
//! gigabytes of inputs costs a `stat` per file. A file modified within [`RACY_WINDOW`] of being
//! hashed is not cached, since a later write in the same timestamp tick would look unchanged.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Files at least this large are hashed memory-mapped on all cores.
const MMAP_THRESHOLD: u64 = 16 * 1024 * 1024;

/// Files modified this recently when hashed are not entered into the stat cache.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);

/// A blake3 digest as 64 lowercase hex characters.
pub type Digest = String;

/// Hashes a file's content: memory-mapped and multi-threaded for large files.
pub fn hash_file(path: &Path) -> io::Result<Digest> {
    let len = std::fs::metadata(path)?.len();
    let mut hasher = blake3::Hasher::new();
    if len >= MMAP_THRESHOLD {
        hasher.update_mmap_rayon(path)?;
    } else {
        let mut file = File::open(path)?;
        let mut buf = Vec::with_capacity(len as usize);
        file.read_to_end(&mut buf)?;
        hasher.update(&buf);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// Hashes bytes.
pub fn hash_bytes(bytes: &[u8]) -> Digest {
    blake3::hash(bytes).to_hex().to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct StatEntry {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    inode: u64,
    device: u64,
    hash: Digest,
}

fn stat_of(meta: &std::fs::Metadata, hash: Digest) -> StatEntry {
    StatEntry {
        size: meta.len(),
        mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        inode: meta.ino(),
        device: meta.dev(),
        hash,
    }
}

/// Remembers hashes of external files keyed by their stat data.
#[derive(Debug, Default)]
pub struct StatCache {
    path: Option<PathBuf>,
    entries: BTreeMap<PathBuf, StatEntry>,
    dirty: bool,
}

impl StatCache {
    /// Loads the cache stored at `path` (an unreadable or corrupt file gives an empty cache:
    /// it only ever saves work).
    pub fn load(path: &Path) -> Self {
        let entries = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            path: Some(path.to_path_buf()),
            entries,
            dirty: false,
        }
    }

    /// A cache that is never saved.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// The content hash of `path`, reusing the recorded one while the stat data matches.
    pub fn hash_file(&mut self, path: &Path) -> io::Result<Digest> {
        let abs = std::path::absolute(path)?;
        let meta = std::fs::metadata(&abs)?;
        if let Some(entry) = self.entries.get(&abs) {
            if *entry == stat_of(&meta, entry.hash.clone()) {
                return Ok(entry.hash.clone());
            }
        }
        let hash = hash_file(&abs)?;
        let racy = meta
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_none_or(|age| age < RACY_WINDOW);
        if !racy {
            self.entries.insert(abs, stat_of(&meta, hash.clone()));
            self.dirty = true;
        }
        Ok(hash)
    }

    /// The content hash of a file or a whole directory tree (names and contents, sorted).
    pub fn hash_path(&mut self, path: &Path) -> io::Result<Digest> {
        let meta = std::fs::metadata(path)?;
        if meta.is_file() {
            return self.hash_file(path);
        }
        // A device, FIFO or socket would be read forever (or block): refuse it up front.
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or directory (a device, FIFO or socket)",
            ));
        }
        let mut files = Vec::new();
        walk_files(path, path, &mut files)?;
        let mut listing = String::new();
        for rel in files {
            let hash = self.hash_file(&path.join(&rel))?;
            listing.push_str(&format!("{}\0{hash}\n", rel.display()));
        }
        Ok(hash_bytes(listing.as_bytes()))
    }

    /// Writes the cache back (atomically) if anything changed.
    pub fn save(&mut self) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        // Another process may have added entries meanwhile; keep theirs too.
        let mut merged: BTreeMap<PathBuf, StatEntry> = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        merged.extend(self.entries.iter().map(|(k, v)| (k.clone(), v.clone())));
        let bytes = serde_json::to_vec(&merged).map_err(io::Error::other)?;
        crate::atomic::write_atomic(path, &bytes, false)?;
        self.dirty = false;
        Ok(())
    }
}

/// Lists regular files under `dir` as paths relative to `root`, sorted.
pub fn walk_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let ty = entry.file_type()?;
        let path = entry.path();
        if ty.is_dir() {
            walk_files(root, &path, out)?;
        } else if ty.is_file() || (ty.is_symlink() && path.is_file()) {
            out.push(
                path.strip_prefix(root)
                    .map_err(io::Error::other)?
                    .to_path_buf(),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cache_reuses_hash_until_content_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.txt");
        std::fs::write(&file, b"hello").unwrap();
        let old = SystemTime::now() - Duration::from_secs(60);
        File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let mut cache = StatCache::load(&dir.path().join("stat.json"));
        let h1 = cache.hash_file(&file).unwrap();
        assert_eq!(h1, hash_bytes(b"hello"));
        assert!(cache.dirty, "an old file is entered into the cache");
        cache.save().unwrap();
        let mut reloaded = StatCache::load(&dir.path().join("stat.json"));
        assert_eq!(reloaded.entries.len(), 1);
        assert_eq!(reloaded.hash_file(&file).unwrap(), h1);
        std::fs::write(&file, b"world").unwrap();
        assert_eq!(reloaded.hash_file(&file).unwrap(), hash_bytes(b"world"));
    }

    #[test]
    fn directory_hash_covers_names_and_contents() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/x"), b"1").unwrap();
        let mut cache = StatCache::in_memory();
        let a = cache.hash_path(dir.path()).unwrap();
        std::fs::rename(dir.path().join("sub/x"), dir.path().join("sub/y")).unwrap();
        let b = cache.hash_path(dir.path()).unwrap();
        assert_ne!(a, b);
    }
}
