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

    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F16 | Dtype::Bf16 | Dtype::F64)
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
