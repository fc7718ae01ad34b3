//! The table of things users get wrong and faults that hit them, each run through the real
//! binaries: for every case the exit status, a message naming the flag or file, no panic, and the
//! prior output untouched (byte for byte), or not created at all.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{binary, fixtures, s, source_dir};

/// How a case must end.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ends {
    /// Exit status 1 with a message.
    Refused,
    /// Exit status 0, saying something on the way.
    Succeeds,
    /// The process writing the checkpoint dies; the coordinator reports the rank's failure.
    RankDies,
}

/// One row of the table.
struct Case {
    name: &'static str,
    /// `coordinator`, `worker` or `convert`, then its arguments.
    argv: Vec<String>,
    /// Shell lines run before the binary (a file-size limit; SIGXFSZ ignored or not).
    limits: &'static str,
    ends: Ends,
    /// Texts stderr must hold: the flag or file at fault and what to do.
    says: Vec<String>,
    /// Paths whose files must be byte-identical afterwards.
    keeps: Vec<PathBuf>,
    /// Paths that must not exist afterwards.
    absent: Vec<PathBuf>,
}

fn case(name: &'static str, argv: &[&str], ends: Ends, says: &[&str]) -> Case {
    Case {
        name,
        argv: argv.iter().map(|a| a.to_string()).collect(),
        limits: "",
        ends,
        says: says.iter().map(|a| a.to_string()).collect(),
        keeps: vec![],
        absent: vec![],
    }
}

impl Case {
    fn keeps(mut self, paths: &[&Path]) -> Self {
        self.keeps.extend(paths.iter().map(|p| p.to_path_buf()));
        self
    }

    fn absent(mut self, paths: &[&Path]) -> Self {
        self.absent.extend(paths.iter().map(|p| p.to_path_buf()));
        self
    }

    fn limits(mut self, limits: &'static str) -> Self {
        self.limits = limits;
        self
    }

    /// Runs the case; returns its failures (empty when it passed).
    fn check(&self, cache: &Path) -> Vec<String> {
        let before: Vec<_> = self.keeps.iter().map(|p| snapshot(p)).collect();
        let mut argv = self.argv.clone();
        if argv[0] == "coordinator" && argv[1] == "train" {
            argv.splice(2..2, ["--device", "cpu", "--cache_dir", &s(cache)].map(String::from));
        }
        let script = format!("{} exec \"$0\" \"$@\"", self.limits);
        let out = Command::new("sh").arg("-c").arg(script).arg(binary(&argv[0])).args(&argv[1..]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let mut failures = vec![];
        let code = out.status.code();
        let status_ok = match self.ends {
            Ends::Refused => code == Some(1),
            Ends::Succeeds => code == Some(0),
            Ends::RankDies => code == Some(1) && err.contains("worker rank 0"),
        };
        if !status_ok {
            failures.push(format!("exit status {:?}, expected {:?}", out.status, self.ends));
        }
        for want in self.says.iter().filter(|w| !err.contains(w.as_str())) {
            failures.push(format!("stderr lacks {want:?}"));
        }
        if err.contains("panicked") {
            failures.push("a panic reached the user".into());
        }
        for (path, before) in self.keeps.iter().zip(before) {
            if snapshot(path) != before {
                failures.push(format!("{} changed", path.display()));
            }
        }
        for path in self.absent.iter().filter(|p| p.exists()) {
            failures.push(format!("{} was created", path.display()));
        }
        if !failures.is_empty() {
            failures.insert(0, format!("case {:?} ({}):\n{err}", self.name, argv.join(" ")));
        }
        failures
    }
}

/// Every file under `path` (or `path` itself) with its bytes.
fn snapshot(path: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            files.extend(snapshot(&entry.unwrap().path()));
        }
    } else if let Ok(bytes) = std::fs::read(path) {
        files.insert(path.to_path_buf(), bytes);
    }
    files
}

fn copy_dir(from: &Path, to: &Path) -> PathBuf {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(status.success());
    to.to_path_buf()
}

/// Overwrites 16 bytes in the middle of `path` (the file stays well-formed: same size, same header).
fn damage(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle..middle + 16].iter_mut().for_each(|b| *b = !*b);
    std::fs::write(path, bytes).unwrap();
}

/// Sets the first value of the first tensor in `model.safetensors` to NaN.
fn plant_nan(model: &Path) {
    let path = model.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header..12 + header].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
}

/// `coordinator train` from scratch on this repo's source: tiny model, 16-token blocks.
fn train_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["coordinator", "train", "--config_name", "tiny", "--train_tokenizer", "300", "--train_file"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    args.push(s(&source_dir()));
    args.extend(["--output_dir".to_string(), s(out)]);
    args.extend(["--do_train", "--block_size", "16", "--per_device_train_batch_size", "2", "--save_steps", "2"].map(String::from));
    // A flag in `extra` replaces the default's value.
    for pair in extra.chunk_by(|_, value| !value.starts_with("--")) {
        if let Some(at) = args.iter().position(|a| a == pair[0]) {
            let values = args[at + 1..].iter().take_while(|a| !a.starts_with("--")).count();
            args.drain(at..at + 1 + values);
        }
        args.extend(pair.iter().map(|a| a.to_string()));
    }
    args
}

fn with_argv(mut c: Case, argv: Vec<String>) -> Case {
    c.argv = argv;
    c
}

#[test]
fn every_failure_is_named_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, cache) = (tmp.path(), tmp.path().join("cache"));
    let base = t.join("base");
    let made = Command::new(binary("coordinator"))
        .args(["train", "--device", "cpu", "--cache_dir", &s(&cache)])
        .args(&train_args(&base, &["--max_steps", "4"])[2..])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", common::stderr(&made));
    let resume =
        |out: &Path, extra: &[&str]| train_args(out, &[&["--resume_from_checkpoint", "latest", "--max_steps", "6"], extra].concat());
    let tiny = s(&fixtures().join("tiny"));

    // Two jobs, one output dir: this test holds the lock as a running job would.
    let locked = copy_dir(&base, &t.join("locked"));
    let lock = File::options().write(true).create(true).truncate(true).open(locked.join(".zerotune.lock")).unwrap();
    std::fs::write(locked.join(".zerotune.lock"), format!("host test pid {}\n", std::process::id())).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);

    // A checkpoint whose optimizer slice, or model, was damaged after it was saved.
    let slice_damaged = copy_dir(&base, &t.join("slice"));
    damage(&slice_damaged.join("checkpoint-4/optimizer/rank-00000-of-00001.safetensors"));
    let model_damaged = copy_dir(&base, &t.join("model-damaged"));
    damage(&model_damaged.join("checkpoint-4/model/model.safetensors"));
    let store = t.join("store");
    let good = Command::new(binary("convert"))
        .args(["triton", &s(&base.join("checkpoint-2")), "--model_store", &s(&store), "--name", "m"])
        .output();
    assert!(good.unwrap().status.success());

    // An HF model without manifest holding a NaN; a save that never finished.
    let nan_model = copy_dir(&fixtures().join("tiny"), &t.join("nan-model"));
    plant_nan(&nan_model);
    let partial = copy_dir(&base.join("checkpoint-4"), &t.join(".checkpoint-6.partial"));
    std::fs::remove_file(partial.join("manifest.json")).unwrap();
    let truncated = copy_dir(&fixtures().join("tiny"), &t.join("truncated"));
    let weights = truncated.join("model.safetensors");
    std::fs::OpenOptions::new().write(true).open(&weights).unwrap().set_len(std::fs::metadata(&weights).unwrap().len() - 100).unwrap();

    // Resumes that die or fail while saving checkpoint-6 (the optimizer slice is the largest file).
    let killed = copy_dir(&base, &t.join("killed"));
    let full = copy_dir(&base, &t.join("full"));
    let reshaped = copy_dir(&base, &t.join("reshaped"));
    let bad_utf8 = t.join("bad.jsonl");
    std::fs::write(&bad_utf8, b"{\"text\": \"ok\"}\n{\"text\": \"\xff\xfe\"}\n").unwrap();
    let ds = t.join("ds.json");
    std::fs::write(&ds, r#"{"zero_optimisation": {"stage": 2}}"#).unwrap();
    // One 3 MB document (cut at line boundaries) and a training split too small for one block.
    let big_doc = t.join("big.jsonl");
    let big_text = "fn line() { let x = 1; }\n".repeat(120_000);
    std::fs::write(&big_doc, serde_json::json!({ "text": big_text }).to_string()).unwrap();
    let small = t.join("small.jsonl");
    std::fs::write(&small, "{\"text\": \"x = 1\"}\n{\"text\": \"y = 2\"}\n").unwrap();
    let new_out = t.join("never");
    let missing = t.join("no-such-dir/data.jsonl");
    let long_prompt = "def f(x):\n    return x\n".repeat(5); // 55 of the 64 tokens
                                                             // Runs resumed onto other steps, data or limits (each from a copy of `base`: checkpoints 2 and 4).
    let finished = copy_dir(&base, &t.join("finished"));
    let rotated = copy_dir(&base, &t.join("rotated"));
    let unlimited = copy_dir(&base, &t.join("unlimited"));
    let other_data = copy_dir(&base, &t.join("other-data"));
    let retokenized = copy_dir(&base, &t.join("retokenized"));
    let other_source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/src");
    // A source tree holding a run's output dir, trained on again.
    let tree = copy_dir(&source_dir(), &t.join("tree"));
    let inside = tree.join("runs/a");
    let eval = |flag: &str, value: &str| {
        let out = s(&t.join("eval-out"));
        let args = ["worker", "eval", "--model", &tiny, "--validation_file", &s(&source_dir()), "--output_dir", &out, flag, value];
        args.map(String::from).to_vec()
    };

    let cases = vec![
        with_argv(
            case("second job on a locked output dir", &[], Ends::Refused, &["another job is using it", "host test pid"]),
            train_args(&locked, &["--overwrite_output_dir", "--max_steps", "2"]),
        )
        .keeps(&[&locked]),
        with_argv(
            case("learning rate NaN", &[], Ends::Refused, &["--learning_rate NaN: must be above 0"]),
            train_args(&new_out, &["--learning_rate", "NaN"]),
        )
        .absent(&[&new_out]),
        with_argv(
            case("negative learning rate", &[], Ends::Refused, &["--learning_rate -1: must be above 0"]),
            train_args(&new_out, &["--learning_rate", "-1"]),
        )
        .absent(&[&new_out]),
        with_argv(case("zero epochs", &[], Ends::Refused, &["--num_train_epochs 0"]), train_args(&new_out, &["--num_train_epochs", "0"]))
            .absent(&[&new_out]),
        case(
            "temperature NaN",
            &["worker", "generate", "--model", &tiny, "--prompt", "def", "--temperature", "NaN"],
            Ends::Refused,
            &["--temperature NaN"],
        ),
        case(
            "top_p 2",
            &["worker", "generate", "--model", &tiny, "--prompt", "def", "--top_p", "2"],
            Ends::Refused,
            &["--top_p 2: must be in (0, 1]"],
        ),
        case(
            "16-bit inference on the CPU",
            &["worker", "generate", "--model", &tiny, "--prompt", "def", "--device", "cpu", "--dtype", "bf16"],
            Ends::Refused,
            &["--dtype bf16: on the CPU models compute in fp32"],
        ),
        with_argv(
            case(
                "optimizer slice damaged",
                &[],
                Ends::Refused,
                &["rank-00000-of-00001.safetensors: its content differs", "--resume_from_checkpoint"],
            ),
            resume(&slice_damaged, &[]),
        )
        .keeps(&[&slice_damaged]),
        case(
            "model damaged, convert --force over a good model",
            &["convert", "triton", &s(&model_damaged.join("checkpoint-4")), "--model_store", &s(&store), "--name", "m", "--force"],
            Ends::Refused,
            &["model.safetensors: its content differs"],
        )
        .keeps(&[&store]),
        case(
            "NaN weight, convert",
            &["convert", "gptj", &s(&nan_model), &s(&t.join("gptj"))],
            Ends::Refused,
            &["holds 1 NaN or infinite values", "--allow_nonfinite"],
        )
        .absent(&[&t.join("gptj")]),
        case(
            "NaN weight, generate",
            &["worker", "generate", "--model", &s(&nan_model), "--prompt", "def"],
            Ends::Refused,
            &["model.safetensors: tensor", "holds 1 NaN"],
        ),
        with_argv(case("NaN weight, fine-tune", &[], Ends::Refused, &["holds 1 NaN"]), {
            let mut args = train_args(&new_out, &["--model_name_or_path", &s(&nan_model)]);
            args.drain(2..6); // no --config_name / --train_tokenizer
            args
        })
        .absent(&[&new_out]),
        case(
            "NaN weight allowed",
            &["convert", "--allow_nonfinite", "gptj", &s(&nan_model), &s(&t.join("gptj-nan"))],
            Ends::Succeeds,
            &["warning", "loaded anyway"],
        ),
        case(
            "convert an incomplete checkpoint",
            &["convert", "gptj", &s(&partial), &s(&t.join("gptj-partial"))],
            Ends::Refused,
            &["an incomplete checkpoint", "latest"],
        )
        .absent(&[&t.join("gptj-partial")]),
        with_argv(case("worker killed while saving", &[], Ends::RankDies, &["worker rank 0"]), resume(&killed, &[]))
            .limits("ulimit -f 1000;")
            .keeps(&[&killed.join("checkpoint-4"), &killed.join("latest")]),
        with_argv(
            case("file-size limit while saving", &[], Ends::RankDies, &["File too large", "write elsewhere or raise it"]),
            resume(&full, &[]),
        )
        .limits("ulimit -f 1000; trap '' XFSZ;")
        .keeps(&[&full.join("checkpoint-4"), &full.join("latest")]),
        case(
            "convert over a limit, --force",
            &["convert", "triton", &s(&base), "--model_store", &s(&store), "--name", "m", "--force"],
            Ends::Refused,
            &["File too large"],
        )
        .limits("ulimit -f 200; trap '' XFSZ;")
        .keeps(&[&store]),
        with_argv(
            case(
                "resume with another block size",
                &[],
                Ends::Refused,
                &["--block_size 32 where the checkpoint has 16", "--ignore_data_skip"],
            ),
            resume(&reshaped, &["--block_size", "32"]),
        )
        .keeps(&[&reshaped]),
        with_argv(
            case(
                "resume with another global batch",
                &[],
                Ends::Refused,
                &["a global batch of 1", "where the checkpoint has 2", "--ignore_data_skip"],
            ),
            resume(&reshaped, &["--per_device_train_batch_size", "1"]),
        )
        .keeps(&[&reshaped]),
        case(
            "completion cut by the context",
            &["worker", "generate", "--model", &tiny, "--prompt", &long_prompt, "--max_new_tokens", "16"],
            Ends::Succeeds,
            &["stopped at the model's context of 64 tokens"],
        ),
        with_argv(
            case("misspelled ds_config key", &[], Ends::Refused, &["unknown key zero_optimisation (did you mean zero_optimization?)"]),
            train_args(&new_out, &["--deepspeed", &s(&ds)]),
        )
        .absent(&[&new_out]),
        with_argv(case("missing train file", &[], Ends::Refused, &["no-such-dir/data.jsonl", "check that the path exists"]), {
            let mut args = train_args(&new_out, &[]);
            args[7] = s(&missing);
            args
        })
        .absent(&[&new_out]),
        case(
            "a 3 MB document",
            &[
                "coordinator",
                "tokenize",
                "--tokenizer_name",
                &tiny,
                "--train_file",
                &s(&big_doc),
                "--block_size",
                "64",
                "--max_document_bytes",
                "1000000",
                "--cache_dir",
                &s(&cache),
            ],
            Ends::Succeeds,
            &["cut: 1 documents above --max_document_bytes 1000000 into 3 pieces"],
        ),
        with_argv(
            case(
                "a training split too small for one block",
                &[],
                Ends::Refused,
                &["small.jsonl", "cannot make one block of 512 tokens", "--block_size"],
            ),
            {
                let mut args = train_args(&new_out, &["--block_size", "512"]);
                args[7] = s(&small);
                args
            },
        )
        .absent(&[&new_out]),
        case("truncated safetensors", &["convert", "gptj", &s(&truncated), &s(&t.join("gptj-trunc"))], Ends::Refused, &["truncated"])
            .absent(&[&t.join("gptj-trunc")]),
        with_argv(case("invalid UTF-8 line", &[], Ends::Refused, &["bad.jsonl:2"]), {
            let mut args = train_args(&new_out, &[]);
            args[7] = s(&bad_utf8);
            args
        })
        .absent(&[&new_out]),
        case(
            "tp 3",
            &["convert", "triton", &s(&base), "--model_store", &s(&store), "--name", "m", "--tp", "3", "--force"],
            Ends::Refused,
            &["--tp 3"],
        )
        .keeps(&[&store]),
        case(
            "convert a run into itself, --force",
            &["convert", "gptj", &s(&base), &s(&base), "--force"],
            Ends::Refused,
            &["is the input", "choose an output outside"],
        )
        .keeps(&[&base]),
        case(
            "convert a checkpoint into its run dir, --force",
            &["convert", "gptj", &s(&base.join("checkpoint-4")), &s(&base), "--force"],
            Ends::Refused,
            &["contains the input", "checkpoint-4"],
        )
        .keeps(&[&base]),
        case(
            "convert a checkpoint into a dir inside it",
            &["convert", "fastertransformer", &s(&base.join("checkpoint-4")), &s(&base.join("checkpoint-4/ft"))],
            Ends::Refused,
            &["lies inside the input"],
        )
        .keeps(&[&base]),
        with_argv(
            case(
                "resume with --max_steps at the checkpoint's step",
                &[],
                Ends::Refused,
                &["--max_steps 4 ends at or below the checkpoint's step 4", "raise --max_steps above 4"],
            ),
            resume(&finished, &["--max_steps", "4"]),
        )
        .keeps(&[&finished]),
        with_argv(
            case(
                "resume from an older checkpoint, --save_total_limit 1",
                &[],
                Ends::Succeeds,
                &["removing", "checkpoint-4 (--save_total_limit 1)"],
            ),
            train_args(
                &rotated,
                &[
                    "--resume_from_checkpoint",
                    &s(&rotated.join("checkpoint-2")),
                    "--max_steps",
                    "3",
                    "--save_steps",
                    "3",
                    "--save_total_limit",
                    "1",
                ],
            ),
        ),
        with_argv(
            case("--save_total_limit 0 keeps every checkpoint", &[], Ends::Succeeds, &["saved checkpoint-6"]),
            resume(&unlimited, &["--save_total_limit", "0"]),
        )
        .keeps(&[&unlimited.join("checkpoint-2"), &unlimited.join("checkpoint-4")]),
        with_argv(
            case(
                "resume onto other data",
                &[],
                Ends::Refused,
                &["the data differ from the checkpoint's", "training documents where it has", "--ignore_data_skip"],
            ),
            resume(&other_data, &["--train_file", &s(&other_source)]),
        )
        .keeps(&[&other_data]),
        with_argv(
            case(
                "resume onto other data with --ignore_data_skip keeps the tokenizer",
                &[],
                Ends::Succeeds,
                &["keeping the checkpoint's tokenizer", "the data differ from the checkpoint's", "(--ignore_data_skip)"],
            ),
            resume(&retokenized, &["--train_file", &s(&other_source), "--ignore_data_skip"]),
        )
        .keeps(&[&retokenized.join("checkpoint-4")]),
        with_argv(
            case("an output dir inside the source tree", &[], Ends::Succeeds, &["lies inside the source tree", ".zerotune.lock"]),
            train_args(&inside, &["--train_file", &s(&tree), "--max_steps", "2"]),
        ),
        with_argv(
            case("eval --block_size 1", &[], Ends::Refused, &["--block_size 1: a block needs at least 2 tokens"]),
            eval("--block_size", "1"),
        )
        .absent(&[&t.join("eval-out")]),
        with_argv(
            case("eval --context_tokens 0", &[], Ends::Refused, &["--context_tokens 0: must be at least 1"]),
            eval("--context_tokens", "0"),
        )
        .absent(&[&t.join("eval-out")]),
        with_argv(
            case("eval --num_positions 0", &[], Ends::Refused, &["--num_positions 0: must be at least 1"]),
            eval("--num_positions", "0"),
        )
        .absent(&[&t.join("eval-out")]),
    ];
    let failures: Vec<String> = cases.iter().flat_map(|c| c.check(&cache)).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // What the resumes above left: the checkpoint just saved survives rotation, `latest` names it.
    assert!(rotated.join("checkpoint-3/trainer_state.json").is_file() && !rotated.join("checkpoint-2").exists());
    assert_eq!(std::fs::read_to_string(rotated.join("latest")).unwrap(), "checkpoint-3\n");
    assert!(unlimited.join("checkpoint-6").is_dir());
    let tokenizer = |dir: &Path| std::fs::read(dir.join("model/tokenizer.json")).unwrap();
    assert_eq!(tokenizer(&retokenized.join("checkpoint-6")), tokenizer(&retokenized.join("checkpoint-4")), "a resume trains no tokenizer");
    // The next run on the tree skips the output dir inside it.
    let again = with_argv(
        case("a source tree holding an output dir", &[], Ends::Succeeds, &["skipped 1 zerotune output dir(s)"]),
        train_args(&t.join("after-tree"), &["--train_file", &s(&tree), "--max_steps", "2"]),
    );
    let failures = again.check(&cache);
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The OS error is said once.
    let mut args = train_args(&new_out, &[]);
    args[7] = s(&missing);
    let run = Command::new(binary("coordinator")).args(&args[1..]).output().unwrap();
    let err = common::stderr(&run);
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");

    // After the deaths above, the next start removes the leftover and resumes from the intact checkpoint-4.
    assert!(killed.join(".checkpoint-6.partial").is_dir(), "the dead save's directory stays until the next start");
    assert_eq!(std::fs::read_to_string(killed.join("latest")).unwrap(), "checkpoint-4\n");
    let again = case(
        "the next start cleans up",
        &[],
        Ends::Succeeds,
        &["removing", ".checkpoint-6.partial", "an incomplete checkpoint an interrupted save left"],
    );
    let failures = with_argv(again, resume(&killed, &[])).check(&cache);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(std::fs::read_to_string(killed.join("latest")).unwrap(), "checkpoint-6\n");
    drop(lock);
}

/// `coordinator estimate FLAGS`.
fn estimate<'a>(flags: &[&'a str]) -> Vec<&'a str> {
    [&["coordinator", "estimate"][..], flags].concat()
}

/// The memory planner from this machine (no GPU, no data, no hostfile): a size without its unit
/// and a split over 100% refused by flag; the 16B on 2 nodes of 8 A100-80GB told the changes that
/// fit on those 16 GPUs, and the advised command fitting as said; the README's 350M recipe
/// planned for a P40 in fp32, fitting as with the README's --gpu_memory 24GiB.
#[test]
fn the_planner_refuses_by_flag_and_its_advice_fits() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, cache) = (tmp.path(), tmp.path().join("cache"));
    let new_out = t.join("never");
    let ds = s(&t.join("ds_offload.json"));
    std::fs::write(&ds, r#"{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}"#).unwrap();
    let unit = ["--gpu_memory 24: a size needs a unit", "add one, e.g. --gpu_memory 24GiB"];
    let big = ["--model_name_or_path", "./codegen-16B-multi", "--num_nodes", "2", "--num_gpus", "8", "--gpu_model", "a100-80gb"];
    let big = [&big[..], &["--block_size", "2048", "--per_device_train_batch_size", "1"]].concat();
    let advice = "it would fit with: offload the optimizer (zero_optimization.offload_optimizer.device \"cpu\" in --deepspeed), \
                  ZeRO stage 2 (zero_optimization.stage 2 in --deepspeed), --gradient_checkpointing on the same 16 GPUs: ";
    // README's "350M on one P40", planned rather than run.
    let recipe = ["--model_name_or_path", "./codegen-350M-multi", "--deepspeed", &ds, "--gradient_checkpointing", "--block_size", "2048"];
    let recipe = [&recipe[..], &["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "8"]].concat();
    let p40 = [&recipe[..], &["--gpu_model", "p40"]].concat();
    let no_ds: Vec<&str> = p40.iter().copied().filter(|&flag| flag != "--deepspeed" && flag != ds).collect();
    let cases = [
        with_argv(case("a memory size without its unit", &[], Ends::Refused, &unit), train_args(&new_out, &["--gpu_memory", "24"]))
            .absent(&[&new_out]),
        case(
            "estimate: a memory size without its unit",
            &estimate(&["--config_name", "codegen-350M", "--gpu_memory", "24"]),
            Ends::Refused,
            &unit,
        ),
        with_argv(
            case("validation split over 100%", &[], Ends::Refused, &["--validation_split_percentage 101: must be in [0, 100]"]),
            train_args(&new_out, &["--validation_split_percentage", "101"]),
        )
        .absent(&[&new_out]),
        case("16B on 2 nodes of 8 A100-80GB", &estimate(&big), Ends::Refused, &["DOES NOT FIT", "memory planner: the job needs", advice]),
        case("the 350M recipe on a P40", &estimate(&p40), Ends::Succeeds, &[]),
        case("350M on a P40 without a ds_config", &estimate(&no_ds), Ends::Succeeds, &["Tesla P40 (--gpu_model p40): note:", "in fp32"]),
    ];
    let failures: Vec<String> = cases.iter().flat_map(|c| c.check(&cache)).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    let run = |argv: &[&str]| Command::new(binary(argv[0])).args(&argv[1..]).output().unwrap();
    // The advised command fits, with the total the advice said.
    let refused = common::stderr(&run(&estimate(&big)));
    let said = refused.split(advice).nth(1).and_then(|rest| rest.split(" per GPU").next()).unwrap_or_else(|| panic!("{refused}"));
    let (need, cap) = said.split_once(" of ").unwrap_or_else(|| panic!("{said}"));
    let advised = run(&estimate(&[&big[..], &["--bf16", "--deepspeed", &ds, "--gradient_checkpointing"]].concat()));
    let table = String::from_utf8_lossy(&advised.stdout);
    assert!(advised.status.success(), "{table}{}", common::stderr(&advised));
    assert!(table.contains(&format!("total per GPU: {need} (")) && table.contains(&format!("fits in {cap}")), "{said}:\n{table}");
    // fp32, and the verdict of the README's --gpu_memory 24GiB for the P40.
    for flags in [&p40, &no_ds] {
        let table = String::from_utf8_lossy(&run(&estimate(flags)).stdout).into_owned();
        let plan = table.lines().next().unwrap_or_default();
        assert!(plan.starts_with("memory plan: ") && plan.contains(", Fp32, ") && plan.contains("CPU offload"), "{table}");
        assert!(table.contains("total per GPU: ") && table.contains(": fits in "), "{table}");
    }
    let readme = run(&estimate(&[&recipe[..], &["--device", "cuda", "--gpu_memory", "24GiB"]].concat()));
    assert_eq!(String::from_utf8_lossy(&run(&estimate(&p40)).stdout), String::from_utf8_lossy(&readme.stdout));
}
