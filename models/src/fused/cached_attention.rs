//! Inference attention on the CPU with a KV cache, as one pass: rotary on the chunk's queries and
//! keys, the rotated keys and the values appended to the cache, then `softmax(scale·QKᵀ + mask)·V`
//! per head with grouped-query sharing, heads merged back. No gradient is recorded: this is
//! generation's path (the training path is [`super::attention`]).
//!
//! Why: as tensor ops, attention over a KV cache is some twenty candle ops per layer (head
//! reshapes and transposes, the rotary arithmetic, an additive mask built per layer, two
//! batched matmuls that candle hands to rayon's pool, the softmax, the merge). At one new token
//! per step those ops are tiny and their overhead is the cost: measured on SmolLM2-135M at
//! batch 1, they took a quarter of every decoding step. Here the products run on the `gemm`
//! crate's kernels on the calling thread, one task per (batch row, key/value head), spread over
//! the inference thread team (`team.rs`).
//!
//! The values are the composite attention's (`layers::attention`) up to the order of additions:
//! the same rotary angles in f32, the same additive mask (so a query that sees no key at all gets
//! uniform weights), the same softmax; the tests compare the two. A cache that stores its keys
//! and values narrower (`KvCache::store_as`, e.g. f16) is read, for one new token per row on a
//! CPU with F16C, by kernels that widen each cached row in registers (`f16_kv.rs`); otherwise
//! (prefill chunks, bf16, other CPUs) by widening one head's keys and values at a time into a
//! task-local buffer for the general products.

use std::sync::Mutex;

use candle_core::{DType, Result, Tensor};

use super::attention::{rotate_rows, AttentionSpec};
use super::gemm::{matmul, matmul_acc, MatRef, Threads};
use super::softmax::softmax_in_place;
use super::Float;
use crate::causal_lm::KvCache;

/// Added to the scores of keys a query may not see, as the composite attention does.
const MASKED: f64 = -1e9;

/// Attention of a chunk of queries `[batch, seq, heads·head_dim]`, keys and values `[batch, seq,
/// kv_heads·head_dim]` (the projections' outputs) at rotary `positions` `[batch, seq]` (u32)
/// against slot `layer` of `cache` and themselves; `key_mask` `[batch, past + seq]` (u8, 1 =
/// attend) on top of the causal mask. The chunk's rotated keys and its values are appended to
/// the cache. Returns `[batch, seq, heads·head_dim]`, the output projection's input.
///
/// CPU, f32 or f64 (see [`super::supported`]), inputs that record no graph.
pub fn cached_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    positions: &Tensor,
    key_mask: &Tensor,
    spec: &AttentionSpec,
    (cache, layer): (&mut KvCache, usize),
) -> Result<Tensor> {
    match q.dtype() {
        DType::F32 => run::<f32>(q, k, v, positions, key_mask, spec, cache, layer),
        DType::F64 => run::<f64>(q, k, v, positions, key_mask, spec, cache, layer),
        other => candle_core::bail!("cached attention takes f32 or f64, not {other:?}"),
    }
}

/// The shapes of one call.
struct Dims {
    batch: usize,
    seq: usize,
    /// Cached positions before this chunk.
    past: usize,
}

impl Dims {
    /// Keys after this chunk is appended.
    fn keys(&self) -> usize {
        self.past + self.seq
    }
}

#[allow(clippy::too_many_arguments)]
fn run<T: Float>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    positions: &Tensor,
    key_mask: &Tensor,
    spec: &AttentionSpec,
    cache: &mut KvCache,
    layer: usize,
) -> Result<Tensor> {
    let (batch, seq, _) = q.dims3()?;
    let dims = Dims {
        batch,
        seq,
        past: cache.layer_len(layer),
    };
    check(q, k, v, positions, key_mask, spec, &dims)?;
    let hd = spec.head_dim;
    let device = q.device().clone();
    let rotary = Rotary::new(spec, positions)?;
    // Keys rotated and values, both as `[batch, kv_heads, seq, head_dim]` for the cache.
    let heads_of = |x: &Tensor, rotate: bool| -> Result<Tensor> {
        let x = x.contiguous()?.flatten_all()?.to_vec1::<T>()?;
        let mut out = Vec::with_capacity(x.len());
        for bi in 0..batch {
            for g in 0..spec.num_kv_heads {
                let start = out.len();
                for i in 0..seq {
                    let at = (bi * seq + i) * spec.num_kv_heads * hd + g * hd;
                    out.extend_from_slice(&x[at..at + hd]);
                }
                if rotate {
                    rotary.rotate(&mut out[start..], bi);
                }
            }
        }
        Tensor::from_vec(out, (batch, spec.num_kv_heads, seq, hd), &device)
    };
    let (keys, values) = cache.append(layer, &heads_of(k, true)?, &heads_of(v, false)?)?;
    let key_mask = key_mask
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let q = q.contiguous()?.flatten_all()?.to_vec1::<T>()?;
    let (k_storage, k_layout) = keys.storage_and_layout();
    let (v_storage, v_layout) = values.storage_and_layout();
    let k_heads = CachedHeads::<T>::new(&k_storage, k_layout, &dims, spec)?;
    let v_heads = CachedHeads::<T>::new(&v_storage, v_layout, &dims, spec)?;

    let group = spec.num_heads / spec.num_kv_heads;
    let width = spec.num_heads * hd;
    let tasks = batch * spec.num_kv_heads;
    // Each task writes its own heads' rows; a mutex per task keeps that safe at no contention.
    let outputs: Vec<Mutex<Option<Result<Vec<T>>>>> =
        (0..tasks).map(|_| Mutex::new(None)).collect();
    let task = |t: usize| {
        let (bi, g) = (t / spec.num_kv_heads, t % spec.num_kv_heads);
        let result = attend_group(
            &q, &key_mask, &k_heads, &v_heads, &rotary, spec, &dims, bi, g,
        );
        if let Ok(mut slot) = outputs[t].lock() {
            *slot = Some(result);
        }
    };
    crate::team::Team::global().run(tasks, &task);
    let mut merged = vec![T::from_f64(0.0); batch * seq * width];
    for (t, slot) in outputs.into_iter().enumerate() {
        let (bi, g) = (t / spec.num_kv_heads, t % spec.num_kv_heads);
        let rows = slot.into_inner().ok().flatten().ok_or_else(|| {
            candle_core::Error::Msg("cached attention: a task did not run".into())
        })??;
        for (j, head) in rows.chunks(seq * hd).enumerate() {
            let h = g * group + j;
            for i in 0..seq {
                merged[(bi * seq + i) * width + h * hd..][..hd]
                    .copy_from_slice(&head[i * hd..][..hd]);
            }
        }
    }
    Tensor::from_vec(merged, (batch, seq, width), &device)
}

/// Refuses shapes that do not fit together.
fn check(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    positions: &Tensor,
    key_mask: &Tensor,
    spec: &AttentionSpec,
    dims: &Dims,
) -> Result<()> {
    let Dims { batch, seq, .. } = *dims;
    spec.check_projections("cached attention", (q, k, v), (batch, seq))?;
    if positions.dims() != [batch, seq] || key_mask.dims() != [batch, dims.keys()] {
        candle_core::bail!(
            "cached attention: positions {:?} must be [{batch}, {seq}] and the key mask {:?} \
             [{batch}, {}]",
            positions.dims(),
            key_mask.dims(),
            dims.keys()
        );
    }
    Ok(())
}

/// Rotary tables for the chunk's positions.
struct Rotary {
    head_dim: usize,
    half: usize,
    seq: usize,
    /// `[batch, seq, rotary_dim / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rotary {
    fn new(spec: &AttentionSpec, positions: &Tensor) -> Result<Self> {
        let (_, seq) = positions.dims2()?;
        let positions = positions
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        let (cos, sin) = spec.rotary_tables(&positions);
        Ok(Self {
            head_dim: spec.head_dim,
            half: spec.rotary_dim / 2,
            seq,
            cos,
            sin,
        })
    }

    /// Rotates `[seq, head_dim]` rows of batch row `bi` in place.
    fn rotate<T: Float>(&self, rows: &mut [T], bi: usize) {
        let at = bi * self.seq * self.half..(bi + 1) * self.seq * self.half;
        let tables = (&self.cos[at.clone()], &self.sin[at]);
        rotate_rows(rows, (self.head_dim, self.half), tables, false);
    }
}

/// Per-(batch row, key/value head) matrix views `[keys, head_dim]` of a cache buffer's filled
/// part (`[batch, kv_heads, keys, head_dim]` with any outer strides).
struct HeadViews<'a, T> {
    data: &'a [T],
    start: usize,
    batch_stride: usize,
    head_stride: usize,
    keys: usize,
    head_dim: usize,
}

/// A cache buffer's heads in the dtype the cache stores them in.
enum CachedHeads<'a, T> {
    /// Stored in the compute dtype: used in place.
    Compute(HeadViews<'a, T>),
    /// Stored as f16: widened per head.
    F16(HeadViews<'a, half::f16>),
    /// Stored as bf16: widened per head.
    Bf16(HeadViews<'a, half::bf16>),
}

impl<'a, T: Float> CachedHeads<'a, T> {
    fn new(
        storage: &'a candle_core::Storage,
        layout: &candle_core::Layout,
        dims: &Dims,
        spec: &AttentionSpec,
    ) -> Result<Self> {
        Ok(match storage.dtype() {
            dtype if dtype == T::DTYPE => {
                Self::Compute(HeadViews::new(storage, layout, dims, spec)?)
            }
            DType::F16 => Self::F16(HeadViews::new(storage, layout, dims, spec)?),
            DType::BF16 => Self::Bf16(HeadViews::new(storage, layout, dims, spec)?),
            other => candle_core::bail!(
                "cached attention: a KV cache stored as {other:?} cannot be read by a {:?} model",
                T::DTYPE
            ),
        })
    }

    /// Head `g` of batch row `bi` as a `[keys, head_dim]` matrix in the compute dtype: a view of
    /// the cache, or its values widened into `scratch`.
    fn head<'s>(&'s self, bi: usize, g: usize, scratch: &'s mut Vec<T>) -> Result<MatRef<'s, T>> {
        match self {
            Self::Compute(heads) => heads.head(bi, g),
            Self::F16(heads) => heads.widened(bi, g, scratch, T::widen_f16),
            Self::Bf16(heads) => heads.widened(bi, g, scratch, T::widen_bf16),
        }
    }
}

impl<S: candle_core::WithDType> HeadViews<'_, S> {
    /// Head `g` of batch row `bi` widened by `widen` into `scratch`, as a `[keys, head_dim]`
    /// matrix.
    fn widened<'s, T: Float>(
        &self,
        bi: usize,
        g: usize,
        scratch: &'s mut Vec<T>,
        widen: fn(&[S], &mut [T]),
    ) -> Result<MatRef<'s, T>> {
        let stored = self.rows(bi, g)?;
        scratch.resize(stored.len(), T::from_f64(0.0));
        widen(stored, scratch);
        MatRef::new(&scratch[..stored.len()], self.keys, self.head_dim)
    }
}

impl<'a, T: candle_core::WithDType> HeadViews<'a, T> {
    fn new(
        storage: &'a candle_core::Storage,
        layout: &candle_core::Layout,
        dims: &Dims,
        spec: &AttentionSpec,
    ) -> Result<Self> {
        let candle_core::Storage::Cpu(cpu) = storage else {
            candle_core::bail!("cached attention: the KV cache is not on the CPU");
        };
        let want = [dims.batch, spec.num_kv_heads, dims.keys(), spec.head_dim];
        let &[batch_stride, head_stride, row_stride, 1] = layout.stride() else {
            candle_core::bail!(
                "cached attention: unexpected KV cache strides {:?}",
                layout.stride()
            );
        };
        if layout.dims() != want || row_stride != spec.head_dim {
            candle_core::bail!(
                "cached attention: KV cache is {:?} (strides {:?}), expected {want:?}",
                layout.dims(),
                layout.stride()
            );
        }
        Ok(Self {
            data: cpu.as_slice::<T>()?,
            start: layout.start_offset(),
            batch_stride,
            head_stride,
            keys: dims.keys(),
            head_dim: spec.head_dim,
        })
    }

    /// The `[keys, head_dim]` rows of head `g` of batch row `bi`, row-major.
    fn rows(&self, bi: usize, g: usize) -> Result<&'a [T]> {
        let at = self.start + bi * self.batch_stride + g * self.head_stride;
        self.data
            .get(at..at + self.keys * self.head_dim)
            .ok_or_else(|| candle_core::Error::Msg("cached attention: short KV cache".into()))
    }

    fn head(&self, bi: usize, g: usize) -> Result<MatRef<'a, T>> {
        MatRef::new(self.rows(bi, g)?, self.keys, self.head_dim)
    }
}

/// The output rows `[group, seq, head_dim]` of the query heads sharing key/value head `g` of
/// batch row `bi`.
#[allow(clippy::too_many_arguments)]
fn attend_group<T: Float>(
    q: &[T],
    key_mask: &[u8],
    k_heads: &CachedHeads<'_, T>,
    v_heads: &CachedHeads<'_, T>,
    rotary: &Rotary,
    spec: &AttentionSpec,
    dims: &Dims,
    bi: usize,
    g: usize,
) -> Result<Vec<T>> {
    let (seq, hd, n_keys) = (dims.seq, spec.head_dim, dims.keys());
    let group = spec.num_heads / spec.num_kv_heads;
    let width = spec.num_heads * hd;
    let (mut k_scratch, mut v_scratch) = (Vec::new(), Vec::new());
    let keys = k_heads.head(bi, g, &mut k_scratch)?;
    let values = v_heads.head(bi, g, &mut v_scratch)?;
    let mask = &key_mask[bi * n_keys..][..n_keys];
    let first_key = mask.iter().position(|&m| m != 0).unwrap_or(n_keys);
    if let (1, CachedHeads::F16(keys), CachedHeads::F16(values)) = (seq, k_heads, v_heads) {
        let (keys, values) = (keys.rows(bi, g)?, values.rows(bi, g)?);
        if let Some(out) = decoding_step_on_f16(q, mask, (keys, values), rotary, spec, bi, g) {
            return Ok(out);
        }
    }
    let scale = T::from_f64(spec.scale);
    let masked = T::from_f64(MASKED);
    let mut out = Vec::with_capacity(group * seq * hd);
    let mut q_rot = Vec::with_capacity(seq * hd);
    let mut scores = vec![T::from_f64(0.0); seq * n_keys];
    for j in 0..group {
        let h = g * group + j;
        q_rot.clear();
        for i in 0..seq {
            q_rot.extend_from_slice(&q[(bi * seq + i) * width + h * hd..][..hd]);
        }
        rotary.rotate(&mut q_rot, bi);
        scores.fill(T::from_f64(0.0));
        matmul_acc(
            &mut scores,
            MatRef::new(&q_rot, seq, hd)?,
            keys.t(),
            scale,
            Threads::One,
        )?;
        for (i, row) in scores.chunks_mut(n_keys).enumerate() {
            // Query `i` sits at absolute position `past + i`: later keys are masked, and their
            // weights are exactly zero unless the query sees no key at all (a padding row), when
            // the softmax spreads over every (equally masked) key, as the composite ops do.
            let last = dims.past + i;
            let visible = if first_key <= last { last + 1 } else { n_keys };
            let (row, future) = row.split_at_mut(visible);
            for (jk, s) in row.iter_mut().enumerate() {
                if jk > last || mask[jk] == 0 {
                    *s += masked;
                }
            }
            softmax_in_place(row);
            future.fill(T::from_f64(0.0));
        }
        out.extend(matmul(
            MatRef::new(&scores, seq, n_keys)?,
            values,
            T::ONE,
            Threads::One,
        )?);
    }
    Ok(out)
}

/// [`attend_group`] for one new token per row over an f16 cache, through the kernels that read
/// the cache as it is stored ([`super::f16_kv`]); `None` where they do not apply (another CPU,
/// head shape or compute dtype), and the caller widens the cache instead.
fn decoding_step_on_f16<T: Float>(
    q: &[T],
    mask: &[u8],
    (keys, values): (&[half::f16], &[half::f16]),
    rotary: &Rotary,
    spec: &AttentionSpec,
    bi: usize,
    g: usize,
) -> Option<Vec<T>> {
    if T::DTYPE != DType::F32 {
        return None;
    }
    let hd = spec.head_dim;
    let group = spec.num_heads / spec.num_kv_heads;
    let width = spec.num_heads * hd;
    let n_keys = mask.len();
    // The group's rotated queries, `[group, head_dim]`.
    let mut q_rot: Vec<T> = Vec::with_capacity(group * hd);
    for j in 0..group {
        let h = g * group + j;
        let start = q_rot.len();
        q_rot.extend_from_slice(&q[bi * width + h * hd..][..hd]);
        rotary.rotate(&mut q_rot[start..], bi);
    }
    let q_rot: Vec<f32> = q_rot.iter().map(|x| x.to_f64() as f32).collect();
    let mut scores = super::f16_kv::scores(&q_rot, keys, hd, spec.scale as f32)?;
    // The new token sits after every cached position, so only padding is masked; a row that
    // sees no key at all spreads over every (equally masked) key, as in `attend_group`.
    for row in scores.chunks_mut(n_keys) {
        for (s, &m) in row.iter_mut().zip(mask) {
            if m == 0 {
                *s += MASKED as f32;
            }
        }
        softmax_in_place(row);
    }
    let out = super::f16_kv::weighted_values(&scores, values, hd)?;
    Some(out.into_iter().map(|x| T::from_f64(f64::from(x))).collect())
}
