//! Model code for `pipeline`: decoder-only language models written on plain candle tensors,
//! the linear layers they are built from (dense, quantized, LoRA-wrapped), and training; and
//! the MiniLM sentence encoder ([`encoders`]) behind the learned data filter.
//!
//! Nothing here knows about manifests, caching or scheduling: stage kinds in `pipeline-stages`
//! call into this crate. Every op used on a training path records a backward (candle's fused
//! `layer_norm`, `rms_norm`, `softmax_last_dim`, `rope*`, `sdpa` and `QMatMul` do not), which the
//! gradient tests check against finite differences.
//!
//! Typical use (see `tests/` for working code):
//!
//! ```text
//! let weights = Weights::from_safetensors(&safetensors_in_dir(dir)?, &device)?;   // or
//! let (weights, meta) = load_gguf_llama(path, &device)?;                          // GGUF
//! let mut factory = LoraFactory::new(DenseFactory, lora_config, seed);  // or any closure
//! let model = Phi::new(&config, &weights, DType::BF16, &mut factory)?;
//! let logits = model.forward(&ids, &attention_mask)?;          // training, [b, t, vocab]
//! let vars = model.trainable_vars();                          // ("…q_proj.lora_A.weight", Var)
//! model.set_training(false);                                   // then CausalLm for generation
//! ```

#![warn(missing_docs)]

pub mod arch;
pub mod artifact;
pub mod causal_lm;
pub mod checkpoint;
pub mod device;
pub mod encoders;
pub mod fused;
pub mod generate;
pub mod io;
pub mod layers;
pub mod likelihood;
pub mod linear;
pub mod lora;
pub mod peft;
pub mod quant;
mod team;
pub mod train;
pub mod weights;

pub use arch::{Decoder, DecoderModel};
pub use causal_lm::{CausalLm, KvCache};
pub use linear::LinearLayer;
pub use lora::{LoraConfig, LoraLinear};
