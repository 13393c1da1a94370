//! The `evalset` kind: sets from the data dir, from a `files` input, limits, templates.

mod kinds_eval_support;

use std::io::Write;

use kinds_eval_support::{read_jsonl, run_stage, shared_data};
use pipeline_engine::Stage;
use pipeline_stages::artifacts::ProblemsArtifact;
use pipeline_stages::evalsets::{replication_problems, EvalProblem, DEFAULT_INSTRUCTION_TEMPLATE};
use pipeline_stages::kinds::evalset::{EvalSet, EvalSetParams};

fn params(v: serde_json::Value) -> EvalSetParams {
    serde_json::from_value(v).unwrap()
}

#[test]
fn replication_with_limit_and_template() {
    let tmp = tempfile::tempdir().unwrap();
    let ran = run_stage::<EvalSet>(
        tmp.path(),
        "evalset",
        serde_json::json!({"set": "replication", "limit": 2, "instruction_template": "Q: {instruction}\nA:\n"}),
        &[],
        0,
    )
    .unwrap();
    let dir = &ran.outputs["problems"];
    let got = ProblemsArtifact::read(dir).unwrap();
    let want: Vec<EvalProblem> = replication_problems("Q: {instruction}\nA:\n")
        .unwrap()
        .into_iter()
        .take(2)
        .collect();
    assert_eq!(got, want);
    assert!(got[0].prompt.starts_with("Q: "));
    assert_eq!(ran.metadata["problems"], 2);
    assert_eq!(ran.metadata["available"], 10);
    // The file is plain JSON Lines with the EvalProblem fields.
    let rows = read_jsonl(&dir.join("problems.jsonl"));
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["kind"], "replication");
    assert!(rows[0]["test"].as_str().unwrap().contains("def check"));
}

#[test]
fn default_template_is_used_without_one() {
    let tmp = tempfile::tempdir().unwrap();
    let ran = run_stage::<EvalSet>(
        tmp.path(),
        "e",
        serde_json::json!({"set": "replication"}),
        &[],
        0,
    )
    .unwrap();
    let got = ProblemsArtifact::read(&ran.outputs["problems"]).unwrap();
    assert_eq!(
        got,
        replication_problems(DEFAULT_INSTRUCTION_TEMPLATE).unwrap()
    );
}

#[test]
fn validation_explains_what_is_missing() {
    let err = EvalSet::validate(&params(serde_json::json!({"set": "humaneval"}))).unwrap_err();
    assert!(err.contains("data_dir"), "{err}");
    let err = EvalSet::validate(&params(serde_json::json!({"set": "gsm8k"}))).unwrap_err();
    assert!(err.contains("unknown eval set"), "{err}");
    let err = EvalSet::validate(&params(
        serde_json::json!({"set": "replication", "instruction_template": "no slot"}),
    ))
    .unwrap_err();
    assert!(err.contains("{instruction}"), "{err}");
    let err = EvalSet::validate(&params(
        serde_json::json!({"set": "humaneval", "source_file": "../x.jsonl"}),
    ))
    .unwrap_err();
    assert!(err.contains("relative path"), "{err}");
    let err = EvalSet::validate(&params(
        serde_json::json!({"set": "humaneval", "data_dir": "d", "source_file": "x"}),
    ))
    .unwrap_err();
    assert!(err.contains("not both"), "{err}");
    assert!(EvalSet::validate(&params(
        serde_json::json!({"set": "mbpp_test", "data_dir": "d", "limit": 3})
    ))
    .is_ok());
    assert!(serde_json::from_value::<EvalSetParams>(
        serde_json::json!({"set": "humaneval", "dir": "d"})
    )
    .is_err());
}

fn humaneval_record(id: usize, entry: &str) -> serde_json::Value {
    serde_json::json!({
        "task_id": format!("HumanEval/{id}"),
        "prompt": format!("def {entry}(x):\n    \"\"\"Return x + {id}.\"\"\"\n"),
        "entry_point": entry,
        "canonical_solution": format!("    return x + {id}\n"),
        "test": format!("def check(candidate):\n    assert candidate(1) == {}\n", 1 + id),
    })
}

#[test]
fn humaneval_from_a_files_input() {
    let tmp = tempfile::tempdir().unwrap();
    let files = tmp.path().join("download");
    std::fs::create_dir_all(files.join("data")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(files.join("data/HumanEval.jsonl.gz")).unwrap(),
        flate2::Compression::default(),
    );
    for (i, e) in ["add_zero", "add_one", "add_two"].iter().enumerate() {
        writeln!(gz, "{}", humaneval_record(i, e)).unwrap();
    }
    gz.finish().unwrap();
    let ran = run_stage::<EvalSet>(
        tmp.path(),
        "evalset",
        serde_json::json!({"set": "humaneval", "source_file": "data/HumanEval.jsonl.gz", "limit": 2}),
        &[("files", &[files.as_path()])],
        0,
    )
    .unwrap();
    let got = ProblemsArtifact::read(&ran.outputs["problems"]).unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].task_id, "HumanEval/1");
    assert_eq!(got[1].entry_point, "add_one");
    assert_eq!(got[1].code_prefix, got[1].prompt);
    assert!(
        got[1].test.ends_with("check(add_one)\n"),
        "{:?}",
        got[1].test
    );

    // Without the input connected, the error says what to connect.
    let err = run_stage::<EvalSet>(
        tmp.path(),
        "evalset2",
        serde_json::json!({"set": "humaneval", "source_file": "data/HumanEval.jsonl.gz"}),
        &[],
        0,
    )
    .err()
    .unwrap();
    assert!(format!("{err:?}").contains("files"), "{err:?}");
}

#[test]
fn shared_data_sets_load_with_limits() {
    let Some(data) = shared_data() else {
        eprintln!("SKIP: shared data not found; set PIPELINE_SHARED_DATA to the shared data dir");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    for (set, first, full) in [
        ("humaneval", "HumanEval/0", 164u64),
        ("mbpp_sanitized", "Mbpp/2", 427),
        ("mbpp_test", "Mbpp/11", 500),
    ] {
        let ran = run_stage::<EvalSet>(
            tmp.path(),
            set,
            serde_json::json!({"set": set, "data_dir": data, "limit": 3}),
            &[],
            0,
        )
        .unwrap();
        let got = ProblemsArtifact::read(&ran.outputs["problems"]).unwrap();
        assert_eq!(got.len(), 3, "{set}");
        assert_eq!(got[0].task_id, first, "{set}");
        assert_eq!(ran.metadata["available"], full, "{set}");
    }
}

#[test]
fn a_files_input_without_source_file_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let files = tmp.path().join("download");
    std::fs::create_dir_all(&files).unwrap();
    let err = run_stage::<EvalSet>(
        tmp.path(),
        "evalset",
        serde_json::json!({"set": "replication"}),
        &[("files", &[files.as_path()])],
        0,
    )
    .err()
    .unwrap();
    assert!(format!("{err:?}").contains("source_file"), "{err:?}");
}
