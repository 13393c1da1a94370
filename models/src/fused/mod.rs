//! Fused CPU kernels with an explicit backward, for the hot spots of training on the CPU.
//!
//! Written from basic ops, a softmax or a cross-entropy is a chain of elementwise tensors, each
//! a fresh allocation, and candle's backward adds one more allocation (zeros, then an add) per
//! gradient it accumulates: on a 49k-token vocabulary that is ~100 MB per op, and allocating,
//! zero-filling and adding such buffers was most of a CPU training step outside the matrix
//! products. These ops make one pass in forward and one
//! in backward instead. The largest fuse whole blocks into one node each: a LoRA projection
//! (`lora_linear`), attention (`attention`) and the LM head with the cross-entropy
//! (`cross_entropy::linear_cross_entropy_rows`, which never holds all the logits), their
//! products going through `gemm` directly so outputs are written once and gradients accumulate
//! in place.
//!
//! They run on the CPU only (f32 and f64, rows in parallel with rayon); on other devices the
//! callers use the composite versions, which record a backward everywhere. Tests check both
//! against each other and against finite differences.
//!
//! `inplace` holds forward-only kernels that update a tensor in place, for the sentence
//! encoder's inference ([`crate::encoders`]); they share `exp_f32`. `cached_attention` is
//! generation's forward-only attention over the KV cache, one pass per layer instead of some
//! twenty small candle ops.

pub mod activation;
pub mod attention;
pub mod cached_attention;
pub mod cross_entropy;
mod f16_kv;
pub(crate) mod gemm;
pub(crate) mod inplace;
pub mod lora_linear;
pub mod norm;
pub mod softmax;

pub use activation::{activation, gated_activation, FusedActivation};
pub use cached_attention::cached_attention;
pub use cross_entropy::{cross_entropy_rows, linear_cross_entropy_rows, HEAD_BLOCK_ROWS};
pub use norm::{norm, NormKind};
pub use softmax::{scaled_masked_softmax, softmax_last_dim};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};

/// The floating-point types the kernels support.
pub(crate) trait Real: candle_core::WithDType {
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn tanh(self) -> Self;

    /// `exp` of every element, in place: the kernels' hot loop (softmax rows, 49k-wide
    /// cross-entropy rows, SiLU), so f32 overrides it with a form the compiler vectorizes.
    fn exp_in_place(xs: &mut [Self]) {
        for x in xs {
            *x = x.exp();
        }
    }
}

impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }

    fn exp_in_place(xs: &mut [Self]) {
        for x in xs {
            *x = exp_f32(*x);
        }
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
}

/// `eˣ` in f32 without branches or calls, so that loops over slices vectorize (the libm call
/// does not): `x = n·ln2 + r` with `|r| ≤ ln2/2`, a degree-7 polynomial for `eʳ` (Cephes'
/// `expf` coefficients), and `2ⁿ` built in the exponent bits. Within 2 ulp of `f32::exp`
/// (tested); 0 below `ln` of the smallest normal f32, where `f32::exp` is subnormal.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that `n·LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer (as `round` would, but
    // vectorizable).
    const ROUND: f32 = 12_582_912.0;
    const MIN: f32 = -87.336_54;
    let clamped = x.clamp(MIN, 88.0);
    let n = (clamped * LOG2_E + ROUND) - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e_r = p * (r * r) + r + 1.0;
    // n is an integer in [-126, 127], so the biased exponent is in [1, 254].
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < MIN {
        0.0
    } else {
        e_r * two_n
    }
}

/// A fused op's two passes, written once for f32 and f64; [`cpu_forward`] and [`cpu_backward`]
/// do the dtype dispatch and the storage plumbing around them.
pub(crate) trait Kernel {
    /// The op's name, for errors.
    fn name(&self) -> &'static str;

    /// Forward over the contiguous elements of the input, laid out as `layout`.
    fn forward<T: Real>(&self, x: &[T], layout: &Layout) -> Result<Vec<T>>;

    /// The input gradient, shaped like `saved` (whichever tensor the op keeps for backward:
    /// its input or its output), from `saved` and the output gradient `grad`; `n` is the saved
    /// tensor's last dimension.
    fn backward<T: Real>(&self, saved: &[T], grad: &[T], n: usize) -> Result<Vec<T>>;
}

/// Runs `kernel`'s forward on a CPU storage.
pub(crate) fn cpu_forward(
    kernel: &impl Kernel,
    storage: &CpuStorage,
    layout: &Layout,
) -> Result<CpuStorage> {
    match storage.dtype() {
        DType::F32 => Ok(CpuStorage::F32(
            kernel.forward(contiguous_slice::<f32>(storage, layout)?, layout)?,
        )),
        DType::F64 => Ok(CpuStorage::F64(
            kernel.forward(contiguous_slice::<f64>(storage, layout)?, layout)?,
        )),
        other => candle_core::bail!("{} supports f32 and f64, not {other:?}", kernel.name()),
    }
}

/// Runs `kernel`'s backward on `saved` and `grad` (cast to `saved`'s dtype); the result has
/// `saved`'s shape.
pub(crate) fn cpu_backward(kernel: &impl Kernel, saved: &Tensor, grad: &Tensor) -> Result<Tensor> {
    fn run<T: Real>(kernel: &impl Kernel, saved: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let n = saved.dim(candle_core::D::Minus1)?;
        with_slice::<T, _>(saved, |s| {
            with_slice::<T, _>(&grad.to_dtype(saved.dtype())?, |g| {
                Tensor::from_vec(kernel.backward(s, g, n)?, saved.shape(), saved.device())
            })
        })
    }
    match saved.dtype() {
        DType::F32 => run::<f32>(kernel, saved, grad),
        DType::F64 => run::<f64>(kernel, saved, grad),
        other => candle_core::bail!("{} supports f32 and f64, not {other:?}", kernel.name()),
    }
}

/// f32 or f64, with what both the elementwise kernels and the matrix products need.
pub(crate) trait Float: Real + gemm::GemmFloat {
    /// Widens half-precision values into `dst` (same length); a narrower KV cache is read
    /// through this (`half` uses the CPU's conversion instructions where it has them).
    fn widen_f16(src: &[half::f16], dst: &mut [Self]);
    /// As [`Float::widen_f16`], for bfloat16.
    fn widen_bf16(src: &[half::bf16], dst: &mut [Self]);
}

impl Float for f32 {
    fn widen_f16(src: &[half::f16], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
    fn widen_bf16(src: &[half::bf16], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
}

impl Float for f64 {
    fn widen_f16(src: &[half::f16], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f64_slice(dst);
    }
    fn widen_bf16(src: &[half::bf16], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f64_slice(dst);
    }
}

/// The contiguous elements of a tensor's storage described by `layout`; errors for storage
/// off the CPU.
pub(crate) fn storage_slice<'a, T: candle_core::WithDType>(
    storage: &'a Storage,
    layout: &Layout,
) -> Result<&'a [T]> {
    match storage {
        Storage::Cpu(cpu) => contiguous_slice(cpu, layout),
        _ => candle_core::bail!("fused op: a tensor is not on the CPU"),
    }
}

/// The contiguous elements of a CPU tensor's storage described by `layout`.
pub(crate) fn contiguous_slice<'a, T: candle_core::WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [T]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused op: input must be contiguous".into()))?;
    Ok(&storage.as_slice::<T>()?[start..end])
}

/// Runs `f` over the contiguous elements of CPU tensor `t` (made contiguous first if needed).
pub(crate) fn with_slice<T: Real, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    f(storage_slice::<T>(&storage, layout)?)
}

/// Whether the fused kernels can take a tensor of this dtype on this device.
pub fn supported(t: &Tensor) -> bool {
    supports(t.device(), t.dtype())
}

/// Whether the fused kernels run for tensors of `dtype` on `device` (the CPU, f32 or f64).
pub fn supports(device: &candle_core::Device, dtype: DType) -> bool {
    device.is_cpu() && matches!(dtype, DType::F32 | DType::F64)
}

/// Helpers the fused ops' tests share.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{DType, Device, Tensor};

    use crate::train::TrainRng;

    /// An f64 tensor of `shape` with seeded values in [-1, 1).
    pub fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = TrainRng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| f64::from(rng.next_f32()) * 2.0 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    /// The largest elementwise difference, in f64.
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.to_dtype(DType::F64))
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f64>())
            .expect("diff")
    }
}

#[cfg(test)]
mod tests {
    use super::testing::max_abs_diff;
    use super::*;
    use crate::train::{log_softmax, TrainRng};
    use candle_core::{Device, Var, D};

    fn random(shape: (usize, usize), seed: u64, dtype: DType) -> Tensor {
        let mut rng = TrainRng::new(seed);
        let v: Vec<f64> = (0..shape.0 * shape.1)
            .map(|_| (f64::from(rng.next_f32()) - 0.5) * 6.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("random tensor")
    }

    /// Value and gradient of `f` at `x` (summed against fixed weights so every output counts).
    fn value_and_grad(
        x: &Tensor,
        weights: &Tensor,
        f: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> (Tensor, Tensor) {
        let var = Var::from_tensor(x).expect("var");
        let y = f(var.as_tensor()).expect("forward");
        let loss = y
            .broadcast_mul(weights)
            .and_then(|t| t.sum_all())
            .expect("loss");
        let grads = loss.backward().expect("backward");
        let g = grads.get(var.as_tensor()).expect("a gradient").clone();
        (y, g)
    }

    #[test]
    fn vectorizable_exp_is_within_two_ulp_of_libm() {
        let ulp = |x: f32| (x.to_bits() as i64 - 0f32.to_bits() as i64).abs();
        let mut worst = 0i64;
        let mut x = -87.3f32;
        while x < 88.0 {
            let (ours, libm) = (exp_f32(x), x.exp());
            worst = worst.max((ulp(ours) - ulp(libm)).abs());
            x += 1.3e-3;
        }
        assert!(worst <= 2, "{worst} ulp off");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-1e9), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        let mut v = vec![0.5f32, -3.0, 10.0];
        f32::exp_in_place(&mut v);
        assert_eq!(v, vec![exp_f32(0.5), exp_f32(-3.0), exp_f32(10.0)]);
    }

    #[test]
    fn softmax_matches_the_composite_softmax_and_its_gradient() {
        let mut x = random((24, 37), 1, DType::F32);
        // Masked keys as attention makes them: a large negative bias, and one row all masked.
        let bias: Vec<f32> = (0..24 * 37)
            .map(|i| if i % 5 == 0 || i / 37 == 3 { -1e9 } else { 0.0 })
            .collect();
        x = (x + Tensor::from_vec(bias, (24, 37), &Device::Cpu).unwrap()).unwrap();
        let w = random((24, 37), 2, DType::F32);
        let (y_fused, g_fused) = value_and_grad(&x, &w, softmax_last_dim);
        let (y_ref, g_ref) = value_and_grad(&x, &w, |t| candle_nn::ops::softmax(t, D::Minus1));
        assert!(max_abs_diff(&y_fused, &y_ref) < 1e-6);
        assert!(max_abs_diff(&g_fused, &g_ref) < 1e-6);
        let total = g_fused.abs().unwrap().sum_all().unwrap();
        assert!(
            total.to_scalar::<f32>().unwrap() > 0.0,
            "gradient is all zero"
        );
    }

    /// Central differences of `loss(x)` in f64 against the recorded gradient.
    fn check_finite_differences(x: &Tensor, loss: impl Fn(&Tensor) -> Result<Tensor>) {
        let var = Var::from_tensor(x).unwrap();
        let grads = loss(var.as_tensor()).unwrap().backward().unwrap();
        let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
        let analytic = analytic.to_vec1::<f64>().unwrap();
        let base = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-6;
        for i in (0..base.len()).step_by(7) {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                let t = Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap();
                loss(&t).unwrap().to_scalar::<f64>().unwrap()
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (numeric - analytic[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
                "element {i}: finite difference {numeric}, backward {}",
                analytic[i]
            );
        }
    }

    #[test]
    fn scaled_masked_softmax_matches_the_composite_version() {
        let (b, h, t) = (2, 3, 5);
        let scores = random((b * h * t, t), 12, DType::F32)
            .reshape((b, h, t, t))
            .unwrap();
        let bias: Vec<f32> = (0..b * t * t)
            .map(|i| {
                if (i % t) > (i / t) % t || i % 7 == 0 {
                    -1e9
                } else {
                    0.0
                }
            })
            .collect();
        let bias = Tensor::from_vec(bias, (b, 1, t, t), &Device::Cpu).unwrap();
        let w = random((b * h * t, t), 13, DType::F32)
            .reshape((b, h, t, t))
            .unwrap();
        let scale = 0.125;
        let (y, g) = value_and_grad(&scores, &w, |s| scaled_masked_softmax(s, scale, &bias));
        let (y_ref, g_ref) = value_and_grad(&scores, &w, |s| {
            candle_nn::ops::softmax(&(s * scale)?.broadcast_add(&bias)?, D::Minus1)
        });
        assert!(max_abs_diff(&y, &y_ref) < 1e-6);
        assert!(max_abs_diff(&g, &g_ref) < 1e-6);
    }

    #[test]
    fn softmax_gradient_matches_finite_differences() {
        let x = random((6, 11), 3, DType::F64);
        let w = random((6, 11), 4, DType::F64);
        check_finite_differences(&x, |t| softmax_last_dim(t)?.mul(&w)?.sum_all());
    }

    #[test]
    fn cross_entropy_matches_log_softmax_and_its_gradient() {
        let (rows, vocab) = (9, 50);
        let x = random((rows, vocab), 5, DType::F32);
        let targets: Vec<u32> = (0..rows as u32).map(|r| (r * 7) % vocab as u32).collect();
        let weights: Vec<f32> = (0..rows)
            .map(|r| if r % 4 == 3 { 0.0 } else { 1.0 })
            .collect();
        let ones = Tensor::ones(rows, DType::F32, &Device::Cpu).unwrap();
        let (y_fused, g_fused) =
            value_and_grad(&x, &ones, |t| cross_entropy_rows(t, &targets, &weights));
        let idx = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
        let wt = Tensor::new(weights.as_slice(), &Device::Cpu).unwrap();
        let (y_ref, g_ref) = value_and_grad(&x, &ones, |t| {
            log_softmax(t)?
                .gather(&idx.unsqueeze(1)?, 1)?
                .squeeze(1)?
                .neg()?
                .mul(&wt)
        });
        assert!(max_abs_diff(&y_fused, &y_ref) < 1e-5);
        assert!(max_abs_diff(&g_fused, &g_ref) < 1e-6);
    }

    #[test]
    fn cross_entropy_gradient_matches_finite_differences() {
        let x = random((5, 13), 6, DType::F64);
        let targets = [0u32, 12, 5, 5, 7];
        let weights = [1.0f32, 1.0, 0.0, 1.0, 1.0];
        let g = Tensor::new(&[0.5f64, -1.0, 2.0, 1.5, 0.25], &Device::Cpu).unwrap();
        check_finite_differences(&x, |t| {
            cross_entropy_rows(t, &targets, &weights)?
                .mul(&g)?
                .sum_all()
        });
    }

    #[test]
    fn activations_match_candle_and_finite_differences() {
        let x = random((7, 33), 8, DType::F32);
        let w = random((7, 33), 9, DType::F32);
        let (y, g) = value_and_grad(&x, &w, |t| activation(t, FusedActivation::Silu));
        let (y_ref, g_ref) = value_and_grad(&x, &w, |t| t.silu());
        assert!(max_abs_diff(&y, &y_ref) < 1e-6);
        assert!(max_abs_diff(&g, &g_ref) < 1e-5);
        let (y, g) = value_and_grad(&x, &w, |t| activation(t, FusedActivation::GeluTanh));
        let (y_ref, g_ref) = value_and_grad(&x, &w, |t| t.gelu());
        assert!(max_abs_diff(&y, &y_ref) < 1e-5);
        // candle's gelu backward rounds its constants; ours is exact, so only roughly equal.
        assert!(max_abs_diff(&g, &g_ref) < 1e-4);
        let x = random((4, 9), 10, DType::F64);
        let w = random((4, 9), 11, DType::F64);
        for act in [FusedActivation::Silu, FusedActivation::GeluTanh] {
            check_finite_differences(&x, |t| activation(t, act)?.mul(&w)?.sum_all());
        }
    }

    #[test]
    fn norms_match_the_composite_norms_and_finite_differences() {
        let x = random((6, 32), 14, DType::F32);
        let w = random((6, 32), 15, DType::F32);
        let gamma = (random((1, 32), 16, DType::F32).squeeze(0).unwrap() + 1.0).unwrap();
        let beta = random((1, 32), 17, DType::F32).squeeze(0).unwrap();
        let eps = 1e-5;
        let composite_ln = |t: &Tensor| -> Result<Tensor> {
            let mean = t.mean_keepdim(D::Minus1)?;
            let c = t.broadcast_sub(&mean)?;
            let var = c.sqr()?.mean_keepdim(D::Minus1)?;
            c.broadcast_div(&(var + eps)?.sqrt()?)?
                .broadcast_mul(&gamma)?
                .broadcast_add(&beta)
        };
        let composite_rms = |t: &Tensor| -> Result<Tensor> {
            let ms = t.sqr()?.mean_keepdim(D::Minus1)?;
            t.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(&gamma)
        };
        let (y, g) = value_and_grad(&x, &w, |t| {
            norm(t, NormKind::LayerNorm, &gamma, Some(&beta), eps)
        });
        let (y_ref, g_ref) = value_and_grad(&x, &w, composite_ln);
        assert!(max_abs_diff(&y, &y_ref) < 1e-5);
        assert!(max_abs_diff(&g, &g_ref) < 1e-5);
        let (y, g) = value_and_grad(&x, &w, |t| norm(t, NormKind::RmsNorm, &gamma, None, eps));
        let (y_ref, g_ref) = value_and_grad(&x, &w, composite_rms);
        assert!(max_abs_diff(&y, &y_ref) < 1e-5);
        assert!(max_abs_diff(&g, &g_ref) < 1e-5);
        let x = random((4, 9), 18, DType::F64);
        let w = random((4, 9), 19, DType::F64);
        let gamma = random((1, 9), 20, DType::F64).squeeze(0).unwrap();
        let beta = random((1, 9), 21, DType::F64).squeeze(0).unwrap();
        for (kind, bias) in [
            (NormKind::LayerNorm, Some(&beta)),
            (NormKind::RmsNorm, None),
        ] {
            check_finite_differences(&x, |t| norm(t, kind, &gamma, bias, eps)?.mul(&w)?.sum_all());
        }
    }

    #[test]
    fn cross_entropy_refuses_targets_outside_the_vocabulary() {
        let x = random((2, 4), 7, DType::F32);
        let err = cross_entropy_rows(&x, &[0, 4], &[1.0, 1.0]).unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    }
}
