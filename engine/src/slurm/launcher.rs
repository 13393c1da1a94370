//! Submitting a stage as a Slurm job, re-attaching to one already submitted, and waiting for
//! its result.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::client::SlurmClient;
use super::queue::{phase, Phase, Queue, Seen};
use super::sbatch::{job_name, sbatch_args, script_text, JobSpec};
use super::{SlurmOptions, SLURM_DIR};
use crate::manifest::StageInstance;
use crate::progress::StageProgress;
use crate::store::{ActionRecord, Store};

/// The worker's command line: the CLI knows its own flags, the launcher only asks for them.
pub trait WorkerCommand: Send + Sync {
    /// The program and arguments that compute `stage` (an instance name) whose key the
    /// coordinator computed as `key`, refusing anything else; `forced` when the stage is to be
    /// recomputed although cached.
    fn argv(&self, stage: &str, key: &str, forced: bool) -> Vec<String>;
    /// The directory the job starts in (where the coordinator runs).
    fn workdir(&self) -> PathBuf;
}

/// A submitted job, saved as `slurm/jobs/<key>.json` so that a restarted coordinator
/// re-attaches to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The stage's key.
    pub key: String,
    /// The stage instance.
    pub stage: String,
    /// Slurm's job id.
    pub job_id: String,
    /// When it was submitted (seconds since the epoch).
    pub submitted_unix: f64,
    /// How many times it was resubmitted after hitting its time limit.
    pub resubmits: u32,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// How often the store is checked for a job's result while it runs (cheap: one file).
const RECORD_CHECK: Duration = Duration::from_millis(500);
/// Lines of a failed job's log shown with the error.
const LOG_TAIL_LINES: usize = 30;

/// Runs stages as Slurm jobs for one coordinator.
pub struct SlurmLauncher<'a> {
    store: &'a Store,
    experiment: String,
    settings: SlurmOptions,
    worker: Arc<dyn WorkerCommand>,
    client: &'a SlurmClient,
    queue: Queue<'a>,
    in_flight: Mutex<BTreeSet<String>>,
}

impl<'a> SlurmLauncher<'a> {
    /// A launcher for `experiment`'s stages with the experiment-level `settings`.
    pub fn new(
        store: &'a Store,
        experiment: &str,
        settings: SlurmOptions,
        worker: Arc<dyn WorkerCommand>,
        client: &'a SlurmClient,
    ) -> Self {
        let queue = Queue::new(client, settings.poll_interval());
        Self {
            store,
            experiment: experiment.to_string(),
            settings,
            worker,
            client,
            queue,
            in_flight: Mutex::new(BTreeSet::new()),
        }
    }

    /// Creates the cache's `slurm/` directories (whose presence tells a worker that it sees
    /// the coordinator's cache).
    pub fn prepare(&self) -> io::Result<()> {
        for sub in ["jobs", "logs"] {
            std::fs::create_dir_all(self.store.root().join(SLURM_DIR).join(sub))?;
        }
        Ok(())
    }

    fn record_path(&self, key: &str) -> PathBuf {
        job_record_path(self.store.root(), key)
    }

    fn script_path(&self, key: &str) -> PathBuf {
        self.store
            .root()
            .join(SLURM_DIR)
            .join("jobs")
            .join(format!("{key}.sh"))
    }

    /// The log of `key`'s jobs.
    pub fn log_path(&self, key: &str) -> PathBuf {
        job_log_path(self.store.root(), key)
    }

    /// The job script and `sbatch` arguments `stage` would be submitted with.
    pub fn job(&self, stage: &StageInstance, key: &str, forced: bool) -> (String, Vec<String>) {
        let script = self.script_path(key);
        let log = self.log_path(key);
        let workdir = self.worker.workdir();
        let resources = stage.slurm.over(&self.settings);
        let args = sbatch_args(
            &JobSpec {
                name: job_name(&self.experiment, &stage.name.to_string()),
                script: &script,
                log: &log,
                workdir: &workdir,
                resources: &resources,
                gpu: stage.needs_gpu,
            },
            self.settings.signal_before_time(),
        );
        let text = script_text(
            &stage.name.to_string(),
            key,
            &self.worker.argv(&stage.name.to_string(), key, forced),
        );
        (text, args)
    }

    fn submit(
        &self,
        stage: &StageInstance,
        key: &str,
        forced: bool,
        resubmits: u32,
    ) -> Result<JobRecord, String> {
        let (text, args) = self.job(stage, key, forced);
        let script = self.script_path(key);
        crate::atomic::write_atomic(&script, text.as_bytes(), true)
            .map_err(|e| format!("cannot write job script {}: {e}", script.display()))?;
        set_executable(&script)?;
        let job_id = self.client.sbatch(&args)?;
        let record = JobRecord {
            key: key.to_string(),
            stage: stage.name.to_string(),
            job_id,
            submitted_unix: unix_now(),
            resubmits,
        };
        let path = self.record_path(key);
        let json = serde_json::to_vec_pretty(&record).map_err(|e| e.to_string())?;
        crate::atomic::write_atomic(&path, &json, true)
            .map_err(|e| format!("cannot save job record {}: {e}", path.display()))?;
        Ok(record)
    }

    /// A job saved for `key` that Slurm still runs or queues: re-attach to it.
    fn reattach(&self, key: &str) -> Option<JobRecord> {
        let record: JobRecord = std::fs::read(self.record_path(key))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())?;
        let states = self
            .client
            .squeue(std::slice::from_ref(&record.job_id))
            .ok()?;
        let status = states.get(&record.job_id)?;
        (phase(&status.state) == Phase::Active).then_some(record)
    }

    /// Computes `stage` (key `key`) as a Slurm job: re-attaches to its job if one is still
    /// queued or running, else submits one; waits until its action record exists, resubmitting
    /// after a time limit; on `cancel`, cancels the job. The error says what Slurm reported
    /// and shows the end of the job's log.
    pub fn run_stage(
        &self,
        stage: &StageInstance,
        key: &str,
        forced: bool,
        cancel: &AtomicBool,
        bar: &StageProgress,
    ) -> Result<ActionRecord, String> {
        let mut job = match self.reattach(key) {
            Some(job) => {
                tracing::info!(stage = %stage.name, job = %job.job_id, "re-attached to a running job");
                bar.set_message(format!("re-attached to job {}", job.job_id));
                job
            }
            None => {
                let job = self.submit(stage, key, forced, 0)?;
                bar.set_message(format!("submitted job {}", job.job_id));
                job
            }
        };
        self.track(&job.job_id);
        let result = self.wait(stage, key, forced, cancel, bar, &mut job);
        self.untrack(&job.job_id);
        result
    }

    fn track(&self, id: &str) {
        self.queue.watch(id);
        if let Ok(mut f) = self.in_flight.lock() {
            f.insert(id.to_string());
        }
    }

    fn untrack(&self, id: &str) {
        self.queue.forget(id);
        if let Ok(mut f) = self.in_flight.lock() {
            f.remove(id);
        }
    }

    /// The result of `key` if it was stored by this job (a forced stage's old result does
    /// not count).
    fn result(&self, key: &str, forced: bool, job: &JobRecord) -> Option<ActionRecord> {
        let record = self.store.action(key)?;
        // Node clocks may differ a little from ours.
        (!forced || record.started_unix + 60.0 >= job.submitted_unix).then_some(record)
    }

    fn wait(
        &self,
        stage: &StageInstance,
        key: &str,
        forced: bool,
        cancel: &AtomicBool,
        bar: &StageProgress,
        job: &mut JobRecord,
    ) -> Result<ActionRecord, String> {
        let mut finished_at: Option<(Instant, String)> = None;
        let mut last_error: Option<String> = None;
        loop {
            if let Some(record) = self.result(key, forced, job) {
                return Ok(record);
            }
            if cancel.load(Ordering::Relaxed) {
                let cancelled = self.client.scancel(std::slice::from_ref(&job.job_id));
                return Err(match cancelled {
                    Ok(()) => format!(
                        "interrupted: job {} cancelled (it checkpoints first)",
                        job.job_id
                    ),
                    Err(e) => format!(
                        "interrupted, and job {} could not be cancelled: {e}",
                        job.job_id
                    ),
                });
            }
            if let Some((since, why)) = &finished_at {
                if since.elapsed() >= self.settings.record_wait_time() {
                    return Err(self.failure(key, job, why));
                }
                std::thread::sleep(RECORD_CHECK);
                continue;
            }
            match self.queue.look(&job.job_id) {
                Ok(Seen::NotYet) => {}
                Ok(Seen::Listed(status)) => match phase(&status.state) {
                    Phase::Active => {
                        let reason = match status.reason.as_str() {
                            "" | "None" => String::new(),
                            r => format!(" ({r})"),
                        };
                        bar.set_message(format!("job {} {}{reason}", job.job_id, status.state));
                    }
                    Phase::Completed => {
                        finished_at = Some((Instant::now(), "completed without a result".into()));
                    }
                    Phase::TimedOut if job.resubmits < self.settings.resubmits() => {
                        let old = job.job_id.clone();
                        self.untrack(&old);
                        *job = self.submit(stage, key, forced, job.resubmits + 1)?;
                        self.track(&job.job_id);
                        tracing::warn!(stage = %stage.name, old = %old, new = %job.job_id, "job hit its time limit: resubmitted, resuming from its checkpoint");
                        bar.set_message(format!(
                            "job {old} timed out; resubmitted as {}",
                            job.job_id
                        ));
                    }
                    Phase::TimedOut => {
                        let why = format!(
                            "hit its time limit (TIMEOUT) {} times; raise `time` in [{}.slurm]",
                            job.resubmits + 1,
                            stage.name.base
                        );
                        // The record may still be on its way.
                        finished_at = Some((Instant::now(), why));
                    }
                    Phase::Ended(state) => {
                        finished_at = Some((Instant::now(), format!("ended {state}")));
                    }
                },
                Ok(Seen::Unlisted) => {
                    finished_at =
                        Some((Instant::now(), "left Slurm's queue without a result".into()));
                }
                Err(e) => {
                    // Slurm's controller can be briefly unreachable: warn once, keep waiting.
                    if last_error.as_ref() != Some(&e) {
                        tracing::warn!("asking Slurm about job {}: {e}", job.job_id);
                        last_error = Some(e);
                    }
                }
            }
            std::thread::sleep(RECORD_CHECK);
        }
    }

    fn failure(&self, key: &str, job: &JobRecord, why: &str) -> String {
        let log = self.log_path(key);
        let tail = log_tail(&log, LOG_TAIL_LINES);
        let mut msg = format!(
            "Slurm job {} {why}; its log is {}",
            job.job_id,
            log.display()
        );
        if !tail.is_empty() {
            msg.push_str(&format!("\n--- last lines of the log ---\n{tail}"));
        }
        msg
    }

    /// Cancels every job this launcher is waiting on (used when the coordinator stops).
    pub fn cancel_all(&self) {
        let ids: Vec<String> = self
            .in_flight
            .lock()
            .map(|f| f.iter().cloned().collect())
            .unwrap_or_default();
        if let Err(e) = self.client.scancel(&ids) {
            tracing::warn!("{e}");
        }
    }
}

/// Where `key`'s job record is saved.
pub fn job_record_path(cache: &Path, key: &str) -> PathBuf {
    cache
        .join(SLURM_DIR)
        .join("jobs")
        .join(format!("{key}.json"))
}

/// Where `key`'s jobs log.
pub fn job_log_path(cache: &Path, key: &str) -> PathBuf {
    cache
        .join(SLURM_DIR)
        .join("logs")
        .join(format!("{key}.log"))
}

/// The last `n` lines of `path` (empty if it cannot be read).
pub fn log_tail(path: &Path, n: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(unix)]
fn set_executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("cannot make {} executable: {e}", path.display()))
}

#[cfg(not(unix))]
fn set_executable(_path: &Path) -> Result<(), String> {
    Ok(())
}
