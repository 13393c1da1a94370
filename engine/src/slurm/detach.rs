//! Detached runs: the whole DAG submitted at once, each stage a job that starts after its
//! producers' jobs succeeded (`afterok`), and the coordinator gone. Login nodes kill long
//! processes; this is how a user lives with it. `pipeline status M` later shows the jobs'
//! states and, once they are done, the results (the store is the truth, as always).
//!
//! A stage whose producers are cached gets the key the coordinator computes now, and its worker
//! checks it; a stage whose producers run in this submission cannot have its key known yet, so
//! its worker only refuses to compute anything but its own stage. Every stage runs as a job,
//! including those that would run on the coordinator: a stage that needs the network (a
//! download) should be cached before detaching.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{SlurmLauncher, SLURM_DIR};
use crate::executor::{Action, PlanEntry};
use crate::manifest::Manifest;

/// One submitted stage of a detached run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetachedJob {
    /// The stage instance.
    pub stage: String,
    /// Slurm's job id.
    pub job_id: String,
    /// Its key, when it was known at submission.
    pub key: Option<String>,
    /// Its log.
    pub log: PathBuf,
}

/// What a detached run submitted, saved as `slurm/detached/<experiment>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetachedRun {
    /// The experiment.
    pub experiment: String,
    /// When (seconds since the epoch).
    pub submitted_unix: f64,
    /// The jobs, producers first.
    pub jobs: Vec<DetachedJob>,
}

/// The directory of detached-run records under the cache's `slurm/`.
pub const DETACHED_DIR: &str = "detached";

/// Where a detached run of `experiment` is recorded.
pub fn detached_run_path(cache: &Path, experiment: &str) -> PathBuf {
    cache
        .join(SLURM_DIR)
        .join(DETACHED_DIR)
        .join(format!("{experiment}.json"))
}

/// The detached run of `experiment` recorded in `cache`, if any.
pub fn read_detached_run(cache: &Path, experiment: &str) -> Option<DetachedRun> {
    let bytes = std::fs::read(detached_run_path(cache, experiment)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Submits every stage of `plan` that would run, producers' jobs first, each depending on the
/// jobs of its producers; records the submission. `forced(stage)` says whether a stage is to
/// be recomputed although cached.
pub fn submit_detached(
    manifest: &Manifest,
    plan: &[PlanEntry],
    launcher: &SlurmLauncher<'_>,
    forced: impl Fn(&str) -> bool,
) -> Result<DetachedRun, String> {
    let mut submitted: HashMap<String, String> = HashMap::new();
    let mut jobs = Vec::new();
    for entry in plan.iter().filter(|e| e.decision.action() == Action::Run) {
        let stage = manifest
            .stage(&entry.stage)
            .ok_or_else(|| format!("internal: no stage `{}`", entry.stage))?;
        let after: Vec<String> = stage
            .inputs
            .values()
            .flatten()
            .filter_map(|r| submitted.get(&r.stage.to_string()).cloned())
            .collect();
        let (job_id, log) =
            launcher.submit_detached(stage, entry.key.as_deref(), forced(&entry.stage), after)?;
        submitted.insert(entry.stage.clone(), job_id.clone());
        jobs.push(DetachedJob {
            stage: entry.stage.clone(),
            job_id,
            key: entry.key.clone(),
            log,
        });
    }
    let run = DetachedRun {
        experiment: manifest.experiment.name.clone(),
        submitted_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
        jobs,
    };
    let path = detached_run_path(launcher.cache(), &run.experiment);
    let json = serde_json::to_vec_pretty(&run).map_err(|e| e.to_string())?;
    crate::atomic::write_atomic(&path, &json, true)
        .map_err(|e| format!("cannot record the detached run in {}: {e}", path.display()))?;
    Ok(run)
}
