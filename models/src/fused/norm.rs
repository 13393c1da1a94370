//! LayerNorm and RMSNorm over the last dimension with a frozen weight (and bias), as one node
//! with an exact input gradient.
//!
//! Composed from basic ops, a norm is six to eight tensors per call and twice that in backward
//! (every edge an allocation, a zero fill and an add); a LoRA training step runs two per layer.
//! The weight and bias are frozen in LoRA training, so only the input gradient is computed:
//! with `x̂` the normalised row, `r` its reciprocal standard deviation and `u = g ⊙ w`,
//! RMSNorm gives `dx = r · (u - x̂ · mean(u ⊙ x̂))`, LayerNorm `dx = r · (u - mean(u) - x̂ ·
//! mean(u ⊙ x̂))`.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_backward, cpu_forward, Kernel, Real};

/// Which normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `(x - mean) / sqrt(var + eps) · w + b`.
    LayerNorm,
    /// `x / sqrt(mean(x²) + eps) · w`.
    RmsNorm,
}

/// Normalises a contiguous CPU f32/f64 tensor over its last dimension with frozen `weight`
/// (and `bias`, LayerNorm only), recording the input gradient only.
pub fn norm(
    x: &Tensor,
    kind: NormKind,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let n = x.dim(candle_core::D::Minus1)?;
    let read = |t: &Tensor| -> Result<Vec<f64>> {
        if t.dims1()? != n {
            candle_core::bail!("norm parameter of length {} for rows of {n}", t.dims1()?);
        }
        t.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()
    };
    let op = Norm {
        kind,
        weight: read(weight)?,
        bias: bias.map(read).transpose()?,
        eps,
    };
    x.contiguous()?.apply_op1(op)
}

struct Norm {
    kind: NormKind,
    weight: Vec<f64>,
    bias: Option<Vec<f64>>,
    eps: f64,
}

impl Norm {
    /// The row's mean (0 for RMSNorm) and reciprocal standard deviation.
    fn stats<T: Real>(&self, row: &[T]) -> (f64, f64) {
        let n = row.len() as f64;
        let mean = match self.kind {
            NormKind::LayerNorm => row.iter().map(|v| v.to_f64()).sum::<f64>() / n,
            NormKind::RmsNorm => 0.0,
        };
        let var = row
            .iter()
            .map(|v| {
                let c = v.to_f64() - mean;
                c * c
            })
            .sum::<f64>()
            / n;
        (mean, 1.0 / (var + self.eps).sqrt())
    }
}

impl Kernel for Norm {
    fn name(&self) -> &'static str {
        "fused norm"
    }

    fn forward<T: Real>(&self, x: &[T], layout: &Layout) -> Result<Vec<T>> {
        let n = layout.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![T::from_f64(0.0); x.len()];
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .for_each(|(y, row)| {
                let (mean, r) = self.stats(row);
                for (j, (y, &v)) in y.iter_mut().zip(row).enumerate() {
                    let shifted = (v.to_f64() - mean) * r * self.weight[j];
                    let b = self.bias.as_ref().map_or(0.0, |b| b[j]);
                    *y = T::from_f64(shifted + b);
                }
            });
        Ok(out)
    }

    fn backward<T: Real>(&self, x: &[T], grad: &[T], n: usize) -> Result<Vec<T>> {
        let n = n.max(1);
        let mut out = vec![T::from_f64(0.0); x.len()];
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n).zip(grad.par_chunks(n)))
            .for_each(|(dx, (row, g))| {
                let (mean, r) = self.stats(row);
                let len = row.len() as f64;
                let (mut mean_u, mut mean_ux) = (0.0, 0.0);
                for (j, (&v, &g)) in row.iter().zip(g).enumerate() {
                    let u = g.to_f64() * self.weight[j];
                    mean_u += u;
                    mean_ux += u * (v.to_f64() - mean) * r;
                }
                mean_u /= len;
                mean_ux /= len;
                if self.kind == NormKind::RmsNorm {
                    mean_u = 0.0;
                }
                for (j, (dx, (&v, &g))) in dx.iter_mut().zip(row.iter().zip(g)).enumerate() {
                    let u = g.to_f64() * self.weight[j];
                    let xhat = (v.to_f64() - mean) * r;
                    *dx = T::from_f64(r * (u - mean_u - xhat * mean_ux));
                }
            });
        Ok(out)
    }
}

impl CustomOp1 for Norm {
    fn name(&self) -> &'static str {
        match self.kind {
            NormKind::LayerNorm => "fused-layer-norm",
            NormKind::RmsNorm => "fused-rms-norm",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((cpu_forward(self, storage, layout)?, layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(cpu_backward(self, arg, grad_res)?))
    }
}
