//! phi-1's learned quality scorer end to end: embed texts with MiniLM, train a logistic
//! regression on labelled examples, score records by P(high quality), keep by score.

use std::time::Instant;

use super::classifier::{train_with_holdout, LogisticRegression, TrainOptions, TrainReport};
use super::embed::MiniLmEmbedder;
use super::report::FilterReport;
use super::select::{keep_by_score, KeepOptions};
use super::{Result, TextRecord};

/// Embeds `positives` (label true: educational) and `negatives`, then trains with a seeded
/// held-out split; the report's `test_accuracy` is the honest measure of the scorer.
pub fn train_quality_classifier(
    embedder: &MiniLmEmbedder,
    positives: &[&str],
    negatives: &[&str],
    options: &TrainOptions,
) -> Result<(LogisticRegression, TrainReport)> {
    let texts: Vec<&str> = positives.iter().chain(negatives).copied().collect();
    let x = embedder.embed(&texts)?;
    let y: Vec<bool> = (0..texts.len()).map(|i| i < positives.len()).collect();
    train_with_holdout(&x, &y, options)
}

/// Turns annotator scores into training labels the way phi-1 used GPT-4's judgements:
/// records scoring `>= hi` are positives, `<= lo` negatives, the uncertain middle is left
/// out. Returns `(index, label)` pairs in input order.
pub fn labels_from_scores(scores: &[f64], lo: f64, hi: f64) -> Vec<(usize, bool)> {
    scores
        .iter()
        .enumerate()
        .filter_map(|(i, &s)| {
            if s >= hi {
                Some((i, true))
            } else if s <= lo {
                Some((i, false))
            } else {
                None
            }
        })
        .collect()
}

/// Trains the classifier on texts labelled by an annotator's scores (e.g. the heuristic
/// scorer standing in for GPT-4): see [`labels_from_scores`]. The classifier then scores
/// records the annotator never saw, from their embeddings alone.
pub fn train_from_scores(
    embedder: &MiniLmEmbedder,
    texts: &[&str],
    scores: &[f64],
    lo: f64,
    hi: f64,
    options: &TrainOptions,
) -> Result<(LogisticRegression, TrainReport)> {
    if texts.len() != scores.len() {
        return Err(super::FilterError::Training(format!(
            "{} texts but {} scores; score every text",
            texts.len(),
            scores.len()
        )));
    }
    let labelled = labels_from_scores(scores, lo, hi);
    let chosen: Vec<&str> = labelled.iter().map(|&(i, _)| texts[i]).collect();
    let y: Vec<bool> = labelled.iter().map(|&(_, l)| l).collect();
    let x = embedder.embed(&chosen)?;
    train_with_holdout(&x, &y, options)
}

/// P(high quality) for every record, in input order.
pub fn learned_scores<R: TextRecord>(
    embedder: &MiniLmEmbedder,
    classifier: &LogisticRegression,
    records: &[R],
) -> Result<Vec<f64>> {
    let texts: Vec<&str> = records.iter().map(|r| r.text()).collect();
    let emb = embedder.embed(&texts)?;
    Ok(emb.iter().map(|e| classifier.predict_proba(e)).collect())
}

/// Scores records with the classifier and keeps them by `keep` (threshold or top-k).
/// Returns kept indices in input order, all scores, and the report (histogram over
/// `[0, 1]`, the embedding + scoring time included).
pub fn learned_filter<R: TextRecord>(
    embedder: &MiniLmEmbedder,
    classifier: &LogisticRegression,
    records: &[R],
    keep: &KeepOptions,
) -> Result<(Vec<usize>, Vec<f64>, FilterReport)> {
    let start = Instant::now();
    let scores = learned_scores(embedder, classifier, records)?;
    let (kept, mut report) = keep_by_score(records, &scores, keep)?;
    report.filter = "learned_score".to_string();
    let mean = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
    report.extra.insert("mean_score".into(), mean);
    Ok((kept, scores, report.finish(start)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_skip_the_uncertain_middle() {
        let l = labels_from_scores(&[0.9, 0.5, 0.1, 0.75, 0.3], 0.3, 0.75);
        assert_eq!(l, vec![(0, true), (2, false), (3, true), (4, false)]);
    }
}
