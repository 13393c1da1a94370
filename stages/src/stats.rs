//! Statistics over what an experiment varies: evaluation tasks and training seeds.
//!
//! A variant's scores form a seeds × tasks table ([`SeededScores`]); both dimensions are
//! samples, so both are resampled. [`estimate`] pools a variant into its mean over seeds and
//! tasks with a two-level percentile bootstrap CI (tasks and, independently, seeds drawn with
//! replacement). [`compare`] compares B against A on their shared tasks: per task
//! `d_t = mean_s B[s][t] - mean_s A[s][t]`, the statistic `mean_t d_t`, a bootstrap CI over
//! tasks (pairs kept together) and each side's seeds, and a two-sided paired sign-flip test
//! on the `d_t` ([`sign_flip_p`]: exact up to 16 non-zero differences, else Monte Carlo).
//! The test sees seed noise only through the per-task means; with few seeds the CI is the
//! better guide to it. Conventions follow [`crate::grade::stats`]: a seeded `StdRng`, so
//! reports are reproducible, and `Better` / `Worse` only when the test and the CI agree.

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::grade::stats::{format_p, quantile, sign_flip_p};

/// Differences within this of zero are ties (and count as zero in the sign-flip test).
const TIE: f64 = 1e-12;

/// Whether lower or higher values of a metric are better (bits per byte: lower; pass@1:
/// higher).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Lower is better (losses, bits per byte).
    LowerIsBetter,
    /// Higher is better (pass rates).
    HigherIsBetter,
}

impl Direction {
    /// A difference `B - A` signed so that positive means B is better.
    fn gain(self, d: f64) -> f64 {
        match self {
            Direction::LowerIsBetter => -d,
            Direction::HigherIsBetter => d,
        }
    }
}

/// How a metric's values are written in sentences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Bits per byte: three decimals.
    BitsPerByte,
    /// A fraction in [0, 1] such as pass@1: percentage points, one decimal.
    Fraction,
}

impl Unit {
    /// A signed difference with its unit, e.g. `−0.031` or `+0.6 pp`.
    pub fn format_diff(self, x: f64) -> String {
        match self {
            Unit::BitsPerByte => self.signed(x),
            Unit::Fraction => format!("{} pp", self.signed(x)),
        }
    }

    /// A signed number in this unit's scale, without the unit; never `−0.000`.
    fn signed(self, x: f64) -> String {
        let (v, decimals) = match self {
            Unit::BitsPerByte => (x, 3),
            Unit::Fraction => (100.0 * x, 1),
        };
        let digits = format!("{:.*}", decimals, v.abs());
        let sign = if v < 0.0 && digits.bytes().any(|c| matches!(c, b'1'..=b'9')) {
            '−'
        } else {
            '+'
        };
        format!("{sign}{digits}")
    }
}

/// A metric: its name in sentences, which way is better, and how to write its values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metric {
    /// Name in sentences, e.g. `bits/byte`.
    pub name: String,
    /// Which way is better.
    pub direction: Direction,
    /// How values are written.
    pub unit: Unit,
}

impl Metric {
    /// Bits per byte: lower is better, three decimals.
    pub fn bits_per_byte() -> Self {
        Self {
            name: "bits/byte".to_string(),
            direction: Direction::LowerIsBetter,
            unit: Unit::BitsPerByte,
        }
    }

    /// Bits per byte with the problems framed in a training template instead of the
    /// benchmark's prompt (`bits/byte (instruction template)`): its own metric, never pooled
    /// or compared with the benchmark-framed one or another template's.
    pub fn bits_per_byte_in_template(template: &str) -> Self {
        Self {
            name: format!("bits/byte ({template} template)"),
            ..Self::bits_per_byte()
        }
    }

    /// pass@1: higher is better, in percentage points.
    pub fn pass_at_1() -> Self {
        Self {
            name: "pass@1".to_string(),
            direction: Direction::HigherIsBetter,
            unit: Unit::Fraction,
        }
    }
}

/// One variant's per-task scores: `per_seed[s][t]` is the score of training seed `s` on
/// task `tasks[t]` (a variant without seeds, e.g. the base model, has one row).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeededScores {
    /// Task ids, unique; they align the columns of `per_seed`.
    pub tasks: Vec<String>,
    /// One row per seed, one score per task.
    pub per_seed: Vec<Vec<f64>>,
}

/// Options for [`estimate`] and [`compare`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatsOptions {
    /// Bootstrap resamples.
    pub bootstrap_resamples: usize,
    /// Monte Carlo sign-flip resamples (when exact enumeration is too large).
    pub permutation_resamples: usize,
    /// Confidence level of the intervals, e.g. 0.95.
    pub confidence: f64,
    /// Significance level for the verdict.
    pub alpha: f64,
    /// RNG seed, so reports are reproducible.
    pub seed: u64,
}

impl Default for StatsOptions {
    fn default() -> Self {
        Self {
            bootstrap_resamples: 10_000,
            permutation_resamples: 10_000,
            confidence: 0.95,
            alpha: 0.05,
            seed: 0,
        }
    }
}

impl StatsOptions {
    fn validate(&self) -> Result<(), StatsError> {
        let unit = |x: f64| x > 0.0 && x < 1.0;
        if unit(self.confidence)
            && unit(self.alpha)
            && self.bootstrap_resamples > 0
            && self.permutation_resamples > 0
        {
            Ok(())
        } else {
            Err(StatsError::Options(format!("{self:?}")))
        }
    }
}

/// A pooled estimate: the mean over seeds and tasks, with a two-level bootstrap CI
/// (tasks and, independently, seeds resampled), plus per-seed means.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// Mean over seeds of the per-seed mean over tasks.
    pub mean: f64,
    /// Lower end of the bootstrap confidence interval of `mean`.
    pub ci_low: f64,
    /// Upper end of the bootstrap confidence interval of `mean`.
    pub ci_high: f64,
    /// Confidence level of the interval.
    pub confidence: f64,
    /// Number of tasks.
    pub tasks: usize,
    /// Number of seeds.
    pub seeds: usize,
    /// Mean over tasks of each seed, in `per_seed` order.
    pub per_seed_means: Vec<f64>,
}

/// The outcome for B relative to A, in the metric's direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// B is better: p < alpha and the CI excludes 0.
    Better,
    /// B is worse: p < alpha and the CI excludes 0.
    Worse,
    /// Neither the test nor the CI finds a difference.
    NoDifference,
    /// The test and the CI disagree; treat as within noise.
    Borderline,
}

/// Paired comparison of variant B against variant A on their shared tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Name of the baseline variant.
    pub a: String,
    /// Name of the compared variant.
    pub b: String,
    /// The metric compared.
    pub metric: Metric,
    /// Tasks present in both.
    pub tasks: usize,
    /// Tasks only one variant had (ignored).
    pub unmatched_tasks: usize,
    /// Seeds of A.
    pub seeds_a: usize,
    /// Seeds of B.
    pub seeds_b: usize,
    /// Mean of A over the shared tasks (and its seeds).
    pub mean_a: f64,
    /// Mean of B over the shared tasks (and its seeds).
    pub mean_b: f64,
    /// `mean_b - mean_a`.
    pub diff: f64,
    /// Lower end of the bootstrap confidence interval of `diff`.
    pub ci_low: f64,
    /// Upper end of the bootstrap confidence interval of `diff`.
    pub ci_high: f64,
    /// Confidence level of the interval.
    pub confidence: f64,
    /// Two-sided sign-flip permutation p-value.
    pub p_value: f64,
    /// Tasks where B is better, in the metric's direction.
    pub wins: usize,
    /// Tasks where B is worse.
    pub losses: usize,
    /// Tasks where they are equal (within 1e-12).
    pub ties: usize,
    /// The outcome for B.
    pub verdict: Verdict,
    /// One plain sentence: who is better, by how much, and whether it is within noise.
    pub sentence: String,
}

/// Errors of [`estimate`] and [`compare`].
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum StatsError {
    /// The variants share no task id.
    #[error("variants {a:?} and {b:?} have no task in common")]
    #[diagnostic(help("evaluate both variants on the same tasks (task ids must match)"))]
    NoSharedTasks {
        /// Baseline name.
        a: String,
        /// Other name.
        b: String,
    },
    /// A variant has no tasks or no seed rows.
    #[error("variant {variant:?} has no {what}")]
    #[diagnostic(help("give one task id per column and one row of scores per seed (one row for a variant without seeds)"))]
    Empty {
        /// Variant name.
        variant: String,
        /// `tasks` or `seeds`.
        what: &'static str,
    },
    /// A seed's row does not have one score per task.
    #[error("variant {variant:?}: seed {seed} has {len} scores for {tasks} tasks")]
    #[diagnostic(help("each seed's row needs one score per task, in the order of `tasks`"))]
    Ragged {
        /// Variant name.
        variant: String,
        /// Row index in `per_seed`.
        seed: usize,
        /// Scores in that row.
        len: usize,
        /// Number of tasks.
        tasks: usize,
    },
    /// A task id appears twice in one variant.
    #[error("variant {variant:?} lists task {task:?} twice")]
    #[diagnostic(help("task ids must be unique within a variant"))]
    DuplicateTask {
        /// Variant name.
        variant: String,
        /// The repeated task id.
        task: String,
    },
    /// A score is NaN or infinite.
    #[error("variant {variant:?}, seed {seed}, task {task:?}: score {value} is not finite")]
    #[diagnostic(help(
        "a NaN or infinite score usually comes from an empty or failed evaluation; fix it or drop the task"
    ))]
    NonFinite {
        /// Variant name.
        variant: String,
        /// Row index in `per_seed`.
        seed: usize,
        /// Task id.
        task: String,
        /// The score.
        value: f64,
    },
    /// Options out of range.
    #[error("invalid statistics option: {0}")]
    #[diagnostic(help("confidence and alpha must lie in (0, 1); resamples must be > 0"))]
    Options(String),
}

fn validate(name: &str, s: &SeededScores) -> Result<(), StatsError> {
    let variant = name.to_string();
    if s.tasks.is_empty() || s.per_seed.is_empty() {
        let what = if s.tasks.is_empty() { "tasks" } else { "seeds" };
        return Err(StatsError::Empty { variant, what });
    }
    let mut seen = HashSet::new();
    if let Some(task) = s.tasks.iter().find(|t| !seen.insert(t.as_str())) {
        let task = task.clone();
        return Err(StatsError::DuplicateTask { variant, task });
    }
    for (seed, row) in s.per_seed.iter().enumerate() {
        let (len, tasks) = (row.len(), s.tasks.len());
        if len != tasks {
            return Err(StatsError::Ragged {
                variant,
                seed,
                len,
                tasks,
            });
        }
        if let Some((t, &value)) = row.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            let task = s.tasks[t].clone();
            return Err(StatsError::NonFinite {
                variant,
                seed,
                task,
                value,
            });
        }
    }
    Ok(())
}

/// Pools `scores` of variant `name` into one mean with a two-level bootstrap CI.
pub fn estimate(
    name: &str,
    scores: &SeededScores,
    opts: &StatsOptions,
) -> Result<Estimate, StatsError> {
    opts.validate()?;
    validate(name, scores)?;
    let rows = &scores.per_seed;
    let (m, s) = (scores.tasks.len(), rows.len());
    let per_seed_means: Vec<f64> = rows
        .iter()
        .map(|r| r.iter().sum::<f64>() / m as f64)
        .collect();
    let mean = per_seed_means.iter().sum::<f64>() / s as f64;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let (mut tasks_drawn, mut seeds_drawn) = (vec![0; m], vec![0; s]);
    let boot = (0..opts.bootstrap_resamples)
        .map(|_| {
            draw(&mut rng, &mut tasks_drawn);
            draw(&mut rng, &mut seeds_drawn);
            let seed_mean = |&j: &usize| tasks_drawn.iter().map(|&t| rows[j][t]).sum::<f64>();
            seeds_drawn
                .iter()
                .map(|j| seed_mean(j) / m as f64)
                .sum::<f64>()
                / s as f64
        })
        .collect();
    let (ci_low, ci_high) = percentile_ci(boot, opts.confidence);
    Ok(Estimate {
        mean,
        ci_low,
        ci_high,
        confidence: opts.confidence,
        tasks: m,
        seeds: s,
        per_seed_means,
    })
}

/// Compares variant `b` against variant `a` on their shared tasks (see the module docs).
pub fn compare(
    a_name: &str,
    a: &SeededScores,
    b_name: &str,
    b: &SeededScores,
    metric: &Metric,
    opts: &StatsOptions,
) -> Result<Comparison, StatsError> {
    opts.validate()?;
    validate(a_name, a)?;
    validate(b_name, b)?;
    let b_index: HashMap<&str, usize> = b
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let pairs: Vec<(usize, usize)> = (a.tasks.iter().enumerate())
        .filter_map(|(i, t)| b_index.get(t.as_str()).map(|&j| (i, j)))
        .collect();
    if pairs.is_empty() {
        let (a, b) = (a_name.to_string(), b_name.to_string());
        return Err(StatsError::NoSharedTasks { a, b });
    }
    let m = pairs.len();
    let unmatched_tasks = a.tasks.len() + b.tasks.len() - 2 * m;
    // Seeds × shared-tasks tables, columns in the order of `pairs`.
    let align = |s: &SeededScores, col: fn(&(usize, usize)) -> usize| -> Vec<Vec<f64>> {
        let row = |r: &Vec<f64>| pairs.iter().map(|p| r[col(p)]).collect();
        s.per_seed.iter().map(row).collect()
    };
    let (ta, tb) = (align(a, |p| p.0), align(b, |p| p.1));
    let seed_mean = |rows: &[Vec<f64>], seeds: &[usize], t: usize| {
        seeds.iter().map(|&s| rows[s][t]).sum::<f64>() / seeds.len() as f64
    };
    let (all_a, all_b): (Vec<usize>, Vec<usize>) =
        ((0..ta.len()).collect(), (0..tb.len()).collect());
    let task_a: Vec<f64> = (0..m).map(|t| seed_mean(&ta, &all_a, t)).collect();
    let task_b: Vec<f64> = (0..m).map(|t| seed_mean(&tb, &all_b, t)).collect();
    let diffs: Vec<f64> = task_b.iter().zip(&task_a).map(|(y, x)| y - x).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / m as f64;
    let (mean_a, mean_b, diff) = (mean(&task_a), mean(&task_b), mean(&diffs));

    let mut rng = StdRng::seed_from_u64(opts.seed);
    let (mut tasks_drawn, mut sa, mut sb) = (vec![0; m], vec![0; ta.len()], vec![0; tb.len()]);
    let boot = (0..opts.bootstrap_resamples)
        .map(|_| {
            draw(&mut rng, &mut tasks_drawn);
            draw(&mut rng, &mut sa);
            draw(&mut rng, &mut sb);
            let d = |&t: &usize| seed_mean(&tb, &sb, t) - seed_mean(&ta, &sa, t);
            tasks_drawn.iter().map(d).sum::<f64>() / m as f64
        })
        .collect();
    let (ci_low, ci_high) = percentile_ci(boot, opts.confidence);
    let zeroed: Vec<f64> = (diffs.iter())
        .map(|&d| if d.abs() <= TIE { 0.0 } else { d })
        .collect();
    let p_value = sign_flip_p(&zeroed, opts.permutation_resamples, &mut rng);

    let dir = metric.direction;
    let gains = || diffs.iter().map(|&d| dir.gain(d));
    let wins = gains().filter(|&g| g > TIE).count();
    let losses = gains().filter(|&g| g < -TIE).count();
    let verdict = match (p_value < opts.alpha, ci_low > 0.0 || ci_high < 0.0) {
        // The interval excludes 0, so both ends have the sign of the difference.
        (true, true) if dir.gain(ci_low + ci_high) > 0.0 => Verdict::Better,
        (true, true) => Verdict::Worse,
        (false, false) => Verdict::NoDifference,
        _ => Verdict::Borderline,
    };
    let seeds = match (ta.len(), tb.len()) {
        (1, 1) => String::new(),
        (x, y) if x == y => format!(", {x} seeds each"),
        (x, 1) => format!(", 1 seed vs {x}"),
        (x, y) => format!(", {y} seeds vs {x}"),
    };
    let u = metric.unit;
    let numbers = format!(
        "{} ({}% CI [{}, {}], p {}, {m} tasks{seeds})",
        u.format_diff(diff),
        (100.0 * opts.confidence).round(),
        u.signed(ci_low),
        u.signed(ci_high),
        format_p(p_value)
    );
    let (name, alpha) = (&metric.name, opts.alpha);
    let better = match dir {
        Direction::LowerIsBetter => "lower is better",
        Direction::HigherIsBetter => "higher is better",
    };
    let sentence = match verdict {
        Verdict::Better => format!("{b_name} beats {a_name} on {name}: {numbers}; {better}."),
        Verdict::Worse => format!("{b_name} is worse than {a_name} on {name}: {numbers}; {better}."),
        Verdict::NoDifference => format!(
            "No detectable difference between {a_name} and {b_name} on {name}: {b_name} − {a_name} = {numbers}."
        ),
        Verdict::Borderline => format!(
            "Borderline difference between {a_name} and {b_name} on {name}, treat as within noise: {b_name} − {a_name} = {numbers}; the interval and the test disagree at α = {alpha}."
        ),
    };
    Ok(Comparison {
        a: a_name.to_string(),
        b: b_name.to_string(),
        metric: metric.clone(),
        tasks: m,
        unmatched_tasks,
        seeds_a: ta.len(),
        seeds_b: tb.len(),
        mean_a,
        mean_b,
        diff,
        ci_low,
        ci_high,
        confidence: opts.confidence,
        p_value,
        wins,
        losses,
        ties: m - wins - losses,
        verdict,
        sentence,
    })
}

/// Fills `into` with indices drawn uniformly with replacement from `0..into.len()`.
fn draw(rng: &mut StdRng, into: &mut [usize]) {
    let n = into.len();
    for x in into.iter_mut() {
        *x = rng.random_range(0..n);
    }
}

/// Percentile interval of bootstrap statistics (`boot` must be non-empty).
fn percentile_ci(mut boot: Vec<f64>, confidence: f64) -> (f64, f64) {
    boot.sort_by(f64::total_cmp);
    let tail = (1.0 - confidence) / 2.0;
    (quantile(&boot, tail), quantile(&boot, 1.0 - tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(per_seed: Vec<Vec<f64>>) -> SeededScores {
        let m = per_seed.first().map_or(0, Vec::len);
        let tasks = (0..m).map(|t| format!("t{t}")).collect();
        SeededScores { tasks, per_seed }
    }

    /// `m` values `base + U(-scale, scale)`, seeded.
    fn noisy(m: usize, seed: u64, base: f64, scale: f64) -> Vec<f64> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..m)
            .map(|_| base + rng.random_range(-scale..scale))
            .collect()
    }

    fn est(s: &SeededScores) -> Estimate {
        estimate("v", s, &StatsOptions::default()).unwrap()
    }

    fn cmp(a: &SeededScores, b: &SeededScores, metric: Metric) -> Comparison {
        compare("base", a, "textbook", b, &metric, &StatsOptions::default()).unwrap()
    }

    #[test]
    fn constant_has_zero_width_ci() {
        let e = est(&scores(vec![vec![0.7; 20]; 3]));
        assert!((e.mean - 0.7).abs() < 1e-12, "{e:?}");
        assert_eq!(
            (e.ci_low, e.ci_high, e.tasks, e.seeds),
            (e.mean, e.mean, 20, 3)
        );
    }

    #[test]
    fn per_seed_means_and_pooled_mean() {
        let e = est(&scores(vec![vec![1.0, 2.0, 3.0], vec![3.0, 4.0, 5.0]]));
        assert_eq!((e.per_seed_means, e.mean), (vec![2.0, 4.0], 3.0));
    }

    #[test]
    fn ci_contains_mean_and_widens_with_seed_spread() {
        let x = noisy(40, 1, 1.0, 0.2);
        let one = est(&scores(vec![x.clone()]));
        let shift = |k: f64| x.iter().map(|v| v + k).collect::<Vec<f64>>();
        let two = est(&scores(vec![shift(0.1), shift(-0.1)]));
        assert!((one.mean - two.mean).abs() < 1e-12);
        for e in [&one, &two] {
            assert!(e.ci_low < e.mean && e.mean < e.ci_high, "{e:?}");
        }
        let width = |e: &Estimate| e.ci_high - e.ci_low;
        assert!(width(&two) > 1.5 * width(&one), "{one:?} {two:?}");
    }

    #[test]
    fn clear_shift_is_detected_in_the_metric_direction() {
        let a = noisy(50, 2, 1.0, 0.3);
        let shifted = |seed| {
            let e = noisy(50, seed, -0.1, 0.02);
            a.iter().zip(e).map(|(x, e)| x + e).collect::<Vec<f64>>()
        };
        let (a, b) = (
            scores(vec![a.clone()]),
            scores(vec![shifted(3), shifted(4)]),
        );
        let r = cmp(&a, &b, Metric::bits_per_byte());
        assert_eq!(r.verdict, Verdict::Better, "{r:?}");
        assert!(
            r.p_value < 0.01 && r.ci_high < 0.0 && (r.diff + 0.1).abs() < 0.02,
            "{r:?}"
        );
        assert_eq!(
            (r.wins, r.losses, r.ties, r.seeds_a, r.seeds_b),
            (50, 0, 0, 1, 2)
        );
        let s = &r.sentence;
        assert!(
            s.starts_with("textbook beats base on bits/byte: −0.0"),
            "{s}"
        );
        assert!(
            s.ends_with("p < 0.001, 50 tasks, 2 seeds vs 1); lower is better."),
            "{s}"
        );

        let higher = Metric {
            direction: Direction::HigherIsBetter,
            ..Metric::bits_per_byte()
        };
        let r = cmp(&a, &b, higher);
        assert_eq!((r.verdict, r.wins, r.losses), (Verdict::Worse, 0, 50));
        assert!(
            r.sentence.starts_with("textbook is worse than base"),
            "{}",
            r.sentence
        );
    }

    #[test]
    fn identical_variants_show_no_difference() {
        let v = scores(vec![noisy(30, 5, 0.5, 0.3), noisy(30, 6, 0.5, 0.3)]);
        let r = cmp(&v, &v, Metric::pass_at_1());
        let got = (r.verdict, r.p_value, r.diff, r.ties);
        assert_eq!(got, (Verdict::NoDifference, 1.0, 0.0, 30));
        assert!(r.ci_low <= 0.0 && r.ci_high >= 0.0, "{r:?}");
        let s = &r.sentence;
        let start = "No detectable difference between base and textbook on pass@1: textbook − base = +0.0 pp (95% CI [";
        assert!(
            s.starts_with(start) && s.ends_with("p = 1.000, 30 tasks, 2 seeds each)."),
            "{s}"
        );
    }

    #[test]
    fn exact_sign_flip_on_three_tasks() {
        // Diffs [1, 2, 3]: of the 8 sign patterns only all-plus and all-minus reach |6|.
        let r = cmp(
            &scores(vec![vec![0.0; 3]]),
            &scores(vec![vec![1.0, 2.0, 3.0]]),
            Metric::bits_per_byte(),
        );
        assert!((r.p_value - 0.25).abs() < 1e-12 && r.diff == 2.0, "{r:?}");
        // Every bootstrap mean lies in [1, 3]: the CI excludes 0, the test does not.
        assert!(r.ci_low >= 1.0 && r.ci_high <= 3.0, "{r:?}");
        assert_eq!((r.verdict, r.losses), (Verdict::Borderline, 3));
        assert!(
            r.sentence.starts_with("Borderline difference"),
            "{}",
            r.sentence
        );
    }

    #[test]
    fn tasks_matched_by_id_and_unmatched_counted() {
        let v = |ids: &[&str], row: Vec<f64>| SeededScores {
            tasks: ids.iter().map(|s| s.to_string()).collect(),
            per_seed: vec![row],
        };
        let a = v(&["x", "y", "z", "w"], vec![1.0, 2.0, 3.0, 4.0]);
        let b = v(&["q", "z", "y"], vec![9.0, 3.5, 2.5]);
        let r = cmp(&a, &b, Metric::bits_per_byte());
        assert_eq!((r.tasks, r.unmatched_tasks), (2, 3));
        assert_eq!((r.mean_a, r.mean_b, r.diff), (2.5, 3.0, 0.5));
    }

    #[test]
    fn bad_input_is_rejected_and_named() {
        let opts = StatsOptions::default();
        let err = |s: &SeededScores| estimate("textbook", s, &opts).unwrap_err();
        let mut nan = scores(vec![vec![1.0; 5], vec![1.0; 5]]);
        nan.per_seed[1][3] = f64::NAN;
        let msg = err(&nan).to_string();
        assert!(matches!(err(&nan), StatsError::NonFinite { seed: 1, task, .. } if task == "t3"));
        assert!(msg.contains("\"textbook\", seed 1, task \"t3\""), "{msg}");
        let ok = scores(vec![vec![1.0; 5]]);
        let m = Metric::pass_at_1();
        let r = compare("a", &ok, "b", &nan, &m, &opts);
        assert!(matches!(r, Err(StatsError::NonFinite { .. })));
        let ragged = scores(vec![vec![1.0; 5], vec![1.0; 4]]);
        assert!(matches!(
            err(&ragged),
            StatsError::Ragged {
                seed: 1,
                len: 4,
                tasks: 5,
                ..
            }
        ));
        let no_seeds = SeededScores {
            tasks: ok.tasks.clone(),
            per_seed: vec![],
        };
        assert!(matches!(
            err(&no_seeds),
            StatsError::Empty { what: "seeds", .. }
        ));
        assert!(matches!(
            err(&scores(vec![vec![]])),
            StatsError::Empty { what: "tasks", .. }
        ));
        let mut dup = ok.clone();
        dup.tasks[4] = "t0".into();
        assert!(matches!(err(&dup), StatsError::DuplicateTask { task, .. } if task == "t0"));
        let mut other = ok.clone();
        other.tasks[0] = "u".into();
        assert_eq!(
            compare("a", &ok, "b", &other, &m, &opts)
                .unwrap()
                .unmatched_tasks,
            2
        );
        other.tasks = (0..5).map(|t| format!("u{t}")).collect();
        let r = compare("a", &ok, "b", &other, &m, &opts);
        assert!(matches!(r, Err(StatsError::NoSharedTasks { .. })));
        for (confidence, alpha, bootstrap_resamples) in
            [(1.0, 0.05, 9), (0.9, f64::NAN, 9), (0.9, 0.05, 0)]
        {
            let bad = StatsOptions {
                confidence,
                alpha,
                bootstrap_resamples,
                ..opts.clone()
            };
            assert!(matches!(
                estimate("o", &ok, &bad),
                Err(StatsError::Options(_))
            ));
        }
    }

    #[test]
    fn seeded_and_reproducible() {
        let a = scores(vec![noisy(40, 7, 0.0, 0.5), noisy(40, 8, 0.0, 0.5)]);
        let b = scores(vec![noisy(40, 9, 0.0, 0.5)]);
        let r1 = cmp(&a, &b, Metric::pass_at_1());
        assert_eq!(r1, cmp(&a, &b, Metric::pass_at_1()));
        assert_eq!(est(&a), est(&a));
        let opts = StatsOptions {
            seed: 1,
            ..StatsOptions::default()
        };
        let r2 = compare("base", &a, "textbook", &b, &Metric::pass_at_1(), &opts).unwrap();
        assert_ne!((r1.ci_low, r1.ci_high), (r2.ci_low, r2.ci_high));
    }
}
