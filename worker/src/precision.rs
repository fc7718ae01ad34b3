//! What a model loaded for inference (`generate`, `eval`, `serve`) computes in: `--dtype`, with
//! `auto` choosing by the GPU's compute capability: fp32 on a P40, fp16 on a V100 or T4, bf16
//! from Ampere on.

use clap::ValueEnum;
use tch::Device;
use zerotune_proto::plan::Precision;
use zerotune_proto::precision::{gpu_precision, NoBf16, PrecisionNote};

use crate::error::{Result, WorkerError};

/// The value of `--dtype` of generate, eval and serve: `auto` or a compute precision. (Not
/// `zerotune_hf::Dtype`, the element type a file stores.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeChoice {
    /// fp32 on the CPU and on GPUs below compute capability 7.0 (no bf16, slow fp16 math: P40,
    /// P100), fp16 on 7.x (V100, T4), bf16 from 8.0 (A100, H100) and when the capability is unknown.
    Auto,
    #[value(alias = "float32")]
    Fp32,
    #[value(alias = "bfloat16")]
    Bf16,
    #[value(alias = "float16")]
    Fp16,
}

impl DtypeChoice {
    /// The flag's value, as clap spells it.
    pub fn name(self) -> String {
        self.to_possible_value().expect("no variant is skipped").get_name().to_string()
    }
}

/// A note on the GPU's precision rule (`zerotune_proto::precision`), in inference's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InferenceNote(pub PrecisionNote);

impl InferenceNote {
    /// Whether it warns of a slow choice the user made (rather than explaining the default).
    pub fn is_warning(self) -> bool {
        self.0.is_warning()
    }
}

impl std::fmt::Display for InferenceNote {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self.0 {
            PrecisionNote::Fp16WithoutBf16 { capability: (major, minor) } => {
                write!(f, "note: this GPU (compute capability {major}.{minor}) has fast fp16 but no bf16: computing in fp16")
            }
            PrecisionNote::EmulatedBf16 { capability: (major, minor) } => write!(
                f,
                "bf16 on a GPU of compute capability {major}.{minor}: bf16 is emulated there, far below its fp16 rate; fp16 is usually faster"
            ),
            PrecisionNote::Fp32OnOldGpu { capability: (major, minor) } => write!(
                f,
                "note: this GPU (compute capability {major}.{minor}) has no bf16 and slow fp16 math: computing in fp32"
            ),
            PrecisionNote::SlowFp16 { capability: (major, minor) } => write!(
                f,
                "fp16 on a GPU of compute capability {major}.{minor}: its fp16 math runs far below its fp32 rate (1/64 on a P40); fp32 is usually faster"
            ),
        }
    }
}

/// The precision `dtype` means on `device`, whose compute capability is `capability` (a GPU's,
/// when it could be asked; bf16 when it could not), with a note to print when the GPU's age
/// decided or slows it; or why the combination cannot run (`DtypeOnCpu`, `NoBf16`).
pub fn resolve(dtype: DtypeChoice, device: Device, capability: Option<(u32, u32)>) -> Result<(Precision, Option<InferenceNote>)> {
    let asked = match dtype {
        DtypeChoice::Auto => None,
        DtypeChoice::Fp32 => Some(Precision::Fp32),
        DtypeChoice::Bf16 => Some(Precision::Bf16),
        DtypeChoice::Fp16 => Some(Precision::Fp16),
    };
    match (device, asked, capability) {
        (Device::Cpu, None | Some(Precision::Fp32), _) => Ok((Precision::Fp32, None)),
        (Device::Cpu, _, _) => Err(WorkerError::DtypeOnCpu { dtype }),
        (_, asked, None) => Ok((asked.unwrap_or(Precision::Bf16), None)),
        (_, asked, Some(capability)) => {
            let (precision, note) = gpu_precision(capability, asked).map_err(|NoBf16 { capability }| WorkerError::NoBf16 { capability })?;
            Ok((precision, note.map(InferenceNote)))
        }
    }
}

/// `--dtype` and its shorthand `--fp16` (generate, eval, serve).
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct DtypeArgs {
    /// What the model computes in: auto (fp32 on the CPU and on GPUs below compute capability 7.0
    /// such as the P40, fp16 on 7.x such as the V100 and T4, bf16 from 8.0), fp32, bf16 or fp16.
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: DtypeChoice,
    /// Shorthand for --dtype fp16.
    #[arg(long, conflicts_with = "dtype")]
    pub fp16: bool,
}

impl DtypeArgs {
    /// The precision on `device` (asking a GPU for its compute capability), with the note to
    /// show when the GPU's age decided it.
    pub fn resolve(&self, device: Device) -> Result<(Precision, Option<InferenceNote>)> {
        let dtype = if self.fp16 { DtypeChoice::Fp16 } else { self.dtype };
        let capability = match device {
            Device::Cuda(index) => crate::device::compute_capability(index),
            _ => None,
        };
        resolve(dtype, device, capability)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P40: Option<(u32, u32)> = Some((6, 1));
    const H200: Option<(u32, u32)> = Some((9, 0));

    /// The precision alone, when there is no note or only an explaining (not warning) one.
    fn plain(dtype: DtypeChoice, device: Device, capability: Option<(u32, u32)>) -> Precision {
        match resolve(dtype, device, capability) {
            Ok((precision, None)) => precision,
            Ok((precision, Some(note))) if !note.is_warning() => precision,
            other => panic!("{dtype:?} on {device:?} {capability:?}: {other:?}"),
        }
    }

    #[test]
    fn auto_is_fp32_on_the_cpu_and_a_p40_fp16_on_volta_and_turing_and_bf16_from_ampere() {
        let gpu = Device::Cuda(0);
        assert_eq!(plain(DtypeChoice::Auto, Device::Cpu, None), Precision::Fp32);
        assert_eq!(plain(DtypeChoice::Auto, gpu, H200), Precision::Bf16);
        assert_eq!(plain(DtypeChoice::Auto, gpu, Some((7, 0))), Precision::Fp16, "Volta: fast fp16, emulated bf16");
        assert_eq!(plain(DtypeChoice::Auto, gpu, Some((7, 5))), Precision::Fp16, "Turing (T4)");
        assert_eq!(plain(DtypeChoice::Auto, gpu, Some((8, 0))), Precision::Bf16, "Ampere");
        let (precision, warning) = resolve(DtypeChoice::Bf16, gpu, Some((7, 5))).unwrap();
        assert_eq!(precision, Precision::Bf16, "asked for: emulated, but it runs");
        assert!(warning.unwrap().to_string().starts_with("bf16 on a GPU of compute capability 7.5: bf16 is emulated"));
        assert_eq!(plain(DtypeChoice::Auto, gpu, None), Precision::Bf16, "unknown capability: bf16, as before");
        let (precision, note) = resolve(DtypeChoice::Auto, gpu, P40).unwrap();
        assert_eq!((precision, note), (Precision::Fp32, Some(InferenceNote(PrecisionNote::Fp32OnOldGpu { capability: (6, 1) }))));
        let note = note.unwrap();
        assert!(!note.is_warning());
        assert!(note.to_string().contains("(compute capability 6.1) has no bf16 and slow fp16 math: computing in fp32"));
    }

    #[test]
    fn an_explicit_dtype_is_kept_or_refused_with_the_reason() {
        let gpu = Device::Cuda(1);
        assert_eq!(plain(DtypeChoice::Fp32, gpu, H200), Precision::Fp32);
        assert_eq!(plain(DtypeChoice::Fp16, gpu, H200), Precision::Fp16);
        assert_eq!(plain(DtypeChoice::Bf16, gpu, H200), Precision::Bf16);
        assert_eq!(plain(DtypeChoice::Fp32, gpu, P40), Precision::Fp32);
        let err = resolve(DtypeChoice::Bf16, gpu, P40).unwrap_err();
        assert!(matches!(err, WorkerError::NoBf16 { capability: (6, 1) }), "{err:?}");
        assert!(err.to_string().contains("compute capability 6.1 has no bf16"), "{err}");
        let (precision, warning) = resolve(DtypeChoice::Fp16, gpu, P40).unwrap();
        let warning = warning.unwrap();
        assert!(precision == Precision::Fp16 && warning.is_warning());
        assert!(warning.to_string().starts_with("fp16 on a GPU of compute capability 6.1"), "{warning}");
        assert_eq!(plain(DtypeChoice::Fp32, Device::Cpu, None), Precision::Fp32);
        for dtype in [DtypeChoice::Bf16, DtypeChoice::Fp16] {
            let err = resolve(dtype, Device::Cpu, None).unwrap_err();
            assert!(matches!(err, WorkerError::DtypeOnCpu { dtype: d } if d == dtype), "{err:?}");
            assert!(err.to_string().starts_with(&format!("--dtype {}: on the CPU models compute in fp32", dtype.name())), "{err}");
        }
    }
}
