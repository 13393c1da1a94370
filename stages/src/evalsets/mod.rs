//! Evaluation problem sets as prompts plus executable tests: HumanEval, MBPP (sanitized and the
//! 500-task test split) and the replication's 10 instruction prompts.
//!
//! Every set is turned into the same [`EvalProblem`] shape. The program a grader runs for a
//! completion is always
//!
//! ```text
//! code_prefix + completion + "\n" + test
//! ```
//!
//! ([`EvalProblem::program`]); `test` is self-running (it calls `check(entry_point)` itself where
//! the original harness did that separately), so the grader needs no per-set logic.
//!
//! Data files are read in place from the shared data directory (see [`shared_data_dir`]).

mod humaneval;
mod jsonl;
mod mbpp;
pub mod prompting;
mod replication;

use std::path::{Path, PathBuf};

use pipeline_models::generate::{seed_for_key, GenerateRequest};

pub use humaneval::{load_humaneval, HUMANEVAL_FILE};
pub use jsonl::load_problems_jsonl;
pub use mbpp::{
    load_mbpp_sanitized, load_mbpp_test, mbpp_prompt, MBPP_FILE, MBPP_SANITIZED_FILE,
    MBPP_STOP_SEQUENCES, MBPP_TEST_IDS,
};
pub use replication::{
    render_instruction, replication_problems, REPLICATION_PROMPTS, REPLICATION_STOP_SEQUENCES,
};

/// The instruction template the replication prompts are rendered through by default
/// (Alpaca style). `{instruction}` is replaced by the prompt.
pub const DEFAULT_INSTRUCTION_TEMPLATE: &str = "### Instruction:\n{instruction}\n\n### Response:\n";

/// Which evaluation set a problem comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalKind {
    /// OpenAI HumanEval (164 tasks): complete a function from its signature and docstring.
    #[serde(rename = "humaneval")]
    HumanEval,
    /// MBPP, hand-verified "sanitized" subset (427 tasks).
    MbppSanitized,
    /// MBPP, the conventional test split: task ids 11-510 of the full file (500 tasks).
    MbppTest,
    /// The replication's 10 instruction prompts, answered in an instruction template.
    Replication,
    /// A user's own problems: HumanEval-format JSON Lines at a given path.
    Jsonl,
}

impl EvalKind {
    /// Every set, in a fixed order.
    pub const ALL: [EvalKind; 5] = [
        EvalKind::HumanEval,
        EvalKind::MbppSanitized,
        EvalKind::MbppTest,
        EvalKind::Replication,
        EvalKind::Jsonl,
    ];

    /// Short stable name (`humaneval`, `mbpp_sanitized`, `mbpp_test`, `replication`).
    pub fn name(self) -> &'static str {
        match self {
            EvalKind::HumanEval => "humaneval",
            EvalKind::MbppSanitized => "mbpp_sanitized",
            EvalKind::MbppTest => "mbpp_test",
            EvalKind::Replication => "replication",
            EvalKind::Jsonl => "jsonl",
        }
    }
}

impl std::str::FromStr for EvalKind {
    type Err = EvalSetError;

    /// Parses a [`EvalKind::name`] (as written in a manifest).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EvalKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| EvalSetError::UnknownSet(s.to_string()))
    }
}

/// One problem: what the model sees, and how to check its answer by execution.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EvalProblem {
    /// Stable id, e.g. `HumanEval/0`, `Mbpp/11`, `Replication/largest_number`.
    pub task_id: String,
    /// The text the model is given (already rendered through a template for instruction sets).
    pub prompt: String,
    /// Python source placed before the completion in the graded program: the prompt itself for
    /// completion-style sets (HumanEval, MBPP), empty for instruction prompts.
    pub code_prefix: String,
    /// Python source run after the completion; raises (e.g. `AssertionError`) on failure.
    pub test: String,
    /// Name of the function under test.
    pub entry_point: String,
    /// The set this problem belongs to.
    pub kind: EvalKind,
    /// Stop sequences suited to this set's prompt format, for generation.
    pub stop: Vec<String>,
    /// A known-good completion (the dataset's reference solution), for validating graders.
    pub canonical_solution: Option<String>,
}

impl EvalProblem {
    /// The task's reference code, for comparing training data with it: the code before the
    /// completion and the reference solution (HumanEval's prompt + canonical solution), the
    /// prompt alone when the set has no solution.
    pub fn reference_code(&self) -> String {
        let head = if self.code_prefix.is_empty() && self.canonical_solution.is_none() {
            &self.prompt
        } else {
            &self.code_prefix
        };
        format!("{head}{}", self.canonical_solution.as_deref().unwrap_or(""))
    }

    /// The grader's view of the problem.
    ///
    /// The grader runs `prompt + completion + "\n"`, then `test`, then `check(entry_point)`.
    /// An eval problem's program is `code_prefix + completion + "\n" + test` with a
    /// self-running `test` (MBPP's asserts define no `check`), so the prefix becomes the
    /// grader's prompt and a no-op `check` is appended to the test: the checks run exactly
    /// once, inside the test, for every set.
    pub fn grader_problem(&self) -> crate::grade::Problem {
        crate::grade::Problem {
            task_id: self.task_id.clone(),
            prompt: self.code_prefix.clone(),
            test: format!("{}\n\ndef check(candidate):\n    pass\n", self.test),
            entry_point: self.entry_point.clone(),
        }
    }

    /// The problem as a report shows it: the prompt the model saw, and its test.
    pub fn display_problem(&self) -> crate::grade::Problem {
        crate::grade::Problem {
            task_id: self.task_id.clone(),
            prompt: self.prompt.clone(),
            test: self.test.clone(),
            entry_point: self.entry_point.clone(),
        }
    }

    /// The complete Python program that passes iff `completion` solves the problem.
    pub fn program(&self, completion: &str) -> String {
        format!("{}{}\n{}", self.code_prefix, completion, self.test)
    }
}

/// Why an evaluation set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum EvalSetError {
    /// The data file could not be opened or read.
    #[error(
        "cannot read eval data file {path}: {source}; point PIPELINE_SHARED_DATA at the shared \
         data directory (it holds humaneval/ and mbpp/)"
    )]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A record did not have the expected fields.
    #[error("{path}: record {record} is malformed: {message}; is this the right file?")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Index (0-based line or array element) of the record.
        record: usize,
        /// What was wrong.
        message: String,
    },
    /// An eval set name that is not one of [`EvalKind::ALL`].
    #[error(
        "unknown eval set {0:?}; use one of: humaneval, mbpp_sanitized, mbpp_test, replication, jsonl (your own problems at `path`)"
    )]
    UnknownSet(String),
    /// The instruction template has no `{instruction}` placeholder.
    #[error(
        "instruction template {0:?} has no `{{instruction}}` placeholder to put the prompt in"
    )]
    TemplateWithoutPlaceholder(String),
}

/// The shared data directory: `$PIPELINE_SHARED_DATA` if set, else `../shared/data` beside the
/// repository (found from this crate's source location); `None` if neither exists.
pub fn shared_data_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PIPELINE_SHARED_DATA") {
        let dir = PathBuf::from(dir);
        return dir.is_dir().then_some(dir);
    }
    let beside_repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    beside_repo.is_dir().then_some(beside_repo)
}

/// Loads the set `kind` from the shared data directory `data_dir`, rendering instruction
/// prompts through `instruction_template` (see [`DEFAULT_INSTRUCTION_TEMPLATE`]).
pub fn load_eval_set(
    kind: EvalKind,
    data_dir: &Path,
    instruction_template: &str,
) -> Result<Vec<EvalProblem>, EvalSetError> {
    match kind {
        EvalKind::HumanEval => load_humaneval(&data_dir.join(HUMANEVAL_FILE)),
        EvalKind::MbppSanitized => load_mbpp_sanitized(&data_dir.join(MBPP_SANITIZED_FILE)),
        EvalKind::MbppTest => load_mbpp_test(&data_dir.join(MBPP_FILE)),
        EvalKind::Replication => replication_problems(instruction_template),
        EvalKind::Jsonl => Err(EvalSetError::Malformed {
            path: data_dir.to_path_buf(),
            record: 0,
            message: "set `jsonl` is read from its own file: give `path`".into(),
        }),
    }
}

/// One generation request per problem: its prompt encoded with `encode`, its stop sequences,
/// and a seed derived from `run_seed` and the task id (so samples do not depend on batch order).
pub fn generation_requests<E>(
    problems: &[EvalProblem],
    run_seed: u64,
    mut encode: impl FnMut(&str) -> Result<Vec<u32>, E>,
) -> Result<Vec<GenerateRequest>, E> {
    problems
        .iter()
        .map(|p| {
            Ok(GenerateRequest {
                prompt_ids: encode(&p.prompt)?,
                stop: p.stop.clone(),
                seed: seed_for_key(run_seed, &p.task_id),
            })
        })
        .collect()
}

/// The text of `path`, gunzipped when it is gzip'd (`.jsonl.gz` or plain `.jsonl` alike).
fn read_text(path: &Path) -> Result<String, EvalSetError> {
    let raw = read_bytes(path)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&raw[..]), &mut s)
            .map_err(|source| EvalSetError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(s)
    } else {
        String::from_utf8(raw).map_err(|e| EvalSetError::Malformed {
            path: path.to_path_buf(),
            record: 0,
            message: format!("not UTF-8: {e}"),
        })
    }
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, EvalSetError> {
    std::fs::read(path).map_err(|source| EvalSetError::Io {
        path: path.to_path_buf(),
        source,
    })
}
