//! MBPP, in two splits, turned into human-eval-style completion problems.
//!
//! Prompt format (as in the bigcode evaluation harness, and the Codex-style papers that
//! evaluate MBPP zero-shot): the task text and the first test case inside a docstring,
//!
//! ```text
//! """
//! Write a function to find the shared elements from the given two lists.
//! assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))
//! """
//! ```
//!
//! followed by a newline. The model writes the whole function (the test case shows its name and
//! signature). The prompt is valid Python (a string expression), so the graded program is
//! `prompt + completion + "\n" + test`, where `test` is the test imports / setup code followed
//! by every assert of `test_list` (the first one included). MBPP solutions may define helper
//! functions, so `"\ndef"` is not a stop sequence here.

use std::path::Path;

use super::{read_bytes, EvalKind, EvalProblem, EvalSetError};

/// Path of the sanitized MBPP set inside the shared data directory.
pub const MBPP_SANITIZED_FILE: &str = "mbpp/sanitized-mbpp.json";
/// Path of the full MBPP file inside the shared data directory.
pub const MBPP_FILE: &str = "mbpp/mbpp.jsonl";
/// Task ids of MBPP's conventional test split.
pub const MBPP_TEST_IDS: std::ops::RangeInclusive<u64> = 11..=510;
/// Stop sequences for the MBPP prompt format: a new top-level statement, test or docstring.
pub const MBPP_STOP_SEQUENCES: [&str; 6] = [
    "\nclass", "\nassert", "\n\"\"\"", "\nprint", "\nif", "\n```",
];

/// The MBPP prompt for a task description and its first test (see the module docs).
pub fn mbpp_prompt(text: &str, first_test: &str) -> String {
    format!("\"\"\"\n{}\n{}\n\"\"\"\n", text.trim(), first_test.trim())
}

#[derive(serde::Deserialize)]
struct SanitizedRecord {
    task_id: u64,
    prompt: String,
    code: String,
    #[serde(default)]
    test_imports: Vec<String>,
    test_list: Vec<String>,
}

#[derive(serde::Deserialize)]
struct FullRecord {
    task_id: u64,
    text: String,
    code: String,
    #[serde(default)]
    test_setup_code: String,
    test_list: Vec<String>,
}

/// Loads the 427 hand-verified tasks of `sanitized-mbpp.json`.
pub fn load_mbpp_sanitized(path: &Path) -> Result<Vec<EvalProblem>, EvalSetError> {
    let raw = read_bytes(path)?;
    let records: Vec<SanitizedRecord> =
        serde_json::from_slice(&raw).map_err(|e| EvalSetError::Malformed {
            path: path.to_path_buf(),
            record: 0,
            message: e.to_string(),
        })?;
    records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let setup = r.test_imports.join("\n");
            problem(
                path,
                i,
                r.task_id,
                &r.prompt,
                &r.code,
                &setup,
                &r.test_list,
                EvalKind::MbppSanitized,
            )
        })
        .collect()
}

/// Loads MBPP's test split, task ids 11-510 of `mbpp.jsonl` (500 tasks). The
/// `challenge_test_list` is not used, as in the original paper's evaluation.
pub fn load_mbpp_test(path: &Path) -> Result<Vec<EvalProblem>, EvalSetError> {
    let raw = read_bytes(path)?;
    let text = String::from_utf8(raw).map_err(|e| EvalSetError::Malformed {
        path: path.to_path_buf(),
        record: 0,
        message: format!("not UTF-8: {e}"),
    })?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let r: FullRecord = serde_json::from_str(line).map_err(|e| EvalSetError::Malformed {
            path: path.to_path_buf(),
            record: i,
            message: e.to_string(),
        })?;
        if MBPP_TEST_IDS.contains(&r.task_id) {
            let setup = r.test_setup_code.replace("\r\n", "\n");
            out.push(problem(
                path,
                i,
                r.task_id,
                &r.text,
                &r.code,
                &setup,
                &r.test_list,
                EvalKind::MbppTest,
            )?);
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn problem(
    path: &Path,
    record: usize,
    task_id: u64,
    text: &str,
    code: &str,
    setup: &str,
    tests: &[String],
    kind: EvalKind,
) -> Result<EvalProblem, EvalSetError> {
    let malformed = |message: String| EvalSetError::Malformed {
        path: path.to_path_buf(),
        record,
        message,
    };
    let first = tests
        .first()
        .ok_or_else(|| malformed(format!("task {task_id} has no tests")))?;
    let entry_point = entry_point(code, first).ok_or_else(|| {
        malformed(format!(
            "task {task_id}: no function defined in `code` is called by its first test"
        ))
    })?;
    let prompt = mbpp_prompt(text, first);
    let mut test = String::new();
    if !setup.trim().is_empty() {
        test.push_str(setup.trim_end());
        test.push('\n');
    }
    for t in tests {
        test.push_str(t.trim_end());
        test.push('\n');
    }
    Ok(EvalProblem {
        task_id: format!("Mbpp/{task_id}"),
        code_prefix: prompt.clone(),
        prompt,
        test,
        entry_point,
        kind,
        stop: MBPP_STOP_SEQUENCES.iter().map(|s| s.to_string()).collect(),
        canonical_solution: Some(code.replace("\r\n", "\n")),
    })
}

/// The first top-level function of `code` that `test` calls.
fn entry_point(code: &str, test: &str) -> Option<String> {
    code.lines()
        .filter_map(|l| l.strip_prefix("def "))
        .map(|rest| {
            rest.trim_start()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|name| !name.is_empty())
        .find(|name| calls(test, name))
}

/// Whether `src` contains `name(` (spaces allowed before the parenthesis) as a whole word.
fn calls(src: &str, name: &str) -> bool {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    src.match_indices(name).any(|(at, _)| {
        let before_ok = src[..at].chars().next_back().is_none_or(|c| !is_ident(c));
        let after = src[at + name.len()..].trim_start();
        before_ok && after.starts_with('(')
    })
}
