//! How the decoder family's config.json keys are read: typed reads with each absent or null key
//! taking its default, and the keys whose meaning differs by family (biases, rope, windows,
//! dropout), resolved as transformers 5 resolves them.

use serde_json::{Map, Value};

use super::{Dropout, Family, RopeScaling};

/// The dropout keys each class reads.
pub(super) fn dropout(family: Family, keys: &Keys) -> std::result::Result<Dropout, String> {
    let attention = keys.f64("attention_dropout", 0.0)?;
    let dropout = match family {
        Family::Starcoder2 => {
            Dropout { embedding: keys.f64("embedding_dropout", 0.0)?, residual: keys.f64("residual_dropout", 0.0)?, attention }
        }
        Family::Llama | Family::Qwen2 => Dropout { attention, ..Dropout::default() },
    };
    for (key, p) in [("embedding_dropout", dropout.embedding), ("residual_dropout", dropout.residual), ("attention_dropout", attention)] {
        if !(0.0..1.0).contains(&p) {
            return Err(format!("{key} {p} must be at least 0 and below 1"));
        }
    }
    Ok(dropout)
}

/// q/k/v, o and MLP bias: Llama's `attention_bias` (all four projections) and `mlp_bias`; Qwen2's
/// fixed q/k/v bias; StarCoder2's `use_bias` on every matrix.
pub(super) fn biases(family: Family, keys: &Keys) -> std::result::Result<(bool, bool, bool), String> {
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
pub(super) fn rope(raw: &Map<String, Value>, max_positions: usize) -> std::result::Result<(f64, RopeScaling), String> {
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
    Ok((theta, scaling(kind, key, params, max_positions)?))
}

/// The scaling of rope type `kind`, its fields read from `params` (the dict at `key`), with HF's
/// defaults (`original_max_position_embeddings`: the model's context).
fn scaling(kind: &str, key: &str, params: &Map<String, Value>, max_positions: usize) -> std::result::Result<RopeScaling, String> {
    let field = |name: &str| match params.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| format!("{key}.{name} is {v}, not a number")),
    };
    let original = field("original_max_position_embeddings")?.map_or(max_positions, |n| n as usize);
    let factor = |required: bool| match field("factor")? {
        Some(factor) if factor.is_finite() && factor >= 1.0 => Ok(factor),
        None if !required => Ok(max_positions as f64 / original as f64),
        other => Err(format!("{key}.factor {other:?}: a {kind} rope scaling needs a factor of at least 1")),
    };
    Ok(match kind {
        "default" | "dynamic" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor(true)? },
        "llama3" => {
            let (low, high) = (field("low_freq_factor")?.unwrap_or(1.0), field("high_freq_factor")?.unwrap_or(4.0));
            if !(low > 0.0 && high > low) {
                return Err(format!("{key}: llama3 rope needs 0 < low_freq_factor ({low}) < high_freq_factor ({high})"));
            }
            RopeScaling::Llama3 {
                factor: factor(true)?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original,
            }
        }
        "yarn" => {
            let factor = factor(false)?;
            // HF's get_mscale: 0.1 · mscale · ln(factor) + 1 (1 at factor 1).
            let mscale = |m: f64| if factor <= 1.0 { 1.0 } else { 0.1 * m * factor.ln() + 1.0 };
            let attention_factor = match (field("attention_factor")?, field("mscale")?, field("mscale_all_dim")?) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(m) / mscale(all),
                _ => mscale(1.0),
            };
            let truncate = match params.get("truncate") {
                None | Some(Value::Null) => true,
                Some(v) => v.as_bool().ok_or_else(|| format!("{key}.truncate is {v}, not true or false"))?,
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                attention_factor,
                beta_fast: field("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0),
                beta_slow: field("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0),
                truncate,
            }
        }
        other => return Err(format!("{key}: rope type {other:?} is not supported (default, dynamic, linear, llama3 and yarn are)")),
    })
}

/// Each layer's window. Qwen2: layers marked `sliding_attention` in `layer_types` (by default
/// those from `max_window_layers` on), and only with `use_sliding_window`; StarCoder2: every
/// layer when `sliding_window` is set; Llama: none.
pub(super) fn windows(family: Family, keys: &Keys, layers: usize) -> std::result::Result<Vec<Option<usize>>, String> {
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
pub(super) struct Keys<'a>(pub(super) &'a Map<String, Value>);

impl Keys<'_> {
    pub(super) fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    pub(super) fn usize(&self, key: &str, default: usize) -> std::result::Result<usize, String> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }

    pub(super) fn opt_usize(&self, key: &str) -> std::result::Result<Option<usize>, String> {
        self.get(key).map(|v| v.as_u64().map(|n| n as usize).ok_or_else(|| format!("{key} is {v}, not a whole number"))).transpose()
    }

    pub(super) fn f64(&self, key: &str, default: f64) -> std::result::Result<f64, String> {
        self.get(key).map_or(Ok(default), |v| v.as_f64().ok_or_else(|| format!("{key} is {v}, not a number")))
    }

    pub(super) fn bool(&self, key: &str, default: bool) -> std::result::Result<bool, String> {
        self.get(key).map_or(Ok(default), |v| v.as_bool().ok_or_else(|| format!("{key} is {v}, not true or false")))
    }

    pub(super) fn str<'s>(&'s self, key: &str, default: &'s str) -> std::result::Result<&'s str, String> {
        self.get(key).map_or(Ok(default), |v| v.as_str().ok_or_else(|| format!("{key} is {v}, not a string")))
    }

    pub(super) fn id(&self, key: &str, default: Option<i64>) -> std::result::Result<Option<i64>, String> {
        match self.0.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| format!("{key} is {v}, not a token id")),
        }
    }

    /// One id or a list of them.
    pub(super) fn ids(&self, key: &str, default: Option<i64>) -> std::result::Result<Vec<i64>, String> {
        match self.0.get(key) {
            Some(Value::Array(ids)) => ids.iter().map(|v| v.as_i64().ok_or_else(|| format!("{key} holds {v}, not a token id"))).collect(),
            _ => Ok(self.id(key, default)?.into_iter().collect()),
        }
    }
}
