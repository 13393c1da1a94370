//! The `model` artifact: its layout, and THE loader every kind that needs a model uses.
//!
//! A `model` artifact is a directory holding exactly one of three weight layouts:
//!
//! * **GGUF**: `model.gguf` (llama.cpp, Llama architecture). Quantized projections stay in
//!   their ggml block format and run as [`QuantLinear`] over [`QuantWeight::Ggml`].
//! * **HF safetensors**: `config.json` + `*.safetensors` (Hugging Face checkpoint, dense).
//! * **Quantized**: `config.json` + `quantized.safetensors` + `quantization.json`, written by
//!   the `quantize` kind. Quantized projections are stored as NF4 parts
//!   (`<module>.weight.nf4_*`, see [`Nf4Tensor::to_tensors`]) or as raw ggml blocks
//!   (`<module>.weight.ggml_data` u8 + `<module>.weight.ggml_shape` u32, format in
//!   `quantization.json`); every other tensor is stored dense under its HF name.
//!
//! Beside the weights there is always `tokenizer.json` (a Hugging Face tokenizers file; for
//! GGUF it is rebuilt from the file's metadata), usually `tokenizer_config.json` (naming the
//! EOS/BOS tokens so that [`TextTokenizer::load`](crate::tokenize::TextTokenizer::load) finds
//! them), and `model.json` ([`ModelInfo`]).
//!
//! Use [`load_model`] to build a [`DecoderModel`] from an artifact (optionally LoRA-wrapped),
//! [`apply_adapter`] to load a trained PEFT adapter into it, or
//! [`load_model_with_adapter`] to do both with the adapter's own LoRA settings.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use miette::Diagnostic;
use pipeline_models::arch::{
    DecoderModel, LinearFactory, LinearParts, Llama, LlamaConfig, LoraFactory, Phi, PhiConfig,
};
use pipeline_models::layers::Dense;
use pipeline_models::peft::{PeftAdapter, PeftConfig};
use pipeline_models::quant::{GgmlFormat, GgmlQuantized, Nf4Tensor, QuantLinear, QuantWeight};
use pipeline_models::weights::{StoredTensor, Weights};
use pipeline_models::{LinearLayer, LoraConfig};
use serde::{Deserialize, Serialize};

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
/// The weights of the quantized layout.
pub const QUANTIZED_FILE: &str = "quantized.safetensors";
/// The quantization report and format description of the quantized layout.
pub const QUANTIZATION_JSON: &str = "quantization.json";

/// Errors reading or building a model artifact, each saying what to do.
#[derive(Debug, thiserror::Error, Diagnostic)]
pub enum ModelArtifactError {
    /// A file could not be read or written.
    #[error("cannot {action} `{path}`: {source}")]
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
    #[error("invalid JSON in `{path}`: {message}")]
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
    #[error("`{0}` is not a model artifact: it has neither `model.gguf`, nor `config.json` with `*.safetensors`, nor `quantized.safetensors`")]
    #[diagnostic(help("connect the output of a `model` or `quantize` stage"))]
    UnknownLayout(PathBuf),
    /// The architecture is not supported.
    #[error("unsupported architecture `{0}`")]
    #[diagnostic(help(
        "supported architectures are `llama` (LlamaForCausalLM) and `phi` (PhiForCausalLM)"
    ))]
    Architecture(String),
    /// Weights could not be loaded into the architecture.
    #[error("cannot load the model in `{path}`: {source}")]
    Load {
        /// The artifact directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: pipeline_models::weights::LoadError,
    },
    /// Quantized storage is inconsistent.
    #[error("corrupt quantized model in `{path}`: {message}")]
    #[diagnostic(help("rerun the `quantize` stage that produced it"))]
    Corrupt {
        /// The artifact directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A PEFT adapter does not fit the model or cannot be read.
    #[error("cannot apply the adapter in `{path}`: {source}")]
    #[diagnostic(help("the adapter must come from a `lora-train` stage on the same base model"))]
    Adapter {
        /// The adapter directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: pipeline_models::peft::PeftError,
    },
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, ModelArtifactError>;

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ModelArtifactError {
    let path = path.to_path_buf();
    move |source| ModelArtifactError::Io {
        action,
        path,
        source,
    }
}

/// The decoder architectures a model artifact can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// `LlamaForCausalLM` (SmolLM2, Llama).
    Llama,
    /// `PhiForCausalLM` (phi-1, phi-1.5, phi-2).
    Phi,
}

impl Architecture {
    /// Reads the architecture of a Hugging Face `config.json` (`model_type`, else
    /// `architectures[0]`).
    pub fn from_hf_config(path: &Path) -> Result<Self> {
        let v: serde_json::Value = read_json(path)?;
        let model_type = v.get("model_type").and_then(|t| t.as_str());
        let arch0 = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str());
        match (model_type, arch0) {
            (Some("llama"), _) | (None, Some("LlamaForCausalLM")) => Ok(Self::Llama),
            (Some("phi"), _) | (None, Some("PhiForCausalLM")) => Ok(Self::Phi),
            (Some(other), _) | (None, Some(other)) => {
                Err(ModelArtifactError::Architecture(other.into()))
            }
            (None, None) => Err(ModelArtifactError::Json {
                path: path.to_path_buf(),
                message: "neither `model_type` nor `architectures` is set".into(),
            }),
        }
    }

    /// The module names of every linear projection except the LM head (QLoRA's "all linear
    /// layers"), as PEFT `target_modules` entries.
    pub fn linear_module_names(self) -> &'static [&'static str] {
        match self {
            Self::Llama => &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            Self::Phi => &["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
        }
    }
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
}

impl ModelInfo {
    /// Reads `model.json` from an artifact directory.
    pub fn load(dir: &Path) -> Result<Self> {
        read_json(&dir.join(MODEL_JSON))
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
        } else if dir.join(QUANTIZED_FILE).is_file() && dir.join(QUANTIZATION_JSON).is_file() {
            Ok(Self::Quantized)
        } else if dir.join(CONFIG_JSON).is_file() {
            Ok(Self::HfSafetensors)
        } else {
            Err(ModelArtifactError::UnknownLayout(dir.to_path_buf()))
        }
    }
}

/// How one module of a quantized artifact is stored (an entry of `quantization.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizedLayer {
    /// HF module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    /// Weight shape `[out, in]`.
    pub shape: Vec<usize>,
    /// Storage format of this layer: `nf4`, `q4_0`, `q4_1`, `q8_0` or `q4k`.
    pub format: String,
    /// Bytes of the original weight in its stored dtype.
    pub original_bytes: u64,
    /// Bytes of the quantized storage (codes plus scales).
    pub quantized_bytes: u64,
    /// Reconstruction error of the dequantized weight against the original.
    pub error: pipeline_models::quant::ReconstructionError,
}

/// `quantization.json`: the format and the per-layer report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizationReport {
    /// The format asked for (`nf4`, `q4_0`, ...).
    pub format: String,
    /// NF4 double quantization of the block scales.
    pub double_quant: bool,
    /// Values per quantization block.
    pub block_size: usize,
    /// Every quantized module.
    pub layers: Vec<QuantizedLayer>,
    /// Sum of `original_bytes` over quantized layers.
    pub original_bytes: u64,
    /// Sum of `quantized_bytes`.
    pub quantized_bytes: u64,
    /// Bytes of the tensors kept dense (embeddings, norms, unquantized layers).
    pub dense_bytes: u64,
    /// Largest per-layer relative error.
    pub max_relative_error: f64,
    /// Mean per-layer relative error.
    pub mean_relative_error: f64,
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
        let quant =
            |w: QuantWeight, bias: Option<Tensor>| -> candle_core::Result<Box<dyn LinearLayer>> {
                Ok(match mode {
                    QuantizedWeights::KeepQuantized => Box::new(
                        QuantLinear::new(w, bias)
                            .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
                    ),
                    QuantizedWeights::DecodeOnce => {
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

/// Loads the model in artifact `dir` onto `device`, computing in `dtype`. With `lora`, the
/// modules matching its `target_modules` are wrapped in fresh LoRA adapters seeded by the
/// given seed (trainable; PEFT initialisation). Quantized projections stay quantized (see
/// [`load_model_as`]).
pub fn load_model(
    dir: &Path,
    device: &Device,
    dtype: DType,
    lora: Option<(&LoraConfig, u64)>,
) -> Result<LoadedModel> {
    load_model_as(dir, device, dtype, lora, QuantizedWeights::KeepQuantized)
}

/// [`load_model`], choosing what happens to quantized projections.
pub fn load_model_as(
    dir: &Path,
    device: &Device,
    dtype: DType,
    lora: Option<(&LoraConfig, u64)>,
    mode: QuantizedWeights,
) -> Result<LoadedModel> {
    let info = ModelInfo::load(dir)?;
    let tokenizer_path = dir.join(TOKENIZER_JSON);
    let load_err = |source| ModelArtifactError::Load {
        path: dir.to_path_buf(),
        source,
    };
    let (weights, config) = match ModelLayout::detect(dir)? {
        ModelLayout::Gguf => {
            let (weights, meta) =
                pipeline_models::weights::load_gguf_llama(&dir.join(GGUF_FILE), device)
                    .map_err(load_err)?;
            (
                weights,
                ArchConfig::Llama(LlamaConfig::from_gguf_meta(&meta)),
            )
        }
        ModelLayout::HfSafetensors => {
            let files = pipeline_models::weights::safetensors_in_dir(dir).map_err(load_err)?;
            let weights = Weights::from_safetensors(&files, device).map_err(load_err)?;
            (weights, ArchConfig::read(dir, info.architecture)?)
        }
        ModelLayout::Quantized => {
            let (weights, nf4) = read_quantized(dir, device)?;
            let config = ArchConfig::read(dir, info.architecture)?;
            let factory = ArtifactFactory { nf4, mode };
            return build(dir, config, &weights, dtype, factory, lora).map(|model| LoadedModel {
                model,
                info,
                tokenizer_path,
            });
        }
    };
    let factory = ArtifactFactory {
        nf4: HashMap::new(),
        mode,
    };
    let model = build(dir, config, &weights, dtype, factory, lora)?;
    Ok(LoadedModel {
        model,
        info,
        tokenizer_path,
    })
}

/// Loads `peft_dir`'s adapter weights into `model`'s LoRA variables. The model must have been
/// loaded with the adapter's LoRA settings (see [`adapter_lora_config`]).
pub fn apply_adapter(model: &DecoderModel, peft_dir: &Path) -> Result<()> {
    use pipeline_models::CausalLm;
    let err = |source| ModelArtifactError::Adapter {
        path: peft_dir.to_path_buf(),
        source,
    };
    let adapter = PeftAdapter::load(peft_dir, model.device()).map_err(err)?;
    adapter.assign_to(&model.trainable_vars()).map_err(err)
}

/// The LoRA settings a PEFT adapter directory was trained with. Adapter variants whose
/// forward differs from plain LoRA (rsLoRA scaling, DoRA, regex `target_modules`) are refused.
pub fn adapter_lora_config(peft_dir: &Path) -> Result<LoraConfig> {
    let path = peft_dir.join("adapter_config.json");
    let refuse = |message: String| ModelArtifactError::Json {
        path: path.clone(),
        message,
    };
    let raw: serde_json::Value = read_json(&path)?;
    if let Some(t) = raw.get("peft_type").and_then(|t| t.as_str()) {
        if t != "LORA" {
            return Err(refuse(format!(
                "peft_type is {t:?}; only LORA adapters are supported"
            )));
        }
    }
    if let Some(serde_json::Value::String(s)) = raw.get("target_modules") {
        return Err(refuse(format!("`target_modules` is the regular expression {s:?}; only a list of module names is supported")));
    }
    if raw.get("use_dora").and_then(|b| b.as_bool()) == Some(true) {
        return Err(refuse("use_dora adapters are not supported".into()));
    }
    let cfg: PeftConfig = serde_json::from_value(raw).map_err(|e| refuse(e.to_string()))?;
    if cfg.use_rslora {
        return Err(refuse(
            "use_rslora adapters are not supported (their scaling is alpha/sqrt(r))".into(),
        ));
    }
    let target_modules = cfg.target_modules.unwrap_or_default();
    if target_modules.is_empty() {
        return Err(refuse("`target_modules` is missing or empty".into()));
    }
    Ok(LoraConfig {
        r: cfg.r,
        alpha: cfg.lora_alpha,
        dropout: cfg.lora_dropout,
        target_modules,
    })
}

/// Loads the model in `dir` with the adapter in `peft_dir` applied, in inference mode
/// (dropout off), quantized projections handled as `mode` says. The convenience the `generate`
/// kind needs.
pub fn load_model_with_adapter(
    dir: &Path,
    device: &Device,
    dtype: DType,
    peft_dir: &Path,
    mode: QuantizedWeights,
) -> Result<LoadedModel> {
    let lora = adapter_lora_config(peft_dir)?;
    let loaded = load_model_as(dir, device, dtype, Some((&lora, 0)), mode)?;
    apply_adapter(&loaded.model, peft_dir)?;
    loaded.model.set_training(false);
    Ok(loaded)
}

/// A parsed architecture config.
#[derive(Debug, Clone)]
pub enum ArchConfig {
    /// Llama.
    Llama(LlamaConfig),
    /// Phi.
    Phi(PhiConfig),
}

impl ArchConfig {
    /// Reads `config.json` in `dir` as `arch`.
    pub fn read(dir: &Path, arch: Architecture) -> Result<Self> {
        let path = dir.join(CONFIG_JSON);
        let err = |source| ModelArtifactError::Load {
            path: dir.to_path_buf(),
            source,
        };
        Ok(match arch {
            Architecture::Llama => Self::Llama(LlamaConfig::from_json_file(&path).map_err(err)?),
            Architecture::Phi => Self::Phi(PhiConfig::from_json_file(&path).map_err(err)?),
        })
    }

    /// Every tensor of a checkpoint with this config, with its shape (HF names).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            Self::Llama(c) => c.tensor_shapes(),
            Self::Phi(c) => c.tensor_shapes(),
        }
    }

    /// The HF module paths of the linear projections whose weight is stored under their own
    /// name (`<module>.weight`), including an untied `lm_head`.
    pub fn linear_modules(&self) -> Vec<String> {
        self.tensor_shapes()
            .into_iter()
            .filter(|(name, shape)| shape.len() == 2 && name != "model.embed_tokens.weight")
            .filter_map(|(name, _)| name.strip_suffix(".weight").map(str::to_string))
            .collect()
    }
}

fn build(
    dir: &Path,
    config: ArchConfig,
    weights: &Weights,
    dtype: DType,
    base: ArtifactFactory,
    lora: Option<(&LoraConfig, u64)>,
) -> Result<DecoderModel> {
    let load_err = |source| ModelArtifactError::Load {
        path: dir.to_path_buf(),
        source,
    };
    let mut plain;
    let mut wrapped;
    let factory: &mut dyn LinearFactory = match lora {
        Some((cfg, seed)) => {
            wrapped = LoraFactory::new(base, cfg.clone(), seed);
            &mut wrapped
        }
        None => {
            plain = base;
            &mut plain
        }
    };
    Ok(match config {
        ArchConfig::Llama(c) => {
            DecoderModel::Llama(Llama::new(&c, weights, dtype, factory).map_err(load_err)?)
        }
        ArchConfig::Phi(c) => {
            DecoderModel::Phi(Phi::new(&c, weights, dtype, factory).map_err(load_err)?)
        }
    })
}

/// Suffix of the raw ggml block bytes of a quantized weight.
pub const GGML_DATA_SUFFIX: &str = "ggml_data";
/// Suffix of the logical shape (u32) of a ggml-quantized weight.
pub const GGML_SHAPE_SUFFIX: &str = "ggml_shape";

/// The ggml dtype of a format name of `quantization.json`.
pub fn ggml_dtype_of(format: &str) -> Option<GgmlDType> {
    format
        .parse::<GgmlFormat>()
        .ok()
        .map(GgmlFormat::ggml_dtype)
}

/// Reads the quantized layout: dense tensors and ggml blocks as [`Weights`], NF4 layers as a
/// table by module path (their `.weight` entry in `Weights` is a free zero-stride placeholder
/// of the right shape, since the architecture checks shapes before calling the factory).
fn read_quantized(
    dir: &Path,
    device: &Device,
) -> Result<(Weights, HashMap<String, Arc<Nf4Tensor>>)> {
    let report: QuantizationReport = read_json(&dir.join(QUANTIZATION_JSON))?;
    let path = dir.join(QUANTIZED_FILE);
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let corrupt = |message: String| ModelArtifactError::Corrupt {
        path: dir.to_path_buf(),
        message,
    };
    let mut stored: HashMap<String, StoredTensor> = HashMap::new();
    let mut nf4 = HashMap::new();
    for layer in &report.layers {
        let prefix = format!("{}.weight", layer.module);
        let placeholder =
            Tensor::zeros((), DType::F32, device)?.broadcast_as(layer.shape.as_slice())?;
        if layer.format == "nf4" {
            let q =
                Nf4Tensor::from_tensors(&tensors, &prefix).map_err(|e| corrupt(e.to_string()))?;
            if q.shape() != layer.shape.as_slice() {
                return Err(corrupt(format!(
                    "`{prefix}` has shape {:?}, the report says {:?}",
                    q.shape(),
                    layer.shape
                )));
            }
            tensors.retain(|k, _| !k.starts_with(&format!("{prefix}.nf4_")));
            nf4.insert(layer.module.clone(), Arc::new(q));
            stored.insert(prefix, StoredTensor::Dense(placeholder));
        } else {
            let dtype = ggml_dtype_of(&layer.format).ok_or_else(|| {
                corrupt(format!(
                    "unknown format `{}` for `{}`",
                    layer.format, layer.module
                ))
            })?;
            let data = tensors
                .remove(&format!("{prefix}.{GGML_DATA_SUFFIX}"))
                .ok_or_else(|| corrupt(format!("`{prefix}.{GGML_DATA_SUFFIX}` is missing")))?;
            tensors.remove(&format!("{prefix}.{GGML_SHAPE_SUFFIX}"));
            let bytes = data.flatten_all()?.to_vec1::<u8>()?;
            let (rows, cols) = match layer.shape.as_slice() {
                [r, c] => (*r, *c),
                other => return Err(corrupt(format!("`{prefix}` has non-2-D shape {other:?}"))),
            };
            let want = rows * cols / dtype.block_size() * dtype.type_size();
            if bytes.len() != want || cols % dtype.block_size() != 0 {
                return Err(corrupt(format!(
                    "`{prefix}` has {} bytes, {rows}x{cols} {dtype:?} needs {want}",
                    bytes.len()
                )));
            }
            let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), device, dtype)?;
            stored.insert(
                prefix,
                StoredTensor::Quantized(Arc::new(QTensor::new(storage, (rows, cols))?)),
            );
        }
    }
    for (name, t) in tensors {
        stored.insert(name, StoredTensor::Dense(t.to_device(device)?));
    }
    Ok((Weights::from_stored(stored, device), nf4))
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(io_err("read", path))?;
    serde_json::from_str(&text).map_err(|e| ModelArtifactError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| ModelArtifactError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    std::fs::write(path, text + "\n").map_err(io_err("write", path))
}

/// Copies `src` to `dst`, hard-linking when possible (store artifacts are immutable, so a link
/// is as good as a copy and free).
pub(crate) fn link_or_copy(src: &Path, dst: &Path, allow_link: bool) -> Result<()> {
    if allow_link && std::fs::hard_link(src, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dst)
        .map(|_| ())
        .map_err(io_err("copy", src))
}
