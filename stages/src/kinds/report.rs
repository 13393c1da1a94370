//! `report`: an experiment report over every graded variant.
//!
//! Inputs:
//! * `grades` (many, a [`GradesArtifact`] each): one per variant. A variant is named after what
//!   sets its producer apart from the others ([`variant_names`]): `grade-base` → `base`,
//!   `grade@messy,1` → `messy,1`.
//! * `losses` (many, optional, [`AdapterArtifact`]s): training runs; the metrics of one give the
//!   loss curve of the graded variants it produced (its matrix values are all among theirs:
//!   `train@messy,1` → `grade@messy,1,humaneval`).
//! * `filters` (many, optional, [`FilterReportArtifact`]s).
//! * `problems` (optional, a [`ProblemsArtifact`]): gives the prompts of the side-by-side
//!   completions (the completions themselves come from the graded results).
//!
//! Parameters: `title`, `summary`, `benchmark` (label of the scores), `baseline` (variant or
//! stage name every other variant is compared with; default the first), `max_completion_rows`.
//!
//! Output `report`: a [`ReportArtifact`]. The stage cannot see the manifest; the report lists the
//! producing stage of every input and the content hash of its artifact instead.

use miette::miette;
use pipeline_engine::stage::InputArtifact;
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use serde::{Deserialize, Serialize};

use crate::artifacts::{
    AdapterArtifact, FilterReportArtifact, GradesArtifact, ProblemsArtifact, ReportArtifact,
};
use crate::evalsets::EvalProblem;
use crate::grade::stats::StatsError;
use crate::grade::{compare_paired, CompareOptions, GradeReport, Problem};
use crate::report::variants::{ancestor_of, variant_names, Producer};
use crate::report::{completion_rows, CacheKey, FilterStats, LossPoint, ReportData, VariantReport};

/// The `report` stage kind.
pub struct Report;

/// Parameters of [`Report`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportParams {
    /// Page title.
    pub title: String,
    /// Introductory paragraph.
    pub summary: String,
    /// Benchmark label shown with the scores.
    pub benchmark: String,
    /// Variant (or stage) name the others are compared against; default the first variant.
    pub baseline: Option<String>,
    /// Most side-by-side completion rows.
    pub max_completion_rows: usize,
}

impl Default for ReportParams {
    fn default() -> Self {
        Self {
            title: "Experiment report".into(),
            summary: String::new(),
            benchmark: "pass@k".into(),
            baseline: None,
            max_completion_rows: 5,
        }
    }
}

const INPUTS: &[InputSlot] = &[
    InputSlot {
        name: "grades",
        accepts: &[GradesArtifact::TYPE],
        required: true,
        many: true,
        doc: "graded variants (one grade stage each)",
    },
    InputSlot {
        name: "losses",
        accepts: &[AdapterArtifact::TYPE],
        required: false,
        many: true,
        doc: "trained adapters whose metrics.jsonl gives loss curves",
    },
    InputSlot {
        name: "filters",
        accepts: &[FilterReportArtifact::TYPE],
        required: false,
        many: true,
        doc: "data-filter reports (report.json)",
    },
    InputSlot {
        name: "problems",
        accepts: &[ProblemsArtifact::TYPE],
        required: false,
        many: false,
        doc: "problems, for the prompts of side-by-side completions",
    },
];

const OUTPUTS: &[OutputSlot] = &[OutputSlot {
    name: "report",
    artifact: ReportArtifact::TYPE,
    doc: "report.md + report.html (+ report.json, the data)",
}];

impl Stage for Report {
    type Params = ReportParams;
    const KIND: &'static str = "report";
    // 3: variants named from their producers' tables and matrix values as the engine hands
    //    them over (which the key now includes), artifacts cited by their tree hash, the
    //    problems by their producer; markdown escapes text with the one HTML escaper.
    const VERSION: &'static str = "3";
    const SUMMARY: &'static str =
        "markdown + HTML report: pass@k, comparisons, losses, filters, completions";

    fn inputs() -> &'static [InputSlot] {
        INPUTS
    }

    fn outputs() -> &'static [OutputSlot] {
        OUTPUTS
    }

    // The variants are named after their producers' tables and matrix values.
    fn uses_input_labels(_: &ReportParams) -> bool {
        true
    }

    fn headline_files() -> &'static [&'static str] {
        &["report.html", "report.md"]
    }

    fn run(p: &ReportParams, ctx: &mut StageContext) -> miette::Result<()> {
        let mut data = ReportData {
            title: p.title.clone(),
            summary: p.summary.clone(),
            ..Default::default()
        };
        let mut provenance = Vec::new();
        let mut cite = |slot: &str, input: &InputArtifact| {
            provenance.push(format!(
                "{slot}: {} (artifact {})",
                input.stage,
                tree_of(input)
            ));
            CacheKey {
                stage: input.stage.clone(),
                key: tree_of(input),
            }
        };

        let grade_inputs = ctx.inputs("grades");
        if grade_inputs.is_empty() {
            return Err(miette!(
                "stage `{}` has no `grades` input connected",
                ctx.stage_name()
            ));
        }
        let graded: Vec<Producer> = grade_inputs.iter().map(producer).collect();
        let mut grades: Vec<(String, Producer, GradeReport)> = Vec::new();
        for ((input, who), name) in grade_inputs.iter().zip(&graded).zip(variant_names(&graded)) {
            let report = GradesArtifact::read(&input.path)?;
            data.cache_keys.push(cite("grades", input));
            grades.push((name, who.clone(), report));
        }

        let mut notes = Vec::new();
        let mut losses: Vec<(Producer, Vec<LossPoint>)> = Vec::new();
        for input in ctx.inputs("losses") {
            data.cache_keys.push(cite("losses", input));
            match AdapterArtifact::read_loss_curve(&input.path)? {
                Some(curve) => losses.push((producer(input), curve)),
                None => notes.push(format!(
                    "{} has no metrics.jsonl; no loss curve",
                    input.stage
                )),
            }
        }
        for (name, who, report) in &grades {
            let loss = ancestor_of(who, &losses)
                .map(|(_, curve)| curve.clone())
                .unwrap_or_default();
            data.variants
                .push(VariantReport::from_grade(name, &p.benchmark, report, loss));
        }
        for (trained, _) in &losses {
            if !graded.iter().any(|g| trained.is_ancestor_of(g)) {
                notes.push(format!(
                    "loss curve of `{}` matches no graded variant",
                    trained.instance_name()
                ));
            }
        }

        let base_idx = match &p.baseline {
            None => 0,
            Some(b) => grades
                .iter()
                .position(|(name, who, _)| name == b || who.instance_name() == *b)
                .ok_or_else(|| {
                    miette!(
                        help = format!(
                            "use one of: {}",
                            grades
                                .iter()
                                .map(|g| g.0.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        "baseline `{b}` is not one of the graded variants"
                    )
                })?,
        };
        let (base_name, _, base) = &grades[base_idx];
        // A fixed seed (not the experiment's): the report kind does not use the seed, so its
        // output must not depend on it, or two seeds would share a key with different content.
        let opts = CompareOptions::default();
        for (i, (name, _, g)) in grades.iter().enumerate() {
            if i == base_idx {
                continue;
            }
            match compare_paired(base_name, &base.tasks, name, &g.tasks, &opts) {
                Ok(c) => data.comparisons.push(c),
                Err(e @ StatsError::NoSharedTasks { .. }) => notes.push(e.to_string()),
                Err(e) => return Err(e.into()),
            }
        }

        for input in ctx.inputs("filters") {
            data.cache_keys.push(cite("filters", input));
            for report in FilterReportArtifact::read(&input.path)? {
                let dataset = format!("{}: {}", input.stage, report.filter);
                data.filters
                    .push(FilterStats::from_report(dataset, &report));
            }
        }

        let problem_input = ctx.inputs("problems").first();
        let problems: Vec<Problem> = match problem_input {
            Some(input) => {
                data.cache_keys.push(cite("problems", input));
                ProblemsArtifact::read(&input.path)?
                    .iter()
                    .map(EvalProblem::display_problem)
                    .collect()
            }
            // Without problems, rows follow the baseline's task order with empty prompts.
            None => base
                .tasks
                .iter()
                .map(|t| Problem {
                    task_id: t.task_id.clone(),
                    prompt: String::new(),
                    test: String::new(),
                    entry_point: String::new(),
                })
                .collect(),
        };
        let named: Vec<(&str, &GradeReport)> =
            grades.iter().map(|(n, _, g)| (n.as_str(), g)).collect();
        data.completions = completion_rows(&problems, &named, p.max_completion_rows);

        if !notes.is_empty() {
            if !data.summary.is_empty() {
                data.summary.push_str("\n\n");
            }
            data.summary
                .push_str(&format!("Notes: {}.", notes.join("; ")));
        }
        data.manifest = format!(
            "# produced by stage `{}` from:\n{}\n",
            ctx.stage_name(),
            provenance.join("\n")
        );
        ReportArtifact::write(ctx.output_dir("report")?, &data)?;
        ctx.set_metadata("variants", grades.len() as u64);
        ctx.set_metadata("comparisons", data.comparisons.len() as u64);
        Ok(())
    }
}

/// What produced `input`: its stage's manifest table and matrix values, as the engine says.
fn producer(input: &InputArtifact) -> Producer {
    Producer {
        base: input.base.clone(),
        labels: input.labels.clone(),
    }
}

/// The content hash an input artifact is stored under, for the report's provenance (a
/// standalone run without a store has none: the directory's name stands in).
fn tree_of(input: &InputArtifact) -> String {
    if input.tree.is_empty() {
        input
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        input.tree.clone()
    }
}
