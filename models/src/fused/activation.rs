//! Elementwise MLP activations with an exact backward.
//!
//! candle's own `gelu` backward uses constants rounded to six digits (a relative gradient error
//! of ~1e-5, enough to fail an f64 finite-difference check), and its `silu` backward is seven
//! more tensor ops. These compute the exact derivative in one pass.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_slice, with_slice, Real};

/// The activations with a fused kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedActivation {
    /// Tanh-approximated GELU (HF `gelu_new`).
    GeluTanh,
    /// SiLU, `x · σ(x)`.
    Silu,
}

/// Applies `act` elementwise to a CPU f32/f64 tensor, recording an exact backward.
pub fn activation(x: &Tensor, act: FusedActivation) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Activation(act))
}

struct Activation(FusedActivation);

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_CUBIC: f64 = 0.044_715;

trait Act: Real {
    fn tanh(self) -> Self;
}

impl Act for f32 {
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
}

impl Act for f64 {
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
}

/// `(value, derivative)` of the activation at `x`.
fn eval<T: Act>(act: FusedActivation, x: T) -> (T, T) {
    let one = T::from_f64(1.0);
    let half = T::from_f64(0.5);
    match act {
        FusedActivation::GeluTanh => {
            let c = T::from_f64(SQRT_2_OVER_PI);
            let a = T::from_f64(GELU_CUBIC);
            let t = (c * (x + a * x * x * x)).tanh();
            let value = half * x * (one + t);
            let du = c * (one + T::from_f64(3.0) * a * x * x);
            (value, half * (one + t) + half * x * (one - t * t) * du)
        }
        FusedActivation::Silu => {
            let s = one / (one + (T::from_f64(0.0) - x).exp());
            (x * s, s * (one + x * (one - s)))
        }
    }
}

const CHUNK: usize = 1 << 14;

fn forward<T: Act>(act: FusedActivation, x: &[T]) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = eval(act, x).0;
            }
        });
    out
}

fn backward<T: Act>(act: FusedActivation, x: &[T], g: &[T]) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .for_each(|(dx, (x, g))| {
            for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                *dx = g * eval(act, x).1;
            }
        });
    out
}

impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        match self.0 {
            FusedActivation::GeluTanh => "fused-gelu-tanh",
            FusedActivation::Silu => "fused-silu",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match storage.dtype() {
            DType::F32 => CpuStorage::F32(forward(self.0, contiguous_slice(storage, layout)?)),
            DType::F64 => CpuStorage::F64(forward(self.0, contiguous_slice(storage, layout)?)),
            other => candle_core::bail!("fused activation supports f32 and f64, not {other:?}"),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dx = match arg.dtype() {
            DType::F32 => with_slice::<f32, _>(arg, |x| {
                with_slice::<f32, _>(&grad_res.to_dtype(DType::F32)?, |g| {
                    Tensor::from_vec(backward(self.0, x, g), arg.shape(), arg.device())
                })
            })?,
            DType::F64 => with_slice::<f64, _>(arg, |x| {
                with_slice::<f64, _>(&grad_res.to_dtype(DType::F64)?, |g| {
                    Tensor::from_vec(backward(self.0, x, g), arg.shape(), arg.device())
                })
            })?,
            other => candle_core::bail!("fused activation supports f32 and f64, not {other:?}"),
        };
        Ok(Some(dx))
    }
}
