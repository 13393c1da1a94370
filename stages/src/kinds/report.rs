//! `report`: an experiment report over every graded and likelihood-scored variant, answer
//! first.
//!
//! The answer ([`crate::report::answer`]): per benchmark (the `benchmark_key` matrix value), one
//! table of variants with each metric (bits per byte from `likelihoods`; pass@1, and pass@10
//! where there are 10 samples, from `grades`) pooled over training seeds (the `pool` matrix
//! keys) with 95% intervals over tasks and seeds, and the verdicts in plain words: every variant
//! against the baseline, then every other pair. `pipeline run` prints it at the end
//! (`answer.txt`).
//!
//! Inputs:
//! * `grades` (many, a [`GradesArtifact`] each): one per variant. A variant is named after what
//!   sets its producer apart from the others ([`variant_names`]): `grade-base` → `base`,
//!   `grade@messy,1` → `messy,1`.
//! * `losses` (many, optional, [`AdapterArtifact`]s): training runs; the metrics of one give the
//!   loss curve of the graded variants it produced (its matrix values are all among theirs:
//!   `train@messy,1` → `grade@messy,1,humaneval`).
//! * `likelihoods` (many, optional, [`LikelihoodArtifact`]s): per-task bits per byte of the
//!   variants' reference solutions. Scores of problems framed in a training template (the
//!   summary's `template`) are their own metric, a column named after the template
//!   (`bits/byte (code_snippet template)`), beside the benchmark-framed `bits/byte`; a variant
//!   scored under its training template joins its row when the stage's name leaves the same
//!   variant name (`likelihood-snippet-base` and `likelihood-base` are both `base`). A report
//!   needs `grades`, `likelihoods` or `data`.
//! * `filters` (many, optional, [`FilterReportArtifact`]s).
//! * `data` (many, optional, [`DataStatsArtifact`]s): what each data variant is made of, shown
//!   side by side (records, token lengths, distinct-n, compression, duplicates).
//! * `similarity` (many, optional, [`SimilarityArtifact`]s from `eval-similarity` stages):
//!   the contamination table: each trained variant's scores on the eval tasks its own data
//!   resembles (at each threshold of `contamination`) and on the rest, with intervals and
//!   counts ([`crate::report::contamination`]), and the most resembled tasks with their
//!   nearest records.
//! * `problems` (optional, a [`ProblemsArtifact`]): gives the prompts of the side-by-side
//!   completions (the completions themselves come from the graded results).
//!
//! Parameters: `title`, `summary`, `benchmark` (label of the scores), `baseline` (variant or
//! stage name every other variant is compared with; default the first, and for the answer a
//! variant named `base`), `max_completion_rows`, `benchmark_key` (default `bench`), `pool`
//! (default `["seed"]`), `contamination` (thresholds per measure, default `{ embedding = [0.8,
//! 0.9], ast = [0.5, 0.8] }`), `nearest_examples`.
//!
//! Output `report`: a [`ReportArtifact`]. The stage cannot see the manifest; the report lists the
//! producing stage of every input and the content hash of its artifact instead.

use miette::miette;
use pipeline_engine::stage::InputArtifact;
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use serde::{Deserialize, Serialize};

use crate::artifacts::{
    AdapterArtifact, DataStatsArtifact, FilterReportArtifact, GradesArtifact, LikelihoodArtifact,
    ProblemsArtifact, ReportArtifact, SimilarityArtifact,
};
use crate::evalsets::EvalProblem;
use crate::grade::stats::StatsError;
use crate::grade::{compare_paired, pass_at_k, CompareOptions, GradeReport, Problem};
use crate::report::answer::{answer_variant_names, build_answer, AnswerKeys, Observation};
use crate::report::contamination::{
    contamination_tables, nearest_examples, ContaminationThresholds,
};
use crate::report::variants::{ancestor_of, variant_names, Producer};
use crate::report::{
    completion_rows, CacheKey, DataRow, FilterStats, LossPoint, ReportData, VariantReport,
};
use crate::stats::{Metric, StatsOptions};

/// The `report` stage kind.
pub struct Report;

/// Parameters of [`Report`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
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
    /// The matrix key whose value names the benchmark (one answer table per benchmark).
    pub benchmark_key: String,
    /// Matrix keys whose values are training seeds: a variant's score pools them (mean over
    /// seeds; the interval resamples tasks and seeds).
    pub pool: Vec<String>,
    /// Similarity thresholds of the contamination table, per measure (with `similarity`
    /// inputs): every threshold splits the eval tasks into those the variant's data resembles
    /// at least that much and the rest.
    pub contamination: ContaminationThresholds,
    /// Most similar eval tasks listed per variant and measure, with their nearest record.
    pub nearest_examples: usize,
}

impl Default for ReportParams {
    fn default() -> Self {
        Self {
            title: "Experiment report".into(),
            summary: String::new(),
            benchmark: "pass@k".into(),
            baseline: None,
            max_completion_rows: 5,
            benchmark_key: "bench".into(),
            pool: vec!["seed".into()],
            contamination: ContaminationThresholds::default(),
            nearest_examples: 3,
        }
    }
}

const INPUTS: &[InputSlot] = &[
    InputSlot {
        name: "grades",
        accepts: &[GradesArtifact::TYPE],
        required: false,
        many: true,
        doc: "graded variants (one grade stage each)",
    },
    InputSlot {
        name: "likelihoods",
        accepts: &[LikelihoodArtifact::TYPE],
        required: false,
        many: true,
        doc: "likelihood scores of the variants (one likelihood stage each)",
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
        name: "data",
        accepts: &[DataStatsArtifact::TYPE],
        required: false,
        many: true,
        doc: "statistics of the data variants (one data-stats stage each)",
    },
    InputSlot {
        name: "similarity",
        accepts: &[SimilarityArtifact::TYPE],
        required: false,
        many: true,
        doc: "similarity of each variant's data to the eval set (eval-similarity stages): the contamination table",
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
    // 4: the answer first (per benchmark, variants pooled over seeds with intervals, and
    //    verdicts), likelihood inputs, `answer.txt`.
    // 5: variants named alike across kinds (`grade-greedy-base` and `likelihood-base` are both
    //    `base`), instances without a benchmark value join the default benchmark's table,
    //    held-out losses, disagreeing completions first with why they failed.
    // 6: the contamination table and nearest records (`similarity` inputs).
    // 7: paired comparisons only between grades of the same sample count (greedy with greedy,
    //    sampled with sampled).
    const VERSION: &'static str = "7";
    const SUMMARY: &'static str =
        "markdown + HTML report: pass@k, comparisons, losses, filters, completions";

    /// Seconds of rendering: not worth a cluster job.
    fn runs_on_coordinator(_: &ReportParams) -> bool {
        true
    }
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

    fn summary_file() -> Option<&'static str> {
        Some(ReportArtifact::ANSWER_FILE)
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
        let likelihood_inputs = ctx.inputs("likelihoods");
        if grade_inputs.is_empty() && likelihood_inputs.is_empty() && ctx.inputs("data").is_empty()
        {
            return Err(miette!(
                help = "connect `grades` (grade stages), `likelihoods` (likelihood stages) or `data` (data-stats stages)",
                "stage `{}` has nothing to report: no `grades`, `likelihoods` or `data` input",
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
        let mut losses: Vec<(Producer, TrainingLoss)> = Vec::new();
        for input in ctx.inputs("losses") {
            data.cache_keys.push(cite("losses", input));
            // A downloaded or older adapter may have no train.json: then no held-out loss.
            let held_out = AdapterArtifact::read_summary(&input.path)
                .ok()
                .and_then(|s| s.final_eval_loss);
            match AdapterArtifact::read_loss_curve(&input.path)? {
                Some(curve) => losses.push((producer(input), (curve, held_out))),
                None => notes.push(format!(
                    "{} has no metrics.jsonl; no loss curve",
                    input.stage
                )),
            }
        }
        for (name, who, report) in &grades {
            let (loss, held_out_loss) = ancestor_of(who, &losses)
                .map(|(_, run)| run.clone())
                .unwrap_or_default();
            data.variants.push(VariantReport {
                held_out_loss,
                ..VariantReport::from_grade(name, &p.benchmark, report, loss)
            });
        }
        for (trained, _) in &losses {
            if !graded.iter().any(|g| trained.is_ancestor_of(g)) {
                notes.push(format!(
                    "loss curve of `{}` matches no graded variant",
                    trained.instance_name()
                ));
            }
        }

        let mut observations: Vec<Observation> = Vec::new();
        for input in likelihood_inputs {
            data.cache_keys.push(cite("likelihoods", input));
            let scores = LikelihoodArtifact::read(&input.path)?;
            // Scores framed in a training template are a metric of their own, named after it.
            let metric = match LikelihoodArtifact::read_summary(&input.path)?.framing() {
                Some(template) => Metric::bits_per_byte_in_template(&template),
                None => Metric::bits_per_byte(),
            };
            observations.push(Observation {
                producer: producer(input),
                metric,
                scores: scores
                    .into_iter()
                    .map(|t| (t.task_id, t.bits_per_byte))
                    .collect(),
            });
        }
        for (_, who, report) in &grades {
            observations.extend(pass_at_k_observations(who, report));
        }
        let keys = AnswerKeys {
            benchmark: p.benchmark_key.clone(),
            pooled: p.pool.clone(),
            default_benchmark: p.benchmark.clone(),
        };
        // A fixed seed (not the experiment's): the report kind does not use the seed, so its
        // output must not depend on it, or two seeds would share a key with different content.
        data.answer = build_answer(
            &observations,
            &keys,
            p.baseline.as_deref(),
            &StatsOptions::default(),
        );

        let similarity_inputs = ctx.inputs("similarity");
        let mut similarities = Vec::with_capacity(similarity_inputs.len());
        for input in similarity_inputs {
            data.cache_keys.push(cite("similarity", input));
            similarities.push((producer(input), SimilarityArtifact::read(&input.path)?));
        }
        let baselines = data
            .answer
            .benchmarks
            .iter()
            .map(|t| (t.benchmark.clone(), t.baseline.clone()))
            .collect();
        let (tables, contamination_notes) = contamination_tables(
            &observations,
            &similarities,
            &keys,
            &baselines,
            &p.contamination,
            &StatsOptions::default(),
        );
        data.contamination = tables;
        data.answer.notes.extend(contamination_notes);
        data.nearest = nearest_examples(&similarities, p.nearest_examples);

        // The baseline of the per-stage comparisons: the graded variant `baseline` names
        // (default the first). A baseline that names no graded variant must name a variant of
        // the answer (a likelihood-only baseline); otherwise it is a typo worth an error.
        let grade_base = match &p.baseline {
            None => 0,
            Some(b) => match grades
                .iter()
                .position(|(name, who, _)| name == b || who.instance_name() == *b || who.base == *b)
            {
                Some(i) => i,
                None if data.answer.benchmarks.iter().any(|t| t.baseline == *b) => 0,
                None => {
                    let mut known: Vec<String> = grades.iter().map(|g| g.0.clone()).collect();
                    for t in &data.answer.benchmarks {
                        known.extend(t.rows.iter().map(|r| r.variant.clone()));
                    }
                    known.dedup();
                    return Err(miette!(
                        help = format!("use one of: {}", known.join(", ")),
                        "baseline `{b}` is not one of the report's variants"
                    ));
                }
            },
        };
        let opts = CompareOptions::default();
        if let Some((_, _, base)) = grades.get(grade_base) {
            // A greedy single sample and a sampled estimate are different measurements: each
            // grade is compared with the baseline variant graded with as many samples (the
            // same variant under the answer's naming: `grade-sampled-base` for the
            // `grade-sampled` stages when the baseline is `grade-greedy-base`).
            let mut dropped = p.pool.clone();
            dropped.push(p.benchmark_key.clone());
            let answer_names = answer_variant_names(&graded, &dropped);
            let samples = |g: &GradeReport| g.tasks.iter().map(|t| t.n).min().unwrap_or(0);
            for (i, (name, _, g)) in grades.iter().enumerate() {
                let base_index = if samples(g) == samples(base) {
                    grade_base
                } else {
                    match grades.iter().enumerate().position(|(j, (_, _, b))| {
                        samples(b) == samples(g) && answer_names[j] == answer_names[grade_base]
                    }) {
                        Some(j) => j,
                        None => continue,
                    }
                };
                if i == base_index {
                    continue;
                }
                let (base_name, _, base) = &grades[base_index];
                match compare_paired(base_name, &base.tasks, name, &g.tasks, &opts) {
                    Ok(c) => data.comparisons.push(c),
                    Err(e @ StatsError::NoSharedTasks { .. }) => notes.push(e.to_string()),
                    Err(e) => return Err(e.into()),
                }
            }
        }

        let data_inputs = ctx.inputs("data");
        let data_producers: Vec<Producer> = data_inputs.iter().map(producer).collect();
        for (input, variant) in data_inputs.iter().zip(variant_names(&data_producers)) {
            data.cache_keys.push(cite("data", input));
            data.data.push(DataRow {
                variant,
                stats: DataStatsArtifact::read(&input.path)?,
            });
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
        let problems: Vec<Problem> = match (problem_input, grades.get(grade_base)) {
            (Some(input), _) => {
                data.cache_keys.push(cite("problems", input));
                ProblemsArtifact::read(&input.path)?
                    .iter()
                    .map(EvalProblem::display_problem)
                    .collect()
            }
            // Without problems, rows follow the baseline's task order with empty prompts.
            (None, Some((_, _, base))) => base
                .tasks
                .iter()
                .map(|t| Problem {
                    task_id: t.task_id.clone(),
                    prompt: String::new(),
                    test: String::new(),
                    entry_point: String::new(),
                })
                .collect(),
            (None, None) => Vec::new(),
        };
        let named: Vec<(&str, &GradeReport)> =
            grades.iter().map(|(n, _, g)| (n.as_str(), g)).collect();
        (data.completions, data.completions_note) =
            completion_rows(&problems, &named, p.max_completion_rows);

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

/// A training run's loss curve and its held-out loss at the end (if it had held-out records).
type TrainingLoss = (Vec<LossPoint>, Option<f64>);

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

/// The pass@k scores of one graded variant as answer observations: per task `c / n` for
/// pass@1, and the unbiased pass@k estimate for every larger k the samples allow (10 when
/// there are at least 10 samples per task). The metric's name carries the sample count, so a
/// greedy single sample and a sampled estimate are never pooled together.
fn pass_at_k_observations(who: &Producer, report: &GradeReport) -> Vec<Observation> {
    let Some(n) = report.tasks.iter().map(|t| t.n).min() else {
        return Vec::new();
    };
    let samples = if n == 1 {
        "1 sample".to_string()
    } else {
        format!("n={n}")
    };
    [1u64, 10]
        .into_iter()
        .filter(|&k| k <= n)
        .map(|k| Observation {
            producer: who.clone(),
            metric: Metric {
                name: format!("pass@{k} ({samples})"),
                ..Metric::pass_at_1()
            },
            scores: report
                .tasks
                .iter()
                .filter_map(|t| Some((t.task_id.clone(), pass_at_k(t.n, t.c, k)?)))
                .collect(),
        })
        .collect()
}
