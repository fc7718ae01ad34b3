//! The plan's rules: flags and ds_config values into `TrainPlan`, placement, and what is refused.

use super::*;
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: TrainArgs,
}

fn parse(extra: &[&str]) -> TrainArgs {
    let mut argv = vec![
        "x",
        "--config_name",
        "tiny",
        "--train_tokenizer",
        "400",
        "--train_file",
        "d.jsonl",
        "--output_dir",
        "o",
        "--do_train",
        "--device",
        "cpu",
        "--worker_bin",
        "/bin/true",
    ];
    argv.extend_from_slice(extra);
    Cli::parse_from(argv).args
}

fn ds(json: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ds.json");
    std::fs::write(&path, json).unwrap();
    let path = path.to_string_lossy().into_owned();
    (dir, path)
}

#[test]
fn fewer_hosts_keep_the_global_batch_with_more_accumulation() {
    let dir = tempfile::tempdir().unwrap();
    let hostfile = dir.path().join("hostfile");
    std::fs::write(&hostfile, "a slots=2\nb slots=1\nc slots=1\n").unwrap();
    let hostfile = hostfile.to_string_lossy().into_owned();
    let args = ["--hostfile", &hostfile, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3"];
    let plan = TrainPlan::resolve(&parse(&args)).unwrap();
    assert_eq!((plan.world_size(), plan.global_batch()), (4, 24));
    let lost = |hosts: &[&str]| hosts.iter().map(|h| h.to_string()).collect::<BTreeSet<String>>();

    let fewer = plan.without_hosts(&lost(&["a"])).unwrap();
    assert_eq!((fewer.world_size(), fewer.batch.accumulation, fewer.batch.micro), (2, 6, 2));
    let ranks: Vec<(usize, &str, usize)> = fewer.launch.placements.iter().map(|p| (p.rank, p.host.as_str(), p.slot)).collect();
    assert_eq!(ranks, [(0, "b", 0), (1, "c", 0)], "renumbered in order, slots kept");
    assert_eq!(plan.without_hosts(&lost(&["b"])).unwrap().batch.accumulation, 4);
    let one = plan.without_hosts(&lost(&["a", "c"])).unwrap();
    assert_eq!((one.world_size(), one.batch.accumulation, one.launch.placements[0].host.as_str()), (1, 12, "b"));

    let err = plan.without_hosts(&lost(&["a", "b", "c"])).unwrap_err();
    assert!(matches!(&err, CoordinatorError::NoRankLeft { lost } if lost == "a, b, c"), "{err:?}");
    let err = err.to_string();
    assert!(err.contains("no rank is left") && err.contains("a, b, c"), "{err}");
    let args = ["--hostfile", &hostfile, "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1"];
    let err = TrainPlan::resolve(&parse(&args)).unwrap().without_hosts(&lost(&["b"])).unwrap_err();
    assert!(matches!(err, CoordinatorError::BatchDoesNotFit { world: 3, global: 4, .. }), "{err:?}");
    let err = err.to_string();
    assert!(
        err.contains("without b, 3 rank(s) are left and cannot keep the global batch of 4 (micro 1 x accumulation 1 x world 4)"),
        "{err}"
    );
}

#[test]
fn auto_values_take_the_flags() {
    let (_d, path) = ds(r#"{"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}"#);
    let plan =
        TrainPlan::resolve(&parse(&["--deepspeed", &path, "--per_device_train_batch_size", "2", "--learning_rate", "1e-3"])).unwrap();
    assert_eq!((plan.batch.micro, plan.training.optimizer.lr), (2, 1e-3));
    assert_eq!(
        plan.zero,
        ZeroSettings { stage: 2, offload_optimizer: true, reduce_bucket_size: zerotune_proto::plan::DEFAULT_REDUCE_BUCKET }
    );
}

#[test]
fn mismatches_name_every_factor() {
    let (_d, path) = ds(r#"{"train_micro_batch_size_per_gpu": 4, "train_batch_size": 96, "gradient_accumulation_steps": 8}"#);
    let err =
        TrainPlan::resolve(&parse(&["--deepspeed", &path, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "8"]))
            .unwrap_err()
            .to_string();
    assert!(err.contains("train_batch_size=96 vs hf world 1 x micro 4 x accumulation 8=32"), "{err}");
    assert!(!err.contains("train_micro_batch_size_per_gpu="), "{err}");
}

#[test]
fn loss_scaler_values_are_whole_and_in_range() {
    let scaler = |fp16: &str| {
        let (_d, path) = ds(&format!(r#"{{"fp16": {{"enabled": "auto", {fp16}}}}}"#));
        let mut args = parse(&["--deepspeed", &path, "--fp16"]);
        args.launch.device = DeviceSpec::Cuda(None);
        TrainPlan::resolve(&args).map(|plan| plan.training.loss_scaler).map_err(|e| e.to_string())
    };
    let ok = scaler(r#""loss_scale_window": 1e3, "initial_scale_power": 12.0, "hysteresis": 3, "min_loss_scale": 0.5"#).unwrap();
    assert_eq!((ok.window, ok.initial_scale_power, ok.hysteresis, ok.min_scale), (1000, 12, 3, 0.5));
    for (fp16, want) in [
        (r#""loss_scale_window": 0"#, "fp16.loss_scale_window 0: expected a whole number in [1, "),
        (r#""initial_scale_power": 16.5"#, "fp16.initial_scale_power 16.5: expected a whole number in [0, 63]"),
        (r#""initial_scale_power": 1024"#, "fp16.initial_scale_power 1024"),
        (r#""hysteresis": -1"#, "fp16.hysteresis -1"),
        (r#""min_loss_scale": 0"#, "fp16.min_loss_scale 0: expected a finite number above 0"),
    ] {
        let err = scaler(fp16).unwrap_err();
        assert!(err.contains(want), "{fp16}: {err}");
    }
}

#[test]
fn log_warmup_and_stage_3_are_refused_clearly() {
    let (_d, path) = ds(r#"{"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}"#);
    let err = TrainPlan::resolve(&parse(&["--deepspeed", &path])).unwrap_err().to_string();
    assert!(err.contains("warmup_type \"log\""), "{err}");
    let (_d, path) = ds(r#"{"zero_optimization": {"stage": 3}}"#);
    assert!(TrainPlan::resolve(&parse(&["--deepspeed", &path])).unwrap_err().to_string().contains("stage 3"));
    let (_d, path) = ds(r#"{"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}"#);
    let err = TrainPlan::resolve(&parse(&["--deepspeed", &path])).unwrap_err().to_string();
    assert!(err.contains("reduce_bucket_size \"auto\": expected a positive number"), "{err}");
    let (_d, path) = ds(r#"{"zero_optimization": {"stage": 2, "reduce_bucket_size": 2e8}}"#);
    assert_eq!(TrainPlan::resolve(&parse(&["--deepspeed", &path])).unwrap().zero.reduce_bucket_size, 200_000_000);
}

#[test]
fn cuda_n_places_the_one_rank_on_that_gpu() {
    let mut args = parse(&[]);
    args.launch.device = DeviceSpec::Cuda(Some(3));
    let plan = TrainPlan::resolve(&args).unwrap();
    assert_eq!(plan.launch.device.to_string(), "cuda:3");
    assert_eq!((plan.world_size(), plan.launch.placements[0].slot), (1, 3));
    args.launch.num_gpus = Some(2);
    let err = TrainPlan::resolve(&args).unwrap_err().to_string();
    assert!(err.contains("--device cuda:3 runs one rank on GPU 3"), "{err}");
    args.launch.num_gpus = None;
    args.launch.launcher = Some(LauncherKind::Slurm);
    let err = TrainPlan::resolve(&args).unwrap_err().to_string();
    assert!(err.contains("--device cuda:3 runs one rank on GPU 3"), "slurm gives each task its own GPU: {err}");
}

#[test]
fn numbers_out_of_range_are_refused_by_flag() {
    for (args, want) in [
        (["--learning_rate", "NaN"], "--learning_rate NaN: must be above 0"),
        (["--learning_rate", "-1"], "--learning_rate -1: must be above 0"),
        (["--learning_rate", "0"], "--learning_rate 0: must be above 0"),
        (["--max_grad_norm", "nan"], "--max_grad_norm NaN: must be 0 (no clipping) or more"),
        (["--max_grad_norm", "-0.5"], "--max_grad_norm -0.5"),
        (["--adam_beta1", "1"], "--adam_beta1 1: must be in [0, 1)"),
        (["--adam_beta2", "-0.1"], "--adam_beta2 -0.1"),
        (["--adam_epsilon", "0"], "--adam_epsilon 0: must be above 0"),
        (["--weight_decay", "inf"], "--weight_decay inf"),
        (["--warmup_ratio", "1.5"], "--warmup_ratio 1.5: must be in [0, 1]"),
        (["--num_train_epochs", "0"], "--num_train_epochs 0: must be above 0"),
        (["--num_train_epochs", "-1"], "--num_train_epochs -1"),
    ] {
        let err = TrainPlan::resolve(&parse(&args)).unwrap_err().to_string();
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let fine = parse(&["--num_train_epochs", "0", "--max_steps", "5", "--max_grad_norm", "0", "--warmup_ratio", "1"]);
    assert_eq!(TrainPlan::resolve(&fine).unwrap().training.max_steps, Some(5), "epochs are not read with --max_steps");
}

#[test]
fn flag_errors() {
    assert!(TrainPlan::resolve(&parse(&["--fp16"])).unwrap_err().to_string().contains("--fp16 needs a GPU"));
    let err =
        Cli::try_parse_from(["x", "--train_file", "d", "--output_dir", "o", "--lr_scheduler_type", "poly"]).err().unwrap().to_string();
    assert!(err.contains("--lr_scheduler_type") && err.contains("expected linear, cosine"), "{err}");
    let mut args = parse(&[]);
    args.training.do_train = false;
    assert!(TrainPlan::resolve(&args).unwrap_err().to_string().contains("--do_train"));
    let plan = TrainPlan::resolve(&parse(&["--fp16", "false", "--warmup_ratio", "0.1"])).unwrap();
    assert_eq!((plan.training.precision, plan.warmup_steps(95)), (Precision::Fp32, 10));
}

/// `parse` of model `config` without the data, output dir, tokenizer and device flags, for `purpose`.
fn bare(purpose: Purpose, config: &str, extra: &[&str]) -> Result<TrainPlan> {
    let mut args = parse(extra);
    (args.data.train_file, args.training.output_dir, args.model.train_tokenizer) = (None, None, None);
    (args.launch.device, args.launch.worker_bin, args.model.config_name) = (DeviceSpec::Auto, None, Some(config.into()));
    TrainPlan::resolve_for(&args, purpose)
}

#[test]
fn an_estimate_plans_gpu_ranks_and_nodes_from_any_machine_and_train_keeps_its_checks() {
    let plan = bare(Purpose::Estimate, "codegen-16B", &["--num_nodes", "2", "--num_gpus", "8"]).unwrap();
    assert_eq!((plan.purpose, plan.launch.device, plan.world_size()), (Purpose::Estimate, Device::Cuda(None), 16));
    let per_host = |plan: &TrainPlan, host: &str| plan.launch.placements.iter().filter(|p| p.host == host).count();
    assert_eq!((per_host(&plan, "node-0"), per_host(&plan, "node-1")), (8, 8));
    assert_eq!(plan.training.precision, Precision::Bf16, "GPU ranks default to bf16 before their GPU's rule");
    assert_eq!(plan.data.block_size, None, "taken from the model, as train does");
    assert_eq!(plan.tokenizer, TokenizerChoice::Dir(PathBuf::new()), "never loaded");
    let plan = bare(Purpose::Estimate, "tiny", &["--gpu_model", "p40"]).unwrap();
    assert_eq!((plan.launch.device, plan.world_size(), plan.launch.gpu_model), (Device::Cuda(None), 1, Some(GpuModel::P40)));
    // The same flags to train: each missing piece is refused as before.
    let mut args = parse(&["--num_nodes", "2"]);
    args.launch.device = DeviceSpec::Cuda(None);
    assert!(TrainPlan::resolve(&args).unwrap_err().to_string().contains("--num_nodes > 1 needs --hostfile"));
    let err = TrainPlan::resolve(&parse(&["--num_gpus", "8"])).unwrap_err().to_string();
    assert!(err.contains("--num_gpus 8 with --device cpu: use --num_workers 8"), "{err}");
    let mut args = parse(&[]);
    args.data.train_file = None;
    assert!(TrainPlan::resolve(&args).unwrap_err().to_string().contains("--train_file is required"));
    let mut args = parse(&[]);
    args.training.output_dir = None;
    assert!(TrainPlan::resolve(&args).unwrap_err().to_string().contains("--output_dir is required"));
    let mut args = parse(&[]);
    args.model.train_tokenizer = None;
    assert!(TrainPlan::resolve(&args).unwrap_err().to_string().contains("--config_name needs a tokenizer"));
    // Clap itself still requires --train_file and --output_dir of `train`.
    let err = Cli::try_parse_from(["x", "--config_name", "tiny", "--do_train"]).err().unwrap().to_string();
    assert!(err.contains("--train_file") && err.contains("--output_dir"), "{err}");
    // GPU ranks of a model on CPU ranks contradict each other.
    let err = TrainPlan::resolve(&parse(&["--gpu_model", "p40"])).unwrap_err().to_string();
    assert!(err.contains("--gpu_model p40 plans GPU ranks, but these are CPU ranks") && err.contains("--device cuda"), "{err}");
}

#[test]
fn a_memory_size_needs_its_unit_and_the_split_a_percentage() {
    let train = TrainPlan::resolve(&parse(&["--gpu_memory", "24"])).unwrap_err().to_string();
    let estimate = bare(Purpose::Estimate, "tiny", &["--gpu_memory", "24"]).unwrap_err().to_string();
    for err in [train, estimate] {
        assert!(err.contains("--gpu_memory 24: a size needs a unit") && err.contains("--gpu_memory 24GiB"), "{err}");
    }
    assert_eq!(TrainPlan::resolve(&parse(&["--gpu_memory", "24GiB"])).unwrap().launch.gpu_memory, Some(24 << 30));
    let err = TrainPlan::resolve(&parse(&["--validation_split_percentage", "101"])).unwrap_err().to_string();
    assert!(err.contains("--validation_split_percentage 101: must be in [0, 100]"), "{err}");
    let err = parse(&["--validation_split_percentage", "101"]).data.plan().unwrap_err().to_string();
    assert!(err.contains("--validation_split_percentage 101"), "tokenize's plan checks it too: {err}");
    for fine in [&["--validation_split_percentage", "100"][..], &["--validation_split_percentage", "0"]] {
        assert!(TrainPlan::resolve(&parse(fine)).is_ok(), "{fine:?}");
    }
    // With --validation_file it is not read, as in run_clm.
    assert!(TrainPlan::resolve(&parse(&["--validation_split_percentage", "101", "--validation_file", "v.jsonl"])).is_ok());
}

/// Each kind of mistake is its own variant, carrying the flag (and value) at fault.
#[test]
fn refusals_carry_their_cause() {
    let cause = |extra: &[&str]| TrainPlan::resolve(&parse(extra)).unwrap_err();
    assert!(matches!(cause(&["--learning_rate", "0"]), CoordinatorError::Flag { flag: "--learning_rate", value, .. } if value == "0"));
    assert!(matches!(cause(&["--per_device_train_batch_size", "0"]), CoordinatorError::Flag { flag: "--per_device_train_batch_size", .. }));
    assert!(matches!(cause(&["--fp16", "--bf16"]), CoordinatorError::Flags { flags: ["--fp16", "--bf16"], .. }));
    assert!(matches!(cause(&["--num_gpus", "8"]), CoordinatorError::Flags { flags: ["--num_gpus", "--device"], .. }));
    let mut args = parse(&[]);
    args.model.train_tokenizer = Some(12);
    let err = TrainPlan::resolve(&args).unwrap_err();
    assert!(matches!(&err, CoordinatorError::Flag { flag: "--train_tokenizer", value, .. } if value == "12"), "{err:?}");
    let mut args = parse(&[]);
    args.data.train_file = None;
    assert!(matches!(TrainPlan::resolve(&args).unwrap_err(), CoordinatorError::Missing { flag: "--train_file", .. }));
    let (_d, path) = ds(r#"{"zero_optimization": {"stage": 3}}"#);
    assert!(matches!(cause(&["--deepspeed", &path]), CoordinatorError::DsConfig { path: p, .. } if p.to_str() == Some(path.as_str())));
    let missing = std::env::temp_dir().join("zerotune-no-such-hostfile");
    let err = cause(&["--hostfile", missing.to_str().unwrap()]);
    assert!(
        matches!(&err, CoordinatorError::FlagFile { flag: "--hostfile", source, .. } if source.kind() == std::io::ErrorKind::NotFound),
        "{err:?}"
    );
}
