//! Gradient checkpointing (`--gradient_checkpointing`): recomputing each block in the backward
//! pass gives every parameter the gradient of the ordinary pass, and training with it gives the
//! same losses step by step (fp32, the tiny fixture; also with dropout on, whose masks replay).

mod common;

use common::{fixtures, rel_err, train_plan, Reference};
use tch::{Device, Kind, Tensor};
use zerotune_proto::plan::{ModelSource, WorkerPlan};
use zerotune_worker::checkpoint::load_params;
use zerotune_worker::model::Model;
use zerotune_worker::train::Trainer;

/// fp32, relative: the recomputation runs the same kernels on the same values.
const GRAD_REL: f64 = 1e-6;
const LOSS_REL: f64 = 1e-6;

fn tiny() -> ModelSource {
    ModelSource::Pretrained { dir: fixtures().join("tiny").to_string_lossy().into_owned() }
}

/// The tiny fixture's config with every dropout at `p`, trained from HF's initialisation.
fn tiny_with_dropout(p: f64) -> ModelSource {
    let text = std::fs::read_to_string(fixtures().join("tiny/config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in ["attn_pdrop", "embd_pdrop", "resid_pdrop"] {
        config[key] = p.into();
    }
    ModelSource::Scratch { config }
}

/// Every parameter's gradient of one micro-batch (scaled by 0.5, as accumulation does), with and
/// without checkpointing, from the same generator state.
fn gradients(source: &ModelSource, ids: &Tensor, checkpointing: bool) -> (f64, Vec<(String, Tensor)>) {
    let (config, params) = load_params(source, Kind::Float, Device::Cpu, true, 0).unwrap();
    let model = Model::new(&config, &params);
    tch::manual_seed(7);
    let loss = model.loss_backward(ids, true, 0.5, checkpointing).unwrap().double_value(&[]);
    let after = Tensor::randint(1 << 30, [4], (Kind::Int64, Device::Cpu));
    let mut grads: Vec<(String, Tensor)> =
        params.slots.iter().zip(&params.tensors).map(|(s, t)| (s.name.clone(), t.grad().copy())).collect();
    // The generator continues where the ordinary pass leaves it.
    grads.push(("(generator after the pass)".into(), after.to_kind(Kind::Float)));
    (loss, grads)
}

#[test]
fn every_gradient_equals_the_pass_without_checkpointing() {
    let ids = Reference::load().tensor("input_ids");
    for (label, source) in [("no dropout", tiny()), ("dropout 0.1", tiny_with_dropout(0.1))] {
        let (plain_loss, plain) = gradients(&source, &ids, false);
        let (ckpt_loss, ckpt) = gradients(&source, &ids, true);
        assert_eq!(plain.len(), ckpt.len());
        assert!(((ckpt_loss - plain_loss) / plain_loss).abs() < LOSS_REL, "{label}: loss {ckpt_loss} vs {plain_loss}");
        for ((name, want), (_, ours)) in plain.iter().zip(&ckpt) {
            assert!(want.abs().max().double_value(&[]) > 0.0, "{label}: {name} got no gradient");
            let err = rel_err(&format!("{label}: {name}"), ours, want);
            assert!(err < GRAD_REL, "{label}: gradient of {name} differs: {err:.3e}");
        }
    }
}

fn plan(model: ModelSource, gradient_checkpointing: bool) -> WorkerPlan {
    WorkerPlan { model, zero_stage: 2, gradient_checkpointing, ..train_plan() }
}

/// Losses and gradient norms of 10 optimizer steps on the fixture's batches.
fn ten_steps(plan: WorkerPlan) -> Vec<(f64, f64)> {
    let batches = Reference::load().tensor("train_batches");
    let accumulation = plan.gradient_accumulation_steps as i64;
    let mut trainer = Trainer::new(plan, Device::Cpu).unwrap();
    (0..10)
        .map(|step| {
            let micro: Vec<Tensor> = (0..accumulation).map(|k| batches.get((step * accumulation + k) % batches.size()[0])).collect();
            let outcome = trainer.train_step(&micro).unwrap();
            (outcome.loss, outcome.grad_norm)
        })
        .collect()
}

#[test]
fn ten_training_steps_give_the_same_losses() {
    for (label, source) in [("no dropout", tiny()), ("dropout 0.1", tiny_with_dropout(0.1))] {
        let plain = ten_steps(plan(source.clone(), false));
        let ckpt = ten_steps(plan(source, true));
        for (step, ((loss, norm), (want_loss, want_norm))) in ckpt.iter().zip(&plain).enumerate() {
            println!("{label} step {step}: loss {loss} vs {want_loss}, grad norm {norm} vs {want_norm}");
            assert!(((loss - want_loss) / want_loss).abs() < LOSS_REL, "{label} step {step}: loss {loss} vs {want_loss}");
            assert!(((norm - want_norm) / want_norm).abs() < GRAD_REL, "{label} step {step}: grad norm {norm} vs {want_norm}");
        }
    }
}
