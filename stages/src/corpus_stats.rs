//! What a data variant is made of, measured the same way for every variant so they can be
//! compared side by side: size, length distribution, lexical diversity (distinct-n),
//! redundancy (compression ratio, exact and near duplicates).
//!
//! - **distinct-n**: distinct word n-grams over all n-grams, for n = 1..4 (Li et al., 2016); a
//!   corpus that repeats itself scores low at every n.
//! - **compression ratio**: raw bytes over gzip'd bytes (level 6) of the texts joined with
//!   newlines, as datatrove's stats report it; higher means more repetition.
//! - **exact duplicates**: records whose whitespace-normalised text occurred before.
//! - **near duplicates**: records the near-dedup filter step would remove (MinHash + LSH with
//!   Jaccard verification, its default settings), so the rate is what that step would cut.
//! - **embedding dispersion** ([`embedding_dispersion`], when an embedder is given): on a
//!   sample chosen by content hash (the same texts every run, no seed), the mean pairwise
//!   cosine distance of MiniLM embeddings (higher: more spread in meaning) and the number of
//!   clusters that linking every pair at cosine `>= threshold` leaves (single linkage; a
//!   corpus of paraphrases collapses into few clusters, a diverse one stays near the sample
//!   size).

use std::collections::{BTreeMap, HashSet};
use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::filter::dedup::{exact_dedup, near_dedup, ExactDedupOptions, NearDedupOptions};

/// A length distribution.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Lengths {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// Largest.
    pub max: f64,
}

impl Lengths {
    /// The distribution of `values` (all zero when empty).
    pub fn of(values: &[f64]) -> Lengths {
        if values.is_empty() {
            return Lengths::default();
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
        Lengths {
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
            p50: at(0.5),
            p90: at(0.9),
            max: at(1.0),
        }
    }
}

/// The statistics of one corpus.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CorpusStats {
    /// Records.
    pub records: usize,
    /// Total UTF-8 bytes of their texts.
    pub bytes: u64,
    /// Words (whitespace-separated) per record.
    pub words: Lengths,
    /// Model tokens per record, when a tokenizer was given.
    pub tokens: Option<Lengths>,
    /// Distinct word n-grams over all n-grams, n = 1..4.
    pub distinct_n: [f64; 4],
    /// Raw bytes over gzip'd bytes.
    pub compression_ratio: f64,
    /// Fraction of records repeating an earlier record's normalised text.
    pub exact_duplicate_rate: f64,
    /// Fraction of records the near-dedup step would remove.
    pub near_duplicate_rate: f64,
    /// Spread of the records' embeddings, when an embedder was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<EmbeddingDispersion>,
}

/// How spread out a corpus is in embedding space.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingDispersion {
    /// Records in the sample.
    pub sample: usize,
    /// Mean of `1 - cosine` over all pairs of the sample.
    pub mean_cosine_distance: f64,
    /// Cosine at or above which two records are linked.
    pub cluster_threshold: f64,
    /// Clusters (connected groups under that linking, singletons included).
    pub clusters: usize,
}

/// Indices of at most `n` of `texts`, chosen by the smallest blake3 hashes of their text: a
/// fixed, content-determined sample (a corpus with added records keeps most of it).
pub fn hash_sample(texts: &[(String, String)], n: usize) -> Vec<usize> {
    let mut keyed: Vec<([u8; 32], usize)> = texts
        .iter()
        .enumerate()
        .map(|(i, (_, t))| (*blake3::hash(t.as_bytes()).as_bytes(), i))
        .collect();
    keyed.sort_unstable();
    let mut picked: Vec<usize> = keyed.into_iter().take(n).map(|(_, i)| i).collect();
    picked.sort_unstable();
    picked
}

/// Dispersion of L2-normalised `vectors`: mean pairwise cosine distance and the clusters left
/// by linking pairs at cosine `>= threshold`.
pub fn embedding_dispersion(vectors: &[Vec<f32>], threshold: f64) -> EmbeddingDispersion {
    let n = vectors.len();
    let mut parent: Vec<usize> = (0..n).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut distance_sum = 0.0f64;
    for i in 0..n {
        for j in i + 1..n {
            let cos: f64 = vectors[i]
                .iter()
                .zip(&vectors[j])
                .map(|(a, b)| (a * b) as f64)
                .sum();
            distance_sum += 1.0 - cos;
            if cos >= threshold {
                let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                parent[a] = b;
            }
        }
    }
    let pairs = n * n.saturating_sub(1) / 2;
    let clusters = (0..n).filter(|&i| root(&mut parent, i) == i).count();
    EmbeddingDispersion {
        sample: n,
        mean_cosine_distance: if pairs == 0 {
            0.0
        } else {
            distance_sum / pairs as f64
        },
        cluster_threshold: threshold,
        clusters,
    }
}

/// Counts a text's model tokens (or says why it cannot).
pub type TokenCounter<'a> = &'a dyn Fn(&str) -> Result<usize, String>;

/// Measures `texts` (`(id, text)` pairs); `count_tokens` gives a text's model tokens, if known.
pub fn corpus_stats(
    texts: &[(String, String)],
    count_tokens: Option<TokenCounter<'_>>,
) -> Result<CorpusStats, String> {
    let records = texts.len();
    let bytes = texts.iter().map(|(_, t)| t.len() as u64).sum();
    let words: Vec<f64> = texts
        .iter()
        .map(|(_, t)| t.split_whitespace().count() as f64)
        .collect();
    let tokens = match count_tokens {
        Some(count) => {
            let mut lengths = Vec::with_capacity(records);
            for (_, t) in texts {
                lengths.push(count(t)? as f64);
            }
            Some(Lengths::of(&lengths))
        }
        None => None,
    };
    let mut distinct_n = [0.0; 4];
    for (i, d) in distinct_n.iter_mut().enumerate() {
        *d = distinct(texts, i + 1);
    }
    let (exact_kept, _) = exact_dedup(texts, &ExactDedupOptions::default());
    let (near_kept, _) =
        near_dedup(texts, &NearDedupOptions::default()).map_err(|e| e.to_string())?;
    let rate = |removed: usize| {
        if records == 0 {
            0.0
        } else {
            removed as f64 / records as f64
        }
    };
    Ok(CorpusStats {
        records,
        bytes,
        words: Lengths::of(&words),
        tokens,
        distinct_n,
        compression_ratio: compression_ratio(texts),
        exact_duplicate_rate: rate(records - exact_kept.len()),
        near_duplicate_rate: rate(records - near_kept.len()),
        embedding: None,
    })
}

/// Distinct word n-grams over all word n-grams (1 when there are none).
fn distinct(texts: &[(String, String)], n: usize) -> f64 {
    let mut seen: HashSet<Vec<&str>> = HashSet::new();
    let mut total = 0usize;
    for (_, t) in texts {
        let words: Vec<&str> = t.split_whitespace().collect();
        for gram in words.windows(n) {
            total += 1;
            seen.insert(gram.to_vec());
        }
    }
    if total == 0 {
        1.0
    } else {
        seen.len() as f64 / total as f64
    }
}

fn compression_ratio(texts: &[(String, String)]) -> f64 {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    let mut raw = 0usize;
    for (_, t) in texts {
        // Writing into memory cannot fail.
        let _ = gz.write_all(t.as_bytes());
        let _ = gz.write_all(b"\n");
        raw += t.len() + 1;
    }
    let packed = gz.finish().map(|v| v.len()).unwrap_or(0);
    if packed == 0 {
        1.0
    } else {
        raw as f64 / packed as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_is_even_for_balanced_values_and_low_when_one_dominates() {
        let even = field_coverage([Some("a"), Some("b"), Some("a"), Some("b"), None]).unwrap();
        assert_eq!(
            (even.records, even.values(), even.min_max()),
            (4, 2, (2, 2))
        );
        assert!((even.evenness - 1.0).abs() < 1e-12);
        let mut skewed = vec![Some("a"); 98];
        skewed.extend([Some("b"), Some("c")]);
        let skewed = field_coverage(skewed).unwrap();
        assert!(skewed.evenness < 0.2, "{}", skewed.evenness);
        assert_eq!(field_coverage([None, None]), None);
    }

    fn corpus(texts: &[String]) -> Vec<(String, String)> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| (i.to_string(), t.clone()))
            .collect()
    }

    /// Distinct, varied code against the same amount of one snippet repeated.
    #[test]
    fn a_repeated_corpus_is_less_diverse_and_more_redundant() {
        let varied: Vec<String> = (0..200)
            .map(|i| {
                format!(
                    "def f{i}(x{i}, y):\n    total_{i} = x{i} * {} + y - {}\n    return total_{i} // {}\n",
                    i * 7 + 3,
                    i % 13,
                    i % 5 + 1
                )
            })
            .collect();
        let repeated: Vec<String> = (0..200).map(|_| varied[0].clone()).collect();
        let a = corpus_stats(&corpus(&varied), None).unwrap_or_default();
        let b = corpus_stats(&corpus(&repeated), None).unwrap_or_default();
        assert_eq!((a.records, b.records), (200, 200));
        for n in 0..4 {
            assert!(
                a.distinct_n[n] > 5.0 * b.distinct_n[n],
                "n={}: {a:?} {b:?}",
                n + 1
            );
        }
        assert!(b.distinct_n[0] < 0.01, "{b:?}");
        assert!(
            b.compression_ratio > 3.0 * a.compression_ratio,
            "{a:?} {b:?}"
        );
        assert_eq!(a.exact_duplicate_rate, 0.0);
        assert!(
            (b.exact_duplicate_rate - 199.0 / 200.0).abs() < 1e-9,
            "{b:?}"
        );
        assert!(a.near_duplicate_rate < 0.05, "{a:?}");
    }

    /// Near copies (one word changed) are counted by the near-duplicate rate, not the exact one.
    #[test]
    fn near_copies_are_found() {
        let base = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by the door";
        let mut texts: Vec<String> = (0..20)
            .map(|i| {
                format!(
                    "unrelated record number {i} talks about {} things entirely",
                    i * 31
                )
            })
            .collect();
        texts.push(base.to_string());
        texts.push(base.replace("door", "window"));
        let s = corpus_stats(&corpus(&texts), None).unwrap_or_default();
        assert_eq!(s.exact_duplicate_rate, 0.0);
        assert!((s.near_duplicate_rate - 1.0 / 22.0).abs() < 1e-9, "{s:?}");
        let counted =
            corpus_stats(&corpus(&texts), Some(&|t: &str| Ok(t.len()))).unwrap_or_default();
        assert_eq!(counted.tokens.map(|t| t.max), Some(base.len() as f64 + 2.0));
    }

    #[test]
    fn dispersion_of_copies_collapses_and_of_orthogonal_vectors_does_not() {
        let same = vec![vec![1.0, 0.0]; 4];
        let d = embedding_dispersion(&same, 0.9);
        assert_eq!((d.sample, d.clusters), (4, 1));
        assert!(d.mean_cosine_distance.abs() < 1e-9);
        let spread = vec![
            vec![1.0, 0.0, 0.0],
            vec![0.0, 1.0, 0.0],
            vec![0.0, 0.0, 1.0],
        ];
        let d = embedding_dispersion(&spread, 0.9);
        assert_eq!(d.clusters, 3);
        assert!((d.mean_cosine_distance - 1.0).abs() < 1e-9);
        let texts: Vec<(String, String)> = (0..10)
            .map(|i| (i.to_string(), format!("text {i}")))
            .collect();
        let a = hash_sample(&texts, 4);
        assert_eq!(a.len(), 4);
        assert_eq!(a, hash_sample(&texts, 4), "content-determined");
        assert_eq!(hash_sample(&texts, 20).len(), 10);
    }

    #[test]
    fn lengths_of_nothing_are_zero() {
        assert_eq!(Lengths::of(&[]), Lengths::default());
        let l = Lengths::of(&[1.0, 2.0, 3.0, 4.0, 100.0]);
        assert_eq!((l.p50, l.max, l.mean), (3.0, 100.0, 22.0));
    }
}

/// How evenly a corpus covers the values of one field (a synthetic set's `topic`, `audience`,
/// `style`): what phi-1 randomized to make its textbooks diverse.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FieldCoverage {
    /// Records that have the field.
    pub records: usize,
    /// Records per value.
    pub counts: BTreeMap<String, usize>,
    /// Pielou's evenness: the entropy of the value shares over its maximum, ln(values); 1 when
    /// every value has as many records, towards 0 as one dominates (1 for a single value).
    pub evenness: f64,
}

impl FieldCoverage {
    /// Distinct values.
    pub fn values(&self) -> usize {
        self.counts.len()
    }

    /// Fewest and most records of any value.
    pub fn min_max(&self) -> (usize, usize) {
        let min = self.counts.values().copied().min().unwrap_or(0);
        let max = self.counts.values().copied().max().unwrap_or(0);
        (min, max)
    }
}

/// The coverage of `field` over `values` (each record's value of the field, `None` when it has
/// none); `None` when no record has it.
pub fn field_coverage<'a>(
    values: impl IntoIterator<Item = Option<&'a str>>,
) -> Option<FieldCoverage> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for v in values.into_iter().flatten() {
        *counts.entry(v.to_string()).or_default() += 1;
    }
    let records: usize = counts.values().sum();
    if records == 0 {
        return None;
    }
    let k = counts.len();
    let evenness = if k <= 1 {
        1.0
    } else {
        let entropy: f64 = counts
            .values()
            .map(|&c| {
                let p = c as f64 / records as f64;
                -p * p.ln()
            })
            .sum();
        entropy / (k as f64).ln()
    };
    Some(FieldCoverage {
        records,
        counts,
        evenness,
    })
}
