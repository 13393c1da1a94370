//! candle's ggml block formats (the ones llama.cpp / GGUF files use) behind the same small API
//! as NF4, so stages can compare formats on the same weights.

use super::QuantError;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// The ggml formats supported for base weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GgmlFormat {
    /// 4-bit, blocks of 32 with an f16 scale (symmetric).
    Q4_0,
    /// 4-bit, blocks of 32 with an f16 scale and f16 minimum (asymmetric).
    Q4_1,
    /// 8-bit, blocks of 32 with an f16 scale.
    Q8_0,
    /// 4-bit k-quant, super-blocks of 256 with 6-bit sub-block scales and minimums.
    Q4K,
}

impl GgmlFormat {
    /// candle's dtype for this format.
    pub fn ggml_dtype(self) -> GgmlDType {
        match self {
            GgmlFormat::Q4_0 => GgmlDType::Q4_0,
            GgmlFormat::Q4_1 => GgmlDType::Q4_1,
            GgmlFormat::Q8_0 => GgmlDType::Q8_0,
            GgmlFormat::Q4K => GgmlDType::Q4K,
        }
    }

    /// Values per block: the last dimension must be a multiple of this.
    pub fn block_size(self) -> usize {
        self.ggml_dtype().block_size()
    }

    /// Name as llama.cpp spells it.
    pub fn name(self) -> &'static str {
        match self {
            GgmlFormat::Q4_0 => "q4_0",
            GgmlFormat::Q4_1 => "q4_1",
            GgmlFormat::Q8_0 => "q8_0",
            GgmlFormat::Q4K => "q4k",
        }
    }
}

impl std::str::FromStr for GgmlFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "q4_0" => Ok(Self::Q4_0),
            "q4_1" => Ok(Self::Q4_1),
            "q8_0" => Ok(Self::Q8_0),
            "q4k" | "q4_k" => Ok(Self::Q4K),
            other => Err(format!(
                "unknown ggml format `{other}`; use q4_0, q4_1, q8_0 or q4k"
            )),
        }
    }
}

/// A tensor quantized to a ggml block format (shared, cheap to clone).
#[derive(Debug, Clone)]
pub struct GgmlQuantized {
    format: GgmlFormat,
    inner: Arc<QTensor>,
}

impl GgmlQuantized {
    /// Quantizes `t` (any float dtype) to `format`; the blocks live on `t`'s device.
    pub fn quantize(t: &Tensor, format: GgmlFormat) -> Result<Self, QuantError> {
        let block = format.block_size();
        let last = t.dims().last().copied().unwrap_or(0);
        if t.elem_count() == 0 || last % block != 0 {
            return Err(QuantError::Unsupported {
                shape: t.dims().to_vec(),
                format: format.name().into(),
                reason: format!(
                    "the last dimension ({last}) must be a non-zero multiple of the block size \
                     {block}; pick a format with smaller blocks or keep this tensor dense"
                ),
            });
        }
        let src = t.to_dtype(DType::F32)?.contiguous()?;
        let inner = QTensor::quantize(&src, format.ggml_dtype())?;
        Ok(Self {
            format,
            inner: Arc::new(inner),
        })
    }

    /// Wraps an already quantized tensor (e.g. read from a GGUF file). Only the formats of
    /// [`GgmlFormat`] are accepted.
    pub fn from_qtensor(q: Arc<QTensor>) -> Result<Self, QuantError> {
        let format = match q.dtype() {
            GgmlDType::Q4_0 => GgmlFormat::Q4_0,
            GgmlDType::Q4_1 => GgmlFormat::Q4_1,
            GgmlDType::Q8_0 => GgmlFormat::Q8_0,
            GgmlDType::Q4K => GgmlFormat::Q4K,
            other => {
                return Err(QuantError::Unsupported {
                    shape: q.shape().dims().to_vec(),
                    format: format!("{other:?}"),
                    reason: "only q4_0, q4_1, q8_0 and q4k are supported; dequantize it instead"
                        .into(),
                })
            }
        };
        Ok(Self { format, inner: q })
    }

    /// Decodes to a tensor of `dtype` on `device`.
    pub fn dequantize(&self, dtype: DType, device: &Device) -> Result<Tensor, QuantError> {
        Ok(self.inner.dequantize(device)?.to_dtype(dtype)?)
    }

    /// The block format.
    pub fn format(&self) -> GgmlFormat {
        self.format
    }

    /// Logical shape.
    pub fn shape(&self) -> &[usize] {
        self.inner.shape().dims()
    }

    /// The underlying candle tensor.
    pub fn qtensor(&self) -> &Arc<QTensor> {
        &self.inner
    }

    /// Bytes used by the blocks.
    pub fn size_bytes(&self) -> usize {
        self.inner.storage_size_in_bytes()
    }
}

/// Quantizes `t` to `format`.
pub fn quantize(t: &Tensor, format: GgmlFormat) -> Result<GgmlQuantized, QuantError> {
    GgmlQuantized::quantize(t, format)
}

/// Decodes `q` to `dtype` on `device`.
pub fn dequantize(q: &GgmlQuantized, dtype: DType, device: &Device) -> Result<Tensor, QuantError> {
    q.dequantize(dtype, device)
}
