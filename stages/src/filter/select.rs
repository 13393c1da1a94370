//! Choosing records by score (threshold or top-k) and deterministic seeded sampling.
//!
//! All functions return indices into the input, in input order, so callers keep their own
//! record type and the selection is reproducible from (scores, options, seed) alone.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::seq::index::sample as sample_indices;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::report::{FilterReport, Histogram};
use super::{FilterError, Result, TextRecord};

/// How to keep records by score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KeepRule {
    /// Keep records scoring at least this value.
    Threshold(f64),
    /// Keep the `k` best-scoring records (ties broken by input order, earlier first).
    TopK(usize),
    /// Keep the best fraction in `(0, 1]` of records (rounded up), like top-k.
    TopFraction(f64),
}

impl Default for KeepRule {
    fn default() -> Self {
        KeepRule::Threshold(0.5)
    }
}

/// Options of [`keep_by_score`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeepOptions {
    /// The rule.
    pub rule: KeepRule,
    /// Histogram bins over `[hist_min, hist_max]` in the report.
    pub histogram_bins: usize,
    /// Lower edge of the histogram.
    pub hist_min: f64,
    /// Upper edge of the histogram.
    pub hist_max: f64,
}

impl Default for KeepOptions {
    fn default() -> Self {
        Self {
            rule: KeepRule::default(),
            histogram_bins: 10,
            hist_min: 0.0,
            hist_max: 1.0,
        }
    }
}

/// Keeps records by `scores[i]` (parallel to `records`); returns kept indices in input order
/// and a report. NaN scores are never kept.
pub fn keep_by_score<R: TextRecord>(
    records: &[R],
    scores: &[f64],
    options: &KeepOptions,
) -> Result<(Vec<usize>, FilterReport)> {
    let start = Instant::now();
    if records.len() != scores.len() {
        return Err(FilterError::InvalidOptions(format!(
            "{} records but {} scores; score every record before selecting",
            records.len(),
            scores.len()
        )));
    }
    let keep: Vec<bool> = match options.rule {
        KeepRule::Threshold(t) => scores.iter().map(|&s| s >= t).collect(),
        KeepRule::TopK(k) => top_k_mask(scores, k),
        KeepRule::TopFraction(f) => {
            if !(f > 0.0 && f <= 1.0) {
                return Err(FilterError::InvalidOptions(format!(
                    "top_fraction must be in (0, 1], got {f}"
                )));
            }
            let k = (f * scores.len() as f64).ceil() as usize;
            top_k_mask(scores, k)
        }
    };
    let mut report = FilterReport::new("keep_by_score", records.len());
    let mut kept = Vec::new();
    for (i, r) in records.iter().enumerate() {
        if keep[i] {
            kept.push(i);
        } else {
            let reason = match options.rule {
                KeepRule::Threshold(_) => "below_threshold",
                _ => "not_in_top_k",
            };
            report.remove(r.id(), reason, format!("score {:.4}", scores[i]));
        }
    }
    report.histogram = Some(Histogram::new(
        scores.iter().copied(),
        options.hist_min,
        options.hist_max,
        options.histogram_bins,
    ));
    Ok((kept, report.finish(start)))
}

fn top_k_mask(scores: &[f64], k: usize) -> Vec<bool> {
    let mut order: Vec<usize> = (0..scores.len()).filter(|&i| !scores[i].is_nan()).collect();
    // Stable sort keeps earlier records first among equal scores.
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut mask = vec![false; scores.len()];
    for &i in order.iter().take(k) {
        mask[i] = true;
    }
    mask
}

/// Options of [`sample`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleOptions {
    /// How many records to draw (all of them if there are fewer).
    pub n: usize,
    /// RNG seed; the same seed and input size always give the same indices.
    pub seed: u64,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self { n: 1000, seed: 0 }
    }
}

/// Draws `n` distinct records uniformly without replacement, deterministically from `seed`
/// (rand's `StdRng`, a fixed ChaCha12). Returns indices in input order and a report.
pub fn sample<R: TextRecord>(records: &[R], options: &SampleOptions) -> (Vec<usize>, FilterReport) {
    let start = Instant::now();
    let n = options.n.min(records.len());
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut idx = sample_indices(&mut rng, records.len(), n).into_vec();
    idx.sort_unstable();
    let mut report = FilterReport::new("sample", records.len());
    let mut chosen = idx.iter().peekable();
    for (i, r) in records.iter().enumerate() {
        if chosen.peek() == Some(&&i) {
            chosen.next();
        } else {
            report.remove(r.id(), "not_sampled", String::new());
        }
    }
    // Listing every unsampled record would bloat the report; counts say it all.
    report.removed.clear();
    report.extra.insert("seed".to_string(), options.seed as f64);
    (idx, report.finish(start))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(n: usize) -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("r{i}"), format!("text {i}")))
            .collect()
    }

    #[test]
    fn threshold_and_top_k() {
        let r = recs(5);
        let scores = [0.1, 0.9, 0.5, f64::NAN, 0.9];
        let (kept, rep) = keep_by_score(&r, &scores, &KeepOptions::default()).unwrap();
        assert_eq!(kept, vec![1, 2, 4]);
        assert_eq!(rep.removed_by_reason["below_threshold"], 2);
        let opts = KeepOptions {
            rule: KeepRule::TopK(2),
            ..Default::default()
        };
        let (kept, rep) = keep_by_score(&r, &scores, &opts).unwrap();
        assert_eq!(kept, vec![1, 4]);
        assert_eq!(rep.kept, 2);
        let opts = KeepOptions {
            rule: KeepRule::TopFraction(0.5),
            ..Default::default()
        };
        assert_eq!(keep_by_score(&r, &scores, &opts).unwrap().0, vec![1, 2, 4]);
        assert!(keep_by_score(&r, &scores[..2], &opts).is_err());
        let rule: KeepOptions = serde_json::from_str(r#"{"rule": {"top_k": 3}}"#).unwrap();
        assert_eq!(rule.rule, KeepRule::TopK(3));
    }

    #[test]
    fn sampling_is_deterministic_and_seed_dependent() {
        let r = recs(100);
        let a = sample(&r, &SampleOptions { n: 10, seed: 7 }).0;
        let b = sample(&r, &SampleOptions { n: 10, seed: 7 }).0;
        let c = sample(&r, &SampleOptions { n: 10, seed: 8 }).0;
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 10);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        let (all, rep) = sample(&r, &SampleOptions { n: 1000, seed: 1 });
        assert_eq!(all.len(), 100);
        assert_eq!(rep.kept, 100);
        let (_, rep) = sample(&r, &SampleOptions { n: 10, seed: 1 });
        assert_eq!(rep.removed_by_reason["not_sampled"], 90);
    }
}
