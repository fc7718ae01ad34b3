//! The Llama decoder family (llama, qwen2, starcoder2) against HF transformers, rung by rung as
//! CodeGen's numerics.rs: every tiny model tests/fixtures/decoders.py saved (grouped and
//! multi-query heads, tied and untied, biases, head_dim unlike hidden/heads, rope θ 1e5 with
//! linear scaling and 1e6, Llama 3.1's rope and YaRN, sliding windows shorter than the input) gives
//! HF's eager logits, loss
//! and gradients (a tied head's summed into the embedding's); checkpointing changes no gradient;
//! greedy decoding equals HF `generate`; batched and prefix-cached decoding equal lone decoding;
//! and 10 AdamW steps equal the PyTorch loop, with HF loading what we save.

mod common;

use common::decode::{assert_a_cached_prefix_continues_as_the_whole_prefill, assert_batched_decode_is_lone_decode};
use common::{fixtures, pretrained, rel_err, tensor_from, train_plan};
use tch::{Device, Kind, Tensor};
use zerotune_hf::{ModelConfig, WeightFiles};
use zerotune_proto::plan::{ModelSource, Precision, WorkerPlan};
use zerotune_worker::checkpoint::load_params;
use zerotune_worker::model::{BatchCache, KvCache, Model, ParamSet};
use zerotune_worker::train::Trainer;

const LOGITS_REL: f64 = 1e-5;
const GRAD_REL: f64 = 1e-4;
const TRAIN_LOSS_REL: f64 = 1e-4;
const GRAD_NORM_REL: f64 = 1e-6;
const TRAIN_PARAM_REL: f64 = 1e-5;
/// bf16 keeps 8 bits: its losses track the fp32 run's to about a percent.
const BF16_LOSS_REL: f64 = 1e-2;

const VARIANTS: [&str; 6] = ["llama", "llama-llama3", "llama-yarn", "llama-mqa-tied", "qwen2", "starcoder2"];
/// The variants decoders.py trained for 10 steps (from `<name>-train/`, at HF's init range).
const TRAINED: [&str; 3] = ["llama", "qwen2", "starcoder2"];

/// The fixture variant `name`, loaded as any model is (tracking gradients when `trainable`).
fn load(name: &str, trainable: bool) -> (ModelConfig, ParamSet) {
    load_params(&pretrained(&format!("decoders/{name}")), Kind::Float, Device::Cpu, trainable, 0).unwrap()
}

fn reference() -> WeightFiles {
    WeightFiles::open_file(&fixtures().join("decoders").join("reference.safetensors")).unwrap()
}

#[test]
fn logits_match_hf_for_every_variant() {
    let reference = reference();
    let ids = tensor_from(&reference, "input_ids");
    for name in VARIANTS {
        let (config, params) = load(name, false);
        let logits = tch::no_grad(|| Model::new(&config, &params).forward(&ids, false));
        let err = rel_err(name, &logits, &tensor_from(&reference, &format!("{name}.logits")));
        assert!(err < LOGITS_REL, "{name}: logits differ from HF's by {err:.3e}");
    }
}

#[test]
fn loss_and_every_gradient_match_hf_for_every_variant() {
    let reference = reference();
    let ids = tensor_from(&reference, "input_ids");
    for name in VARIANTS {
        let (config, params) = load(name, true);
        let loss = Model::new(&config, &params).loss(&ids, false);
        let err = rel_err(name, &loss.reshape([1]), &tensor_from(&reference, &format!("{name}.loss")));
        assert!(err < LOGITS_REL, "{name}: loss differs from HF's by {err:.3e}");
        loss.backward();
        for (slot, tensor) in params.slots.iter().zip(&params.tensors) {
            let hf = tensor_from(&reference, &format!("{name}.grad.{}", slot.name));
            let err = rel_err(&slot.name, &tensor.grad(), &hf);
            assert!(err < GRAD_REL, "{name}: the gradient of {} differs from HF's by {err:.3e}", slot.name);
        }
    }
}

/// A model as the hubs ship it, bf16 shards behind `model.safetensors.index.json`, loads into
/// fp32 and gives HF's logits of the same rounded weights.
#[test]
fn sharded_bf16_safetensors_load_as_the_hub_ships_them() {
    let reference = reference();
    let dir = fixtures().join("decoders/qwen2-sharded-bf16");
    assert!(dir.join("model.safetensors.index.json").is_file(), "the fixture is sharded");
    let (config, params) = load_params(&pretrained("decoders/qwen2-sharded-bf16"), Kind::Float, Device::Cpu, false, 0).unwrap();
    let logits = tch::no_grad(|| Model::new(&config, &params).forward(&tensor_from(&reference, "input_ids"), false));
    let err = rel_err("bf16 shards", &logits, &tensor_from(&reference, "qwen2.logits_bf16_weights"));
    assert!(err < LOGITS_REL, "logits of the bf16 shards differ from HF's by {err:.3e}");
}

/// The window is real in the fixtures: the same weights without it give other logits.
#[test]
fn the_window_changes_the_logits_it_should() {
    let reference = reference();
    let ids = tensor_from(&reference, "input_ids");
    let (windowed, params) = load("starcoder2", false);
    let ModelConfig::Decoder(config) = windowed else { panic!("starcoder2 is a decoder") };
    let full = ModelConfig::Decoder(zerotune_hf::DecoderConfig { windows: vec![None; config.num_hidden_layers], ..config });
    let hf = tensor_from(&reference, "starcoder2.logits");
    let without = tch::no_grad(|| Model::new(&full, &params).forward(&ids, false));
    assert!(rel_err("no window", &without, &hf) > 1e-3, "a window of 5 over 16 tokens must matter");
}

/// StarCoder2 with every dropout at 0.1, from its fixture's config (HF's init).
fn starcoder2_with_dropout() -> ModelSource {
    let text = std::fs::read_to_string(fixtures().join("decoders/starcoder2/config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in ["attention_dropout", "embedding_dropout", "residual_dropout"] {
        config[key] = 0.1.into();
    }
    ModelSource::Scratch { config }
}

/// Gradient checkpointing recomputes each block with the masks its first pass drew: the same loss
/// and gradients as the ordinary pass, with and without dropout.
#[test]
fn checkpointing_gives_the_gradients_of_the_ordinary_pass() {
    let ids = tensor_from(&reference(), "input_ids");
    let sources = [("qwen2", pretrained("decoders/qwen2")), ("starcoder2 + dropout", starcoder2_with_dropout())];
    for (label, source) in sources {
        let run = |checkpointing: bool| {
            let (config, params) = load_params(&source, Kind::Float, Device::Cpu, true, 0).unwrap();
            tch::manual_seed(7);
            let loss = Model::new(&config, &params).loss_backward(&ids, true, 0.5, checkpointing).unwrap().double_value(&[]);
            let grads: Vec<Tensor> = params.tensors.iter().map(|t| t.grad().copy()).collect();
            (loss, grads, params.slots)
        };
        let ((plain_loss, plain, slots), (ckpt_loss, ckpt, _)) = (run(false), run(true));
        assert!(((ckpt_loss - plain_loss) / plain_loss).abs() < 1e-6, "{label}: loss {ckpt_loss} vs {plain_loss}");
        for ((slot, want), ours) in slots.iter().zip(&plain).zip(&ckpt) {
            assert!(want.abs().max().double_value(&[]) > 0.0, "{label}: {} got no gradient", slot.name);
            let err = rel_err(&slot.name, ours, want);
            assert!(err < 1e-6, "{label}: the gradient of {} differs by {err:.3e}", slot.name);
        }
    }
}

/// Prefill, then one token at a time through the batch decode path: HF generate's greedy ids
/// after a prompt longer than the windows.
#[test]
fn greedy_decoding_matches_hf_generate() {
    let reference = reference();
    let _guard = tch::no_grad_guard();
    for name in VARIANTS {
        let (config, params) = load(name, false);
        let model = Model::new(&config, &params);
        let prompt = tensor_from(&reference, &format!("{name}.prompt_ids")).to_kind(Kind::Int64);
        let want = Vec::<i64>::try_from(tensor_from(&reference, &format!("{name}.greedy_new_ids")).to_kind(Kind::Int64)).unwrap();
        let mut cache = KvCache::default();
        let mut next = model.prefill(&prompt.view([1, -1]), &mut cache, false).view(-1).argmax(0, false).int64_value(&[]);
        let mut batch = BatchCache::new(config.context() as i64);
        batch.push(&cache);
        let mut got = vec![next];
        while got.len() < want.len() {
            next = model.decode(&Tensor::from_slice(&[next]).view([1, 1]), &mut batch).get(0).argmax(0, false).int64_value(&[]);
            got.push(next);
        }
        assert_eq!(got, want, "{name}: greedy ids");
    }
}

#[test]
fn batched_and_prefix_cached_decoding_equal_lone_decoding() {
    for name in VARIANTS {
        let (config, params) = load(name, false);
        let model = Model::new(&config, &params);
        assert_batched_decode_is_lone_decode(&model, config.context());
        assert_a_cached_prefix_continues_as_the_whole_prefill(&model);
    }
}

/// The same through libtorch's masked attention over repeated heads, where `attend.rs` does not
/// apply (on a GPU, or a head_dim that is not a multiple of 8, as here: 10), windows included.
#[test]
fn batched_decoding_through_the_masked_attention_too() {
    for name in ["qwen2", "starcoder2"] {
        let text = std::fs::read_to_string(fixtures().join("decoders").join(name).join("config.json")).unwrap();
        let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
        config["head_dim"] = 10.into();
        let source = ModelSource::Scratch { config };
        let (config, params) = load_params(&source, Kind::Float, Device::Cpu, false, 3).unwrap();
        assert_batched_decode_is_lone_decode(&Model::new(&config, &params), config.context());
    }
}

#[test]
fn ten_training_steps_match_a_pytorch_loop_and_hf_loads_the_result() {
    let reference = reference();
    let batches = tensor_from(&reference, "train_batches").to_kind(Kind::Int64);
    for name in TRAINED {
        let plan = WorkerPlan { model: pretrained(&format!("decoders/{name}-train")), ..train_plan() };
        let accumulation = plan.gradient_accumulation_steps as i64;
        let mut trainer = Trainer::new(plan.clone(), Device::Cpu).unwrap();
        let (losses, norms) =
            (tensor_from(&reference, &format!("{name}.train_losses")), tensor_from(&reference, &format!("{name}.train_grad_norms")));
        for step in 0..plan.schedule.total_steps as i64 {
            let micro: Vec<Tensor> = (0..accumulation).map(|k| batches.get(step * accumulation + k)).collect();
            let outcome = trainer.train_step(&micro).unwrap();
            let (want, norm) = (losses.double_value(&[step]), norms.double_value(&[step]));
            let norm_rel = ((outcome.grad_norm - norm) / norm).abs();
            assert!(((outcome.loss - want) / want).abs() < TRAIN_LOSS_REL, "{name} step {step}: loss {} vs {want}", outcome.loss);
            assert!(norm_rel < GRAD_NORM_REL, "{name} step {step}: grad norm {} vs {norm} (rel {norm_rel:.2e})", outcome.grad_norm);
            assert!(norm > plan.max_grad_norm, "{name}: the fixture must exercise clipping");
        }
        let dir = tempfile::tempdir().unwrap();
        trainer.save_model(dir.path()).unwrap();
        let (config, params) =
            load_params(&ModelSource::Pretrained { dir: dir.path().to_string_lossy().into() }, Kind::Float, Device::Cpu, false, 0).unwrap();
        for (slot, tensor) in params.slots.iter().zip(&params.tensors) {
            let err = rel_err(&slot.name, tensor, &tensor_from(&reference, &format!("{name}.final.{}", slot.name)));
            assert!(err < TRAIN_PARAM_REL, "{name}: final {} differs: {err:.3e}", slot.name);
        }
        // HF's AutoModelForCausalLM loads what we wrote (a tied head from the embedding alone) and
        // computes our logits.
        let out = dir.path().join("hf_logits.safetensors");
        let python = std::env::var("ZEROTUNE_PYTHON").expect("ZEROTUNE_PYTHON (the test venv's python) is set by scripts/test.sh");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/hf_forward.py");
        let inputs = fixtures().join("decoders/reference.safetensors");
        let status = std::process::Command::new(python)
            .args([script, &dir.path().to_string_lossy(), &inputs.to_string_lossy(), &out.to_string_lossy()])
            .status()
            .unwrap();
        assert!(status.success(), "{name}: HF could not load the saved model");
        let hf = tensor_from(&WeightFiles::open_file(&out).unwrap(), "logits");
        let ours = tch::no_grad(|| Model::new(&config, &params).forward(&tensor_from(&reference, "input_ids"), false));
        assert!(rel_err(&format!("{name}: HF logits of our save"), &ours, &hf) < LOGITS_REL);
    }
}

/// bf16 weights and activations (RMSNorm in f32, cast back before the weight, as HF does), fp32
/// master: the first steps' losses track the fp32 PyTorch run's.
#[test]
fn bf16_training_tracks_the_fp32_reference() {
    let reference = reference();
    let batches = tensor_from(&reference, "train_batches").to_kind(Kind::Int64);
    for name in ["llama", "starcoder2"] {
        let plan = WorkerPlan { model: pretrained(&format!("decoders/{name}-train")), precision: Precision::Bf16, ..train_plan() };
        let accumulation = plan.gradient_accumulation_steps as i64;
        let mut trainer = Trainer::new(plan, Device::Cpu).unwrap();
        for step in 0..4 {
            let micro: Vec<Tensor> = (0..accumulation).map(|k| batches.get(step * accumulation + k)).collect();
            let loss = trainer.train_step(&micro).unwrap().loss;
            let want = tensor_from(&reference, &format!("{name}.train_losses")).double_value(&[step]);
            assert!(((loss - want) / want).abs() < BF16_LOSS_REL, "{name} bf16 step {step}: {loss} vs fp32 {want}");
        }
    }
}
