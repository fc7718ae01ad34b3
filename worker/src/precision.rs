//! What a model loaded for inference (`generate`, `eval`, `serve`) computes in: `--dtype`, with
//! `auto` choosing by the GPU's compute capability: fp32 on a P40, fp16 on a V100 or T4, bf16
//! from Ampere on.

use clap::ValueEnum;
use tch::Device;
use zerotune_proto::plan::{Precision, FAST_16_BIT_CAPABILITY};

/// From this compute capability (Ampere) GPUs compute in bf16 natively; Volta and Turing have
/// fast fp16 but emulate bf16.
const BF16_CAPABILITY: (u32, u32) = (8, 0);

/// `--dtype` of generate, eval and serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
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

impl Dtype {
    /// The flag's value, as clap spells it.
    pub fn name(self) -> String {
        self.to_possible_value().expect("no variant is skipped").get_name().to_string()
    }
}

/// The precision `dtype` means on `device`, whose compute capability is `capability` (a GPU's,
/// when it could be asked), with a note to print when the GPU's age decided it; or why the
/// combination cannot run.
pub fn resolve(dtype: Dtype, device: Device, capability: Option<(u32, u32)>) -> Result<(Precision, Option<String>), String> {
    let old_gpu = capability.filter(|&c| c < FAST_16_BIT_CAPABILITY).map(|(major, minor)| format!("compute capability {major}.{minor}"));
    match (device, dtype, old_gpu) {
        (Device::Cpu, Dtype::Auto | Dtype::Fp32, _) => Ok((Precision::Fp32, None)),
        (Device::Cpu, _, _) => {
            Err(format!("--dtype {}: on the CPU models compute in fp32 (drop --dtype, or pick a GPU with --device)", dtype.name()))
        }
        (_, Dtype::Fp32, _) => Ok((Precision::Fp32, None)),
        (_, Dtype::Auto, None) if capability.is_some_and(|c| c < BF16_CAPABILITY) => Ok((Precision::Fp16, None)),
        (_, Dtype::Auto, None) | (_, Dtype::Bf16, None) => Ok((Precision::Bf16, None)),
        (_, Dtype::Fp16, None) => Ok((Precision::Fp16, None)),
        (_, Dtype::Auto, Some(gpu)) => {
            Ok((Precision::Fp32, Some(format!("note: this GPU ({gpu}) has no bf16 and slow fp16 math: computing in fp32"))))
        }
        (_, Dtype::Bf16, Some(gpu)) => Err(format!("--dtype bf16: a GPU of {gpu} has no bf16; use fp32 (the default there) or fp16")),
        (_, Dtype::Fp16, Some(gpu)) => Ok((
            Precision::Fp16,
            Some(format!(
                "warning: fp16 on a GPU of {gpu}: its fp16 math runs far below its fp32 rate (1/64 on a P40); fp32 is usually faster"
            )),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P40: Option<(u32, u32)> = Some((6, 1));
    const H200: Option<(u32, u32)> = Some((9, 0));

    #[test]
    fn auto_is_fp32_on_the_cpu_and_a_p40_fp16_on_volta_and_turing_and_bf16_from_ampere() {
        let gpu = Device::Cuda(0);
        assert_eq!(resolve(Dtype::Auto, Device::Cpu, None), Ok((Precision::Fp32, None)));
        assert_eq!(resolve(Dtype::Auto, gpu, H200), Ok((Precision::Bf16, None)));
        assert_eq!(resolve(Dtype::Auto, gpu, Some((7, 0))), Ok((Precision::Fp16, None)), "Volta: fast fp16, emulated bf16");
        assert_eq!(resolve(Dtype::Auto, gpu, Some((7, 5))), Ok((Precision::Fp16, None)), "Turing (T4)");
        assert_eq!(resolve(Dtype::Auto, gpu, Some((8, 0))), Ok((Precision::Bf16, None)), "Ampere");
        assert_eq!(resolve(Dtype::Bf16, gpu, Some((7, 5))), Ok((Precision::Bf16, None)), "asked for: emulated, but it runs");
        assert_eq!(resolve(Dtype::Auto, gpu, None), Ok((Precision::Bf16, None)), "unknown capability: bf16, as before");
        let (precision, note) = resolve(Dtype::Auto, gpu, P40).unwrap();
        assert_eq!(precision, Precision::Fp32);
        assert!(note.unwrap().contains("(compute capability 6.1) has no bf16 and slow fp16 math: computing in fp32"));
    }

    #[test]
    fn an_explicit_dtype_is_kept_or_refused_with_the_reason() {
        let gpu = Device::Cuda(1);
        assert_eq!(resolve(Dtype::Fp32, gpu, H200), Ok((Precision::Fp32, None)));
        assert_eq!(resolve(Dtype::Fp16, gpu, H200), Ok((Precision::Fp16, None)));
        assert_eq!(resolve(Dtype::Bf16, gpu, H200), Ok((Precision::Bf16, None)));
        assert_eq!(resolve(Dtype::Fp32, gpu, P40), Ok((Precision::Fp32, None)));
        assert!(resolve(Dtype::Bf16, gpu, P40).unwrap_err().contains("compute capability 6.1 has no bf16"));
        let (precision, warning) = resolve(Dtype::Fp16, gpu, P40).unwrap();
        assert!(precision == Precision::Fp16 && warning.unwrap().starts_with("warning: fp16 on a GPU of compute capability 6.1"));
        assert_eq!(resolve(Dtype::Fp32, Device::Cpu, None), Ok((Precision::Fp32, None)));
        for dtype in [Dtype::Bf16, Dtype::Fp16] {
            let err = resolve(dtype, Device::Cpu, None).unwrap_err();
            assert!(err.starts_with(&format!("--dtype {}: on the CPU models compute in fp32", dtype.name())), "{err}");
        }
    }
}
