//! The interface generation needs from a decoder-only language model, and its KV cache.

use candle_core::{DType, Device, Result, Tensor};

/// Keys and values of past positions, one entry per transformer layer.
///
/// Each layer's keys and values live in a buffer `[batch, kv_heads, capacity, head_dim]` of which
/// the first `len` positions are filled; [`KvCache::append`] writes a chunk after them in place
/// and returns views of the filled part. Why: concatenating every step copies the whole cache
/// per new token, which over a generation is quadratic in its length (a few percent of every
/// decoding step on the CPU, measured). A generation reserves its length up front
/// ([`KvCache::reserve`]) so its buffers are made once; otherwise they grow 256 positions at a
/// time. The cache is only used for generation; training runs full sequences without it.
///
/// Keys and values are stored in the model's compute dtype unless [`KvCache::store_as`] names
/// another: `f16` halves the cache (at batch 32 and a few hundred positions it is most of a
/// generation's memory, and on the CPU reading it is most of a decoding step's memory traffic)
/// at the cost of rounding each key and value to 11 significant bits, as llama.cpp's default
/// cache does. Attention widens them back to the compute dtype.
///
/// Not `Clone`: the buffers are written in place, so a copy sharing them would overwrite the
/// original's positions as it appended.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<CachedLayer>>,
    /// Positions to allocate room for at once ([`KvCache::reserve`]).
    reserved: usize,
    /// The dtype keys and values are stored in; `None` keeps the dtype they arrive in.
    storage: Option<DType>,
}

/// One layer's buffers (see [`KvCache`]).
#[derive(Debug)]
struct CachedLayer {
    keys: Tensor,
    values: Tensor,
    len: usize,
}

/// Positions a layer's buffer grows by (and holds at first, unless more were reserved).
const CAPACITY_STEP: usize = 256;

impl CachedLayer {
    fn capacity(&self) -> usize {
        self.keys.dims().get(2).copied().unwrap_or(0)
    }

    /// The filled part of the buffers.
    fn filled(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.keys.narrow(2, 0, self.len)?,
            self.values.narrow(2, 0, self.len)?,
        ))
    }
}

/// A zeroed buffer shaped like `like` (`[batch, kv_heads, _, head_dim]`) with room for
/// `capacity` positions.
fn buffer(like: &Tensor, capacity: usize) -> Result<Tensor> {
    let (b, h, _, d) = like.dims4()?;
    Tensor::zeros((b, h, capacity, d), like.dtype(), like.device())
}

impl KvCache {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            reserved: 0,
            storage: None,
        }
    }

    /// Stores keys and values as `dtype` from now on (see [`KvCache`]); call it before the
    /// first [`KvCache::append`]. Errors once positions are cached in another dtype, since
    /// one layer's buffer holds one dtype.
    pub fn store_as(&mut self, dtype: DType) -> Result<()> {
        if let Some(entry) = self.layers.iter().flatten().next() {
            if entry.keys.dtype() != dtype {
                candle_core::bail!(
                    "KV cache already holds {:?} keys; choose its dtype before the first append",
                    entry.keys.dtype()
                );
            }
        }
        self.storage = Some(dtype);
        Ok(())
    }

    /// The dtype keys and values are stored in (`None`: the dtype they arrive in).
    pub fn storage_dtype(&self) -> Option<DType> {
        self.storage
    }

    /// Makes room for `positions` positions in total when a layer's buffer is first made (or
    /// grown), e.g. a generation's prompt plus its new tokens, so the buffers are allocated
    /// once at the size the generation needs.
    pub fn reserve(&mut self, positions: usize) {
        self.reserved = self.reserved.max(positions);
    }

    /// Appends this chunk's keys and values (`[batch, kv_heads, seq, head_dim]`) for `layer` and
    /// returns all of that layer's keys and values so far (views of the cache's buffers, in the
    /// storage dtype).
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.storage {
            Some(dtype) => (k.to_dtype(dtype)?, v.to_dtype(dtype)?),
            None => (k.clone(), v.clone()),
        };
        let (k, v) = (&k, &v);
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| candle_core::Error::Msg(format!("KV cache has no layer {layer}")))?;
        let t = k.dim(2)?;
        if v.dims() != k.dims() {
            candle_core::bail!(
                "KV cache: keys {:?} and values {:?} differ in shape",
                k.dims(),
                v.dims()
            );
        }
        // Room for what is needed now, in steps of `CAPACITY_STEP` positions (doubling would
        // overshoot by up to the whole cache, which at a large batch is hundreds of MiB), and
        // at least what was reserved.
        let capacity_for =
            |needed: usize| needed.next_multiple_of(CAPACITY_STEP).max(self.reserved);
        let entry = match slot.take() {
            Some(entry) if entry.len + t <= entry.capacity() => entry,
            Some(entry) => {
                // Grow: copy the filled part into a larger buffer.
                let capacity = capacity_for(entry.len + t);
                let (keys, values) = (buffer(k, capacity)?, buffer(v, capacity)?);
                let (filled_k, filled_v) = entry.filled()?;
                keys.slice_set(&filled_k.contiguous()?, 2, 0)?;
                values.slice_set(&filled_v.contiguous()?, 2, 0)?;
                CachedLayer {
                    keys,
                    values,
                    len: entry.len,
                }
            }
            None => {
                let capacity = capacity_for(t);
                CachedLayer {
                    keys: buffer(k, capacity)?,
                    values: buffer(v, capacity)?,
                    len: 0,
                }
            }
        };
        // `slice_set` writes the buffer in place and records no graph: generation never
        // backpropagates, and cached keys must not keep every step's graph alive.
        entry.keys.slice_set(&k.contiguous()?, 2, entry.len)?;
        entry.values.slice_set(&v.contiguous()?, 2, entry.len)?;
        let entry = CachedLayer {
            len: entry.len + t,
            ..entry
        };
        let filled = entry.filled()?;
        *slot = Some(entry);
        Ok(filled)
    }

    /// Number of cached positions of `layer` (0 when empty or out of range).
    pub fn layer_len(&self, layer: usize) -> usize {
        self.layers
            .get(layer)
            .and_then(Option::as_ref)
            .map_or(0, |entry| entry.len)
    }

    /// Number of cached positions (0 when empty).
    pub fn seq_len(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .map_or(0, |entry| entry.len)
    }

    /// Keeps only the batch rows in `rows` (in that order), e.g. to drop finished sequences.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for entry in self.layers.iter_mut().flatten() {
            entry.keys = entry.keys.index_select(rows, 0)?;
            entry.values = entry.values.index_select(rows, 0)?;
        }
        Ok(())
    }
}

/// A decoder-only language model that can be run one chunk at a time with a KV cache.
pub trait CausalLm {
    /// Logits `[batch, seq, vocab]` in f32 for `input_ids` `[batch, seq]` (u32).
    ///
    /// `positions` `[batch, seq]` (u32) are the rotary positions of these tokens (they differ per
    /// row when prompts are left-padded). `key_mask` `[batch, past + seq]` (u8, 1 = attend) masks
    /// padding keys; attention is also causal. The cache is extended with this chunk.
    fn forward_cached(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        key_mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor>;

    /// As [`CausalLm::forward_cached`], but only the logits of the last position, `[batch,
    /// vocab]` in f32. Generation needs nothing else; models override it to skip the LM head
    /// on the other positions (over a 128-token prefill chunk that head is a fifth of the
    /// work, and a `[batch, 128, vocab]` block of memory).
    fn forward_cached_last(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        key_mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let logits = self.forward_cached(input_ids, positions, key_mask, cache)?;
        let t = logits.dim(1)?;
        if t == 0 {
            candle_core::bail!("forward_cached_last needs at least one position");
        }
        logits.narrow(1, t - 1, 1)?.squeeze(1)?.contiguous()
    }

    /// A fresh, empty cache sized for this model.
    fn new_cache(&self) -> KvCache;

    /// Vocabulary size (the logits' last dimension).
    fn vocab_size(&self) -> usize;

    /// The device the model's weights live on.
    fn device(&self) -> &Device;
}
