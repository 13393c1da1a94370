//! The content-addressed cache.
//!
//! Layout under the cache root:
//!
//! ```text
//! objects/ab/cdef…      file contents, named by blake3, read-only, stored once
//! trees/ab/cdef….json   an artifact: sorted (path, object, size) list, named by its own hash
//! views/<tree>/…        the artifact materialised as a read-only directory of hard links
//! actions/ab/<key>.json action record: stage key -> output trees, metadata, timings
//! index/<experiment>/<stage>.json   key parts of the last run, to explain the next one
//! checkpoints/<key>/    per-key scratch that survives failed attempts of that key only
//! tmp/                  attempts in progress (never read as results)
//! quarantine/           objects `verify` found corrupt
//! lock, locks/<key>.lock  run (shared) / gc+verify (exclusive) lock, per-key execution locks
//! ```
//!
//! Promises: an action record is written last, atomically, after every object and tree it names
//! is durable, so a killed process never leaves a record that looks complete; objects are only
//! ever created by rename of a fully written, fsynced file; identical content is stored once.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::atomic::{with_path, write_atomic};
use crate::hashing::{hash_bytes, hash_file, walk_files, Digest};

/// One file of an artifact.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TreeEntry {
    /// Path relative to the artifact root, `/`-separated.
    pub path: String,
    /// Object hash.
    pub hash: Digest,
    /// Size in bytes.
    pub size: u64,
}

/// An artifact: the files of one stage output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tree {
    /// Files, sorted by path.
    pub files: Vec<TreeEntry>,
}

impl Tree {
    /// Total size in bytes.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for f in &self.files {
            out.extend_from_slice(format!("{}\0{}\0{}\n", f.path, f.hash, f.size).as_bytes());
        }
        out
    }

    /// The tree's own hash (over paths, object hashes and sizes).
    pub fn hash(&self) -> Digest {
        hash_bytes(&self.canonical())
    }
}

/// One output of a finished stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutputRecord {
    /// Tree hash of the artifact.
    pub tree: Digest,
    /// Number of files.
    pub files: usize,
    /// Total bytes.
    pub bytes: u64,
}

/// What a finished stage produced for a key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActionRecord {
    /// The cache key.
    pub key: String,
    /// Stage instance that produced it (the first one; identical stages share records).
    pub stage: String,
    /// Stage kind.
    pub kind: String,
    /// The key's ingredients (see [`crate::fingerprint::KeyParts`]).
    pub parts: serde_json::Value,
    /// Outputs by name.
    pub outputs: BTreeMap<String, OutputRecord>,
    /// Values the stage reported (counts, throughput, …).
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Start time, seconds since the Unix epoch.
    pub started_unix: f64,
    /// Wall time of the stage in seconds.
    pub duration_s: f64,
}

/// The key parts of the last run of a stage, kept to explain why the next run differs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastRun {
    /// Key of that run.
    pub key: String,
    /// Its ingredients.
    pub parts: serde_json::Value,
}

/// Result of [`Store::verify`].
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    /// Objects checked.
    pub objects: usize,
    /// Objects whose content did not match their name (moved to quarantine/).
    pub corrupt_objects: Vec<Digest>,
    /// Trees dropped because an object was corrupt or missing.
    pub dropped_trees: usize,
    /// Action records dropped; the next run recomputes these stages.
    pub dropped_actions: Vec<String>,
    /// Views rebuilt because a file in them differed from its object.
    pub repaired_views: usize,
    /// What a result needed and the store no longer has: `object HASH (FILE of STAGE)` or
    /// `tree HASH (of STAGE)`.
    pub missing: Vec<String>,
}

/// Result of [`Store::gc`].
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    /// Action records kept.
    pub kept_actions: usize,
    /// Action records removed.
    pub removed_actions: usize,
    /// Objects removed.
    pub removed_objects: usize,
    /// Bytes freed in objects.
    pub freed_bytes: u64,
}

/// Summary for `pipeline status`.
#[derive(Debug, Default, Serialize)]
pub struct StoreStats {
    /// Number of objects.
    pub objects: usize,
    /// Bytes in objects.
    pub object_bytes: u64,
    /// Number of action records.
    pub actions: usize,
    /// Number of checkpoint directories (stages that can resume).
    pub checkpoints: usize,
}

/// Handle to a cache root.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

fn shard(hash: &str) -> (&str, &str) {
    hash.split_at(2.min(hash.len()))
}

impl Store {
    /// Opens (creating if needed) the cache at `root`.
    pub fn open(root: &Path) -> io::Result<Self> {
        for sub in [
            "objects",
            "trees",
            "views",
            "actions",
            "index",
            "checkpoints",
            "tmp",
            "locks",
            "quarantine",
        ] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(with_path(&dir))?;
        }
        Ok(Self {
            root: std::path::absolute(root)?,
        })
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the cache-wide lock: shared for runs, exclusive for gc and verify.
    pub fn lock(&self, exclusive: bool) -> io::Result<File> {
        let path = self.root.join("lock");
        let file = open_lock_file(&path).map_err(with_path(&path))?;
        if exclusive {
            file.lock()?;
        } else {
            file.lock_shared()?;
        }
        Ok(file)
    }

    /// Whether the cache-wide lock could be taken exclusively now (nothing else runs on this
    /// cache); `gc` and `verify` say they wait when it cannot.
    pub fn is_idle(&self) -> bool {
        open_lock_file(&self.root.join("lock")).is_ok_and(|file| file.try_lock().is_ok())
    }

    /// Takes the execution lock of `key` (blocking); released when the file is dropped.
    pub fn lock_key(&self, key: &str) -> io::Result<File> {
        let file = open_lock_file(&self.key_lock_path(key))?;
        file.lock()?;
        Ok(file)
    }

    /// Takes the execution lock of `key` if it is free: `None` when another process holds it.
    pub fn try_lock_key(&self, key: &str) -> io::Result<Option<File>> {
        let file = open_lock_file(&self.key_lock_path(key))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    fn object_path(&self, hash: &str) -> PathBuf {
        let (a, b) = shard(hash);
        self.root.join("objects").join(a).join(b)
    }

    fn tree_path(&self, hash: &str) -> PathBuf {
        let (a, b) = shard(hash);
        self.root.join("trees").join(a).join(format!("{b}.json"))
    }

    fn action_path(&self, key: &str) -> PathBuf {
        let (a, b) = shard(key);
        self.root.join("actions").join(a).join(format!("{b}.json"))
    }

    /// Directory holding the materialised artifact of `tree` (it may not exist yet).
    pub fn view_path(&self, tree: &str) -> PathBuf {
        self.root.join("views").join(tree)
    }

    /// The per-key checkpoint directory (created).
    pub fn checkpoint_dir(&self, key: &str) -> io::Result<PathBuf> {
        let dir = self.root.join("checkpoints").join(key);
        fs::create_dir_all(&dir).map_err(with_path(&dir))?;
        Ok(dir)
    }

    fn key_lock_path(&self, key: &str) -> PathBuf {
        self.root.join("locks").join(format!("{key}.lock"))
    }

    /// The lease file naming who computes `key` now, beside its lock (see [`crate::lease`]).
    pub fn lease_path(&self, key: &str) -> PathBuf {
        self.root.join("locks").join(format!("{key}.lease"))
    }

    /// Removes the checkpoint directory of a key that finished.
    pub fn remove_checkpoint(&self, key: &str) -> io::Result<()> {
        let dir = self.root.join("checkpoints").join(key);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// A fresh directory under tmp/ for one attempt; removed when dropped.
    pub fn attempt_dir(&self, label: &str) -> io::Result<tempfile::TempDir> {
        let tmp = self.root.join("tmp");
        tempfile::Builder::new()
            .prefix(&format!("{label}-"))
            .tempdir_in(&tmp)
            .map_err(with_path(&tmp))
    }

    /// Moves every file under `dir` into the object store and records the tree.
    pub fn commit_dir(&self, dir: &Path) -> io::Result<(Tree, Digest)> {
        let mut files = Vec::new();
        walk_files(dir, dir, &mut files)?;
        let entries: Vec<TreeEntry> = files
            .par_iter()
            .map(|rel| {
                let src = dir.join(rel);
                let size = fs::metadata(&src)?.len();
                let hash = hash_file(&src)?;
                self.insert_object(&src, &hash)
                    .map_err(with_path(&self.object_path(&hash)))?;
                let path = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                Ok(TreeEntry { path, hash, size })
            })
            .collect::<io::Result<_>>()?;
        let tree = Tree { files: entries };
        let hash = tree.hash();
        let path = self.tree_path(&hash);
        if !path.exists() {
            let bytes = serde_json::to_vec(&tree).map_err(io::Error::other)?;
            write_atomic(&path, &bytes, true)?;
        }
        self.ensure_view(&hash, &tree)
            .map_err(with_path(&self.view_path(&hash)))?;
        Ok((tree, hash))
    }

    fn insert_object(&self, src: &Path, hash: &str) -> io::Result<()> {
        let dst = self.object_path(hash);
        if dst.exists() {
            return Ok(());
        }
        fs::create_dir_all(
            dst.parent()
                .ok_or_else(|| io::Error::other("object path has no parent"))?,
        )?;
        // Copy rather than rename when `src` is a link into the store (a stage may hard-link
        // an input through): renaming would move a live view entry.
        let tmp = dst.with_extension(format!("tmp-{}-{}", std::process::id(), rand_suffix()));
        if fs::metadata(src)?.nlink() > 1 {
            fs::copy(src, &tmp)?;
        } else {
            fs::rename(src, &tmp).or_else(|_| fs::copy(src, &tmp).map(|_| ()))?;
        }
        File::open(&tmp)?.sync_all()?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444))?;
        fs::rename(&tmp, &dst)
    }

    /// Reads a tree record.
    pub fn tree(&self, hash: &str) -> io::Result<Tree> {
        let bytes = fs::read(self.tree_path(hash))?;
        serde_json::from_slice(&bytes).map_err(io::Error::other)
    }

    /// Makes sure the view of `tree` exists, rebuilding it from objects if needed.
    /// Fails if an object is missing.
    pub fn view(&self, tree_hash: &str) -> io::Result<PathBuf> {
        let path = self.view_path(tree_hash);
        if path.is_dir() {
            return Ok(path);
        }
        let tree = self.tree(tree_hash)?;
        self.ensure_view(tree_hash, &tree)?;
        Ok(path)
    }

    fn ensure_view(&self, hash: &str, tree: &Tree) -> io::Result<()> {
        let path = self.view_path(hash);
        if path.is_dir() {
            return Ok(());
        }
        let staging = tempfile::Builder::new()
            .prefix("view-")
            .tempdir_in(self.root.join("tmp"))?;
        for f in &tree.files {
            let dst = staging.path().join(&f.path);
            if let Some(parent) = dst.parent() {
                fs::create_dir_all(parent)?;
            }
            let obj = self.object_path(&f.hash);
            if fs::hard_link(&obj, &dst).is_err() {
                fs::copy(&obj, &dst)?;
            }
        }
        let staged = staging.keep();
        match fs::rename(&staged, &path) {
            Ok(()) => Ok(()),
            // Another process materialised the same view first.
            Err(_) if path.is_dir() => fs::remove_dir_all(&staged),
            Err(e) => Err(e),
        }
    }

    /// The action record for `key`, if present and readable. A record whose views cannot be
    /// materialised (objects missing) counts as absent.
    pub fn action(&self, key: &str) -> Option<ActionRecord> {
        let bytes = fs::read(self.action_path(key)).ok()?;
        let record: ActionRecord = serde_json::from_slice(&bytes).ok()?;
        for out in record.outputs.values() {
            self.view(&out.tree).ok()?;
        }
        Some(record)
    }

    /// Stores an action record (atomically, durably): the stage is then cached.
    pub fn put_action(&self, record: &ActionRecord) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        write_atomic(&self.action_path(&record.key), &bytes, true)
    }

    fn index_path(&self, experiment: &str, stage: &str) -> PathBuf {
        let clean = |s: &str| {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-_@,.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect::<String>()
        };
        self.root
            .join("index")
            .join(clean(experiment))
            .join(format!("{}.json", clean(stage)))
    }

    /// Key parts of the last run of `stage` in `experiment`.
    pub fn last_run(&self, experiment: &str, stage: &str) -> Option<LastRun> {
        let bytes = fs::read(self.index_path(experiment, stage)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Remembers the key parts of this run of `stage`.
    pub fn record_last_run(&self, experiment: &str, stage: &str, run: &LastRun) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(run).map_err(io::Error::other)?;
        write_atomic(&self.index_path(experiment, stage), &bytes, false)
    }

    fn action_files(&self) -> io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for shard in fs::read_dir(self.root.join("actions"))? {
            let shard = shard?;
            if shard.file_type()?.is_dir() {
                for f in fs::read_dir(shard.path())? {
                    let f = f?.path();
                    if f.extension().is_some_and(|e| e == "json") {
                        out.push(f);
                    }
                }
            }
        }
        Ok(out)
    }

    fn object_files(&self) -> io::Result<Vec<(Digest, PathBuf)>> {
        let mut out = Vec::new();
        for shard in fs::read_dir(self.root.join("objects"))? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            let prefix = shard.file_name().to_string_lossy().to_string();
            for f in fs::read_dir(shard.path())? {
                let f = f?;
                let name = f.file_name().to_string_lossy().to_string();
                if name.contains(".tmp-") {
                    continue;
                }
                out.push((format!("{prefix}{name}"), f.path()));
            }
        }
        Ok(out)
    }

    /// Rehashes every object; corrupt ones go to quarantine/, and the trees, views and action
    /// records that use them are dropped so the next run recomputes those stages.
    pub fn verify(&self) -> io::Result<VerifyReport> {
        let _lock = self.lock(true)?;
        let objects = self.object_files()?;
        let corrupt: Vec<Digest> = objects
            .par_iter()
            .filter_map(|(hash, path)| match hash_file(path) {
                Ok(actual) if actual == *hash => None,
                _ => Some(hash.clone()),
            })
            .collect();
        for hash in &corrupt {
            let from = self.object_path(hash);
            let _ = fs::rename(&from, self.root.join("quarantine").join(hash));
        }
        let mut report = VerifyReport {
            objects: objects.len(),
            corrupt_objects: corrupt,
            ..Default::default()
        };
        let mut bad_trees = BTreeSet::new();
        for path in self.action_files()? {
            let record: Option<ActionRecord> = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let Some(record) = record else {
                fs::remove_file(&path)?;
                report.dropped_actions.push(path.display().to_string());
                continue;
            };
            let mut ok = true;
            for out in record.outputs.values() {
                let tree = match self.tree(&out.tree) {
                    Ok(tree) => tree,
                    Err(_) => {
                        report
                            .missing
                            .push(format!("tree {} (of {})", out.tree, record.stage));
                        ok = false;
                        bad_trees.insert(out.tree.clone());
                        continue;
                    }
                };
                let absent: Vec<&TreeEntry> = tree
                    .files
                    .iter()
                    .filter(|f| !self.object_path(&f.hash).is_file())
                    .collect();
                // A corrupt object was moved to quarantine: reported as corrupt, not missing.
                let quarantined = |f: &&TreeEntry| report.corrupt_objects.contains(&f.hash);
                for f in absent.iter().filter(|f| !quarantined(f)) {
                    report.missing.push(format!(
                        "object {} ({} of {})",
                        f.hash, f.path, record.stage
                    ));
                }
                if absent.is_empty() {
                    report.repaired_views += self.check_view(&out.tree, &tree)?;
                } else {
                    ok = false;
                    bad_trees.insert(out.tree.clone());
                }
            }
            if !ok {
                fs::remove_file(&path)?;
                report.dropped_actions.push(record.key);
            }
        }
        for tree in &bad_trees {
            let _ = fs::remove_file(self.tree_path(tree));
            let _ = fs::remove_dir_all(self.view_path(tree));
        }
        report.dropped_trees = bad_trees.len();
        Ok(report)
    }

    /// Checks that each view file is the object itself (same inode) or has its content;
    /// rebuilds the view otherwise. Returns 1 if rebuilt.
    fn check_view(&self, hash: &str, tree: &Tree) -> io::Result<usize> {
        let view = self.view_path(hash);
        if !view.is_dir() {
            return Ok(0);
        }
        for f in &tree.files {
            let in_view = view.join(&f.path);
            let obj = fs::metadata(self.object_path(&f.hash))?;
            let same = match fs::metadata(&in_view) {
                Ok(m) if m.ino() == obj.ino() && m.dev() == obj.dev() => true,
                Ok(_) => hash_file(&in_view).map(|h| h == f.hash).unwrap_or(false),
                Err(_) => false,
            };
            if !same {
                make_writable(&view)?;
                fs::remove_dir_all(&view)?;
                self.ensure_view(hash, tree)?;
                return Ok(1);
            }
        }
        Ok(0)
    }

    /// Removes everything not reachable from the action records in `keep` or written less than
    /// `keep_younger_than` ago; clears tmp/ and quarantine/. With `dry_run`, only counts what
    /// it would remove.
    pub fn gc(
        &self,
        keep: &BTreeSet<String>,
        keep_younger_than: Duration,
        dry_run: bool,
    ) -> io::Result<GcReport> {
        let _lock = self.lock(true)?;
        // With `dry_run`, everything is counted and nothing removed.
        let remove_file = |p: &Path| if dry_run { Ok(()) } else { fs::remove_file(p) };
        let remove_tree = |p: &Path| {
            if dry_run {
                return Ok(());
            }
            make_writable(p)?;
            if p.is_dir() {
                fs::remove_dir_all(p)
            } else {
                fs::remove_file(p)
            }
        };
        let now = SystemTime::now();
        let young = |p: &Path| {
            fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age < keep_younger_than)
        };
        let mut report = GcReport::default();
        let mut live_trees = BTreeSet::new();
        for path in self.action_files()? {
            let record: Option<ActionRecord> = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            match record {
                Some(r) if keep.contains(&r.key) || young(&path) => {
                    report.kept_actions += 1;
                    live_trees.extend(r.outputs.values().map(|o| o.tree.clone()));
                }
                _ => {
                    remove_file(&path)?;
                    report.removed_actions += 1;
                }
            }
        }
        let mut live_objects = BTreeSet::new();
        for tree in &live_trees {
            if let Ok(t) = self.tree(tree) {
                live_objects.extend(t.files.into_iter().map(|f| f.hash));
            }
        }
        for shard in fs::read_dir(self.root.join("trees"))? {
            for f in fs::read_dir(shard?.path())? {
                let f = f?;
                let name = f.file_name().to_string_lossy().to_string();
                let prefix = f
                    .path()
                    .parent()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default();
                let hash = format!("{prefix}{}", name.trim_end_matches(".json"));
                if !live_trees.contains(&hash) {
                    remove_file(&f.path())?;
                }
            }
        }
        for v in fs::read_dir(self.root.join("views"))? {
            let v = v?;
            if !live_trees.contains(&*v.file_name().to_string_lossy()) {
                remove_tree(&v.path())?;
            }
        }
        // Temp files of writes that a killed process never renamed into place.
        for area in ["actions", "trees", "objects"] {
            for shard in fs::read_dir(self.root.join(area))? {
                let shard = shard?.path();
                if !shard.is_dir() {
                    continue;
                }
                for f in fs::read_dir(&shard)? {
                    let p = f?.path();
                    let name = p
                        .file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_default();
                    let stray = if area == "objects" {
                        name.contains(".tmp-")
                    } else {
                        !name.ends_with(".json")
                    };
                    if stray {
                        remove_file(&p)?;
                    }
                }
            }
        }
        for (hash, path) in self.object_files()? {
            if !live_objects.contains(&hash) {
                report.freed_bytes += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                remove_file(&path)?;
                report.removed_objects += 1;
            }
        }
        for dir in ["tmp", "quarantine"] {
            for e in fs::read_dir(self.root.join(dir))? {
                remove_tree(&e?.path())?;
            }
        }
        for c in fs::read_dir(self.root.join("checkpoints"))? {
            let p = c?.path();
            if !young(&p) {
                remove_tree(&p)?;
            }
        }
        Ok(report)
    }

    /// Counts for `pipeline status`.
    pub fn stats(&self) -> io::Result<StoreStats> {
        let objects = self.object_files()?;
        Ok(StoreStats {
            objects: objects.len(),
            object_bytes: objects
                .iter()
                .map(|(_, p)| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
                .sum(),
            actions: self.action_files()?.len(),
            checkpoints: fs::read_dir(self.root.join("checkpoints"))?.count(),
        })
    }
}

/// Opens (creating) a file that is only ever locked, never written.
fn open_lock_file(path: &Path) -> io::Result<File> {
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// Read-only files in a directory tree block nothing for root but do for other users; make a
/// tree removable before deleting it.
fn make_writable(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
        for e in fs::read_dir(path)? {
            make_writable(&e?.path())?;
        }
    }
    Ok(())
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_outputs_are_stored_once_and_views_match() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let mut hashes = Vec::new();
        for _ in 0..2 {
            let dir = store.attempt_dir("t").unwrap();
            fs::create_dir_all(dir.path().join("sub")).unwrap();
            fs::write(dir.path().join("sub/a.txt"), b"same").unwrap();
            fs::write(dir.path().join("b.txt"), b"same").unwrap();
            let (tree, hash) = store.commit_dir(dir.path()).unwrap();
            assert_eq!(tree.files.len(), 2);
            hashes.push(hash);
        }
        assert_eq!(hashes[0], hashes[1]);
        assert_eq!(
            store.stats().unwrap().objects,
            1,
            "one object for identical content"
        );
        let view = store.view(&hashes[0]).unwrap();
        assert_eq!(fs::read(view.join("sub/a.txt")).unwrap(), b"same");
    }

    #[test]
    fn verify_quarantines_corrupt_objects_and_drops_records() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let dir = store.attempt_dir("t").unwrap();
        fs::write(dir.path().join("x"), b"content").unwrap();
        let (tree, hash) = store.commit_dir(dir.path()).unwrap();
        let record = ActionRecord {
            key: "k".repeat(64),
            stage: "s".into(),
            kind: "k".into(),
            parts: serde_json::Value::Null,
            outputs: [(
                "out".to_string(),
                OutputRecord {
                    tree: hash,
                    files: 1,
                    bytes: 7,
                },
            )]
            .into(),
            metadata: Default::default(),
            started_unix: 0.0,
            duration_s: 0.0,
        };
        store.put_action(&record).unwrap();
        assert!(store.verify().unwrap().corrupt_objects.is_empty());
        let obj = store.object_path(&tree.files[0].hash);
        fs::set_permissions(&obj, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&obj, b"CORRUPT").unwrap();
        let report = store.verify().unwrap();
        assert_eq!(report.corrupt_objects, vec![tree.files[0].hash.clone()]);
        assert_eq!(report.dropped_actions, vec![record.key.clone()]);
        assert!(store.action(&record.key).is_none());
    }
}
