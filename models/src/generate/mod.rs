//! Text generation: sampling ([`sampler`]), stop sequences ([`stop`]) and the batched,
//! KV-cached generation loop ([`generate_batch`]) over any [`crate::CausalLm`].
//!
//! Tokenization is not done here: callers pass token ids and a decode callback, so this module
//! works with whatever tokenizer and prompt template the stage uses.
//!
//! Typical use by the generate stage (sketch):
//!
//! ```text
//! let requests: Vec<GenerateRequest> = problems.iter().map(|p| GenerateRequest {
//!     prompt_ids: tokenizer.encode(&p.prompt)?,
//!     stop: p.stop.clone(),                       // e.g. HUMANEVAL_STOP_SEQUENCES
//!     seed: seed_for_key(run_seed, &p.task_id),   // independent of batch order
//! }).collect();
//! let config = GenerateConfig {
//!     max_new_tokens: 384,
//!     sampling: SamplingParams { temperature: 0.8, top_k: None, top_p: Some(0.95) },
//!     num_samples: 10,
//!     eos_token_ids: vec![eos],
//!     ..Default::default()
//! };
//! let out = generate_batch(&model, &requests, &config, |ids| tokenizer.decode(ids))?;
//! // out.completions[i][j].text is sample j of problem i, cut before its stop sequence.
//! ```
//!
//! Requirements on the model: `forward_cached` must tolerate left-padding rows whose queries
//! see no unmasked key (fill masked scores with a large finite negative, not `-inf`, or the
//! padding rows turn into NaN that can leak into real rows), and the [`crate::KvCache`] rows are
//! re-selected with `index_select` after prefill (to copy a prompt's cache to its samples) and
//! whenever a row finishes.

mod batch;
pub mod sampler;
pub mod stop;

pub use batch::{
    generate_batch, generate_batch_streaming, generate_batch_with_progress, Completion,
    FinishReason, GenerateConfig, GenerateError, GenerateOutput, GenerateRequest, GenerateStats,
    NewToken,
};
pub use sampler::{argmax, derive_seed, seed_for_key, Sampler, SamplerError, SamplingParams};
pub use stop::{find_stop, humaneval_stop_sequences, HUMANEVAL_STOP_SEQUENCES};
