//! Shared helpers for the convert tests: fixtures, the binary, the Python oracles, comparisons.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use zerotune_hf::WeightFiles;
pub use zerotune_tests::fixtures;

pub fn s(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

pub fn convert(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_convert")).args(args).output().unwrap()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `convert` and insists it succeeded.
pub fn convert_ok(args: &[&str]) -> Output {
    let out = convert(args);
    assert!(out.status.success(), "convert {args:?} failed: {}", stderr(&out));
    out
}

/// Runs a Python oracle from tests/fixtures and reads the logits it writes.
pub fn python_logits(script: &str, model: &Path) -> Vec<f32> {
    let python = std::env::var("ZEROTUNE_PYTHON").expect("ZEROTUNE_PYTHON (the test venv's python) is set by scripts/test.sh");
    let out = model.with_extension("logits.safetensors");
    let script = format!("{}/../tests/fixtures/{script}", env!("CARGO_MANIFEST_DIR"));
    let reference = fixtures().join("reference.safetensors");
    let status = Command::new(python).args([&script, &s(model), &s(&reference), &s(&out)]).status().unwrap();
    assert!(status.success(), "{script} could not read {}", model.display());
    WeightFiles::open_file(&out).unwrap().read("logits").unwrap().to_f32().unwrap()
}

pub fn reference(name: &str) -> Vec<f32> {
    WeightFiles::open_file(&fixtures().join("reference.safetensors")).unwrap().read(name).unwrap().to_f32().unwrap()
}

/// max |a - b| / max |b|.
pub fn rel_err(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let diff = ours.iter().zip(reference).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
    let scale = reference.iter().map(|b| b.abs() as f64).fold(0.0, f64::max);
    diff / scale
}
