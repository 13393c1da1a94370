//! Every committed manifest plans offline with the real binary: it parses, type-checks and
//! expands, and the flagship experiments evaluate the way the README says (likelihood and
//! greedy pass@1 into one report).

use std::path::Path;
use std::process::Command;

fn plan(manifest: &Path) -> String {
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .arg("--cache")
        .arg(cache.path())
        .arg("plan")
        .arg(manifest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} does not plan:\n{}",
        manifest.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_manifest_plans_offline() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
    let mut planned = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = plan(&path);
            planned.push((
                path.file_stem().unwrap().to_string_lossy().into_owned(),
                text,
            ));
        }
    }
    planned.sort();
    let names: Vec<&str> = planned.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["demo", "phi15-quality", "smollm2-quality", "synthetic"]
    );
    for (name, text) in &planned {
        let stages: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        for wanted in ["likelihood-base", "report"] {
            assert!(
                stages.iter().any(|s| s.starts_with(wanted)),
                "{name} has no `{wanted}` stage:\n{text}"
            );
        }
    }
}

/// The README's cheaper commands narrow the matrix with `--set`; every report of the flagship
/// manifest names stages, not instances, so the manifest still plans.
#[test]
fn smollm2_plans_with_one_seed_and_one_benchmark() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/smollm2-quality.toml");
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .arg("--cache")
        .arg(cache.path())
        .args(["plan", manifest.to_str().unwrap(), "--only", "report-data"])
        .args([
            "--set",
            "train.matrix.seed=[1]",
            "--set",
            "evals.matrix.bench=[\"humaneval\"]",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for wanted in [
        "similarity@messy",
        "likelihood@filtered,1,humaneval",
        "report-data",
    ] {
        assert!(text.contains(wanted), "{wanted} missing:\n{text}");
    }
    assert!(!text.contains("train@messy,2"), "{text}");
}
