//! LoRA adapters (Hu et al. 2021) as PEFT implements them: `y = base(x) + (α/r)·B·A·dropout(x)`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::layers::dense::linear_forward;
use crate::layers::Dense;
use crate::linear::LinearLayer;

/// Which modules get adapters and how big they are (PEFT's `LoraConfig` fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank `r` of the update `B·A`.
    pub r: usize,
    /// Scaling numerator: the update is multiplied by `alpha / r`.
    pub alpha: f64,
    /// Dropout probability on the adapter's input during training.
    #[serde(default)]
    pub dropout: f64,
    /// Module names to adapt, matched like PEFT: a module path matches when it equals an entry
    /// or ends with `.` + the entry (e.g. `q_proj` matches `model.layers.3.self_attn.q_proj`).
    pub target_modules: Vec<String>,
}

impl LoraConfig {
    /// Whether the module at `path` gets an adapter.
    pub fn matches(&self, path: &str) -> bool {
        self.target_modules.iter().any(|t| {
            path == t
                || path
                    .strip_suffix(t.as_str())
                    .is_some_and(|p| p.ends_with('.'))
        })
    }

    /// `alpha / r`.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.r as f64
    }

    fn validate(&self) -> Result<()> {
        if self.r == 0 {
            candle_core::bail!("LoRA rank r must be at least 1");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            candle_core::bail!("LoRA dropout must be in [0, 1), got {}", self.dropout);
        }
        Ok(())
    }
}

/// A frozen linear layer plus a trainable low-rank update.
///
/// `lora_A` `[r, in]` starts Kaiming-uniform (`a = √5`, i.e. `U(-1/√in, 1/√in)`) and `lora_B`
/// `[out, r]` at zero, so the wrapped layer starts out identical to its base. Both are master
/// `Var`s (f32 normally) cast to the input's dtype in `forward`.
pub struct LoraLinear {
    base: Box<dyn LinearLayer>,
    a: Var,
    b: Var,
    scaling: f64,
    dropout: f64,
    training: AtomicBool,
    seed: u64,
    /// Set by the trainer before each step (see `LinearLayer::set_dropout_stream`).
    stream: AtomicU64,
    /// Inference only (see `LinearLayer::freeze`).
    frozen: AtomicBool,
    calls: AtomicU64,
}

impl LoraLinear {
    /// Wraps `base` with f32 adapters on `device`; `seed` fixes `lora_A`'s initialisation and
    /// the dropout masks. Starts in training mode.
    pub fn new(
        base: Box<dyn LinearLayer>,
        config: &LoraConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        Self::with_master_dtype(base, config, seed, device, DType::F32)
    }

    /// As [`LoraLinear::new`] with master weights in `master_dtype` (f64 for exact gradient
    /// checks; half precision is refused since AdamW state in it breaks).
    pub fn with_master_dtype(
        base: Box<dyn LinearLayer>,
        config: &LoraConfig,
        seed: u64,
        device: &Device,
        master_dtype: DType,
    ) -> Result<Self> {
        config.validate()?;
        if !matches!(master_dtype, DType::F32 | DType::F64) {
            candle_core::bail!("LoRA master weights must be f32 or f64, not {master_dtype:?}");
        }
        let (fan_in, out, r) = (base.in_features(), base.out_features(), config.r);
        let mut rng = StdRng::seed_from_u64(seed);
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        let a: Vec<f64> = (0..r * fan_in)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let a = Tensor::from_vec(a, (r, fan_in), device)?.to_dtype(master_dtype)?;
        let b = Tensor::zeros((out, r), master_dtype, device)?;
        Ok(Self {
            base,
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scaling: config.scaling(),
            dropout: config.dropout,
            training: AtomicBool::new(true),
            seed,
            stream: AtomicU64::new(0),
            frozen: AtomicBool::new(false),
            calls: AtomicU64::new(0),
        })
    }

    /// `lora_A` `[r, in]`.
    pub fn lora_a(&self) -> &Var {
        &self.a
    }

    /// `lora_B` `[out, r]`.
    pub fn lora_b(&self) -> &Var {
        &self.b
    }

    /// The frozen base layer.
    pub fn base(&self) -> &dyn LinearLayer {
        &*self.base
    }

    /// Whether dropout is active.
    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// The dense update `(α/r)·B·A` `[out, in]` in the master dtype.
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.b.as_tensor().matmul(self.a.as_tensor())? * self.scaling
    }

    /// A plain dense copy with the update merged in: `W + (α/r)·B·A`. `compute_dtype` is the
    /// dtype the base layer takes inputs in (used only when the base is not dense itself).
    pub fn merge_to_dense(&self, compute_dtype: DType) -> Result<Dense> {
        let (w, b) = self.base.dense_parts(self.a.device(), compute_dtype)?;
        let merged = (w.to_dtype(self.a.dtype())? + self.delta_weight()?)?.to_dtype(w.dtype())?;
        Dense::new(merged, b)
    }

    /// Undoes [`LoraLinear::merge_to_dense`]: subtracts this adapter's update from a merged
    /// dense layer, giving back (up to rounding) the base weights.
    pub fn unmerge_from_dense(&self, merged: &Dense) -> Result<Dense> {
        let w = merged.weight();
        let base = (w.to_dtype(self.a.dtype())? - self.delta_weight()?)?.to_dtype(w.dtype())?;
        Dense::new(base, merged.bias().cloned())
    }

    /// The dropout mask for `x` (0 or `1/keep` per element), or `None` when dropout is off.
    fn dropout_mask_for(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if !self.is_training() || self.dropout == 0.0 {
            return Ok(None);
        }
        // Keep an element when a 16-bit draw falls below `threshold`; rescale by the exact keep
        // rate this gives so the expectation is unchanged.
        let threshold = ((1.0 - self.dropout) * 65536.0).round().clamp(1.0, 65536.0) as u64;
        let keep = threshold as f64 / 65536.0;
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let seed = splitmix64(
            self.seed
                ^ splitmix64(call)
                ^ splitmix64(splitmix64(self.stream.load(Ordering::Relaxed))),
        );
        // Kept elements carry the rescaling factor, so masking is a single multiply.
        let mask = match x.dtype() {
            DType::F64 => {
                let m = dropout_mask(x.elem_count(), seed, threshold, 1.0 / keep, 0.0f64);
                Tensor::from_vec(m, x.shape(), x.device())?
            }
            dtype => {
                let kept = (1.0 / keep) as f32;
                let m = dropout_mask(x.elem_count(), seed, threshold, kept, 0.0f32);
                Tensor::from_vec(m, x.shape(), x.device())?.to_dtype(dtype)?
            }
        };
        Ok(Some(mask))
    }
}

/// SplitMix64 finaliser: decorrelates nearby seeds (call counters, chunk indices).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A keep mask of `n` elements: `kept` where an element survives, `dropped` where it does not.
/// Generated on the host so that it depends only on `seed` (not on the device or thread count),
/// in fixed-size chunks with their own derived seeds so that large activations are masked in
/// parallel; each 64-bit draw decides four elements, 16 bits each.
fn dropout_mask<T: Copy + Send + Sync>(
    n: usize,
    seed: u64,
    threshold: u64,
    kept: T,
    dropped: T,
) -> Vec<T> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let mut mask = vec![dropped; n];
    mask.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = StdRng::seed_from_u64(splitmix64(seed ^ splitmix64(i as u64)));
            for quad in chunk.chunks_mut(4) {
                let r: u64 = rng.random();
                for (j, m) in quad.iter_mut().enumerate() {
                    if (r >> (16 * j)) & 0xffff < threshold {
                        *m = kept;
                    }
                }
            }
        });
    mask
}

/// `scaling · (mask ⊙ x) Aᵀ Bᵀ` as one graph node with a hand-written backward.
///
/// Built from tensor ops, the update is a dozen nodes (mask multiply, reshapes, transposes, two
/// matmuls, the scaling), and candle's backward allocates a zero tensor and adds into it for
/// every one: per adapted projection and step, several activation-sized buffers. Here forward
/// runs the same ops detached and backward computes the three gradients directly:
/// `dB = s·gᵀh`, `dA = s·(gB)ᵀ(m⊙x)`, `dx = m ⊙ (s·gB)A` with `h = (m⊙x)Aᵀ`.
fn lora_delta(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    mask: Option<Tensor>,
    scaling: f64,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((&in_features, lead)) = dims.split_last() else {
        candle_core::bail!("LoRA input must have at least one dimension");
    };
    let rows: usize = lead.iter().product();
    let x2 = x.reshape((rows, in_features))?;
    let mask = mask.map(|m| m.reshape((rows, in_features))).transpose()?;
    let xd = match &mask {
        Some(m) => x2.detach().mul(m)?,
        None => x2.detach(),
    };
    let h = xd.matmul(&a.detach().t()?)?;
    let delta = (h.matmul(&b.detach().t()?)? * scaling)?;
    let op = LoraDelta {
        delta: std::sync::Mutex::new(Some(delta)),
        h,
        xd,
        mask,
        scaling,
    };
    let y = x2.apply_op3(a, b, op)?;
    let mut out = lead.to_vec();
    out.push(y.dim(1)?);
    y.reshape(out)
}

struct LoraDelta {
    /// The forward result, computed detached; the op's forward takes it out and hands out a
    /// copy, so it is not kept alive with the graph.
    delta: std::sync::Mutex<Option<Tensor>>,
    /// `(mask ⊙ x) Aᵀ`, `[rows, r]`, kept for `dB`.
    h: Tensor,
    /// `mask ⊙ x`, `[rows, in]`, kept for `dA` (the input itself without dropout).
    xd: Tensor,
    mask: Option<Tensor>,
    scaling: f64,
}

impl LoraDelta {
    fn copy_of_delta<S: candle_core::backend::BackendStorage>(
        &self,
        pick: impl Fn(&candle_core::Storage) -> Option<&S>,
    ) -> Result<(S, candle_core::Shape)> {
        let delta = self
            .delta
            .lock()
            .map_err(|_| candle_core::Error::Msg("LoRA delta lock poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("LoRA delta op run twice".into()))?;
        let (storage, layout) = delta.storage_and_layout();
        let storage = pick(&storage)
            .ok_or_else(|| candle_core::Error::Msg("LoRA delta on an unexpected device".into()))?;
        Ok((storage.try_clone(layout)?, delta.shape().clone()))
    }
}

impl candle_core::CustomOp3 for LoraDelta {
    fn name(&self) -> &'static str {
        "lora-delta"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        self.copy_of_delta(|s| match s {
            candle_core::Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        self.copy_of_delta(|s| match s {
            candle_core::Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &candle_core::Layout,
        _: &candle_core::MetalStorage,
        _: &candle_core::Layout,
        _: &candle_core::MetalStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::MetalStorage, candle_core::Shape)> {
        self.copy_of_delta(|s| match s {
            candle_core::Storage::Metal(c) => Some(c),
            _ => None,
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = (grad.to_dtype(self.h.dtype())? * self.scaling)?;
        let grad_b = g.t()?.matmul(&self.h)?;
        let grad_h = g.matmul(&b.detach())?;
        let grad_a = grad_h.t()?.matmul(&self.xd)?;
        let grad_xd = grad_h.matmul(&a.detach())?;
        let grad_x = match &self.mask {
            Some(m) => grad_xd.mul(m)?,
            None => grad_xd,
        };
        Ok((
            Some(grad_x.to_dtype(x.dtype())?),
            Some(grad_a.to_dtype(a.dtype())?),
            Some(grad_b.to_dtype(b.dtype())?),
        ))
    }
}

impl LinearLayer for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let (a, b) = if self.frozen.load(Ordering::Relaxed) {
            (self.a.as_detached_tensor(), self.b.as_detached_tensor())
        } else {
            (self.a.as_tensor().clone(), self.b.as_tensor().clone())
        };
        let (a, b) = (a.to_dtype(dtype)?, b.to_dtype(dtype)?);
        let mask = self.dropout_mask_for(x)?;
        let training = x.track_op() || a.track_op();
        if training && crate::fused::supported(x) {
            if let Some(parts) = self.base.frozen_parts() {
                return crate::fused::lora_linear::lora_linear(
                    x,
                    &a,
                    &b,
                    parts.weight,
                    parts.bias,
                    mask,
                    self.scaling,
                );
            }
        }
        let y = self.base.forward(x)?;
        let delta = if training {
            lora_delta(x, &a, &b, mask, self.scaling)?
        } else {
            let xd = match &mask {
                Some(m) => x.mul(m)?,
                None => x.clone(),
            };
            (linear_forward(&linear_forward(&xd, &a, None)?, &b, None)? * self.scaling)?
        };
        y + delta
    }

    fn in_features(&self) -> usize {
        self.base.in_features()
    }

    fn out_features(&self) -> usize {
        self.base.out_features()
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        vec![
            ("lora_A.weight".to_string(), self.a.clone()),
            ("lora_B.weight".to_string(), self.b.clone()),
        ]
    }

    fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
        self.base.set_training(training);
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::Relaxed);
        self.set_training(false);
        self.base.freeze();
    }

    fn set_dropout_stream(&self, stream: u64) {
        self.stream.store(stream, Ordering::Relaxed);
        self.calls.store(0, Ordering::Relaxed);
        self.base.set_dropout_stream(stream);
    }

    fn dropout_position(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn set_dropout_position(&self, position: u64) {
        self.calls.store(position, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    /// The fused update against the same update from tensor ops, values and all three
    /// gradients, with a dropout mask, in f64.
    #[test]
    fn lora_delta_matches_the_composite_update() {
        let (x, a, b) = (
            Var::from_tensor(&random(&[2, 3, 8], 1)).unwrap(),
            Var::from_tensor(&random(&[4, 8], 2)).unwrap(),
            Var::from_tensor(&random(&[5, 4], 3)).unwrap(),
        );
        let keep: Vec<f64> = (0..48)
            .map(|i| if i % 3 == 0 { 0.0 } else { 1.5 })
            .collect();
        let mask = Tensor::from_vec(keep, (2, 3, 8), &Device::Cpu).unwrap();
        let probe = random(&[2, 3, 5], 4);
        let grads = |y: Tensor| {
            let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            [x.as_tensor(), a.as_tensor(), b.as_tensor()].map(|v| g.get(v).unwrap().clone())
        };
        let fused = lora_delta(x.as_tensor(), &a, &b, Some(mask.clone()), 0.75).unwrap();
        let xd = x.as_tensor().mul(&mask).unwrap();
        let composite =
            (linear_forward(&linear_forward(&xd, &a, None).unwrap(), &b, None).unwrap() * 0.75)
                .unwrap();
        let diff = |p: &Tensor, q: &Tensor| {
            (p - q)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        assert!(diff(&fused, &composite) < 1e-12);
        for (g_fused, g_ref) in grads(fused).iter().zip(grads(composite).iter()) {
            assert!(diff(g_fused, g_ref) < 1e-12);
            assert!(
                g_fused
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
                    > 0.0
            );
        }
        assert_eq!(DType::F64, a.dtype());
    }
}
