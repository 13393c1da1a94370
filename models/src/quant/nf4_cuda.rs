//! NF4 dequantization on CUDA through a kernel compiled at run time with NVRTC.
//!
//! One thread decodes one packed byte (two 4-bit codes) with the same arithmetic as the host
//! decoder (`NF4_CODE[c] · scale` in f32, then round-to-nearest-even to f16/bf16), so the
//! device copy is bit-identical to [`Nf4Tensor::dequantize_f32`](super::nf4::Nf4Tensor)
//! converted to the same dtype. The code table is written into the kernel source from
//! [`NF4_CODE`], so host and device cannot drift apart. Only built with the `cuda` feature.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{cudarc, CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::nf4::{BLOCK_SIZE, NF4_CODE};

/// Name under which the compiled module is cached on each device.
const MODULE: &str = "pipeline_nf4_dequantize";

/// The kernels' CUDA C source (no headers needed: the f16/bf16 conversions are PTX `cvt`s).
fn source() -> String {
    let table = NF4_CODE
        .iter()
        .map(|v| format!("{v:?}f"))
        .collect::<Vec<_>>()
        .join(", ");
    // The f16 and bf16 kernels differ only in the PTX conversion they round with.
    let half_kernels = ["f16", "bf16"]
        .map(|ty| {
            format!(
                r#"
extern "C" __global__ void nf4_dequantize_{ty}(const unsigned char* packed, const float* scales,
                                               unsigned short* out, unsigned long long pairs) {{
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= pairs) return;
    float hi, lo;
    decode(packed, scales, i, &hi, &lo);
    unsigned short h, l;
    asm("cvt.rn.{ty}.f32 %0, %1;" : "=h"(h) : "f"(hi));
    asm("cvt.rn.{ty}.f32 %0, %1;" : "=h"(l) : "f"(lo));
    out[2ull * i] = h;
    out[2ull * i + 1ull] = l;
}}
"#
            )
        })
        .concat();
    format!(
        r#"
__constant__ float NF4_CODE[16] = {{ {table} }};

__device__ __forceinline__ void decode(const unsigned char* packed, const float* scales,
                                       unsigned long long i, float* hi, float* lo) {{
    unsigned char b = packed[i];
    float s = scales[(2ull * i) / {BLOCK_SIZE}ull];
    *hi = NF4_CODE[b >> 4] * s;
    *lo = NF4_CODE[b & 15] * s;
}}

extern "C" __global__ void nf4_dequantize_f32(const unsigned char* packed, const float* scales,
                                              float* out, unsigned long long pairs) {{
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= pairs) return;
    float hi, lo;
    decode(packed, scales, i, &hi, &lo);
    out[2ull * i] = hi;
    out[2ull * i + 1ull] = lo;
}}

{half_kernels}
"#
    )
}

/// The PTX of [`source`], compiled once per process (the driver then loads it per device).
///
/// Compiled for `compute_80`: the bf16 conversion needs it (NVRTC's default target is older,
/// and `ptxas` rejects `cvt.rn.bf16.f32` there), so the kernel needs an Ampere or newer GPU
/// (A100, H100, ...); the driver JIT-compiles the PTX for the actual device.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        let options = cudarc::nvrtc::CompileOptions {
            arch: Some("compute_80"),
            ..Default::default()
        };
        cudarc::nvrtc::compile_ptx_with_opts(source(), options)
            .map(|ptx| ptx.to_src())
            .map_err(|e| e.to_string())
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(format!("compiling the NF4 CUDA kernel: {e}")))
}

/// Decodes `n` NF4 values on the CUDA device holding `packed` (`u8`, `[n / 2]`, two codes per
/// byte, high nibble first) and `scales` (`f32`, one per block of [`BLOCK_SIZE`]) into a flat
/// `[n]` tensor of `dtype` (f32, f16 or bf16; others are converted from f32).
pub fn dequantize(packed: &Tensor, scales: &Tensor, n: usize, dtype: DType) -> Result<Tensor> {
    if !n.is_multiple_of(2)
        || packed.elem_count() != n / 2
        || scales.elem_count() != n.div_ceil(BLOCK_SIZE)
    {
        candle_core::bail!(
            "NF4 kernel: {n} values need {} packed bytes and {} scales, got {} and {}",
            n / 2,
            n.div_ceil(BLOCK_SIZE),
            packed.elem_count(),
            scales.elem_count()
        );
    }
    let out_dtype = match dtype {
        DType::F16 | DType::BF16 => dtype,
        _ => DType::F32,
    };
    let decoded = packed.apply_op2_no_bwd(
        scales,
        &Nf4Dequantize {
            n,
            dtype: out_dtype,
        },
    )?;
    decoded.to_dtype(dtype)
}

struct Nf4Dequantize {
    n: usize,
    dtype: DType,
}

impl CustomOp2 for Nf4Dequantize {
    fn name(&self) -> &'static str {
        "nf4-dequantize"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NF4 kernel runs on CUDA; the CPU decodes on the host")
    }

    fn cuda_fwd(
        &self,
        packed: &CudaStorage,
        packed_layout: &Layout,
        scales: &CudaStorage,
        scales_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (Some((p0, p1)), Some((s0, s1))) = (
            packed_layout.contiguous_offsets(),
            scales_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("NF4 kernel: packed codes and scales must be contiguous");
        };
        let dev = packed.device().clone();
        let packed = packed.as_cuda_slice::<u8>()?.slice(p0..p1);
        let scales = scales.as_cuda_slice::<f32>()?.slice(s0..s1);
        let pairs = (self.n / 2) as u64;
        let threads = u32::try_from(pairs).map_err(|_| {
            candle_core::Error::Msg(format!("NF4 kernel: {} values are too many", self.n))
        })?;
        let kernel = match self.dtype {
            DType::F16 => "nf4_dequantize_f16",
            DType::BF16 => "nf4_dequantize_bf16",
            _ => "nf4_dequantize_f32",
        };
        let func = dev.get_or_load_custom_func(kernel, MODULE, ptx()?)?;
        // SAFETY (each `alloc`): every element is written by the kernel before it is read.
        let out = match self.dtype {
            DType::F16 => {
                let out = unsafe { dev.alloc::<half::f16>(self.n)? };
                launch(func.builder(), &packed, &scales, &out, &pairs, threads)?;
                CudaStorage::wrap_cuda_slice(out, dev)
            }
            DType::BF16 => {
                let out = unsafe { dev.alloc::<half::bf16>(self.n)? };
                launch(func.builder(), &packed, &scales, &out, &pairs, threads)?;
                CudaStorage::wrap_cuda_slice(out, dev)
            }
            _ => {
                let out = unsafe { dev.alloc::<f32>(self.n)? };
                launch(func.builder(), &packed, &scales, &out, &pairs, threads)?;
                CudaStorage::wrap_cuda_slice(out, dev)
            }
        };
        Ok((out, Shape::from(self.n)))
    }
}

/// Runs one of the kernels: `packed` and `scales` in, `out` (`2 · pairs` elements of the
/// kernel's output type) written.
fn launch<'a, T>(
    mut builder: LaunchArgs<'a>,
    packed: &'a CudaView<'a, u8>,
    scales: &'a CudaView<'a, f32>,
    out: &'a CudaSlice<T>,
    pairs: &'a u64,
    threads: u32,
) -> Result<()> {
    builder.arg(packed).arg(scales).arg(out).arg(pairs);
    // SAFETY: the arguments match the kernels' signature (the output's element size is the
    // kernel's: 4 bytes for f32, 2 for f16/bf16); sizes were checked by the caller.
    unsafe { builder.launch(LaunchConfig::for_num_elems(threads)).w()? };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC accepts the source and the PTX has the three entry points; runs without a GPU
    /// (NVRTC needs no driver), given the CUDA libraries on the library path. With
    /// `NF4_PTX_OUT` set, the PTX is also written there, e.g. for `ptxas -arch=sm_90`, which
    /// is how the `compute_80` floor was found.
    #[test]
    fn the_kernel_compiles_with_nvrtc() -> Result<()> {
        let ptx = ptx()?;
        for kernel in [
            "nf4_dequantize_f32",
            "nf4_dequantize_f16",
            "nf4_dequantize_bf16",
        ] {
            assert!(
                ptx.contains(&format!(".entry {kernel}")),
                "{kernel} missing"
            );
        }
        if let Ok(path) = std::env::var("NF4_PTX_OUT") {
            std::fs::write(path, ptx)?;
        }
        Ok(())
    }
}
