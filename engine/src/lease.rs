//! One owner at a time for a key's checkpoint directory, across machines.
//!
//! A key's lock (`Store::lock_key`) is an `flock`, which network filesystems (NFS, Lustre,
//! GPFS) implement unreliably or per node. So whoever computes a key also holds a lease: the
//! file `checkpoints/<key>.lease`, created exclusively, naming its owner (host, process, Slurm
//! job) and refreshed by a heartbeat. Another process finding a live lease leaves the key
//! alone. A lease is stale, and is taken over, when its heartbeat is older than
//! [`STALE_AFTER`], or at once when its owner is a process of this host that no longer exists
//! (a run killed with `kill -9` and rerun).

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// How often a held lease is refreshed.
pub const HEARTBEAT: Duration = Duration::from_secs(15);
/// How old a heartbeat may be before the lease counts as abandoned.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// Who holds a lease, as written in its file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseOwner {
    /// Host name.
    pub host: String,
    /// Process id on that host.
    pub pid: u32,
    /// The Slurm job, when the owner is a worker.
    pub job: Option<String>,
    /// Last heartbeat (seconds since the epoch).
    pub heartbeat_unix: f64,
}

impl std::fmt::Display for LeaseOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "process {} on {}", self.pid, self.host)?;
        if let Some(job) = &self.job {
            write!(f, " (Slurm job {job})")?;
        }
        Ok(())
    }
}

/// A held lease: refreshed in the background, removed when dropped.
pub struct Lease {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    heartbeat: Option<std::thread::JoinHandle<()>>,
}

/// Why a lease could not be taken.
#[derive(Debug)]
pub enum LeaseError {
    /// A live owner holds it.
    Held(LeaseOwner),
    /// The lease file could not be read or written.
    Io(io::Error),
}

impl std::fmt::Display for LeaseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseError::Held(owner) => {
                let age = unix_now() - owner.heartbeat_unix;
                write!(f, "{owner} holds it (heartbeat {age:.0} s ago)")
            }
            LeaseError::Io(e) => write!(f, "{e}"),
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// This machine's host name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

fn me() -> LeaseOwner {
    LeaseOwner {
        host: host_name(),
        pid: std::process::id(),
        job: std::env::var("SLURM_JOB_ID").ok(),
        heartbeat_unix: unix_now(),
    }
}

fn process_exists(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Whether `owner` has given the lease up: an old heartbeat, or a dead process of this host.
fn abandoned(owner: &LeaseOwner) -> bool {
    let old = unix_now() - owner.heartbeat_unix > STALE_AFTER.as_secs_f64();
    let dead_here = owner.host == host_name() && !process_exists(owner.pid);
    old || dead_here
}

fn write_owner(file: &mut File, owner: &LeaseOwner) -> io::Result<()> {
    let json = serde_json::to_vec(owner).map_err(io::Error::other)?;
    file.write_all(&json)?;
    file.sync_all()
}

impl Lease {
    /// Takes the lease at `path` for this process, taking over an abandoned one.
    pub fn take(path: &Path) -> Result<Lease, LeaseError> {
        for _ in 0..2 {
            match File::options().write(true).create_new(true).open(path) {
                Ok(mut file) => {
                    write_owner(&mut file, &me()).map_err(LeaseError::Io)?;
                    return Ok(Lease::hold(path.to_path_buf()));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let current = std::fs::read(path)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<LeaseOwner>(&b).ok());
                    match current {
                        Some(owner) if !abandoned(&owner) => return Err(LeaseError::Held(owner)),
                        // Abandoned or unreadable (a torn write of a killed owner): take it.
                        _ => match std::fs::remove_file(path) {
                            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                                return Err(LeaseError::Io(e))
                            }
                            _ => {}
                        },
                    }
                }
                Err(e) => return Err(LeaseError::Io(e)),
            }
        }
        // Someone else took it between our removal and our creation.
        let owner = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<LeaseOwner>(&b).ok());
        match owner {
            Some(owner) => Err(LeaseError::Held(owner)),
            None => Err(LeaseError::Io(io::Error::other(
                "the lease changed hands meanwhile",
            ))),
        }
    }

    fn hold(path: PathBuf) -> Lease {
        let stop = Arc::new(AtomicBool::new(false));
        let heartbeat = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::Builder::new()
                .name("lease-heartbeat".into())
                .spawn(move || {
                    let tick = Duration::from_millis(250);
                    let mut since = Duration::ZERO;
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        since += tick;
                        if since >= HEARTBEAT {
                            since = Duration::ZERO;
                            let json = serde_json::to_vec(&me()).unwrap_or_default();
                            if let Err(e) = crate::atomic::write_atomic(&path, &json, false) {
                                tracing::warn!("cannot refresh lease {}: {e}", path.display());
                            }
                        }
                    }
                })
                .ok()
        };
        Lease {
            path,
            stop,
            heartbeat,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(host: &str, pid: u32, age_s: f64) -> LeaseOwner {
        LeaseOwner {
            host: host.into(),
            pid,
            job: Some("12".into()),
            heartbeat_unix: unix_now() - age_s,
        }
    }

    fn plant(path: &Path, o: &LeaseOwner) {
        std::fs::write(path, serde_json::to_vec(o).unwrap()).unwrap();
    }

    #[test]
    fn a_live_owner_elsewhere_keeps_its_lease() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lease");
        plant(&path, &owner("other-node", 1, 5.0));
        match Lease::take(&path) {
            Err(LeaseError::Held(o)) => assert_eq!(o.host, "other-node"),
            other => panic!("expected Held, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn stale_heartbeats_and_dead_local_owners_are_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lease");
        plant(&path, &owner("other-node", 1, 3600.0));
        drop(Lease::take(&path).expect("a stale lease is taken over"));
        assert!(!path.exists(), "a dropped lease is removed");
        // A pid that cannot exist on this host.
        plant(&path, &owner(&host_name(), u32::MAX - 1, 0.0));
        let lease = Lease::take(&path).expect("a dead local owner's lease is taken over");
        let held: LeaseOwner = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(held.pid, std::process::id());
        assert!(matches!(Lease::take(&path), Err(LeaseError::Held(_))));
        drop(lease);
    }
}
