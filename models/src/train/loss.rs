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
