//! A user's own problem set: JSON Lines (optionally gzip'd) in HumanEval's format, one problem
//! a line: `task_id`, `prompt`, `entry_point`, `test`, and optionally `canonical_solution`.
//!
//! `test` is either HumanEval-style (it defines `check(candidate)`, which is then called on
//! `entry_point`) or self-running (plain asserts, as MBPP's). Problems are completions of
//! `prompt`, prompted and graded exactly as HumanEval's are.

use std::collections::HashSet;
use std::path::Path;

use pipeline_models::generate::HUMANEVAL_STOP_SEQUENCES;

use super::{read_text, EvalKind, EvalProblem, EvalSetError};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    task_id: String,
    prompt: String,
    entry_point: String,
    test: String,
    #[serde(default)]
    canonical_solution: Option<String>,
}

/// Loads problems from `path`; every malformed line is an error naming its line number.
pub fn load_problems_jsonl(path: &Path) -> Result<Vec<EvalProblem>, EvalSetError> {
    let malformed = |record: usize, message: String| EvalSetError::Malformed {
        path: path.to_path_buf(),
        record,
        message,
    };
    let text = read_text(path)?;
    let mut seen = HashSet::new();
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_no = i + 1;
        let r: Record = serde_json::from_str(line).map_err(|e| {
            malformed(
                line_no,
                format!(
                    "line {line_no}: {e} (each line is {{\"task_id\", \"prompt\", \"entry_point\", \"test\"[, \"canonical_solution\"]}})"
                ),
            )
        })?;
        for (field, value) in [
            ("task_id", &r.task_id),
            ("prompt", &r.prompt),
            ("entry_point", &r.entry_point),
            ("test", &r.test),
        ] {
            if value.trim().is_empty() {
                return Err(malformed(
                    line_no,
                    format!("line {line_no}: `{field}` is empty"),
                ));
            }
        }
        if !seen.insert(r.task_id.clone()) {
            return Err(malformed(
                line_no,
                format!("line {line_no}: task_id `{}` appears twice", r.task_id),
            ));
        }
        let prompt = r.prompt.trim_end().to_string();
        let stripped = &r.prompt[prompt.len()..];
        let test = if r.test.contains("def check(") {
            format!("{}\ncheck({})\n", r.test, r.entry_point)
        } else {
            r.test.clone()
        };
        problems.push(EvalProblem {
            task_id: r.task_id,
            code_prefix: prompt.clone(),
            canonical_solution: r.canonical_solution.map(|s| format!("{stripped}{s}")),
            prompt,
            test,
            entry_point: r.entry_point,
            kind: EvalKind::Jsonl,
            stop: HUMANEVAL_STOP_SEQUENCES
                .iter()
                .map(|s| s.to_string())
                .collect(),
        });
    }
    if problems.is_empty() {
        return Err(malformed(0, "the file holds no problems".into()));
    }
    Ok(problems)
}
