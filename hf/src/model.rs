//! The model a directory or preset describes, whichever architecture: CodeGen or the Llama decoder
//! family, chosen by config.json's `model_type`. Every stage outside the model layer reads the
//! model's facts (sizes, context, token ids, parameters, how each is initialised and decayed, the
//! files HF writes) through this type, and none branches on the architecture.

use std::path::Path;

use serde_json::{json, Value};

use crate::decoder::Family;
use crate::{CodeGenConfig, DecoderConfig, Result};

/// A validated config.json of any supported architecture.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelConfig {
    CodeGen(CodeGenConfig),
    Decoder(DecoderConfig),
}

/// How HF's `_init_weights` sets a parameter of a freshly built model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// N(0, σ): Linear and Embedding weights.
    Normal(f64),
    /// Biases.
    Zeros,
    /// Norm weights.
    Ones,
}

impl ModelConfig {
    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        crate::read_config(path, Self::from_value)
    }

    /// Parses and validates config.json content by its `model_type` (absent: CodeGen, as older
    /// CodeGen exports omit it); the error is a sentence for the user.
    pub fn from_value(value: Value) -> std::result::Result<Self, String> {
        let model_type = value.get("model_type").and_then(Value::as_str).unwrap_or("codegen");
        if model_type == "codegen" {
            return CodeGenConfig::from_value(value).map(Self::CodeGen);
        }
        if Family::of_model_type(model_type).is_some() {
            return DecoderConfig::from_value(value).map(Self::Decoder);
        }
        Err(format!("model_type is {model_type:?}; zerotune supports {}", Self::MODEL_TYPES))
    }

    /// The model types `from_value` accepts, for messages.
    pub const MODEL_TYPES: &'static str = "codegen, llama (DeepSeek-Coder, CodeLlama), qwen2 (Qwen2.5-Coder) and starcoder2";

    /// A shape preset by name (random init: plans, benches and from-scratch runs).
    pub fn builtin(name: &str) -> Option<Self> {
        DecoderConfig::builtin(&name.to_ascii_lowercase()).map(Self::Decoder).or_else(|| CodeGenConfig::builtin(name).map(Self::CodeGen))
    }

    /// Every preset name, for messages.
    pub fn builtin_names() -> String {
        format!("{}, {}", CodeGenConfig::BUILTIN_NAMES, DecoderConfig::builtin_names().join(", "))
    }

    /// config.json's `model_type`.
    pub fn model_type(&self) -> &'static str {
        match self {
            Self::CodeGen(_) => "codegen",
            Self::Decoder(c) => c.family.model_type(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Self::CodeGen(c) => c.vocab_size,
            Self::Decoder(c) => c.vocab_size,
        }
    }

    /// Resizes the embedding (and head) rows, for a from-scratch run's own tokenizer.
    pub fn set_vocab_size(&mut self, rows: usize) {
        match self {
            Self::CodeGen(c) => c.vocab_size = rows,
            Self::Decoder(c) => c.vocab_size = rows,
        }
    }

    /// The most positions the model takes (`n_positions`, `max_position_embeddings`).
    pub fn context(&self) -> usize {
        match self {
            Self::CodeGen(c) => c.n_positions,
            Self::Decoder(c) => c.max_position_embeddings,
        }
    }

    /// The config key that holds `context()`, for messages.
    pub fn context_key(&self) -> &'static str {
        match self {
            Self::CodeGen(_) => "n_positions",
            Self::Decoder(_) => "max_position_embeddings",
        }
    }

    /// Tokens per training and held-out block when `--block_size` is not given: the model's
    /// context, at most 1024 (run_clm.py's default).
    pub fn default_block_size(&self) -> usize {
        self.context().min(1024)
    }

    pub fn num_layers(&self) -> usize {
        match self {
            Self::CodeGen(c) => c.n_layer,
            Self::Decoder(c) => c.num_hidden_layers,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Self::CodeGen(c) => c.n_embd,
            Self::Decoder(c) => c.hidden_size,
        }
    }

    /// Every parameter's HF name and shape, in HF's `named_parameters` order (a tied head is the
    /// embedding and has no entry).
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            Self::CodeGen(c) => c.parameter_shapes(),
            Self::Decoder(c) => c.parameter_shapes(),
        }
    }

    pub fn num_parameters(&self) -> usize {
        match self {
            Self::CodeGen(c) => c.num_parameters(),
            Self::Decoder(c) => c.num_parameters(),
        }
    }

    /// Values the KV cache holds per token (keys and values of every layer).
    pub fn kv_values_per_token(&self) -> usize {
        match self {
            Self::CodeGen(c) => 2 * c.n_layer * c.n_embd,
            Self::Decoder(c) => c.kv_values_per_token(),
        }
    }

    /// Values autograd keeps per token of one block for the backward pass, in the compute dtype.
    /// CodeGen: 17 x n_embd, measured on CPU ranks (bench/rank_memory.sh): ln_1's input and
    /// output, qkv (3), rotated q and k, the attention output and its reshaped copy, fc_in's
    /// output (4) and gelu's (4). The decoder family:
    /// counted from the tensors its graph saves (two norms' inputs and outputs 4E; q, k, v
    /// before and after rope, the grouped k/v and the attention output 6·H·D + 2·KV·D; the
    /// MLP's 4 intermediates of I, or 2 for GELU); on the Qwen2.5-Coder-0.5B shape at block 512
    /// the plan came to 0.921 of one CPU rank's measured peak (bench/results/).
    pub fn saved_values_per_token_per_block(&self) -> usize {
        match self {
            Self::CodeGen(c) => 17 * c.n_embd,
            Self::Decoder(c) => {
                let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
                let mlp = if c.gated_mlp() { 4 } else { 2 } * c.intermediate_size;
                4 * c.hidden_size + 6 * q + 2 * kv + mlp
            }
        }
    }

    /// The token that ends a document: the first of `eos_token_id`'s ids.
    pub fn eos_token_id(&self) -> Option<i64> {
        self.eos_token_ids().first().copied()
    }

    /// Every id that ends generation (config.json's `eos_token_id` may be a list).
    pub fn eos_token_ids(&self) -> Vec<i64> {
        match self {
            Self::CodeGen(c) => vec![c.eos_token_id],
            Self::Decoder(c) => c.eos_token_ids.clone(),
        }
    }

    pub fn bos_token_id(&self) -> Option<i64> {
        match self {
            Self::CodeGen(c) => Some(c.bos_token_id),
            Self::Decoder(c) => c.bos_token_id,
        }
    }

    /// Sets bos and eos, for a from-scratch run whose tokenizer has its own.
    pub fn set_token_ids(&mut self, bos: i64, eos: i64) {
        match self {
            Self::CodeGen(c) => (c.bos_token_id, c.eos_token_id) = (bos, eos),
            Self::Decoder(c) => (c.bos_token_id, c.eos_token_ids) = (Some(bos), vec![eos]),
        }
    }

    /// How HF initialises the parameter `name`: norm weights 1, biases 0, the rest N(0, range).
    pub fn init_of(&self, name: &str) -> Init {
        let range = match self {
            Self::CodeGen(c) => c.initializer_range,
            Self::Decoder(c) => c.initializer_range,
        };
        if name.ends_with(".bias") {
            Init::Zeros
        } else if is_norm(name) {
            Init::Ones
        } else {
            Init::Normal(range)
        }
    }

    /// The embedding and its row that HF zeroes at init and keeps from the lookup's gradient
    /// (`padding_idx`, from `pad_token_id`).
    pub fn padding_row(&self) -> Option<(&'static str, i64)> {
        match self {
            Self::CodeGen(_) => None,
            Self::Decoder(c) => c.pad_token_id.map(|pad| ("model.embed_tokens.weight", pad)),
        }
    }

    /// config.json as HF writes it, with `torch_dtype` set.
    pub fn to_hf_json(&self, torch_dtype: &str) -> Value {
        match self {
            Self::CodeGen(c) => c.to_hf_json(torch_dtype),
            Self::Decoder(c) => c.to_hf_json(torch_dtype),
        }
    }

    /// generation_config.json as HF writes it beside a model saved from its config: the ids that
    /// are set, eos as one id or a list as config.json has it.
    pub fn generation_config(&self) -> Value {
        let config = self.to_hf_json("float32");
        let mut out = json!({"_from_model_config": true});
        for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            if let Some(id) = config.get(key).filter(|v| !v.is_null()) {
                out[key] = id.clone();
            }
        }
        out
    }

    /// One line for reports: the architecture and its sizes.
    pub fn summary(&self) -> String {
        let (layers, hidden, context) = (self.num_layers(), self.hidden_size(), self.context());
        let params = self.num_parameters() as f64 / 1e6;
        format!("{} {params:.1}M parameters, {layers} layers of {hidden}, context {context}", self.model_type())
    }
}

/// Whether `name` is a norm's parameter: CodeGen's `ln_1`/`ln_f`, the family's `*_layernorm` and
/// `model.norm`.
fn is_norm(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.contains("ln_") || lower.contains("layernorm") || lower.split('.').any(|part| part == "norm" || part.ends_with("_norm"))
}

/// HF Trainer's rule (`get_decay_parameter_names`): no weight decay on any name containing
/// `bias`, `layernorm` or `rmsnorm`, nor on a `norm` / `*_norm` module's parameters, nor inside an
/// `nn.LayerNorm` (CodeGen's `ln_*`).
pub fn decays(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !(lower.contains("bias") || lower.contains("rmsnorm") || is_norm(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_follows_hf_trainers_patterns() {
        for name in
            ["transformer.h.0.ln_1.weight", "model.norm.weight", "model.layers.3.input_layernorm.weight", "lm_head.bias", "x.q_norm.weight"]
        {
            assert!(!decays(name), "{name}");
        }
        for name in ["transformer.wte.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight", "model.normalizer.weight"] {
            assert!(decays(name), "{name}");
        }
    }

    #[test]
    fn dispatches_on_model_type_and_refuses_others_by_name() {
        let codegen = ModelConfig::builtin("tiny").unwrap().to_hf_json("float32");
        assert_eq!(ModelConfig::from_value(codegen).unwrap().model_type(), "codegen");
        let qwen = ModelConfig::builtin("qwen2.5-coder-0.5b").unwrap();
        assert_eq!((qwen.model_type(), qwen.context(), qwen.eos_token_id()), ("qwen2", 32768, Some(151643)));
        let err = ModelConfig::from_value(json!({"model_type": "gpt_neox"})).unwrap_err();
        assert!(err.contains("\"gpt_neox\"") && err.contains("qwen2"), "{err}");
        assert!(ModelConfig::builtin_names().contains("codegen-350M") && ModelConfig::builtin_names().contains("starcoder2-15b"));
    }

    #[test]
    fn a_decoder_config_round_trips_through_its_json_with_new_ids() {
        let mut config = ModelConfig::builtin("deepseek-coder-1.3b").unwrap();
        config.set_vocab_size(512);
        config.set_token_ids(3, 4);
        let json = config.to_hf_json("float32");
        assert_eq!(json["rope_scaling"], json!({"rope_type": "linear", "factor": 4.0}));
        assert_eq!(json["rope_parameters"]["rope_theta"], 100000.0);
        let back = ModelConfig::from_value(json.clone()).unwrap();
        assert_eq!(back.to_hf_json("float32"), json, "written again, the same file");
        assert_eq!((back.vocab_size(), back.bos_token_id(), back.eos_token_ids()), (512, Some(3), vec![4]));
        assert_eq!(config.generation_config(), json!({"_from_model_config": true, "bos_token_id": 3, "eos_token_id": 4}));
    }

    #[test]
    fn init_sets_norms_to_one_and_biases_to_zero() {
        let config = ModelConfig::builtin("tiny-llama").unwrap();
        assert_eq!(config.init_of("model.layers.0.post_attention_layernorm.weight"), Init::Ones);
        assert_eq!(config.init_of("model.norm.weight"), Init::Ones);
        assert_eq!(config.init_of("model.layers.0.self_attn.q_proj.bias"), Init::Zeros);
        assert_eq!(config.init_of("model.embed_tokens.weight"), Init::Normal(0.02));
    }
}
