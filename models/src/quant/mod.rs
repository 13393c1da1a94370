//! Weight quantization for frozen base weights: NF4 with double quantization (as QLoRA /
//! bitsandbytes store them), candle's ggml block formats, and [`QuantLinear`], a
//! [`LinearLayer`](crate::LinearLayer) over either that passes input gradients through without
//! ever recording the frozen weight.

pub mod block_linear;
pub mod ggml;
pub mod kernels;
pub mod nf4;
#[cfg(feature = "cuda")]
mod nf4_cuda;
pub mod quant_linear;

pub use block_linear::{pack, BlockLinear};
pub use ggml::{GgmlFormat, GgmlQuantized};
pub use nf4::{Nf4Absmax, Nf4Tensor};
pub use quant_linear::{QuantLinear, QuantWeight};

use candle_core::{DType, Tensor};

/// Errors from quantizing or dequantizing a weight.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// The tensor cannot be stored in the requested format (size, emptiness, values).
    #[error("cannot quantize a tensor of shape {shape:?} to {format}: {reason}")]
    Unsupported {
        /// Shape of the rejected tensor.
        shape: Vec<usize>,
        /// Target format name.
        format: String,
        /// What is wrong and what to do instead.
        reason: String,
    },
    /// Stored quantized data is internally inconsistent (e.g. a corrupted or hand-built value).
    #[error("corrupt quantized tensor: {0}")]
    Corrupt(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// How far a dequantized tensor is from the original.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReconstructionError {
    /// Largest absolute elementwise difference.
    pub max_abs: f64,
    /// Root mean square of the elementwise differences.
    pub rmse: f64,
    /// `‖x − x̂‖₂ / ‖x‖₂` (0 when both are zero, infinite when only `x` is zero).
    pub relative: f64,
}

impl std::fmt::Display for ReconstructionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "max |Δ| = {:.3e}, RMSE = {:.3e}, relative L2 = {:.3e}",
            self.max_abs, self.rmse, self.relative
        )
    }
}

/// Measures the error of `reconstructed` against `original` (same shape, any float dtype).
///
/// Computed in f64 on the host so that the report itself adds no rounding worth mentioning.
pub fn reconstruction_error(
    original: &Tensor,
    reconstructed: &Tensor,
) -> candle_core::Result<ReconstructionError> {
    if original.dims() != reconstructed.dims() {
        return Err(candle_core::Error::Msg(format!(
            "reconstruction_error: shapes differ: {:?} vs {:?}",
            original.dims(),
            reconstructed.dims()
        )));
    }
    let a = original
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let b = reconstructed
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let (mut max_abs, mut sq, mut norm) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        let d = (x - y).abs();
        max_abs = max_abs.max(d);
        sq += d * d;
        norm += x * x;
    }
    let n = a.len().max(1) as f64;
    let relative = if norm == 0.0 {
        if sq == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (sq / norm).sqrt()
    };
    Ok(ReconstructionError {
        max_abs,
        rmse: (sq / n).sqrt(),
        relative,
    })
}
