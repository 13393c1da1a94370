//! The history of a manifest's runs, kept in the cache: each `pipeline run` leaves one record
//! (when, the manifest's git commit, the overrides, each stage's key, parameters and headline
//! metrics), and [`RunsTable`] lines the runs up side by side with what changed between them,
//! as DVC's `exp show` does for experiments.
//!
//! Records live in `<cache>/runs/<experiment>/<started>-<pid>.json`; a record is written whole
//! (temporary file, then rename), so an interrupted write leaves no partial record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One stage as a run left it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStage {
    /// Instance name.
    pub stage: String,
    /// Kind name.
    pub kind: String,
    /// Its key, when computed.
    pub key: Option<String>,
    /// `cached`, `ran`, `failed`, `skipped` or `not_selected`.
    pub status: String,
    /// Its canonical parameters.
    pub params: serde_json::Value,
    /// Its kind's headline metrics, from the stage's metadata.
    pub metrics: BTreeMap<String, f64>,
}

/// One run of a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The experiment's name (`[experiment] name`).
    pub experiment: String,
    /// The manifest file.
    pub manifest: PathBuf,
    /// When the run started (seconds since the Unix epoch).
    pub started_unix: f64,
    /// When it ended.
    pub finished_unix: f64,
    /// The git commit checked out where the manifest lives, if it is in a repository.
    pub commit: Option<String>,
    /// Whether the manifest differed from that commit.
    pub dirty: Option<bool>,
    /// `--set` overrides.
    pub overrides: Vec<String>,
    /// `--only` selection (empty: everything).
    pub only: Vec<String>,
    /// `ok`, `failed` or `interrupted`.
    pub status: String,
    /// Every stage, in dependency order.
    pub stages: Vec<RunStage>,
}

/// The directory of an experiment's run records.
pub fn runs_dir(cache: &Path, experiment: &str) -> PathBuf {
    cache.join("runs").join(experiment)
}

/// Writes `record` into the cache; returns its path.
pub fn save(cache: &Path, record: &RunRecord) -> std::io::Result<PathBuf> {
    let dir = runs_dir(cache, &record.experiment);
    std::fs::create_dir_all(&dir)?;
    let name = format!("{:017.6}-{}.json", record.started_unix, std::process::id());
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(record).map_err(std::io::Error::other)?;
    crate::atomic::write_atomic(&path, format!("{text}\n").as_bytes(), true)?;
    Ok(path)
}

/// Every readable record of `experiment`, oldest first, and the files that could not be read.
pub fn load(cache: &Path, experiment: &str) -> (Vec<RunRecord>, Vec<PathBuf>) {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(runs_dir(cache, experiment))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default();
    paths.sort();
    let mut records = Vec::new();
    let mut unreadable = Vec::new();
    for p in paths {
        match std::fs::read_to_string(&p)
            .ok()
            .and_then(|t| serde_json::from_str::<RunRecord>(&t).ok())
        {
            Some(r) => records.push(r),
            None => unreadable.push(p),
        }
    }
    records.sort_by(|a, b| a.started_unix.total_cmp(&b.started_unix));
    (records, unreadable)
}

/// Runs side by side: one column per run, rows for when, commit, status, what changed since the
/// previous run, and every headline metric any run has (`stage.metric`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunsTable {
    /// Column headers: `#1`, `#2`, ...
    pub columns: Vec<String>,
    /// `(row label, one cell per run)`; an empty cell means the run has no value there.
    pub rows: Vec<(String, Vec<String>)>,
}

impl RunsTable {
    /// Lines up `runs` (oldest first).
    pub fn new(runs: &[RunRecord]) -> RunsTable {
        let columns = (1..=runs.len()).map(|i| format!("#{i}")).collect();
        let mut rows: Vec<(String, Vec<String>)> = Vec::new();
        rows.push((
            "when (UTC)".into(),
            runs.iter().map(|r| utc_text(r.started_unix)).collect(),
        ));
        rows.push((
            "commit".into(),
            runs.iter()
                .map(|r| match (&r.commit, r.dirty) {
                    (Some(c), Some(true)) => format!("{}+", &c[..c.len().min(10)]),
                    (Some(c), _) => c[..c.len().min(10)].to_string(),
                    (None, _) => "-".into(),
                })
                .collect(),
        ));
        rows.push((
            "status".into(),
            runs.iter().map(|r| r.status.clone()).collect(),
        ));
        rows.push((
            "computed".into(),
            runs.iter()
                .map(|r| {
                    let ran = r.stages.iter().filter(|s| s.status == "ran").count();
                    let cached = r.stages.iter().filter(|s| s.status == "cached").count();
                    format!("{ran} ran, {cached} cached")
                })
                .collect(),
        ));
        rows.push((
            "--set".into(),
            runs.iter().map(|r| r.overrides.join(" ")).collect(),
        ));
        rows.push((
            "changed".into(),
            runs.iter()
                .enumerate()
                .map(|(i, r)| match i {
                    0 => String::new(),
                    _ => changes(&runs[i - 1], r).join("; "),
                })
                .collect(),
        ));
        let mut metric_names: Vec<String> = Vec::new();
        for r in runs {
            for s in &r.stages {
                for m in s.metrics.keys() {
                    let name = format!("{}.{m}", s.stage);
                    if !metric_names.contains(&name) {
                        metric_names.push(name);
                    }
                }
            }
        }
        for name in metric_names {
            let cells = runs
                .iter()
                .map(|r| {
                    r.stages
                        .iter()
                        .find_map(|s| {
                            let m = name.strip_prefix(&format!("{}.", s.stage))?;
                            s.metrics.get(m)
                        })
                        .map(|v| format_metric(*v))
                        .unwrap_or_default()
                })
                .collect();
            rows.push((name, cells));
        }
        RunsTable { columns, rows }
    }

    /// A Markdown table.
    pub fn markdown(&self) -> String {
        let escape = |s: &str| s.replace('|', "\\|");
        let mut out = format!("| | {} |\n", self.columns.join(" | "));
        out.push_str(&format!("|---|{}\n", "---|".repeat(self.columns.len())));
        for (label, cells) in &self.rows {
            let cells: Vec<String> = cells.iter().map(|c| escape(c)).collect();
            out.push_str(&format!("| {} | {} |\n", escape(label), cells.join(" | ")));
        }
        out
    }

    /// Aligned plain text.
    pub fn text(&self) -> String {
        let label_width = self.rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|i| {
                self.rows
                    .iter()
                    .map(|(_, c)| c[i].chars().count())
                    .chain([self.columns[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |label: &str, cells: &[String]| {
            let mut s = format!("{label:<label_width$}");
            for (c, w) in cells.iter().zip(&widths) {
                s.push_str(&format!("  {c:<w$}"));
            }
            s.trim_end().to_string() + "\n"
        };
        let mut out = line("", &self.columns);
        for (label, cells) in &self.rows {
            out.push_str(&line(label, cells));
        }
        out
    }
}

/// What differs from `before` in `after`: parameters, stages added or removed, selection.
fn changes(before: &RunRecord, after: &RunRecord) -> Vec<String> {
    let mut out = Vec::new();
    if before.commit != after.commit {
        out.push("commit".to_string());
    }
    for s in &after.stages {
        match before.stages.iter().find(|b| b.stage == s.stage) {
            None => out.push(format!("+{}", s.stage)),
            Some(b) => {
                let mut old = Vec::new();
                let mut new = Vec::new();
                flatten("", &b.params, &mut old);
                flatten("", &s.params, &mut new);
                for (path, value) in &new {
                    let was = old.iter().find(|(p, _)| p == path).map(|(_, v)| v.as_str());
                    if was != Some(value.as_str()) {
                        out.push(format!(
                            "{}.{path}: {} -> {value}",
                            s.stage,
                            was.unwrap_or("(unset)")
                        ));
                    }
                }
                if b.kind != s.kind {
                    out.push(format!("{}: kind {} -> {}", s.stage, b.kind, s.kind));
                }
            }
        }
    }
    for b in &before.stages {
        if !after.stages.iter().any(|s| s.stage == b.stage) {
            out.push(format!("-{}", b.stage));
        }
    }
    out
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, x) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&path, x, out);
            }
        }
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

fn format_metric(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

/// `YYYY-MM-DD HH:MM` in UTC.
fn utc_text(unix: f64) -> String {
    let secs = unix.max(0.0) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// Whether metadata key `key` is one of `patterns` (a trailing `*` matches a prefix).
pub fn is_headline(key: &str, patterns: &[&str]) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => key.starts_with(prefix),
        None => key == *p,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(started: f64, steps: u64, loss: f64) -> RunRecord {
        RunRecord {
            experiment: "e".into(),
            manifest: "m.toml".into(),
            started_unix: started,
            finished_unix: started + 1.0,
            commit: Some("0123456789abcdef".into()),
            dirty: Some(started > 1.0e9 + 10.0),
            overrides: vec![],
            only: vec![],
            status: "ok".into(),
            stages: vec![RunStage {
                stage: "train".into(),
                kind: "lora-train".into(),
                key: Some("k".into()),
                status: "ran".into(),
                params: serde_json::json!({"steps": steps, "opt": {"lr": 0.1}}),
                metrics: [("final_loss".to_string(), loss)].into_iter().collect(),
            }],
        }
    }

    #[test]
    fn runs_line_up_with_what_changed_and_their_metrics() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let a = record(1.0e9, 10, 2.5);
        let b = record(1.0e9 + 60.0, 20, 2.25);
        save(dir.path(), &b).unwrap_or_else(|e| panic!("{e}"));
        save(dir.path(), &a).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(runs_dir(dir.path(), "e").join("broken.json"), "{").unwrap_or(());
        let (runs, unreadable) = load(dir.path(), "e");
        assert_eq!(runs, [a, b]);
        assert_eq!(unreadable.len(), 1);
        let table = RunsTable::new(&runs);
        let row = |label: &str| {
            table
                .rows
                .iter()
                .find(|(l, _)| l == label)
                .map(|(_, c)| c.clone())
                .unwrap_or_default()
        };
        assert_eq!(row("when (UTC)"), ["2001-09-09 01:46", "2001-09-09 01:47"]);
        assert_eq!(row("commit"), ["0123456789", "0123456789+"]);
        assert_eq!(row("changed"), ["", "train.steps: 10 -> 20"]);
        assert_eq!(row("train.final_loss"), ["2.5000", "2.2500"]);
        assert!(table
            .markdown()
            .starts_with("| | #1 | #2 |\n|---|---|---|\n"));
        assert!(table.text().contains("train.final_loss  2.5000"));
    }

    #[test]
    fn headline_patterns() {
        assert!(is_headline("pass@1", &["pass@*"]));
        assert!(is_headline("final_loss", &["final_loss"]));
        assert!(!is_headline("final_loss_x", &["final_loss"]));
    }
}
