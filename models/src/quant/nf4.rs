//! NF4 ("4-bit NormalFloat") quantization as QLoRA defines it and bitsandbytes stores it.
//!
//! * The flattened tensor is cut into blocks of [`BLOCK_SIZE`] (64) values; each block is scaled
//!   by its absolute maximum into `[-1, 1]` and every value is replaced by the index of the nearest
//!   of the 16 [`NF4_CODE`] values (quantiles of a standard normal, with an exact zero).
//! * Two 4-bit indices share a byte, the first value of each pair in the high nibble (the
//!   bitsandbytes layout).
//! * With double quantization the per-block absmax values (f32) are themselves quantized: their
//!   mean is subtracted, and the centred values are quantized blockwise ([`DQ_BLOCK_SIZE`] = 256
//!   per block, with an f32 absmax per block) to 8-bit indices into bitsandbytes' signed dynamic
//!   map ([`dynamic_map`]). That is the "8-bit float" of the QLoRA paper and brings the statistic
//!   overhead from 32/64 = 0.5 to about 8/64 + 32/(64·256) ≈ 0.127 bits per weight.
//!
//! The last block of either level may be partial, as in bitsandbytes. Tensors with an odd number
//! of elements (which cannot fill whole bytes) and empty tensors are rejected.

use super::QuantError;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Values per NF4 block (one absmax each).
pub const BLOCK_SIZE: usize = 64;
/// Absmax values per block of the second (double) quantization level.
pub const DQ_BLOCK_SIZE: usize = 256;

/// The 16 NF4 code values, index order, as in QLoRA / bitsandbytes (index 7 is exactly 0).
// Digits kept as bitsandbytes publishes them so the table can be compared by eye.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// Midpoints between consecutive [`NF4_CODE`] values: a value maps to the number of midpoints
/// strictly below it, which is its nearest code (ties go to the lower code, as bitsandbytes'
/// threshold tree does).
fn nf4_midpoints() -> &'static [f32; 15] {
    static MID: OnceLock<[f32; 15]> = OnceLock::new();
    MID.get_or_init(|| std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) * 0.5))
}

/// The index of the NF4 code nearest to `x` (`x` already scaled into `[-1, 1]`).
pub fn nf4_index(x: f32) -> u8 {
    nf4_midpoints().partition_point(|&m| m < x) as u8
}

/// bitsandbytes' signed 8-bit dynamic quantization map (`create_dynamic_map(signed=True,
/// max_exponent_bits=7, total_bits=8)`), sorted ascending: 256 values in `[-1, 1]` whose spacing
/// shrinks by 10× per exponent step towards zero, plus 0 and 1.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| {
        let max_exponent_bits = 7i32;
        let mut data: Vec<f32> = Vec::with_capacity(256);
        for i in 0..max_exponent_bits {
            // Exponent i has 2^i fraction steps: midpoints of a 2^i + 1 point linspace over
            // [0.1, 1] times 10^(i-6), all in f32 and with torch.linspace's two-sided formula
            // (which its CPU kernel evaluates with fused multiply-adds) so the table is
            // bit-identical to bitsandbytes'.
            let items = (1usize << i) + 1;
            let step = (1.0f32 - 0.1f32) / (items - 1) as f32;
            let boundaries: Vec<f32> = (0..items)
                .map(|k| {
                    if k < items / 2 {
                        step.mul_add(k as f32, 0.1f32)
                    } else {
                        (-step).mul_add((items - 1 - k) as f32, 1.0f32)
                    }
                })
                .collect();
            let scale = 10f64.powi(i - (max_exponent_bits - 1)) as f32;
            for w in boundaries.windows(2) {
                let mean = (w[0] + w[1]) / 2.0;
                data.push(scale * mean);
                data.push(-scale * mean);
            }
        }
        data.push(0.0);
        data.push(1.0);
        data.sort_by(f32::total_cmp);
        let mut out = [0f32; 256];
        out.copy_from_slice(&data);
        out
    })
}

/// Index of the dynamic-map value nearest to `x` (`x` in `[-1, 1]`).
fn dynamic_index(x: f32) -> u8 {
    let map = dynamic_map();
    let hi = map.partition_point(|&m| m < x).min(255);
    if hi == 0 {
        return 0;
    }
    let lo = hi - 1;
    if (x - map[lo]).abs() <= (map[hi] - x).abs() {
        lo as u8
    } else {
        hi as u8
    }
}

/// How the per-block absmax values of an [`Nf4Tensor`] are stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Nf4Absmax {
    /// One f32 per block (single quantization).
    F32(Vec<f32>),
    /// Double quantization: `absmax[i] = dynamic_map()[codes[i]] * scales[i / 256] + offset`.
    Double {
        /// One 8-bit dynamic-map index per NF4 block.
        codes: Vec<u8>,
        /// One f32 absmax per [`DQ_BLOCK_SIZE`] absmax values.
        scales: Vec<f32>,
        /// Mean of all absmax values, subtracted before quantizing them.
        offset: f32,
    },
}

impl Nf4Absmax {
    /// Number of NF4 blocks described.
    pub fn len(&self) -> usize {
        match self {
            Nf4Absmax::F32(v) => v.len(),
            Nf4Absmax::Double { codes, .. } => codes.len(),
        }
    }

    /// Whether no blocks are described.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The absmax of every NF4 block, decoded to f32.
    pub fn decode(&self) -> Result<Vec<f32>, QuantError> {
        match self {
            Nf4Absmax::F32(v) => Ok(v.clone()),
            Nf4Absmax::Double {
                codes,
                scales,
                offset,
            } => {
                if scales.len() != codes.len().div_ceil(DQ_BLOCK_SIZE) {
                    return Err(QuantError::Corrupt(format!(
                        "{} absmax codes need {} second-level scales, found {}",
                        codes.len(),
                        codes.len().div_ceil(DQ_BLOCK_SIZE),
                        scales.len()
                    )));
                }
                let map = dynamic_map();
                Ok(codes
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| map[c as usize] * scales[i / DQ_BLOCK_SIZE] + offset)
                    .collect())
            }
        }
    }

    /// Bytes used by the statistics.
    pub fn size_bytes(&self) -> usize {
        match self {
            Nf4Absmax::F32(v) => 4 * v.len(),
            Nf4Absmax::Double { codes, scales, .. } => codes.len() + 4 * scales.len() + 4,
        }
    }
}

/// A tensor stored as NF4: packed 4-bit codes plus per-block scales.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    shape: Vec<usize>,
    packed: Vec<u8>,
    absmax: Nf4Absmax,
    uploaded: Uploaded,
}

/// The packed codes (`u8`, `[n / 2]`) and decoded block scales (`f32`) of an [`Nf4Tensor`] on
/// one accelerator, kept so that every later use decodes there without copying the weight from
/// the host again: the quantized base stays resident on the device, as in QLoRA.
#[derive(Default)]
struct Uploaded(std::sync::Mutex<Option<(Device, Tensor, Tensor)>>);

impl Clone for Uploaded {
    /// A clone starts empty and uploads on its first use.
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for Uploaded {
    /// A cache, not part of the value.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Uploaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on = self
            .0
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|(d, _, _)| format!("{:?}", d.location())));
        write!(f, "Uploaded({})", on.as_deref().unwrap_or("none"))
    }
}

impl Nf4Tensor {
    /// Quantizes `t` (any float dtype, any device) to NF4, with double quantization of the
    /// absmax values when `double_quant` (QLoRA's default) is set.
    pub fn quantize(t: &Tensor, double_quant: bool) -> Result<Self, QuantError> {
        let shape = t.dims().to_vec();
        let n = t.elem_count();
        let reject = |reason: &str| QuantError::Unsupported {
            shape: shape.clone(),
            format: "NF4".into(),
            reason: reason.into(),
        };
        if n == 0 {
            return Err(reject("the tensor is empty"));
        }
        if !n.is_multiple_of(2) {
            return Err(reject(
                "NF4 packs two 4-bit codes per byte, so the element count must be even; \
                 keep this tensor in a dense format",
            ));
        }
        if !t.dtype().is_float() {
            return Err(reject("only floating-point tensors can be quantized"));
        }
        let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(reject("the tensor contains NaN or infinite values"));
        }
        let absmax: Vec<f32> = values
            .par_chunks(BLOCK_SIZE)
            .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
            .collect();
        // Codes are chosen against the exact block absmax, as bitsandbytes does; double
        // quantization then compresses the statistics independently.
        let packed: Vec<u8> = values
            .par_chunks(BLOCK_SIZE)
            .zip(absmax.par_iter())
            .flat_map_iter(|(block, &s)| {
                // An all-zero block has absmax 0; code 7 is exactly 0 (bitsandbytes would divide
                // by zero there and pick an arbitrary code).
                let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                block.chunks(2).map(move |p| {
                    (nf4_index((p[0] * inv).clamp(-1.0, 1.0)) << 4)
                        | nf4_index((p[1] * inv).clamp(-1.0, 1.0))
                })
            })
            .collect();
        let absmax = if double_quant {
            double_quantize(&absmax)
        } else {
            Nf4Absmax::F32(absmax)
        };
        Ok(Self {
            shape,
            packed,
            absmax,
            uploaded: Uploaded::default(),
        })
    }

    /// Rebuilds a tensor from stored parts (e.g. loaded from disk), checking their sizes agree.
    pub fn from_parts(
        shape: Vec<usize>,
        packed: Vec<u8>,
        absmax: Nf4Absmax,
    ) -> Result<Self, QuantError> {
        let n: usize = shape.iter().product();
        if n == 0 || !n.is_multiple_of(2) || packed.len() != n / 2 {
            return Err(QuantError::Corrupt(format!(
                "shape {shape:?} needs {} packed bytes (even, non-empty element count), found {}",
                n / 2,
                packed.len()
            )));
        }
        if absmax.len() != n.div_ceil(BLOCK_SIZE) {
            return Err(QuantError::Corrupt(format!(
                "shape {shape:?} needs {} block scales, found {}",
                n.div_ceil(BLOCK_SIZE),
                absmax.len()
            )));
        }
        absmax.decode()?;
        Ok(Self {
            shape,
            packed,
            absmax,
            uploaded: Uploaded::default(),
        })
    }

    /// Decodes to a tensor of `dtype` on `device`.
    ///
    /// On the CPU the codes are decoded by a parallel host loop; on accelerators only the packed
    /// codes and block scales (≈ 1/8 of the f32 size) are uploaded and decoded there with
    /// tensor ops ([`Nf4Tensor::dequantize_with_tensor_ops`]). Both give identical values.
    pub fn dequantize(&self, dtype: DType, device: &Device) -> Result<Tensor, QuantError> {
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            let (packed, scales) = self.uploaded(device)?;
            let flat = super::nf4_cuda::dequantize(&packed, &scales, self.elem_count(), dtype)?;
            return Ok(flat.reshape(self.shape.as_slice())?);
        }
        if !device.is_cpu() {
            return self.dequantize_with_tensor_ops(dtype, device);
        }
        let values = self.dequantize_f32()?;
        Ok(Tensor::from_vec(values, self.shape.as_slice(), device)?.to_dtype(dtype)?)
    }

    /// Decodes with candle tensor ops on `device` (no custom kernel): unpack nibbles by integer
    /// division, look codes up with `index_select`, scale by the per-block absmax.
    pub fn dequantize_with_tensor_ops(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, QuantError> {
        let n = self.elem_count();
        let (packed, scales) = self.uploaded(device)?;
        let packed = packed.to_dtype(DType::U32)?;
        let sixteen = Tensor::new(&[16u32], device)?;
        let hi = packed.broadcast_div(&sixteen)?;
        let lo = (&packed - hi.broadcast_mul(&sixteen)?)?;
        let idx = Tensor::stack(&[hi, lo], 1)?.flatten_all()?;
        let table = Tensor::new(&NF4_CODE, device)?;
        let vals = table.index_select(&idx, 0)?;
        let full = n / BLOCK_SIZE;
        let rem = n % BLOCK_SIZE;
        let mut parts = Vec::with_capacity(2);
        if full > 0 {
            let s = scales.narrow(0, 0, full)?.reshape((full, 1))?;
            let body = vals
                .narrow(0, 0, full * BLOCK_SIZE)?
                .reshape((full, BLOCK_SIZE))?;
            parts.push(body.broadcast_mul(&s)?.flatten_all()?);
        }
        if rem > 0 {
            let s = scales.narrow(0, full, 1)?;
            parts.push(vals.narrow(0, full * BLOCK_SIZE, rem)?.broadcast_mul(&s)?);
        }
        let out = if parts.len() == 1 {
            parts.remove(0)
        } else {
            Tensor::cat(&parts, 0)?
        };
        Ok(out.reshape(self.shape.as_slice())?.to_dtype(dtype)?)
    }

    /// The packed codes and decoded block scales on `device`, uploaded on first use and kept
    /// (for one device at a time: a use on another device replaces them).
    fn uploaded(&self, device: &Device) -> Result<(Tensor, Tensor), QuantError> {
        let mut slot = self
            .uploaded
            .0
            .lock()
            .map_err(|_| QuantError::Corrupt("NF4 device copy: lock poisoned".into()))?;
        if let Some((on, packed, scales)) = slot.as_ref() {
            if on.same_device(device) {
                return Ok((packed.clone(), scales.clone()));
            }
        }
        let packed = Tensor::from_slice(&self.packed, self.packed.len(), device)?;
        let scales = self.absmax.decode()?;
        let blocks = scales.len();
        let scales = Tensor::from_vec(scales, blocks, device)?;
        *slot = Some((device.clone(), packed.clone(), scales.clone()));
        Ok((packed, scales))
    }

    /// Decodes to host f32 values in row-major order.
    ///
    /// Each block looks its codes up in the 16 code values already multiplied by the block's
    /// absmax (the same products as scaling each value, so the same numbers), written straight
    /// into the output by block-sized parallel tasks: training decodes every frozen weight in
    /// every forward and backward, so this loop is on its critical path.
    pub fn dequantize_f32(&self) -> Result<Vec<f32>, QuantError> {
        let scales = self.absmax.decode()?;
        let mut out = vec![0f32; self.packed.len() * 2];
        // Several blocks per task: one block (64 values) is too little work to hand out.
        const BLOCKS_PER_TASK: usize = 64;
        out.par_chunks_mut(BLOCK_SIZE * BLOCKS_PER_TASK)
            .zip(self.packed.par_chunks(BLOCK_SIZE / 2 * BLOCKS_PER_TASK))
            .zip(scales.par_chunks(BLOCKS_PER_TASK))
            .for_each(|((out, bytes), scales)| {
                for ((out, bytes), &s) in out
                    .chunks_mut(BLOCK_SIZE)
                    .zip(bytes.chunks(BLOCK_SIZE / 2))
                    .zip(scales)
                {
                    let table: [f32; 16] = std::array::from_fn(|i| NF4_CODE[i] * s);
                    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
                        pair[0] = table[(b >> 4) as usize];
                        pair[1] = table[(b & 0x0f) as usize];
                    }
                }
            });
        Ok(out)
    }

    /// The 4-bit code of element `i` (row-major), for inspection and tests.
    pub fn code(&self, i: usize) -> Option<u8> {
        let b = *self.packed.get(i / 2)?;
        Some(if i.is_multiple_of(2) {
            b >> 4
        } else {
            b & 0x0f
        })
    }

    /// Logical shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of logical elements.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Packed codes, two per byte, first element in the high nibble.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// Per-block scale storage.
    pub fn absmax(&self) -> &Nf4Absmax {
        &self.absmax
    }

    /// Bytes used by codes and statistics together.
    pub fn size_bytes(&self) -> usize {
        self.packed.len() + self.absmax.size_bytes()
    }

    /// Average storage cost in bits per element.
    pub fn bits_per_element(&self) -> f64 {
        8.0 * self.size_bytes() as f64 / self.elem_count() as f64
    }
}

impl Nf4Tensor {
    /// The tensor as named plain tensors under `prefix` (for safetensors caches):
    /// `{prefix}.nf4_shape` (u32), `{prefix}.nf4_packed` (u8), and either `{prefix}.nf4_absmax`
    /// (f32) or `{prefix}.nf4_absmax_codes` (u8), `{prefix}.nf4_absmax_scales` (f32) and
    /// `{prefix}.nf4_absmax_offset` (f32, one value).
    pub fn to_tensors(&self, prefix: &str) -> Result<Vec<(String, Tensor)>, QuantError> {
        let cpu = &Device::Cpu;
        let shape: Vec<u32> = self.shape.iter().map(|&d| d as u32).collect();
        let mut out = vec![
            (
                format!("{prefix}.nf4_shape"),
                Tensor::new(shape.as_slice(), cpu)?,
            ),
            (
                format!("{prefix}.nf4_packed"),
                Tensor::new(self.packed.as_slice(), cpu)?,
            ),
        ];
        match &self.absmax {
            Nf4Absmax::F32(v) => {
                out.push((
                    format!("{prefix}.nf4_absmax"),
                    Tensor::new(v.as_slice(), cpu)?,
                ));
            }
            Nf4Absmax::Double {
                codes,
                scales,
                offset,
            } => {
                out.push((
                    format!("{prefix}.nf4_absmax_codes"),
                    Tensor::new(codes.as_slice(), cpu)?,
                ));
                out.push((
                    format!("{prefix}.nf4_absmax_scales"),
                    Tensor::new(scales.as_slice(), cpu)?,
                ));
                out.push((
                    format!("{prefix}.nf4_absmax_offset"),
                    Tensor::new(&[*offset], cpu)?,
                ));
            }
        }
        Ok(out)
    }

    /// Reads a tensor written by [`Nf4Tensor::to_tensors`] from `tensors`.
    pub fn from_tensors(
        tensors: &std::collections::HashMap<String, Tensor>,
        prefix: &str,
    ) -> Result<Self, QuantError> {
        let get = |name: &str| {
            tensors
                .get(&format!("{prefix}.{name}"))
                .ok_or_else(|| QuantError::Corrupt(format!("`{prefix}.{name}` is missing")))
        };
        let u8s = |t: &Tensor| -> Result<Vec<u8>, QuantError> {
            Ok(t.flatten_all()?.to_dtype(DType::U8)?.to_vec1::<u8>()?)
        };
        let f32s = |t: &Tensor| -> Result<Vec<f32>, QuantError> {
            Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
        };
        let shape: Vec<usize> = get("nf4_shape")?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?
            .into_iter()
            .map(|d| d as usize)
            .collect();
        let packed = u8s(get("nf4_packed")?)?;
        let absmax = match tensors.get(&format!("{prefix}.nf4_absmax")) {
            Some(t) => Nf4Absmax::F32(f32s(t)?),
            None => Nf4Absmax::Double {
                codes: u8s(get("nf4_absmax_codes")?)?,
                scales: f32s(get("nf4_absmax_scales")?)?,
                offset: *f32s(get("nf4_absmax_offset")?)?.first().ok_or_else(|| {
                    QuantError::Corrupt(format!("`{prefix}.nf4_absmax_offset` is empty"))
                })?,
            },
        };
        Self::from_parts(shape, packed, absmax)
    }
}

/// Second-level quantization of the absmax values (bitsandbytes `compress_statistics=True`).
fn double_quantize(absmax: &[f32]) -> Nf4Absmax {
    let offset = (absmax.iter().map(|&v| v as f64).sum::<f64>() / absmax.len() as f64) as f32;
    let centred: Vec<f32> = absmax.iter().map(|&v| v - offset).collect();
    let scales: Vec<f32> = centred
        .chunks(DQ_BLOCK_SIZE)
        .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect();
    let codes = centred
        .chunks(DQ_BLOCK_SIZE)
        .zip(&scales)
        .flat_map(|(b, &s)| {
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            b.iter()
                .map(move |&v| dynamic_index((v * inv).clamp(-1.0, 1.0)))
        })
        .collect();
    Nf4Absmax::Double {
        codes,
        scales,
        offset,
    }
}

/// Quantizes `t` to NF4 with double quantization (QLoRA's storage format).
pub fn quantize(t: &Tensor) -> Result<Nf4Tensor, QuantError> {
    Nf4Tensor::quantize(t, true)
}

/// Decodes `q` to a tensor of `dtype` on `device`.
pub fn dequantize(q: &Nf4Tensor, dtype: DType, device: &Device) -> Result<Tensor, QuantError> {
    q.dequantize(dtype, device)
}
