//! LayerNorm and RMSNorm, computed in f32 (f64 for f64 models) and cast back to the input dtype.
//! candle's fused versions record no backward, so a training forward on the CPU uses our fused
//! kernel ([`crate::fused::norm()`]: one node, exact input gradient), and elsewhere the composite
//! ops. When nothing in the call records a backward (generation, frozen layers), the f32 RMSNorm
//! uses candle's fused kernel: one pass over the row rather than six ops that each allocate.

use candle_core::{DType, Result, Tensor, D};

use super::internal_dtype;
use crate::fused::{norm, NormKind};

/// LayerNorm over the last dimension with a frozen weight and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// A LayerNorm from its weight and bias (`[hidden]`, any float dtype) and epsilon.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Result<Self> {
        if weight.dims1()? != bias.dims1()? {
            candle_core::bail!("layer norm weight and bias lengths differ");
        }
        Ok(Self { weight, bias, eps })
    }

    /// Normalises `x` over its last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let work = internal_dtype(dtype);
        let x = x.to_dtype(work)?;
        if x.track_op() && crate::fused::supported(&x) {
            return norm(
                &x,
                NormKind::LayerNorm,
                &self.weight,
                Some(&self.bias),
                self.eps,
            )?
            .to_dtype(dtype);
        }
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight.to_dtype(work)?)?
            .broadcast_add(&self.bias.to_dtype(work)?)?
            .to_dtype(dtype)
    }
}

/// RMSNorm over the last dimension with a frozen weight (Llama's `LlamaRMSNorm`).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// An RMSNorm from its weight `[hidden]` and epsilon.
    pub fn new(weight: Tensor, eps: f64) -> Result<Self> {
        weight.dims1()?;
        Ok(Self { weight, eps })
    }

    /// Normalises `x` over its last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let work = internal_dtype(dtype);
        let x = x.to_dtype(work)?;
        let weight = self.weight.to_dtype(work)?;
        if work == DType::F32 && !x.track_op() && !weight.track_op() {
            let x = if x.is_contiguous() {
                x
            } else {
                x.contiguous()?
            };
            return candle_nn::ops::rms_norm(&x, &weight, self.eps as f32)?.to_dtype(dtype);
        }
        if x.track_op() && !weight.track_op() && crate::fused::supported(&x) {
            return norm(&x, NormKind::RmsNorm, &weight, None, self.eps)?.to_dtype(dtype);
        }
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        normed.broadcast_mul(&weight)?.to_dtype(dtype)
    }
}
