//! Where a stage computes, as a manifest names it.

use candle_core::Device;
use serde::{Deserialize, Serialize};

/// `cpu` or `cuda`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The host.
    #[default]
    Cpu,
    /// The first CUDA GPU (needs a build with the `cuda` feature).
    Cuda,
}

impl DeviceChoice {
    /// Opens the device.
    pub fn open(self) -> candle_core::Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda => Device::new_cuda(0),
        }
    }
}
