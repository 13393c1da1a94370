//! Rotary position embeddings in Hugging Face's "rotate_half" (GPT-NeoX) layout, with partial
//! rotary (Phi rotates only the first `rotary_dim` channels of each head), from basic ops.

use candle_core::{DType, Result, Tensor, D};

/// Rotary embedding parameters for one head size.
#[derive(Debug, Clone)]
pub struct Rotary {
    inv_freq: Vec<f32>,
    rotary_dim: usize,
    head_dim: usize,
}

impl Rotary {
    /// Rotary for heads of `head_dim` channels, rotating the first `rotary_dim` (even, at most
    /// `head_dim`) with base frequency `theta`.
    pub fn new(head_dim: usize, rotary_dim: usize, theta: f64) -> Result<Self> {
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
            candle_core::bail!(
                "rotary dimension {rotary_dim} must be even, positive and at most the head size {head_dim}"
            );
        }
        // Same formula and f32 precision as HF: 1 / theta^(2i / rotary_dim).
        let inv_freq = (0..rotary_dim)
            .step_by(2)
            .map(|i| 1.0 / (theta as f32).powf(i as f32 / rotary_dim as f32))
            .collect();
        Ok(Self {
            inv_freq,
            rotary_dim,
            head_dim,
        })
    }

    /// The inverse frequencies, one per rotated channel pair (`rotary_dim / 2`).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Number of rotated channels per head.
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim
    }

    /// `cos` and `sin` tables `[batch, 1, seq, rotary_dim]` in `dtype` for `positions`
    /// `[batch, seq]` (u32).
    pub fn cos_sin(&self, positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let pos = positions.to_dtype(DType::F32)?.unsqueeze(2)?;
        let inv = Tensor::new(self.inv_freq.as_slice(), positions.device())?.reshape((1, 1, ()))?;
        let freqs = pos.broadcast_mul(&inv)?;
        let emb = Tensor::cat(&[&freqs, &freqs], 2)?;
        let cos = emb.cos()?.to_dtype(dtype)?.unsqueeze(1)?;
        let sin = emb.sin()?.to_dtype(dtype)?.unsqueeze(1)?;
        Ok((cos, sin))
    }

    /// Rotates queries `[batch, heads, seq, head_dim]` and keys `[batch, kv_heads, seq,
    /// head_dim]` at `positions` `[batch, seq]` (u32), computing in `dtype`.
    ///
    /// When neither records a backward, rotary covers the whole head and `dtype` is f32, this
    /// is candle's fused `rope` kernel (same products and sums, so the same values), one pass
    /// instead of the eight ops of the composite form.
    pub fn apply_qk(
        &self,
        q: &Tensor,
        k: &Tensor,
        positions: &Tensor,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let fused = dtype == DType::F32
            && self.rotary_dim == self.head_dim
            && !q.track_op()
            && !k.track_op()
            && q.dtype() == DType::F32
            && k.dtype() == DType::F32;
        if fused {
            // The fused kernel takes the half-width tables `[batch, seq, rotary_dim / 2]`.
            let pos = positions.to_dtype(DType::F32)?.unsqueeze(2)?;
            let inv =
                Tensor::new(self.inv_freq.as_slice(), positions.device())?.reshape((1, 1, ()))?;
            let freqs = pos.broadcast_mul(&inv)?;
            let (cos, sin) = (freqs.cos()?, freqs.sin()?);
            let rope = |x: &Tensor| candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin);
            return Ok((rope(q)?, rope(k)?));
        }
        let (cos, sin) = self.cos_sin(positions, dtype)?;
        Ok((self.apply(q, &cos, &sin)?, self.apply(k, &cos, &sin)?))
    }

    /// Rotates `x` `[batch, heads, seq, head_dim]` by the tables from [`Rotary::cos_sin`].
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let hd = x.dim(D::Minus1)?;
        if hd != self.head_dim {
            candle_core::bail!("rotary expects head size {} but got {hd}", self.head_dim);
        }
        let rd = self.rotary_dim;
        let x_rot = x.narrow(D::Minus1, 0, rd)?;
        let half = rd / 2;
        let x1 = x_rot.narrow(D::Minus1, 0, half)?;
        let x2 = x_rot.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        let out = (x_rot.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?;
        if rd == hd {
            Ok(out)
        } else {
            let x_pass = x.narrow(D::Minus1, rd, hd - rd)?;
            Tensor::cat(&[&out, &x_pass], D::Minus1)
        }
    }
}
