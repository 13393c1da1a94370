//! Where a stage computes, as a manifest names it.

use candle_core::Device;
use serde::{Deserialize, Serialize};

/// `cpu` or `cuda`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The host.
    #[default]
    Cpu,
    /// The first CUDA GPU (needs a build with the `cuda` feature).
    Cuda,
}

/// The chosen device could not be opened.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
#[error("cannot open CUDA device 0: {0}")]
#[diagnostic(help(
    "build with `--features cuda` on a machine with an NVIDIA GPU, or set device = \"cpu\""
))]
pub struct DeviceError(String);

impl DeviceChoice {
    /// Opens the device.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda => Device::new_cuda(0).map_err(|e| DeviceError(e.to_string())),
        }
    }
}
