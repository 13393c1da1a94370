//! Building blocks of the decoder-only models, written from basic candle ops so that every one
//! records a backward pass (candle's fused norms, softmax and rotary kernels do not).
//!
//! Norms, rotary embeddings and attention run in f32 whatever the compute dtype (f64 stays f64,
//! which the finite-difference gradient tests rely on): half precision there loses too much.

pub mod activations;
pub mod attention;
pub mod dense;
pub mod embedding;
pub mod frozen_matmul;
pub mod norms;
pub mod rotary;

pub use activations::Activation;
pub use attention::{Attention, AttentionShape};
pub use dense::Dense;
pub use embedding::Embedding;
pub use frozen_matmul::{frozen_matmul, FrozenWeight};
pub use norms::{LayerNorm, RmsNorm};
pub use rotary::Rotary;

use candle_core::DType;

/// The dtype that norms, rotary embeddings and attention are computed in for a model whose
/// compute dtype is `dtype`: f64 for f64 (exact gradient checks), f32 for everything else.
pub fn internal_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}
