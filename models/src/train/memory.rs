//! A rough estimate of LoRA training's peak memory, so a user can size a run before it starts.

use super::batches::LmBatch;
use super::head_logit_rows;
use crate::arch::DecoderModel;
use crate::CausalLm;

/// Hidden-size vectors per token per decoder layer that a training forward keeps until the
/// backward, fitted to measured peaks on the CPU (`bench/phi15_memory.sh`, which prints the
/// estimate beside each measurement).
const ACTIVATION_VECTORS_PER_LAYER: usize = 38;

/// Rough peak memory in bytes of training `model` (whose weights take `base_bytes` as stored)
/// with `trainable` parameters on `batches`: the base weights + trainable parameters with their
/// gradient and two AdamW moments (f32) + the logits the loss holds at once for the largest
/// micro-batch (one 256-row block with the CPU's fused head, else every position; three
/// copies: logits, log-softmax, gradient) + activations: about 38 hidden-size vectors per token
/// per layer kept until the backward, in the compute dtype (with gradient checkpointing, two
/// per layer plus one layer's 38). For phi-1.5 at 2 x 256 and 2 x 512 the estimate is 4-7%
/// above the measured peaks without checkpointing and about a quarter below with it, where the
/// process's fixed costs weigh more.
pub fn training_peak_estimate(
    model: &DecoderModel,
    base_bytes: u64,
    trainable: usize,
    batches: &[LmBatch],
) -> u64 {
    let (hidden, layers) = (model.hidden_size(), model.num_layers());
    let positions = batches.iter().map(LmBatch::positions).max().unwrap_or(0);
    let logit_rows = head_logit_rows(model.lm_head(), model.device(), model.dtype(), positions);
    let act = model.dtype().size_in_bytes() as u64;
    let vectors = if model.gradient_checkpointing() {
        2 * layers + ACTIVATION_VECTORS_PER_LAYER
    } else {
        ACTIVATION_VECTORS_PER_LAYER * layers
    };
    let activations = positions as u64 * (hidden * vectors) as u64 * act;
    let logits = logit_rows as u64 * model.vocab_size() as u64 * 4 * 3;
    base_bytes + 16 * trainable as u64 + logits + activations
}
