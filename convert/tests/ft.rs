//! `convert fastertransformer` and `convert triton`: an independent numpy GPT-J forward over our
//! FT files (shards joined per the layout) reproduces CodeGen's logits from HF; config.pbtxt and
//! config.ini agree with the weights; padding, naming and every bad input.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{convert, convert_ok, fixtures, python_logits, reference, rel_err, s, stderr};
use zerotune_hf::write::write_file;
use zerotune_hf::{tokenizer, RawTensor, WeightFiles};

const FP32_REL: f64 = 1e-4;
const FP16_REL: f64 = 1e-2;
/// The fixture's CodeGen has 1003 vocab rows, padded to 1024 in FT files.
const VOCAB: usize = 1003;

fn ft_logits(dir: &Path) -> Vec<f32> {
    python_logits("ft_forward.py", dir)
}

/// The first `VOCAB` of every `padded`-wide row of logits; asserts the padded columns carry the
/// large negative bias, so they can never be chosen.
fn unpadded(logits: &[f32], padded: usize) -> Vec<f32> {
    assert_eq!(logits.len() % padded, 0);
    for row in logits.chunks(padded) {
        assert!(row[VOCAB..].iter().all(|&v| v == -1e4), "padded ids must score -1e4");
    }
    logits.chunks(padded).flat_map(|row| &row[..VOCAB]).copied().collect()
}

fn file_count(dir: &Path) -> usize {
    std::fs::read_dir(dir).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "bin")).count()
}

fn ini_value(dir: &Path, section: &str, key: &str) -> String {
    let text = std::fs::read_to_string(dir.join("config.ini")).unwrap();
    let body = text.split(&format!("[{section}]\n")).nth(1).unwrap_or_else(|| panic!("no [{section}] in config.ini"));
    let line = body.lines().take_while(|l| !l.starts_with('[')).find(|l| l.starts_with(&format!("{key} = "))).unwrap();
    line[key.len() + 3..].to_string()
}

#[test]
fn ft_files_reproduce_codegen_logits_for_tp_1_2_4() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = reference("logits");
    for n in [1usize, 2, 4] {
        convert_ok(&["fastertransformer", &s(&fixtures().join("tiny")), &s(tmp.path()), "--tp", &n.to_string()]);
        let dir = tmp.path().join(format!("{n}-gpu"));
        assert_eq!(file_count(&dir), 5 + 2 * (3 + 5 * n), "5 + L(3 + 5N) files");
        assert_eq!(
            std::fs::metadata(dir.join("model.layers.1.attention.query_key_value.weight.0.bin")).unwrap().len() as usize,
            64 * 3 * 64 / n * 4
        );
        assert_eq!(ini_value(&dir, "gptj", "tensor_para_size"), n.to_string());
        assert_eq!(ini_value(&dir, "gptj", "weight_data_type"), "fp32");
        let err = rel_err(&unpadded(&ft_logits(&dir), 1024), &reference);
        println!("tp {n}: FT files vs CodeGen logits rel {err:.3e}");
        assert!(err < FP32_REL, "tp {n}: rel {err}");
    }
}

#[test]
fn fp16_release_bin_and_fp16_output() {
    let tmp = tempfile::tempdir().unwrap();
    // The Salesforce-style fp16 pytorch_model.bin, widened to fp32 FT files: exact fp16 weights.
    convert_ok(&["fastertransformer", &s(&fixtures().join("tiny-bin")), &s(&tmp.path().join("from-bin"))]);
    let err = rel_err(&unpadded(&ft_logits(&tmp.path().join("from-bin/1-gpu")), 1024), &reference("logits_fp16_weights"));
    assert!(err < FP32_REL, "fp16 .bin -> fp32 FT: rel {err}");
    // fp16 FT files for FT >= 5.1, from the fp32 source.
    convert_ok(&["fastertransformer", &s(&fixtures().join("tiny-sharded")), &s(&tmp.path().join("half")), "--tp", "2", "--dtype", "fp16"]);
    let dir = tmp.path().join("half/2-gpu");
    assert_eq!(ini_value(&dir, "gptj", "weight_data_type"), "fp16");
    assert_eq!(std::fs::metadata(dir.join("model.wte.bin")).unwrap().len(), 1024 * 64 * 2);
    let err = rel_err(&unpadded(&ft_logits(&dir), 1024), &reference("logits"));
    println!("fp16 FT files vs CodeGen logits rel {err:.3e}");
    assert!(err < FP16_REL, "fp16: rel {err}");
}

/// `key: "k" value: { string_value: "v" }` pairs of a config.pbtxt.
fn pbtxt_parameters(text: &str) -> BTreeMap<String, String> {
    let quoted = |s: &str| s.split('"').nth(1).unwrap().to_string();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut params = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("key:") {
            let value = lines[i..].iter().find(|l| l.starts_with("string_value:")).unwrap();
            params.insert(quoted(line), quoted(value));
        }
    }
    params
}

/// A random CodeGen (values from a fixed LCG) with the given vocab rows and MLP width, plus the
/// fixture tokenizer.
fn random_codegen(dir: &Path, vocab: usize, n_inner: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny/config.json")).unwrap()).unwrap();
    config["vocab_size"] = vocab.into();
    config["n_inner"] = n_inner.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut state = 12345u64;
    let tensors: Vec<(String, RawTensor)> = zerotune_hf::ModelConfig::from_dir(dir)
        .unwrap()
        .parameter_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let values: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect();
            (name, RawTensor::from_f32(shape, &values))
        })
        .collect();
    write_file(&dir.join("model.safetensors"), &tensors).unwrap();
    std::fs::copy(fixtures().join("tiny/tokenizer.json"), dir.join("tokenizer.json")).unwrap();
}

#[test]
fn triton_config_pbtxt_matches_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, source) = (tmp.path().join("models"), tmp.path().join("mine"));
    random_codegen(&source, 2048, 96); // n_inner 96, not 4 x n_embd
    let out = convert_ok(&["triton", &s(&source), "--model_store", &s(&store), "--tp", "2"]);
    assert!(!stderr(&out).contains("padded"), "2048 rows are already a multiple of 1024");
    let model_dir = store.join("mine-2gpu");
    let weights = model_dir.join("fastertransformer/1/2-gpu");
    let p = pbtxt_parameters(&std::fs::read_to_string(model_dir.join("fastertransformer/config.pbtxt")).unwrap());
    let rows = |file: &str, row_bytes: u64| std::fs::metadata(weights.join(file)).unwrap().len() / row_bytes;
    let eos = tokenizer::eos_id(&tokenizer::load(&source).unwrap()).unwrap().to_string();
    let expected = [
        ("head_num", "4".to_string()),
        ("size_per_head", "16".into()),
        ("inter_size", (rows("model.layers.0.mlp.dense_h_to_4h.bias.0.bin", 4) * 2).to_string()),
        ("decoder_layers", "2".into()),
        ("rotary_embedding", "8".into()),
        ("vocab_size", rows("model.wte.bin", 64 * 4).to_string()),
        ("start_id", eos.clone()),
        ("end_id", eos),
        ("tensor_para_size", "2".into()),
        ("pipeline_para_size", "1".into()),
        ("max_seq_len", "64".into()),
        ("is_half", "1".into()),
        ("model_type", "GPT-J".into()),
        ("model_name", "mine".into()),
        ("model_checkpoint_path", s(&weights)),
    ];
    for (key, value) in &expected {
        assert_eq!(p.get(*key), Some(value), "config.pbtxt {key}");
    }
    assert_eq!(p["inter_size"], "96");
    assert_eq!(p["vocab_size"], "2048");
    assert_eq!(rows("model.lm_head.weight.bin", 64 * 4), 2048);
    assert_eq!(rows("model.lm_head.bias.bin", 4), 2048);
    let env = std::fs::read_to_string(store.join("mine-2gpu.env")).unwrap();
    for line in ["NUM_GPUS=2", "GPUS=0,1", "MODEL=mine", &format!("MODEL_DIR={}", model_dir.display()), "TRITON_PORT=8001"] {
        assert!(env.lines().any(|l| l == line), "{line} missing from .env:\n{env}");
    }
    assert!(String::from_utf8_lossy(&out.stdout).contains("NUM_GPUS=2"), ".env lines are printed");

    // --rebase: the path FT sees inside the container; a trainer checkpoint gets a run-step name.
    let checkpoint = tmp.path().join("run/checkpoint-7");
    std::fs::create_dir_all(&checkpoint).unwrap();
    std::fs::rename(&source, checkpoint.join("model")).unwrap();
    // FauxPilot's triton_config_gen.py names, and the hyphenated alias.
    convert_ok(&["triton", "--hf_model_dir", &s(&checkpoint), "--model-store", &s(&store), "--tp", "1", "--rebase", "/model"]);
    let text = std::fs::read_to_string(store.join("run-checkpoint-7-1gpu/fastertransformer/config.pbtxt")).unwrap();
    assert_eq!(pbtxt_parameters(&text)["model_checkpoint_path"], "/model/fastertransformer/1/1-gpu");
    assert!(text.contains("default_model_filename: \"run-checkpoint-7\""));
}

#[test]
fn resized_vocab_is_padded_from_the_model_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let out = convert_ok(&["triton", &s(&fixtures().join("tiny")), "--model_store", &s(tmp.path()), "--tp", "4"]);
    assert!(stderr(&out).contains("1003 vocab rows padded to 1024"), "{}", stderr(&out));
    let weights = tmp.path().join("tiny-4gpu/fastertransformer/1/4-gpu");
    let source = WeightFiles::open(&fixtures().join("tiny")).unwrap();
    let floats = |file: &str| -> Vec<f32> {
        std::fs::read(weights.join(file)).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    for (file, name, pad) in [
        ("model.wte.bin", "transformer.wte.weight", 0.0),
        ("model.lm_head.weight.bin", "lm_head.weight", 0.0),
        ("model.lm_head.bias.bin", "lm_head.bias", -1e4),
    ] {
        let (ours, trained) = (floats(file), source.read(name).unwrap().to_f32().unwrap());
        assert_eq!(ours[..trained.len()], trained[..], "{file}: the model's own rows, never another model's");
        assert!(ours[trained.len()..].iter().all(|&v| v == pad), "{file}: padding");
        assert_eq!(ours.len() / (trained.len() / VOCAB), 1024);
    }
    let p = pbtxt_parameters(&std::fs::read_to_string(tmp.path().join("tiny-4gpu/fastertransformer/config.pbtxt")).unwrap());
    assert_eq!(p["vocab_size"], "1024");
    assert_eq!(ini_value(&weights, "gptj", "vocab_size"), "1024");
}

/// Runs a failing conversion; checks the message and that nothing was left behind.
fn refused(args: &[&str], store: &Path, needle: &str) {
    let out = convert(args);
    let err = stderr(&out);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(err.contains(needle), "{args:?}: expected {needle:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let left: Vec<_> = std::fs::read_dir(store).map(|d| d.map(|e| e.unwrap().file_name()).collect()).unwrap_or_default();
    assert!(left.iter().all(|n| !n.to_string_lossy().contains("partial")), "staging dir left behind: {left:?}");
}

#[test]
fn bad_inputs_are_refused_with_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let tiny = s(&fixtures().join("tiny"));
    let triton = |extra: &[&str]| {
        [&["triton", tiny.as_str(), "--model_store", &s(&store)], extra].concat().iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>, needle: &str| refused(&args.iter().map(String::as_str).collect::<Vec<_>>(), &store, needle);
    run(triton(&["--tp", "3"]), "--tp 3: FasterTransformer needs a power of two from 1 to 8");
    run(triton(&["--tp", "16"]), "--tp 16");
    run(triton(&["--tp", "8"]), "--tp 8 must divide n_head (4)");
    run(triton(&["--dtype", "int8"]), "--dtype \"int8\"");
    run(triton(&["--dtype", "bf16"]), "fp32 or fp16");
    run(triton(&["--name", "a/b"]), "--name \"a/b\"");
    assert!(!store.join("tiny-1gpu").exists());

    // An existing model dir is kept unless --force, then replaced.
    convert_ok(&triton(&[]).iter().map(String::as_str).collect::<Vec<_>>());
    let marker = store.join("tiny-1gpu/keep-me");
    std::fs::write(&marker, "x").unwrap();
    run(triton(&[]), "pass --force");
    assert!(marker.is_file(), "a refused run touches nothing");
    convert_ok(&triton(&["--force"]).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!marker.exists() && store.join("tiny-1gpu/fastertransformer/config.pbtxt").is_file());

    // n_head not divisible by 4, a truncated weight file, no weights, a non-CodeGen model.
    let six = tmp.path().join("six-heads");
    random_codegen(&six, 64, 96);
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(six.join("config.json")).unwrap()).unwrap();
    config["n_head"] = 2.into();
    std::fs::write(six.join("config.json"), config.to_string()).unwrap();
    run(vec!["fastertransformer".into(), s(&six), s(&store)], "n_head 2 is not divisible by 4");

    let truncated = tmp.path().join("truncated");
    random_codegen(&truncated, 64, 96);
    let weights = truncated.join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&weights).unwrap().set_len(len - 100).unwrap();
    run(vec!["fastertransformer".into(), s(&truncated), s(&store)], "truncated");
    std::fs::remove_file(&weights).unwrap();
    run(vec!["fastertransformer".into(), s(&truncated), s(&store)], "no model weights found");

    let gptj = tmp.path().join("gptj");
    convert_ok(&["gptj", &tiny, &s(&gptj)]);
    run(vec!["fastertransformer".into(), s(&gptj), s(&store)], "model_type is \"gptj\"");
}
