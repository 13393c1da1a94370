//! A frozen dense linear layer.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use super::frozen_matmul::frozen_matmul;
use crate::linear::{FrozenParts, LinearLayer};

/// `y = x Wᵀ + b` with a frozen weight `[out, in]` and optional bias `[out]`.
///
/// The product goes through [`frozen_matmul`], so backward computes the input gradient only
/// (candle's own matmul would also compute, and keep, a gradient for the weight). The weight is
/// kept transposed (`Wᵀ`, contiguous `[in, out]`): candle's CPU matmul is several times slower
/// with a transposed right-hand side, and GPU matmuls do not care.
#[derive(Debug, Clone)]
pub struct Dense {
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl Dense {
    /// A dense layer from its weight `[out, in]` and optional bias `[out]`; both must share a
    /// dtype and device, and the inputs given to `forward` must have that dtype too.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out, _) = weight.dims2()?;
        if let Some(b) = &bias {
            let n = b.dims1()?;
            if n != out {
                candle_core::bail!("dense bias has {n} entries but the weight has {out} rows");
            }
            if b.dtype() != weight.dtype() {
                candle_core::bail!(
                    "dense bias dtype {:?} differs from weight dtype {:?}",
                    b.dtype(),
                    weight.dtype()
                );
            }
        }
        let weight_t = weight.t()?.contiguous()?;
        Ok(Self { weight_t, bias })
    }

    /// The weight `[out, in]` (a transposed view of the stored `Wᵀ`).
    pub fn weight(&self) -> Tensor {
        // A rank-2 tensor always transposes.
        self.weight_t.t().unwrap_or_else(|_| self.weight_t.clone())
    }

    /// The bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// `x Wᵀ (+ b)` over the last dimension of `x`, flattening leading dimensions into one matmul.
pub(crate) fn linear_forward(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_forward_t(x, &weight.t()?, bias)
}

/// As [`linear_forward`] with the weight given transposed, `[in, out]`.
pub(crate) fn linear_forward_t(
    x: &Tensor,
    weight_t: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((&in_features, lead)) = dims.split_last() else {
        candle_core::bail!("linear layer input must have at least one dimension");
    };
    let rows: usize = lead.iter().product();
    let y = x.reshape((rows, in_features))?.matmul(weight_t)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = lead.to_vec();
    out_dims.push(weight_t.dim(1)?);
    y.reshape(out_dims)
}

impl LinearLayer for Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // A tensor is a shared handle: wrapping it for the op copies no data.
        let y = frozen_matmul(x, Arc::new(self.weight_t.clone()))?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    fn in_features(&self) -> usize {
        self.weight_t.dims().first().copied().unwrap_or(0)
    }

    fn out_features(&self) -> usize {
        self.weight_t.dims().get(1).copied().unwrap_or(0)
    }

    fn frozen_parts(&self) -> Option<FrozenParts> {
        Some(FrozenParts {
            weight: Arc::new(self.weight_t.clone()),
            bias: self.bias.clone(),
        })
    }

    fn dense_parts(&self, _device: &Device, _dtype: DType) -> Result<(Tensor, Option<Tensor>)> {
        Ok((self.weight(), self.bias.clone()))
    }
}
