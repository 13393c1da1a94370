//! Elementwise MLP activations with an exact backward, alone or gated (`act(gate) ⊙ up`).
//!
//! candle's own `gelu` backward uses constants rounded to six digits (a relative gradient error
//! of ~1e-5, enough to fail an f64 finite-difference check), and its `silu` backward is seven
//! more tensor ops. These compute the exact derivative in one pass. The gated form (SwiGLU and
//! its kin) also folds in the product with `up`, whose backward would otherwise be two more
//! products and two more gradient buffers.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_slice, cpu_backward, cpu_forward, with_slice, Kernel, Real};

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

/// `act(gate) ⊙ up` for CPU f32/f64 tensors of one shape and dtype, recording the exact
/// backward of both inputs: `d gate = g ⊙ up ⊙ act'(gate)`, `d up = g ⊙ act(gate)`. Rounds
/// exactly as [`activation`] followed by a multiply.
pub fn gated_activation(gate: &Tensor, up: &Tensor, act: FusedActivation) -> Result<Tensor> {
    if gate.dims() != up.dims() || gate.dtype() != up.dtype() {
        candle_core::bail!(
            "gated activation: gate {:?} {:?} and up {:?} {:?} differ",
            gate.dims(),
            gate.dtype(),
            up.dims(),
            up.dtype()
        );
    }
    gate.contiguous()?
        .apply_op2(&up.contiguous()?, GatedActivation(act))
}

struct GatedActivation(FusedActivation);

impl GatedActivation {
    fn forward<T: Real>(&self, gate: &[T], up: &[T]) -> Vec<T> {
        let mut out = forward(self.0, gate);
        out.par_chunks_mut(CHUNK)
            .zip(up.par_chunks(CHUNK))
            .for_each(|(y, up)| y.iter_mut().zip(up).for_each(|(y, &u)| *y *= u));
        out
    }

    /// `(d gate, d up)` from the inputs and the output gradient `g`, the activation recomputed.
    fn backward<T: Real>(&self, gate: &[T], up: &[T], g: &[T]) -> (Vec<T>, Vec<T>) {
        let act = self.0;
        let mut d_gate = vec![T::from_f64(0.0); gate.len()];
        let mut d_up = vec![T::from_f64(0.0); gate.len()];
        d_gate
            .par_chunks_mut(CHUNK)
            .zip(d_up.par_chunks_mut(CHUNK))
            .zip(
                gate.par_chunks(CHUNK)
                    .zip(up.par_chunks(CHUNK).zip(g.par_chunks(CHUNK))),
            )
            .for_each(|((d_gate, d_up), (x, (up, g)))| match act {
                FusedActivation::Silu => {
                    let one = T::from_f64(1.0);
                    for (e, &x) in d_gate.iter_mut().zip(x) {
                        *e = T::from_f64(0.0) - x;
                    }
                    T::exp_in_place(d_gate);
                    for ((((dg, du), &x), &u), &g) in
                        d_gate.iter_mut().zip(d_up.iter_mut()).zip(x).zip(up).zip(g)
                    {
                        let e = *dg;
                        let s = one / (one + e);
                        *du = g * (x / (one + e));
                        *dg = (g * u) * (s * (one + x * (one - s)));
                    }
                }
                FusedActivation::GeluTanh => {
                    for ((((dg, du), &x), &u), &g) in
                        d_gate.iter_mut().zip(d_up.iter_mut()).zip(x).zip(up).zip(g)
                    {
                        let (value, slope) = eval(act, x);
                        *du = g * value;
                        *dg = (g * u) * slope;
                    }
                }
            });
        (d_gate, d_up)
    }
}

impl CustomOp2 for GatedActivation {
    fn name(&self) -> &'static str {
        match self.0 {
            FusedActivation::GeluTanh => "fused-gated-gelu-tanh",
            FusedActivation::Silu => "fused-swiglu",
        }
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match gate.dtype() {
            DType::F32 => CpuStorage::F32(self.forward(
                contiguous_slice::<f32>(gate, gate_layout)?,
                contiguous_slice::<f32>(up, up_layout)?,
            )),
            DType::F64 => CpuStorage::F64(self.forward(
                contiguous_slice::<f64>(gate, gate_layout)?,
                contiguous_slice::<f64>(up, up_layout)?,
            )),
            other => candle_core::bail!("gated activation supports f32 and f64, not {other:?}"),
        };
        Ok((out, gate_layout.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        fn run<T: Real>(
            op: &GatedActivation,
            gate: &Tensor,
            up: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let grad = grad.to_dtype(gate.dtype())?;
            let (d_gate, d_up) = with_slice::<T, _>(gate, |x| {
                with_slice::<T, _>(up, |u| {
                    with_slice::<T, _>(&grad, |g| Ok(op.backward(x, u, g)))
                })
            })?;
            Ok((
                Some(Tensor::from_vec(d_gate, gate.shape(), gate.device())?),
                Some(Tensor::from_vec(d_up, up.shape(), up.device())?),
            ))
        }
        match gate.dtype() {
            DType::F32 => run::<f32>(self, gate, up, grad_res),
            DType::F64 => run::<f64>(self, gate, up, grad_res),
            other => candle_core::bail!("gated activation supports f32 and f64, not {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::random;
    use candle_core::{DType, Var};

    /// Gradients of `Σ w ⊙ f(gate, up)` with respect to `gate` and `up`.
    fn grads(
        gate: &Tensor,
        up: &Tensor,
        w: &Tensor,
        f: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (g, u) = (Var::from_tensor(gate)?, Var::from_tensor(up)?);
        let y = f(g.as_tensor(), u.as_tensor())?;
        let store = (&y * w)?.sum_all()?.backward()?;
        let grad = |v: &Var| {
            store
                .get(v)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))
        };
        Ok((y.clone(), grad(&g)?, grad(&u)?))
    }

    /// The gated op against the activation followed by a multiply: bit for bit in f32 (it is
    /// meant to round the same), and against central differences in f64.
    #[test]
    fn gated_activation_is_activation_times_up() -> Result<()> {
        for act in [FusedActivation::Silu, FusedActivation::GeluTanh] {
            let gate = (random(&[7, 33], 1).to_dtype(DType::F32)? * 4.0)?;
            let up = random(&[7, 33], 2).to_dtype(DType::F32)?;
            let w = random(&[7, 33], 3).to_dtype(DType::F32)?;
            let fused = grads(&gate, &up, &w, |g, u| gated_activation(g, u, act))?;
            let composite = grads(&gate, &up, &w, |g, u| activation(g, act)? * u)?;
            for (a, b) in [
                (&fused.0, &composite.0),
                (&fused.1, &composite.1),
                (&fused.2, &composite.2),
            ] {
                assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?, "{act:?}");
            }

            let (gate, up) = ((random(&[3, 5], 4) * 3.0)?, random(&[3, 5], 5));
            let w = random(&[3, 5], 6);
            let (_, d_gate, d_up) = grads(&gate, &up, &w, |g, u| gated_activation(g, u, act))?;
            let loss = |g: &Tensor, u: &Tensor| -> Result<f64> {
                (gated_activation(g, u, act)? * &w)?
                    .sum_all()?
                    .to_scalar::<f64>()
            };
            let eps = 1e-6;
            for (i, j) in [(0, 0), (1, 3), (2, 4)] {
                let bump = |t: &Tensor, delta: f64| -> Result<Tensor> {
                    let mut v = t.to_vec2::<f64>()?;
                    v[i][j] += delta;
                    Tensor::new(v, t.device())
                };
                let numeric_gate = (loss(&bump(&gate, eps)?, &up)?
                    - loss(&bump(&gate, -eps)?, &up)?)
                    / (2.0 * eps);
                let numeric_up = (loss(&gate, &bump(&up, eps)?)? - loss(&gate, &bump(&up, -eps)?)?)
                    / (2.0 * eps);
                let (a_gate, a_up) = (d_gate.to_vec2::<f64>()?[i][j], d_up.to_vec2::<f64>()?[i][j]);
                assert!(
                    (a_gate - numeric_gate).abs() < 1e-7,
                    "{act:?} gate {a_gate} vs {numeric_gate}"
                );
                assert!(
                    (a_up - numeric_up).abs() < 1e-7,
                    "{act:?} up {a_up} vs {numeric_up}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn gated_activation_rejects_mismatched_inputs() {
        let err = gated_activation(
            &random(&[2, 3], 1),
            &random(&[3, 2], 2),
            FusedActivation::Silu,
        )
        .map(|_| ())
        .expect_err("shapes differ");
        assert!(err.to_string().contains("differ"), "{err}");
    }
}
