//! How an architecture's linear projections are built: the caller hands a [`LinearFactory`]
//! to the model's constructor and decides, per projection, whether it is dense, quantized or
//! LoRA-wrapped.

use candle_core::{DType, Result, Tensor};

use crate::layers::Dense;
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
