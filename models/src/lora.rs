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

    fn dropout_input(&self, x: &Tensor) -> Result<Tensor> {
        if !self.is_training() || self.dropout == 0.0 {
            return Ok(x.clone());
        }
        // Keep an element when a 16-bit draw falls below `threshold`; rescale by the exact keep
        // rate this gives so the expectation is unchanged.
        let threshold = ((1.0 - self.dropout) * 65536.0).round().clamp(1.0, 65536.0) as u64;
        let keep = threshold as f64 / 65536.0;
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let mask = dropout_mask(
            x.elem_count(),
            splitmix64(
                self.seed
                    ^ splitmix64(call)
                    ^ splitmix64(splitmix64(self.stream.load(Ordering::Relaxed))),
            ),
            threshold,
        );
        // Kept elements carry the rescaling factor, so masking is a single multiply.
        let mask = match x.dtype() {
            DType::F64 => {
                let kept = 1.0 / keep;
                let m: Vec<f64> = mask.iter().map(|&m| f64::from(m) * kept).collect();
                Tensor::from_vec(m, x.shape(), x.device())?
            }
            dtype => {
                let kept = (1.0 / keep) as f32;
                let m: Vec<f32> = mask.iter().map(|&m| f32::from(m) * kept).collect();
                Tensor::from_vec(m, x.shape(), x.device())?.to_dtype(dtype)?
            }
        };
        x.mul(&mask)
    }
}

/// SplitMix64 finaliser: decorrelates nearby seeds (call counters, chunk indices).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A 0/1 keep mask of `n` elements. Generated on the host so that it depends only on `seed`
/// (not on the device or thread count), in fixed-size chunks with their own derived seeds so
/// that large activations are masked in parallel.
fn dropout_mask(n: usize, seed: u64, threshold: u64) -> Vec<u8> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let mut mask = vec![0u8; n];
    mask.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = StdRng::seed_from_u64(splitmix64(seed ^ splitmix64(i as u64)));
            for quad in chunk.chunks_mut(4) {
                let r: u64 = rng.random();
                for (j, m) in quad.iter_mut().enumerate() {
                    *m = u8::from((r >> (16 * j)) & 0xffff < threshold);
                }
            }
        });
    mask
}

impl LinearLayer for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        let dtype = x.dtype();
        let (a, b) = if self.frozen.load(Ordering::Relaxed) {
            (self.a.as_detached_tensor(), self.b.as_detached_tensor())
        } else {
            (self.a.as_tensor().clone(), self.b.as_tensor().clone())
        };
        let (a, b) = (a.to_dtype(dtype)?, b.to_dtype(dtype)?);
        let h = linear_forward(&self.dropout_input(x)?, &a, None)?;
        let delta = (linear_forward(&h, &b, None)? * self.scaling)?;
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
}
