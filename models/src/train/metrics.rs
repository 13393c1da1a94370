//! Training metrics as JSON Lines, one object per optimizer step or evaluation.

use super::{io_err, Result, TrainError};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Optimizer steps completed, this one included.
    pub step: u64,
    /// Mean training loss over the step's target tokens.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Loss scale used (1 without scaling).
    pub scale: f64,
    /// Global gradient norm before clipping (non-finite on a skipped step, written as null).
    pub grad_norm: Option<f64>,
    /// Target tokens per second of wall time for this step.
    pub tokens_per_s: f64,
}

/// One held-out evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Optimizer steps completed when evaluated.
    pub step: u64,
    /// Mean loss over the held-out target tokens.
    pub eval_loss: f64,
    /// Held-out target tokens.
    pub eval_tokens: usize,
}

/// Appends records to a `.jsonl` file.
#[derive(Debug, Clone)]
pub struct MetricsWriter {
    path: PathBuf,
}

impl MetricsWriter {
    /// A writer appending to `path` (created on first write).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record as a line.
    pub fn append<T: Serialize>(&self, record: &T) -> Result<()> {
        let mut line = serde_json::to_string(record).map_err(|source| TrainError::Json {
            path: self.path.clone(),
            source,
        })?;
        line.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io_err("open metrics file", &self.path))?;
        f.write_all(line.as_bytes())
            .map_err(io_err("append to", &self.path))
    }

    /// Drops records after `step` (left by a run that died after its last checkpoint), so a
    /// resumed run does not log those steps twice. Rewrites the file atomically.
    pub fn truncate_after(&self, step: u64) -> Result<()> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("read", &self.path)(e)),
        };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s <= step)
            })
            .flat_map(|l| [l, "\n"])
            .collect();
        super::checkpoint::atomic_write(&self.path, kept.as_bytes())
    }
}

/// A malformed line of a metrics file.
#[derive(Debug, thiserror::Error)]
#[error("line {line} of the metrics is not a JSON object: {source}")]
pub struct MetricsParseError {
    /// 1-based line number.
    pub line: usize,
    /// The parse error.
    #[source]
    pub source: serde_json::Error,
}

/// Metrics as written by [`MetricsWriter`]: one JSON object per line (blank lines skipped).
/// THE reader of such files: training, its artifact and the report all read through it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    records: Vec<serde_json::Map<String, serde_json::Value>>,
}

impl Metrics {
    /// Parses the text of a metrics file; a line that is not a JSON object is an error naming
    /// the line.
    pub fn parse(text: &str) -> std::result::Result<Self, MetricsParseError> {
        let mut records = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value =
                serde_json::from_str(line).map_err(|source| MetricsParseError {
                    line: i + 1,
                    source,
                })?;
            match value {
                serde_json::Value::Object(fields) => records.push(fields),
                _ => {
                    return Err(MetricsParseError {
                        line: i + 1,
                        source: serde::de::Error::custom("expected an object"),
                    })
                }
            }
        }
        Ok(Self { records })
    }

    /// `(step, value)` of every record with a `step` and a finite numeric `field` (`loss` for
    /// training steps, `eval_loss` for evaluations), in file order.
    pub fn series(&self, field: &str) -> Vec<(u64, f64)> {
        self.records
            .iter()
            .filter_map(|r| Some((r.get("step")?.as_u64()?, r.get(field)?.as_f64()?)))
            .filter(|(_, v)| v.is_finite())
            .collect()
    }

    /// The text again without the fields named in `drop` (e.g. wall-clock throughput, which
    /// differs between an interrupted-and-resumed run and an uninterrupted one).
    pub fn to_jsonl_without(&self, drop: &[&str]) -> String {
        let mut out = String::new();
        for record in &self.records {
            let mut record = record.clone();
            for field in drop {
                record.remove(*field);
            }
            out.push_str(&serde_json::Value::Object(record).to_string());
            out.push('\n');
        }
        out
    }
}
