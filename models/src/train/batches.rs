//! Training batches of a causal language model: tokenized examples (ids and a loss mask) cut
//! into padded micro-batches on the training device, and the [`TrainModel`] view of a
//! LoRA-wrapped [`DecoderModel`] that the trainer steps over them.

use std::cell::Cell;

use candle_core::{Device, Tensor, Var};

use super::{LossSum, StepContext, TrainModel};
use crate::arch::DecoderModel;

/// One tokenized example: token ids and a per-token loss mask (1 = a target token).
pub type Example = (Vec<u32>, Vec<u8>);

/// Why examples could not become batches.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// An example holds a token id the model has no embedding for (tokenized with another
    /// tokenizer).
    #[error("token id {id} is outside the model's vocabulary of {vocab_size}")]
    TokenOutsideVocabulary {
        /// The offending id.
        id: u32,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
    /// A tensor could not be built.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Right-pads a batch to its longest example with `pad_id`; padding is never a loss target
/// (mask 0). Returns row-major `(ids, mask, seq_len)`.
pub fn pad_batch(batch: &[Example], pad_id: u32) -> (Vec<u32>, Vec<u8>, usize) {
    let len = batch.iter().map(|(i, _)| i.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(batch.len() * len);
    let mut mask = Vec::with_capacity(batch.len() * len);
    for (i, m) in batch {
        ids.extend_from_slice(i);
        ids.resize(ids.len() + len - i.len(), pad_id);
        mask.extend_from_slice(m);
        mask.resize(mask.len() + len - m.len(), 0);
    }
    (ids, mask, len)
}

/// One padded micro-batch on the training device.
pub struct LmBatch {
    ids: Tensor,
    attention: Tensor,
    loss_mask: Tensor,
    rows: usize,
    len: usize,
}

impl LmBatch {
    /// Token positions in the batch (rows x padded length).
    pub fn positions(&self) -> usize {
        self.rows * self.len
    }
}

/// Micro-batches of a set of examples and how many examples they hold.
pub struct Batches {
    /// The micro-batches, in example order (the trainer shuffles them).
    pub batches: Vec<LmBatch>,
    /// Examples kept (those with at least one target token).
    pub examples: usize,
}

/// Truncates every example to `max_length`, drops those without a target token, and cuts them
/// into padded micro-batches of `batch_size` on `device`.
pub fn make_batches(
    examples: impl IntoIterator<Item = Example>,
    batch_size: usize,
    max_length: usize,
    pad_id: u32,
    vocab_size: usize,
    device: &Device,
) -> Result<Batches, BatchError> {
    let mut kept: Vec<Example> = Vec::new();
    for (mut ids, mut mask) in examples {
        ids.truncate(max_length);
        mask.truncate(max_length);
        // Position 0 is never a target (nothing predicts it).
        if ids.len() < 2 || mask.iter().skip(1).all(|m| *m == 0) {
            continue;
        }
        if let Some(&id) = ids.iter().find(|&&i| i as usize >= vocab_size) {
            return Err(BatchError::TokenOutsideVocabulary { id, vocab_size });
        }
        kept.push((ids, mask));
    }
    let mut batches = Vec::new();
    for chunk in kept.chunks(batch_size.max(1)) {
        let (ids, mask, len) = pad_batch(chunk, pad_id);
        let rows = chunk.len();
        let attention: Vec<u8> = chunk
            .iter()
            .flat_map(|(i, _)| (0..len).map(move |p| u8::from(p < i.len())))
            .collect();
        batches.push(LmBatch {
            ids: Tensor::from_vec(ids, (rows, len), device)?,
            attention: Tensor::from_vec(attention, (rows, len), device)?,
            loss_mask: Tensor::from_vec(mask, (rows, len), device)?,
            rows,
            len,
        });
    }
    Ok(Batches {
        batches,
        examples: kept.len(),
    })
}

/// The LoRA-wrapped decoder as the trainer sees it.
pub struct LoraLm<'a> {
    /// The model; its LoRA variables are what gets trained.
    pub model: &'a DecoderModel,
    /// Target tokens seen in training (not evaluation) forwards, for throughput.
    pub train_tokens: Cell<u64>,
}

impl<'a> LoraLm<'a> {
    /// Wraps `model` for the trainer.
    pub fn new(model: &'a DecoderModel) -> Self {
        Self {
            model,
            train_tokens: Cell::new(0),
        }
    }
}

impl TrainModel for LoraLm<'_> {
    type Batch = LmBatch;

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.model.trainable_vars()
    }

    fn loss(&self, batch: &LmBatch, ctx: &mut StepContext<'_>) -> candle_core::Result<LossSum> {
        self.model.set_training(ctx.train);
        if ctx.train {
            // Dropout masks from the trainer's checkpointed RNG: resumed runs stay bit-identical.
            self.model.set_dropout_stream(ctx.rng.next_u64_raw());
        }
        let (sum, tokens) =
            self.model
                .loss_sum(&batch.ids, &batch.attention, &batch.loss_mask, ctx.train)?;
        if ctx.train {
            self.train_tokens
                .set(self.train_tokens.get() + tokens as u64);
        }
        Ok(LossSum { sum, tokens })
    }
}
