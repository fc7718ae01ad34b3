//! The decoder config against HF transformers: each tiny model of the family that
//! tests/fixtures/decoders.py saved is read back, and what we resolve (parameters in order with
//! their shapes, KV heads, head_dim, rope, windows, tied head, eps) equals what HF resolved from
//! the same config.json, and the weight file holds exactly those parameters.

use serde_json::Value;
use zerotune_hf::decoder::RopeScaling;
use zerotune_hf::{DecoderConfig, ModelConfig, WeightFiles};

fn variants() -> Vec<(String, std::path::PathBuf)> {
    let dir = zerotune_tests::fixtures().join("decoders");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.json").exists())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), p))
        .collect();
    out.sort();
    assert_eq!(out.len(), 7, "llama, llama-llama3, llama-mqa-tied, llama-v4-rope, llama-yarn, qwen2, starcoder2 in {}", dir.display());
    out
}

/// The config.json in `dir`, read as any model's is.
fn decoder(dir: &std::path::Path) -> DecoderConfig {
    match ModelConfig::from_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        ModelConfig::Decoder(config) => config,
        other => panic!("{}: a {} config", dir.display(), other.model_type()),
    }
}

#[test]
fn every_variant_resolves_as_hf_resolved_it() {
    for (name, dir) in variants() {
        let config = decoder(&dir);
        let hf: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let theirs: Vec<(String, Vec<usize>)> = serde_json::from_value(hf["parameters"].clone()).unwrap();
        assert_eq!(config.parameter_shapes(), theirs, "{name}: parameters in named_parameters order");
        assert_eq!(config.num_parameters() as u64, hf["num_parameters"].as_u64().unwrap(), "{name}");
        assert_eq!(config.family.model_type(), hf["model_type"], "{name}");
        assert_eq!(config.num_key_value_heads as u64, hf["num_key_value_heads"].as_u64().unwrap(), "{name}");
        assert_eq!(config.head_dim as u64, hf["head_dim"].as_u64().unwrap(), "{name}");
        assert_eq!(config.rope_theta, hf["rope_theta"].as_f64().unwrap(), "{name}");
        let rope = &hf["rope_parameters"];
        let (number, whole) = (|key: &str| rope[key].as_f64().unwrap(), |key: &str| rope[key].as_u64().unwrap() as usize);
        let scaling = match hf["rope_type"].as_str().unwrap() {
            "linear" => RopeScaling::Linear { factor: hf["rope_factor"].as_f64().unwrap() },
            "default" => RopeScaling::None,
            "llama3" => RopeScaling::Llama3 {
                factor: number("factor"),
                low_freq_factor: number("low_freq_factor"),
                high_freq_factor: number("high_freq_factor"),
                original_max_position_embeddings: whole("original_max_position_embeddings"),
            },
            "yarn" => RopeScaling::Yarn {
                factor: number("factor"),
                original_max_position_embeddings: whole("original_max_position_embeddings"),
                attention_factor: hf["rope_attention_scaling"].as_f64().unwrap(),
                beta_fast: 32.0,
                beta_slow: 1.0,
                truncate: true,
            },
            other => panic!("{name}: a fixture with rope type {other}"),
        };
        match (config.rope_scaling, scaling) {
            // HF's attention factor is a Python float from the same formula; allow its last bits.
            (RopeScaling::Yarn { attention_factor: ours, .. }, RopeScaling::Yarn { attention_factor: theirs, .. }) => {
                assert!((ours - theirs).abs() < 1e-12, "{name}: attention factor {ours} vs HF {theirs}");
                let strip = |s: RopeScaling| match s {
                    RopeScaling::Yarn { attention_factor: _, factor, original_max_position_embeddings, beta_fast, beta_slow, truncate } => {
                        (factor, original_max_position_embeddings, beta_fast, beta_slow, truncate)
                    }
                    _ => unreachable!(),
                };
                assert_eq!(strip(config.rope_scaling), strip(scaling), "{name}");
            }
            (ours, theirs) => assert_eq!(ours, theirs, "{name}"),
        }
        let windows: Vec<Option<usize>> = serde_json::from_value(hf["windows"].clone()).unwrap();
        assert_eq!(config.windows, windows, "{name}");
        assert_eq!(Value::from(config.tie_word_embeddings), hf["tie_word_embeddings"], "{name}");
        assert_eq!(config.norm_eps, hf["norm_eps"].as_f64().unwrap(), "{name}");
    }
}

#[test]
fn the_weight_files_hold_exactly_the_resolved_parameters() {
    for (name, dir) in variants().into_iter().filter(|(_, dir)| dir.join("model.safetensors").exists()) {
        let config = decoder(&dir);
        let files = WeightFiles::open(&dir).unwrap();
        let mut stored: Vec<&str> = files.names().collect();
        let mut ours: Vec<String> = config.parameter_shapes().into_iter().map(|(n, _)| n).collect();
        stored.sort_unstable();
        ours.sort_unstable();
        assert_eq!(stored, ours, "{name}: a tied head is saved as the embedding alone");
    }
}
