//! The one trait every linear layer implements, so that a model is built the same way whether
//! its projections are dense, quantized, or wrapped with LoRA adapters.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::layers::FrozenWeight;

/// A frozen affine map `y = x·Wᵀ + b` (see [`LinearLayer::frozen_parts`]).
#[derive(Clone)]
pub struct FrozenParts {
    /// `W`, handed out as `Wᵀ` in the compute dtype.
    pub weight: Arc<dyn FrozenWeight>,
    /// `b` `[out]`, any float dtype (cast by the user).
    pub bias: Option<Tensor>,
}

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

    /// Switches train-time behaviour (LoRA dropout) on or off. Frozen layers ignore it.
    ///
    /// Takes `&self` because models hold their layers behind shared references; implementations
    /// use interior mutability.
    fn set_training(&self, _training: bool) {}

    /// Restarts this layer's dropout randomness from `stream`. A trainer calls it before each
    /// training forward with a value drawn from its checkpointed RNG, so dropout masks depend
    /// only on checkpointed state and a resumed run draws exactly the masks an uninterrupted one
    /// would. Layers without dropout ignore it.
    fn set_dropout_stream(&self, _stream: u64) {}

    /// How far this layer has advanced in its dropout randomness since the last
    /// [`set_dropout_stream`](LinearLayer::set_dropout_stream). With
    /// [`set_dropout_position`](LinearLayer::set_dropout_position), lets a recomputed forward
    /// (gradient checkpointing) draw exactly the masks the original forward drew.
    fn dropout_position(&self) -> u64 {
        0
    }

    /// Moves this layer's dropout randomness to `position` (see
    /// [`dropout_position`](LinearLayer::dropout_position)).
    fn set_dropout_position(&self, _position: u64) {}

    /// Inference only from now on: trainable variables are used as constants, so no backward
    /// graph is recorded (generation would otherwise keep one per step alive). Irreversible.
    fn freeze(&self) {}

    /// The layer as a frozen affine map `y = x·Wᵀ + b`, when that is all it is: lets a wrapper
    /// (LoRA) fuse the base product into its own op instead of adding one more graph node.
    /// `None` (the default) for anything else.
    fn frozen_parts(&self) -> Option<FrozenParts> {
        None
    }

    /// The weight in the packed kernels' layout, when the layer multiplies through them
    /// ([`crate::quant::BlockLinear`]): lets a tied embedding table share it instead of holding
    /// a second copy. `None` (the default) for anything else.
    fn packed_weight(&self) -> Option<std::sync::Arc<crate::quant::kernels::PackedWeight>> {
        None
    }

    /// The effective dense weight `[out, in]` and bias `[out]` of this layer, e.g. to merge LoRA
    /// adapters into a plain copy.
    ///
    /// The default recovers them from `forward` alone (probing with the identity and with zeros,
    /// in `dtype` on `device`), so any layer supports it; layers that store a dense weight
    /// override it with an exact copy. The bias is `None` when the probe gives exactly zero.
    fn dense_parts(&self, device: &Device, dtype: DType) -> Result<(Tensor, Option<Tensor>)> {
        let n = self.in_features();
        let zero = Tensor::zeros((1, n), dtype, device)?;
        let bias = self.forward(&zero)?.squeeze(0)?;
        let eye = Tensor::eye(n, dtype, device)?;
        let weight = self
            .forward(&eye)?
            .broadcast_sub(&bias)?
            .t()?
            .contiguous()?;
        let bias_is_zero = bias
            .abs()?
            .to_dtype(DType::F32)?
            .max_all()?
            .to_scalar::<f32>()?
            == 0.0;
        Ok((weight, if bias_is_zero { None } else { Some(bias) }))
    }
}
