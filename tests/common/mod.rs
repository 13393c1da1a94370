//! Helpers shared by the CLI end-to-end tests.

use std::path::Path;
use std::process::Output;

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
            // Unit outcomes serialise as strings, outcomes with a message as {"failed": "..."}.
            let outcome = match &s["outcome"] {
                Value::String(o) => o.clone(),
                Value::Object(m) => m.keys().next().cloned().unwrap_or_default(),
                other => other.to_string(),
            };
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
