//! Multi-head / grouped-query self-attention with rotary embeddings, a causal plus key-padding
//! mask and a composite softmax, computed in f32 (f64 for f64 models).

use candle_core::{DType, Result, Tensor, D};

use super::{internal_dtype, Rotary};
use crate::causal_lm::KvCache;
use crate::linear::LinearLayer;

/// Added to the scores of masked keys. Finite (unlike `-inf`) so that a query whose keys are
/// all masked (a left-padding row) gets uniform weights instead of NaN.
const MASKED: f64 = -1e9;

/// Head layout of an attention block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (equal to `num_heads` without grouped-query attention).
    pub num_kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
}

/// Self-attention: `q/k/v` projections, rotary, masked softmax attention, output projection.
pub struct Attention {
    q: Box<dyn LinearLayer>,
    k: Box<dyn LinearLayer>,
    v: Box<dyn LinearLayer>,
    o: Box<dyn LinearLayer>,
    shape: AttentionShape,
    rotary: Rotary,
}

impl Attention {
    /// Assembles an attention block; checks the projections' widths against `shape`.
    pub fn new(
        q: Box<dyn LinearLayer>,
        k: Box<dyn LinearLayer>,
        v: Box<dyn LinearLayer>,
        o: Box<dyn LinearLayer>,
        shape: AttentionShape,
        rotary: Rotary,
    ) -> Result<Self> {
        let AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
        } = shape;
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            candle_core::bail!(
                "{num_heads} attention heads are not a multiple of {num_kv_heads} key/value heads"
            );
        }
        let checks = [
            ("q", q.out_features(), num_heads * head_dim),
            ("k", k.out_features(), num_kv_heads * head_dim),
            ("v", v.out_features(), num_kv_heads * head_dim),
            ("o (input)", o.in_features(), num_heads * head_dim),
        ];
        for (name, got, want) in checks {
            if got != want {
                candle_core::bail!("attention projection {name} has width {got}, expected {want}");
            }
        }
        Ok(Self {
            q,
            k,
            v,
            o,
            shape,
            rotary,
        })
    }

    /// The projections with their local names (`q`, `k`, `v`, `o`), for walking a model.
    pub fn projections(&self) -> [(&'static str, &dyn LinearLayer); 4] {
        [
            ("q", &*self.q),
            ("k", &*self.k),
            ("v", &*self.v),
            ("o", &*self.o),
        ]
    }

    /// Attends `x` `[batch, seq, hidden]` at rotary `positions` `[batch, seq]` (u32) with
    /// `key_mask` `[batch, past + seq]` (u8, 1 = attend). With a cache, this chunk's keys and
    /// values are appended to `cache` slot `layer` first and attention covers all of them.
    pub fn forward(
        &self,
        x: &Tensor,
        positions: &Tensor,
        key_mask: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let scale = 1.0 / (self.shape.head_dim as f64).sqrt();
        let (q, k, v) = (self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?);
        let training = q.track_op() || k.track_op() || v.track_op();
        if !crate::fused::supported(&q) {
            return self.composite(q, k, v, positions, key_mask, cache);
        }
        let spec = self.fused_spec(scale);
        let out = match cache {
            // Training on the CPU: one node for all of attention (see `fused::attention`).
            None if training => {
                crate::fused::attention::causal_attention(&q, &k, &v, positions, key_mask, &spec)?
            }
            // Generation on the CPU: one pass over the cache (see `fused::cached_attention`).
            Some(cache) if !training => {
                crate::fused::cached_attention(&q, &k, &v, positions, key_mask, &spec, cache)?
            }
            cache => return self.composite(q, k, v, positions, key_mask, cache),
        };
        self.o.forward(&out)
    }

    /// Head layout and rotary parameters for the fused CPU kernels.
    fn fused_spec(&self, scale: f64) -> crate::fused::attention::AttentionSpec {
        crate::fused::attention::AttentionSpec {
            num_heads: self.shape.num_heads,
            num_kv_heads: self.shape.num_kv_heads,
            head_dim: self.shape.head_dim,
            rotary_dim: self.rotary.rotary_dim(),
            inv_freq: self.rotary.inv_freq().to_vec(),
            scale,
        }
    }

    /// Attention as candle tensor ops (any device and dtype, records a backward), from the
    /// projections' outputs `q`, `k`, `v`.
    fn composite(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        positions: &Tensor,
        key_mask: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (b, t, _) = q.dims3()?;
        let AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
        } = self.shape;
        let dtype = q.dtype();
        let work = internal_dtype(dtype);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            y.to_dtype(work)?
                .reshape((b, t, n, head_dim))?
                .transpose(1, 2)
        };
        let q = heads(q, num_heads)?;
        let k = heads(k, num_kv_heads)?;
        let v = heads(v, num_kv_heads)?.contiguous()?;
        let (q, k) = self.rotary.apply_qk(&q, &k, positions, work)?;
        let k = k.contiguous()?;
        let (k, v) = match cache {
            // A cache may store its keys and values in a narrower dtype (`KvCache::store_as`).
            Some((cache, layer)) => {
                let (k, v) = cache.append(layer, &k, &v)?;
                (k.to_dtype(work)?, v.to_dtype(work)?)
            }
            None => (k, v),
        };
        let kv_len = k.dim(2)?;
        let past = kv_len.checked_sub(t).ok_or_else(|| {
            candle_core::Error::Msg(format!("KV cache shorter ({kv_len}) than the chunk ({t})"))
        })?;
        let n_rep = num_heads / num_kv_heads;
        // Grouped-query attention without copying keys and values per query head: the
        // `n_rep` query heads sharing a key/value head (consecutive heads, as in HF's
        // `repeat_kv`) are stacked along the sequence axis, `[b, kv, n_rep * t, d]`, so one
        // batched matmul per key/value head covers them. Keys are used through a transposed
        // view: the matmul reads the strides, no transposed copy is made.
        let q = q
            .contiguous()?
            .reshape((b, num_kv_heads, n_rep * t, head_dim))?;
        let scores = q.matmul(&k.t()?)?;
        let bias = mask_bias(key_mask, b, t, past, work)?;
        let probs = if crate::fused::supported(&scores) {
            // One pass that scales, masks and normalises, with a backward (candle-nn's
            // `softmax_last_dim` has none). Seen per query head, the scores are
            // `[b, heads, t, kv_len]`, which is what the mask broadcasts over.
            let per_head = scores.reshape((b, num_heads, t, kv_len))?;
            crate::fused::scaled_masked_softmax(&per_head, scale, &bias)?.reshape((
                b,
                num_kv_heads,
                n_rep * t,
                kv_len,
            ))?
        } else {
            let scores = (scores * scale)?
                .reshape((b, num_kv_heads, n_rep, t, kv_len))?
                .broadcast_add(&bias.unsqueeze(1)?)?
                .reshape((b, num_kv_heads, n_rep * t, kv_len))?;
            if scores.track_op() {
                // Composite softmax: `softmax_last_dim` is a fused kernel with no backward.
                candle_nn::ops::softmax(&scores, D::Minus1)?
            } else {
                candle_nn::ops::softmax_last_dim(&scores)?
            }
        };
        let out = probs
            .matmul(&v)?
            .reshape((b, num_heads, t, head_dim))?
            .transpose(1, 2)?
            .reshape((b, t, num_heads * head_dim))?
            .to_dtype(dtype)?;
        self.o.forward(&out)
    }
}

/// Additive mask `[batch, 1, seq, past + seq]`: 0 where query `i` (absolute index `past + i`)
/// may see key `j` (causal and not padding), [`MASKED`] elsewhere.
fn mask_bias(key_mask: &Tensor, b: usize, t: usize, past: usize, dtype: DType) -> Result<Tensor> {
    let kv = past + t;
    let (mb, mk) = key_mask.dims2()?;
    if (mb, mk) != (b, kv) {
        candle_core::bail!(
            "key mask is [{mb}, {mk}] but attention needs [batch {b}, past + seq {kv}]"
        );
    }
    let dev = key_mask.device();
    let q_idx = Tensor::arange(past as u32, kv as u32, dev)?.reshape((t, 1))?;
    let k_idx = Tensor::arange(0u32, kv as u32, dev)?.reshape((1, kv))?;
    let causal = k_idx.broadcast_le(&q_idx)?.to_dtype(dtype)?.unsqueeze(0)?;
    let keys = key_mask.ne(0u8)?.to_dtype(dtype)?.unsqueeze(1)?;
    let allowed = causal.broadcast_mul(&keys)?;
    // allowed 1 -> 0, allowed 0 -> MASKED.
    allowed.affine(-MASKED, MASKED)?.unsqueeze(1)
}
