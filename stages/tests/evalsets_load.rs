//! Loader tests for the evaluation sets, and execution of every reference solution with
//! `python3` to check prompts, tests and the program composition fit together.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use pipeline_stages::evalsets::{
    generation_requests, load_eval_set, render_instruction, replication_problems, shared_data_dir,
    EvalKind, EvalProblem, EvalSetError, DEFAULT_INSTRUCTION_TEMPLATE,
};

fn data_dir() -> Option<PathBuf> {
    let dir = shared_data_dir();
    if dir.is_none() {
        eprintln!(
            "SKIP: shared data not found (set PIPELINE_SHARED_DATA or put it at ../shared/data \
             beside the repository)"
        );
    }
    dir
}

fn load(kind: EvalKind) -> Option<Vec<EvalProblem>> {
    let dir = data_dir()?;
    Some(load_eval_set(kind, &dir, DEFAULT_INSTRUCTION_TEMPLATE).unwrap())
}

fn python3_available() -> bool {
    let ok = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP: python3 not found");
    }
    ok
}

/// Runs every program in one `python3` process (each in a fresh namespace, 10 s limit each)
/// and returns, per program, `None` if it passed or the error it raised.
fn run_python(programs: &[String]) -> Vec<Option<String>> {
    const RUNNER: &str = r#"
import json, signal, sys, io, contextlib
progs = json.load(sys.stdin)
def alarm(*_): raise TimeoutError("timed out")
signal.signal(signal.SIGALRM, alarm)
out = []
for p in progs:
    try:
        signal.alarm(10)
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(p, "<program>", "exec"), {"__name__": "__main__"})
        out.append(None)
    except BaseException as e:
        out.append(f"{type(e).__name__}: {e}")
    finally:
        signal.alarm(0)
sys.stdout.write(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", RUNNER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(programs).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python runner failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Tasks whose reference solution is too slow for a unit test: Mbpp/123 (sum of amicable
/// numbers below 10,000) takes about 5 s in CPython, every other task a few ms. Graders need a
/// per-program time limit well above that.
const SLOW_REFERENCE_TASKS: [&str; 1] = ["Mbpp/123"];

fn assert_canonical_solutions_pass(problems: &[EvalProblem]) {
    let problems: Vec<&EvalProblem> = problems
        .iter()
        .filter(|p| !SLOW_REFERENCE_TASKS.contains(&p.task_id.as_str()))
        .collect();
    let programs: Vec<String> = problems
        .iter()
        .map(|p| p.program(p.canonical_solution.as_deref().unwrap()))
        .collect();
    let results = run_python(&programs);
    let failures: Vec<String> = problems
        .iter()
        .zip(&results)
        .filter_map(|(p, r)| r.as_ref().map(|e| format!("{}: {e}", p.task_id)))
        .collect();
    assert!(
        failures.is_empty(),
        "reference solutions failed:\n{}",
        failures.join("\n")
    );
}

fn assert_common_fields(problems: &[EvalProblem], kind: EvalKind) {
    let ids: HashSet<&str> = problems.iter().map(|p| p.task_id.as_str()).collect();
    assert_eq!(ids.len(), problems.len(), "task ids must be unique");
    for p in problems {
        assert_eq!(p.kind, kind);
        assert!(!p.prompt.trim().is_empty(), "{}: empty prompt", p.task_id);
        assert!(!p.entry_point.is_empty(), "{}: no entry point", p.task_id);
        assert!(
            p.test.contains(&p.entry_point),
            "{}: test never calls {}",
            p.task_id,
            p.entry_point
        );
        assert!(!p.stop.is_empty());
        assert!(p.canonical_solution.is_some());
    }
}

/// `(prompt, canonical_solution)` of every HumanEval task, straight from the shared file.
fn raw_humaneval() -> Vec<(String, String)> {
    use std::io::Read;
    let dir = pipeline_stages::evalsets::shared_data_dir().expect("shared data");
    let gz = std::fs::read(dir.join(pipeline_stages::evalsets::HUMANEVAL_FILE)).unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut text)
        .unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["prompt"].as_str().unwrap().to_string(),
                v["canonical_solution"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn evalsets_humaneval_loads_164_tasks() {
    let Some(problems) = load(EvalKind::HumanEval) else {
        return;
    };
    assert_eq!(problems.len(), 164);
    assert_common_fields(&problems, EvalKind::HumanEval);
    for (i, p) in problems.iter().enumerate() {
        assert_eq!(p.task_id, format!("HumanEval/{i}"));
        assert_eq!(p.code_prefix, p.prompt);
        assert!(
            p.prompt.contains(&format!("def {}(", p.entry_point)),
            "{}",
            p.task_id
        );
        assert!(p.test.contains("def check(candidate)"));
        assert!(p
            .test
            .trim_end()
            .ends_with(&format!("check({})", p.entry_point)));
        assert_eq!(
            p.stop,
            vec!["\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```"]
        );
        // The prompt ends at its docstring, and the canonical solution starts with the
        // newline and indentation it lost, so prompt + solution is the dataset's program.
        assert_eq!(p.prompt, p.prompt.trim_end(), "{}", p.task_id);
        let solution = p.canonical_solution.as_deref().unwrap();
        assert!(solution.starts_with('\n'), "{}", p.task_id);
    }
    assert_eq!(problems[0].entry_point, "has_close_elements");
    // Against the raw file: stripped prompt + rebased solution == raw prompt + raw solution.
    let raw = raw_humaneval();
    for (p, (prompt, solution)) in problems.iter().zip(&raw) {
        assert_eq!(
            format!("{}{}", p.prompt, p.canonical_solution.as_deref().unwrap()),
            format!("{prompt}{solution}"),
            "{}",
            p.task_id
        );
    }
}

#[test]
fn evalsets_mbpp_sanitized_loads_427_tasks() {
    let Some(problems) = load(EvalKind::MbppSanitized) else {
        return;
    };
    assert_eq!(problems.len(), 427);
    assert_common_fields(&problems, EvalKind::MbppSanitized);
    let p = problems.iter().find(|p| p.task_id == "Mbpp/2").unwrap();
    assert_eq!(p.entry_point, "similar_elements");
    assert_eq!(
        p.prompt,
        "\"\"\"\nWrite a function to find the shared elements from the given two lists.\n\
         assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n\"\"\"\n"
    );
    assert_eq!(
        p.test.lines().filter(|l| l.starts_with("assert")).count(),
        3
    );
    let with_import = problems
        .iter()
        .filter(|p| p.test.starts_with("import math\n"))
        .count();
    assert!(with_import > 0, "test_imports should precede the asserts");
}

#[test]
fn evalsets_mbpp_test_split_is_ids_11_to_510() {
    let Some(problems) = load(EvalKind::MbppTest) else {
        return;
    };
    assert_eq!(problems.len(), 500);
    assert_common_fields(&problems, EvalKind::MbppTest);
    let ids: Vec<String> = problems.iter().map(|p| p.task_id.clone()).collect();
    let expect: Vec<String> = (11..=510).map(|i| format!("Mbpp/{i}")).collect();
    assert_eq!(ids, expect);
    assert!(problems.iter().all(|p| !p.test.contains('\r')));
}

#[test]
fn evalsets_replication_prompts_render_through_template() {
    let problems = replication_problems(DEFAULT_INSTRUCTION_TEMPLATE).unwrap();
    assert_eq!(problems.len(), 10);
    assert_common_fields(&problems, EvalKind::Replication);
    for p in &problems {
        assert!(p.prompt.starts_with("### Instruction:\n"));
        assert!(p.prompt.ends_with("\n\n### Response:\n"));
        assert!(
            p.prompt.contains(&format!("`{}(", p.entry_point)),
            "prompt must name the function"
        );
        assert!(p.code_prefix.is_empty());
    }
    assert!(problems[0]
        .prompt
        .contains("finds the largest number in a list"));
    let custom = replication_problems("<|user|>\n{instruction}\n<|assistant|>\n").unwrap();
    assert!(custom[1]
        .prompt
        .starts_with("<|user|>\nWrite a Python function `is_palindrome(s)`"));
    assert!(matches!(
        replication_problems("no placeholder"),
        Err(EvalSetError::TemplateWithoutPlaceholder(_))
    ));
    assert_eq!(render_instruction("A{instruction}B", "x").unwrap(), "AxB");
}

#[test]
fn evalsets_replication_references_pass_and_wrong_answers_fail() {
    if !python3_available() {
        return;
    }
    let problems = replication_problems(DEFAULT_INSTRUCTION_TEMPLATE).unwrap();
    assert_canonical_solutions_pass(&problems);
    // The hidden tests must be able to fail: a stub, and another task's reference, both fail.
    let stubs: Vec<String> = problems
        .iter()
        .map(|p| p.program(&format!("def {}(*args):\n    return None\n", p.entry_point)))
        .collect();
    let swapped: Vec<String> = problems
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let other = &problems[(i + 1) % problems.len()];
            let body = other.canonical_solution.as_deref().unwrap();
            p.program(&body.replacen(&other.entry_point, &p.entry_point, 1))
        })
        .collect();
    for (kind, programs) in [("stub", stubs), ("swapped", swapped)] {
        for (p, r) in problems.iter().zip(run_python(&programs)) {
            assert!(r.is_some(), "{kind} answer passed {}", p.task_id);
        }
    }
}

#[test]
fn evalsets_humaneval_references_pass() {
    let Some(problems) = load(EvalKind::HumanEval) else {
        return;
    };
    if python3_available() {
        assert_canonical_solutions_pass(&problems);
    }
}

#[test]
fn evalsets_mbpp_sanitized_references_pass() {
    let Some(problems) = load(EvalKind::MbppSanitized) else {
        return;
    };
    if python3_available() {
        assert_canonical_solutions_pass(&problems);
    }
}

#[test]
fn evalsets_mbpp_test_references_pass() {
    let Some(problems) = load(EvalKind::MbppTest) else {
        return;
    };
    if python3_available() {
        assert_canonical_solutions_pass(&problems);
    }
}

#[test]
fn evalsets_missing_file_error_says_what_to_do() {
    let err = load_eval_set(
        EvalKind::HumanEval,
        std::path::Path::new("/nonexistent"),
        "{instruction}",
    )
    .unwrap_err();
    assert!(matches!(err, EvalSetError::Io { .. }));
    assert!(err.to_string().contains("PIPELINE_SHARED_DATA"));
}

#[test]
fn evalsets_kind_names_round_trip() {
    for kind in EvalKind::ALL {
        assert_eq!(kind.name().parse::<EvalKind>().unwrap(), kind);
        let json = serde_json::to_string(&kind).unwrap();
        assert_eq!(json, format!("\"{}\"", kind.name()));
    }
    assert!(matches!(
        "mbpp".parse::<EvalKind>(),
        Err(EvalSetError::UnknownSet(_))
    ));
}

#[test]
fn evalsets_generation_requests_carry_prompt_stop_and_stable_seed() {
    let problems = replication_problems(DEFAULT_INSTRUCTION_TEMPLATE).unwrap();
    let encode = |s: &str| Ok::<_, ()>(s.bytes().map(u32::from).collect());
    let a = generation_requests(&problems, 7, encode).unwrap();
    let b = generation_requests(&problems[3..], 7, encode).unwrap();
    assert_eq!(a.len(), 10);
    assert_eq!(
        a[3], b[0],
        "a problem's request must not depend on its neighbours"
    );
    assert_eq!(a[0].prompt_ids.len(), problems[0].prompt.len());
    assert_eq!(a[0].stop, problems[0].stop);
    let seeds: HashSet<u64> = a.iter().map(|r| r.seed).collect();
    assert_eq!(seeds.len(), 10);
    let other_run = generation_requests(&problems, 8, encode).unwrap();
    assert_ne!(other_run[0].seed, a[0].seed);
    assert!(generation_requests(&problems, 7, |_| Err::<Vec<u32>, _>("boom")).is_err());
}
