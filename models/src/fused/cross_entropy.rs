//! Per-row cross-entropy: from logits (one pass forward, one pass backward), or straight from
//! the final hidden states and a frozen LM head without materialising the logits.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{matmul_into, MatRef, Threads};
use super::{contiguous_slice, cpu_backward, cpu_forward, storage_slice, Float, Kernel, Real};
use crate::layers::FrozenWeight;

/// `weights[r] · (logsumexp(logits[r]) − logits[r, targets[r]])` for each row `r` of CPU f32/f64
/// `logits` `[rows, vocab]`: the weighted negative log-likelihood, `[rows]`, in the logits'
/// dtype. Backward gives `logits` the gradient `g[r] · weights[r] · (softmax(logits[r]) −
/// onehot(targets[r]))`, recomputing the softmax rather than keeping it (one `[rows, vocab]`
/// buffer in all). Rows with weight 0 cost nothing in backward.
pub fn cross_entropy_rows(logits: &Tensor, targets: &[u32], weights: &[f32]) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if targets.len() != rows || weights.len() != rows {
        candle_core::bail!(
            "cross-entropy: {rows} rows of logits but {} targets and {} weights",
            targets.len(),
            weights.len()
        );
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("cross-entropy: target token {t} is outside the vocabulary of {vocab}");
    }
    logits.contiguous()?.apply_op1(CrossEntropy {
        targets: Arc::from(targets),
        weights: Arc::from(weights),
    })
}

struct CrossEntropy {
    targets: Arc<[u32]>,
    weights: Arc<[f32]>,
}

/// `(max, log Σ exp(x − max))` of a row.
fn max_and_log_sum_exp<T: Real>(x: &[T]) -> (T, T) {
    let max = x
        .iter()
        .copied()
        .fold(x[0], |m, v| if v > m { v } else { m });
    // The exponentials go through a small buffer so that they run as one vectorized pass.
    let mut buf = [T::from_f64(0.0); 1024];
    let mut sum = T::from_f64(0.0);
    for chunk in x.chunks(buf.len()) {
        let buf = &mut buf[..chunk.len()];
        for (b, &v) in buf.iter_mut().zip(chunk) {
            *b = v - max;
        }
        T::exp_in_place(buf);
        sum = buf.iter().fold(sum, |acc, &e| acc + e);
    }
    (max, sum.ln())
}

impl Kernel for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused cross-entropy"
    }

    fn forward<T: Real>(&self, logits: &[T], layout: &Layout) -> Result<Vec<T>> {
        let (_, vocab) = layout.shape().dims2()?;
        Ok(logits
            .par_chunks(vocab)
            .zip(self.targets.par_iter().zip(self.weights.par_iter()))
            .map(|(x, (&t, &w))| {
                if w == 0.0 {
                    return T::from_f64(0.0);
                }
                let (max, lse) = max_and_log_sum_exp(x);
                T::from_f64(f64::from(w)) * (lse + max - x[t as usize])
            })
            .collect())
    }

    fn backward<T: Real>(&self, logits: &[T], grad: &[T], vocab: usize) -> Result<Vec<T>> {
        let mut out = vec![T::from_f64(0.0); logits.len()];
        out.par_chunks_mut(vocab)
            .zip(logits.par_chunks(vocab))
            .zip(grad.par_iter())
            .zip(self.targets.par_iter().zip(self.weights.par_iter()))
            .for_each(|(((dx, x), &g), (&t, &w))| {
                if w == 0.0 {
                    return;
                }
                let scale = g * T::from_f64(f64::from(w));
                let (max, lse) = max_and_log_sum_exp(x);
                let shift = max + lse;
                for (d, &v) in dx.iter_mut().zip(x) {
                    *d = v - shift;
                }
                T::exp_in_place(dx);
                for d in dx.iter_mut() {
                    *d = scale * *d;
                }
                dx[t as usize] -= scale;
            });
        Ok(out)
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, _) = layout.shape().dims2()?;
        Ok((cpu_forward(self, storage, layout)?, Shape::from(rows)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(cpu_backward(self, arg, grad_res)?))
    }
}

/// Rows of logits one block of [`linear_cross_entropy_rows`] computes at once. Each block's
/// products repack the whole head weight, so blocks must not be small (128 rows measured slower
/// than 256 and 512 on SmolLM2); at 256 a block of a 50k vocabulary is ~50 MB in f32.
pub const HEAD_BLOCK_ROWS: usize = 256;

/// [`cross_entropy_rows`] of the logits `hidden·Wᵀ + b`, for CPU f32/f64 `hidden` `[rows, h]`
/// and a frozen head `W` `[vocab, h]` (with optional bias `[vocab]`), without ever holding all
/// the logits.
///
/// A causal LM's logits are the largest tensor of a training step (`rows x vocab`, 100 MB for
/// 512 tokens of a 49k vocabulary) and their gradient is another: here the rows with non-zero
/// weight are processed in blocks of [`HEAD_BLOCK_ROWS`]; each block's logits are computed,
/// reduced to the loss and, when `hidden` needs a gradient, turned in place into `w·(softmax −
/// onehot)` and multiplied back by `W` into the block's rows of `d loss / d hidden`, kept for
/// backward (which only scales each row by its output gradient, the loss being linear in
/// it). Rows with weight 0 (prompt tokens, padding, each sequence's last position) cost nothing.
pub fn linear_cross_entropy_rows(
    hidden: &Tensor,
    weight: Arc<dyn FrozenWeight>,
    bias: Option<Tensor>,
    targets: &[u32],
    weights: &[f32],
) -> Result<Tensor> {
    let (rows, _) = hidden.dims2()?;
    if !super::supported(hidden) {
        candle_core::bail!(
            "fused LM-head cross-entropy takes f32/f64 CPU hidden states, got {:?} on {:?}",
            hidden.dtype(),
            hidden.device().location()
        );
    }
    if targets.len() != rows || weights.len() != rows {
        candle_core::bail!(
            "cross-entropy: {rows} hidden rows but {} targets and {} weights",
            targets.len(),
            weights.len()
        );
    }
    let bias = bias
        .map(|b| b.to_dtype(hidden.dtype())?.contiguous())
        .transpose()?;
    hidden.contiguous()?.apply_op1(LinearCrossEntropy {
        weight,
        bias,
        targets: Arc::from(targets),
        weights: Arc::from(weights),
        with_grad: hidden.track_op(),
        grad: Mutex::new(None),
    })
}

struct LinearCrossEntropy {
    weight: Arc<dyn FrozenWeight>,
    bias: Option<Tensor>,
    targets: Arc<[u32]>,
    weights: Arc<[f32]>,
    /// Whether forward also computes `d loss / d hidden` (only when a backward can follow).
    with_grad: bool,
    /// `d (Σ loss) / d hidden`, `[rows, h]`, written by forward when `with_grad`.
    grad: Mutex<Option<Tensor>>,
}

impl LinearCrossEntropy {
    fn forward<T: Float>(&self, hidden: &[T], rows: usize, width: usize) -> Result<Vec<T>> {
        let weight_t = self.weight.weight_t(T::DTYPE, &Device::Cpu)?;
        let (w_storage, w_layout) = weight_t.storage_and_layout();
        let w_t = MatRef::<T>::of_storage(&w_storage, w_layout)?;
        if w_t.rows() != width {
            candle_core::bail!(
                "LM head takes {} features, the hidden states have {width}",
                w_t.rows()
            );
        }
        let vocab = w_t.cols();
        if let Some(&t) = self.targets.iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!(
                "cross-entropy: target token {t} is outside the vocabulary of {vocab}"
            );
        }
        let bias = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias = match &bias {
            Some((storage, layout)) => Some(storage_slice::<T>(storage, layout)?),
            None => None,
        };
        if let Some(b) = bias {
            if b.len() != vocab {
                candle_core::bail!("LM head bias has {} entries for {vocab} outputs", b.len());
            }
        }

        let active: Vec<usize> = (0..rows).filter(|&r| self.weights[r] != 0.0).collect();
        let block_rows = HEAD_BLOCK_ROWS.min(active.len());
        let mut losses = vec![T::ZERO; rows];
        let mut grad = if self.with_grad {
            vec![T::ZERO; rows * width]
        } else {
            Vec::new()
        };
        let mut block_hidden = vec![T::ZERO; block_rows * width];
        let mut block_grad = vec![
            T::ZERO;
            if self.with_grad {
                block_rows * width
            } else {
                0
            }
        ];
        let mut logits = vec![T::ZERO; block_rows * vocab];
        for block in active.chunks(HEAD_BLOCK_ROWS) {
            let n = block.len();
            for (dst, &r) in block_hidden.chunks_mut(width).zip(block) {
                dst.copy_from_slice(&hidden[r * width..(r + 1) * width]);
            }
            let logits = &mut logits[..n * vocab];
            matmul_into(
                logits,
                MatRef::new(&block_hidden[..n * width], n, width)?,
                w_t,
                T::ONE,
                Threads::Pool,
            )?;
            let block_losses: Vec<T> = logits
                .par_chunks_mut(vocab)
                .zip(block.par_iter())
                .map(|(row, &r)| self.row(row, bias, r))
                .collect();
            for (&r, loss) in block.iter().zip(block_losses) {
                losses[r] = loss;
            }
            if self.with_grad {
                let block_grad = &mut block_grad[..n * width];
                matmul_into(
                    block_grad,
                    MatRef::new(logits, n, vocab)?,
                    w_t.t(),
                    T::ONE,
                    Threads::Pool,
                )?;
                for (src, &r) in block_grad.chunks(width).zip(block) {
                    grad[r * width..(r + 1) * width].copy_from_slice(src);
                }
            }
        }
        if self.with_grad {
            *self.grad.lock().map_err(|_| lock_poisoned())? =
                Some(Tensor::from_vec(grad, (rows, width), &Device::Cpu)?);
        }
        Ok(losses)
    }

    /// Row `r`'s weighted loss from its logits (`row`, bias not yet added); with `with_grad`,
    /// leaves the row's logit gradient `w·(softmax − onehot)` in `row`.
    fn row<T: Real>(&self, row: &mut [T], bias: Option<&[T]>, r: usize) -> T {
        if let Some(b) = bias {
            row.iter_mut().zip(b).for_each(|(x, &b)| *x += b);
        }
        let target = self.targets[r] as usize;
        let w = T::from_f64(f64::from(self.weights[r]));
        let (max, lse) = max_and_log_sum_exp(row);
        let loss = w * (lse + max - row[target]);
        if self.with_grad {
            let shift = max + lse;
            row.iter_mut().for_each(|x| *x -= shift);
            T::exp_in_place(row);
            row.iter_mut().for_each(|x| *x = w * *x);
            row[target] -= w;
        }
        loss
    }
}

fn lock_poisoned() -> candle_core::Error {
    candle_core::Error::Msg("fused LM-head cross-entropy: lock poisoned".into())
}

impl CustomOp1 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-linear-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, width) = layout.shape().dims2()?;
        let losses = match storage.dtype() {
            DType::F32 => CpuStorage::F32(self.forward(
                contiguous_slice::<f32>(storage, layout)?,
                rows,
                width,
            )?),
            DType::F64 => CpuStorage::F64(self.forward(
                contiguous_slice::<f64>(storage, layout)?,
                rows,
                width,
            )?),
            other => candle_core::bail!(
                "fused LM-head cross-entropy supports f32 and f64, not {other:?}"
            ),
        };
        Ok((losses, Shape::from(rows)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = self
            .grad
            .lock()
            .map_err(|_| lock_poisoned())?
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg(
                    "fused LM-head cross-entropy: backward without a gradient from forward".into(),
                )
            })?;
        // Each row's loss is scaled by its output gradient, and so is its hidden gradient.
        let scale = grad_res.to_dtype(arg.dtype())?.unsqueeze(1)?;
        Ok(Some(grad.broadcast_mul(&scale)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::{max_abs_diff, random};

    /// The composite reference: materialised logits, then the logits cross-entropy.
    fn reference(
        hidden: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        targets: &[u32],
        weights: &[f32],
    ) -> Result<Tensor> {
        let logits = hidden.matmul(&weight.t()?)?;
        let logits = match bias {
            Some(b) => logits.broadcast_add(b)?,
            None => logits,
        };
        cross_entropy_rows(&logits, targets, weights)
    }

    /// Values and hidden gradients of the fused head against the reference, in f64, with a
    /// bias or not, over more rows than one block and with some rows weighted out.
    #[test]
    fn fused_head_matches_materialised_logits() -> Result<()> {
        let (rows, width, vocab) = (HEAD_BLOCK_ROWS + 37, 12, 50);
        let weight = random(&[vocab, width], 1);
        let bias = random(&[vocab], 2);
        let targets: Vec<u32> = (0..rows).map(|r| ((r * 7 + 3) % vocab) as u32).collect();
        let weights: Vec<f32> = (0..rows)
            .map(|r| match r % 5 {
                0 => 0.0,
                1 => 2.0,
                _ => 1.0,
            })
            .collect();
        for bias in [None, Some(&bias)] {
            let h1 = candle_core::Var::from_tensor(&random(&[rows, width], 3))?;
            let h2 = candle_core::Var::from_tensor(h1.as_tensor())?;
            // Different output gradients per row, so the backward's row scaling is checked.
            let probe = random(&[rows], 4);
            let fused = linear_cross_entropy_rows(
                h1.as_tensor(),
                Arc::new(weight.t()?),
                bias.cloned(),
                &targets,
                &weights,
            )?;
            let composite = reference(h2.as_tensor(), &weight, bias, &targets, &weights)?;
            assert!(max_abs_diff(&fused, &composite) < 1e-12);
            let g1 = (fused * &probe)?.sum_all()?.backward()?;
            let g2 = (composite * &probe)?.sum_all()?.backward()?;
            let (d1, d2) = (g1.get(&h1).expect("fused grad"), g2.get(&h2).expect("grad"));
            assert!(max_abs_diff(d1, d2) < 1e-12);
            assert!(d1.abs()?.sum_all()?.to_scalar::<f64>()? > 0.0);
        }
        Ok(())
    }

    /// Without a gradient to track, forward skips the gradient work and gives the same losses.
    #[test]
    fn fused_head_without_grad_gives_the_same_losses() -> Result<()> {
        let (rows, width, vocab) = (9, 4, 11);
        let weight = random(&[vocab, width], 5);
        let hidden = random(&[rows, width], 6);
        let targets: Vec<u32> = (0..rows as u32).collect();
        let weights = vec![1.0f32; rows];
        let fused =
            linear_cross_entropy_rows(&hidden, Arc::new(weight.t()?), None, &targets, &weights)?;
        let composite = reference(&hidden, &weight, None, &targets, &weights)?;
        assert!(max_abs_diff(&fused, &composite) < 1e-12);
        Ok(())
    }

    #[test]
    fn fused_head_rejects_targets_outside_the_vocabulary() -> Result<()> {
        let weight = random(&[5, 3], 7);
        let hidden = random(&[2, 3], 8);
        let err =
            linear_cross_entropy_rows(&hidden, Arc::new(weight.t()?), None, &[1, 5], &[1.0, 1.0])
                .map(|_| ())
                .expect_err("target 5 is outside a vocabulary of 5");
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
        Ok(())
    }
}
