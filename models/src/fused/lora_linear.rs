//! A whole LoRA projection, `y = x·Wᵀ + b + s·(m ⊙ x)·Aᵀ·Bᵀ`, as one graph node.
//!
//! As separate ops the projection is seven nodes (reshapes around the frozen product and the
//! update, the two products, the sum), and candle's backward allocates a zero tensor and adds
//! into it for every gradient it routes through a node: seven activation-sized zero fills and
//! adds per projection and step, on top of the products. Here forward writes `y` once (the
//! update accumulates into the base product's buffer) and backward computes the three gradients
//! directly:
//!
//! - `dB = s·gᵀh` with `h = (m ⊙ x)·Aᵀ` (kept from forward, `[rows, r]`),
//! - `dA = s·(g·B)ᵀ·(m ⊙ x)`,
//! - `dx = g·W + m ⊙ (s·(g·B)·A)`.
//!
//! `W` and `b` stay frozen: no gradient, no weight-sized buffer. CPU only, f32 and f64.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{matmul, matmul_acc, MatRef, Threads};
use super::{contiguous_slice, storage_slice, Float};
use crate::layers::FrozenWeight;

/// Elements per rayon task in the elementwise loops.
const CHUNK: usize = 1 << 14;

/// `x·Wᵀ + b + scaling·(mask ⊙ x)·aᵀ·bᵀ` over the last dimension of `x` (`[..., in]` ->
/// `[..., out]`), recording gradients for `x`, `a` (`[r, in]`) and `b` (`[out, r]`).
///
/// `x`, `a`, `b` and `mask` (shaped like `x`, already carrying dropout's `1/keep` rescaling)
/// must be f32 or f64 CPU tensors of one dtype; see [`super::supported`].
pub fn lora_linear(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    weight: Arc<dyn FrozenWeight>,
    bias: Option<Tensor>,
    mask: Option<Tensor>,
    scaling: f64,
) -> Result<Tensor> {
    let dtype = x.dtype();
    if !super::supported(x) || a.dtype() != dtype || b.dtype() != dtype {
        candle_core::bail!(
            "fused LoRA projection takes f32/f64 CPU tensors of one dtype, got x {:?} on {:?}, \
             A {:?}, B {:?}",
            dtype,
            x.device().location(),
            a.dtype(),
            b.dtype()
        );
    }
    let width = x.dim(candle_core::D::Minus1)?;
    if a.dims2()?.1 != width {
        candle_core::bail!(
            "LoRA projection takes inputs [..., {}], got {:?}",
            a.dims2()?.1,
            x.dims()
        );
    }
    let mask = match mask {
        Some(m) if m.dims() != x.dims() => {
            candle_core::bail!(
                "dropout mask {:?} does not match the input {:?}",
                m.dims(),
                x.dims()
            )
        }
        Some(m) => Some(m.to_dtype(dtype)?.contiguous()?),
        None => None,
    };
    let bias = bias.map(|b| b.to_dtype(dtype)?.contiguous()).transpose()?;
    let op = LoraLinear {
        weight,
        bias,
        mask,
        scaling,
        h: Mutex::new(None),
    };
    x.contiguous()?.apply_op3(a, b, op)
}

struct LoraLinear {
    weight: Arc<dyn FrozenWeight>,
    bias: Option<Tensor>,
    mask: Option<Tensor>,
    scaling: f64,
    /// `(m ⊙ x)·Aᵀ`, `[rows, r]`, written by forward for `dB`.
    h: Mutex<Option<Tensor>>,
}

/// `(rows, in)` of an input `[..., in]`.
fn rows_and_width(shape: &Shape) -> Result<(usize, usize)> {
    let dims = shape.dims();
    let Some((&width, lead)) = dims.split_last() else {
        candle_core::bail!("a linear layer's input must have at least one dimension");
    };
    Ok((lead.iter().product(), width))
}

/// `m ⊙ x`, or `x` itself without dropout.
fn masked<'a, T: Float>(x: &'a [T], mask: Option<&[T]>) -> std::borrow::Cow<'a, [T]> {
    match mask {
        None => std::borrow::Cow::Borrowed(x),
        // One parallel pass straight into the new buffer (no copy of `x` first).
        Some(m) => std::borrow::Cow::Owned(
            x.par_iter()
                .zip(m.par_iter())
                .with_min_len(CHUNK)
                .map(|(&x, &m)| x * m)
                .collect(),
        ),
    }
}

impl LoraLinear {
    fn forward<T: Float>(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(Vec<T>, Shape)> {
        let (rows, width) = rows_and_width(x_layout.shape())?;
        let xs = contiguous_slice::<T>(x, x_layout)?;
        let x_mat = MatRef::new(xs, rows, width)?;
        let (a_mat, b_mat) = (
            MatRef::<T>::of_cpu(a, a_layout)?,
            MatRef::<T>::of_cpu(b, b_layout)?,
        );
        let weight_t = self.weight.weight_t(T::DTYPE, &Device::Cpu)?;
        let (w_storage, w_layout) = weight_t.storage_and_layout();
        let w_t = MatRef::<T>::of_storage(&w_storage, w_layout)?;
        let out = w_t.cols();

        let mask = self.mask.as_ref().map(|m| m.storage_and_layout());
        let mask = match &mask {
            Some((storage, layout)) => Some(storage_slice::<T>(storage, layout)?),
            None => None,
        };
        let xd = masked(xs, mask);
        let h = matmul(
            MatRef::new(&xd, rows, width)?,
            a_mat.t(),
            T::ONE,
            Threads::Pool,
        )?;
        let mut y = matmul(x_mat, w_t, T::ONE, Threads::Pool)?;
        if let Some(bias) = &self.bias {
            let (storage, layout) = bias.storage_and_layout();
            let bias = storage_slice::<T>(&storage, layout)?;
            if bias.len() != out {
                candle_core::bail!(
                    "bias has {} entries, the projection {out} outputs",
                    bias.len()
                );
            }
            y.par_chunks_mut(out * (CHUNK / out).max(1))
                .for_each(|rows| {
                    for row in rows.chunks_mut(out) {
                        row.iter_mut().zip(bias).for_each(|(y, &b)| *y += b);
                    }
                });
        }
        let scaling = T::from_f64(self.scaling);
        matmul_acc(
            &mut y,
            MatRef::new(&h, rows, a_mat.rows())?,
            b_mat.t(),
            scaling,
            Threads::Pool,
        )?;
        let h = Tensor::from_vec(h, (rows, a_mat.rows()), &Device::Cpu)?;
        *self
            .h
            .lock()
            .map_err(|_| candle_core::Error::Msg("LoRA projection lock poisoned".into()))? =
            Some(h);
        let mut dims = x_layout.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out;
        }
        Ok((y, Shape::from(dims)))
    }

    fn backward<T: Float>(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let h = self
            .h
            .lock()
            .map_err(|_| candle_core::Error::Msg("LoRA projection lock poisoned".into()))?
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("LoRA projection: backward before forward".into())
            })?;
        let (rows, width) = rows_and_width(x.shape())?;
        let out = grad.dim(candle_core::D::Minus1)?;
        let r = a.dim(0)?;
        let (x, g) = (x.contiguous()?, grad.to_dtype(T::DTYPE)?.contiguous()?);
        let (x_storage, x_layout) = x.storage_and_layout();
        let xs = storage_slice::<T>(&x_storage, x_layout)?;
        let (g_storage, g_layout) = g.storage_and_layout();
        let g_mat = MatRef::new(storage_slice::<T>(&g_storage, g_layout)?, rows, out)?;
        let (h_storage, h_layout) = h.storage_and_layout();
        let h_mat = MatRef::new(storage_slice::<T>(&h_storage, h_layout)?, rows, r)?;
        let (a_storage, a_layout) = a.storage_and_layout();
        let (b_storage, b_layout) = b.storage_and_layout();
        let a_mat = MatRef::<T>::of_storage(&a_storage, a_layout)?;
        let b_mat = MatRef::<T>::of_storage(&b_storage, b_layout)?;
        let weight_t = self.weight.weight_t(T::DTYPE, &Device::Cpu)?;
        let (w_storage, w_layout) = weight_t.storage_and_layout();
        let w_t = MatRef::<T>::of_storage(&w_storage, w_layout)?;
        let scaling = T::from_f64(self.scaling);

        // g·B, [rows, r]: the gradient reaching the adapter's bottleneck, before the scaling.
        let gb = matmul(g_mat, b_mat, T::ONE, Threads::Pool)?;
        let gb_mat = MatRef::new(&gb, rows, r)?;
        let grad_b = matmul(g_mat.t(), h_mat, scaling, Threads::Pool)?;
        let mask = self.mask.as_ref().map(|m| m.storage_and_layout());
        let mask = match &mask {
            Some((storage, layout)) => Some(storage_slice::<T>(storage, layout)?),
            None => None,
        };
        let xd = masked(xs, mask);
        let grad_a = matmul(
            gb_mat.t(),
            MatRef::new(&xd, rows, width)?,
            scaling,
            Threads::Pool,
        )?;
        drop(xd);
        let mut grad_x = matmul(g_mat, w_t.t(), T::ONE, Threads::Pool)?;
        match mask {
            None => matmul_acc(&mut grad_x, gb_mat, a_mat, scaling, Threads::Pool)?,
            Some(m) => {
                let through_adapter = matmul(gb_mat, a_mat, scaling, Threads::Pool)?;
                grad_x
                    .par_chunks_mut(CHUNK)
                    .zip(through_adapter.par_chunks(CHUNK).zip(m.par_chunks(CHUNK)))
                    .for_each(|(dx, (t, m))| {
                        for ((dx, &t), &m) in dx.iter_mut().zip(t).zip(m) {
                            *dx += t * m;
                        }
                    });
            }
        }
        Ok((
            Tensor::from_vec(grad_x, x.shape(), &Device::Cpu)?,
            Tensor::from_vec(grad_a, (r, width), &Device::Cpu)?,
            Tensor::from_vec(grad_b, (out, r), &Device::Cpu)?,
        ))
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match x.dtype() {
            DType::F32 => {
                let (y, shape) = self.forward::<f32>(x, x_layout, a, a_layout, b, b_layout)?;
                Ok((CpuStorage::F32(y), shape))
            }
            DType::F64 => {
                let (y, shape) = self.forward::<f64>(x, x_layout, a, a_layout, b, b_layout)?;
                Ok((CpuStorage::F64(y), shape))
            }
            other => {
                candle_core::bail!("fused LoRA projection supports f32 and f64, not {other:?}")
            }
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, da, db) = match x.dtype() {
            DType::F32 => self.backward::<f32>(x, a, b, grad)?,
            DType::F64 => self.backward::<f64>(x, a, b, grad)?,
            other => {
                candle_core::bail!("fused LoRA projection supports f32 and f64, not {other:?}")
            }
        };
        Ok((Some(dx), Some(da), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{max_abs_diff, random};
    use super::*;
    use candle_core::Var;

    /// Value and the gradients of x, A and B against the same projection from tensor ops, in
    /// f64, with and without dropout and bias, and with a frozen weight held transposed (as a
    /// dequantized weight comes) as well as contiguous.
    #[test]
    fn matches_the_composite_projection_and_its_gradients() {
        let (x, a, b) = (
            Var::from_tensor(&random(&[2, 3, 8], 1)).unwrap(),
            Var::from_tensor(&random(&[4, 8], 2)).unwrap(),
            Var::from_tensor(&random(&[5, 4], 3)).unwrap(),
        );
        let w = random(&[5, 8], 4);
        let bias = random(&[5], 5);
        let keep: Vec<f64> = (0..48)
            .map(|i| if i % 3 == 0 { 0.0 } else { 1.5 })
            .collect();
        let mask = Tensor::from_vec(keep, (2, 3, 8), &Device::Cpu).unwrap();
        let probe = random(&[2, 3, 5], 6);
        let grads = |y: &Tensor| {
            let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            [x.as_tensor(), a.as_tensor(), b.as_tensor()].map(|v| g.get(v).unwrap().clone())
        };
        for (mask, bias, w_t) in [
            (
                Some(mask.clone()),
                Some(bias.clone()),
                w.t().unwrap().contiguous().unwrap(),
            ),
            (None, None, w.t().unwrap()),
            (Some(mask), None, w.t().unwrap()),
        ] {
            let fused = lora_linear(
                x.as_tensor(),
                a.as_tensor(),
                b.as_tensor(),
                Arc::new(w_t.clone()),
                bias.clone(),
                mask.clone(),
                0.75,
            )
            .unwrap();
            let xd = match &mask {
                Some(m) => x.as_tensor().mul(m).unwrap(),
                None => x.as_tensor().clone(),
            };
            let update = xd
                .broadcast_matmul(&a.as_tensor().t().unwrap())
                .and_then(|h| h.broadcast_matmul(&b.as_tensor().t().unwrap()))
                .and_then(|u| u * 0.75)
                .unwrap();
            let base = x.as_tensor().broadcast_matmul(&w_t).unwrap();
            let base = match &bias {
                Some(bias) => base.broadcast_add(bias).unwrap(),
                None => base,
            };
            let composite = (base + update).unwrap();
            assert!(max_abs_diff(&fused, &composite) < 1e-12);
            for (g_fused, g_ref) in grads(&fused).iter().zip(grads(&composite).iter()) {
                assert!(max_abs_diff(g_fused, g_ref) < 1e-12);
                let total = g_fused.abs().unwrap().sum_all().unwrap();
                assert!(
                    total.to_scalar::<f64>().unwrap() > 0.0,
                    "a gradient is all zero"
                );
            }
        }
    }

    #[test]
    fn refuses_mismatched_inputs() {
        let x = random(&[3, 8], 1);
        let (a, b) = (random(&[4, 7], 2), random(&[5, 4], 3));
        let w: Arc<dyn FrozenWeight> = Arc::new(random(&[8, 5], 4));
        let err = lora_linear(&x, &a, &b, w.clone(), None, None, 1.0).unwrap_err();
        assert!(err.to_string().contains("takes inputs"), "{err}");
        let a = random(&[4, 8], 2);
        let mask = random(&[3, 7], 5);
        let err = lora_linear(&x, &a, &b, w, None, Some(mask), 1.0).unwrap_err();
        assert!(err.to_string().contains("dropout mask"), "{err}");
    }
}
