//! Helpers shared by the CLI end-to-end tests.

// Each test binary uses a subset of the helpers.
#![allow(dead_code)]

pub mod slurm;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The (stage, outcome) pairs of a successful `run --json`; panics with the output otherwise.
pub fn run_outcomes(out: &Output) -> Vec<(String, String)> {
    assert!(
        out.status.success(),
        "run failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("run --json prints JSON");
    report["stages"]
        .as_array()
        .expect("a `stages` array")
        .iter()
        .map(|s| {
            // Every outcome has one shape: {"status": .., "why": .., "error": ..}.
            let outcome = s["outcome"]["status"]
                .as_str()
                .unwrap_or_else(|| panic!("an outcome without a status: {s}"))
                .to_string();
            (
                s["stage"].as_str().expect("stage name").to_string(),
                outcome,
            )
        })
        .collect()
}

/// The stages that ran (not cached), sorted.
pub fn ran(outcomes: &[(String, String)]) -> Vec<String> {
    let mut v: Vec<String> = outcomes
        .iter()
        .filter(|(_, o)| o == "ran")
        .map(|(s, _)| s.clone())
        .collect();
    v.sort();
    v
}

/// Every action record in the cache, read as the engine reads them: only `*.json` files count
/// (a killed atomic write may leave a temp file beside them).
pub fn action_records(cache: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    for shard in std::fs::read_dir(cache.join("actions")).expect("actions directory") {
        for f in std::fs::read_dir(shard.expect("shard").path()).expect("shard directory") {
            let path = f.expect("entry").path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            out.push(
                serde_json::from_slice(&std::fs::read(path).expect("record")).expect("record JSON"),
            );
        }
    }
    out
}

/// The `toy_pipeline` example binary (the CLI over ML-free kinds).
pub fn toy_binary() -> PathBuf {
    // Integration tests live in target/<profile>/deps; cargo builds examples next door.
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory");
    let path = profile_dir.join("examples").join("toy_pipeline");
    assert!(
        path.exists(),
        "{} is missing: run `cargo test` (which builds examples), not a single test binary",
        path.display()
    );
    path
}

/// Polls `probe` until it gives a value; panics after `timeout`, naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Lossy UTF-8 of a process's output.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
