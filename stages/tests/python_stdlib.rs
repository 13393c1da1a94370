//! The `python-stdlib` stage kind on a planted fake standard library and on the real one
//! (the real-stdlib tests skip with a message when `python3` is absent).

use pipeline_stages::artifacts::RecordsArtifact;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use pipeline_engine::{Stage, StageContext};
use pipeline_stages::kinds::python_stdlib::{PythonStdlib, PythonStdlibParams, StdlibMode};
use pipeline_stages::records::{read_records, Record};

/// Runs the kind standalone; returns (records, stats.json, records.jsonl bytes).
fn run_kind(params: &PythonStdlibParams, seed: u64) -> (Vec<Record>, serde_json::Value, Vec<u8>) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut ctx = StageContext::standalone(
        "stdlib",
        seed,
        BTreeMap::new(),
        BTreeMap::from([("records".to_string(), out.clone())]),
        tmp.path().join("ckpt"),
    );
    PythonStdlib::validate(params).unwrap();
    PythonStdlib::run(params, &mut ctx).unwrap();
    let records = read_records(&out.join(RecordsArtifact::RECORDS_FILE)).unwrap();
    let stats: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join(RecordsArtifact::STATS_FILE)).unwrap(),
    )
    .unwrap();
    let bytes = std::fs::read(out.join(RecordsArtifact::RECORDS_FILE)).unwrap();
    (records, stats, bytes)
}

fn python_available() -> bool {
    let ok = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipping: `python3` is not installed");
    }
    ok
}

/// Asserts with Python's own parser that every `output` is valid Python.
fn assert_python_parses(records: &[Record]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sources.json");
    let sources: Vec<&str> = records.iter().map(|r| r.get("output").unwrap()).collect();
    std::fs::write(&path, serde_json::to_string(&sources).unwrap()).unwrap();
    let script = "import ast,json,sys\n\
        bad=[]\n\
        for s in json.load(open(sys.argv[1])):\n\
        \x20   try: ast.parse(s)\n\
        \x20   except SyntaxError as e: bad.append((str(e), s[:200]))\n\
        print(len(bad)); print(bad[:3])\n";
    let out = Command::new("python3")
        .args(["-c", script, path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().next(),
        Some("0"),
        "unparsable outputs: {stdout}"
    );
}

const PLANTED: &str = r#""""A module with planted functions."""
import os
import functools
import numpy as np
from json import dumps
from .sibling import helper

SCALE = 3


def keep_me(path, depth=0):
    """Join a path with its own depth, recursively.

    Uses only builtins and stdlib imports.
    """
    if depth > 2:
        return dumps(os.path.join(path, str(depth)))
    return keep_me(path, depth + 1)


def uses_constant(x):
    """Scale a number by the module constant."""
    y = x * SCALE
    return y + 1


def uses_relative(x):
    """Call a helper from a sibling module."""
    z = helper(x)
    return z


def uses_third_party(x):
    """Sum with numpy."""
    total = np.sum(x)
    return total


def undocumented(a, b):
    c = a + b
    d = c * 2
    return d


@functools.lru_cache(maxsize=None)
def cached(n):
    """Return the n-th triangular number."""
    total = 0
    for i in range(n + 1):
        total += i
    return total


class Shape:
    """A shape."""

    def area(self, width, height):
        """Compute the area of a rectangle."""
        result = width * height
        # keyword names and attributes are not references
        return max(result, 0)

    def clone(self):
        """Make a copy of the shape."""
        other = Shape()
        other.__dict__.update(self.__dict__)
        return other


def lookup(i):
    """Look a value up in a table."""
    table = [0, 7, 14, 21, 28, 35, 42, 49, 56, 63, 70, 77, 84, 91, 98, 4, 11, 18, 25, 32, 39, 46, 53, 60, 67, 74, 81, 88, 95, 1, 8, 15, 22, 29, 36, 43, 50, 57, 64, 71, 78, 85, 92, 99, 5, 12, 19, 26, 33, 40, 47, 54, 61, 68, 75, 82, 89, 96, 2, 9, 16, 23, 30, 37, 44, 51, 58, 65, 72, 79, 86, 93, 100, 6, 13, 20, 27, 34, 41, 48, 55, 62, 69, 76, 83, 90, 97, 3, 10, 17, 24, 31, 38, 45, 52, 59, 66, 73, 80, 87, 94, 0, 7, 14, 21, 28, 35, 42, 49, 56, 63, 70, 77, 84, 91, 98, 4, 11, 18, 25]
    value = table[i]
    return value
"#;

fn fake_stdlib() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::write(root.join("planted.py"), PLANTED).unwrap();
    // Same self-contained function in places that must be skipped.
    let good = "def good(x):\n    \"\"\"Return x.\"\"\"\n    y = x\n    z = y\n    return z\n";
    for dir in ["test", "__pycache__", "site-packages", "pkg/tests"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
        std::fs::write(root.join(dir).join("mod.py"), good).unwrap();
    }
    std::fs::write(root.join("pkg/foo_test.py"), good).unwrap();
    std::fs::write(root.join("pkg/test_bar.py"), good).unwrap();
    std::fs::write(root.join("pkg/notes.txt"), good).unwrap();
    tmp
}

fn fake_params(dir: &Path) -> PythonStdlibParams {
    PythonStdlibParams {
        stdlib_dir: Some(dir.to_path_buf()),
        ..Default::default()
    }
}

#[test]
fn fake_stdlib_keeps_only_self_contained_documented_functions() {
    let tmp = fake_stdlib();
    let (records, stats, _) = run_kind(&fake_params(tmp.path()), 0);
    let names: Vec<&str> = records.iter().map(|r| r.get("name").unwrap()).collect();
    assert_eq!(
        names,
        ["keep_me", "cached", "Shape.area", "lookup"],
        "{stats:#}"
    );
    assert_eq!(stats["files_selected"], 1, "{stats:#}");
    assert_eq!(stats["skipped"]["not_self_contained"], 4, "{stats:#}");
    assert_eq!(stats["skipped"]["no_docstring"], 1, "{stats:#}");
    assert!(stats["skipped"].get("too_short").is_none(), "{stats:#}");

    let keep = &records[0];
    assert_eq!(
        keep.get("instruction").unwrap(),
        "Write a Python function `keep_me(path, depth=0)` that join a path with its own \
         depth, recursively."
    );
    assert!(keep
        .get("output")
        .unwrap()
        .starts_with("def keep_me(path, depth=0):\n"));
    assert_eq!(keep.get("output"), keep.get("content"));
    assert_eq!(keep.get("path"), Some("planted.py"));
    assert_eq!(keep.provenance.line, Some(11));
    let cached = records[1].get("output").unwrap();
    assert!(cached.starts_with("@functools.lru_cache(maxsize=None)\ndef cached(n):\n"));
    let area = records[2].get("output").unwrap();
    assert!(
        area.starts_with("def area(self, width, height):\n    \"\"\"Compute"),
        "{area}"
    );
    assert!(area.contains("\n    return max(result, 0)\n"), "{area}");
    assert!(records[2]
        .get("instruction")
        .unwrap()
        .ends_with("that compute the area of a rectangle."));
    if python_available() {
        assert_python_parses(&records);
    }

    // The heuristic scorer is applied: the data-dump function falls below a higher bar.
    let picky = PythonStdlibParams {
        min_score: 0.9,
        ..fake_params(tmp.path())
    };
    let (picked, stats, _) = run_kind(&picky, 0);
    let names: Vec<&str> = picked.iter().map(|r| r.get("name").unwrap()).collect();
    assert_eq!(names, ["keep_me", "cached", "Shape.area"], "{stats:#}");
    assert_eq!(stats["skipped"]["low_score"], 1, "{stats:#}");

    // A strict score threshold rejects everything, which is an error, not empty output.
    let strict = PythonStdlibParams {
        min_score: 1.0,
        min_lines: 50,
        ..fake_params(tmp.path())
    };
    let out = tempfile::tempdir().unwrap();
    let mut ctx = StageContext::standalone(
        "s",
        0,
        BTreeMap::new(),
        BTreeMap::from([("records".to_string(), out.path().to_path_buf())]),
        out.path().join("ckpt"),
    );
    assert!(PythonStdlib::run(&strict, &mut ctx).is_err());
}

#[test]
fn chunks_of_fake_stdlib_cover_the_file() {
    let tmp = fake_stdlib();
    let params = PythonStdlibParams {
        mode: StdlibMode::Chunks,
        chunk_lines: 10,
        ..fake_params(tmp.path())
    };
    let (records, stats, _) = run_kind(&params, 0);
    let joined: String = records.iter().map(|r| r.get("content").unwrap()).collect();
    assert_eq!(joined, PLANTED);
    assert_eq!(records.len(), PLANTED.lines().count().div_ceil(10));
    assert_eq!(records[1].provenance.line, Some(11));
    assert_eq!(stats["records"], records.len());
}

#[test]
fn missing_python_is_a_clear_error() {
    let params = PythonStdlibParams {
        python: "/nonexistent/python3-for-test".into(),
        ..Default::default()
    };
    let out = tempfile::tempdir().unwrap();
    let mut ctx = StageContext::standalone(
        "s",
        0,
        BTreeMap::new(),
        BTreeMap::from([("records".to_string(), out.path().to_path_buf())]),
        out.path().join("ckpt"),
    );
    let err = PythonStdlib::run(&params, &mut ctx).err().unwrap();
    assert!(format!("{err:?}").contains("cannot run"), "{err:?}");
}

#[test]
fn real_stdlib_functions_are_documented_and_parse() {
    if !python_available() {
        return;
    }
    let (functions, stats, _) = run_kind(&PythonStdlibParams::default(), 0);
    if std::env::var_os("PYTHON_STDLIB_DUMP").is_some() {
        eprintln!("{stats:#}");
        for r in functions.iter().step_by(97) {
            eprintln!(
                "--- {}\n{}\n{}",
                r.provenance,
                r.get("instruction").unwrap(),
                r.get("output").unwrap()
            );
        }
    }
    assert!(
        functions.len() >= 200,
        "{} functions: {stats:#}",
        functions.len()
    );
    for r in &functions {
        let instruction = r.get("instruction").unwrap();
        assert!(
            instruction.starts_with("Write a Python function `"),
            "{instruction}"
        );
        assert!(instruction.len() > "Write a Python function `f()` that ".len() + 3);
        assert!(r.get("output").unwrap().contains("def "));
        let path = r.get("path").unwrap();
        assert!(!path.starts_with("test/") && !path.starts_with("site-packages/"));
    }
    assert_python_parses(&functions);
}

#[test]
fn real_stdlib_chunks_outnumber_functions_and_sample_deterministically() {
    if !python_available() {
        return;
    }
    // The demo's shape: N textbook functions against 5N messy chunks of the same files.
    let n = 400;
    let textbook = PythonStdlibParams {
        limit: Some(n),
        ..Default::default()
    };
    let (sampled, stats, _) = run_kind(&textbook, 1);
    assert_eq!(sampled.len(), n);
    assert!(stats["found"].as_u64().unwrap() > n as u64, "{stats:#}");
    assert_eq!(stats["seed"], 1);

    let chunks = PythonStdlibParams {
        mode: StdlibMode::Chunks,
        ..Default::default()
    };
    let (all, _, _) = run_kind(&chunks, 0);
    assert!(all.len() >= 5 * n, "{} chunks", all.len());
    assert!(all
        .iter()
        .all(|r| !r.get("content").unwrap().trim().is_empty()));

    let limited = PythonStdlibParams {
        limit: Some(5 * n),
        ..chunks
    };
    let (a, stats, a_bytes) = run_kind(&limited, 1);
    assert_eq!(a.len(), 5 * n);
    assert_eq!(stats["found"], all.len());
    let (_, _, b_bytes) = run_kind(&limited, 1);
    assert_eq!(a_bytes, b_bytes, "same seed must give the same bytes");
    let (c, _, c_bytes) = run_kind(&limited, 2);
    assert_eq!(c.len(), 5 * n);
    assert_ne!(a_bytes, c_bytes, "another seed must draw another sample");
}

#[test]
fn manifest_chains_both_modes_and_caches() {
    let stdlib = fake_stdlib();
    let tmp = tempfile::tempdir().unwrap();
    let manifest = tmp.path().join("m.toml");
    let dir = stdlib.path().display().to_string();
    std::fs::write(
        &manifest,
        format!(
            "[experiment]\nname = \"t\"\nseed = 3\n\n\
             [textbook]\nkind = \"python-stdlib\"\nstdlib_dir = {dir:?}\n\n\
             [messy]\nkind = \"python-stdlib\"\nstdlib_dir = {dir:?}\nmode = \"chunks\"\n\
             chunk_lines = 5\nlimit = 4\n"
        ),
    )
    .unwrap();
    let registry = pipeline_stages::registry();
    let m = pipeline_engine::load_manifest(&manifest, &registry, &Default::default()).unwrap();
    let store = pipeline_engine::Store::open(&tmp.path().join("store")).unwrap();
    let opts = pipeline_engine::RunOptions::default();
    let report = pipeline_engine::run(&m, &store, &opts).unwrap();
    assert!(report.success(), "{report:?}");
    assert_eq!(report.ran(), 2);
    let again = pipeline_engine::run(&m, &store, &opts).unwrap();
    assert!(again.success());
    assert_eq!(again.ran(), 0, "{again:?}");

    // Editing a selected file changes both keys; editing a skipped one changes none.
    std::fs::write(stdlib.path().join("test/mod.py"), "x = 1\n").unwrap();
    assert_eq!(pipeline_engine::run(&m, &store, &opts).unwrap().ran(), 0);
    std::fs::write(
        stdlib.path().join("planted.py"),
        format!("{PLANTED}\n# edited\n"),
    )
    .unwrap();
    let edited = pipeline_engine::run(&m, &store, &opts).unwrap();
    assert!(edited.success());
    assert_eq!(edited.ran(), 2, "{edited:?}");
}
