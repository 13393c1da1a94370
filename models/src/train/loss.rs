//! Masked causal-LM cross-entropy, computed in f32 with a composite log-softmax so that backward
//! is recorded (candle's fused `softmax_last_dim` records none).

use candle_core::{DType, Result, Tensor, D};

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
/// `logits` `[b, t, V]` (any float dtype, upcast to f32), `targets` `[b, t]` (token ids, u32 or
/// i64), `mask` `[b, t]` (any dtype, non-zero = counts). As in causal LMs, position `i`'s logits
/// predict token `i + 1`: logits `[:, :-1]` are scored against targets `[:, 1:]` under
/// mask `[:, 1:]`. Returns an f32 scalar and the masked-token count.
pub fn masked_cross_entropy_sum(
    logits: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
) -> Result<(Tensor, usize)> {
    let (b, t, _v) = logits.dims3()?;
    if targets.dims() != [b, t] || mask.dims() != [b, t] {
        return Err(candle_core::Error::Msg(format!(
            "cross-entropy: logits {:?} need targets and mask [{b}, {t}], got {:?} and {:?}",
            logits.dims(),
            targets.dims(),
            mask.dims()
        )));
    }
    if t < 2 {
        return Err(candle_core::Error::Msg(
            "cross-entropy: sequences need at least 2 tokens to predict a next one".into(),
        ));
    }
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
    let ids = targets.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let keep = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut row_targets = Vec::with_capacity(b * t);
    let mut row_weights = Vec::with_capacity(b * t);
    for (ids, keep) in ids.iter().zip(&keep) {
        for j in 0..t {
            let next = j + 1 < t;
            row_targets.push(if next { ids[j + 1] } else { 0 });
            row_weights.push(if next && keep[j + 1] != 0.0 { 1.0 } else { 0.0 });
        }
    }
    let count = row_weights.iter().filter(|&&w| w != 0.0).count();
    let rows =
        crate::fused::cross_entropy_rows(&logits.reshape((b * t, v))?, &row_targets, &row_weights)?;
    Ok((rows.sum_all()?.to_dtype(DType::F32)?, count))
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
