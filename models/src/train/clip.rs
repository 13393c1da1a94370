//! Global-norm gradient clipping (`torch.nn.utils.clip_grad_norm_`).

use candle_core::{DType, Result, Tensor};

/// `sqrt(Σ‖g‖²)` over all gradients, accumulated in f64.
pub fn global_grad_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        total += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// Scales all gradients by `max_norm / (norm + 1e-6)` when that is below 1; returns the norm
/// before clipping. A non-finite norm leaves the gradients untouched (the step should be skipped).
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_grad_norm(grads)?;
    let coef = max_norm / (norm + 1e-6);
    if norm.is_finite() && coef < 1.0 {
        for g in grads.iter_mut() {
            *g = g.affine(coef, 0.0)?;
        }
    }
    Ok(norm)
}
