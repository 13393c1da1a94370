//! Inference straight from ggml blocks: a frozen projection whose product reads the quantized
//! weight blocks as they are stored, never materialising an f32 copy of the weight.
//!
//! The product is candle's quantized CPU matmul, llama.cpp's scheme: each row of activations is
//! quantized to 8 bits per block of 32 (`Q8_0`, or `Q8_1`/`Q8_K` to match the weight's type),
//! and the integer dot products of activation and weight blocks are scaled back to f32,
//! vectorized (AVX/AVX2, NEON, simd128) and spread over output rows by worker threads. A
//! batch-1 decoding step then streams the 4-5 bits a weight is stored in through memory
//! instead of 32, which is what bounds it.
//!
//! What it costs: rounding the activations to 8 bits. On SmolLM2-135M (Q4_1) the logits move
//! by about 1e-2 (the tests state the bound), greedy generations mostly stay token-identical,
//! and per-task bits per byte stay within 1e-2 of the f32 path.
//!
//! It has no backward: it serves inference (generation, likelihood, serving, synthesis);
//! training goes through [`super::QuantLinear`]. Inputs that are not f32 on the CPU, and inputs
//! that record a graph, take [`super::QuantLinear`]'s dequantizing product instead, so the layer
//! is always correct, only not always fast.

use super::{GgmlQuantized, QuantError, QuantLinear, QuantWeight};
use crate::linear::LinearLayer;
use candle_core::{DType, Result, Tensor};

/// A frozen linear projection `y = x Wᵀ (+ b)` computed on the weight's ggml blocks.
#[derive(Debug, Clone)]
pub struct BlockLinear {
    weight: GgmlQuantized,
    /// The same weight as a dequantizing layer, for inputs the block product does not take.
    fallback: QuantLinear,
}

impl BlockLinear {
    /// A layer over `weight` (`[out, in]`) and an optional frozen `bias` (`[out]`).
    pub fn new(weight: GgmlQuantized, bias: Option<Tensor>) -> std::result::Result<Self, QuantError> {
        let fallback = QuantLinear::new(QuantWeight::Ggml(weight.clone()), bias)?;
        Ok(Self { weight, fallback })
    }

    fn block_product(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let y = x.apply_op1_no_bwd(self.weight.qtensor().as_ref())?;
        match self.fallback.bias() {
            Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?),
            None => Ok(y),
        }
    }
}

impl LinearLayer for BlockLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let fits = x.dtype() == DType::F32
            && x.device().is_cpu()
            && !x.track_op()
            && x.dims().last().copied() == Some(self.fallback.in_features());
        if fits {
            self.block_product(x)
        } else {
            self.fallback.forward(x)
        }
    }

    fn in_features(&self) -> usize {
        self.fallback.in_features()
    }

    fn out_features(&self) -> usize {
        self.fallback.out_features()
    }
}
