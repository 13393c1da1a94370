//! Submitting a stage as a Slurm job, re-attaching to one already submitted, and waiting for
//! its result.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::client::{JobStatus, SlurmClient};
use super::queue::{phase, Phase, Queue, Seen};
use super::sbatch::{array_script_text, job_name, sbatch_args, script_text, JobSpec};
use super::{SlurmOptions, SLURM_DIR};
use crate::manifest::StageInstance;
use crate::progress::StageProgress;
use crate::store::{ActionRecord, Store};

/// The worker's command line: the CLI knows its own flags, the launcher only asks for them.
pub trait WorkerCommand: Send + Sync {
    /// The program and arguments that compute `stage` (an instance name) from producers
    /// already cached, refusing anything else: a key other than `key` when the coordinator
    /// knows it (a detached run submits stages whose producers have not run yet, so it does
    /// not); `forced` when the stage is to be recomputed although cached.
    fn argv(&self, stage: &str, key: Option<&str>, forced: bool) -> Vec<String>;
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
    batch: Mutex<Vec<Request>>,
    max_array_size: OnceLock<usize>,
    /// What Slurm said, when first asked, about the jobs the cache remembers.
    remembered: OnceLock<HashMap<String, JobStatus>>,
}

/// A stage waiting in the submission batch, with where its job record goes.
type Request = (Submission, mpsc::Sender<Result<JobRecord, String>>);

/// One stage ready to be submitted.
struct Submission {
    /// Its key, which names its script, log and record; for a detached stage whose key is
    /// not known yet, `detached-<stage>`.
    key: String,
    stage: String,
    /// Stages of one table with equal resources share a group (and can share an array).
    group: String,
    job_name: String,
    argv: Vec<String>,
    resources: SlurmOptions,
    gpu: bool,
}

/// How long the first stage ready waits for its siblings before submitting: matrix siblings
/// become ready together, within milliseconds of each other.
const BATCH_WINDOW: Duration = Duration::from_millis(500);

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
            batch: Mutex::new(Vec::new()),
            max_array_size: OnceLock::new(),
            remembered: OnceLock::new(),
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

    /// The cache root.
    pub fn cache(&self) -> &Path {
        self.store.root()
    }

    /// The log of `key`'s jobs.
    pub fn log_path(&self, key: &str) -> PathBuf {
        job_log_path(self.store.root(), key)
    }

    /// What submitting `stage` (key `key`) takes.
    /// What submitting `stage` takes; `key` is `None` for a detached stage whose key is not
    /// known yet (its files are then named after the stage).
    fn submission(&self, stage: &StageInstance, key: Option<&str>, forced: bool) -> Submission {
        let name = stage.name.to_string();
        let resources = stage.slurm.over(&self.settings);
        Submission {
            key: key.map_or_else(
                || format!("detached-{}", stage.name.file_stem()),
                str::to_string,
            ),
            argv: self.worker.argv(&name, key, forced),
            group: format!(
                "{}|{}|{}",
                stage.name.base,
                stage.needs_gpu,
                serde_json::to_string(&resources).unwrap_or_default()
            ),
            job_name: job_name(&self.experiment, &stage.name.base),
            stage: name,
            resources,
            gpu: stage.needs_gpu,
        }
    }

    fn sbatch_args(
        &self,
        s: &Submission,
        script: &Path,
        log: &Path,
        array: Option<String>,
    ) -> Vec<String> {
        self.sbatch_args_after(s, script, log, array, Vec::new())
    }

    fn sbatch_args_after(
        &self,
        s: &Submission,
        script: &Path,
        log: &Path,
        array: Option<String>,
        after: Vec<String>,
    ) -> Vec<String> {
        let workdir = self.worker.workdir();
        sbatch_args(
            &JobSpec {
                name: s.job_name.clone(),
                script,
                log,
                workdir: &workdir,
                resources: &s.resources,
                gpu: s.gpu,
                array,
                after,
            },
            self.settings.signal_before_time(),
        )
    }

    /// The job script and `sbatch` arguments `stage` would be submitted with alone.
    pub fn job(&self, stage: &StageInstance, key: &str, forced: bool) -> (String, Vec<String>) {
        let s = self.submission(stage, Some(key), forced);
        let args = self.sbatch_args(&s, &self.script_path(key), &self.log_path(key), None);
        (script_text(&s.stage, key, &s.argv), args)
    }

    fn save(&self, record: &JobRecord) -> Result<(), String> {
        let path = self.record_path(&record.key);
        let json = serde_json::to_vec_pretty(record).map_err(|e| e.to_string())?;
        crate::atomic::write_atomic(&path, &json, true)
            .map_err(|e| format!("cannot save job record {}: {e}", path.display()))
    }

    fn write_script(&self, path: &Path, text: &str) -> Result<(), String> {
        crate::atomic::write_atomic(path, text.as_bytes(), true)
            .map_err(|e| format!("cannot write job script {}: {e}", path.display()))?;
        set_executable(path)
    }

    /// Submits `stage` for a detached run: after the jobs `after` succeed, a worker computes it
    /// from the cache (checking `key` when it is known now). Returns the job id and its log.
    pub fn submit_detached(
        &self,
        stage: &StageInstance,
        key: Option<&str>,
        forced: bool,
        after: Vec<String>,
    ) -> Result<(String, PathBuf), String> {
        let s = self.submission(stage, key, forced);
        let script = self.script_path(&s.key);
        let log = self.log_path(&s.key);
        self.write_script(
            &script,
            &script_text(
                &s.stage,
                key.unwrap_or("(known once its producers finish)"),
                &s.argv,
            ),
        )?;
        let args = self.sbatch_args_after(&s, &script, &log, None, after);
        Ok((self.client.sbatch(&args)?, log))
    }

    /// Submits one stage as its own job.
    fn submit_single(&self, s: &Submission, resubmits: u32) -> Result<JobRecord, String> {
        let script = self.script_path(&s.key);
        self.write_script(&script, &script_text(&s.stage, &s.key, &s.argv))?;
        let args = self.sbatch_args(s, &script, &self.log_path(&s.key), None);
        let record = JobRecord {
            key: s.key.clone(),
            stage: s.stage.clone(),
            job_id: self.client.sbatch(&args)?,
            submitted_unix: unix_now(),
            resubmits,
        };
        self.save(&record)?;
        Ok(record)
    }

    /// Submits stages of one table with equal resources as one job array (task `i` computes
    /// the `i`-th); their job ids are `ARRAY_i`.
    fn submit_array(&self, group: &[Submission]) -> Result<Vec<JobRecord>, String> {
        let first = &group[0];
        let name = blake3::hash(
            group
                .iter()
                .map(|s| s.key.as_str())
                .collect::<Vec<_>>()
                .join(",")
                .as_bytes(),
        )
        .to_hex();
        let jobs = self.store.root().join(SLURM_DIR).join("jobs");
        let script = jobs.join(format!("array-{}.sh", &name[..16]));
        let tasks: Vec<(String, String, Vec<String>)> = group
            .iter()
            .map(|s| (s.stage.clone(), s.key.clone(), s.argv.clone()))
            .collect();
        let logs: Vec<PathBuf> = group.iter().map(|s| self.log_path(&s.key)).collect();
        self.write_script(&script, &array_script_text(&tasks, &logs))?;
        // Slurm's own messages about a task (cancelled, time limit) go to a file per task.
        let slurm_log = self
            .store
            .root()
            .join(SLURM_DIR)
            .join("logs")
            .join("array-%A_%a.log");
        let mut range = format!("0-{}", group.len() - 1);
        if let Some(p) = self.settings.array_parallelism.filter(|p| *p > 0) {
            range.push_str(&format!("%{p}"));
        }
        let args = self.sbatch_args(first, &script, &slurm_log, Some(range));
        let array = self.client.sbatch(&args)?;
        let submitted_unix = unix_now();
        let records: Vec<JobRecord> = group
            .iter()
            .enumerate()
            .map(|(i, s)| JobRecord {
                key: s.key.clone(),
                stage: s.stage.clone(),
                job_id: format!("{array}_{i}"),
                submitted_unix,
                resubmits: 0,
            })
            .collect();
        for r in &records {
            self.save(r)?;
        }
        Ok(records)
    }

    /// Submits `s`, together with the submissions that arrive within a short window: those of
    /// the same table with equal resources go as one job array (matrix siblings ready
    /// together), at most `MaxArraySize` tasks per array.
    fn submit_batched(&self, s: Submission) -> Result<JobRecord, String> {
        let (reply, answer) = mpsc::channel();
        let leader = {
            let mut batch = self
                .batch
                .lock()
                .map_err(|_| "internal: submission batch lock poisoned".to_string())?;
            batch.push((s, reply));
            batch.len() == 1
        };
        if leader {
            std::thread::sleep(BATCH_WINDOW);
            let requests = match self.batch.lock() {
                Ok(mut batch) => std::mem::take(&mut *batch),
                Err(_) => return Err("internal: submission batch lock poisoned".into()),
            };
            self.submit_requests(requests);
        }
        answer
            .recv()
            .map_err(|_| "internal: the submission of this stage was lost".to_string())?
    }

    fn submit_requests(&self, requests: Vec<Request>) {
        let mut groups: Vec<Vec<Request>> = Vec::new();
        for request in requests {
            match groups.iter_mut().find(|g| g[0].0.group == request.0.group) {
                Some(g) => g.push(request),
                None => groups.push(vec![request]),
            }
        }
        let max_tasks = self
            .max_array_size
            .get_or_init(|| self.client.max_array_size())
            .saturating_sub(1)
            .max(1);
        for group in groups {
            let mut rest = group;
            while !rest.is_empty() {
                let chunk: Vec<_> = rest.drain(..rest.len().min(max_tasks)).collect();
                let (subs, replies): (Vec<Submission>, Vec<_>) = chunk.into_iter().unzip();
                let results: Vec<Result<JobRecord, String>> = if subs.len() == 1 {
                    vec![self.submit_single(&subs[0], 0)]
                } else {
                    match self.submit_array(&subs) {
                        Ok(records) => records.into_iter().map(Ok).collect(),
                        Err(e) => vec![Err(e); subs.len()],
                    }
                };
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
        }
    }

    /// A job saved for `key` that Slurm still runs or queues: re-attach to it. Slurm is asked
    /// once per coordinator about every job the cache remembers (a restarted coordinator with
    /// fifty jobs in flight makes one `squeue` call, not fifty).
    fn reattach(&self, key: &str) -> Option<JobRecord> {
        let record: JobRecord = std::fs::read(self.record_path(key))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())?;
        let remembered = self.remembered.get_or_init(|| {
            let ids = super::housekeeping::remembered_jobs(self.store.root());
            self.client.squeue(&ids).unwrap_or_else(|e| {
                tracing::warn!("cannot ask Slurm about the jobs on record: {e}");
                HashMap::new()
            })
        });
        let status = remembered.get(&record.job_id)?;
        (phase(&status.state) == Phase::Active).then_some(record)
    }

    /// Computes `stage` (key `key`) as a Slurm job: re-attaches to its job if one is still
    /// queued or running, else submits one; waits until its action record exists, resubmitting
    /// after a time limit; on `cancel`, cancels the job. The error says what Slurm reported
    /// and shows the end of the job's log.
    ///
    /// `siblings` says that other instances of the stage's table became ready with it: only
    /// then is its submission held back a moment to go as one job array with theirs.
    pub fn run_stage(
        &self,
        stage: &StageInstance,
        key: &str,
        forced: bool,
        siblings: bool,
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
                let submission = self.submission(stage, Some(key), forced);
                let job = if siblings {
                    self.submit_batched(submission)?
                } else {
                    self.submit_single(&submission, 0)?
                };
                bar.set_message(format!("submitted job {}", job.job_id));
                job
            }
        };
        self.track(&job.job_id);
        let result = self.wait(stage, key, forced, cancel, bar, &mut job);
        self.untrack(&job.job_id);
        if result.is_ok() {
            // Done: nothing to re-attach to. The log stays (gc prunes it with its key).
            for path in [self.record_path(key), self.script_path(key)] {
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::debug!("cannot remove {}: {e}", path.display());
                }
            }
        }
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
                        let again = self.submission(stage, Some(key), forced);
                        *job = self.submit_single(&again, job.resubmits + 1)?;
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
        // An array task's own log holds what Slurm said about it (cancelled, time limit).
        if job.job_id.contains('_') {
            let slurm_log = self
                .store
                .root()
                .join(SLURM_DIR)
                .join("logs")
                .join(format!("array-{}.log", job.job_id));
            let said = log_tail(&slurm_log, 5);
            if !said.is_empty() {
                msg.push_str(&format!(
                    "\n--- Slurm's notes ({}) ---\n{said}",
                    slurm_log.display()
                ));
            }
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
