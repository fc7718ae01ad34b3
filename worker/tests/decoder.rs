//! The Llama decoder family's forward pass against HF transformers (rung 2 of the ladder for
//! llama, qwen2 and starcoder2): every tiny model tests/fixtures/decoders.py saved (grouped and
//! multi-query heads, tied and untied, biases, head_dim unlike hidden/heads, rope θ 1e5 with
//! linear scaling and 1e6, sliding windows shorter than the input) gives HF's eager logits, loss
//! and gradients (a tied head's summed into the embedding's).

mod common;

use common::{fixtures, rel_err, tensor_from};
use tch::{Device, Kind};
use zerotune_hf::{DecoderConfig, WeightFiles};
use zerotune_worker::checkpoint::load_weights;
use zerotune_worker::model::decoder::Decoder;
use zerotune_worker::model::params::{layout_of, ParamSet};

const LOGITS_REL: f64 = 1e-5;
const GRAD_REL: f64 = 1e-4;

/// The fixture variant `name`: its config and its weights (tracking gradients when `trainable`).
fn load(name: &str, trainable: bool) -> (DecoderConfig, ParamSet) {
    let dir = fixtures().join("decoders").join(name);
    let config = DecoderConfig::from_file(&dir.join("config.json")).unwrap();
    let mut params = ParamSet::zeros_laid_out(layout_of(config.parameter_shapes()), Kind::Float, Device::Cpu, trainable, 0);
    load_weights(&mut params, &dir).unwrap();
    (config, params)
}

fn reference() -> WeightFiles {
    WeightFiles::open_file(&fixtures().join("decoders").join("reference.safetensors")).unwrap()
}

#[test]
fn logits_match_hf_for_every_variant() {
    let reference = reference();
    let ids = tensor_from(&reference, "input_ids");
    for name in ["llama", "llama-mqa-tied", "qwen2", "starcoder2"] {
        let (config, params) = load(name, false);
        let logits = tch::no_grad(|| Decoder::new(&config, &params).forward(&ids, false));
        let err = rel_err(name, &logits, &tensor_from(&reference, &format!("{name}.logits")));
        assert!(err < LOGITS_REL, "{name}: logits differ from HF's by {err:.3e}");
    }
}

#[test]
fn loss_and_every_gradient_match_hf_for_every_variant() {
    let reference = reference();
    let ids = tensor_from(&reference, "input_ids");
    for name in ["llama", "llama-mqa-tied", "qwen2", "starcoder2"] {
        let (config, params) = load(name, true);
        let loss = Decoder::new(&config, &params).loss(&ids, false);
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

/// The window is real in the fixtures: the same weights without it give other logits.
#[test]
fn the_window_changes_the_logits_it_should() {
    let reference = reference();
    let ids = tensor_from(&reference, "input_ids");
    let (windowed, params) = load("starcoder2", false);
    let full = DecoderConfig { windows: vec![None; windowed.num_hidden_layers], ..windowed };
    let hf = tensor_from(&reference, "starcoder2.logits");
    let without = tch::no_grad(|| Decoder::new(&full, &params).forward(&ids, false));
    assert!(rel_err("no window", &without, &hf) > 1e-3, "a window of 5 over 16 tokens must matter");
}
