//! The `adapter` artifact: a trained LoRA adapter in PEFT's layout (`adapter_config.json` +
//! `adapter_model.safetensors`, see [`pipeline_models::peft`]), the run's `metrics.jsonl` (one
//! object per optimizer step: `step`, `loss`, `lr`, `scale`, `grad_norm`; per evaluation:
//! `step`, `eval_loss`, `eval_tokens`), `loss_curve.svg` and `train.json` ([`TrainSummary`]).
//!
//! Everything in it is a function of the training inputs: wall-clock fields (`tokens_per_s`)
//! stay out of the stored metrics, so a resumed run writes the same bytes as an uninterrupted
//! one.

use std::path::Path;

use miette::{miette, IntoDiagnostic};
use pipeline_models::device::DeviceChoice;
use pipeline_models::peft::PeftAdapter;
use pipeline_models::train::{ComputeDtype, Metrics};
use serde::{Deserialize, Serialize};

use crate::json::{read_json, write_json, JsonError};
use crate::report::{svg, LossPoint};

/// The `adapter` artifact.
pub struct AdapterArtifact;

/// `train.json`.
///
/// What varies between attempts (throughput, the step a resumed attempt started from) is kept
/// out of the file and recorded as stage metadata instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Optimizer steps completed.
    pub steps: u64,
    /// Mean loss per target token of the last step.
    pub final_loss: f64,
    /// Mean training loss of the first step (of the whole run, from `metrics.jsonl`).
    pub first_loss: Option<f64>,
    /// Held-out loss at the end, when held-out tokens were given.
    pub final_eval_loss: Option<f64>,
    /// Target tokens per second over the steps run in the final attempt (metadata only).
    #[serde(skip)]
    pub tokens_per_s: f64,
    /// Target (loss) tokens processed in the final attempt (metadata only).
    #[serde(skip)]
    pub train_tokens: u64,
    /// Training examples / micro-batches available.
    pub examples: usize,
    /// Micro-batches per epoch.
    pub batches: usize,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// Rough peak memory in bytes
    /// ([`training_peak_estimate`](pipeline_models::train::training_peak_estimate)).
    pub peak_memory_estimate_bytes: u64,
    /// Step the final attempt started from, 0 unless resumed from a checkpoint (metadata only).
    #[serde(skip)]
    pub resumed_from_step: u64,
    /// Compute dtype.
    pub dtype: ComputeDtype,
    /// Device.
    pub device: DeviceChoice,
}

impl AdapterArtifact {
    /// Its type name.
    pub const TYPE: &'static str = "adapter";
    /// The training metrics, one JSON object a line.
    pub const METRICS_FILE: &'static str = "metrics.jsonl";
    /// The training summary.
    pub const TRAIN_FILE: &'static str = "train.json";
    /// Training (and held-out) loss per step, as a chart.
    pub const LOSS_CURVE_FILE: &'static str = "loss_curve.svg";
    /// Metrics fields that differ between runs of the same key and so stay out of the artifact.
    pub const WALL_CLOCK_FIELDS: &'static [&'static str] = &["tokens_per_s"];

    /// Writes the adapter, the run's metrics (without wall-clock fields), their loss chart and
    /// the summary into `dir`.
    pub fn write(
        dir: &Path,
        adapter: &PeftAdapter,
        metrics: &Metrics,
        summary: &TrainSummary,
    ) -> miette::Result<()> {
        adapter.save(dir).into_diagnostic()?;
        let stored = metrics.to_jsonl_without(Self::WALL_CLOCK_FIELDS);
        std::fs::write(dir.join(Self::METRICS_FILE), stored).map_err(|e| {
            miette!(
                "cannot write {}: {e}",
                dir.join(Self::METRICS_FILE).display()
            )
        })?;
        let curve = |field| -> Vec<LossPoint> {
            metrics
                .series(field)
                .into_iter()
                .map(|(step, loss)| LossPoint { step, loss })
                .collect()
        };
        let (training, held_out) = (curve("loss"), curve("eval_loss"));
        let mut series: Vec<(&str, &[LossPoint])> = vec![("training", &training)];
        if !held_out.is_empty() {
            series.push(("held-out", &held_out));
        }
        if let Some(chart) = svg::loss_chart("loss per target token", &series) {
            std::fs::write(dir.join(Self::LOSS_CURVE_FILE), chart).map_err(|e| {
                miette!(
                    "cannot write {}: {e}",
                    dir.join(Self::LOSS_CURVE_FILE).display()
                )
            })?;
        }
        write_json(&dir.join(Self::TRAIN_FILE), summary)?;
        Ok(())
    }

    /// The metrics of the artifact in `dir`, if it has a metrics file (an adapter trained
    /// elsewhere may not).
    pub fn read_metrics(dir: &Path) -> miette::Result<Option<Metrics>> {
        let path = dir.join(Self::METRICS_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| miette!("cannot read {}: {e}", path.display()))?;
        Metrics::parse(&text).map(Some).map_err(|e| {
            miette!(
                help = "the file is corrupt; re-run the `lora-train` stage that produced it",
                "{}: {e}",
                path.display()
            )
        })
    }

    /// The training loss curve of the artifact in `dir`, if it has metrics.
    pub fn read_loss_curve(dir: &Path) -> miette::Result<Option<Vec<LossPoint>>> {
        Ok(Self::read_metrics(dir)?.map(|m| curve(&m, "loss")))
    }

    /// `train.json` of the artifact in `dir`.
    pub fn read_summary(dir: &Path) -> Result<TrainSummary, JsonError> {
        read_json(&dir.join(Self::TRAIN_FILE))
    }
}

/// `(step, value)` of `field` in `metrics` as chart points.
fn curve(metrics: &Metrics, field: &str) -> Vec<LossPoint> {
    metrics
        .series(field)
        .into_iter()
        .map(|(step, loss)| LossPoint { step, loss })
        .collect()
}
