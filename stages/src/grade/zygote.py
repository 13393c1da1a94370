# Fork server ("zygote") for `pipeline grade`; see stages/src/grade/sandbox.rs.
#
# Appended to harness.py and run as `python3 -I -B -c <harness + this>` by the grader,
# with a SOCK_SEQPACKET control socket on fd 3. Starting an interpreter and importing
# what the harness needs costs ~25 ms of CPU, more than a typical HumanEval check: the
# zygote pays it once and forks a fresh child per sample. The zygote itself never runs
# untrusted code, so every child starts from the same pristine interpreter state.
#
# Requests (one datagram each, JSON), answered with one datagram of ASCII text:
#   {"op": "run", ...} with three descriptors attached (result pipe write end, nonce
#       pipe read end, output pipe write end): fork a child that applies the isolation
#       layers and runs `_main`; answer "pid N" or "error <why>".
#   {"op": "reap", "pid": N}: wait for child N (exited, or killed by the grader);
#       answer "status S" with the raw wait status.
# A child is never reaped before its "reap" request, so its pid (and process group id)
# stays pinned while the grader may still signal the group.
# End of file on the socket (grader done, or killed: the kernel closes its end) ends the
# zygote, which first kills what is still running (each child's process group and, as
# root, every process of its uid) and removes those runs' directories, so a grader that
# dies mid-run leaves nothing behind.
import ctypes
import fcntl
import resource
import shutil
import signal
import socket

# Modules HumanEval and MBPP programs commonly import (`from typing import List` alone is
# ~3 ms per sample in a fresh interpreter). Loaded once here, each child gets its own
# pristine copy with the fork, as a fresh import would give it.
import collections  # noqa: F401
import copy  # noqa: F401
import hashlib  # noqa: F401
import math  # noqa: F401
import random  # noqa: F401
import string  # noqa: F401
import typing  # noqa: F401

_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4


def _check(ret, what):
    if ret != 0:
        raise OSError(ctypes.get_errno(), what)


def _isolate(req, res_w, nonce_r, out_w, zygote_pid):
    """Everything the child does before running the harness, in the documented order."""
    os.setsid()
    _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    if os.getppid() != zygote_pid:
        raise OSError("the zygote died before the sample started")
    # Before the mounts: the private tmpfs on /tmp hides this directory by path, but the
    # working directory keeps referring to it.
    os.chdir(req["dir"])
    uid = req["uid"]
    # Without root, an unprivileged user namespace may still grant a netns.
    net = req["net"] and (
        _libc.unshare(_CLONE_NEWNET) == 0
        or (uid is None and _libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0)
    )
    mnt = False
    if req["mnt"]:
        # SysV IPC objects outlive processes; a private namespace discards them.
        _libc.unshare(_CLONE_NEWIPC)
        if _libc.unshare(_CLONE_NEWNS) == 0:
            flags = _MS_NOSUID | _MS_NODEV
            if (
                _libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) == 0
                and _libc.mount(
                    b"tmpfs", req["work"].encode(), b"tmpfs", flags, req["work_opts"].encode()
                )
                == 0
            ):
                mnt = True
                for d in req["tmp_dirs"]:
                    opts = req["tmpfs_opts"].encode()
                    if _libc.mount(b"tmpfs", d.encode(), b"tmpfs", flags, opts) != 0:
                        mnt = False
    # Descriptors: stdin /dev/null, stdout and stderr the output pipe, 3 the result
    # pipe, 4 the nonce; nothing else (the control socket above all) stays open.
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    os.dup2(res_w, 3)
    os.dup2(nonce_r, 4)
    os.closerange(5, 1 << 20)
    for which, value in req["limits"]:
        resource.setrlimit(which, (value, value))
    line = "ISO net=%d mnt=%d uid=%d\n" % (net, mnt, uid is not None)
    if os.write(3, line.encode()) != len(line):
        raise OSError("short write of the isolation line")


def _child(ctrl, req, fds, zygote_pid):
    # The socket object must not close fd 3 (soon the result pipe) when collected.
    ctrl.detach()
    # Out of the way of 0..4, which the dup2 calls above overwrite.
    res_w, nonce_r, out_w = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in fds]
    try:
        _isolate(req, res_w, nonce_r, out_w, zygote_pid)
    except BaseException as e:
        try:
            os.write(out_w, ("sandbox setup failed: %r\n" % (e,)).encode())
        finally:
            os._exit(127)
    sys.argv = ["-c", req["entry_point"]]
    try:
        _main(
            req["entry_point"],
            drop_privileges=lambda: _drop_privileges(req["uid"]),
            output_cap=req["output_cap"],
        )
    finally:
        os._exit(1)


def _drop_privileges(uid):
    """The last isolation steps, taken by each of the two processes the harness forks (the
    fork itself happens before them, as root: `RLIMIT_NPROC` does not hold root back, so a
    uid whose killed processes are not reaped yet cannot make the split fail)."""
    try:
        parent = os.getppid()
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            if os.getuid() != uid or os.geteuid() != uid:
                raise OSError("the uid switch did not take")
        # A change of uid clears the parent-death signal (and a fork never inherits it): set
        # it, and check that the parent did not die in between.
        _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
        if os.getppid() != parent:
            raise OSError("the parent died before the sample started")
        _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        # Not dumpable: a process of the same uid can neither ptrace the checker nor read
        # its memory or descriptors through /proc.
        _check(_libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(DUMPABLE)")
    except BaseException as e:
        try:
            os.write(1, ("sandbox setup failed: %r\n" % (e,)).encode())
        finally:
            os._exit(127)


def _kill_uid(uid):
    """Kills every process of `uid` (never 0): a helper becomes it and calls kill(-1)."""
    if not uid:
        return
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            if os.getuid() == uid and os.geteuid() == uid:
                os.kill(-1, signal.SIGKILL)
                os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _clean_up(live):
    """The grader is gone: end every run still going and remove its directory."""
    for pid, (uid, run_dir) in live.items():
        for target in (-pid, pid):
            try:
                os.kill(target, signal.SIGKILL)
            except OSError:
                pass
        try:
            _kill_uid(uid)
        except OSError:
            pass
        try:
            os.waitpid(pid, 0)
        except OSError:
            pass
        shutil.rmtree(run_dir, ignore_errors=True)


def _serve():
    ctrl = socket.socket(fileno=3)
    zygote_pid = os.getpid()
    # Children started and not yet reaped: pid -> (uid, run directory).
    live = {}
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(ctrl, 1 << 20, 3)
        except OSError:
            data = b""
        if not data:
            _clean_up(live)
            os._exit(0)
        try:
            req = json.loads(data)
            if req["op"] == "run":
                if len(fds) != 3:
                    raise ValueError("a run request needs 3 descriptors, got %d" % len(fds))
                pid = os.fork()
                if pid == 0:
                    _child(ctrl, req, fds, zygote_pid)
                live[pid] = (req["uid"], req["dir"])
                reply = "pid %d" % pid
            elif req["op"] == "reap":
                _, status = os.waitpid(req["pid"], 0)
                live.pop(req["pid"], None)
                reply = "status %d" % status
            else:
                raise ValueError("unknown op %r" % (req["op"],))
        except Exception as e:
            reply = "error %r" % (e,)
        finally:
            # The child has its copies; ours must go so the pipes reach end of file.
            for fd in fds:
                os.close(fd)
        ctrl.send(reply.encode())


_serve()
