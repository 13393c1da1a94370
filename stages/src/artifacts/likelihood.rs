//! The `likelihood` artifact: `likelihood.jsonl`, one [`TaskLikelihood`] a line in problem
//! order, and `summary.json` ([`LikelihoodSummary`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::json::{read_json, read_jsonl, write_json, write_jsonl, JsonError};
use crate::templates::TemplateSpec;

/// The `likelihood` artifact.
pub struct LikelihoodArtifact;

/// How likely a model finds one task's reference solution given the task's prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskLikelihood {
    /// The task.
    pub task_id: String,
    /// Summed negative log-likelihood of the solution's tokens, in nats.
    pub nll: f64,
    /// Solution tokens scored.
    pub tokens: usize,
    /// UTF-8 bytes of the solution text.
    pub bytes: usize,
    /// `nll / ln 2 / bytes`: bits per byte of the solution, comparable across tokenizers.
    pub bits_per_byte: f64,
    /// Prompt tokens before the solution.
    pub prompt_tokens: usize,
}

/// What a likelihood run scored, in total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LikelihoodSummary {
    /// How the prompt was put: `completion` or `instruct`, or `template` when a training
    /// template framed it (then `template` says which).
    pub prompt_style: String,
    /// The training template the problems were framed through, if any (absent from the file
    /// otherwise, so summaries of benchmark-framed runs read and write as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateSpec>,
    /// Whether an adapter was applied.
    pub adapter: bool,
    /// Tasks scored.
    pub tasks: usize,
    /// Tasks without a reference solution (not scored).
    pub skipped_without_solution: usize,
    /// Mean over tasks of bits per byte (every task weighs the same: what the report compares).
    pub mean_bits_per_byte: f64,
    /// All tasks' NLL over all their bytes, in bits per byte (long solutions weigh more).
    pub pooled_bits_per_byte: f64,
    /// All tasks' NLL over all their tokens, in nats per token (the training loss's unit).
    pub nats_per_token: f64,
    /// Solution tokens scored.
    pub tokens: usize,
}

impl LikelihoodSummary {
    /// How the problems were framed, for people: `None` for the benchmark's own prompt (either
    /// style), else the training template's [`TemplateSpec::label`] (`instruction`).
    pub fn framing(&self) -> Option<String> {
        self.template.as_ref().map(TemplateSpec::label)
    }
}

impl LikelihoodArtifact {
    /// Its type name.
    pub const TYPE: &'static str = "likelihood";
    /// Per-task scores, one JSON object a line.
    pub const SCORES_FILE: &'static str = "likelihood.jsonl";
    /// Totals.
    pub const SUMMARY_FILE: &'static str = "summary.json";

    /// The per-task scores in `dir`, in problem order.
    pub fn read(dir: &Path) -> Result<Vec<TaskLikelihood>, JsonError> {
        read_jsonl(&dir.join(Self::SCORES_FILE))
    }

    /// The totals in `dir`.
    pub fn read_summary(dir: &Path) -> Result<LikelihoodSummary, JsonError> {
        read_json(&dir.join(Self::SUMMARY_FILE))
    }

    /// Writes `scores` and `summary` into `dir`.
    pub fn write(
        dir: &Path,
        scores: &[TaskLikelihood],
        summary: &LikelihoodSummary,
    ) -> Result<(), JsonError> {
        write_jsonl(&dir.join(Self::SCORES_FILE), scores)?;
        write_json(&dir.join(Self::SUMMARY_FILE), summary)
    }
}
