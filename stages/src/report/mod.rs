//! Experiment reports: markdown and a self-contained HTML page (inline CSS and SVG, no
//! external assets, every piece of data HTML-escaped) rendered from a typed
//! [`ReportData`].
//!
//! Sections: pass@k per variant with confidence-interval error bars, training-loss
//! curves, data-filter statistics (counts per reason, histograms), side-by-side
//! completions, paired comparisons with verdicts, and the manifest and cache keys that
//! produced the results.

pub mod answer;
pub mod contamination;
mod html;
mod markdown;
pub mod svg;
pub mod variants;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::grade::{pass_at_k, GradeReport, PairedComparison, Problem, TaskCounts};

pub use html::render_html;
pub use markdown::render_markdown;

/// All the data a report shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportData {
    /// Page title.
    pub title: String,
    /// Free-text introduction (rendered as a paragraph).
    pub summary: String,
    /// The answer: per benchmark, the variants' pooled scores with intervals and the verdicts.
    pub answer: answer::Answer,
    /// One entry per model variant (e.g. base, clean, messy).
    pub variants: Vec<VariantReport>,
    /// Paired comparisons between variants.
    pub comparisons: Vec<PairedComparison>,
    /// Data-filter statistics per dataset.
    pub filters: Vec<FilterStats>,
    /// What each data variant is made of (from `data-stats` stages), side by side.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<DataRow>,
    /// Each trained variant's scores on the eval tasks its data resembles and on the rest.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub contamination: Vec<contamination::ContaminationTable>,
    /// The eval tasks most resembled by each variant's data, with the nearest record.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nearest: Vec<contamination::NearestExample>,
    /// Prompts with each variant's completion: tasks where the variants disagree first.
    pub completions: Vec<CompletionRow>,
    /// What the completions section shows, e.g. `5 of 164 tasks; the 3 where the variants
    /// disagree come first`.
    pub completions_note: String,
    /// The manifest text that produced the run.
    pub manifest: String,
    /// Cache keys of the stages that produced the results.
    pub cache_keys: Vec<CacheKey>,
}

/// One variant's evaluation and training curve.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VariantReport {
    /// Variant name.
    pub name: String,
    /// Benchmark the scores are on (e.g. `HumanEval`).
    pub benchmark: String,
    /// pass@k scores with optional confidence intervals.
    pub pass_at_k: Vec<ScorePoint>,
    /// Tasks graded.
    pub tasks: usize,
    /// Samples graded.
    pub samples: usize,
    /// Training loss curve (empty for untrained baselines).
    pub loss: Vec<LossPoint>,
    /// Loss on the training stage's held-out records at the end, when it had some.
    pub held_out_loss: Option<f64>,
}

/// pass@k for one k, with a confidence interval when known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScorePoint {
    /// The k.
    pub k: u64,
    /// Mean pass@k over tasks, in [0, 1].
    pub value: f64,
    /// Lower end of the confidence interval.
    pub ci_low: Option<f64>,
    /// Upper end of the confidence interval.
    pub ci_high: Option<f64>,
}

/// One point of a training-loss curve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LossPoint {
    /// Optimizer step.
    pub step: u64,
    /// Training loss at that step.
    pub loss: f64,
}

/// One data variant's statistics, as the report names the variant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataRow {
    /// Variant name.
    pub variant: String,
    /// Its statistics.
    pub stats: crate::artifacts::DataStats,
}

/// What a data filter kept and dropped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterStats {
    /// Dataset name.
    pub dataset: String,
    /// Rows read.
    pub total: u64,
    /// Rows kept.
    pub kept: u64,
    /// Drop counts per reason.
    pub reasons: Vec<ReasonCount>,
    /// Score histograms (e.g. quality score, length).
    pub histograms: Vec<Histogram>,
}

impl FilterStats {
    /// The report section of one filter step's report; `dataset` names it (`<stage>:
    /// <filter>`).
    pub fn from_report(dataset: String, r: &crate::filter::report::FilterReport) -> Self {
        let histograms = r
            .histogram
            .as_ref()
            .filter(|h| !h.counts.is_empty())
            .map(|h| {
                let width = (h.max - h.min) / h.counts.len() as f64;
                Histogram {
                    title: format!("{} score", r.filter),
                    edges: (0..=h.counts.len())
                        .map(|i| h.min + width * i as f64)
                        .collect(),
                    counts: h.counts.iter().map(|&c| c as u64).collect(),
                    threshold: r.extra.get("threshold").copied(),
                }
            })
            .into_iter()
            .collect();
        Self {
            dataset,
            total: r.input as u64,
            kept: r.kept as u64,
            reasons: r
                .removed_by_reason
                .iter()
                .map(|(reason, &count)| ReasonCount {
                    reason: reason.clone(),
                    count: count as u64,
                })
                .collect(),
            histograms,
        }
    }
}

/// Rows dropped for one reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReasonCount {
    /// Reason, e.g. `too_short`.
    pub reason: String,
    /// Rows dropped.
    pub count: u64,
}

/// A histogram with explicit bin edges (`edges.len() == counts.len() + 1`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Histogram {
    /// What is counted, e.g. `quality score`.
    pub title: String,
    /// Bin edges, ascending.
    pub edges: Vec<f64>,
    /// Count per bin.
    pub counts: Vec<u64>,
    /// A filter threshold to mark, if any.
    pub threshold: Option<f64>,
}

/// One prompt and each variant's completion.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompletionRow {
    /// Task id.
    pub task_id: String,
    /// The prompt.
    pub prompt: String,
    /// One per variant, in the order of [`ReportData::variants`].
    pub completions: Vec<VariantCompletion>,
}

/// A variant's completion of a prompt.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VariantCompletion {
    /// Variant name.
    pub variant: String,
    /// Generated code.
    pub completion: String,
    /// Whether it passed the tests, if graded.
    pub passed: Option<bool>,
    /// Why it failed, in a few words (`AssertionError`, `timed out`, `stopped after 256
    /// tokens`); empty when it passed.
    pub outcome: String,
}

/// The cache key of one stage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheKey {
    /// Stage name.
    pub stage: String,
    /// Its cache key (hash).
    pub key: String,
}

/// Seeded percentile-bootstrap CI (over tasks) of mean pass@k.
pub fn pass_at_k_ci(
    tasks: &[TaskCounts],
    k: u64,
    resamples: usize,
    confidence: f64,
    seed: u64,
) -> Option<(f64, f64)> {
    let per_task: Vec<f64> = tasks
        .iter()
        .map(|t| pass_at_k(t.n, t.c, k))
        .collect::<Option<Vec<f64>>>()?;
    if per_task.is_empty() || resamples == 0 {
        return None;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let m = per_task.len();
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| {
            (0..m)
                .map(|_| per_task[rng.random_range(0..m)])
                .sum::<f64>()
                / m as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let q = |p: f64| means[((p * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    let tail = (1.0 - confidence) / 2.0;
    Some((q(tail), q(1.0 - tail)))
}

impl VariantReport {
    /// Builds a variant's entry from a grading run, with 95% bootstrap CIs (10,000
    /// resamples, fixed seed) on every reported pass@k.
    pub fn from_grade(
        name: &str,
        benchmark: &str,
        grade: &GradeReport,
        loss: Vec<LossPoint>,
    ) -> Self {
        let pass_at_k = grade
            .pass_at_k
            .scores
            .iter()
            .filter_map(|(key, &value)| {
                let k: u64 = key.strip_prefix("pass@")?.parse().ok()?;
                let ci = pass_at_k_ci(&grade.tasks, k, 10_000, 0.95, 0);
                Some(ScorePoint {
                    k,
                    value,
                    ci_low: ci.map(|c| c.0),
                    ci_high: ci.map(|c| c.1),
                })
            })
            .collect::<Vec<_>>();
        let mut pass_at_k = pass_at_k;
        pass_at_k.sort_by_key(|p| p.k);
        VariantReport {
            name: name.to_string(),
            benchmark: benchmark.to_string(),
            pass_at_k,
            tasks: grade.tasks.len(),
            samples: grade.results.len(),
            loss,
            held_out_loss: None,
        }
    }
}

/// Side-by-side rows of at most `max_rows` problems that every variant answered, each
/// variant's first sample for the task: first the tasks where the variants disagree (some
/// passed, some failed), then the rest, each group in problem order. Returns the rows and a
/// sentence saying what they are.
pub fn completion_rows(
    problems: &[Problem],
    variants: &[(&str, &GradeReport)],
    max_rows: usize,
) -> (Vec<CompletionRow>, String) {
    let mut answered: Vec<CompletionRow> = Vec::new();
    for p in problems {
        let completions: Option<Vec<VariantCompletion>> = variants
            .iter()
            .map(|(name, g)| {
                g.results
                    .iter()
                    .find(|r| r.task_id == p.task_id)
                    .map(|r| VariantCompletion {
                        variant: name.to_string(),
                        completion: r.completion.clone(),
                        passed: Some(r.passed),
                        outcome: failure_reason(r),
                    })
            })
            .collect();
        if let Some(completions) = completions {
            answered.push(CompletionRow {
                task_id: p.task_id.clone(),
                prompt: p.prompt.clone(),
                completions,
            });
        }
    }
    let disagree = |row: &CompletionRow| {
        let passed = row
            .completions
            .iter()
            .filter(|c| c.passed == Some(true))
            .count();
        passed > 0 && passed < row.completions.len()
    };
    let disagreeing = answered.iter().filter(|r| disagree(r)).count();
    let total = answered.len();
    let (mut rows, rest): (Vec<_>, Vec<_>) = answered.into_iter().partition(|r| disagree(r));
    rows.extend(rest);
    rows.truncate(max_rows);
    let note = format!(
        "{} of {total} tasks every variant answered; the {disagreeing} where the variants disagree \
         (some passed, some failed) come first.",
        rows.len()
    );
    (rows, note)
}

/// Why a graded sample failed, in a few words: the error's first word (`AssertionError`,
/// `SyntaxError`, `NameError`), `timed out`, or how the process ended; and `stopped after N
/// tokens` when generation hit its token limit. Empty when it passed.
pub fn failure_reason(r: &crate::grade::SampleResult) -> String {
    use crate::grade::Status;
    if r.passed {
        return String::new();
    }
    let mut parts = Vec::new();
    match r.status {
        Status::TimedOut => parts.push("timed out".to_string()),
        _ => {
            let error = r.error.as_deref().unwrap_or(&r.result);
            let error = error.trim().trim_start_matches("failed:").trim();
            let kind = error
                .split(|c: char| c == ':' || c.is_whitespace())
                .next()
                .unwrap_or("");
            parts.push(if kind.is_empty() {
                "failed".to_string()
            } else {
                kind.to_string()
            });
        }
    }
    if r.extra.get("finish_reason").and_then(|v| v.as_str()) == Some("length") {
        let tokens = r
            .extra
            .get("generated_tokens")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        parts.push(format!("stopped after {tokens} tokens"));
    }
    parts.join("; ")
}

/// Escapes text for HTML/XML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters are not allowed in XML; show them visibly instead.
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' && c != '\r' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

/// Formats a probability as a percentage with one decimal.
pub(crate) fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// The coverage table's rows (variant, field, values, records per value, evenness), for the
/// variants whose records carry descriptive fields (a synthetic set's topics and audiences).
fn coverage_rows(rows: &[DataRow]) -> Vec<[String; 5]> {
    let mut out = Vec::new();
    for r in rows {
        for (field, c) in &r.stats.coverage {
            let (min, max) = c.min_max();
            out.push([
                r.variant.clone(),
                field.clone(),
                c.values().to_string(),
                format!("{min} to {max}"),
                format!("{:.2}", c.evenness),
            ]);
        }
    }
    out
}

/// The header and introduction of the coverage table.
const COVERAGE_INTRO: &str = "What the data covers: for records that say which topic, audience or style they were written for (synthetic data), the values present after every data step, the records per value, and the evenness of the spread (1 when every value has as many records).";
const COVERAGE_COLUMNS: [&str; 5] = [
    "variant",
    "field",
    "values",
    "records per value",
    "evenness",
];

/// A corpus's embedding spread for the data table: `0.712 (480 / 500)`, or `–` without one.
fn spread_text(s: &crate::corpus_stats::CorpusStats) -> String {
    s.embedding.as_ref().map_or_else(
        || "–".to_string(),
        |e| {
            format!(
                "{:.3} ({} / {})",
                e.mean_cosine_distance, e.clusters, e.sample
            )
        },
    )
}
