//! CodeGen -> HF GPT-J (`codegen_gptj_convert.py` done right): every tensor copied under its own
//! name except `qkv_proj`, which is un-permuted into q_proj, k_proj and v_proj; config.json gets
//! the GPT-J fields; the source precision is kept unless asked otherwise (the reference script
//! silently rounds to fp16). Streams tensor by tensor.

use std::path::Path;

use serde_json::{json, Value};
use zerotune_hf::tokenizer;
use zerotune_hf::write::{stream_safetensors, write_generation_config, write_json, Entry, MAX_SHARD_BYTES};
use zerotune_hf::{Dtype, ModelConfig};

use crate::qkv::split_qkv;
use crate::source::Source;
use crate::Result;

/// Where each output tensor comes from.
enum From {
    Copy(String),
    /// (layer, 0 = q, 1 = k, 2 = v) of that layer's qkv_proj.
    Qkv(usize, usize),
}

/// Writes the GPT-J checkpoint of `source` into `out` (which must exist) in `dtype`.
pub fn convert(source: &Source, out: &Path, dtype: Dtype) -> Result<()> {
    let config = &source.config;
    let e = config.n_embd;
    let mut plan: Vec<(Entry, From)> = vec![];
    for (name, shape) in config.parameter_shapes() {
        let layer = name.strip_prefix("transformer.h.").and_then(|r| r.split('.').next()).and_then(|l| l.parse::<usize>().ok());
        match layer {
            Some(l) if name.ends_with("attn.qkv_proj.weight") => {
                for (i, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                    let entry = Entry { name: format!("transformer.h.{l}.attn.{proj}.weight"), dtype, shape: vec![e, e] };
                    plan.push((entry, From::Qkv(l, i)));
                }
            }
            _ => plan.push((Entry { name: name.clone(), dtype, shape }, From::Copy(name))),
        }
    }
    let entries: Vec<Entry> = plan.iter().map(|(e, _)| e.clone()).collect();
    stream_safetensors(out, &entries, MAX_SHARD_BYTES, |i| {
        let bytes = match &plan[i].1 {
            From::Copy(name) => source.read(name, dtype)?.data,
            From::Qkv(l, which) => {
                let qkv = source.read(&format!("transformer.h.{l}.attn.qkv_proj.weight"), dtype)?;
                let (q, k, v) = split_qkv(&qkv.data, e, dtype.size());
                [q, k, v].into_iter().nth(*which).expect("three projections")
            }
        };
        Ok(bytes)
    })?;
    write_json(&out.join("config.json"), &gptj_config(source, dtype))?;
    write_generation_config(out, &ModelConfig::CodeGen(config.clone()))?;
    tokenizer::write_files(out, &tokenizer::read_files(&source.dir)?)?;
    Ok(())
}

/// config.json for `GPTJForCausalLM`: CodeGen's fields plus the GPT-J identity.
pub fn gptj_config(source: &Source, dtype: Dtype) -> Value {
    let c = &source.config;
    let mut config = json!({
        "model_type": "gptj",
        "architectures": ["GPTJForCausalLM"],
        "tokenizer_class": "CodeGenTokenizer",
        "vocab_size": c.vocab_size,
        "n_positions": c.n_positions,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "rotary_dim": c.rotary_dim,
        "n_inner": c.n_inner,
        "activation_function": c.activation_function,
        "resid_pdrop": c.resid_pdrop,
        "embd_pdrop": c.embd_pdrop,
        "attn_pdrop": c.attn_pdrop,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "initializer_range": c.initializer_range,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "tie_word_embeddings": false,
        "use_cache": true,
        "torch_dtype": dtype.torch_name(),
    });
    for key in ["scale_attn_weights", "pad_token_id"] {
        if let Some(v) = c.extra.get(key) {
            config[key] = v.clone();
        }
    }
    config
}
