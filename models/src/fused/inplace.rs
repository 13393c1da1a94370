//! In-place CPU kernels for an encoder's elementwise work (inference only, no backward): the
//! MiniLM encoder ([`crate::encoders::minilm`]) runs on them.
//!
//! With candle's ops, each bias add, residual add, GELU and the masked soft-max is a pass that
//! allocates a fresh tensor; on two cores these passes (and the page faults of their
//! allocations) cost about as much as the matrix products. These kernels update the tensor
//! the preceding matmul just produced, in one pass each, with branch-free `exp` ([`exp_f32`],
//! shared with the training kernels) and `erf` that the compiler vectorises (the libm `erff`
//! behind candle's `gelu_erf` alone took 15% of the CPU time).
//!
//! The layer norm and the soft-max here keep their own row loops rather than the training
//! kernels' ([`super::norm`], [`super::softmax`]): these accumulate in f32 over eight lanes and
//! mask keys without a bias tensor, the training ones accumulate in f64 or in order, and the
//! encoder's numbers (checked against a numpy reference) come from these.
//!
//! Every op takes contiguous f32 CPU tensors; [`supported`] says whether a tensor qualifies,
//! and the caller uses candle's composite ops otherwise (other devices, other dtypes).

use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

use super::{contiguous_slice, exp_f32};

/// Whether the kernels can update `t` in place: a contiguous f32 tensor on the CPU.
pub(crate) fn supported(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()
}

/// `x += bias` (broadcast over rows), then GELU (exact erf form) when `gelu` is set.
pub(crate) fn bias_act(x: &Tensor, bias: &Tensor, gelu: bool) -> Result<()> {
    x.inplace_op2(bias, &BiasAct { gelu })
}

/// `x += bias + residual` (bias broadcast over rows): a dense layer's output plus its skip
/// connection, ready for the layer norm.
pub(crate) fn bias_residual(x: &Tensor, bias: &Tensor, residual: &Tensor) -> Result<()> {
    x.inplace_op3(bias, residual, &BiasResidual)
}

/// Soft-max over the last dimension of attention scores `(batch, heads, len, len)`, keys
/// whose `mask` `(batch, len)` entry is 0 getting weight 0 (the additive-mask convention of
/// BERT, without materialising the mask).
pub(crate) fn masked_softmax(scores: &Tensor, mask: &Tensor) -> Result<()> {
    scores.inplace_op2(mask, &MaskedSoftmax)
}

/// Layer normalisation of each last-dimension row of `x`, in place: `(x - mean) /
/// sqrt(var + eps) * weight + bias`, mean and (biased) variance in f32 as PyTorch computes
/// them.
pub(crate) fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<()> {
    x.inplace_op1(&LayerNormOp {
        weight: weight.clone(),
        bias: bias.clone(),
        eps,
    })
}

/// Defines `fn $name(args)` from a body that is compiled twice: as is, and for AVX2 + FMA,
/// which is used when the CPU has them (the crate is built for baseline x86-64, whose SSE2
/// vectorises the elementwise loops four lanes wide).
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// GELU `x Φ(x)` with Φ from erfc by Abramowitz & Stegun 7.1.26 (absolute error below
/// 1.5e-7, i.e. about one f32 ulp of Φ near 1).
#[inline(always)]
fn gelu(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let erfc = poly * exp_f32(-a * a);
    let phi = if z >= 0.0 {
        1.0 - 0.5 * erfc
    } else {
        0.5 * erfc
    };
    x * phi
}

/// Lanes of the partial max/sum accumulators: the compiler keeps them in one vector
/// register, where a single running float would serialise every add.
const LANES: usize = 8;

/// Sum of `xs` with `LANES` partial sums.
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + rest
}

multiversion! {
    /// GELU(x + bias) over rows of `bias.len()`.
    fn bias_gelu_rows(x: &mut [f32], bias: &[f32]) {
        for row in x.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v = gelu(*v + b);
            }
        }
    }
}

multiversion! {
    /// Masked soft-max of one row of scores.
    fn softmax_row(s: &mut [f32], mask: &[f32]) {
        let mut maxes = [f32::NEG_INFINITY; LANES];
        for (sc, mc) in s.chunks(LANES).zip(mask.chunks(LANES)) {
            for ((acc, &v), &keep) in maxes.iter_mut().zip(sc).zip(mc) {
                let v = if keep != 0.0 { v } else { f32::NEG_INFINITY };
                *acc = if v > *acc { v } else { *acc };
            }
        }
        let max = maxes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Multiplying by the 0/1 mask zeroes padded keys (exp is finite after its clamp,
        // so never 0 * inf).
        for (v, &keep) in s.iter_mut().zip(mask) {
            *v = exp_f32(*v - max) * keep;
        }
        let sum = lane_sum(s, |v| v);
        // A row whose keys are all padding cannot occur ([CLS] is always real); keep it
        // finite anyway.
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        for v in s.iter_mut() {
            *v *= inv;
        }
    }
}

multiversion! {
    /// Layer norm of rows of `weight.len()`, in place.
    fn layer_norm_rows(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
        let n = weight.len();
        for row in x.chunks_exact_mut(n) {
            let mean = lane_sum(row, |v| v) / n as f32;
            let var = lane_sum(row, |v| (v - mean) * (v - mean)) / n as f32;
            let r = 1.0 / (var + eps).sqrt();
            for ((v, w), b) in row.iter_mut().zip(weight).zip(bias) {
                *v = (*v - mean) * r * w + b;
            }
        }
    }
}

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[start..end]),
        _ => candle_core::bail!("{op}: f32 only"),
    }
}

/// Rows of at least this many elements per rayon task, so tiny rows do not drown in
/// scheduling.
const MIN_TASK_ELEMS: usize = 16 * 1024;

fn rows_per_task(row: usize) -> usize {
    MIN_TASK_ELEMS.div_ceil(row.max(1))
}

struct BiasAct {
    gelu: bool,
}

impl InplaceOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "inplace-bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let bias = contiguous_slice::<f32>(s2, l2)?;
        let x = slice_mut(s1, l1, self.name())?;
        let n = bias.len();
        if n == 0 || x.len() % n != 0 {
            candle_core::bail!(
                "{}: {} values do not split into rows of {n}",
                self.name(),
                x.len()
            );
        }
        let gelu_on = self.gelu;
        x.par_chunks_mut(n * rows_per_task(n)).for_each(|rows| {
            if gelu_on {
                bias_gelu_rows(rows, bias);
            } else {
                for row in rows.chunks_exact_mut(n) {
                    for (v, b) in row.iter_mut().zip(bias) {
                        *v += b;
                    }
                }
            }
        });
        Ok(())
    }
}

struct BiasResidual;

impl InplaceOp3 for BiasResidual {
    fn name(&self) -> &'static str {
        "inplace-bias-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let bias = contiguous_slice::<f32>(s2, l2)?;
        let res = contiguous_slice::<f32>(s3, l3)?;
        let x = slice_mut(s1, l1, self.name())?;
        let n = bias.len();
        if n == 0 || x.len() % n != 0 || res.len() != x.len() {
            candle_core::bail!("{}: shapes do not match", self.name());
        }
        let chunk = n * rows_per_task(n);
        x.par_chunks_mut(chunk)
            .zip(res.par_chunks(chunk))
            .for_each(|(xs, rs)| {
                for (xr, rr) in xs.chunks_exact_mut(n).zip(rs.chunks_exact(n)) {
                    for ((v, b), r) in xr.iter_mut().zip(bias).zip(rr) {
                        *v += b + r;
                    }
                }
            });
        Ok(())
    }
}

struct MaskedSoftmax;

impl InplaceOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "inplace-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let dims = l1.dims();
        let &[b, heads, q, k] = dims else {
            candle_core::bail!(
                "{}: scores must be (batch, heads, len, len), got {dims:?}",
                self.name()
            );
        };
        let mask = contiguous_slice::<f32>(s2, l2)?;
        if mask.len() != b * k || k == 0 {
            candle_core::bail!(
                "{}: mask has {} values for {b} x {k} keys",
                self.name(),
                mask.len()
            );
        }
        let x = slice_mut(s1, l1, self.name())?;
        // Each sequence owns heads x queries consecutive rows of the scores.
        let rows_per_batch = (heads * q).max(1);
        x.par_chunks_mut(k)
            .enumerate()
            .with_min_len(rows_per_task(k))
            .for_each(|(row, s)| softmax_row(s, &mask[(row / rows_per_batch) * k..][..k]));
        Ok(())
    }
}

struct LayerNormOp {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl InplaceOp1 for LayerNormOp {
    fn name(&self) -> &'static str {
        "inplace-layer-norm"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let (wg, wl) = self.weight.storage_and_layout();
        let (bg, bl) = self.bias.storage_and_layout();
        let (candle_core::Storage::Cpu(w), candle_core::Storage::Cpu(b)) = (&*wg, &*bg) else {
            candle_core::bail!("{}: weight and bias must be on the CPU", self.name());
        };
        let weight = contiguous_slice::<f32>(w, wl)?;
        let bias = contiguous_slice::<f32>(b, bl)?;
        let x = slice_mut(storage, layout, self.name())?;
        let n = weight.len();
        if n == 0 || bias.len() != n || x.len() % n != 0 {
            candle_core::bail!("{}: shapes do not match", self.name());
        }
        let eps = self.eps;
        x.par_chunks_mut(n * rows_per_task(n))
            .for_each(|rows| layer_norm_rows(rows, weight, bias, eps));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gelu_matches_erf_form() {
        let mut x = -10.0f64;
        while x < 10.0 {
            let want = 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2));
            let got = gelu(x as f32) as f64;
            assert!(
                (got - want).abs() < 2e-6 * (1.0 + x.abs()),
                "{x}: {got} vs {want}"
            );
            x += 0.01;
        }
    }

    /// erf in f64 (std has none): the Maclaurin series below |x| = 3 (terms stay small
    /// enough for ~1e-13 accuracy), Laplace's continued fraction for erfc above.
    fn erf(x: f64) -> f64 {
        let a = x.abs();
        if a >= 3.0 {
            let mut f = a;
            for k in (1..=80).rev() {
                f = a + (k as f64 / 2.0) / f;
            }
            let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / f;
            return x.signum() * (1.0 - erfc);
        }
        // erf(x) = 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1))
        let (mut term, mut sum, mut n) = (x, x, 0.0);
        while term.abs() > 1e-17 {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn kernels_match_candle_ops() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (6, 10), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 10, &dev).unwrap();
        let res = Tensor::randn(0f32, 1.0, (6, 10), &dev).unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };

        let want = x.broadcast_add(&bias).unwrap().gelu_erf().unwrap();
        let got = x.copy().unwrap();
        bias_act(&got, &bias, true).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);

        let want = (x.broadcast_add(&bias).unwrap() + &res).unwrap();
        let got = x.copy().unwrap();
        bias_residual(&got, &bias, &res).unwrap();
        assert!(max_diff(&got, &want) < 1e-6);

        let (w, b) = (
            Tensor::randn(1f32, 0.1, 10, &dev).unwrap(),
            Tensor::randn(0f32, 0.1, 10, &dev).unwrap(),
        );
        let want = candle_nn::ops::layer_norm(&x, &w, &b, 1e-12).unwrap();
        let got = x.copy().unwrap();
        layer_norm(&got, &w, &b, 1e-12).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);

        // Two sequences of 5 keys, the second with 2 padded keys.
        let scores = Tensor::randn(0f32, 3.0, (2, 3, 5, 5), &dev).unwrap();
        let mask = Tensor::new(&[[1f32, 1., 1., 1., 1.], [1., 1., 1., 0., 0.]], &dev).unwrap();
        let bias = ((mask.ones_like().unwrap() - &mask).unwrap() * -1e9)
            .unwrap()
            .reshape((2, 1, 1, 5))
            .unwrap();
        let want = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&bias).unwrap()).unwrap();
        let got = scores.copy().unwrap();
        masked_softmax(&got, &mask).unwrap();
        assert!(max_diff(&got, &want) < 1e-6);
        let padded: f32 = got
            .narrow(0, 1, 1)
            .unwrap()
            .narrow(3, 3, 2)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(padded, 0.0);
    }
}
