//! Property: whatever a careless edit does to the demo manifest, `pipeline plan` either
//! accepts it (exit 0) or rejects it with exit 2 and diagnostics that point into the file;
//! it never panics, aborts or hangs.
//!
//! Each case applies a few random edits (deleting or duplicating a span, inserting a TOML
//! token, replacing a number or a string with an extreme or foreign value, swapping lines)
//! and plans the result (planning parses, validates every parameter, resolves the graph and
//! computes every key; the demo reads no local files, so nothing else is needed).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::Value;

const DEMO: &str = include_str!("../manifests/demo.toml");

/// Text that edits insert: TOML syntax, reserved keys, references, extreme values.
const TOKENS: &[&str] = &[
    "=",
    "[",
    "]",
    "{",
    "}",
    "\"",
    "'",
    ".",
    ",",
    "\n",
    "#",
    "[[",
    "]]",
    "\"\"\"",
    "${data}",
    "${nokey}",
    "@",
    "kind",
    "inputs",
    "matrix",
    "launch",
    "slurm",
    "matrix.data = []",
    "inputs = { model = \"nope\" }",
    "kind = \"nope\"",
    "[experiment]",
    "[x]\nkind = \"read\"",
    "0",
    "-1",
    "nan",
    "inf",
    "-inf",
    "1e308",
    "1e-308",
    "9223372036854775807",
    "18446744073709551616",
    "true",
    "\"\u{1F600}\"",
    "\u{0}",
    "a.b.c.d.e.f.g = 1",
];

/// Values that replace a number or a string.
const VALUES: &[&str] = &[
    "0",
    "-1",
    "-0.0",
    "nan",
    "+inf",
    "1e308",
    "9223372036854775807",
    "4294967296",
    "\"\"",
    "\"nope\"",
    "\"../..\"",
    "\"model\"",
    "\"train\"",
    "[]",
    "{}",
    "true",
    "\"${data}\"",
];

#[derive(Debug, Clone)]
enum Edit {
    Delete { at: f64, len: usize },
    Duplicate { at: f64, len: usize },
    Insert { at: f64, token: usize },
    ReplaceValue { nth: usize, value: usize },
    SwapLines { a: f64, b: f64 },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (0.0..1.0, 1usize..40).prop_map(|(at, len)| Edit::Delete { at, len }),
        (0.0..1.0, 1usize..200).prop_map(|(at, len)| Edit::Duplicate { at, len }),
        (0.0..1.0, 0..TOKENS.len()).prop_map(|(at, token)| Edit::Insert { at, token }),
        (0usize..200, 0..VALUES.len()).prop_map(|(nth, value)| Edit::ReplaceValue { nth, value }),
        (0.0..1.0, 0.0..1.0).prop_map(|(a, b)| Edit::SwapLines { a, b }),
    ]
}

/// The char boundary nearest below `fraction` of the text.
fn boundary(text: &str, fraction: f64) -> usize {
    let mut at = ((text.len() as f64) * fraction) as usize;
    while at > 0 && !text.is_char_boundary(at) {
        at -= 1;
    }
    at.min(text.len())
}

fn end_of(text: &str, start: usize, len: usize) -> usize {
    let mut end = (start + len).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}

fn apply(text: &str, edit: &Edit) -> String {
    match *edit {
        Edit::Delete { at, len } => {
            let start = boundary(text, at);
            let end = end_of(text, start, len);
            format!("{}{}", &text[..start], &text[end..])
        }
        Edit::Duplicate { at, len } => {
            let start = boundary(text, at);
            let end = end_of(text, start, len);
            format!("{}{}", &text[..end], &text[start..])
        }
        Edit::Insert { at, token } => {
            let at = boundary(text, at);
            format!("{}{}{}", &text[..at], TOKENS[token], &text[at..])
        }
        Edit::ReplaceValue { nth, value } => {
            // The nth right-hand side of `key = value` lines (wrapping around).
            let lines: Vec<&str> = text.lines().collect();
            let assignments: Vec<usize> = (0..lines.len())
                .filter(|&i| !lines[i].trim_start().starts_with('#') && lines[i].contains(" = "))
                .collect();
            if assignments.is_empty() {
                return text.to_string();
            }
            let i = assignments[nth % assignments.len()];
            let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
            if let Some((key, _)) = lines[i].split_once(" = ") {
                out[i] = format!("{key} = {}", VALUES[value]);
            }
            out.join("\n")
        }
        Edit::SwapLines { a, b } => {
            let mut lines: Vec<&str> = text.lines().collect();
            let n = lines.len();
            lines.swap(((n as f64) * a) as usize % n, ((n as f64) * b) as usize % n);
            lines.join("\n")
        }
    }
}

/// Plans `manifest`; returns the exit code and stderr. Panics if it hangs.
fn plan(dir: &Path, manifest: &str) -> (Option<i32>, String) {
    let path = dir.join("m.toml");
    std::fs::write(&path, manifest).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["--error-format", "json", "--cache"])
        .arg(dir.join("cache"))
        .arg("plan")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Read the output while it runs (a large report would fill the pipe), with a deadline.
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = send.send(child.wait_with_output());
    });
    match receive.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => {
            let out = out.unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
        Err(_) => {
            // SAFETY: signalling the child we started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("plan hung on:\n{manifest}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn an_edited_demo_manifest_is_planned_or_rejected_with_a_place(
        edits in proptest::collection::vec(edit(), 1..4)
    ) {
        let mut text = DEMO.to_string();
        for e in &edits {
            text = apply(&text, e);
        }
        let dir = tempfile::tempdir().unwrap();
        let (code, err) = plan(dir.path(), &text);
        prop_assert!(
            code == Some(0) || code == Some(2),
            "exit {code:?} (a panic is 101, an abort a signal):\n{err}\n--- manifest:\n{text}"
        );
        if code == Some(2) {
            let json: Value = serde_json::from_str(err.trim()).map_err(|e| {
                TestCaseError::fail(format!("stderr is not one JSON report ({e}):\n{err}"))
            })?;
            let diagnostics = json["related"].as_array().cloned().unwrap_or_default();
            prop_assert!(!diagnostics.is_empty(), "no diagnostics: {json:#}");
            for d in &diagnostics {
                let labels = d["labels"].as_array().cloned().unwrap_or_default();
                prop_assert!(
                    !labels.is_empty(),
                    "a diagnostic without a place in the file: {d:#}\n--- manifest:\n{text}"
                );
            }
        }
    }
}
