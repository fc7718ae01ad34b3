//! Shared helpers for the convert tests: fixtures, the binary, the Python oracles, comparisons.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use zerotune_hf::WeightFiles;
#[allow(unused_imports)] // each test binary uses its own few
pub use zerotune_tests::{fixtures, rel_err, s, stderr};

pub fn convert(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_convert")).args(args).output().unwrap()
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
