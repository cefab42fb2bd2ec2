//! Device selection — `"cpu"`, `"cuda"` or `"cuda:N"`, the last two only in a build with the
//! `cuda` feature.

use crate::error::{EngineError, Result};
use candle_core::Device;

/// A parsed device specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| {
                    format!("`{s}` is not a device: expected \"cpu\", \"cuda\" or \"cuda:N\"")
                }),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Whether this build can use the device; the message says why not.
    pub fn available(&self) -> std::result::Result<(), String> {
        match self {
            DeviceSpec::Cpu => Ok(()),
            DeviceSpec::Cuda(n) if !candle_core::utils::cuda_is_available() => Err(format!(
                "device cuda:{n} asked for, but this build of the program runs on the CPU only \
                 (use \"cpu\")"
            )),
            DeviceSpec::Cuda(_) => Ok(()),
        }
    }

    /// Opens the device.
    pub fn open(&self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                self.available().map_err(EngineError::Config)?;
                let device = Device::new_cuda(*n)?;
                #[cfg(feature = "cuda")]
                if let Device::Cuda(d) = &device {
                    // All work runs on candle's one stream (cuDNN and the kernels of `gpu`
                    // included), so the per-buffer events that order work across streams are
                    // pure overhead: two driver calls per operand of every kernel.
                    // SAFETY: no other stream touches this device's buffers.
                    unsafe { d.disable_event_tracking() };
                }
                Ok(device)
            }
        }
    }
}

/// The type training computes activations in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// bf16 convolutions and activations (mixed precision), on CUDA.
    Bf16,
}

impl Precision {
    /// The candle type of the activations.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
        }
    }

    /// Whether `device` can compute in this precision; the message says why not.
    pub fn check(self, device: DeviceSpec) -> std::result::Result<(), String> {
        if self == Precision::Bf16 && device == DeviceSpec::Cpu {
            return Err(
                "\"bf16\" trains on CUDA devices only (use dtype = \"f32\", or device = \"cuda\")"
                    .into(),
            );
        }
        Ok(())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!(
                "`{s}` is not a dtype: expected \"f32\" or \"bf16\""
            )),
        }
    }
}
