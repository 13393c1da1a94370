//! What Slurm says about the coordinator's jobs: one batched `squeue` per poll interval,
//! shared by every stage waiting on a job.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::client::{JobStatus, SlurmClient};

/// What a job's state means to the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Queued, running, or coming back (preempted, requeued, suspended): keep waiting.
    Active,
    /// Ended successfully: its record should exist (or appear shortly).
    Completed,
    /// Hit its time limit: Slurm does not requeue it; the coordinator may resubmit.
    TimedOut,
    /// Ended without success (failed, cancelled, out of memory, node failure, ...).
    Ended(String),
}

/// Classifies a `squeue` state (`%T`).
pub fn phase(state: &str) -> Phase {
    match state {
        "COMPLETED" => Phase::Completed,
        "TIMEOUT" => Phase::TimedOut,
        "FAILED" | "CANCELLED" | "NODE_FAIL" | "OUT_OF_MEMORY" | "BOOT_FAIL" | "DEADLINE"
        | "SPECIAL_EXIT" | "REVOKED" => Phase::Ended(state.to_string()),
        // PENDING, RUNNING, CONFIGURING, COMPLETING, SUSPENDED, STOPPED, PREEMPTED, REQUEUED,
        // REQUEUE_HOLD, REQUEUE_FED, RESIZING, SIGNALING, STAGE_OUT, and states of newer
        // versions: still the job's business.
        _ => Phase::Active,
    }
}

struct Snapshot {
    taken: Option<Instant>,
    states: HashMap<String, JobStatus>,
    /// Watched job ids, each with whether a poll has covered it since it was watched.
    watched: BTreeMap<String, bool>,
    error: Option<String>,
}

/// The states of watched jobs, refreshed by one `squeue` call at most every `interval`.
pub struct Queue<'c> {
    client: &'c SlurmClient,
    interval: Duration,
    snapshot: Mutex<Snapshot>,
}

/// A watched job as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Not polled since it was watched.
    NotYet,
    /// Listed with this state.
    Listed(JobStatus),
    /// Polled, and Slurm did not list it (finished long ago, or never existed).
    Unlisted,
}

impl<'c> Queue<'c> {
    /// A queue view polling at most every `interval`.
    pub fn new(client: &'c SlurmClient, interval: Duration) -> Self {
        Self {
            client,
            interval,
            snapshot: Mutex::new(Snapshot {
                taken: None,
                states: HashMap::new(),
                watched: BTreeMap::new(),
                error: None,
            }),
        }
    }

    /// Starts watching `id` (it is seen at the next regular poll: submitting many jobs at
    /// once does not multiply the calls).
    pub fn watch(&self, id: &str) {
        if let Ok(mut s) = self.snapshot.lock() {
            s.watched.insert(id.to_string(), false);
            s.states.remove(id);
        }
    }

    /// Stops watching `id`.
    pub fn forget(&self, id: &str) {
        if let Ok(mut s) = self.snapshot.lock() {
            s.watched.remove(id);
            s.states.remove(id);
        }
    }

    /// The job's last known state, polling `squeue` (for every watched job at once) when the
    /// snapshot is older than the interval. An error of the last poll is returned as such.
    pub fn look(&self, id: &str) -> Result<Seen, String> {
        let mut s = self
            .snapshot
            .lock()
            .map_err(|_| "internal: job queue lock poisoned".to_string())?;
        let stale = s.taken.is_none_or(|t| t.elapsed() >= self.interval);
        if stale && !s.watched.is_empty() {
            let ids: Vec<String> = s.watched.keys().cloned().collect();
            match self.client.squeue(&ids) {
                Ok(states) => {
                    s.states = states;
                    s.error = None;
                    s.watched.values_mut().for_each(|polled| *polled = true);
                }
                Err(e) => s.error = Some(e),
            }
            s.taken = Some(Instant::now());
        }
        if let Some(e) = &s.error {
            return Err(e.clone());
        }
        if s.watched.get(id) != Some(&true) {
            return Ok(Seen::NotYet);
        }
        Ok(match s.states.get(id) {
            Some(status) => Seen::Listed(status.clone()),
            None => Seen::Unlisted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preempted_and_requeued_jobs_are_still_running() {
        for state in [
            "PENDING",
            "RUNNING",
            "PREEMPTED",
            "REQUEUED",
            "REQUEUE_HOLD",
            "COMPLETING",
        ] {
            assert_eq!(phase(state), Phase::Active, "{state}");
        }
        assert_eq!(phase("COMPLETED"), Phase::Completed);
        assert_eq!(phase("TIMEOUT"), Phase::TimedOut);
        assert_eq!(phase("OUT_OF_MEMORY"), Phase::Ended("OUT_OF_MEMORY".into()));
        assert_eq!(phase("NODE_FAIL"), Phase::Ended("NODE_FAIL".into()));
    }
}
