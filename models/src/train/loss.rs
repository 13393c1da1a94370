//! Masked causal-LM cross-entropy, computed in f32 with a composite log-softmax so that backward
//! is recorded (candle's fused `softmax_last_dim` records none).

use candle_core::{DType, Result, Tensor, D};

use crate::linear::LinearLayer;

/// `log_softmax` over the last dimension from basic ops; the max subtracted for stability is
/// detached (the result does not depend on it mathematically).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let s = x.broadcast_sub(&m)?;
    let lse = s.exp()?.sum_keepdim(D::Minus1)?.log()?;
    s.broadcast_sub(&lse)
}

/// Summed negative log-likelihood over masked positions, and the number of those positions.
///
/// `logits` `[b, t, V]` (any float dtype; scored in f32, or in f64 for f64 logits on the CPU),
/// `targets` `[b, t]` (token ids, u32 or i64), `mask` `[b, t]` (any dtype, non-zero = counts). As in causal LMs, position `i`'s logits
/// predict token `i + 1`: logits `[:, :-1]` are scored against targets `[:, 1:]` under
/// mask `[:, 1:]`. Returns the sum as a scalar, f32 (f64 for f64 logits on the CPU, which
/// finite-difference checks need), and the masked-token count.
pub fn masked_cross_entropy_sum(
    logits: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
) -> Result<(Tensor, usize)> {
    let (_, t) = check_next_token_shapes("logits", logits, targets, mask)?;
    if crate::fused::supported(logits) {
        return fused_cross_entropy_sum(logits, targets, mask);
    }
    let logits = logits.narrow(1, 0, t - 1)?.to_dtype(DType::F32)?;
    let targets = targets
        .narrow(1, 1, t - 1)?
        .to_dtype(DType::U32)?
        .contiguous()?;
    let mask = mask
        .narrow(1, 1, t - 1)?
        .to_dtype(DType::F32)?
        .ne(0f32)?
        .to_dtype(DType::F32)?;
    let logp = log_softmax(&logits)?;
    let picked = logp.gather(&targets.unsqueeze(2)?, 2)?.squeeze(2)?;
    let count = mask.sum_all()?.to_scalar::<f32>()? as usize;
    let sum = (picked * &mask)?.sum_all()?.neg()?;
    Ok((sum, count))
}

/// [`masked_cross_entropy_sum`] through the fused CPU kernel: all `b·t` rows of `logits` go in
/// (no narrowed copy), row `(i, j)` scored against target `(i, j + 1)`, and each row's last
/// position weighted 0. Sums in the logits' dtype (f32, or f64 for exact gradient checks).
fn fused_cross_entropy_sum(
    logits: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    let rows = NextTokenRows::new(targets, mask)?;
    let losses = crate::fused::cross_entropy_rows(
        &logits.reshape((b * t, v))?,
        &rows.targets,
        &rows.weights,
    )?;
    Ok((losses.sum_all()?, rows.count))
}

/// `(b, t)` of a `[b, t, _]` input scored against `targets` and `mask` `[b, t]`; errors when
/// the shapes disagree or a sequence is too short to have a next token.
fn check_next_token_shapes(
    what: &str,
    input: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
) -> Result<(usize, usize)> {
    let (b, t, _) = input.dims3()?;
    if targets.dims() != [b, t] || mask.dims() != [b, t] {
        candle_core::bail!(
            "cross-entropy: {what} {:?} need targets and mask [{b}, {t}], got {:?} and {:?}",
            input.dims(),
            targets.dims(),
            mask.dims()
        );
    }
    if t < 2 {
        candle_core::bail!("cross-entropy: sequences need at least 2 tokens to predict a next one");
    }
    Ok((b, t))
}

/// The next-token targets of every position of `targets` `[b, t]`, flattened to `b·t` rows:
/// row `(i, j)` is scored against token `(i, j + 1)` with weight 1 where `mask[i, j + 1]` is
/// non-zero, and each sequence's last position (nothing to predict) with weight 0.
struct NextTokenRows {
    targets: Vec<u32>,
    weights: Vec<f32>,
    /// Rows with weight 1.
    count: usize,
}

impl NextTokenRows {
    fn new(targets: &Tensor, mask: &Tensor) -> Result<Self> {
        let ids = targets.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let keep = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut rows = Self {
            targets: Vec::new(),
            weights: Vec::new(),
            count: 0,
        };
        for (ids, keep) in ids.iter().zip(&keep) {
            let t = ids.len();
            for j in 0..t {
                let next = j + 1 < t;
                rows.targets.push(if next { ids[j + 1] } else { 0 });
                rows.weights
                    .push(if next && keep[j + 1] != 0.0 { 1.0 } else { 0.0 });
            }
        }
        rows.count = rows.weights.iter().filter(|&&w| w != 0.0).count();
        Ok(rows)
    }
}

/// [`masked_cross_entropy_sum`] of the logits `head(hidden)`: `hidden` `[b, t, h]` are a causal
/// LM's final (normed) hidden states and `head` its output projection.
///
/// On the CPU in f32/f64 with a frozen head (no adapter on it), the fused
/// [`linear_cross_entropy_rows`](crate::fused::linear_cross_entropy_rows) never materialises the
/// `[b, t, vocab]` logits or their gradient, and skips positions the mask leaves out.
/// Elsewhere this is `masked_cross_entropy_sum(&head.forward(hidden)?, targets, mask)`.
pub fn masked_head_cross_entropy_sum(
    hidden: &Tensor,
    head: &dyn LinearLayer,
    targets: &Tensor,
    mask: &Tensor,
) -> Result<(Tensor, usize)> {
    let frozen = head.frozen_parts();
    let (Some(frozen), true) = (frozen, crate::fused::supported(hidden)) else {
        return masked_cross_entropy_sum(&head.forward(hidden)?, targets, mask);
    };
    let (b, t) = check_next_token_shapes("hidden states", hidden, targets, mask)?;
    let h = hidden.dim(2)?;
    let rows = NextTokenRows::new(targets, mask)?;
    let losses = crate::fused::linear_cross_entropy_rows(
        &hidden.reshape((b * t, h))?,
        frozen.weight,
        frozen.bias,
        &rows.targets,
        &rows.weights,
    )?;
    Ok((losses.sum_all()?, rows.count))
}

/// Rows of logits [`masked_head_cross_entropy_sum`] holds at once for a batch of `positions`
/// positions (each row is `vocab` wide): one block of the fused head where it applies, every
/// position where the logits are materialised.
pub fn head_logit_rows(
    head: &dyn LinearLayer,
    device: &candle_core::Device,
    dtype: DType,
    positions: usize,
) -> usize {
    if head.frozen_parts().is_some() && crate::fused::supports(device, dtype) {
        positions.min(crate::fused::HEAD_BLOCK_ROWS)
    } else {
        positions
    }
}

/// Mean negative log-likelihood over masked positions (see [`masked_cross_entropy_sum`]).
/// Errors when no position is masked in, since the mean is then undefined.
pub fn masked_cross_entropy(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (sum, n) = masked_cross_entropy_sum(logits, targets, mask)?;
    if n == 0 {
        return Err(candle_core::Error::Msg(
            "cross-entropy: the mask selects no target tokens".into(),
        ));
    }
    sum.affine(1.0 / n as f64, 0.0)
}

/// Per sequence, the summed negative log-likelihood over masked positions of the logits
/// `head(hidden)` (see [`masked_head_cross_entropy_sum`]: same positions, same fused CPU path),
/// summed in f64. For scoring, not training: nothing here records a backward.
pub fn masked_head_nll_per_sequence(
    hidden: &Tensor,
    head: &dyn LinearLayer,
    targets: &Tensor,
    mask: &Tensor,
) -> Result<Vec<f64>> {
    let (b, t) = check_next_token_shapes("hidden states", hidden, targets, mask)?;
    let per_position: Vec<f32> = match (head.frozen_parts(), crate::fused::supported(hidden)) {
        (Some(frozen), true) => {
            let h = hidden.dim(2)?;
            let rows = NextTokenRows::new(targets, mask)?;
            crate::fused::linear_cross_entropy_rows(
                &hidden.reshape((b * t, h))?,
                frozen.weight,
                frozen.bias,
                &rows.targets,
                &rows.weights,
            )?
            .to_dtype(DType::F32)?
            .to_vec1()?
        }
        _ => {
            // Row (i, j) of `[b, t]` holds the loss of predicting token j + 1; the last
            // position of each row predicts nothing and is 0.
            let logits = head
                .forward(hidden)?
                .narrow(1, 0, t - 1)?
                .to_dtype(DType::F32)?;
            let next = targets
                .narrow(1, 1, t - 1)?
                .to_dtype(DType::U32)?
                .contiguous()?;
            let keep = mask
                .narrow(1, 1, t - 1)?
                .to_dtype(DType::F32)?
                .ne(0f32)?
                .to_dtype(DType::F32)?;
            let picked = log_softmax(&logits)?
                .gather(&next.unsqueeze(2)?, 2)?
                .squeeze(2)?;
            let losses = (picked * keep)?.neg()?;
            let zeros = Tensor::zeros((b, 1), DType::F32, losses.device())?;
            Tensor::cat(&[&losses, &zeros], 1)?
                .flatten_all()?
                .to_vec1()?
        }
    };
    Ok(per_position
        .chunks(t)
        .map(|row| row.iter().map(|&x| f64::from(x)).sum())
        .collect())
}
