//! Stage kinds: one module per kind, plumbing only (parameters, artifact layout, calls into
//! the library modules of this crate and into `pipeline-models`).
//!
//! Data side: [`download`] → [`read`] / [`python_stdlib`] → [`filter`] → [`tokenize`].
//!
//! Model side: [`model`] → [`quantize`] → [`lora_train`]; [`model_artifact`] loads `model`
//! artifacts for every kind that needs one.
//!
//! Evaluation side: [`evalset`] → [`generate`] → [`grade`] → [`report`]. Each module's docs
//! state the artifact layout it reads and writes; those layouts are the contract with the
//! producers and consumers written by other kinds.

pub(crate) mod datautil;
pub mod download;
pub mod evalset;
pub mod filter;
pub mod generate;
pub mod grade;
pub mod lora_train;
pub mod model;
pub mod model_artifact;
pub mod python_stdlib;
pub mod quantize;
pub mod read;
pub mod report;
pub mod tokenize;

use std::io::Write;
use std::path::Path;

use miette::{miette, IntoDiagnostic};

use crate::evalsets::EvalProblem;

/// File name of the `problems` artifact's problems (one serialised [`EvalProblem`] a line).
pub const PROBLEMS_FILE: &str = "problems.jsonl";

/// Reads the `problems.jsonl` of a `problems` artifact directory.
pub fn read_problems_artifact(dir: &Path) -> miette::Result<Vec<EvalProblem>> {
    let path = dir.join(PROBLEMS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        miette!(
            help = "connect the output of an `evalset` stage to this input",
            "cannot read {}: {e}",
            path.display()
        )
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| {
                miette!(
                    help = "regenerate the problems with the `evalset` stage of this version",
                    "{}:{}: not a serialised eval problem: {e}",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// Writes `rows` as JSON Lines to `path` (through a buffered writer).
pub(crate) fn write_jsonl<T: serde::Serialize>(path: &Path, rows: &[T]) -> miette::Result<()> {
    let file = std::fs::File::create(path)
        .map_err(|e| miette!("cannot create {}: {e}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    for row in rows {
        serde_json::to_writer(&mut w, row).into_diagnostic()?;
        w.write_all(b"\n").into_diagnostic()?;
    }
    w.flush()
        .map_err(|e| miette!("cannot write {}: {e}", path.display()))
}

/// Writes `value` as pretty JSON to `path`.
pub(crate) fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> miette::Result<()> {
    let text = serde_json::to_string_pretty(value).into_diagnostic()?;
    std::fs::write(path, text + "\n").map_err(|e| miette!("cannot write {}: {e}", path.display()))
}
