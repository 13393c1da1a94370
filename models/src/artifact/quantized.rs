//! The quantized layout of a model artifact, read and written here together:
//! `config.json` + `quantized.safetensors` + `quantization.json`.
//!
//! Quantized projections are stored as NF4 parts (`<module>.weight.nf4_*`, see
//! [`Nf4Tensor::to_tensors`]) or as raw ggml blocks (`<module>.weight.ggml_data` u8 +
//! `<module>.weight.ggml_shape` u32, the format named in `quantization.json`); every other
//! tensor is stored dense under its Hugging Face name. `quantization.json`
//! ([`QuantizationReport`]) lists every quantized module with its format and how far its
//! dequantized weight is from the original.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{io_err, write_json, ModelArtifactError, CONFIG_JSON};
use crate::quant::{
    nf4, reconstruction_error, GgmlFormat, GgmlQuantized, Nf4Tensor, ReconstructionError,
};
use crate::weights::{StoredTensor, Weights};

type Result<T> = std::result::Result<T, ModelArtifactError>;

/// The weights of the quantized layout.
pub const QUANTIZED_FILE: &str = "quantized.safetensors";
/// The quantization report and format description of the quantized layout.
pub const QUANTIZATION_JSON: &str = "quantization.json";
/// Suffix of the raw ggml block bytes of a quantized weight.
pub const GGML_DATA_SUFFIX: &str = "ggml_data";
/// Suffix of the logical shape (u32) of a ggml-quantized weight.
pub const GGML_SHAPE_SUFFIX: &str = "ggml_shape";

/// Whether `dir` holds the quantized layout.
pub fn is_quantized(dir: &Path) -> bool {
    dir.join(QUANTIZED_FILE).is_file() && dir.join(QUANTIZATION_JSON).is_file()
}

/// A storage format of quantized projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum QuantFormat {
    /// 4-bit NormalFloat, blocks of 64 (QLoRA).
    Nf4,
    /// ggml q4_0 (blocks of 32).
    Q4_0,
    /// ggml q4_1 (blocks of 32).
    Q4_1,
    /// ggml q8_0 (blocks of 32).
    Q8_0,
    /// ggml q4k (super-blocks of 256).
    Q4k,
}

impl QuantFormat {
    /// The ggml format, or `None` for NF4.
    pub fn ggml(self) -> Option<GgmlFormat> {
        match self {
            Self::Nf4 => None,
            Self::Q4_0 => Some(GgmlFormat::Q4_0),
            Self::Q4_1 => Some(GgmlFormat::Q4_1),
            Self::Q8_0 => Some(GgmlFormat::Q8_0),
            Self::Q4k => Some(GgmlFormat::Q4K),
        }
    }

    /// Its name in `quantization.json` (`nf4`, `q4_0`, ...).
    pub fn name(self) -> &'static str {
        self.ggml().map_or("nf4", GgmlFormat::name)
    }

    /// Values per quantization block.
    pub fn block_size(self) -> usize {
        self.ggml().map_or(nf4::BLOCK_SIZE, GgmlFormat::block_size)
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
    pub error: ReconstructionError,
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

/// Writes a model in the quantized layout: [`QuantizedWriter::quantize`] each chosen
/// projection, [`QuantizedWriter::keep_dense`] every other tensor, then
/// [`QuantizedWriter::finish`].
pub struct QuantizedWriter {
    format: QuantFormat,
    double_quant: bool,
    tensors: HashMap<String, Tensor>,
    layers: Vec<QuantizedLayer>,
    dense_bytes: u64,
}

impl QuantizedWriter {
    /// A writer storing projections in `format` (`double_quant` applies to NF4 only).
    pub fn new(format: QuantFormat, double_quant: bool) -> Self {
        Self {
            format,
            double_quant: format == QuantFormat::Nf4 && double_quant,
            tensors: HashMap::new(),
            layers: Vec::new(),
            dense_bytes: 0,
        }
    }

    /// Quantizes the weight of projection `module` (stored as `<module>.weight`, dense or
    /// ggml-quantized: a quantized one is dequantized first, so the error is measured against
    /// its stored values) and returns its report line.
    pub fn quantize(&mut self, module: &str, stored: &StoredTensor) -> Result<&QuantizedLayer> {
        let name = format!("{module}.weight");
        let cpu = Device::Cpu;
        let original_bytes = stored_bytes(stored);
        let w = stored.to_dense(DType::F32)?;
        let refuse = |e: crate::quant::QuantError| match e {
            crate::quant::QuantError::Candle(e) => ModelArtifactError::Candle(e),
            e => ModelArtifactError::Quantize {
                tensor: name.clone(),
                message: e.to_string(),
            },
        };
        let (dequantized, quantized_bytes) = match self.format.ggml() {
            None => {
                let q = Nf4Tensor::quantize(&w, self.double_quant).map_err(refuse)?;
                self.tensors.extend(q.to_tensors(&name).map_err(refuse)?);
                (
                    q.dequantize(DType::F32, &cpu).map_err(refuse)?,
                    q.size_bytes(),
                )
            }
            Some(format) => {
                let q = GgmlQuantized::quantize(&w, format).map_err(refuse)?;
                let data = q.qtensor().data()?.into_owned();
                let shape: Vec<u32> = q.shape().iter().map(|&d| d as u32).collect();
                self.tensors.insert(
                    format!("{name}.{GGML_DATA_SUFFIX}"),
                    Tensor::new(data.as_slice(), &cpu)?,
                );
                self.tensors.insert(
                    format!("{name}.{GGML_SHAPE_SUFFIX}"),
                    Tensor::new(shape.as_slice(), &cpu)?,
                );
                (
                    q.dequantize(DType::F32, &cpu).map_err(refuse)?,
                    q.size_bytes(),
                )
            }
        };
        let error = reconstruction_error(&w, &dequantized)?;
        self.layers.push(QuantizedLayer {
            module: module.to_string(),
            shape: w.dims().to_vec(),
            format: self.format.name().into(),
            original_bytes,
            quantized_bytes: quantized_bytes as u64,
            error,
        });
        let last = self.layers.len() - 1;
        Ok(&self.layers[last])
    }

    /// Keeps tensor `name` dense, in its stored dtype (a ggml-quantized one is dequantized to
    /// f32).
    pub fn keep_dense(&mut self, name: &str, stored: &StoredTensor) -> Result<()> {
        let t = match stored {
            StoredTensor::Dense(t) => t.clone(),
            StoredTensor::Quantized(_) => stored.to_dense(DType::F32)?,
        };
        self.dense_bytes += (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        self.tensors.insert(name.to_string(), t);
        Ok(())
    }

    /// Writes `quantized.safetensors`, `config.json` (`config_json`, the text of the Hugging
    /// Face config of the model) and `quantization.json` into `dir` and returns the report.
    pub fn finish(self, dir: &Path, config_json: &str) -> Result<QuantizationReport> {
        let weights = dir.join(QUANTIZED_FILE);
        candle_core::safetensors::save(&self.tensors, &weights)?;
        std::fs::write(dir.join(CONFIG_JSON), config_json)
            .map_err(io_err("write", &dir.join(CONFIG_JSON)))?;
        let relative: Vec<f64> = self.layers.iter().map(|l| l.error.relative).collect();
        let report = QuantizationReport {
            format: self.format.name().into(),
            double_quant: self.double_quant,
            block_size: self.format.block_size(),
            original_bytes: self.layers.iter().map(|l| l.original_bytes).sum(),
            quantized_bytes: self.layers.iter().map(|l| l.quantized_bytes).sum(),
            dense_bytes: self.dense_bytes,
            max_relative_error: relative.iter().copied().fold(0.0, f64::max),
            mean_relative_error: relative.iter().sum::<f64>() / relative.len().max(1) as f64,
            layers: self.layers,
        };
        write_json(&dir.join(QUANTIZATION_JSON), &report)?;
        Ok(report)
    }
}

/// Bytes a stored tensor takes (quantized: its blocks).
fn stored_bytes(t: &StoredTensor) -> u64 {
    match t {
        StoredTensor::Dense(t) => (t.elem_count() * t.dtype().size_in_bytes()) as u64,
        StoredTensor::Quantized(q) => q.storage_size_in_bytes() as u64,
    }
}

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
pub fn read(dir: &Path, device: &Device) -> Result<(Weights, HashMap<String, Arc<Nf4Tensor>>)> {
    let report: QuantizationReport = crate::io::read_json(&dir.join(QUANTIZATION_JSON))?;
    let path = dir.join(QUANTIZED_FILE);
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let corrupt = |message: String| ModelArtifactError::Corrupt {
        path: dir.to_path_buf(),
        message,
    };
    let mut stored: HashMap<String, StoredTensor> = HashMap::new();
    let mut nf4 = HashMap::new();
    let mut seen = HashSet::new();
    for layer in &report.layers {
        if !seen.insert(layer.module.as_str()) {
            return Err(corrupt(format!("`{}` is listed twice", layer.module)));
        }
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
            let storage = QStorage::from_data(Cow::Owned(bytes), device, dtype)?;
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
