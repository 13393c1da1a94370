//! Llama (`LlamaForCausalLM`, e.g. SmolLM2): RMSNorm, SwiGLU MLP, grouped-query attention,
//! full rotary, optionally tied input/output embeddings.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::spec::{hf_json, GgufModel};
use super::{
    build_linear, read_json_config, ArchConfig, Architecture, ArchitectureSpec, DecoderLayer,
    DecoderModel, Dims, Family, GgufSupport, LinearFactory, Transformer,
};
use crate::causal_lm::KvCache;
use crate::layers::{
    internal_dtype, Activation, Attention, AttentionShape, Embedding, RmsNorm, Rotary,
};
use crate::linear::LinearLayer;
use crate::weights::{load_gguf_llama, safetensors_in_dir, GgufLlamaMeta, LoadError, Weights};

fn default_act() -> Activation {
    Activation::Silu
}
fn default_max_pos() -> usize {
    2048
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_eps() -> f64 {
    1e-6
}

/// The fields of HF's `LlamaConfig` (`config.json`) this implementation uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (defaults to `num_attention_heads`).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Channels per head (defaults to `hidden_size / num_attention_heads`).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// MLP activation (`silu`).
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    /// Context length.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Rotary base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Whether the LM head reuses the embedding table.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v/o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Rotary scaling (unsupported; null for SmolLM2).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

/// Llama in the architecture registry.
pub const ARCHITECTURE: ArchitectureSpec = ArchitectureSpec {
    name: "llama",
    hf_classes: &["LlamaForCausalLM"],
    linear_module_names: &[
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ],
    read_hf_config: |path| Ok(Box::new(LlamaConfig::from_json_file(path)?)),
    gguf: Some(GgufSupport {
        name: "llama",
        load: load_gguf,
    }),
};

/// A llama.cpp GGUF file: its weights and the config its metadata implies.
fn load_gguf(path: &Path, device: &Device) -> std::result::Result<GgufModel, LoadError> {
    let (weights, meta) = load_gguf_llama(path, device)?;
    Ok((weights, Box::new(LlamaConfig::from_gguf_meta(&meta))))
}

impl ArchConfig for LlamaConfig {
    fn architecture(&self) -> Architecture {
        Architecture::of(&ARCHITECTURE)
    }

    fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        LlamaConfig::tensor_shapes(self)
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
        Ok(Llama::new(self, weights, dtype, factory)?.into())
    }
}

impl LlamaConfig {
    /// Reads a HF `config.json`.
    pub fn from_json_file(path: &Path) -> std::result::Result<Self, LoadError> {
        read_json_config(path)
    }

    /// The config implied by a GGUF file's metadata.
    pub fn from_gguf_meta(meta: &GgufLlamaMeta) -> Self {
        Self {
            vocab_size: meta.vocab_size,
            hidden_size: meta.hidden_size,
            intermediate_size: meta.intermediate_size,
            num_hidden_layers: meta.num_hidden_layers,
            num_attention_heads: meta.num_attention_heads,
            num_key_value_heads: Some(meta.num_key_value_heads),
            head_dim: None,
            hidden_act: Activation::Silu,
            max_position_embeddings: meta.max_position_embeddings,
            rope_theta: meta.rope_theta,
            rms_norm_eps: meta.rms_norm_eps,
            tie_word_embeddings: meta.tie_word_embeddings,
            attention_bias: false,
            mlp_bias: false,
            rope_scaling: None,
        }
    }

    /// Channels per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    fn validate(&self) -> std::result::Result<(), LoadError> {
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(LoadError::Unsupported("Llama with rope_scaling".into()));
        }
        if self.num_attention_heads == 0 || self.head_dim() == 0 {
            return Err(LoadError::Unsupported(
                "Llama config with zero heads or head size".into(),
            ));
        }
        Ok(())
    }

    /// Every tensor a checkpoint for this config holds, with its shape (HF names); no
    /// `lm_head.weight` when embeddings are tied.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim();
        let kv = self.kv_heads() * self.head_dim();
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut add = |n: &str, s: Vec<usize>| out.push((format!("{p}.{n}"), s));
            add("input_layernorm.weight", vec![h]);
            add("post_attention_layernorm.weight", vec![h]);
            for (m, o, i_) in [
                ("q_proj", q, h),
                ("k_proj", kv, h),
                ("v_proj", kv, h),
                ("o_proj", h, q),
            ] {
                add(&format!("self_attn.{m}.weight"), vec![o, i_]);
                if self.attention_bias {
                    add(&format!("self_attn.{m}.bias"), vec![o]);
                }
            }
            for (m, o, i_) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
                add(&format!("mlp.{m}.weight"), vec![o, i_]);
                if self.mlp_bias {
                    add(&format!("mlp.{m}.bias"), vec![o]);
                }
            }
        }
        out.push(("model.norm.weight".into(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".into(), vec![v, h]));
        }
        out
    }
}

/// One Llama decoder layer (pre-norm attention, then pre-norm SwiGLU MLP); built by
/// [`Llama::new`].
pub struct LlamaLayer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    gate: Box<dyn LinearLayer>,
    up: Box<dyn LinearLayer>,
    down: Box<dyn LinearLayer>,
}

impl DecoderLayer for LlamaLayer {
    /// The sequential block: `x += attn(norm(x))`, then `x += mlp(norm(x))`.
    fn forward(
        &self,
        x: &Tensor,
        positions: &Tensor,
        key_mask: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
        act: Activation,
    ) -> Result<Tensor> {
        let h = self.input_norm.forward(x)?;
        let attn = self.attn.forward(&h, positions, key_mask, cache)?;
        let x = (x + attn)?;
        let h = self.post_norm.forward(&x)?;
        let gated = act.gated(&self.gate.forward(&h)?, &self.up.forward(&h)?)?;
        let mlp = self.down.forward(&gated)?;
        x + mlp
    }

    fn linears(&self) -> Vec<&dyn LinearLayer> {
        let mut out: Vec<&dyn LinearLayer> = self
            .attn
            .projections()
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        out.extend([&*self.gate, &*self.up, &*self.down]);
        out
    }
}

/// A Llama model with linear layers chosen by a [`LinearFactory`].
pub type Llama = Transformer<LlamaFamily>;

/// Llama's part of a [`Transformer`]: its config, layer, final norm and projection names.
pub struct LlamaFamily;

impl Family for LlamaFamily {
    type Config = LlamaConfig;
    type Layer = LlamaLayer;
    type Norm = RmsNorm;
    const ARCHITECTURE: &'static ArchitectureSpec = &ARCHITECTURE;
    const LAYER_LINEARS: &'static [&'static str] = &[
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];

    fn dims(config: &LlamaConfig) -> Dims {
        Dims {
            hidden_act: config.hidden_act,
            hidden_size: config.hidden_size,
            num_layers: config.num_hidden_layers,
            vocab_size: config.vocab_size,
        }
    }
}

impl Transformer<LlamaFamily> {
    /// Builds the model from HF-named `weights`, computing in `dtype`; `factory` is called for
    /// every projection with its HF module path (`model.layers.N.self_attn.q_proj`, ...,
    /// `model.layers.N.mlp.down_proj`, `lm_head`). With tied embeddings `lm_head` is built
    /// from the embedding table.
    pub fn new(
        config: &LlamaConfig,
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
        let q_width = shape.num_heads * shape.head_dim;
        let kv = shape.num_kv_heads * shape.head_dim;
        let work = internal_dtype(dtype);
        let norm = |name: String| -> std::result::Result<RmsNorm, LoadError> {
            Ok(RmsNorm::new(
                weights.dense(&name, &[h], work)?,
                config.rms_norm_eps,
            )?)
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let (ab, mb) = (config.attention_bias, config.mlp_bias);
            let mut lin = |name: &str, dims, bias| {
                build_linear(
                    weights,
                    factory,
                    &format!("{p}.{name}"),
                    None,
                    dims,
                    bias,
                    dtype,
                )
            };
            let q = lin("self_attn.q_proj", (q_width, h), ab)?;
            let k = lin("self_attn.k_proj", (kv, h), ab)?;
            let v = lin("self_attn.v_proj", (kv, h), ab)?;
            let o = lin("self_attn.o_proj", (h, q_width), ab)?;
            let gate = lin("mlp.gate_proj", (inter, h), mb)?;
            let up = lin("mlp.up_proj", (inter, h), mb)?;
            let down = lin("mlp.down_proj", (h, inter), mb)?;
            let rotary = Rotary::new(shape.head_dim, shape.head_dim, config.rope_theta)?;
            layers.push(Arc::new(LlamaLayer {
                input_norm: norm(format!("{p}.input_layernorm.weight"))?,
                attn: Attention::new(q, k, v, o, shape, rotary)?,
                post_norm: norm(format!("{p}.post_attention_layernorm.weight"))?,
                gate,
                up,
                down,
            }));
        }
        let norm = norm("model.norm.weight".into())?;
        let head_weight = config
            .tie_word_embeddings
            .then_some("model.embed_tokens.weight");
        let lm_head = build_linear(
            weights,
            factory,
            "lm_head",
            head_weight,
            (vocab, h),
            false,
            dtype,
        )?;
        // A tied head kept packed is the embedding table itself: share it rather than hold the
        // table twice.
        let shared = config
            .tie_word_embeddings
            .then(|| lm_head.packed_weight())
            .flatten()
            .filter(|w| (w.rows(), w.cols()) == (vocab, h) && dtype == DType::F32);
        let embed = match shared {
            Some(table) => Embedding::packed(table, weights.device()),
            None => {
                Embedding::from_weights(weights, "model.embed_tokens.weight", [vocab, h], dtype)?
            }
        };
        Ok(Self::from_parts(
            config.clone(),
            embed,
            layers,
            norm,
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
        let config = LlamaConfig::from_json_file(&dir.join("config.json"))?;
        let weights = Weights::from_safetensors(&safetensors_in_dir(dir)?, device)?;
        Self::new(&config, &weights, dtype, factory)
    }

    /// Loads a llama.cpp GGUF file (config from its metadata; quantized weights are handed to
    /// `factory` still quantized).
    pub fn from_gguf(
        path: &Path,
        device: &Device,
        dtype: DType,
        factory: &mut dyn LinearFactory,
    ) -> std::result::Result<Self, LoadError> {
        let (weights, meta) = load_gguf_llama(path, device)?;
        Self::new(
            &LlamaConfig::from_gguf_meta(&meta),
            &weights,
            dtype,
            factory,
        )
    }
}
