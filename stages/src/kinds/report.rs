//! `report`: an experiment report over every graded variant.
//!
//! Inputs:
//! * `grades` (many, artifact `grades`): one per variant. A variant is named after what sets
//!   its producing stage instance apart from the others (see [`variant_names`]):
//!   `grade-base` → `base`, `grade@messy,1` → `messy,1`.
//! * `losses` (many, optional, artifact `adapter`): training outputs; `metrics.jsonl` in the
//!   directory, if present, gives the loss curve of the graded variants whose names contain
//!   its name's words (`train@messy,1` → `messy,1` → `messy,1,humaneval`,
//!   `greedy-messy,1,humaneval`).
//! * `filters` (many, optional, artifact `filter-report`): directories with `report.json`
//!   (one filter report `{filter, input, kept, removed_by_reason, histogram}`, a list of
//!   them, or `{"reports": [..]}`).
//! * `problems` (optional, artifact `problems`): gives the prompts of the side-by-side
//!   completions (the completions themselves come from the graded results).
//!
//! Parameters: `title`, `summary`, `benchmark` (label of the scores), `baseline` (variant or
//! stage name every other variant is compared with; default the first), `max_completion_rows`.
//!
//! Output `report` (artifact `report`): `report.md`, `report.html` and `report.json` (the
//! [`ReportData`] rendered). The stage cannot see the manifest; the report lists the
//! producing stage of every input and the content hash of its artifact instead.

use std::collections::BTreeSet;
use std::path::Path;

use miette::miette;
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use serde::{Deserialize, Serialize};

use super::grade::read_grades_artifact;
use super::{read_problems_artifact, write_json};
use crate::grade::stats::StatsError;
use crate::grade::{compare_paired, CompareOptions, GradeReport, Problem};
use crate::report::{
    completion_rows, read_loss_curve, render_html, render_markdown, CacheKey, FilterStats,
    Histogram, LossPoint, ReasonCount, ReportData, VariantReport,
};

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

/// Names for the variants produced by `stages` (stage instance names, in order): what tells
/// them apart. The leading `-`-separated words that every base name shares are dropped (the
/// `grade` of `grade-base`, `grade-greedy` and `grade@messy`), the rest is joined with the
/// matrix values: `grade-base@humaneval` -> `base,humaneval`, `grade@messy,1` -> `messy,1`.
/// A name that would be empty, or the same as another's, is the stage name itself (numbered
/// if that, too, repeats).
pub fn variant_names(stages: &[&str]) -> Vec<String> {
    let split = |stage: &'_ str| -> (Vec<String>, Option<String>) {
        let (base, values) = match stage.split_once('@') {
            Some((b, v)) => (b, Some(v.to_string())),
            None => (stage, None),
        };
        (base.split('-').map(str::to_string).collect(), values)
    };
    let parts: Vec<_> = stages.iter().map(|s| split(s)).collect();
    let shared = match parts.split_first() {
        Some(((first, _), rest)) => (0..first.len())
            .take_while(|&i| rest.iter().all(|(words, _)| words.get(i) == first.get(i)))
            .count(),
        None => 0,
    };
    let mut names: Vec<String> = parts
        .iter()
        .map(|(words, values)| {
            let own = words[shared.min(words.len())..].join("-");
            [Some(own), values.clone()]
                .into_iter()
                .flatten()
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let own = names.clone();
    for (i, name) in names.iter_mut().enumerate() {
        if name.is_empty() || own.iter().filter(|n| *n == name).count() > 1 {
            *name = stages[i].to_string();
        }
    }
    // Two inputs from the same stage name (possible outside a manifest) stay apart too.
    for i in 1..names.len() {
        if names[..i].contains(&names[i]) {
            names[i] = format!("{} #{}", names[i], i + 1);
        }
    }
    names
}

/// The words of a variant name (split at `,` and `-`), to match training runs with the graded
/// variants they produced.
pub fn name_words(name: &str) -> BTreeSet<&str> {
    name.split([',', '-']).filter(|w| !w.is_empty()).collect()
}

/// The loss curve belonging to graded variant `grade`: of the training variants whose words
/// all occur in its name (`textbook,1` in `greedy-textbook,1,humaneval`), the most specific.
pub fn loss_for<'l>(
    grade: &str,
    losses: &'l [(String, Vec<LossPoint>)],
) -> Option<&'l [LossPoint]> {
    let words = name_words(grade);
    losses
        .iter()
        .filter(|(v, _)| name_words(v).is_subset(&words))
        .max_by_key(|(v, _)| name_words(v).len())
        .map(|(_, l)| l.as_slice())
}

const INPUTS: &[InputSlot] = &[
    InputSlot {
        name: "grades",
        accepts: &["grades"],
        required: true,
        many: true,
        doc: "graded variants (one grade stage each)",
    },
    InputSlot {
        name: "losses",
        accepts: &["adapter"],
        required: false,
        many: true,
        doc: "trained adapters whose metrics.jsonl gives loss curves",
    },
    InputSlot {
        name: "filters",
        accepts: &["filter-report"],
        required: false,
        many: true,
        doc: "data-filter reports (report.json)",
    },
    InputSlot {
        name: "problems",
        accepts: &["problems"],
        required: false,
        many: false,
        doc: "problems, for the prompts of side-by-side completions",
    },
];

const OUTPUTS: &[OutputSlot] = &[OutputSlot {
    name: "report",
    artifact: "report",
    doc: "report.md + report.html (+ report.json, the data)",
}];

impl Stage for Report {
    type Params = ReportParams;
    const KIND: &'static str = "report";
    const VERSION: &'static str = "2";
    const SUMMARY: &'static str =
        "markdown + HTML report: pass@k, comparisons, losses, filters, completions";

    fn inputs() -> &'static [InputSlot] {
        INPUTS
    }

    fn outputs() -> &'static [OutputSlot] {
        OUTPUTS
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
        let mut record = |slot: &str, stage: &str, path: &Path| {
            let hash = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            provenance.push(format!("{slot}: {stage} (artifact {hash})"));
            CacheKey {
                stage: stage.to_string(),
                key: hash,
            }
        };

        let grade_inputs = ctx.inputs("grades");
        let stage_names: Vec<&str> = grade_inputs.iter().map(|a| a.stage.as_str()).collect();
        let mut grades: Vec<(String, String, GradeReport)> = Vec::new();
        for (a, name) in grade_inputs.iter().zip(variant_names(&stage_names)) {
            let report = read_grades_artifact(&a.path)?;
            data.cache_keys.push(record("grades", &a.stage, &a.path));
            grades.push((name, a.stage.clone(), report));
        }
        if grades.is_empty() {
            return Err(miette!(
                "stage `{}` has no `grades` input connected",
                ctx.stage_name()
            ));
        }

        let mut notes = Vec::new();
        let loss_inputs = ctx.inputs("losses");
        let loss_stages: Vec<&str> = loss_inputs.iter().map(|a| a.stage.as_str()).collect();
        let mut losses: Vec<(String, Vec<LossPoint>)> = Vec::new();
        for (a, name) in loss_inputs.iter().zip(variant_names(&loss_stages)) {
            data.cache_keys.push(record("losses", &a.stage, &a.path));
            let metrics = a.path.join("metrics.jsonl");
            if metrics.is_file() {
                losses.push((name, read_loss_curve(&metrics)?));
            } else {
                notes.push(format!("{} has no metrics.jsonl; no loss curve", a.stage));
            }
        }
        for (name, _stage, report) in &grades {
            let loss = loss_for(name, &losses)
                .map(<[_]>::to_vec)
                .unwrap_or_default();
            data.variants
                .push(VariantReport::from_grade(name, &p.benchmark, report, loss));
        }
        for (v, _) in &losses {
            if !grades
                .iter()
                .any(|(name, _, _)| name_words(v).is_subset(&name_words(name)))
            {
                notes.push(format!("loss curve of `{v}` matches no graded variant"));
            }
        }

        let base_idx = match &p.baseline {
            None => 0,
            Some(b) => grades
                .iter()
                .position(|(name, stage, _)| name == b || stage == b)
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

        for a in ctx.inputs("filters") {
            data.cache_keys.push(record("filters", &a.stage, &a.path));
            data.filters
                .extend(read_filter_report(&a.path.join("report.json"), &a.stage)?);
        }

        let problems: Vec<Problem> = match ctx.optional_input("problems") {
            Some(dir) => {
                data.cache_keys.push(record("problems", "problems", dir));
                read_problems_artifact(dir)?
                    .into_iter()
                    .map(|p| Problem {
                        task_id: p.task_id,
                        prompt: p.prompt,
                        test: p.test,
                        entry_point: p.entry_point,
                    })
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

        let out = ctx.output_dir("report")?.to_path_buf();
        let write = |name: &str, text: String| {
            std::fs::write(out.join(name), text).map_err(|e| miette!("cannot write {name}: {e}"))
        };
        write("report.md", render_markdown(&data))?;
        write("report.html", render_html(&data))?;
        write_json(&out.join("report.json"), &data)?;
        ctx.set_metadata("variants", grades.len() as u64);
        ctx.set_metadata("comparisons", data.comparisons.len() as u64);
        Ok(())
    }
}

/// Reads a filter-report `report.json` (one report, a list, or `{"reports": [..]}`) as
/// report sections named `<stage>: <filter>`.
pub fn read_filter_report(path: &Path, stage: &str) -> miette::Result<Vec<FilterStats>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        miette!(
            help = "connect the output of a filter stage (a directory with report.json)",
            "cannot read {}: {e}",
            path.display()
        )
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| miette!("{} is not JSON: {e}", path.display()))?;
    let items: Vec<&serde_json::Value> = match &v {
        serde_json::Value::Array(a) => a.iter().collect(),
        serde_json::Value::Object(o) => match o.get("reports") {
            Some(serde_json::Value::Array(a)) => a.iter().collect(),
            _ => vec![&v],
        },
        _ => Vec::new(),
    };
    items
        .into_iter()
        .map(|r| {
            let bad = |what: &str| {
                miette!(
                    help = "expected a filter report {filter, input, kept, removed_by_reason, histogram}",
                    "{}: {what}",
                    path.display()
                )
            };
            let filter = r.get("filter").and_then(|f| f.as_str()).unwrap_or("filter");
            let total = r.get("input").and_then(|x| x.as_u64()).ok_or_else(|| bad("missing `input` count"))?;
            let kept = r.get("kept").and_then(|x| x.as_u64()).ok_or_else(|| bad("missing `kept` count"))?;
            let reasons = r
                .get("removed_by_reason")
                .and_then(|m| m.as_object())
                .map(|m| {
                    m.iter()
                        .filter_map(|(reason, n)| Some(ReasonCount { reason: reason.clone(), count: n.as_u64()? }))
                        .collect()
                })
                .unwrap_or_default();
            let histograms = r
                .get("histogram")
                .and_then(|h| {
                    let min = h.get("min")?.as_f64()?;
                    let max = h.get("max")?.as_f64()?;
                    let counts: Vec<u64> = h.get("counts")?.as_array()?.iter().filter_map(|c| c.as_u64()).collect();
                    if counts.is_empty() {
                        return None;
                    }
                    let width = (max - min) / counts.len() as f64;
                    let edges = (0..=counts.len()).map(|i| min + width * i as f64).collect();
                    let threshold = r.get("extra").and_then(|e| e.get("threshold")).and_then(|t| t.as_f64());
                    Some(vec![Histogram { title: format!("{filter} score"), edges, counts, threshold }])
                })
                .unwrap_or_default();
            Ok(FilterStats { dataset: format!("{stage}: {filter}"), total, kept, reasons, histograms })
        })
        .collect()
}
