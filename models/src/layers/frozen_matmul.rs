//! `y = x · Wᵀ` for a frozen weight `W`, recording a backward for `x` only.
//!
//! candle's `matmul` backward computes the gradient of *both* operands whatever they are: under
//! LoRA every frozen projection would pay a weight-sized gradient matmul per step (as much work
//! again as the input gradient) and park a weight-sized buffer in the gradient store until the
//! step ends (the whole model again, in f32). This op computes the product in its forward and
//! returns only `grad · W` from its backward, so frozen weights cost nothing beyond the input
//! gradient.
//!
//! The weight comes from a [`FrozenWeight`], asked for it in forward and again in backward:
//! a quantized weight is then dequantized twice per step and no dequantized copy lives between
//! forward and backward (only the quantized blocks stay in memory).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, MetalStorage, Result, Shape,
    Storage, Tensor,
};

/// Where a frozen linear layer's weight comes from.
pub trait FrozenWeight: Send + Sync {
    /// `Wᵀ`, `[in_features, out_features]`, in `dtype` on `device` (any strides).
    fn weight_t(&self, dtype: DType, device: &Device) -> Result<Tensor>;
}

/// A dense weight stored as `Wᵀ` (`[in, out]`).
impl FrozenWeight for Tensor {
    fn weight_t(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        self.to_dtype(dtype)?.to_device(device)
    }
}

/// `x · Wᵀ` over the last dimension of `x` (`[..., in]` -> `[..., out]`); the backward pass
/// gives `x` its gradient and `W` none.
pub fn frozen_matmul(x: &Tensor, weight: Arc<dyn FrozenWeight>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((&in_features, lead)) = dims.split_last() else {
        candle_core::bail!("linear layer input must have at least one dimension");
    };
    let rows: usize = lead.iter().product();
    let x2 = x.reshape((rows, in_features))?;
    let y = if x.track_op() {
        x2.contiguous()?.apply_op1(FrozenMatmul { weight })?
    } else {
        x2.matmul(&weight.weight_t(x.dtype(), x.device())?)?
    };
    let out_features = y.dim(1)?;
    let mut out_dims = lead.to_vec();
    out_dims.push(out_features);
    y.reshape(out_dims)
}

struct FrozenMatmul {
    weight: Arc<dyn FrozenWeight>,
}

impl FrozenMatmul {
    /// The weight for a `[rows, in]` input, with the matmul's `(batch, m, n, k)`.
    fn operands(
        &self,
        layout: &Layout,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, (usize, usize, usize, usize))> {
        let (m, k) = layout.shape().dims2()?;
        let wt = self.weight.weight_t(dtype, device)?;
        let (wk, n) = wt.dims2()?;
        if wk != k {
            candle_core::bail!("frozen linear layer takes inputs of width {wk}, got {k}");
        }
        Ok((wt, (1, m, n, k)))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (wt, bmnk) = self.operands(layout, storage.dtype(), &Device::Cpu)?;
        let (w_storage, w_layout) = wt.storage_and_layout();
        let Storage::Cpu(w) = &*w_storage else {
            candle_core::bail!("frozen-matmul: the weight is not on the CPU");
        };
        let out = storage.matmul(w, bmnk, layout, w_layout)?;
        Ok((out, Shape::from((bmnk.1, bmnk.2))))
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let device = Device::Cuda(storage.device().clone());
        let (wt, bmnk) = self.operands(layout, storage.dtype(), &device)?;
        let (w_storage, w_layout) = wt.storage_and_layout();
        let Storage::Cuda(w) = &*w_storage else {
            candle_core::bail!("frozen-matmul: the weight is not on the GPU");
        };
        let out = storage.matmul(w, bmnk, layout, w_layout)?;
        Ok((out, Shape::from((bmnk.1, bmnk.2))))
    }

    fn metal_fwd(&self, storage: &MetalStorage, layout: &Layout) -> Result<(MetalStorage, Shape)> {
        let device = Device::Metal(storage.device().clone());
        let (wt, bmnk) = self.operands(layout, storage.dtype(), &device)?;
        let (w_storage, w_layout) = wt.storage_and_layout();
        let Storage::Metal(w) = &*w_storage else {
            candle_core::bail!("frozen-matmul: the weight is not on the Metal device");
        };
        let out = storage.matmul(w, bmnk, layout, w_layout)?;
        Ok((out, Shape::from((bmnk.1, bmnk.2))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let w = self
            .weight
            .weight_t(grad_res.dtype(), grad_res.device())?
            .t()?;
        Ok(Some(grad_res.matmul(&w)?.to_dtype(arg.dtype())?))
    }
}
