//! The Slurm executor against a real Slurm: the one-node cluster that `scripts/slurm-up.sh`
//! starts (two fake GPUs by gres, a preemptible `low` partition under `high`). CI starts it and
//! sets `PIPELINE_REQUIRE_SLURM=1`, so that a missing cluster fails there instead of skipping.
//! Tests that need no cluster (worker refusals, plans, manifest errors) always run.
//!
//! The stages are the ML-free kinds of `examples/toy_pipeline.rs`; jobs run that binary in
//! worker mode on the node, which is this machine, so the cache in a temporary directory is
//! "shared".

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::slurm::{cluster, job_state, preempt_with_high_priority_job, release};
use common::{action_records, ran, run_outcomes, text, toy_binary, wait_for};

fn toy_command(cache: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(toy_binary());
    c.arg("--cache")
        .arg(cache)
        .args(args)
        .env_remove("PIPELINE_CACHE");
    c
}

fn toy(cache: &Path, args: &[&str]) -> Output {
    toy_command(cache, args).output().expect("run toy_pipeline")
}

fn manifest(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("m.toml");
    let head = "[experiment]\nname = \"cluster\"\nexecutor = \"slurm\"\n\n\
                [experiment.slurm]\npoll = \"1s\"\nrecord_wait = \"5s\"\n\n";
    std::fs::write(&path, format!("{head}{body}")).expect("write manifest");
    path
}

/// The job ids each stage log names (`pipeline: job ID on HOST, attempt N`), by log file.
fn logged_job_ids(cache: &Path) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut ids = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(cache.join("slurm").join("logs")) else {
        return ids;
    };
    for entry in dir.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("array-") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let jobs = text
            .lines()
            .filter_map(|l| l.strip_prefix("pipeline: job "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect();
        ids.insert(name, jobs);
    }
    ids
}

/// The saved job records (`slurm/jobs/<key>.json`).
fn job_records(cache: &Path) -> Vec<Value> {
    let Ok(dir) = std::fs::read_dir(cache.join("slurm").join("jobs")) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| serde_json::from_slice(&std::fs::read(p).ok()?).ok())
        .collect()
}

fn wait_running(cache: &Path) -> (String, String) {
    wait_for("a running job", Duration::from_secs(60), || {
        let record = job_records(cache).into_iter().next()?;
        let id = record["job_id"].as_str()?.to_string();
        job_state(&id)
            .starts_with("RUNNING")
            .then(|| (id, record["key"].as_str().unwrap_or("").to_string()))
    })
}

fn finish(child: Child) -> Output {
    child.wait_with_output().expect("coordinator output")
}

fn spawn_run(cache: &Path, m: &Path, extra: &[&str]) -> Child {
    let mut args = vec!["run", m.to_str().expect("utf-8 path"), "--json"];
    args.extend_from_slice(extra);
    toy_command(cache, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start coordinator")
}

/// The output file of `stage`'s action record.
fn output_of(cache: &Path, stage: &str) -> String {
    let record = action_records(cache)
        .into_iter()
        .find(|r| r["stage"] == stage)
        .unwrap_or_else(|| panic!("no record of {stage}"));
    let tree = record["outputs"]["out"]["tree"].as_str().expect("tree");
    std::fs::read_to_string(cache.join("views").join(tree).join("data")).expect("output data")
}

#[test]
fn a_matrix_of_gpu_stages_runs_as_jobs_and_two_never_share_a_gpu() {
    let Some(_cluster) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let m = manifest(
        dir.path(),
        r#"
[gen]
kind = "write"
matrix.n = ["a", "b", "c"]
text = "${n}"
repeat = 8
delay_ms = 250
gpu = true

[all]
kind = "concat"
inputs = { parts = "gen" }
launch = "local"
"#,
    );
    let out = toy(&cache, &["run", m.to_str().unwrap(), "--json"]);
    let outcomes = run_outcomes(&out);
    assert_eq!(ran(&outcomes), ["all", "gen@a", "gen@b", "gen@c"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["slurm_calls"].as_u64().unwrap_or(0) >= 3, "{report}");

    // The matrix went as one job array, a task per stage; `all` ran on the coordinator.
    // (Job records are removed once their stage is stored; the logs stay.)
    assert!(job_records(&cache).is_empty());
    let ids: Vec<String> = logged_job_ids(&cache).into_values().flatten().collect();
    assert_eq!(
        ids.len(),
        3,
        "one task per GPU stage, none for `all`: {ids:?}"
    );
    let arrays: std::collections::BTreeSet<&str> = ids
        .iter()
        .filter_map(|id| id.split_once('_').map(|(array, _)| array))
        .collect();
    assert_eq!(arrays.len(), 1, "one job array: {ids:?}");
    // Every GPU stage ran on one fake GPU; overlapping ones on different GPUs.
    let gpu_runs: Vec<(f64, f64, String)> = action_records(&cache)
        .into_iter()
        .filter(|r| r["kind"] == "write")
        .map(|r| {
            let m = &r["metadata"];
            assert!(
                m["cuda_visible_devices"].is_string(),
                "a job given a GPU sees CUDA_VISIBLE_DEVICES: {m}"
            );
            (
                m["start"].as_f64().unwrap(),
                m["end"].as_f64().unwrap(),
                m["slurm_job_gpus"]
                    .as_str()
                    .expect("a job given a GPU has SLURM_JOB_GPUS")
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(gpu_runs.len(), 3);
    for (i, a) in gpu_runs.iter().enumerate() {
        assert!(!a.2.contains(','), "one GPU per stage, got {}", a.2);
        for b in &gpu_runs[i + 1..] {
            let overlap = a.0 < b.1 && b.0 < a.1;
            assert!(
                !(overlap && a.2 == b.2),
                "two stages shared GPU {}: {a:?} {b:?}",
                a.2
            );
        }
    }
    // The cluster computed what a local run computes.
    let local = dir.path().join("local");
    run_outcomes(&toy(
        &local,
        &["run", m.to_str().unwrap(), "--json", "--executor", "local"],
    ));
    assert_eq!(output_of(&cache, "all"), output_of(&local, "all"));
    // Everything cached now: no job is submitted.
    let again = toy(&cache, &["run", m.to_str().unwrap(), "--json"]);
    assert!(ran(&run_outcomes(&again)).is_empty());
}

/// A coordinator running one slow stage (`repeat` tenths of a second) as a job, once the job
/// runs: the cache, the manifest, the coordinator, the job id and the stage's key.
fn slow_run(dir: &Path, repeat: u32) -> (PathBuf, PathBuf, Child, String, String) {
    let cache = dir.join("cache");
    let m = manifest(
        dir,
        &format!("[slow]\nkind = \"write\"\ntext = \"x\"\nrepeat = {repeat}\ndelay_ms = 100\n"),
    );
    let child = spawn_run(&cache, &m, &[]);
    let (id, key) = wait_running(&cache);
    (cache, m, child, id, key)
}

#[test]
fn a_job_cancelled_with_scancel_fails_the_stage_with_its_log() {
    let Some(_cluster) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (cache, _, child, id, _) = slow_run(dir.path(), 200);
    // The job is RUNNING a moment before its script has written its first line.
    wait_for("the job's first log line", Duration::from_secs(30), || {
        (!logged_job_ids(&cache)
            .into_values()
            .flatten()
            .collect::<Vec<_>>()
            .is_empty())
        .then_some(())
    });
    let cancelled = Command::new("scancel").arg(&id).status().expect("scancel");
    assert!(cancelled.success());
    let out = finish(child);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("Slurm job {id} ended CANCELLED")),
        "{stderr}"
    );
    assert!(stderr.contains("last lines of the log"), "{stderr}");
    assert!(
        stderr.contains(&format!("job {id} on")),
        "the log's tail is shown: {stderr}"
    );
}

#[test]
fn a_worker_killed_with_sigkill_is_detected() {
    let Some(_cluster) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (_, _, child, id, key) = slow_run(dir.path(), 200);
    // The worker dies without a word: no signal handler runs, nothing is written. (The job
    // is RUNNING a moment before its script has started the worker.)
    let pattern = format!("expect-key {key}");
    wait_for("the worker process", Duration::from_secs(30), || {
        let found = Command::new("pgrep").args(["-f", &pattern]).output().ok()?;
        found.status.success().then_some(())
    });
    let killed = Command::new("pkill")
        .args(["-KILL", "-f", &pattern])
        .status()
        .expect("pkill");
    assert!(killed.success(), "the worker process was found");
    let out = finish(child);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("Slurm job {id} ended FAILED")),
        "{stderr}"
    );
}

#[test]
fn a_restarted_coordinator_reattaches_to_its_running_job() {
    let Some(_cluster) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (cache, m, mut first, id, _) = slow_run(dir.path(), 40);
    // The login node kills the coordinator; the job goes on.
    first.kill().expect("kill coordinator");
    let _ = first.wait();
    assert!(
        job_state(&id).starts_with("RUNNING"),
        "the job outlives its coordinator"
    );
    let out = toy(&cache, &["run", m.to_str().unwrap(), "--json"]);
    assert_eq!(ran(&run_outcomes(&out)), ["slow"]);
    let logged: Vec<String> = logged_job_ids(&cache).into_values().flatten().collect();
    assert_eq!(logged, [id], "re-attached, not resubmitted");
}

#[test]
fn a_preempted_worker_is_requeued_and_resumes_from_its_checkpoint() {
    let Some(_cluster) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    // Both CPUs of the node, in the preemptible partition.
    let body = "[count]\nkind = \"count\"\nsteps = 60\ndelay_ms = 150\n\n\
                [count.slurm]\npartition = \"low\"\ncpus = 2\n";
    let m = manifest(dir.path(), body);
    let child = spawn_run(&cache, &m, &[]);
    let (id, key) = wait_running(&cache);
    let state = cache.join("checkpoints").join(&key).join("state");
    wait_for("a checkpoint of 10 steps", Duration::from_secs(60), || {
        let text = std::fs::read_to_string(&state).ok()?;
        let step: u64 = text.split_whitespace().next()?.parse().ok()?;
        (step >= 10).then_some(())
    });
    // A job of the higher partition needs a CPU: Slurm preempts ours (SIGTERM, requeue).
    preempt_with_high_priority_job();
    // A requeued job is held ~120 s (BeginTime); release it as an impatient admin would.
    wait_for("the requeued job", Duration::from_secs(60), || {
        let s = job_state(&id);
        (s.starts_with("PENDING") && s.contains("BeginTime")).then_some(())
    });
    release(&id);
    let out = finish(child);
    assert_eq!(ran(&run_outcomes(&out)), ["count"]);

    let record = action_records(&cache)
        .into_iter()
        .find(|r| r["stage"] == "count")
        .expect("count's record");
    let resumed = record["metadata"]["resumed_from_step"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        resumed >= 10,
        "resumed from its checkpoint, not from 0: {resumed}"
    );
    let log = std::fs::read_to_string(cache.join("slurm/logs").join(format!("{key}.log"))).unwrap();
    assert!(
        log.contains("attempt 0") && log.contains("attempt 1"),
        "{log}"
    );
    // Byte-identical to an uninterrupted local run.
    let local = dir.path().join("local");
    run_outcomes(&toy(
        &local,
        &["run", m.to_str().unwrap(), "--json", "--executor", "local"],
    ));
    assert_eq!(output_of(&cache, "count"), output_of(&local, "count"));
}

#[test]
fn a_detached_run_submits_the_dag_and_status_collects_it() {
    let Some(_cluster) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let m = manifest(
        dir.path(),
        "[a]\nkind = \"write\"\ntext = \"x\"\nrepeat = 20\ndelay_ms = 100\n\n\
         [b]\nkind = \"concat\"\ninputs = { parts = \"a\" }\nupper = true\n",
    );
    let started = Instant::now();
    let out = toy(&cache, &["run", m.to_str().unwrap(), "--detach"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        started.elapsed() < Duration::from_secs(2) + Duration::from_millis(1500),
        "detaching returns at once"
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("submitted 2 jobs"), "{stdout}");
    let record: Value = serde_json::from_slice(
        &std::fs::read(cache.join("slurm/detached/cluster.json"))
            .expect("the detached run is recorded"),
    )
    .unwrap();
    let jobs = record["jobs"].as_array().unwrap();
    assert_eq!(jobs[0]["stage"], "a");
    assert!(
        jobs[0]["key"].is_string(),
        "a's producers are cached: its key is known"
    );
    assert!(jobs[1]["key"].is_null(), "b's key depends on a's output");
    let b_job = jobs[1]["job_id"].as_str().unwrap().to_string();
    // While it runs, status names the jobs.
    let status = toy(&cache, &["status", m.to_str().unwrap()]);
    let shown = text(&status.stdout);
    assert!(shown.contains(&format!("job {b_job}")), "{shown}");
    let done = wait_for(
        "the detached run to finish",
        Duration::from_secs(90),
        || {
            let status = toy(&cache, &["status", m.to_str().unwrap()]);
            let shown = text(&status.stdout);
            shown.contains("the detached run is done").then_some(shown)
        },
    );
    assert!(
        done.contains("report: "),
        "the results are pointed to: {done}"
    );
    // Done: gc runs, and prunes the logs with their keys.
    let logs = cache.join("slurm").join("logs");
    // (A job whose result is stored may still be leaving the queue a moment longer.)
    let kept = wait_for("gc to be allowed", Duration::from_secs(60), || {
        let out = toy(
            &cache,
            &["gc", m.to_str().unwrap(), "--keep-younger-than", "0s"],
        );
        out.status.success().then_some(out)
    });
    assert!(kept.status.success(), "{}", text(&kept.stderr));
    assert_eq!(
        std::fs::read_dir(&logs).unwrap().count(),
        1,
        "a's log stays with its result"
    );
    assert!(
        !cache.join("slurm/detached/cluster.json").exists(),
        "the finished run's record goes"
    );
    let local = dir.path().join("local");
    run_outcomes(&toy(
        &local,
        &["run", m.to_str().unwrap(), "--json", "--executor", "local"],
    ));
    assert_eq!(output_of(&cache, "b"), output_of(&local, "b"));
    let all = toy(&cache, &["gc", "--keep-younger-than", "0s"]);
    assert!(all.status.success(), "{}", text(&all.stderr));
    assert_eq!(
        std::fs::read_dir(&logs).unwrap().count(),
        0,
        "the logs go with their keys"
    );
}

#[test]
fn a_job_near_its_time_limit_checkpoints_requeues_itself_and_resumes() {
    let Some(_cluster) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    // A one-minute limit (Slurm's smallest) with the warning 50 s ahead: the worker hears
    // SIGUSR1 within seconds (Slurm's timer may send it up to a minute early).
    let m = manifest(
        dir.path(),
        "[count]\nkind = \"count\"\nsteps = 400\ndelay_ms = 100\n\n\
         [count.slurm]\ntime = \"1m\"\n",
    );
    std::fs::write(
        &m,
        std::fs::read_to_string(&m).unwrap().replace(
            "record_wait = \"5s\"",
            "record_wait = \"5s\"\nsignal_before = \"50s\"",
        ),
    )
    .unwrap();
    let mut child = spawn_run(&cache, &m, &[]);
    let (id, key) = wait_running(&cache);
    // Release every requeue at once (Slurm holds a requeued job ~120 s) until the run ends.
    let mut released = 0;
    let mut held_since: Option<Instant> = None;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("coordinator") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "the run did not end"
        );
        let s = job_state(&id);
        // Released only once the previous attempt is cleaned up on the node (its worker gone,
        // and a few seconds for slurmd): a real cluster holds a requeued job ~120 s, and a job
        // started again while its last instance is still being cleaned up is killed ("Job
        // credential revoked").
        if s.starts_with("PENDING") && s.contains("BeginTime") {
            let since = *held_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(5) && !worker_running(&key) {
                release(&id);
                released += 1;
                held_since = None;
            }
        } else {
            held_since = None;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let out = finish(child);
    assert!(status.success(), "{}", text(&out.stderr));
    assert_eq!(ran(&run_outcomes(&out)), ["count"]);
    assert!(released >= 1, "the job requeued itself at least once");
    let log = std::fs::read_to_string(cache.join("slurm/logs").join(format!("{key}.log"))).unwrap();
    assert!(
        log.contains("time limit near: checkpointed; requeueing job"),
        "{log}"
    );
    assert!(
        !log.contains("DUE TO TIME LIMIT"),
        "it never ran out of time: {log}"
    );
    let record = action_records(&cache)
        .into_iter()
        .find(|r| r["stage"] == "count")
        .expect("count's record");
    assert!(
        record["metadata"]["resumed_from_step"]
            .as_u64()
            .unwrap_or(0)
            > 0
    );
    let local = dir.path().join("local");
    run_outcomes(&toy(
        &local,
        &["run", m.to_str().unwrap(), "--json", "--executor", "local"],
    ));
    assert_eq!(output_of(&cache, "count"), output_of(&local, "count"));
}

// --- No cluster needed -------------------------------------------------------------------

fn local_manifest(dir: &Path) -> PathBuf {
    let path = dir.join("m.toml");
    std::fs::write(
        &path,
        "[experiment]\nname = \"w\"\n\n[a]\nkind = \"write\"\ntext = \"x\"\n\n\
         [b]\nkind = \"concat\"\ninputs = { parts = \"a\" }\n\n\
         [b.slurm]\ntime = \"2h\"\nsbatch = [\"--constraint=fast\"]\n",
    )
    .unwrap();
    path
}

/// A worker's run of `stage` expecting `key`: its exit code and stderr.
fn worker(cache: &Path, m: &Path, stage: &str, key: &str) -> (Option<i32>, String) {
    let out = toy(
        cache,
        &[
            "run",
            m.to_str().unwrap(),
            "--only",
            stage,
            "--expect-key",
            key,
        ],
    );
    (out.status.code(), text(&out.stderr))
}

#[test]
fn a_worker_refuses_a_key_other_than_the_coordinators() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let m = local_manifest(dir.path());
    std::fs::create_dir_all(cache.join("slurm")).unwrap();
    run_outcomes(&toy(
        &cache,
        &["run", m.to_str().unwrap(), "--json", "--only", "a"],
    ));
    let (code, stderr) = worker(&cache, &m, "b", "0123abcd");
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("but the coordinator expected 0123abcd"),
        "{stderr}"
    );
    assert!(stderr.contains("this node computes key"), "{stderr}");
}

#[test]
fn a_worker_refuses_to_compute_a_producer_that_is_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let m = local_manifest(dir.path());
    std::fs::create_dir_all(cache.join("slurm")).unwrap();
    let (code, stderr) = worker(&cache, &m, "b", "0123abcd");
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("its producer `a` is not in the cache"),
        "{stderr}"
    );
    assert!(
        action_records(&cache).is_empty(),
        "the worker computed nothing"
    );
}

#[test]
fn a_worker_that_cannot_see_the_cache_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let m = local_manifest(dir.path());
    let missing = dir.path().join("not-shared");
    let (code, stderr) = worker(&missing, &m, "a", "0123");
    assert_eq!(code, Some(1));
    assert!(stderr.contains("is not visible on"), "{stderr}");
    assert!(stderr.contains("filesystem every node mounts"), "{stderr}");
    assert!(
        !missing.exists(),
        "a worker never creates a cache of its own"
    );
}

#[test]
fn plan_shows_each_jobs_sbatch_line() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let m = local_manifest(dir.path());
    let out = toy(
        &cache,
        &["plan", m.to_str().unwrap(), "--executor", "slurm"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("sbatch --parsable --job-name=pipeline:w:a"),
        "{stdout}"
    );
    assert!(
        stdout.contains("--requeue") && stdout.contains("--signal=B:USR1@120"),
        "{stdout}"
    );
    assert!(
        stdout.contains("--time=120") && stdout.contains("--constraint=fast"),
        "{stdout}"
    );
    assert!(
        !cache.join("slurm").exists(),
        "a plan submits and writes nothing"
    );
}

#[test]
fn slurm_tables_are_checked_with_their_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.toml");
    std::fs::write(
        &path,
        "[experiment]\nname = \"w\"\n\n[a]\nkind = \"write\"\ntext = \"x\"\nlaunch = \"cloud\"\n\n\
         [a.slurm]\npoll = \"1s\"\n\n[b]\nkind = \"write\"\ntext = \"y\"\n\n\
         [b.slurm]\nmemory = \"4G\"\n",
    )
    .unwrap();
    let out = toy(&dir.path().join("cache"), &["plan", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("`launch` of `a`"), "{stderr}");
    assert!(
        stderr.contains("`poll` is a setting of the whole run"),
        "{stderr}"
    );
    assert!(
        stderr.contains("`slurm` of `b`") && stderr.contains("memory"),
        "{stderr}"
    );
}

#[test]
fn a_worker_leaves_a_key_leased_by_another_node_alone() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let m = local_manifest(dir.path());
    let plan = toy(&cache, &["plan", m.to_str().unwrap(), "--json"]);
    let entries: Value = serde_json::from_slice(&plan.stdout).expect("plan JSON");
    let key = entries[0]["key"].as_str().expect("a's key").to_string();
    std::fs::create_dir_all(cache.join("slurm")).unwrap();
    // A worker on another node holds the key, with a fresh heartbeat.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let lease =
        serde_json::json!({"host": "other-node", "pid": 1, "job": "7", "heartbeat_unix": now});
    std::fs::write(
        cache.join("locks").join(format!("{key}.lease")),
        lease.to_string(),
    )
    .unwrap();
    let out = toy(
        &cache,
        &[
            "run",
            m.to_str().unwrap(),
            "--only",
            "a",
            "--expect-key",
            &key,
        ],
    );
    assert_eq!(out.status.code(), Some(75), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("leased by process 1 on other-node (Slurm job 7)"),
        "{stderr}"
    );
    assert!(action_records(&cache).is_empty());
}

/// Whether a worker computing `key` (`--expect-key KEY` on its command line) is running here.
fn worker_running(key: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|cmdline| {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains("--expect-key") && cmdline.contains(key)
        })
}
