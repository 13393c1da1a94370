//! Forward-only scoring: how likely a model finds each sequence's target tokens.
//!
//! The likelihood of a reference solution given its prompt is a continuous score of a model on
//! a benchmark: a few hundred tasks separate variants whose pass@1 (a few percent for a small
//! model) cannot. [`score_sequences`] batches sequences of similar length together (right
//! padding, longest first), runs the model once per batch without recording a backward graph,
//! and returns each sequence's summed negative log-likelihood over its target tokens, exactly
//! as the training loss counts them (position `i`'s logits predict token `i + 1`).

use candle_core::{Result, Tensor};

use crate::arch::DecoderModel;
use crate::train::{pad_batch, Example};

/// One scored sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SequenceScore {
    /// Summed negative log-likelihood of the target tokens, in nats.
    pub nll: f64,
    /// Target tokens scored.
    pub tokens: usize,
}

/// How sequences are grouped into forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreBatching {
    /// Most positions (rows x padded length) in one forward; a longer sequence still goes alone.
    pub max_batch_tokens: usize,
    /// Padding token id (masked out; its value does not change any score).
    pub pad_id: u32,
}

/// Scores every example (`(ids, mask)`, mask 1 on target tokens; a mask on the first token is
/// ignored, since nothing predicts it) with `model` in evaluation mode, in input order.
/// `on_batch(n)` is called after each forward with the sequences it scored.
pub fn score_sequences(
    model: &DecoderModel,
    examples: &[Example],
    batching: ScoreBatching,
    mut on_batch: impl FnMut(usize),
) -> Result<Vec<SequenceScore>> {
    if let Some((i, _)) = examples
        .iter()
        .enumerate()
        .find(|(_, (ids, mask))| ids.len() != mask.len() || ids.len() < 2)
    {
        candle_core::bail!(
            "sequence {i} needs at least 2 tokens and one mask value per token (got {} ids, {} mask values)",
            examples[i].0.len(),
            examples[i].1.len()
        );
    }
    model.set_training(false);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    // Longest first: a batch's padding is bounded by its first row, and the largest forward
    // comes first, so a memory problem shows at once.
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].0.len()));
    let mut scores = vec![
        SequenceScore {
            nll: 0.0,
            tokens: 0
        };
        examples.len()
    ];
    let device = model.device().clone();
    let mut start = 0;
    while start < order.len() {
        let longest = examples[order[start]].0.len();
        let rows = (batching.max_batch_tokens / longest).max(1);
        let batch_idx = &order[start..(start + rows).min(order.len())];
        let batch: Vec<Example> = batch_idx.iter().map(|&i| examples[i].clone()).collect();
        let (ids, mask, t) = pad_batch(&batch, batching.pad_id);
        let b = batch.len();
        let attention: Vec<u8> = batch
            .iter()
            .flat_map(|(ids, _)| {
                let n = ids.len();
                (0..t).map(move |j| u8::from(j < n))
            })
            .collect();
        let ids = Tensor::from_vec(ids, (b, t), &device)?;
        let attention = Tensor::from_vec(attention, (b, t), &device)?;
        let loss_mask = Tensor::from_vec(mask, (b, t), &device)?;
        let nll = model.sequence_nll(&ids, &attention, &loss_mask)?;
        for (k, &i) in batch_idx.iter().enumerate() {
            scores[i] = SequenceScore {
                nll: nll[k],
                tokens: examples[i].1[1..].iter().filter(|&&m| m != 0).count(),
            };
        }
        on_batch(b);
        start += b;
    }
    Ok(scores)
}
