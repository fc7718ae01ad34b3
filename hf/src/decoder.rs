//! The Llama decoder family's config.json (HF `LlamaConfig`, `Qwen2Config`, `Starcoder2Config`):
//! one validated `DecoderConfig` with each class's defaults and each spelling resolved the way
//! transformers 5 resolves them, the parameters it implies in HF's names and order, and shape
//! presets of the published code models.

use std::path::Path;

use serde_json::{Map, Value};

use crate::{invalid, io_err, Error, Result};

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
    pub bos_token_id: Option<i64>,
    /// One id or several (`eos_token_id` may be a list).
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
    /// The file's keys, kept for a load/save round trip.
    pub raw: Map<String, Value>,
}

impl DecoderConfig {
    /// Reads and validates `path` (a config.json of the family).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json { path: path.into(), source })?;
        Self::from_value(value).map_err(|message| invalid(path, message))
    }

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
        let (rope_theta, rope_scaling) = rope(&raw)?;
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
            max_position_embeddings: keys.usize("max_position_embeddings", d.max_position_embeddings)?,
            tie_word_embeddings: keys.bool("tie_word_embeddings", d.tie_word_embeddings)?,
            windows: windows(family, &keys, num_hidden_layers)?,
            initializer_range: keys.f64("initializer_range", d.initializer_range)?,
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

    /// Values the KV cache holds per token: keys and values of every layer's KV heads.
    pub fn kv_values_per_token(&self) -> usize {
        2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim
    }
}

/// Shape presets (`--config_name`): the published code models' shapes with random init, for
/// plans, benches and from-scratch runs, and `tiny-llama` for tests. The vocabulary is the
/// model's own; a from-scratch run resizes it to its tokenizer's.
#[rustfmt::skip]
const PRESETS: [(&str, Family, [usize; 7], bool, &str); 7] = [
    // name, family, [E, I, L, H, KV, V, max_position_embeddings], tied, the rest of config.json
    ("deepseek-coder-1.3b", Family::Llama, [2048, 5504, 24, 16, 16, 32256, 16384], false,
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

/// q/k/v, o and MLP bias: Llama's `attention_bias` (all four projections) and `mlp_bias`; Qwen2's
/// fixed q/k/v bias; StarCoder2's `use_bias` on every matrix.
fn biases(family: Family, keys: &Keys) -> std::result::Result<(bool, bool, bool), String> {
    Ok(match family {
        Family::Llama => {
            let attention = keys.bool("attention_bias", false)?;
            (attention, attention, keys.bool("mlp_bias", false)?)
        }
        Family::Qwen2 => (true, false, false),
        Family::Starcoder2 => {
            let all = keys.bool("use_bias", true)?;
            (all, all, all)
        }
    })
}

/// θ and the scaling, by transformers 5's reading of both spellings: a non-null v4 `rope_scaling`,
/// else v5's `rope_parameters`; θ from that dict, else the top-level `rope_theta`, else 10000.
fn rope(raw: &Map<String, Value>) -> std::result::Result<(f64, RopeScaling), String> {
    let empty = Map::new();
    let (key, params) = match (raw.get("rope_scaling"), raw.get("rope_parameters")) {
        (Some(Value::Object(p)), _) => ("rope_scaling", p),
        (_, Some(Value::Object(p))) => ("rope_parameters", p),
        _ => ("rope_parameters", &empty),
    };
    let number = |value: Option<&Value>, name: &str| match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| format!("{name} is {v}, not a number")),
    };
    let theta =
        number(params.get("rope_theta"), &format!("{key}.rope_theta"))?.or(number(raw.get("rope_theta"), "rope_theta")?).unwrap_or(10000.0);
    if !(theta.is_finite() && theta > 0.0) {
        return Err(format!("rope_theta {theta} must be a positive number"));
    }
    let partial = number(params.get("partial_rotary_factor"), &format!("{key}.partial_rotary_factor"))?;
    if let Some(partial) = partial.or(number(raw.get("partial_rotary_factor"), "partial_rotary_factor")?).filter(|&p| p != 1.0) {
        return Err(format!("partial_rotary_factor {partial} is not supported (these models rotate the whole head)"));
    }
    let named = |k: &str| params.get(k).filter(|v| !v.is_null());
    let kind = named("rope_type").or(named("type")).and_then(Value::as_str).unwrap_or("default");
    let scaling = match kind {
        "default" | "dynamic" => RopeScaling::None,
        "linear" => match number(params.get("factor"), &format!("{key}.factor"))? {
            Some(factor) if factor.is_finite() && factor >= 1.0 => RopeScaling::Linear { factor },
            other => return Err(format!("{key}.factor {other:?}: a linear rope scaling needs a factor of at least 1")),
        },
        other => return Err(format!("{key}: rope type {other:?} is not supported yet (default, dynamic and linear are)")),
    };
    Ok((theta, scaling))
}

/// Each layer's window. Qwen2: layers marked `sliding_attention` in `layer_types` (by default
/// those from `max_window_layers` on), and only with `use_sliding_window`; StarCoder2: every
/// layer when `sliding_window` is set; Llama: none.
fn windows(family: Family, keys: &Keys, layers: usize) -> std::result::Result<Vec<Option<usize>>, String> {
    match family {
        Family::Llama => Ok(vec![None; layers]),
        Family::Starcoder2 => Ok(vec![keys.opt_usize("sliding_window")?; layers]),
        Family::Qwen2 => {
            let used = keys.bool("use_sliding_window", false)?;
            // Absent: the class default 4096; null: no window at all.
            let window = match keys.0.get("sliding_window") {
                _ if !used => None,
                None => Some(4096),
                Some(_) => keys.opt_usize("sliding_window")?,
            };
            let first = keys.usize("max_window_layers", 28)?;
            let sliding: Vec<bool> = match keys.0.get("layer_types") {
                Some(Value::Array(types)) if types.len() == layers => {
                    types.iter().map(|t| t.as_str() == Some("sliding_attention")).collect()
                }
                Some(Value::Array(types)) => return Err(format!("layer_types has {} entries for num_hidden_layers {layers}", types.len())),
                _ => (0..layers).map(|l| window.is_some() && l >= first).collect(),
            };
            if !used && sliding.contains(&true) {
                return Err("layer_types names sliding_attention layers but use_sliding_window is false".into());
            }
            Ok(sliding.into_iter().map(|s| if s { window } else { None }).collect())
        }
    }
}

/// Typed reads of config.json keys, each absent or null key taking its default.
struct Keys<'a>(&'a Map<String, Value>);

impl Keys<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str, default: usize) -> std::result::Result<usize, String> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }

    fn opt_usize(&self, key: &str) -> std::result::Result<Option<usize>, String> {
        self.get(key).map(|v| v.as_u64().map(|n| n as usize).ok_or_else(|| format!("{key} is {v}, not a whole number"))).transpose()
    }

    fn f64(&self, key: &str, default: f64) -> std::result::Result<f64, String> {
        self.get(key).map_or(Ok(default), |v| v.as_f64().ok_or_else(|| format!("{key} is {v}, not a number")))
    }

    fn bool(&self, key: &str, default: bool) -> std::result::Result<bool, String> {
        self.get(key).map_or(Ok(default), |v| v.as_bool().ok_or_else(|| format!("{key} is {v}, not true or false")))
    }

    fn str<'s>(&'s self, key: &str, default: &'s str) -> std::result::Result<&'s str, String> {
        self.get(key).map_or(Ok(default), |v| v.as_str().ok_or_else(|| format!("{key} is {v}, not a string")))
    }

    fn id(&self, key: &str, default: Option<i64>) -> std::result::Result<Option<i64>, String> {
        match self.0.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| format!("{key} is {v}, not a token id")),
        }
    }

    /// One id or a list of them.
    fn ids(&self, key: &str, default: Option<i64>) -> std::result::Result<Vec<i64>, String> {
        match self.0.get(key) {
            Some(Value::Array(ids)) => ids.iter().map(|v| v.as_i64().ok_or_else(|| format!("{key} holds {v}, not a token id"))).collect(),
            _ => Ok(self.id(key, default)?.into_iter().collect()),
        }
    }
}

#[cfg(test)]
#[path = "decoder_tests.rs"]
mod tests;
