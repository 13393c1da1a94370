//! Token embedding lookup.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use crate::quant::kernels::PackedWeight;
use crate::quant::{GgmlQuantized, QuantWeight};
use crate::weights::{LoadError, StoredTensor, Weights};

/// A frozen embedding table `[vocab, hidden]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Table,
}

/// How the table is held.
#[derive(Debug, Clone)]
enum Table {
    /// Dense, in the compute dtype.
    Dense(Tensor),
    /// A quantized table kept as its codes (CPU, f32 compute): the looked-up rows are decoded,
    /// with exactly the values the dense table would hold. For SmolLM2's q8_0 table that is
    /// 32 MiB instead of 108 MiB of f32.
    Packed {
        weight: Arc<PackedWeight>,
        device: Device,
    },
}

impl Embedding {
    /// An embedding from its dense table `[vocab, hidden]`.
    pub fn new(weight: Tensor) -> Result<Self> {
        weight.dims2()?;
        Ok(Self {
            table: Table::Dense(weight),
        })
    }

    /// The table `name` (`[vocab, hidden]`) of `weights`, for computing in `dtype`. A table
    /// stored in a ggml format the packed kernels read (q4_0, q4_1, q8_0) stays packed when
    /// the model computes in f32 on the CPU; anything else is decoded to a dense table.
    pub fn from_weights(
        weights: &Weights,
        name: &str,
        shape: [usize; 2],
        dtype: DType,
    ) -> std::result::Result<Self, LoadError> {
        let stored = weights.stored_shaped(name, &shape)?;
        if dtype == DType::F32 && weights.device().is_cpu() {
            if let StoredTensor::Quantized(q) = &stored {
                let packed = GgmlQuantized::from_qtensor(q.clone())
                    .ok()
                    .and_then(|g| crate::quant::pack(&QuantWeight::Ggml(g)).ok());
                if let Some(weight) = packed {
                    return Ok(Self {
                        table: Table::Packed {
                            weight: Arc::new(weight),
                            device: weights.device().clone(),
                        },
                    });
                }
            }
        }
        Ok(Self::new(stored.to_dense(dtype)?)?)
    }

    /// An embedding over a table already packed for the kernels (a tied LM head's weight,
    /// [`crate::linear::LinearLayer::packed_weight`]), looked up on `device`.
    pub fn packed(weight: Arc<PackedWeight>, device: &Device) -> Self {
        Self {
            table: Table::Packed {
                weight,
                device: device.clone(),
            },
        }
    }

    /// Hidden size (the table's columns).
    pub fn hidden_size(&self) -> usize {
        match &self.table {
            Table::Dense(t) => t.dims().get(1).copied().unwrap_or(0),
            Table::Packed { weight, .. } => weight.cols(),
        }
    }

    /// Looks up `ids` (any shape, u32) and returns `[..ids shape, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        dims.push(self.hidden_size());
        let rows = match &self.table {
            Table::Dense(weight) => weight.index_select(&ids.flatten_all()?, 0)?,
            Table::Packed { weight, device } => {
                let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let values = weight
                    .decode_rows(&ids)
                    .map_err(|e| candle_core::Error::Msg(format!("embedding lookup: {e}")))?;
                Tensor::from_vec(values, (ids.len(), weight.cols()), device)?
            }
        };
        rows.reshape(dims)
    }
}
