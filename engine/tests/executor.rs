//! The executor through its public API: the one cached/run decision (plan and run agree on
//! it), parallel runs of a small DAG, failure and cancellation, and what a stage sees of its
//! inputs.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{has_started, load_in, spans};
use pipeline_engine::executor::{plan, Decision, PlanEntry, RunReason, StageOutcome};
use pipeline_engine::fingerprint::{Change, ValueChange};
use pipeline_engine::{Manifest, RunOptions, RunReport, Store};

const CHAIN: &str = r#"
[source]
kind = "source"
path = "input.txt"

[w]
kind = "emit"
matrix.k = ["a", "b"]
text = "${k}"

[u]
kind = "upper"
inputs = { src = "w" }

[all]
kind = "join"
inputs = { parts = ["u", "source"] }
"#;

struct Setup {
    dir: tempfile::TempDir,
    store: Store,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("input.txt"), "external").expect("input");
        let store = Store::open(&dir.path().join("cache")).expect("store");
        Self { dir, store }
    }

    fn manifest(&self, text: &str, overrides: &[&str]) -> Manifest {
        load_in(self.dir.path(), text, overrides)
            .unwrap_or_else(|errors| panic!("invalid manifest: {errors:#?}"))
    }

    fn run(&self, manifest: &Manifest, options: &RunOptions) -> RunReport {
        pipeline_engine::run(manifest, &self.store, options).expect("run")
    }

    fn plan(&self, manifest: &Manifest, options: &RunOptions) -> Vec<PlanEntry> {
        plan(manifest, &self.store, options).expect("plan")
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

fn decision<'p>(plan: &'p [PlanEntry], stage: &str) -> &'p Decision {
    &plan
        .iter()
        .find(|e| e.stage == stage)
        .unwrap_or_else(|| panic!("{stage} is not in the plan"))
        .decision
}

fn outcome<'r>(report: &'r RunReport, stage: &str) -> &'r StageOutcome {
    &report
        .stages
        .iter()
        .find(|s| s.stage == stage)
        .unwrap_or_else(|| panic!("{stage} is not in the report"))
        .outcome
}

fn ran(report: &RunReport) -> Vec<&str> {
    let mut ran: Vec<&str> = report
        .stages
        .iter()
        .filter(|s| s.outcome == StageOutcome::Ran)
        .map(|s| s.stage.as_str())
        .collect();
    ran.sort_unstable();
    ran
}

fn options() -> RunOptions {
    RunOptions {
        jobs: 2,
        ..RunOptions::default()
    }
}

#[test]
fn plan_and_run_make_the_same_decision_with_a_typed_reason() {
    let s = Setup::new();
    let m = s.manifest(CHAIN, &[]);
    let fresh = s.plan(&m, &options());
    assert!(matches!(
        decision(&fresh, "w@a"),
        Decision::Run(RunReason::NeverRun)
    ));
    match decision(&fresh, "u@a") {
        Decision::Run(RunReason::UpstreamWillRun { producer }) => assert_eq!(producer, "w@a"),
        other => panic!("u@a: {other:?}"),
    }
    let first = s.run(&m, &options());
    assert!(first.success());
    assert_eq!(ran(&first), ["all", "source", "u@a", "u@b", "w@a", "w@b"]);
    assert!(matches!(first.stages[0].reason, Some(RunReason::NeverRun)));

    // Everything cached: the plan says so and a run agrees.
    let cached = s.plan(&m, &options());
    assert!(cached
        .iter()
        .all(|e| matches!(e.decision, Decision::Cached)));
    assert!(cached.iter().all(|e| e.key.is_some()));
    assert!(ran(&s.run(&m, &options())).is_empty());

    // A changed parameter: the typed change, the same words in JSON and in the run report.
    let edited = s.manifest(CHAIN, &["w@b.count=2"]);
    let changed = s.plan(&edited, &options());
    let expected = vec![Change::Parameter {
        name: "count".into(),
        change: ValueChange::Changed {
            old: "0".into(),
            new: "2".into(),
        },
    }];
    match decision(&changed, "w@b") {
        Decision::Run(RunReason::Changed(changes)) => assert_eq!(*changes, expected),
        other => panic!("w@b: {other:?}"),
    }
    assert!(matches!(decision(&changed, "w@a"), Decision::Cached));
    let json = serde_json::to_value(&changed).expect("plan JSON");
    let entry = json
        .as_array()
        .and_then(|a| a.iter().find(|e| e["stage"] == "w@b"))
        .expect("w@b in JSON");
    assert_eq!(entry["action"], "run");
    assert_eq!(entry["reason"], "parameter `count` changed: 0 -> 2");
    let report = s.run(&edited, &options());
    // Identical output (the count is not written) leaves the consumers cached.
    assert_eq!(ran(&report), ["w@b"]);
    let report_json = serde_json::to_value(&report).expect("report JSON");
    let w_b = report_json["stages"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["stage"] == "w@b"))
        .expect("w@b in the report");
    assert_eq!(
        w_b["reasons"],
        serde_json::json!(["parameter `count` changed: 0 -> 2"])
    );

    // --force: forced if it would otherwise be cached.
    let forced = RunOptions {
        force: vec!["u".into()],
        ..options()
    };
    let plan = s.plan(&m, &forced);
    assert!(matches!(
        decision(&plan, "u@a"),
        Decision::Run(RunReason::Forced)
    ));
    match decision(&plan, "all") {
        Decision::Run(RunReason::UpstreamWillRun { producer }) => assert_eq!(producer, "u@a"),
        other => panic!("all: {other:?}"),
    }
    assert_eq!(ran(&s.run(&m, &forced)), ["u@a", "u@b"]);
}

#[test]
fn missing_results_unreadable_records_and_uncomputable_keys_say_so() {
    let s = Setup::new();
    let m = s.manifest(CHAIN, &[]);
    assert!(s.run(&m, &options()).success());
    let key = |plan: &[PlanEntry], stage: &str| {
        plan.iter()
            .find(|e| e.stage == stage)
            .and_then(|e| e.key.clone())
            .expect("key")
    };
    let all_key = key(&s.plan(&m, &options()), "all");
    let record = s
        .path("cache")
        .join("actions")
        .join(&all_key[..2])
        .join(format!("{}.json", &all_key[2..]));
    std::fs::remove_file(&record).expect("remove the action record");
    let plan = s.plan(&m, &options());
    assert!(matches!(
        decision(&plan, "all"),
        Decision::Run(RunReason::ResultMissing)
    ));
    let report = s.run(&m, &options());
    assert_eq!(ran(&report), ["all"]);

    std::fs::remove_file(s.path("input.txt")).expect("remove the input");
    let plan = s.plan(&m, &options());
    match decision(&plan, "source") {
        Decision::Run(RunReason::KeyNotComputable(e)) => {
            assert!(e.to_string().contains("input.txt"), "{e}")
        }
        other => panic!("source: {other:?}"),
    }
    assert!(plan
        .iter()
        .find(|e| e.stage == "source")
        .is_some_and(|e| e.key.is_none()));
    let report = s.run(&m, &options());
    assert!(matches!(
        outcome(&report, "source"),
        StageOutcome::Failed(_)
    ));
    assert!(matches!(outcome(&report, "all"), StageOutcome::Skipped(_)));
}

const PARALLEL: &str = r#"
[a]
kind = "sleep"
tag = "TAG"
ms = 150
id = 1

[b]
kind = "sleep"
tag = "TAG"
ms = 150
id = 2

[c]
kind = "sleep"
tag = "TAG-after"
ms = 10
inputs = { after = ["a", "b"] }
"#;

fn overlap(spans: &[(Instant, Instant)]) -> bool {
    spans
        .iter()
        .enumerate()
        .any(|(i, a)| spans[i + 1..].iter().any(|b| a.0 < b.1 && b.0 < a.1))
}

#[test]
fn independent_stages_run_in_parallel_and_consumers_wait_for_producers() {
    let s = Setup::new();
    let m = s.manifest(&PARALLEL.replace("TAG", "parallel"), &[]);
    let report = s.run(&m, &options());
    assert!(report.success(), "{report:#?}");
    let producers = spans("parallel");
    assert_eq!(producers.len(), 2);
    assert!(
        overlap(&producers),
        "two jobs: a and b overlap: {producers:?}"
    );
    let consumer = spans("parallel-after");
    assert_eq!(consumer.len(), 1);
    assert!(producers.iter().all(|p| p.1 <= consumer[0].0));

    let s = Setup::new();
    let m = s.manifest(&PARALLEL.replace("TAG", "serial"), &[]);
    let one_job = RunOptions {
        jobs: 1,
        ..RunOptions::default()
    };
    assert!(s.run(&m, &one_job).success());
    assert!(!overlap(&spans("serial")));

    let s = Setup::new();
    let gpu = PARALLEL
        .replace("TAG", "gpu")
        .replace("ms = 150", "ms = 150\ngpu = true");
    let m = s.manifest(&gpu, &[]);
    assert!(s.run(&m, &options()).success());
    assert!(!overlap(&spans("gpu")), "GPU stages never overlap");
}

#[test]
fn a_failure_stops_new_launches_and_keeps_finished_results() {
    let s = Setup::new();
    let text = r#"
[w]
kind = "emit"
text = "x"

[bad]
kind = "join"
inputs = { parts = ["w"] }
fail = true

[after]
kind = "upper"
inputs = { src = "bad" }

[later]
kind = "emit"
text = "independent, but after the failure in manifest order"
"#;
    let m = s.manifest(text, &[]);
    let one_job = RunOptions {
        jobs: 1,
        ..RunOptions::default()
    };
    let report = s.run(&m, &one_job);
    assert!(!report.success());
    assert_eq!(outcome(&report, "w"), &StageOutcome::Ran);
    match outcome(&report, "bad") {
        StageOutcome::Failed(failure) => {
            assert!(failure.message.contains("told to fail"), "{failure}")
        }
        other => panic!("bad: {other:?}"),
    }
    for stage in ["after", "later"] {
        assert_eq!(
            outcome(&report, stage),
            &StageOutcome::Skipped("an upstream or earlier stage failed".into())
        );
    }
    let fixed = s.manifest(&text.replace("fail = true", "fail = false"), &[]);
    assert_eq!(ran(&s.run(&fixed, &one_job)), ["after", "bad", "later"]);
}

#[test]
fn cancelling_stops_running_stages_and_starts_no_more() {
    let s = Setup::new();
    let text = r#"
[wait]
kind = "sleep"
tag = "cancel-me"
until_cancelled = true

[after]
kind = "sleep"
tag = "never"
inputs = { after = ["wait"] }
"#;
    let m = s.manifest(text, &[]);
    let cancel = Arc::new(AtomicBool::new(false));
    let options = RunOptions {
        cancel: cancel.clone(),
        ..options()
    };
    let report = std::thread::scope(|scope| {
        let running = scope.spawn(|| s.run(&m, &options));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !has_started("cancel-me") {
            assert!(Instant::now() < deadline, "the stage never started");
            std::thread::sleep(Duration::from_millis(5));
        }
        cancel.store(true, Ordering::Relaxed);
        running.join().expect("the run thread")
    });
    assert!(report.cancelled);
    assert!(!report.success());
    match outcome(&report, "wait") {
        StageOutcome::Failed(failure) => {
            assert!(failure.message.contains("interrupted"), "{failure}")
        }
        other => panic!("wait: {other:?}"),
    }
    assert_eq!(
        outcome(&report, "after"),
        &StageOutcome::Skipped("interrupted before it started".into())
    );
    assert!(spans("never").is_empty());
}

#[test]
fn a_stage_that_finishes_despite_the_interrupt_is_kept_but_nothing_new_starts() {
    let s = Setup::new();
    let text = r#"
[slow]
kind = "sleep"
tag = "ignores-cancel"
ms = 300

[next]
kind = "sleep"
tag = "not-started"
"#;
    let m = s.manifest(text, &[]);
    let cancel = Arc::new(AtomicBool::new(false));
    let options = RunOptions {
        jobs: 1,
        cancel: cancel.clone(),
        ..RunOptions::default()
    };
    let report = std::thread::scope(|scope| {
        let running = scope.spawn(|| s.run(&m, &options));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !has_started("ignores-cancel") {
            assert!(Instant::now() < deadline, "the stage never started");
            std::thread::sleep(Duration::from_millis(5));
        }
        cancel.store(true, Ordering::Relaxed);
        running.join().expect("the run thread")
    });
    assert!(report.cancelled);
    assert_eq!(outcome(&report, "slow"), &StageOutcome::Ran);
    assert_eq!(
        outcome(&report, "next"),
        &StageOutcome::Skipped("interrupted before it started".into())
    );
    assert!(!has_started("not-started"));
}

#[test]
fn stages_see_their_inputs_tree_table_and_labels() {
    let s = Setup::new();
    let text = r#"
[grade]
kind = "emit"
matrix.data = ["messy", "clean"]
matrix.seed = [1]
text = "${data}"

[names]
kind = "labels"
inputs = { parts = ["grade"] }

[joined]
kind = "join"
inputs = { parts = ["grade"] }
"#;
    let m = s.manifest(text, &[]);
    let report = s.run(&m, &options());
    assert!(report.success());
    let tree_of = |stage: &str| {
        let key = report
            .stages
            .iter()
            .find(|r| r.stage == stage)
            .and_then(|r| r.key.clone())
            .expect("key");
        let record = s.store.action(&key).expect("record");
        record.outputs["out"].tree.clone()
    };
    let written = std::fs::read_to_string(s.store.view_path(&tree_of("names")).join("data"))
        .expect("labels output");
    assert_eq!(
        written,
        format!(
            "grade@messy,1 grade data=messy,seed=1 {}\ngrade@clean,1 grade data=clean,seed=1 {}",
            tree_of("grade@messy,1"),
            tree_of("grade@clean,1")
        )
    );

    // Renaming the matrix key keeps every instance name and every output, but the labels
    // change: only the kind that uses them reruns, and the plan says why.
    let renamed = s.manifest(
        &text
            .replace("matrix.data", "matrix.dataset")
            .replace("${data}", "${dataset}"),
        &[],
    );
    let plan = s.plan(&renamed, &options());
    assert!(matches!(decision(&plan, "joined"), Decision::Cached));
    match decision(&plan, "names") {
        Decision::Run(RunReason::Changed(changes)) => assert_eq!(
            changes.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["input `parts` now labelled grade[dataset=messy,seed=1], grade[dataset=clean,seed=1] (was grade[data=messy,seed=1], grade[data=clean,seed=1])"]
        ),
        other => panic!("names: {other:?}"),
    }
    assert_eq!(ran(&s.run(&renamed, &options())), ["names"]);
}

#[test]
fn keys_of_kinds_without_labels_do_not_move() {
    // The key of a stage with a seed, a parameter and one input, computed before input labels
    // existed: an upgrade must leave existing caches valid.
    let s = Setup::new();
    let m = s.manifest(
        "[w]\nkind = \"emit\"\ntext = \"x\"\n\n[u]\nkind = \"upper\"\nseeded = true\ninputs = { src = \"w\" }\n",
        &[],
    );
    let report = s.run(&m, &options());
    let key = |stage: &str| {
        report
            .stages
            .iter()
            .find(|r| r.stage == stage)
            .and_then(|r| r.key.clone())
            .expect("key")
    };
    assert_eq!(key("w"), PINNED_W);
    assert_eq!(key("u"), PINNED_U);
}

/// Keys computed by the engine before input labels existed (commit f435bfa).
const PINNED_W: &str = "8f951cb77318c958cd6d330676fba446968f0ddb855408cc06e1da45accc6e27";
const PINNED_U: &str = "f7b755723e9926b362dae3ec0721941725eb6960b04e5a9921e45d0306000aa6";

#[test]
fn a_cached_stage_is_found_with_its_outputs_and_inputs_or_the_reason_it_is_not() {
    use pipeline_engine::executor::cached_stage;
    use pipeline_engine::InstanceName;
    let s = Setup::new();
    let m = s.manifest(CHAIN, &[]);
    let u_a = InstanceName::new("u", vec![("k".into(), "a".into())]);
    let lookup =
        |m: &Manifest, name: &InstanceName| cached_stage(m, &s.store, name).expect("lookup");
    match lookup(&m, &u_a) {
        Err(RunReason::UpstreamWillRun { producer }) => assert_eq!(producer, "w@a"),
        other => panic!("before a run: {other:?}"),
    }
    // Only what `u@a` needs.
    let only = RunOptions {
        only: vec!["u@a".into()],
        ..options()
    };
    assert_eq!(ran(&s.run(&m, &only)), ["u@a", "w@a"]);
    let stage = lookup(&m, &u_a).expect("cached after the run");
    assert_eq!(stage.name, "u@a");
    assert_eq!(stage.kind, "upper");
    assert_eq!(stage.key.len(), 64);
    let out = stage.output("out").expect("output `out`");
    assert_eq!(std::fs::read_to_string(out.join("data")).unwrap(), "A");
    assert_eq!(
        stage.output_of_type("text").map(|o| o.path.as_path()),
        Some(out)
    );
    assert!(stage.output("nope").is_err());
    // Its input is the artifact it was computed from, as its run saw it.
    let src = stage.input("src").expect("input `src`");
    assert_eq!(std::fs::read_to_string(src.join("data")).unwrap(), "a");
    assert_eq!(stage.inputs["src"][0].stage, "w@a");
    assert_eq!(
        stage.inputs["src"][0].labels,
        [("k".to_string(), "a".to_string())]
    );
    // A changed parameter upstream: not cached, and why.
    let edited = s.manifest(CHAIN, &["w@a.text=z"]);
    match lookup(&edited, &u_a) {
        Err(RunReason::UpstreamWillRun { producer }) => assert_eq!(producer, "w@a"),
        other => panic!("after an upstream edit: {other:?}"),
    }
    let w_b = InstanceName::new("w", vec![("k".into(), "b".into())]);
    assert!(matches!(lookup(&m, &w_b), Err(RunReason::NeverRun)));
    assert!(cached_stage(&m, &s.store, &InstanceName::new("nope", vec![])).is_err());
}
