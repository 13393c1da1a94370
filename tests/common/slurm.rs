//! The one-node Slurm cluster of `scripts/slurm/up.sh`, shared by the cluster tests.

use std::process::Command;
use std::sync::Mutex;

use super::text;

/// Cluster tests share two CPUs and two GPUs: one at a time, within a test binary and across
/// them (a benchmark on the same cluster takes the same file lock).
static CLUSTER: Mutex<()> = Mutex::new(());
const CLUSTER_LOCK_FILE: &str = "/tmp/pipeline-slurm-cluster.lock";

/// Holds the cluster for one test.
pub struct ClusterGuard {
    _thread: std::sync::MutexGuard<'static, ()>,
    _file: std::fs::File,
}

/// The cluster, if one answers; panics when CI requires one (`PIPELINE_REQUIRE_SLURM`) and
/// none does.
pub fn cluster() -> Option<ClusterGuard> {
    let up = Command::new("sinfo")
        .args(["--noheader", "--format=%T"])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
    if !up {
        assert!(
            std::env::var_os("PIPELINE_REQUIRE_SLURM").is_none(),
            "PIPELINE_REQUIRE_SLURM is set but no Slurm cluster answers: run scripts/slurm/up.sh"
        );
        eprintln!("skipped: no Slurm cluster (scripts/slurm/up.sh starts one)");
        return None;
    }
    let thread = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let file = std::fs::File::create(CLUSTER_LOCK_FILE).expect("cluster lock file");
    file.lock().expect("lock the cluster");
    Some(ClusterGuard {
        _thread: thread,
        _file: file,
    })
}

/// `STATE|reason` of a job, as `squeue` shows it (empty once Slurm forgot it).
pub fn job_state(id: &str) -> String {
    let out = Command::new("squeue")
        .args([
            "--noheader",
            "--states=all",
            "--format=%T|%r",
            &format!("--jobs={id}"),
        ])
        .output()
        .expect("squeue");
    text(&out.stdout).trim().to_string()
}

/// Lets a requeued job start now instead of after Slurm's ~120 s hold (`BeginTime`).
pub fn release(id: &str) {
    let ok = Command::new("scontrol")
        .args(["update", &format!("JobId={id}"), "StartTime=now"])
        .status()
        .expect("scontrol");
    assert!(ok.success(), "scontrol update JobId={id} StartTime=now");
}

/// Submits a one-second job to the `high` partition needing one CPU: a job of the preemptible
/// `low` partition holding the node's CPUs is preempted (SIGTERM, requeued).
pub fn preempt_with_high_priority_job() {
    let high = Command::new("sbatch")
        .args([
            "--parsable",
            "--partition=high",
            "--cpus-per-task=1",
            "--output=/dev/null",
        ])
        .args(["--wrap", "sleep 1"])
        .output()
        .expect("sbatch");
    assert!(high.status.success(), "{}", text(&high.stderr));
}
