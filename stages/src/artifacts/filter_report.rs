//! The `filter-report` artifact: `report.json`, the [`FilterReport`] of every step of a filter
//! chain (counts per reason, removed records, score histogram), and `classifier.json` when a
//! learned scorer was trained.

use std::path::Path;

use crate::filter::report::FilterReport;
use crate::json::{read_json, write_json, JsonError};

/// The `filter-report` artifact.
pub struct FilterReportArtifact;

impl FilterReportArtifact {
    /// Its type name.
    pub const TYPE: &'static str = "filter-report";
    /// The per-step reports.
    pub const REPORT_FILE: &'static str = "report.json";
    /// The trained quality classifier, when a step trained one.
    pub const CLASSIFIER_FILE: &'static str = "classifier.json";

    /// Writes the reports of every step into `dir`.
    pub fn write(dir: &Path, reports: &[FilterReport]) -> Result<(), JsonError> {
        write_json(&dir.join(Self::REPORT_FILE), reports)
    }

    /// The reports in `dir`: a list of them, as [`Self::write`] writes, or (from elsewhere) one
    /// report or `{"reports": [..]}`.
    pub fn read(dir: &Path) -> Result<Vec<FilterReport>, JsonError> {
        let path = dir.join(Self::REPORT_FILE);
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Shape {
            List(Vec<FilterReport>),
            Wrapped { reports: Vec<FilterReport> },
            One(Box<FilterReport>),
        }
        let shape: serde_json::Value = read_json(&path)?;
        let parsed: Shape =
            serde_json::from_value(shape.clone()).map_err(|_| JsonError::Parse {
                path: path.clone(),
                line: 0,
                // The untagged enum's error says nothing useful; say what a single report lacks.
                source: serde_json::from_value::<FilterReport>(shape)
                    .err()
                    .unwrap_or_else(|| serde::de::Error::custom("not a filter report")),
            })?;
        Ok(match parsed {
            Shape::List(reports) | Shape::Wrapped { reports } => reports,
            Shape::One(report) => vec![*report],
        })
    }
}
