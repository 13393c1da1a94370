//! Microsoft Phi (`PhiForCausalLM`, e.g. phi-1_5): attention and MLP in parallel on one shared
//! input LayerNorm, partial rotary, `gelu_new` MLP, LM head with bias.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::spec::hf_json;
use super::{
    build_linear, read_json_config, ArchConfig, Architecture, ArchitectureSpec, DecoderLayer,
    DecoderModel, Dims, Family, LinearFactory, Transformer,
};
use crate::causal_lm::KvCache;
use crate::layers::{
    internal_dtype, Activation, Attention, AttentionShape, Embedding, LayerNorm, Rotary,
};
use crate::linear::LinearLayer;
use crate::weights::{safetensors_in_dir, LoadError, Weights};

fn default_act() -> Activation {
    Activation::GeluNew
}
fn default_max_pos() -> usize {
    2048
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_partial() -> f64 {
    0.5
}
fn default_ln_eps() -> f64 {
    1e-5
}

/// The fields of HF's `PhiConfig` (`config.json`) this implementation uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhiConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Key/value heads (defaults to `num_attention_heads`).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// MLP activation (`gelu_new`).
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    /// Context length.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Rotary base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Fraction of each head's channels that are rotated (0.5 for Phi).
    #[serde(default = "default_partial")]
    pub partial_rotary_factor: f64,
    /// LayerNorm epsilon.
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    /// LayerNorms on queries and keys (unsupported; false for phi-1/1.5/2).
    #[serde(default)]
    pub qk_layernorm: bool,
    /// Rotary scaling (unsupported; null for phi-1/1.5/2).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

/// Phi in the architecture registry.
pub const ARCHITECTURE: ArchitectureSpec = ArchitectureSpec {
    name: "phi",
    hf_classes: &["PhiForCausalLM"],
    linear_module_names: &["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    read_hf_config: |path| Ok(Box::new(PhiConfig::from_json_file(path)?)),
    gguf: None,
};

impl ArchConfig for PhiConfig {
    fn architecture(&self) -> Architecture {
        Architecture::of(&ARCHITECTURE)
    }

    fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        PhiConfig::tensor_shapes(self)
    }

    fn to_hf_json(&self) -> serde_json::Value {
        hf_json(self, &ARCHITECTURE)
    }

    fn build(
        &self,
        weights: &Weights,
        dtype: DType,
        factory: &mut dyn LinearFactory,
    ) -> std::result::Result<DecoderModel, LoadError> {
        Ok(Phi::new(self, weights, dtype, factory)?.into())
    }
}

impl PhiConfig {
    /// Reads a HF `config.json`.
    pub fn from_json_file(path: &Path) -> std::result::Result<Self, LoadError> {
        read_json_config(path)
    }

    /// Channels per head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    fn validate(&self) -> std::result::Result<(), LoadError> {
        if self.qk_layernorm {
            return Err(LoadError::Unsupported(
                "Phi with qk_layernorm = true".into(),
            ));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(LoadError::Unsupported("Phi with rope_scaling".into()));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(LoadError::Unsupported(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        Ok(())
    }

    /// Every tensor a checkpoint for this config holds, with its shape (HF names).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let kv = self.kv_heads() * self.head_dim();
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut add = |n: &str, s: Vec<usize>| out.push((format!("{p}.{n}"), s));
            add("input_layernorm.weight", vec![h]);
            add("input_layernorm.bias", vec![h]);
            for (m, o) in [("q_proj", h), ("k_proj", kv), ("v_proj", kv)] {
                add(&format!("self_attn.{m}.weight"), vec![o, h]);
                add(&format!("self_attn.{m}.bias"), vec![o]);
            }
            add("self_attn.dense.weight", vec![h, h]);
            add("self_attn.dense.bias", vec![h]);
            add("mlp.fc1.weight", vec![i, h]);
            add("mlp.fc1.bias", vec![i]);
            add("mlp.fc2.weight", vec![h, i]);
            add("mlp.fc2.bias", vec![h]);
        }
        out.push(("model.final_layernorm.weight".into(), vec![h]));
        out.push(("model.final_layernorm.bias".into(), vec![h]));
        out.push(("lm_head.weight".into(), vec![v, h]));
        out.push(("lm_head.bias".into(), vec![v]));
        out
    }
}

/// One Phi decoder layer (the parallel attention + MLP block); built by [`Phi::new`].
pub struct PhiLayer {
    norm: LayerNorm,
    attn: Attention,
    fc1: Box<dyn LinearLayer>,
    fc2: Box<dyn LinearLayer>,
}

impl DecoderLayer for PhiLayer {
    /// The parallel block: `x + attn(norm(x)) + mlp(norm(x))`.
    fn forward(
        &self,
        x: &Tensor,
        positions: &Tensor,
        key_mask: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
        act: Activation,
    ) -> Result<Tensor> {
        let h = self.norm.forward(x)?;
        let attn = self.attn.forward(&h, positions, key_mask, cache)?;
        let mlp = self.fc2.forward(&act.forward(&self.fc1.forward(&h)?)?)?;
        (attn + mlp)? + x
    }

    fn linears(&self) -> Vec<&dyn LinearLayer> {
        let mut out: Vec<&dyn LinearLayer> = self
            .attn
            .projections()
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        out.push(&*self.fc1);
        out.push(&*self.fc2);
        out
    }
}

/// A Phi model with linear layers chosen by a [`LinearFactory`].
pub type Phi = Transformer<PhiFamily>;

/// Phi's part of a [`Transformer`]: its config, layer, final norm and projection names.
pub struct PhiFamily;

impl Family for PhiFamily {
    type Config = PhiConfig;
    type Layer = PhiLayer;
    type Norm = LayerNorm;
    const ARCHITECTURE: &'static ArchitectureSpec = &ARCHITECTURE;
    const LAYER_LINEARS: &'static [&'static str] = &[
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.dense",
        "mlp.fc1",
        "mlp.fc2",
    ];

    fn dims(config: &PhiConfig) -> Dims {
        Dims {
            hidden_act: config.hidden_act,
            hidden_size: config.hidden_size,
            num_layers: config.num_hidden_layers,
            vocab_size: config.vocab_size,
        }
    }
}

impl Transformer<PhiFamily> {
    /// Builds the model from HF-named `weights`, computing in `dtype`; `factory` is called for
    /// every projection with its HF module path (`model.layers.N.self_attn.q_proj`, ...,
    /// `model.layers.N.mlp.fc1`, `lm_head`).
    pub fn new(
        config: &PhiConfig,
        weights: &Weights,
        dtype: DType,
        factory: &mut dyn LinearFactory,
    ) -> std::result::Result<Self, LoadError> {
        config.validate()?;
        let (h, inter, vocab) = (
            config.hidden_size,
            config.intermediate_size,
            config.vocab_size,
        );
        let shape = AttentionShape {
            num_heads: config.num_attention_heads,
            num_kv_heads: config.kv_heads(),
            head_dim: config.head_dim(),
        };
        let kv = shape.num_kv_heads * shape.head_dim;
        let rotary_dim = (config.partial_rotary_factor * shape.head_dim as f64) as usize;
        let work = internal_dtype(dtype);
        let norm = |p: &str| -> std::result::Result<LayerNorm, LoadError> {
            Ok(LayerNorm::new(
                weights.dense(&format!("{p}.weight"), &[h], work)?,
                weights.dense(&format!("{p}.bias"), &[h], work)?,
                config.layer_norm_eps,
            )?)
        };
        let embed =
            Embedding::from_weights(weights, "model.embed_tokens.weight", [vocab, h], dtype)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut lin = |name: &str, dims| {
                build_linear(
                    weights,
                    factory,
                    &format!("{p}.{name}"),
                    None,
                    dims,
                    true,
                    dtype,
                )
            };
            let q = lin("self_attn.q_proj", (h, h))?;
            let k = lin("self_attn.k_proj", (kv, h))?;
            let v = lin("self_attn.v_proj", (kv, h))?;
            let o = lin("self_attn.dense", (h, h))?;
            let fc1 = lin("mlp.fc1", (inter, h))?;
            let fc2 = lin("mlp.fc2", (h, inter))?;
            let rotary = Rotary::new(shape.head_dim, rotary_dim, config.rope_theta)?;
            layers.push(Arc::new(PhiLayer {
                norm: norm(&format!("{p}.input_layernorm"))?,
                attn: Attention::new(q, k, v, o, shape, rotary)?,
                fc1,
                fc2,
            }));
        }
        let final_norm = norm("model.final_layernorm")?;
        let lm_head = build_linear(weights, factory, "lm_head", None, (vocab, h), true, dtype)?;
        Ok(Self::from_parts(
            config.clone(),
            embed,
            layers,
            final_norm,
            lm_head,
            weights.device().clone(),
            dtype,
        ))
    }

    /// Loads a Hugging Face checkpoint directory (`config.json` plus `*.safetensors`).
    pub fn from_hf_dir(
        dir: &Path,
        device: &Device,
        dtype: DType,
        factory: &mut dyn LinearFactory,
    ) -> std::result::Result<Self, LoadError> {
        let config = PhiConfig::from_json_file(&dir.join("config.json"))?;
        let weights = Weights::from_safetensors(&safetensors_in_dir(dir)?, device)?;
        Self::new(&config, &weights, dtype, factory)
    }
}
