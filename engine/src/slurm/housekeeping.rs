//! What `gc` does about Slurm: it refuses to run while jobs of the cache are in flight (they
//! write into it), and prunes job logs, scripts and records with their keys.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::client::SlurmClient;
use super::detach::{DetachedRun, DETACHED_DIR};
use super::launcher::JobRecord;
use super::queue::{phase, Phase};
use super::SLURM_DIR;
use crate::store::Store;

/// Every job id the cache remembers: saved job records (jobs not yet seen to succeed) and
/// detached runs.
pub fn remembered_jobs(cache: &Path) -> Vec<String> {
    let slurm = cache.join(SLURM_DIR);
    let mut ids = Vec::new();
    for path in json_files(&slurm.join("jobs")) {
        if let Some(r) = read_json::<JobRecord>(&path) {
            ids.push(r.job_id);
        }
    }
    for path in json_files(&slurm.join(DETACHED_DIR)) {
        if let Some(run) = read_json::<DetachedRun>(&path) {
            ids.extend(run.jobs.into_iter().map(|j| j.job_id));
        }
    }
    ids
}

/// The jobs of this cache that Slurm still queues or runs (one `squeue` call). An error when
/// the cache remembers jobs but Slurm cannot be asked.
pub fn jobs_in_flight(cache: &Path, client: &SlurmClient) -> Result<Vec<String>, String> {
    let ids = remembered_jobs(cache);
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let states = client.squeue(&ids).map_err(|e| {
        format!(
            "this cache has Slurm jobs on record ({}), and Slurm cannot be asked whether they \
             still run: {e}",
            cache.join(SLURM_DIR).display()
        )
    })?;
    let mut active: Vec<String> = states
        .into_iter()
        .filter(|(_, s)| phase(&s.state) == Phase::Active)
        .map(|(id, _)| id)
        .collect();
    active.sort();
    Ok(active)
}

/// What [`prune`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pruned {
    /// Log files.
    pub logs: usize,
    /// Job scripts and records, and detached-run records.
    pub records: usize,
}

/// Removes, when older than `keep_younger_than`: the logs of keys without a result (a result
/// `gc` removed takes its log with it; a result kept keeps it), Slurm's notes of array tasks,
/// the scripts and records of jobs no longer in flight. Call it with no job in flight.
pub fn prune(store: &Store, keep_younger_than: Duration, dry_run: bool) -> std::io::Result<Pruned> {
    let remove = |p: &Path| {
        if dry_run {
            Ok(())
        } else {
            std::fs::remove_file(p)
        }
    };
    let slurm = store.root().join(SLURM_DIR);
    let mut pruned = Pruned::default();
    let old = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_some_and(|age| age >= keep_younger_than)
    };
    for path in files(&slurm.join("logs")) {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let has_result = is_key(&stem) && store.action(&stem).is_some();
        if !has_result && old(&path) {
            remove(&path)?;
            pruned.logs += 1;
        }
    }
    for dir in [slurm.join("jobs"), slurm.join(DETACHED_DIR)] {
        for path in files(&dir) {
            if old(&path) {
                remove(&path)?;
                pruned.records += 1;
            }
        }
    }
    Ok(pruned)
}

fn is_key(name: &str) -> bool {
    name.len() == 64 && name.chars().all(|c| c.is_ascii_hexdigit())
}

fn files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default()
}

fn json_files(dir: &Path) -> Vec<PathBuf> {
    files(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect()
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}
