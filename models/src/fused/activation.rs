//! Elementwise MLP activations with an exact backward.
//!
//! candle's own `gelu` backward uses constants rounded to six digits (a relative gradient error
//! of ~1e-5, enough to fail an f64 finite-difference check), and its `silu` backward is seven
//! more tensor ops. These compute the exact derivative in one pass.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_backward, cpu_forward, Kernel, Real};

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

/// `(value, derivative)` of the activation at `x`.
fn eval<T: Real>(act: FusedActivation, x: T) -> (T, T) {
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

fn forward<T: Real>(act: FusedActivation, x: &[T]) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| match act {
            FusedActivation::Silu => {
                // x·σ(x) = x / (1 + e⁻ˣ), the exponentials in one vectorized pass.
                let one = T::from_f64(1.0);
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = T::from_f64(0.0) - x;
                }
                T::exp_in_place(y);
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = x / (one + *y);
                }
            }
            FusedActivation::GeluTanh => {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = eval(act, x).0;
                }
            }
        });
    out
}

fn backward<T: Real>(act: FusedActivation, x: &[T], g: &[T]) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .for_each(|(dx, (x, g))| match act {
            FusedActivation::Silu => {
                let one = T::from_f64(1.0);
                for (dx, &x) in dx.iter_mut().zip(x) {
                    *dx = T::from_f64(0.0) - x;
                }
                T::exp_in_place(dx);
                for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                    let s = one / (one + *dx);
                    *dx = g * (s * (one + x * (one - s)));
                }
            }
            FusedActivation::GeluTanh => {
                for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                    *dx = g * eval(act, x).1;
                }
            }
        });
    out
}

impl Kernel for Activation {
    fn name(&self) -> &'static str {
        "fused activation"
    }

    fn forward<T: Real>(&self, x: &[T], _layout: &Layout) -> Result<Vec<T>> {
        Ok(forward(self.0, x))
    }

    fn backward<T: Real>(&self, x: &[T], g: &[T], _n: usize) -> Result<Vec<T>> {
        Ok(backward(self.0, x, g))
    }
}

impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        match self.0 {
            FusedActivation::GeluTanh => "fused-gelu-tanh",
            FusedActivation::Silu => "fused-silu",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((cpu_forward(self, storage, layout)?, layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(cpu_backward(self, arg, grad_res)?))
    }
}
