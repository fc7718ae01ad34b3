//! Which precision a GPU computes in, by its compute capability: the one rule that training
//! (coordinator gpu.rs) and inference (worker precision.rs) both apply, each in its own words.

use crate::plan::Precision;

/// GPUs below this compute capability (Pascal: P40, P100) have no bf16 and run fp16 math far
/// below their fp32 rate: they train and infer in fp32 unless told otherwise.
pub const FAST_16_BIT_CAPABILITY: (u32, u32) = (7, 0);
/// From this compute capability (Ampere) GPUs compute in bf16 natively; Volta and Turing (7.x)
/// have fast fp16 but emulate bf16.
pub const BF16_CAPABILITY: (u32, u32) = (8, 0);

/// Why the GPU's age changed or slows the precision; `capability` is (major, minor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrecisionNote {
    /// The default on 7.x: fp16 (fast there), since bf16 is emulated.
    Fp16WithoutBf16 { capability: (u32, u32) },
    /// bf16, asked for, on 7.x: it runs, emulated, far below the fp16 rate.
    EmulatedBf16 { capability: (u32, u32) },
    /// The default below 7.0: fp32, since there is no bf16 and fp16 math is slow.
    Fp32OnOldGpu { capability: (u32, u32) },
    /// fp16, asked for, below 7.0: it runs, slowly (1/64 of fp32's rate on a P40).
    SlowFp16 { capability: (u32, u32) },
}

impl PrecisionNote {
    /// Whether it warns of a slow choice the user made (rather than explaining the default).
    pub fn is_warning(self) -> bool {
        matches!(self, Self::EmulatedBf16 { .. } | Self::SlowFp16 { .. })
    }
}

/// bf16 asked for on a GPU below compute capability 7.0, which has none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a GPU of compute capability {}.{} has no bf16", .capability.0, .capability.1)]
pub struct NoBf16 {
    pub capability: (u32, u32),
}

/// What a GPU of `capability` computes in when `asked` for a precision, or by default (`None`:
/// bf16 where the GPU has it), with the note the caller should show.
pub fn gpu_precision(capability: (u32, u32), asked: Option<Precision>) -> Result<(Precision, Option<PrecisionNote>), NoBf16> {
    let old = capability < FAST_16_BIT_CAPABILITY;
    let volta = !old && capability < BF16_CAPABILITY;
    Ok(match asked {
        None if old => (Precision::Fp32, Some(PrecisionNote::Fp32OnOldGpu { capability })),
        None if volta => (Precision::Fp16, Some(PrecisionNote::Fp16WithoutBf16 { capability })),
        None => (Precision::Bf16, None),
        Some(Precision::Bf16) if old => return Err(NoBf16 { capability }),
        Some(Precision::Bf16) if volta => (Precision::Bf16, Some(PrecisionNote::EmulatedBf16 { capability })),
        Some(Precision::Fp16) if old => (Precision::Fp16, Some(PrecisionNote::SlowFp16 { capability })),
        Some(precision) => (precision, None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Precision::*;

    const P40: (u32, u32) = (6, 1);
    const T4: (u32, u32) = (7, 5);
    const A100: (u32, u32) = (8, 0);

    #[test]
    fn the_default_is_fp32_below_volta_fp16_on_volta_and_turing_bf16_from_ampere() {
        assert_eq!(gpu_precision(P40, None), Ok((Fp32, Some(PrecisionNote::Fp32OnOldGpu { capability: P40 }))));
        assert_eq!(gpu_precision(T4, None), Ok((Fp16, Some(PrecisionNote::Fp16WithoutBf16 { capability: T4 }))));
        assert_eq!(gpu_precision((7, 0), None).unwrap().0, Fp16);
        assert_eq!(gpu_precision(A100, None), Ok((Bf16, None)));
        assert_eq!(gpu_precision((9, 0), None), Ok((Bf16, None)));
    }

    #[test]
    fn an_asked_precision_runs_where_it_can_with_a_warning_when_slow() {
        assert_eq!(gpu_precision(P40, Some(Bf16)), Err(NoBf16 { capability: P40 }));
        assert_eq!(gpu_precision(P40, Some(Fp16)), Ok((Fp16, Some(PrecisionNote::SlowFp16 { capability: P40 }))));
        assert_eq!(gpu_precision(P40, Some(Fp32)), Ok((Fp32, None)));
        assert_eq!(gpu_precision(T4, Some(Bf16)), Ok((Bf16, Some(PrecisionNote::EmulatedBf16 { capability: T4 }))));
        assert_eq!(gpu_precision(T4, Some(Fp32)), Ok((Fp32, None)));
        for precision in [Fp32, Fp16, Bf16] {
            assert_eq!(gpu_precision(A100, Some(precision)), Ok((precision, None)));
        }
        assert!(PrecisionNote::SlowFp16 { capability: P40 }.is_warning());
        assert!(!PrecisionNote::Fp32OnOldGpu { capability: P40 }.is_warning());
    }
}
