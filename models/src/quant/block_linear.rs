//! Inference straight from quantized codes: a frozen projection whose product reads the weight
//! as 4 or 8 bits per value ([`super::kernels`]), never keeping an f32 copy of it.
//!
//! The activations stay f32, so the product is the one with the decoded weight up to the order
//! of the additions: generations and likelihoods are the f32 path's (the tests bound the
//! difference). What changes is the memory traffic: a batch-1 decoding step streams about 5 bits
//! per weight instead of 32, which is what bounds it on a CPU.
//!
//! Long inputs (a batch of prompts in prefill: 256 rows or more) decode the weight for the one
//! call and take a dense product, which is faster there; the values are the same.
//!
//! It has no backward: it serves generation (the `generate` kind, `pipeline serve`, synthesis);
//! training goes through [`super::QuantLinear`]. Inputs that are not f32 on the CPU, and inputs
//! that record a graph, get the product with the decoded weight instead, so the layer is always
//! correct, only not always fast.

use std::sync::Arc;

use super::kernels::{self, GgmlBlocks, PackedWeight};
use super::{nf4, GgmlFormat, QuantError, QuantWeight};
use crate::linear::LinearLayer;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// Rows of activations from which a product decodes the weight and multiplies densely.
const DENSE_ROWS: usize = 256;
/// The largest weight (bytes as f32) decoded for one dense product.
const DENSE_MAX_BYTES: usize = 16 << 20;

/// A frozen linear projection `y = x Wᵀ (+ b)` computed on the weight's packed codes.
#[derive(Debug, Clone)]
pub struct BlockLinear {
    weight: Arc<PackedWeight>,
    bias: Option<Tensor>,
}

/// The product as a candle op over the activations' storage (no copy of `x`).
struct Product<'a>(&'a PackedWeight);

impl CustomOp1 for Product<'_> {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("packed-matmul takes f32 activations");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("packed-matmul takes contiguous activations");
        };
        let dims = layout.dims();
        let k = self.0.cols();
        if dims.last() != Some(&k) {
            candle_core::bail!("packed-matmul: activations {dims:?} do not end in {k}");
        }
        let m = (end - start) / k;
        let y = kernels::matmul(self.0, &data[start..end], m);
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.0.rows();
        }
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }
}

impl BlockLinear {
    /// A layer over `weight` (`[out, in]`) and an optional frozen `bias` (`[out]`). Weights
    /// whose rows are not whole blocks of their format are [`QuantError::Unsupported`]: decode
    /// those instead.
    pub fn new(
        weight: &QuantWeight,
        bias: Option<Tensor>,
    ) -> std::result::Result<Self, QuantError> {
        Ok(Self {
            weight: Arc::new(pack(weight)?),
            bias,
        })
    }

    /// Bytes held by the packed weight.
    pub fn size_bytes(&self) -> usize {
        self.weight.size_bytes()
    }

    /// The packed weight the products read.
    pub fn packed(&self) -> &PackedWeight {
        &self.weight
    }

    /// The product with the decoded weight, for inputs the kernels do not take.
    fn decoded_product(&self, x: &Tensor) -> Result<Tensor> {
        let w = Tensor::from_vec(
            self.weight.dequantize(),
            (self.weight.rows(), self.weight.cols()),
            x.device(),
        )?
        .to_dtype(x.dtype())?;
        // Leading dimensions flattened into one product (a broadcast batched product would
        // repeat the weight per batch row).
        let bias = self
            .bias
            .as_ref()
            .map(|b| b.to_dtype(x.dtype()))
            .transpose()?;
        crate::layers::dense::linear_forward(x, &w, bias.as_ref())
    }
}

/// `weight` (`[rows, cols]`) repacked into the kernels' layout. Weights whose rows are not
/// whole blocks of their format are [`QuantError::Unsupported`].
pub fn pack(weight: &QuantWeight) -> std::result::Result<PackedWeight, QuantError> {
    let unsupported = |shape: &[usize], format: &str, reason: String| QuantError::Unsupported {
        shape: shape.to_vec(),
        format: format.into(),
        reason,
    };
    let packed = match weight {
        QuantWeight::Ggml(g) => {
            let shape = g.shape().to_vec();
            let kind = match g.format() {
                GgmlFormat::Q4_0 => GgmlBlocks::Q4_0,
                GgmlFormat::Q4_1 => GgmlBlocks::Q4_1,
                GgmlFormat::Q8_0 => GgmlBlocks::Q8_0,
                GgmlFormat::Q4K => GgmlBlocks::Q4K,
            };
            let [rows, cols] = shape[..] else {
                return Err(unsupported(
                    &shape,
                    g.format().name(),
                    "not a matrix".into(),
                ));
            };
            let data = g.qtensor().data()?;
            PackedWeight::from_ggml(kind, rows, cols, &data)
                .map_err(|e| unsupported(&shape, g.format().name(), e.to_string()))?
        }
        QuantWeight::Nf4(t) => {
            let shape = t.shape().to_vec();
            let [rows, cols] = shape[..] else {
                return Err(unsupported(&shape, "nf4", "not a matrix".into()));
            };
            let absmax = t.absmax().decode()?;
            PackedWeight::from_nf4(
                rows,
                cols,
                t.packed(),
                &absmax,
                nf4::BLOCK_SIZE,
                nf4::NF4_CODE,
            )
            .map_err(|e| unsupported(&shape, "nf4", e.to_string()))?
        }
    };
    Ok(packed)
}

impl LinearLayer for BlockLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let fits = x.dtype() == DType::F32
            && x.device().is_cpu()
            && !x.track_op()
            && x.dims().last().copied() == Some(self.weight.cols());
        if !fits {
            return self.decoded_product(x);
        }
        // Many rows at once (a prompt's prefill) make the product compute-bound, where a dense
        // f32 product beats decoding every block once per tile of rows; the decoded copy lives
        // only for this call, and only for weights small enough that it costs little memory.
        let rows = x.elem_count() / self.weight.cols().max(1);
        if rows >= DENSE_ROWS && self.weight.rows() * self.weight.cols() * 4 <= DENSE_MAX_BYTES {
            return self.decoded_product(x);
        }
        let y = x.contiguous()?.apply_op1_no_bwd(&Product(&self.weight))?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?),
            None => Ok(y),
        }
    }

    fn in_features(&self) -> usize {
        self.weight.cols()
    }

    fn packed_weight(&self) -> Option<Arc<PackedWeight>> {
        // Without a bias the layer is the table itself.
        self.bias.is_none().then(|| self.weight.clone())
    }

    fn out_features(&self) -> usize {
        self.weight.rows()
    }
}
