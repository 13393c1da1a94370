//! The `report` kind on hand-made grade artifacts: variants, paired comparisons, filter
//! statistics, loss curves and side-by-side completions reach report.md/.html/.json.

mod kinds_eval_support;

use std::path::Path;

use kinds_eval_support::{run_stage, write_problems};
use pipeline_stages::artifacts::FilterReportArtifact;
use pipeline_stages::evalsets::{replication_problems, DEFAULT_INSTRUCTION_TEMPLATE};
use pipeline_stages::grade::passk::summarize;
use pipeline_stages::grade::{GradeReport, Isolation, SampleResult, Status, TaskCounts};
use pipeline_stages::kinds::report::Report;
use pipeline_stages::report::variants::{ancestor_of, variant_names, Producer};
use pipeline_stages::report::FilterStats;
use pipeline_stages::report::ReportData;

/// Writes a grades artifact where task `i` passes iff `pass[i]`.
fn write_grades(dir: &Path, tasks: &[&str], pass: &[bool], tag: &str) {
    write_sampled_grades(dir, tasks, pass, 1, tag);
}

/// Writes a grades artifact of `n` samples per task, all passing for task `i` iff `pass[i]`.
fn write_sampled_grades(dir: &Path, tasks: &[&str], pass: &[bool], n: u64, tag: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let results: Vec<SampleResult> = tasks
        .iter()
        .zip(pass)
        .flat_map(|(t, &p)| std::iter::repeat_n((t, p), n as usize))
        .map(|(t, p)| SampleResult {
            task_id: t.to_string(),
            completion: format!("    return {tag}\n"),
            passed: p,
            result: if p {
                "passed".into()
            } else {
                "failed: AssertionError".into()
            },
            status: if p { Status::Passed } else { Status::Failed },
            error: None,
            duration_s: 0.01,
            extra: Default::default(),
        })
        .collect();
    let counts: Vec<TaskCounts> = tasks
        .iter()
        .zip(pass)
        .map(|(t, &p)| TaskCounts {
            task_id: t.to_string(),
            n,
            c: p as u64 * n,
        })
        .collect();
    let report = GradeReport {
        pass_at_k: summarize(&counts, &[1]),
        tasks: counts,
        results: results.clone(),
        tasks_without_samples: 0,
        status_counts: Default::default(),
        isolation: Isolation::default(),
        python: "python3".into(),
    };
    let mut summary = serde_json::to_value(&report).unwrap();
    summary.as_object_mut().unwrap().remove("results");
    std::fs::write(dir.join("summary.json"), summary.to_string()).unwrap();
    let lines: String = results
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    std::fs::write(dir.join("results.jsonl"), lines).unwrap();
}

#[test]
fn report_combines_variants_filters_losses_and_completions() {
    let tmp = tempfile::tempdir().unwrap();
    let problems: Vec<_> = replication_problems(DEFAULT_INSTRUCTION_TEMPLATE).unwrap();
    let ids: Vec<&str> = problems.iter().map(|p| p.task_id.as_str()).collect();
    let problems_dir = tmp.path().join("problems");
    write_problems(&problems_dir, &problems);
    let base = tmp.path().join("base");
    let better = tmp.path().join("better");
    write_grades(
        &base,
        &ids,
        &[
            true, false, false, false, false, true, false, false, false, false,
        ],
        "BASE_MARK",
    );
    write_grades(&better, &ids, &[true; 10], "BETTER_MARK");

    let filters = tmp.path().join("filters");
    std::fs::create_dir_all(&filters).unwrap();
    std::fs::write(
        filters.join("report.json"),
        serde_json::json!({"reports": [{"filter": "heuristic_score", "input": 100, "kept": 60,
            "removed_by_reason": {"below_threshold": 30, "too_short": 10}, "removed": [],
            "histogram": {"min": 0.0, "max": 1.0, "counts": [10, 20, 30, 40]},
            "elapsed_ms": 3, "extra": {"threshold": 0.5}}]})
        .to_string(),
    )
    .unwrap();
    let losses = tmp.path().join("losses");
    std::fs::create_dir_all(&losses).unwrap();
    std::fs::write(
        losses.join("metrics.jsonl"),
        "{\"step\": 1, \"loss\": 2.5}\n{\"step\": 2, \"loss\": 2.0}\n",
    )
    .unwrap();

    let ran = run_stage::<Report>(
        tmp.path(),
        "report",
        serde_json::json!({"title": "Clean vs messy <test>", "max_completion_rows": 3, "benchmark": "Replication"}),
        &[
            ("grades", &[base.as_path(), better.as_path()]),
            ("filters", &[filters.as_path()]),
            ("losses", &[losses.as_path()]),
            ("problems", &[problems_dir.as_path()]),
        ],
        0,
    )
    .unwrap();
    let out = &ran.outputs["report"];
    let data: ReportData =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    // Standalone contexts name every input after its slot, so the second is made unique.
    let names: Vec<&str> = data.variants.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["grades", "grades #2"]);
    assert_eq!(data.variants[0].pass_at_k[0].value, 0.2);
    assert_eq!(data.variants[1].pass_at_k[0].value, 1.0);
    assert_eq!(data.variants[0].benchmark, "Replication");
    assert_eq!(data.comparisons.len(), 1);
    let c = &data.comparisons[0];
    assert_eq!((c.a.as_str(), c.b.as_str()), ("grades", "grades #2"));
    assert!((c.diff - 0.8).abs() < 1e-12);
    assert_eq!(c.discordant, Some((8, 0)));
    assert_eq!(data.filters.len(), 1);
    assert_eq!((data.filters[0].total, data.filters[0].kept), (100, 60));
    assert_eq!(
        data.filters[0].histograms[0].edges,
        [0.0, 0.25, 0.5, 0.75, 1.0]
    );
    assert_eq!(data.filters[0].histograms[0].threshold, Some(0.5));
    assert_eq!(data.completions.len(), 3);
    // Tasks where the variants disagree come first, and the report says how many it shows.
    let disagree = |row: &pipeline_stages::report::CompletionRow| {
        let passed = row
            .completions
            .iter()
            .filter(|c| c.passed == Some(true))
            .count();
        passed > 0 && passed < row.completions.len()
    };
    assert!(disagree(&data.completions[0]), "{:?}", data.completions[0]);
    assert!(
        data.completions_note.starts_with("3 of "),
        "{}",
        data.completions_note
    );
    // Problem 0 passes in both variants; problem 1 is the first where they disagree.
    let first = &data.completions[0];
    assert_eq!(first.task_id, problems[1].task_id);
    assert_eq!(first.prompt, problems[1].prompt);
    assert_eq!(first.completions[0].outcome, "AssertionError");
    assert_eq!(first.completions[1].completion, "    return BETTER_MARK\n");
    // The loss curve's producer (`losses`) matches no variant: noted, not silently dropped.
    assert!(data.summary.contains("losses"), "{}", data.summary);
    assert!(data.manifest.contains("grades: grades"));
    assert_eq!(data.cache_keys.len(), 5);

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("Clean vs messy"));
    assert!(md.contains("BETTER_MARK"));
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("Clean vs messy &lt;test&gt;"));
    assert!(!html.contains("<test>"));
    assert_eq!(ran.metadata["comparisons"], 1);

    // A named baseline that does not exist is an error naming the choices.
    let err = run_stage::<Report>(
        tmp.path(),
        "report2",
        serde_json::json!({"baseline": "nope"}),
        &[("grades", &[base.as_path(), better.as_path()])],
        0,
    )
    .err()
    .unwrap();
    assert!(format!("{err:?}").contains("nope"), "{err:?}");
}

/// A producer as the engine names it: `grade@messy,1` has matrix values `messy` and `1`.
fn p(instance: &str) -> Producer {
    match instance.split_once('@') {
        None => Producer::plain(instance),
        Some((base, values)) => Producer {
            base: base.into(),
            labels: values
                .split(',')
                .enumerate()
                .map(|(i, v)| (format!("k{i}"), v.to_string()))
                .collect(),
        },
    }
}

fn names(instances: &[&str]) -> Vec<String> {
    variant_names(&instances.iter().map(|i| p(i)).collect::<Vec<_>>())
}

#[test]
fn variant_names_say_what_sets_each_stage_apart() {
    assert_eq!(
        names(&["grade-base", "grade@textbook", "grade@messy"]),
        ["base", "textbook", "messy"]
    );
    assert_eq!(
        names(&[
            "grade-base@humaneval",
            "grade-textbook@1,humaneval",
            "grade@messy,1,humaneval",
            "grade-greedy-base@humaneval",
        ]),
        [
            "base,humaneval",
            "textbook,1,humaneval",
            "messy,1,humaneval",
            "greedy-base,humaneval"
        ]
    );
    // A single stage keeps its name; clashing names fall back to the stage names.
    assert_eq!(names(&["grade"]), ["grade"]);
    assert_eq!(names(&["grade@messy"]), ["messy"]);
    assert_eq!(names(&["a-x@v", "b-x@v"]), ["a-x,v", "b-x,v"]);
    assert_eq!(
        names(&["x-a@v", "y-a@v", "x-a@v"]),
        ["x-a@v", "y-a,v", "x-a@v #3"]
    );
}

#[test]
fn loss_curves_find_every_variant_their_training_produced() {
    let labelled = |pairs: &[(&str, &str)]| Producer::with_labels("x", pairs);
    let losses = vec![
        (labelled(&[("data", "textbook"), ("seed", "1")]), 1.0),
        (labelled(&[("data", "messy"), ("seed", "1")]), 2.0),
        (labelled(&[("data", "messy")]), 3.0),
    ];
    let first = |graded: &[(&str, &str)]| ancestor_of(&labelled(graded), &losses).map(|l| l.1);
    assert_eq!(
        first(&[("data", "textbook"), ("seed", "1"), ("bench", "humaneval")]),
        Some(1.0)
    );
    // The most specific training run wins; an untrained variant has none.
    assert_eq!(
        first(&[("data", "messy"), ("seed", "1"), ("bench", "humaneval")]),
        Some(2.0)
    );
    assert_eq!(
        first(&[("data", "messy"), ("seed", "2"), ("bench", "humaneval")]),
        Some(3.0)
    );
    assert_eq!(first(&[("bench", "humaneval")]), None);
    assert_eq!(first(&[("data", "textbook"), ("seed", "2")]), None);
    // A producer without matrix values is nobody's ancestor.
    assert!(!Producer::plain("train").is_ancestor_of(&labelled(&[("data", "messy")])));
}

#[test]
fn filter_reports_in_every_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let one = serde_json::json!({"filter": "exact_dedup", "input": 10, "kept": 7, "removed_by_reason": {"exact_duplicate": 3}, "histogram": null});
    for (shape, n) in [
        (one.clone(), 1),
        (serde_json::json!([one.clone(), one.clone()]), 2),
    ] {
        let path = tmp.path().join("report.json");
        std::fs::write(&path, shape.to_string()).unwrap();
        let stats: Vec<FilterStats> = FilterReportArtifact::read(tmp.path())
            .unwrap()
            .iter()
            .map(|r| FilterStats::from_report(format!("filter@messy: {}", r.filter), r))
            .collect();
        assert_eq!(stats.len(), n);
        assert_eq!(stats[0].dataset, "filter@messy: exact_dedup");
        assert_eq!(stats[0].reasons[0].count, 3);
        assert!(stats[0].histograms.is_empty());
    }
    std::fs::write(tmp.path().join("report.json"), "{\"filter\": \"x\"}").unwrap();
    let err = FilterReportArtifact::read(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("missing field `input`"), "{err}");
}

/// Greedy and sampled grades of the same variants: each is compared only with a baseline
/// graded with as many samples (a greedy pass against a sampled estimate is no comparison).
#[test]
fn greedy_and_sampled_grades_are_compared_within_their_own_kind() {
    let tmp = tempfile::tempdir().unwrap();
    let problems: Vec<_> = replication_problems(DEFAULT_INSTRUCTION_TEMPLATE).unwrap();
    let ids: Vec<&str> = problems.iter().map(|p| p.task_id.as_str()).collect();
    let problems_dir = tmp.path().join("problems");
    write_problems(&problems_dir, &problems);
    let mut some = [false; 10];
    some[0] = true;
    let dirs: Vec<_> = ["greedy-base", "greedy", "sampled-base", "sampled"]
        .iter()
        .map(|d| tmp.path().join(d))
        .collect();
    write_grades(&dirs[0], &ids, &some, "A");
    write_grades(&dirs[1], &ids, &[true; 10], "B");
    write_sampled_grades(&dirs[2], &ids, &some, 10, "C");
    write_sampled_grades(&dirs[3], &ids, &[true; 10], 10, "D");
    let grades: Vec<&Path> = dirs.iter().map(|d| d.as_path()).collect();
    let ran = run_stage::<Report>(
        tmp.path(),
        "report",
        serde_json::json!({"title": "greedy and sampled"}),
        &[("grades", &grades), ("problems", &[problems_dir.as_path()])],
        0,
    )
    .unwrap();
    let data: ReportData = serde_json::from_str(
        &std::fs::read_to_string(ran.outputs["report"].join("report.json")).unwrap(),
    )
    .unwrap();
    let pairs: Vec<(&str, &str)> = data
        .comparisons
        .iter()
        .map(|c| (c.a.as_str(), c.b.as_str()))
        .collect();
    assert_eq!(pairs, [("grades", "grades #2"), ("grades #3", "grades #4")]);
}
