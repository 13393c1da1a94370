//! Running stages as Slurm jobs.
//!
//! The coordinator (`pipeline run --executor slurm`) stays the executor of [`crate::executor`]:
//! it computes each stage's key once the stage's producers have finished, exactly as a local
//! run does, and then hands the stage either to a thread of its own process (cheap stages,
//! `launch = "local"`) or to Slurm, as one job running the same binary in worker mode
//! (`pipeline run M --only STAGE --expect-key KEY`, see [`WorkerCommand`]). The worker refuses
//! to compute a producer that is not cached or a key other than the one expected, so a node
//! with a different binary or different inputs fails loudly instead of caching a wrong result.
//!
//! The store is the truth: a stage is done when its action record exists. Slurm is asked in
//! one batched `squeue` per poll interval (never one call per job) only to notice jobs that
//! ended without a record (failed, cancelled, out of memory, node failure, time limit).
//! Preempted and requeued jobs count as running: on preemption the worker gets SIGTERM,
//! checkpoints and exits, and the requeued job resumes from `checkpoints/<key>/`; ahead of the
//! time limit ([`SlurmOptions::signal_before`]) it gets SIGUSR1, checkpoints and requeues its
//! own job. A job that hit its time limit all the same is resubmitted, a bounded number of
//! times. Job ids are saved in the cache (`slurm/jobs/<key>.json`), so a
//! restarted coordinator re-attaches to jobs still queued or running instead of submitting them
//! again. Every job logs to `slurm/logs/<key>.log` (appended across requeues); its tail is shown
//! when the job fails.
//!
//! A detached run ([`detach`]) submits the whole DAG with `afterok` dependencies and exits.
//!
//! Modules: `options` (what a manifest says: resources and scheduling knobs), [`sbatch`] (the
//! job script and its `sbatch` command line), [`queue`] (job states from `squeue`, batched),
//! [`launcher`] (submitting a stage, re-attaching, waiting for its record).

mod client;
mod options;

pub mod detach;
pub mod housekeeping;
pub mod launcher;
pub mod queue;
pub mod sbatch;

pub use client::{JobStatus, SlurmClient};
pub use launcher::{JobRecord, SlurmLauncher, WorkerCommand};
pub use options::{ExecutorKind, Launch, SlurmOptions, SlurmOptionsError};

/// The cache's directory for Slurm's files (job records, scripts, logs). Its presence on a
/// node is how a worker knows it sees the coordinator's cache.
pub const SLURM_DIR: &str = "slurm";

/// Exit code of a worker that could not take its key's lock (another process computes it):
/// distinct, so that the coordinator can tell it from a failure.
pub const EXIT_KEY_BUSY: u8 = 75;
