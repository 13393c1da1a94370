//! The model artifact: a directory holding one model, and THE loader of it.
//!
//! A model artifact is a directory holding exactly one of three weight layouts:
//!
//! * **GGUF**: `model.gguf` (llama.cpp). Quantized projections stay in their ggml block
//!   format and run as [`QuantLinear`] over [`QuantWeight::Ggml`].
//! * **HF safetensors**: `config.json` + `*.safetensors` (a Hugging Face checkpoint, dense).
//! * **Quantized**: `config.json` + `quantized.safetensors` + `quantization.json`, read and
//!   written by [`quantized`] (the frozen base of QLoRA).
//!
//! Beside the weights there is always `tokenizer.json` (a Hugging Face tokenizers file; for
//! GGUF it is rebuilt from the file's metadata), usually `tokenizer_config.json` (naming the
//! EOS/BOS tokens), and `model.json` ([`ModelInfo`]: architecture, end-of-sequence and padding
//! ids, source).
//!
//! [`load_model`] builds a [`DecoderModel`] from an artifact (optionally LoRA-wrapped, with
//! fresh adapters for training or a trained PEFT adapter applied for inference).

pub mod quantized;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::arch::{
    ArchConfig, Architecture, DecoderModel, LinearFactory, LinearParts, LoraFactory,
};
use crate::io::JsonFileError;
use crate::layers::Dense;
use crate::peft::{PeftAdapter, PeftError};
use crate::quant::{BlockLinear, GgmlQuantized, Nf4Tensor, QuantLinear, QuantWeight};
use crate::weights::{LoadError, StoredTensor, Weights};
use crate::{LinearLayer, LoraConfig};

/// `model.json`: what consumers need to know besides the weights.
pub const MODEL_JSON: &str = "model.json";
/// The tokenizer file of every model artifact.
pub const TOKENIZER_JSON: &str = "tokenizer.json";
/// Names the special tokens beside [`TOKENIZER_JSON`] (Hugging Face format).
pub const TOKENIZER_CONFIG_JSON: &str = "tokenizer_config.json";
/// The weights of the GGUF layout.
pub const GGUF_FILE: &str = "model.gguf";
/// The Hugging Face config of the safetensors and quantized layouts.
pub const CONFIG_JSON: &str = "config.json";
/// A Hugging Face checkpoint's generation defaults (its `eos_token_id` may list more ids).
pub const GENERATION_CONFIG_JSON: &str = "generation_config.json";

/// Errors reading or building a model artifact, each saying what to do.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum ModelArtifactError {
    /// A file could not be read or written.
    #[error("cannot {action} `{path}`: {source}", path = .path.display())]
    #[diagnostic(help("check that the path exists and is readable/writable"))]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file is missing fields or malformed.
    #[error("invalid JSON in `{path}`: {message}", path = .path.display())]
    #[diagnostic(help(
        "the file is produced by the `model` or `quantize` kind; rebuild the artifact"
    ))]
    Json {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The directory holds none of the known layouts.
    #[error("`{}` is not a model artifact: it has neither `model.gguf`, nor `config.json` with `*.safetensors`, nor `quantized.safetensors`", .0.display())]
    #[diagnostic(help("connect the output of a `model` or `quantize` stage"))]
    UnknownLayout(PathBuf),
    /// Weights could not be loaded into the architecture.
    #[error("cannot load the model in `{path}`: {source}", path = .path.display())]
    Load {
        /// The artifact directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: LoadError,
    },
    /// Quantized storage is inconsistent.
    #[error("corrupt quantized model in `{path}`: {message}", path = .path.display())]
    #[diagnostic(help("rerun the `quantize` stage that produced it"))]
    Corrupt {
        /// The artifact directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A weight cannot be stored in the requested quantized format.
    #[error("cannot quantize `{tensor}`: {message}")]
    #[diagnostic(help(
        "restrict the quantized modules or pick a format with smaller blocks (q4_0, q8_0, nf4)"
    ))]
    Quantize {
        /// The weight's name.
        tensor: String,
        /// Why.
        message: String,
    },
    /// A PEFT adapter does not fit the model or cannot be read.
    #[error("cannot apply the adapter in `{path}`: {source}", path = .path.display())]
    #[diagnostic(help("the adapter must come from a `lora-train` stage on the same base model"))]
    Adapter {
        /// The adapter directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: PeftError,
    },
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, ModelArtifactError>;

impl From<JsonFileError> for ModelArtifactError {
    fn from(e: JsonFileError) -> Self {
        match e {
            JsonFileError::Io { path, source } => Self::Io {
                action: "read",
                path,
                source,
            },
            JsonFileError::Parse { path, source } => Self::Json {
                path,
                message: source.to_string(),
            },
        }
    }
}

pub(crate) fn io_err(
    action: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> ModelArtifactError {
    let path = path.to_path_buf();
    move |source| ModelArtifactError::Io {
        action,
        path,
        source,
    }
}

/// Writes `value` to `path` as the crate's JSON ([`crate::io::json_text`]).
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = crate::io::json_text(value).map_err(|e| ModelArtifactError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    std::fs::write(path, text).map_err(io_err("write", path))
}

/// `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The architecture.
    pub architecture: Architecture,
    /// Token ids that end a generation.
    pub eos_token_ids: Vec<u32>,
    /// Token id used to pad batches (`None`: use the first EOS id).
    pub pad_token_id: Option<u32>,
    /// Where the weights came from (file name inside the download, or a description).
    pub source: String,
    /// The Hugging Face repository these weights are (a conversion of), when known: adapters
    /// trained on them name it as their base (`base_model_name_or_path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_id: Option<String>,
    /// The commit of [`ModelInfo::hub_id`] the weights came from, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_revision: Option<String>,
}

impl ModelInfo {
    /// Reads `model.json` from an artifact directory.
    pub fn load(dir: &Path) -> Result<Self> {
        Ok(crate::io::read_json(&dir.join(MODEL_JSON))?)
    }

    /// Writes `model.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        write_json(&dir.join(MODEL_JSON), self)
    }

    /// The id to pad batches with: `pad_token_id`, else the first EOS id, else 0 (padding is
    /// always masked out, so its value only has to be a valid id).
    pub fn pad_id(&self) -> u32 {
        self.pad_token_id
            .or_else(|| self.eos_token_ids.first().copied())
            .unwrap_or(0)
    }
}

/// Which weight layout an artifact directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelLayout {
    /// `model.gguf`.
    Gguf,
    /// `config.json` + `*.safetensors`.
    HfSafetensors,
    /// `config.json` + `quantized.safetensors` + `quantization.json`.
    Quantized,
}

impl ModelLayout {
    /// Detects the layout of `dir`.
    pub fn detect(dir: &Path) -> Result<Self> {
        if dir.join(GGUF_FILE).is_file() {
            Ok(Self::Gguf)
        } else if quantized::is_quantized(dir) {
            Ok(Self::Quantized)
        } else if dir.join(CONFIG_JSON).is_file() {
            Ok(Self::HfSafetensors)
        } else {
            Err(ModelArtifactError::UnknownLayout(dir.to_path_buf()))
        }
    }
}

/// The weights of an artifact as stored, with their config.
pub struct StoredModel {
    /// Every tensor by HF name (quantized ggml blocks stay quantized; an NF4 layer's `.weight`
    /// is a free zero-stride placeholder of the right shape).
    pub weights: Weights,
    /// The architecture's config.
    pub config: Box<dyn ArchConfig>,
    /// NF4 layers of the quantized layout, by module path.
    pub nf4: HashMap<String, Arc<Nf4Tensor>>,
}

/// Reads the weights of artifact `dir` as stored, with their config.
pub fn read_weights(dir: &Path, info: &ModelInfo, device: &Device) -> Result<StoredModel> {
    let load_err = |source| ModelArtifactError::Load {
        path: dir.to_path_buf(),
        source,
    };
    match ModelLayout::detect(dir)? {
        ModelLayout::Gguf => {
            let (weights, config) = info
                .architecture
                .load_gguf(&dir.join(GGUF_FILE), device)
                .map_err(load_err)?;
            Ok(StoredModel {
                weights,
                config,
                nf4: HashMap::new(),
            })
        }
        ModelLayout::HfSafetensors => {
            let files = crate::weights::safetensors_in_dir(dir).map_err(load_err)?;
            let weights = Weights::from_safetensors(&files, device).map_err(load_err)?;
            Ok(StoredModel {
                weights,
                config: read_config(dir, info.architecture)?,
                nf4: HashMap::new(),
            })
        }
        ModelLayout::Quantized => {
            let (weights, nf4) = quantized::read(dir, device)?;
            Ok(StoredModel {
                weights,
                config: read_config(dir, info.architecture)?,
                nf4,
            })
        }
    }
}

/// Reads `config.json` in `dir` as `architecture`'s config.
pub fn read_config(dir: &Path, architecture: Architecture) -> Result<Box<dyn ArchConfig>> {
    architecture
        .read_hf_config(&dir.join(CONFIG_JSON))
        .map_err(|source| ModelArtifactError::Load {
            path: dir.to_path_buf(),
            source,
        })
}

/// A model loaded from an artifact.
pub struct LoadedModel {
    /// The model (LoRA-wrapped when asked).
    pub model: DecoderModel,
    /// `model.json`.
    pub info: ModelInfo,
    /// The artifact's `tokenizer.json`.
    pub tokenizer_path: PathBuf,
}

/// What happens to quantized projections when a model is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantizedWeights {
    /// They stay quantized and are decoded inside every forward and backward (training: the
    /// point of QLoRA is that no decoded copy of the base lives in memory).
    #[default]
    KeepQuantized,
    /// They are decoded once, at load, into dense layers in the compute dtype (inference: a
    /// decoding loop would otherwise decode every weight at every new token). The decoded
    /// values are the ones a quantized layer computes with, so outputs are unchanged; the cost
    /// is a dense copy of the projections in memory.
    DecodeOnce,
    /// On the CPU in f32, projections stay as 4- or 8-bit codes and multiply through the packed
    /// kernels ([`BlockLinear`]: q4_0, q4_1, q4_K, q8_0 and NF4, f32 activations, so the
    /// outputs are the decoded weight's up to the order of additions): no dense copy, and a
    /// decoding step reads about 5 bits per weight instead of 32. Anything else (another device
    /// or dtype, rows that are not whole blocks) is decoded once, as
    /// [`QuantizedWeights::DecodeOnce`].
    BlockKernels,
}

/// What LoRA adapters a loaded model gets.
#[derive(Debug, Clone, Copy)]
pub enum Adapters<'a> {
    /// None: the base model.
    None,
    /// Fresh, trainable adapters on the modules matching the config's `target_modules`,
    /// seeded by the seed (PEFT initialisation): the start of training.
    Fresh(&'a LoraConfig, u64),
    /// The trained PEFT adapter in this directory, with its own LoRA settings, in inference
    /// mode (dropout off).
    Trained(&'a Path),
}

/// Builds every projection for a model artifact: NF4 layers from the artifact's own table,
/// ggml-quantized weights as [`QuantLinear`] (or dense, decoded once, under
/// [`QuantizedWeights::DecodeOnce`]), dense weights as frozen [`Dense`] in the compute dtype.
struct ArtifactFactory {
    nf4: HashMap<String, Arc<Nf4Tensor>>,
    mode: QuantizedWeights,
}

impl LinearFactory for ArtifactFactory {
    fn build(&mut self, parts: LinearParts) -> candle_core::Result<Box<dyn LinearLayer>> {
        let mode = self.mode;
        let device = match &parts.weight {
            StoredTensor::Dense(t) => t.device().clone(),
            StoredTensor::Quantized(q) => q.device(),
        };
        let quant = |w: QuantWeight,
                     bias: Option<Tensor>|
         -> candle_core::Result<Box<dyn LinearLayer>> {
            Ok(match mode {
                QuantizedWeights::KeepQuantized => Box::new(
                    QuantLinear::new(w, bias)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
                ),
                QuantizedWeights::BlockKernels if device.is_cpu() && parts.dtype == DType::F32 => {
                    match BlockLinear::new(&w, bias.clone()) {
                        Ok(layer) => Box::new(layer),
                        // Rows that are not whole blocks: decoded once, as below.
                        Err(_) => Box::new(Dense::new(w.dequantize(parts.dtype, &device)?, bias)?),
                    }
                }
                QuantizedWeights::DecodeOnce | QuantizedWeights::BlockKernels => {
                    Box::new(Dense::new(w.dequantize(parts.dtype, &device)?, bias)?)
                }
            })
        };
        if let Some(q) = self.nf4.get(&parts.path) {
            return quant(QuantWeight::Nf4(q.clone()), parts.bias);
        }
        match &parts.weight {
            StoredTensor::Quantized(q) => match GgmlQuantized::from_qtensor(q.clone()) {
                Ok(g) => quant(QuantWeight::Ggml(g), parts.bias),
                // Formats QuantLinear does not cover (e.g. Q6K in some GGUF files) run dense.
                Err(_) => Ok(Box::new(Dense::new(
                    parts.weight.to_dense(parts.dtype)?,
                    parts.bias,
                )?)),
            },
            StoredTensor::Dense(t) => {
                Ok(Box::new(Dense::new(t.to_dtype(parts.dtype)?, parts.bias)?))
            }
        }
    }
}

/// Loads the model in artifact `dir` onto `device`, computing in `dtype`, with `adapters`, its
/// quantized projections handled as `mode` says.
pub fn load_model(
    dir: &Path,
    device: &Device,
    dtype: DType,
    adapters: Adapters<'_>,
    mode: QuantizedWeights,
) -> Result<LoadedModel> {
    let info = ModelInfo::load(dir)?;
    let StoredModel {
        weights,
        config,
        nf4,
    } = read_weights(dir, &info, device)?;
    let base = ArtifactFactory { nf4, mode };
    let trained_config;
    let lora = match adapters {
        Adapters::None => None,
        Adapters::Fresh(config, seed) => Some((config, seed)),
        Adapters::Trained(peft_dir) => {
            trained_config = crate::peft::lora_config_of(peft_dir).map_err(|source| {
                ModelArtifactError::Adapter {
                    path: peft_dir.to_path_buf(),
                    source,
                }
            })?;
            Some((&trained_config, 0))
        }
    };
    let load_err = |source| ModelArtifactError::Load {
        path: dir.to_path_buf(),
        source,
    };
    let model = match lora {
        Some((config_lora, seed)) => {
            let mut factory = LoraFactory::new(base, config_lora.clone(), seed);
            config
                .build(&weights, dtype, &mut factory)
                .map_err(load_err)?
        }
        None => {
            let mut factory = base;
            config
                .build(&weights, dtype, &mut factory)
                .map_err(load_err)?
        }
    };
    if let Adapters::Trained(peft_dir) = adapters {
        apply_adapter(&model, peft_dir)?;
        model.set_training(false);
    }
    Ok(LoadedModel {
        model,
        info,
        tokenizer_path: dir.join(TOKENIZER_JSON),
    })
}

/// Loads the model in `dir` for scoring (likelihoods: long sequences at once): with the trained
/// PEFT adapter in `adapter_dir` applied if given (adapter layers kept unmerged, dropout off),
/// quantized projections decoded once at load ([`QuantizedWeights::DecodeOnce`]: the same
/// numbers as decoding them inside every step; a whole sequence at a time is compute-bound,
/// where a dense f32 product is fastest), frozen (no backward graph is recorded).
pub fn load_for_inference(
    dir: &Path,
    adapter_dir: Option<&Path>,
    device: &Device,
    dtype: DType,
) -> Result<LoadedModel> {
    load_frozen(
        dir,
        adapter_dir,
        device,
        dtype,
        QuantizedWeights::DecodeOnce,
    )
}

/// Loads the model in `dir` for generation (token by token), as [`load_for_inference`] does
/// except that on the CPU in f32 quantized projections stay packed and multiply through the
/// packed kernels ([`QuantizedWeights::BlockKernels`]): a decoding step is bound by reading the
/// weights, and reads about 5 bits per weight instead of 32. The outputs are the decoded
/// weights' up to the order of additions.
pub fn load_for_generation(
    dir: &Path,
    adapter_dir: Option<&Path>,
    device: &Device,
    dtype: DType,
) -> Result<LoadedModel> {
    load_frozen(
        dir,
        adapter_dir,
        device,
        dtype,
        QuantizedWeights::BlockKernels,
    )
}

fn load_frozen(
    dir: &Path,
    adapter_dir: Option<&Path>,
    device: &Device,
    dtype: DType,
    weights: QuantizedWeights,
) -> Result<LoadedModel> {
    let adapters = match adapter_dir {
        None => Adapters::None,
        Some(peft_dir) => Adapters::Trained(peft_dir),
    };
    let loaded = load_model(dir, device, dtype, adapters, weights)?;
    loaded.model.freeze();
    Ok(loaded)
}

/// Loads `peft_dir`'s adapter weights into `model`'s LoRA variables. The model must have been
/// loaded with the adapter's LoRA settings (see [`crate::peft::lora_config_of`]).
pub fn apply_adapter(model: &DecoderModel, peft_dir: &Path) -> Result<()> {
    use crate::CausalLm;
    let err = |source| ModelArtifactError::Adapter {
        path: peft_dir.to_path_buf(),
        source,
    };
    let adapter = PeftAdapter::load(peft_dir, model.device()).map_err(err)?;
    adapter.assign_to(&model.trainable_vars()).map_err(err)
}

/// Copies `src` to `dst`, hard-linking when `allow_link` (artifacts are immutable, so a link
/// is as good as a copy and free).
pub fn link_or_copy(src: &Path, dst: &Path, allow_link: bool) -> Result<()> {
    if allow_link && std::fs::hard_link(src, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dst)
        .map(|_| ())
        .map_err(io_err("copy", src))
}
