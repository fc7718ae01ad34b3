//! Element types found in HF checkpoints, with their safetensors / torch names and byte sizes.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
    Bf16,
    F64,
    I64,
    I32,
    U8,
    Bool,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::U8 | Dtype::Bool => 1,
        }
    }

    /// The `torch_dtype` spelling used in config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::Bf16 => "bfloat16",
            Dtype::F64 => "float64",
            Dtype::I64 => "int64",
            Dtype::I32 => "int32",
            Dtype::U8 => "uint8",
            Dtype::Bool => "bool",
        }
    }

    /// A floating-point type to write weights in, by its short (`fp16`) or torch (`float16`) name.
    pub fn float_named(name: &str) -> Option<Self> {
        [Dtype::F32, Dtype::F16, Dtype::Bf16].into_iter().find(|d| name == d.torch_name() || name == d.short_name())
    }

    /// `fp32`, `fp16`, `bf16`: the flag spelling of a floating-point type.
    pub fn short_name(self) -> &'static str {
        match self {
            Dtype::F32 => "fp32",
            Dtype::F16 => "fp16",
            Dtype::Bf16 => "bf16",
            Dtype::F64 => "fp64",
            other => other.torch_name(),
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F16 | Dtype::Bf16 | Dtype::F64)
    }

    /// How many of the little-endian values in `bytes` are NaN or infinite (0 for integer types):
    /// an all-ones exponent, tested on the bits so no value is converted.
    pub fn count_nonfinite(self, bytes: &[u8]) -> u64 {
        fn count<const N: usize>(bytes: &[u8], nonfinite: impl Fn([u8; N]) -> bool) -> u64 {
            bytes.chunks_exact(N).filter(|b| nonfinite((*b).try_into().expect("chunks of N bytes"))).count() as u64
        }
        match self {
            Dtype::F32 => count(bytes, |b: [u8; 4]| u32::from_le_bytes(b) & 0x7f80_0000 == 0x7f80_0000),
            Dtype::F16 => count(bytes, |b: [u8; 2]| u16::from_le_bytes(b) & 0x7c00 == 0x7c00),
            Dtype::Bf16 => count(bytes, |b: [u8; 2]| u16::from_le_bytes(b) & 0x7f80 == 0x7f80),
            Dtype::F64 => count(bytes, |b: [u8; 8]| u64::from_le_bytes(b) & 0x7ff0_0000_0000_0000 == 0x7ff0_0000_0000_0000),
            Dtype::I64 | Dtype::I32 | Dtype::U8 | Dtype::Bool => 0,
        }
    }

    pub(crate) fn from_safetensors(dtype: safetensors::Dtype) -> Option<Self> {
        use safetensors::Dtype as S;
        Some(match dtype {
            S::F32 => Dtype::F32,
            S::F16 => Dtype::F16,
            S::BF16 => Dtype::Bf16,
            S::F64 => Dtype::F64,
            S::I64 => Dtype::I64,
            S::I32 => Dtype::I32,
            S::U8 => Dtype::U8,
            S::BOOL => Dtype::Bool,
            _ => return None,
        })
    }

    pub(crate) fn to_safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as S;
        match self {
            Dtype::F32 => S::F32,
            Dtype::F16 => S::F16,
            Dtype::Bf16 => S::BF16,
            Dtype::F64 => S::F64,
            Dtype::I64 => S::I64,
            Dtype::I32 => S::I32,
            Dtype::U8 => S::U8,
            Dtype::Bool => S::BOOL,
        }
    }

    pub(crate) fn from_candle(dtype: candle_core::DType) -> Option<Self> {
        use candle_core::DType as C;
        Some(match dtype {
            C::F32 => Dtype::F32,
            C::F16 => Dtype::F16,
            C::BF16 => Dtype::Bf16,
            C::F64 => Dtype::F64,
            C::I64 => Dtype::I64,
            C::U8 => Dtype::U8,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_types_are_named_both_ways_and_nothing_else_is() {
        for (short, torch, dtype) in [("fp32", "float32", Dtype::F32), ("fp16", "float16", Dtype::F16), ("bf16", "bfloat16", Dtype::Bf16)] {
            assert_eq!((Dtype::float_named(short), Dtype::float_named(torch)), (Some(dtype), Some(dtype)));
            assert_eq!((dtype.short_name(), dtype.torch_name()), (short, torch));
        }
        for other in ["float64", "fp64", "int8", "FP16", ""] {
            assert_eq!(Dtype::float_named(other), None, "{other}");
        }
    }

    #[test]
    fn nonfinite_values_are_counted_in_every_float_type() {
        let values = [1.0f32, f32::NAN, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN_POSITIVE / 2.0];
        let bytes = |f: &dyn Fn(f32) -> Vec<u8>| values.iter().flat_map(|&v| f(v)).collect::<Vec<u8>>();
        assert_eq!(Dtype::F32.count_nonfinite(&bytes(&|v| v.to_le_bytes().to_vec())), 3);
        assert_eq!(Dtype::F64.count_nonfinite(&bytes(&|v| (v as f64).to_le_bytes().to_vec())), 3);
        // f32::MAX rounds to infinity in bf16 and overflows f16.
        assert_eq!(Dtype::Bf16.count_nonfinite(&bytes(&|v| half::bf16::from_f32(v).to_le_bytes().to_vec())), 4);
        assert_eq!(Dtype::F16.count_nonfinite(&bytes(&|v| half::f16::from_f32(v).to_le_bytes().to_vec())), 4);
        assert_eq!(Dtype::I32.count_nonfinite(&[0xff; 8]), 0);
    }
}
