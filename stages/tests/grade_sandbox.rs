//! Adversarial programs must be contained, marked not passed, and leave the host intact.

use std::io::Read;
use std::path::PathBuf;

use pipeline_stages::grade::{
    grade_samples, GradeOptions, Problem, Sample, Sandbox, SandboxOptions, Status,
};

const PROMPT: &str = "def double(x):\n    \"\"\"Return twice x.\"\"\"\n";
const TEST: &str = "\n\ndef check(candidate):\n    assert candidate(2) == 4\n    assert abs(candidate(1.5) - 3.0) < 1e-9\n    assert isinstance(candidate(3), int)\n";
const CORRECT: &str = "    return 2 * x\n";

fn sandbox() -> Sandbox {
    Sandbox::new(SandboxOptions {
        timeout_s: 3.0,
        ..SandboxOptions::default()
    })
    .expect("python3 is needed for the grade tests")
}

fn run(completion: &str) -> pipeline_stages::grade::Execution {
    let program = format!("{PROMPT}{completion}\n");
    sandbox().run(&program, TEST, "double")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn correct_sample_passes_and_wrong_fails() {
    let ok = run(CORRECT);
    assert_eq!(ok.status, Status::Passed, "{ok:?}");
    assert_eq!(ok.result, "passed");
    let bad = run("    return x + 1\n");
    assert_eq!(bad.status, Status::Failed, "{bad:?}");
    assert_eq!(bad.result, "failed: ");
    assert_eq!(bad.error.as_deref(), Some("AssertionError"));
    let name = run("    return y\n");
    assert_eq!(name.status, Status::Failed);
    assert_eq!(name.result, "failed: name 'y' is not defined");
    assert_eq!(
        name.error.as_deref(),
        Some("NameError: name 'y' is not defined")
    );
    let syntax = run("    return (\n");
    assert_eq!(syntax.status, Status::Failed);
    assert!(syntax.error.unwrap().starts_with("SyntaxError"));
}

#[test]
fn isolation_is_reported() {
    let e = run(CORRECT);
    eprintln!("isolation: {:?}", e.isolation);
    if is_root() {
        // On this project's machines (root, Linux) every layer must be active.
        assert!(
            e.isolation.network && e.isolation.private_tmp,
            "{:?}",
            e.isolation
        );
    }
}

#[test]
fn infinite_loop_times_out() {
    let s = Sandbox::new(SandboxOptions {
        timeout_s: 1.0,
        ..SandboxOptions::default()
    })
    .unwrap();
    let t = std::time::Instant::now();
    let e = s.run(
        &format!("{PROMPT}    while True:\n        pass\n"),
        TEST,
        "double",
    );
    assert_eq!(e.status, Status::TimedOut, "{e:?}");
    assert_eq!(e.result, "timed out");
    assert!(t.elapsed().as_secs_f64() < 5.0);
    // A loop that ignores signals it can catch and sleeps: still killed.
    let e = s.run(
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(100)\n",
        TEST,
        "double",
    );
    assert_eq!(e.status, Status::TimedOut);
}

#[test]
fn early_exits_do_not_pass() {
    for exit in [
        "import sys\nsys.exit(0)\n",
        "raise SystemExit(0)\n",
        "import os\nos._exit(0)\n",
        "exit()\n",
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    ] {
        // The exit runs at import time, before check() is ever called.
        let completion = format!("    return 0\n{exit}");
        let e = run(&completion);
        assert!(e.status != Status::Passed, "{exit}: {e:?}");
        assert!(e.result.starts_with("failed"), "{exit}: {e:?}");
    }
    // Exiting from inside the candidate, while check() runs.
    let e = run("    import os\n    os._exit(0)\n");
    assert_eq!(e.status, Status::Error, "{e:?}");
    let e = run("    raise SystemExit(0)\n");
    assert_eq!(e.status, Status::Failed, "{e:?}");
}

/// Checks that only builtins can be fooled into passing (a wrong candidate returns 0).
const PATCH_TEST: &str = "\n\ndef check(candidate):\n    assert abs(candidate(2) - 4) < 1e-9\n    assert isinstance(candidate(3), str)\n    return\n";

/// Runs the program the naive human-eval way (one script, no harness): whether it exits 0.
fn naive_passes(program: &str) -> bool {
    naive_passes_with(program, PATCH_TEST)
}

/// [`naive_passes`] with another test.
fn naive_passes_with(program: &str, test: &str) -> bool {
    let src = format!("{program}\n{test}\ncheck(double)\n");
    std::process::Command::new("python3")
        .args(["-c", &src])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn monkey_patching_builtins_does_not_pass() {
    // Attacks that really do fool a naive single-script run, so each check can fail.
    let effective = [
        // Replace builtins the asserts use.
        "    return 0\nimport builtins\nbuiltins.abs = lambda x: 0\nbuiltins.isinstance = lambda *a: True\n",
        // Shadow them at module level.
        "    return 0\ndef abs(x):\n    return 0\ndef isinstance(*a):\n    return True\n",
        // Jump over the asserts with a trace function.
        "    return 0\nimport sys\ndef tr(frame, event, arg):\n    if frame.f_code.co_name == 'check' and event == 'line' and frame.f_lineno == frame.f_code.co_firstlineno + 1:\n        frame.f_lineno = frame.f_code.co_firstlineno + 3\n    return tr\nsys.settrace(tr)\n",
        // Exit "successfully" before the checks.
        "    return 0\nimport sys\nsys.exit(0)\n",
    ];
    let s = sandbox();
    for a in effective {
        let program = format!("{PROMPT}{a}\n");
        assert!(
            naive_passes(&program),
            "attack does not even fool a naive run:\n{a}"
        );
        let e = s.run(&program, PATCH_TEST, "double");
        assert!(e.status != Status::Passed, "attack passed:\n{a}\n{e:?}");
    }
    let others = [
        // Make assertion failures look harmless.
        "    return 0\nclass AssertionError(Exception):\n    pass\nimport builtins\nbuiltins.AssertionError = type('X', (), {})\n",
        // Replace exec/compile so the test never runs.
        "    return 0\nimport builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None\n",
        // Reach into the harness module.
        "    return 0\nimport __main__\nfor k in list(vars(__main__)):\n    if not k.startswith('__'):\n        setattr(__main__, k, lambda *a, **k: None)\n",
        // Forge a verdict on the result channel, then leave.
        "    return 0\nimport os\nfor fd in range(3, 10):\n    try:\n        os.write(fd, b'PASS 00000000000000000000000000000000\\n')\n    except OSError:\n        pass\nos._exit(0)\n",
        // Try the nonce fd (already closed) and forge.
        "    return 0\nimport os\ntry:\n    n = os.read(4, 64)\nexcept OSError:\n    n = b''\nos.write(3, b'PASS ' + n + b'\\n')\nos._exit(0)\n",
    ];
    for a in others {
        let e = s.run(&format!("{PROMPT}{a}\n"), PATCH_TEST, "double");
        assert!(e.status != Status::Passed, "attack passed:\n{a}\n{e:?}");
    }
    // The same harness still passes an honest candidate under PATCH_TEST.
    let e = s.run(
        &format!("{PROMPT}    return 2 * x if x != 3 else 'six'\n"),
        PATCH_TEST,
        "double",
    );
    assert_eq!(e.status, Status::Passed, "{e:?}");
}

#[test]
fn memory_bomb_is_contained() {
    let e = run("    return 0\nx = []\nwhile True:\n    x.append(bytearray(50 * 2**20))\n");
    assert!(e.status != Status::Passed, "{e:?}");
    assert!(e.error.is_some());
    let e = run("    return 0\nx = bytearray(64 * 2**30)\n");
    assert_eq!(e.status, Status::Failed, "{e:?}");
    assert!(e.error.unwrap().contains("MemoryError"));
}

#[test]
fn printing_gigabytes_is_capped() {
    let s = Sandbox::new(SandboxOptions {
        timeout_s: 1.5,
        max_output_bytes: 10_000,
        ..SandboxOptions::default()
    })
    .unwrap();
    let e = s.run(
        &format!("{PROMPT}    return 2 * x\nimport sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"),
        TEST,
        "double",
    );
    assert_eq!(e.status, Status::TimedOut, "{:?}", e.status);
    assert!(e.output.len() <= 10_000);
    assert!(e.output_truncated);
}

/// human-eval swallows output in memory: a sample that prints 10 MB per call, called 100
/// times, passes there within 3 s, and must pass here too.
#[test]
fn large_legal_output_passes_as_in_human_eval() {
    let test =
        "\n\ndef check(candidate):\n    for _ in range(100):\n        assert candidate(2) == 4\n";
    let program = format!("{PROMPT}    print('x' * 10_000_000)\n    return 2 * x\n");
    let e = sandbox().run(&program, test, "double");
    assert_eq!(e.status, Status::Passed, "{e:?}");
    assert!(e.output_truncated);
}

#[test]
fn files_outside_the_sandbox_survive() {
    let dir = tempfile::tempdir().unwrap();
    let canary = dir.path().join("canary.txt");
    std::fs::write(&canary, "alive").unwrap();
    // World-traversable so an unprivileged uid could at least try.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&canary, std::fs::Permissions::from_mode(0o666)).unwrap();
    let escape = std::env::temp_dir().join(format!("pipeline-escape-{}", std::process::id()));
    let c = canary.display().to_string();
    let x = escape.display().to_string();
    let attacks = [
        format!("    return 0\nimport os\nos.remove({c:?})\n"),
        format!("    return 0\nopen({c:?}, 'w').write('pwned')\nraise RuntimeError('wrote')\n"),
        format!(
            "    return 0\nimport shutil\nshutil.rmtree({:?})\n",
            dir.path()
        ),
        format!("    return 0\nopen({x:?}, 'w').write('escaped')\nraise RuntimeError('wrote')\n"),
    ];
    for a in &attacks {
        let e = run(a);
        assert!(e.status != Status::Passed, "{a}: {e:?}");
    }
    if is_root() {
        // Root-run sandboxes drop to an unprivileged uid in a private /tmp: nothing
        // outside may change.
        assert_eq!(std::fs::read_to_string(&canary).unwrap(), "alive");
        assert!(!escape.exists(), "sandbox wrote {}", escape.display());
    } else {
        eprintln!("not root: uid separation unavailable; only checking containment of verdicts");
    }
    let _ = std::fs::remove_file(&escape);
}

#[test]
fn network_connections_fail() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let e = run(&format!(
        "    return 2 * x\nimport socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'leak')\n"
    ));
    assert!(e.status != Status::Passed, "{e:?}");
    if e.isolation.network {
        assert!(e.error.as_deref().unwrap_or("").contains("Error"), "{e:?}");
        let mut got = Vec::new();
        if let Ok((mut conn, _)) = listener.accept() {
            let _ = conn.read_to_end(&mut got);
            panic!("sandbox connected to the host: {got:?}");
        }
    } else {
        eprintln!(
            "network namespaces unavailable here; connection attempt was not blocked by the kernel"
        );
    }
}

/// Processes whose uid lies in the sandbox range.
fn sandbox_processes() -> Vec<String> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let path: PathBuf = entry.path().join("status");
        if let Ok(s) = std::fs::read_to_string(&path) {
            let uid: Option<u64> = s
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|u| u.parse().ok());
            if uid.is_some_and(|u| (1_510_000_000..1_510_004_096).contains(&u)) {
                out.push(path.display().to_string());
            }
        }
    }
    out
}

#[test]
fn fork_bomb_is_contained() {
    let probe = run(CORRECT);
    if is_root() && !probe.isolation.separate_uid {
        eprintln!("SKIP: running as root without uid separation, RLIMIT_NPROC would not apply");
        return;
    }
    let e = run("    return 0\nimport os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n");
    assert!(e.status != Status::Passed, "{e:?}");
    let e = run("    return 0\nimport os, time\nfor _ in range(5):\n    if os.fork() == 0:\n        os.setsid()\n        time.sleep(60)\n");
    assert!(e.status != Status::Passed, "{e:?}");
    if probe.isolation.separate_uid {
        // Other tests may be running sandboxes right now; wait for ours to be reaped.
        let t = std::time::Instant::now();
        let mut left = sandbox_processes();
        while !left.is_empty() && t.elapsed().as_secs() < 15 {
            std::thread::sleep(std::time::Duration::from_millis(200));
            left = sandbox_processes();
        }
        assert!(left.is_empty(), "sandbox processes survived: {left:?}");
    }
}

#[test]
fn parallel_grading_keeps_input_order() {
    let problems = vec![Problem {
        task_id: "T/0".into(),
        prompt: PROMPT.into(),
        test: TEST.into(),
        entry_point: "double".into(),
    }];
    let samples: Vec<Sample> = (0..12)
        .map(|i| Sample {
            task_id: "T/0".into(),
            completion: if i % 3 == 0 {
                CORRECT.into()
            } else {
                "    return x\n".into()
            },
            extra: [("completion_id".to_string(), serde_json::json!(i))]
                .into_iter()
                .collect(),
        })
        .collect();
    let opts = GradeOptions {
        workers: 4,
        ..GradeOptions::default()
    };
    let r = grade_samples(&problems, &samples, &opts).unwrap();
    for (i, res) in r.results.iter().enumerate() {
        assert_eq!(res.passed, i % 3 == 0, "sample {i}");
        assert_eq!(res.extra["completion_id"], serde_json::json!(i));
    }
    assert_eq!(r.tasks[0].n, 12);
    assert_eq!(r.tasks[0].c, 4);
    assert!((r.pass_at_k.get(1).unwrap() - 4.0 / 12.0).abs() < 1e-12);
    // 1 - C(8,10)/C(12,10) = 1 (fewer than 10 failures).
    assert_eq!(r.pass_at_k.get(10), Some(1.0));
    assert_eq!(r.pass_at_k.get(100), None);
    let json = serde_json::to_value(r.cli_results()).unwrap();
    assert_eq!(json[0]["result"], "passed");
    assert_eq!(json[1]["passed"], false);
    // Unknown task ids are an error, not a silent skip.
    let stray = vec![Sample {
        task_id: "nope".into(),
        completion: String::new(),
        extra: Default::default(),
    }];
    assert!(grade_samples(&problems, &stray, &opts).is_err());
}

#[test]
fn samples_do_not_share_state_through_the_fork_server() {
    // One sandbox, so both runs go through the same fork server.
    let s = sandbox();
    let first = s.run(
        &format!(
            "{PROMPT}{CORRECT}import math, builtins, os\nmath.pi = 3\nbuiltins.leak = 1\nopen('left-behind', 'w').write('x')\n"
        ),
        TEST,
        "double",
    );
    assert_eq!(first.status, Status::Passed, "{first:?}");
    let second = s.run(
        &format!(
            "{PROMPT}{CORRECT}import math, builtins, os\nassert math.pi > 3.14\nassert not hasattr(builtins, 'leak')\nassert not os.path.exists('left-behind')\n"
        ),
        TEST,
        "double",
    );
    assert_eq!(second.status, Status::Passed, "{second:?}");
}

#[test]
fn only_the_protocol_descriptors_are_open() {
    // The program's process holds 0-2 stdio and the two pipes of its calls from the
    // checker: neither the result pipe (3) nor the nonce (4), and not the fork server's
    // control socket.
    let e = run(&format!(
        "{CORRECT}import os, stat\nopen_fds = []\nfor fd in range(3, 64):\n    try:\n        st = os.fstat(fd)\n        open_fds.append(fd)\n        assert stat.S_ISFIFO(st.st_mode), fd\n    except OSError:\n        pass\nassert len(open_fds) == 2 and 3 not in open_fds and 4 not in open_fds, open_fds\n"
    ));
    assert_eq!(e.status, Status::Passed, "{e:?}");
}

/// A wrong candidate (`return True`, or 0) that tries to forge a pass from inside its own
/// process; each attack fools a naive single-script run or the previous in-process harness.
#[test]
fn a_pass_cannot_be_forged_from_the_programs_process() {
    let s = sandbox();
    // 1. Walk the frames to the harness's nonce, write the verdict line, leave.
    let frame_walk = "    return True\nimport sys, os, gc\nfor f in [sys._getframe()] + [o for o in gc.get_objects() if type(o).__name__ == 'frame']:\n    while f is not None:\n        n = f.f_locals.get('nonce')\n        if isinstance(n, str):\n            for fd in range(3, 64):\n                try:\n                    os.write(fd, ('PASS ' + n + '\\n').encode())\n                except OSError:\n                    pass\n            os._exit(0)\n        f = f.f_back\n";
    let e = s.run(&format!("{PROMPT}{frame_walk}\n"), TEST, "double");
    assert!(
        e.status != Status::Passed,
        "frame walk forged a pass: {e:?}"
    );
    // 2. An answer whose `__eq__` always says yes.
    let eq_test =
        "\n\ndef check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 6\n";
    let liar = "    return Yes()\nclass Yes:\n    def __eq__(self, other):\n        return True\n";
    let program = format!("{PROMPT}{liar}\n");
    assert!(
        naive_passes_with(&program, eq_test),
        "a naive run should be fooled"
    );
    let e = s.run(&program, eq_test, "double");
    assert!(
        e.status != Status::Passed,
        "an always-equal object passed: {e:?}"
    );
    // 3. Patch the module the checks use.
    let isclose_test =
        "\nimport math\n\ndef check(candidate):\n    assert math.isclose(candidate(2), 4.0)\n";
    let patch = "    return 0\nimport math\nmath.isclose = lambda *a, **k: True\n";
    let program = format!("{PROMPT}{patch}\n");
    assert!(
        naive_passes_with(&program, isclose_test),
        "a naive run should be fooled"
    );
    let e = s.run(&program, isclose_test, "double");
    assert!(e.status != Status::Passed, "a patched module passed: {e:?}");
    // 4. Reach the checker (the program's parent) through /proc: its descriptors and memory
    // are closed to the program's uid (it is not dumpable).
    let probe = s.run(&format!("{PROMPT}{CORRECT}\n"), TEST, "double");
    if probe.isolation.separate_uid || !is_root() {
        let snoop = "    return 2 * x\nimport os\nparent = os.getppid()\nfor path in ['/proc/%d/fd' % parent, '/proc/%d/mem' % parent]:\n    try:\n        os.listdir(path) if path.endswith('fd') else open(path, 'rb').read(1)\n    except OSError:\n        continue\n    raise RuntimeError('reached ' + path)\n";
        let e = s.run(&format!("{PROMPT}{snoop}\n"), TEST, "double");
        assert_eq!(e.status, Status::Passed, "the checker was reachable: {e:?}");
    }
    // Honest answers of every plain type still pass, and exceptions keep their type.
    let types_test = "\n\ndef check(candidate):\n    assert candidate(2) == (4, [1.5, None], {'a': {1, 2}}, b'x', 3 + 4j, 2 ** 80)\n    try:\n        candidate(-1)\n    except ValueError as e:\n        assert str(e) == 'negative'\n    else:\n        raise AssertionError('no ValueError')\n";
    let honest = "    if x < 0:\n        raise ValueError('negative')\n    from collections import namedtuple, OrderedDict\n    P = namedtuple('P', 'a b c d e f')\n    return P(2 * x, [1.5, None], OrderedDict(a={1, 2}), b'x', 3 + 4j, 2 ** 80)\n";
    let e = s.run(&format!("{PROMPT}{honest}\n"), types_test, "double");
    assert_eq!(e.status, Status::Passed, "{e:?}");
}

#[test]
fn a_dead_fork_server_is_replaced() {
    // Without uid separation a sample can signal the fork server (its parent): once while it
    // runs, once from a straggler after the run, while the server is idle in the pool.
    let s = Sandbox::new(SandboxOptions {
        timeout_s: 3.0,
        drop_privileges: false,
        ..SandboxOptions::default()
    })
    .unwrap();
    let e = s.run(
        &format!(
            "{PROMPT}    return 0\nimport os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
        ),
        TEST,
        "double",
    );
    assert!(e.status != Status::Passed, "{e:?}");
    let ok = s.run(&format!("{PROMPT}{CORRECT}\n"), TEST, "double");
    assert_eq!(ok.status, Status::Passed, "{ok:?}");
    let straggler = format!(
        "{PROMPT}{CORRECT}import os, signal, time\nparent = os.getppid()\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(0.3)\n    os.kill(parent, signal.SIGKILL)\n    os._exit(0)\n"
    );
    let e = s.run(&straggler, TEST, "double");
    assert_eq!(e.status, Status::Passed, "{e:?}");
    std::thread::sleep(std::time::Duration::from_millis(800));
    let ok = s.run(&format!("{PROMPT}{CORRECT}\n"), TEST, "double");
    assert_eq!(ok.status, Status::Passed, "{ok:?}");
}
