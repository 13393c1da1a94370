//! The `problems` artifact: `problems.jsonl`, one serialised [`EvalProblem`] a line.

use std::path::Path;

use crate::evalsets::EvalProblem;
use crate::json::{read_jsonl, write_jsonl, JsonError};

/// The `problems` artifact.
pub struct ProblemsArtifact;

impl ProblemsArtifact {
    /// Its type name.
    pub const TYPE: &'static str = "problems";
    /// The problems, one JSON object a line.
    pub const PROBLEMS_FILE: &'static str = "problems.jsonl";

    /// The problems in `dir`, in order.
    pub fn read(dir: &Path) -> Result<Vec<EvalProblem>, JsonError> {
        read_jsonl(&dir.join(Self::PROBLEMS_FILE))
    }

    /// Writes `problems` into `dir`.
    pub fn write(dir: &Path, problems: &[EvalProblem]) -> Result<(), JsonError> {
        write_jsonl(&dir.join(Self::PROBLEMS_FILE), problems)
    }
}
