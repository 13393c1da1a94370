//! How much a training set resembles an eval set, measured as phi-1 did (its Section 5): by
//! sentence embeddings and by syntax trees.
//!
//! - [`Measure::Embedding`]: cosine similarity of MiniLM embeddings
//!   ([`crate::filter::embed`]) of the record and the eval task's code; catches paraphrases.
//! - [`Measure::Ast`]: the AST match rate ([`ast`]): the share of the eval code's syntax
//!   subtrees, names and constants normalized away, that the record contains; catches copies
//!   with renamed identifiers.
//!
//! [`nearest`] gives, for every eval task, its best score and its `top_k` nearest training
//! records under a measure (the `eval-similarity` stage writes these; the report splits the
//! eval tasks by them); [`best_task_per_record`] gives, for every record, the eval task it
//! resembles most (the `decontaminate_embedding` and `decontaminate_ast` filter steps remove
//! records above a threshold).

pub mod ast;

use serde::{Deserialize, Serialize};

/// A similarity measure between a training record and an eval task, in `[0, 1]` for the AST
/// match rate and `[-1, 1]` for cosine (MiniLM's cosines of code are almost always positive).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// Cosine similarity of MiniLM sentence embeddings.
    Embedding,
    /// AST match rate ([`ast`]).
    Ast,
}

impl Measure {
    /// Both measures, in report order.
    pub const ALL: [Measure; 2] = [Measure::Embedding, Measure::Ast];

    /// How the manifest and artifacts write it.
    pub fn key(self) -> &'static str {
        match self {
            Self::Embedding => "embedding",
            Self::Ast => "ast",
        }
    }

    /// How a report names it.
    pub fn title(self) -> &'static str {
        match self {
            Self::Embedding => "embedding cosine",
            Self::Ast => "AST match rate",
        }
    }
}

/// A training record near an eval task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Neighbor {
    /// The record's id (its provenance, `file:line`, unless an id field is set).
    pub record: String,
    /// Its similarity to the task.
    pub score: f64,
    /// The record's first characters, to see the resemblance without opening the data.
    pub excerpt: String,
}

/// One eval task's nearest training records under one measure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskNeighbors {
    /// The best score over all records (0 when no record shares anything).
    pub best: f64,
    /// The `top_k` nearest records, best first (ties: earlier record first).
    pub nearest: Vec<Neighbor>,
}

/// Characters of a record kept in a [`Neighbor`]'s excerpt.
pub const EXCERPT_CHARS: usize = 300;

/// Sparse scores: `scores[r]` lists `(task, score)` for record `r` (tasks missing score 0).
pub type SparseScores = Vec<Vec<(usize, f64)>>;

/// Every task's `top_k` nearest records from per-record sparse `scores` (tasks absent from a
/// record's list score 0 with it and are never its neighbours). `records` are `(id, text)`.
pub fn nearest(
    tasks: usize,
    records: &[(String, String)],
    scores: &SparseScores,
    top_k: usize,
) -> Vec<TaskNeighbors> {
    let mut per_task: Vec<Vec<(usize, f64)>> = vec![Vec::new(); tasks];
    for (r, row) in scores.iter().enumerate() {
        for &(t, s) in row {
            if let Some(list) = per_task.get_mut(t) {
                list.push((r, s));
            }
        }
    }
    per_task
        .into_iter()
        .map(|mut list| {
            list.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            TaskNeighbors {
                best: list.first().map_or(0.0, |&(_, s)| s),
                nearest: list
                    .iter()
                    .take(top_k)
                    .map(|&(r, s)| Neighbor {
                        record: records[r].0.clone(),
                        score: s,
                        excerpt: records[r].1.chars().take(EXCERPT_CHARS).collect(),
                    })
                    .collect(),
            }
        })
        .collect()
}

/// For every record, the task it resembles most and the score (`None` when it shares
/// nothing with any task). Ties go to the earlier task.
pub fn best_task_per_record(scores: &SparseScores) -> Vec<Option<(usize, f64)>> {
    scores
        .iter()
        .map(|row| {
            row.iter()
                .copied()
                .reduce(|a, b| if b.1 > a.1 { b } else { a })
        })
        .collect()
}

/// Dense cosine scores of L2-normalised `records` against L2-normalised `tasks`, as
/// [`SparseScores`] (every task listed). In parallel over records.
pub fn cosine_scores(records: &[Vec<f32>], tasks: &[Vec<f32>]) -> SparseScores {
    use rayon::prelude::*;
    records
        .par_iter()
        .map(|r| {
            tasks
                .iter()
                .enumerate()
                .map(|(t, e)| (t, r.iter().zip(e).map(|(a, b)| a * b).sum::<f32>() as f64))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_ranks_by_score_then_record_order() {
        let records: Vec<(String, String)> =
            (0..4).map(|i| (format!("r{i}"), "x".repeat(400))).collect();
        let scores: SparseScores = vec![
            vec![(0, 0.5), (1, 0.9)],
            vec![(0, 0.7)],
            vec![],
            vec![(0, 0.7), (1, 0.1)],
        ];
        let n = nearest(3, &records, &scores, 2);
        assert_eq!(n[0].best, 0.7);
        let ids: Vec<&str> = n[0].nearest.iter().map(|x| x.record.as_str()).collect();
        assert_eq!(ids, ["r1", "r3"]);
        assert_eq!(n[0].nearest[0].excerpt.len(), EXCERPT_CHARS);
        assert_eq!(n[1].nearest[0].record, "r0");
        assert_eq!(n[2].best, 0.0);
        assert!(n[2].nearest.is_empty());
        let best = best_task_per_record(&scores);
        assert_eq!(
            best,
            vec![Some((1, 0.9)), Some((0, 0.7)), None, Some((0, 0.7))]
        );
    }

    #[test]
    fn cosine_of_unit_vectors() {
        let s = cosine_scores(&[vec![1.0, 0.0]], &[vec![1.0, 0.0], vec![0.0, 1.0]]);
        assert_eq!(s, vec![vec![(0, 1.0), (1, 0.0)]]);
    }
}
