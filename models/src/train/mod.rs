//! Training: AdamW with f32 master weights, dynamic loss scaling, gradient clipping, learning-rate
//! schedules, masked causal-LM cross-entropy, and a [`Trainer`] with gradient accumulation,
//! atomic checkpoints, bit-exact resume, JSON Lines metrics and held-out evaluation.
//!
//! The trainer is generic over [`TrainModel`]: anything that can turn a batch into a summed loss
//! and list its trainable variables (for QLoRA: the LoRA `A`/`B` matrices over a frozen,
//! quantized base).

pub mod batches;
pub mod checkpoint;
pub mod clip;
pub mod loss;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod rng;
pub mod scaler;
pub mod schedule;
pub mod trainer;

pub use batches::{make_batches, pad_batch, BatchError, Batches, Example, LmBatch, LoraLm};
pub use checkpoint::{Checkpoint, TrainerState};
pub use clip::{clip_grad_norm, global_grad_norm};
pub use loss::{
    head_logit_rows, log_softmax, masked_cross_entropy, masked_cross_entropy_sum,
    masked_head_cross_entropy_sum, masked_head_nll_per_sequence,
};
pub use memory::training_peak_estimate;
pub use metrics::{EvalRecord, Metrics, MetricsParseError, MetricsWriter, StepRecord};
pub use optim::{AdamW, AdamWConfig};
pub use rng::TrainRng;
pub use scaler::{GradScaler, GradScalerConfig, GradScalerState};
pub use schedule::{LrSchedule, ScheduleKind};
pub use trainer::{
    accumulate_gradients, AccumulatedGrads, ComputeDtype, LossSum, RunEnd, StepContext, StepReport,
    TrainConfig, TrainModel, Trainer,
};

use std::path::PathBuf;

/// Errors from training, checkpointing and resuming.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A file or directory could not be read or written.
    #[error("{action} `{path}`: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The training configuration or inputs are unusable.
    #[error("invalid training setup: {0}")]
    Config(String),
    /// A checkpoint is missing pieces or does not match the model being trained.
    #[error("checkpoint `{path}` cannot be used: {reason}")]
    Checkpoint {
        /// Checkpoint directory.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The loss or the gradient became non-finite in a step without loss scaling; the step was
    /// not applied.
    #[error(
        "training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; lower the \
         learning rate or the LoRA alpha, keep gradient clipping on, or train in f32/bf16 \
         (f16 needs loss_scaling = true)"
    )]
    Diverged {
        /// The step that diverged (1-based).
        step: u64,
        /// Its mean loss.
        loss: f64,
        /// Its gradient norm.
        grad_norm: f64,
    },
    /// A JSON file could not be parsed or written.
    #[error("JSON in `{path}`: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, TrainError>;

pub(crate) fn io_err(
    action: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io {
        action,
        path,
        source,
    }
}
