//! Decoder-only architectures and what they share.
//!
//! * [`spec`]: what an architecture is ([`ArchitectureSpec`], [`ArchConfig`], the handle
//!   [`Architecture`]); [`registry`]: which exist ([`ARCHITECTURES`]) and finding one by name.
//!   A new architecture is one file here plus one line in the registry.
//! * [`decoder`]: the [`Decoder`] trait every architecture implements and [`DecoderModel`],
//!   the type code uses when the architecture is chosen at run time.
//! * [`factory`]: the "linear factory" through which the caller picks, per projection, how it
//!   is implemented (dense, quantized, LoRA-wrapped).
//! * [`transformer`]: the model both architectures are (embeddings, decoder layers, final
//!   norm, LM head), generic over what each contributes ([`Family`]).
//! * [`llama`], [`phi`]: the architectures.
//!
//! This module itself holds the decoder-layer loop the architectures share (with gradient
//! checkpointing) and the helper that loads one projection through the factory.

pub mod decoder;
pub mod factory;
pub mod llama;
pub mod phi;
pub mod registry;
pub mod spec;
pub mod transformer;

pub use decoder::{Decoder, DecoderModel};
pub use factory::{DenseFactory, LinearFactory, LinearParts, LoraFactory};
pub use llama::{Llama, LlamaConfig};
pub use phi::{Phi, PhiConfig};
pub use registry::ARCHITECTURES;
pub use spec::{ArchConfig, Architecture, ArchitectureSpec, GgufSupport};
pub use transformer::{Dims, Family, FinalNorm, Transformer};

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};

use crate::causal_lm::KvCache;
use crate::checkpoint::{checkpoint, Block};
use crate::layers::Activation;
use crate::linear::LinearLayer;

/// A decoder layer, as the layer loop shared by the architectures runs it.
pub trait DecoderLayer: Send + Sync + 'static {
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
    use crate::io::JsonFileError;
    use crate::weights::LoadError;
    crate::io::read_json(path).map_err(|e| match e {
        JsonFileError::Io { path, source } => LoadError::Io { path, source },
        JsonFileError::Parse { path, source } => LoadError::Config { path, source },
    })
}
