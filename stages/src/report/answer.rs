//! The answer: per benchmark, one table of variants (each metric's pooled mean with its
//! confidence interval) and the verdicts, in plain words, against the baseline and between the
//! other variants. It leads the report and is what `pipeline run` prints at the end.
//!
//! Inputs arrive as [`Observation`]s: one metric's per-task scores from one producing
//! instance. What the instance's matrix values say decides where a score goes: the benchmark
//! key (`bench = "humaneval"`) picks the table, pooled keys (`seed = 1`) are training seeds
//! whose scores a variant pools (mean over seeds; its interval resamples tasks and seeds), and
//! the rest name the variant together with the producing table ([`answer_variant_names`]).

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::variants::Producer;
use crate::stats::{
    compare, estimate, Comparison, Direction, Estimate, Metric, SeededScores, StatsOptions, Unit,
};

/// One metric's per-task scores from one producing instance.
#[derive(Debug, Clone)]
pub struct Observation {
    /// What produced them.
    pub producer: Producer,
    /// The metric.
    pub metric: Metric,
    /// `(task id, score)` in task order.
    pub scores: Vec<(String, f64)>,
}

/// Which matrix keys mean what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerKeys {
    /// The matrix key whose value names the benchmark.
    pub benchmark: String,
    /// Matrix keys pooled within a variant (training seeds).
    pub pooled: Vec<String>,
    /// The benchmark's name when no matrix value names it.
    pub default_benchmark: String,
}

/// The whole answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Answer {
    /// One table per benchmark.
    pub benchmarks: Vec<BenchmarkAnswer>,
    /// What could not be placed or compared.
    pub notes: Vec<String>,
}

/// One benchmark's table and verdicts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BenchmarkAnswer {
    /// Benchmark name (the benchmark key's value; empty without one).
    pub benchmark: String,
    /// The columns.
    pub metrics: Vec<Metric>,
    /// The baseline variant the others are compared with.
    pub baseline: String,
    /// One row per variant.
    pub rows: Vec<AnswerRow>,
    /// Per metric: every variant against the baseline, then every other pair.
    pub comparisons: Vec<Comparison>,
}

/// One variant's row.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AnswerRow {
    /// Variant name.
    pub variant: String,
    /// Per metric (in [`BenchmarkAnswer::metrics`] order), the pooled estimate if measured.
    pub cells: Vec<Option<Estimate>>,
}

impl AnswerRow {
    /// Training seeds behind the row: the most any of its metrics pooled.
    pub fn seeds(&self) -> usize {
        self.cells
            .iter()
            .flatten()
            .map(|e| e.seeds)
            .max()
            .unwrap_or(0)
    }
}

/// Names the variants of `producers` for the answer: matrix values under `dropped` keys are
/// left out (the benchmark, seeds), and so are the words of each table name that say what
/// stage it is rather than which variant: the first word (the manifests name tables
/// `KIND-VARIANT`: `likelihood-textbook`, `grade-base`), then every further leading word that
/// another table's name shares up to there (`greedy` of `grade-greedy-base` when
/// `grade-greedy-textbook` exists). What is left, joined with the remaining matrix values, is
/// the variant: `grade-greedy-base` -> `base`, `grade-greedy` + `data = messy` -> `messy`,
/// `likelihood` + `data = messy` -> `messy`; so one row gathers a variant's scores from
/// stages of different kinds. With a single table, its name is the variant.
pub fn answer_variant_names(producers: &[Producer], dropped: &[String]) -> Vec<String> {
    let mut tables: Vec<&str> = producers.iter().map(|p| p.base.as_str()).collect();
    tables.sort_unstable();
    tables.dedup();
    let split: Vec<Vec<&str>> = tables.iter().map(|t| t.split('-').collect()).collect();
    let shared_by_others = |words: &[&str], upto: usize| {
        split
            .iter()
            .filter(|w| w.len() >= upto && w[..upto] == words[..upto])
            .count()
            > 1
    };
    producers
        .iter()
        .map(|p| {
            let words: Vec<&str> = p.base.split('-').collect();
            let mut strip = usize::from(tables.len() > 1);
            while strip < words.len() && shared_by_others(&words, strip + 1) {
                strip += 1;
            }
            let own = words[strip.min(words.len())..].join("-");
            let name = std::iter::once(own.as_str())
                .chain(
                    p.labels
                        .iter()
                        .filter(|(k, _)| !dropped.contains(k))
                        .map(|(_, v)| v.as_str()),
                )
                .filter(|part| !part.is_empty())
                .collect::<Vec<_>>()
                .join(",");
            if name.is_empty() {
                p.base.clone()
            } else {
                name
            }
        })
        .collect()
}

/// One seed's per-task scores: the seed's matrix values, and `(task, score)`.
pub(crate) type SeedRow = (String, Vec<(String, f64)>);

/// One benchmark's observations while the answer is built.
#[derive(Default)]
struct Table {
    /// Variants in first-seen order.
    variants: Vec<String>,
    /// Metrics in first-seen order.
    metrics: Vec<Metric>,
    /// variant -> metric name -> seed rows.
    cells: BTreeMap<String, BTreeMap<String, Vec<SeedRow>>>,
}

/// Builds the answer from `observations`. `baseline` names the baseline variant, directly
/// (`base`) or through a stage that produced it (`grade-base`, `grade-base@humaneval`);
/// default: a variant named `base` if there is one, else the first.
pub fn build_answer(
    observations: &[Observation],
    keys: &AnswerKeys,
    baseline: Option<&str>,
    opts: &StatsOptions,
) -> Answer {
    let mut dropped = keys.pooled.clone();
    dropped.push(keys.benchmark.clone());
    let producers: Vec<Producer> = observations.iter().map(|o| o.producer.clone()).collect();
    let names = answer_variant_names(&producers, &dropped);
    let baseline: Option<String> = baseline.map(|b| {
        producers
            .iter()
            .zip(&names)
            .find(|(who, _)| who.instance_name() == b || who.base == b)
            .map_or_else(|| b.to_string(), |(_, name)| name.clone())
    });

    let mut tables: BTreeMap<String, Table> = BTreeMap::new();
    let mut answer = Answer::default();
    for (o, name) in observations.iter().zip(&names) {
        // An instance without the benchmark key (a stage that took one benchmark's instance,
        // `evals@humaneval`) belongs to the default benchmark's table.
        let bench = Some(o.producer.label(&keys.benchmark))
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| keys.default_benchmark.clone());
        let seed: Vec<String> = keys.pooled.iter().map(|k| o.producer.label(k)).collect();
        let Table {
            variants,
            metrics,
            cells,
        } = tables.entry(bench).or_default();
        if !variants.contains(name) {
            variants.push(name.clone());
        }
        if !metrics.iter().any(|m| m.name == o.metric.name) {
            metrics.push(o.metric.clone());
        }
        let rows = cells
            .entry(name.clone())
            .or_default()
            .entry(o.metric.name.clone())
            .or_default();
        let seed = seed.join(",");
        if rows.iter().any(|(s, _)| *s == seed) {
            answer.notes.push(format!(
                "{}: a second `{}` score for variant `{name}`{} is left out",
                o.producer.instance_name(),
                o.metric.name,
                if seed.is_empty() {
                    String::new()
                } else {
                    format!(" (seed {seed})")
                }
            ));
            continue;
        }
        rows.push((seed, o.scores.clone()));
    }

    for (
        bench,
        Table {
            variants,
            metrics,
            cells,
        },
    ) in tables
    {
        let baseline = baseline
            .as_ref()
            .filter(|b| variants.contains(b))
            .cloned()
            .or_else(|| variants.iter().find(|v| *v == "base").cloned())
            .unwrap_or_else(|| variants[0].clone());
        let mut ordered = vec![baseline.clone()];
        ordered.extend(variants.iter().filter(|v| **v != baseline).cloned());
        let seeded = |variant: &str, metric: &str| -> Option<SeededScores> {
            let rows = cells.get(variant)?.get(metric)?;
            Some(seeded_scores(rows))
        };
        let mut table = BenchmarkAnswer {
            benchmark: bench.clone(),
            metrics: metrics.clone(),
            baseline: baseline.clone(),
            ..Default::default()
        };
        for variant in &ordered {
            let mut row = AnswerRow {
                variant: variant.clone(),
                cells: Vec::new(),
            };
            for m in &metrics {
                let cell =
                    seeded(variant, &m.name).and_then(|s| match estimate(variant, &s, opts) {
                        Ok(e) => Some(e),
                        Err(e) => {
                            answer
                                .notes
                                .push(format!("{bench} {variant} {}: {e}", m.name));
                            None
                        }
                    });
                row.cells.push(cell);
            }
            table.rows.push(row);
        }
        for m in &metrics {
            for (i, a) in ordered.iter().enumerate() {
                for b in &ordered[i + 1..] {
                    let (Some(sa), Some(sb)) = (seeded(a, &m.name), seeded(b, &m.name)) else {
                        continue;
                    };
                    match compare(a, &sa, b, &sb, m, opts) {
                        Ok(c) => table.comparisons.push(c),
                        Err(e) => answer
                            .notes
                            .push(format!("{bench}: {b} vs {a} on {}: {e}", m.name)),
                    }
                }
            }
        }
        answer.benchmarks.push(table);
    }
    answer
}

/// Seed rows as [`SeededScores`] over the tasks every seed scored, in the first seed's order.
pub(crate) fn seeded_scores(rows: &[SeedRow]) -> SeededScores {
    let maps: Vec<BTreeMap<&str, f64>> = rows
        .iter()
        .map(|(_, s)| s.iter().map(|(t, v)| (t.as_str(), *v)).collect())
        .collect();
    let tasks: Vec<String> = rows
        .first()
        .map(|(_, s)| {
            s.iter()
                .filter(|(t, _)| maps.iter().all(|m| m.contains_key(t.as_str())))
                .map(|(t, _)| t.clone())
                .collect()
        })
        .unwrap_or_default();
    let per_seed = maps
        .iter()
        .map(|m| tasks.iter().map(|t| m[t.as_str()]).collect())
        .collect();
    SeededScores { tasks, per_seed }
}

/// A value in `unit`: `0.612` (bits per byte) or `4.3%` (a fraction).
pub fn value_text(x: f64, unit: Unit) -> String {
    match unit {
        Unit::BitsPerByte => format!("{x:.3}"),
        Unit::Fraction => format!("{:.1}%", 100.0 * x),
    }
}

/// A value with its interval, e.g. `0.612 [0.590, 0.634]` or `4.3% [1.8%, 7.3%]`.
pub fn estimate_text(e: &Estimate, unit: Unit) -> String {
    format!(
        "{} [{}, {}]",
        value_text(e.mean, unit),
        value_text(e.ci_low, unit),
        value_text(e.ci_high, unit)
    )
}

/// Column header of metric `j` of `table`: its name, which way is better, and on how many
/// tasks it was measured.
pub fn metric_header(table: &BenchmarkAnswer, j: usize) -> String {
    let Some(m) = table.metrics.get(j) else {
        return String::new();
    };
    let tasks = table
        .rows
        .iter()
        .filter_map(|r| r.cells.get(j).and_then(Option::as_ref))
        .map(|e| e.tasks)
        .max()
        .unwrap_or(0);
    let better = match m.direction {
        Direction::LowerIsBetter => "lower is better",
        Direction::HigherIsBetter => "higher is better",
    };
    format!("{} ({better}; {tasks} tasks)", m.name)
}

/// The answer as plain text: per benchmark an aligned table, then the verdicts.
pub fn render_answer_text(answer: &Answer) -> String {
    let mut out = String::new();
    for table in &answer.benchmarks {
        let _ = writeln!(
            out,
            "{} (95% confidence intervals over tasks and seeds in brackets)",
            table.benchmark
        );
        let mut grid: Vec<Vec<String>> = vec![std::iter::once("variant".to_string())
            .chain((0..table.metrics.len()).map(|j| metric_header(table, j)))
            .chain(std::iter::once("seeds".to_string()))
            .collect()];
        for row in &table.rows {
            let seeds = row.seeds();
            grid.push(
                std::iter::once(row.variant.clone())
                    .chain(row.cells.iter().zip(&table.metrics).map(|(c, m)| match c {
                        Some(e) => estimate_text(e, m.unit),
                        None => "-".to_string(),
                    }))
                    .chain(std::iter::once(seeds.to_string()))
                    .collect(),
            );
        }
        let widths: Vec<usize> = (0..grid[0].len())
            .map(|j| grid.iter().map(|r| r[j].chars().count()).max().unwrap_or(0))
            .collect();
        for r in &grid {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            let _ = writeln!(out, "  {}", line.join("  ").trim_end());
        }
        for c in &table.comparisons {
            let _ = writeln!(out, "  - {}", c.sentence);
        }
        out.push('\n');
    }
    for note in &answer.notes {
        let _ = writeln!(out, "note: {note}");
    }
    out
}
