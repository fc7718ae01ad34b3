//! Offline conversion of a CodeGen checkpoint (ours or Salesforce's, any HF weight layout) into
//! what FauxPilot serves. Today: HF GPT-J. FasterTransformer and Triton come next (issue 3).

pub mod gptj;
pub mod qkv;
pub mod source;

/// Conversion errors, each naming the file or flag at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Model(#[from] zerotune_hf::Error),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, ConvertError>;
