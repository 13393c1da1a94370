//! Small but real `CausalLm`s for testing the generation loop: a random-weight attention model
//! that honours positions, key mask and cache, and a table-driven model whose output is scripted.

#![allow(dead_code)]

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Tensor, D};
use pipeline_models::{CausalLm, KvCache};

/// A tiny decoder: token + absolute position embeddings, `layers` single-head attention
/// blocks with residuals, and an output head. Weights are random but fixed by `seed`.
pub struct TinyLm {
    embed: Tensor,
    pos_embed: Tensor,
    layers: Vec<[Tensor; 4]>,
    head: Tensor,
    vocab: usize,
    hidden: usize,
    device: Device,
    /// Rows of every `forward_cached` input, in call order (to observe batching).
    pub calls: Mutex<Vec<(usize, usize)>>,
}

impl TinyLm {
    pub fn new(vocab: usize, hidden: usize, layers: usize, max_pos: usize, seed: u64) -> Self {
        let device = Device::Cpu;
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut rand = |n: usize, scale: f32| -> Tensor {
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (((state >> 33) as f64 / (1u64 << 31) as f64) as f32 - 0.5) * 2.0 * scale
                })
                .collect();
            Tensor::from_vec(v, n, &Device::Cpu).unwrap()
        };
        let embed = rand(vocab * hidden, 1.0).reshape((vocab, hidden)).unwrap();
        let pos_embed = rand(max_pos * hidden, 0.5)
            .reshape((max_pos, hidden))
            .unwrap();
        let ws = (0..layers)
            .map(|_| {
                let s = 1.0 / (hidden as f32).sqrt();
                [0, 1, 2, 3].map(|_| rand(hidden * hidden, s).reshape((hidden, hidden)).unwrap())
            })
            .collect();
        let head = rand(hidden * vocab, 3.0 / (hidden as f32).sqrt())
            .reshape((hidden, vocab))
            .unwrap();
        Self {
            embed,
            pos_embed,
            layers: ws,
            head,
            vocab,
            hidden,
            device,
            calls: Mutex::new(Vec::new()),
        }
    }
}

/// `[b, 1, s, past + s]` u8: 1 where query `i` (absolute `past + i`) may attend key `j`.
fn allowed_mask(key_mask: &Tensor, b: usize, s: usize) -> Result<Tensor> {
    let total = key_mask.dim(1)?;
    let past = total - s;
    let causal: Vec<u8> = (0..s)
        .flat_map(|i| (0..total).map(move |j| u8::from(j <= past + i)))
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, s, total), key_mask.device())?;
    let keys = key_mask.reshape((b, 1, 1, total))?;
    causal.broadcast_mul(&keys)
}

impl CausalLm for TinyLm {
    fn forward_cached(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        key_mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        self.calls.lock().unwrap().push((b, s));
        let h = self.hidden;
        let tok = self
            .embed
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, s, h))?;
        let pos = self
            .pos_embed
            .index_select(&positions.flatten_all()?, 0)?
            .reshape((b, s, h))?;
        let mut x = (tok + pos)?;
        let allowed = allowed_mask(key_mask, b, s)?;
        for (l, [wq, wk, wv, wo]) in self.layers.iter().enumerate() {
            let q = x.broadcast_matmul(wq)?.reshape((b, 1, s, h))?;
            let k = x.broadcast_matmul(wk)?.reshape((b, 1, s, h))?;
            let v = x.broadcast_matmul(wv)?.reshape((b, 1, s, h))?;
            let (k, v) = cache.append(l, &k, &v)?;
            let scores = (q.matmul(&k.t()?)? / (h as f64).sqrt())?;
            // A large finite fill, not -inf: padding queries see no key at all, and an all -inf
            // row would turn into NaN.
            let neg = Tensor::full(-1e9f32, scores.shape(), scores.device())?;
            let scores = allowed
                .broadcast_as(scores.shape())?
                .where_cond(&scores, &neg)?;
            let attn = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let out = attn.matmul(&v)?.reshape((b, s, h))?;
            x = (x + out.broadcast_matmul(wo)?.tanh()?)?;
        }
        x.broadcast_matmul(&self.head)
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

/// A scripted model: the next token after `t` is `next[t]`, with a margin of 10 logits.
/// It still keeps a (dummy) cache so row selection is exercised.
pub struct TableLm {
    pub next: Vec<u32>,
    device: Device,
    pub calls: Mutex<Vec<(usize, usize)>>,
}

impl TableLm {
    pub fn new(next: Vec<u32>) -> Self {
        Self {
            next,
            device: Device::Cpu,
            calls: Mutex::new(Vec::new()),
        }
    }
}

impl CausalLm for TableLm {
    fn forward_cached(
        &self,
        input_ids: &Tensor,
        _positions: &Tensor,
        key_mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        self.calls.lock().unwrap().push((b, s));
        let kv = Tensor::zeros((b, 1, s, 1), DType::F32, &self.device)?;
        let (k, _) = cache.append(0, &kv, &kv)?;
        assert_eq!(
            k.dim(2)?,
            key_mask.dim(1)?,
            "key mask must cover past + current positions"
        );
        let v = self.next.len();
        let ids = input_ids.to_vec2::<u32>()?;
        let mut logits = vec![0f32; b * s * v];
        for (bi, row) in ids.iter().enumerate() {
            for (si, &t) in row.iter().enumerate() {
                logits[(bi * s + si) * v + self.next[t as usize] as usize] = 10.0;
            }
        }
        Tensor::from_vec(logits, (b, s, v), &self.device)
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(1)
    }

    fn vocab_size(&self) -> usize {
        self.next.len()
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

/// Decodes ids of a table vocabulary by concatenating their pieces.
pub fn piece_decoder(pieces: &'static [&'static str]) -> impl Fn(&[u32]) -> String {
    move |ids: &[u32]| ids.iter().map(|&i| pieces[i as usize]).collect()
}
