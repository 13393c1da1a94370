//! A frozen linear layer over a quantized weight, usable under LoRA training.
//!
//! The product goes through [`frozen_matmul`]: forward dequantizes the weight to the input's
//! dtype and device, multiplies, and drops the dequantized copy at once; backward dequantizes
//! again and returns only the input gradient (`grad_y · W`), recording nothing for the frozen
//! weight (candle's `QMatMul` records no backward at all). No dequantized weight lives between
//! forward and backward, only the quantized blocks, shared through an `Arc`.

use super::{ggml::GgmlQuantized, nf4::Nf4Tensor, QuantError};
use crate::layers::frozen_matmul::{frozen_matmul, FrozenWeight};
use crate::linear::{FrozenParts, LinearLayer};
use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

/// A quantized weight `[out_features, in_features]`.
#[derive(Debug, Clone)]
pub enum QuantWeight {
    /// NF4 (optionally double-quantized), decoded on the host.
    Nf4(Arc<Nf4Tensor>),
    /// A ggml block format.
    Ggml(GgmlQuantized),
}

impl QuantWeight {
    /// The weight decoded to `dtype` on `device`.
    pub fn dequantize(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = match self {
            QuantWeight::Nf4(q) => q.dequantize(dtype, device),
            QuantWeight::Ggml(q) => q.dequantize(dtype, device),
        };
        t.map_err(|e| match e {
            QuantError::Candle(e) => e,
            other => candle_core::Error::Msg(other.to_string()),
        })
    }

    /// Logical shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            QuantWeight::Nf4(q) => q.shape(),
            QuantWeight::Ggml(q) => q.shape(),
        }
    }

    /// Bytes of quantized storage.
    pub fn size_bytes(&self) -> usize {
        match self {
            QuantWeight::Nf4(q) => q.size_bytes(),
            QuantWeight::Ggml(q) => q.size_bytes(),
        }
    }
}

impl FrozenWeight for QuantWeight {
    fn weight_t(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        self.dequantize(dtype, device)?.t()
    }
}

/// A frozen linear projection `y = x Wᵀ (+ b)` whose weight is stored quantized.
#[derive(Debug, Clone)]
pub struct QuantLinear {
    weight: QuantWeight,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
}

impl QuantLinear {
    /// A layer over `weight` (`[out, in]`) and an optional frozen `bias` (`[out]`).
    pub fn new(weight: QuantWeight, bias: Option<Tensor>) -> std::result::Result<Self, QuantError> {
        let (out_features, in_features) = match *weight.shape() {
            [o, i] => (o, i),
            ref other => {
                return Err(QuantError::Unsupported {
                    shape: other.to_vec(),
                    format: "QuantLinear".into(),
                    reason: "a linear weight must be 2-D [out_features, in_features]".into(),
                })
            }
        };
        if let Some(b) = &bias {
            if b.dims() != [out_features] {
                return Err(QuantError::Unsupported {
                    shape: b.dims().to_vec(),
                    format: "QuantLinear bias".into(),
                    reason: format!("the bias must have shape [{out_features}]"),
                });
            }
        }
        Ok(Self {
            weight,
            bias: bias.map(|b| b.detach()),
            in_features,
            out_features,
        })
    }

    /// The quantized weight.
    pub fn weight(&self) -> &QuantWeight {
        &self.weight
    }

    /// The frozen bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl LinearLayer for QuantLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let in_dim = x.dims().last().copied();
        if in_dim != Some(self.in_features) {
            return Err(candle_core::Error::Msg(format!(
                "QuantLinear expects inputs [..., {}], got {:?}",
                self.in_features,
                x.dims()
            )));
        }
        let y = frozen_matmul(x, Arc::new(self.weight.clone()))?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?.to_device(y.device())?),
            None => Ok(y),
        }
    }

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn frozen_parts(&self) -> Option<FrozenParts> {
        Some(FrozenParts {
            weight: Arc::new(self.weight.clone()),
            bias: self.bias.clone(),
        })
    }

    fn out_features(&self) -> usize {
        self.out_features
    }
}
