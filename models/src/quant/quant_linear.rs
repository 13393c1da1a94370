//! A frozen linear layer over a quantized weight, usable under LoRA training.
//!
//! Forward dequantizes the weight to the input's dtype and device, multiplies, and drops the
//! dequantized copy at once. Backward needs only the gradient with respect to the *input*
//! (`grad_y · W`); the frozen weight gets none. candle's `QMatMul` records no backward at all,
//! so the input gradient is attached through a [`CustomOp1`] on `x`:
//!
//! `y = (x.detach() · Wᵀ) + PassGrad(x)` where `PassGrad` outputs zeros of the output shape and its
//! `bwd` re-dequantizes `W` and returns `grad_y · W`. The op only allocates zeros in forward, so it
//! works unchanged on every candle device, and no dequantized weight lives between forward and
//! backward (only the quantized blocks, shared through an `Arc`).

use super::{ggml::GgmlQuantized, nf4::Nf4Tensor, QuantError};
use crate::linear::LinearLayer;
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, MetalStorage, Result, Shape, Tensor,
};
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

/// `[..., k] · Wᵀ` with `w` `[n, k]`, flattening leading dimensions so one GEMM runs.
fn matmul_last(x: &Tensor, w_t: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let k = *dims
        .last()
        .ok_or_else(|| candle_core::Error::Msg("scalar input".into()))?;
    let lead: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((lead, k))?.matmul(w_t)?;
    let mut out = dims[..dims.len() - 1].to_vec();
    out.push(w_t.dim(1)?);
    y.reshape(out)
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
        let y = {
            let w = self.weight.dequantize(x.dtype(), x.device())?;
            matmul_last(&x.detach().contiguous()?, &w.t()?)?
        };
        let y = if x.track_op() {
            let pass = PassGrad {
                weight: self.weight.clone(),
                out_features: self.out_features,
            };
            (y + x.apply_op1(pass)?)?
        } else {
            y
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?.to_device(y.device())?),
            None => Ok(y),
        }
    }

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }
}

/// Zero-valued forward, `grad · W` backward: attaches the input gradient of a frozen quantized
/// matmul to the graph without holding a dequantized weight.
struct PassGrad {
    weight: QuantWeight,
    out_features: usize,
}

impl PassGrad {
    fn out_shape(&self, layout: &Layout) -> Shape {
        let mut dims = layout.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.out_features;
        }
        Shape::from(dims)
    }
}

impl CustomOp1 for PassGrad {
    fn name(&self) -> &'static str {
        "quant-linear-input-grad"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = self.out_shape(layout);
        Ok((storage.device().zeros_impl(&shape, storage.dtype())?, shape))
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let shape = self.out_shape(layout);
        Ok((storage.device().zeros_impl(&shape, storage.dtype())?, shape))
    }

    fn metal_fwd(&self, storage: &MetalStorage, layout: &Layout) -> Result<(MetalStorage, Shape)> {
        let shape = self.out_shape(layout);
        Ok((storage.device().zeros_impl(&shape, storage.dtype())?, shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let w = self
            .weight
            .dequantize(grad_res.dtype(), grad_res.device())?;
        let g = matmul_last(&grad_res.contiguous()?, &w)?;
        Ok(Some(g.to_dtype(arg.dtype())?))
    }
}
