//! Per-row cross-entropy from logits, one pass forward, one pass backward.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_backward, cpu_forward, Kernel, Real};

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
