//! The Slurm commands the coordinator calls (`sbatch`, `squeue`, `scancel`), counted.

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A job's state as `squeue` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStatus {
    /// `%T`: PENDING, RUNNING, COMPLETED, FAILED, TIMEOUT, PREEMPTED, ...
    pub state: String,
    /// `%r`: why it is pending, or `None`.
    pub reason: String,
}

/// Calls Slurm's commands and counts the calls (a run reports how many it made).
#[derive(Debug, Default)]
pub struct SlurmClient {
    calls: AtomicUsize,
}

impl SlurmClient {
    /// A client.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many Slurm commands were called so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::Relaxed)
    }

    fn call(&self, program: &str, args: &[String]) -> Result<std::process::Output, String> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Command::new(program).args(args).output().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                format!("`{program}` is not on PATH: run the coordinator where Slurm's commands are (a login node)")
            } else {
                format!("cannot run `{program}`: {e}")
            }
        })
    }

    /// Submits with `sbatch` (whose arguments start with `--parsable`); the job id.
    pub fn sbatch(&self, args: &[String]) -> Result<String, String> {
        let out = self.call("sbatch", args)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "sbatch refused the job: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        // `--parsable` prints `jobid` or `jobid;cluster`.
        let id = stdout.trim().split(';').next().unwrap_or("").trim();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit() || c == '_') {
            return Err(format!("sbatch printed no job id: `{}`", stdout.trim()));
        }
        Ok(id.to_string())
    }

    /// The states of `ids`, in one `squeue` call; jobs Slurm no longer knows are absent.
    pub fn squeue(&self, ids: &[String]) -> Result<HashMap<String, JobStatus>, String> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let args = vec![
            "--noheader".to_string(),
            "--states=all".to_string(),
            format!("--jobs={}", ids.join(",")),
            "--format=%i|%T|%r".to_string(),
        ];
        let out = self.call("squeue", &args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            // Every id unknown (finished jobs are forgotten after MinJobAge): none listed.
            if stderr.contains("Invalid job id") {
                return Ok(HashMap::new());
            }
            return Err(format!("squeue failed: {}", stderr.trim()));
        }
        Ok(parse_squeue(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Cancels `ids` (SIGTERM first, so workers checkpoint).
    pub fn scancel(&self, ids: &[String]) -> Result<(), String> {
        if ids.is_empty() {
            return Ok(());
        }
        let out = self.call("scancel", ids)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "scancel failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

/// `id|STATE|reason` lines into states by job id.
pub fn parse_squeue(text: &str) -> HashMap<String, JobStatus> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.trim().splitn(3, '|');
            let id = fields.next()?.trim();
            let state = fields.next()?.trim();
            let reason = fields.next().unwrap_or("").trim();
            (!id.is_empty() && !state.is_empty()).then(|| {
                (
                    id.to_string(),
                    JobStatus {
                        state: state.to_string(),
                        reason: reason.to_string(),
                    },
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_lines_parse_and_garbage_is_skipped() {
        let states = parse_squeue("12|RUNNING|None\n13_2|PENDING|Resources\nnonsense\n\n");
        assert_eq!(states.len(), 2);
        assert_eq!(states["12"].state, "RUNNING");
        assert_eq!(states["13_2"].reason, "Resources");
    }
}
