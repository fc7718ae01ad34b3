//! The model and training loop against HF transformers + PyTorch, rung by rung: logits, loss and
//! every gradient; fp16 .bin loading; 10 AdamW steps with accumulation, warmup/decay and clipping;
//! HF loading what we save; greedy generation.

mod common;

use common::decode::{assert_a_cached_prefix_continues_as_the_whole_prefill, assert_batched_decode_is_lone_decode};
use common::{fixtures, meta, pretrained, rel_err, tensor_from, train_plan, Reference};
use tch::{Device, Kind, Tensor};
use zerotune_proto::plan::{LossScaler, ModelSource, Precision, WorkerPlan};
use zerotune_worker::checkpoint::load_params;
use zerotune_worker::engine::{Engine, Prompt};
use zerotune_worker::model::Model;
use zerotune_worker::sample::{Rng, SamplingParams, TokenSampler};
use zerotune_worker::train::Trainer;

/// Tolerances, fp32 (docs/style.md: written down once).
const LOGITS_REL: f64 = 1e-5;
const GRAD_REL: f64 = 1e-4;
const TRAIN_LOSS_REL: f64 = 1e-4;
/// Against the exact norm (an f64 sum of squares of PyTorch's gradients) at every step.
const GRAD_NORM_REL: f64 = 1e-6;
const TRAIN_PARAM_REL: f64 = 1e-5;

#[test]
fn logits_loss_and_gradients_match_hf() {
    let reference = Reference::load();
    let (config, params) = load_params(&pretrained("tiny"), Kind::Float, Device::Cpu, true, 0).unwrap();
    let model = Model::new(&config, &params);
    let ids = reference.tensor("input_ids");
    let logits = model.forward(&ids, false);
    assert!(rel_err("logits", &logits, &reference.tensor("logits")) < LOGITS_REL);
    let loss = model.loss(&ids, false);
    assert!(rel_err("loss", &loss.reshape([1]), &reference.tensor("loss")) < LOGITS_REL);
    loss.backward();
    for (slot, tensor) in params.slots.iter().zip(&params.tensors) {
        let err = rel_err(&slot.name, &tensor.grad(), &reference.tensor(&format!("grad.{}", slot.name)));
        assert!(err < GRAD_REL, "gradient of {} differs: {err:.3e}", slot.name);
    }
}

#[test]
fn fp16_pytorch_model_bin_with_legacy_buffers_loads() {
    let reference = Reference::load();
    let (config, params) = load_params(&pretrained("tiny-bin"), Kind::Float, Device::Cpu, false, 0).unwrap();
    let logits = Model::new(&config, &params).forward(&reference.tensor("input_ids"), false);
    assert!(rel_err("logits from fp16 .bin", &logits, &reference.tensor("logits_fp16_weights")) < LOGITS_REL);
}

/// The device AdamW (ZeRO without offload: torch ops) follows the same PyTorch loop.
#[test]
fn device_adamw_matches_the_pytorch_loop_too() {
    let reference = Reference::load();
    let plan = WorkerPlan { offload_optimizer: false, ..train_plan() };
    let accumulation = plan.gradient_accumulation_steps as i64;
    let mut trainer = Trainer::new(plan.clone(), Device::Cpu).unwrap();
    let batches = reference.tensor("train_batches");
    for step in 0..plan.schedule.total_steps as i64 {
        let micro: Vec<Tensor> = (0..accumulation).map(|k| batches.get(step * accumulation + k)).collect();
        let outcome = trainer.train_step(&micro).unwrap();
        let want = reference.tensor("train_losses").double_value(&[step]);
        assert!(((outcome.loss - want) / want).abs() < TRAIN_LOSS_REL, "step {step} loss");
    }
    let master = Tensor::from_slice(&trainer.master());
    let (_, params) = load_params(&pretrained("tiny"), Kind::Float, Device::Cpu, false, 0).unwrap();
    for slot in &params.slots {
        let ours = master.narrow(0, slot.offset as i64, slot.numel as i64);
        let want = reference.tensor(&format!("final.{}", slot.name)).view(-1);
        let err = rel_err(&slot.name, &ours, &want);
        assert!(err < TRAIN_PARAM_REL, "final {} differs: {err:.3e}", slot.name);
    }
}

#[test]
fn ten_training_steps_match_a_pytorch_loop() {
    let reference = Reference::load();
    let plan = train_plan();
    let accumulation = plan.gradient_accumulation_steps as i64;
    let mut trainer = Trainer::new(plan.clone(), Device::Cpu).unwrap();
    let batches = reference.tensor("train_batches");
    let losses = reference.tensor("train_losses");
    let norms = reference.tensor("train_grad_norms");
    for step in 0..plan.schedule.total_steps as i64 {
        let micro: Vec<Tensor> = (0..accumulation).map(|k| batches.get(step * accumulation + k)).collect();
        let outcome = trainer.train_step(&micro).unwrap();
        let want = losses.double_value(&[step]);
        let norm = norms.double_value(&[step]);
        let norm_rel = ((outcome.grad_norm - norm) / norm).abs();
        println!("step {step}: loss {} vs {want}, norm {} vs {norm} (rel {norm_rel:.1e})", outcome.loss, outcome.grad_norm);
        assert!(((outcome.loss - want) / want).abs() < TRAIN_LOSS_REL, "step {step} loss");
        assert!(norm_rel < GRAD_NORM_REL, "step {step} grad norm: rel {norm_rel:.2e}");
        assert!(norm > plan.max_grad_norm, "the fixture must exercise clipping");
    }
    let dir = tempfile::tempdir().unwrap();
    trainer.save_model(dir.path()).unwrap();
    let (config, params) =
        load_params(&ModelSource::Pretrained { dir: dir.path().to_string_lossy().into() }, Kind::Float, Device::Cpu, false, 0).unwrap();
    for (slot, tensor) in params.slots.iter().zip(&params.tensors) {
        let want = reference.tensor(&format!("final.{}", slot.name));
        let err = rel_err(&slot.name, tensor, &want);
        assert!(err < TRAIN_PARAM_REL, "final {} differs: {err:.3e}", slot.name);
    }

    // HF from_pretrained loads what we wrote and computes our logits.
    let python = std::env::var("ZEROTUNE_PYTHON").expect("ZEROTUNE_PYTHON (the test venv's python) is set by scripts/test.sh");
    let out = dir.path().join("hf_logits.safetensors");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/hf_forward.py");
    let status = std::process::Command::new(python)
        .args([script, &dir.path().to_string_lossy(), &fixtures().join("reference.safetensors").to_string_lossy(), &out.to_string_lossy()])
        .status()
        .unwrap();
    assert!(status.success(), "HF could not load the saved model");
    let hf = tensor_from(&zerotune_hf::WeightFiles::open_file(&out).unwrap(), "logits");
    let ours = Model::new(&config, &params).forward(&reference.tensor("input_ids"), false);
    assert!(rel_err("HF logits of our checkpoint", &ours, &hf) < LOGITS_REL);
}

#[test]
fn greedy_generation_matches_hf_generate() {
    let reference = Reference::load();
    let tokenizer = zerotune_hf::tokenizer::load(&fixtures().join("tiny")).unwrap();
    let prompt = meta()["prompt"].as_str().unwrap().to_string();
    let ids: Vec<i64> = tokenizer.encode(prompt.as_str(), false).unwrap().get_ids().iter().map(|&i| i as i64).collect();
    assert_eq!(ids, Vec::<i64>::try_from(reference.tensor("prompt_ids")).unwrap(), "tokenizer ids differ from Python's");
    let (config, params) = load_params(&pretrained("tiny"), Kind::Float, Device::Cpu, false, 0).unwrap();
    let model = Model::new(&config, &params);
    // HF was run with eos_token_id 0; the engine stops at EOS without emitting it.
    let mut engine = Engine::new(&model, Device::Cpu, Some(0));
    let prompt = Prompt { ids: ids.iter().map(|&i| i as u32).collect(), max_new_tokens: 20, logprobs: None, prompt_logprobs: false };
    let (_, mut emitted) = engine.admit(&prompt, vec![((), TokenSampler::new(SamplingParams::default(), Rng::new(0, 0)))]);
    let mut new_ids = vec![];
    loop {
        let out = emitted.pop().unwrap();
        new_ids.extend(out.token.map(|t| t.id as i64));
        if out.finish.is_some() {
            break;
        }
        emitted = engine.step();
    }
    let want = Vec::<i64>::try_from(reference.tensor("greedy_new_ids")).unwrap();
    assert_eq!(new_ids, want.into_iter().take_while(|&i| i != 0).collect::<Vec<_>>());
}

/// Rows of different lengths decoding together each get the logits of their lone run: the
/// per-row positions are exact, each row attends to its own positions only (on CPU through
/// `model/attend.rs`), and a row that leaves changes nothing.
#[test]
fn batched_decode_gives_each_row_its_lone_logits() {
    let (config, params) = load_params(&pretrained("tiny"), Kind::Float, Device::Cpu, false, 0).unwrap();
    assert_batched_decode_is_lone_decode(&Model::new(&config, &params), config.context());
}

/// The same through libtorch's masked attention, which runs where `attend.rs` does not apply (on
/// a GPU, or a head dim that is not a multiple of 8, as here: 40 / 4 = 10).
#[test]
fn batched_decode_through_the_masked_attention_too() {
    let (tiny, _) = load_params(&pretrained("tiny"), Kind::Float, Device::Cpu, false, 0).unwrap();
    let zerotune_hf::ModelConfig::CodeGen(tiny) = tiny else { panic!("the tiny fixture is CodeGen") };
    let config = zerotune_hf::ModelConfig::CodeGen(zerotune_hf::CodeGenConfig { n_embd: 40, n_head: 4, rotary_dim: 4, ..tiny });
    let mut params = zerotune_worker::model::ParamSet::zeros(&config, Kind::Float, Device::Cpu, false);
    params.init_like_hf(&config, 3);
    let (mut keys, mut values) =
        (Tensor::zeros([1, 4, 8, 10], (Kind::Float, Device::Cpu)), Tensor::zeros([1, 4, 8, 10], (Kind::Float, Device::Cpu)));
    let query = Tensor::zeros([1, 4, 1, 10], (Kind::Float, Device::Cpu));
    let declined = zerotune_worker::model::attend::decode_step(&query, (&query, &query), (&mut keys, &mut values), &[1], None).is_none();
    assert!(declined, "attend.rs declines D = 10");
    assert!(keys.equal(&values) && keys.count_nonzero(None::<i64>).int64_value(&[]) == 0, "and writes nothing");
    assert_batched_decode_is_lone_decode(&Model::new(&config, &params), config.context());
}

/// A prompt prefilled after a cached prefix of it (the server's prefix cache: cut from the cache of
/// an earlier prompt that went on differently) gets the logits of one prefill over the whole
/// prompt, for every position, and its cache then decodes the same.
#[test]
fn a_prompt_continued_from_a_cached_prefix_equals_its_whole_prefill() {
    let (config, params) = load_params(&pretrained("tiny"), Kind::Float, Device::Cpu, false, 0).unwrap();
    assert_a_cached_prefix_continues_as_the_whole_prefill(&Model::new(&config, &params));
}

#[test]
fn legacy_vocab_merges_tokenizer_equals_tokenizer_json() {
    let json = zerotune_hf::tokenizer::load(&fixtures().join("tiny")).unwrap();
    let legacy = zerotune_hf::tokenizer::load(&fixtures().join("tokenizer-legacy")).unwrap();
    let text = "class Stack:\n    def push(self, x):\n        self.items.append(x)  # ünïcode\n";
    assert_eq!(json.encode(text, false).unwrap().get_ids(), legacy.encode(text, false).unwrap().get_ids());
}

#[test]
fn sharded_safetensors_and_sharded_bin_checkpoints_load() {
    let reference = Reference::load();
    for dir in ["tiny-sharded", "tiny-sharded-bin"] {
        let (config, params) = load_params(&pretrained(dir), Kind::Float, Device::Cpu, false, 0).unwrap();
        let logits = Model::new(&config, &params).forward(&reference.tensor("input_ids"), false);
        assert!(rel_err(dir, &logits, &reference.tensor("logits")) < LOGITS_REL);
    }
}

/// bf16 compute with fp32 master weights stays close to the fp32 reference losses.
const BF16_LOSS_REL: f64 = 1e-2;

#[test]
fn bf16_training_tracks_the_fp32_reference() {
    let reference = Reference::load();
    let plan = WorkerPlan { precision: Precision::Bf16, ..train_plan() };
    let accumulation = plan.gradient_accumulation_steps as i64;
    let mut trainer = Trainer::new(plan, Device::Cpu).unwrap();
    let batches = reference.tensor("train_batches");
    for step in 0..4 {
        let micro: Vec<Tensor> = (0..accumulation).map(|k| batches.get(step * accumulation + k)).collect();
        let outcome = trainer.train_step(&micro).unwrap();
        let want = reference.tensor("train_losses").double_value(&[step]);
        println!("bf16 step {step}: {} vs fp32 {want}", outcome.loss);
        assert!(((outcome.loss - want) / want).abs() < BF16_LOSS_REL);
    }
}

#[test]
fn fp16_overflow_skips_the_step_and_lowers_the_scale() {
    let reference = Reference::load();
    // 2^40 makes every fp16 gradient overflow; hysteresis 2 spends one overflow before halving.
    let scaler = LossScaler { initial_scale_power: 40, window: 1000, hysteresis: 2, min_scale: 1.0, abort_at_min_scale: true };
    let plan = WorkerPlan { precision: Precision::Fp16, loss_scaler: scaler, ..train_plan() };
    let mut trainer = Trainer::new(plan, Device::Cpu).unwrap();
    let batch = vec![reference.tensor("train_batches").get(0)];
    let before = trainer.master();
    let first = trainer.train_step(&batch).unwrap();
    assert!(first.skipped && first.loss_scale == 2f64.powi(40), "{first:?}");
    let second = trainer.train_step(&batch).unwrap();
    assert!(second.skipped && second.loss_scale == 2f64.powi(39), "{second:?}");
    assert_eq!(trainer.master(), before, "skipped steps leave the weights alone");
    let mut scale = second.loss_scale;
    for _ in 0..40 {
        let o = trainer.train_step(&batch).unwrap();
        if !o.skipped {
            assert_eq!(o.loss_scale, scale, "a clean step keeps the scale inside the window");
            // Skipped steps do not advance the schedule: the first applied step is warmup step 0.
            assert_eq!(o.learning_rate, 0.0);
            let next = trainer.train_step(&batch).unwrap();
            assert!(!next.skipped && next.learning_rate > 0.0, "{next:?}");
            assert_ne!(trainer.master(), before, "an applied step with lr > 0 moves the weights");
            return;
        }
        assert_eq!(o.loss_scale, scale / 2.0);
        scale = o.loss_scale;
    }
    panic!("the scale never came down to a usable value");
}

/// `steps` optimizer steps of `plan` on the fixture's batches; the fp32 master weights after.
fn train(plan: WorkerPlan, steps: i64) -> Tensor {
    let batches = Reference::load().tensor("train_batches");
    let accumulation = plan.gradient_accumulation_steps as i64;
    let mut trainer = Trainer::new(plan, Device::Cpu).unwrap();
    for step in 0..steps {
        let micro: Vec<Tensor> = (0..accumulation).map(|k| batches.get(step * accumulation + k)).collect();
        let outcome = trainer.train_step(&micro).unwrap();
        assert!(!outcome.skipped, "step {step} overflowed: {outcome:?}");
    }
    Tensor::from_slice(&trainer.master())
}

/// The offloaded step in tiles of 1000 elements (a hundred per step, cutting through tensors and
/// decay runs, each tile's transfers queued around its neighbours' updates) ends bit for bit where
/// one tile per step does, in every precision.
#[test]
fn the_offloaded_step_in_tiles_equals_one_tile() {
    for precision in [Precision::Fp32, Precision::Bf16, Precision::Fp16] {
        let run = |offload_tile| train(WorkerPlan { precision, offload_tile, ..train_plan() }, 3);
        let (tiled, whole) = (run(1000), run(zerotune_proto::plan::DEFAULT_OFFLOAD_TILE));
        assert!(tiled.numel() > 50_000, "many tiles");
        assert!(tiled.equal(&whole), "{precision:?}: tiles changed the result");
    }
}

/// With 16-bit parameters the offloaded step gets 16-bit gradients (fp16 ones scaled into range),
/// where the device optimizer reads the fp32 accumulators. After two steps (Adam's first is
/// sign-like, so the second shows the rounding) the weight updates agree within two unit
/// roundoffs of the transfer format, in the 2-norm: fp16 keeps its 11 bits, below what bf16 allows.
/// (The largest single difference is no measure: an element whose gradient is noise can flip.)
#[test]
fn sixteen_bit_gradient_transfer_keeps_the_updates() {
    let initial = train(train_plan(), 0);
    for (precision, unit_roundoff) in [(Precision::Bf16, 2f64.powi(-9)), (Precision::Fp16, 2f64.powi(-12))] {
        let run = |offload_optimizer| train(WorkerPlan { precision, offload_optimizer, ..train_plan() }, 2) - &initial;
        let (host, device) = (run(true), run(false));
        let err = (&host - &device).norm().double_value(&[]) / device.norm().double_value(&[]);
        println!("{precision:?} update, 16-bit vs fp32 gradients: 2-norm rel {err:.3e}");
        assert!(err < 2.0 * unit_roundoff, "{precision:?}: {err:.3e}");
    }
}
