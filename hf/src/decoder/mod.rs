//! The Llama decoder family's config.json (HF `LlamaConfig`, `Qwen2Config`, `Starcoder2Config`):
//! one validated `DecoderConfig` with each class's defaults and each spelling resolved the way
//! transformers 5 resolves them, the parameters it implies in HF's names and order, and shape
//! presets of the published code models.

use serde_json::{json, Map, Value};

use keys::{biases, dropout, rope, windows, Keys};

/// Which member of the family (config.json's `model_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// DeepSeek-Coder, CodeLlama.
    Llama,
    /// Qwen2.5-Coder.
    Qwen2,
    Starcoder2,
}

/// Per family: model_type, HF class, and the class defaults of a key config.json leaves out.
struct Defaults {
    model_type: &'static str,
    architecture: &'static str,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    /// `None`: as many as the query heads (Llama); Qwen2 and StarCoder2 default to a number.
    num_key_value_heads: Option<usize>,
    hidden_act: &'static str,
    eps_key: &'static str,
    eps: f64,
    max_position_embeddings: usize,
    tie_word_embeddings: bool,
    initializer_range: f64,
    bos_token_id: Option<i64>,
    eos_token_id: Option<i64>,
}

const FAMILIES: [(Family, Defaults); 3] = [
    (
        Family::Llama,
        Defaults {
            model_type: "llama",
            architecture: "LlamaForCausalLM",
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            hidden_act: "silu",
            eps_key: "rms_norm_eps",
            eps: 1e-6,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            initializer_range: 0.02,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
        },
    ),
    (
        Family::Qwen2,
        Defaults {
            model_type: "qwen2",
            architecture: "Qwen2ForCausalLM",
            vocab_size: 151936,
            hidden_size: 4096,
            intermediate_size: 22016,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: Some(32),
            hidden_act: "silu",
            eps_key: "rms_norm_eps",
            eps: 1e-6,
            max_position_embeddings: 32768,
            tie_word_embeddings: false,
            initializer_range: 0.02,
            bos_token_id: None,
            eos_token_id: None,
        },
    ),
    (
        Family::Starcoder2,
        Defaults {
            model_type: "starcoder2",
            architecture: "Starcoder2ForCausalLM",
            vocab_size: 49152,
            hidden_size: 3072,
            intermediate_size: 12288,
            num_hidden_layers: 30,
            num_attention_heads: 24,
            num_key_value_heads: Some(2),
            hidden_act: "gelu_pytorch_tanh",
            eps_key: "norm_epsilon",
            eps: 1e-5,
            max_position_embeddings: 4096,
            tie_word_embeddings: true,
            initializer_range: 0.018042,
            bos_token_id: Some(50256),
            eos_token_id: Some(50256),
        },
    ),
];

impl Family {
    /// The family of config.json's `model_type`, if it is one of ours.
    pub fn of_model_type(model_type: &str) -> Option<Family> {
        FAMILIES.iter().find(|(_, d)| d.model_type == model_type).map(|(f, _)| *f)
    }

    fn defaults(self) -> &'static Defaults {
        &FAMILIES.iter().find(|(f, _)| *f == self).expect("every family has a row").1
    }

    pub fn model_type(self) -> &'static str {
        self.defaults().model_type
    }

    /// The HF class that loads it (config.json's `architectures`).
    pub fn architecture(self) -> &'static str {
        self.defaults().architecture
    }
}

/// How rotary positions are scaled (`rope_scaling` / `rope_parameters`' `rope_type`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// `default`, and `dynamic`, which equals it within the model's context.
    None,
    /// Positions divided by `factor` (DeepSeek-Coder: 4).
    Linear { factor: f64 },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, the band between smoothed.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
    /// YaRN (Qwen2.5's long-context recipe): frequencies ramped between interpolated and kept
    /// over the dimensions `beta_fast`..`beta_slow` rotations select, cos and sin scaled by
    /// `attention_factor` (resolved from `mscale`s or `0.1 ln factor + 1` when absent).
    Yarn { factor: f64, original_max_position_embeddings: usize, attention_factor: f64, beta_fast: f64, beta_slow: f64, truncate: bool },
}

/// Dropout probabilities in training: on the embedding, on each residual branch before its add
/// (after o_proj and the MLP), and on the attention probabilities. StarCoder2 has all three;
/// Llama and Qwen2 only `attention_dropout`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Dropout {
    pub embedding: f64,
    pub residual: f64,
    pub attention: f64,
}

impl Dropout {
    pub fn any(&self) -> bool {
        self.embedding > 0.0 || self.residual > 0.0 || self.attention > 0.0
    }
}

impl RopeScaling {
    /// The rope dict as transformers writes it (without `rope_theta`).
    fn to_json(self) -> Value {
        match self {
            RopeScaling::None => json!({"rope_type": "default"}),
            RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position_embeddings,
            }),
            RopeScaling::Yarn { factor, original_max_position_embeddings, attention_factor, beta_fast, beta_slow, truncate } => json!({
                "rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original_max_position_embeddings,
                "attention_factor": attention_factor, "beta_fast": beta_fast, "beta_slow": beta_slow, "truncate": truncate,
            }),
        }
    }
}

/// The family's config, every default and spelling resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderConfig {
    pub family: Family,
    pub vocab_size: usize,
    /// E.
    pub hidden_size: usize,
    /// I: the MLP's inner width.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    /// H.
    pub num_attention_heads: usize,
    /// KV: the heads keys and values have (H for full attention, 1 for multi-query).
    pub num_key_value_heads: usize,
    /// D: each head's width (not always E / H).
    pub head_dim: usize,
    pub norm_eps: f64,
    /// Bias on q, k and v; on o; on the MLP's matrices.
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    /// The output head is the embedding (no `lm_head.weight` of its own).
    pub tie_word_embeddings: bool,
    /// Each layer's attention window: a token sees this many keys, itself included (`None`: all
    /// before it).
    pub windows: Vec<Option<usize>>,
    pub initializer_range: f64,
    pub dropout: Dropout,
    pub bos_token_id: Option<i64>,
    /// One id or several (`eos_token_id` may be a list).
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
    /// The file's keys, kept for a load/save round trip.
    pub raw: Map<String, Value>,
}

impl DecoderConfig {
    /// Parses and validates config.json content; the error is a sentence naming the key.
    pub fn from_value(value: Value) -> std::result::Result<Self, String> {
        let Value::Object(raw) = value else { return Err("config.json is not a JSON object".into()) };
        let model_type = raw.get("model_type").and_then(Value::as_str).unwrap_or("");
        let family = Family::of_model_type(model_type)
            .ok_or_else(|| format!("model_type {model_type:?} is not one of the decoder family (llama, qwen2, starcoder2)"))?;
        let keys = Keys(&raw);
        let d = family.defaults();
        let hidden_size = keys.usize("hidden_size", d.hidden_size)?;
        let num_attention_heads = keys.usize("num_attention_heads", d.num_attention_heads)?;
        let num_hidden_layers = keys.usize("num_hidden_layers", d.num_hidden_layers)?;
        let max_position_embeddings = keys.usize("max_position_embeddings", d.max_position_embeddings)?;
        let (rope_theta, rope_scaling) = rope(&raw, max_position_embeddings)?;
        let (qkv_bias, o_bias, mlp_bias) = biases(family, &keys)?;
        let config = DecoderConfig {
            family,
            vocab_size: keys.usize("vocab_size", d.vocab_size)?,
            hidden_size,
            intermediate_size: keys.usize("intermediate_size", d.intermediate_size)?,
            num_hidden_layers,
            num_attention_heads,
            // Absent: the class default; null: as many as the query heads (every class's rule).
            num_key_value_heads: match keys.0.get("num_key_value_heads") {
                None => d.num_key_value_heads.unwrap_or(num_attention_heads),
                Some(_) => keys.opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads),
            },
            head_dim: keys.usize("head_dim", if num_attention_heads == 0 { 0 } else { hidden_size / num_attention_heads })?,
            norm_eps: keys.f64(d.eps_key, d.eps)?,
            qkv_bias,
            o_bias,
            mlp_bias,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: keys.bool("tie_word_embeddings", d.tie_word_embeddings)?,
            windows: windows(family, &keys, num_hidden_layers)?,
            initializer_range: keys.f64("initializer_range", d.initializer_range)?,
            dropout: dropout(family, &keys)?,
            bos_token_id: keys.id("bos_token_id", d.bos_token_id)?,
            eos_token_ids: keys.ids("eos_token_id", d.eos_token_id)?,
            pad_token_id: keys.id("pad_token_id", None)?,
            raw: raw.clone(),
        };
        let act = keys.str("hidden_act", d.hidden_act)?;
        if act != d.hidden_act {
            return Err(format!("hidden_act {act:?} is not supported for {model_type} (it uses {:?})", d.hidden_act));
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let (h, kv, e) = (self.num_attention_heads, self.num_key_value_heads, self.hidden_size);
        let sizes = [self.vocab_size, e, self.intermediate_size, self.num_hidden_layers, h, kv, self.head_dim];
        if sizes.contains(&0) || self.max_position_embeddings == 0 {
            return Err("vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, \
                        num_key_value_heads, head_dim and max_position_embeddings must be positive"
                .into());
        }
        if h % kv != 0 {
            return Err(format!("num_attention_heads {h} is not a multiple of num_key_value_heads {kv}"));
        }
        // HF's LlamaConfig checks this even when head_dim is given.
        if self.family == Family::Llama && e % h != 0 {
            return Err(format!("hidden_size {e} is not divisible by num_attention_heads {h}"));
        }
        if self.head_dim % 2 != 0 {
            return Err(format!("head_dim {} must be even (rotary positions turn pairs of dimensions)", self.head_dim));
        }
        if self.windows.iter().flatten().any(|&w| w == 0) {
            return Err("sliding_window must be at least 1".into());
        }
        Ok(())
    }

    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Whether the norms are LayerNorms with a bias (StarCoder2) rather than RMSNorms.
    pub fn layer_norm(&self) -> bool {
        self.family == Family::Starcoder2
    }

    /// Whether the MLP is SwiGLU (gate, up, down) rather than two matrices around a GELU.
    pub fn gated_mlp(&self) -> bool {
        self.family != Family::Starcoder2
    }

    /// Every parameter, in HF's names and `named_parameters` order, with its shape. A tied head
    /// has no entry of its own.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (v, e, i) = (self.vocab_size, self.hidden_size, self.intermediate_size);
        let (q, kv) = (self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim);
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, e])];
        let mut push = |name: String, shape: Vec<usize>, bias: bool| {
            let rows = shape[0];
            out.push((format!("{name}.weight"), shape));
            if bias {
                out.push((format!("{name}.bias"), vec![rows]));
            }
        };
        for l in 0..self.num_hidden_layers {
            let layer = format!("model.layers.{l}");
            push(format!("{layer}.self_attn.q_proj"), vec![q, e], self.qkv_bias);
            push(format!("{layer}.self_attn.k_proj"), vec![kv, e], self.qkv_bias);
            push(format!("{layer}.self_attn.v_proj"), vec![kv, e], self.qkv_bias);
            push(format!("{layer}.self_attn.o_proj"), vec![e, q], self.o_bias);
            if self.gated_mlp() {
                push(format!("{layer}.mlp.gate_proj"), vec![i, e], self.mlp_bias);
                push(format!("{layer}.mlp.up_proj"), vec![i, e], self.mlp_bias);
                push(format!("{layer}.mlp.down_proj"), vec![e, i], self.mlp_bias);
            } else {
                push(format!("{layer}.mlp.c_fc"), vec![i, e], self.mlp_bias);
                push(format!("{layer}.mlp.c_proj"), vec![e, i], self.mlp_bias);
            }
            push(format!("{layer}.input_layernorm"), vec![e], self.layer_norm());
            push(format!("{layer}.post_attention_layernorm"), vec![e], self.layer_norm());
        }
        push("model.norm".into(), vec![e], self.layer_norm());
        if !self.tie_word_embeddings {
            push("lm_head".into(), vec![v, e], false);
        }
        out
    }

    pub fn num_parameters(&self) -> usize {
        self.parameter_shapes().iter().map(|(_, shape)| shape.iter().product::<usize>()).sum()
    }

    /// config.json as `save_pretrained` writes it: the file's own keys, every resolved field written
    /// back (a resized vocabulary, new token ids), and the rope in both spellings, transformers 4's
    /// `rope_theta` + `rope_scaling` and 5's `rope_parameters`, so that either version loads it.
    pub fn to_hf_json(&self, torch_dtype: &str) -> Value {
        let mut map = self.raw.clone();
        let scaling = self.rope_scaling.to_json();
        let mut rope_parameters = scaling.clone();
        rope_parameters["rope_theta"] = self.rope_theta.into();
        let rope_scaling = if self.rope_scaling == RopeScaling::None { Value::Null } else { scaling };
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => (*one).into(),
            many => many.into(),
        };
        let family = self.family;
        let fields = [
            ("model_type", family.model_type().into()),
            ("architectures", json!([family.architecture()])),
            ("vocab_size", self.vocab_size.into()),
            ("hidden_size", self.hidden_size.into()),
            ("intermediate_size", self.intermediate_size.into()),
            ("num_hidden_layers", self.num_hidden_layers.into()),
            ("num_attention_heads", self.num_attention_heads.into()),
            ("num_key_value_heads", self.num_key_value_heads.into()),
            ("head_dim", self.head_dim.into()),
            (family.defaults().eps_key, self.norm_eps.into()),
            ("max_position_embeddings", self.max_position_embeddings.into()),
            ("tie_word_embeddings", self.tie_word_embeddings.into()),
            ("initializer_range", self.initializer_range.into()),
            ("bos_token_id", self.bos_token_id.into()),
            ("eos_token_id", eos),
            ("pad_token_id", self.pad_token_id.into()),
            ("rope_theta", self.rope_theta.into()),
            ("rope_scaling", rope_scaling),
            ("rope_parameters", rope_parameters),
            ("torch_dtype", torch_dtype.into()),
        ];
        map.extend(fields.map(|(k, v)| (k.to_string(), v)));
        if map.contains_key("dtype") {
            map.insert("dtype".into(), torch_dtype.into());
        }
        map.entry("use_cache").or_insert(true.into());
        Value::Object(map)
    }

    /// Values the KV cache holds per token: keys and values of every layer's KV heads.
    pub fn kv_values_per_token(&self) -> usize {
        2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim
    }
}

mod keys;
mod presets;

#[cfg(test)]
mod tests;
