//! Token embedding lookup.

use candle_core::{Result, Tensor};

/// A frozen embedding table `[vocab, hidden]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    /// An embedding from its table `[vocab, hidden]`.
    pub fn new(weight: Tensor) -> Result<Self> {
        weight.dims2()?;
        Ok(Self { weight })
    }

    /// The table `[vocab, hidden]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Looks up `ids` (any shape, u32) and returns `[..ids shape, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let hidden = self.weight.dim(1)?;
        let mut dims = ids.dims().to_vec();
        let rows = self.weight.index_select(&ids.flatten_all()?, 0)?;
        dims.push(hidden);
        rows.reshape(dims)
    }
}
