//! Softmax over the last dimension, one pass forward, one pass backward.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_backward, cpu_forward, with_slice, Kernel, Real};

/// Softmax over the last dimension of a CPU f32/f64 tensor, recording a backward
/// (`dx = y · (g − Σ g·y)`), unlike candle-nn's `softmax_last_dim`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax {
        scale: 1.0,
        bias: None,
    })
}

/// Attention's `softmax(scale · scores + bias)` over the last dimension in one op: `scores`
/// `[batch, heads, queries, keys]`, `bias` `[batch, 1, queries, keys]` (the additive mask, shared
/// by every head; a constant, so it gets no gradient). Saves the two score-sized tensors (and
/// their backward) that scaling and masking would make.
pub fn scaled_masked_softmax(scores: &Tensor, scale: f64, bias: &Tensor) -> Result<Tensor> {
    let (b, _h, t, k) = scores.dims4()?;
    if bias.dims() != [b, 1, t, k] {
        candle_core::bail!(
            "attention bias is {:?}, expected [{b}, 1, {t}, {k}]",
            bias.dims()
        );
    }
    if bias.dtype() != scores.dtype() {
        candle_core::bail!("attention bias and scores differ in dtype");
    }
    scores.contiguous()?.apply_op1(Softmax {
        scale,
        bias: Some(bias.contiguous()?),
    })
}

struct Softmax {
    scale: f64,
    /// `[batch, 1, queries, keys]`, broadcast over heads.
    bias: Option<Tensor>,
}

/// Softmax of `scale · x + bias` per row of `n`; row `r` takes bias row `bias_row(r)`.
fn forward<T: Real>(
    x: &[T],
    n: usize,
    scale: T,
    bias: Option<&[T]>,
    bias_row: impl Fn(usize) -> usize + Sync,
) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); x.len()];
    out.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .enumerate()
        .for_each(|(r, (y, x))| {
            match bias {
                Some(bias) => {
                    let row = &bias[bias_row(r) * n..][..n];
                    for ((y, &v), &b) in y.iter_mut().zip(x).zip(row) {
                        *y = scale * v + b;
                    }
                }
                None => {
                    for (y, &v) in y.iter_mut().zip(x) {
                        *y = scale * v;
                    }
                }
            }
            softmax_in_place(y);
        });
    out
}

/// Softmax of one row, in place (shift by the max, exponentiate, normalise).
pub(crate) fn softmax_in_place<T: Real>(row: &mut [T]) {
    let Some(&first) = row.first() else {
        return;
    };
    let max = row
        .iter()
        .copied()
        .fold(first, |m, v| if v > m { v } else { m });
    for v in row.iter_mut() {
        *v -= max;
    }
    T::exp_in_place(row);
    let sum = row.iter().fold(T::from_f64(0.0), |acc, &v| acc + v);
    let inv = T::from_f64(1.0) / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

fn backward<T: Real>(y: &[T], g: &[T], n: usize, scale: T) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); y.len()];
    out.par_chunks_mut(n)
        .zip(y.par_chunks(n).zip(g.par_chunks(n)))
        .for_each(|(dx, (y, g))| {
            let dot = y
                .iter()
                .zip(g)
                .fold(T::from_f64(0.0), |acc, (&y, &g)| acc + y * g);
            for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                *dx = scale * y * (g - dot);
            }
        });
    out
}

impl Kernel for Softmax {
    fn name(&self) -> &'static str {
        "fused softmax"
    }

    fn forward<T: Real>(&self, x: &[T], layout: &Layout) -> Result<Vec<T>> {
        let n = last_dim(layout)?;
        let scale = T::from_f64(self.scale);
        let Some(bias) = &self.bias else {
            return Ok(forward(x, n, scale, None, |_| 0));
        };
        // Rows are (batch, head, query); the bias has one row per (batch, query).
        let (_, heads, queries, _) = layout.shape().dims4()?;
        with_slice::<T, _>(bias, |bias| {
            Ok(forward(x, n, scale, Some(bias), |r| {
                let (bh, q) = (r / queries, r % queries);
                (bh / heads) * queries + q
            }))
        })
    }

    fn backward<T: Real>(&self, y: &[T], g: &[T], n: usize) -> Result<Vec<T>> {
        Ok(backward(y, g, n, T::from_f64(self.scale)))
    }
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
        Ok((cpu_forward(self, storage, layout)?, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // The softmax's gradient needs only its output.
        Ok(Some(cpu_backward(self, res, grad_res)?))
    }
}
