//! Model code for `pipeline`: decoder-only language models written on plain candle tensors,
//! the linear layers they are built from (dense, quantized, LoRA-wrapped), and training.
//!
//! Nothing here knows about manifests, caching or scheduling: stage kinds in `pipeline-stages`
//! call into this crate. Every op used on a training path records a backward (candle's fused
//! `layer_norm`, `rms_norm`, `softmax_last_dim`, `rope*`, `sdpa` and `QMatMul` do not), which the
//! gradient tests check against finite differences.

pub mod causal_lm;
pub mod linear;

pub use causal_lm::{CausalLm, KvCache};
pub use linear::LinearLayer;
pub mod peft;
pub mod quant;
pub mod train;
