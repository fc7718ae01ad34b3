//! The `--device` grammar both binaries read: `auto`, `cpu`, `cuda` or `cuda:N`. What `auto`
//! means is each side's to decide (the coordinator: a GPU on this machine or in the plan; a
//! worker: whether CUDA is usable).

use std::fmt;
use std::str::FromStr;

/// `--device` as given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    /// `cuda`, or `cuda:N` for that one GPU.
    Cuda(Option<usize>),
}

/// A `--device` that is none of the spellings.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{spec:?}: expected auto, cpu, cuda or cuda:N")]
pub struct BadDevice {
    pub spec: String,
}

impl FromStr for DeviceSpec {
    type Err = BadDevice;

    fn from_str(spec: &str) -> Result<Self, BadDevice> {
        match spec.trim() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(None)),
            s => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(|n| Self::Cuda(Some(n))).ok_or(BadDevice { spec: s.into() }),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(None) => f.write_str("cuda"),
            Self::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_parses_and_prints_back() {
        for (spec, device) in
            [("auto", DeviceSpec::Auto), ("cpu", DeviceSpec::Cpu), ("cuda", DeviceSpec::Cuda(None)), ("cuda:3", DeviceSpec::Cuda(Some(3)))]
        {
            assert_eq!(spec.parse(), Ok(device));
            assert_eq!(device.to_string(), spec);
        }
        assert_eq!(" cpu ".parse(), Ok(DeviceSpec::Cpu));
        for bad in ["gpu", "cuda:x", "cuda:", "cuda:-1", "CPU"] {
            let err = bad.parse::<DeviceSpec>().unwrap_err();
            assert_eq!(err.spec, bad);
            assert!(err.to_string().contains("expected auto, cpu, cuda or cuda:N"), "{err}");
        }
    }
}
