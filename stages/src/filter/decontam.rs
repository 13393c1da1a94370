//! Decontamination: remove training records that overlap the evaluation sets.
//!
//! As phi-1 and NeMo Curator do, a record is contaminated when it shares a contiguous
//! **13-gram of normalised word tokens** with an eval task (tokens: maximal runs of
//! alphanumerics/`_`, lower-cased, see [`word_tokens`]; so whitespace, punctuation and
//! formatting never hide an overlap). The eval side of HumanEval is `prompt +
//! canonical_solution`; of MBPP `text + code + tests`. Eval texts shorter than `n` tokens
//! contribute no n-grams (none exist in HumanEval or MBPP at n = 13).
//!
//! phi-1's two further checks ([`crate::similarity`]) are steps of their own:
//! [`decontaminate_by_embedding`] removes records whose MiniLM embedding has cosine similarity
//! at or above a threshold with an eval task's (paraphrases that share no 13-gram), and
//! [`decontaminate_by_ast`] records whose syntax trees, names and constants normalized, hold
//! at least a threshold share of an eval task's (copies with renamed identifiers).
//!
//! Each removal in the report names the eval task (`matched`) and the reason
//! (`ngram_overlap` with the count of shared n-grams, `embedding_similarity` with the cosine,
//! `ast_similarity` with the match rate).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::report::FilterReport;
use super::text::{ngram_hashes, word_tokens};
use super::{FilterError, Result, TextRecord};
use crate::similarity::ast::{AstIndex, AstOptions};
use crate::similarity::{best_task_per_record, cosine_scores};

/// One evaluation task as decontamination sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalItem {
    /// Task id, e.g. `HumanEval/12` or `MBPP/17`.
    pub task_id: String,
    /// All text of the task that must not leak into training data.
    pub text: String,
}

/// Options of [`decontaminate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DecontamOptions {
    /// n-gram length in word tokens.
    pub ngram: usize,
    /// Shared n-grams needed to call a record contaminated.
    pub min_matches: usize,
}

impl Default for DecontamOptions {
    fn default() -> Self {
        Self {
            ngram: 13,
            min_matches: 1,
        }
    }
}

/// An index of eval-set n-grams, built once and reused over many record sets.
pub struct NgramIndex {
    n: usize,
    /// n-gram hash → indices of the eval items containing it.
    grams: HashMap<u64, Vec<u32>>,
    task_ids: Vec<String>,
}

impl NgramIndex {
    /// Indexes the n-grams of `items`.
    pub fn new(items: &[EvalItem], n: usize) -> Result<Self> {
        if n == 0 {
            return Err(FilterError::InvalidOptions("ngram must be positive".into()));
        }
        if items.len() > u32::MAX as usize {
            return Err(FilterError::InvalidOptions("too many eval items".into()));
        }
        let per_item: Vec<Vec<u64>> = items
            .par_iter()
            .map(|it| ngram_hashes(&word_tokens(&it.text), n))
            .collect();
        let mut grams: HashMap<u64, Vec<u32>> = HashMap::new();
        for (i, hashes) in per_item.into_iter().enumerate() {
            for h in hashes {
                let v = grams.entry(h).or_default();
                if v.last() != Some(&(i as u32)) {
                    v.push(i as u32);
                }
            }
        }
        Ok(Self {
            n,
            grams,
            task_ids: items.iter().map(|i| i.task_id.clone()).collect(),
        })
    }

    /// Number of distinct eval n-grams.
    pub fn len(&self) -> usize {
        self.grams.len()
    }

    /// Whether no eval text was long enough to give an n-gram.
    pub fn is_empty(&self) -> bool {
        self.grams.is_empty()
    }

    /// The eval task sharing the most n-grams with `text`, with that count (ties: lowest
    /// index), or `None` when nothing is shared.
    pub fn best_match(&self, text: &str) -> Option<(&str, usize)> {
        let mut counts: HashMap<u32, usize> = HashMap::new();
        let mut hashes = ngram_hashes(&word_tokens(text), self.n);
        hashes.sort_unstable();
        hashes.dedup();
        for h in hashes {
            if let Some(items) = self.grams.get(&h) {
                for &i in items {
                    *counts.entry(i).or_insert(0) += 1;
                }
            }
        }
        counts
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
            .map(|(i, c)| (self.task_ids[i as usize].as_str(), c))
    }
}

/// Removes records sharing at least `min_matches` n-grams with one eval task. Returns kept
/// indices in input order and a report listing each removal with its eval task.
pub fn decontaminate<R: TextRecord + Sync>(
    records: &[R],
    eval: &[EvalItem],
    options: &DecontamOptions,
) -> Result<(Vec<usize>, FilterReport)> {
    let start = Instant::now();
    let index = NgramIndex::new(eval, options.ngram)?;
    let matches: Vec<Option<(String, usize)>> = records
        .par_iter()
        .map(|r| {
            index
                .best_match(r.text())
                .filter(|(_, c)| *c >= options.min_matches.max(1))
                .map(|(t, c)| (t.to_string(), c))
        })
        .collect();
    let mut report = FilterReport::new("decontaminate", records.len());
    let mut kept = Vec::new();
    for (i, m) in matches.into_iter().enumerate() {
        match m {
            Some((task, count)) => report.remove_matched(
                records[i].id(),
                "ngram_overlap",
                Some(task.clone()),
                format!("shares {count} {}-gram(s) with {task}", options.ngram),
            ),
            None => kept.push(i),
        }
    }
    report
        .extra
        .insert("eval_ngrams".into(), index.len() as f64);
    report.extra.insert("eval_items".into(), eval.len() as f64);
    Ok((kept, report.finish(start)))
}

/// Removes records whose embedding has cosine similarity `>= threshold` with any eval item's
/// embedding. `record_emb[i]` belongs to `records[i]`, `eval_emb[j]` to `eval[j]`; vectors need
/// not be normalised.
pub fn decontaminate_by_embedding<R: TextRecord + Sync>(
    records: &[R],
    record_emb: &[Vec<f32>],
    eval: &[EvalItem],
    eval_emb: &[Vec<f32>],
    threshold: f32,
) -> Result<(Vec<usize>, FilterReport)> {
    let start = Instant::now();
    if records.len() != record_emb.len() || eval.len() != eval_emb.len() {
        return Err(FilterError::InvalidOptions(
            "need exactly one embedding per record and per eval item".into(),
        ));
    }
    let unit = |v: &Vec<f32>| {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    let ev: Vec<Vec<f32>> = eval_emb.iter().map(unit).collect();
    let rv: Vec<Vec<f32>> = record_emb.iter().map(unit).collect();
    let best = best_task_per_record(&cosine_scores(&rv, &ev));
    let mut report = removals(
        "decontaminate_embedding",
        records,
        eval,
        &best,
        threshold as f64,
        "embedding_similarity",
        "cosine",
    );
    report.extra.insert("threshold".into(), threshold as f64);
    Ok((kept_below(&best, threshold as f64), report.finish(start)))
}

/// Removes records whose AST match rate ([`crate::similarity::ast`]) with some eval item's
/// text is `>= threshold`: copies of eval code with renamed identifiers and changed constants,
/// which share no 13-gram. Eval texts should be code (e.g. HumanEval's prompt and canonical
/// solution); prose in them only adds error nodes that never match.
pub fn decontaminate_by_ast<R: TextRecord + Sync>(
    records: &[R],
    eval: &[EvalItem],
    threshold: f64,
    options: &AstOptions,
) -> Result<(Vec<usize>, FilterReport)> {
    let start = Instant::now();
    let codes: Vec<&str> = eval.iter().map(|e| e.text.as_str()).collect();
    let index = AstIndex::new(&codes, options)?;
    let texts: Vec<&str> = records.iter().map(|r| r.text()).collect();
    let best = best_task_per_record(&index.match_rates_all(&texts));
    let mut report = removals(
        "decontaminate_ast",
        records,
        eval,
        &best,
        threshold,
        "ast_similarity",
        "AST match rate",
    );
    report.extra.insert("threshold".into(), threshold);
    report
        .extra
        .insert("min_nodes".into(), options.min_nodes as f64);
    report.extra.insert(
        "eval_items_without_subtrees".into(),
        index.empty_tasks() as f64,
    );
    Ok((kept_below(&best, threshold), report.finish(start)))
}

/// Indices of the records whose best score is below `threshold` (or that match nothing).
fn kept_below(best: &[Option<(usize, f64)>], threshold: f64) -> Vec<usize> {
    (0..best.len())
        .filter(|&i| !matches!(best[i], Some((_, s)) if s >= threshold))
        .collect()
}

/// A report removing every record whose best score is at least `threshold`, naming the eval
/// task it resembled.
fn removals<R: TextRecord>(
    filter: &str,
    records: &[R],
    eval: &[EvalItem],
    best: &[Option<(usize, f64)>],
    threshold: f64,
    reason: &str,
    measure: &str,
) -> FilterReport {
    let mut report = FilterReport::new(filter, records.len());
    for (record, b) in records.iter().zip(best) {
        if let Some((task, score)) = *b {
            if score >= threshold {
                let task = &eval[task].task_id;
                report.remove_matched(
                    record.id(),
                    reason,
                    Some(task.clone()),
                    format!("{measure} {score:.3} >= {threshold} with {task}"),
                );
            }
        }
    }
    report
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| FilterError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_line(path: &Path, line: &str) -> Result<serde_json::Value> {
    serde_json::from_str(line).map_err(|source| FilterError::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn field(path: &Path, v: &serde_json::Value, key: &str) -> Result<String> {
    match v.get(key) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
        Some(serde_json::Value::Array(a)) => Ok(a
            .iter()
            .filter_map(|x| x.as_str())
            .collect::<Vec<_>>()
            .join("\n")),
        _ => Err(FilterError::InvalidOptions(format!(
            "{}: a row lacks field `{key}`; is this the right eval file?",
            path.display()
        ))),
    }
}

/// Loads HumanEval (`HumanEval.jsonl.gz` or an uncompressed `.jsonl`) as eval items whose
/// text is `prompt + canonical_solution`.
pub fn load_humaneval(path: &Path) -> Result<Vec<EvalItem>> {
    let raw = read_file(path)?;
    let text = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_string(&mut s)
            .map_err(|source| FilterError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        s
    } else {
        String::from_utf8_lossy(&raw).into_owned()
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v = parse_line(path, l)?;
            Ok(EvalItem {
                task_id: field(path, &v, "task_id")?,
                text: format!(
                    "{}{}",
                    field(path, &v, "prompt")?,
                    field(path, &v, "canonical_solution")?
                ),
            })
        })
        .collect()
}

/// Loads MBPP (`mbpp.jsonl`, or the JSON array `sanitized-mbpp.json`) as eval items
/// `MBPP/<id>` whose text is the description, the code and the tests.
pub fn load_mbpp(path: &Path) -> Result<Vec<EvalItem>> {
    let raw = read_file(path)?;
    let text = String::from_utf8_lossy(&raw);
    let rows: Vec<serde_json::Value> = if text.trim_start().starts_with('[') {
        match parse_line(path, &text)? {
            serde_json::Value::Array(a) => a,
            _ => Vec::new(),
        }
    } else {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| parse_line(path, l))
            .collect::<Result<_>>()?
    };
    rows.iter()
        .map(|v| {
            // The full file calls the description `text`, the sanitized one `prompt`.
            let desc = field(path, v, "text").or_else(|_| field(path, v, "prompt"))?;
            Ok(EvalItem {
                task_id: format!("MBPP/{}", field(path, v, "task_id")?),
                text: format!(
                    "{desc}\n{}\n{}",
                    field(path, v, "code")?,
                    field(path, v, "test_list")?
                ),
            })
        })
        .collect()
}

/// Eval records as decontamination items: the `task_id` is the record's `id_field` (its
/// provenance when absent), the text its `text_fields` joined with newlines (empty: every field
/// but the id, e.g. HumanEval's prompt, canonical solution and tests).
pub fn eval_items(
    records: &[crate::records::Record],
    id_field: &str,
    text_fields: &[String],
) -> miette::Result<Vec<EvalItem>> {
    records
        .iter()
        .map(|r| {
            let task_id = r
                .get(id_field)
                .map(str::to_string)
                .unwrap_or_else(|| r.provenance.to_string());
            let text = if text_fields.is_empty() {
                r.fields
                    .iter()
                    .filter(|(k, _)| *k != id_field)
                    .map(|(_, v)| v)
                    .collect::<Vec<_>>()
                    .join("\n")
            } else {
                let mut parts = Vec::new();
                for f in text_fields {
                    parts.push(r.require(f).map_err(|e| {
                        miette::miette!(
                            help = "fix `eval_text_fields`",
                            "eval record {}: no field `{}` (it has: {})",
                            e.location,
                            e.field,
                            e.available
                        )
                    })?);
                }
                parts.join("\n")
            };
            Ok(EvalItem { task_id, text })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval() -> Vec<EvalItem> {
        vec![
            EvalItem {
                task_id: "T/0".into(),
                text: "def add(a, b):\n    \"\"\"Add two numbers a and b and return the sum of both.\"\"\"\n    return a + b\n".into(),
            },
            EvalItem {
                task_id: "T/1".into(),
                text: "short text".into(),
            },
        ]
    }

    #[test]
    fn reformatted_copy_is_removed_and_clean_kept() {
        let recs = vec![
            (
                "leak".to_string(),
                "# copied\ndef   ADD(a,b):\n  '''add two numbers A and B and return the sum of both'''\n  return a+b".to_string(),
            ),
            ("clean".to_string(), "def mul(a, b):\n    return a * b\n".to_string()),
            ("short".to_string(), "short text".to_string()),
        ];
        let (kept, rep) = decontaminate(&recs, &eval(), &DecontamOptions::default()).unwrap();
        assert_eq!(kept, vec![1, 2]);
        assert_eq!(rep.removed[0].matched.as_deref(), Some("T/0"));
        assert_eq!(rep.removed_by_reason["ngram_overlap"], 1);
        let strict = DecontamOptions {
            min_matches: 100,
            ..Default::default()
        };
        assert_eq!(decontaminate(&recs, &eval(), &strict).unwrap().0.len(), 3);
    }

    #[test]
    fn embedding_decontamination_uses_cosine() {
        let recs = vec![
            ("a".to_string(), String::new()),
            ("b".to_string(), String::new()),
        ];
        let rec_emb = vec![vec![2.0, 0.1], vec![0.0, 1.0]];
        let ev = eval();
        let ev_emb = vec![vec![1.0, 0.0], vec![-1.0, 0.0]];
        let (kept, rep) = decontaminate_by_embedding(&recs, &rec_emb, &ev, &ev_emb, 0.95).unwrap();
        assert_eq!(kept, vec![1]);
        assert_eq!(rep.removed[0].matched.as_deref(), Some("T/0"));
        assert!(decontaminate_by_embedding(&recs, &rec_emb[..1], &ev, &ev_emb, 0.9).is_err());
    }
}
