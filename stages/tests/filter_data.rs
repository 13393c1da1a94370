//! Filters on the real shared data (skipped with a message when it is absent).

use std::path::PathBuf;

use pipeline_stages::filter::decontam::{
    decontaminate, load_humaneval, load_mbpp, DecontamOptions,
};
use pipeline_stages::filter::dedup::{
    exact_dedup, near_dedup, ExactDedupOptions, NearDedupOptions,
};
use pipeline_stages::filter::heuristic::{score_records, HeuristicOptions};
use pipeline_stages::filter::shared_data_dir;

fn data_file(rel: &str) -> Option<PathBuf> {
    let Some(dir) = shared_data_dir() else {
        eprintln!("SKIP: shared data not found (set PIPELINE_SHARED_DATA or put shared/data beside the repo)");
        return None;
    };
    let p = dir.join(rel);
    if !p.is_file() {
        eprintln!("SKIP: {} is absent", p.display());
        return None;
    }
    Some(p)
}

fn messy() -> Option<Vec<(String, String)>> {
    let path = data_file("messy/python_files_5000.jsonl")?;
    let text = std::fs::read_to_string(path).unwrap();
    Some(
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    format!(
                        "{}/{}",
                        v["repo"].as_str().unwrap(),
                        v["path"].as_str().unwrap()
                    ),
                    v["content"].as_str().unwrap().to_string(),
                )
            })
            .collect(),
    )
}

#[test]
fn exact_dedup_finds_the_874_duplicate_rows() {
    let Some(recs) = messy() else { return };
    assert_eq!(recs.len(), 5000);
    let (kept, rep) = exact_dedup(&recs, &ExactDedupOptions { normalize: false });
    assert_eq!(kept.len(), 4126);
    assert_eq!(rep.removed_by_reason["exact_duplicate"], 874);
    // Normalising line endings and trailing whitespace merges 5 more copies.
    let (kept, _) = exact_dedup(&recs, &ExactDedupOptions::default());
    assert_eq!(kept.len(), 4121);
}

#[test]
fn near_dedup_on_messy_removes_more_than_exact() {
    let Some(recs) = messy() else { return };
    let (kept_exact, _) = exact_dedup(&recs, &ExactDedupOptions::default());
    let distinct: Vec<&(String, String)> = kept_exact.iter().map(|&i| &recs[i]).collect();
    let (kept, rep) = near_dedup(&distinct, &NearDedupOptions::default()).unwrap();
    eprintln!(
        "near dedup: {} -> {} ({} candidate pairs, {} ms)",
        distinct.len(),
        kept.len(),
        rep.extra["candidate_pairs"],
        rep.elapsed_ms
    );
    // realpython's step-by-step tutorial copies differ by a few lines each.
    assert!(kept.len() < distinct.len());
    assert!(kept.len() > distinct.len() / 2);
}

#[test]
fn planted_humaneval_solution_is_removed_and_clean_records_kept() {
    let Some(he) = data_file("humaneval/HumanEval.jsonl.gz") else {
        return;
    };
    let Some(mb) = data_file("mbpp/mbpp.jsonl") else {
        return;
    };
    let mut eval = load_humaneval(&he).unwrap();
    assert_eq!(eval.len(), 164);
    let mbpp = load_mbpp(&mb).unwrap();
    assert_eq!(mbpp.len(), 974);
    assert_eq!(mbpp[0].task_id, "MBPP/1");
    assert!(mbpp[0].text.contains("assert min_cost("));
    if let Some(sanitized) = data_file("mbpp/sanitized-mbpp.json") {
        // The sanitized set is one JSON array and names the description `prompt`.
        let s = load_mbpp(&sanitized).unwrap();
        assert_eq!(s.len(), 427);
        assert!(s
            .iter()
            .all(|i| i.task_id.starts_with("MBPP/") && i.text.contains("assert")));
    }
    let planted_task = eval[12].clone();
    eval.extend(mbpp);
    let Some(mut recs) = messy() else { return };
    recs.truncate(300);
    let clean_n = recs.len();
    recs.push((
        "planted".to_string(),
        // A reformatted copy inside other code, as it would appear scraped from a repo.
        format!(
            "import os\n\n# helper\n{}\n\nprint(os.getcwd())\n",
            planted_task.text.replace("    ", "\t")
        ),
    ));
    let (kept, rep) = decontaminate(&recs, &eval, &DecontamOptions::default()).unwrap();
    let removed: Vec<&str> = rep.removed.iter().map(|r| r.id.as_str()).collect();
    assert!(removed.contains(&"planted"), "{removed:?}");
    let planted = rep.removed.iter().find(|r| r.id == "planted").unwrap();
    assert_eq!(
        planted.matched.as_deref(),
        Some(planted_task.task_id.as_str())
    );
    assert_eq!(planted.reason, "ngram_overlap");
    // The messy GitHub files are not HumanEval/MBPP copies: nearly all must survive.
    assert!(kept.len() >= clean_n - 3, "{:#?}", rep.removed);
    let json: serde_json::Value = serde_json::from_str(&rep.to_json()).unwrap();
    assert!(json["removed"].as_array().unwrap().len() == rep.removed.len());
}

#[test]
fn heuristic_scores_spread_over_the_messy_set() {
    let Some(recs) = messy() else { return };
    let sample: Vec<&(String, String)> = recs.iter().take(1000).collect();
    let scores = score_records(&sample, &HeuristicOptions::default()).unwrap();
    let parsed = scores.iter().filter(|s| s.features.parses == 1.0).count();
    let mean = scores.iter().map(|s| s.score).sum::<f64>() / scores.len() as f64;
    let high = scores.iter().filter(|s| s.score >= 0.8).count();
    let low = scores.iter().filter(|s| s.score < 0.4).count();
    eprintln!("parsed {parsed}/1000, mean {mean:.3}, >=0.8: {high}, <0.4: {low}");
    // Real repository code mostly parses, and the score separates the good from the bad.
    assert!(parsed > 900);
    assert!(
        high > 20 && low > 20,
        "scores do not spread: high {high}, low {low}"
    );
}

#[test]
fn full_chain_on_messy_with_eval_sets() {
    use pipeline_stages::filter::chain::{load_eval_sets, run_steps, ChainInputs, Step};
    let Some(recs) = messy() else { return };
    let Some(dir) = shared_data_dir() else { return };
    let eval = load_eval_sets(&dir).unwrap();
    assert_eq!(eval.len(), 164 + 974);
    let steps: Vec<Step> = serde_json::from_value(serde_json::json!([
        {"step": "exact_dedup"},
        {"step": "near_dedup"},
        {"step": "decontaminate"},
        {"step": "heuristic"},
    ]))
    .unwrap();
    let out = run_steps(
        &recs,
        &steps,
        &mut ChainInputs {
            eval: &eval,
            seed: 0,
            learned: None,
            embedder: None,
            on_step: &mut |_| Ok(()),
        },
    )
    .unwrap();
    for r in &out.reports {
        eprintln!(
            "{}: {} -> {} {:?} ({} ms)",
            r.filter, r.input, r.kept, r.removed_by_reason, r.elapsed_ms
        );
    }
    // Each step's input is the previous step's output, and the chain ends at `kept`.
    for w in out.reports.windows(2) {
        assert_eq!(w[0].kept, w[1].input);
    }
    assert_eq!(out.reports[0].kept, 4121);
    assert_eq!(out.reports.last().unwrap().kept, out.kept.len());
    assert!(out.kept.windows(2).all(|w| w[0] < w[1]));
    // Every decontamination removal names its eval task.
    assert!(out.reports[2].removed.iter().all(|r| r.matched.is_some()));
    assert!(!out.kept.is_empty() && out.kept.len() < 4121);
}
