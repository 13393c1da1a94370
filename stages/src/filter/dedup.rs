//! Exact and near-duplicate removal.
//!
//! **Exact**: blake3 of the text, by default after [`normalize_for_hash`] (CRLF → LF,
//! trailing whitespace and surrounding blank lines dropped); the first occurrence is kept.
//!
//! **Near-duplicates**: MinHash + locality-sensitive hashing, as in the dedup steps of
//! phi-1's and most code-LM pipelines:
//! - shingles: contiguous 5-grams of lower-cased word tokens ([`word_tokens`]), hashed to
//!   64 bits; a text with fewer than 5 tokens is one shingle of all its tokens;
//! - 128 permutations `h_i(x) = (a_i * x + b_i) mod (2^61 - 1)`, with `a_i, b_i` drawn from
//!   `StdRng::seed_from_u64(seed)` (default seed 42), so signatures are reproducible;
//! - LSH with 16 bands x 8 rows: two texts become candidates when any band matches; the
//!   implied Jaccard threshold, where the candidate probability `1 - (1 - J^r)^b` crosses
//!   one half, is about `(1/b)^(1/r)` = `(1/16)^(1/8)` ≈ 0.71 (a pair at J = 0.8 is found with
//!   probability 0.95);
//! - candidates are then verified with the *exact* Jaccard similarity of their shingle sets
//!   against `jaccard_threshold` (default 0.8), so LSH false positives never remove anything;
//! - verified pairs are merged with union-find and each cluster keeps its earliest record.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::report::FilterReport;
use super::text::{ngram_hashes, normalize_for_hash, word_tokens};
use super::{FilterError, Result, TextRecord};

/// Options of [`exact_dedup`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ExactDedupOptions {
    /// Hash the normalised text (line endings, trailing whitespace) instead of the raw bytes.
    pub normalize: bool,
}

impl Default for ExactDedupOptions {
    fn default() -> Self {
        Self { normalize: true }
    }
}

/// Removes exact duplicates, keeping each text's first occurrence. Returns kept indices in
/// input order and a report naming, for each removed record, the record it repeats.
pub fn exact_dedup<R: TextRecord + Sync>(
    records: &[R],
    options: &ExactDedupOptions,
) -> (Vec<usize>, FilterReport) {
    let start = Instant::now();
    let hashes: Vec<blake3::Hash> = records
        .par_iter()
        .map(|r| {
            if options.normalize {
                blake3::hash(normalize_for_hash(r.text()).as_bytes())
            } else {
                blake3::hash(r.text().as_bytes())
            }
        })
        .collect();
    let mut first: HashMap<blake3::Hash, usize> = HashMap::new();
    let mut report = FilterReport::new("exact_dedup", records.len());
    let mut kept = Vec::new();
    for (i, h) in hashes.iter().enumerate() {
        match first.get(h) {
            Some(&j) => report.remove(
                records[i].id(),
                "exact_duplicate",
                format!("same content as {}", records[j].id()),
            ),
            None => {
                first.insert(*h, i);
                kept.push(i);
            }
        }
    }
    (kept, report.finish(start))
}

/// Options of [`near_dedup`]; see the module docs for what each means.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct NearDedupOptions {
    /// Word tokens per shingle.
    pub shingle_size: usize,
    /// MinHash permutations; must equal `bands * rows`.
    pub num_perm: usize,
    /// LSH bands.
    pub bands: usize,
    /// Rows (signature entries) per band.
    pub rows: usize,
    /// Exact shingle-set Jaccard at or above which a candidate pair counts as duplicate.
    pub jaccard_threshold: f64,
    /// Seed of the permutation coefficients.
    pub seed: u64,
}

impl Default for NearDedupOptions {
    fn default() -> Self {
        Self {
            shingle_size: 5,
            num_perm: 128,
            bands: 16,
            rows: 8,
            jaccard_threshold: 0.8,
            seed: 42,
        }
    }
}

impl NearDedupOptions {
    /// The Jaccard similarity at which LSH starts to catch pairs: `(1/bands)^(1/rows)`.
    pub fn implied_threshold(&self) -> f64 {
        (1.0 / self.bands as f64).powf(1.0 / self.rows as f64)
    }

    fn validate(&self) -> Result<()> {
        if self.shingle_size == 0 || self.bands == 0 || self.rows == 0 {
            return Err(FilterError::InvalidOptions(
                "shingle_size, bands and rows must be positive".into(),
            ));
        }
        if self.bands * self.rows != self.num_perm {
            return Err(FilterError::InvalidOptions(format!(
                "bands x rows ({} x {}) must equal num_perm ({}); adjust one of them",
                self.bands, self.rows, self.num_perm
            )));
        }
        if !(0.0..=1.0).contains(&self.jaccard_threshold) {
            return Err(FilterError::InvalidOptions(format!(
                "jaccard_threshold must be in [0, 1], got {}",
                self.jaccard_threshold
            )));
        }
        Ok(())
    }
}

const MERSENNE_61: u64 = (1 << 61) - 1;

/// `v mod (2^61 - 1)` by folding the high bits, avoiding a slow 128-bit division.
fn mod_mersenne(v: u128) -> u64 {
    let m = MERSENNE_61 as u128;
    let r = (v & m) + (v >> 61);
    let r = (r & m) + (r >> 61);
    let r = r as u64;
    if r >= MERSENNE_61 {
        r - MERSENNE_61
    } else {
        r
    }
}

/// A seeded MinHash signer.
pub struct MinHasher {
    coeffs: Vec<(u64, u64)>,
    shingle_size: usize,
}

impl MinHasher {
    /// Draws `num_perm` permutations from `seed`.
    pub fn new(num_perm: usize, shingle_size: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let coeffs = (0..num_perm)
            .map(|_| {
                (
                    rng.random_range(1..MERSENNE_61),
                    rng.random_range(0..MERSENNE_61),
                )
            })
            .collect();
        Self {
            coeffs,
            shingle_size,
        }
    }

    /// The shingle set (hashed word n-grams) of a text.
    pub fn shingles(&self, text: &str) -> HashSet<u64> {
        let tokens = word_tokens(text);
        if tokens.is_empty() {
            return HashSet::new();
        }
        let n = self.shingle_size.min(tokens.len());
        ngram_hashes(&tokens, n).into_iter().collect()
    }

    /// The MinHash signature of a shingle set (all `u64::MAX` for an empty set).
    pub fn signature(&self, shingles: &HashSet<u64>) -> Vec<u64> {
        self.coeffs
            .iter()
            .map(|&(a, b)| {
                shingles
                    .iter()
                    .map(|&x| mod_mersenne(a as u128 * (x % MERSENNE_61) as u128 + b as u128))
                    .min()
                    .unwrap_or(u64::MAX)
            })
            .collect()
    }
}

/// Exact Jaccard similarity of two sets (1 for two empty sets).
pub fn jaccard(a: &HashSet<u64>, b: &HashSet<u64>) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let inter = a.intersection(b).count();
    inter as f64 / (a.len() + b.len() - inter) as f64
}

fn find(parent: &mut [usize], mut x: usize) -> usize {
    while parent[x] != x {
        parent[x] = parent[parent[x]];
        x = parent[x];
    }
    x
}

/// Removes near-duplicates; each cluster keeps its earliest record. Returns kept indices in
/// input order and a report naming the kept record and the Jaccard similarity for each
/// removal.
pub fn near_dedup<R: TextRecord + Sync>(
    records: &[R],
    options: &NearDedupOptions,
) -> Result<(Vec<usize>, FilterReport)> {
    options.validate()?;
    let start = Instant::now();
    let hasher = MinHasher::new(options.num_perm, options.shingle_size, options.seed);
    let shingles: Vec<HashSet<u64>> = records
        .par_iter()
        .map(|r| hasher.shingles(r.text()))
        .collect();
    let sigs: Vec<Vec<u64>> = shingles.par_iter().map(|s| hasher.signature(s)).collect();

    let mut candidates: HashSet<(usize, usize)> = HashSet::new();
    for band in 0..options.bands {
        let mut buckets: HashMap<&[u64], Vec<usize>> = HashMap::new();
        for (i, sig) in sigs.iter().enumerate() {
            // Empty texts share the all-MAX signature but are left to exact dedup.
            if shingles[i].is_empty() {
                continue;
            }
            let key = &sig[band * options.rows..(band + 1) * options.rows];
            buckets.entry(key).or_default().push(i);
        }
        for members in buckets.values().filter(|m| m.len() > 1) {
            // Pair each member with the bucket's first; union-find closes the rest
            // transitively, and verification still uses exact Jaccard.
            for w in members.windows(2) {
                candidates.insert((w[0], w[1]));
            }
            for &m in &members[1..] {
                candidates.insert((members[0], m));
            }
        }
    }
    let mut pairs: Vec<(usize, usize)> = candidates.into_iter().collect();
    pairs.sort_unstable();
    let verified: Vec<(usize, usize, f64)> = pairs
        .par_iter()
        .filter_map(|&(i, j)| {
            let s = jaccard(&shingles[i], &shingles[j]);
            (s >= options.jaccard_threshold).then_some((i, j, s))
        })
        .collect();

    let mut parent: Vec<usize> = (0..records.len()).collect();
    for &(i, j, _) in &verified {
        let (a, b) = (find(&mut parent, i), find(&mut parent, j));
        // The smaller index becomes the root, so each cluster keeps its earliest record.
        if a != b {
            let (lo, hi) = (a.min(b), a.max(b));
            parent[hi] = lo;
        }
    }
    let mut best_sim: HashMap<usize, f64> = HashMap::new();
    for &(i, j, s) in &verified {
        for k in [i, j] {
            let e = best_sim.entry(k).or_insert(0.0);
            *e = e.max(s);
        }
    }
    let mut report = FilterReport::new("near_dedup", records.len());
    let mut kept = Vec::new();
    for i in 0..records.len() {
        let root = find(&mut parent, i);
        if root == i {
            kept.push(i);
        } else {
            report.remove(
                records[i].id(),
                "near_duplicate",
                format!(
                    "near-duplicate of {} (best verified Jaccard {:.3})",
                    records[root].id(),
                    best_sim.get(&i).copied().unwrap_or(0.0)
                ),
            );
        }
    }
    report
        .extra
        .insert("implied_threshold".into(), options.implied_threshold());
    report
        .extra
        .insert("candidate_pairs".into(), pairs.len() as f64);
    report
        .extra
        .insert("verified_pairs".into(), verified.len() as f64);
    Ok((kept, report.finish(start)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(seed: usize) -> String {
        let mut s = String::new();
        for i in 0..40 {
            s.push_str(&format!(
                "def func_{seed}_{i}(alpha, beta):\n    return alpha * {i} + beta - {seed}\n\n"
            ));
        }
        s
    }

    #[test]
    fn exact_dedup_normalises_line_endings() {
        let recs = vec![
            ("a".to_string(), "x = 1\ny = 2\n".to_string()),
            ("b".to_string(), "x = 1  \r\ny = 2".to_string()),
            ("c".to_string(), "x = 2\n".to_string()),
        ];
        let (kept, rep) = exact_dedup(&recs, &ExactDedupOptions::default());
        assert_eq!(kept, vec![0, 2]);
        assert_eq!(rep.removed[0].detail, "same content as a");
        let (kept, _) = exact_dedup(&recs, &ExactDedupOptions { normalize: false });
        assert_eq!(kept, vec![0, 1, 2]);
    }

    #[test]
    fn mersenne_reduction_matches_division() {
        for v in [
            0u128,
            1,
            MERSENNE_61 as u128,
            u64::MAX as u128 * 3 + 17,
            (MERSENNE_61 as u128 - 1) * (MERSENNE_61 as u128 - 1) + MERSENNE_61 as u128,
        ] {
            assert_eq!(mod_mersenne(v) as u128, v % MERSENNE_61 as u128, "{v}");
        }
    }

    #[test]
    fn minhash_estimates_jaccard() {
        let h = MinHasher::new(256, 5, 1);
        let a = h.shingles(&body(1));
        let mut edited = body(1);
        edited.push_str(&body(2)[..600]);
        let b = h.shingles(&edited);
        let (sa, sb) = (h.signature(&a), h.signature(&b));
        let est = sa.iter().zip(&sb).filter(|(x, y)| x == y).count() as f64 / 256.0;
        assert!(
            (est - jaccard(&a, &b)).abs() < 0.1,
            "{est} vs {}",
            jaccard(&a, &b)
        );
    }

    #[test]
    fn near_dedup_finds_planted_near_duplicates_only() {
        let mut recs: Vec<(String, String)> =
            (0..30).map(|i| (format!("doc{i}"), body(i))).collect();
        // Planted: a copy with one function renamed and a trailing comment added.
        let planted = body(3).replace("func_3_7(", "renamed(") + "# end of file\n";
        recs.push(("planted".into(), planted));
        let (kept, rep) = near_dedup(&recs, &NearDedupOptions::default()).unwrap();
        assert_eq!(kept.len(), 30, "{rep:?}");
        assert_eq!(rep.removed.len(), 1);
        assert_eq!(rep.removed[0].id, "planted");
        assert!(rep.removed[0].detail.contains("doc3"));
        // (1/16)^(1/8) = 2^(-1/2).
        assert!((rep.extra["implied_threshold"] - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-9);
        let bad = NearDedupOptions {
            bands: 10,
            ..Default::default()
        };
        assert!(near_dedup(&recs, &bad).is_err());
    }
}
