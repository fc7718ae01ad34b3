//! The key names of a DeepSpeed config, per section: those zerotune reads (`FIELDS`), those it
//! accepts without effect (`ACCEPTED`), and the "did you mean" for any other.

/// DeepSpeed keys that have no effect in zerotune (its behaviour is fixed, or the feature is
/// another tool's), per section. Anything not here and not in `FIELDS` is a mistake.
const ACCEPTED: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "steps_per_print",
            "wall_clock_breakdown",
            "memory_breakdown",
            "dump_state",
            "zero_allow_untested_optimizer",
            "zero_force_ds_cpu_optimizer",
            "prescale_gradients",
            "gradient_predivide_factor",
            "communication_data_type",
            "sparse_gradients",
            "flops_profiler",
            "tensorboard",
            "wandb",
            "csv_monitor",
            "comms_logger",
            "checkpoint",
            "data_types",
            "aio",
        ],
    ),
    ("optimizer.params", &["torch_adam", "amsgrad", "bias_correction", "fp32_optimizer_states"]),
    (
        "activation_checkpointing",
        &[
            "partition_activations",
            "cpu_checkpointing",
            "contiguous_memory_optimization",
            "number_checkpoints",
            "synchronize_checkpoint_boundary",
            "profile",
        ],
    ),
    ("scheduler.params", &["last_batch_iteration", "warmup_min_ratio", "cos_min_ratio", "warmup_max_lr_ratio"]),
    ("fp16", &["auto_cast", "consecutive_hysteresis"]),
    ("bf16", &["immediate_grad_update"]),
    (
        "zero_optimization",
        &[
            "allgather_partitions",
            "allgather_bucket_size",
            "overlap_comm",
            "reduce_scatter",
            "contiguous_gradients",
            "round_robin_gradients",
            "elastic_checkpoint",
            "load_from_fp32_weights",
            "ignore_unused_parameters",
            "sub_group_size",
            "offload_param",
        ],
    ),
    (
        "zero_optimization.offload_optimizer",
        &["pin_memory", "nvme_path", "buffer_count", "fast_init", "ratio", "pipeline_read", "pipeline_write"],
    ),
];

/// The keys of `section` (dotted, "" for the top level) that are accepted without effect.
pub(super) fn accepted(section: &str) -> &'static [&'static str] {
    ACCEPTED.iter().find(|(name, _)| *name == section).map_or(&[], |(_, keys)| keys)
}

/// `unknown key zero_optimisation (did you mean zero_optimization?)`.
pub(super) fn describe_unknown(dotted: &str) -> String {
    let (section, key) = dotted.rsplit_once('.').unwrap_or(("", dotted));
    let mut known = accepted(section).to_vec();
    known.extend(FIELDS.iter().filter(|(name, _)| *name == section).flat_map(|(_, keys)| keys.iter().copied()));
    match known.into_iter().filter(|k| edit_distance(k, key) <= 2).min_by_key(|k| edit_distance(k, key)) {
        Some(close) => format!("unknown key {dotted} (did you mean {close}?)"),
        None => format!("unknown key {dotted}"),
    }
}

/// The typed keys per section, for suggestions.
const FIELDS: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "train_batch_size",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "gradient_clipping",
            "optimizer",
            "scheduler",
            "fp16",
            "bf16",
            "zero_optimization",
            "activation_checkpointing",
        ],
    ),
    ("optimizer", &["type", "params"]),
    ("optimizer.params", &["lr", "betas", "eps", "weight_decay", "adam_w_mode"]),
    ("scheduler", &["type", "params"]),
    ("scheduler.params", &["warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "total_num_steps"]),
    ("fp16", &["enabled", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale"]),
    ("bf16", &["enabled"]),
    ("zero_optimization", &["stage", "offload_optimizer", "reduce_bucket_size"]),
    ("zero_optimization.offload_optimizer", &["device"]),
];

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("zero_optimisation", "zero_optimization"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
