//! The FauxPilot model directory around the FT files: `<name>-<N>gpu/fastertransformer/` with
//! config.pbtxt (FauxPilot's `config_template.pbtxt`, every value taken from the weights, never a
//! tokenizer count) and `1/<N>-gpu/`, plus the `.env` lines FauxPilot's compose file reads.

use std::path::{Path, PathBuf};

use crate::ft::{self, FtModel};
use crate::output::Staged;
use crate::source::Source;
use crate::{ConvertError, Result};

/// What `write_model_dir` wrote.
pub struct Written {
    /// `<store>/<name>-<N>gpu`.
    pub model_dir: PathBuf,
    /// `<store>/<name>-<N>gpu.env`, holding `env`.
    pub env_path: PathBuf,
    /// FauxPilot's `.env` lines for this model.
    pub env: String,
}

/// `convert triton`: the complete FauxPilot model dir `<store>/<name>-<N>gpu/` (FT files and
/// config.pbtxt, staged and moved in only when complete, replacing an old one only with
/// `force`), then its `.env` beside it. `rebase` is the model dir's mount point in the container.
pub fn write_model_dir(source: &Source, model: &FtModel, store: &Path, name: &str, rebase: Option<&str>, force: bool) -> Result<Written> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        return Err(ConvertError::Invalid(format!("--name {name:?}: use letters, digits, '.', '_' and '-' only")));
    }
    let tp = model.tp;
    let store_err = |e: std::io::Error| ConvertError::Invalid(format!("--model_store {}: {e}", store.display()));
    let paths = TritonPaths::new(store, name, tp, rebase).map_err(store_err)?;
    let staged = Staged::new(&paths.model_dir, force, &source.dir)?;
    let weights = staged.path().join(TritonPaths::weights_subdir(tp));
    std::fs::create_dir_all(&weights).map_err(|e| ConvertError::Invalid(format!("{}: {e}", weights.display())))?;
    ft::write(source, model, &weights, &paths.model_dir.join(TritonPaths::weights_subdir(tp)))?;
    write(&staged.path().join("fastertransformer/config.pbtxt"), &config_pbtxt(model, name, &paths.checkpoint_path))?;
    staged.commit()?;
    let env = env_file(name, &paths.model_dir, tp);
    let env_path = paths.model_dir.with_file_name(format!("{name}-{tp}gpu.env"));
    write(&env_path, &env)?;
    Ok(Written { model_dir: paths.model_dir, env_path, env })
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| ConvertError::Invalid(format!("cannot write {}: {e}", path.display())))
}

/// Where `<store>/<name>-<N>gpu` and its parts live.
pub struct TritonPaths {
    /// `<store>/<name>-<N>gpu`: FauxPilot's MODEL_DIR, mounted at /model.
    pub model_dir: PathBuf,
    /// The FT files' directory as FT inside the container will see it (config.pbtxt's
    /// model_checkpoint_path).
    pub checkpoint_path: String,
}

impl TritonPaths {
    /// `store` is made absolute; `rebase` replaces the model dir in model_checkpoint_path with its
    /// mount point in the container (FauxPilot mounts MODEL_DIR at /model).
    pub fn new(store: &Path, name: &str, tp: usize, rebase: Option<&str>) -> std::io::Result<Self> {
        let model_dir = std::path::absolute(store)?.join(format!("{name}-{tp}gpu"));
        let inner = Self::weights_subdir(tp);
        let checkpoint_path = match rebase {
            Some(root) => format!("{}/{}", root.trim_end_matches('/'), inner.display()),
            None => model_dir.join(&inner).display().to_string(),
        };
        Ok(Self { model_dir, checkpoint_path })
    }

    /// The FT weight directory, relative to the model dir.
    pub fn weights_subdir(tp: usize) -> PathBuf {
        Path::new("fastertransformer/1").join(format!("{tp}-gpu"))
    }
}

/// A model name from the input path: its directory name, or `<run>-checkpoint-<step>` for a
/// trainer checkpoint.
pub fn default_name(input: &Path) -> String {
    let input = std::path::absolute(input).unwrap_or_else(|_| input.to_path_buf());
    let base = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    let dir = if base(&input).as_deref() == Some("model") { input.parent().unwrap_or(&input).to_path_buf() } else { input };
    match (base(&dir), dir.parent().and_then(base)) {
        (Some(b), Some(parent)) if b.starts_with("checkpoint-") => format!("{parent}-{b}"),
        (Some(b), _) => b,
        _ => "model".into(),
    }
}

/// config.pbtxt for the `fastertransformer` Triton model (FauxPilot's template, filled).
pub fn config_pbtxt(model: &FtModel, name: &str, checkpoint_path: &str) -> String {
    let parameters = [
        ("tensor_para_size", model.tp.to_string()),
        ("pipeline_para_size", "1".into()),
        ("max_seq_len", model.max_seq_len.to_string()),
        ("is_half", "1".into()),
        ("head_num", model.head_num.to_string()),
        ("size_per_head", model.size_per_head.to_string()),
        ("inter_size", model.inter_size.to_string()),
        ("vocab_size", model.vocab_size.to_string()),
        ("start_id", model.start_id.to_string()),
        ("end_id", model.end_id.to_string()),
        ("decoder_layers", model.num_layer.to_string()),
        ("model_name", name.into()),
        ("rotary_embedding", model.rotary_embedding.to_string()),
        ("model_type", "GPT-J".into()),
        ("model_checkpoint_path", checkpoint_path.into()),
        ("enable_custom_all_reduce", "0".into()),
    ];
    let parameters: String = parameters
        .iter()
        .map(|(key, value)| format!("parameters {{\n  key: \"{key}\"\n  value: {{\n    string_value: \"{value}\"\n  }}\n}}\n"))
        .collect();
    format!("{HEADER}default_model_filename: \"{name}\"\n{TENSORS}{parameters}")
}

const HEADER: &str = r#"name: "fastertransformer"
backend: "fastertransformer"
max_batch_size: 1024
model_transaction_policy {
  decoupled: False
}
"#;

const TENSORS: &str = r#"input [
  { name: "input_ids" data_type: TYPE_UINT32 dims: [ -1 ] },
  { name: "start_id" data_type: TYPE_UINT32 dims: [ 1 ] reshape: { shape: [ ] } optional: true },
  { name: "end_id" data_type: TYPE_UINT32 dims: [ 1 ] reshape: { shape: [ ] } optional: true },
  { name: "input_lengths" data_type: TYPE_UINT32 dims: [ 1 ] reshape: { shape: [ ] } },
  { name: "request_output_len" data_type: TYPE_UINT32 dims: [ -1 ] },
  { name: "runtime_top_k" data_type: TYPE_UINT32 dims: [ 1 ] reshape: { shape: [ ] } optional: true },
  { name: "runtime_top_p" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } optional: true },
  { name: "beam_search_diversity_rate" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } optional: true },
  { name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } optional: true },
  { name: "len_penalty" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } optional: true },
  { name: "repetition_penalty" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } optional: true },
  { name: "random_seed" data_type: TYPE_INT32 dims: [ 1 ] reshape: { shape: [ ] } optional: true },
  { name: "is_return_log_probs" data_type: TYPE_BOOL dims: [ 1 ] reshape: { shape: [ ] } optional: true },
  { name: "beam_width" data_type: TYPE_UINT32 dims: [ 1 ] reshape: { shape: [ ] } optional: true },
  { name: "bad_words_list" data_type: TYPE_INT32 dims: [ 2, -1 ] optional: true },
  { name: "stop_words_list" data_type: TYPE_INT32 dims: [ 2, -1 ] optional: true }
]
output [
  { name: "output_ids" data_type: TYPE_UINT32 dims: [ -1, -1 ] },
  { name: "sequence_length" data_type: TYPE_UINT32 dims: [ -1 ] },
  { name: "cum_log_probs" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "output_log_probs" data_type: TYPE_FP32 dims: [ -1, -1 ] }
]
instance_group [
  {
    count: 1
    kind: KIND_CPU
  }
]
"#;

/// FauxPilot's `.env` for serving `name` from `model_dir` on `tp` GPUs.
pub fn env_file(name: &str, model_dir: &Path, tp: usize) -> String {
    let gpus: Vec<String> = (0..tp).map(|g| g.to_string()).collect();
    let hf_cache = std::env::var("HOME").map_or_else(|_| ".hf_cache".into(), |home| format!("{home}/.cache/huggingface"));
    format!(
        "NUM_GPUS={tp}\nGPUS={}\nAPI_EXTERNAL_PORT=5000\nTRITON_HOST=triton\nTRITON_PORT=8001\nMODEL={name}\nMODEL_DIR={}\nHF_CACHE_DIR={hf_cache}\n",
        gpus.join(","),
        model_dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!(default_name(Path::new("/x/codegen-350M-multi")), "codegen-350M-multi");
        assert_eq!(default_name(Path::new("/runs/mine/checkpoint-500")), "mine-checkpoint-500");
        assert_eq!(default_name(Path::new("/runs/mine/checkpoint-500/model")), "mine-checkpoint-500");
        let p = TritonPaths::new(Path::new("/store"), "m", 2, None).unwrap();
        assert_eq!(p.model_dir, Path::new("/store/m-2gpu"));
        assert_eq!(p.checkpoint_path, "/store/m-2gpu/fastertransformer/1/2-gpu");
        let rebased = TritonPaths::new(Path::new("/store"), "m", 2, Some("/model/")).unwrap();
        assert_eq!(rebased.checkpoint_path, "/model/fastertransformer/1/2-gpu");
        let env = env_file("m", &p.model_dir, 4);
        assert!(env.contains("NUM_GPUS=4\nGPUS=0,1,2,3\n") && env.contains("MODEL_DIR=/store/m-2gpu\n"));
    }
}
