//! Dynamic loss scaling with `torch.cuda.amp.GradScaler` semantics: the loss is multiplied by
//! `scale` before backward; gradients are unscaled before clipping; a step whose gradients contain
//! inf/NaN is skipped and the scale multiplied by `backoff_factor`; after `growth_interval`
//! consecutive clean steps the scale is multiplied by `growth_factor`.

use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// Scaler settings (torch defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradScalerConfig {
    /// Starting scale (2^16).
    pub init_scale: f64,
    /// Multiplier after `growth_interval` clean steps (2).
    pub growth_factor: f64,
    /// Multiplier after an overflow (0.5).
    pub backoff_factor: f64,
    /// Clean steps before growing (2000).
    pub growth_interval: u32,
}

impl Default for GradScalerConfig {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// The part of the scaler that changes during training (checkpointed).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradScalerState {
    /// Current scale.
    pub scale: f64,
    /// Consecutive clean steps since the last growth or backoff.
    pub growth_tracker: u32,
}

/// A dynamic loss scaler; a disabled one has scale 1 and never skips.
#[derive(Debug, Clone, PartialEq)]
pub struct GradScaler {
    config: GradScalerConfig,
    state: GradScalerState,
    enabled: bool,
}

impl GradScaler {
    /// An enabled scaler.
    pub fn new(config: GradScalerConfig) -> Self {
        Self {
            config,
            state: GradScalerState {
                scale: config.init_scale,
                growth_tracker: 0,
            },
            enabled: true,
        }
    }

    /// A scaler that does nothing (f32 / bf16 training).
    pub fn disabled() -> Self {
        let config = GradScalerConfig::default();
        Self {
            config,
            state: GradScalerState {
                scale: 1.0,
                growth_tracker: 0,
            },
            enabled: false,
        }
    }

    /// Whether scaling is active.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The factor the loss is multiplied by.
    pub fn scale(&self) -> f64 {
        if self.enabled {
            self.state.scale
        } else {
            1.0
        }
    }

    /// Current state (for checkpoints).
    pub fn state(&self) -> GradScalerState {
        self.state
    }

    /// Restores a checkpointed state.
    pub fn set_state(&mut self, state: GradScalerState) {
        self.state = state;
    }

    /// Multiplies the loss by the scale.
    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor> {
        loss.affine(self.scale(), 0.0)
    }

    /// Divides the gradients by the scale (and by `extra_divisor`, e.g. a token count) in place
    /// and reports whether any is inf or NaN.
    pub fn unscale(&self, grads: &mut [Tensor], extra_divisor: f64) -> Result<bool> {
        let inv = 1.0 / (self.scale() * extra_divisor);
        let mut found_inf = false;
        for g in grads.iter_mut() {
            *g = g.affine(inv, 0.0)?;
            found_inf |= !all_finite(g)?;
        }
        Ok(found_inf)
    }

    /// Updates the scale after a step: back off on overflow, grow after enough clean steps.
    pub fn update(&mut self, found_inf: bool) {
        if !self.enabled {
            return;
        }
        if found_inf {
            self.state.scale *= self.config.backoff_factor;
            self.state.growth_tracker = 0;
        } else {
            self.state.growth_tracker += 1;
            if self.state.growth_tracker >= self.config.growth_interval {
                self.state.scale *= self.config.growth_factor;
                self.state.growth_tracker = 0;
            }
        }
    }
}

/// `x - x` is 0 for finite values and NaN for inf/NaN, so its sum is NaN exactly when some
/// element is not finite (and, unlike a sum of squares, cannot overflow).
pub fn all_finite(t: &Tensor) -> Result<bool> {
    let t = t.to_dtype(DType::F32)?;
    let s = t.sub(&t)?.sum_all()?.to_scalar::<f32>()?;
    Ok(!s.is_nan())
}
