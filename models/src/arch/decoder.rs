//! What every decoder architecture provides ([`Decoder`]) and the one type code uses when the
//! architecture is picked at run time ([`DecoderModel`]).
//!
//! An architecture implements only what differs between architectures: its final hidden
//! states (embeddings, layers, final norm), its linear layers and a few sizes. Everything after
//! the hidden states (logits, the training loss, trainable variables, the train/eval and
//! dropout switches) is written once here, as provided methods.

use candle_core::{DType, Device, Result, Tensor, Var};

use super::spec::Architecture;
use crate::causal_lm::{CausalLm, KvCache};
use crate::linear::LinearLayer;

/// A decoder-only language model of some architecture.
pub trait Decoder: CausalLm + Send + Sync {
    /// Which architecture it is.
    fn architecture(&self) -> Architecture;

    /// The final normed hidden states, `[b, t, h]` (`[b, 1, h]` with `last_only`): what the LM
    /// head turns into logits. `key_mask` is u8 `[b, past + t]`; with `cache`, attention reads
    /// and extends the KV cache.
    fn final_hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        key_mask: &Tensor,
        cache: Option<&mut KvCache>,
        last_only: bool,
    ) -> Result<Tensor>;

    /// The output projection (hidden -> vocabulary).
    fn lm_head(&self) -> &dyn LinearLayer;

    /// Every linear layer with its HF module path, in model order.
    fn linears(&self) -> Vec<(String, &dyn LinearLayer)>;

    /// Hidden width.
    fn hidden_size(&self) -> usize;

    /// Decoder layers.
    fn num_layers(&self) -> usize;

    /// The compute dtype.
    fn dtype(&self) -> DType;

    /// Gradient checkpointing of every decoder layer in training forwards (see
    /// [`crate::checkpoint`]): far less memory for one more forward pass per layer.
    fn set_gradient_checkpointing(&self, on: bool);

    /// Whether training forwards checkpoint every decoder layer.
    fn gradient_checkpointing(&self) -> bool;

    /// Full-sequence forward for training: `input_ids` `[b, t]` (u32), `attention_mask` `[b, t]`
    /// (1 = real token; right padding) -> logits `[b, t, vocab]` in f32 (f64 for f64 models).
    /// Positions are `0..t`, as in HF training.
    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (b, t, mask) = check_ids_mask(input_ids, attention_mask)?;
        let positions = arange_positions(b, t, self.device())?;
        self.logits(input_ids, &positions, &mask, None, false)
    }

    /// Summed next-token cross-entropy of a training batch and the number of scored tokens:
    /// the same as [`masked_cross_entropy_sum`](crate::train::masked_cross_entropy_sum) of
    /// [`Decoder::forward`]'s logits, but through
    /// [`masked_head_cross_entropy_sum`](crate::train::masked_head_cross_entropy_sum), which
    /// on the CPU never materialises the `[b, t, vocab]` logits. `loss_mask` `[b, t]` selects
    /// the target tokens (position `i + 1` is predicted from position `i`). Without
    /// `needs_grad` (evaluation) the hidden states are detached, which spares the fused head
    /// its gradient work.
    fn loss_sum(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        loss_mask: &Tensor,
        needs_grad: bool,
    ) -> Result<(Tensor, usize)> {
        let (b, t, mask) = check_ids_mask(input_ids, attention_mask)?;
        let positions = arange_positions(b, t, self.device())?;
        let hidden = self.final_hidden(input_ids, &positions, &mask, None, false)?;
        let hidden = if needs_grad { hidden } else { hidden.detach() };
        crate::train::masked_head_cross_entropy_sum(&hidden, self.lm_head(), input_ids, loss_mask)
    }

    /// Per sequence of a batch, the summed negative log-likelihood (nats, f64) of the tokens
    /// `loss_mask` selects, given everything before them: the training loss's positions
    /// (see [`Decoder::loss_sum`]), split by row, without a backward graph.
    fn sequence_nll(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        loss_mask: &Tensor,
    ) -> Result<Vec<f64>> {
        let (b, t, mask) = check_ids_mask(input_ids, attention_mask)?;
        let positions = arange_positions(b, t, self.device())?;
        let hidden = self
            .final_hidden(input_ids, &positions, &mask, None, false)?
            .detach();
        crate::train::masked_head_nll_per_sequence(&hidden, self.lm_head(), input_ids, loss_mask)
    }

    /// Logits of the final hidden states (the last position only with `last_only`), in the
    /// internal dtype (f32, or f64 for f64 models).
    fn logits(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        key_mask: &Tensor,
        cache: Option<&mut KvCache>,
        last_only: bool,
    ) -> Result<Tensor> {
        let x = self.final_hidden(ids, positions, key_mask, cache, last_only)?;
        self.lm_head()
            .forward(&x)?
            .to_dtype(crate::layers::internal_dtype(self.dtype()))
    }

    /// All trainable variables with PEFT-style names
    /// (`model.layers.0.self_attn.q_proj.lora_A.weight`).
    fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (path, layer) in self.linears() {
            for (name, var) in layer.trainable_vars() {
                out.push((format!("{path}.{name}"), var));
            }
        }
        out
    }

    /// Switches dropout in the adapters on (training) or off (evaluation, generation).
    fn set_training(&self, training: bool) {
        for (_, layer) in self.linears() {
            layer.set_training(training);
        }
    }

    /// Inference only from now on: no layer records a backward graph (see
    /// [`LinearLayer::freeze`]).
    fn freeze(&self) {
        for (_, layer) in self.linears() {
            layer.freeze();
        }
    }

    /// Restarts dropout randomness of every layer from `stream` (see
    /// [`LinearLayer::set_dropout_stream`]); each layer mixes in its own position.
    fn set_dropout_stream(&self, stream: u64) {
        for (i, (_, layer)) in self.linears().into_iter().enumerate() {
            layer.set_dropout_stream(stream ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
    }
}

/// A model whose architecture is chosen at run time (from a model artifact, a config file).
pub struct DecoderModel(Box<dyn Decoder>);

impl DecoderModel {
    /// Wraps a model of any architecture.
    pub fn new(model: impl Decoder + 'static) -> Self {
        Self(Box::new(model))
    }
}

impl<D: Decoder + 'static> From<D> for DecoderModel {
    fn from(model: D) -> Self {
        Self::new(model)
    }
}

impl std::ops::Deref for DecoderModel {
    type Target = dyn Decoder;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl CausalLm for DecoderModel {
    fn forward_cached(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        key_mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.0.forward_cached(input_ids, positions, key_mask, cache)
    }

    fn forward_cached_last(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        key_mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.0
            .forward_cached_last(input_ids, positions, key_mask, cache)
    }

    fn new_cache(&self) -> KvCache {
        self.0.new_cache()
    }

    fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }

    fn device(&self) -> &Device {
        self.0.device()
    }
}

/// `[b, t]` positions `0..t` for full-sequence training forwards.
pub(crate) fn arange_positions(b: usize, t: usize, device: &Device) -> Result<Tensor> {
    Tensor::arange(0u32, t as u32, device)?
        .unsqueeze(0)?
        .broadcast_as((b, t))?
        .contiguous()
}

/// Checks ids `[b, t]` u32 against an attention mask `[b, t]` and returns the mask as u8.
pub(crate) fn check_ids_mask(ids: &Tensor, mask: &Tensor) -> Result<(usize, usize, Tensor)> {
    let (b, t) = ids.dims2()?;
    if mask.dims() != [b, t] {
        candle_core::bail!(
            "attention mask is {:?} but input ids are [{b}, {t}]",
            mask.dims()
        );
    }
    Ok((b, t, mask.to_dtype(DType::U8)?))
}
