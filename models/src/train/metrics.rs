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
