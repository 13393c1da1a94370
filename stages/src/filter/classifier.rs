//! Logistic regression on embeddings: phi-1's learned quality classifier.
//!
//! phi-1 labelled a small set of files for educational value with GPT-4 and trained a
//! classifier on their embeddings to score the rest. Here the model is an L2-regularised
//! logistic regression in f64, fitted by Newton's method (iteratively reweighted least
//! squares): the objective
//!
//! `L(w, b) = mean_i logloss(y_i, sigmoid(w·x_i + b)) + (l2 / 2) ||w||²`
//!
//! is strictly convex for `l2 > 0` (the bias is not penalised), so Newton converges in a
//! handful of steps even on separable data, where unregularised weights would diverge.
//! Each step solves the `(d+1) x (d+1)` Hessian system by Cholesky; for 384-dim MiniLM
//! embeddings that is cheap.
//!
//! [`train_with_holdout`] shuffles with a seed, holds out a fraction and reports held-out
//! accuracy, so a claim that the scorer works is always measured on unseen data.

use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::{FilterError, Result};

/// A fitted binary logistic-regression model; `predict_proba` is P(label = true).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogisticRegression {
    /// One weight per feature.
    pub weights: Vec<f64>,
    /// Intercept.
    pub bias: f64,
    /// The L2 strength it was trained with (kept for provenance).
    pub l2: f64,
}

/// Options for fitting (manifest parameters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TrainOptions {
    /// L2 penalty on the weights; must be positive.
    pub l2: f64,
    /// Most Newton iterations.
    pub max_iter: usize,
    /// Stop when the largest parameter change falls below this.
    pub tol: f64,
    /// Share of examples held out for evaluation, in `[0, 1)`.
    pub test_fraction: f64,
    /// Seed of the train/test shuffle.
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            l2: 1e-3,
            max_iter: 50,
            tol: 1e-8,
            test_fraction: 0.2,
            seed: 0,
        }
    }
}

/// What training measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Training examples.
    pub train_n: usize,
    /// Held-out examples.
    pub test_n: usize,
    /// Positives among all examples.
    pub positives: usize,
    /// Accuracy on the training split at threshold 0.5.
    pub train_accuracy: f64,
    /// Accuracy on the held-out split at threshold 0.5 (NaN when nothing is held out).
    pub test_accuracy: f64,
    /// Accuracy of always answering the majority class of the training split, on the
    /// held-out split: the chance level to beat.
    pub test_majority_baseline: f64,
    /// Newton iterations used.
    pub iterations: usize,
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

impl LogisticRegression {
    /// P(label = true | x). Features beyond the model's dimension are ignored and missing
    /// ones count as zero; callers should pass vectors of the trained dimension.
    pub fn predict_proba(&self, x: &[f32]) -> f64 {
        let z: f64 = self
            .weights
            .iter()
            .zip(x)
            .map(|(w, &v)| w * v as f64)
            .sum::<f64>()
            + self.bias;
        sigmoid(z)
    }

    /// Accuracy at threshold 0.5 on `(x, y)`.
    pub fn accuracy(&self, x: &[Vec<f32>], y: &[bool]) -> f64 {
        if x.is_empty() {
            return f64::NAN;
        }
        let correct = x
            .iter()
            .zip(y)
            .filter(|(xi, &yi)| (self.predict_proba(xi) >= 0.5) == yi)
            .count();
        correct as f64 / x.len() as f64
    }

    /// Fits the model on all of `(x, y)` by Newton's method; returns it and the iterations.
    pub fn fit(x: &[Vec<f32>], y: &[bool], options: &TrainOptions) -> Result<(Self, usize)> {
        if x.len() != y.len() || x.is_empty() {
            return Err(FilterError::Training(format!(
                "{} feature vectors for {} labels; need the same positive number",
                x.len(),
                y.len()
            )));
        }
        if options.l2 <= 0.0 || !options.l2.is_finite() {
            return Err(FilterError::Training(format!(
                "l2 must be positive (got {}); Newton's method needs it on separable data",
                options.l2
            )));
        }
        let d = x[0].len();
        if x.iter().any(|r| r.len() != d) {
            return Err(FilterError::Training(
                "feature vectors have different lengths; embed all texts with one model".into(),
            ));
        }
        let pos = y.iter().filter(|&&b| b).count();
        if pos == 0 || pos == y.len() {
            return Err(FilterError::Training(
                "training data has only one class; provide both positive and negative examples"
                    .into(),
            ));
        }
        let n = x.len() as f64;
        // Parameters: weights 0..d, bias at d.
        let dim = d + 1;
        let mut theta = vec![0.0f64; dim];
        let mut iterations = 0;
        for _ in 0..options.max_iter {
            iterations += 1;
            let mut grad = vec![0.0f64; dim];
            let mut hess = vec![0.0f64; dim * dim];
            for (xi, &yi) in x.iter().zip(y) {
                let z = xi
                    .iter()
                    .zip(&theta)
                    .map(|(&v, t)| v as f64 * t)
                    .sum::<f64>()
                    + theta[d];
                let p = sigmoid(z);
                let r = p - if yi { 1.0 } else { 0.0 };
                let s = (p * (1.0 - p)).max(1e-12);
                for a in 0..dim {
                    let xa = if a < d { xi[a] as f64 } else { 1.0 };
                    grad[a] += r * xa / n;
                    let row = &mut hess[a * dim..(a + 1) * dim];
                    // Symmetric: fill the lower triangle, mirror afterwards.
                    for (b, h) in row.iter_mut().enumerate().take(a + 1) {
                        let xb = if b < d { xi[b] as f64 } else { 1.0 };
                        *h += s * xa * xb / n;
                    }
                }
            }
            for a in 0..dim {
                for b in 0..a {
                    hess[b * dim + a] = hess[a * dim + b];
                }
            }
            for a in 0..d {
                grad[a] += options.l2 * theta[a];
                hess[a * dim + a] += options.l2;
            }
            // Tiny ridge on the bias keeps the system PD if every x_i is identical.
            hess[d * dim + d] += 1e-12;
            let step = cholesky_solve(&mut hess, &grad, dim).ok_or_else(|| {
                FilterError::Training("Hessian is not positive definite; raise l2".into())
            })?;
            let mut max_change = 0.0f64;
            for (t, s) in theta.iter_mut().zip(&step) {
                *t -= s;
                max_change = max_change.max(s.abs());
            }
            if !theta.iter().all(|t| t.is_finite()) {
                return Err(FilterError::Training(
                    "training diverged (non-finite weights); raise l2 or check the features".into(),
                ));
            }
            if max_change < options.tol {
                break;
            }
        }
        Ok((
            Self {
                weights: theta[..d].to_vec(),
                bias: theta[d],
                l2: options.l2,
            },
            iterations,
        ))
    }

    /// Writes the model as JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string(self).map_err(|source| FilterError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        std::fs::write(path, json).map_err(|source| FilterError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads a model written by [`LogisticRegression::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| FilterError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| FilterError::Json {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Solves `A x = b` for symmetric positive-definite `A` (row-major, overwritten by its
/// Cholesky factor). `None` if `A` is not positive definite.
fn cholesky_solve(a: &mut [f64], b: &[f64], n: usize) -> Option<Vec<f64>> {
    for j in 0..n {
        let mut diag = a[j * n + j];
        for k in 0..j {
            diag -= a[j * n + k] * a[j * n + k];
        }
        if diag <= 0.0 || !diag.is_finite() {
            return None;
        }
        let diag = diag.sqrt();
        a[j * n + j] = diag;
        for i in j + 1..n {
            let mut v = a[i * n + j];
            for k in 0..j {
                v -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = v / diag;
        }
    }
    // Forward: L y = b.
    let mut y = vec![0.0; n];
    for i in 0..n {
        let mut v = b[i];
        for k in 0..i {
            v -= a[i * n + k] * y[k];
        }
        y[i] = v / a[i * n + i];
    }
    // Backward: L^T x = y.
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let mut v = y[i];
        for k in i + 1..n {
            v -= a[k * n + i] * x[k];
        }
        x[i] = v / a[i * n + i];
    }
    Some(x)
}

/// Shuffles `(x, y)` with `options.seed`, holds out `test_fraction`, fits on the rest and
/// reports train/held-out accuracy and the majority-class baseline.
pub fn train_with_holdout(
    x: &[Vec<f32>],
    y: &[bool],
    options: &TrainOptions,
) -> Result<(LogisticRegression, TrainReport)> {
    if !(0.0..1.0).contains(&options.test_fraction) {
        return Err(FilterError::Training(format!(
            "test_fraction must be in [0, 1), got {}",
            options.test_fraction
        )));
    }
    if x.len() != y.len() {
        return Err(FilterError::Training(format!(
            "{} feature vectors for {} labels",
            x.len(),
            y.len()
        )));
    }
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(options.seed));
    let test_n = (x.len() as f64 * options.test_fraction).round() as usize;
    let (test_idx, train_idx) = order.split_at(test_n);
    let pick = |idx: &[usize]| -> (Vec<Vec<f32>>, Vec<bool>) {
        (
            idx.iter().map(|&i| x[i].clone()).collect(),
            idx.iter().map(|&i| y[i]).collect(),
        )
    };
    let (train_x, train_y) = pick(train_idx);
    let (test_x, test_y) = pick(test_idx);
    let (model, iterations) = LogisticRegression::fit(&train_x, &train_y, options)?;
    let train_pos = train_y.iter().filter(|&&b| b).count();
    let majority = train_pos * 2 >= train_y.len();
    let baseline = if test_y.is_empty() {
        f64::NAN
    } else {
        test_y.iter().filter(|&&b| b == majority).count() as f64 / test_y.len() as f64
    };
    let report = TrainReport {
        train_n: train_x.len(),
        test_n: test_x.len(),
        positives: y.iter().filter(|&&b| b).count(),
        train_accuracy: model.accuracy(&train_x, &train_y),
        test_accuracy: model.accuracy(&test_x, &test_y),
        test_majority_baseline: baseline,
        iterations,
    };
    Ok((model, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// Two Gaussian blobs separated along a random direction.
    fn blobs(n: usize, d: usize, seed: u64, margin: f32) -> (Vec<Vec<f32>>, Vec<bool>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let dir: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let norm = dir.iter().map(|v| v * v).sum::<f32>().sqrt();
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let label = i % 2 == 0;
            let shift = if label { margin } else { -margin };
            x.push(
                dir.iter()
                    .map(|v| v / norm * shift + rng.random_range(-0.5..0.5))
                    .collect(),
            );
            y.push(label);
        }
        (x, y)
    }

    #[test]
    fn cholesky_solves_spd_system() {
        let mut a = vec![4.0, 2.0, 2.0, 3.0];
        let x = cholesky_solve(&mut a, &[2.0, 1.0], 2).unwrap();
        assert!((x[0] - 0.5).abs() < 1e-12 && x[1].abs() < 1e-12, "{x:?}");
        let mut bad = vec![1.0, 2.0, 2.0, 1.0];
        assert!(cholesky_solve(&mut bad, &[1.0, 1.0], 2).is_none());
    }

    #[test]
    fn separable_synthetic_data_is_learned_and_held_out_accuracy_high() {
        let (x, y) = blobs(400, 16, 3, 1.0);
        let (model, report) = train_with_holdout(&x, &y, &TrainOptions::default()).unwrap();
        assert_eq!(report.test_n, 80);
        assert!(report.test_accuracy > 0.97, "{report:?}");
        assert!(report.train_accuracy > 0.97, "{report:?}");
        assert!(report.iterations < 50, "Newton should converge: {report:?}");
        let p: Vec<f64> = x.iter().map(|xi| model.predict_proba(xi)).collect();
        assert!(p.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn noise_labels_stay_near_chance() {
        let (x, _) = blobs(400, 8, 5, 0.0);
        let mut rng = StdRng::seed_from_u64(9);
        let y: Vec<bool> = (0..400).map(|_| rng.random_bool(0.5)).collect();
        let (_, report) = train_with_holdout(&x, &y, &TrainOptions::default()).unwrap();
        assert!(report.test_accuracy < 0.7, "{report:?}");
    }

    #[test]
    fn stronger_l2_shrinks_weights_and_bad_input_errors() {
        let (x, y) = blobs(200, 4, 1, 1.0);
        let weak = LogisticRegression::fit(&x, &y, &TrainOptions::default())
            .unwrap()
            .0;
        let strong_opts = TrainOptions {
            l2: 1.0,
            ..Default::default()
        };
        let strong = LogisticRegression::fit(&x, &y, &strong_opts).unwrap().0;
        let norm = |m: &LogisticRegression| m.weights.iter().map(|w| w * w).sum::<f64>();
        assert!(norm(&strong) < norm(&weak));
        assert!(LogisticRegression::fit(&x, &[true; 200], &TrainOptions::default()).is_err());
        let zero = TrainOptions {
            l2: 0.0,
            ..Default::default()
        };
        assert!(LogisticRegression::fit(&x, &y, &zero).is_err());
    }

    #[test]
    fn save_and_load_round_trip() {
        let (x, y) = blobs(100, 4, 2, 1.0);
        let model = LogisticRegression::fit(&x, &y, &TrainOptions::default())
            .unwrap()
            .0;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clf.json");
        model.save(&path).unwrap();
        let back = LogisticRegression::load(&path).unwrap();
        assert_eq!(back, model);
        std::fs::write(&path, "{").unwrap();
        assert!(LogisticRegression::load(&path).is_err());
    }
}
