//! The interface generation needs from a decoder-only language model, and its KV cache.

use candle_core::{Device, Result, Tensor};

/// Keys and values of past positions, one entry per transformer layer.
///
/// Tensors are `[batch, kv_heads, past_len, head_dim]`. The cache is only used for generation;
/// training runs full sequences without it.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }

    /// Appends this step's keys and values for `layer` and returns the full keys and values.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| candle_core::Error::Msg(format!("KV cache has no layer {layer}")))?;
        // Generation never backpropagates: detach, so that cached keys and values do not keep
        // every step's graph (and its tensors) alive, which grows memory per generated token.
        let (k, v) = (k.detach(), v.detach());
        let (k, v) = (&k, &v);
        let (k, v) = match slot.take() {
            None => (k.clone(), v.clone()),
            Some((pk, pv)) => (Tensor::cat(&[&pk, k], 2)?, Tensor::cat(&[&pv, v], 2)?),
        };
        *slot = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Number of cached positions (0 when empty).
    pub fn seq_len(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .map(|(k, _)| k.dims().get(2).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Keeps only the batch rows in `rows` (in that order), e.g. to drop finished sequences.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        // index_select refuses non-contiguous tensors, and models usually cache transposed views.
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.contiguous()?.index_select(rows, 0)?;
            *v = v.contiguous()?.index_select(rows, 0)?;
        }
        Ok(())
    }
}

/// A decoder-only language model that can be run one chunk at a time with a KV cache.
pub trait CausalLm {
    /// Logits `[batch, seq, vocab]` in f32 for `input_ids` `[batch, seq]` (u32).
    ///
    /// `positions` `[batch, seq]` (u32) are the rotary positions of these tokens (they differ per
    /// row when prompts are left-padded). `key_mask` `[batch, past + seq]` (u8, 1 = attend) masks
    /// padding keys; attention is also causal. The cache is extended with this chunk.
    fn forward_cached(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        key_mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor>;

    /// As [`CausalLm::forward_cached`], but only the logits of the last position, `[batch,
    /// vocab]` in f32. Generation needs nothing else; models override it to skip the LM head
    /// on the other positions (over a 128-token prefill chunk that head is a fifth of the
    /// work, and a `[batch, 128, vocab]` block of memory).
    fn forward_cached_last(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        key_mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let logits = self.forward_cached(input_ids, positions, key_mask, cache)?;
        let t = logits.dim(1)?;
        if t == 0 {
            candle_core::bail!("forward_cached_last needs at least one position");
        }
        logits.narrow(1, t - 1, 1)?.squeeze(1)?.contiguous()
    }

    /// A fresh, empty cache sized for this model.
    fn new_cache(&self) -> KvCache;

    /// Vocabulary size (the logits' last dimension).
    fn vocab_size(&self) -> usize;

    /// The device the model's weights live on.
    fn device(&self) -> &Device;
}
