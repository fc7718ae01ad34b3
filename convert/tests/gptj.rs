//! `convert gptj` against HF transformers: GPTJForCausalLM on our output gives CodeGen's logits.

mod common;

use common::{convert, fixtures, python_logits, reference, rel_err};
use zerotune_hf::{Dtype, WeightFiles};

const LOGITS_REL: f64 = 1e-5;

fn hf_logits(model: &std::path::Path) -> Vec<f32> {
    python_logits("hf_forward.py", model)
}

#[test]
fn gptj_output_reproduces_codegen_logits_in_hf() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("gptj");
    let run = convert(&["gptj", &fixtures().join("tiny").to_string_lossy(), &out.to_string_lossy()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "gptj");
    assert_eq!(config["torch_dtype"], "float32", "the source precision is kept");
    assert!(out.join("tokenizer.json").is_file());
    let err = rel_err(&hf_logits(&out), &reference("logits"));
    println!("GPT-J vs CodeGen logits: rel {err:.3e}");
    assert!(err < LOGITS_REL);
}

#[test]
fn fp16_release_checkpoint_keeps_fp16_or_converts_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    let (keep, fp32) = (tmp.path().join("keep"), tmp.path().join("fp32"));
    let input = fixtures().join("tiny-bin");
    assert!(convert(&["gptj", &input.to_string_lossy(), &keep.to_string_lossy()]).status.success());
    let weights = WeightFiles::open(&keep).unwrap();
    assert_eq!(weights.info("transformer.h.0.attn.q_proj.weight").unwrap().0, Dtype::F16);
    assert!(!weights.contains("transformer.h.0.attn.causal_mask"), "legacy buffers are not converted");
    let run = convert(&["gptj", &input.to_string_lossy(), &fp32.to_string_lossy(), "--dtype", "fp32"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(rel_err(&hf_logits(&fp32), &reference("logits_fp16_weights")) < LOGITS_REL);
}

#[test]
fn refuses_existing_output_and_non_codegen_input() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("exists");
    std::fs::create_dir(&out).unwrap();
    let run = convert(&["gptj", &fixtures().join("tiny").to_string_lossy(), &out.to_string_lossy()]);
    assert!(!run.status.success() && String::from_utf8_lossy(&run.stderr).contains("--force"));

    let gptj = tmp.path().join("gptj");
    assert!(convert(&["gptj", &fixtures().join("tiny").to_string_lossy(), &gptj.to_string_lossy()]).status.success());
    let again = convert(&["gptj", &gptj.to_string_lossy(), &tmp.path().join("x").to_string_lossy()]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success() && err.contains("model_type is \"gptj\""), "{err}");
    assert!(!err.contains("panicked"));
}

/// The Llama decoder family has no FasterTransformer, Triton or GPT-J layout: each conversion is
/// refused by the model's type, pointing to `worker serve`, and writes nothing.
#[test]
fn the_decoder_family_is_refused_by_name_and_pointed_to_worker_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let qwen = fixtures().join("decoders/qwen2").to_string_lossy().into_owned();
    let out = tmp.path().join("out").to_string_lossy().into_owned();
    let store = tmp.path().join("store").to_string_lossy().into_owned();
    for args in [vec!["gptj", &qwen, &out], vec!["fastertransformer", &qwen, &out], vec!["triton", &qwen, "--model_store", &store]] {
        let run = convert(&args);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{args:?}");
        assert!(err.contains("a qwen2 model cannot be converted") && err.contains("worker serve --model"), "{args:?}: {err}");
        assert!(!err.contains("panicked"));
    }
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "nothing was written");
}

#[test]
fn a_source_that_shrinks_during_the_conversion_is_an_error_and_leaves_nothing() {
    use zerotune_convert::{gptj, output::Staged, source::Source};
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("tiny");
    assert!(std::process::Command::new("cp").arg("-a").arg(fixtures().join("tiny")).arg(&input).status().unwrap().success());
    let source = Source::open(&input, zerotune_hf::manifest::NonFinite::Refuse).unwrap();
    let (out, partial) = (tmp.path().join("gptj"), tmp.path().join(".gptj.partial"));
    let staged = Staged::new(&out, false, &input).unwrap();
    // Another program truncates the weights after they were opened (a mapping would die of SIGBUS).
    let weights = input.join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&weights).unwrap().set_len(len / 2).unwrap();
    let err = gptj::convert(&source, staged.path(), Dtype::F32).err().expect("the conversion fails").to_string();
    assert!(err.contains("model.safetensors") && err.contains("shrank while it was being read"), "{err}");
    drop(staged);
    assert!(!partial.exists() && !out.exists(), "a failed conversion leaves nothing");
}
