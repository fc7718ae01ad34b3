//! CodeGen's config.json (HF `CodeGenConfig`), validated, plus the shipped shapes as built-ins.


use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};


/// CodeGen-1's qkv_proj holds its heads in this many chunks (`mp_num` in HF's modeling_codegen.py;
/// CodeGen2 uses 8, not supported).
pub const MP_NUM: usize = 4;

/// The fields of HF `CodeGenConfig` the model needs; other keys survive a load/save round trip.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CodeGenConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub rotary_dim: usize,
    /// MLP width; HF uses 4 * n_embd when null.
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default)]
    pub resid_pdrop: f64,
    #[serde(default)]
    pub embd_pdrop: f64,
    #[serde(default)]
    pub attn_pdrop: f64,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default = "default_eos")]
    pub bos_token_id: i64,
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
    /// Keys this crate does not interpret (n_ctx, torch_dtype, transformers_version, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_model_type() -> String {
    "codegen".into()
}
fn default_activation() -> String {
    "gelu_new".into()
}
fn default_ln_eps() -> f64 {
    1e-5
}
fn default_init_range() -> f64 {
    0.02
}
fn default_eos() -> i64 {
    50256
}

impl CodeGenConfig {
    /// Parses and validates config.json content; the error is a sentence for the user. (Files are
    /// read through `ModelConfig`, which dispatches on `model_type`.)
    pub fn from_value(value: Value) -> std::result::Result<Self, String> {
        let model_type = value.get("model_type").and_then(Value::as_str).unwrap_or("codegen");
        if model_type != "codegen" {
            return Err(format!("model_type is {model_type:?}; zerotune trains CodeGen models (model_type \"codegen\")"));
        }
        let config: Self = serde_json::from_value(value).map_err(|e| format!("not a CodeGen config: {e}"))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let Self { n_embd, n_head, rotary_dim, .. } = *self;
        if n_head == 0 || n_embd % n_head != 0 {
            return Err(format!("n_embd {n_embd} is not divisible by n_head {n_head}"));
        }
        if n_head % 4 != 0 {
            return Err(format!("n_head {n_head} is not divisible by 4 (CodeGen's qkv_proj holds 4 chunks of heads)"));
        }
        if rotary_dim % 2 != 0 || rotary_dim > self.head_dim() {
            return Err(format!("rotary_dim {rotary_dim} must be even and at most the head size {}", self.head_dim()));
        }
        if self.activation_function != "gelu_new" {
            return Err(format!("activation_function {:?} is not supported (CodeGen uses gelu_new)", self.activation_function));
        }
        if self.vocab_size == 0 || self.n_layer == 0 || self.n_positions == 0 {
            return Err("vocab_size, n_layer and n_positions must be positive".into());
        }
        Ok(())
    }

    /// Tokens per training and held-out block when `--block_size` is not given: the model's
    /// context, at most 1024 (run_clm.py's default).
    pub fn default_block_size(&self) -> usize {
        self.n_positions.min(1024)
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    pub fn inner_dim(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// Every parameter's HF name and shape, in HF's module order.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (e, i, v) = (self.n_embd, self.inner_dim(), self.vocab_size);
        let mut shapes = vec![("transformer.wte.weight".to_string(), vec![v, e])];
        for l in 0..self.n_layer {
            let p = format!("transformer.h.{l}");
            shapes.extend([
                (format!("{p}.ln_1.weight"), vec![e]),
                (format!("{p}.ln_1.bias"), vec![e]),
                (format!("{p}.attn.qkv_proj.weight"), vec![3 * e, e]),
                (format!("{p}.attn.out_proj.weight"), vec![e, e]),
                (format!("{p}.mlp.fc_in.weight"), vec![i, e]),
                (format!("{p}.mlp.fc_in.bias"), vec![i]),
                (format!("{p}.mlp.fc_out.weight"), vec![e, i]),
                (format!("{p}.mlp.fc_out.bias"), vec![e]),
            ]);
        }
        shapes.extend([
            ("transformer.ln_f.weight".to_string(), vec![e]),
            ("transformer.ln_f.bias".to_string(), vec![e]),
            ("lm_head.weight".to_string(), vec![v, e]),
            ("lm_head.bias".to_string(), vec![v]),
        ]);
        shapes
    }

    pub fn num_parameters(&self) -> usize {
        self.parameter_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    /// config.json as HF writes it for `CodeGenForCausalLM`, with `torch_dtype` set.
    pub fn to_hf_json(&self, torch_dtype: &str) -> Value {
        let mut value = serde_json::to_value(self).expect("config serialises");
        let map = value.as_object_mut().expect("config is an object");
        map.insert("model_type".into(), "codegen".into());
        map.insert("architectures".into(), serde_json::json!(["CodeGenForCausalLM"]));
        map.insert("torch_dtype".into(), torch_dtype.into());
        map.insert("tie_word_embeddings".into(), false.into());
        map.entry("n_ctx").or_insert(self.n_positions.into());
        map.entry("use_cache").or_insert(true.into());
        value
    }

    /// The shipped CodeGen shapes and a tiny one for from-scratch runs, by name: `tiny`,
    /// `codegen-350M`, `codegen-2B`, `codegen-6B`, `codegen-16B` (a `Salesforce/codegen-350M-multi`
    /// style name picks the same shape). The vocabulary is CodeGen's 51200 rows.
    pub fn builtin(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        let size = lower.rsplit('/').next().unwrap_or(&lower);
        let (n_layer, n_embd, n_head, rotary_dim, n_positions) = if size == "tiny" {
            (2, 128, 4, 16, 512)
        } else if size.starts_with("codegen-350m") {
            (20, 1024, 16, 32, 2048)
        } else if size.starts_with("codegen-2b") {
            (32, 2560, 32, 64, 2048)
        } else if size.starts_with("codegen-6b") {
            (33, 4096, 16, 64, 2048)
        } else if size.starts_with("codegen-16b") {
            (34, 6144, 24, 64, 2048)
        } else {
            return None;
        };
        Some(Self {
            model_type: default_model_type(),
            vocab_size: 51200,
            n_positions,
            n_embd,
            n_layer,
            n_head,
            rotary_dim,
            n_inner: None,
            activation_function: default_activation(),
            resid_pdrop: 0.0,
            embd_pdrop: 0.0,
            attn_pdrop: 0.0,
            layer_norm_epsilon: default_ln_eps(),
            initializer_range: default_init_range(),
            bos_token_id: default_eos(),
            eos_token_id: default_eos(),
            extra: Map::new(),
        })
    }

    pub const BUILTIN_NAMES: &'static str = "tiny, codegen-350M, codegen-2B, codegen-6B, codegen-16B";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_350m_has_the_release_parameter_count() {
        let c = CodeGenConfig::builtin("Salesforce/codegen-350M-multi").unwrap();
        // 356,712,448 parameters: 4 bytes each is the 1,426,849,792-byte fp32 FT export.
        assert_eq!(c.num_parameters(), 356_712_448);
    }

    #[test]
    fn rejects_non_codegen_and_bad_heads() {
        let gptj = serde_json::json!({"model_type": "gptj", "vocab_size": 10});
        assert!(CodeGenConfig::from_value(gptj).unwrap_err().contains("gptj"));
        let mut c = CodeGenConfig::builtin("tiny").unwrap();
        c.n_head = 6;
        c.n_embd = 132;
        assert!(c.validate().unwrap_err().contains("divisible by 4"));
    }

    #[test]
    fn unknown_keys_round_trip() {
        let mut v = CodeGenConfig::builtin("tiny").unwrap().to_hf_json("float32");
        v["some_future_key"] = 7.into();
        let c = CodeGenConfig::from_value(v).unwrap();
        assert_eq!(c.to_hf_json("float32")["some_future_key"], 7);
    }
}
