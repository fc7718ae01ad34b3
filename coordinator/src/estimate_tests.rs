//! The planner's terms, one by one, and its model states against DeepSpeed's published formula.

use super::*;
use crate::advice::{advise, with, Advice, Change, LADDER};

const GIB: u64 = 1 << 30;

/// codegen-350M-multi (hf config.rs checks the count).
fn shape_350m() -> Shape {
    Shape { params: 356_712_448, n_layer: 20, n_embd: 1024, vocab: 51200, saved_per_block: 17 * 1024 }
}

fn job(world: u64, offload: bool, checkpointing: bool) -> MemoryJob {
    MemoryJob {
        shape: shape_350m(),
        world,
        ranks_per_host: world,
        micro: 2,
        block: 128,
        precision: Precision::Bf16,
        zero_stage: 2,
        offload,
        reduce_bucket: 500_000_000,
        offload_tile: 1 << 23,
        checkpointing,
        checkpoints: false,
        gpu: true,
    }
}

fn bytes(terms: &[Term], name: &str) -> u64 {
    terms.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no term {name}")).bytes
}

#[test]
fn every_term_of_a_350m_zero2_offload_gpu() {
    let j = job(4, true, false);
    let part = 356_712_448u64.div_ceil(4).div_ceil(128) * 128;
    assert_eq!(j.partition(), part);
    let t = terms(&j);
    assert_eq!(bytes(&t, "parameters"), 4 * part * 2);
    assert_eq!(bytes(&t, "gradients"), 356_712_448 * 2);
    assert_eq!(bytes(&t, "gradient partition"), part * 4);
    // 5e8 / 4 exceeds the partition: one bucket block per rank of the whole partition.
    assert_eq!(bytes(&t, "reduce-scatter buckets"), part * 5 * 4);
    assert_eq!(bytes(&t, "optimizer state"), part * 12);
    // Two tiles the new 16-bit weights go up through, not a copy of the partition.
    assert_eq!(bytes(&t, "pinned buffers"), 2 * (1 << 23) * 2);
    assert_eq!(bytes(&t, "transfer tiles"), 2 * (1 << 23) * 6);
    assert_eq!(bytes(&t, "activations"), 20 * 17 * 2 * 128 * 1024 * 2);
    assert_eq!(bytes(&t, "logits"), 2 * 128 * 51200 * 14);
    assert_eq!(bytes(&t, "buffers"), GIB);
    assert!(t.iter().all(|t| t.name != "gradient accumulator"));
    let host: Vec<&str> = t.iter().filter(|t| t.place == Place::Host).map(|t| t.name).collect();
    assert_eq!(host, ["optimizer state", "pinned buffers", "saving"]);
    // The step's transfer tiles are held when the activations are not, and so is the buffer
    // through which the fp32 model is gathered for saving (here the largest of the three).
    let always: u64 = t.iter().filter(|t| t.place == Place::Device && t.phase == Phase::Always).map(|t| t.bytes).sum();
    assert_eq!(bytes(&t, "save gather buffer"), part.min(1 << 26) * 4 * 4);
    assert!(bytes(&t, "save gather buffer") > bytes(&t, "activations") + bytes(&t, "logits"));
    assert_eq!(peak(&t, Some(Place::Device)), always + bytes(&t, "save gather buffer"));
    let one = terms(&job(1, true, false));
    let always: u64 = one.iter().filter(|t| t.place == Place::Device && t.phase == Phase::Always).map(|t| t.bytes).sum();
    assert_eq!(peak(&one, Some(Place::Device)), always + bytes(&one, "activations") + bytes(&one, "logits"));
    // Rank 0 gathers the fp32 model (4 B per parameter), staging each rank's part of a chunk to
    // the host, and writes a tensor at a time (the largest: the 51200 x 1024 embedding).
    let saving = 356_712_448 * 4 + part.min(1 << 26) * 4 + 51200 * 1024 * 4;
    assert_eq!(bytes(&t, "saving"), saving);
    assert_eq!(
        totals(&j, &t),
        Totals { per_device: peak(&t, Some(Place::Device)), per_host: 4 * (part * 12 + 2 * (1 << 23) * 2) + saving }
    );
    // Without offload the master is copied to the host before it is written.
    let single = terms(&MemoryJob { offload: false, ..job(1, false, false) });
    assert_eq!(bytes(&single, "saving"), 356_712_448 * 4 + (1 << 26) * 4 + 51200 * 1024 * 4);
}

#[test]
fn checkpointing_keeps_one_input_per_block_and_one_block() {
    let (plain, ckpt) = (terms(&job(1, true, false)), terms(&job(1, true, true)));
    let btc2 = 2 * 128 * 1024 * 2;
    assert_eq!(bytes(&plain, "activations"), 20 * 17 * btc2);
    assert_eq!(bytes(&ckpt, "activations"), (20 + 17 + 4) * btc2);
    assert_eq!(bytes(&plain, "logits"), bytes(&ckpt, "logits"));
}

#[test]
fn stages_world_one_and_fp32_choose_their_buffers() {
    let one = terms(&job(1, true, false));
    assert_eq!(bytes(&one, "gradient accumulator"), job(1, true, false).partition() * 4);
    assert!(one.iter().all(|t| t.name != "gradient partition"));
    let stage1 = terms(&MemoryJob { zero_stage: 1, ..job(2, false, false) });
    let part = job(2, false, false).partition();
    assert_eq!(bytes(&stage1, "gradient accumulator"), 2 * part * 4);
    assert_eq!(bytes(&stage1, "gradient partition"), part * 4);
    assert_eq!(bytes(&stage1, "optimizer state"), part * 12);
    assert_eq!(bytes(&stage1, "optimizer step temporaries"), part * 16);
    let stage0 = terms(&MemoryJob { zero_stage: 0, ..job(2, false, false) });
    assert_eq!(bytes(&stage0, "optimizer state"), 356_712_448 * 12);
    // Small buckets: reduce_bucket / world elements per rank's block.
    let small = terms(&MemoryJob { reduce_bucket: 1000, ..job(4, true, false) });
    assert_eq!(bytes(&small, "reduce-scatter buckets"), 250 * 5 * 4);
    // fp32 offload on a GPU: two pinned fp32 tiles; on CPU ranks none for fp32 (the master goes
    // up as it is) and two unpinned ones for 16-bit.
    let fp32 = MemoryJob { precision: Precision::Fp32, ..job(1, true, false) };
    assert_eq!(bytes(&terms(&fp32), "pinned buffers"), 2 * (1 << 23) * 4);
    assert_eq!(bytes(&terms(&MemoryJob { gpu: false, ..job(1, true, false) }), "upload tiles"), 2 * (1 << 23) * 2);
    // Pinned tiles take a power of two bytes each: 1000 x 2 B -> 2048 B.
    assert_eq!(bytes(&terms(&MemoryJob { offload_tile: 1000, ..job(1, true, false) }), "pinned buffers"), 2 * 2048);
    assert_eq!(bytes(&terms(&fp32), "parameters"), fp32.partition() * 4);
    assert_eq!(bytes(&terms(&fp32), "logits"), 2 * 128 * 51200 * 12);
    assert!(terms(&fp32).iter().all(|t| t.name != "transfer tiles"));
    let cpu = terms(&MemoryJob { gpu: false, ..fp32 });
    assert!(cpu.iter().all(|t| !["pinned buffers", "upload tiles", "transfer tiles"].contains(&t.name)));
    assert_eq!(bytes(&cpu, "buffers"), 200 << 20);
}

#[test]
fn a_cpu_rank_counts_device_and_host_terms_in_one_ram() {
    let j = MemoryJob { gpu: false, precision: Precision::Fp32, ..job(1, true, false) };
    let t = terms(&j);
    let total = totals(&j, &t);
    // One RAM: the phases of both places add up. Saving writes the offloaded master where it is,
    // a tensor at a time: less than the forward/backward pass holds.
    let always: u64 = t.iter().filter(|t| t.phase == Phase::Always).map(|t| t.bytes).sum();
    assert_eq!(bytes(&t, "saving"), 51200 * 1024 * 4);
    let backward = bytes(&t, "activations") + bytes(&t, "logits");
    assert!(bytes(&t, "saving") < backward);
    assert_eq!(total.per_device, always + backward);
    assert_eq!(total.per_host, total.per_device);
    // Three CPU ranks on one machine share its RAM: each fits in 12 GiB, the three not in 16.
    let three = MemoryJob { world: 3, ranks_per_host: 3, ..j };
    let t3 = totals(&three, &terms(&three));
    assert!(t3.per_device < 12 * GIB && t3.per_host > 16 * GIB, "{t3:?}");
    let err = verdict(&three, Capacity { device: Some(12 * GIB), host: Some(16 * GIB) }).unwrap_err().to_string();
    assert!(err.contains("per host"), "{err}");
    // Checkpoints write the optimizer slice a state at a time (4 B per parameter), more than the
    // model's largest tensor; without offload from host copies of all three (12 + 4).
    let t = terms(&MemoryJob { checkpoints: true, ..j });
    assert_eq!(bytes(&t, "saving"), j.partition() * 4);
    let t = terms(&MemoryJob { checkpoints: true, offload: false, ..j });
    assert_eq!(bytes(&t, "saving"), j.partition() * 16);
}

/// Padding-free parameter counts, so that DeepSpeed's count (which has no padding) is ours.
const EVEN: u64 = 128 * 24 * 1000;

#[test]
fn model_states_equal_deepspeed_s_zero2_formula() {
    for gpus_per_node in [1, 2, 4, 8] {
        for nodes in [1, 3] {
            let world = gpus_per_node * nodes;
            let base = MemoryJob {
                shape: Shape { params: EVEN, ..shape_350m() },
                world,
                ranks_per_host: gpus_per_node,
                ..job(world, false, false)
            };
            // Without offload DeepSpeed counts 2 + 2 bytes per parameter (16-bit weights and
            // gradients) and 16 per owned one (fp32 master, m, v and the gradient partition).
            let t = terms(&base);
            let ours = ["parameters", "gradients", "optimizer state"].iter().map(|n| bytes(&t, n)).sum::<u64>()
                + if world > 1 { bytes(&t, "gradient partition") } else { bytes(&t, "gradient accumulator") };
            let (_, ds_gpu) = deepspeed_zero2(EVEN, gpus_per_node, nodes, false);
            assert_eq!(ours, ds_gpu, "no offload, {gpus_per_node} x {nodes}");
            // With offload: the 16-bit weights on the GPU; on the host, with 1.5 of slack, the
            // node's fp32 master, m, v and fp32 gradients (ours stay on the GPU: the partition),
            // as long as DeepSpeed's max(4 x GPUs, 16) is 16.
            let offload = MemoryJob { offload: true, ..base };
            let t = terms(&offload);
            let (ds_cpu, ds_gpu) = deepspeed_zero2(EVEN, gpus_per_node, nodes, true);
            assert_eq!(bytes(&t, "parameters"), ds_gpu, "offload, {gpus_per_node} x {nodes}");
            if nodes == 1 && world <= 4 {
                let grads = if world > 1 { bytes(&t, "gradient partition") } else { bytes(&t, "gradient accumulator") };
                let node = (bytes(&t, "optimizer state") + grads) * gpus_per_node;
                assert_eq!(node * 3 / 2, ds_cpu, "offload host, {gpus_per_node} GPUs");
            }
        }
    }
}

#[test]
fn deepspeed_formula_as_published() {
    // DeepSpeed's docs: 3B parameters on 8 GPUs, one node, offload: 2 x 3e9 on each GPU.
    let p = 2_851_598_336;
    assert_eq!(deepspeed_zero2(p, 8, 1, true), ((p as f64 * 32.0 * 1.5) as u64, 2 * p));
    assert_eq!(deepspeed_zero2(p, 8, 1, false), ((p as f64 * 32.0 * 1.5) as u64, 4 * p + 2 * p));
}

#[test]
fn a_job_too_large_is_refused_naming_its_largest_term_and_a_fix() {
    let j = MemoryJob { micro: 8, block: 2048, ..job(1, false, false) };
    let err = verdict(&j, Capacity { device: Some(GIB), host: None }).unwrap_err().to_string();
    assert!(err.contains("the largest term is logits (10.94 GiB: 8x2048x51200 x 14 B)"), "{err}");
    assert!(err.contains("available"), "{err}");
    // 350M on a 24 GiB card with block 2048, micro 8: offload alone is not enough, checkpointing
    // is, and then offload is not needed.
    let on_24 = Capacity { device: Some(24 * GIB), host: None };
    assert!(!fits(&MemoryJob { offload: true, ..j }, on_24) && fits(&MemoryJob { checkpointing: true, ..j }, on_24));
    let refusal = verdict(&j, on_24).unwrap_err();
    assert_eq!(refusal.advice.changes, [Change::Checkpointing]);
    assert!(refusal.to_string().contains("it would fit with: --gradient_checkpointing on the same 1 GPU: "), "{refusal}");
    // Too much for one GPU whatever the settings: more GPUs.
    let huge = MemoryJob { shape: shape_16b(), ..job(1, true, true) };
    let refusal = verdict(&huge, Capacity { device: Some(80 * GIB), host: None }).unwrap_err();
    assert!(matches!(refusal.advice.changes.last(), Some(Change::World(n)) if *n > 1), "{refusal}");
    assert!(refusal.to_string().contains(" GPUs (--num_gpus / --num_nodes) on "), "{refusal}");
    // Its 16-bit weights alone exceed 24 GiB: ZeRO-2 keeps them whole on every GPU.
    let err = verdict(&huge, Capacity { device: Some(24 * GIB), host: None }).unwrap_err().to_string();
    assert!(err.contains("it does not fit even with --per_device_train_batch_size 1") && err.contains("and 4096 times the GPUs"), "{err}");
    assert!(verdict(&job(1, true, true), Capacity { device: Some(24 * GIB), host: Some(64 * GIB) }).is_ok());
    assert!(verdict(&job(1, true, true), Capacity { device: None, host: None }).is_ok());
    // The host's share is checked too.
    let err = verdict(&job(8, true, false), Capacity { device: Some(80 * GIB), host: Some(GIB) }).unwrap_err().to_string();
    assert!(err.contains("per host") && err.contains("optimizer state"), "{err}");
}

/// A shape hf config.rs has built in (`--config_name`).
fn builtin(name: &str) -> Shape {
    Shape::of(&zerotune_hf::ModelConfig::builtin(name).unwrap())
}

fn shape_16b() -> Shape {
    builtin("codegen-16B")
}

/// A job as planned from flags without a ds_config: stage 0, nothing offloaded or recomputed.
fn plain(shape: Shape, world: u64, ranks_per_host: u64, micro: u64, block: u64) -> MemoryJob {
    MemoryJob { shape, world, ranks_per_host, micro, block, zero_stage: 0, ..job(world, false, false) }
}

fn per_gpu(bytes: u64) -> Capacity {
    Capacity { device: Some(bytes), host: None }
}

/// What a suggestion must be: it fits when re-estimated, and none of its changes can go.
fn assert_checked(job: &MemoryJob, capacity: Capacity) -> Advice {
    let advice = advise(job, capacity);
    assert!(advice.fits, "{advice}");
    assert!(fits(&with(job, &advice.changes), capacity), "{advice}");
    for i in 0..advice.changes.len() {
        let mut fewer = advice.changes.clone();
        fewer.remove(i);
        assert!(!fits(&with(job, &fewer), capacity), "{:?} is not needed: {advice}", advice.changes[i]);
    }
    let changed = with(job, &advice.changes);
    let need = gib(totals(&changed, &terms(&changed)).per_device);
    assert!(advice.to_string().contains(&format!(": {need} of {} per GPU", gib(capacity.device.unwrap()))), "{advice}");
    advice
}

#[test]
fn offload_is_advised_first_when_it_alone_suffices() {
    let j = plain(shape_350m(), 1, 1, 1, 128);
    let offloaded = MemoryJob { offload: true, ..j };
    let capacity = per_gpu(totals(&offloaded, &terms(&offloaded)).per_device);
    assert!(!fits(&j, capacity));
    let advice = assert_checked(&j, capacity);
    assert_eq!(advice.changes, [Change::Offload]);
    assert!(advice.to_string().starts_with("it would fit with: offload the optimizer (zero_optimization.offload_optimizer"), "{advice}");
}

#[test]
fn zero_2_is_advised_next_when_offload_is_not_enough() {
    // 2B on 8 GPUs of a node: whole fp32 gradients at stage 0 even with offload.
    let j = plain(builtin("codegen-2B"), 8, 8, 1, 2048);
    let both = MemoryJob { offload: true, zero_stage: 2, ..j };
    let capacity = per_gpu(totals(&both, &terms(&both)).per_device);
    assert!(!fits(&MemoryJob { offload: true, ..j }, capacity));
    let advice = assert_checked(&j, capacity);
    assert_eq!(advice.changes, [Change::Offload, Change::Zero2], "{advice}");
    assert!(advice.to_string().contains("ZeRO stage 2 (zero_optimization.stage 2 in --deepspeed)"), "{advice}");
}

#[test]
fn a_16b_on_2_nodes_of_8_80gb_gpus_fits_with_zero_2_offload_and_checkpointing() {
    // As `--num_nodes 2 --num_gpus 8 --block_size 2048 --per_device_train_batch_size 1` plans it,
    // against 80 GB (--gpu_memory 80GB) and an A100-80GB's 81920 MiB (--gpu_model a100-80gb).
    let j = plain(shape_16b(), 16, 8, 1, 2048);
    for capacity in [per_gpu(80_000_000_000), per_gpu(81920 << 20)] {
        let refusal = verdict(&j, capacity).unwrap_err();
        let advice = assert_checked(&j, capacity);
        assert_eq!(refusal.advice, advice);
        assert_eq!(advice.changes, [Change::Offload, Change::Zero2, Change::Checkpointing], "{advice}");
        assert!(advice.to_string().contains("--gradient_checkpointing on the same 16 GPUs: "), "{advice}");
    }
}

#[test]
fn every_suggestion_fits_when_re_estimated() {
    let shapes = [shape_350m(), shape_16b()];
    let mut seen = std::collections::BTreeSet::new();
    for (shape, world, micro, block, cap) in grid(&shapes) {
        let j = plain(shape, world, world.min(8), micro, block);
        let capacity = per_gpu(cap * GIB);
        if fits(&j, capacity) {
            continue;
        }
        let advice = advise(&j, capacity);
        if !advice.fits {
            assert!(advice.to_string().starts_with("it does not fit even with"), "{advice}");
            continue;
        }
        assert_checked(&j, capacity);
        // Cheapest first: the settings in the ladder's order, more GPUs last.
        let rank = |c: &Change| LADDER.iter().position(|l| l == c).unwrap_or(LADDER.len());
        assert!(advice.changes.windows(2).all(|w| rank(&w[0]) < rank(&w[1])), "{advice}");
        seen.extend(advice.changes.iter().map(rank));
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), [0, 1, 2, 3, 4], "the grid has suggestions of every change and of more GPUs");
}

/// Every (shape, world, micro, block, GiB per GPU) of the grid.
fn grid(shapes: &[Shape]) -> Vec<(Shape, u64, u64, u64, u64)> {
    let mut out = vec![];
    for &shape in shapes {
        for world in [1, 2, 8, 16] {
            for (micro, block) in [(1, 2048), (4, 1024), (8, 2048)] {
                for cap in [16, 24, 40, 80] {
                    out.push((shape, world, micro, block, cap));
                }
            }
        }
    }
    out
}

#[test]
fn the_table_has_every_term_and_the_verdicts() {
    let j = job(2, true, true);
    let table = table(&j, Capacity { device: Some(24 * GIB), host: None });
    for t in terms(&j) {
        assert!(table.contains(t.name), "{table}");
    }
    assert!(table.contains("total per GPU") && table.contains("fits in 24.00 GiB") && table.contains("not checked"), "{table}");
    assert_eq!(gib(3 << 29), "1.50 GiB");
}
