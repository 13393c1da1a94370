//! The contamination table, phi-1's Table 3 for every trained variant: its scores on the eval
//! tasks its own training data resembles (best similarity at or above a threshold) apart from
//! the rest, each with a confidence interval and the task count, so a reader sees whether a
//! gain lives in the similar tasks.
//!
//! A score (an [`Observation`]: one metric of one graded or scored instance) is split by the
//! `eval-similarity` artifact of the data that trained it: the most specific similarity
//! instance whose matrix values, the benchmark's aside, are all the scored instance's
//! (`similarity@messy,humaneval` for `grade@messy,1`) and whose eval tasks are the scored ones.
//! Scores of an untrained model have no training data and are not split. Seeds pool as in the
//! answer ([`super::answer`]): the split is the data's, the same for every seed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::answer::{
    answer_variant_names, estimate_text, seeded_scores, AnswerKeys, Observation, SeedRow,
};
use super::variants::Producer;
use crate::artifacts::EvalSimilarity;
use crate::similarity::Measure;
use crate::stats::{compare, estimate, Comparison, Estimate, Metric, SeededScores, StatsOptions};

/// Similarity thresholds per measure: each threshold gives one split of the eval tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ContaminationThresholds {
    /// Embedding cosine thresholds.
    pub embedding: Vec<f64>,
    /// AST match-rate thresholds.
    pub ast: Vec<f64>,
}

impl Default for ContaminationThresholds {
    fn default() -> Self {
        Self {
            embedding: vec![0.8, 0.9],
            ast: vec![0.5, 0.8],
        }
    }
}

impl ContaminationThresholds {
    /// The thresholds of `measure`.
    pub fn of(&self, measure: Measure) -> &[f64] {
        match measure {
            Measure::Embedding => &self.embedding,
            Measure::Ast => &self.ast,
        }
    }
}

/// One part of the eval tasks and a variant's score on it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Tasks in the part.
    pub tasks: usize,
    /// The pooled score with its interval (none when the part is empty).
    pub estimate: Option<Estimate>,
    /// The variant against the benchmark's baseline (the answer's, e.g. the base model) on
    /// the same tasks, paired: the gain on this part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_baseline: Option<Comparison>,
}

/// One variant's score split at one threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContaminationRow {
    /// Variant name (as in the answer).
    pub variant: String,
    /// The metric.
    pub metric: Metric,
    /// The threshold.
    pub threshold: f64,
    /// Tasks whose best similarity to the variant's data is at least the threshold.
    pub similar: Bucket,
    /// The other tasks.
    pub other: Bucket,
}

/// One benchmark's splits under one measure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContaminationTable {
    /// Benchmark name (as in the answer).
    pub benchmark: String,
    /// The measure the tasks are split by.
    pub measure: Measure,
    /// Per variant, metric and threshold.
    pub rows: Vec<ContaminationRow>,
}

/// The most similar tasks of one variant's data under one measure, with the nearest record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NearestExample {
    /// The similarity stage instance (what data, which eval set).
    pub source: String,
    /// The measure.
    pub measure: Measure,
    /// The eval task.
    pub task_id: String,
    /// The nearest training record.
    pub record: String,
    /// Its score.
    pub score: f64,
    /// Its first characters.
    pub excerpt: String,
}

/// Splits of all observations that have a similarity artifact, plus notes on what could not
/// be split. `similarities` are the report's `similarity` inputs with their producers;
/// `baselines` maps a benchmark to its baseline variant (the answer's), whose scores on the
/// same parts each split variant is compared with.
pub fn contamination_tables(
    observations: &[Observation],
    similarities: &[(Producer, EvalSimilarity)],
    keys: &AnswerKeys,
    baselines: &BTreeMap<String, String>,
    thresholds: &ContaminationThresholds,
    opts: &StatsOptions,
) -> (Vec<ContaminationTable>, Vec<String>) {
    let mut notes = Vec::new();
    if similarities.is_empty() {
        return (Vec::new(), notes);
    }
    let mut dropped = keys.pooled.clone();
    dropped.push(keys.benchmark.clone());
    let producers: Vec<Producer> = observations.iter().map(|o| o.producer.clone()).collect();
    let names = answer_variant_names(&producers, &dropped);

    // (benchmark, similarity index) -> variant -> metric name -> (metric, seed rows).
    type Cells = BTreeMap<String, BTreeMap<String, (Metric, Vec<SeedRow>)>>;
    let mut groups: BTreeMap<(String, usize), Cells> = BTreeMap::new();
    // Every observation by benchmark, variant and metric: where the baselines' scores are.
    let mut all: BTreeMap<String, Cells> = BTreeMap::new();
    for (o, name) in observations.iter().zip(&names) {
        let bench = Some(o.producer.label(&keys.benchmark))
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| keys.default_benchmark.clone());
        let seed: Vec<String> = keys.pooled.iter().map(|k| o.producer.label(k)).collect();
        all.entry(bench.clone())
            .or_default()
            .entry(name.clone())
            .or_default()
            .entry(o.metric.name.clone())
            .or_insert_with(|| (o.metric.clone(), Vec::new()))
            .1
            .push((seed.join(","), o.scores.clone()));
        let Some(s) = similarity_of(&o.producer, &o.scores, similarities, &keys.benchmark) else {
            continue;
        };
        let (_, rows) = groups
            .entry((bench, s))
            .or_default()
            .entry(name.clone())
            .or_default()
            .entry(o.metric.name.clone())
            .or_insert_with(|| (o.metric.clone(), Vec::new()));
        rows.push((seed.join(","), o.scores.clone()));
    }

    let mut tables: Vec<ContaminationTable> = Vec::new();
    for ((bench, s), variants) in groups {
        let similarity = &similarities[s].1;
        for &measure in &similarity.measures {
            let best: BTreeMap<&str, f64> = similarity
                .tasks
                .iter()
                .filter_map(|t| Some((t.task_id.as_str(), t.under(measure)?.best)))
                .collect();
            let i = match tables
                .iter()
                .position(|t| t.benchmark == bench && t.measure == measure)
            {
                Some(i) => i,
                None => {
                    tables.push(ContaminationTable {
                        benchmark: bench.clone(),
                        measure,
                        rows: Vec::new(),
                    });
                    tables.len() - 1
                }
            };
            let baseline = baselines.get(&bench);
            for (variant, metrics) in &variants {
                for (metric, rows) in metrics.values() {
                    let scores = seeded_scores(rows);
                    let base_scores = baseline
                        .filter(|b| *b != variant)
                        .and_then(|b| Some((b, all.get(&bench)?.get(b)?.get(&metric.name)?)))
                        .map(|(b, (_, rows))| (b, seeded_scores(rows)));
                    for &threshold in thresholds.of(measure) {
                        let is_similar = |t: &str| best.get(t).is_some_and(|&b| b >= threshold);
                        let mut part = |similar: bool| {
                            let picked = subset(&scores, |t| is_similar(t) == similar);
                            let estimate = match estimate(variant, &picked, opts) {
                                Ok(e) => Some(e),
                                Err(_) if picked.tasks.is_empty() => None,
                                Err(e) => {
                                    notes.push(format!("{bench} {variant} {}: {e}", metric.name));
                                    None
                                }
                            };
                            let vs_baseline = match &base_scores {
                                Some((b, base)) if !picked.tasks.is_empty() => {
                                    let base = subset(base, |t| is_similar(t) == similar);
                                    compare(b, &base, variant, &picked, metric, opts).ok()
                                }
                                _ => None,
                            };
                            Bucket {
                                tasks: picked.tasks.len(),
                                estimate,
                                vs_baseline,
                            }
                        };
                        tables[i].rows.push(ContaminationRow {
                            variant: variant.clone(),
                            metric: metric.clone(),
                            threshold,
                            similar: part(true),
                            other: part(false),
                        });
                    }
                }
            }
        }
    }
    (tables, notes)
}

/// The tasks of `scores` that `keep` accepts.
fn subset(scores: &SeededScores, keep: impl Fn(&str) -> bool) -> SeededScores {
    let columns: Vec<usize> = (0..scores.tasks.len())
        .filter(|&j| keep(&scores.tasks[j]))
        .collect();
    SeededScores {
        tasks: columns.iter().map(|&j| scores.tasks[j].clone()).collect(),
        per_seed: scores
            .per_seed
            .iter()
            .map(|row| columns.iter().map(|&j| row[j]).collect())
            .collect(),
    }
}

/// The similarity input that describes the data behind `producer`: every matrix value of it
/// but the benchmark's is one of `producer`'s, it has all the scored tasks, and of those the
/// one with the most matrix values.
fn similarity_of(
    producer: &Producer,
    scores: &[(String, f64)],
    similarities: &[(Producer, EvalSimilarity)],
    benchmark_key: &str,
) -> Option<usize> {
    similarities
        .iter()
        .enumerate()
        .filter(|(_, (who, similarity))| {
            let data: Vec<&(String, String)> = who
                .labels
                .iter()
                .filter(|(k, _)| k != benchmark_key)
                .collect();
            !data.is_empty()
                && data.iter().all(|kv| producer.labels.contains(kv))
                && !scores.is_empty()
                && scores
                    .iter()
                    .all(|(t, _)| similarity.tasks.iter().any(|s| s.task_id == *t))
        })
        .max_by_key(|(_, (who, _))| who.labels.len())
        .map(|(i, _)| i)
}

/// The `per_measure` most similar eval tasks of each similarity input under each measure,
/// with their nearest record.
pub fn nearest_examples(
    similarities: &[(Producer, EvalSimilarity)],
    per_measure: usize,
) -> Vec<NearestExample> {
    let mut out = Vec::new();
    for (who, similarity) in similarities {
        for &measure in &similarity.measures {
            let mut tasks: Vec<_> = similarity
                .tasks
                .iter()
                .filter_map(|t| Some((t, t.under(measure)?.nearest.first()?)))
                .collect();
            tasks.sort_by(|a, b| b.1.score.total_cmp(&a.1.score));
            out.extend(
                tasks
                    .into_iter()
                    .take(per_measure)
                    .map(|(t, n)| NearestExample {
                        source: who.instance_name(),
                        measure,
                        task_id: t.task_id.clone(),
                        record: n.record.clone(),
                        score: n.score,
                        excerpt: n.excerpt.clone(),
                    }),
            );
        }
    }
    out
}

/// Heading of the report section.
pub const HEADING: &str = "Is the gain in the tasks the data resembles?";

/// What the section shows, for both renderers.
pub const INTRO: &str = "phi-1's contamination check (its Table 3): each trained variant's \
    scores on the eval tasks its own training data resembles (best similarity of any training \
    record at or above the threshold) and on the other tasks, with 95% intervals and the task \
    counts, and the gain over the baseline on each part (paired, same tasks). A gain that lives \
    only in the similar tasks points at the data resembling the test, not at better learning. Embedding cosine: MiniLM sentence embeddings of the record and the \
    task's reference code. AST match rate: the share of the task's syntax subtrees (at least 4 \
    nodes, names and constants normalized) found in the record.";

/// Column headings of a contamination table.
pub const COLUMNS: [&str; 7] = [
    "variant",
    "metric",
    "threshold",
    "similar tasks",
    "gain there",
    "other tasks",
    "gain there",
];

/// A table's caption, e.g. `HumanEval, split by AST match rate`.
pub fn caption(table: &ContaminationTable) -> String {
    format!("{}, split by {}", table.benchmark, table.measure.title())
}

/// A row's cells in [`COLUMNS`] order, as text. A gain is the variant minus the baseline on
/// the same tasks, in the metric's unit, with its interval (for bits/byte, negative is better).
pub fn cells(row: &ContaminationRow) -> [String; 7] {
    let unit = row.metric.unit;
    let bucket = |b: &Bucket| match &b.estimate {
        Some(e) => format!("{} (n={})", estimate_text(e, unit), b.tasks),
        None => format!("– (n={})", b.tasks),
    };
    let gain = |b: &Bucket| match &b.vs_baseline {
        Some(c) => format!(
            "{} [{}, {}] vs {}",
            unit.format_diff(c.diff),
            unit.format_diff(c.ci_low),
            unit.format_diff(c.ci_high),
            c.a
        ),
        None => "–".to_string(),
    };
    [
        row.variant.clone(),
        row.metric.name.clone(),
        format!("≥ {}", row.threshold),
        bucket(&row.similar),
        gain(&row.similar),
        bucket(&row.other),
        gain(&row.other),
    ]
}

/// Column headings of the nearest-records table.
pub const NEAREST_COLUMNS: [&str; 5] = ["data", "measure", "eval task", "nearest record", "score"];

/// A nearest example's cells in [`NEAREST_COLUMNS`] order (the excerpt is shown apart).
pub fn nearest_cells(e: &NearestExample) -> [String; 5] {
    [
        e.source.clone(),
        e.measure.title().to_string(),
        e.task_id.clone(),
        e.record.clone(),
        format!("{:.3}", e.score),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifacts::TaskSimilarity;
    use crate::similarity::TaskNeighbors;

    fn similarity(best: &[f64]) -> EvalSimilarity {
        EvalSimilarity {
            measures: vec![Measure::Ast],
            tasks: best
                .iter()
                .enumerate()
                .map(|(i, &b)| TaskSimilarity {
                    task_id: format!("T/{i}"),
                    embedding: None,
                    ast: Some(TaskNeighbors {
                        best: b,
                        nearest: Vec::new(),
                    }),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn observation(base: &str, labels: &[(&str, &str)], scores: &[f64]) -> Observation {
        Observation {
            producer: Producer::with_labels(base, labels),
            metric: Metric::pass_at_1(),
            scores: scores
                .iter()
                .enumerate()
                .map(|(i, &s)| (format!("T/{i}"), s))
                .collect(),
        }
    }

    #[test]
    fn a_gain_that_lives_in_the_similar_tasks_shows() {
        // The messy data resembles tasks 0-3; its model solves exactly those (both seeds).
        let sims = vec![
            (
                Producer::with_labels("similarity", &[("data", "messy"), ("bench", "humaneval")]),
                similarity(&[0.9, 0.95, 1.0, 0.85, 0.1, 0.2, 0.0, 0.3]),
            ),
            (
                Producer::with_labels(
                    "similarity",
                    &[("data", "textbook"), ("bench", "humaneval")],
                ),
                similarity(&[0.0; 8]),
            ),
        ];
        let solved = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0];
        let obs = vec![
            observation("grade-base", &[], &[0.0; 8]),
            observation("grade", &[("data", "messy"), ("seed", "1")], &solved),
            observation("grade", &[("data", "messy"), ("seed", "2")], &solved),
            observation("grade", &[("data", "textbook"), ("seed", "1")], &[0.5; 8]),
        ];
        let keys = AnswerKeys {
            benchmark: "bench".into(),
            pooled: vec!["seed".into()],
            default_benchmark: "HumanEval".into(),
        };
        let thresholds = ContaminationThresholds {
            embedding: vec![],
            ast: vec![0.8],
        };
        let opts = StatsOptions {
            bootstrap_resamples: 200,
            ..Default::default()
        };
        let baselines = BTreeMap::from([("HumanEval".to_string(), "base".to_string())]);
        let (tables, notes) =
            contamination_tables(&obs, &sims, &keys, &baselines, &thresholds, &opts);
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(tables.len(), 1);
        let t = &tables[0];
        assert_eq!(
            (t.benchmark.as_str(), t.measure),
            ("HumanEval", Measure::Ast)
        );
        let messy = t.rows.iter().find(|r| r.variant == "messy").unwrap();
        assert_eq!((messy.similar.tasks, messy.other.tasks), (4, 4));
        assert_eq!(messy.similar.estimate.as_ref().unwrap().mean, 1.0);
        assert_eq!(messy.similar.estimate.as_ref().unwrap().seeds, 2);
        assert_eq!(messy.other.estimate.as_ref().unwrap().mean, 0.0);
        // The whole gain over the base is in the similar tasks.
        let gain = messy.similar.vs_baseline.as_ref().unwrap();
        assert_eq!((gain.a.as_str(), gain.diff, gain.tasks), ("base", 1.0, 4));
        assert_eq!(messy.other.vs_baseline.as_ref().unwrap().diff, 0.0);
        let textbook = t.rows.iter().find(|r| r.variant == "textbook").unwrap();
        assert_eq!((textbook.similar.tasks, textbook.other.tasks), (0, 8));
        assert!(textbook.similar.estimate.is_none());
        assert!(
            !t.rows.iter().any(|r| r.variant == "base"),
            "an untrained model has no data to split by"
        );
    }

    #[test]
    fn nearest_examples_are_the_most_similar_tasks_first() {
        let mut s = similarity(&[0.2, 0.9, 0.5]);
        for (i, t) in s.tasks.iter_mut().enumerate() {
            let n = t.ast.as_mut().unwrap();
            n.nearest.push(crate::similarity::Neighbor {
                record: format!("r{i}"),
                score: n.best,
                excerpt: String::new(),
            });
        }
        let ex = nearest_examples(&[(Producer::plain("similarity"), s)], 2);
        let ids: Vec<&str> = ex.iter().map(|e| e.task_id.as_str()).collect();
        assert_eq!(ids, ["T/1", "T/2"]);
    }
}
