//! Activation functions, by their Hugging Face `hidden_act` names.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::fused::{activation, gated_activation, FusedActivation};

/// An MLP activation. On the CPU, tanh-GELU and SiLU run as fused kernels with an exact backward
/// ([`crate::fused::activation()`]); elsewhere, and for the others, candle's ops (`gelu` is the
/// tanh approximation, which is exactly HF's `gelu_new`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// Tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast` in HF).
    #[serde(alias = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluNew,
    /// Exact (erf) GELU (`gelu` in HF).
    #[serde(alias = "gelu")]
    Gelu,
    /// SiLU / swish (`silu` in HF).
    #[serde(alias = "silu", alias = "swish")]
    Silu,
    /// ReLU.
    #[serde(alias = "relu")]
    Relu,
}

impl Activation {
    /// Applies the activation elementwise.
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        if crate::fused::supported(x) {
            match self {
                Self::GeluNew => return activation(x, FusedActivation::GeluTanh),
                Self::Silu => return activation(x, FusedActivation::Silu),
                Self::Gelu | Self::Relu => {}
            }
        }
        match self {
            Self::GeluNew => x.gelu(),
            Self::Gelu => x.gelu_erf(),
            Self::Silu => x.silu(),
            Self::Relu => x.relu(),
        }
    }

    /// `act(gate) ⊙ up`, the gated MLP's core (SwiGLU for SiLU): one fused op on the CPU for
    /// tanh-GELU and SiLU ([`crate::fused::gated_activation`]), the activation and a multiply
    /// elsewhere.
    pub fn gated(self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        if crate::fused::supported(gate) && gate.dims() == up.dims() && gate.dtype() == up.dtype() {
            match self {
                Self::GeluNew => return gated_activation(gate, up, FusedActivation::GeluTanh),
                Self::Silu => return gated_activation(gate, up, FusedActivation::Silu),
                Self::Gelu | Self::Relu => {}
            }
        }
        self.forward(gate)? * up
    }
}
