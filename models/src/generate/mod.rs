//! Text generation: sampling ([`sampler`]), stop sequences ([`stop`]) and the batched,
//! KV-cached generation loop ([`generate_batch`]) over any [`crate::CausalLm`].
//!
//! Tokenization is not done here: callers pass token ids and a decode callback, so this module
//! works with whatever tokenizer and prompt template the stage uses.

mod batch;
pub mod sampler;
pub mod stop;

pub use batch::{
    generate_batch, generate_batch_with_progress, Completion, FinishReason, GenerateConfig,
    GenerateError, GenerateOutput, GenerateRequest, GenerateStats,
};
pub use sampler::{argmax, derive_seed, seed_for_key, Sampler, SamplerError, SamplingParams};
pub use stop::{find_stop, humaneval_stop_sequences, HUMANEVAL_STOP_SEQUENCES};
