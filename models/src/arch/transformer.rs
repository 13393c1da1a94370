//! The model both architectures are: token embeddings, a stack of decoder layers, a final norm
//! and an LM head. An architecture supplies what differs ([`Family`]: its config, its decoder
//! layer, its final norm, the names of its projections); the [`Decoder`] and [`CausalLm`]
//! implementations are written here once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use super::spec::{Architecture, ArchitectureSpec};
use super::{run_layers, Decoder, DecoderLayer};
use crate::causal_lm::{CausalLm, KvCache};
use crate::layers::{Activation, Embedding, LayerNorm, RmsNorm};
use crate::linear::LinearLayer;

/// What one architecture contributes to a [`Transformer`].
pub trait Family: Send + Sync + 'static {
    /// Its config.
    type Config: Send + Sync + 'static;
    /// Its decoder layer.
    type Layer: DecoderLayer;
    /// Its final norm.
    type Norm: FinalNorm;
    /// Its entry in the architecture registry.
    const ARCHITECTURE: &'static ArchitectureSpec;
    /// Module path of each of a layer's linear layers below `model.layers.N.`, in the order of
    /// [`DecoderLayer::linears`] (`self_attn.q_proj`, ..., `mlp.fc2`).
    const LAYER_LINEARS: &'static [&'static str];

    /// The sizes and activation `config` gives.
    fn dims(config: &Self::Config) -> Dims;
}

/// What the shared code needs to know of a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// The MLP activation.
    pub hidden_act: Activation,
    /// Hidden width.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
}

/// The norm after the last decoder layer.
pub trait FinalNorm: Send + Sync + 'static {
    /// Normalises `x` over its last dimension.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
}

impl FinalNorm for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        LayerNorm::forward(self, x)
    }
}

impl FinalNorm for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        RmsNorm::forward(self, x)
    }
}

/// A decoder-only transformer of family `F`, with linear layers chosen by a
/// [`LinearFactory`](super::LinearFactory) when it was built.
pub struct Transformer<F: Family> {
    config: F::Config,
    embed: Embedding,
    layers: Vec<Arc<F::Layer>>,
    final_norm: F::Norm,
    lm_head: Box<dyn LinearLayer>,
    device: Device,
    dtype: DType,
    checkpointing: AtomicBool,
}

impl<F: Family> Transformer<F> {
    /// Assembles a model from its built parts (each architecture's constructor does).
    pub(crate) fn from_parts(
        config: F::Config,
        embed: Embedding,
        layers: Vec<Arc<F::Layer>>,
        final_norm: F::Norm,
        lm_head: Box<dyn LinearLayer>,
        device: Device,
        dtype: DType,
    ) -> Self {
        Self {
            config,
            embed,
            layers,
            final_norm,
            lm_head,
            device,
            dtype,
            checkpointing: AtomicBool::new(false),
        }
    }

    /// The config.
    pub fn config(&self) -> &F::Config {
        &self.config
    }
}

impl<F: Family> Decoder for Transformer<F> {
    fn architecture(&self) -> Architecture {
        Architecture::of(F::ARCHITECTURE)
    }

    fn final_hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        key_mask: &Tensor,
        cache: Option<&mut KvCache>,
        last_only: bool,
    ) -> Result<Tensor> {
        let x = self.embed.forward(ids)?;
        let x = run_layers(
            &self.layers,
            x,
            positions,
            key_mask,
            cache,
            F::dims(&self.config).hidden_act,
            self.checkpointing.load(Ordering::Relaxed),
        )?;
        // Generation only needs the last position's logits (see `forward_cached_last`).
        let x = if last_only {
            let t = x.dim(1)?;
            x.narrow(1, t.saturating_sub(1), 1)?
        } else {
            x
        };
        self.final_norm.forward(&x)
    }

    fn lm_head(&self) -> &dyn LinearLayer {
        &*self.lm_head
    }

    fn linears(&self) -> Vec<(String, &dyn LinearLayer)> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            for (name, linear) in F::LAYER_LINEARS.iter().zip(layer.linears()) {
                out.push((format!("model.layers.{l}.{name}"), linear));
            }
        }
        out.push(("lm_head".to_string(), &*self.lm_head));
        out
    }

    fn hidden_size(&self) -> usize {
        F::dims(&self.config).hidden_size
    }

    fn num_layers(&self) -> usize {
        F::dims(&self.config).num_layers
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn set_gradient_checkpointing(&self, on: bool) {
        self.checkpointing.store(on, Ordering::Relaxed);
    }

    fn gradient_checkpointing(&self) -> bool {
        self.checkpointing.load(Ordering::Relaxed)
    }
}

impl<F: Family> CausalLm for Transformer<F> {
    fn forward_cached(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        key_mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let mask = key_mask.to_dtype(DType::U8)?;
        self.logits(input_ids, positions, &mask, Some(cache), false)?
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
        self.logits(input_ids, positions, &mask, Some(cache), true)?
            .squeeze(1)?
            .to_dtype(DType::F32)
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    fn vocab_size(&self) -> usize {
        F::dims(&self.config).vocab_size
    }

    fn device(&self) -> &Device {
        &self.device
    }
}
