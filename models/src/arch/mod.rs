//! Decoder-only architectures (Phi, Llama) and the "linear factory" that lets the caller pick,
//! per projection, how it is implemented (dense, quantized, LoRA-wrapped).

pub mod llama;
pub mod phi;

pub use llama::{Llama, LlamaConfig};
pub use phi::{Phi, PhiConfig};

use std::sync::Arc;

use candle_core::{DType, Result, Tensor, Var};

use crate::causal_lm::KvCache;
use crate::checkpoint::{checkpoint, Block};
use crate::layers::{Activation, Dense};
use crate::linear::LinearLayer;
use crate::lora::{LoraConfig, LoraLinear};
use crate::weights::StoredTensor;

/// Everything a factory needs to build one linear projection.
#[derive(Debug, Clone)]
pub struct LinearParts {
    /// HF module path, e.g. `model.layers.3.self_attn.q_proj`.
    pub path: String,
    /// The weight `[out, in]` as stored (quantized weights stay quantized).
    pub weight: StoredTensor,
    /// The bias `[out]` in the model's compute dtype, if the module has one.
    pub bias: Option<Tensor>,
    /// The model's compute dtype: the layer receives inputs in it and must return it.
    pub dtype: DType,
}

/// Builds the linear layers of a model, one call per projection (in model order).
pub trait LinearFactory {
    /// Builds the layer described by `parts`.
    fn build(&mut self, parts: LinearParts) -> Result<Box<dyn LinearLayer>>;
}

impl<F> LinearFactory for F
where
    F: FnMut(LinearParts) -> Result<Box<dyn LinearLayer>>,
{
    fn build(&mut self, parts: LinearParts) -> Result<Box<dyn LinearLayer>> {
        self(parts)
    }
}

/// Builds every projection as a frozen [`Dense`] in the compute dtype (dequantizing).
#[derive(Debug, Clone, Copy, Default)]
pub struct DenseFactory;

impl LinearFactory for DenseFactory {
    fn build(&mut self, parts: LinearParts) -> Result<Box<dyn LinearLayer>> {
        Ok(Box::new(Dense::new(
            parts.weight.to_dense(parts.dtype)?,
            parts.bias,
        )?))
    }
}

/// Wraps the layers whose path matches `config.target_modules` in [`LoraLinear`]; the base
/// layers (all layers, for non-matching paths) come from `base`.
pub struct LoraFactory<B> {
    /// Builds the frozen base layers.
    pub base: B,
    /// Adapter settings.
    pub config: LoraConfig,
    /// Seed; each module's adapter seed also mixes in its path, so modules differ.
    pub seed: u64,
    /// Master dtype of the adapters (f32; f64 for gradient checks).
    pub master_dtype: DType,
}

impl<B: LinearFactory> LoraFactory<B> {
    /// Adapters in f32 over layers from `base`.
    pub fn new(base: B, config: LoraConfig, seed: u64) -> Self {
        Self {
            base,
            config,
            seed,
            master_dtype: DType::F32,
        }
    }
}

/// FNV-1a, to derive a stable per-module seed from its path.
fn path_hash(path: &str) -> u64 {
    path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

impl<B: LinearFactory> LinearFactory for LoraFactory<B> {
    fn build(&mut self, parts: LinearParts) -> Result<Box<dyn LinearLayer>> {
        let path = parts.path.clone();
        let device = match &parts.weight {
            StoredTensor::Dense(t) => t.device().clone(),
            StoredTensor::Quantized(q) => q.device(),
        };
        let base = self.base.build(parts)?;
        if !self.config.matches(&path) {
            return Ok(base);
        }
        let seed = self.seed ^ path_hash(&path);
        Ok(Box::new(LoraLinear::with_master_dtype(
            base,
            &self.config,
            seed,
            &device,
            self.master_dtype,
        )?))
    }
}

/// A decoder layer, as the layer loop shared by the architectures runs it.
pub(crate) trait DecoderLayer: Send + Sync + 'static {
    /// The layer on hidden states `x` `[b, t, hidden]`; with `cache`, attention reads and
    /// extends that layer's KV cache.
    fn forward(
        &self,
        x: &Tensor,
        positions: &Tensor,
        key_mask: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
        act: Activation,
    ) -> Result<Tensor>;

    /// Every linear layer inside, in a fixed order.
    fn linears(&self) -> Vec<&dyn LinearLayer>;
}

/// One layer with what its training forward needs, for [`checkpoint`].
struct LayerBlock<L> {
    layer: Arc<L>,
    positions: Tensor,
    key_mask: Tensor,
    act: Activation,
}

impl<L: DecoderLayer> Block for LayerBlock<L> {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.layer
            .forward(x, &self.positions, &self.key_mask, None, self.act)
    }

    fn linears(&self) -> Vec<&dyn LinearLayer> {
        self.layer.linears()
    }
}

/// Runs `layers` in order on `x`. Without a KV cache and with `checkpointing`, each layer is
/// checkpointed (see [`crate::checkpoint`]).
pub(crate) fn run_layers<L: DecoderLayer>(
    layers: &[Arc<L>],
    mut x: Tensor,
    positions: &Tensor,
    key_mask: &Tensor,
    mut cache: Option<&mut KvCache>,
    act: Activation,
    checkpointing: bool,
) -> Result<Tensor> {
    let checkpointing = checkpointing && cache.is_none();
    for (l, layer) in layers.iter().enumerate() {
        x = if checkpointing {
            let block = LayerBlock {
                layer: layer.clone(),
                positions: positions.clone(),
                key_mask: key_mask.clone(),
                act,
            };
            checkpoint(Arc::new(block), &x)?
        } else {
            let cache = cache.as_deref_mut().map(|c| (c, l));
            layer.forward(&x, positions, key_mask, cache, act)?
        };
    }
    Ok(x)
}

/// The methods every architecture derives from its `linears()` list: trainable variables under
/// PEFT names, and the train/eval, freeze and dropout-stream switches applied to every layer.
macro_rules! linear_module_methods {
    () => {
        /// All trainable variables with PEFT-style names
        /// (`model.layers.0.self_attn.q_proj.lora_A.weight`).
        pub fn trainable_vars(&self) -> Vec<(String, Var)> {
            let mut out = Vec::new();
            for (path, layer) in self.linears() {
                super::named_vars(&path, layer, &mut out);
            }
            out
        }

        /// Switches dropout in the adapters on (training) or off (evaluation, generation).
        pub fn set_training(&self, training: bool) {
            for (_, layer) in self.linears() {
                layer.set_training(training);
            }
        }

        /// Inference only from now on: no layer records a backward graph (see
        /// [`LinearLayer::freeze`]).
        pub fn freeze(&self) {
            for (_, layer) in self.linears() {
                layer.freeze();
            }
        }

        /// Restarts dropout randomness of every layer from `stream` (see
        /// [`LinearLayer::set_dropout_stream`]); each layer mixes in its own position.
        pub fn set_dropout_stream(&self, stream: u64) {
            for (i, (_, layer)) in self.linears().into_iter().enumerate() {
                layer.set_dropout_stream(stream ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            }
        }
    };
}
pub(crate) use linear_module_methods;

/// The training forwards and [`CausalLm`](crate::CausalLm) for an architecture with a
/// `final_hidden(ids, positions, key_mask, cache, last_only)` method (embeddings, decoder layers,
/// final norm) and `layers`, `lm_head`, `config.vocab_size`, `dtype` and `device` fields: all
/// that follows the final hidden states is the same for every architecture.
macro_rules! impl_causal_lm {
    ($model:ty) => {
        impl $model {
            /// Full-sequence forward for training: `input_ids` `[b, t]` (u32), `attention_mask`
            /// `[b, t]` (1 = real token; right padding) -> logits `[b, t, vocab]` in f32 (f64
            /// for f64 models). Positions are `0..t`, as in HF training.
            pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
                let (b, t, mask) = $crate::arch::check_ids_mask(input_ids, attention_mask)?;
                let positions = $crate::arch::arange_positions(b, t, &self.device)?;
                self.run(input_ids, &positions, &mask, None, false)
            }

            /// Summed next-token cross-entropy of a training batch and the number of scored
            /// tokens: the same as
            /// [`masked_cross_entropy_sum`]($crate::train::masked_cross_entropy_sum) of
            /// [`Self::forward`]'s logits, but through
            /// [`masked_head_cross_entropy_sum`]($crate::train::masked_head_cross_entropy_sum),
            /// which on the CPU never materialises the `[b, t, vocab]` logits. `loss_mask`
            /// `[b, t]` selects the target tokens (position `i + 1` is predicted from position
            /// `i`). Without `needs_grad` (evaluation) the hidden states are detached, which
            /// spares the fused head its gradient work.
            pub fn loss_sum(
                &self,
                input_ids: &Tensor,
                attention_mask: &Tensor,
                loss_mask: &Tensor,
                needs_grad: bool,
            ) -> Result<(Tensor, usize)> {
                let (b, t, mask) = $crate::arch::check_ids_mask(input_ids, attention_mask)?;
                let positions = $crate::arch::arange_positions(b, t, &self.device)?;
                let hidden = self.final_hidden(input_ids, &positions, &mask, None, false)?;
                let hidden = if needs_grad { hidden } else { hidden.detach() };
                $crate::train::masked_head_cross_entropy_sum(
                    &hidden,
                    &*self.lm_head,
                    input_ids,
                    loss_mask,
                )
            }

            /// Logits of the final hidden states (the last position only with `last_only`).
            fn run(
                &self,
                ids: &Tensor,
                positions: &Tensor,
                key_mask: &Tensor,
                cache: Option<&mut KvCache>,
                last_only: bool,
            ) -> Result<Tensor> {
                let x = self.final_hidden(ids, positions, key_mask, cache, last_only)?;
                self.lm_head
                    .forward(&x)?
                    .to_dtype($crate::layers::internal_dtype(self.dtype))
            }
        }

        impl CausalLm for $model {
            fn forward_cached(
                &self,
                input_ids: &Tensor,
                positions: &Tensor,
                key_mask: &Tensor,
                cache: &mut KvCache,
            ) -> Result<Tensor> {
                let mask = key_mask.to_dtype(DType::U8)?;
                self.run(input_ids, positions, &mask, Some(cache), false)?
                    .to_dtype(DType::F32)
            }

            fn forward_cached_last(
                &self,
                input_ids: &Tensor,
                positions: &Tensor,
                key_mask: &Tensor,
                cache: &mut KvCache,
            ) -> Result<Tensor> {
                let mask = key_mask.to_dtype(DType::U8)?;
                self.run(input_ids, positions, &mask, Some(cache), true)?
                    .squeeze(1)?
                    .to_dtype(DType::F32)
            }

            fn new_cache(&self) -> KvCache {
                KvCache::new(self.layers.len())
            }

            fn vocab_size(&self) -> usize {
                self.config.vocab_size
            }

            fn device(&self) -> &Device {
                &self.device
            }
        }
    };
}
pub(crate) use impl_causal_lm;

/// Prefixes a layer's trainable vars with its module path (`path.lora_A.weight`).
pub(crate) fn named_vars(path: &str, layer: &dyn LinearLayer, out: &mut Vec<(String, Var)>) {
    for (name, var) in layer.trainable_vars() {
        out.push((format!("{path}.{name}"), var));
    }
}

/// `[b, t]` positions `0..t` for full-sequence training forwards.
pub(crate) fn arange_positions(b: usize, t: usize, device: &candle_core::Device) -> Result<Tensor> {
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

/// Loads the weight (and, with `bias`, the bias) of the projection at `path` and hands them
/// to the factory.
pub(crate) fn build_linear(
    weights: &crate::weights::Weights,
    factory: &mut dyn LinearFactory,
    path: &str,
    weight_name: Option<&str>,
    (out_features, in_features): (usize, usize),
    bias: bool,
    dtype: DType,
) -> std::result::Result<Box<dyn LinearLayer>, crate::weights::LoadError> {
    let own_name = format!("{path}.weight");
    let weight = weights.stored_shaped(
        weight_name.unwrap_or(&own_name),
        &[out_features, in_features],
    )?;
    let bias = if bias {
        Some(weights.dense(&format!("{path}.bias"), &[out_features], dtype)?)
    } else {
        None
    };
    let layer = factory.build(LinearParts {
        path: path.to_string(),
        weight,
        bias,
        dtype,
    })?;
    if (layer.out_features(), layer.in_features()) != (out_features, in_features) {
        return Err(crate::weights::LoadError::Unsupported(format!(
            "the linear factory built `{path}` as {}x{}, expected {out_features}x{in_features}",
            layer.out_features(),
            layer.in_features()
        )));
    }
    Ok(layer)
}

/// Reads and parses a JSON config file.
pub(crate) fn read_json_config<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
) -> std::result::Result<T, crate::weights::LoadError> {
    use crate::weights::LoadError;
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| LoadError::Config {
        path: path.to_path_buf(),
        source,
    })
}

/// Either architecture behind one type, for code that picks the model at run time.
pub enum DecoderModel {
    /// A Phi model.
    Phi(Phi),
    /// A Llama model.
    Llama(Llama),
}

impl DecoderModel {
    /// Full-sequence forward for training; see [`Phi::forward`] / [`Llama::forward`].
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        match self {
            Self::Phi(m) => m.forward(input_ids, attention_mask),
            Self::Llama(m) => m.forward(input_ids, attention_mask),
        }
    }

    /// Summed next-token cross-entropy of a training batch and the number of scored tokens;
    /// see [`Phi::loss_sum`] / [`Llama::loss_sum`].
    pub fn loss_sum(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        loss_mask: &Tensor,
        needs_grad: bool,
    ) -> Result<(Tensor, usize)> {
        match self {
            Self::Phi(m) => m.loss_sum(input_ids, attention_mask, loss_mask, needs_grad),
            Self::Llama(m) => m.loss_sum(input_ids, attention_mask, loss_mask, needs_grad),
        }
    }

    /// All trainable variables with PEFT-style names.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        match self {
            Self::Phi(m) => m.trainable_vars(),
            Self::Llama(m) => m.trainable_vars(),
        }
    }

    /// Switches adapter dropout on (training) or off.
    pub fn set_training(&self, training: bool) {
        match self {
            Self::Phi(m) => m.set_training(training),
            Self::Llama(m) => m.set_training(training),
        }
    }

    /// Inference only from now on (see [`LinearLayer::freeze`]).
    pub fn freeze(&self) {
        match self {
            Self::Phi(m) => m.freeze(),
            Self::Llama(m) => m.freeze(),
        }
    }

    /// Restarts dropout randomness from `stream` (see [`LinearLayer::set_dropout_stream`]).
    pub fn set_dropout_stream(&self, stream: u64) {
        match self {
            Self::Phi(m) => m.set_dropout_stream(stream),
            Self::Llama(m) => m.set_dropout_stream(stream),
        }
    }

    /// Gradient checkpointing of every decoder layer (see [`crate::checkpoint`]).
    pub fn set_gradient_checkpointing(&self, on: bool) {
        match self {
            Self::Phi(m) => m.set_gradient_checkpointing(on),
            Self::Llama(m) => m.set_gradient_checkpointing(on),
        }
    }

    /// Whether training forwards checkpoint every decoder layer.
    pub fn gradient_checkpointing(&self) -> bool {
        match self {
            Self::Phi(m) => m.gradient_checkpointing(),
            Self::Llama(m) => m.gradient_checkpointing(),
        }
    }

    /// Every linear layer with its HF module path.
    pub fn linears(&self) -> Vec<(String, &dyn LinearLayer)> {
        match self {
            Self::Phi(m) => m.linears(),
            Self::Llama(m) => m.linears(),
        }
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        match self {
            Self::Phi(m) => m.dtype(),
            Self::Llama(m) => m.dtype(),
        }
    }
}

impl crate::causal_lm::CausalLm for DecoderModel {
    fn forward_cached(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        key_mask: &Tensor,
        cache: &mut crate::causal_lm::KvCache,
    ) -> Result<Tensor> {
        match self {
            Self::Phi(m) => m.forward_cached(input_ids, positions, key_mask, cache),
            Self::Llama(m) => m.forward_cached(input_ids, positions, key_mask, cache),
        }
    }

    fn forward_cached_last(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        key_mask: &Tensor,
        cache: &mut crate::causal_lm::KvCache,
    ) -> Result<Tensor> {
        match self {
            Self::Phi(m) => m.forward_cached_last(input_ids, positions, key_mask, cache),
            Self::Llama(m) => m.forward_cached_last(input_ids, positions, key_mask, cache),
        }
    }

    fn new_cache(&self) -> crate::causal_lm::KvCache {
        match self {
            Self::Phi(m) => m.new_cache(),
            Self::Llama(m) => m.new_cache(),
        }
    }

    fn vocab_size(&self) -> usize {
        match self {
            Self::Phi(m) => m.vocab_size(),
            Self::Llama(m) => m.vocab_size(),
        }
    }

    fn device(&self) -> &candle_core::Device {
        match self {
            Self::Phi(m) => m.device(),
            Self::Llama(m) => m.device(),
        }
    }
}
