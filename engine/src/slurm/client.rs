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

    /// `MaxArraySize` from `scontrol show config` (Slurm's default, 1001, if it cannot be read).
    pub fn max_array_size(&self) -> usize {
        const SLURM_DEFAULT: usize = 1001;
        let Ok(out) = self.call("scontrol", &["show".into(), "config".into()]) else {
            return SLURM_DEFAULT;
        };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once('=')?;
                (name.trim() == "MaxArraySize").then(|| value.trim().parse().ok())?
            })
            .unwrap_or(SLURM_DEFAULT)
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

/// `id|STATE|reason` lines into states by job id. Pending tasks of an array come as one line
/// (`58_[0,2-4%2]`): each task gets its own entry (`58_0`, `58_2`, ...).
pub fn parse_squeue(text: &str) -> HashMap<String, JobStatus> {
    let mut states = HashMap::new();
    for line in text.lines() {
        let mut fields = line.trim().splitn(3, '|');
        let (Some(id), Some(state)) = (fields.next(), fields.next()) else {
            continue;
        };
        let (id, state) = (id.trim(), state.trim());
        if id.is_empty() || state.is_empty() {
            continue;
        }
        let status = JobStatus {
            state: state.to_string(),
            reason: fields.next().unwrap_or("").trim().to_string(),
        };
        for id in expand_array_tasks(id) {
            states.insert(id, status.clone());
        }
    }
    states
}

/// `58_[0,2-4%2]` into `58_0`, `58_2`, `58_3`, `58_4`; any other id as it is.
fn expand_array_tasks(id: &str) -> Vec<String> {
    let Some((job, rest)) = id.split_once("_[") else {
        return vec![id.to_string()];
    };
    let Some(list) = rest.strip_suffix(']') else {
        return vec![id.to_string()];
    };
    let list = list.split('%').next().unwrap_or("");
    let mut ids = Vec::new();
    for part in list.split(',') {
        let bounds = match part.split_once('-') {
            Some((a, b)) => a.parse::<u64>().ok().zip(b.parse::<u64>().ok()),
            None => part.parse::<u64>().ok().map(|a| (a, a)),
        };
        match bounds {
            // A malformed or absurd range is kept as written rather than expanded.
            Some((a, b)) if a <= b && b - a < 100_000 => {
                ids.extend((a..=b).map(|i| format!("{job}_{i}")))
            }
            _ => return vec![id.to_string()],
        }
    }
    ids
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

    #[test]
    fn pending_array_tasks_are_listed_one_by_one() {
        let states = parse_squeue("58_[0,2-4%2]|PENDING|Resources\n58_1|RUNNING|None\n");
        let mut ids: Vec<&String> = states.keys().collect();
        ids.sort();
        assert_eq!(ids, ["58_0", "58_1", "58_2", "58_3", "58_4"]);
        assert_eq!(states["58_3"].state, "PENDING");
        assert_eq!(states["58_1"].state, "RUNNING");
    }
}
