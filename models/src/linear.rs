//! The one trait every linear layer implements, so that a model is built the same way whether
//! its projections are dense, quantized, or wrapped with LoRA adapters.

use candle_core::{Result, Tensor, Var};

/// A linear projection `y = x Wᵀ (+ b)` over the last dimension of `x`.
///
/// Implementations: dense (`layers::Dense`), quantized (`quant::QuantLinear`), and LoRA-wrapped
/// (`lora::LoraLinear`, which holds any other `LinearLayer` as its frozen base).
pub trait LinearLayer: Send + Sync {
    /// Applies the projection; `x` is `[..., in_features]`, the result `[..., out_features]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// Input width.
    fn in_features(&self) -> usize;

    /// Output width.
    fn out_features(&self) -> usize;

    /// The trainable variables of this layer, named relative to the layer as PEFT names them
    /// (`lora_A.weight`, `lora_B.weight`). Frozen layers return none.
    fn trainable_vars(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
}
