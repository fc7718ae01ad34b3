//! Offline conversion of a CodeGen checkpoint (ours or Salesforce's, any HF weight layout) into
//! what FauxPilot serves: HF GPT-J, FasterTransformer GPT-J files, and the Triton model dir.

pub mod cast;
pub mod ft;
pub mod gptj;
pub mod output;
pub mod qkv;
pub mod source;
pub mod triton;

/// Conversion errors, each naming the file or flag at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Model(#[from] zerotune_hf::Error),
    #[error("{0}")]
    Invalid(String),
    /// The output directory overlaps the input (`--force` would delete the input).
    #[error("the output {} {overlap} the input {}: writing it would replace what is being converted; choose an output outside {}", output.display(), input.display(), input.display())]
    OutputOverlapsInput { output: std::path::PathBuf, input: std::path::PathBuf, overlap: output::Overlap },
    /// A model of another architecture: FasterTransformer, Triton and GPT-J layouts are CodeGen's.
    #[error("{}: a {model_type} model cannot be converted: FasterTransformer, Triton/FauxPilot and GPT-J hold CodeGen models only. Serve this model with `worker serve --model {}` (it speaks the same completions API); GGUF export for llama.cpp is planned separately", dir.display(), dir.display())]
    NotCodeGen { dir: std::path::PathBuf, model_type: &'static str },
}

pub type Result<T> = std::result::Result<T, ConvertError>;
