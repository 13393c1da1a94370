//! Paired comparison of two variants graded on the same tasks.
//!
//! Per task, pass@1 is estimated as `c / n`; the statistic is the mean over shared tasks
//! of `pass@1(B) - pass@1(A)`. Uncertainty comes from the tasks (the benchmark is a
//! sample of problems), so both procedures resample tasks, keeping each task's pair
//! together:
//!
//! * a seeded percentile bootstrap confidence interval of the mean difference;
//! * a two-sided significance test: with one sample per task (`n = 1` everywhere),
//!   McNemar's exact test on the discordant tasks; otherwise a paired sign-flip
//!   permutation test (exact over all sign patterns when at most 16 tasks differ,
//!   Monte Carlo with the same seed otherwise).

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::passk::TaskCounts;

/// Options for [`compare_paired`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompareOptions {
    /// Bootstrap resamples.
    pub bootstrap_resamples: usize,
    /// Monte Carlo sign-flip resamples (when exact enumeration is too large).
    pub permutation_resamples: usize,
    /// Confidence level of the interval, e.g. 0.95.
    pub confidence: f64,
    /// Significance level for the verdict.
    pub alpha: f64,
    /// RNG seed, so reports are reproducible.
    pub seed: u64,
}

impl Default for CompareOptions {
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

/// Which significance test was used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairedTest {
    /// McNemar's exact (binomial) test; all tasks had one sample per variant.
    #[serde(rename = "mcnemar_exact")]
    McNemarExact,
    /// Sign-flip permutation test on per-task differences.
    SignFlipPermutation,
}

impl std::fmt::Display for PairedTest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PairedTest::McNemarExact => "mcnemar_exact",
            PairedTest::SignFlipPermutation => "sign_flip_permutation",
        })
    }
}

/// Result of comparing variant B against variant A.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairedComparison {
    /// Name of the baseline variant.
    pub a: String,
    /// Name of the compared variant.
    pub b: String,
    /// Tasks present in both.
    pub tasks: usize,
    /// Tasks only one variant had (ignored).
    pub unmatched_tasks: usize,
    /// Mean pass@1 of A over the shared tasks.
    pub pass1_a: f64,
    /// Mean pass@1 of B over the shared tasks.
    pub pass1_b: f64,
    /// `pass1_b - pass1_a`.
    pub diff: f64,
    /// Bootstrap confidence interval of `diff`.
    pub ci_low: f64,
    /// Bootstrap confidence interval of `diff`.
    pub ci_high: f64,
    /// Confidence level of the interval.
    pub confidence: f64,
    /// Two-sided p-value.
    pub p_value: f64,
    /// The test that produced `p_value`.
    pub test: PairedTest,
    /// Tasks where B passed and A failed / A passed and B failed (McNemar only).
    pub discordant: Option<(u64, u64)>,
    /// One plain sentence: who is better, by how much, and whether it is within noise.
    pub verdict: String,
}

/// Errors of [`compare_paired`].
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum StatsError {
    /// The variants share no tasks.
    #[error("variants {a:?} and {b:?} have no task in common")]
    #[diagnostic(help("grade both variants on the same problems file"))]
    NoSharedTasks {
        /// Baseline name.
        a: String,
        /// Other name.
        b: String,
    },
    /// A task has zero samples or more passes than samples.
    #[error("task {0:?} has invalid counts (n must be > 0 and c <= n)")]
    InvalidCounts(String),
    /// Options out of range.
    #[error("invalid comparison option: {0}")]
    #[diagnostic(help("confidence and alpha must lie in (0, 1); resamples must be > 0"))]
    Options(String),
}

/// Compares `b` against `a` on their shared tasks (see the module docs).
pub fn compare_paired(
    a_name: &str,
    a: &[TaskCounts],
    b_name: &str,
    b: &[TaskCounts],
    opts: &CompareOptions,
) -> Result<PairedComparison, StatsError> {
    if !(opts.confidence > 0.0 && opts.confidence < 1.0 && opts.alpha > 0.0 && opts.alpha < 1.0)
        || opts.bootstrap_resamples == 0
        || opts.permutation_resamples == 0
    {
        return Err(StatsError::Options(format!("{opts:?}")));
    }
    for t in a.iter().chain(b) {
        if t.n == 0 || t.c > t.n {
            return Err(StatsError::InvalidCounts(t.task_id.clone()));
        }
    }
    let b_map: std::collections::HashMap<&str, &TaskCounts> =
        b.iter().map(|t| (t.task_id.as_str(), t)).collect();
    let pairs: Vec<(&TaskCounts, &TaskCounts)> = a
        .iter()
        .filter_map(|ta| b_map.get(ta.task_id.as_str()).map(|tb| (ta, *tb)))
        .collect();
    if pairs.is_empty() {
        return Err(StatsError::NoSharedTasks {
            a: a_name.to_string(),
            b: b_name.to_string(),
        });
    }
    let unmatched_tasks = a.len() + b.len() - 2 * pairs.len();
    let p = |t: &TaskCounts| t.c as f64 / t.n as f64;
    let diffs: Vec<f64> = pairs.iter().map(|(ta, tb)| p(tb) - p(ta)).collect();
    let m = diffs.len() as f64;
    let pass1_a = pairs.iter().map(|(ta, _)| p(ta)).sum::<f64>() / m;
    let pass1_b = pairs.iter().map(|(_, tb)| p(tb)).sum::<f64>() / m;
    let diff = diffs.iter().sum::<f64>() / m;

    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut boot: Vec<f64> = (0..opts.bootstrap_resamples)
        .map(|_| {
            let s: f64 = (0..diffs.len())
                .map(|_| diffs[rng.random_range(0..diffs.len())])
                .sum();
            s / m
        })
        .collect();
    boot.sort_by(f64::total_cmp);
    let tail = (1.0 - opts.confidence) / 2.0;
    let ci_low = quantile(&boot, tail);
    let ci_high = quantile(&boot, 1.0 - tail);

    let single = pairs.iter().all(|(ta, tb)| ta.n == 1 && tb.n == 1);
    let (p_value, test, discordant) = if single {
        let b_wins = pairs.iter().filter(|(ta, tb)| tb.c > ta.c).count() as u64;
        let a_wins = pairs.iter().filter(|(ta, tb)| ta.c > tb.c).count() as u64;
        (
            mcnemar_exact(b_wins, a_wins),
            PairedTest::McNemarExact,
            Some((b_wins, a_wins)),
        )
    } else {
        (
            sign_flip_p(&diffs, opts.permutation_resamples, &mut rng),
            PairedTest::SignFlipPermutation,
            None,
        )
    };

    let pct = |x: f64| 100.0 * x;
    let level = pct(opts.confidence).round();
    let numbers = format!(
        "{b_name} − {a_name} = {:+.1} pp pass@1 ({level}% CI [{:+.1}, {:+.1}], p {}, {} tasks)",
        pct(diff),
        pct(ci_low),
        pct(ci_high),
        format_p(p_value),
        pairs.len()
    );
    let ci_excludes_zero = ci_low > 0.0 || ci_high < 0.0;
    let verdict = if p_value < opts.alpha && ci_excludes_zero {
        let (better, worse) = if diff > 0.0 {
            (b_name, a_name)
        } else {
            (a_name, b_name)
        };
        format!(
            "{better} is better than {worse}: {numbers}; significant at α = {}.",
            opts.alpha
        )
    } else if p_value < opts.alpha || ci_excludes_zero {
        // The interval and the test disagree: say so rather than pick the friendlier one.
        format!(
            "Borderline, treat as within noise: {numbers}; the interval and the test disagree at α = {}.",
            opts.alpha
        )
    } else {
        format!(
            "No significant difference — within noise: {numbers}; not significant at α = {}.",
            opts.alpha
        )
    };
    Ok(PairedComparison {
        a: a_name.to_string(),
        b: b_name.to_string(),
        tasks: pairs.len(),
        unmatched_tasks,
        pass1_a,
        pass1_b,
        diff,
        ci_low,
        ci_high,
        confidence: opts.confidence,
        p_value,
        test,
        discordant,
        verdict,
    })
}

/// `= 0.034` style, or `< 0.001` for tiny values (exact digits there are noise).
pub fn format_p(p: f64) -> String {
    if p < 0.001 {
        "< 0.001".to_string()
    } else {
        format!("= {p:.3}")
    }
}

/// Linear-interpolated quantile of sorted data.
pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Two-sided exact McNemar p-value: binomial test of `b` successes in `b + c` trials at
/// one half, `min(1, 2 * P(X <= min(b, c)))`.
pub fn mcnemar_exact(b: u64, c: u64) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // log-space binomial pmf so large n stays finite.
    let ln_choose = |n: u64, k: u64| {
        ln_gamma(n as f64 + 1.0) - ln_gamma(k as f64 + 1.0) - ln_gamma((n - k) as f64 + 1.0)
    };
    let cdf: f64 = (0..=k)
        .map(|i| (ln_choose(n, i) - n as f64 * std::f64::consts::LN_2).exp())
        .sum();
    (2.0 * cdf).min(1.0)
}

/// Lanczos approximation of ln Γ(x) for x > 0 (accurate to ~1e-13).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Two-sided sign-flip permutation p-value for H0: per-task differences are symmetric
/// about zero. Exact when at most 16 differences are non-zero (zeros never change the
/// statistic), Monte Carlo with the add-one correction otherwise.
pub fn sign_flip_p(diffs: &[f64], resamples: usize, rng: &mut impl Rng) -> f64 {
    let nz: Vec<f64> = diffs.iter().copied().filter(|d| *d != 0.0).collect();
    if nz.is_empty() {
        return 1.0;
    }
    let observed = nz.iter().sum::<f64>().abs();
    // Tolerance so ties with the observed statistic count as "at least as extreme".
    let tol = 1e-9 * (1.0 + observed);
    if nz.len() <= 16 {
        let total = 1u64 << nz.len();
        let extreme = (0..total)
            .filter(|mask| {
                let s: f64 = nz
                    .iter()
                    .enumerate()
                    .map(|(i, d)| if mask >> i & 1 == 1 { -d } else { *d })
                    .sum();
                s.abs() >= observed - tol
            })
            .count();
        return extreme as f64 / total as f64;
    }
    let extreme = (0..resamples)
        .filter(|_| {
            let s: f64 = nz
                .iter()
                .map(|d| if rng.random::<bool>() { -d } else { *d })
                .sum();
            s.abs() >= observed - tol
        })
        .count();
    (1 + extreme) as f64 / (1 + resamples) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(v: &[(u64, u64)]) -> Vec<TaskCounts> {
        v.iter()
            .enumerate()
            .map(|(i, &(n, c))| TaskCounts {
                task_id: format!("t{i}"),
                n,
                c,
            })
            .collect()
    }

    #[test]
    fn mcnemar_known_values() {
        // 10 discordant, split 9:1 -> 2 * (1 + 10) / 1024
        assert!((mcnemar_exact(9, 1) - 22.0 / 1024.0).abs() < 1e-12);
        assert!((mcnemar_exact(1, 9) - 22.0 / 1024.0).abs() < 1e-12);
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // 0 of 6 -> 2 / 64
        assert!((mcnemar_exact(6, 0) - 2.0 / 64.0).abs() < 1e-12);
        assert!(mcnemar_exact(1000, 900) < 0.05);
    }

    #[test]
    fn sign_flip_exact_small() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        // All 5 positive and equal: only the two all-same-sign patterns are as extreme.
        let p = sign_flip_p(&[0.1; 5], 100, &mut rng);
        assert!((p - 2.0 / 32.0).abs() < 1e-12);
        assert_eq!(sign_flip_p(&[0.0, 0.0], 100, &mut rng), 1.0);
        // Symmetric differences: not significant.
        assert!(sign_flip_p(&[0.5, -0.5, 0.2, -0.2], 100, &mut rng) > 0.5);
    }

    #[test]
    fn clear_improvement_is_significant() {
        // 40 tasks, B passes 30 where A passes 5 (n = 1): McNemar.
        let a = counts(&(0..40).map(|i| (1, (i < 5) as u64)).collect::<Vec<_>>());
        let b = counts(&(0..40).map(|i| (1, (i < 30) as u64)).collect::<Vec<_>>());
        let r = compare_paired("messy", &a, "clean", &b, &CompareOptions::default()).unwrap();
        assert_eq!(r.test, PairedTest::McNemarExact);
        assert_eq!(r.discordant, Some((25, 0)));
        assert!((r.diff - 25.0 / 40.0).abs() < 1e-12);
        assert!(r.p_value < 1e-6);
        assert!(r.ci_low > 0.3 && r.ci_high <= 0.9 && r.ci_low < r.diff && r.diff < r.ci_high);
        assert!(
            r.verdict.starts_with("clean is better than messy"),
            "{}",
            r.verdict
        );
    }

    #[test]
    fn noise_is_called_noise() {
        // n = 10 per task, tiny alternating differences.
        let a = counts(&(0..30).map(|i| (10, 5 + (i % 2))).collect::<Vec<_>>());
        let b = counts(&(0..30).map(|i| (10, 6 - (i % 2))).collect::<Vec<_>>());
        let r = compare_paired("a", &a, "b", &b, &CompareOptions::default()).unwrap();
        assert_eq!(r.test, PairedTest::SignFlipPermutation);
        assert!(r.p_value > 0.5, "{}", r.p_value);
        assert!(r.ci_low < 0.0 && r.ci_high > 0.0);
        assert!(r.verdict.contains("within noise"), "{}", r.verdict);
    }

    #[test]
    fn disagreement_is_called_borderline() {
        // 5 discordant tasks, all favouring B: every bootstrap resample is >= 0 and most
        // are > 0, but McNemar's p = 2 / 32 = 0.0625.
        let a = counts(
            &(0..164)
                .map(|i| (1, (i % 9 == 0) as u64))
                .collect::<Vec<_>>(),
        );
        let b = counts(
            &(0..164)
                .map(|i| (1, (i % 9 == 0 || i % 31 == 0) as u64))
                .collect::<Vec<_>>(),
        );
        let r = compare_paired("base", &a, "messy", &b, &CompareOptions::default()).unwrap();
        assert_eq!(r.discordant, Some((5, 0)));
        assert!((r.p_value - 0.0625).abs() < 1e-12);
        assert!(r.ci_low > 0.0, "{}", r.ci_low);
        assert!(r.verdict.starts_with("Borderline"), "{}", r.verdict);
        assert!(r.verdict.contains("within noise"));
    }

    #[test]
    fn seeded_and_reproducible() {
        let a = counts(&(0..50).map(|i| (5, i % 6)).collect::<Vec<_>>());
        let b = counts(&(0..50).map(|i| (5, (i + 1) % 6)).collect::<Vec<_>>());
        let o = CompareOptions::default();
        let r1 = compare_paired("a", &a, "b", &b, &o).unwrap();
        let r2 = compare_paired("a", &a, "b", &b, &o).unwrap();
        assert_eq!(r1, r2);
    }

    #[test]
    fn rejects_disjoint_and_invalid() {
        let a = counts(&[(1, 1)]);
        let mut b = counts(&[(1, 0)]);
        b[0].task_id = "other".into();
        assert!(matches!(
            compare_paired("a", &a, "b", &b, &CompareOptions::default()),
            Err(StatsError::NoSharedTasks { .. })
        ));
        let bad = counts(&[(1, 2)]);
        assert!(compare_paired("a", &bad, "b", &a, &CompareOptions::default()).is_err());
    }
}
