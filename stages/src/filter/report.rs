//! The report every filter returns: counts kept/removed per reason, an optional score
//! histogram, the removed records with their reasons, and the wall time.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// One removed record and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Removal {
    /// The record's id.
    pub id: String,
    /// Short machine-readable reason (e.g. `exact_duplicate`, `below_threshold`).
    pub reason: String,
    /// Human-readable detail: the record it duplicates, the eval task it matches, its score.
    pub detail: String,
    /// The other side of a match, when there is one: the eval task id for decontamination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched: Option<String>,
}

/// Histogram of scores over `[min, max]` in equal-width bins (last bin closed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Lower edge of the first bin.
    pub min: f64,
    /// Upper edge of the last bin.
    pub max: f64,
    /// Count per bin.
    pub counts: Vec<usize>,
}

impl Histogram {
    /// Bins `scores` into `bins` equal bins over `[min, max]`; values outside are clamped
    /// into the end bins and NaNs are skipped, so the counts sum to the finite inputs.
    pub fn new(scores: impl IntoIterator<Item = f64>, min: f64, max: f64, bins: usize) -> Self {
        let bins = bins.max(1);
        let mut counts = vec![0usize; bins];
        let width = (max - min) / bins as f64;
        for s in scores.into_iter().filter(|s| !s.is_nan()) {
            let idx = if width > 0.0 {
                ((s - min) / width).floor()
            } else {
                0.0
            };
            let idx = idx.clamp(0.0, (bins - 1) as f64) as usize;
            counts[idx] += 1;
        }
        Self { min, max, counts }
    }
}

/// Report of one filter run, serialisable to JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilterReport {
    /// Which filter produced it (`heuristic_score`, `exact_dedup`, `decontaminate`, ...).
    pub filter: String,
    /// Records seen.
    pub input: usize,
    /// Records kept.
    pub kept: usize,
    /// Removed records counted per reason.
    #[serde(default)]
    pub removed_by_reason: BTreeMap<String, usize>,
    /// Each removed record with its reason and detail.
    #[serde(default)]
    pub removed: Vec<Removal>,
    /// Score histogram, for scoring filters.
    #[serde(default)]
    pub histogram: Option<Histogram>,
    /// Wall time of the filter in milliseconds. Not stored: it differs between runs, and an
    /// artifact is a function of its inputs (the filter kind records it as metadata).
    #[serde(skip)]
    pub elapsed_ms: u128,
    /// Filter-specific numbers (accuracy, thresholds, ...).
    #[serde(default)]
    pub extra: BTreeMap<String, f64>,
}

impl FilterReport {
    /// Starts an empty report for `filter` over `input` records.
    pub fn new(filter: &str, input: usize) -> Self {
        Self {
            filter: filter.to_string(),
            input,
            kept: input,
            removed_by_reason: BTreeMap::new(),
            removed: Vec::new(),
            histogram: None,
            elapsed_ms: 0,
            extra: BTreeMap::new(),
        }
    }

    /// Records the removal of one record (decrements `kept`).
    pub fn remove(&mut self, id: &str, reason: &str, detail: String) {
        self.remove_matched(id, reason, None, detail);
    }

    /// Records the removal of one record that matched `matched` (e.g. an eval task id).
    pub fn remove_matched(
        &mut self,
        id: &str,
        reason: &str,
        matched: Option<String>,
        detail: String,
    ) {
        self.kept = self.kept.saturating_sub(1);
        *self
            .removed_by_reason
            .entry(reason.to_string())
            .or_insert(0) += 1;
        self.removed.push(Removal {
            id: id.to_string(),
            reason: reason.to_string(),
            detail,
            matched,
        });
    }

    /// Sets the elapsed time from `start`.
    pub fn finish(mut self, start: Instant) -> Self {
        self.elapsed_ms = start.elapsed().as_millis();
        self
    }

    /// Pretty JSON of the report.
    pub fn to_json(&self) -> String {
        // Serialising plain maps, strings and finite numbers cannot fail; NaN becomes null.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_sum_and_clamp() {
        let h = Histogram::new(
            [0.0, 0.05, 0.5, 0.99, 1.0, 1.5, -1.0, f64::NAN],
            0.0,
            1.0,
            10,
        );
        assert_eq!(h.counts.iter().sum::<usize>(), 7);
        assert_eq!(h.counts[0], 3);
        assert_eq!(h.counts[5], 1);
        assert_eq!(h.counts[9], 3);
    }

    #[test]
    fn report_counts_removals_and_serialises() {
        let mut r = FilterReport::new("x", 3);
        r.remove("a", "dup", "of b".into());
        r.remove("c", "dup", "of b".into());
        assert_eq!(r.kept, 1);
        assert_eq!(r.removed_by_reason["dup"], 2);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["removed"][1]["id"], "c");
    }
}
