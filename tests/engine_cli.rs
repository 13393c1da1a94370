//! End-to-end tests of the engine through the CLI, with the ML-free kinds of
//! `examples/toy_pipeline.rs`: manifest errors, caching and invalidation, resumption, crash
//! safety, concurrency, corruption and garbage collection.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{action_records, ran, run_outcomes, toy_binary};

fn toy(cache: &Path, args: &[&str]) -> Output {
    Command::new(toy_binary())
        .arg("--cache")
        .arg(cache)
        .args(args)
        .env_remove("PIPELINE_CACHE")
        .output()
        .expect("run toy_pipeline")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `run --json` and the outcome of each stage.
fn run_json(cache: &Path, manifest: &Path, extra: &[&str]) -> Vec<(String, String)> {
    let mut args = vec!["run", manifest.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    run_outcomes(&toy(cache, &args))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const DIAMOND: &str = r#"
[experiment]
name = "diamond"
seed = 3

[source]
kind = "source"
path = "input.txt"

[words]
kind = "write"
matrix.word = ["alpha", "beta"]
text = "${word} "
repeat = 2

[left]
kind = "concat"
inputs = { parts = ["source", "words@alpha"] }

[right]
kind = "concat"
inputs = { parts = ["words@beta"] }
upper = true

[both]
kind = "concat"
inputs = { parts = ["left", "right"] }

[counter]
kind = "count"
inputs = { seed = "both" }
steps = 5
"#;

#[test]
fn bad_manifests_are_rejected_with_code_message_and_span() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad_manifests");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 15,
        "the corpus has {} manifests",
        files.len()
    );
    let tmp = tempfile::tempdir().unwrap();
    for file in files {
        let source = std::fs::read_to_string(&file).unwrap();
        let expect = |key: &str| {
            source.lines().find_map(|l| {
                l.strip_prefix(&format!("# expect-{key}: "))
                    .map(str::to_string)
            })
        };
        let cache = tmp.path().join("cache");
        let out = Command::new(toy_binary())
            .args(["--error-format", "json", "--cache"])
            .arg(&cache)
            .arg("run")
            .arg(&file)
            .output()
            .unwrap();
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{name}: exit code; stderr:\n{}",
            stderr(&out)
        );
        assert!(
            !cache.exists(),
            "{name}: nothing may run (or even open the cache) for an invalid manifest"
        );
        let json: Value = serde_json::from_str(stderr(&out).trim())
            .unwrap_or_else(|e| panic!("{name}: stderr is not JSON ({e}): {}", stderr(&out)));
        let related = json["related"].as_array().cloned().unwrap_or_default();
        if let Some(count) = expect("count") {
            assert_eq!(
                related.len(),
                count.parse::<usize>().unwrap(),
                "{name}: number of errors reported at once: {json:#}"
            );
        }
        let code = expect("code").unwrap_or_else(|| panic!("{name} has no expect-code"));
        let diag = related
            .iter()
            .find(|d| d["code"] == code.as_str())
            .unwrap_or_else(|| panic!("{name}: no `{code}` diagnostic in {json:#}"));
        let message = expect("message").unwrap();
        assert!(
            diag["message"].as_str().unwrap().contains(&message),
            "{name}: message {:?} lacks {message:?}",
            diag["message"]
        );
        if let Some(help) = expect("help") {
            assert!(
                diag["help"].as_str().unwrap_or_default().contains(&help),
                "{name}: help {:?} lacks {help:?}",
                diag["help"]
            );
        }
        if let Some(span_text) = expect("span") {
            let labels = diag["labels"].as_array().unwrap();
            let found: Vec<String> = labels
                .iter()
                .map(|l| {
                    let offset = l["offset"].as_u64().unwrap() as usize;
                    let len = l["length"].as_u64().unwrap() as usize;
                    // Line and column (1-based, in characters) name the same place.
                    let before = &source[..offset];
                    let line = before.matches('\n').count() + 1;
                    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
                    assert_eq!(
                        (l["line"].as_u64(), l["column"].as_u64()),
                        (Some(line as u64), Some(column as u64)),
                        "{name}: line/column of {l}"
                    );
                    source[offset..offset + len].to_string()
                })
                .collect();
            assert!(
                found.contains(&span_text),
                "{name}: spans {found:?} do not include {span_text:?}"
            );
        }
    }
}

#[test]
fn bad_overrides_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = write(tmp.path(), "m.toml", DIAMOND);
    write(tmp.path(), "input.txt", "x");
    let cache = tmp.path().join("cache");
    for (set, needle) in [
        ("nostage.x=1", "there is no stage `nostage`"),
        (
            "counter.steps=\"many\"",
            "the value came from --set counter.steps",
        ),
        ("counter=3", "expected STAGE.PARAM=VALUE"),
        ("counter.kind=\"x\"", "cannot be overridden"),
        ("words.matrix.nokey=[1]", "has no matrix key `nokey`"),
        ("counter.matrix.word=[\"a\"]", "`counter` has no matrix"),
        ("words.matrix.word=\"alpha\"", "must be an array"),
        ("words.matrix.word=[]", "cannot be empty"),
        ("words.matrix.word=[\"a b\"]", "matrix value `a b`"),
        ("words@alpha.matrix.word=[\"a\"]", "a matrix belongs to"),
    ] {
        let out = toy(&cache, &["run", manifest.to_str().unwrap(), "--set", set]);
        assert_eq!(out.status.code(), Some(2), "--set {set}");
        assert!(
            stderr(&out).contains(needle),
            "--set {set}: {}",
            stderr(&out)
        );
    }
    let out = toy(
        &cache,
        &["run", manifest.to_str().unwrap(), "--only", "nope"],
    );
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn reruns_only_what_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = write(tmp.path(), "m.toml", DIAMOND);
    let input = write(tmp.path(), "input.txt", "external ");
    let cache = tmp.path().join("cache");
    let all = [
        "both",
        "counter",
        "left",
        "right",
        "source",
        "words@alpha",
        "words@beta",
    ];

    assert_eq!(ran(&run_json(&cache, &manifest, &[])), all);
    assert!(
        ran(&run_json(&cache, &manifest, &[])).is_empty(),
        "a no-op rerun runs nothing"
    );

    // --set changes the key like an edit: exactly the downstream cone reruns.
    assert_eq!(
        ran(&run_json(
            &cache,
            &manifest,
            &["--set", "right.upper=false"]
        )),
        ["both", "counter", "right"]
    );
    // Editing the manifest the same way hits the cache entries --set just made.
    write(
        tmp.path(),
        "m.toml",
        &DIAMOND.replace("upper = true", "upper = false"),
    );
    assert!(ran(&run_json(&cache, &manifest, &[])).is_empty());
    // A variant's parameter: only that variant's branch.
    assert_eq!(
        ran(&run_json(
            &cache,
            &manifest,
            &["--set", "words@alpha.repeat=3"]
        )),
        ["both", "counter", "left", "words@alpha"]
    );

    // Touching the input without changing it reruns nothing; changing it reruns its consumers.
    let later = std::time::SystemTime::now() + Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&input)
        .unwrap()
        .set_modified(later)
        .unwrap();
    assert!(
        ran(&run_json(&cache, &manifest, &[])).is_empty(),
        "mtime-only change"
    );
    std::fs::write(&input, "changed ").unwrap();
    assert_eq!(
        ran(&run_json(&cache, &manifest, &[])),
        ["both", "counter", "left", "source"]
    );

    // plan explains why, in words and as JSON.
    let out = toy(
        &cache,
        &[
            "plan",
            manifest.to_str().unwrap(),
            "--json",
            "--set",
            "counter.steps=6",
        ],
    );
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let counter = plan
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["stage"] == "counter")
        .unwrap();
    assert_eq!(counter["action"], "run");
    assert_eq!(counter["reason"], "parameter `steps` changed: 5 -> 6");
    let left = plan
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["stage"] == "left")
        .unwrap();
    assert_eq!(left["action"], "cached");
    std::fs::write(&input, "changed again ").unwrap();
    let out = toy(&cache, &["plan", manifest.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("dependency `file:path` changed"), "{text}");
    assert!(
        text.contains("input from `source`, which will run"),
        "{text}"
    );

    // --only runs the selection and what it needs; --force recomputes.
    let outcomes = run_json(&cache, &manifest, &["--only", "left"]);
    assert_eq!(ran(&outcomes), ["left", "source"]);
    assert!(outcomes
        .iter()
        .any(|(s, o)| s == "counter" && o == "not_selected"));
    // Forcing `words` reruns it; `both` and `counter` also run because `left` changed above
    // while they were not selected.
    assert_eq!(
        ran(&run_json(&cache, &manifest, &["--force", "words"])),
        ["both", "counter", "words@alpha", "words@beta"]
    );
    assert_eq!(
        ran(&run_json(&cache, &manifest, &["--force", "words"])),
        ["words@alpha", "words@beta"],
        "identical forced output leaves consumers cached"
    );
}

#[test]
fn dag_json_lists_expanded_nodes_and_edges() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = write(tmp.path(), "m.toml", DIAMOND);
    let out = toy(
        &tmp.path().join("c"),
        &["dag", manifest.to_str().unwrap(), "--format", "json"],
    );
    let dag: Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes: Vec<&str> = dag["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        nodes,
        [
            "source",
            "words@alpha",
            "words@beta",
            "left",
            "right",
            "both",
            "counter"
        ]
    );
    let edges = dag["edges"].as_array().unwrap();
    assert!(edges.contains(&serde_json::json!(["words@alpha", "left"])));
    assert!(edges.contains(&serde_json::json!(["both", "counter"])));
    assert_eq!(edges.len(), 6);
    for format in ["dot", "mermaid", "text"] {
        let out = toy(
            &tmp.path().join("c"),
            &["dag", manifest.to_str().unwrap(), "--format", format],
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("words@beta"),
            "{format}"
        );
    }
}

#[test]
fn a_matrix_override_cuts_the_variants_and_everything_downstream() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = write(tmp.path(), "m.toml", DIAMOND);
    write(tmp.path(), "input.txt", "x");
    let cache = tmp.path().join("cache");
    // `right` reads `words@beta`, so dropping `beta` must fail with the missing reference...
    let out = toy(
        &cache,
        &[
            "plan",
            manifest.to_str().unwrap(),
            "--set",
            "words.matrix.word=[\"alpha\"]",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("words@beta"), "{}", stderr(&out));
    // ...while replacing the values renames the variants and their dependants.
    let outcomes = run_json(
        &cache,
        &manifest,
        &[
            "--set",
            "words.matrix.word=[\"alpha\", \"beta\", \"gamma\"]",
        ],
    );
    let names: Vec<&str> = outcomes.iter().map(|(s, _)| s.as_str()).collect();
    assert!(names.contains(&"words@gamma"), "{names:?}");
    assert_eq!(names.iter().filter(|n| n.starts_with("words@")).count(), 3);
}

#[test]
fn matrix_expansion_propagates_downstream() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = write(
        tmp.path(),
        "m.toml",
        r#"
[experiment]
name = "variants"

[textbook]
kind = "write"
text = "clean"

[messy]
kind = "write"
text = "dirty"

[prep]
kind = "concat"
matrix.data = ["textbook", "messy"]
inputs = { parts = ["${data}"] }

[train]
kind = "count"
inputs = { seed = "prep" }
steps = 2

[report]
kind = "concat"
inputs = { parts = ["prep"] }
"#,
    );
    let out = toy(
        &tmp.path().join("c"),
        &["dag", manifest.to_str().unwrap(), "--format", "json"],
    );
    let dag: Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes: Vec<&str> = dag["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        nodes,
        [
            "textbook",
            "messy",
            "prep@textbook",
            "prep@messy",
            "train@textbook",
            "train@messy",
            "report"
        ]
    );
    let edges = dag["edges"].as_array().unwrap();
    assert!(edges.contains(&serde_json::json!(["messy", "prep@messy"])));
    assert!(edges.contains(&serde_json::json!(["prep@messy", "train@messy"])));
    assert!(!edges.contains(&serde_json::json!(["prep@messy", "train@textbook"])));
    assert!(
        edges.contains(&serde_json::json!(["prep@textbook", "report"])),
        "fan-in slots gather all variants"
    );
    // `show` takes a table name as `--only` does (each instance), and a typo gets a suggestion.
    let show = toy(
        &tmp.path().join("c"),
        &["show", manifest.to_str().unwrap(), "train"],
    );
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(show.status.success(), "{}", stderr(&show));
    assert!(
        text.contains("stage:   train@textbook") && text.contains("stage:   train@messy"),
        "{text}"
    );
    let typo = toy(
        &tmp.path().join("c"),
        &["show", manifest.to_str().unwrap(), "trian"],
    );
    assert_eq!(typo.status.code(), Some(2));
    assert!(
        stderr(&typo).contains("did you mean `train`?"),
        "{}",
        stderr(&typo)
    );
    let typo = toy(
        &tmp.path().join("c"),
        &["plan", manifest.to_str().unwrap(), "--force", "prep@mesy"],
    );
    assert_eq!(typo.status.code(), Some(2));
    assert!(
        stderr(&typo).contains("did you mean `prep@messy`?"),
        "{}",
        stderr(&typo)
    );
}

#[test]
fn failed_stage_keeps_finished_results_and_exits_nonzero() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = write(
        tmp.path(),
        "m.toml",
        r#"
[experiment]
name = "failing"

[a]
kind = "write"
text = "a"

[bad]
kind = "concat"
inputs = { parts = ["a"] }
fail = true

[after]
kind = "concat"
inputs = { parts = ["bad"] }
upper = true
"#,
    );
    let cache = tmp.path().join("c");
    let out = toy(&cache, &["run", manifest.to_str().unwrap(), "--jobs", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("told to fail"), "{err}");
    // Not a terminal: a line per stage instead of bars, and no colour codes.
    assert!(err.contains("  running a\n"), "{err}");
    assert!(err.contains(" finished a in "), "{err}");
    assert!(err.contains("  running bad\n"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "colour codes in a redirected stderr: {err:?}"
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("FAILED") && table.contains("skipped"),
        "{table}"
    );
    // As data: the failure is a JSON line on stderr, and every outcome of `run --json` has
    // one shape, the failure's diagnostic included.
    let out = toy(
        &cache,
        &[
            "--error-format",
            "json",
            "run",
            manifest.to_str().unwrap(),
            "--jobs",
            "1",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let line = err
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line in {err}"));
    let diag: Value = serde_json::from_str(line).unwrap();
    assert_eq!(diag["stage"], "bad");
    assert!(
        diag["message"].as_str().unwrap().contains("told to fail"),
        "{diag}"
    );
    assert!(
        !err.contains('╭') && !err.contains("×"),
        "a human box in JSON mode: {err}"
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    for s in report["stages"].as_array().unwrap() {
        let o = s["outcome"].as_object().unwrap();
        let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["error", "status", "why"], "{s}");
        match o["status"].as_str().unwrap() {
            "failed" => assert!(
                o["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("told to fail"),
                "{s}"
            ),
            "skipped" => assert!(o["why"].is_string() && o["error"].is_null(), "{s}"),
            _ => assert!(o["why"].is_null() && o["error"].is_null(), "{s}"),
        }
    }
    // Fix it: `a` comes from the cache.
    std::fs::write(
        &manifest,
        std::fs::read_to_string(&manifest)
            .unwrap()
            .replace("fail = true", "fail = false"),
    )
    .unwrap();
    assert_eq!(ran(&run_json(&cache, &manifest, &[])), ["after", "bad"]);
}

fn action_outputs(cache: &Path) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = action_records(cache)
        .into_iter()
        .map(|r| (r["key"].as_str().unwrap().to_string(), r["outputs"].clone()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

const SLOW: &str = r#"
[experiment]
name = "slow"
seed = 11

[words]
kind = "write"
matrix.word = ["alpha", "beta", "gamma"]
text = "${word} and some more text to write "
repeat = 40
delay_ms = 5

[joined]
kind = "concat"
inputs = { parts = ["words"] }
delay_ms = 2

[counter]
kind = "count"
inputs = { seed = "joined" }
steps = 60
delay_ms = 5
"#;

#[test]
fn kill_9_at_random_moments_never_corrupts_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = write(tmp.path(), "m.toml", SLOW);
    let reference_cache = tmp.path().join("reference");
    let start = Instant::now();
    run_json(&reference_cache, &manifest, &[]);
    let full = start.elapsed();
    let reference = action_outputs(&reference_cache);

    let cache = tmp.path().join("crashy");
    // Deterministic pseudo-random kill times spread over a full run's duration.
    let mut state: u64 = 0x9e3779b97f4a7c15;
    let mut killed_mid_run = 0;
    for trial in 0..24 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let delay = Duration::from_millis(state % (full.as_millis() as u64 * 4 / 5 + 1));
        // Most trials recompute everything (kills land mid-write of any stage); every fourth
        // resumes from what earlier trials left behind.
        let mut args = vec!["run", manifest.to_str().unwrap(), "--jobs", "2"];
        if trial % 4 != 0 {
            args.extend([
                "--force", "words", "--force", "joined", "--force", "counter",
            ]);
        }
        let mut child = Command::new(toy_binary())
            .arg("--cache")
            .arg(&cache)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            killed_mid_run += 1;
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
    }
    assert!(
        killed_mid_run >= 12,
        "only {killed_mid_run} kills landed mid-run; the stages are too fast for this test"
    );
    let outcomes = run_json(&cache, &manifest, &[]);
    assert!(outcomes.iter().all(|(_, o)| o == "ran" || o == "cached"));
    assert_eq!(
        action_outputs(&cache),
        reference,
        "interrupted runs must end with the same artifacts"
    );
    let verify = toy(&cache, &["verify"]);
    assert!(
        verify.status.success(),
        "verify found corruption: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
    assert!(String::from_utf8_lossy(&verify.stdout).contains(": 0 corrupt"));
}

#[test]
fn interrupted_long_stage_resumes_from_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = write(tmp.path(), "m.toml", "[experiment]\nname = \"resume\"\n\n[counter]\nkind = \"count\"\nsteps = 200\ndelay_ms = 10\n");
    let cache = tmp.path().join("c");
    let mut child = Command::new(toy_binary())
        .arg("--cache")
        .arg(&cache)
        .args(["run", manifest.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(900));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(ran(&run_json(&cache, &manifest, &[])), ["counter"]);
    let show = toy(&cache, &["show", manifest.to_str().unwrap(), "counter"]);
    let text = String::from_utf8_lossy(&show.stdout);
    let resumed: u64 = text
        .split("\"resumed_from_step\": ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(resumed > 0, "the rerun should resume mid-stage: {text}");
    // Same result as an uninterrupted run.
    let fresh = tmp.path().join("fresh");
    run_json(&fresh, &manifest, &[]);
    assert_eq!(
        action_outputs(&cache)
            .iter()
            .map(|(_, o)| o.clone())
            .collect::<Vec<_>>(),
        action_outputs(&fresh)
            .iter()
            .map(|(_, o)| o.clone())
            .collect::<Vec<_>>()
    );
    let stats = toy(&cache, &["status"]);
    assert!(
        String::from_utf8_lossy(&stats.stdout).contains("resumable checkpoints: 0"),
        "a finished key's checkpoint is removed"
    );
}

#[test]
fn concurrent_runs_on_one_cache_both_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = write(tmp.path(), "m.toml", SLOW);
    let cache = tmp.path().join("c");
    let spawn = || {
        Command::new(toy_binary())
            .arg("--cache")
            .arg(&cache)
            .args(["run", manifest.to_str().unwrap(), "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(
        a.status.success() && b.status.success(),
        "{}\n{}",
        stderr(&a),
        stderr(&b)
    );
    let reference = tmp.path().join("ref");
    run_json(&reference, &manifest, &[]);
    assert_eq!(action_outputs(&cache), action_outputs(&reference));
    assert!(toy(&cache, &["verify"]).status.success());
}

#[test]
fn gpu_stages_never_overlap() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = write(tmp.path(), "m.toml", "[experiment]\nname = \"gpu\"\n\n[g]\nkind = \"write\"\nmatrix.i = [1, 2, 3]\ntext = \"${i}\"\nrepeat = 10\ndelay_ms = 20\ngpu = true\n");
    let cache = tmp.path().join("c");
    run_json(&cache, &manifest, &["--jobs", "3"]);
    let mut spans: Vec<(f64, f64)> = action_records(&cache)
        .iter()
        .map(|r| {
            (
                r["metadata"]["start"].as_f64().unwrap(),
                r["metadata"]["end"].as_f64().unwrap(),
            )
        })
        .collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(spans.len(), 3);
    for w in spans.windows(2) {
        assert!(w[1].0 >= w[0].1, "GPU stages overlapped: {spans:?}");
    }
}

#[test]
fn corrupted_object_is_found_and_recomputed() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = write(tmp.path(), "m.toml", DIAMOND);
    write(tmp.path(), "input.txt", "x");
    let cache = tmp.path().join("c");
    run_json(&cache, &manifest, &[]);
    // Corrupt the object behind `counter`'s output (content unique to it).
    let outputs = action_outputs(&cache);
    let counter_tree = outputs
        .iter()
        .map(|(_, o)| o["out"]["tree"].as_str().unwrap().to_string())
        .find(|t| {
            let view = cache.join("views").join(t).join("data");
            std::fs::read_to_string(view)
                .map(|s| s.trim().parse::<u64>().is_ok())
                .unwrap_or(false)
        });
    let tree = counter_tree.expect("counter's tree");
    let tree_json: Value = serde_json::from_slice(
        &std::fs::read(
            cache
                .join("trees")
                .join(&tree[..2])
                .join(format!("{}.json", &tree[2..])),
        )
        .unwrap(),
    )
    .unwrap();
    let object_hash = tree_json["files"][0]["hash"].as_str().unwrap();
    let object = cache
        .join("objects")
        .join(&object_hash[..2])
        .join(&object_hash[2..]);
    let mut perms = std::fs::metadata(&object).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&object, perms).unwrap();
    std::fs::write(&object, b"garbage").unwrap();

    let verify = toy(&cache, &["verify"]);
    assert_eq!(verify.status.code(), Some(1));
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(
        text.contains("1 corrupt") && text.contains(object_hash),
        "{text}"
    );
    assert_eq!(ran(&run_json(&cache, &manifest, &[])), ["counter"]);
    assert!(toy(&cache, &["verify"]).status.success());

    // A missing object is named, with the file and stage it belonged to, and verify fails.
    let object_hash = tree_json["files"][0]["hash"].as_str().unwrap();
    let object = cache
        .join("objects")
        .join(&object_hash[..2])
        .join(&object_hash[2..]);
    std::fs::remove_file(&object).unwrap();
    let verify = toy(&cache, &["verify"]);
    assert_eq!(verify.status.code(), Some(1));
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(
        text.contains(&format!("missing object {object_hash} (data of counter)")),
        "{text}"
    );
    assert_eq!(ran(&run_json(&cache, &manifest, &[])), ["counter"]);
    assert!(toy(&cache, &["verify"]).status.success());
}

#[test]
fn gc_keeps_what_manifests_use() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = write(tmp.path(), "m.toml", DIAMOND);
    write(tmp.path(), "input.txt", "x");
    let cache = tmp.path().join("c");
    run_json(&cache, &manifest, &[]);
    run_json(&cache, &manifest, &["--set", "counter.steps=9"]);
    // A dry run says what would go and removes nothing.
    let dry = toy(
        &cache,
        &[
            "gc",
            manifest.to_str().unwrap(),
            "--keep-younger-than",
            "0s",
            "--dry-run",
        ],
    );
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert!(
        String::from_utf8_lossy(&dry.stdout).contains("kept 7 cached results, would remove 1"),
        "{}",
        String::from_utf8_lossy(&dry.stdout)
    );
    assert!(
        ran(&run_json(&cache, &manifest, &["--set", "counter.steps=9"])).is_empty(),
        "a dry run removed a result"
    );
    let out = toy(
        &cache,
        &[
            "gc",
            manifest.to_str().unwrap(),
            "--keep-younger-than",
            "0s",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("kept 7 cached results, removed 1"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        ran(&run_json(&cache, &manifest, &[])).is_empty(),
        "gc keeps the manifest's current results"
    );
    assert_eq!(
        ran(&run_json(&cache, &manifest, &["--set", "counter.steps=9"])),
        ["counter"],
        "gc removed the override's result"
    );
    let out = toy(&cache, &["gc", "--keep-younger-than", "0s"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("kept 0 cached results"));
    assert!(toy(&cache, &["verify"]).status.success());
}

#[test]
fn registered_commands_get_their_raw_arguments_and_the_global_options() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("c");
    let help = toy(&cache, &["--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("echo") && text.contains("a command registered by the binary"),
        "{text}"
    );
    let out = toy(&cache, &["echo", "a", "--json", "-x", "b"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a --json -x b\n");
    assert_eq!(
        toy(&cache, &["echo"]).status.code(),
        Some(3),
        "its exit code"
    );
    for args in [&["help", "echo"][..], &["echo", "--help"]] {
        let out = toy(&cache, args);
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with("usage: toy_pipeline echo"),
            "{args:?}: its own help"
        );
    }
    // Its errors follow --error-format, written before or after its name.
    for args in [
        &["--error-format", "json", "echo", "--fail"][..],
        &["echo", "--fail", "--error-format", "json"],
        &["echo", "--error-format=json", "--fail"],
    ] {
        let out = toy(&cache, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let json: Value = serde_json::from_str(stderr(&out).trim())
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", stderr(&out)));
        assert_eq!(json["message"], "echo was told to fail");
        assert_eq!(json["help"], "leave out --fail");
    }
    let out = toy(&cache, &["echo", "--error-format", "xml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = toy(&cache, &["echo", "--fail"]);
    assert!(
        stderr(&out).contains("echo was told to fail"),
        "{}",
        stderr(&out)
    );
    assert!(
        !stderr(&out).trim_start().starts_with('{'),
        "human by default"
    );
}

#[test]
fn run_points_to_the_headline_files_of_its_stages() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("c");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/toy.toml");
    let out = toy(&cache, &["run", manifest.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    // `concat` (stage `joined`) names its `data` file; the other kinds name none.
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("report: ")).collect();
    assert_eq!(lines.len(), 1, "{text}");
    let path = PathBuf::from(lines[0].trim_start_matches("report: "));
    assert_eq!(
        std::fs::read_to_string(path).unwrap(),
        "ALPHA ALPHA ALPHA BETA BETA BETA "
    );
}

#[test]
fn gc_ages_are_humantime_durations() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("c");
    for age in ["30s", "12h", "7d", "1h 30m"] {
        let out = toy(&cache, &["gc", "--keep-younger-than", age]);
        assert!(out.status.success(), "{age}: {}", stderr(&out));
    }
    let out = toy(&cache, &["gc", "--keep-younger-than", "7x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("invalid age `7x`"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn paths_that_are_not_files_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    // As the manifest: refused at once instead of read forever.
    let out = toy(&cache, &["run", "/dev/zero"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("not a regular file"),
        "{}",
        stderr(&out)
    );
    // A binary file as the manifest: said so, with where.
    let binary = dir.path().join("model.bin");
    std::fs::write(&binary, [0x7f, b'E', b'L', b'F', 0xff, 0xfe]).unwrap();
    let out = toy(&cache, &["plan", binary.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("not UTF-8 text (invalid byte at offset 4)"),
        "{}",
        stderr(&out)
    );
    // As a stage's input: the run stops before any stage, naming every one that cannot start.
    let fifo = dir.path().join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let m = write(
        dir.path(),
        "m.toml",
        &format!(
            "[experiment]\nname = \"p\"\n\n[first]\nkind = \"write\"\ntext = \"x\"\n\n\
             [zero]\nkind = \"source\"\npath = \"/dev/zero\"\n\n\
             [pipe]\nkind = \"source\"\npath = \"{}\"\n",
            fifo.display()
        ),
    );
    let started = Instant::now();
    // (JSON errors: the human format wraps long lines.)
    let out = toy(
        &cache,
        &["--error-format", "json", "run", m.to_str().unwrap()],
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "nothing blocks on the FIFO"
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(said.contains("2 stages cannot start"), "{said}");
    assert!(
        said.contains("stage `zero`") && said.contains("stage `pipe`"),
        "{said}"
    );
    assert!(said.contains("not a regular file or directory"), "{said}");
    assert!(
        action_records(&cache).is_empty(),
        "`first` did not run either"
    );
}

#[test]
fn gc_says_it_waits_for_a_run_that_holds_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let m = write(
        dir.path(),
        "m.toml",
        "[experiment]\nname = \"w\"\n\n[slow]\nkind = \"write\"\ntext = \"x\"\nrepeat = 30\ndelay_ms = 100\n",
    );
    let mut run = Command::new(toy_binary())
        .arg("--cache")
        .arg(&cache)
        .args(["run", m.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start run");
    // The run holds the cache once its stage has started writing.
    let started = Instant::now();
    while !cache
        .join("tmp")
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some())
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the run never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = toy(&cache, &["gc", "--keep-younger-than", "0s"]);
    assert!(run.wait().expect("run").success());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("gc: waiting for the runs using"),
        "gc says why it waits: {}",
        stderr(&out)
    );
}

/// Runs `toy_pipeline --cache CACHE run MANIFEST` with the cache on a fresh tmpfs of `size`
/// in a private mount namespace (root and util-linux's `unshare` needed; `None` without
/// them). With `first`, a run of that manifest fills the cache and the tmpfs is remounted
/// read-only before the run of `manifest`.
fn run_on_small_tmpfs(
    cache: &Path,
    size: &str,
    first: Option<&Path>,
    manifest: &Path,
) -> Option<Output> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let unshare = Command::new("unshare").arg("--version").output();
    if !root || !unshare.is_ok_and(|o| o.status.success()) {
        return None;
    }
    std::fs::create_dir_all(cache).unwrap();
    let script = if first.is_some() {
        r#"mount -t tmpfs -o "size=$1" none "$2" && "$3" --cache "$2" run "$5" >/dev/null && mount -o remount,ro "$2" && exec "$3" --cache "$2" run "$4""#
    } else {
        r#"mount -t tmpfs -o "size=$1" none "$2" && exec "$3" --cache "$2" run "$4""#
    };
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", script, "sh", size])
        .arg(cache)
        .arg(toy_binary())
        .arg(manifest)
        .args(first)
        .output()
        .unwrap();
    Some(out)
}

#[test]
fn a_full_or_read_only_cache_is_named_in_the_error() {
    let tmp = tempfile::tempdir().unwrap();
    let big = write(
        tmp.path(),
        "big.toml",
        "[experiment]\nname = \"full\"\n\n[w]\nkind = \"write\"\ntext = \"0123456789abcdef\"\nrepeat = 200000\n",
    );
    let cache = tmp.path().join("cache");
    let Some(out) = run_on_small_tmpfs(&cache, "256k", None, &big) else {
        eprintln!("SKIP: needs root and unshare to mount a small tmpfs");
        return;
    };
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        err.contains(&cache.display().to_string()),
        "the cache is not named: {err}"
    );

    let small = write(
        tmp.path(),
        "small.toml",
        "[experiment]\nname = \"ro\"\n\n[w]\nkind = \"write\"\ntext = \"a\"\n",
    );
    let changed = write(
        tmp.path(),
        "changed.toml",
        "[experiment]\nname = \"ro\"\n\n[w]\nkind = \"write\"\ntext = \"b\"\n",
    );
    let cache = tmp.path().join("cache-ro");
    let out = run_on_small_tmpfs(&cache, "1m", Some(&small), &changed).unwrap();
    let err = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(
        err.contains(&cache.display().to_string()),
        "no path named: {err}"
    );
}

/// A matrix value can be a table: its `name` names the instances, its other fields are
/// `${key.field}` wherever the value reaches, including stages that inherit it.
#[test]
fn table_valued_matrix_values_carry_their_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = write(
        tmp.path(),
        "m.toml",
        r#"
[experiment]
name = "tables"

[src]
kind = "write"
matrix.data = [{ name = "a", text = "alpha", src = "src@a" }, { name = "b", text = "beta", src = "src@b" }]
text = "${data.text}"

[joined]
kind = "concat"
matrix.data = [{ name = "a", text = "alpha", src = "src@a" }, { name = "b", text = "beta", src = "src@b" }]
inputs = { parts = ["${data.src}"] }
upper = true
"#,
    );
    let cache = tmp.path().join("c");
    let outcomes = run_outcomes(&toy(&cache, &["run", manifest.to_str().unwrap(), "--json"]));
    let names: Vec<&str> = outcomes.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(names, ["src@a", "src@b", "joined@a", "joined@b"]);
    let show = toy(&cache, &["show", manifest.to_str().unwrap(), "src@b"]);
    assert!(String::from_utf8_lossy(&show.stdout).contains(r#""text":"beta""#));

    // One value means one thing everywhere: other fields elsewhere are an error, at the place.
    let text = std::fs::read_to_string(&manifest).unwrap();
    let last = text.rfind("\"beta\"").unwrap();
    let conflicting = format!("{}\"BETA\"{}", &text[..last], &text[last + 6..]);
    std::fs::write(&manifest, conflicting).unwrap();
    let out = toy(&cache, &["plan", manifest.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out)
            .contains("matrix value `b` of `data` has other fields in `joined` than in `src`"),
        "{}",
        stderr(&out)
    );
    // Tables and plain values do not mix in one key, and a table needs a name.
    for (matrix, said) in [
        (
            r#"[{ name = "a", text = "x" }, "b"]"#,
            "mixes tables and plain values",
        ),
        (r#"[{ text = "x" }]"#, "has no `name`"),
        (
            r#"[{ name = "a", text = "x" }, { name = "b" }]"#,
            "has fields",
        ),
    ] {
        std::fs::write(
            &manifest,
            format!("[experiment]\nname = \"t\"\n\n[src]\nkind = \"write\"\nmatrix.data = {matrix}\ntext = \"${{data}}\"\n"),
        )
        .unwrap();
        let out = toy(&cache, &["plan", manifest.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{matrix}");
        assert!(stderr(&out).contains(said), "{matrix}: {}", stderr(&out));
    }
}

/// Every run leaves a record; `pipeline runs` lines them up: what changed, headline metrics.
#[test]
fn runs_are_recorded_and_compared() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = write(tmp.path(), "m.toml", DIAMOND);
    write(tmp.path(), "input.txt", "x");
    let cache = tmp.path().join("cache");
    let m = manifest.to_str().unwrap();
    let out = toy(&cache, &["runs", m]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("no runs of"), "{}", stderr(&out));
    run_outcomes(&toy(&cache, &["run", m, "--json"]));
    run_outcomes(&toy(
        &cache,
        &["run", m, "--json", "--set", "counter.steps=9"],
    ));
    let out = toy(&cache, &["runs", m, "--json"]);
    let records: Value = serde_json::from_slice(&out.stdout).unwrap();
    let records = records.as_array().unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(
        records[1]["overrides"],
        serde_json::json!(["counter.steps=9"])
    );
    assert_eq!(records[0]["status"], "ok");
    let counter = |r: &Value| {
        r["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == "counter")
            .cloned()
            .unwrap()
    };
    assert_eq!(counter(&records[1])["params"]["steps"], 9);
    let digits = |r: &Value| counter(r)["metrics"]["last_digits"].as_f64().unwrap();
    assert_ne!(
        digits(&records[0]),
        digits(&records[1]),
        "the metric follows the run"
    );

    let table = String::from_utf8(toy(&cache, &["runs", m]).stdout).unwrap();
    let changed = table.lines().find(|l| l.starts_with("changed")).unwrap();
    assert!(changed.contains("counter.steps: "), "{table}");
    assert!(changed.contains(" -> 9"), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("counter.last_digits")),
        "{table}"
    );
    let md =
        String::from_utf8(toy(&cache, &["runs", m, "--markdown", "--last", "1"]).stdout).unwrap();
    assert!(md.starts_with("| | #1 |\n|---|---|\n"), "{md}");
    // gc leaves the history alone.
    assert_eq!(toy(&cache, &["gc", m, "--yes"]).status.code(), Some(0));
    let again: Value = serde_json::from_slice(&toy(&cache, &["runs", m, "--json"]).stdout).unwrap();
    assert_eq!(again.as_array().unwrap().len(), 2);
}
