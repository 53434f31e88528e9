//! Devices, weight precisions and threads: where and how the model runs.

use std::str::FromStr;

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// A device by name: `cpu`, `cuda`, `cuda:N` or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum DeviceArg {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| "use cpu, cuda, cuda:N or auto".to_string()),
        }
    }
}

impl TryFrom<String> for DeviceArg {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse().map_err(|e| format!("device {s:?}: {e}"))
    }
}

impl DeviceArg {
    /// Opens the device. `auto` is CUDA when this build has it and a GPU answers, else the CPU.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => open_cuda(n),
            Self::Auto => Ok(if cfg!(feature = "cuda") {
                open_cuda(0).unwrap_or(Device::Cpu)
            } else {
                Device::Cpu
            }),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    // cudarc can panic when the driver library is missing or a stub: report it as an error.
    let opened = std::panic::catch_unwind(|| Device::new_cuda(ordinal));
    match opened {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => {
            let msg = crate::model::weights::strip_candle(e);
            // cudarc reports driver errors as `DriverError(CUDA_ERROR_..., "...")`: keep the code.
            let code = msg
                .split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
                .find(|w| w.starts_with("CUDA_ERROR_"));
            match code {
                Some("CUDA_ERROR_STUB_LIBRARY") => bail!(
                    "device cuda:{ordinal}: no NVIDIA driver here (only the CUDA stub library): no GPU can be used"
                ),
                Some(code) => bail!("device cuda:{ordinal}: cannot open the GPU: the driver says {code}"),
                None => bail!("device cuda:{ordinal}: cannot open the GPU: {msg}"),
            }
        }
        Err(_) => {
            bail!("device cuda:{ordinal}: cannot open the GPU: the NVIDIA driver (libcuda) is missing or unusable")
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    bail!("device cuda:{ordinal}: this zagreus was built without CUDA support; rebuild it with `--features cuda`")
}

/// The precision weights are kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DtypeArg {
    /// The checkpoint's own type on the CPU, bf16 on a GPU
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl DtypeArg {
    /// The names, as `FromStr` takes them.
    pub const NAMES: [&'static str; 4] = ["auto", "f32", "f16", "bf16"];

    pub fn to_dtype(self) -> Option<DType> {
        match self {
            Self::Auto => None,
            Self::F32 => Some(DType::F32),
            Self::F16 => Some(DType::F16),
            Self::Bf16 => Some(DType::BF16),
        }
    }
}

impl FromStr for DtypeArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => Self::Auto,
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::Bf16,
            _ => return Err(format!("dtype {s:?}: use one of {}", Self::NAMES.join(", "))),
        })
    }
}

/// Short lowercase name of a dtype (`bf16`, ...).
pub fn dtype_name(d: DType) -> &'static str {
    d.as_str()
}

/// Human name of a device.
pub fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}

/// Sets the worker threads used by zagreus' kernels and candle's. Call before any computation.
pub fn set_threads(threads: Option<usize>) -> Result<usize> {
    let n = match threads {
        Some(0) => bail!("threads 0: use at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    // candle's CPU matmul sizes its pool from this variable.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    // Ignore "already initialised": a second call in the same process keeps the first pool.
    let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    Ok(rayon::current_num_threads())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse(), Ok(DeviceArg::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceArg::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceArg::Cuda(3)));
        assert_eq!("auto".parse(), Ok(DeviceArg::Auto));
        assert!("tpu".parse::<DeviceArg>().is_err());
        assert!("cuda:x".parse::<DeviceArg>().is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let err = DeviceArg::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
        assert!(matches!(DeviceArg::Auto.open(), Ok(Device::Cpu)));
    }
}
