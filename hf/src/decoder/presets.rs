//! Shape presets of the decoder family (`--config_name`): the published code models' shapes as
//! one table row each, built into validated `DecoderConfig`s.

use serde_json::Value;

use super::{DecoderConfig, Family};

/// Shape presets (`--config_name`): the published code models' shapes with random init, for
/// plans, benches and from-scratch runs, and `tiny-llama` for tests. The vocabulary is the
/// model's own; a from-scratch run resizes it to its tokenizer's.
#[rustfmt::skip]
const PRESETS: [(&str, Family, [usize; 7], bool, &str); 10] = [
    // name, family, [E, I, L, H, KV, V, max_position_embeddings], tied, the rest of config.json
    ("deepseek-coder-1.3b", Family::Llama, [2048, 5504, 24, 16, 16, 32256, 16384], false,
     r#"{"rope_theta": 100000, "rope_scaling": {"type": "linear", "factor": 4.0}, "bos_token_id": 32013, "eos_token_id": 32014}"#),
    ("deepseek-coder-6.7b", Family::Llama, [4096, 11008, 32, 32, 32, 32256, 16384], false,
     r#"{"rope_theta": 100000, "rope_scaling": {"type": "linear", "factor": 4.0}, "bos_token_id": 32013, "eos_token_id": 32014}"#),
    ("codellama-7b", Family::Llama, [4096, 11008, 32, 32, 32, 32016, 16384], false,
     r#"{"rope_theta": 1000000, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2}"#),
    ("qwen2.5-coder-0.5b", Family::Qwen2, [896, 4864, 24, 14, 2, 151936, 32768], true,
     r#"{"rope_theta": 1000000, "bos_token_id": 151643, "eos_token_id": 151643}"#),
    ("qwen2.5-coder-1.5b", Family::Qwen2, [1536, 8960, 28, 12, 2, 151936, 32768], true,
     r#"{"rope_theta": 1000000, "bos_token_id": 151643, "eos_token_id": 151643}"#),
    ("qwen2.5-coder-7b", Family::Qwen2, [3584, 18944, 28, 28, 4, 152064, 32768], false,
     r#"{"rope_theta": 1000000, "bos_token_id": 151643, "eos_token_id": 151643}"#),
    ("starcoder2-3b", Family::Starcoder2, [3072, 12288, 30, 24, 2, 49152, 16384], true,
     r#"{"rope_theta": 999999.4420358813, "sliding_window": 4096, "bos_token_id": 0, "eos_token_id": 0}"#),
    ("starcoder2-7b", Family::Starcoder2, [4608, 18432, 32, 36, 4, 49152, 16384], true,
     r#"{"rope_theta": 1000000, "sliding_window": 4096, "bos_token_id": 0, "eos_token_id": 0}"#),
    ("starcoder2-15b", Family::Starcoder2, [6144, 24576, 40, 48, 4, 49152, 16384], false,
     r#"{"rope_theta": 100000, "sliding_window": 4096, "bos_token_id": 0, "eos_token_id": 0}"#),
    ("tiny-llama", Family::Llama, [64, 96, 2, 4, 2, 1003, 64], false,
     r#"{"bos_token_id": 0, "eos_token_id": 0}"#),
];

impl DecoderConfig {
    /// The preset of this name.
    pub fn builtin(name: &str) -> Option<DecoderConfig> {
        let (_, family, [e, i, l, h, kv, v, positions], tied, rest) = *PRESETS.iter().find(|p| p.0 == name)?;
        let Value::Object(mut config) = serde_json::from_str(rest).expect("a preset's keys are JSON") else { unreachable!() };
        let shape = [
            ("hidden_size", e),
            ("intermediate_size", i),
            ("num_hidden_layers", l),
            ("num_attention_heads", h),
            ("num_key_value_heads", kv),
            ("vocab_size", v),
            ("max_position_embeddings", positions),
        ];
        config.extend(shape.map(|(k, n)| (k.to_string(), Value::from(n))));
        config.insert("model_type".into(), family.model_type().into());
        config.insert("architectures".into(), Value::from(vec![family.architecture()]));
        config.insert("tie_word_embeddings".into(), tied.into());
        Some(Self::from_value(Value::Object(config)).expect("presets are valid"))
    }

    /// The preset names, for messages.
    pub fn builtin_names() -> Vec<&'static str> {
        PRESETS.iter().map(|p| p.0).collect()
    }
}
