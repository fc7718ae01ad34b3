//! The one mapping into tch's element types: the `Kind` of each HF dtype (`zerotune_hf::Dtype`,
//! which knows no libtorch) and of each compute precision (`zerotune_proto::plan::Precision`).

use tch::{Device, Kind, Tensor};
use zerotune_hf::Dtype;
use zerotune_proto::plan::Precision;

/// The tch kind that holds values stored as `dtype`.
pub fn kind(dtype: Dtype) -> Kind {
    match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::Bf16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::Bool => Kind::Bool,
    }
}

/// The element type a model computes in at `precision`.
pub fn precision_dtype(precision: Precision) -> Dtype {
    match precision {
        Precision::Fp32 => Dtype::F32,
        Precision::Bf16 => Dtype::Bf16,
        Precision::Fp16 => Dtype::F16,
    }
}

/// The tch kind a model computes in at `precision`.
pub fn precision_kind(precision: Precision) -> Kind {
    kind(precision_dtype(precision))
}

/// The elements of a contiguous host tensor of `T`-sized values (none for an empty tensor, whose
/// data pointer libtorch leaves null).
pub(crate) fn host_slice<T>(tensor: &Tensor) -> &[T] {
    assert!(tensor.device() == Device::Cpu && tensor.is_contiguous() && tensor.kind().elt_size_in_bytes() == size_of::<T>());
    if tensor.numel() == 0 {
        return &[];
    }
    // SAFETY: the tensor is contiguous on the host with elements of T's size and outlives the borrow.
    unsafe { std::slice::from_raw_parts(tensor.data_ptr() as *const T, tensor.numel()) }
}
