//! all-MiniLM-L6-v2 in candle, as sentence-transformers computes its embeddings: BERT token
//! states, mean-pooled over the attention mask, then L2-normalised.
//!
//! The encoder is a BERT forward pass written here rather than `candle_transformers`'
//! `BertModel`, for speed: that one scales, masks and soft-maxes the `(batch, heads, len,
//! len)` attention scores in seven separate passes (each allocating a tensor as large as the
//! scores, 100 MB for 32 x 256 tokens), which cost as much as all the matrix products on a
//! 2-core CPU. Here the scale goes on the (small) queries, and the mask add plus the soft-max
//! are one pass; query, key and value are one matrix product. The arithmetic is the same
//! (post-LN BERT, exact erf GELU), and the embeddings agree with an independent numpy
//! reference (`stages/tests/filter_learned.rs`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Module, VarBuilder};
use serde::Deserialize;

use crate::arch::read_json_config;
use crate::fused::inplace;
use crate::weights::LoadError;

/// Errors while loading the encoder, each saying what to check.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    /// `config.json` cannot be read or parsed.
    #[error(transparent)]
    Config(#[from] LoadError),
    /// The weights do not fit the config (a tensor missing or misshapen).
    #[error(
        "{path} is not a BERT checkpoint matching config.json: {source}. Use the model folder's \
         own config.json and model.safetensors"
    )]
    Checkpoint {
        /// The weights file.
        path: PathBuf,
        /// What candle found wrong.
        source: candle_core::Error,
    },
    /// A tensor operation failed.
    #[error("tensor error in the encoder: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The hidden activation named in a BERT `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HiddenAct {
    /// Exact GELU, `x Φ(x)` (`"gelu"`).
    Gelu,
    /// Tanh-approximated GELU (`"geluapproximate"`).
    GeluApproximate,
    /// ReLU (`"relu"`).
    Relu,
}

/// The fields of a Hugging Face BERT `config.json` the encoder reads (others are ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    /// Rows of the word embedding.
    pub vocab_size: usize,
    /// Width of the hidden states (the embedding dimension).
    pub hidden_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; divides `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Feed-forward activation.
    pub hidden_act: HiddenAct,
    /// Rows of the position embedding: the longest sequence.
    pub max_position_embeddings: usize,
    /// Rows of the token-type embedding.
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f64,
    /// The padding token's id.
    pub pad_token_id: usize,
}

/// Bytes the largest tensor of one CPU forward pass may take; see [`MiniLm::texts_per_pass`].
const CPU_TENSOR_BUDGET: usize = 24 << 20;

/// The MiniLM sentence encoder: a post-LN BERT encoder, mean pooling and L2 normalisation.
/// Inference only.
pub struct MiniLm {
    config: BertConfig,
    device: Device,
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    emb_norm: Norm,
    layers: Vec<Layer>,
}

impl MiniLm {
    /// Loads `config.json` and `model.safetensors` (memory-mapped, as f32) from `dir` onto
    /// `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, EncoderError> {
        let config: BertConfig = read_json_config(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        // SAFETY: memory-mapping a file we only read; the crate's own loaders do the same.
        // A concurrent writer truncating the file could fault, which we accept as candle does.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device)? };
        Self::from_weights(vb, config, device).map_err(|source| EncoderError::Checkpoint {
            path: weights,
            source,
        })
    }

    /// Builds the encoder from weights under Hugging Face BERT names (with or without the
    /// `bert.` prefix of checkpoints saved from `BertForX`).
    pub fn from_weights(
        vb: VarBuilder,
        config: BertConfig,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let h = config.hidden_size;
        if config.num_attention_heads == 0 || !h.is_multiple_of(config.num_attention_heads) {
            candle_core::bail!(
                "hidden_size {h} is not a multiple of num_attention_heads {}",
                config.num_attention_heads
            );
        }
        let eps = config.layer_norm_eps;
        let emb = vb.pp("embeddings");
        let embedding = |name: &str, rows: usize| -> candle_core::Result<Embedding> {
            Ok(Embedding::new(emb.pp(name).get((rows, h), "weight")?, h))
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            let qkv: Vec<Dense> = ["query", "key", "value"]
                .iter()
                .map(|n| Dense::load(a.pp("self").pp(n), h, h))
                .collect::<candle_core::Result<_>>()?;
            let qkv = Dense {
                weight: Tensor::cat(&[&qkv[0].weight, &qkv[1].weight, &qkv[2].weight], 0)?,
                bias: Tensor::cat(&[&qkv[0].bias, &qkv[1].bias, &qkv[2].bias], 0)?,
            };
            let ff = config.intermediate_size;
            layers.push(Layer {
                qkv,
                attn_out: Dense::load(a.pp("output").pp("dense"), h, h)?,
                attn_norm: Norm::load(a.pp("output").pp("LayerNorm"), h, eps)?,
                intermediate: Dense::load(l.pp("intermediate").pp("dense"), h, ff)?,
                output: Dense::load(l.pp("output").pp("dense"), ff, h)?,
                out_norm: Norm::load(l.pp("output").pp("LayerNorm"), h, eps)?,
            });
        }
        Ok(Self {
            word: embedding("word_embeddings", config.vocab_size)?,
            position: embedding("position_embeddings", config.max_position_embeddings)?,
            token_type: embedding("token_type_embeddings", config.type_vocab_size)?,
            emb_norm: Norm::load(emb.pp("LayerNorm"), h, eps)?,
            layers,
            config,
            device: device.clone(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Embedding dimension (384 for MiniLM-L6).
    pub fn dim(&self) -> usize {
        self.config.hidden_size
    }

    /// Texts per forward pass for sequences of `len` tokens: `batch_size`, except on the CPU
    /// where a batch is split so that its largest tensors (attention scores, the
    /// feed-forward activations) stay under 24 MiB. glibc serves allocations below its mmap
    /// threshold (at most 32 MiB) from the heap and reuses them; larger ones are mapped fresh
    /// and zero-faulted page by page on every op, which cost a quarter of the CPU time at
    /// 32 x 256 tokens. Splitting changes no result (each text's embedding depends only on
    /// its own tokens) and also trims padding.
    pub fn texts_per_pass(&self, len: usize, batch_size: usize) -> usize {
        let batch_size = batch_size.max(1);
        if !self.device.is_cpu() {
            return batch_size;
        }
        let heads = self.config.num_attention_heads;
        let per_text = 4 * len * (heads * len).max(self.config.intermediate_size);
        (CPU_TENSOR_BUDGET / per_text.max(1)).clamp(1, batch_size)
    }

    /// Sentence embeddings of token-id sequences (each already cut to the model's length),
    /// padded together to the longest: one L2-normalised vector per sequence, in order.
    pub fn embed(&self, seqs: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let n = seqs.len();
        let seq = seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let pad = self.config.pad_token_id as u32;
        let mut ids = Vec::with_capacity(n * seq);
        let mut mask = Vec::with_capacity(n * seq);
        for s in seqs {
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(pad, seq - s.len()));
            mask.extend(std::iter::repeat_n(1f32, s.len()));
            mask.extend(std::iter::repeat_n(0f32, seq - s.len()));
        }
        let ids = Tensor::from_vec(ids, (n, seq), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, seq), &self.device)?;
        let hidden = self.forward(&ids, &mask)?;
        // Mean over real tokens only, as sentence-transformers' Pooling(mean).
        let maskf = mask.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&maskf)?.sum(1)?;
        let counts = maskf.sum(1)?.clamp(1e-9, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        let unit = mean.broadcast_div(&norm)?;
        unit.to_vec2::<f32>()
    }

    /// Last hidden states `(batch, len, hidden)` of `ids` `(batch, len)`; `mask` (f32, 1 for
    /// real tokens, 0 for padding) keeps padding out of every token's attention.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let (h, heads) = (self.config.hidden_size, self.config.num_attention_heads);
        let dh = h / heads;
        let positions = Tensor::arange(0u32, l as u32, ids.device())?;
        // Token type 0 everywhere (single-segment inputs): one row, broadcast.
        let type0 = self
            .token_type
            .forward(&Tensor::zeros(1, DType::U32, ids.device())?)?;
        let x = self
            .word
            .forward(ids)?
            .broadcast_add(&self.position.forward(&positions)?)?
            .broadcast_add(&type0)?;
        let mut x = self.emb_norm.forward(x)?.reshape((b * l, h))?;
        // Off the in-place CPU path, the mask is additive: 0 for real keys, the dtype's
        // minimum for padding (as HF does), so padded keys get zero weight after the soft-max.
        let make_additive = || -> candle_core::Result<Tensor> {
            ((mask.ones_like()? - mask)? * f32::MIN as f64)?.reshape((b, 1, 1, l))
        };
        let additive = if inplace::supported(mask) {
            None
        } else {
            Some(make_additive()?)
        };
        let scale = 1.0 / (dh as f64).sqrt();
        for layer in &self.layers {
            let qkv = layer
                .qkv
                .forward(&x, None)?
                .reshape((b, l, 3, heads, dh))?
                .permute((2, 0, 3, 1, 4))?; // (3, b, heads, l, dh)
                                            // Scaling the queries (b*l*h values) instead of the scores (b*heads*l*l).
            let q = qkv.get(0)?.affine(scale, 0.0)?;
            let k = qkv.get(1)?.contiguous()?;
            let v = qkv.get(2)?.contiguous()?;
            let scores = q.matmul(&k.t()?)?;
            let probs = match &additive {
                None if inplace::supported(&scores) => {
                    inplace::masked_softmax(&scores, mask)?;
                    scores
                }
                _ => {
                    let bias = match &additive {
                        Some(a) => a.clone(),
                        None => make_additive()?,
                    };
                    candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&bias)?)?
                }
            };
            let ctx = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * l, h))?;
            let a = layer
                .attn_norm
                .forward(layer.attn_out.forward_residual(&ctx, &x)?)?;
            let m = layer
                .intermediate
                .forward(&a, Some(self.config.hidden_act))?;
            x = layer
                .out_norm
                .forward(layer.output.forward_residual(&m, &a)?)?;
        }
        x.reshape((b, l, h))
    }
}

/// A dense layer `x W^T + b` on `(rows, in)` inputs.
struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    fn load(vb: VarBuilder, input: usize, output: usize) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get((output, input), "weight")?,
            bias: vb.get(output, "bias")?,
        })
    }

    /// `x W^T + b`, then `act` if given (in place on the CPU).
    fn forward(&self, x: &Tensor, act: Option<HiddenAct>) -> candle_core::Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        if inplace::supported(&y) && matches!(act, None | Some(HiddenAct::Gelu)) {
            inplace::bias_act(&y, &self.bias, act.is_some())?;
            return Ok(y);
        }
        let y = y.broadcast_add(&self.bias)?;
        match act {
            None => Ok(y),
            Some(HiddenAct::Gelu) => y.gelu_erf(),
            Some(HiddenAct::GeluApproximate) => y.gelu(),
            Some(HiddenAct::Relu) => y.relu(),
        }
    }

    /// `x W^T + b + residual` (in place on the CPU).
    fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        if inplace::supported(&y) && inplace::supported(residual) {
            inplace::bias_residual(&y, &self.bias, residual)?;
            return Ok(y);
        }
        y.broadcast_add(&self.bias)? + residual
    }
}

/// Layer normalisation over the last dimension.
struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl Norm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps: eps as f32,
        })
    }

    /// Normalises `x`; on the CPU in place, so `x` must be a tensor nothing else reads (the
    /// callers pass the sum they just computed).
    fn forward(&self, x: Tensor) -> candle_core::Result<Tensor> {
        if inplace::supported(&x) {
            inplace::layer_norm(&x, &self.weight, &self.bias, self.eps)?;
            return Ok(x);
        }
        candle_nn::ops::layer_norm(&x, &self.weight, &self.bias, self.eps)
    }
}

/// One post-LN BERT layer, as Hugging Face `BertLayer` computes it in eval mode.
struct Layer {
    /// Query, key and value projections stacked into one `(3 * hidden, hidden)` matrix.
    qkv: Dense,
    attn_out: Dense,
    attn_norm: Norm,
    intermediate: Dense,
    output: Dense,
    out_norm: Norm,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::max_abs_diff;
    use std::collections::HashMap;

    /// A two-layer BERT with random weights (a `bert.` prefix, as `BertForX` saves).
    fn tiny(device: &Device) -> MiniLm {
        let config: BertConfig = serde_json::from_str(
            r#"{"vocab_size": 20, "hidden_size": 8, "num_hidden_layers": 2,
                "num_attention_heads": 2, "intermediate_size": 16, "hidden_act": "gelu",
                "max_position_embeddings": 12, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
                "pad_token_id": 0, "model_type": "bert"}"#,
        )
        .unwrap();
        let mut tensors = HashMap::new();
        let mut add = |name: String, shape: &[usize]| {
            let t = Tensor::randn(0f32, 0.5, shape, device).unwrap();
            let t = if name.ends_with("LayerNorm.weight") {
                (t + 1.0).unwrap()
            } else {
                t
            };
            tensors.insert(format!("bert.{name}"), t);
        };
        for (name, rows) in [("word", 20), ("position", 12), ("token_type", 2)] {
            add(format!("embeddings.{name}_embeddings.weight"), &[rows, 8]);
        }
        add("embeddings.LayerNorm.weight".into(), &[8]);
        add("embeddings.LayerNorm.bias".into(), &[8]);
        for i in 0..2 {
            let p = format!("encoder.layer.{i}");
            for (name, out, inp) in [
                ("attention.self.query", 8, 8),
                ("attention.self.key", 8, 8),
                ("attention.self.value", 8, 8),
                ("attention.output.dense", 8, 8),
                ("intermediate.dense", 16, 8),
                ("output.dense", 8, 16),
            ] {
                add(format!("{p}.{name}.weight"), &[out, inp]);
                add(format!("{p}.{name}.bias"), &[out]);
            }
            for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
                add(format!("{p}.{norm}.weight"), &[8]);
                add(format!("{p}.{norm}.bias"), &[8]);
            }
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        MiniLm::from_weights(vb, config, device).unwrap()
    }

    #[test]
    fn embeddings_are_unit_vectors_that_ignore_padding() {
        let model = tiny(&Device::Cpu);
        let (short, long) = ([1u32, 5, 7, 2], [1u32, 9, 3, 3, 4, 6, 2]);
        let together = model.embed(&[&short, &long]).unwrap();
        assert_eq!(together.len(), 2);
        for v in &together {
            assert_eq!(v.len(), model.dim());
            let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        }
        let alone = model.embed(&[&short]).unwrap();
        let diff = alone[0]
            .iter()
            .zip(&together[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "padding changed the embedding by {diff}");
    }

    #[test]
    fn the_in_place_masked_softmax_agrees_with_the_additive_mask() {
        // A non-contiguous mask sends the attention down the additive-mask path.
        let model = tiny(&Device::Cpu);
        let ids = Tensor::new(&[[1u32, 5, 7, 2, 0], [1, 9, 3, 3, 2]], &Device::Cpu).unwrap();
        let mask = Tensor::new(
            &[[1f32, 1., 1., 1., 0.], [1., 1., 1., 1., 1.]],
            &Device::Cpu,
        )
        .unwrap();
        let fused = model.forward(&ids, &mask).unwrap();
        let strided = Tensor::stack(&[&mask, &mask], 2)
            .unwrap()
            .narrow(2, 0, 1)
            .unwrap()
            .squeeze(2)
            .unwrap();
        assert!(!strided.is_contiguous());
        let composite = model.forward(&ids, &strided).unwrap();
        // Padded positions' own states differ (HF's additive mask is not exactly zero
        // weight), so compare the real tokens.
        let real = |t: &Tensor| t.narrow(1, 0, 4).unwrap();
        let diff = max_abs_diff(&real(&fused), &real(&composite));
        assert!(diff < 1e-4, "{diff}");
    }

    #[test]
    fn a_batch_is_split_on_the_cpu_only_when_its_tensors_are_large() {
        let model = tiny(&Device::Cpu);
        assert_eq!(model.texts_per_pass(16, 32), 32);
        // 2 heads x 2048^2 scores x 4 bytes = 32 MiB per text, over the budget.
        assert_eq!(model.texts_per_pass(2048, 32), 1);
        assert_eq!(model.texts_per_pass(16, 0), 1);
    }

    #[test]
    fn config_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = MiniLm::load(dir.path(), &Device::Cpu).err().unwrap();
        assert!(matches!(err, EncoderError::Config(LoadError::Io { .. })));
        assert!(err.to_string().contains("config.json"), "{err}");
        std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": 8}").unwrap();
        let err = MiniLm::load(dir.path(), &Device::Cpu).err().unwrap();
        assert!(matches!(
            err,
            EncoderError::Config(LoadError::Config { .. })
        ));
    }
}
