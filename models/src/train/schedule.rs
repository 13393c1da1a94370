//! Learning-rate schedules with linear warmup, matching Hugging Face `transformers`'
//! `get_{constant,linear,cosine}_schedule_with_warmup` (step = optimizer steps already taken).

use serde::{Deserialize, Serialize};

/// Shape of the schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Stays at the base rate.
    Constant,
    /// Decays linearly to 0 at `total_steps`.
    Linear,
    /// Half-cosine from the base rate to 0 at `total_steps`.
    Cosine,
}

/// A learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Post-warmup shape.
    pub kind: ScheduleKind,
    /// Peak learning rate.
    pub base_lr: f64,
    /// Steps of linear warmup from 0.
    pub warmup_steps: u64,
    /// Total optimizer steps of the run (the decay reaches 0 there).
    pub total_steps: u64,
}

impl LrSchedule {
    /// The learning rate for the optimizer step taken after `step` steps.
    pub fn lr_at(&self, step: u64) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < self.warmup_steps {
            return self.base_lr * s / w.max(1.0);
        }
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        };
        self.base_lr * factor
    }
}
