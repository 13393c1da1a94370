//! Softmax over the last dimension, one pass forward, one pass backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_slice, with_slice, Real};

/// Softmax over the last dimension of a CPU f32/f64 tensor, recording a backward
/// (`dx = y · (g − Σ g·y)`), unlike candle-nn's `softmax_last_dim`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

fn forward<T: Real>(x: &[T], n: usize) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); x.len()];
    out.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .for_each(|(y, x)| {
            let max = x
                .iter()
                .copied()
                .fold(x[0], |m, v| if v > m { v } else { m });
            let mut sum = T::from_f64(0.0);
            for (y, &v) in y.iter_mut().zip(x) {
                *y = (v - max).exp();
                sum += *y;
            }
            let inv = T::from_f64(1.0) / sum;
            for y in y.iter_mut() {
                *y *= inv;
            }
        });
    out
}

fn backward<T: Real>(y: &[T], g: &[T], n: usize) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); y.len()];
    out.par_chunks_mut(n)
        .zip(y.par_chunks(n).zip(g.par_chunks(n)))
        .for_each(|(dx, (y, g))| {
            let dot = y
                .iter()
                .zip(g)
                .fold(T::from_f64(0.0), |acc, (&y, &g)| acc + y * g);
            for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                *dx = y * (g - dot);
            }
        });
    out
}

fn last_dim(layout: &Layout) -> Result<usize> {
    match layout.dims().last() {
        Some(&n) if n > 0 => Ok(n),
        _ => candle_core::bail!("softmax needs a non-empty last dimension"),
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(layout)?;
        let out = match storage.dtype() {
            DType::F32 => CpuStorage::F32(forward(contiguous_slice::<f32>(storage, layout)?, n)),
            DType::F64 => CpuStorage::F64(forward(contiguous_slice::<f64>(storage, layout)?, n)),
            other => candle_core::bail!("fused softmax supports f32 and f64, not {other:?}"),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let n = res.dim(candle_core::D::Minus1)?;
        let dx = match res.dtype() {
            DType::F32 => with_slice::<f32, _>(res, |y| {
                with_slice::<f32, _>(&grad_res.to_dtype(DType::F32)?, |g| {
                    Tensor::from_vec(backward(y, g, n), res.shape(), res.device())
                })
            })?,
            DType::F64 => with_slice::<f64, _>(res, |y| {
                with_slice::<f64, _>(&grad_res.to_dtype(DType::F64)?, |g| {
                    Tensor::from_vec(backward(y, g, n), res.shape(), res.device())
                })
            })?,
            other => candle_core::bail!("fused softmax supports f32 and f64, not {other:?}"),
        };
        Ok(Some(dx))
    }
}
