//! The decoder config's rules: each family's defaults, both rope spellings, windows, refusals,
//! and the presets' parameter counts against the published models'.

use serde_json::json;

use super::*;

fn parse(value: Value) -> DecoderConfig {
    DecoderConfig::from_value(value).unwrap()
}

fn refusal(value: Value) -> String {
    DecoderConfig::from_value(value).unwrap_err()
}

#[test]
fn presets_have_the_published_parameter_counts() {
    // Counted by HF transformers on the meta device; the published figures.
    for (name, params) in [
        ("deepseek-coder-1.3b", 1_346_471_936),
        ("codellama-7b", 6_738_546_688),
        ("qwen2.5-coder-0.5b", 494_032_768),
        ("qwen2.5-coder-1.5b", 1_543_714_304),
        ("qwen2.5-coder-7b", 7_615_616_512),
        ("starcoder2-3b", 3_030_371_328),
        ("deepseek-coder-6.7b", 6_740_512_768),
        ("starcoder2-7b", 7_173_923_840),
        ("starcoder2-15b", 15_957_889_024),
    ] {
        assert_eq!(DecoderConfig::builtin(name).unwrap().num_parameters(), params, "{name}");
    }
    assert!(DecoderConfig::builtin_names().contains(&"tiny-llama") && DecoderConfig::builtin("codegen-350M-mono").is_none());
}

#[test]
fn the_kv_cache_holds_key_value_heads_only() {
    let qwen = DecoderConfig::builtin("qwen2.5-coder-1.5b").unwrap();
    assert_eq!((qwen.num_key_value_heads, qwen.head_dim, qwen.group()), (2, 128, 6));
    // 6x smaller than with one cached head per query head.
    assert_eq!(qwen.kv_values_per_token() * 6, 2 * 28 * 12 * 128);
}

#[test]
fn absent_keys_take_each_familys_class_default() {
    let llama = parse(json!({"model_type": "llama", "num_attention_heads": 8, "hidden_size": 256}));
    assert_eq!((llama.num_key_value_heads, llama.head_dim, llama.tie_word_embeddings), (8, 32, false));
    assert_eq!(
        (llama.qkv_bias, llama.o_bias, llama.mlp_bias, llama.bos_token_id, llama.eos_token_ids.clone()),
        (false, false, false, Some(1), vec![2])
    );
    // Qwen2's KV heads default to 32 whatever the query heads are; q/k/v always have a bias.
    let qwen = parse(json!({"model_type": "qwen2", "num_attention_heads": 32}));
    assert_eq!((qwen.num_key_value_heads, qwen.qkv_bias, qwen.o_bias, qwen.bos_token_id), (32, true, false, None));
    let null_kv = parse(json!({"model_type": "qwen2", "num_attention_heads": 8, "num_key_value_heads": null}));
    assert_eq!(null_kv.num_key_value_heads, 8, "null: as many as the query heads");
    assert_eq!(qwen.windows, vec![None; 32], "no use_sliding_window: no window");
    // StarCoder2: 2 KV heads, tied, LayerNorms with bias, a GELU MLP, biases on by default.
    let star = parse(json!({"model_type": "starcoder2", "use_bias": false}));
    assert_eq!((star.num_key_value_heads, star.tie_word_embeddings, star.norm_eps), (2, true, 1e-5));
    assert!(star.layer_norm() && !star.gated_mlp() && !star.qkv_bias && !star.mlp_bias);
    let shapes = star.parameter_shapes();
    assert!(shapes.iter().any(|(n, _)| n == "model.norm.bias"), "LayerNorm bias even with use_bias false");
    assert!(!shapes.iter().any(|(n, _)| n.starts_with("lm_head")), "tied: no lm_head of its own");
}

#[test]
fn both_rope_spellings_read_the_same_and_others_are_refused() {
    let v5 = json!({"model_type": "llama", "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0}});
    let v4 = json!({"model_type": "llama", "rope_theta": 100000, "rope_scaling": {"type": "linear", "factor": 4.0}});
    let (a, b) = (parse(v5), parse(v4));
    assert_eq!((a.rope_theta, a.rope_scaling), (100000.0, RopeScaling::Linear { factor: 4.0 }));
    assert_eq!((b.rope_theta, b.rope_scaling), (a.rope_theta, a.rope_scaling));
    // A null rope_scaling leaves rope_parameters in charge, whose theta wins over the top level.
    let both = parse(json!({"model_type": "qwen2", "rope_theta": 5.0, "rope_scaling": null, "rope_parameters": {"rope_theta": 1e6}}));
    assert_eq!((both.rope_theta, both.rope_scaling), (1e6, RopeScaling::None));
    assert_eq!(parse(json!({"model_type": "llama"})).rope_theta, 10000.0);
    let dynamic = parse(json!({"model_type": "llama", "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}));
    assert_eq!(dynamic.rope_scaling, RopeScaling::None, "dynamic equals default within the context");
    assert!(refusal(json!({"model_type": "llama", "rope_scaling": {"rope_type": "longrope", "factor": 4.0}}))
        .contains("\"longrope\" is not supported"));
    assert!(refusal(json!({"model_type": "llama", "rope_scaling": {"type": "linear"}})).contains("factor"));
    assert!(refusal(json!({"model_type": "llama", "partial_rotary_factor": 0.5})).contains("partial_rotary_factor 0.5"));
    let inside = json!({"model_type": "llama", "rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}});
    assert!(refusal(inside).contains("partial_rotary_factor 0.5"), "also inside rope_parameters");
    let null_type = parse(json!({"model_type": "llama", "rope_scaling": {"rope_type": null, "type": "linear", "factor": 2.0}}));
    assert_eq!(null_type.rope_scaling, RopeScaling::Linear { factor: 2.0 }, "a null rope_type falls back to type");
}

#[test]
fn windows_follow_qwen2s_layer_types_and_starcoder2s_sliding_window() {
    let qwen =
        json!({"model_type": "qwen2", "num_hidden_layers": 4, "use_sliding_window": true, "sliding_window": 8, "max_window_layers": 2});
    assert_eq!(parse(qwen).windows, [None, None, Some(8), Some(8)]);
    let types = json!({"model_type": "qwen2", "num_hidden_layers": 2, "use_sliding_window": true, "sliding_window": 8,
                       "layer_types": ["sliding_attention", "full_attention"]});
    assert_eq!(parse(types).windows, [Some(8), None]);
    let unused = json!({"model_type": "qwen2", "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]});
    assert!(refusal(unused).contains("use_sliding_window is false"));
    assert_eq!(parse(json!({"model_type": "starcoder2", "num_hidden_layers": 3, "sliding_window": 4096})).windows, [Some(4096); 3]);
    assert_eq!(parse(json!({"model_type": "llama", "sliding_window": 4})).windows, vec![None; 32], "Llama has no window");
    // A null window is none, where an absent one is the class default.
    let null =
        json!({"model_type": "qwen2", "num_hidden_layers": 2, "use_sliding_window": true, "sliding_window": null, "max_window_layers": 1});
    assert_eq!(parse(null).windows, [None, None]);
    let absent = json!({"model_type": "qwen2", "num_hidden_layers": 2, "use_sliding_window": true, "max_window_layers": 1});
    assert_eq!(parse(absent).windows, [None, Some(4096)]);
}

#[test]
fn bad_shapes_and_kinds_are_refused_naming_the_key() {
    assert!(refusal(json!({"model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 3}))
        .contains("not a multiple of num_key_value_heads 3"));
    assert!(refusal(json!({"model_type": "llama", "hidden_size": 60, "num_attention_heads": 8, "head_dim": 16})).contains("hidden_size 60"));
    // Qwen2 does not check hidden / heads when head_dim is given.
    assert_eq!(
        parse(json!({"model_type": "qwen2", "hidden_size": 60, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16}))
            .head_dim,
        16
    );
    assert!(refusal(json!({"model_type": "llama", "hidden_act": "gelu"})).contains("hidden_act \"gelu\""));
    assert!(refusal(json!({"model_type": "llama", "vocab_size": "big"})).contains("vocab_size is \"big\""));
    assert!(refusal(json!({"model_type": "gpt2"})).contains("model_type \"gpt2\""));
    assert!(refusal(json!([1, 2])).contains("not a JSON object"));
}

#[test]
fn eos_may_be_one_id_or_several() {
    assert_eq!(parse(json!({"model_type": "qwen2", "eos_token_id": [151645, 151643]})).eos_token_ids, [151645, 151643]);
    assert_eq!(parse(json!({"model_type": "qwen2", "eos_token_id": 7, "pad_token_id": 3})).pad_token_id, Some(3));
    assert!(parse(json!({"model_type": "llama", "eos_token_id": null})).eos_token_ids.is_empty());
}

#[test]
fn llama3_and_yarn_take_hfs_defaults_and_round_trip() {
    let max = json!({"model_type": "llama", "max_position_embeddings": 4096});
    let with = |rope: Value| {
        let mut config = max.clone();
        config["rope_parameters"] = rope;
        parse(config)
    };
    let llama3 = with(json!({"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0}));
    let want = RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 4096 };
    assert_eq!(llama3.rope_scaling, want, "the original context defaults to the model's");
    // YaRN without a factor: the context over the original; the attention factor 0.1 ln f + 1.
    let yarn = with(json!({"rope_type": "yarn", "original_max_position_embeddings": 1024, "truncate": false}));
    let RopeScaling::Yarn { factor, attention_factor, truncate, .. } = yarn.rope_scaling else { panic!("{:?}", yarn.rope_scaling) };
    assert_eq!((factor, truncate), (4.0, false));
    assert!((attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15);
    let mscales = with(json!({"rope_type": "yarn", "factor": 4.0, "mscale": 2.0, "mscale_all_dim": 1.0}));
    let RopeScaling::Yarn { attention_factor, .. } = mscales.rope_scaling else { unreachable!() };
    assert!((attention_factor - (0.2 * 4f64.ln() + 1.0) / (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15);
    for config in [llama3, yarn] {
        let back = parse(config.to_hf_json("float32"));
        assert_eq!((back.rope_theta, back.rope_scaling), (config.rope_theta, config.rope_scaling), "written and read back");
    }
    assert!(refusal(json!({"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0}}))
        .contains("low_freq_factor"));
}
