//! The usual filter chain in one call: exact dedup → near dedup → decontamination →
//! heuristic score threshold → seeded sample. Each step is optional (a `null`/absent entry
//! in the manifest skips it) and reports separately; later steps see only what earlier ones
//! kept, and all indices returned refer to the original input.
//!
//! The learned scorer is not part of the chain because it needs a loaded model and a
//! trained classifier; run [`super::learned::learned_filter`] on the chain's output.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::decontam::{decontaminate, load_humaneval, load_mbpp, DecontamOptions, EvalItem};
use super::dedup::{exact_dedup, near_dedup, ExactDedupOptions, NearDedupOptions};
use super::heuristic::{heuristic_filter, HeuristicFilterOptions, HeuristicScore};
use super::report::FilterReport;
use super::select::{sample, SampleOptions};
use super::{Result, TextRecord};

/// Options of [`run_chain`]; `None` skips a step. Defaults run every step but sampling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChainOptions {
    /// Exact dedup.
    pub exact_dedup: Option<ExactDedupOptions>,
    /// MinHash near-dedup.
    pub near_dedup: Option<NearDedupOptions>,
    /// 13-gram decontamination (needs eval items; skipped when none are given).
    pub decontaminate: Option<DecontamOptions>,
    /// Heuristic score threshold.
    pub heuristic: Option<HeuristicFilterOptions>,
    /// Final seeded sample.
    pub sample: Option<SampleOptions>,
}

impl Default for ChainOptions {
    fn default() -> Self {
        Self {
            exact_dedup: Some(ExactDedupOptions::default()),
            near_dedup: Some(NearDedupOptions::default()),
            decontaminate: Some(DecontamOptions::default()),
            heuristic: Some(HeuristicFilterOptions::default()),
            sample: None,
        }
    }
}

/// What [`run_chain`] produced.
#[derive(Debug, Clone, Serialize)]
pub struct ChainOutcome {
    /// Indices into the original input of the records that survived every step, ascending.
    pub kept: Vec<usize>,
    /// One report per step that ran, in order.
    pub reports: Vec<FilterReport>,
    /// Heuristic scores of the records that reached the heuristic step, as
    /// `(original index, score)`.
    pub heuristic_scores: Vec<(usize, HeuristicScore)>,
}

/// Runs the chain over `records`; `eval` are the eval tasks for decontamination.
pub fn run_chain<R: TextRecord + Sync>(
    records: &[R],
    eval: &[EvalItem],
    options: &ChainOptions,
) -> Result<ChainOutcome> {
    let mut alive: Vec<usize> = (0..records.len()).collect();
    let mut reports = Vec::new();
    let mut heuristic_scores = Vec::new();
    // Each step works on a view of the survivors and maps its local indices back.
    let view = |alive: &[usize]| -> Vec<&R> { alive.iter().map(|&i| &records[i]).collect() };
    let remap = |alive: &[usize], local: Vec<usize>| -> Vec<usize> {
        local.into_iter().map(|j| alive[j]).collect()
    };

    if let Some(o) = &options.exact_dedup {
        let (kept, rep) = exact_dedup(&view(&alive), o);
        alive = remap(&alive, kept);
        reports.push(rep);
    }
    if let Some(o) = &options.near_dedup {
        let (kept, rep) = near_dedup(&view(&alive), o)?;
        alive = remap(&alive, kept);
        reports.push(rep);
    }
    if let (Some(o), false) = (&options.decontaminate, eval.is_empty()) {
        let (kept, rep) = decontaminate(&view(&alive), eval, o)?;
        alive = remap(&alive, kept);
        reports.push(rep);
    }
    if let Some(o) = &options.heuristic {
        let (kept, scores, rep) = heuristic_filter(&view(&alive), o)?;
        heuristic_scores = alive.iter().copied().zip(scores).collect();
        alive = remap(&alive, kept);
        reports.push(rep);
    }
    if let Some(o) = &options.sample {
        let (kept, rep) = sample(&view(&alive), o);
        alive = remap(&alive, kept);
        reports.push(rep);
    }
    Ok(ChainOutcome {
        kept: alive,
        reports,
        heuristic_scores,
    })
}

/// Loads the standard eval sets from a shared data folder: HumanEval
/// (`humaneval/HumanEval.jsonl.gz`) and all of MBPP (`mbpp/mbpp.jsonl`), 164 + 974 tasks.
pub fn load_eval_sets(data_dir: &Path) -> Result<Vec<EvalItem>> {
    let mut items = load_humaneval(&data_dir.join("humaneval/HumanEval.jsonl.gz"))?;
    items.extend(load_mbpp(&data_dir.join("mbpp/mbpp.jsonl"))?);
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\"\"\"Math helpers.\"\"\"\n\n\ndef square(x):\n    \"\"\"Return x squared.\"\"\"\n    # Multiplication is exact for ints.\n    return x * x\n\n\ndef cube(x):\n    \"\"\"Return x cubed.\"\"\"\n    return x * x * x\n";

    #[test]
    fn chain_maps_indices_back_and_reports_each_step() {
        let leak = "def add_numbers(first, second):\n    \"\"\"Add the first and the second number together and return their sum.\"\"\"\n    return first + second\n";
        let eval = vec![EvalItem {
            task_id: "T/1".into(),
            text: leak.into(),
        }];
        let recs: Vec<(String, String)> = vec![
            ("bad".into(), "x = = 1".into()),
            ("good".into(), GOOD.into()),
            ("dup".into(), GOOD.replace('\n', "\r\n")),
            ("leak".into(), format!("{GOOD}\n{leak}")),
            ("good2".into(), GOOD.replace("square", "sq").replace("cube", "cb") + "\n\ndef other(y):\n    \"\"\"Something else entirely, with different words.\"\"\"\n    return [y, y + 1, y + 2]\n"),
        ];
        let out = run_chain(&recs, &eval, &ChainOptions::default()).unwrap();
        let names: Vec<&str> = out.reports.iter().map(|r| r.filter.as_str()).collect();
        assert_eq!(
            names,
            [
                "exact_dedup",
                "near_dedup",
                "decontaminate",
                "heuristic_score"
            ]
        );
        assert_eq!(out.reports[0].removed[0].id, "dup");
        assert_eq!(out.reports[2].removed[0].id, "leak");
        assert_eq!(out.reports[3].removed[0].id, "bad");
        assert_eq!(out.kept, vec![1, 4], "{:#?}", out.reports);
        assert_eq!(out.heuristic_scores.len(), 3);
        let opts: ChainOptions =
            serde_json::from_str(r#"{"near_dedup": null, "sample": {"n": 1, "seed": 3}}"#).unwrap();
        let out = run_chain(&recs, &[], &opts).unwrap();
        assert_eq!(out.reports.len(), 3);
        assert_eq!(out.kept.len(), 1);
    }
}
